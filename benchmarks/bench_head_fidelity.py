"""Head fidelity: does a head-only fine-tune on cached features rank candidate batches as a
full fine-tune of the detector does? (MGRAL issue 19, step 1: measure before building on it.)

Per dataset (``../shared/data/bccd``, ``../shared/data/pinochle-cards``, read as the
benchmark configs read them), one AL state like the published benchmark's cycle 1:

1. the task detector ``f`` (``mobilenet_v2_fpn``, the config's schedule: 60 iterations of 4
   images, 10 warm-up) is trained on the seeded initial labeled set ``L`` (15 images, drawn
   as ``mgral.loop.initial_ids`` draws seed 0's);
2. ``--batches`` random batches ``B`` of the benchmark's budget (20) are drawn from the pool;
3. **full gain** of ``B``: fine-tune a copy of ``f`` on ``L + B`` with true labels (the
   config's schedule again: what the benchmark's warm-started next cycle does), minus the
   same fine-tune on ``L`` alone, both scored (COCO mAP) on the test split; same seed. The
   first 3 batches and the control are run again with another seed: the seed noise of a
   full gain;
4. **head gain** of ``B``: the same difference for the head-only fine-tune of
   :mod:`mgral.detectors.heads` (the box predictor alone, on features cached once from ``f``).

Figures: Spearman (bootstrap 95% interval over batches) and Pearson between the two gains,
the spread of each, the seed noise of the full gain, the cost of one head row against one
full fine-tune (same run). Writes ``benchmarks/results/mgral_head_fidelity.{md,json}``.

Stage ``full`` (the CPU-heavy part: fine-tunes in ``--workers`` processes of one thread,
each result written to ``runs/bench-head-fidelity/<dataset>/full.json`` as it comes, so an
interrupted run resumes) and stage ``heads`` (minutes) can run separately; ``all`` runs both.

    .venv/bin/python benchmarks/bench_head_fidelity.py [--only bccd] [--batches 30] [--stage all]
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

from mgral._io import atomic_write_json, atomic_write_text
from mgral._machine import machine_line

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHARED = Path(os.environ.get("MGRAL_SHARED_DATA", ROOT.parent / "shared" / "data"))
WORK = ROOT / "runs" / "bench-head-fidelity"  # scratch (git-ignored): task models, per-job results, caches

SETUPS = {  # as benchmarks/configs/{bccd,pinochle}.yaml
    "bccd": {"path": "bccd", "pool_splits": ["train", "val"]},
    "pinochle": {"path": "pinochle-cards", "pool_splits": ["train"]},
}
INITIAL, BUDGET = 15, 20
TRAIN = {"iterations": 60, "batch_size": 4, "warmup_iters": 10, "progress": False}  # the configs' cycle schedule
SEEDS = (0, 1)  # the main seed, and the one the seed-noise reruns use
NOISE_BATCHES = 3


def load(name: str):
    from mgral.data.formats import read_dataset

    setup = SETUPS[name]
    dataset = read_dataset(SHARED / setup["path"], "coco")
    pool = [i for s in setup["pool_splits"] for i in dataset.image_ids(s)]
    return dataset, pool, dataset.image_ids("test")


def state(name: str, n_batches: int):
    """The dataset, ``L``, the random batches and the test ids (seeded, as the loop seeds them)."""
    dataset, pool, test = load(name)
    rng = np.random.default_rng([0, 0])  # mgral.loop.initial_ids, seed 0
    labeled = [pool[k] for k in sorted(rng.choice(len(pool), size=INITIAL, replace=False))]
    rest = [i for i in pool if i not in set(labeled)]
    brng = np.random.default_rng([0, 1])
    batches = [[rest[k] for k in sorted(brng.choice(len(rest), BUDGET, replace=False))] for _ in range(n_batches)]
    return dataset, labeled, batches, test


def _job(args: tuple) -> dict:
    """One full fine-tune (or, with ``init=None``, the task detector's training) in a worker."""
    import torch

    from mgral.detectors.torchvision_detector import TorchvisionDetector

    name, key, init, ids, seed, train, out = args
    torch.set_num_threads(1)
    dataset, _, test = load(name)
    if init is None:
        det = TorchvisionDetector("mobilenet_v2_fpn", dataset.categories, device="cpu", seed=seed, train=train)
    else:
        det = TorchvisionDetector.load(init, device="cpu")
        det.seed, det.train_overrides = seed, dict(train)
    t0, c0 = time.perf_counter(), time.process_time()
    det.fit(dataset, ids)  # true labels: this benchmark is the oracle
    train_s, train_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    result = det.evaluate(dataset, test)
    eval_s, eval_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    if out is not None:
        det.save(out)
    return {
        "key": key,
        "mAP": float(result.mAP),
        "mAP50": float(result.mAP50),
        "train_s": train_s,
        "eval_s": eval_s,
        "train_cpu_s": train_cpu_s,  # CPU seconds: less sensitive than wall time to other jobs on the cores
        "eval_cpu_s": eval_cpu_s,
        "load": os.getloadavg()[0],
    }


def finetune_settings(iterations: int) -> dict:
    """The fine-tunes' schedule: the cycle schedule, or a shorter one (warm-up scaled with it)."""
    return {**TRAIN, "iterations": iterations, "warmup_iters": max(1, TRAIN["warmup_iters"] * iterations // 60)}


def full_path(name: str, iterations: int) -> Path:
    return WORK / name / f"full-{iterations}it.json"


def task_detector(name: str, pool: ProcessPoolExecutor, log) -> dict:
    """Train the task detector on ``L`` in ``pool`` unless ``task.pt`` and ``task.json`` exist; its figures."""
    work = WORK / name
    work.mkdir(parents=True, exist_ok=True)
    task, task_json = work / "task.pt", work / "task.json"
    if not (task_json.exists() and task.exists()):
        _, labeled, _, _ = state(name, 0)
        log(f"{name}: training the task detector on {len(labeled)} images")
        atomic_write_json(task_json, pool.submit(_job, (name, "task", None, labeled, 0, TRAIN, str(task))).result())
    return json.loads(task_json.read_text())


def full_stage(name: str, n_batches: int, iterations: int, workers: int, log) -> dict:
    """Train the task detector (``task.pt``, ``task.json``), then every full fine-tune not yet
    in ``full-<iterations>it.json``."""
    task, done_path = WORK / name / "task.pt", full_path(name, iterations)
    _, labeled, batches, _ = state(name, n_batches)
    done = json.loads(done_path.read_text()) if done_path.exists() else {}
    with ProcessPoolExecutor(workers) as pool:
        done["task"] = task_detector(name, pool, log)
        log(f"{name}: task detector mAP {done['task']['mAP']:.4f}, {done['task']['train_s']:.0f} s")
        train = finetune_settings(iterations)
        # the seed-noise reruns early: a run cut short still says how noisy its gains are
        jobs = [(f"control/s{s}", [], s) for s in SEEDS]
        jobs += [
            (f"b{k}/s{s}", b, s) for k, b in enumerate(batches) for s in (SEEDS if k < NOISE_BATCHES else SEEDS[:1])
        ]
        todo = [(name, key, str(task), labeled + b, seed, train, None) for key, b, seed in jobs if key not in done]
        futures = [pool.submit(_job, j) for j in todo]
        for fut in as_completed(futures):
            r = fut.result()
            done[r["key"]] = r
            atomic_write_json(done_path, done, indent=1)
            log(f"{name}: {r['key']} mAP {r['mAP']:.4f} ({r['train_s']:.0f} s train, {r['eval_s']:.0f} s eval)")
    return done


HEAD_VARIANTS = {  # the default (HEAD_TRAIN_DEFAULTS) is the figure; the others show how much the settings matter
    "default": {},
    "30 steps": {"iterations": 30},
}
HEAD_SEEDS = {"default": (0, 1)}  # the head's own RoI sample: seed 1 shows its noise


def head_cache(name: str, n_batches: int, log):
    """The task detector and the head inputs of ``L``, every batch and the test split, cached
    once (``heads.npz``, true labels of ``L`` and the batches: the oracle; timings in ``heads.json``)."""
    from mgral.detectors.heads import cache_head_inputs, cache_nbytes, load_head_cache, save_head_cache
    from mgral.detectors.torchvision_detector import TorchvisionDetector

    work = WORK / name
    dataset, labeled, batches, test = state(name, n_batches)
    det = TorchvisionDetector.load(work / "task.pt", device="cpu")
    out_path = work / "heads.json"
    out = json.loads(out_path.read_text()) if out_path.exists() else {}
    train_ids = list(dict.fromkeys(labeled + [i for b in batches for i in b]))
    if not (work / "heads.npz").exists() or "cache" not in out:
        t0, c0 = time.perf_counter(), time.process_time()
        cache = cache_head_inputs(det, dataset, train_ids + test, labeled=train_ids)
        out["cache"] = {"images": len(cache), "s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}
        save_head_cache(work / "heads.npz", cache)
        log(f"{name}: cached {len(cache)} images in {out['cache']['s']:.0f} s")
    t0 = time.perf_counter()
    cache = load_head_cache(work / "heads.npz")
    out["cache"].update(load_s=time.perf_counter() - t0, kib_per_image=cache_nbytes(cache) / len(cache) / 1024)
    atomic_write_json(out_path, out, indent=1)
    return det, cache


def head_rows(name: str, n_batches: int, log) -> dict:
    """Cache the task detector's head inputs of ``L``, every batch and the test split once
    (``heads.npz``), then one head row per batch and head setting (and the control), kept in
    ``heads.json`` as they come. Needs no full fine-tune: it can run beside them."""
    import torch

    from mgral.detectors.heads import HEAD_TRAIN_DEFAULTS, evaluate_head, finetune_head

    torch.set_num_threads(1)  # as the full fine-tunes run
    dataset, labeled, batches, test = state(name, n_batches)
    det, cache = head_cache(name, n_batches, log)
    out_path = WORK / name / "heads.json"
    out = json.loads(out_path.read_text())
    if "zero_step_head_mAP" not in out:
        out["zero_step_head_mAP"] = float(evaluate_head(det, cache, dataset, test).mAP)
        atomic_write_json(out_path, out, indent=1)

    def head_map(ids, settings, head_seed):
        t0 = time.process_time()
        head, _ = finetune_head(det, cache, ids, seed=head_seed, **settings)
        result = evaluate_head(det, cache, dataset, test, predictor=head)
        return {"mAP": float(result.mAP), "mAP50": float(result.mAP50), "cpu_s": time.process_time() - t0}

    for label, settings in HEAD_VARIANTS.items():
        for head_seed in HEAD_SEEDS.get(label, (0,)):
            key = f"{label}, seed {head_seed}"
            v = out.setdefault(key, {"settings": {**HEAD_TRAIN_DEFAULTS, **settings}, "rows": {}})
            for k, ids in [("control", labeled)] + [(f"b{k}", labeled + b) for k, b in enumerate(batches)]:
                if k not in v["rows"]:
                    v["rows"][k] = head_map(ids, settings, head_seed)
                    atomic_write_json(out_path, out, indent=1)
            log(f"{name}: head {key}: done")
    return out


def rho(a, b) -> float:
    """Spearman's rank correlation."""
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def interval(a, b) -> list[float]:
    """95% percentile-bootstrap interval of :func:`rho` over the pairs (2000 resamples, seed 0)."""
    from scipy.stats import bootstrap

    res = bootstrap((a, b), rho, paired=True, vectorized=False, n_resamples=2000, method="percentile", random_state=0)
    return [float(res.confidence_interval.low), float(res.confidence_interval.high)]


def heads_stage(name: str, n_batches: int, iterations: int, done: dict, log) -> dict:
    """Head rows (computed or read back), then the figures over the batches whose full gain is known."""
    from scipy.stats import pearsonr

    heads = head_rows(name, n_batches, log)
    keys = [k for k in range(n_batches) if f"b{k}/s{SEEDS[0]}" in done]
    full = {k: done[f"b{k}/s{SEEDS[0]}"]["mAP"] - done[f"control/s{SEEDS[0]}"]["mAP"] for k in keys}
    full50 = {k: done[f"b{k}/s{SEEDS[0]}"]["mAP50"] - done[f"control/s{SEEDS[0]}"]["mAP50"] for k in keys}
    variants = {}
    for key in (f"{label}, seed {s}" for label in HEAD_VARIANTS for s in HEAD_SEEDS.get(label, (0,))):
        v = heads[key]
        rows, control = v["rows"], v["rows"]["control"]
        variants[key] = {
            "settings": v["settings"],
            "control_mAP": control["mAP"],
            "gains": [rows[f"b{k}"]["mAP"] - control["mAP"] for k in keys],
            "gains50": [rows[f"b{k}"]["mAP50"] - control["mAP50"] for k in keys],
            "row_cpu_s": float(np.mean([r["cpu_s"] for r in rows.values()])),
        }
    f = np.array([full[k] for k in keys])
    f50 = np.array([full50[k] for k in keys])

    for v in variants.values():
        h = np.array(v["gains"])
        v.update(
            spearman=rho(f, h),
            spearman_ci95=interval(f, h),
            pearson=float(pearsonr(f, h).statistic),
            spearman_mAP50=rho(f50, np.array(v["gains50"])),
            mean=float(h.mean()),
            std=float(h.std(ddof=1)),
        )
    noise = [
        {
            "batch": k,
            "gain_s0": full[k],
            "gain_s1": done[f"b{k}/s{SEEDS[1]}"]["mAP"] - done[f"control/s{SEEDS[1]}"]["mAP"],
        }
        for k in range(NOISE_BATCHES)
        if f"b{k}/s{SEEDS[1]}" in done and k in full and f"control/s{SEEDS[1]}" in done
    ]
    timed = [r for key, r in done.items() if key != "task" and "train_cpu_s" in r]
    return {
        "dataset": name,
        "initial": INITIAL,
        "budget": BUDGET,
        "train": TRAIN,
        "finetune": finetune_settings(iterations),
        "batches": len(keys),
        "task_mAP": done["task"]["mAP"],
        "task_train_s": done["task"]["train_s"],
        "zero_step_head_mAP": heads["zero_step_head_mAP"],
        "cache_images": heads["cache"]["images"],
        "cache_s": heads["cache"]["s"],
        "cache_cpu_s": heads["cache"]["cpu_s"],
        "cache_load_s": heads["cache"]["load_s"],
        "cache_kib_per_image": heads["cache"]["kib_per_image"],
        "full_gains": f.tolist(),
        "full_gains50": f50.tolist(),
        "full_mean": float(f.mean()),
        "full_std": float(f.std(ddof=1)),
        "full_seed_noise": noise,
        "full_control_mAP": {str(s): done[f"control/s{s}"]["mAP"] for s in SEEDS if f"control/s{s}" in done},
        "heads": variants,
        "full_row_cpu_s": float(np.mean([r["train_cpu_s"] + r["eval_cpu_s"] for r in timed])),
        "full_row_wall_s": float(np.mean([r["train_s"] + r["eval_s"] for r in timed])),
        "full_load": float(np.mean([r["load"] for r in timed])),
    }


def seed_ceiling(row: dict) -> tuple[float, float] | None:
    """The seed noise of one full gain (SD from the batches run with both seeds: the SD of the
    difference / sqrt 2) and the highest correlation any estimate can reach with a one-seed gain
    it implies, sqrt(1 - noise variance / variance across batches) (the reliability bound);
    None without reruns."""
    pairs = [(n["gain_s0"], n["gain_s1"]) for n in row["full_seed_noise"]]
    if not pairs:
        return None
    sd = float(np.sqrt(np.mean([(a - b) ** 2 for a, b in pairs]) / 2))
    return sd, float(np.sqrt(max(0.0, 1.0 - sd**2 / row["full_std"] ** 2)))


def write(rows: list[dict], loads: tuple) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [
        "# MGRAL head fidelity (`benchmarks/bench_head_fidelity.py`)",
        "",
        f"Machine: {machine_line(gpu_used=False)}. Run {dt.datetime.now().isoformat(timespec='minutes')}; load "
        f"average at start {loads[0]:.2f} (2 cores shared with other jobs: seconds are indicative, ratios same-run).",
        "",
        f"One AL state per dataset as the published benchmark's cycle 1: `mobilenet_v2_fpn` trained on {INITIAL} "
        f"seeded images ({TRAIN['iterations']} iterations of {TRAIN['batch_size']}); random batches of {BUDGET} "
        "from the pool. **Full gain** = test mAP of the task detector fine-tuned on L + B (true labels) minus the "
        "same fine-tune on L, seed 0 (schedule in the second table). **Head gain** = the same with only the box "
        "predictor trained, on features cached once from the task detector (`mgral.detectors.heads`, settings "
        "below). COCO mAP@[.5:.95] on the test split.",
        "",
        "| dataset | batches | head setting | Spearman (95% CI, bootstrap over batches) | Pearson | Spearman "
        "on mAP50 gains | full gain mean ± std | head gain mean ± std |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for label, v in r["heads"].items():
            lo, hi = v["spearman_ci95"]
            lines.append(
                f"| {r['dataset']} | {r['batches']} | {label} | **{v['spearman']:.2f}** [{lo:.2f}, {hi:.2f}] | "
                f"{v['pearson']:.2f} | {v['spearman_mAP50']:.2f} | {r['full_mean']:.4f} ± {r['full_std']:.4f} | "
                f"{v['mean']:.4f} ± {v['std']:.4f} |"
            )
    lines += [
        "",
        "| dataset | full fine-tune | task mAP (detector) | task mAP (head on fp16 cache, 0 steps) | cache: images, "
        "s, KiB/image | one full fine-tune: CPU s (train + test), wall s, load | one head row (default): CPU s | "
        "ratio | full-gain seed noise (batch: seed 0 → seed 1) | seed-noise SD of a full gain; ceiling |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        noise = "; ".join(f"b{n['batch']}: {n['gain_s0']:+.4f} → {n['gain_s1']:+.4f}" for n in r["full_seed_noise"])
        ceiling = seed_ceiling(r)
        ceiling_cell = f"{ceiling[0]:.4f}; {ceiling[1]:.2f}" if ceiling else "–"
        ft, head_s = r["finetune"], r["heads"]["default, seed 0"]["row_cpu_s"]
        lines.append(
            f"| {r['dataset']} | {ft['iterations']} it. of {ft['batch_size']} ({ft['warmup_iters']} warm-up) | "
            f"{r['task_mAP']:.4f} | {r['zero_step_head_mAP']:.4f} | {r['cache_images']}, {r['cache_s']:.0f}, "
            f"{r['cache_kib_per_image']:.0f} | {r['full_row_cpu_s']:.0f}, {r['full_row_wall_s']:.0f}, "
            f"{r['full_load']:.1f} | {head_s:.2f} | {r['full_row_cpu_s'] / head_s:.0f}x | {noise} | {ceiling_cell} |"
        )
    lines += [
        "",
        "Ceiling: the highest correlation any estimate can reach with a one-seed full gain, given its seed noise: "
        "sqrt(1 − noise variance / variance across batches), with the noise SD from the batches rerun with seed 1 "
        f"(SD of the difference / √2; {NOISE_BATCHES} batches, so the figure itself is rough).",
    ]
    lines += ["", "Head settings (`TrainConfig` keys; full-batch steps) and CPU seconds per row:", ""]
    for label, v in rows[0]["heads"].items():
        lines.append(f"- {label}: {json.dumps(v['settings'])}; {v['row_cpu_s']:.2f} s")
    lines += ["", "Plots: " + ", ".join(f"`mgral_head_fidelity_{r['dataset']}.png`" for r in rows), ""]
    atomic_write_text(RESULTS / "mgral_head_fidelity.md", "\n".join(lines))
    for r in rows:
        fig, ax = plt.subplots(figsize=(4.5, 4))
        v = r["heads"]["default, seed 0"]
        ax.scatter(r["full_gains"], v["gains"])
        ax.set(
            xlabel="full fine-tune gain (test mAP)",
            ylabel="head-only gain (test mAP)",
            title=f"{r['dataset']}: Spearman {v['spearman']:.2f} (n={r['batches']})",
        )
        fig.tight_layout()
        fig.savefig(RESULTS / f"mgral_head_fidelity_{r['dataset']}.png", dpi=110)
        plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=sorted(SETUPS), action="append")
    p.add_argument("--batches", type=int, default=30, help="random batches (>= 30 for the issue's figure)")
    p.add_argument("--workers", type=int, default=2, help="processes for the full fine-tunes (1 thread each)")
    p.add_argument(
        "--stage",
        choices=["full", "heads", "head-rows", "all"],
        default="all",
        help="head-rows: the head rows alone (beside a running full stage); heads: rows and figures",
    )
    p.add_argument("--iterations", type=int, default=TRAIN["iterations"], help="iterations of each full fine-tune")
    args = p.parse_args(argv)

    def log(msg: str) -> None:
        print(f"[{dt.datetime.now():%H:%M:%S}] {msg}", file=sys.stderr, flush=True)

    loads = os.getloadavg()
    path = RESULTS / "mgral_head_fidelity.json"
    rows = {r["dataset"]: r for r in (json.loads(path.read_text()) if path.exists() else [])}
    for name in args.only or list(SETUPS):
        if args.stage in ("full", "all"):
            full_stage(name, args.batches, args.iterations, args.workers, log)
        if args.stage == "head-rows":
            head_rows(name, args.batches, log)
        if args.stage in ("heads", "all"):
            done = json.loads(full_path(name, args.iterations).read_text())
            rows[name] = heads_stage(name, args.batches, args.iterations, done, log)
            atomic_write_json(path, list(rows.values()), indent=1)
            write(list(rows.values()), loads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
