"""Detector kind ``predictions``: the whole loop with a model trained outside mgral, read from
its COCO results files (the shapes Ultralytics, Detectron2 and MMDetection write)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from own_model import FRAMEWORKS, fake_model, write_results

import mgral
from mgral.cli import main
from mgral.config import config_from_dict
from mgral.data.formats import convert, read_dataset
from mgral.data.synth import SynthConfig, generate
from mgral.detectors.predictions import PredictionsDetector
from mgral.errors import CheckpointError, ConfigError, WaitingForModel
from mgral.evaluation import evaluate
from mgral.human import query
from mgral.loop import run_experiment
from mgral.pool import Ledger
from mgral.runs import RunDir, read_cycle_records


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("own") / "digits"
    generate(out, SynthConfig(images=40, seed=3, image_size=96, max_digit_size=32))
    return out


@pytest.fixture(scope="module")
def digits_yolo(digits, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("own_yolo") / "yolo"
    convert(digits, out, to="yolo")
    return out


def _config(data: Path, tmp: Path, framework: str, **changes) -> dict:
    params = {"results": str(tmp / "preds/{label}/seed-{seed}/cycle-{cycle}.json")}
    params["embeddings"] = str(tmp / "preds/{label}/seed-{seed}/cycle-{cycle}.npz")
    if framework == "ultralytics":  # image ids are file stems, categories the class index + 1
        params |= {"match": "auto", "categories": "index1"}
    cfg = {
        "name": "own-model",
        "dataset": {"path": str(data)},
        "detector": {"kind": "predictions", "params": params},
        "strategies": [{"name": "least_confidence"}, {"name": "core_set"}],
        "initial": {"size": 6},
        "budget": 4,
        "cycles": 1,
        "seeds": [0],
    }
    return cfg | changes


def _serve(run: Path, dataset, framework: str) -> tuple[Path, dict] | None:
    """Play the user's training script: find the cycle waiting for its results, "train" on its
    train.json and write results for every image (pool and test) and embeddings."""
    for train in sorted(run.glob("*/seed-*/cycle-*/train.json")):
        label, seed, cycle = train.parts[-4], train.parts[-3][5:], train.parts[-2][6:]
        results = run.parent / "preds" / label / f"seed-{seed}" / f"cycle-{cycle}.json"
        if results.exists():
            continue
        trained_on = [e["mgral_id"] for e in json.loads(train.read_text())["images"]]
        dets = fake_model(dataset, seed=len(trained_on))
        write_results(results, dataset, dets, framework)
        ids = dataset.image_ids()
        vectors = np.random.default_rng(len(trained_on)).normal(size=(len(ids), 6)).astype(np.float32)
        np.savez(results.with_suffix(".npz"), ids=np.array([str(i) for i in ids]), embeddings=vectors)
        return train, dets
    return None


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_a_run_with_your_own_model_waits_for_each_results_file_and_selects_from_it(
    digits, digits_yolo, tmp_path, capsys, framework
):
    data = digits_yolo if framework == "ultralytics" else digits
    dataset = read_dataset(data)
    cfg = tmp_path / "own.yaml"
    cfg.write_text(yaml.safe_dump(_config(data, tmp_path, framework)))
    run = tmp_path / "run"
    served = {}
    for _ in range(10):
        rc = main(["run", str(cfg), "--out", str(run), "--resume"])
        if rc == 0:
            break
        assert rc == 3, capsys.readouterr().err
        assert "needs your model's results" in capsys.readouterr().err
        train, dets = _serve(run, dataset, framework)
        served[train.parent] = dets
    assert rc == 0 and len(served) == 4, "one results file per (strategy, cycle)"
    test = dataset.image_ids("test")
    for label in ("least_confidence", "core_set"):
        sdir = RunDir(run).series(label, 0)
        records = read_cycle_records(sdir.records)
        ledger = Ledger.load(sdir.ledger)
        assert [r["cycle"] for r in records] == [0, 1]
        for r in records:
            cdir = sdir.cycle(r["cycle"]).path
            trained_on = [e["mgral_id"] for e in json.loads((cdir / "train.json").read_text())["images"]]
            assert sorted(trained_on, key=str) == sorted(ledger.labeled(r["cycle"]), key=str)
            dets = served[cdir]
            expected = evaluate(dataset.subset(test), {i: dets.get(i, mgral.Detections()) for i in test})
            assert r["mAP"] == pytest.approx(expected.mAP, abs=1e-6), "the curve is the results file's own mAP"
        if label == "least_confidence":  # the batch is what select_batch makes of the same file
            dets = served[sdir.cycle(0).path]
            labeled = ledger.labeled(0)
            pool = [i for i in ledger.pool if i not in set(labeled)]
            preds = {i: dets.get(i, mgral.Detections()) for i in pool}
            batch = mgral.select_batch(dataset, labeled, "least_confidence", 4, predictions=preds, pool=pool)
            assert records[0]["selected"] == list(batch.image_ids)


@pytest.mark.parametrize("strategy", ["cald", "mgral"])
def test_a_strategy_needing_more_than_files_is_refused_before_anything_is_written(digits, tmp_path, strategy):
    cfg = config_from_dict(_config(digits, tmp_path, "detectron2", strategies=[{"name": strategy}]))
    with pytest.raises(ConfigError, match=rf"strategy '{strategy}' needs what a detector of kind 'predictions'"):
        run_experiment(cfg, tmp_path / "run", log=lambda _: None)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "params, message",
    [
        ({}, "needs the path of your model's COCO results"),
        ({"results": "p/{round}.json"}, r"names \['round'\]"),
        ({"results": "p.json", "match": "name"}, "params.match: expected one of"),
        ({"results": "p.json", "epochs": 3}, r"\['epochs'\] are not parameters of kind predictions"),
    ],
)
def test_bad_parameters_are_refused_naming_them(digits, tmp_path, params, message):
    cfg = config_from_dict(_config(digits, tmp_path, "detectron2", detector={"kind": "predictions", "params": params}))
    with pytest.raises(ConfigError, match=message):
        run_experiment(cfg, tmp_path / "run", log=lambda _: None)


def test_training_settings_do_not_apply_to_your_own_model(digits, tmp_path):
    with pytest.raises(ConfigError, match="preset, weights, train and warm_start do not apply"):
        config_from_dict(
            _config(digits, tmp_path, "detectron2", detector={"kind": "predictions", "preset": "tiny", "params": {}})
        )


def test_a_results_file_changed_after_its_cycle_used_it_is_refused(digits, tmp_path):
    dataset = read_dataset(digits)
    results = write_results(tmp_path / "r.json", dataset, fake_model(dataset), "detectron2")
    det = PredictionsDetector(dataset.categories, results=str(results))
    cdir = tmp_path / "run" / "entropy" / "seed-0" / "cycle-0"
    cdir.mkdir(parents=True)
    det.fit(dataset, dataset.image_ids("train")[:5], checkpoint_dir=cdir)
    det.save(cdir / "model.pt")
    assert PredictionsDetector.load(cdir / "model.pt").predict(dataset, [dataset.image_ids()[0]])
    write_results(results, dataset, fake_model(dataset, seed=9), "detectron2")
    with pytest.raises(CheckpointError, match="changed .* since this cycle used it"):
        PredictionsDetector.load(cdir / "model.pt")


def test_the_human_loop_with_your_own_model(digits, tmp_path):
    dataset = read_dataset(digits)
    ids = tmp_path / "initial.txt"
    ids.write_text("".join(f"{i}\n" for i in dataset.image_ids("train")[:6]))
    cfg = _config(digits, tmp_path, "detectron2", initial={"ids_file": str(ids)}, oracle={"kind": "human"})
    cfg["strategies"] = [{"name": "entropy"}]
    run = tmp_path / "run"
    with pytest.raises(WaitingForModel, match="cycle 0 of entropy seed 0 needs your model's results"):
        query(run, config_from_dict(cfg), log=lambda _: None, progress=False)
    train, dets = _serve(run, dataset, "detectron2")
    asked = query(run, log=lambda _: None, progress=False)
    assert len(asked.image_ids) == 4 and asked.result["mAP"] is not None
    coco = json.loads((asked.package / "predictions_coco.json").read_text())
    shown = sum(int((dets[i].scores >= 0.5).sum()) for i in asked.image_ids if i in dets)
    assert len(coco["annotations"]) == shown, "the pre-annotations are your model's boxes"
