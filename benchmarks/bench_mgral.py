"""MGRAL validation: does the label-free table predict true mAP gains, does the agent learn,
and what does a selection cost?

Per dataset (the built-in digits scenes; ``../shared/data/bccd``), one AL cycle:

1. a task detector ``f_t`` is trained on a seeded labeled set ``L`` (timed: the reference
   for the cost ratio);
2. MGRAL selects a batch of ``B`` from the pool (its table, reward model and agent are
   written under ``runs/bench-mgral/<dataset>/mgral``; timed);
3. **true gains** — for every table combination, ``--random`` random batches of ``B``
   candidates, MGRAL's batch and entropy's batch: fine-tune a copy of ``f_t`` on
   ``L`` + the batch *with its true labels* (same steps, same seed, same labeled
   mini-batches for every batch) and score it on the test split, minus the same
   fine-tune on ``L`` alone;
4. figures: Spearman of ``R(S)`` vs true gain (random batches: out of sample for the
   reward model), Spearman of the surrogate ``dmAP`` vs true gain (the table's own
   combinations), the agent's reward curve (first vs last updates, and the reward of
   random batches), MGRAL's and entropy's true gain beside the random batches', and the
   selection overhead as a ratio to ``f_t``'s training time.

Writes ``benchmarks/results/mgral.md`` (+ ``mgral.json``, scatter and reward-curve PNGs).

    .venv/bin/python benchmarks/bench_mgral.py [--only digits] [--random 20]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from mgral._machine import machine_line

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHARED = Path(os.environ.get("MGRAL_SHARED_DATA", ROOT.parent / "shared" / "data"))
WORK = ROOT / "runs" / "bench-mgral"  # scratch (git-ignored): generated data, tables, agent files

SETUPS = {
    "digits": {
        "params": {},
        "train": {"iterations": 300, "warmup_iters": 20},
        "initial": 40,
        "budget": 20,
        "mgral": {"combinations": 16, "steps": 20, "updates": 300},
        "true_steps": 40,
    },
    "bccd": {
        "params": {"min_size": 256},
        "train": {"iterations": 200, "warmup_iters": 20, "batch_size": 8},
        "initial": 40,
        "budget": 10,
        "mgral": {"combinations": 12, "steps": 15, "updates": 300},
        "true_steps": 30,
    },
}


def load(name: str):
    from mgral.data.formats import read_dataset
    from mgral.data.synth import SynthConfig, generate

    if name == "digits":
        path = WORK / "digits-data"
        return generate(path, SynthConfig(images=600, seed=0)) if not path.exists() else read_dataset(path, "coco")
    return read_dataset(SHARED / name, "coco")


def run(name: str, n_random: int, executor: str) -> dict:
    import torch

    from mgral.detectors.torchvision_detector import TorchvisionDetector
    from mgral.executors import JobPlacement, make_executor
    from mgral.loop import visible_dataset
    from mgral.runs import CycleDir
    from mgral.strategies import SelectionContext, build_strategy
    from mgral.strategies.mgral.surrogate import SurrogateJob, SurrogateShared, run_surrogate

    setup = SETUPS[name]
    dataset = load(name)
    pool_all, test = dataset.image_ids("train"), dataset.image_ids("test")
    rng = np.random.default_rng(0)
    labeled = [pool_all[k] for k in sorted(rng.choice(len(pool_all), setup["initial"], replace=False))]
    pool = [i for i in pool_all if i not in set(labeled)]
    view = visible_dataset(dataset, {i: dataset[i].target for i in labeled})

    det = TorchvisionDetector(
        "tiny", dataset.categories, device="cpu", seed=0, train={"progress": False}, **setup["params"]
    )
    t0 = time.perf_counter()
    det.fit(view, labeled, **setup["train"])
    train_s = time.perf_counter() - t0
    base_map = det.evaluate(dataset, test).mAP
    preds = det.predict(view, pool + labeled)
    work = WORK / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    budget = setup["budget"]

    def context(seed: int) -> SelectionContext:
        return SelectionContext(
            view,
            list(pool),
            list(labeled),
            np.random.default_rng(seed),
            predictions={i: preds[i] for i in pool},
            embeddings={i: preds[i].embedding for i in pool + labeled},
            detector=det,
            work_dir=work,
            jobs=JobPlacement(executor, workers=2 if executor != "inline" else None),
        )

    strategy = build_strategy("mgral", estimator="finetune", **setup["mgral"])
    t0 = time.perf_counter()
    chosen = strategy.select(context(1), budget)
    select_s = time.perf_counter() - t0
    entropy = build_strategy("entropy", aggregation="max").select(context(1), budget)

    out = CycleDir(work).mgral
    table = json.loads(out.table_json.read_text())
    cands = np.load(out.candidates)
    cand_ids = json.loads(str(cands["ids"]))
    pos = {i: k for k, i in enumerate(cand_ids)}
    credits, clusters, lam = cands["credits"], cands["clusters"], float(cands["cluster_coef"])

    def reward(batch) -> float:
        rows = np.array([pos[i] for i in batch])
        counts = np.bincount(clusters[rows], minlength=int(clusters.max()) + 1)
        return float(credits[rows].sum() + lam * np.sqrt(counts).sum())

    brng = np.random.default_rng(7)
    randoms = [[cand_ids[k] for k in brng.choice(len(cand_ids), budget, replace=False)] for _ in range(n_random)]
    combos = [row["combination"] for row in table if row["combination"] != "control"]
    batches = {"control": []}
    batches.update({f"table{k}": c for k, c in enumerate(combos)})
    batches.update({f"random{k}": b for k, b in enumerate(randoms)})
    batches["mgral"] = list(chosen.image_ids)
    batches["entropy"] = list(entropy.image_ids)
    torch.set_num_threads(1)
    shared = SurrogateShared(
        det.to_bytes(),
        dataset,  # true labels: this is the benchmark's oracle, never the strategy's input
        list(labeled),
        list(test),
        {"optimizer": "adamw", "lr": 5e-4, "weight_decay": 1e-4, "grad_clip": 10.0},
        steps=setup["true_steps"],
        batch_size=8,
        threads=1,
        seed=11,
    )
    jobs = [
        SurrogateJob(k, list(b), {i: (dataset[i].target.boxes, dataset[i].target.labels) for i in b}, semi=False)
        for k, b in batches.items()
    ]
    t0 = time.perf_counter()
    with make_executor(executor, workers=2) as ex:
        results = {jobs[k].name: r for k, r in ex.map(run_surrogate, jobs, shared)}
    true_s = time.perf_counter() - t0
    gain = {k: results[k]["mAP"] - results["control"]["mAP"] for k in batches}
    return summarize(
        name, setup, table, gain, randoms, combos, reward, out, train_s, select_s, true_s, base_map, chosen
    )


def summarize(name, setup, table, gain, randoms, combos, reward, out, train_s, select_s, true_s, base_map, chosen):
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.stats import spearmanr

    rand_true = np.array([gain[f"random{k}"] for k in range(len(randoms))])
    rand_r = np.array([reward(b) for b in randoms])
    tab_true = np.array([gain[f"table{k}"] for k in range(len(combos))])
    tab_sur = np.array([row["dmAP"] for row in table if row["combination"] != "control"], dtype=float)
    tab_r = np.array([reward(c) for c in combos])
    summary = json.loads(out.summary.read_text())
    with open(out.agent_rewards) as f:
        curve = [float(r["reward_mean"]) for r in csv.DictReader(f)]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    axes[0].scatter(rand_r, rand_true, label="random batches (out of sample)")
    axes[0].scatter(tab_r, tab_true, marker="x", label="table combinations (in sample)")
    axes[0].set(xlabel="R(S) (reward model)", ylabel="true test mAP gain", title=f"{name}: R(S) vs true gain")
    axes[0].legend(fontsize=7)
    axes[1].scatter(tab_sur, tab_true)
    axes[1].set(xlabel="surrogate dmAP (label-free, reward set)", ylabel="true test mAP gain", title="table rows")
    axes[2].plot(curve, label="agent: mean reward per update")
    axes[2].axhline(summary.get("reward_random_batch", np.nan), color="gray", ls="--", label="random batches")
    axes[2].set(xlabel="update", ylabel="R(S)", title="agent convergence")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / f"mgral_{name}.png", dpi=110)
    plt.close(fig)

    def rho(a, b):
        return float(spearmanr(a, b).statistic) if np.ptp(a) > 0 and np.ptp(b) > 0 else None

    return {
        "dataset": name,
        "budget": setup["budget"],
        "initial": setup["initial"],
        "mgral": setup["mgral"],
        "true_steps": setup["true_steps"],
        "base_test_mAP": float(base_map),
        "spearman_R_vs_true_random": rho(rand_r, rand_true),
        "spearman_R_vs_true_table": rho(tab_r, tab_true),
        "spearman_surrogate_vs_true_table": rho(tab_sur, tab_true),
        "loo_spearman": summary.get("loo_spearman"),
        "random_batches": len(randoms),
        "true_gain_random_mean": float(rand_true.mean()),
        "true_gain_random_std": float(rand_true.std(ddof=1)),
        "true_gain_mgral": gain["mgral"],
        "true_gain_entropy": gain["entropy"],
        "mgral_rank_among_random": int((rand_true < gain["mgral"]).sum()),
        "reward_first10": float(np.mean(curve[:10])),
        "reward_last10": float(np.mean(curve[-10:])),
        "reward_random_batch": summary.get("reward_random_batch"),
        "train_s": train_s,
        "select_s": select_s,
        "overhead_stages_s": summary["seconds"],
        "overhead_ratio": select_s / train_s,
        "true_gain_jobs_s": true_s,
        "chosen": list(chosen.image_ids),
    }


def write(rows: list[dict], loads: tuple) -> None:
    def f(v, nd=3):
        return "n/a" if v is None else f"{v:.{nd}f}"

    lines = [
        "# MGRAL validation (`benchmarks/bench_mgral.py`)",
        "",
        f"Machine: {machine_line(gpu_used=False)}. Run {dt.datetime.now().isoformat(timespec='minutes')}; "
        "load average at start "
        f"{loads[0]:.2f} (other jobs may have shared the 2 cores: timings are indicative, ratios are same-run).",
        "",
        "One AL cycle per dataset: `tiny` detector trained on a seeded labeled set, MGRAL selects B images; "
        "true gains = fine-tune of the same detector on L + batch *with labels* minus the same fine-tune on L "
        "alone, scored on the test split (same seed and labeled mini-batches for every batch).",
        "",
        "| dataset | L | B | M / K | base mAP | Spearman R vs true (random, out of sample) | Spearman R vs true "
        "(table) | Spearman surrogate dmAP vs true (table) | LOO Spearman (reward set) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['initial']} | {r['budget']} | {r['mgral']['combinations']} / "
            f"{r['mgral']['steps']} | {f(r['base_test_mAP'])} | "
            f"{f(r['spearman_R_vs_true_random'])} (n={r['random_batches']}) | "
            f"{f(r['spearman_R_vs_true_table'])} | {f(r['spearman_surrogate_vs_true_table'])} | "
            f"{f(r['loo_spearman'])} |"
        )
    lines += [
        "",
        "| dataset | true gain: random batches (mean ± std) | MGRAL batch | entropy batch | "
        "MGRAL beats k of n random | "
        "agent reward first 10 → last 10 updates | R of random batches | selection s | f_t train s | overhead ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {f(r['true_gain_random_mean'], 4)} ± {f(r['true_gain_random_std'], 4)} | "
            f"{f(r['true_gain_mgral'], 4)} | {f(r['true_gain_entropy'], 4)} | {r['mgral_rank_among_random']} of "
            f"{r['random_batches']} | {f(r['reward_first10'], 4)} → {f(r['reward_last10'], 4)} | "
            f"{f(r['reward_random_batch'], 4)} | {r['select_s']:.1f} | {r['train_s']:.1f} | {r['overhead_ratio']:.2f} |"
        )
    lines += ["", "Per-stage selection seconds:", ""]
    for r in rows:
        lines.append(f"- {r['dataset']}: " + ", ".join(f"{k} {v:.1f}" for k, v in r["overhead_stages_s"].items()))
    lines += ["", "Plots: " + ", ".join(f"`mgral_{r['dataset']}.png`" for r in rows), ""]
    (RESULTS / "mgral.md").write_text("\n".join(lines), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=sorted(SETUPS), action="append")
    p.add_argument("--random", type=int, default=20, help="random batches whose true gain is measured")
    p.add_argument("--executor", default="process", choices=["inline", "process", "ray"])
    args = p.parse_args(argv)
    loads = os.getloadavg()
    path = RESULTS / "mgral.json"
    rows = {r["dataset"]: r for r in (json.loads(path.read_text()) if path.exists() else [])}
    for name in args.only or list(SETUPS):
        print(f"{name} ...", file=sys.stderr, flush=True)
        rows[name] = run(name, args.random, args.executor)
        path.write_text(json.dumps(list(rows.values()), indent=1), encoding="utf-8")
        write(list(rows.values()), loads)
    print((RESULTS / "mgral.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
