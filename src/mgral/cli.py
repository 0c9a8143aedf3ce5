"""The ``mgral`` command line: a thin layer over the library.

Only this module turns exceptions into exit codes: an ``MgralError`` (bad input, bad
configuration) prints its message and exits with status 2; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from mgral.errors import ConfigError, MgralError, WaitingForModel

EXIT_USAGE = 2
EXIT_WAITING = 3  # a run with detector kind predictions waits for the results file of your model
FORMATS = ["coco", "voc", "yolo"]
LAYOUTS = ["voc0712", "coco2017"]  # read-only: the published data sets' folders (mgral.data.formats)


def _add_read_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--image-root",
        type=Path,
        help="directory image file names are relative to (COCO), or that holds the images of a labels-only YOLO export",
    )
    p.add_argument("--clip-boxes", action="store_true", help="clip boxes that stick out of their image")
    p.add_argument(
        "--follow-links",
        action="store_true",
        help="read dataset files that symbolic links lead to outside the dataset (refused by default)",
    )


def _add_results_options(p: argparse.ArgumentParser) -> None:
    """How a COCO results file names images and categories (Ultralytics differs)."""
    from mgral.evaluation.predictions import CATEGORIES, MATCH

    p.add_argument(
        "--match",
        choices=MATCH,
        default="auto",
        help="results image_id = the dataset's id, the file stem (Ultralytics), or auto (id if all match, else stem)",
    )
    p.add_argument(
        "--categories",
        choices=CATEGORIES,
        default="id",
        help="results category_id = the dataset's id (Detectron2, MMDetection), or the class index from 0 or from 1",
    )


def _read_opts(args: argparse.Namespace, *, check_files: bool) -> dict:
    return {
        "image_root": args.image_root,
        "clip_boxes": args.clip_boxes,
        "check_files": check_files,
        "follow_links": args.follow_links,
    }


# -- commands -------------------------------------------------------------------------------


def cmd_synth(args: argparse.Namespace) -> int:
    from mgral.data.synth import SynthConfig, generate

    config = SynthConfig(
        images=args.images,
        image_size=args.image_size,
        imbalance=args.imbalance,
        clutter=args.clutter,
        seed=args.seed,
    )
    dataset = generate(args.out, config, overwrite=args.overwrite)
    print(f"wrote {args.out}: {dataset.summary()}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from mgral.data.formats import convert

    dataset = convert(
        args.src,
        args.out,
        to=args.to,
        from_=args.from_,
        overwrite=args.overwrite,
        copy_images=not args.no_copy_images,
        flat_names=args.flat_names,
        **_read_opts(args, check_files=not args.no_copy_images),
    )
    print(f"wrote {args.out} ({args.to}): {dataset.summary()}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from mgral.data.formats import detect_format, read_dataset

    fmt = args.from_ or detect_format(args.path)
    opts = _read_opts(args, check_files=not args.no_check_files)
    dataset = read_dataset(args.path, fmt, **opts)
    print(f"{args.path} ({fmt}): {dataset.summary()}")
    _print_split_assignment(dataset, args.path)
    counts: dict[int, int] = {}
    for rec in dataset:
        for label in rec.target.labels.tolist():
            counts[label] = counts.get(label, 0) + 1
    for cat in dataset.categories:
        print(f"  {cat.id:>4}  {cat.name:<24} {counts.get(cat.id, 0):>8} boxes")
    return 0


def _print_split_assignment(dataset, path: Path) -> None:
    """What a run (default pool and test splits, a simulation) does with the images without a split."""
    from collections import Counter

    from mgral.config import DatasetConfig
    from mgral.data.splits import assign_splits

    unassigned = sum(r.split is None for r in dataset)
    if not unassigned:
        return
    setting = DatasetConfig(path=str(path)).split_setting(dataset, human=False)
    if setting is None:
        print(f"  {unassigned} images have no split: a run leaves them out (set dataset.split to assign them)")
        return
    counts = Counter(assign_splits(dataset, **setting.model_dump()).values())
    shown = ", ".join(f"{s} {counts[s]}" for s in ("train", "val", "test") if counts[s])
    print(
        f"  {unassigned} images have no split: a run assigns them: {shown} (the default dataset.split: "
        f"{{val: {setting.val:g}, test: {setting.test:g}, seed: {setting.seed}}}; stratified by rarest class)"
    )


def _add_splits_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--splits",
        type=Path,
        metavar="RUN",
        help="give the images without a split the splits run RUN recorded (RUN or RUN/splits.json); default: "
        "the assignment mgral run makes by default (see mgral info)",
    )


def _with_splits(dataset, path: Path, splits: Path | None):
    """``dataset`` with its images without a split given one, as ``mgral run`` gives them:
    the splits run ``splits`` (``--splits``) recorded, else the default assignment
    of :meth:`~mgral.config.DatasetConfig.split_setting` (a simulation's), so that ``mgral
    train`` on a plain COCO export trains on the images a run would pool and scores the
    images it would test on. A dataset whose images all have a split is returned as it is.

    Raises:
        RunError: ``--splits`` names no run that recorded splits.
    """
    from collections import Counter

    from mgral.config import DatasetConfig
    from mgral.data.splits import assign_splits, with_splits
    from mgral.errors import RunError
    from mgral.runs import SPLITS_FILE, RunDir

    given = splits
    if given is not None:
        run = RunDir(given.parent if given.name == SPLITS_FILE and given.is_file() else given)
        recorded = run.recorded_splits()
        if recorded is None:
            raise RunError(
                f"--splits {given}: no {SPLITS_FILE} there (a run writes one only when it assigned splits); "
                "pass a run directory that assigned them, or leave --splits out"
            )
        out = with_splits(dataset, recorded["images"], source=str(run.splits_file))
        print(f"note: splits of the images without one read from {run.splits_file}", file=sys.stderr)
        return out
    unassigned = sum(r.split is None for r in dataset)
    setting = DatasetConfig(path=str(path)).split_setting(dataset, human=False)
    if not unassigned or setting is None:
        return dataset
    assigned = assign_splits(dataset, **setting.model_dump())
    counts = Counter(assigned.values())
    shown = ", ".join(f"{s} {counts[s]}" for s in ("train", "val", "test") if counts[s])
    print(
        f"note: {unassigned} images have no split; assigned as mgral run does by default: {shown} "
        f"(val {setting.val:g}, test {setting.test:g}, seed {setting.seed}); --splits RUN uses a run's assignment",
        file=sys.stderr,
    )
    return with_splits(dataset, assigned)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from mgral.data.formats import read_dataset
    from mgral.evaluation import SubsetEvaluator, evaluate, read_predictions

    gt = read_dataset(args.gt, args.gt_format, **_read_opts(args, check_files=False))
    if args.split:  # the splits --split names, given to images without one as mgral run gives them
        gt = _with_splits(gt, args.gt, args.splits)
    preds = read_predictions(args.pred, gt, match=args.match, categories=args.categories)
    if args.split:
        gt, preds = _restrict_to_splits(gt, preds, args.split, source=args.pred)
    _warn_if_partly_covered(gt, preds, source=args.pred, split_given=bool(args.split))
    result = evaluate(gt, preds, style=args.style)
    payload = result.to_dict()
    payload["images_with_predictions"] = sum(1 for d in preds.values() if len(d))
    if args.bootstrap:
        evaluator = SubsetEvaluator(gt, preds, style=args.style)
        payload["bootstrap"] = evaluator.bootstrap(args.bootstrap, seed=args.seed)
    if args.json:
        print(json.dumps(payload, indent=2))
    else:
        _print_metrics(payload)
    return 0


def _warning(text: str) -> None:
    print(f"mgral: warning: {text}", file=sys.stderr)


def _restrict_to_splits(gt, preds: dict, splits: Sequence[str], *, source: Path):
    """The ground truth and predictions of the images in ``splits`` (``--split``)."""
    wanted = [s.strip() for part in splits for s in part.split(",") if s.strip()]
    ids = gt.image_ids(wanted)
    if not ids:
        present = sorted({str(r.split) for r in gt})
        raise ConfigError(
            f"--split {','.join(wanted)}: the ground truth has no image in that split; its splits: {', '.join(present)}"
        )
    keep = set(ids)
    outside = [i for i, d in preds.items() if len(d) and i not in keep]
    if outside:
        _warning(
            f"{source}: {len(outside)} predicted images are outside split {','.join(wanted)} "
            f"(e.g. image {outside[0]!r}, split {gt[outside[0]].split!r}); they are left out"
        )
    return gt.subset(ids), {i: d for i, d in preds.items() if i in keep}


def _warn_if_partly_covered(gt, preds: dict, *, source: Path, split_given: bool) -> None:
    """Say so when the predictions look made for part of the ground truth: every image
    without a prediction counts all its boxes as missed, which silently sinks the mAP."""
    covered = {i for i, d in preds.items() if len(d)}
    if not len(gt):
        return
    evaluated_splits = {r.split for r in gt}
    covered_splits = {gt[i].split for i in covered}
    one_split_only = not split_given and covered and covered_splits < evaluated_splits
    if len(covered) >= 0.5 * len(gt) and not one_split_only:
        return
    text = (
        f"{source}: predictions cover only {len(covered)} of the {len(gt)} ground-truth images "
        f"({len(covered) / len(gt):.0%}); each image without predictions counts all its boxes as missed"
    )
    if one_split_only:
        names = ",".join(sorted(str(s) for s in covered_splits))
        text += f". Every predicted image is in split {names}: pass --split {names} to score that split alone"
    _warning(text)


def _print_metrics(payload: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.4f}"

    console = Console()
    summary = Table(title=f"{payload['style']} metrics over {payload['num_images']} images")
    summary.add_column("metric")
    summary.add_column("value", justify="right")
    for key in ("mAP", "mAP50", "mAP75", "mAP_small", "mAP_medium", "mAP_large", "AR1", "AR10", "AR100"):
        if key in payload:
            summary.add_row(key, fmt(payload[key]))
    boot = payload.get("bootstrap")
    if boot:
        for key, ci in boot.items():
            if isinstance(ci, dict) and "low" in ci:
                summary.add_row(f"{key} {ci.get('confidence', 0.95):.0%} CI", f"[{fmt(ci['low'])}, {fmt(ci['high'])}]")
    console.print(summary)
    per_class = Table(title="per-class AP")
    per_class.add_column("class")
    per_class.add_column("AP", justify="right")
    for name, ap in payload["per_class"].items():
        per_class.add_row(name, fmt(ap))
    console.print(per_class)


def _params(pairs: Sequence[str]) -> dict:
    """``key=value`` pairs; values are parsed as YAML scalars (``false``, ``3``, ``0.5``)."""
    from mgral._untrusted import load_yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--param expects key=value, got {pair!r:.80}")
        out[key.strip()] = load_yaml(value, source=f"--param {key.strip()}", expected="a YAML value", error=ConfigError)
    return out


def _select_ids(dataset, *, split: str | None, ids_file: Path | None, default_split: str) -> list:
    from mgral.data.records import read_id_list

    if ids_file is not None:
        return read_id_list(ids_file, dataset)
    ids = dataset.image_ids(split or default_split)
    if not ids:
        raise ConfigError(f"the dataset has no images in split {split or default_split!r}; pass --split or an ids file")
    return ids


def _untrained_test_ids(dataset, train_ids: list, *, allow: bool, source: Path | None) -> list:
    """The test split's images to score after training: a test image trained on would make
    the printed test mAP a training figure, so ``--train-ids`` naming one is refused unless
    ``--allow-test-ids``, which leaves those images out of the test score."""
    trained = set(train_ids)
    test_ids = dataset.image_ids("test")
    overlap = [i for i in test_ids if i in trained]
    if not overlap:
        return test_ids
    if not allow:
        raise ConfigError(
            f"{source}: lists {len(overlap)} image(s) of the test split (e.g. {overlap[0]!r}); the test mAP "
            "printed after training would be measured on training images. Remove them from the file, or pass "
            "--allow-test-ids to train on them and score the test images that were not trained on"
        )
    print(f"note: {len(overlap)} test images are trained on (--allow-test-ids); the test mAP leaves them out")
    return [i for i in test_ids if i not in trained]


def cmd_train(args: argparse.Namespace) -> int:
    from mgral._io import atomic_write_json
    from mgral.data.formats import read_dataset
    from mgral.detectors import detector_class

    dataset = read_dataset(args.data, args.from_, **_read_opts(args, check_files=True))
    dataset = _with_splits(dataset, args.data, args.splits)
    train_ids = _select_ids(dataset, split="train", ids_file=args.train_ids, default_split="train")
    test_ids = _untrained_test_ids(dataset, train_ids, allow=args.allow_test_ids, source=args.train_ids)
    detector = detector_class("torchvision")(
        args.detector,
        dataset.categories,
        weights=args.weights,
        device=args.device,
        seed=args.seed,
        **_params(args.param),
    )
    overrides = {
        "epochs": args.epochs,
        "iterations": args.iterations,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "on_bad_image": args.on_bad_image,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}  # not given on the command line
    summary = detector.fit(dataset, train_ids, checkpoint_dir=args.out, resume=args.resume, **overrides)
    detector.save(args.out / "model.pt")
    report = {"train_images": len(train_ids), **summary}
    if test_ids:
        result = detector.evaluate(dataset, test_ids)
        report["test"] = result.to_dict()
        print(f"test split ({len(test_ids)} images): mAP {result.mAP:.4f}  mAP50 {result.mAP50:.4f}")
    atomic_write_json(args.out / "train.json", report, indent=2)
    print(f"model written to {args.out / 'model.pt'}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from mgral.data.formats import read_dataset
    from mgral.detectors import detector_class
    from mgral.evaluation import write_predictions

    dataset = read_dataset(args.data, args.from_, **_read_opts(args, check_files=True))
    dataset = _with_splits(dataset, args.data, args.splits)
    ids = _select_ids(dataset, split=args.split, ids_file=args.ids, default_split="test")
    detector = detector_class("torchvision").load(args.checkpoint, device=args.device)
    preds = detector.predict(dataset, ids, progress=True, on_bad_image=args.on_bad_image)
    write_predictions(args.out, preds)
    print(f"wrote {sum(len(d) for d in preds.values())} detections on {len(preds)} images to {args.out}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import signal

    from mgral.config import load_config
    from mgral.loop import run_experiment, stop_on_signals

    config = load_config(args.config, args.set)
    if args.dry_run:
        return _dry_run(config, args)
    out = args.out or Path("runs") / config.name
    stop = stop_on_signals()  # a kill stops the run's workers, then releases its lock
    try:
        with stop:
            run_experiment(config, out, resume=args.resume)
    except BaseException:
        if stop.signum is None:
            raise
        # whatever came out (Ray re-raises the interruption as its own KeyboardInterrupt)
        print(f"mgral: stopped by {signal.Signals(stop.signum).name}; resume with --resume", file=sys.stderr)
        return 128 + stop.signum  # what a shell reports for a process killed by that signal
    print(f"run finished: {out} (next: mgral report {out})")
    return 0


def _dry_run(config, args: argparse.Namespace) -> int:
    import tempfile

    from mgral.planning import dry_run

    if args.resume:
        raise ConfigError("--dry-run starts a fresh micro run; drop --resume")
    with tempfile.TemporaryDirectory(prefix="mgral-dry-run-") as tmp:
        out = args.out if args.out is not None else Path(tmp)
        result = dry_run(config, out)
        print(result.summary())
        print(f"dry run passed: {args.config} runs on its data{f' (files in {out})' if args.out else ''}")
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    from mgral.config import load_config
    from mgral.human import query

    config = load_config(args.config, args.set) if args.config is not None else None
    if config is None and args.set:
        raise ConfigError("--set changes a config: pass it with --config (a run's recorded config cannot change)")
    query(
        args.run,
        config,
        budget=args.budget,
        strategy=args.strategy,
        seed=args.seed,
        min_score=args.min_score,
        image_url_prefix=args.image_url_prefix,
    )
    return 0


def cmd_import_labels(args: argparse.Namespace) -> int:
    from mgral.human import import_labels

    import_labels(
        args.run,
        args.file,
        args.format,
        strategy=args.strategy,
        seed=args.seed,
        skip_missing=args.skip_missing,
        clip_boxes=args.clip_boxes,
    )
    return 0


def cmd_select(args: argparse.Namespace) -> int:
    from mgral.data.formats import read_dataset
    from mgral.data.records import read_id_list
    from mgral.evaluation import read_predictions
    from mgral.selection import default_pool, read_embeddings, select_batch, write_id_list

    dataset = read_dataset(args.data, args.from_, **_read_opts(args, check_files=False))
    labeled = read_id_list(args.labeled, dataset) if args.labeled else []
    preds = None
    if args.predictions:
        preds = read_predictions(args.predictions, dataset, match=args.match, categories=args.categories)
    embeddings = read_embeddings(args.embeddings, dataset) if args.embeddings else None
    pool = default_pool(dataset, labeled, args.pool_split)
    if not pool:
        raise ConfigError(
            f"{args.data}: no image left to select: {len(labeled)} of {len(dataset)} images are labeled"
            + ("" if args.pool_split else " and the val/test splits are left out (pass --pool-split to choose)")
        )
    batch = select_batch(
        dataset,
        labeled,
        args.strategy,
        args.budget,
        predictions=preds,
        embeddings=embeddings,
        params=_params(args.param),
        pool=pool,
        seed=args.seed,
    )
    write_id_list(args.out, batch.image_ids)
    detail = ""
    if preds is not None:
        detail = f"; {sum(1 for i in pool if i in preds)} pool images have predictions, the others count as empty"
    print(f"wrote {len(batch.image_ids)} image ids to {args.out} ({args.strategy}; pool {len(pool)}{detail})")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from mgral.report import write_report
    from mgral.tracking import trackers_of

    out = args.out or args.runs[0] / "report"
    path = write_report(args.runs, out)
    print(path.read_text())
    print(f"report written to {out}")
    for run in args.runs:
        for tracker in trackers_of(run):  # the stores the run was logged to (tracking, mgral track)
            tracker.log_report(out)
            print(f"report logged to {tracker.uri} (the run of {run})")
    return 0


def cmd_track(args: argparse.Namespace) -> int:
    from mgral.config import config_from_dict
    from mgral.runs import RunDir
    from mgral.tracking import Tracker

    run = RunDir(args.run)
    tracking = config_from_dict(run.config(), source=str(run.config_file)).tracking
    uri = args.uri or (tracking.uri if tracking else None)
    experiment = args.experiment or (tracking.experiment if tracking else None)
    tracker = Tracker(args.run, uri=uri, experiment=experiment)
    logged = tracker.sync()
    print(f"{args.run}: {logged} new cycle record(s) logged to {tracker.uri}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from mgral.data.formats import FORMATS
    from mgral.detectors.models import PRESETS
    from mgral.strategies import STRATEGIES

    entries = list({"formats": FORMATS, "detectors": PRESETS, "strategies": STRATEGIES}[args.what].entries())
    width = max(len(e.name) for e in entries)
    if args.what == "detectors":
        print("kind torchvision (detector.preset):")
    for entry in entries:
        print(f"{entry.name:<{width}}  {entry.summary}")
    if args.what == "detectors":
        from mgral.detectors import KINDS

        print("kinds (detector.kind):")
        for kind in KINDS.entries():
            print(f"{kind.name:<{width}}  {kind.summary}")
    return 0


# -- parser ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from mgral import __version__

    parser = argparse.ArgumentParser(prog="mgral", description="Active learning for object detection.")
    parser.add_argument("--version", action="version", version=f"mgral {__version__}")
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="show no progress bars or run display (mgral --no-progress run ...); the logged lines stay",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="generate the built-in digits-scenes dataset (COCO)")
    p.add_argument("--out", type=Path, required=True, help="directory to write the dataset into")
    p.add_argument("--images", type=int, default=600, help="number of scenes (default 600)")
    p.add_argument("--seed", type=int, default=0, help="seed of the scenes (same seed, same dataset)")
    p.add_argument("--image-size", type=int, default=128, help="side of each square scene in pixels")
    p.add_argument("--imbalance", type=float, default=1.0, help="most / least frequent class ratio (1 = balanced)")
    p.add_argument("--clutter", type=float, default=1.0, help="background clutter strength (0 = none)")
    p.add_argument("--overwrite", action="store_true", help="replace an output directory that mgral wrote")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("convert", help="convert a dataset between COCO, VOC and YOLO")
    p.add_argument("src", type=Path, help="the dataset to convert (file or directory)")
    p.add_argument("--to", required=True, choices=["coco", "voc", "yolo"], help="output format")
    p.add_argument("--out", type=Path, required=True, help="output directory (new or empty)")
    p.add_argument("--from", dest="from_", choices=FORMATS + LAYOUTS, help="source format (default: detected)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace a non-empty output directory that mgral wrote (.mgral-output)"
    )
    p.add_argument("--no-copy-images", action="store_true", help="write annotations only")
    p.add_argument(
        "--flat-names",
        action="store_true",
        help="COCO: file_name = the image's base name, images flat in --out (as CVAT names uploaded images); "
        "refused when two images share a base name",
    )
    _add_read_options(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("info", help="read a dataset, validate it and print a summary")
    p.add_argument("path", type=Path, help="the dataset (file or directory)")
    p.add_argument("--from", dest="from_", choices=FORMATS + LAYOUTS, help="its format (default: detected)")
    p.add_argument("--no-check-files", action="store_true", help="do not check that image files exist")
    _add_read_options(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("evaluate", help="mAP of predictions against ground truth")
    p.add_argument("--gt", type=Path, required=True, help="ground truth dataset (COCO / VOC / YOLO)")
    p.add_argument("--gt-format", choices=FORMATS + LAYOUTS, help="ground truth format (default: detected)")
    p.add_argument("--pred", type=Path, required=True, help="COCO results list (or a COCO dataset with scores)")
    p.add_argument("--style", choices=["coco", "voc07", "voc12"], default="coco", help="metric (default coco)")
    p.add_argument(
        "--split",
        action="append",
        metavar="NAME",
        help="score only the ground truth's images of this split (repeat, or val,test); default: every image",
    )
    _add_results_options(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--bootstrap", type=int, default=0, metavar="N", help="95%% CI of mAP from N image resamples")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling")
    _add_splits_option(p)
    _add_read_options(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("train", help="train a detector on a dataset's train split")
    p.add_argument("data", type=Path, help="the dataset (COCO / VOC / YOLO)")
    p.add_argument("--from", dest="from_", choices=["coco", "voc", "yolo"], help="its format (default: detected)")
    p.add_argument("--detector", required=True, help="preset name (mgral list detectors)")
    p.add_argument("--out", type=Path, required=True, help="directory for model.pt, last.pt, train.json")
    p.add_argument("--train-ids", type=Path, help="file of image ids to train on (default: the train split)")
    p.add_argument(
        "--allow-test-ids",
        action="store_true",
        help="let --train-ids name test-split images (they are then left out of the printed test mAP)",
    )
    p.add_argument("--epochs", type=int, help="passes over the training images (default: the preset's)")
    p.add_argument("--iterations", type=int, help="optimizer steps instead of epochs")
    p.add_argument("--batch-size", type=int, help="images per step (default: the preset's)")
    p.add_argument("--lr", type=float, help="learning rate (default: the preset's)")
    p.add_argument("--weights", type=Path, help="local weights file (never downloaded)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and data order")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="preset parameter")
    p.add_argument("--on-bad-image", choices=["raise", "skip"], help="an image that fails to decode: stop or skip it")
    _add_splits_option(p)
    _add_read_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("predict", help="predict with a trained detector; writes COCO results")
    p.add_argument("data", type=Path, help="the dataset (COCO / VOC / YOLO)")
    p.add_argument("--from", dest="from_", choices=["coco", "voc", "yolo"], help="its format (default: detected)")
    p.add_argument("--checkpoint", type=Path, required=True, help="model.pt written by mgral train or mgral run")
    p.add_argument("--out", type=Path, required=True, help="COCO results JSON to write")
    p.add_argument("--split", choices=["train", "val", "test"], help="images to predict (default: test)")
    p.add_argument("--ids", type=Path, help="file of image ids to predict")
    p.add_argument(
        "--on-bad-image",
        choices=["raise", "skip"],
        default="raise",
        help="an image that fails to decode: stop or skip it",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    _add_splits_option(p)
    _add_read_options(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("run", help="run an active-learning experiment from a YAML config")
    p.add_argument("config", type=Path, help="experiment config (YAML)")
    p.add_argument("--out", type=Path, help="run directory (default: runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out (start it if there is none yet)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check the config on its data: read the whole dataset, run one micro cycle of every strategy on a few "
        "of its images (into --out, default a temporary folder), time the detector on this device and print the "
        "full run's estimated hours",
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "query",
        help="labeling for real: train on the labels so far and write the next images to label",
        description=(
            "For a run labeled by people (config oracle.kind: human). Trains the current model on the images "
            "labeled so far (reused if already trained), evaluates it when the test split has labels, selects "
            "--budget images with the strategy, records the request in the ledger, then writes the labeling "
            "package RUN/<strategy>/seed-<s>/cycle-<c>/labeling/: images.txt, predictions_coco.json (pre-annotations, "
            "COCO) and label_studio_tasks.json (+ label_studio_config.xml). While images are pending it selects "
            "nothing new and writes their package again. The initial labeled set is initial.ids_file (labels read "
            "from the dataset file) or initial.from_dataset: true (the pool images with boxes in the dataset "
            "file; none: the first query picks images at random)."
        ),
    )
    p.add_argument("--run", type=Path, required=True, help="run directory (created from --config if it holds none)")
    p.add_argument("--config", type=Path, help="YAML config with oracle.kind: human (needed to create the run)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a --config value")
    p.add_argument("--budget", type=int, help="images to ask for (default: the config's budget)")
    p.add_argument("--strategy", metavar="LABEL", help="the strategy's label (needed if the config has several)")
    p.add_argument("--seed", type=int, help="the seed (needed if the config has several)")
    p.add_argument(
        "--min-score", type=float, default=0.5, help="leave detections scoring lower out of the pre-annotations"
    )
    p.add_argument(
        "--image-url-prefix",
        metavar="PREFIX",
        help="Label Studio data.image = PREFIX + the image's path relative to the image root, e.g. "
        "'/data/local-files/?d=' (default: the absolute path)",
    )
    p.set_defaults(func=cmd_query)

    p = sub.add_parser(
        "import-labels",
        help="labeling for real: import the labels made for the images a query asked for",
        description=(
            "Reads the annotated images (COCO JSON, VOC or YOLO directory, Label Studio JSON export), checks them "
            "(only images that were asked for; known category names; each image once; boxes inside their image), "
            "stores them in RUN/<strategy>/seed-<s>/labels.json and updates the ledger; the cycle is recorded "
            "when no asked image is pending. An image in the file is labeled (no boxes: nothing in it). Skipped: "
            "Label Studio tasks whose annotations are all cancelled (Skip), or with --skip-missing the asked "
            "images the file leaves out; a skipped image is never asked again. Asked images the file leaves out "
            "stay pending. Images imported before with the same labels are ignored: importing twice changes nothing."
        ),
    )
    p.add_argument("file", type=Path, help="COCO .json, VOC or YOLO directory, or Label Studio JSON export")
    p.add_argument("--run", type=Path, required=True, help="the run directory made by mgral query")
    p.add_argument("--format", choices=["coco", "voc", "yolo", "label-studio"], help="default: detected")
    p.add_argument("--strategy", metavar="LABEL", help="the strategy's label (needed if the run has several)")
    p.add_argument("--seed", type=int, help="the seed (needed if the run has several)")
    p.add_argument("--skip-missing", action="store_true", help="mark the asked images the file leaves out skipped")
    p.add_argument("--clip-boxes", action="store_true", help="clip boxes that stick out of their image")
    p.set_defaults(func=cmd_import_labels)

    p = sub.add_parser("select", help="the next images to label, from your own model's predictions (one shot)")
    p.add_argument("--data", type=Path, required=True, help="the dataset, labeled images and pool (COCO/VOC/YOLO)")
    p.add_argument("--from", dest="from_", choices=FORMATS + LAYOUTS, help="its format (default: detected)")
    p.add_argument("--labeled", type=Path, help="file of the image ids labeled so far, one a line (default: none)")
    p.add_argument("--strategy", required=True, help="strategy name (mgral list strategies)")
    p.add_argument("--budget", type=int, required=True, help="how many images to select")
    p.add_argument("--out", type=Path, required=True, help="file to write the selected image ids to, one a line")
    p.add_argument("--predictions", type=Path, help="your model's COCO results on the pool")
    _add_results_options(p)
    p.add_argument("--embeddings", type=Path, help=".npz of one vector per image (ids + embeddings, or one per id)")
    p.add_argument("--param", "--params", action="append", default=[], metavar="KEY=VALUE", help="strategy parameter")
    p.add_argument(
        "--pool-split", action="append", metavar="NAME", help="select only from this split (default: all but val/test)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the strategy's random choices")
    _add_read_options(p)
    p.set_defaults(func=cmd_select)

    p = sub.add_parser("report", help="AL curves and results tables of one or more runs")
    p.add_argument("runs", type=Path, nargs="+", help="run directories to report together")
    p.add_argument("--out", type=Path, help="output directory (default: RUN/report)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "track",
        help="log a run (finished or not) to MLflow: its config, every cycle's metrics",
        description=(
            "Logs the run's config and every finished cycle not logged yet to MLflow: one run for the mgral run, "
            "one nested run per strategy and seed, metrics at step = labeled images. Safe to repeat, and beside a "
            "running mgral run: nothing is logged twice. The store: --uri, else the config's tracking.uri, else "
            "RUN/_tracking/mlflow.db (mlflow ui --backend-store-uri sqlite:///RUN/_tracking/mlflow.db). Needs "
            "pip install 'mgral[mlflow]'."
        ),
    )
    p.add_argument("run", type=Path, help="the run directory")
    p.add_argument("--uri", help="MLflow tracking server or database URI (default: the run's own SQLite store)")
    p.add_argument("--experiment", help="MLflow experiment name (default: the config's tracking.experiment or name)")
    p.set_defaults(func=cmd_track)

    p = sub.add_parser("list", help="what is registered")
    p.add_argument("what", choices=["formats", "detectors", "strategies"], help="which registry to list")
    p.set_defaults(func=cmd_list)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from mgral import progress

    parser = build_parser()
    args = parser.parse_args(argv)
    shown = progress.enable(not args.no_progress)
    try:
        if getattr(args, "bootstrap", 0) < 0:
            raise ConfigError(f"--bootstrap expects a non-negative number of resamples, got {args.bootstrap}")
        return args.func(args)
    except WaitingForModel as err:
        print(f"mgral: waiting for your model: {err}", file=sys.stderr)
        return EXIT_WAITING
    except MgralError as err:
        print(f"mgral: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as err:
        from mgral._io import disk_full, is_disk_full

        if not is_disk_full(err):
            raise
        # Writes outside mgral._io's atomic writers (e.g. a dataset written into the
        # temporary directory of an atomic_directory) end here; nothing was moved into place.
        print(f"mgral: error: {disk_full(err.filename or 'an output file', err)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("mgral: interrupted", file=sys.stderr)
        return 130
    finally:
        progress.enable(shown)
