"""Labeling for real: mgral query / import-labels round trips, refusals, crash safety, the CLI.

Every test trains the tiny detector for one iteration on 96-pixel digits scenes: the point is
the bookkeeping, not the model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from mgral import human
from mgral.cli import main
from mgral.config import config_from_dict
from mgral.data.coco import read as read_coco
from mgral.data.coco import to_coco_dict
from mgral.data.formats import write_dataset
from mgral.data.records import Category, Dataset, ImageRecord
from mgral.data.synth import SynthConfig, generate
from mgral.errors import ConfigError, DatasetError
from mgral.human import Matcher, human_initial_ids, import_labels, query, read_labels
from mgral.loop import run_experiment
from mgral.pool import Ledger
from mgral.runs import read_cycle_records

INITIAL = [1, 2, 3, 4, 5, 6, 7, 8]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread: the models are tiny, and two spinning threads on a shared 2-core
    machine cost more than they gain."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("human") / "digits"
    generate(out, SynthConfig(images=60, seed=0, image_size=96, max_digit_size=32))
    return out


@pytest.fixture(scope="module")
def truth(digits) -> Dataset:
    return read_coco(digits)


def _config_dict(tmp: Path, digits: Path, **changes) -> dict:
    ids = tmp / "initial.txt"
    ids.parent.mkdir(parents=True, exist_ok=True)
    ids.write_text("".join(f"{i}\n" for i in INITIAL))
    cfg = {
        "name": "human",
        "dataset": {"path": str(digits)},
        "detector": {"preset": "tiny", "params": {"pretrained": False}, "train": {"iterations": 1, "batch_size": 4}},
        "strategies": [{"name": "random"}],
        "initial": {"ids_file": str(ids)},
        "budget": 6,
        "cycles": 1,
        "seeds": [0],
        "oracle": {"kind": "human"},
    }
    cfg.update(changes)
    return cfg


def _config(tmp: Path, digits: Path, **changes):
    return config_from_dict(_config_dict(tmp, digits, **changes))


def _quiet(lines: list[str] | None = None):
    return (lines if lines is not None else []).append


def _series(run: Path) -> Path:
    return run / "random" / "seed-0"


def _state(run: Path) -> dict[str, bytes]:
    """The series' state files (what an import may change)."""
    sdir = _series(run)
    return {p.name: p.read_bytes() for p in sdir.iterdir() if p.is_file()}


def _coco_result(truth: Dataset, ids, path: Path, *, offset: int = 1000) -> Path:
    """What an annotation tool exports: its own image ids, bare file names, the true boxes."""
    obj = to_coco_dict(truth.subset(ids))
    for image in obj["images"]:
        image["file_name"] = image["file_name"].rsplit("/", 1)[-1]
        image["id"] += offset
        image.pop("split", None)
    for ann in obj["annotations"]:
        ann["image_id"] += offset
    path.write_text(json.dumps(obj))
    return path


def _ls_region(box, name: str, width: int, height: int) -> dict:
    x1, y1, x2, y2 = (float(v) for v in box)
    return {
        "id": "r",
        "type": "rectanglelabels",
        "from_name": "label",
        "to_name": "image",
        "original_width": width,
        "original_height": height,
        "value": {
            "x": x1 / width * 100,
            "y": y1 / height * 100,
            "width": (x2 - x1) / width * 100,
            "height": (y2 - y1) / height * 100,
            "rotation": 0,
            "rectanglelabels": [name],
        },
    }


def _ls_export(truth: Dataset, ids, *, skip=(), first_task_id: int = 1) -> list[dict]:
    """A Label Studio JSON export of ``ids`` labeled with the true boxes; ``skip``: cancelled tasks.

    Every other task lost its data.mgral_id and shows its image as Label Studio's upload name,
    so both ways of finding the image are exercised."""
    names = truth.category_names
    tasks = []
    for n, i in enumerate(ids):
        rec = truth[i]
        base = rec.file_name.rsplit("/", 1)[-1]
        data = {"image": f"/data/upload/3/8f3a2b1c-{base}"} if n % 2 else {"image": "x", "mgral_id": i}
        result = [
            _ls_region(b, names[int(c)], rec.width, rec.height)
            for b, c in zip(rec.target.boxes, rec.target.labels, strict=True)
        ]
        cancelled = i in skip
        ann = {"id": 100 + n, "was_cancelled": cancelled, "result": [] if cancelled else result}
        tasks.append({"id": first_task_id + n, "data": data, "annotations": [ann], "predictions": []})
    return tasks


