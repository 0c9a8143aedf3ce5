"""MGRAL on a real (tiny) detector: the surrogate is label-free, the cycle writes its
diagnostics, ablation flags work, and a 2-cycle run end to end through the loop."""

from __future__ import annotations

import csv
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from mgral.data.records import Dataset
from mgral.errors import ConfigError
from mgral.runs import REWARD_WINDOW
from mgral.strategies import build_strategy
from mgral.strategies.mgral.surrogate import (
    SurrogateJob,
    SurrogateShared,
    job_device,
    ramp_weight,
    run_surrogate,
)

MICRO = {
    "estimator": "finetune",
    "combinations": 3,
    "steps": 2,
    "surrogate_batch": 2,
    "updates": 10,
    "samples": 4,
    "hidden": 16,
    "chunk": 8,
    "orders": 2,
    "pca_components": 2,
}


class Poisoned:
    """A target nobody may read: any use fails the test."""

    def __getattr__(self, name):
        raise AssertionError(f"a pool image's label was read ({name})")

    def __len__(self):
        raise AssertionError("a pool image's label was read (len)")


def _context(make_context, for_strategy, strategy, tmp_path, **options):
    ctx = for_strategy(make_context(**options), strategy)
    ctx.work_dir = tmp_path / "cycle-0"
    ctx.work_dir.mkdir(parents=True, exist_ok=True)
    return ctx


def test_ramp_is_gaussian_and_reaches_the_weight():
    assert ramp_weight(0, 40, 2.0, 0.25) == pytest.approx(2.0 * np.exp(-5))
    assert ramp_weight(5, 40, 2.0, 0.25) == pytest.approx(2.0 * np.exp(-5 * 0.25))
    assert ramp_weight(10, 40, 2.0, 0.25) == 2.0 == ramp_weight(39, 40, 2.0, 0.25)


@pytest.mark.parametrize("preset", ["tiny", "mobilenet_v2_fpn"])
def test_flip_consistency_has_gradient_and_names_its_head(preset):
    from mgral.data.records import Category
    from mgral.detectors.torchvision_detector import TorchvisionDetector

    det = TorchvisionDetector(preset, [Category(1, "a"), Category(2, "b")], device="cpu", pretrained=False)
    det.model.train()
    images = [torch.rand(3, 64, 80), torch.rand(3, 64, 80)]
    loss, head = det.consistency_loss(images)
    assert head == {"tiny": "FCOS", "mobilenet_v2_fpn": "FasterRCNN-RPN"}[preset]
    assert float(loss.detach()) > 0
    loss.backward()
    grads = [p.grad for p in det.model.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)


def test_mirror_alignment_is_the_closest_one():
    """Column j (anchor centre j * s) meets column W_l - j of the flipped input's map. With
    every conv kernel mirror-symmetric and a smooth mirror-symmetric image, the class maps
    agree far better under that alignment (1 px off: strided convs are not exactly
    flip-equivariant) than under the naive W_l - 1 - j (s - 1 px off)."""
    from mgral.data.records import Category
    from mgral.detectors.consistency import _levels, _mirror
    from mgral.detectors.torchvision_detector import TorchvisionDetector

    det = TorchvisionDetector("tiny", [Category(1, "a")], device="cpu", pretrained=False)
    model = det.model.eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.copy_((m.weight + m.weight.flip(-1)) / 2)
        coarse = torch.rand(1, 3, 16, 8, generator=torch.Generator().manual_seed(0))
        half = torch.nn.functional.interpolate(coarse, size=(128, 64), mode="bicubic", align_corners=False)[0]
        x = model.transform([torch.cat([half, half.flip(-1)], dim=-1)])[0].tensors
        maps = list(model.backbone(torch.cat([x, x.flip(-1)])).values())
        logits = model.head(maps)["cls_logits"]
        level = _levels(logits, [(m.shape[-2], m.shape[-1]) for m in maps])[0]
        orig, flipped = level[:1, ..., 1:], level[1:]
        ours = float(((orig - _mirror(flipped)) ** 2).mean())
        naive = float(((orig - flipped.flip(-1)[..., 1:]) ** 2).mean())
    assert ours < 0.3 * naive


