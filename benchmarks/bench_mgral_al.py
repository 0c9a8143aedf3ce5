"""MGRAL's head estimator in the AL loop, paired with the published baselines (issue 19).

Runs the published benchmark's config for one dataset (``benchmarks/configs/<name>.yaml``:
same pool, initial set, budget, detector, schedule and seeds) with MGRAL alone, on the
estimator it now picks for a Faster R-CNN (``estimator: auto`` -> head), into
``runs/bench-mgral-al/<name>`` (resumable: ``mgral run --resume``). Then compares each seed's
curve with the published records of the other strategies on the same seed
(``benchmarks/results/al/<name>/records/``): the same seed means the same initial set and the
same cycle-0 model, which the table checks (``c0`` must equal the published one).

Figures per seed: mAP per cycle, nAUC, nAUC minus each baseline's on that seed (paired), the
selection and training seconds per cycle (and their ratio: issue 19's cost goal is <= 0.5),
and which batch safe selection took each cycle (learned or prior) with the estimated gains.
Writes ``benchmarks/results/mgral_al_<name>.{md,json}``.

    .venv/bin/python benchmarks/bench_mgral_al.py bccd [--seeds 0 1] [--workers 2] [--params JSON]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from mgral._io import atomic_write_json, atomic_write_text
from mgral._machine import machine_line
from mgral.report.metrics import normalized_auc

ROOT = Path(__file__).resolve().parents[1]
HERE = ROOT / "benchmarks"
RESULTS = HERE / "results"
BASELINES = ("random", "least_confidence", "entropy", "core_set", "cald", "mgral")  # "mgral": the published one


def _cycles(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _curve(rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    rows = sorted(rows, key=lambda r: r["cycle"])
    return np.array([r["num_labeled"] for r in rows], float), np.array([r["mAP"] for r in rows], float)


def run(name: str, seeds: list[int], workers: int, params: dict) -> Path:
    """``mgral run`` of the dataset's config with MGRAL alone (resumes a run already there)."""
    out = ROOT / "runs" / "bench-mgral-al" / name
    config = HERE / "configs" / f"{name}.yaml"
    strategy = json.dumps([{"name": "mgral", "params": params}])
    sets = ["--set", f"strategies={strategy}", "--set", f"seeds={json.dumps(seeds)}"]
    sets += ["--set", "full_data_reference=false", "--set", "reference_train={}", "--set", f"workers={workers}"]
    cmd = [str(ROOT / ".venv" / "bin" / "mgral"), "--no-progress", "run", str(config), "--out", str(out), *sets]
    cmd += ["--resume"] if out.exists() else []
    print(" ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)
    return out


def compare(name: str, run_dir: Path, seeds: list[int]) -> dict:
    records = RESULTS / "al" / name / "records"
    out: dict = {"dataset": name, "seeds": {}}
    for seed in seeds:
        mine_dir = run_dir / "mgral" / f"seed-{seed}"
        rows = _cycles(mine_dir / "cycles.jsonl")
        x, y = _curve(rows)
        entry: dict = {"mAP": y.tolist(), "labeled": x.tolist(), "nAUC": normalized_auc(x, y), "vs": {}, "c0": {}}
        for base in BASELINES:
            path = records / base / f"seed-{seed}" / "cycles.jsonl"
            if not path.exists():
                continue
            bx, by = _curve(_cycles(path))
            if len(bx) == len(x) and np.array_equal(bx, x):
                entry["vs"][base] = normalized_auc(x, y) - normalized_auc(bx, by)
                entry["c0"][base] = float(by[0])
        select = [r["seconds"].get("select", 0.0) for r in rows if r["cycle"] < len(rows) - 1]
        train = [r["seconds"].get("train", 0.0) for r in rows]
        entry["select_s"] = float(np.mean(select)) if select else 0.0
        entry["train_s"] = float(np.mean(train))
        choices = []
        for c in range(len(rows) - 1):
            summary = mine_dir / f"cycle-{c}" / "mgral" / "summary.json"
            if summary.exists():
                s = json.loads(summary.read_text())
                choices.append(
                    {
                        "cycle": c,
                        "estimator": s.get("estimator", "finetune"),
                        "batch": (s.get("choice") or {}).get("batch"),
                        "diff": (s.get("choice") or {}).get("diff"),
                        "se": (s.get("choice") or {}).get("se"),
                        "prior_gain": s.get("prior_gain"),
                        "table_rows": s.get("table_rows"),
                        "seconds": s.get("seconds"),
                    }
                )
        entry["choices"] = choices
        out["seeds"][seed] = entry
    return out


def write(name: str, result: dict, params: dict, loads: tuple) -> None:
    seeds = result["seeds"]
    cols = [b for b in BASELINES if any(b in e["vs"] for e in seeds.values())]
    lines = [
        f"# MGRAL (head estimator) in the AL loop: {name} (`benchmarks/bench_mgral_al.py`)",
        "",
        f"Machine: {machine_line(gpu_used=False)}. Finished {dt.datetime.now().isoformat(timespec='minutes')}; "
        f"load average at start {loads[0]:.2f}.",
        "",
        f"Config: `benchmarks/configs/{name}.yaml` with MGRAL alone"
        + (f", parameters `{json.dumps(params)}`" if params else ", default parameters")
        + "; each seed paired with the published records of the same seed (`benchmarks/results/al/"
        f"{name}/records/`; `mgral` there is the previous, fine-tune estimator). c0 = cycle-0 mAP (the same "
        "initial set and model: it must equal the baselines').",
        "",
        "| seed | c0 (published c0) | mAP per cycle | nAUC | "
        + " | ".join(f"vs {b}" for b in cols)
        + " | select s / train s per cycle |",
        "|---|---|---|---|" + "---|" * len(cols) + "---|",
    ]
    for seed, e in seeds.items():
        c0_pub = next(iter(e["c0"].values()), float("nan"))
        vs = " | ".join(f"{e['vs'][b]:+.4f}" if b in e["vs"] else "–" for b in cols)
        lines.append(
            f"| {seed} | {e['mAP'][0]:.4f} ({c0_pub:.4f}) | {' / '.join(f'{v:.3f}' for v in e['mAP'])} | "
            f"{e['nAUC']:.4f} | {vs} | {e['select_s']:.0f} / {e['train_s']:.0f} = {e['select_s'] / e['train_s']:.2f} |"
        )
    if len(seeds) > 1:
        means = {b: np.mean([e["vs"][b] for e in seeds.values() if b in e["vs"]]) for b in cols}
        wins = {b: sum(e["vs"].get(b, 0) > 0 for e in seeds.values()) for b in cols}
        lines.append(
            "| mean | | | "
            + f"{np.mean([e['nAUC'] for e in seeds.values()]):.4f} | "
            + " | ".join(f"{means[b]:+.4f} ({wins[b]}/{len(seeds)})" for b in cols)
            + " | |"
        )
    lines += [
        "",
        "Safe selection per cycle (learned − prior estimated gain, its paired SE; rows = batches estimated):",
        "",
    ]
    lines += [
        "| seed | cycle | batch taken | learned − prior | SE | prior's estimated gain | rows | seconds by stage |"
    ]
    lines += ["|---|---|---|---|---|---|---|---|"]
    for seed, e in seeds.items():
        for c in e["choices"]:
            fmt = lambda v, f: "–" if v is None else format(v, f)  # noqa: E731
            secs = ", ".join(f"{k} {v:.0f}" for k, v in (c["seconds"] or {}).items())
            lines.append(
                f"| {seed} | {c['cycle']} | {c['batch'] or c['estimator']} | {fmt(c['diff'], '+.4f')} | "
                f"{fmt(c['se'], '.4f')} | {fmt(c['prior_gain'], '+.4f')} | {c['table_rows']} | {secs} |"
            )
    lines.append("")
    atomic_write_text(RESULTS / f"mgral_al_{name}.md", "\n".join(lines))
    atomic_write_json(RESULTS / f"mgral_al_{name}.json", result, indent=1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dataset", help="a config name in benchmarks/configs with published records")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--params", type=json.loads, default={}, help="MGRAL parameters, JSON (e.g. '{\"folds\": 2}')")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    loads = os.getloadavg()
    run_dir = ROOT / "runs" / "bench-mgral-al" / args.dataset
    if not args.report_only:
        run_dir = run(args.dataset, args.seeds, args.workers, args.params)
    result = compare(args.dataset, run_dir, args.seeds)
    result.update(params=args.params, machine=machine_line(gpu_used=False), load_at_start=loads[0])
    write(args.dataset, result, args.params, loads)
    print((RESULTS / f"mgral_al_{args.dataset}.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