def _spy_fit(monkeypatch) -> list[dict]:
    """Record what each training saw: image id -> its boxes."""
    from mgral.detectors.torchvision_detector import TorchvisionDetector

    calls: list[dict] = []
    original = TorchvisionDetector.fit

    def fit(self, dataset, image_ids, **kwargs):
        calls.append({i: dataset[i].target for i in image_ids})
        return original(self, dataset, image_ids, **kwargs)

    monkeypatch.setattr(TorchvisionDetector, "fit", fit)
    return calls


def test_round_trip_coco_then_label_studio(tmp_path, digits, truth, monkeypatch):
    run, config = tmp_path / "run", _config(tmp_path, digits)
    fits = _spy_fit(monkeypatch)

    # cycle 0: train on the initial set, ask for 6 images, write the package
    first = query(run, config, min_score=0.0, log=_quiet(), progress=False)
    asked = first.image_ids
    assert first.new and first.cycle == 0 and len(asked) == 6
    assert set(fits[0]) == set(INITIAL)
    assert not set(asked) & set(INITIAL)
    package = _series(run) / "cycle-0" / "labeling"
    assert first.package == package
    assert (package / "images.txt").read_text().splitlines() == [str(digits / truth[i].file_name) for i in asked]
    coco = json.loads((package / "predictions_coco.json").read_text())
    assert [c["name"] for c in coco["categories"]] == [c.name for c in truth.categories]
    assert [im["id"] for im in coco["images"]] == asked and coco["images"][0]["width"] == 96
    assert coco["annotations"], "min_score 0 keeps every detection"
    ann = coco["annotations"][0]
    assert len(ann["bbox"]) == 4 and 0 <= ann["score"] <= 1 and ann["image_id"] in asked
    assert ann["segmentation"] == [] and ann["iscrowd"] == 0  # CVAT's COCO importer requires both
    assert [im["file_name"] for im in coco["images"]] == [truth[i].file_name.rsplit("/", 1)[-1] for i in asked]
    tasks = json.loads((package / "label_studio_tasks.json").read_text())
    assert [t["data"]["mgral_id"] for t in tasks] == asked
    assert [t["data"]["mgral_rank"] for t in tasks] == [f"{k:06d}" for k in range(1, 7)]
    assert sum(len(t["predictions"][0]["result"]) for t in tasks) == len(coco["annotations"])  # the same boxes
    assert tasks[0]["data"]["image"] == str(digits / truth[asked[0]].file_name)
    prediction = tasks[0]["predictions"][0]
    assert prediction["model_version"] == "mgral random seed-0 cycle-0" and "score" in prediction
    region = prediction["result"][0]
    assert region["type"] == "rectanglelabels" and (region["original_width"], region["original_height"]) == (96, 96)
    assert set(region["value"]) >= {"x", "y", "width", "height", "rectanglelabels"} and "score" in region
    assert all(0 <= region["value"][k] <= 100 for k in ("x", "y", "width", "height"))
    assert '<Label value="0"/>' in (package / "label_studio_config.xml").read_text()

    # asking again while the request is pending selects nothing new and says so
    lines: list[str] = []
    again = query(run, log=_quiet(lines), progress=False)
    assert (again.image_ids, again.new) == (asked, False) and "still waiting" in "\n".join(lines)
    assert len(fits) == 1, "the model of cycle 0 is reused, not trained again"

    # COCO result: the true boxes of five images, the sixth skipped (--skip-missing)
    result = _coco_result(truth, asked[:5], tmp_path / "cycle1.json")
    imported = import_labels(run, result, skip_missing=True, log=_quiet())
    assert (imported.labeled, imported.skipped, imported.finished) == (asked[:5], [asked[5]], True)
    ledger = Ledger.load(_series(run) / "ledger.json")
    assert {i: ledger.labeled_in[i] for i in asked[:5]} == dict.fromkeys(asked[:5], 1)
    assert ledger.skipped == {asked[5]: 1} and not ledger.pending
    stored = read_labels(_series(run) / "labels.json", truth)
    assert set(stored) == set(asked[:5])
    for i in asked[:5]:
        assert stored[i][0] == 1 and np.allclose(stored[i][1].boxes, truth[i].target.boxes)
        assert stored[i][1].labels.tolist() == truth[i].target.labels.tolist()
    (record,) = read_cycle_records(_series(run) / "cycles.jsonl")
    assert (record["cycle"], record["num_labeled"], record["selected"], record["skipped"]) == (0, 8, asked, [asked[5]])
    assert record["num_boxes_labeled"] == truth.num_boxes(INITIAL) and record["mAP"] is not None
    assert {"train", "evaluate", "predict", "select", "label"} <= set(record["seconds"])

    # importing the same file again changes nothing
    before = _state(run)
    again_imported = import_labels(run, result, skip_missing=True, log=_quiet())
    assert (again_imported.labeled, again_imported.skipped, again_imported.already) == ([], [], 5)
    assert _state(run) == before

    # labels that differ from the imported ones are refused
    moved = json.loads(result.read_text())
    moved["annotations"][0]["category_id"] = moved["annotations"][0]["category_id"] % 10 + 1
    (tmp_path / "moved.json").write_text(json.dumps(moved))
    with pytest.raises(DatasetError, match=r"boxes differ from its labels .* imported for cycle 1"):
        import_labels(run, tmp_path / "moved.json", log=_quiet())
    assert _state(run) == before

    # cycle 1 trains on the initial set plus the imported labels, and asks for new images
    second = query(run, min_score=0.0, log=_quiet(), progress=False)
    assert second.new and second.cycle == 1
    trained = fits[-1]
    assert set(trained) == set(INITIAL) | set(asked[:5])
    for i in asked[:5]:
        assert np.allclose(trained[i].boxes, truth[i].target.boxes)
    assert not set(second.image_ids) & (set(INITIAL) | set(asked)), "never a labeled or skipped image again"

    # Label Studio export of cycle 1, one task cancelled (Skip); it also holds a task of the round before
    export = _ls_export(truth, second.image_ids, skip={second.image_ids[2]})
    export += _ls_export(truth, asked[:1], first_task_id=50)
    (tmp_path / "export.json").write_text(json.dumps(export))
    imported = import_labels(run, tmp_path / "export.json", log=_quiet())
    assert imported.skipped == [second.image_ids[2]] and imported.already == 1 and imported.finished
    assert set(imported.labeled) == set(second.image_ids) - {second.image_ids[2]}
    ledger = Ledger.load(_series(run) / "ledger.json")
    assert set(ledger.skipped) == {asked[5], second.image_ids[2]}
    assert len(ledger.labeled(2)) == 8 + 5 + 5
    stored = read_labels(_series(run) / "labels.json", truth)
    for i in imported.labeled:
        assert stored[i][0] == 2 and np.allclose(stored[i][1].boxes, truth[i].target.boxes, atol=1e-3)
    records = read_cycle_records(_series(run) / "cycles.jsonl")
    assert [r["cycle"] for r in records] == [0, 1] and records[1]["num_labeled"] == 13
    before = _state(run)
    assert import_labels(run, tmp_path / "export.json", log=_quiet()).already == 7
    assert _state(run) == before

    third = query(run, log=_quiet(), progress=False)
    assert third.cycle == 2 and not set(third.image_ids) & (set(ledger.labeled_in) | set(ledger.skipped))


