"""Splits for real exports: split-name aliases, Roboflow's COCO split folders, the seeded and
stratified assignment of images without a split (recorded in the run, checked on resume),
and the three-line config that runs a COCO export without splits end to end."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

from mgral.cli import main
from mgral.config import config_from_dict, load_config
from mgral.data import coco
from mgral.data.formats import detect_format, read_dataset, write_dataset
from mgral.data.records import Category, Dataset, ImageRecord, Target, canonical_split
from mgral.data.splits import assign_splits, with_splits
from mgral.data.synth import SynthConfig, generate
from mgral.errors import ConfigError, DatasetError, RunError
from mgral.loop import prepare_dataset
from mgral.report.load import run_dataset
from mgral.runs import RunDir

# a three-line config, made fast: the tiny detector, two training iterations, one query round
FAST = [
    "detector.preset=tiny",
    "detector.params={pretrained: false}",
    "detector.train={iterations: 2, batch_size: 4}",
    "cycles=1",
]


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Dataset:
    """40 digits scenes of 64 px, in splits train / val / test (COCO)."""
    out = tmp_path_factory.mktemp("digits") / "digits"
    return generate(out, SynthConfig(images=40, image_size=64, max_digit_size=24, seed=0))


def _export_without_splits(digits: Dataset, out: Path) -> Path:
    """The digits scenes as a COCO export whose images have no ``split`` field."""
    shutil.copytree(digits.root, out)
    obj = json.loads((out / coco.ANNOTATIONS_FILE).read_text())
    for image in obj["images"]:
        del image["split"]
    (out / coco.ANNOTATIONS_FILE).write_text(json.dumps(obj))
    return out


def _roboflow_export(dataset: Dataset, out: Path) -> Path:
    """``dataset`` as Roboflow writes a COCO export: ``train/``, ``valid/``, ``test/``, each with
    ``_annotations.coco.json`` (image ids from 0, a first category that is the supercategory of
    the others) and its images beside it."""
    for split, folder in (("train", "train"), ("val", "valid"), ("test", "test")):
        (out / folder).mkdir(parents=True)
        images, annotations = [], []
        for n, rec in enumerate(r for r in dataset if r.split == split):
            name = Path(rec.file_name).name
            shutil.copy(dataset.root / rec.file_name, out / folder / name)
            images.append({"id": n, "file_name": name, "width": rec.width, "height": rec.height})
            for (x1, y1, x2, y2), label in zip(rec.target.boxes.tolist(), rec.target.labels.tolist(), strict=True):
                box = [x1, y1, x2 - x1, y2 - y1]
                annotations.append({"id": len(annotations), "image_id": n, "category_id": label, "bbox": box})
        categories = [{"id": 0, "name": "digits", "supercategory": "none"}] + [
            {"id": c.id, "name": c.name, "supercategory": "digits"} for c in dataset.categories
        ]
        obj = {"images": images, "annotations": annotations, "categories": categories}
        (out / folder / coco.ROBOFLOW_FILE).write_text(json.dumps(obj))
    return out


def _write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


# -- split names ------------------------------------------------------------------------------


def test_split_aliases_name_the_three_splits():
    assert [canonical_split(n) for n in ("train", "Training", "VALID", "validation", "val", "Test", "testing")] == [
        "train",
        "train",
        "val",
        "val",
        "val",
        "test",
        "test",
    ]
    assert [canonical_split(n) for n in ("all", "trainval", "", None)] == [None, None, None, None]


def test_valid_is_val_in_coco_voc_and_yolo(digits, tmp_path):
    export = tmp_path / "coco"
    shutil.copytree(digits.root, export)
    obj = json.loads((export / coco.ANNOTATIONS_FILE).read_text())
    for image in obj["images"]:
        image["split"] = {"val": "valid", "train": "Training"}.get(image["split"], image["split"])
    (export / coco.ANNOTATIONS_FILE).write_text(json.dumps(obj))
    expected = {r.id: r.split for r in digits}
    assert {r.id: r.split for r in coco.read(export)} == expected

    write_dataset(digits, tmp_path / "voc", "voc")
    main_sets = tmp_path / "voc" / "ImageSets" / "Main"
    (main_sets / "val.txt").rename(main_sets / "valid.txt")
    voc = read_dataset(tmp_path / "voc", "voc")
    assert Counter(r.split for r in voc) == Counter(expected.values())

    write_dataset(digits, tmp_path / "yolo", "yolo")
    for kind in ("images", "labels"):
        (tmp_path / "yolo" / kind / "val").rename(tmp_path / "yolo" / kind / "valid")
    yolo = read_dataset(tmp_path / "yolo", "yolo")
    assert Counter(r.split for r in yolo) == Counter(expected.values())


# -- Roboflow's COCO layout -------------------------------------------------------------------


def test_a_roboflow_export_reads_as_one_dataset(digits, tmp_path, capsys):
    export = _roboflow_export(digits, tmp_path / "export")
    assert detect_format(export) == "coco"
    ds = read_dataset(export)
    assert ds.root == export
    assert [(c.id, c.name) for c in ds.categories] == [(c.id, c.name) for c in digits.categories]  # 'digits' dropped
    by_name = {Path(r.file_name).name: r for r in digits}
    assert len(ds) == len(digits)
    for rec in ds:
        folder, name = rec.file_name.split("/")
        original = by_name[name]
        assert rec.id == Path(name).stem
        assert (folder, rec.split) == (
            {"train": "train", "val": "valid", "test": "test"}[original.split],
            original.split,
        )
        assert (export / rec.file_name).is_file()
        assert np.allclose(rec.target.boxes, original.target.boxes, atol=1e-4)
        assert rec.target.labels.tolist() == original.target.labels.tolist()
    assert main(["info", str(export)]) == 0
    out = capsys.readouterr().out
    assert f"train {len(digits.image_ids('train'))}" in out and f"val {len(digits.image_ids('val'))}" in out


def test_roboflow_split_files_must_share_their_categories(digits, tmp_path):
    export = _roboflow_export(digits, tmp_path / "export")
    file = export / "valid" / coco.ROBOFLOW_FILE
    obj = json.loads(file.read_text())
    obj["categories"][3]["name"] = "three"
    file.write_text(json.dumps(obj))
    with pytest.raises(DatasetError, match=r"valid/_annotations\.coco\.json: categories\[3\], id 3 'three'; .*train/"):
        read_dataset(export)


def test_a_category_with_boxes_is_kept_even_if_it_is_a_supercategory(digits, tmp_path):
    export = _roboflow_export(digits, tmp_path / "export")
    file = export / "test" / coco.ROBOFLOW_FILE
    obj = json.loads(file.read_text())
    obj["annotations"][0]["category_id"] = 0
    file.write_text(json.dumps(obj))
    assert [c.name for c in read_dataset(export).categories][0] == "digits"


def test_a_split_folder_with_two_json_files_is_refused(digits, tmp_path):
    export = _roboflow_export(digits, tmp_path / "export")
    (export / "test" / coco.ROBOFLOW_FILE).rename(export / "test" / "a.json")
    shutil.copy(export / "test" / "a.json", export / "test" / "b.json")
    with pytest.raises(DatasetError, match=r"test: expected one COCO \.json file in the split folder, found a\.json"):
        read_dataset(export, "coco")


# -- the assignment ---------------------------------------------------------------------------


def _scenes(n_images: int, seed: int) -> Dataset:
    """Unassigned images with 0-3 boxes of 5 classes drawn with very unequal frequencies."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n_images):
        labels = rng.choice([1, 2, 3, 4, 5], size=rng.integers(0, 4), p=[0.6, 0.25, 0.1, 0.04, 0.01])
        records.append(
            ImageRecord(i, f"{i}.png", 50, 50, None, Target(np.tile([0, 0, 9, 9], (len(labels), 1)), labels))
        )
    return Dataset(".", [Category(k, f"c{k}") for k in range(1, 6)], records)


