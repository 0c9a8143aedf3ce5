"""``mgral select`` and ``mgral.select_batch``: the next batch from the user's own model's
files, in the shapes Ultralytics, Detectron2 and MMDetection write."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from own_model import fake_model, results_rows

import mgral
from mgral.cli import main
from mgral.data.formats import convert, read_dataset
from mgral.data.synth import SynthConfig, generate


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("select") / "digits"
    generate(out, SynthConfig(images=40, seed=4, image_size=96, max_digit_size=32))
    return out


@pytest.fixture(scope="module")
def digits_yolo(digits, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("select_yolo") / "yolo"
    convert(digits, out, to="yolo")
    return out


def _labeled(dataset, tmp_path: Path, n: int = 6) -> tuple[Path, list]:
    ids = dataset.image_ids("train")[:n]
    path = tmp_path / "labeled.txt"
    path.write_text("".join(f"{i}\n" for i in ids))
    return path, ids


def _expected(dataset, dets: dict, labeled: list, strategy: str, budget: int) -> list:
    return mgral.select_batch(dataset, labeled, strategy, budget, predictions=dets).image_ids


def test_ultralytics_save_json_on_a_yolo_dataset(digits_yolo, tmp_path, capsys):
    dataset = read_dataset(digits_yolo)
    dets = fake_model(dataset)
    rows = results_rows(dataset, dets, "ultralytics")
    pred = tmp_path / "predictions.json"
    pred.write_text(json.dumps(rows))
    labeled_file, labeled = _labeled(dataset, tmp_path)
    out = tmp_path / "next.txt"
    argv = ["select", "--data", str(digits_yolo), "--predictions", str(pred), "--labeled", str(labeled_file)]
    argv += ["--strategy", "least_confidence", "--budget", "5", "--out", str(out), "--categories", "index1"]
    assert main(argv) == 0
    assert "wrote 5 image ids" in capsys.readouterr().out
    chosen = mgral.read_id_list(out, dataset)
    assert chosen == _expected(dataset, dets, labeled, "least_confidence", 5)
    assert not set(chosen) & set(labeled)
    assert all(dataset[i].split not in ("val", "test") for i in chosen)


@pytest.mark.parametrize("framework", ["detectron2", "mmdetection"])
def test_detectron2_and_mmdetection_dumps_on_a_coco_dataset(digits, tmp_path, framework):
    dataset = read_dataset(digits)
    dets = fake_model(dataset, seed=1)
    rows = results_rows(dataset, dets, framework)
    pred = tmp_path / ("coco_instances_results.json" if framework == "detectron2" else "results.bbox.json")
    pred.write_text(json.dumps(rows))
    labeled_file, labeled = _labeled(dataset, tmp_path)
    out = tmp_path / "next.txt"
    argv = ["select", "--data", str(digits), "--predictions", str(pred), "--labeled", str(labeled_file)]
    assert main([*argv, "--strategy", "entropy", "--budget", "4", "--out", str(out)]) == 0
    assert mgral.read_id_list(out, dataset) == _expected(dataset, dets, labeled, "entropy", 4)


def test_core_set_from_an_embeddings_file(digits, tmp_path):
    dataset = read_dataset(digits)
    ids = dataset.image_ids()
    vectors = np.random.default_rng(0).normal(size=(len(ids), 8)).astype(np.float32)
    emb = tmp_path / "emb.npz"
    np.savez(emb, ids=np.array([str(i) for i in ids]), embeddings=vectors)
    labeled_file, labeled = _labeled(dataset, tmp_path)
    out = tmp_path / "next.txt"
    argv = ["select", "--data", str(digits), "--labeled", str(labeled_file), "--strategy", "core_set"]
    assert main([*argv, "--budget", "3", "--out", str(out), "--embeddings", str(emb)]) == 0
    expected = mgral.select_batch(dataset, labeled, "core_set", 3, embeddings=dict(zip(ids, vectors, strict=True)))
    assert mgral.read_id_list(out, dataset) == expected.image_ids


def test_refusals_name_what_is_missing(digits, tmp_path, capsys):
    out = tmp_path / "next.txt"
    base = ["select", "--data", str(digits), "--budget", "3", "--out", str(out)]
    assert main([*base, "--strategy", "cald"]) == 2
    err = capsys.readouterr().err
    assert "needs the trained detector itself" in err and "least_confidence" in err
    assert main([*base, "--strategy", "core_set"]) == 2
    assert "pass embeddings (--embeddings)" in capsys.readouterr().err
    assert main([*base, "--strategy", "entropy"]) == 2
    assert "pass predictions (--predictions)" in capsys.readouterr().err
    bad = tmp_path / "labeled.txt"
    bad.write_text("99999\n")
    assert main([*base, "--strategy", "random", "--labeled", str(bad)]) == 2
    assert "99999" in capsys.readouterr().err
    wrong = tmp_path / "p.json"
    wrong.write_text(json.dumps([{"image_id": "nope", "category_id": 1, "bbox": [0, 0, 2, 2], "score": 0.5}]))
    assert main([*base, "--strategy", "entropy", "--predictions", str(wrong)]) == 2
    assert "neither an image id nor the file stem" in capsys.readouterr().err
    assert not out.exists()


def test_the_readme_python_example_runs(digits, tmp_path, monkeypatch, capsys):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    after = readme.split("(this block is run by the tests):", 1)[1]
    code = after.split("```python\n", 1)[1].split("```", 1)[0]
    dataset = read_dataset(digits)
    rows = results_rows(dataset, fake_model(dataset), "detectron2")
    (tmp_path / "data").symlink_to(digits, target_is_directory=True)
    (tmp_path / "preds.json").write_text(json.dumps(rows))
    _labeled(dataset, tmp_path)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    chosen = (tmp_path / "next.txt").read_text().split()
    assert len(chosen) == min(50, len(dataset.image_ids("train")) - 6) and capsys.readouterr().out.startswith("[")


@pytest.mark.parametrize("content", ["fifo", "npy", b"", b"PK\x03\x04 not a zip", b"\x93NUMPY not an npz"])
def test_a_bad_embeddings_file_is_refused_naming_it(digits, tmp_path, capsys, content):
    import os

    emb = tmp_path / "emb.npz"
    if content == "fifo":
        os.mkfifo(emb)  # would block np.load forever
    elif content == "npy":
        with open(emb, "wb") as fh:
            np.save(fh, np.zeros((3, 4)))  # one array, not named ones
    else:
        emb.write_bytes(content)
    argv = ["select", "--data", str(digits), "--strategy", "core_set", "--budget", "3"]
    assert main([*argv, "--out", str(tmp_path / "next.txt"), "--embeddings", str(emb)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mgral: error: {emb}: ") and "Traceback" not in err