@pytest.fixture(scope="module")
def pending_run(tmp_path_factory, digits):
    """A run waiting for the labels of its first request (the refusal tests share it: a refused
    import changes nothing)."""
    tmp = tmp_path_factory.mktemp("pending")
    run = tmp / "run"
    asked = query(run, _config(tmp, digits), log=_quiet(), progress=False).image_ids
    return run, asked


def _unasked(run: Path):
    ledger = Ledger.load(_series(run) / "ledger.json")
    return ledger.unlabeled()[0]


def _refusal_file(case: str, tmp: Path, truth: Dataset, asked: list, run: Path) -> tuple[Path, str]:
    a = asked[0]
    name = truth[a].file_name.rsplit("/", 1)[-1]
    if case.startswith("coco"):
        ids = {"coco-not-asked": [_unasked(run)], "coco-test-image": [truth.image_ids("test")[0]]}.get(case, [a])
        path = _coco_result(truth, ids, tmp / "result.json")
        obj = json.loads(path.read_text())
        if case == "coco-unknown-category":
            obj["categories"].append({"id": 99, "name": "cat"})
            obj["annotations"][1]["category_id"] = 99
        elif case == "coco-duplicate-image":
            obj["images"].append({**obj["images"][0], "id": 2000})
        elif case == "coco-box-outside":
            obj["annotations"][1]["bbox"] = [90.0, 10.0, 20.0, 10.0]
        elif case == "coco-other-size":
            obj["images"][0]["width"] = 100
        path.write_text(json.dumps(obj))
        file = json.loads(path.read_text())["images"][0]["file_name"]
        expected = {
            "coco-not-asked": rf"image 1\d+ \('{file}'\) = image {ids[0]} \('{truth[ids[0]].file_name}'\): no query "
            "asked for it",
            "coco-test-image": rf"= image {ids[0]} \('{truth[ids[0]].file_name}'\): it is not in the pool \(split "
            "'test'",
            "coco-unknown-category": rf"image {1000 + a} \('{name}'\) = image {a} \('{truth[a].file_name}'\): box 1: "
            r"category 'cat' \(id 99\) is not a category of the dataset; expected one of \['0', '1'",
            "coco-duplicate-image": rf"image 2000 \('{name}'\) = image {a} .*: the image is in the file twice \(also "
            rf".*image {1000 + a} ",
            "coco-box-outside": rf"annotations\[1\] of image {1000 + a} \('{name}'\): box 1 = \(90, 10, 110, 20\) "
            r"lies outside the 96x96 image",
            "coco-other-size": r"the file says the image is 100x96, the dataset 96x96",
        }[case]
        return path, expected
    export = _ls_export(truth, [a])
    region = export[0]["annotations"][0]["result"]
    if case == "ls-unknown-label":
        region[1]["value"]["rectanglelabels"] = ["cat"]
    elif case == "ls-box-outside":
        region[1]["value"].update(x=95.0, width=10.0)
    elif case == "ls-duplicate-task":
        export.append({**export[0], "id": 7})
    elif case == "ls-not-asked":
        export[0]["data"]["mgral_id"] = _unasked(run)
    path = tmp / "export.json"
    path.write_text(json.dumps(export))
    task = rf"task 1 \(image 'x'\) = image {a} \('{truth[a].file_name}'\)"
    expected = {
        "ls-unknown-label": rf"{task}, result 1: class 'cat' is not a category of the dataset; expected one of",
        "ls-box-outside": rf"{task}, result 1: box 1 = \(91.2, .*\) lies outside the 96x96 image",
        "ls-duplicate-task": r"task 7 .*: the image is in the file twice \(also .*task 1 ",
        "ls-not-asked": r"no query asked for it",
    }[case]
    return path, expected


