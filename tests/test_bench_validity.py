"""The estimator-validity benchmark's figures (benchmarks/bench_mgral_validity.py): the pooled
Spearman ranks within states (a state's level cannot make a correlation), its interval covers
it, the seed-noise ceiling and the percentile mean what the table says, and one state's
figures come out of its fine-tune results."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location(
        "bench_mgral_validity", ROOT / "benchmarks" / "bench_mgral_validity.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_mgral_validity"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_mgral_validity", None)


def test_pooled_spearman_of_one_state_is_its_spearman(bench):
    rng = np.random.default_rng(0)
    x = rng.normal(size=30)
    y = x + rng.normal(size=30)
    assert bench.pooled_spearman([(x, y)]) == pytest.approx(stats.spearmanr(x, y).statistic)


def test_pooled_spearman_ignores_the_states_levels(bench):
    """Two states whose scores and truths are unrelated within each, but whose levels differ
    together: a naive pooled Spearman is high, the within-state one is near 0."""
    rng = np.random.default_rng(1)
    groups = []
    for level in (0.0, 10.0):
        groups.append((level + rng.normal(size=40), level + rng.normal(size=40)))
    naive = stats.spearmanr(np.concatenate([g[0] for g in groups]), np.concatenate([g[1] for g in groups])).statistic
    assert naive > 0.7
    assert abs(bench.pooled_spearman(groups)) < 0.3


def test_pooled_spearman_weighs_states_and_finds_a_shared_signal(bench):
    rng = np.random.default_rng(2)
    signal = [(x, x + 0.3 * rng.normal(size=40)) for x in (rng.normal(size=40) for _ in range(3))]
    noise = [(rng.normal(size=40), rng.normal(size=40)) for _ in range(3)]
    assert bench.pooled_spearman(signal) > 0.8
    assert bench.pooled_spearman(signal + noise) == pytest.approx(
        np.mean([bench.pooled_spearman(signal), bench.pooled_spearman(noise)]), abs=0.1
    )
    assert np.isnan(bench.pooled_spearman([(np.ones(2), np.ones(2))]))  # too few batches: no figure


def test_pooled_interval_covers_the_estimate_and_narrows_with_more_batches(bench):
    rng = np.random.default_rng(3)

    def groups(n):
        out = []
        for _ in range(2):
            x = rng.normal(size=n)
            out.append((x, x + 1.5 * rng.normal(size=n)))
        return out

    small, large = groups(15), groups(200)
    for g in (small, large):
        lo, hi = bench.pooled_interval(g, resamples=400)
        assert lo <= bench.pooled_spearman(g) <= hi
    (lo_s, hi_s), (lo_l, hi_l) = (
        bench.pooled_interval(small, resamples=400),
        bench.pooled_interval(large, resamples=400),
    )
    assert hi_l - lo_l < hi_s - lo_s
    assert bench.pooled_interval(small, resamples=200, seed=5) == bench.pooled_interval(small, resamples=200, seed=5)


def test_seed_noise_and_ceiling(bench):
    first = {"a": 0.01, "b": 0.02, "c": 0.03}
    assert bench.seed_noise(first, dict(first)) == 0.0
    second = {"a": 0.01 + 0.004, "b": 0.02 - 0.004, "c": 0.03}
    assert bench.seed_noise(first, second) == pytest.approx(np.std([-0.004, 0.004, 0.0], ddof=1) / np.sqrt(2))
    assert np.isnan(bench.seed_noise(first, {"a": 0.0}))  # one shared batch: no SD
    assert bench.ceiling(0.0, 0.01) == 1.0
    assert bench.ceiling(0.01, 0.01) == 0.0
    assert bench.ceiling(0.006, 0.01) == pytest.approx(0.8)
    assert bench.ceiling(0.02, 0.01) == 0.0  # noise above the spread: nothing can correlate
    assert np.isnan(bench.ceiling(float("nan"), 0.01))


def test_percentile_among(bench):
    assert bench.percentile_among(5.0, [1, 2, 3, 4]) == 1.0
    assert bench.percentile_among(0.0, [1, 2, 3, 4]) == 0.0
    assert bench.percentile_among(2.0, [1, 2, 3, 4]) == pytest.approx(0.375)


def test_finetune_schedule_halves_the_cycle(bench):
    from mgral.config import load_config

    cfg = load_config(ROOT / "benchmarks" / "configs" / "bccd.yaml")
    train = bench.finetune_schedule(cfg)
    assert train["iterations"] == cfg.detector.train["iterations"] // 2
    assert train["warmup_iters"] == cfg.detector.train["warmup_iters"] // 2
    assert train["batch_size"] == cfg.detector.train["batch_size"]


def _state(bench, n_random):
    keys = [f"r{k}" for k in range(n_random)] + list(bench.STRATEGIES)
    rng = np.random.default_rng(4)
    gains = dict(zip(keys, rng.normal(0, 0.01, len(keys)), strict=True))
    gains["mgral"] = 1.0  # above every random batch
    chosen = {
        "labeled": 35,
        "state_mAP": 0.2,
        "batches": {k: [k] for k in keys},
        "scores": {s: {k: gains[k] + (0 if s == "prior" else rng.normal()) for k in keys} for s in bench.SCORES[1:]},
    }
    truth = {"control": {"mAP": 0.3, "train_cpu_s": 1.0}}
    truth.update({k: {"mAP": 0.3 + g, "train_cpu_s": 1.0} for k, g in gains.items()})
    truth["seed1:control"] = {"mAP": 0.31, "train_cpu_s": 1.0}
    for k in range(bench.NOISE):
        truth[f"seed1:r{k}"] = {"mAP": 0.31 + gains[f"r{k}"] + (0.002 if k % 2 else -0.002), "train_cpu_s": 1.0}
    return chosen, truth, gains


def test_state_figures(bench):
    chosen, truth, gains = _state(bench, bench.RANDOM)
    incomplete = {k: v for k, v in truth.items() if k != "r3"}
    assert bench.state_figures("bccd", 0, 1, chosen, incomplete, {}) is None  # a missing truth: not a state yet

    est = {k: {"gain": -g, "se": 0.001, "cpu_s": 2.0} for k, g in gains.items()}  # ranks every batch backwards
    r = bench.state_figures("bccd", 0, 1, chosen, truth, est)
    assert r["gains"]["r0"] == pytest.approx(gains["r0"])
    assert r["spearman"]["prior"] == pytest.approx(1.0)  # the prior score is the truth itself here
    assert r["spearman"]["estimate"] == pytest.approx(-1.0)
    assert r["strategies"]["mgral"]["percentile"] == 1.0
    assert r["seed_noise_sd"] == pytest.approx(
        np.std([0.002 * (1 if k % 2 else -1) for k in range(4)], ddof=1) / np.sqrt(2)
    )
    assert 0 < r["ceiling"] <= 1
    assert r["estimate_cpu_s"] == 2.0

    unsupported = bench.state_figures("digits", 0, 1, chosen, truth, {"unsupported": "no head cache"})
    assert "estimate" not in unsupported["spearman"] and unsupported["estimate_note"] == "no head cache"


def test_report_pools_the_states(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    monkeypatch.setattr(bench, "RESAMPLES", 100)
    chosen, truth, gains = _state(bench, bench.RANDOM)
    rows = [bench.state_figures("bccd", s, 1, chosen, truth, {}) for s in (0, 1)]
    result = bench.write(rows, [("bccd", 0, 1), ("bccd", 1, 1), ("bccd", 0, 3)], (0.0, 0.0, 0.0))
    assert result["pooled"]["prior"]["spearman"] == pytest.approx(1.0)
    assert result["pooled"]["prior"]["states"] == 2
    assert "estimate" not in result["pooled"]
    text = (tmp_path / "mgral_validity.md").read_text()
    assert "States done: 2 of 3" in text
    assert "| prior | 2 | **+1.00**" in text


def test_an_alias_is_measured_once_and_safety_compares_the_head_route_with_the_prior(bench):
    chosen, truth, gains = _state(bench, bench.RANDOM)
    chosen["aliases"] = {"mgral_head": "mgral"}  # the head route took the prior's batch
    chosen["select_info"] = {"mgral_head": {"choice": {"batch": "prior"}}}
    del truth["mgral_head"]
    assert "mgral_head" not in bench.unique_keys(chosen)
    assert all(job[3] != "mgral_head" for job in bench.truth_jobs("bccd", 0, 1, {"labeled": []}, chosen, {}))
    r = bench.state_figures("bccd", 0, 1, chosen, truth, {})
    assert r["strategies"]["mgral_head"]["gain"] == r["strategies"]["mgral"]["gain"]
    assert "mgral_head" not in r["keys"] and len(r["scores"]["prior"]) == len(r["keys"])
    assert r["safety"] == {
        "taken": "prior",
        "same_batch": True,
        "difference": 0.0,
        "difference_se": pytest.approx(np.sqrt(2) * r["seed_noise_sd"]),
        "worse_by_more_than_one_se": False,
    }
    chosen, truth, _ = _state(bench, bench.RANDOM)
    truth["mgral_head"]["mAP"] = truth["mgral"]["mAP"] - 1.0  # far worse than the prior's batch
    assert bench.state_figures("bccd", 0, 1, chosen, truth, {})["safety"]["worse_by_more_than_one_se"]


def test_truths_over_several_seeds_are_averaged_and_their_noise_falls(bench):
    chosen, truth, gains = _state(bench, bench.RANDOM)
    one = bench.state_figures("bccd", 0, 1, chosen, truth, {})
    assert one["truth_seeds"] == 1
    jobs = bench.truth_jobs("bccd", 0, 1, {"labeled": ["L"]}, chosen, truth, seeds=3)
    keys = {j[3] for j in jobs}
    assert {"seed2:control", "seed2:r0", "seed1:r5", "seed1:mgral"} <= keys and "seed1:r0" not in keys  # done
    assert all(j[5] == int(j[3][4]) for j in jobs)  # key seed<t>: trains with seed t
    rng = np.random.default_rng(9)
    for t in (1, 2):  # every batch under seeds 1 and 2: the true gain plus noise of SD 0.002
        truth[f"seed{t}:control"] = {"mAP": 0.3, "train_cpu_s": 1.0}
        for k, g in gains.items():
            truth[f"seed{t}:{k}"] = {"mAP": 0.3 + g + rng.normal(0, 0.002), "train_cpu_s": 1.0}
    three = bench.state_figures("bccd", 0, 1, chosen, truth, {})
    assert three["truth_seeds"] == 3
    means = {
        k: np.mean([truth[f"{p}{k}"]["mAP"] - truth[f"{p}control"]["mAP"] for p in ("", "seed1:", "seed2:")])
        for k in gains
    }
    assert three["gains"]["r7"] == pytest.approx(means["r7"])
    # the noise of one seed (seeds 0 and 1 differ by the 0.002 noise of seed 1), averaged over 3
    assert three["seed_noise_sd"] == pytest.approx(0.002 / np.sqrt(2) / np.sqrt(3), rel=0.3)
    assert bench.truth_seeds({k: v for k, v in truth.items() if k != "seed2:r4"}, bench.unique_keys(chosen)) == [0, 1]
