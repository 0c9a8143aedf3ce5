"""Can MGRAL's label-free estimate tell the baselines' batches apart? (issue 19: validity on
strategies' batches, one AL state.)

``bench_mgral_estimate.py`` measured the estimate on random batches of one state, whose true
gains differ little (BCCD: full-gain std 0.012 against a seed noise of about 0.008). The
batches a strategy would choose differ more in what they hold. On the same state (the task
detector, ``L`` and the head cache of ``runs/bench-head-fidelity/<dataset>/``, made by
``bench_head_fidelity.py``), this takes the top ``B`` of the pool by each of the prior's cheap
scores (least confidence, core-set distance, class rarity; ``mgral.strategies.mgral.prior``)
and by their z-score sum (the head path's candidate ranking), and per batch computes:

- **full gain**: the task detector fine-tuned on ``L + B`` with true labels minus the same
  fine-tune on ``L`` (``bench_head_fidelity``'s schedule and seed 0; the control is rerun here),
  test mAP;
- **head gain**: the box predictor alone, the same difference (true labels);
- **the label-free estimate** (``CrossFitGain`` as the strategy runs it: K = 3, J = 2, 100
  steps) with its bootstrap SE, and each batch's difference to the prior-sum batch in paired
  SEs (what safe selection would compare).

The random batches' full gains of ``mgral_head_fidelity.json`` give the spread to compare
with. Writes ``benchmarks/results/mgral_batches.{md,json}``; results per batch are kept in
``runs/bench-head-fidelity/<dataset>/batches.json`` as they come (resumable).

    .venv/bin/python benchmarks/bench_mgral_batches.py [--only bccd] [--workers 2]
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
    BUDGET,
    RESULTS,
    SETUPS,
    WORK,
    _job,
    finetune_settings,
    load,
    rho,
    state,
)

ITERATIONS = 30  # the full fine-tunes of mgral_head_fidelity.json (its "full fine-tune" column)
FOLDS, LABELINGS, SEED = 3, 2, 0  # the strategy's defaults


def batches(name: str) -> tuple[dict[str, list], dict]:
    """The top-``BUDGET`` pool images (outside ``L``) by each prior score and by their sum."""
    from mgral.detectors.torchvision_detector import TorchvisionDetector
    from mgral.strategies.mgral import prior as prior_mod

    dataset, labeled, _, _ = state(name, 0)
    _, pool, _ = load(name)
    rest = [i for i in pool if i not in set(labeled)]
    det = TorchvisionDetector.load(WORK / name / "task.pt", device="cpu")
    t0 = time.perf_counter()
    passed = det.predict(dataset, rest + labeled, embeddings=True)
    preds, emb = {i: passed[i] for i in rest}, {i: d.embedding for i, d in passed.items()}
    raw = prior_mod.pool_scores(dataset, preds, emb, rest, labeled)
    seconds = time.perf_counter() - t0
    scores = {**raw, "prior (z-sum)": prior_mod.pool_prior(raw)}
    out = {k: [rest[j] for j in sorted(np.argsort(-v, kind="stable")[:BUDGET].tolist())] for k, v in scores.items()}
    return out, {"pool": len(rest), "pass_s": seconds}


def full_gains(name: str, chosen: dict[str, list], workers: int, done: dict, path, log) -> dict:
    """Every full fine-tune not yet in ``done`` (the control first), kept in ``path`` as it comes."""
    _, labeled, _, _ = state(name, 0)
    train = finetune_settings(ITERATIONS)
    task = str(WORK / name / "task.pt")
    jobs = [("control", [])] + [(k, b) for k, b in chosen.items()]
    todo = [(name, f"full:{k}", task, labeled + b, 0, train, None) for k, b in jobs if f"full:{k}" not in done]
    with ProcessPoolExecutor(workers) as pool:
        for fut in as_completed([pool.submit(_job, j) for j in todo]):
            r = fut.result()
            done[r["key"]] = r
            atomic_write_json(path, done, indent=1)
            log(f"{name}: {r['key']} mAP {r['mAP']:.4f} ({r['train_s']:.0f} s)")
    return done


def head_and_estimates(name: str, chosen: dict[str, list], done: dict, path, log) -> dict:
    """Head gains (true labels) and label-free estimates of every batch, on the task detector's
    head cache (extended by the batches' images)."""
    import torch

    from mgral.detectors.heads import cache_head_inputs, evaluate_head, finetune_head, load_head_cache
    from mgral.detectors.torchvision_detector import TorchvisionDetector
    from mgral.strategies.mgral.estimate import CrossFitGain, paired_se

    torch.set_num_threads(1)
    dataset, labeled, _, test = state(name, 0)
    det = TorchvisionDetector.load(WORK / name / "task.pt", device="cpu")
    cache = load_head_cache(WORK / name / "heads.npz")
    new = [i for b in chosen.values() for i in b if i not in cache]
    cache.update(cache_head_inputs(det, dataset, list(dict.fromkeys(new)), labeled=new))
    est = CrossFitGain(det, cache, dataset, labeled, folds=FOLDS, labelings=LABELINGS, seed=SEED)

    def head_map(ids):
        head, _ = finetune_head(det, cache, ids, seed=0)
        return float(evaluate_head(det, cache, dataset, test, predictor=head).mAP)

    if "head:control" not in done:
        done["head:control"] = head_map(labeled)
    estimates = {}
    for k, b in chosen.items():
        if f"head:{k}" not in done:
            done[f"head:{k}"] = head_map(labeled + b)
            atomic_write_json(path, done, indent=1)
        c0 = time.process_time()
        estimates[k] = est.estimate(b)
        done[f"est:{k}"] = {"gain": estimates[k].gain, "se": estimates[k].se, "cpu_s": time.process_time() - c0}
        log(f"{name}: {k}: estimate {estimates[k].gain:+.4f} ± {estimates[k].se:.4f}")
    prior = estimates["prior (z-sum)"]
    for k, e in estimates.items():
        done[f"est:{k}"]["paired_se"] = paired_se(e, prior) if k != "prior (z-sum)" else None
    atomic_write_json(path, done, indent=1)
    return done


def summarize(name: str, chosen: dict[str, list], done: dict, info: dict) -> dict:
    published = {r["dataset"]: r for r in json.loads((RESULTS / "mgral_head_fidelity.json").read_text())}.get(name)
    control = done["full:control"]["mAP"]
    rows = []
    prior = done["est:prior (z-sum)"]["gain"]
    for k, b in chosen.items():
        e = done[f"est:{k}"]
        diff = e["gain"] - prior
        rows.append(
            {
                "batch": k,
                "ids": b,
                "full_gain": done[f"full:{k}"]["mAP"] - control,
                "head_gain": done[f"head:{k}"] - done["head:control"],
                "estimate": e["gain"],
                "se": e["se"],
                "vs_prior": None if e["paired_se"] is None else diff,
                "vs_prior_z": None if not e["paired_se"] else diff / e["paired_se"],
                "cpu_s": e["cpu_s"],
            }
        )
    full = np.array([r["full_gain"] for r in rows])
    return {
        "dataset": name,
        **info,
        "control_full_mAP": control,
        "control_full_mAP_published": (published or {}).get("full_control_mAP", {}).get("0"),
        "random_full_mean": (published or {}).get("full_mean"),
        "random_full_std": (published or {}).get("full_std"),
        "rows": rows,
        "spearman_estimate_full": rho([r["estimate"] for r in rows], full),
        "spearman_head_full": rho([r["head_gain"] for r in rows], full),
        "spearman_estimate_head": rho([r["estimate"] for r in rows], [r["head_gain"] for r in rows]),
    }


def write(results: list[dict], loads: tuple) -> None:
    lines = [
        "# MGRAL: the label-free estimate on the baselines' batches (`benchmarks/bench_mgral_batches.py`)",
        "",
        f"Machine: {machine_line(gpu_used=False)}. Run {dt.datetime.now().isoformat(timespec='minutes')}; load "
        f"average at start {loads[0]:.2f}.",
        "",
        f"State: that of `mgral_head_fidelity.md` (seed 0, `mobilenet_v2_fpn` trained on 15 seeded images). Batches: "
        f"the top {BUDGET} of the pool by each of the head prior's cheap scores and by their z-score sum. Full gain: "
        f"fine-tune on L + B with true labels ({ITERATIONS} iterations, seed 0) minus on L, test mAP@[.5:.95]. Head "
        f"gain: the box predictor alone, true labels. Estimate: `CrossFitGain` as MGRAL runs it (K = {FOLDS}, "
        f"J = {LABELINGS}, 100 steps), label-free, ± its bootstrap SE; vs prior: its difference to the z-sum batch's "
        "estimate in paired SEs (safe selection takes another batch only beyond 2).",
        "",
    ]
    for r in results:
        lines += [
            f"## {r['dataset']}",
            "",
            f"Control full mAP {r['control_full_mAP']:.4f} (published run: {r['control_full_mAP_published']}); "
            f"random batches' full gains (`mgral_head_fidelity.json`): {r['random_full_mean']:+.4f} ± "
            f"{r['random_full_std']:.4f}. Pool pass for the scores: {r['pass_s']:.0f} s over {r['pool']} images.",
            "",
            "| batch | full gain (truth) | head gain (true labels) | estimate ± SE (label-free) | vs prior "
            "(paired SEs) | estimate CPU s |",
            "|---|---|---|---|---|---|",
        ]
        for row in r["rows"]:
            z = "–" if row["vs_prior_z"] is None else f"{row['vs_prior']:+.4f} ({row['vs_prior_z']:+.1f})"
            lines.append(
                f"| {row['batch']} | {row['full_gain']:+.4f} | {row['head_gain']:+.4f} | "
                f"{row['estimate']:+.4f} ± {row['se']:.4f} | {z} | {row['cpu_s']:.0f} |"
            )
        lines += [
            "",
            f"Spearman over these {len(r['rows'])} batches (indicative only): estimate vs full gain "
            f"{r['spearman_estimate_full']:.2f}, head vs full {r['spearman_head_full']:.2f}, estimate vs head "
            f"{r['spearman_estimate_head']:.2f}.",
            "",
        ]
    atomic_write_text(RESULTS / "mgral_batches.md", "\n".join(lines))
    atomic_write_json(RESULTS / "mgral_batches.json", results, indent=1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", action="append", choices=list(SETUPS))
    p.add_argument("--workers", type=int, default=2, help="processes for the full fine-tunes (1 thread each)")
    args = p.parse_args(argv)

    def log(msg: str) -> None:
        print(f"[{dt.datetime.now():%H:%M:%S}] {msg}", file=sys.stderr, flush=True)

    loads = os.getloadavg()
    path = RESULTS / "mgral_batches.json"
    results = {r["dataset"]: r for r in (json.loads(path.read_text()) if path.exists() else [])}
    for name in args.only or list(SETUPS):
        if not (WORK / name / "heads.npz").exists():
            log(f"{name}: no head cache in {WORK / name}: run bench_head_fidelity.py --only {name} first")
            continue
        chosen, info = batches(name)
        keep = WORK / name / "batches.json"
        done = json.loads(keep.read_text()) if keep.exists() else {}
        if done.get("ids") not in (None, chosen):
            raise SystemExit(f"{keep} holds other batches (another task detector?): remove it to start over")
        done["ids"] = chosen
        done = full_gains(name, chosen, args.workers, done, keep, log)
        done = head_and_estimates(name, chosen, done, keep, log)
        results[name] = summarize(name, chosen, done, info)
        write(list(results.values()), loads)
    print((RESULTS / "mgral_batches.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