@pytest.mark.parametrize(
    "case",
    [
        "coco-not-asked",
        "coco-test-image",
        "coco-unknown-category",
        "coco-duplicate-image",
        "coco-box-outside",
        "coco-other-size",
        "ls-unknown-label",
        "ls-box-outside",
        "ls-duplicate-task",
        "ls-not-asked",
    ],
)
def test_bad_labels_are_refused_naming_the_image_and_box_and_change_nothing(case, pending_run, truth, tmp_path):
    run, asked = pending_run
    before = _state(run)
    path, expected = _refusal_file(case, tmp_path, truth, asked, run)
    with pytest.raises(DatasetError, match=expected):
        import_labels(run, path, log=_quiet())
    assert _state(run) == before
    assert not (_series(run) / "labels.json").exists()


def test_the_request_is_saved_before_the_package_and_a_rerun_writes_it_for_the_same_images(
    tmp_path, digits, monkeypatch
):
    run, config = tmp_path / "run", _config(tmp_path, digits)
    # a crash between the selection and the request: the re-run requests exactly that selection
    monkeypatch.setattr(Ledger, "request", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        query(run, config, log=_quiet(), progress=False)
    monkeypatch.undo()
    selected = json.loads((_series(run) / "cycle-0" / "selection.json").read_text())["image_ids"]
    assert not Ledger.load(_series(run) / "ledger.json").pending

    # a crash while the package is written: the ledger already holds the request
    def broken(out, *args, **kwargs):
        assert Ledger.load(_series(run) / "ledger.json").pending == dict.fromkeys(selected, 1)
        raise OSError("disk full")

    monkeypatch.setattr(human.session, "write_package", broken)
    with pytest.raises(OSError, match="disk full"):
        query(run, log=_quiet(), progress=False)
    monkeypatch.undo()
    assert Ledger.load(_series(run) / "ledger.json").pending == dict.fromkeys(selected, 1)
    assert not (_series(run) / "cycle-0" / "labeling").exists()

    lines: list[str] = []
    rerun = query(run, log=_quiet(lines), progress=False)
    assert rerun.image_ids == selected and not rerun.new
    assert "no new images were selected" in "\n".join(lines)
    assert (rerun.package / "images.txt").read_text().count("\n") == len(selected)
    assert Ledger.load(_series(run) / "ledger.json").pending == dict.fromkeys(selected, 1)


@pytest.fixture(scope="module")
def blank(tmp_path_factory, digits) -> Path:
    """The digits scenes as a real project starts: no labels on the pool or the test split."""
    obj = json.loads((digits / "annotations.json").read_text())
    obj["annotations"] = []
    path = tmp_path_factory.mktemp("blank") / "unlabeled.json"
    path.write_text(json.dumps(obj))
    return path


@pytest.mark.parametrize("fmt", ["voc", "yolo"])
def test_cold_start_partial_import_from_voc_or_yolo(tmp_path, digits, truth, blank, fmt):
    dataset = {"path": str(blank), "image_root": str(digits), "format": "coco"}
    config = _config(tmp_path, digits, dataset=dataset, initial={"from_dataset": True})
    run = tmp_path / "run"
    lines: list[str] = []
    first = query(run, config, log=_quiet(lines), progress=False)
    asked = first.image_ids
    assert len(asked) == 6 and "picked at random" in "\n".join(lines)
    assert not (_series(run) / "cycle-0" / "model.pt").exists(), "nothing labeled: no model"
    tasks = json.loads((first.package / "label_studio_tasks.json").read_text())
    assert all("predictions" not in t for t in tasks)
    assert json.loads((first.package / "predictions_coco.json").read_text())["annotations"] == []

    # a partial import: the images left out stay pending, the cycle is not recorded yet
    out = tmp_path / fmt
    write_dataset(truth.subset(asked[:4]), out, fmt)
    imported = import_labels(run, out, log=_quiet())
    assert imported.labeled == asked[:4] and imported.pending == asked[4:] and not imported.finished
    assert read_cycle_records(_series(run) / "cycles.jsonl") == []
    stored = read_labels(_series(run) / "labels.json", truth)
    for i in asked[:4]:  # VOC stores integer corners
        assert np.allclose(stored[i][1].boxes, truth[i].target.boxes, atol=1.0)
    again = query(run, log=_quiet(), progress=False)
    assert (again.image_ids, again.new) == (asked[4:], False)
    assert json.loads((again.package / "label_studio_tasks.json").read_text())[0]["data"]["mgral_id"] == asked[4]

    # the rest is skipped: the cycle is recorded, without mAP (the test split has no labels)
    finished = import_labels(run, out, skip_missing=True, log=_quiet())
    assert finished.skipped == asked[4:] and finished.finished
    (record,) = read_cycle_records(_series(run) / "cycles.jsonl")
    assert (record["num_labeled"], record["mAP"], record["skipped"]) == (0, None, asked[4:])

    from mgral.report.load import load_series

    (series,) = load_series([run])
    assert np.isnan(series.mAP[0])


def test_initial_set_from_the_dataset_file(tmp_path, digits, truth, blank):
    obj = json.loads((digits / "annotations.json").read_text())
    keep = {3, 9, 20}
    obj["annotations"] = [a for a in obj["annotations"] if a["image_id"] in keep]
    (tmp_path / "partial.json").write_text(json.dumps(obj))
    dataset = {"path": str(tmp_path / "partial.json"), "image_root": str(digits)}
    config = _config(tmp_path, digits, dataset=dataset, initial={"from_dataset": True})
    partial = read_coco(tmp_path / "partial.json", image_root=digits)
    pool = partial.image_ids("train")
    assert human_initial_ids(config, partial, pool) == sorted(keep)
    with_ids = _config(tmp_path, digits, dataset=dataset)
    assert human_initial_ids(with_ids, partial, pool) == INITIAL  # an ids file wins, even images without boxes


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"initial": {"size": 8}}, "the initial set is labels you already have"),
        ({"oracle": {"kind": "human", "label_noise": 0.1}}, "oracle.label_noise simulates annotation noise"),
        ({"budget_boxes": 10}, "budget_boxes counts the boxes"),
        ({"full_data_reference": True}, "full_data_reference trains on the labels of the whole pool"),
        ({"oracle": {"kind": "simulated"}, "initial": {"from_dataset": True}}, "from_dataset is for oracle.kind"),
    ],
)
def test_human_config_rules(tmp_path, digits, change, message):
    with pytest.raises(ConfigError, match=message):
        _config(tmp_path, digits, **change)


