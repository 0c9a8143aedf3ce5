"""Estimator validity: does a label-free score rank batches as their true mAP gain does, across
datasets, seeds and cycles? (MGRAL issue 19, "Estimator validity".)

States: for each dataset (``benchmarks/configs/<name>.yaml``: same pool, initial set, budget,
detector, schedule, warm start), seed in ``SEEDS`` and cycle in ``CYCLES``, the random series
is replayed through the loop's own training (:func:`mgral.series.train_and_evaluate`, the
strategy ``random`` with the loop's selection generator), and the model trained in cycle ``c``
on its labeled set ``L`` is the state. Per state, the batches are ``RANDOM`` random batches of
the budget drawn from the unlabeled pool plus the batch each of ``STRATEGIES`` selects there
(the real strategies on the loop's selection context; ``mgral`` with its defaults).

Per batch ``B``:

- **truth**: the state's model fine-tuned on ``L + B`` with true labels minus the same
  fine-tune on ``L`` alone (warm start, half the cycle's schedule, training seed 0), test mAP.
  The first ``NOISE`` random batches and the control are fine-tuned again with seed 1: the
  seed noise of a truth, and the ceiling it puts on any correlation;
- **label-free estimate**: :class:`mgral.strategies.mgral.estimate.CrossFitGain` as MGRAL's
  head estimator runs it (its defaults: K = 3 folds, J = 2 labelings, 100 head steps; pool
  images cached without labels);
- **cheap scores**: the batch mean of MGRAL's prior over the pool (least confidence +
  core-set distance + class rarity, z-scores), of least confidence and of entropy.

Figures: per state and pooled, Spearman of each score against the truth over the state's
batches; pooled = the correlation of within-state ranks (each state's batches ranked apart,
so a state's level cannot make a correlation), with a 95% interval from resampling batches
within each state; the seed-noise ceiling; where each strategy's batch falls among the random
batches' truths; safety: MGRAL's head route (``estimator: head``) against its prior's batch
(the default's). Goals (issue 19): pooled Spearman >= 0.4 with the interval's lower end
above 0.2; the head route's batch at least as good as the prior's in >= 60% of states, never
worse by more than one standard error of the truth.

Everything is resumable: models and selections in ``runs/bench-mgral-validity/<name>/seed-<s>/``,
per-job results in its ``truth.json`` / ``estimates.json`` as they come. Fine-tunes of all
states run in ``--workers`` processes of one thread, states in order (cycle 1 of seed 0 of
every dataset first), so a stopped run reports the states it finished. Writes
``benchmarks/results/mgral_validity.{md,json}``.

    .venv/bin/python benchmarks/bench_mgral_validity.py [--only bccd] [--workers 2] [--truth-seeds 4] [--report-only]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
from scipy import stats

from mgral._io import atomic_write_json, atomic_write_text
from mgral._machine import machine_line

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "runs" / "bench-mgral-validity"  # scratch (git-ignored)
DATASETS = ("digits", "bccd", "pinochle")
SEEDS, CYCLES = (0, 1), (1, 3)
RANDOM, NOISE = 40, 4
STRATEGIES = {  # label: (strategy, params); mgral at its defaults (the prior's top batch), and its head route
    "least_confidence": ("least_confidence", {}),
    "cald": ("cald", {}),
    "core_set": ("core_set", {}),
    "mgral": ("mgral", {}),
    "mgral_head": ("mgral", {"estimator": "head"}),
}
SCORES = ("estimate", "prior", "least_confidence", "entropy")
RESAMPLES = 2000


# ---------------------------------------------------------------- statistics (tested)


def within_ranks(values) -> np.ndarray:
    """Ranks of ``values`` scaled to [-0.5, 0.5] (ties averaged): one state's batches on a common scale."""
    r = stats.rankdata(values)
    return (r - 1) / max(len(r) - 1, 1) - 0.5