def test_assignment_is_exact_seeded_and_stratified_by_the_rarest_class():
    ds = _scenes(400, seed=0)
    assigned = assign_splits(ds, val=0.1, test=0.2, seed=0)
    assert list(assigned) == list(ds.images)
    assert Counter(assigned.values()) == {"train": 280, "val": 40, "test": 80}
    assert assign_splits(ds, val=0.1, test=0.2, seed=0) == assigned
    assert assign_splits(ds, val=0.1, test=0.2, seed=1) != assigned
    boxes = Counter(label for r in ds for label in r.target.labels.tolist())
    strata: dict[object, list[str]] = {}
    for r in ds:
        rarest = min(r.target.labels.tolist(), key=lambda c: (boxes[c], c), default=None)
        strata.setdefault(rarest, []).append(assigned[r.id])
    for rarest, splits in strata.items():
        for split, share in (("val", 0.1), ("test", 0.2)):
            assert abs(splits.count(split) - share * len(splits)) <= 1, (rarest, split, Counter(splits))


def test_only_images_without_a_split_are_assigned():
    ds = _scenes(50, seed=0)
    for r in list(ds)[:20]:
        r.split = "train"
    assigned = assign_splits(ds, val=0.0, test=0.2, seed=0)
    assert sorted(assigned) == list(range(20, 50)) and Counter(assigned.values()) == {"train": 24, "test": 6}
    moved = with_splits(ds, assigned)
    assert [r.split for r in moved][:20] == ["train"] * 20 and [r.split for r in ds][20:] == [None] * 30