def test_simulated_configs_record_no_from_dataset_key(tmp_path, digits):
    from mgral.config import config_to_dict

    cfg = _config_dict(tmp_path, digits, oracle={"kind": "simulated"})
    assert "from_dataset" not in config_to_dict(config_from_dict(cfg))["initial"]


def test_query_refuses_a_simulated_run_and_run_refuses_a_human_config(tmp_path, digits):
    with pytest.raises(ConfigError, match="mgral query --config CONFIG --run RUN"):
        run_experiment(_config(tmp_path, digits), tmp_path / "run", log=_quiet())
    simulated = _config(tmp_path, digits, oracle={"kind": "simulated"}, initial={"size": 8})
    with pytest.raises(ConfigError, match="query and import-labels are for runs labeled by people"):
        query(tmp_path / "run2", simulated, log=_quiet(), progress=False)
    assert not (tmp_path / "run2" / "config.yaml").exists()


def test_matcher_finds_images_by_path_upload_name_and_refuses_ambiguous_names(tmp_path):
    records = [
        ImageRecord(1, "images/train/a.png", 8, 8),
        ImageRecord(2, "images/test/a.png", 8, 8),
        ImageRecord(3, "images/train/b.png", 8, 8),
    ]
    matcher = Matcher(Dataset(tmp_path, [Category(1, "x")], records))
    assert matcher.find(str(tmp_path / "images/test/a.png"), where="w") == 2
    assert matcher.find("/data/local-files/?d=images/train/a.png", where="w") == 1
    assert matcher.find("http://host/static/train/b.png", where="w") == 3
    assert matcher.find("/data/upload/3/8f3a2b1c-b.png", where="w") == 3
    assert matcher.find("c.png", where="w") is None
    with pytest.raises(DatasetError, match=r"w: the file name 'a.png' is ambiguous: it is image 1 .* image 2"):
        matcher.find("a.png", where="w")