def pooled_spearman(groups: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """Spearman pooled over states: the Pearson correlation of within-state ranks of score and
    truth. With one state it is that state's Spearman; states of equal size weigh equally, and
    no state's level (its mean gain) enters."""
    groups = [(np.asarray(a, float), np.asarray(b, float)) for a, b in groups if len(a) >= 3]
    if not groups:
        return float("nan")
    x = np.concatenate([within_ranks(a) for a, _ in groups])
    y = np.concatenate([within_ranks(b) for _, b in groups])
    if x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def pooled_interval(groups: list[tuple[np.ndarray, np.ndarray]], resamples: int = RESAMPLES, seed: int = 0) -> list:
    """95% percentile interval of :func:`pooled_spearman`, resampling batches within each state."""
    groups = [(np.asarray(a, float), np.asarray(b, float)) for a, b in groups if len(a) >= 3]
    if not groups:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(resamples):
        picks = [rng.integers(0, len(a), len(a)) for a, _ in groups]
        out.append(pooled_spearman([(a[k], b[k]) for (a, b), k in zip(groups, picks, strict=True)]))
    out = np.array(out)
    out = out[np.isfinite(out)]
    return [float(np.quantile(out, 0.025)), float(np.quantile(out, 0.975))] if len(out) else [float("nan")] * 2


def seed_noise(first: dict[str, float], second: dict[str, float]) -> float:
    """SD of one truth's seed noise: the gains of the same batches under two training seeds
    (each a batch's mAP minus its seed's control), SD of their differences / sqrt(2)."""
    keys = [k for k in first if k in second]
    if len(keys) < 2:
        return float("nan")
    d = np.array([first[k] - second[k] for k in keys])
    return float(d.std(ddof=1) / np.sqrt(2))


def ceiling(noise_sd: float, spread_sd: float) -> float:
    """The highest correlation any score can reach with a one-seed truth whose seed noise is
    ``noise_sd`` and whose spread across batches is ``spread_sd``: sqrt(1 - noise² / spread²)."""
    if not (np.isfinite(noise_sd) and np.isfinite(spread_sd)) or spread_sd <= 0:
        return float("nan")
    return float(np.sqrt(max(0.0, 1.0 - noise_sd**2 / spread_sd**2)))


def percentile_among(value: float, others) -> float:
    """Share of ``others`` below ``value`` (ties count half): where a batch's truth falls among the random batches'."""
    others = np.asarray(others, float)
    return float(((others < value).sum() + 0.5 * (others == value).sum()) / len(others))


# ---------------------------------------------------------------- states


def config(name: str, seed: int):
    from mgral.config import load_config

    return load_config(ROOT / "benchmarks" / "configs" / f"{name}.yaml", [f"seeds=[{seed}]"])


def experiment(name: str, seed: int):
    from mgral.loop import open_experiment
    from mgral.runs import RunDir

    return open_experiment(config(name, seed), RunDir(WORK / name / f"seed-{seed}"), log=lambda _: None, progress=False)


def states(name: str, seed: int, log) -> dict[int, dict]:
    """Replay the random series of ``seed`` up to the last of ``CYCLES`` (resumable: each cycle's
    model, evaluation and selection are kept in ``cycle-<c>/``); per cycle in ``CYCLES`` its
    labeled set, pool and model path."""
    from mgral.loop import initial_ids
    from mgral.runs import CycleDir
    from mgral.series import train_and_evaluate, visible_dataset
    from mgral.strategies import SelectionContext, build_strategy, selection_rng

    exp = experiment(name, seed)
    cfg = exp.config
    labeled = initial_ids(cfg, exp.dataset, exp.pool, seed)
    work = WORK / name / f"seed-{seed}"
    out, prev = {}, None
    for c in range(max(CYCLES) + 1):
        cdir = CycleDir(work / f"cycle-{c}")
        view = visible_dataset(exp.dataset, {i: exp.dataset[i].target for i in labeled})
        init = prev if (c > 0 and cfg.detector.warm_start) else None
        if not cdir.evaluation.exists():
            log(f"{name} seed {seed}: training cycle {c} on {len(labeled)} images")
        _, result = train_and_evaluate(exp, seed, c, cdir, view, labeled, {}, init=init)
        pool = [i for i in exp.pool if i not in set(labeled)]
        if c in CYCLES:
            out[c] = {"labeled": list(labeled), "pool": pool, "model": cdir.model, "mAP": result["mAP"]}
        if not cdir.selection.exists():
            context = SelectionContext(view, pool, list(labeled), selection_rng(seed, c), cycle=c)
            atomic_write_json(
                cdir.selection, {"image_ids": build_strategy("random").select(context, cfg.budget).image_ids}
            )
        labeled = labeled + json.loads(cdir.selection.read_text())["image_ids"]
        prev = cdir.model
    return out


def batches(name: str, seed: int, c: int, st: dict, log) -> dict:
    """The state's batches (``r<k>`` random, then each strategy's) and their cheap scores, kept
    in ``cycle-<c>/batches.json``; a strategy added to ``STRATEGIES`` later is selected then
    (the pool predictions are kept beside, in ``predictions.npz``). A batch equal to an
    earlier one is an alias of it (``aliases``): one truth, counted once in the correlations."""
    work = WORK / name / f"seed-{seed}" / f"cycle-{c}"
    path = work / "batches.json"
    out = json.loads(path.read_text()) if path.exists() else None
    if out is not None and all(s in out["batches"] for s in STRATEGIES):
        return out
    import torch

    from mgral.detectors import detector_class
    from mgral.detectors.cache import load_predictions, save_predictions
    from mgral.series import visible_dataset
    from mgral.strategies import SelectionContext, build_strategy, selection_rng
    from mgral.strategies.mgral.prior import pool_prior, pool_scores
    from mgral.strategies.uncertainty import uncertainty_scores

    torch.set_num_threads(1)
    exp = experiment(name, seed)
    cfg, labeled, pool = exp.config, st["labeled"], st["pool"]
    view = visible_dataset(exp.dataset, {i: exp.dataset[i].target for i in labeled})
    det = detector_class(cfg.detector.kind).load(st["model"], device="cpu")
    t0 = time.perf_counter()
    if (work / "predictions.npz").exists():
        preds = load_predictions(work / "predictions.npz")
    else:
        log(f"{name} seed {seed} cycle {c}: predicting {len(pool) + len(labeled)} images")
        preds = det.predict(view, pool + labeled)
        save_predictions(work / "predictions.npz", preds)
    if out is None:
        rng = np.random.default_rng([seed, c, 40])
        chosen = {
            f"r{k}": [pool[j] for j in sorted(rng.choice(len(pool), cfg.budget, replace=False))] for k in range(RANDOM)
        }
        out = {"labeled": len(labeled), "pool": len(pool), "batches": chosen, "select_s": {}, "state_mAP": st["mAP"]}
        out["predict_s"] = time.perf_counter() - t0
    chosen, info = out["batches"], out.setdefault("select_info", {})
    for s, (strategy_name, params) in STRATEGIES.items():
        if s in chosen:
            continue
        strategy = build_strategy(strategy_name, **params)
        context = SelectionContext(view, pool, list(labeled), selection_rng(seed, c), cycle=c)
        if "predictions" in strategy.requires:
            context.predictions = {i: preds[i] for i in pool}
        if "embeddings" in strategy.requires:
            context.embeddings = {i: preds[i].embedding for i in pool + labeled}
        if "detector" in strategy.requires:
            context.detector = det
        t0 = time.perf_counter()
        selection = strategy.select(context, cfg.budget)
        chosen[s] = list(selection.image_ids)
        out["select_s"][s] = time.perf_counter() - t0
        if "choice" in selection.info:
            info[s] = {"choice": selection.info["choice"]}
        log(f"{name} seed {seed} cycle {c}: {s} selected in {out['select_s'][s]:.0f} s")
    seen: dict[tuple, str] = {}
    out["aliases"] = {}
    for k, b in chosen.items():
        key = tuple(sorted(map(str, b)))
        if key in seen:
            out["aliases"][k] = seen[key]
        else:
            seen[key] = k
    prior = dict(
        zip(
            pool,
            pool_prior(
                pool_scores(
                    view, {i: preds[i] for i in pool}, {i: preds[i].embedding for i in pool + labeled}, pool, labeled
                )
            ),
            strict=True,
        )
    )
    out["scores"] = {
        "prior": {k: float(np.mean([prior[i] for i in b])) for k, b in chosen.items()},
        **{
            kind: {k: float(uncertainty_scores(preds, b, kind).mean()) for k, b in chosen.items()}
            for kind in ("least_confidence", "entropy")
        },
    }
    atomic_write_json(path, out, indent=1)
    return out


# ---------------------------------------------------------------- truth: full fine-tunes


def finetune_schedule(cfg) -> dict:
    """Half the cycle's schedule (warm-up scaled with it): the truth's fine-tune."""
    train = dict(cfg.detector.train)
    its = max(1, int(train.get("iterations", 60)) // 2)
    train["iterations"] = its
    if "warmup_iters" in train:
        train["warmup_iters"] = max(1, int(train["warmup_iters"]) // 2)
    return {**train, "progress": False}


def _finetune(args: tuple) -> dict:
    """One full fine-tune of a state's model on ``ids`` (true labels), scored on the test split."""
    import torch

    from mgral.detectors import detector_class

    name, seed, c, key, ids, train_seed = args
    torch.set_num_threads(1)
    exp = experiment(name, seed)
    det = detector_class(exp.config.detector.kind).load(
        WORK / name / f"seed-{seed}" / f"cycle-{c}" / "model.pt", device="cpu"
    )
    det.seed, det.train_overrides = train_seed, finetune_schedule(exp.config)
    c0 = time.process_time()
    det.fit(exp.dataset, ids)  # true labels: this benchmark is the oracle
    cpu_s = time.process_time() - c0
    result = det.evaluate(exp.dataset, exp.test)
    return {"key": key, "mAP": float(result.mAP), "train_cpu_s": cpu_s, "load": os.getloadavg()[0]}


def unique_keys(chosen: dict) -> list[str]:
    """The state's batches, each distinct batch once (an alias is measured as the batch it equals)."""
    aliases = chosen.get("aliases", {})
    return [k for k in chosen["batches"] if k not in aliases]


def truth_jobs(name: str, seed: int, c: int, st: dict, chosen: dict, done: dict, seeds: int = 1) -> list[tuple]:
    """The fine-tunes not yet in ``done``: the control and every batch with training seed 0,
    the control and the first ``NOISE`` random batches with seed 1 (the seed noise), and with
    ``seeds`` > 1 every batch with training seeds 1 .. seeds - 1 (``seed<s>:<batch>``): the
    truth is then the mean over the seeds, its noise divided by their square root."""
    keys = [("control", [], 0)] + [(k, chosen["batches"][k], 0) for k in unique_keys(chosen)]
    keys += [("seed1:control", [], 1)] + [(f"seed1:r{k}", chosen["batches"][f"r{k}"], 1) for k in range(NOISE)]
    for t in range(1, seeds):
        keys += [(f"seed{t}:control", [], t)] + [(f"seed{t}:{k}", chosen["batches"][k], t) for k in unique_keys(chosen)]
    keys = list({key: (key, b, t) for key, b, t in keys}.values())  # seed 1's noise batches once
    return [(name, seed, c, key, st["labeled"] + b, t) for key, b, t in keys if key not in done]


def truth_seeds(truth: dict, keys: list[str]) -> list[int]:
    """The training seeds whose control and every batch in ``keys`` are done (seed 0 first)."""
    out, t = [], 0
    while all(f"{p}{k}" in truth for k in ["control", *keys] for p in [f"seed{t}:" if t else ""]):
        out.append(t)
        t += 1
    return out


# ---------------------------------------------------------------- label-free estimates


def estimates(name: str, seed: int, c: int, st: dict, chosen: dict, log) -> dict:
    """MGRAL's head estimate of every batch (``estimates.json``); empty where the detector has no head cache."""
    import torch

    from mgral.detectors import detector_class
    from mgral.detectors.heads import cache_head_inputs, supports_head_cache
    from mgral.series import visible_dataset
    from mgral.strategies.mgral.estimate import CrossFitGain
    from mgral.strategies.mgral.settings import Head

    path = WORK / name / f"seed-{seed}" / f"cycle-{c}" / "estimates.json"
    done = json.loads(path.read_text()) if path.exists() else {}
    exp = experiment(name, seed)
    det = detector_class(exp.config.detector.kind).load(st["model"], device="cpu")
    if not supports_head_cache(det):
        done = {"unsupported": f"{name}: no head cache for {type(det.model).__name__} (Faster R-CNN only)"}
        atomic_write_json(path, done)
        return done
    todo = [k for k in unique_keys(chosen) if k not in done]
    if not todo:
        return done
    torch.set_num_threads(1)
    labeled = st["labeled"]
    view = visible_dataset(exp.dataset, {i: exp.dataset[i].target for i in labeled})
    images = list(dict.fromkeys(labeled + [i for b in chosen["batches"].values() for i in b]))
    cache = cache_head_inputs(
        det, view, images, labeled=labeled
    )  # pool images without labels, as the strategy caches them
    h = Head()
    est = CrossFitGain(
        det, cache, view, labeled, folds=min(h.folds, len(labeled)), labelings=h.labelings, seed=seed,
        resamples=h.resamples, train={"iterations": h.head_iterations},
    )  # fmt: skip
    for k in todo:
        c0 = time.process_time()
        e = est.estimate(chosen["batches"][k])
        done[k] = {"gain": float(e.gain), "se": float(e.se), "cpu_s": time.process_time() - c0}
        atomic_write_json(path, done, indent=1)
        log(f"{name} seed {seed} cycle {c}: {k} estimate {e.gain:+.4f} ± {e.se:.4f}")
    return done


# ---------------------------------------------------------------- figures


def state_figures(name: str, seed: int, c: int, chosen: dict, truth: dict, est: dict) -> dict | None:
    """One state's figures, or None while its truths are incomplete."""
    keys, aliases = unique_keys(chosen), chosen.get("aliases", {})
    seeds = truth_seeds(truth, keys)
    if not seeds:
        return None

    def one_seed(t: int) -> dict[str, float]:
        p = f"seed{t}:" if t else ""
        return {k: truth[p + aliases.get(k, k)]["mAP"] - truth[p + "control"]["mAP"] for k in chosen["batches"]}

    per_seed = [one_seed(t) for t in seeds]
    gain = {k: float(np.mean([g[k] for g in per_seed])) for k in chosen["batches"]}  # the truth: mean over seeds
    randoms = [f"r{k}" for k in range(RANDOM)]
    noise = float("nan")
    if len(seeds) > 1:  # every batch under two seeds: the noise of a one-seed truth, averaged down
        noise = seed_noise({k: per_seed[0][k] for k in keys}, {k: per_seed[1][k] for k in keys}) / np.sqrt(len(seeds))
    elif "seed1:control" in truth:
        second = {
            f"r{k}": truth[f"seed1:r{k}"]["mAP"] - truth["seed1:control"]["mAP"]
            for k in range(NOISE)
            if f"seed1:r{k}" in truth
        }
        noise = seed_noise({k: gain[k] for k in second}, second)
    spread = float(np.std([gain[k] for k in keys], ddof=1))
    score_values = {s: chosen["scores"][s] for s in ("prior", "least_confidence", "entropy")}
    if est and "unsupported" not in est and all(k in est for k in keys):
        score_values["estimate"] = {k: est[k]["gain"] for k in keys}
    truth_arr = np.array([gain[k] for k in keys])
    return {
        "dataset": name,
        "seed": seed,
        "cycle": c,
        "labeled": chosen["labeled"],
        "truth_seeds": len(seeds),
        "state_mAP": chosen["state_mAP"],
        "control_mAP": truth["control"]["mAP"],
        "gains": gain,
        "scores": {s: [v[k] for k in keys] for s, v in score_values.items()},
        "keys": keys,
        "spearman": {
            s: float(stats.spearmanr([v[k] for k in keys], truth_arr).statistic) for s, v in score_values.items()
        },
        "random_mean": float(np.mean([gain[k] for k in randoms])),
        "random_std": float(np.std([gain[k] for k in randoms], ddof=1)),
        "spread": spread,
        "seed_noise_sd": noise,
        "ceiling": ceiling(noise, spread),
        "strategies": {
            s: {"gain": gain[s], "percentile": percentile_among(gain[s], [gain[k] for k in randoms])}
            for s in STRATEGIES
        },
        "safety": safety(gain, chosen, noise),
        "estimate_note": est.get("unsupported") if est else None,
        "estimate_cpu_s": float(np.mean([v["cpu_s"] for v in est.values()]))
        if est and "unsupported" not in est
        else None,
        "finetune_cpu_s": float(np.mean([truth[k]["train_cpu_s"] for k in keys])),
    }


def safety(gain: dict, chosen: dict, noise_sd: float) -> dict | None:
    """MGRAL's head route against its prior's batch (the default's): which it took, and the
    difference of their truths in the truth's standard errors (a difference of two one-seed
    truths: sqrt(2) x the seed noise)."""
    if "mgral_head" not in gain or "mgral" not in gain:
        return None
    diff = gain["mgral_head"] - gain["mgral"]
    choice = chosen.get("select_info", {}).get("mgral_head", {}).get("choice", {})
    se = np.sqrt(2) * noise_sd
    return {
        "taken": choice.get("batch", "?"),
        "same_batch": chosen.get("aliases", {}).get("mgral_head") == "mgral",
        "difference": diff,
        "difference_se": float(se),
        "worse_by_more_than_one_se": bool(np.isfinite(se) and diff < -se),
    }


def pooled(rows: list[dict]) -> dict:
    out = {}
    for s in SCORES:
        groups = [
            (np.array(r["scores"][s]), np.array([r["gains"][k] for k in r["keys"]])) for r in rows if s in r["scores"]
        ]
        if groups:
            out[s] = {
                "states": len(groups),
                "spearman": pooled_spearman(groups),
                "ci95": pooled_interval(groups, resamples=RESAMPLES),
            }
    return out


def write(rows: list[dict], planned: list[tuple], loads: tuple) -> dict:
    result = {
        "machine": machine_line(gpu_used=False),
        "run": dt.datetime.now().isoformat(timespec="minutes"),
        "load_at_start": loads[0],
        "planned_states": [list(p) for p in planned],
        "states": rows,
        "pooled": pooled(rows),
        "pooled_by_dataset": {d: pooled([r for r in rows if r["dataset"] == d]) for d in DATASETS},
    }
    atomic_write_json(RESULTS / "mgral_validity.json", result, indent=1)
    f = lambda v: "–" if v is None or not np.isfinite(v) else f"{v:+.2f}"  # noqa: E731
    lines = [
        "# MGRAL estimator validity (`benchmarks/bench_mgral_validity.py`)",
        "",
        f"Machine: {result['machine']}. Run {result['run']}; load average at start {loads[0]:.2f}.",
        "",
        f"**States done: {len(rows)} of {len(planned)}** (dataset × seed {list(SEEDS)} × cycle {list(CYCLES)}; "
        "a state counts once every batch's truth is in).",
        "",
        f"Per state: the random series of the benchmark config replayed to cycle c (the loop's training); {RANDOM} "
        f"random batches of the budget plus the batches of {', '.join(STRATEGIES)} (mgral: the default, the "
        "prior's top batch; mgral_head: `estimator: head`). "
        "**Truth** = the state's model fine-tuned (warm start, half the cycle's schedule) on L + B with true "
        "labels minus on L, test mAP@[.5:.95]. **estimate** = MGRAL's label-free head estimate (CrossFitGain, "
        "K = 3, J = 2, 100 head steps). **prior** / **least_confidence** / **entropy** = the "
        "batch mean of that score of the state's model.",
        "",
        "## Pooled Spearman against the truth (goal for the estimate: ≥ 0.4, interval above 0.2)",
        "",
        "| score | states | pooled Spearman [95% interval] | " + " | ".join(DATASETS) + " |",
        "|---|---|---|" + "---|" * len(DATASETS),
    ]
    for s in SCORES:
        p = result["pooled"].get(s)
        if p is None:
            continue
        per = [result["pooled_by_dataset"][d].get(s) for d in DATASETS]
        lines.append(
            f"| {s} | {p['states']} | **{p['spearman']:+.2f}** [{p['ci95'][0]:+.2f}, {p['ci95'][1]:+.2f}] | "
            + " | ".join("–" if q is None else f"{q['spearman']:+.2f} ({q['states']})" for q in per)
            + " |"
        )
    lines += [
        "",
        "## Per state",
        "",
        "| dataset | seed | cycle | labeled | truth seeds | state mAP | control mAP | random gains mean ± std | "
        "seed noise SD; ceiling | " + " | ".join(f"Spearman {s}" for s in SCORES) + " | CPU s: fine-tune, estimate |",
        "|---|---|---|---|---|---|---|---|---|" + "---|" * (len(SCORES) + 1),
    ]
    for r in rows:
        est_cpu = "–" if r["estimate_cpu_s"] is None else f"{r['estimate_cpu_s']:.0f}"
        lines.append(
            f"| {r['dataset']} | {r['seed']} | {r['cycle']} | {r['labeled']} | {r.get('truth_seeds', 1)} | "
            f"{r['state_mAP']:.4f} | "
            f"{r['control_mAP']:.4f} | {r['random_mean']:+.4f} ± {r['random_std']:.4f} | "
            f"{r['seed_noise_sd']:.4f}; {r['ceiling']:.2f} | "
            + " | ".join(f(r["spearman"].get(s)) for s in SCORES)
            + f" | {r['finetune_cpu_s']:.0f}, {est_cpu} |"
        )
    lines += [
        "",
        "## The strategies' batches: truth (percentile among the random batches), and MGRAL's head route "
        "against its prior (safety)",
        "",
        "| dataset | seed | cycle | " + " | ".join(STRATEGIES) + " | head route took | head − prior (truth SE) |",
        "|---|---|---|" + "---|" * (len(STRATEGIES) + 2),
    ]
    for r in rows:
        sa = r.get("safety")
        took = "–" if sa is None else sa["taken"] + (" (same batch)" if sa["same_batch"] else "")
        diff = "–" if sa is None else f"{sa['difference']:+.4f} ({sa['difference_se']:.4f})"
        lines.append(
            f"| {r['dataset']} | {r['seed']} | {r['cycle']} | "
            + " | ".join(
                f"{r['strategies'][s]['gain']:+.4f} ({r['strategies'][s]['percentile']:.0%})" for s in STRATEGIES
            )
            + f" | {took} | {diff} |"
        )
    safe = [r["safety"] for r in rows if r.get("safety")]
    if safe:
        lines += [
            "",
            f"Safety (goal: the head route's batch at least as good as the prior's in ≥ 60% of states, never worse "
            f"by more than one truth SE): at least as good in {sum(x['difference'] >= 0 for x in safe)} of "
            f"{len(safe)} states ({sum(x['same_batch'] for x in safe)} the same batch); worse by more than one SE "
            f"in {sum(x['worse_by_more_than_one_se'] for x in safe)}.",
        ]
    notes = sorted({r["estimate_note"] for r in rows if r["estimate_note"]})
    lines += [
        "",
        "Pooled Spearman: the Pearson correlation of within-state ranks (each state's batches ranked apart, "
        f"scaled to [-0.5, 0.5]); interval: {RESAMPLES} resamples of batches within each state, percentile. "
        f"Truth seeds R: a state's truth is the mean gain over R training seeds. Seed noise: with R = 1, the "
        f"control and the first {NOISE} random batches fine-tuned again with training seed 1 (SD of the gains' "
        "differences / √2); with R > 1, that SD over every batch (seeds 0 and 1), divided by √R. Ceiling = "
        "√(1 − noise² / spread²), the spread over all of the state's batches: the highest correlation any score "
        "can reach with the truth. Percentile: the share of the state's random batches whose truth is below the "
        "strategy batch's.",
    ]
    lines += [f"Estimate not measured: {n}." for n in notes]
    atomic_write_text(RESULTS / "mgral_validity.md", "\n".join(lines) + "\n")
    return result


# ---------------------------------------------------------------- driver


def log(msg: str) -> None:
    print(f"[{dt.datetime.now():%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


def _estimates_job(args: tuple) -> dict:
    """:func:`estimates` in a worker (one thread), beside the state's fine-tunes."""
    return estimates(*args, log)


def measure(n: str, s: int, c: int, st: dict, chosen: dict, workers: int, seeds: int = 1) -> tuple[dict, dict]:
    """The state's missing truths and label-free estimates, in ``workers`` processes: the
    estimates (one job, kept as they come) start first, beside the fine-tunes."""
    work = WORK / n / f"seed-{s}" / f"cycle-{c}"
    path, epath = work / "truth.json", work / "estimates.json"
    truth = json.loads(path.read_text()) if path.exists() else {}
    est = json.loads(epath.read_text()) if epath.exists() else {}
    with ProcessPoolExecutor(workers) as pool:
        futures = {}
        if "unsupported" not in est and any(k not in est for k in unique_keys(chosen)):
            futures[pool.submit(_estimates_job, (n, s, c, st, chosen))] = "estimates"
        futures.update({pool.submit(_finetune, j): "truth" for j in truth_jobs(n, s, c, st, chosen, truth, seeds)})
        for fut in as_completed(futures):
            r = fut.result()
            if futures[fut] == "estimates":
                est = r
                continue
            truth[r["key"]] = r
            atomic_write_json(path, truth, indent=1)
            log(f"{n} seed {s} cycle {c}: {r['key']} mAP {r['mAP']:.4f} ({r['train_cpu_s']:.0f} CPU s)")
    return truth, est


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=DATASETS, action="append")
    p.add_argument("--workers", type=int, default=2, help="processes (one thread each): fine-tunes and estimates")
    p.add_argument("--report-only", action="store_true", help="write the figures of what is done")
    p.add_argument(
        "--truth-seeds", type=int, default=1, help="training seeds per truth (the mean; its noise falls as 1/sqrt)"
    )
    args = p.parse_args(argv)

    loads = os.getloadavg()
    names = args.only or list(DATASETS)
    planned = [(n, s, c) for s in SEEDS for c in CYCLES for n in names]  # breadth first: cycle 1 of seed 0 everywhere
    found: dict[tuple, tuple] = {}
    try:
        for n, s, c in planned:
            work = WORK / n / f"seed-{s}" / f"cycle-{c}"
            if args.report_only:
                if (work / "batches.json").exists():
                    chosen = json.loads((work / "batches.json").read_text())
                    truth, est = ({}, {})
                    for name, target in (("truth.json", 0), ("estimates.json", 1)):
                        if (work / name).exists():
                            (truth, est)[target].update(json.loads((work / name).read_text()))
                    found[(n, s, c)] = (chosen, truth, est)
                continue
            st = states(n, s, log)[c]
            chosen = batches(n, s, c, st, log)
            found[(n, s, c)] = (chosen, *measure(n, s, c, st, chosen, args.workers, args.truth_seeds))
            write([x for k, v in found.items() if (x := state_figures(*k, *v)) is not None], planned, loads)
    except KeyboardInterrupt:
        log("stopped: the figures cover the states finished so far")
    rows = [x for k, v in found.items() if (x := state_figures(*k, *v)) is not None]
    result = write(rows, planned, loads)
    for s, v in result["pooled"].items():
        log(
            f"pooled Spearman {s}: {v['spearman']:+.2f} [{v['ci95'][0]:+.2f}, {v['ci95'][1]:+.2f}] "
            f"over {v['states']} states"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
