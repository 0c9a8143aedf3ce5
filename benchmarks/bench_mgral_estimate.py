"""Does MGRAL's label-free gain estimate track the truth? (issue 19, steps 3 and 4, measured.)

On the AL state and the random batches of ``bench_head_fidelity.py`` (same seeds, same task
detector and head cache, in ``runs/bench-head-fidelity/<dataset>/``; built here if absent), per
batch ``B``:

(a) **head gain, true labels**: the box predictor fine-tuned on ``L + B`` minus on ``L``, scored
    on the test split (``mgral_head_fidelity.json``'s "default, seed 0" gains; the control and
    the first batch are recomputed here and must agree);
(b) **label-free estimate** (:class:`mgral.strategies.mgral.estimate.CrossFitGain`): ``J`` = 8
    labelings of ``B`` sampled from the task detector's predictions, ``K`` = 3 folds of ``L``,
    scored on ``L`` by heads that never trained on the scored image; ``J`` = 2 is the mean of
    the first two of the same labelings;
(c) its bootstrap standard error over the images of ``L``;
(d) the same cross-fitted gain with ``B``'s true labels (``J`` = 1): what the estimate would be
    with perfect labels, which separates the reward set's noise from the label sampling's.

Figures: Spearman (95% bootstrap interval over batches) of (b) against (a) and against the
published full fine-tune gains; the same for (d) and for the baselines (batch mean of the
per-image entropy / least confidence of the task detector's predictions); the noise ratio
(median SE / standard deviation of the estimate across batches; goal <= 1/3); CPU seconds per
estimate row. Writes ``benchmarks/results/mgral_estimate.{md,json}``; per-batch results are
kept in ``runs/bench-head-fidelity/<dataset>/estimate.json`` as they come (resumable).

    .venv/bin/python benchmarks/bench_mgral_estimate.py [--only bccd] [--workers 2]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

import numpy as np

from mgral._io import atomic_write_json, atomic_write_text
from mgral._machine import machine_line

sys.path.insert(0, os.path.dirname(__file__))
from bench_head_fidelity import (  # noqa: E402
    RESULTS,
    SETUPS,
    WORK,
    head_cache,
    interval,
    load,
    rho,
    state,
    task_detector,
)

BATCHES, FOLDS, LABELINGS, SEED, RESAMPLES = 30, 3, 8, 0, 200
VARIANTS = {  # cheaper settings (the cost remedies): folds K, labelings J (the default's first J), head steps
    "K=3, J=2, 30 steps": (3, 2, 30),
    "K=2, J=1, 30 steps": (2, 1, 30),
}
_worker: dict = {}


def _init(name: str) -> None:
    """One estimator per worker process (one thread, as the fidelity bench's head rows ran)."""
    import torch

    from mgral.strategies.mgral.estimate import CrossFitGain

    torch.set_num_threads(1)
    dataset, labeled, batches, _ = state(name, BATCHES)
    det, cache = head_cache(name, BATCHES, print)
    est = CrossFitGain(det, cache, dataset, labeled, folds=FOLDS, labelings=LABELINGS, seed=SEED, resamples=RESAMPLES)
    c0 = time.process_time()
    est.control_mAP  # noqa: B018 (fits the control heads, timed apart from the rows)
    _worker.update(est=est, cache=cache, batches=batches, control_cpu_s=time.process_time() - c0)
    for label, (folds, labelings, steps) in VARIANTS.items():
        v = CrossFitGain(
            det,
            cache,
            dataset,
            labeled,
            folds=folds,
            labelings=labelings,
            seed=SEED,
            resamples=RESAMPLES,
            train={"iterations": steps},
        )
        c0 = time.process_time()
        v.control_mAP  # noqa: B018
        _worker[f"v:{label}"] = (v, time.process_time() - c0)


PARTS = {
    "j0-1": range(0, 2),
    "oracle": None,
    **{f"v:{label}": "variant" for label in VARIANTS},
    "j2-7": range(2, LABELINGS),
}
"""One job per (batch, part): every batch's J = 2 and oracle parts run before any J = 8 remainder."""


def _part(k: int, part: str) -> dict:
    """Batch ``k``'s gains under some of its sampled labelings (or its true labels), with their
    resampled gains: parts of one batch combine into the J = 2 and J = 8 estimates."""
    est, cache, batch = _worker["est"], _worker["cache"], _worker["batches"][k]
    js = PARTS[part]
    control_cpu_s = _worker["control_cpu_s"]
    c0 = time.process_time()
    if js == "variant":
        est, control_cpu_s = _worker[part]
        e = est.estimate(batch)
        js = range(est.labelings)
    elif js is None:
        e = est.gain([{i: cache[i] for i in batch}])
    else:
        e = est.gain([{i: est.labeling(i, j) for i in batch} for j in js])
    return {
        "key": f"b{k}/{part}",
        "control_mAP": e.control_mAP,
        "gains": list(e.gains),
        "resampled": e.resampled.tolist(),
        "labels_sampled": [] if js is None else [len(est.labeling(i, j).gt_boxes) for j in js for i in batch],
        "cpu_s": time.process_time() - c0,
        "control_cpu_s": control_cpu_s,
        "load": os.getloadavg()[0],
    }


def rows(name: str, workers: int, log) -> dict:
    """Per batch: gain and SE of J = 2, J = 8 (where its remainder is done) and the oracle."""
    path = WORK / name / "estimate.json"
    done = json.loads(path.read_text()) if path.exists() else {}
    with ProcessPoolExecutor(1) as pool:
        task_detector(name, pool, log)
    head_cache(name, BATCHES, log)  # built once here, read by the workers
    todo = [(k, part) for part in PARTS for k in range(BATCHES) if f"b{k}/{part}" not in done]
    with ProcessPoolExecutor(workers, initializer=_init, initargs=(name,)) as pool:
        try:
            for fut in as_completed([pool.submit(_part, k, part) for k, part in todo]):
                r = fut.result()
                done[r["key"]] = r
                atomic_write_json(path, done)
                log(f"{name}: {r['key']}: gains {np.round(r['gains'], 4).tolist()} ({r['cpu_s']:.0f} CPU s)")
        except KeyboardInterrupt:  # stop early: the figures use what is done
            pool.shutdown(cancel_futures=True)

    def combined(parts):
        gains = [g for p in parts for g in p["gains"]]
        resampled = np.concatenate([np.array(p["resampled"]) for p in parts]).mean(axis=0)
        return float(np.mean(gains)), float(np.nanstd(resampled, ddof=1)), sum(p["cpu_s"] for p in parts), resampled

    out = {}
    for k in range(BATCHES):
        parts = {part: done.get(f"b{k}/{part}") for part in PARTS}
        if parts["j0-1"] is None or parts["oracle"] is None:
            continue
        r = out[k] = {"control_mAP": parts["j0-1"]["control_mAP"], "labels_sampled": parts["j0-1"]["labels_sampled"]}
        r["J2"], r["se2"], r["cpu_s_J2"], r["resampled_J2"] = combined([parts["j0-1"]])
        r["oracle"], r["se_oracle"], r["cpu_s_J1"], r["resampled_oracle"] = combined([parts["oracle"]])
        for label in VARIANTS:
            if parts[f"v:{label}"] is not None:
                v = parts[f"v:{label}"]
                r[f"v:{label}"], r[f"se_v:{label}"], r[f"cpu_s_v:{label}"], r[f"resampled_v:{label}"] = combined([v])
                r[f"control_cpu_s_v:{label}"] = v["control_cpu_s"]
        if parts["j2-7"] is not None:
            r["J8"], r["se8"], r["cpu_s_J8"], r["resampled_J8"] = combined([parts["j0-1"], parts["j2-7"]])
        r["control_cpu_s"], r["load"] = parts["j0-1"]["control_cpu_s"], parts["j0-1"]["load"]
    return out


def truth_check(name: str, published: dict) -> dict:
    """Recompute the true-label head gain of batch 0 (and the control) and compare with the published one."""
    import torch

    from mgral.detectors.heads import evaluate_head, finetune_head

    torch.set_num_threads(1)
    dataset, labeled, batches, test = state(name, BATCHES)
    det, cache = head_cache(name, BATCHES, print)
    maps = [
        float(evaluate_head(det, cache, dataset, test, predictor=finetune_head(det, cache, ids, seed=0)[0]).mAP)
        for ids in (labeled, labeled + batches[0])
    ]
    v = published["heads"]["default, seed 0"]
    return {
        "control_mAP": maps[0],
        "published_control_mAP": v["control_mAP"],
        "b0_gain": maps[1] - maps[0],
        "published_b0_gain": v["gains"][0],
    }


def uncertainty_baselines(name: str) -> dict:
    """Batch mean of the per-image entropy / least confidence (max over boxes, the strategies'
    default) of the task detector's own predictions (from the cache, zero steps)."""
    from mgral.detectors.heads import predict_from_cache
    from mgral.strategies.mgral.prior import pool_prior, pool_scores
    from mgral.strategies.uncertainty import uncertainty_scores

    dataset, labeled, batches, _ = state(name, BATCHES)
    det, cache = head_cache(name, BATCHES, print)
    out = {}
    # the head estimator's prior over the pool (standardised over it; no flip inconsistency here)
    _, pool, _ = load(name)
    pool = [i for i in pool if i not in set(labeled)]
    preds = predict_from_cache(det, cache, [i for i in pool if i in cache])
    preds.update(det.predict(dataset, [i for i in pool if i not in cache]))
    embeddings = det.embed(dataset, pool + labeled)
    prior = dict(zip(pool, pool_prior(pool_scores(dataset, preds, embeddings, pool, labeled)), strict=True))
    out["prior"] = [float(np.mean([prior[i] for i in b])) for b in batches]
    for kind in ("entropy", "least_confidence"):
        out[kind] = []
        for b in batches:
            preds = predict_from_cache(det, cache, b)
            out[kind].append(float(uncertainty_scores(preds, b, kind).mean()))
    return out


def figures(name: str, done: dict, published: dict, check: dict, baselines: dict) -> dict:
    """Spearman of each series against the truths over the batches it covers; noise; cost."""
    head_all = published["heads"]["default, seed 0"]["gains"]
    keys = sorted(done)
    with8 = [k for k in keys if "J8" in done[k]]
    series = {  # label: (batches, values, standard errors)
        "label-free, J=2": (keys, "J2", "se2"),
        "label-free, J=8": (with8, "J8", "se8"),
        "cross-fitted, true labels (J=1)": (keys, "oracle", "se_oracle"),
        **{
            f"label-free, {label}": ([k for k in keys if f"v:{label}" in done[k]], f"v:{label}", f"se_v:{label}")
            for label in VARIANTS
        },
        "batch mean prior (least confidence + core-set distance + class rarity)": (keys, "prior", None),
        "batch mean entropy": (keys, "entropy", None),
        "batch mean least confidence": (keys, "least_confidence", None),
    }
    out = {}
    for label, (ks, field, se_field) in series.items():
        if len(ks) < 3:
            continue
        x = np.array([done[k][field] if field in done[k] else baselines[field][k] for k in ks])
        head = np.array([head_all[k] for k in ks])
        full = np.array([published["full_gains"][k] for k in ks])
        v = out[label] = {
            "batches": ks,
            "values": x.tolist(),
            "mean": float(x.mean()),
            "std": float(x.std(ddof=1)),
            "vs_head_true": rho(x, head),
            "vs_head_true_ci95": interval(x, head),
            "vs_full": rho(x, full),
            "vs_full_ci95": interval(x, full),
        }
        if se_field is not None:
            se = np.array([done[k][se_field] for k in ks])
            v.update(ses=se.tolist(), median_se=float(np.median(se)), noise_ratio=float(np.median(se) / x.std(ddof=1)))
            # batches share the bootstrap resamples: the SE of a difference between two batches
            res = np.array([done[k][f"resampled_{field}"] for k in ks])
            paired = [np.nanstd(res[a] - res[b], ddof=1) for a in range(len(ks)) for b in range(a + 1, len(ks))]
            v.update(
                median_paired_se=float(np.median(paired)),
                paired_noise_ratio=float(np.median(paired) / (np.sqrt(2) * x.std(ddof=1))),
            )
    rows_ = [done[k] for k in keys]
    head = np.array([head_all[k] for k in keys])
    return {
        "dataset": name,
        "batches": len(keys),
        "batches_J8": len(with8),
        "folds": FOLDS,
        "labelings": LABELINGS,
        "seed": SEED,
        "resamples": RESAMPLES,
        "labeled": published["initial"],
        "budget": published["budget"],
        "task_mAP": published["task_mAP"],
        "control_mAP_crossfit": rows_[0]["control_mAP"],
        "truth_check": check,
        "head_true_vs_full": rho(head, np.array([published["full_gains"][k] for k in keys])),
        "series": out,
        "mean_labels_per_image_sampled": float(np.mean([n for r in rows_ for n in r["labels_sampled"]])),
        "cpu_s_row": {
            f"J={j}": float(np.mean([r[f"cpu_s_J{j}"] for r in rows_ if f"cpu_s_J{j}" in r])) for j in (1, 2, 8)
        },
        "cpu_s_control": float(np.mean([r["control_cpu_s"] for r in rows_])),
        "variants": {
            label: {
                "folds": VARIANTS[label][0],
                "labelings": VARIANTS[label][1],
                "head_iterations": VARIANTS[label][2],
                "cpu_s_row": float(np.mean([r[f"cpu_s_v:{label}"] for r in rows_ if f"cpu_s_v:{label}" in r])),
                "cpu_s_control": float(
                    np.mean([r[f"control_cpu_s_v:{label}"] for r in rows_ if f"control_cpu_s_v:{label}" in r])
                ),
            }
            for label in VARIANTS
            if any(f"cpu_s_v:{label}" in r for r in rows_)
        },
        "load": float(np.mean([r["load"] for r in rows_])),
    }


def write(results: list[dict], loads: tuple) -> None:
    lines = [
        "# MGRAL label-free gain estimate (`benchmarks/bench_mgral_estimate.py`)",
        "",
        "Runs: "
        + "; ".join(
            f"{r['dataset']} on {r.get('machine', '?')}, {r.get('run', '?')}, load average at start "
            f"{r.get('load_at_start', float('nan')):.2f}"
            for r in results
        )
        + " (2 cores shared with other jobs: seconds are indicative).",
        "",
        "State and batches: those of `mgral_head_fidelity.md` (seed 0: `mobilenet_v2_fpn` trained on 15 seeded "
        "images; 30 random batches of 20). Truth: **head gain** (box predictor fine-tuned on L + B with true "
        "labels, minus on L, test mAP) and the published **full** fine-tune gain. Estimate: "
        "`mgral.strategies.mgral.estimate.CrossFitGain` (J labelings sampled from the task detector's "
        "predictions, K = 3 folds of L, heads of `HEAD_TRAIN_DEFAULTS`, pooled COCO mAP on L, paired bootstrap "
        f"SE over L's images, {RESAMPLES} resamples; seed {SEED} for folds, labelings, RoI samples and resamples). "
        "Spearman with a 95% percentile-bootstrap interval over batches (2000 resamples).",
        "",
        "| dataset | series | batches | vs head gain (true labels) | vs full gain | mean ± std across batches | "
        "median SE | noise ratio (goal ≤ 0.33) | median paired SE of a difference | paired noise ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for label, v in r["series"].items():
            lo, hi = v["vs_head_true_ci95"]
            flo, fhi = v["vs_full_ci95"]
            se = f"{v['median_se']:.4f}" if "median_se" in v else "–"
            ratio = f"{v['noise_ratio']:.2f}" if "noise_ratio" in v else "–"
            pse = f"{v['median_paired_se']:.4f}" if "median_paired_se" in v else "–"
            pratio = f"{v['paired_noise_ratio']:.2f}" if "paired_noise_ratio" in v else "–"
            lines.append(
                f"| {r['dataset']} | {label} | {len(v['batches'])} | **{v['vs_head_true']:.2f}** [{lo:.2f}, {hi:.2f}] "
                f"| {v['vs_full']:.2f} [{flo:.2f}, {fhi:.2f}] | {v['mean']:.4f} ± {v['std']:.4f} | {se} | {ratio} "
                f"| {pse} | {pratio} |"
            )
    lines += [
        "",
        "| dataset | batches | cross-fitted control mAP on L | sampled labels per image | CPU s per row: J=1, "
        "J=2, J=8 | CPU s, K control heads | load | truth check: control mAP, b0 head gain "
        "(recomputed / published) | head (true) vs full |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        c = r["truth_check"]
        lines.append(
            f"| {r['dataset']} | {r['batches']} | {r['control_mAP_crossfit']:.4f} | "
            f"{r['mean_labels_per_image_sampled']:.1f} | {r['cpu_s_row']['J=1']:.0f}, {r['cpu_s_row']['J=2']:.0f}, "
            f"{r['cpu_s_row']['J=8']:.0f} | {r['cpu_s_control']:.0f} | {r['load']:.1f} | "
            f"{c['control_mAP']:.4f} / {c['published_control_mAP']:.4f}, {c['b0_gain']:+.4f} / "
            f"{c['published_b0_gain']:+.4f} | {r['head_true_vs_full']:.2f} |"
        )
    for r in results:
        for label, v in r.get("variants", {}).items():
            lines.append(
                f"\n{r['dataset']}, cheaper setting *{label}* (labelings = the default's first J): "
                f"{v['cpu_s_row']:.1f} CPU s per row, {v['cpu_s_control']:.1f} CPU s for its K control heads."
            )
    missing = [name for name in SETUPS if name not in {r["dataset"] for r in results}]
    lines += [
        "",
        "Noise ratio = median bootstrap SE of an estimate / its standard deviation across batches. The SE is "
        "that of the estimate's level; batches are scored on the same resamples of L, so the SE of the "
        "difference between two batches (median over all pairs) is what decides whether the estimate can "
        "rank them: paired noise ratio = that SE / (√2 × the standard deviation across batches). "
        "Sampled labels per image: mean over labelings 0-1 of the batches' images. CPU seconds are process time "
        "of one worker thread (two workers on the 2 shared cores; fine-tunes of `HEAD_TRAIN_DEFAULTS`).",
    ]
    if missing:
        lines.append(
            f"Not run: {', '.join(missing)} (no published head-fidelity state for it in `mgral_head_fidelity.json`)."
        )
    lines.append("")
    atomic_write_text(RESULTS / "mgral_estimate.md", "\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=sorted(SETUPS), action="append")
    p.add_argument("--workers", type=int, default=2, help="processes (one thread each)")
    args = p.parse_args(argv)

    def log(msg: str) -> None:
        print(f"[{dt.datetime.now():%H:%M:%S}] {msg}", file=sys.stderr, flush=True)

    loads = os.getloadavg()
    published = {r["dataset"]: r for r in json.loads((RESULTS / "mgral_head_fidelity.json").read_text())}
    path = RESULTS / "mgral_estimate.json"
    results = {r["dataset"]: r for r in (json.loads(path.read_text()) if path.exists() else [])}
    for name in args.only or list(SETUPS):
        if name not in published:
            log(f"{name}: no published head fidelity run (mgral_head_fidelity.json); run bench_head_fidelity.py first")
            continue
        done = rows(name, args.workers, log)
        check = truth_check(name, published[name])
        log(f"{name}: truth check {check}")
        results[name] = figures(name, done, published[name], check, uncertainty_baselines(name))
        results[name].update(
            machine=machine_line(gpu_used=False),
            load_at_start=loads[0],
            run=dt.datetime.now().isoformat(timespec="minutes"),
        )
        atomic_write_json(path, list(results.values()), indent=1)
        write(list(results.values()), loads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