def test_a_recorded_assignment_must_fit_the_dataset():
    ds = _scenes(10, seed=0)
    assigned = assign_splits(ds, val=0.0, test=0.2, seed=0)
    with pytest.raises(RunError, match=r"R/splits.json: image 10 was assigned the split .* has no image 10 now"):
        with_splits(ds, {**assigned, 10: "train"}, source="R/splits.json")
    with pytest.raises(RunError, match=r"image 3 has no split and was not assigned one when the run started"):
        with_splits(ds, {i: s for i, s in assigned.items() if i != 3}, source="R/splits.json")
    ds[4].split = "test"
    with pytest.raises(RunError, match=r"image 4 had no split .* gives it the split 'test' now \(.* restore it"):
        with_splits(ds, assigned, source="R/splits.json")


# -- configs ----------------------------------------------------------------------------------


def test_a_three_line_config_gets_the_defaults(tmp_path):
    path = _write_config(
        tmp_path / "cards.yaml",
        {"dataset": {"path": "export", "format": "coco"}, "strategies": [{"name": "entropy"}], "budget": 20},
    )
    config = load_config(path)
    assert (config.name, config.cycles, config.seeds, config.detector.preset) == ("cards", 5, [0], "mobilenet_v2_fpn")
    assert (config.initial.size, config.dataset.split) == (20, None)
    human = load_config(path, ["oracle.kind=human"])
    assert human.initial.from_dataset is True and human.initial.size is None
    split = load_config(path, ["dataset.split={test: 0.3, seed: 4}"]).dataset.split
    assert (split.val, split.test, split.seed) == (0.0, 0.3, 4)
    with pytest.raises(ConfigError, match=r"dataset.split: val 0.5 \+ test 0.5 leave no image for train"):
        load_config(path, ["dataset.split={val: 0.5, test: 0.5}"])


def test_a_dataset_without_a_test_split_names_the_fix(digits, tmp_path):
    export = tmp_path / "export"
    shutil.copytree(digits.root, export)
    obj = json.loads((export / coco.ANNOTATIONS_FILE).read_text())
    for image in obj["images"]:
        image["split"] = "train"
    (export / coco.ANNOTATIONS_FILE).write_text(json.dumps(obj))
    config = config_from_dict(
        {"name": "t", "dataset": {"path": str(export)}, "strategies": [{"name": "random"}], "budget": 5}
    )
    with pytest.raises(
        ConfigError, match=r"the test split 'test' holds no image \(the dataset has train 40\); give some"
    ):
        prepare_dataset(config)


