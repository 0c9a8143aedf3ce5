"""The main job behind ``make demo``.

Until the active-learning loop exists, the demo generates the built-in digits-scenes
dataset, fits the classical baseline detector on its train split, evaluates its
predictions on the test split (COCO-style mAP with a bootstrap confidence interval) and
writes a report. Every figure in the report comes from ``mgral.evaluation``.
"""

from __future__ import annotations

import time
from pathlib import Path

from mgral._io import atomic_write_json, atomic_write_text


def run_demo(out: str | Path, *, images: int = 600, seed: int = 0, overwrite: bool = True) -> Path:
    """Run the demo into ``out`` and return the path of its Markdown report.

    Writes ``out/data`` (the dataset), ``out/predictions.json`` (COCO results),
    ``out/metrics.json`` and ``out/report.md``.
    """
    from mgral.data.synth import SynthConfig, generate
    from mgral.detectors.classical import ClassicalDigitDetector
    from mgral.evaluation import SubsetEvaluator, evaluate, write_predictions

    out = Path(out)
    seconds: dict[str, float] = {}

    t0 = time.perf_counter()
    dataset = generate(out / "data", SynthConfig(images=images, seed=seed), overwrite=overwrite)
    seconds["generate"] = time.perf_counter() - t0

    train_ids, test_ids = dataset.image_ids("train"), dataset.image_ids("test")
    t0 = time.perf_counter()
    detector = ClassicalDigitDetector(seed=seed).fit(dataset, train_ids)
    seconds["fit"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    preds = detector.predict(dataset, test_ids)
    seconds["predict"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    test = dataset.subset(test_ids)
    result = evaluate(test, preds, style="coco")
    ci = SubsetEvaluator(test, preds, style="coco").bootstrap(200, seed=seed)
    seconds["evaluate"] = time.perf_counter() - t0

    write_predictions(out / "predictions.json", preds)
    metrics = {"dataset": dataset.summary(), "metrics": result.to_dict(), "bootstrap": ci, "seconds": seconds}
    atomic_write_json(out / "metrics.json", metrics, indent=2)

    lines = [
        "# mgral demo: classical baseline on the built-in digits scenes",
        "",
        f"Dataset: {dataset.summary()} (seed {seed}), written to `{out / 'data'}`.",
        f"Detector: classical baseline (segmentation proposals + scikit-learn classifier), "
        f"fitted on {len(train_ids)} train images, evaluated on {len(test_ids)} test images.",
        "",
        "| metric | value |",
        "| --- | --- |",
    ]
    for key in ("mAP", "mAP50", "mAP75", "mAP_small", "mAP_medium", "mAP_large"):
        value = getattr(result, key)
        lines.append(f"| {key} | {'-' if value is None else f'{value:.4f}'} |")
    for key in ("mAP", "mAP50"):
        if key in ci:
            lines.append(f"| {key} 95% CI (bootstrap, 200 resamples) | [{ci[key]['low']:.4f}, {ci[key]['high']:.4f}] |")
    lines += ["", "| class | AP |", "| --- | --- |"]
    lines += [f"| {name} | {ap:.4f} |" for name, ap in result.per_class.items()]
    lines += ["", "| phase | seconds |", "| --- | --- |"]
    lines += [f"| {k} | {v:.2f} |" for k, v in seconds.items()]
    report = out / "report.md"
    atomic_write_text(report, "\n".join(lines) + "\n")
    return report
