"""Run directories written by an earlier mgral (``tests/fixtures/runs-3996e5c``, made by its
``make.py`` before the cycle engine was shared by the simulated and the human loop) resume
with today's code: same selections, same ledgers, the same records' counts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mgral.config import config_from_dict
from mgral.data.coco import read as read_coco
from mgral.data.coco import to_coco_dict
from mgral.data.synth import SynthConfig, generate
from mgral.human import import_labels, query
from mgral.loop import run_experiment
from mgral.pool import Ledger
from mgral.runs import RunDir, read_cycle_records

FIXTURE = Path(__file__).parent / "fixtures" / "runs-3996e5c"
KEYS = ("strategy", "seed", "cycle", "num_labeled", "num_boxes_labeled", "selected", "scores")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def old(tmp_path) -> Path:
    """The fixture's runs, with the paths of this machine."""
    generate(tmp_path / "digits", SynthConfig(images=60, seed=0, image_size=96, max_digit_size=32))
    (tmp_path / "initial.txt").write_text("".join(f"{i}\n" for i in range(1, 9)))
    for name in ("sim", "human"):
        shutil.copytree(FIXTURE / name, tmp_path / name)
        config = tmp_path / name / "config.yaml"
        text = config.read_text().replace("DIGITS", str(tmp_path / "digits"))
        config.write_text(text.replace("INITIAL", str(tmp_path / "initial.txt")))
    return tmp_path


def _records(path: Path) -> list[dict]:
    return [{k: r.get(k) for k in KEYS} for r in read_cycle_records(path)]


def test_a_simulated_run_resumes_to_the_selections_it_made(old):
    run = old / "sim"
    expected = {p: (_records(p), p.with_name("ledger.json").read_bytes()) for p in run.glob("*/seed-0/cycles.jsonl")}
    for path, keep in (("entropy/seed-0/cycles.jsonl", 1), ("random/seed-0/cycles.jsonl", 2)):
        lines = (run / path).read_text().splitlines(keepends=True)
        (run / path).write_text("".join(lines[:keep]))  # killed after these cycles
    config = config_from_dict(RunDir(run).config(), source="fixture")
    run_experiment(config, run, resume=True, log=lambda _: None, progress=False)
    for path, (records, ledger) in expected.items():
        assert _records(path) == records, path
        assert Ledger.load(path.with_name("ledger.json")).to_dict() == json.loads(ledger), path


def test_a_human_run_takes_the_rest_of_its_labels_and_queries_again(old):
    run = old / "human"
    sdir = run / "entropy" / "seed-0"
    ledger = Ledger.load(sdir / "ledger.json")
    pending = [i for i in ledger.pool if i in ledger.pending]
    assert len(pending) == 2 and len(read_cycle_records(sdir / "cycles.jsonl")) == 0
    truth = read_coco(old / "digits")
    (old / "rest.json").write_text(json.dumps(to_coco_dict(truth.subset(pending))))
    result = import_labels(run, old / "rest.json", log=lambda _: None)
    assert result.finished and sorted(result.labeled) == sorted(pending)
    (record,) = read_cycle_records(sdir / "cycles.jsonl")
    assert record["num_labeled"] == 8 and sorted(record["selected"]) == sorted(
        json.loads((sdir / "cycle-0" / "selection.json").read_text())["image_ids"]
    )
    after = query(run, log=lambda _: None, progress=False)
    assert after.cycle == 1 and len(after.image_ids) == 6
    labeled = Ledger.load(sdir / "ledger.json").labeled(1)
    assert len(labeled) == 14 and not set(after.image_ids) & set(labeled)