def test_a_test_split_list_evaluates_on_every_split_named(digits, tmp_path):
    from mgral.loop import open_experiment
    from mgral.runs import RunDir

    data = {"name": "t", "dataset": {"path": str(digits.root), "test_split": ["val", "test"]}}
    config = config_from_dict({**data, "strategies": [{"name": "random"}], "budget": 5})
    exp = open_experiment(config, RunDir(tmp_path / "run"), progress=False)
    assert exp.test == digits.image_ids(["val", "test"]) and set(exp.test).isdisjoint(exp.pool)
    assert len(exp.test) == len(digits.image_ids("val")) + len(digits.image_ids("test")) > len(digits.image_ids("test"))
    for bad, message in (([], "test_split is an empty list"), (["val", "train"], "test_split 'train' is also a pool")):
        with pytest.raises(ConfigError, match=message):
            config_from_dict(
                {**data, "dataset": {**data["dataset"], "test_split": bad}, "strategies": [{"name": "random"}]}
            )


def test_a_human_run_puts_every_image_without_a_split_in_the_pool(digits, tmp_path):
    export = _export_without_splits(digits, tmp_path / "export")
    data = {"name": "t", "dataset": {"path": str(export)}, "strategies": [{"name": "random"}], "budget": 5}
    dataset = prepare_dataset(config_from_dict({**data, "oracle": {"kind": "human"}}))
    assert {r.split for r in dataset} == {"train"}
    dataset = prepare_dataset(config_from_dict(data))
    assert Counter(r.split for r in dataset) == {"train": 32, "test": 8}


# -- runs -------------------------------------------------------------------------------------


def test_a_coco_export_without_splits_runs_with_a_three_line_config(digits, tmp_path, capsys):
    export = _export_without_splits(digits, tmp_path / "export")
    assert main(["info", str(export)]) == 0
    assert "40 images have no split: a run assigns them: train 32, test 8 (the default dataset.split" in (
        capsys.readouterr().out
    )
    cfg = _write_config(
        tmp_path / "cards.yaml",
        {"dataset": {"path": "export/", "format": "coco"}, "strategies": [{"name": "entropy"}], "budget": 5},
    )
    run = tmp_path / "run"
    sets = [a for s in FAST for a in ("--set", s)]
    assert main(["run", str(cfg), "--out", str(run), *sets]) == 0, capsys.readouterr().err
    records = [json.loads(line) for line in (run / "entropy" / "seed-0" / "cycles.jsonl").read_text().splitlines()]
    assert [r["num_labeled"] for r in records] == [5, 10]
    recorded = RunDir(run).recorded_splits()
    assert recorded["setting"] == {"val": 0.0, "test": 0.2, "seed": 0}
    assigned = dict(map(tuple, recorded["images"]))
    assert Counter(assigned.values()) == {"train": 32, "test": 8}
    assert yaml.safe_load((run / "config.yaml").read_text())["name"] == "cards"
    # the report reads the run's dataset with the recorded splits
    dataset, why = run_dataset(run, {})
    assert why == "" and {r.id: r.split for r in dataset} == assigned

    # the recorded assignment wins over the algorithm: what the run recorded is what a resume reads
    splits = json.loads((run / "splits.json").read_text())
    test_image = next(i for i, s in splits["images"] if s == "test")
    splits["images"] = [[i, "val" if i == test_image else s] for i, s in splits["images"]]
    (run / "splits.json").write_text(json.dumps(splits))
    assert prepare_dataset(load_config(cfg, FAST), RunDir(run))[test_image].split == "val"
    (run / "splits.json").write_text(json.dumps(recorded))

    assert main(["run", str(cfg), "--out", str(run), "--resume", *sets]) == 0, capsys.readouterr().err
    obj = json.loads((export / coco.ANNOTATIONS_FILE).read_text())
    obj["images"][0]["split"] = "train"
    (export / coco.ANNOTATIONS_FILE).write_text(json.dumps(obj))
    capsys.readouterr()
    assert main(["run", str(cfg), "--out", str(run), "--resume", *sets]) == 2
    err = capsys.readouterr().err
    assert f"{run / 'splits.json'}: image {obj['images'][0]['id']} had no split" in err
    assert "the dataset changed since the run started; restore it, or start a new run" in err


