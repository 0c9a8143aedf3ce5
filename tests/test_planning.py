"""The paper protocols: the VOC07+12 and COCO 2017 layouts, the evaluation style, the ImageNet
backbones, the workload estimate, and a dry run of each shipped paper config on a tiny fake
directory of its layout (one micro cycle on CPU)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from mgral import planning
from mgral.cli import main
from mgral.config import config_from_dict, config_to_dict, load_config
from mgral.data import coco, voc, voc0712
from mgral.data.formats import FORMATS, convert, detect_format, read_dataset
from mgral.data.records import Category, Dataset, ImageRecord, Target
from mgral.errors import ConfigError, DatasetError, RunError
from mgral.planning import dry_run, estimate_workload
from mgral.strategies import STRATEGIES

PAPER = Path(__file__).resolve().parents[1] / "benchmarks" / "configs" / "paper"
VOC_COUNTS = {"2007-trainval": 6, "2012-trainval": 6, "2007-test": 3}
COCO_CATEGORIES = [Category(1, "person"), Category(3, "car"), Category(18, "dog")]


# -- fake directories of the standard layouts ------------------------------------------------


def _scene(path: Path, seed: int, size=(48, 40)) -> tuple[list[list[float]], list[int]]:
    """Draw a small JPEG with one or two filled rectangles; return their boxes and class slots."""
    rng = np.random.default_rng(seed)
    w, h = size
    image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    draw = ImageDraw.Draw(image)
    boxes, slots = [], []
    for _ in range(1 + seed % 2):
        x1, y1 = int(rng.integers(0, w - 16)), int(rng.integers(0, h - 16))
        x2, y2 = x1 + int(rng.integers(8, 16)), y1 + int(rng.integers(8, 16))
        slot = int(rng.integers(0, 3))
        draw.rectangle([x1, y1, x2 - 1, y2 - 1], fill=((80, 0, 0), (0, 160, 0), (0, 0, 240))[slot])
        boxes.append([float(x1), float(y1), float(x2), float(y2)])
        slots.append(slot)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, quality=95)
    return boxes, slots


def make_voc0712(root: Path, counts: dict[str, int] = VOC_COUNTS) -> Path:
    """A VOCdevkit with VOC2007 (trainval, test) and VOC2012 (trainval), written by the VOC writer.

    Both years use the stems 000001.. (so only the year prefix keeps ids unique); VOC2012 also
    gets an annotation outside ImageSets/Main (an action image), which the layout must skip."""
    devkit = root / "VOCdevkit"
    names = ("cat", "dog", "person")  # VOC classes, ids 1..3 here; the layout maps them to 20
    for year, subsets in (("VOC2007", ("trainval", "test")), ("VOC2012", ("trainval",))):
        src, records, n = root / "src" / year, [], 0
        for subset in subsets:
            for _ in range(counts[f"{year[3:]}-{subset}"]):
                n += 1
                stem = f"{n:06d}"
                boxes, slots = _scene(src / f"{stem}.jpg", seed=n + 17 * len(year))
                target = Target(boxes, [s + 1 for s in slots], difficult=[k == 1 for k in range(len(boxes))])
                records.append(ImageRecord(stem, f"{stem}.jpg", 48, 40, subset, target))
        if year == "VOC2012":
            boxes, slots = _scene(src / "2011_003000.jpg", seed=99)
            records.append(ImageRecord("2011_003000", "2011_003000.jpg", 48, 40, None, Target(boxes, [3] * len(boxes))))
        (devkit / year).mkdir(parents=True)
        voc.write(Dataset(src, [Category(i + 1, c) for i, c in enumerate(names)], records), devkit / year)
    return devkit


def make_coco2017(root: Path, train: int = 8, val: int = 3) -> Path:
    """A COCO 2017 folder: annotations/instances_{train,val}2017.json written by the COCO writer."""
    out = root / "coco"
    for split, n, first in (("train2017", train, 1), ("val2017", val, 500)):
        records = []
        for image_id in range(first, first + n):
            name = f"{image_id:012d}.jpg"
            boxes, slots = _scene(out / split / name, seed=image_id)
            records.append(ImageRecord(image_id, name, 48, 40, None, Target(boxes, [(1, 3, 18)[s] for s in slots])))
        coco.write_json(Dataset(out / split, COCO_CATEGORIES, records), out / "annotations" / f"instances_{split}.json")
    return out


# -- the layouts ------------------------------------------------------------------------------


def test_voc0712_reads_both_years_with_unique_ids_and_the_papers_splits(tmp_path):
    devkit = make_voc0712(tmp_path)
    assert detect_format(devkit) == "voc0712"
    ds = read_dataset(devkit, "voc0712")
    assert {s: len(ds.image_ids(s)) for s in VOC_COUNTS} == VOC_COUNTS
    assert len(ds) == 15  # the VOC2012 action image outside ImageSets/Main is not read
    assert "VOC2007/000001" in ds and "VOC2012/000001" in ds and "VOC2012/2011_003000" not in ds
    assert (
        ds["VOC2012/000001"].file_name == "VOC2012/JPEGImages/000001.jpg" and ds.image_path("VOC2012/000001").is_file()
    )
    assert [c.name for c in ds.categories] == list(voc0712.CLASSES)
    rec = ds["VOC2007/000002"]  # two boxes, the second difficult; classes keep their names
    assert rec.target.difficult.tolist() == [False, True]
    year = voc.read(devkit / "VOC2007")  # the plain VOC reader on one year: same boxes, same class names
    original = year["000002"]
    names, year_names = ds.category_names, year.category_names
    assert [names[x] for x in rec.target.labels] == [year_names[x] for x in original.target.labels]
    np.testing.assert_array_equal(rec.target.boxes, original.target.boxes)


def test_voc0712_refuses_bad_layouts_saying_what_and_how(tmp_path):
    devkit = make_voc0712(tmp_path)
    (devkit / "VOC2007" / "ImageSets" / "Main" / "test.txt").unlink()
    with pytest.raises(DatasetError, match=r"lacks VOC2007/ImageSets/Main/test.txt \(from VOCtest_06-Nov-2007.tar\)"):
        read_dataset(devkit, "voc0712")
    with pytest.raises(
        DatasetError, match=r"lacks VOC2007/ \(from .*\), VOC2012/ .*one year's folder: pass its parent"
    ):
        read_dataset(devkit / "VOC2007", "voc0712")  # one year's folder, not the devkit
    with pytest.raises(DatasetError, match=r"found a devkit in VOCdevkit/: pass .*VOCdevkit instead"):
        read_dataset(tmp_path, "voc0712")  # the folder above the devkit
    with pytest.raises(DatasetError, match="a VOCdevkit folder with VOC2007/, VOC2012/ .* read it with format voc0712"):
        voc.read(devkit)


def test_voc0712_refuses_unlisted_xml_foreign_classes_and_an_image_root(tmp_path):
    devkit = make_voc0712(tmp_path)
    (devkit / "VOC2012" / "Annotations" / "000003.xml").unlink()
    with pytest.raises(
        DatasetError, match=r"trainval.txt: line 3: image '000003' has no VOC2012/Annotations/000003.xml"
    ):
        read_dataset(devkit, "voc0712")
    devkit = make_voc0712(tmp_path / "b")
    xml = devkit / "VOC2007" / "Annotations" / "000001.xml"
    xml.write_text(xml.read_text().replace("<name>", "<name>x", 1))
    with pytest.raises(DatasetError, match=r"000001.xml: object 0 has class 'x.*', which is not one of the 20 VOC"):
        read_dataset(devkit, "voc0712")
    with pytest.raises(DatasetError, match="remove image_root"):
        read_dataset(devkit, "voc0712", image_root=devkit)


def test_coco2017_merges_train_and_val(tmp_path):
    root = make_coco2017(tmp_path)
    assert detect_format(root) == "coco2017"
    ds = read_dataset(root, "coco2017")
    assert (len(ds.image_ids("train2017")), len(ds.image_ids("val2017"))) == (8, 3)
    assert ds[500].file_name == "val2017/000000000500.jpg" and ds.image_path(500).is_file()
    assert ds.categories == COCO_CATEGORIES
    assert set(ds[1].target.labels.tolist()) <= {1, 3, 18}


def test_coco2017_drops_flat_boxes_and_refuses_bad_layouts(tmp_path):
    root = make_coco2017(tmp_path)
    file = root / "annotations" / "instances_train2017.json"
    obj = json.loads(file.read_text())
    boxes_of_2 = sum(a["image_id"] == 2 for a in obj["annotations"])
    obj["annotations"].append({"id": 99, "image_id": 2, "category_id": 1, "bbox": [3.0, 4.0, 5.0, 0.0], "iscrowd": 0})
    file.write_text(json.dumps(obj))
    with pytest.warns(UserWarning, match=r"dropped 1 annotation\(s\) with zero width or height: id 99 of image 2"):
        ds = read_dataset(root, "coco2017")
    assert len(ds[2].target) == boxes_of_2
    val = root / "annotations" / "instances_val2017.json"
    clash = json.loads(val.read_text())
    clash["images"][0]["id"], clash["annotations"] = 1, []
    val.write_text(json.dumps(clash))
    with pytest.warns(UserWarning), pytest.raises(DatasetError, match=r"image ids \[1\] are in both .*train2017.json"):
        read_dataset(root, "coco2017")
    val.unlink()
    with pytest.raises(
        DatasetError, match=r"lacks annotations/instances_val2017.json; expected .*annotations_trainval2017"
    ):
        read_dataset(root, "coco2017")


def test_layouts_are_read_only_but_convert_out(tmp_path):
    assert FORMATS.names() == ["coco", "coco2017", "voc", "voc0712", "yolo"]
    assert FORMATS.get("voc0712").write is None
    root = make_coco2017(tmp_path)
    with pytest.raises(ConfigError, match="coco2017 is a read-only layout"):
        convert(root, tmp_path / "out", to="coco2017")
    converted = convert(root, tmp_path / "flat", to="coco", from_="coco2017")
    assert len(coco.read(tmp_path / "flat")) == len(converted) == 11


# -- config: layout splits, evaluation style --------------------------------------------------

BASE = {
    "name": "t",
    "detector": {"preset": "tiny"},
    "strategies": [{"name": "random"}],
    "initial": {"size": 2},
    "budget": 1,
    "cycles": 1,
    "seeds": [0],
}


def test_layout_splits_default_to_the_papers_and_are_checked():
    voc_cfg = config_from_dict({**BASE, "dataset": {"path": "d", "format": "voc0712"}})
    assert (voc_cfg.dataset.pool_splits, voc_cfg.dataset.test_split) == (
        ["2007-trainval", "2012-trainval"],
        "2007-test",
    )
    coco_cfg = config_from_dict({**BASE, "dataset": {"path": "d", "format": "coco2017"}})
    assert (coco_cfg.dataset.pool_splits, coco_cfg.dataset.test_split) == (["train2017"], "val2017")
    voc07 = config_from_dict({**BASE, "dataset": {"path": "d", "format": "voc0712", "pool_splits": ["2007-trainval"]}})
    assert voc07.dataset.pool_splits == ["2007-trainval"]
    with pytest.raises(
        ConfigError, match=r"split 'train' is not one of the coco2017 layout's splits \(train2017, val2017\)"
    ):
        config_from_dict({**BASE, "dataset": {"path": "d", "format": "coco2017", "pool_splits": ["train"]}})


def test_evaluation_style_is_validated_and_left_out_of_old_records_when_default():
    plain = config_from_dict({**BASE, "dataset": {"path": "d"}})
    assert plain.evaluation.style == "coco" and "evaluation" not in config_to_dict(plain)  # old runs still resume
    voc_cfg = config_from_dict({**BASE, "dataset": {"path": "d"}, "evaluation": {"style": "voc07"}})
    assert config_to_dict(voc_cfg)["evaluation"] == {"style": "voc07"}
    assert config_from_dict(config_to_dict(voc_cfg)) == voc_cfg
    with pytest.raises(ConfigError, match=r"evaluation.style: Input should be 'coco', 'voc07' or 'voc12'"):
        config_from_dict({**BASE, "dataset": {"path": "d"}, "evaluation": {"style": "voc"}})


def test_a_report_refuses_runs_scored_with_different_metrics(tmp_path):
    from mgral.report.load import metric_name
    from mgral.runs import RunDir

    for name, style in (("a", "voc07"), ("b", "coco"), ("c", None)):
        config = config_to_dict(
            config_from_dict({**BASE, "dataset": {"path": "d"}, "evaluation": {"style": style or "coco"}})
        )
        RunDir(tmp_path / name).create(config)
    assert metric_name([tmp_path / "a"]) == "VOC07 AP@0.5"
    assert metric_name([tmp_path / "b", tmp_path / "c", tmp_path / "nowhere"]) == "mAP@[.5:.95]"  # the default
    with pytest.raises(RunError, match=r"different metrics: .*a \(voc07\), .*b \(coco\); report them separately"):
        metric_name([tmp_path / "a", tmp_path / "b"])


# -- ImageNet backbones -----------------------------------------------------------------------


def test_missing_backbone_file_names_the_file_its_folder_and_url(tmp_path, monkeypatch):
    from mgral.detectors.models import build_model

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(ConfigError) as info:
        build_model("retinanet_resnet50_fpn", 3, pretrained_backbone=True)
    message = str(info.value)
    assert "place resnet50-0676ba61.pth (from https://download.pytorch.org/models/resnet50-0676ba61.pth)" in message
    assert str(tmp_path / "hub" / "checkpoints" / "resnet50-0676ba61.pth") in message and "never downloads" in message
    with pytest.raises(ConfigError, match="vgg16_features-amdegroot-88682ab5.pth"):
        build_model("ssd300_vgg16", 3, pretrained_backbone=True)
    with pytest.raises(ConfigError, match="exclude each other"):
        build_model("retinanet_resnet50_fpn", 3, pretrained=True, pretrained_backbone=True)


def test_backbone_file_in_the_cache_is_loaded_with_torchvisions_recipe(tmp_path, monkeypatch):
    from torchvision.models import resnet50
    from torchvision.ops.misc import FrozenBatchNorm2d

    from mgral.detectors.models import build_model

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.manual_seed(5)
    state = resnet50().state_dict()  # stands in for the ImageNet file: recognisable values
    torch.save(state, tmp_path / "hub" / "checkpoints" / "resnet50-0676ba61.pth")
    model = build_model("retinanet_resnet50_fpn", 3, pretrained_backbone=True, min_size=64, max_size=96)
    body = model.backbone.body
    assert torch.equal(body.conv1.weight, state["conv1.weight"])
    assert torch.equal(body.layer4[0].conv1.weight, state["layer4.0.conv1.weight"])
    assert isinstance(body.bn1, FrozenBatchNorm2d)
    assert not body.layer1[0].conv1.weight.requires_grad and body.layer2[0].conv1.weight.requires_grad
    (tmp_path / "hub" / "checkpoints" / "resnet50-0676ba61.pth").write_bytes(b"not a torch file")
    with pytest.raises(ConfigError, match="could not be loaded"):
        build_model("retinanet_resnet50_fpn", 3, pretrained_backbone=True)


# -- the workload estimate --------------------------------------------------------------------


def test_workload_of_the_ssd_protocol_follows_the_loop():
    config = load_config(PAPER / "ssd300_voc0712.yaml", ["strategies=[{name: random}, {name: entropy}]"])
    w = estimate_workload(config, 16551, 4952)
    labeled = [1000 * (c + 1) for c in range(10)]
    assert w.trainings == 3 * (1 + 2 * 9) and w.series == 6
    assert w.train_images == 3 * 300 * (labeled[0] + 2 * sum(labeled[1:]))
    shared_infer = 3 * (4952 + 16551)  # every seed's cycle-0 model: test, and the pool for entropy
    entropy_infer = 3 * (9 * 4952 + sum(16551 - n for n in labeled[1:9]))
    assert w.infer_images == shared_infer + 3 * 9 * 4952 + entropy_infer
    assert w.hours(100.0, 200.0) == pytest.approx((w.train_images / 100 + w.infer_images / 200) / 3600)


def test_workload_counts_the_strategies_extra_passes():
    base = {**BASE, "dataset": {"path": "d"}, "initial": {"size": 10}, "budget": 5, "cycles": 2}
    base["detector"] = {"preset": "tiny", "train": {"iterations": 7, "batch_size": 2}}
    plain = estimate_workload(config_from_dict({**base, "strategies": [{"name": "entropy"}]}), 100, 20)
    cald = estimate_workload(config_from_dict({**base, "strategies": [{"name": "cald"}]}), 100, 20)
    assert cald.infer_images - plain.infer_images == 3 * (90 + 85)  # 3 views of the pool, cycles 0 and 1
    mgral = {"name": "mgral", "params": {"estimator": "finetune", "combinations": 4, "steps": 3, "surrogate_batch": 2}}
    m = estimate_workload(config_from_dict({**base, "strategies": [mgral]}), 100, 20)
    assert m.train_images - plain.train_images == 2 * 5 * 3 * 3 * 2  # 2 cycles, 5 jobs x 3 steps x 3 x 2 images
    # mirrored candidates and reward sets; cycle 1 also predicts the labeled images (MGRAL uses embeddings)
    assert m.infer_images - plain.infer_images == (90 + 5 * 2) + (85 + 5 * 3 + 15)


# -- a dry run of each paper config ------------------------------------------------------------


def _evaluations(monkeypatch) -> list[str]:
    """Record the style of every test-split evaluation the loop makes."""
    from mgral.detectors.torchvision_detector import TorchvisionDetector

    styles: list[str] = []
    real = TorchvisionDetector.evaluate

    def evaluate(self, dataset, image_ids, *, style="coco", **kwargs):
        styles.append(style)
        return real(self, dataset, image_ids, style=style, **kwargs)

    monkeypatch.setattr(TorchvisionDetector, "evaluate", evaluate)
    return styles


def _check_micro_cycle(result, labels: list[str], split_sizes: dict[str, int], pool: int, test: int) -> None:
    """The real data's split sizes, and one micro cycle of every strategy: 2 initial images of the
    4 drawn from the pool, 1 more selected, each model scored."""
    assert result.split_sizes == split_sizes and (result.pool_size, result.test_size) == (pool, test)
    assert list(result.records) == labels
    for records in result.records.values():
        assert [r["cycle"] for r in records] == [0, 1] and [r["num_labeled"] for r in records] == [2, 3]
        assert all(r["mAP"] is not None and 0 <= r["mAP"] <= 1 for r in records)
        assert len(records[0]["selected"]) == 1
    assert result.train_rate > 0 and result.infer_rate > 0 and result.hours > 0


CPU = ["detector.device=cpu", "detector.params.pretrained_backbone=false", "detector.train.num_workers=0"]
SMALL = ["detector.params.min_size=32", "detector.params.max_size=64", "detector.train.batch_size=1"]
MICRO = {"pool_images": 4, "test_images": 1, "iterations": 1}


@pytest.mark.slow  # 25 s on 2 cores (SSD300 on CPU); VOC07 scoring stays in the default suite via RetinaNet's
def test_ssd_voc0712_config_dry_run(tmp_path, monkeypatch):
    devkit = make_voc0712(tmp_path)
    # SSD300 costs seconds an image on CPU: random here (evaluation still runs SSD's predictions and
    # class distributions), the strategies that read predictions with RetinaNet below
    overrides = [f"dataset.path={devkit}", *CPU, "detector.train.batch_size=1", "strategies=[{name: random}]"]
    config = load_config(PAPER / "ssd300_voc0712.yaml", overrides)
    styles = _evaluations(monkeypatch)
    result = dry_run(config, tmp_path / "dry", **MICRO, probe_steps=0, log=lambda _: None)
    _check_micro_cycle(result, ["random"], VOC_COUNTS, 12, 3)
    assert styles == ["voc07", "voc07"]  # the record's mAP is VOC07 AP@0.5 (then mAP50 is the same figure)
    assert all(r["mAP"] == r["mAP50"] for r in result.records["random"])
    assert len(result.records["random"][0]["per_class"]) == 20
    # the estimate is the full protocol's (3 seeds, 9 cycles), on this layout's split sizes
    assert result.workload.trainings == 3 * (1 + 9) and "about" in result.summary()


def test_retinanet_voc0712_config_dry_run(tmp_path, monkeypatch):
    devkit = make_voc0712(tmp_path)
    strategies = "strategies=[{name: cald}, {name: mgral, params: {estimator: finetune}}]"  # random, ppal: the others
    config = load_config(PAPER / "retinanet_voc0712.yaml", [f"dataset.path={devkit}", *CPU, *SMALL, strategies])
    styles = _evaluations(monkeypatch)
    result = dry_run(config, tmp_path / "dry", **MICRO, probe_steps=0, log=lambda _: None)
    labels = ["cald", "mgral"]
    _check_micro_cycle(result, labels, VOC_COUNTS, 12, 3)
    assert set(styles) == {"voc07"} and len(styles) == 1 + len(labels)  # one shared cycle-0 model
    summary = json.loads((result.run_dir / "mgral" / "seed-0" / "cycle-0" / "mgral" / "summary.json").read_text())
    assert summary["table_rows"] == STRATEGIES.get("mgral").micro_params["combinations"]  # MGRAL's surrogate table ran
    # the report says which mAP it plots
    from mgral.report import write_report

    text = write_report([result.run_dir], tmp_path / "report").read_text()
    assert "`cK (N imgs)`: test VOC07 AP@0.5 after cycle K" in text
    svg = (tmp_path / "report" / "curves_images.svg").read_text()
    assert "test VOC07 AP@0.5" in svg and "mAP@[.5:.95]" not in svg


def test_retinanet_coco_config_dry_run_through_the_cli(tmp_path, monkeypatch, capsys):
    root = make_coco2017(tmp_path)
    monkeypatch.setattr(planning, "dry_run", functools.partial(dry_run, **MICRO, probe_steps=1))
    styles = _evaluations(monkeypatch)
    argv = ["run", str(PAPER / "retinanet_coco.yaml"), "--dry-run", "--out", str(tmp_path / "dry")]
    for override in (f"dataset.path={root}", *CPU, *SMALL, "strategies=[{name: random}, {name: ppal}]"):
        argv += ["--set", override]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "data: train2017 8, val2017 3; pool 8 images (train2017), test 3 (val2017)" in out
    assert "random: 2 -> 3 images, coco mAP" in out and "ppal: 2 -> 3 images" in out
    assert "training iterations of 1 images" in out and "dry run passed" in out
    assert set(styles) == {"coco"}
    saved = json.loads((tmp_path / "dry" / "dry_run.json").read_text())
    assert saved["pool"] == 8 and saved["test"] == 3 and saved["hours"] > 0


def test_dry_run_refuses_a_split_too_small_and_a_resume(tmp_path):
    devkit = make_voc0712(tmp_path, {"2007-trainval": 1, "2012-trainval": 1, "2007-test": 1})
    config = load_config(PAPER / "retinanet_voc0712.yaml", [f"dataset.path={devkit}", "detector.device=cpu"])
    with pytest.raises(ConfigError, match=r"the pool splits .* hold 2 images .* a dry run needs 4 and 1"):
        dry_run(config, tmp_path / "dry", **MICRO)
    assert main(["run", str(PAPER / "retinanet_voc0712.yaml"), "--dry-run", "--resume"]) == 2


def test_the_workload_counts_the_schedule_floor():
    from mgral.detectors.training import make_config
    from mgral.planning import _trained

    floor = make_config({"epochs": 2, "batch_size": 4, "min_iterations": 25})
    assert _trained(floor, 10) == 100  # 2 epochs of 10 images < 25 steps of 4
    assert _trained(floor, 100) == 200  # 2 epochs of 100 images: the floor does not bind
    assert _trained(make_config({"iterations": 30, "batch_size": 4}), 10) == 120
