"""MGRAL with the head estimator (a Faster R-CNN task detector): candidates from the prior, a
memoised label-free table, the prior-tied policy, safe selection, what the cycle writes."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

import mgral.strategies.mgral.strategy as strategy_module
from mgral.detectors.heads import supports_head_cache
from mgral.detectors.torchvision_detector import TorchvisionDetector
from mgral.errors import ConfigError
from mgral.strategies import build_strategy
from mgral.strategies.mgral.estimate import GainEstimate

HEAD = {
    "estimator": "head",
    "folds": 2,
    "labelings": 1,
    "head_iterations": 3,
    "resamples": 20,
    "policy_updates": 3,
    "policy_samples": 2,
    "hidden": 16,
    "chunk": 8,
    "orders": 2,
    "pca_components": 2,
}


@pytest.fixture(scope="module")
def faster_rcnn():
    from mgral.data.records import Category

    cats = [Category(10 * (k + 1), f"class{k}") for k in range(3)]
    return TorchvisionDetector("mobilenet_v2_fpn", cats, device="cpu", seed=0, pretrained=False, min_size=64)


def _context(make_context, for_strategy, detector, tmp_path, strategy, **options):
    ctx = for_strategy(make_context(**options), strategy)
    ctx.detector = detector
    ctx.work_dir = tmp_path / "cycle-0"
    ctx.work_dir.mkdir(parents=True, exist_ok=True)
    return ctx


def test_auto_is_none_with_the_label_free_reward_and_the_table_with_a_research_one(faster_rcnn):
    """``auto`` takes no estimate (measured: neither estimate earned its cost) unless the
    reward is a research one, which only the fine-tune table can use; the route sets what
    the detector must do and the cost the loop orders series by."""
    tiny = TorchvisionDetector("tiny", faster_rcnn.categories, device="cpu", seed=0, pretrained=False)
    frcnn_caps = TorchvisionDetector.capabilities(type("Spec", (), {"preset": "mobilenet_v2_fpn"}))
    tiny_caps = TorchvisionDetector.capabilities(type("Spec", (), {"preset": "tiny"}))
    auto = build_strategy("mgral")
    assert auto._route() == "none" and auto.detector_needs == {"augment"} <= tiny_caps
    assert build_strategy("mgral", estimator="finetune")._route() == "finetune"
    oracle = build_strategy("mgral", reward_source="oracle")
    assert oracle._route() == "finetune" and {"clone", "self_training"} <= oracle.detector_needs
    costs = [build_strategy("mgral", estimator=e).selection_cost for e in ("none", "head", "finetune")]
    assert costs == sorted(costs) and auto.selection_cost == costs[0]
    # the cycle asks the detector itself (supports_head_cache): the same answer as its kind's capabilities
    assert supports_head_cache(faster_rcnn) and supports_head_cache(tiny)
    # asking for it on a detector that cannot is refused before the run starts (loop.check_capabilities)
    head = build_strategy("mgral", estimator="head")
    assert "head_cache" in head.detector_needs
    ssd_caps = TorchvisionDetector.capabilities(type("Spec", (), {"preset": "ssd300_vgg16"}))
    assert "head_cache" not in ssd_caps and "head_cache" in frcnn_caps and "head_cache" in tiny_caps
    with pytest.raises(ConfigError, match="estimator: expected finetune or auto with reward_source 'oracle'"):
        build_strategy("mgral", estimator="head", reward_source="oracle")
    with pytest.raises(ConfigError, match="folds: expected an integer >= 2"):
        build_strategy("mgral", folds=1)


def test_a_head_cycle_writes_its_table_and_choice_and_is_deterministic(
    make_context, for_strategy, faster_rcnn, tmp_path, capsys
):
    strategy = build_strategy("mgral", **HEAD)
    ctx = _context(make_context, for_strategy, faster_rcnn, tmp_path, strategy)
    ctx.progress = True
    sel = strategy.select(ctx, 4)
    assert len(set(sel.image_ids)) == 4 and set(sel.image_ids) <= set(ctx.pool_ids)
    out = ctx.work_dir / "mgral"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["estimator"] == "head" and summary["candidates"] == 16  # 4 x budget
    assert summary["prior_scores"] == ["least_confidence", "coreset_distance", "class_rarity", "inconsistency"]
    assert set(summary["seconds"]) == {"features", "table", "agent", "selection"}
    assert summary["choice"]["batch"] in ("learned", "prior") and summary["choice"]["reason"]
    assert summary["head_cache"]["images"] == len(ctx.labeled_ids) + 16 and summary["head_cache"]["bytes"] > 0
    # every batch evaluated is a row; the policy's updates x samples bound them (+ prior and learned)
    with open(out / "table.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["combination"] == "control" and len(rows) == summary["table_rows"] + 1
    assert 2 <= summary["table_rows"] <= 2 + HEAD["policy_updates"] * HEAD["policy_samples"]
    assert all(len(json.loads(r["combination"])) == 4 for r in rows[1:])
    table = json.loads((out / "table.json").read_text())
    assert len(table) == summary["table_rows"] and all(r["seconds"] > 0 and len(r["gains"]) == 1 for r in table)
    assert all(r["combination"] == "control" or set(json.loads(r["combination"])) <= set(ctx.pool_ids) for r in rows)
    # an untrained detector: no batch beats the prior's, so training stops after `patience` updates
    with open(out / "agent_rewards.csv") as f:
        assert [int(r["update"]) for r in csv.DictReader(f)] == list(range(summary["policy_updates_run"]))
    if summary["policy_updates_run"] < HEAD["policy_updates"]:
        assert summary["policy_updates_run"] >= 2 and "training stopped after" in summary["choice"]["reason"]
        assert summary["choice"]["batch"] == "prior"
    assert "MGRAL table: " in capsys.readouterr().err
    again = build_strategy("mgral", **HEAD).select(
        _context(make_context, for_strategy, faster_rcnn, tmp_path / "again", strategy), 4
    )
    assert again.image_ids == sel.image_ids
    # patience null: every update runs
    full = build_strategy("mgral", **HEAD, patience=None)
    full.select(_context(make_context, for_strategy, faster_rcnn, tmp_path / "full", full), 4)
    summary = json.loads((tmp_path / "full" / "cycle-0" / "mgral" / "summary.json").read_text())
    assert summary["policy_updates_run"] == HEAD["policy_updates"]


def _planted(planted: set, se: float, monkeypatch):
    """Replace the label-free estimate by a planted one: the gain is the number of ``planted``
    images in the batch x 0.01, with bootstrap resamples of spread ``se`` (common to all batches
    but a batch-specific offset)."""

    def estimate(self, batch):
        hits = len(planted & set(batch))
        rng = np.random.default_rng(hits)
        resampled = 0.01 * hits + se * rng.normal(size=(1, 50))
        return GainEstimate(0.01 * hits, se, (0.01 * hits,), 0.5, resampled)

    monkeypatch.setattr(strategy_module.CrossFitGain, "estimate", estimate)


def test_a_head_cycle_runs_on_an_fcos_detector(make_context, for_strategy, faster_rcnn, tmp_path):
    """The head estimator on a one-stage (FCOS) task detector: its towers cached, the final
    convolutions fine-tuned; the same table, choice and determinism as on Faster R-CNN."""
    tiny = TorchvisionDetector("tiny", faster_rcnn.categories, device="cpu", seed=0, pretrained=False)
    strategy = build_strategy("mgral", **HEAD)
    sel = strategy.select(_context(make_context, for_strategy, tiny, tmp_path / "a", strategy), 4)
    summary = json.loads((tmp_path / "a" / "cycle-0" / "mgral" / "summary.json").read_text())
    assert summary["estimator"] == "head" and summary["table_rows"] >= 2 and summary["head_cache"]["bytes"] > 0
    again = build_strategy("mgral", **HEAD)
    assert again.select(_context(make_context, for_strategy, tiny, tmp_path / "b", again), 4).image_ids == sel.image_ids


@pytest.mark.parametrize(("se", "learned"), [(1e-4, True), (1.0, False)])
def test_safe_selection_takes_the_learned_batch_only_when_it_is_clearly_better(
    make_context, for_strategy, faster_rcnn, tmp_path, monkeypatch, se, learned
):
    """A planted reward that the prior misses: with a precise estimate the learned batch (more
    planted images) is taken; when the estimate is noise (SE 1.0) the prior's batch is."""
    params = {**HEAD, "policy_updates": 25, "policy_samples": 8, "policy_lr": 0.1, "kl": 0.0}
    strategy = build_strategy("mgral", **params)
    ctx = _context(make_context, for_strategy, faster_rcnn, tmp_path, strategy)
    planted = set(ctx.pool_ids)  # all candidates planted but the prior's own top-4
    prior = build_strategy("mgral", **{**params, "policy_updates": 1, "safe_z": 1e9})
    prior_sel = prior.select(_context(make_context, for_strategy, faster_rcnn, tmp_path / "prior", prior), 4)
    planted -= set(prior_sel.image_ids)
    _planted(planted, se, monkeypatch)
    sel = strategy.select(ctx, 4)
    choice = sel.info["choice"]
    assert (choice["batch"] == "learned") is learned
    if learned:
        assert len(planted & set(sel.image_ids)) > 0 and choice["diff"] > 2 * choice["se"]
        assert sel.info["policy_updates_run"] == params["policy_updates"]
    else:  # noise: no sampled batch beats the prior by 2 SEs, training stops after `patience` updates
        assert set(sel.image_ids) == set(prior_sel.image_ids)
        assert sel.info["policy_updates_run"] == 2 and "training stopped after 2" in choice["reason"]


