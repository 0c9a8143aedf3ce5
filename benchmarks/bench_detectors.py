"""Detector benchmark: throughput, peak memory and mAP of the CPU presets.

Runs each configuration in its own subprocess (so that peak memory is that run's own):
* ``tiny`` on the built-in digits scenes (600 images, seed 0): train on the train split
  for the preset's default schedule, evaluate on the test split;
* ``mobilenet_v2_fpn`` on ``../shared/data/bccd`` (train split, test split), with and
  without the ImageNet MobileNetV2 trunk, for a fixed budget of epochs.

Writes ``benchmarks/results/detectors.md`` (and ``detectors.json``) with the machine.

    .venv/bin/python benchmarks/bench_detectors.py [--bccd-epochs 8] [--only tiny]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mgral._machine import machine_line

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHARED = Path(os.environ.get("MGRAL_SHARED_DATA", ROOT.parent / "shared" / "data"))


def run_one(spec: dict) -> dict:
    """Train, predict and evaluate one configuration in this process; return its figures."""
    import torch

    from mgral.data.formats import read_dataset
    from mgral.data.synth import SynthConfig, generate
    from mgral.detectors.torchvision_detector import TorchvisionDetector
    from mgral.evaluation import evaluate

    if spec["data"] == "digits":
        dataset = generate(Path(tempfile.mkdtemp()) / "digits", SynthConfig(images=600, seed=0))
    else:
        dataset = read_dataset(SHARED / spec["data"], spec.get("format"))
    train_ids, test_ids = dataset.image_ids("train"), dataset.image_ids("test")
    det = TorchvisionDetector(
        spec["preset"], dataset.categories, device="cpu", seed=0, train={"progress": False}, **spec.get("params", {})
    )
    t0 = time.perf_counter()
    summary = det.fit(dataset, train_ids, **spec.get("train", {}))
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    preds = det.predict(dataset, test_ids, embeddings=False)
    predict_s = time.perf_counter() - t0
    result = evaluate(dataset.subset(test_ids), preds)
    return {
        "name": spec["name"],
        "train_images": len(train_ids),
        "test_images": len(test_ids),
        "epochs": summary["epochs"],
        "iterations": summary["iterations"],
        "train_s": round(train_s, 1),
        "train_img_per_s": round(summary["images_seen"] / train_s, 2),
        "predict_img_per_s": round(len(test_ids) / predict_s, 2),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 0),
        "mAP": round(result.mAP, 4),
        "mAP50": round(result.mAP50, 4),
        "per_class": {k: round(v, 4) for k, v in result.per_class.items()},
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bccd-epochs", type=int, default=8)
    parser.add_argument("--only", help="run only configurations whose name contains this")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one spec (JSON) and print JSON
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(json.loads(args.one))))
        return

    specs = [{"name": "tiny / digits", "preset": "tiny", "data": "digits"}]
    if (SHARED / "bccd").is_dir():
        for pretrained in (True, False):
            specs.append(
                {
                    "name": f"mobilenet_v2_fpn / bccd / {'ImageNet trunk' if pretrained else 'from scratch'}",
                    "preset": "mobilenet_v2_fpn",
                    "data": "bccd",
                    "format": "voc",
                    "params": {"pretrained": pretrained},
                    "train": {"epochs": args.bccd_epochs},
                }
            )
    all_specs = list(specs)
    names = [s["name"] for s in all_specs]
    if args.only:
        specs = [s for s in specs if args.only in s["name"]]
    rows = []
    for spec in specs:
        print(f"running {spec['name']} ...", flush=True)
        proc = subprocess.run(
            [sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True, cwd=ROOT
        )
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            raise SystemExit(f"{spec['name']} failed:\n{proc.stderr[-4000:]}")
        rows.append(json.loads(line[len("RESULT ") :]))
        print(rows[-1], flush=True)

    RESULTS.mkdir(parents=True, exist_ok=True)
    previous = RESULTS / "detectors.json"
    if args.only and previous.exists():  # keep the other configurations' rows from earlier runs
        done = {r["name"] for r in rows}
        rows = [r for r in json.loads(previous.read_text()) if r["name"] not in done] + rows
        rows.sort(key=lambda r: [s["name"] for s in all_specs].index(r["name"]) if r["name"] in names else 99)
    previous.write_text(json.dumps(rows, indent=2) + "\n")
    lines = [
        "# Detector benchmark (CPU)",
        "",
        f"Machine: {machine_line()}. Date: {dt.date.today()}. Command: `.venv/bin/python benchmarks/bench_detectors.py"
        f" --bccd-epochs {args.bccd_epochs}`.",
        "Each row runs in its own process; peak memory is that process's maximum resident set size. Rows may come "
        "from separate invocations (`--only`), each on this machine.",
        "",
        "| configuration | train imgs | epochs | train s | train img/s | predict img/s | peak MiB | test mAP "
        "| test mAP50 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['train_images']} | {r['epochs']} | {r['train_s']} | {r['train_img_per_s']} | "
            f"{r['predict_img_per_s']} | {r['peak_rss_mib']:.0f} | {r['mAP']:.4f} | {r['mAP50']:.4f} |"
        )
    lines += ["", "Per-class AP (COCO AP@[.5:.95]) on the test split:", ""]
    for r in rows:
        lines.append(f"- {r['name']}: " + ", ".join(f"{k} {v:.3f}" for k, v in r["per_class"].items()))
    (RESULTS / "detectors.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS / 'detectors.md'}")


if __name__ == "__main__":
    main()
