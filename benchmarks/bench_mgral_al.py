"""MGRAL's head estimator in the AL loop, paired with baselines run beside it (issue 19).

Runs the published benchmark's config for one dataset (``benchmarks/configs/<name>.yaml``:
same pool, initial set, budget, detector, schedule) with MGRAL and ``--baselines`` (default
random and least confidence) for ``--seeds``, into ``runs/bench-mgral-al/<name>``
(resumable: ``mgral run --resume``). MGRAL runs with ``--params`` over its defaults
(``estimator: auto``, which is ``none``: pass ``{"estimator": "head"}`` for the head
estimator). The baselines run here, not read from the published records:
training is deterministic on one machine only (the same code gave another cycle-0 model on
the machine that made the published records), so only series of one run share their cycle-0
model and can be paired. The published records' figures for the same seeds are shown beside,
unpaired.

Figures per seed: mAP per cycle, nAUC, MGRAL's nAUC minus each baseline's (paired), the
selection and training seconds per cycle (issue 19's cost goal: selection <= 0.5 x training),
and which batch safe selection took each cycle (learned or prior) with the estimated gains.
Writes ``benchmarks/results/mgral_al_<name>.{md,json}``.

``--variant LABEL --params JSON`` runs one more MGRAL setting alone into
``runs/bench-mgral-al/<name>-<LABEL>`` and pairs it with the baselines of the main run
(``runs/bench-mgral-al/<name>``) where its cycle-0 mAP equals theirs (the same cycle-0 model,
retrained on the same machine; an unequal one is shown unpaired); it writes
``mgral_al_<name>_<LABEL>.{md,json}``.

    .venv/bin/python benchmarks/bench_mgral_al.py bccd [--seeds 0 1] [--workers 2] [--params JSON] [--variant LABEL]
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
from mgral.report.metrics import mean_interval, normalized_auc, sign_test
from mgral.report.tables import interval_text

ROOT = Path(__file__).resolve().parents[1]
HERE = ROOT / "benchmarks"
RESULTS = HERE / "results"
BASELINES = ("random", "least_confidence")


def _cycles(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _curve(rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    rows = sorted(rows, key=lambda r: r["cycle"])
    return np.array([r["num_labeled"] for r in rows], float), np.array([r["mAP"] for r in rows], float)


def run(name: str, out: Path, seeds: list[int], workers: int, params: dict, baselines: list[str]) -> Path:
    """``mgral run`` of the dataset's config with MGRAL and the baselines into ``out`` (resumes a run already there)."""
    config = HERE / "configs" / f"{name}.yaml"
    strategies = json.dumps([{"name": "mgral", "params": params}, *({"name": b} for b in baselines)])
    sets = ["--set", f"strategies={strategies}", "--set", f"seeds={json.dumps(seeds)}"]
    sets += ["--set", "full_data_reference=false", "--set", "reference_train={}", "--set", f"workers={workers}"]
    cmd = [str(ROOT / ".venv" / "bin" / "mgral"), "--no-progress", "run", str(config), "--out", str(out), *sets]
    cmd += ["--resume"] if out.exists() else []
    print(" ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)
    return out


def compare(name: str, run_dir: Path, seeds: list[int], baselines: list[str], base_dir: Path | None = None) -> dict:
    """Per seed: MGRAL's curve in ``run_dir``, each baseline's in ``base_dir`` (default ``run_dir``),
    paired where both start from the same cycle-0 model (equal cycle-0 mAP) on the same labeled counts."""
    records = RESULTS / "al" / name / "records"
    base_dir = base_dir or run_dir
    out: dict = {"dataset": name, "baselines": baselines, "seeds": {}}
    for seed in seeds:
        mine_dir = run_dir / "mgral" / f"seed-{seed}"
        rows = _cycles(mine_dir / "cycles.jsonl")
        x, y = _curve(rows)
        entry: dict = {"mAP": y.tolist(), "labeled": x.tolist(), "nAUC": normalized_auc(x, y), "vs": {}, "base": {}}
        for base in baselines:
            path = base_dir / base / f"seed-{seed}" / "cycles.jsonl"
            if not path.exists():
                continue
            bx, by = _curve(_cycles(path))
            if len(bx) == len(x) and np.array_equal(bx, x) and by[0] == y[0]:
                entry["vs"][base] = normalized_auc(x, y) - normalized_auc(bx, by)
                entry["base"][base] = {"mAP": by.tolist(), "nAUC": normalized_auc(bx, by)}
            else:
                entry.setdefault("unpaired", []).append(base)
        published = {}
        for base in (*baselines, "mgral"):
            path = records / base / f"seed-{seed}" / "cycles.jsonl"
            if path.exists():
                bx, by = _curve(_cycles(path))
                published[base] = {"c0": float(by[0]), "nAUC": normalized_auc(bx, by)}
        entry["published"] = published
        select = [r["seconds"].get("select", 0.0) for r in rows if r["cycle"] < len(rows) - 1]
        train = [r["seconds"].get("train", 0.0) for r in rows]
        entry["select_s"] = float(np.mean(select)) if select else 0.0
        entry["train_s"] = float(np.mean(train))
        choices = []
        for c in range(len(rows) - 1):
            summary = mine_dir / f"cycle-{c}" / "mgral" / "summary.json"
            if summary.exists():
                s = json.loads(summary.read_text())
                choice = s.get("choice") or {}
                choices.append(
                    {
                        "cycle": c,
                        "estimator": s.get("estimator", "finetune"),
                        "batch": choice.get("batch"),
                        "diff": choice.get("diff"),
                        "se": choice.get("se"),
                        "reason": choice.get("reason"),
                        "prior_gain": s.get("prior_gain"),
                        "table_rows": s.get("table_rows"),
                        "updates": s.get("policy_updates_run"),
                        "seconds": s.get("seconds"),
                    }
                )
        entry["choices"] = choices
        out["seeds"][seed] = entry
    return out


def write(name: str, result: dict, params: dict, loads: tuple, stem: str) -> None:
    """The tables into ``results/<stem>.{md,json}``; ``loads``: the load averages when the run
    started (empty for ``--report-only``)."""
    seeds, cols = result["seeds"], result["baselines"]
    fmt = lambda v, f: "–" if v is None or v != v else format(v, f)  # noqa: E731 (v != v: NaN)
    where = f" of `runs/bench-mgral-al/{name}`" if result.get("variant") else ""
    lines = [
        f"# MGRAL in the AL loop: {name}"
        + (f", variant `{result['variant']}`" if result.get("variant") else "")
        + " (`benchmarks/bench_mgral_al.py`)",
        "",
        f"Machine: {machine_line(gpu_used=False)}. Written {dt.datetime.now().isoformat(timespec='minutes')}; "
        + (f"load average at start {loads[0]:.2f}." if loads else "from the run directory (`--report-only`)."),
        "",
        f"Config: `benchmarks/configs/{name}.yaml` with MGRAL"
        + (f" (parameters `{json.dumps(params)}`)" if params else " (default parameters)")
        + f" and {', '.join(cols)} run on this machine{where}, {len(seeds)} seed(s); MGRAL's nAUC minus each "
        "baseline's on the same seed (same initial set and cycle-0 model: paired only where the cycle-0 mAPs are "
        "equal). Published: the published benchmark's records of the same seed, made on another machine (another "
        "cycle-0 model: not paired).",
        "",
        "| seed | strategy | mAP per cycle | nAUC | MGRAL − it (paired) | published c0, nAUC |",
        "|---|---|---|---|---|---|",
    ]
    for seed, e in seeds.items():
        pub = e["published"].get("mgral")
        lines.append(
            f"| {seed} | mgral | {' / '.join(f'{v:.3f}' for v in e['mAP'])} | **{e['nAUC']:.4f}** | | "
            + (f"{pub['c0']:.4f}, {pub['nAUC']:.4f} (fine-tune estimator) |" if pub else "– |")
        )
        for b in cols:
            if b in e["base"]:
                pub = e["published"].get(b)
                lines.append(
                    f"| {seed} | {b} | {' / '.join(f'{v:.3f}' for v in e['base'][b]['mAP'])} | "
                    f"{e['base'][b]['nAUC']:.4f} | {e['vs'][b]:+.4f} | "
                    + (f"{pub['c0']:.4f}, {pub['nAUC']:.4f} |" if pub else "– |")
                )
        for b in e.get("unpaired", []):
            lines.append(f"| {seed} | {b} | another cycle-0 model or other labeled counts: not paired | | | |")
    if len(seeds) > 1:
        for b in cols:
            diffs = [e["vs"][b] for e in seeds.values() if b in e["vs"]]
            if diffs:
                low, high = mean_interval(diffs)
                lines.append(
                    f"\nMGRAL − {b}, mean over {len(diffs)} seeds: {np.mean(diffs):+.4f}, 95% interval"
                    f"{interval_text(low, high)} (higher on {sum(d > 0 for d in diffs)} of {len(diffs)}, "
                    f"sign test p {sign_test(diffs):.2g})."
                )
    lines += ["", "| seed | MGRAL select s / train s per cycle |", "|---|---|"]
    for seed, e in seeds.items():
        lines.append(f"| {seed} | {e['select_s']:.0f} / {e['train_s']:.0f} = {e['select_s'] / e['train_s']:.2f} |")
    lines += [
        "",
        "Safe selection per cycle (learned − prior estimated gain and its paired SE; rows: batches estimated):",
    ]
    lines += [
        "",
        "| seed | cycle | batch taken | learned − prior | SE | prior's estimated gain | rows | updates | seconds |",
    ]
    lines += ["|---|---|---|---|---|---|---|---|---|"]
    for seed, e in seeds.items():
        for c in e["choices"]:
            secs = ", ".join(f"{k} {v:.0f}" for k, v in (c["seconds"] or {}).items())
            lines.append(
                f"| {seed} | {c['cycle']} | {c['batch'] or c['estimator']} | {fmt(c['diff'], '+.4f')} | "
                f"{fmt(c['se'], '.4f')} | {fmt(c['prior_gain'], '+.4f')} | {c['table_rows']} | "
                f"{fmt(c['updates'], 'd')} | {secs} |"
            )
    lines.append("")
    atomic_write_text(RESULTS / f"{stem}.md", "\n".join(lines))
    atomic_write_json(RESULTS / f"{stem}.json", result, indent=1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dataset", help="a config name in benchmarks/configs with published records")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--params", type=json.loads, default={}, help="MGRAL parameters, JSON (e.g. '{\"folds\": 2}')")
    p.add_argument("--baselines", nargs="*", default=list(BASELINES), help="strategies run beside MGRAL")
    p.add_argument("--variant", help="run MGRAL with --params alone, paired with the main run's baselines")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    loads = () if args.report_only else os.getloadavg()
    main_dir = ROOT / "runs" / "bench-mgral-al" / args.dataset
    run_dir = main_dir.with_name(f"{args.dataset}-{args.variant}") if args.variant else main_dir
    stem = f"mgral_al_{args.dataset}" + (f"_{args.variant}" if args.variant else "")
    if not args.report_only:
        run(args.dataset, run_dir, args.seeds, args.workers, args.params, [] if args.variant else args.baselines)
    result = compare(args.dataset, run_dir, args.seeds, args.baselines, base_dir=main_dir)
    result.update(
        params=args.params,
        variant=args.variant,
        machine=machine_line(gpu_used=False),
        load_at_start=loads[0] if loads else None,
    )
    write(args.dataset, result, args.params, loads, stem)
    print((RESULTS / f"{stem}.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
