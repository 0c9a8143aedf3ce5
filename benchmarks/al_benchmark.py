"""The published AL benchmark: every registered strategy, 3 seeds, on real data and the digits scenes.

One config per dataset in ``benchmarks/configs/`` (``digits``, ``bccd``, ``pinochle``: budgets,
detector and training recipe are documented there). For each dataset named on the command line
this script

1. runs the experiment into ``RUNS/<name>`` with ``--resume`` semantics (a killed or
   interrupted benchmark continues where it stopped; the series run in parallel through the
   config's executor: ``--executor ray --ray-address auto`` runs them on a Ray cluster);
2. publishes what a reader needs into ``OUT/<name>/``: ``results.md`` / ``results.csv`` (mAP
   per cycle mean ± std, nAUC, paired difference to random, labels to reach 90% / 95% of the
   full-data mAP, per-phase wall seconds), ``selections.csv`` (every chosen image id per
   strategy, seed and cycle), the curve plots, MGRAL's diagnostics, and ``run.md`` (machine,
   command, wall time);
3. checks that the full-data reference's schedule converged: the first seed's reference is
   trained with its schedule and for twice as long, both on this machine
   (``RUNS/<name>.converged/``), and doubling must add less than 5% of its test mAP,
   relative; ``OUT/<name>/converged.json`` says whether it held (and spares a fresh clone
   the training while the settings stay those it was made with; ``--no-converged-check``
   skips it);
4. writes ``OUT/summary.md`` over every dataset published so far, and replaces the block
   between the ``al-benchmark`` markers of ``benchmarks/README.md`` with it (links rewritten
   to lead there).

The published files include ``OUT/<name>/records/``: every *finished* series' own files (its
``cycles.jsonl``, ledger, MGRAL's diagnostics and its batches' diversity figures; no models,
no cached predictions), with the config that made them. Before running, the driver copies the
series that the run directory lacks back from there, so a fresh clone, or a machine that lost
``RUNS/``, continues the benchmark where the published results stopped and runs only the
series still missing; ``--report-only`` rebuilds every table from what is committed. Records
made with a different config are refused, naming the keys.

``--report-only`` skips step 1 (refresh the published files of runs still in progress: a
row marked ``*`` uses only the cycles all its seeds finished).

Usage::

    .venv/bin/python benchmarks/al_benchmark.py digits bccd pinochle
    .venv/bin/python benchmarks/al_benchmark.py bccd --executor ray --ray-address auto --workers 16
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from mgral._machine import machine_line

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CONFIGS = HERE / "configs"
DATASETS = ("digits", "bccd", "pinochle", "chess")
PUBLISHED = (
    "results.md",
    "results.csv",
    "selections.csv",
    "curves_images.png",
    "curves_boxes.png",
    "curves_images_mAP50.png",
    "mgral_diagnostics.png",
)
RECORDS = "records"  # OUT/<name>/records/: the finished series' own files (see the module docstring)
IDLE_SECONDS = 60  # an invocation shorter than this found nothing to run: run.md counts it, not lists it
WALL_SUFFIX = ".wall.json"  # RUNS/<name>.wall.json, beside the run directory: one entry per invocation
MARKERS = ("<!-- al-benchmark:start -->", "<!-- al-benchmark:end -->")
CONVERGED = "converged.json"  # OUT/<name>/converged.json: the schedule check (see converged_check)
CONVERGED_SUFFIX = ".converged"  # RUNS/<name>.converged/: its training, beside the run directory
CONVERGED_GAIN = 0.05  # doubling the reference schedule must add less than this, relative


# -- is the reference converged? ------------------------------------------------------------


def doubled(train: dict) -> dict:
    """Training settings with twice the length: ``epochs`` or ``iterations``, and the floor."""
    out = dict(train)
    for key in ("epochs", "iterations", "min_iterations"):
        if out.get(key):
            out[key] = 2 * int(out[key])
    return out


def length_text(train: dict) -> str:
    text = f"{train['iterations']} iterations" if train.get("iterations") else f"{train.get('epochs', 10)} epochs"
    return text + (f" (at least {train['min_iterations']})" if train.get("min_iterations") else "")


def converged_check(config, run_dir: Path, out_dir: Path, *, train: bool = True, log=print) -> dict | None:
    """Does the full-data reference's schedule converge? The first seed's reference is trained
    as the run trains it (same seed, pool, oracle and evaluation), once with its schedule and
    once for twice as long, both here (training is deterministic only on one machine, and the
    run's reference may have been made on another); converged when doubling adds less than
    ``CONVERGED_GAIN`` of the test mAP, relative.

    The trainings live in ``RUNS/<name>.converged/`` (resumable: an interrupted one continues
    from its epoch checkpoint); the result is published as ``OUT/<name>/converged.json`` and
    reused while the settings it was made with hold. None when the config has no full-data
    reference, or when ``train`` is false and nothing matching is published.
    """
    from mgral._io import atomic_write_json
    from mgral.loop import _torch_threads, open_experiment, seed_oracle
    from mgral.report.load import load_reference
    from mgral.runs import CycleDir, RunDir
    from mgral.series import train_and_evaluate, train_settings, visible_dataset

    if not config.full_data_reference:
        return None
    seed = config.seeds[0]
    once = train_settings(config, reference=True)
    once.pop("progress", None)
    twice = doubled(once)
    check = published_check(out_dir)
    if check is not None and (check.get("train"), check.get("seed"), check.get("preset")) == (
        once,
        seed,
        config.detector.preset,
    ):
        return check
    if not train:
        return None
    work = run_dir.parent / f"{run_dir.name}{CONVERGED_SUFFIX}"
    base = open_experiment(config, RunDir(run_dir), log, False)
    oracle = seed_oracle(base, seed)
    view = visible_dataset(base.dataset, {i: oracle.labels_for(i) for i in base.pool})
    results, seconds = {}, {}
    for key, settings in (("once", once), ("twice", twice)):
        exp = dataclasses.replace(base, config=config.model_copy(update={"reference_train": settings}))
        log(f"{run_dir.name}: converged check, the seed-{seed} reference for {length_text(settings)}")
        spent: dict[str, float] = {}
        with _torch_threads(config.threads if config.executor == "inline" else (config.threads or 1)):  # as the run's
            wdir = CycleDir(work / key / f"seed-{seed}")
            _, result = train_and_evaluate(exp, seed, 0, wdir, view, exp.pool, spent, None, True)
        results[key], seconds[key] = float(result["mAP"]), spent.get("train")
    gain = (results["twice"] - results["once"]) / results["once"] if results["once"] > 0 else float("inf")
    reference = (load_reference([run_dir]) or {}).get(seed) if run_dir.is_dir() else None  # none run yet
    check = {
        "seed": seed,
        "preset": config.detector.preset,
        "train": once,
        "train_twice": twice,
        "mAP": results["once"],
        "mAP_twice": results["twice"],
        "relative_gain": gain,
        "threshold": CONVERGED_GAIN,
        "converged": bool(gain < CONVERGED_GAIN),
        "run_reference_mAP": None if reference is None else float(reference["mAP"]),
        "train_seconds": seconds["once"],
        "train_seconds_twice": seconds["twice"],
        "machine": machine_line(),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / CONVERGED, check, indent=1)
    return check


def published_check(out_dir: Path) -> dict | None:
    """``OUT/<name>/converged.json``, or None (a dataset may be checked before its run is republished)."""
    path = out_dir / CONVERGED
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def converged_text(check: dict | None) -> str:
    """The check in one sentence (for run.md and the summary)."""
    if check is None:
        return "Converged: not checked (no finished full-data reference, or the check was skipped)"
    verdict = "**yes**" if check["converged"] else "**no**"
    return (
        f"Converged: {verdict}: the seed-{check['seed']} reference trained twice as long "
        f"({length_text(check['train'])} -> {length_text(check['train_twice'])}) scores test mAP "
        f"{check['mAP']:.4f} -> {check['mAP_twice']:.4f} ({check['relative_gain']:+.1%}; converged below "
        f"+{check['threshold']:.0%}; both trained on {check.get('machine', '?')}"
        + (
            f", where the run's own reference of that seed scored {check['run_reference_mAP']:.4f})"
            if check.get("run_reference_mAP") is not None
            else ")"
        )
    )


# -- wall time, across invocations ---------------------------------------------------------


class WallClock:
    """Records this invocation's wall seconds in ``RUNS/<name>.wall.json`` every ``every``
    seconds and at the end, so the total survives a kill (it loses at most ``every`` seconds)."""

    def __init__(self, run_dir: Path, note: dict, every: float = 60.0) -> None:
        self.path, self.every = wall_path(run_dir), every
        self.entries = read_wall(run_dir)
        self.entry = {"started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "seconds": 0.0, **note}
        self.entries.append(self.entry)
        self.t0 = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._tick, daemon=True)

    def _save(self) -> None:
        from mgral._io import atomic_write_json

        self.entry["seconds"] = round(time.perf_counter() - self.t0, 1)
        atomic_write_json(self.path, self.entries, indent=1)

    def _tick(self) -> None:
        while not self._stop.wait(self.every):
            self._save()

    def __enter__(self) -> WallClock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._save()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._save()


def wall_path(run_dir: Path) -> Path:
    return Path(run_dir).with_name(Path(run_dir).name + WALL_SUFFIX)


def read_wall(run_dir: Path) -> list[dict]:
    """The invocations recorded for ``run_dir`` (none if absent)."""
    path = wall_path(run_dir)
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else []


# -- publishing ----------------------------------------------------------------------------


def config_path(name: str) -> Path:
    """``benchmarks/configs/<name>.yaml``, or ``name`` itself when it is a YAML file."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    path = CONFIGS / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in CONFIGS.glob("*.yaml")))
        raise SystemExit(f"no benchmark config {path}; known: {known} (or pass a config file)")
    return path


def publish(name: str, run_dir: Path, out_dir: Path, command: str, converged: dict | None = None) -> Path:
    """Write the report of ``run_dir`` and copy the files a reader needs into ``out_dir``,
    with ``run.md`` (how it was made, for readers) and ``run.json`` (the same facts and the
    full-data reference, for :func:`summary_markdown`)."""
    from mgral._io import atomic_write_json, atomic_write_text
    from mgral.report import write_report
    from mgral.report.load import load_reference, metric_name, reference_map
    from mgral.runs import RunDir

    rel = os.path.relpath(run_dir)
    shown = Path(rel) if not rel.startswith("..") else run_dir  # no machine-specific path in what is committed
    with tempfile.TemporaryDirectory(prefix=f"al-{name}-") as tmp:
        write_report([shown], tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        for file in PUBLISHED:
            if (Path(tmp) / file).exists():
                shutil.copyfile(Path(tmp) / file, out_dir / file)
    config = RunDir(run_dir).config()
    wall = read_wall(run_dir)
    total = sum(e["seconds"] for e in wall)
    initial = {k: v for k, v in config["initial"].items() if v is not None}
    lines = [
        f"# {name}: how these results were made",
        "",
        f"- Regenerate: `.venv/bin/python benchmarks/al_benchmark.py {name}` (resumes the run in `runs/al-benchmark/"
        f"{name}`, first restoring the finished series of `{RECORDS}/` that it lacks; the published files were "
        f"last written by `{command}`)",
        f"- Config: `benchmarks/configs/{name}.yaml` (resolved copy in the run directory's config.yaml)",
        f"- Wall time: {total / 3600:.2f} h over {len(wall)} invocation(s) (a resumed run adds one):",
    ]
    idle = [e for e in wall if e["seconds"] < IDLE_SECONDS]
    lines += [
        f"  - {e['started']}: {e['seconds'] / 3600:.2f} h on {e.get('machine', '?')}, executor {e.get('executor')}, "
        f"{e.get('workers')} worker(s) x {e.get('threads')} thread(s), `{e.get('command', '?')}`"
        for e in wall
        if e["seconds"] >= IDLE_SECONDS
    ]
    if idle:
        lines.append(f"  - and {len(idle)} that found the run finished ({sum(e['seconds'] for e in idle):.0f} s)")
    lines += [
        f"- {converged_text(converged)}",
        f"- Detector: `{config['detector']['preset']}`, training {json.dumps(config['detector']['train'])}, "
        f"warm start {config['detector'].get('warm_start', False)}; reference training "
        f"{json.dumps(config.get('reference_train', {}))}",
        f"- Budget: initial {initial}, {config['budget']} per cycle, {config['cycles']} cycles; seeds "
        f"{config['seeds']}",
        "- Per-phase seconds in results.md are per series-cycle on one worker (1 torch thread, 2 workers sharing "
        "the cores); cycle 0's model and pool predictions are made once per seed and shared by every strategy.",
    ]
    for seed, maps in sorted(cycle0_maps(run_dir).items()):
        if len(maps) > 1:  # one shared model per seed should give every series the same cycle 0
            lines.append(
                f"- **Seed {seed}: cycle 0 differs between series** (test mAP {', '.join(f'{m:.4f}' for m in maps)}): "
                "its shared cycle-0 model was trained more than once (series restored from records made on "
                "another machine), and training is deterministic only on one machine"
            )
    atomic_write_text(out_dir / "run.md", "\n".join(lines) + "\n")
    reference = load_reference([run_dir])  # what results.md's reference line says, without re-reading the series
    facts = {
        "name": name,
        "metric": metric_name([run_dir]),
        "reference_map": reference_map(reference),
        "reference_seeds": len(reference or {}),
        "converged": converged,
        "wall_seconds": total,
        "invocations": wall,
    }
    atomic_write_json(out_dir / "run.json", facts, indent=1)
    export_records(run_dir, out_dir / RECORDS)
    return out_dir


def cycle0_maps(run_dir: Path) -> dict[int, list[float]]:
    """Per seed, the distinct cycle-0 test mAPs of its strategy series (one value when every
    series started from the seed's one shared model, as they should)."""
    from mgral.runs import REFERENCE_LABEL, RunDir, read_cycle_records

    found: dict[int, set[float]] = {}
    for s in RunDir(run_dir).list_series():
        records = read_cycle_records(s.records)
        if s.label != REFERENCE_LABEL and records:
            found.setdefault(s.seed, set()).add(records[0]["mAP"])
    return {seed: sorted(maps) for seed, maps in found.items()}


# -- published records: the finished series, without models -------------------------------


def _finished(run_dir: Path, config: dict) -> list[tuple[str, int]]:
    from mgral.runs import REFERENCE_LABEL, RunDir, read_cycle_records

    return [
        (s.label, s.seed)
        for s in RunDir(run_dir).list_series()
        if len(read_cycle_records(s.records)) > (0 if s.label == REFERENCE_LABEL else config["cycles"])
    ]


def export_records(run_dir: Path, dest: Path) -> list[tuple[str, int]]:
    """Write ``dest`` anew: ``config.yaml`` (the run's, its dataset path relative to the
    repository) and, per finished series, ``cycles.jsonl``, ``ledger.json``, MGRAL's per-cycle
    diagnostics and ``diversity.json`` (its batches' figures, computed here from the cached
    predictions that are not exported). Built beside ``dest`` and swapped in, so a kill leaves
    the old or the new records. Returns the exported series."""
    import yaml

    from mgral._io import atomic_write_json, atomic_write_text
    from mgral.report.diversity import series_figures
    from mgral.runs import CONFIG_FILE, RunDir

    config = RunDir(run_dir).config()
    series = _finished(run_dir, config)
    tmp, old = dest.with_name(dest.name + ".new"), dest.with_name(dest.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shown = json.loads(json.dumps(config))
    shown["dataset"]["path"] = os.path.relpath(config["dataset"]["path"], ROOT)  # no machine-specific path
    atomic_write_text(tmp / CONFIG_FILE, yaml.safe_dump(shown, sort_keys=False))
    for label, seed in series:
        src, dst = RunDir(run_dir).series(label, seed), RunDir(tmp).series(label, seed).mkdir()
        shutil.copyfile(src.records, dst.records)
        shutil.copyfile(src.ledger, dst.ledger)
        for cycle, cdir in src.cycles().items():
            for file in (f for f in cdir.mgral.reported if f.is_file()):
                shutil.copyfile(file, dst.cycle(cycle).mgral.mkdir().path / file.name)
        figures = series_figures(run_dir, label, seed)
        if figures:
            atomic_write_json(dst.diversity, {str(c): f for c, f in sorted(figures.items())}, indent=1)
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)
    return series


def restore_records(config, source: Path, run_dir: Path, out_dir: Path) -> list[tuple[str, int]]:
    """Copy into ``run_dir`` each published finished series (``out_dir/records``) that it does
    not hold finished, starting the run directory if there is none; and, when ``run_dir`` has
    no wall-time file, the published invocations (their time made the restored series).
    Returns the restored series.

    Raises:
        SystemExit: the records were made with a config that differs from ``config`` (read from
            ``source``; where a run executes aside), naming the keys.
    """
    import yaml

    from mgral._io import atomic_write_json
    from mgral.config import EXECUTION_KEYS, config_to_dict
    from mgral.runs import CONFIG_FILE, RunDir

    records = out_dir / RECORDS
    if not (records / CONFIG_FILE).is_file():
        return []
    resolved = json.loads(json.dumps(config_to_dict(config)))
    recorded = yaml.safe_load((records / CONFIG_FILE).read_text(encoding="utf-8"))
    recorded["dataset"]["path"] = resolved["dataset"]["path"]  # recorded relative to the repository
    differ = sorted(
        k for k in set(recorded) | set(resolved) if k not in EXECUTION_KEYS and recorded.get(k) != resolved.get(k)
    )
    if differ:
        raise SystemExit(
            f"{records}: the published records were made with a different config ({', '.join(differ)} differ "
            f"from {source}); restore that config, or move the records away to start afresh"
        )
    run = RunDir(run_dir)
    done = set(_finished(run_dir, resolved)) if run_dir.is_dir() else set()
    todo = [s for s in _finished(records, recorded) if s not in done]
    if not todo:  # nothing to bring back: no lock taken (a run in progress may hold it)
        return []
    with run.lock():
        if not (run_dir / CONFIG_FILE).exists():
            run.create(resolved)
        for label, seed in todo:
            dst = run.series(label, seed).path
            shutil.rmtree(dst, ignore_errors=True)  # an unfinished copy: the published one is further
            shutil.copytree(RunDir(records).series(label, seed).path, dst)
    facts = out_dir / "run.json"
    if not wall_path(run_dir).exists() and facts.is_file():
        atomic_write_json(wall_path(run_dir), json.loads(facts.read_text(encoding="utf-8"))["invocations"], indent=1)
    return todo


def paired_from_csv(row: dict):
    """The :class:`~mgral.report.tables.Paired` difference to random of a ``results.csv`` row.
    A table published before the intervals has the mean, std, seeds and wins: its t interval
    and sign test are computed from those (as the report computes them from the seeds)."""
    import math

    from mgral.report.metrics import sign_test_counts, t_interval
    from mgral.report.tables import Paired

    def num(key: str) -> float:
        text = row.get(key, "")
        return math.nan if text == "" else float(text)

    mean, std, wins, n = (
        num("nauc_vs_random_mean"),
        num("nauc_vs_random_std"),
        int(row["wins_vs_random"]),
        int(row["paired_seeds"]),
    )
    low, high, p = num("nauc_vs_random_low"), num("nauc_vs_random_high"), num("sign_p_vs_random")
    if math.isnan(low) and n >= 2 and not math.isnan(std):
        low, high = t_interval(mean, std, n)
        p = sign_test_counts(wins, n)  # no seed ties exactly
    return Paired(mean, std, wins, n, low, high, p)


def summary_markdown(out_root: Path, names: Sequence[str]) -> str:
    """The cross-dataset summary: per dataset, every strategy's nAUC, its paired difference to
    random, labels to reach 90% of the full-data mAP, and what it cost; read from each
    published ``results.csv`` so the summary always matches the tables."""
    import csv
    import math

    from mgral.report.tables import mean_std, vs_random_text

    def num(text: str) -> float:  # an empty cell is a missing value (a std over one seed)
        return math.nan if text == "" else float(text)

    def f(text: str, fmt: str) -> str:
        return "—" if text == "" else format(float(text), fmt)

    parts: list[str] = []
    machines: dict[str, None] = {}  # where the published runs ran, in order
    for name in names:
        path = out_root / name / "results.csv"
        if not path.exists():
            continue
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        facts = json.loads((out_root / name / "run.json").read_text(encoding="utf-8"))
        reference = "Full-data reference: none"
        if facts["reference_map"] is not None:
            reference = (
                f"Full-data reference: test {facts['metric']} {facts['reference_map']:.4f} "
                f"(mean over {facts['reference_seeds']} seed(s))"
            )
        machines.update(dict.fromkeys(e.get("machine", "?") for e in facts["invocations"]))
        rows.sort(key=lambda r: -float(r["nauc_mean"]))
        parts += [
            f"### {name}",
            "",
            f"{reference}. Wall time: {facts['wall_seconds'] / 3600:.2f} h. "
            f"Details: [`{name}/results.md`]({name}/results.md).",
            "",
            f"{converged_text(published_check(out_root / name))}.",
            "",
            "| strategy | seeds | cycles | nAUC | vs random [95% interval] (wins, sign p) | imgs to 90% "
            "| select s / cycle | select / train |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            partial = "*" if r["in_progress"] == "1" else ""
            vs = vs_random_text(None if r["nauc_vs_random_mean"] == "" else paired_from_csv(r))
            reach = f(r["labels_to_90pct"], ".0f")
            if reach != "—" and r["labels_to_90pct_seeds"] != r["seeds"]:
                reach += f" ({r['labels_to_90pct_seeds']}/{r['seeds']})"
            nauc = mean_std(num(r["nauc_mean"]), num(r["nauc_std"]))
            parts.append(
                f"| {r['label']}{partial} | {r['seeds']} | {r['cycles']} | {nauc} | {vs} | {reach} | "
                f"{f(r['seconds_select'], '.1f')} | {f(r.get('select_per_train', ''), '.2f')} |"
            )
        parts.append("")
    if not parts:
        return "No dataset published yet.\n"
    head = [
        f"Machine: {'; '.join(machines)}.",
        "",
        "nAUC: mean test mAP over the labeling range (mean ± std over seeds); vs random: the nAUC "
        "difference to random on the same seed (same initial set), the 95% interval of its mean over seeds "
        "(Student t), the seeds where it is higher and the two-sided sign test's p (*not distinguishable*: the "
        "interval covers 0); select / train: selection seconds per training second; "
        "`*`: still running (the seeds that got furthest, on the cycles they finished). Sorted by nAUC.",
        "",
    ]
    return "\n".join(head + parts)


def write_summary(out_root: Path, names: Sequence[str], readme: Path | None) -> str:
    """Write ``OUT/summary.md`` and put it between the README's markers (if both are there),
    its relative links rewritten to lead from the README's folder to the same files."""
    from mgral._io import atomic_write_text

    body = summary_markdown(out_root, names)
    atomic_write_text(out_root / "summary.md", f"# AL benchmark summary\n\n{body}")
    if readme is not None and readme.exists():
        text = readme.read_text(encoding="utf-8")
        start, end = MARKERS
        if start in text and end in text:
            head, rest = text.split(start, 1)
            _, tail = rest.split(end, 1)
            prefix = Path(os.path.relpath(out_root.resolve(), readme.resolve().parent)).as_posix()
            moved = re.sub(r"\]\((?![a-z]+:|/|#)([^)]+)\)", lambda m: f"]({prefix}/{m.group(1)})", body)
            atomic_write_text(readme, f"{head}{start}\n{moved}{end}{tail}")
    return body


# -- main ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("datasets", nargs="*", default=list(DATASETS), help=f"config names ({', '.join(DATASETS)}) or files")
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "al-benchmark", help="run directories go here")
    p.add_argument("--out", type=Path, default=HERE / "results" / "al", help="published results go here")
    p.add_argument("--readme", type=Path, default=HERE / "README.md", help="README whose al-benchmark block to update")
    p.add_argument("--executor", choices=("inline", "process", "ray"), help="override the config's executor")
    p.add_argument("--workers", type=int, help="series at once (process / ray)")
    p.add_argument("--threads", type=int, help="torch threads per series")
    p.add_argument("--ray-address", help="an existing Ray cluster (e.g. auto, ray://head:10001)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--report-only", action="store_true", help="publish what the runs hold; run nothing")
    p.add_argument(
        "--no-converged-check",
        action="store_true",
        help="skip training the reference twice as long (see converged_check)",
    )
    args = p.parse_args(argv)

    from mgral.config import load_config
    from mgral.loop import run_experiment

    overrides = list(args.overrides)
    for key, value in (("executor", args.executor), ("workers", args.workers), ("threads", args.threads)):
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.ray_address:
        overrides += ["executor=ray", f"ray_address={args.ray_address}"]
    command = "python benchmarks/al_benchmark.py " + " ".join(argv if argv is not None else sys.argv[1:])
    names = []
    for dataset in args.datasets:
        path = config_path(dataset)
        name = path.stem
        names.append(name)
        run_dir = args.runs / name
        config = load_config(path, overrides)
        restored = restore_records(config, path, run_dir, args.out / name)
        if restored:
            print(f"{name}: {len(restored)} finished series restored from {args.out / name / RECORDS}")
        if not args.report_only:
            note = {
                "command": command.strip(),
                "machine": machine_line(),
                "executor": config.executor,
                "workers": config.workers,
                "threads": config.threads,
            }
            with WallClock(run_dir, note):
                run_experiment(config, run_dir, resume=True)
        if run_dir.exists():
            train = not (args.report_only or args.no_converged_check)
            check = converged_check(config, run_dir, args.out / name, train=train)
            publish(name, run_dir, args.out / name, command.strip(), check)
            print(f"{name}: published {args.out / name}")
    known = [n for n in dict.fromkeys([*DATASETS, *names]) if (args.out / n / "results.csv").exists()]
    print(write_summary(args.out, known, args.readme))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
