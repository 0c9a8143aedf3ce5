"""Where a training step of ``mobilenet_v2_fpn`` goes, and what a frozen, cached trunk would save.

Issue 21 asks for a cheaper training regime so that 8 seeds fit on CPUs, e.g. the ImageNet trunk
frozen with its features cached once per dataset and only the layers above it trained. Before
building that cache, this measures what it could save at most. On 40 BCCD training images
(batches of 4, the benchmark configs' augmentation, one torch thread), after 2 warm-up steps:

1. a training step as the benchmarks train (blocks 2-17 of the MobileNetV2 trunk trainable);
2. a step with the whole trunk frozen (still computed): what a frozen trunk costs without a cache;
3. the trunk's forward alone, in eval mode: what a cache would remove from (2);
4. per module, wall seconds of the forward in (2) (FPN, RPN, RoI heads and their box head), and
   of the backward and optimizer step.

Writes ``benchmarks/results/train_step.md`` and ``train_step.json`` with the machine and the
load average (ratios are measured in one process, one after the other).

    .venv/bin/python benchmarks/bench_train_step.py [--steps 10]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

from mgral._io import atomic_write_json, atomic_write_text
from mgral._machine import machine_line

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHARED = Path(os.environ.get("MGRAL_SHARED_DATA", ROOT.parent / "shared" / "data"))
WARMUP = 2


def _add(parts: dict, name: str, starts: list, measuring: list) -> None:
    """A forward hook's end: add the module's time to ``parts[name]`` if the step is measured."""
    elapsed = time.perf_counter() - starts.pop()
    if measuring[0]:
        parts[name] += elapsed


def measure(steps: int) -> dict:
    import torch

    from mgral.data.formats import read_dataset
    from mgral.detectors.torchvision_detector import TorchvisionDetector
    from mgral.detectors.training import DetectionData, collate, make_config, make_optimizer

    torch.set_num_threads(1)
    dataset = read_dataset(SHARED / "bccd", "coco")
    ids = dataset.image_ids("train")[: 4 * (steps + WARMUP)]
    det = TorchvisionDetector("mobilenet_v2_fpn", dataset.categories, device="cpu", seed=0)
    model = det.model
    data = DetectionData(dataset, ids, det.class_index, hflip=0.5, scale_jitter=(0.8, 1.25))
    batches = [collate([data[i] for i in range(k, k + 4)]) for k in range(0, len(ids), 4)]
    config = make_config({"iterations": steps, "warmup_iters": 0})
    trunk = model.backbone.body
    preset_frozen = [not p.requires_grad for p in trunk.parameters()]

    measuring = [False]  # the hooks below time a module only during a measured (not a warm-up) step

    def steps_time(frozen: bool, timings: dict | None = None) -> float:
        for p, was in zip(trunk.parameters(), preset_frozen, strict=True):
            p.requires_grad_(not (frozen or was))
        optimizer = make_optimizer(model, config)
        model.train()
        total = 0.0
        for k, (_, images, targets) in enumerate(batches):
            measuring[0] = k >= WARMUP
            t0 = time.perf_counter()
            loss = sum(model(images, targets).values())
            t1 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if k >= WARMUP:
                total += time.perf_counter() - t0
                if timings is not None:
                    timings["backward + step"] += time.perf_counter() - t1
        measuring[0] = False
        return total / steps

    full = steps_time(False)
    parts: dict[str, float] = defaultdict(float)
    modules = {
        "trunk": trunk,
        "FPN": model.backbone.fpn,
        "RPN": model.rpn,
        "RoI heads": model.roi_heads,
        "box head (in RoI heads)": model.roi_heads.box_head,
    }
    hooks = []
    for name, module in modules.items():
        starts: list[float] = []
        hooks.append(module.register_forward_pre_hook(lambda m, a, s=starts: s.append(time.perf_counter())))
        hooks.append(module.register_forward_hook(lambda m, a, out, s=starts, n=name: _add(parts, n, s, measuring)))
    frozen = steps_time(True, parts)
    for h in hooks:
        h.remove()
    measured = dict(parts)  # within the measured steps only: the parts are sub-intervals of the step's time
    model.eval()
    forward = 0.0
    with torch.no_grad():
        for k, (_, images, _) in enumerate(batches):
            image_list, _ = model.transform(images)
            t0 = time.perf_counter()
            trunk(image_list.tensors)
            if k >= WARMUP:
                forward += time.perf_counter() - t0
    forward /= steps
    return {
        "steps": steps,
        "images_per_step": 4,
        "full_s": full,
        "frozen_trunk_s": frozen,
        "trunk_forward_s": forward,
        "cached_trunk_s": frozen - forward,
        "parts_s": {k: v / steps for k, v in measured.items()},
    }


def write(r: dict, load: float) -> None:
    parts = "\n".join(f"| {k} | {v:.3f} |" for k, v in r["parts_s"].items())
    run = dt.datetime.now().isoformat(timespec="minutes")
    cached = f"trunk frozen and cached (the step above minus the trunk's forward, {r['trunk_forward_s']:.3f} s)"
    text = f"""# Training step of `mobilenet_v2_fpn` (`benchmarks/bench_train_step.py`)

Machine: {machine_line(gpu_used=False)}. Run {run}; load average at start {load:.2f}.
BCCD training images, batches of {r["images_per_step"]}, hflip 0.5 and scale jitter 0.8-1.25 (the benchmark
configs'), one torch thread, mean of {r["steps"]} steps after {WARMUP} warm-up steps.

| step | seconds per step | vs the benchmarks' step |
|---|---|---|
| as the benchmarks train (trunk blocks 2-17 trainable) | {r["full_s"]:.3f} | 1.00 |
| trunk frozen, still computed | {r["frozen_trunk_s"]:.3f} | {r["frozen_trunk_s"] / r["full_s"]:.2f} |
| {cached} | {r["cached_trunk_s"]:.3f} | {r["cached_trunk_s"] / r["full_s"]:.2f} |

Where the frozen-trunk step goes (wall seconds per step; the forwards of the listed modules,
then the backward pass and the optimizer step):

| part | seconds per step |
|---|---|
{parts}

A cached frozen trunk would make a step {r["full_s"] / r["cached_trunk_s"]:.1f}x cheaper at most. The layers
above the trunk (FPN, RPN, RoI heads) and their backward pass, which a cache cannot remove,
cost the rest.
"""
    atomic_write_text(RESULTS / "train_step.md", text)
    atomic_write_json(
        RESULTS / "train_step.json", {**r, "machine": machine_line(gpu_used=False), "load": load}, indent=1
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args(argv)
    if not (SHARED / "bccd").exists():
        print(f"{SHARED / 'bccd'} not found (set MGRAL_SHARED_DATA)", file=sys.stderr)
        return 2
    load = os.getloadavg()[0]
    result = measure(args.steps)
    write(result, load)
    print((RESULTS / "train_step.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