def test_surrogate_uses_the_unlabeled_images_and_never_reads_their_labels(make_context, for_strategy, tmp_path):
    strategy = build_strategy("mgral", **MICRO)
    ctx = _context(make_context, for_strategy, strategy, tmp_path)
    pool = set(ctx.pool_ids)
    # the pool images' labels are poison: the strategy (and every job it runs) must not touch them
    ctx.dataset = Dataset(
        ctx.dataset.root,
        ctx.dataset.categories,
        [replace(r, target=Poisoned()) if r.id in pool else r for r in ctx.dataset],
    )
    ctx.oracle_dataset = None
    sel = strategy.select(ctx, 5)
    assert len(sel.image_ids) == 5
    table = json.loads((ctx.work_dir / "mgral" / "table.json").read_text())
    control, rows = table[0], table[1:]
    assert control["combination"] == "control" and control["loss_pseudo"] == 0 and control["loss_cons"] == 0
    assert len(rows) == MICRO["combinations"]
    for row in rows:
        assert set(row["combination"]) <= pool
        assert row["loss_cons"] > 0  # the unsupervised term is really there
        assert row["consistency"] == "FCOS"
        assert row["device"] == "cpu"  # jobs.device: auto follows the task detector
        assert row["dmAP"] == pytest.approx(row["mAP"] - control["mAP"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of a process that sees no GPU")
def test_the_jobs_run_where_the_experiments_jobs_section_places_them(make_context, for_strategy, tmp_path):
    """The cycle reads its jobs' placement from the context (the experiment's ``jobs``), not
    from a strategy parameter: a GPU asked for explicitly on a machine without one is refused."""
    from mgral.executors import JobPlacement

    strategy = build_strategy("mgral", **MICRO)
    ctx = _context(make_context, for_strategy, strategy, tmp_path)
    ctx.jobs = JobPlacement(device="cuda")
    with pytest.raises(ConfigError, match="surrogate device 'cuda' requested but this job's process sees no GPU"):
        strategy.select(ctx, 5)


def test_same_labeled_batches_in_every_job_so_the_control_is_a_control(make_context, for_strategy, tmp_path):
    """Two jobs with the same (empty) extra set give identical results: the only difference
    between table rows is the combination."""
    strategy = build_strategy("mgral", **MICRO)
    ctx = _context(make_context, for_strategy, strategy, tmp_path)
    shared = SurrogateShared(
        ctx.detector.to_bytes(), ctx.dataset, ctx.labeled_ids[:7], ctx.labeled_ids[7:], {"lr": 1e-3}, 2, 2, seed=3
    )
    a, b = run_surrogate(SurrogateJob("control"), shared), run_surrogate(SurrogateJob("m0"), shared)
    assert a["mAP"] == b["mAP"] and a["loss_sup"] == b["loss_sup"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback of a process that sees no GPU")
def test_surrogate_device_falls_back_to_the_cpu_only_when_auto():
    shared = SurrogateShared(b"", None, [], [], {}, 1, 1, device="cuda:1", device_fallback=True)
    assert job_device(shared) == torch.device("cpu")
    with pytest.raises(ConfigError, match="surrogate device 'cuda:1' requested but this job's process sees no GPU"):
        job_device(replace(shared, device_fallback=False))
    assert job_device(replace(shared, device="cpu", device_fallback=False)) == torch.device("cpu")


def test_cycle_writes_its_diagnostics(make_context, for_strategy, tmp_path):
    strategy = build_strategy("mgral", **MICRO)
    ctx = _context(make_context, for_strategy, strategy, tmp_path)
    sel = strategy.select(ctx, 4)
    out = ctx.work_dir / "mgral"
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["seconds"]) == {"features", "table", "reward_model", "agent", "selection"}
    assert summary["table_rows"] == MICRO["combinations"]
    assert summary["diversity"]["mean_pairwise_distance"] > 0
    assert set(summary["diversity"]["class_histogram"]) == {"class0", "class1", "class2"}
    with open(out / "agent_rewards.csv") as f:
        curve = list(csv.DictReader(f))
    assert [int(r["update"]) for r in curve] == list(range(MICRO["updates"]))
    # summary.json's reward ends are the report's: running means over the same window at both ends
    rewards = np.array([float(r["reward_mean"]) for r in curve])
    w = min(REWARD_WINDOW, max(1, len(rewards) // 2))
    assert summary["reward"]["first"] == pytest.approx(rewards[:w].mean())
    assert summary["reward"]["last"] == pytest.approx(rewards[-w:].mean())
    with open(out / "table.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0][:4] == ["cycle", "combination", "dmAP", "mAP"] and rows[0][4:] == [
        "AP[class0]",
        "AP[class1]",
        "AP[class2]",
    ]
    assert rows[1][1] == "control" and len(rows) == MICRO["combinations"] + 2
    assert json.loads((out / "reward_model.json").read_text())["current_rows"] == MICRO["combinations"]
    assert sel.info["seconds"] == summary["seconds"]
    # a re-run (a crash after the table) reuses the saved jobs and selects the same batch
    jobs = sorted(p.name for p in (out / "jobs").iterdir())
    assert jobs == ["control.json", "m0.json", "m1.json", "m2.json"]
    again = build_strategy("mgral", **MICRO).select(_context(make_context, for_strategy, strategy, tmp_path), 4)
    assert again.image_ids == sel.image_ids


def test_features_table_and_agent_show_bars_when_the_context_asks(make_context, for_strategy, tmp_path, capsys):
    strategy = build_strategy("mgral", **MICRO)
    ctx = _context(make_context, for_strategy, strategy, tmp_path)
    ctx.progress = True
    strategy.select(ctx, 4)
    err = capsys.readouterr().err  # not a terminal here: timestamped lines
    assert "MGRAL mirrored: " in err
    assert f"MGRAL table: {MICRO['combinations'] + 1}/{MICRO['combinations'] + 1} (100%)" in err
    assert f"MGRAL agent: {MICRO['updates']}/{MICRO['updates']} (100%)" in err and ", reward " in err


@pytest.mark.parametrize(
    "params",
    [
        {"optimizer": "greedy"},
        {"optimizer": "credits"},
        {"sampling": "bernoulli"},
        {"cluster_term": False},
        {"reward_source": "labeled_simulation"},
        {"reward_source": "oracle"},
    ],
)
def test_ablation_flags_run(make_context, for_strategy, tmp_path, params):
    strategy = build_strategy("mgral", **{**MICRO, **params})
    ctx = _context(make_context, for_strategy, strategy, tmp_path, num_labeled=12)
    if params.get("reward_source") == "oracle":
        assert "oracle" in strategy.requires and ctx.oracle_dataset is not None
    sel = strategy.select(ctx, 4)
    assert len(set(sel.image_ids)) == 4 and set(sel.image_ids) <= set(ctx.pool_ids)
    if params.get("optimizer") == "greedy":
        assert sel.scores == sorted(sel.scores, reverse=True)  # greedy marginal gains never grow
    if params.get("cluster_term") is False:
        assert json.loads((ctx.work_dir / "mgral" / "reward_model.json").read_text())["cluster_coef"] == 0


def test_labeled_set_too_small_falls_back_and_says_so(make_context, for_strategy, tmp_path):
    strategy = build_strategy("mgral", **MICRO)
    ctx = _context(make_context, for_strategy, strategy, tmp_path, num_labeled=1)
    sel = strategy.select(ctx, 3)
    assert len(sel.image_ids) == 3 and "no reward set" in sel.info["fallback"]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"combinations": 0}, "combinations: expected a positive integer"),
        ({"reward_fraction": 1.5}, r"reward_fraction: expected a fraction in \(0, 1\)"),
        ({"reward_source": "magic"}, "reward_source: expected one of surrogate, labeled_simulation, oracle"),
        ({"executor": "process"}, "parameters moved out of its params.*executor -> jobs.executor"),
        ({"job_gpus": 1, "device": "cuda"}, "device -> jobs.device; job_gpus -> jobs.gpus"),
    ],
)
def test_bad_parameters_are_refused_clearly(params, message):
    with pytest.raises(ConfigError, match=message):
        build_strategy("mgral", **params)