def test_cli_query_and_import_labels(tmp_path, digits, truth, capsys):
    cfg = tmp_path / "human.yaml"
    cfg.write_text(yaml.safe_dump(_config_dict(tmp_path, digits)))
    run = tmp_path / "run"

    assert main(["query", "--run", str(run)]) == 2
    assert "holds no run" in capsys.readouterr().err and not run.exists()
    assert main(["run", str(cfg), "--out", str(tmp_path / "sim")]) == 2
    assert "mgral query --config CONFIG --run RUN" in capsys.readouterr().err

    assert main(["query", "--config", str(cfg), "--run", str(run)]) == 0
    out = capsys.readouterr().out
    assert "asked for 6 images" in out and "mgral import-labels --run" in out
    package = _series(run) / "cycle-0" / "labeling"
    asked = [im["mgral_id"] for im in json.loads((package / "predictions_coco.json").read_text())["images"]]

    bad = _coco_result(truth, asked[:1], tmp_path / "bad.json")
    obj = json.loads(bad.read_text())
    obj["annotations"][0]["bbox"] = [-30.0, 0.0, 10.0, 10.0]
    bad.write_text(json.dumps(obj))
    assert main(["import-labels", "--run", str(run), str(bad)]) == 2
    err = capsys.readouterr().err
    name = truth[asked[0]].file_name.rsplit("/", 1)[-1]
    assert err.startswith(f"mgral: error: {bad}: annotations[0] of image {1000 + asked[0]} ('{name}'): box 0")
    assert "lies outside the 96x96 image" in err and "--clip-boxes" in err

    assert main(["query", "--run", str(run), "--budget", "3"]) == 0
    assert "still waiting" in capsys.readouterr().out

    good = _coco_result(truth, asked, tmp_path / "good.json")
    assert main(["import-labels", "--run", str(run), str(good), "--format", "coco"]) == 0
    out = capsys.readouterr().out
    assert "imported labels for 6 images" in out and "cycle 0 is finished" in out
    assert main(["import-labels", "--run", str(run), str(good)]) == 0
    assert "nothing new imported" in capsys.readouterr().out