def test_a_run_without_splits_json_assigns_nothing_as_before(digits, tmp_path):
    export = _export_without_splits(digits, tmp_path / "export")
    config = config_from_dict(
        {"name": "t", "dataset": {"path": str(export)}, "strategies": [{"name": "random"}], "budget": 5}
    )
    RunDir(tmp_path / "old").create({"name": "t"})  # a run started before splits.json existed
    with pytest.raises(
        ConfigError, match=r"the pool splits \['train'\] hold no image \(the dataset has unassigned 40\)"
    ):
        prepare_dataset(config, RunDir(tmp_path / "old"))


def test_a_creation_cut_short_leaves_a_run_that_can_be_created_again(tmp_path):
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.splits_file.write_text("{}")  # splits.json is written first; config.yaml makes the run
    run.create({"name": "t"})
    assert not run.splits_file.exists() and run.recorded_splits() is None


def test_train_and_evaluate_give_an_export_without_splits_the_runs_assignment(digits, tmp_path, capsys):
    export = _export_without_splits(digits, tmp_path / "export")
    train = ["train", str(export), "--detector", "tiny", "--param", "pretrained=false", "--device", "cpu"]
    train += ["--iterations", "1", "--batch-size", "2"]
    assert main([*train, "--out", str(tmp_path / "m1")]) == 0, capsys.readouterr().err
    assert "40 images have no split; assigned as mgral run does by default: train 32, test 8" in capsys.readouterr().err
    report = json.loads((tmp_path / "m1" / "train.json").read_text())
    assert report["train_images"] == 32 and report["test"]["num_images"] == 8

    # --splits RUN: the assignment a run recorded, here one with half the images in test
    dataset = read_dataset(export, "coco")
    assigned = assign_splits(dataset, val=0.0, test=0.5, seed=3)
    run = RunDir(tmp_path / "run")
    run.stage_splits({"val": 0.0, "test": 0.5, "seed": 3}, assigned)
    run.create({"name": "t"})
    assert main([*train, "--out", str(tmp_path / "m2"), "--splits", str(run.path)]) == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "m2" / "train.json").read_text())
    assert report["train_images"] == 20 and report["test"]["num_images"] == 20

    # evaluate --split test scores the same test images (the ground truth as predictions: mAP 1)
    preds = tmp_path / "preds.json"
    obj = json.loads((export / coco.ANNOTATIONS_FILE).read_text())
    preds.write_text(json.dumps([{**a, "score": 1.0} for a in obj["annotations"]]))
    capsys.readouterr()
    argv = ["evaluate", "--gt", str(export), "--pred", str(preds), "--split", "test", "--json"]
    argv += ["--splits", str(run.splits_file)]
    assert main(argv) == 0, capsys.readouterr().err
    payload = json.loads(capsys.readouterr().out)
    assert payload["num_images"] == 20 and payload["mAP"] == pytest.approx(1.0)

    # a directory that recorded no assignment is refused, naming the fix
    RunDir(tmp_path / "old").create({"name": "t"})
    assert main([*train, "--out", str(tmp_path / "m3"), "--splits", str(tmp_path / "old")]) == 2
    err = capsys.readouterr().err
    assert "no splits.json there" in err and "leave --splits out" in err and not (tmp_path / "m3").exists()