def test_the_flat_parameters_are_grouped_by_stage_each_declared_once():
    """Every parameter belongs to exactly one settings group, which holds its default; the
    strategy's signature (what build_strategy accepts and lists) is theirs."""
    from dataclasses import fields

    from mgral.strategies import STRATEGIES, strategy_parameters
    from mgral.strategies.mgral import settings

    names = [f.name for cls in settings.GROUPS for f in fields(cls)]
    assert len(names) == len(set(names))
    params = strategy_parameters(STRATEGIES.get("mgral"))
    assert list(params) == names
    assert all(params[f.name].default == f.default for cls in settings.GROUPS for f in fields(cls))
    m = build_strategy("mgral", combinations=3, pca_components=0, updates=7, folds=4)
    assert (m.table.combinations, m.reward.pca_components, m.agent.updates, m.head.folds) == (3, 0, 7, 4)
    assert m.table.steps == settings.Table().steps and m.head.estimator == "auto"
    with pytest.raises(ConfigError, match="mgral has no parameter 'nope'"):
        settings.groups({"nope": 1})


def test_split_labeled_holds_out_one_image_per_class_first_then_at_random(tmp_path):
    from mgral.data.records import Category, ImageRecord, Target
    from mgral.strategies.mgral.strategy import split_labeled

    def record(i, labels):
        boxes = np.tile(np.array([[0, 0, 4, 4]], np.float32), (len(labels), 1))
        return ImageRecord(i, f"{i}.png", 8, 8, "train", Target(boxes, np.array(labels, np.int64)))

    # 40 images of class 1, one of class 2, one of class 3: a 10% hold-out of 4 images
    classes = [[1]] * 40 + [[2], [3]]
    ds = Dataset(
        tmp_path, [Category(1, "a"), Category(2, "b"), Category(3, "c")], [record(i, c) for i, c in enumerate(classes)]
    )
    labeled = list(range(42))
    for seed in range(5):
        fit, held = split_labeled(ds, labeled, 0.1, np.random.default_rng(seed))
        assert len(held) == 4 and sorted(fit + held) == labeled and not set(fit) & set(held)
        assert {40, 41} <= set(held)  # each rare class is covered by the reward set
        assert fit == [i for i in labeled if i in set(fit)]  # order kept
        assert (fit, held) == split_labeled(ds, labeled, 0.1, np.random.default_rng(seed))
    assert split_labeled(ds, [7], 0.5, np.random.default_rng(0)) == ([7], [])
