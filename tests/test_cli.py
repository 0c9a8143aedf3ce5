"""The command line, end to end, in process (``main(argv)`` is what the console script runs)."""

import json

import pytest

from mgral.cli import main
from mgral.data import coco


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "digits"
    assert main(["synth", "--out", str(out), "--images", "40", "--seed", "3"]) == 0
    return out


def test_synth_and_info(digits, capsys):
    assert main(["info", str(digits)]) == 0
    out = capsys.readouterr().out
    assert "40 images" in out and "10 categories" in out


def test_list_shows_registered_plugins(capsys):
    assert main(["list", "formats"]) == 0
    formats = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert formats == ["coco", "coco2017", "voc", "voc0712", "yolo"]
    assert main(["list", "detectors"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert {"tiny", "mobilenet_v2_fpn", "fasterrcnn_resnet50_fpn", "ssd300_vgg16"} <= set(names)
    assert main(["list", "strategies"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert {"random", "entropy", "margin", "least_confidence", "core_set"} <= set(names)


def test_convert_round_trip_and_refusal_of_non_empty_output(digits, tmp_path, capsys):
    assert main(["convert", str(digits), "--to", "voc", "--out", str(tmp_path / "voc")]) == 0
    assert main(["convert", str(tmp_path / "voc"), "--to", "coco", "--out", str(tmp_path / "back")]) == 0
    back = coco.read(tmp_path / "back")
    assert len(back) == 40
    capsys.readouterr()
    assert main(["convert", str(digits), "--to", "yolo", "--out", str(tmp_path / "voc")]) == 2
    assert "not empty" in capsys.readouterr().err


def test_convert_flat_names(digits, tmp_path, capsys):
    """--flat-names: the COCO file_name values are base names and the images lie flat beside the json."""
    out = tmp_path / "flat"
    assert main(["convert", str(digits), "--to", "coco", "--out", str(out), "--flat-names"]) == 0
    obj = json.loads((out / "annotations.json").read_text())
    assert all("/" not in i["file_name"] and (out / i["file_name"]).is_file() for i in obj["images"])
    assert len(coco.read(out)) == 40
    capsys.readouterr()
    assert main(["convert", str(digits), "--to", "yolo", "--out", str(tmp_path / "y"), "--flat-names"]) == 2
    assert "flat names (--flat-names) are for COCO: yolo always names its images flat" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


def test_bad_input_exits_2_with_file_image_and_box_and_writes_nothing(digits, tmp_path, capsys):
    obj = json.loads((digits / "annotations.json").read_text())
    ann = obj["annotations"][0]
    ann["bbox"][2] = -5.0
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(obj))
    image = next(i for i in obj["images"] if i["id"] == ann["image_id"])
    code = main(["convert", str(bad), "--to", "voc", "--out", str(tmp_path / "out"), "--image-root", str(digits)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"mgral: error: {bad}: annotations[0] of image {image['id']} ('{image['file_name']}'): box 0")
    assert "width -5 <= 0" in err
    assert not (tmp_path / "out").exists()


def test_evaluate_json_and_bootstrap(digits, tmp_path, capsys):
    obj = json.loads((digits / "annotations.json").read_text())
    perfect = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
        for a in obj["annotations"]
    ]
    pred = tmp_path / "perfect.json"
    pred.write_text(json.dumps(perfect))
    assert main(["evaluate", "--gt", str(digits), "--pred", str(pred), "--json", "--bootstrap", "20"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"mAP", "mAP50", "mAP75", "mAP_small", "mAP_medium", "mAP_large", "per_class"} <= set(out)
    assert out["mAP"] == pytest.approx(1.0) and out["mAP50"] == pytest.approx(1.0)
    assert out["bootstrap"]["mAP"]["low"] == pytest.approx(1.0)
    assert main(["evaluate", "--gt", str(digits), "--pred", str(pred), "--style", "voc07"]) == 0
    assert "per-class AP" in capsys.readouterr().out


def test_evaluate_bad_predictions_exit_2(digits, tmp_path, capsys):
    pred = tmp_path / "p.json"
    pred.write_text('[{"image_id": 99999, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5}]')
    assert main(["evaluate", "--gt", str(digits), "--pred", str(pred)]) == 2
    assert "99999" in capsys.readouterr().err


def test_train_then_predict_then_evaluate(digits, tmp_path, capsys):
    out = tmp_path / "model"
    code = main(
        [
            "train",
            str(digits),
            "--detector",
            "tiny",
            "--iterations",
            "2",
            "--batch-size",
            "4",
            "--out",
            str(out),
            "--param",
            "pretrained=false",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    assert (out / "model.pt").is_file() and (out / "last.pt").is_file()
    report = json.loads((out / "train.json").read_text())
    assert report["iterations"] == 2 and "mAP50" in report["test"]
    pred = tmp_path / "pred.json"
    assert (
        main(["predict", str(digits), "--checkpoint", str(out / "model.pt"), "--out", str(pred), "--device", "cpu"])
        == 0
    )
    capsys.readouterr()
    assert main(["evaluate", "--gt", str(digits), "--pred", str(pred), "--json"]) == 0
    assert "mAP" in json.loads(capsys.readouterr().out)


def test_train_refuses_unknown_preset_listing_valid_ones(digits, tmp_path, capsys):
    assert main(["train", str(digits), "--detector", "yolo9000", "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "unknown detector 'yolo9000'; valid detectors:" in err and "tiny" in err


def test_run_then_report(tmp_path, capsys):
    import yaml

    cfg = {
        "name": "cli",
        "dataset": {
            "path": str(tmp_path / "d"),
            "synth": {"images": 30, "seed": 1, "image_size": 96, "max_digit_size": 32},
        },
        "detector": {"preset": "tiny", "params": {"pretrained": False}, "train": {"iterations": 2, "batch_size": 4}},
        "strategies": [{"name": "random"}],
        "initial": {"size": 5},
        "budget": 4,
        "cycles": 2,
        "seeds": [0],
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    assert main(["run", str(tmp_path / "c.yaml"), "--out", str(run), "--set", "cycles=1"]) == 0
    assert main(["run", str(tmp_path / "c.yaml"), "--out", str(run), "--set", "cycles=1"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "c.yaml"), "--out", str(run), "--set", "cycles=1", "--resume"]) == 0
    assert main(["run", str(tmp_path / "c.yaml"), "--out", str(run), "--resume"]) == 2
    assert "cannot resume with a different config: cycles: 1 (recorded) vs 2 (given)" in capsys.readouterr().err
    assert main(["report", str(run)]) == 0
    assert (run / "report" / "results.md").is_file() and (run / "report" / "curves_images.png").is_file()


def test_version_and_help_on_every_argument(capsys):
    import argparse

    from mgral import __version__
    from mgral.cli import build_parser

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"mgral {__version__}"
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    bare = [
        f"{name} {a.option_strings or a.dest}"
        for name, sub in subparsers.choices.items()
        for a in sub._actions
        if not a.help and a.dest != "help"
    ]
    assert not bare, f"arguments without help text: {bare}"