def test_too_few_labeled_images_take_the_prior_and_say_so(make_context, for_strategy, faster_rcnn, tmp_path):
    strategy = build_strategy("mgral", **HEAD)
    ctx = _context(make_context, for_strategy, faster_rcnn, tmp_path, strategy, num_labeled=1)
    sel = strategy.select(ctx, 3)
    assert len(sel.image_ids) == 3 and "no cross-fitting" in sel.info["fallback"]


def test_estimator_none_takes_the_prior_batch_without_a_table(make_context, for_strategy, faster_rcnn, tmp_path):
    """``estimator: none``: the prior's top-B (the head path's own prior batch), no head cache,
    no table, no policy; it needs only the mirrored pass, so it runs on any detector."""
    none = build_strategy("mgral", **{**HEAD, "estimator": "none"})
    assert none.detector_needs == frozenset({"augment"})
    sel = none.select(_context(make_context, for_strategy, faster_rcnn, tmp_path / "none", none), 4)
    prior = build_strategy("mgral", **{**HEAD, "policy_updates": 1, "safe_z": 1e9})
    prior_sel = prior.select(_context(make_context, for_strategy, faster_rcnn, tmp_path / "prior", prior), 4)
    assert sel.image_ids == prior_sel.image_ids and prior_sel.info["choice"]["batch"] == "prior"
    out = tmp_path / "none" / "cycle-0" / "mgral"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["estimator"] == "none" and summary["choice"]["batch"] == "prior"
    assert "estimator none" in summary["choice"]["reason"] and summary["table_rows"] == 0
    assert set(summary["seconds"]) == {"features"} and "head_cache" not in summary
    # the default (auto) is this path: the same batch, and no head cache asked of the detector
    auto = build_strategy("mgral", **{k: v for k, v in HEAD.items() if k != "estimator"})
    auto_sel = auto.select(_context(make_context, for_strategy, faster_rcnn, tmp_path / "auto", auto), 4)
    assert auto_sel.image_ids == sel.image_ids
    auto_summary = json.loads((tmp_path / "auto" / "cycle-0" / "mgral" / "summary.json").read_text())
    assert auto_summary["estimator"] == "none" and auto_summary["table_rows"] == 0
    assert not (out / "table.csv").exists() and not (out / "agent_rewards.csv").exists()
    tiny = TorchvisionDetector("tiny", faster_rcnn.categories, device="cpu", seed=0, pretrained=False)
    on_tiny = build_strategy("mgral", **{**HEAD, "estimator": "none"})
    assert len(on_tiny.select(_context(make_context, for_strategy, tiny, tmp_path / "tiny", on_tiny), 4).image_ids) == 4
    with pytest.raises(ConfigError, match="none estimates nothing"):
        build_strategy("mgral", estimator="none", reward_source="oracle")


def test_workload_follows_the_route():
    """Planning counts what the cycle will run: the head path's mirrored pass, head cache and
    (at most) its rows; ``none`` (and ``auto``) the mirrored pass only; the fine-tune table."""
    head = build_strategy("mgral", estimator="head")
    sizes = {"labeled": 15, "unlabeled": 300, "budget": 20}
    head_train, head_infer = head.workload(**sizes)
    assert head_infer == 2 * 80 + 15  # 4 x budget candidates mirrored and cached, the labeled set cached
    rows = 2 + 10 * 4
    assert head_train == pytest.approx(rows * 2 * 100 * 2 * 15 / 400)
    finetune = build_strategy("mgral", estimator="finetune").workload(**sizes)
    assert finetune[0] == 17 * 30 * 3 * 4  # M + 1 jobs x K steps x 3 batches of 4
    assert build_strategy("mgral").workload(**sizes) == build_strategy("mgral", estimator="none").workload(**sizes)
    assert build_strategy("mgral", estimator="none").workload(**sizes) == (0.0, 80.0)
    assert head.workload(**{**sizes, "labeled": 1}) == (0.0, 80.0)  # the prior fallback


@pytest.mark.parametrize(("se", "taken"), [(1e-4, "score:"), (1.0, "prior")])
def test_score_batches_are_rows_and_win_only_when_clearly_better(
    make_context, for_strategy, faster_rcnn, tmp_path, monkeypatch, se, taken
):
    """``score_batches``: each prior score's top-B is estimated too. With every candidate but the
    prior's own batch planted and a precise estimate, a single score's batch (more planted
    images than the prior's) replaces it; when the estimate is noise, the prior's batch stays."""
    params = {**HEAD, "policy_updates": 1, "patience": None, "policy_lr": 1e-6, "score_batches": True}
    prior = build_strategy("mgral", **{**params, "score_batches": False, "safe_z": 1e9})
    prior_sel = prior.select(_context(make_context, for_strategy, faster_rcnn, tmp_path / "prior", prior), 4)
    strategy = build_strategy("mgral", **params)
    ctx = _context(make_context, for_strategy, faster_rcnn, tmp_path, strategy)
    _planted(set(ctx.pool_ids) - set(prior_sel.image_ids), se, monkeypatch)
    sel = strategy.select(ctx, 4)
    choice, singles = sel.info["choice"], sel.info["score_batches"]
    assert set(singles) == {"least_confidence", "coreset_distance", "class_rarity", "inconsistency"}
    assert choice["batch"].startswith(taken)
    if taken == "prior":
        assert sel.image_ids == prior_sel.image_ids
    else:
        name = choice["batch"].removeprefix("score:")
        assert singles[name]["gain"] == max(v["gain"] for v in singles.values()) > 0
        assert set(sel.image_ids) != set(prior_sel.image_ids) and choice["diff"] > 2 * choice["se"]
    summary = json.loads((ctx.work_dir / "mgral" / "summary.json").read_text())
    assert summary["table_rows"] <= 2 + 1 * HEAD["policy_samples"] + 4
    sizes = {"labeled": 15, "unlabeled": 300, "budget": 20}
    more, fewer = (
        build_strategy("mgral", estimator="head", score_batches=flag).workload(**sizes)[0] for flag in (True, False)
    )
    assert more > fewer
    with pytest.raises(ConfigError, match="score_batches: expected true or false"):
        build_strategy("mgral", score_batches="yes")
