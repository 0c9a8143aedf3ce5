"""The experiment config: YAML in, validated, unknown keys refused with the valid keys listed.

A config is a handful of flat sections; plug-ins are a registered name plus flat
parameters (``detector.preset`` + ``detector.params``, ``strategies[i].name`` +
``strategies[i].params``), validated in depth by the layer that builds them.

Conventions:

* Cycles: cycle 0 trains on the initial labeled set, then ``cycles`` query rounds follow,
  each adding up to ``budget`` images; a series trains ``cycles + 1`` models, so its AL
  curve has ``cycles + 1`` points (see :mod:`mgral.pool`).
* Paths (``dataset.path``, ``dataset.image_root``, ``detector.weights``,
  ``initial.ids_file``): a relative path written in a config file is relative to that
  file's directory (a config travels with the data it names); one given with ``--set`` is
  relative to the current directory, like any command-line argument. The resolved config
  (:func:`config_to_dict`) holds absolute paths, so a recorded config means the same
  wherever it is read.
* Overrides: ``--set KEY=VALUE`` with a dotted key (``detector.train.epochs=3``; list
  entries by index, ``strategies.1.params.aggregation=sum``) and a YAML value
  (``seeds=[0, 1]``, ``strategies=[{name: random}]``).
"""

from __future__ import annotations

import os
import types
import typing
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mgral._io import atomic_write_text
from mgral._untrusted import load_yaml, read_regular_file, short_repr
from mgral.errors import ConfigError
from mgral.executors import JobPlacement, valid_device
from mgral.runs import LABEL_PATTERN

NonNegInt = Annotated[int, Field(ge=0)]


class _Section(BaseModel):
    # strict: YAML already gives typed values, so "4" for an int or 1 for a bool is a mistake
    model_config = ConfigDict(extra="forbid", strict=True)


class SplitConfig(_Section):
    """How the images a dataset leaves without a split get one: ``val`` and ``test`` are the
    fractions of those images that go to each, the rest to ``train``; ``seed`` makes the draw
    repeatable (see :func:`mgral.data.splits.assign_splits`: seeded, stratified by each image's
    rarest class). mgral's loop never reads ``val``; the default keeps none."""

    val: float = Field(default=0.0, ge=0, lt=1)
    test: float = Field(default=0.2, ge=0, lt=1)
    seed: NonNegInt = 0

    @model_validator(mode="after")
    def _leave_train(self) -> SplitConfig:
        if self.val + self.test >= 1:
            raise ValueError(f"val {self.val:g} + test {self.test:g} leave no image for train; expected val + test < 1")
        return self


class DatasetConfig(_Section):
    """Where the pool and the test images come from.

    ``synth`` (the parameters of :class:`mgral.data.synth.SynthConfig`, e.g.
    ``{images: 600, seed: 0}``): if ``path`` does not exist, generate the built-in digits
    scenes there first. ``test_split``: one split or a list of them (``[val, test]`` where one
    test split is too small to rank strategies); none may be one of the ``pool_splits``.

    ``format: voc0712`` / ``coco2017`` read the published data sets in their standard
    folders (:mod:`mgral.data.voc0712`, :mod:`mgral.data.coco2017`). Their splits have the
    layout's names, and ``pool_splits`` / ``test_split`` default to the AL papers' choice:
    ``[2007-trainval, 2012-trainval]`` / ``2007-test``, and ``[train2017]`` / ``val2017``.

    ``follow_links``: read image and annotation files that symbolic links lead to outside the
    dataset's root (refused by default, as ``../`` names are).

    ``split`` (:class:`SplitConfig`, e.g. ``{test: 0.2, seed: 0}``): give the images without a
    split one (a COCO export without ``split`` fields has none). Left out, it is the default
    :class:`SplitConfig` (test 0.2, seed 0) exactly when images have no split and the pool
    splits, or (in a simulation) the test split, would otherwise hold no image; a run labeled
    by people then puts them all in the pool (it needs no test split). Images that have a
    split keep it. A run records what it assigned (:meth:`mgral.runs.RunDir.recorded_splits`).
    """

    path: str = Field(min_length=1)
    format: Literal["coco", "voc", "yolo", "voc0712", "coco2017"] | None = None
    image_root: str | None = None
    pool_splits: list[str] = Field(default=["train"], min_length=1)
    test_split: str | list[str] = "test"
    clip_boxes: bool = False
    follow_links: bool = False
    synth: dict[str, Any] | None = None
    split: SplitConfig | None = None

    @field_validator("synth")
    @classmethod
    def _check_synth(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            from mgral.data.synth import SynthConfig  # PIL and friends: only when a config uses synth

            valid = [f.name for f in fields(SynthConfig)]
            unknown = [k for k in value if k not in valid]
            if unknown:
                raise ValueError(f"unknown key {unknown[0]!r}; valid keys: {', '.join(valid)}")
            try:
                SynthConfig(**value)
            except (ConfigError, TypeError) as err:
                raise ValueError(str(err).removeprefix("synth: ")) from err
        return value

    @model_validator(mode="before")
    @classmethod
    def _layout_splits(cls, data: Any) -> Any:
        """A layout's own split names, when the config leaves the splits out."""
        if isinstance(data, dict) and data.get("format") in _LAYOUTS:
            _, pool, test = _layout_splits(data["format"])
            data = {"pool_splits": list(pool), "test_split": test, **data}
        return data

    @model_validator(mode="after")
    def _check_splits(self) -> DatasetConfig:
        if self.format in _LAYOUTS:
            names, _, _ = _layout_splits(self.format)
            for split in [*self.pool_splits, *self.test_splits]:
                if split not in names:
                    raise ValueError(
                        f"split {split!r} is not one of the {self.format} layout's splits ({', '.join(names)}); "
                        "leave pool_splits and test_split out for the AL papers' choice"
                    )
        if isinstance(self.test_split, list) and not self.test_split:
            raise ValueError("test_split is an empty list; name the split(s) the test images are in, e.g. test")
        if both := [s for s in self.test_splits if s in self.pool_splits]:
            raise ValueError(
                f"test_split {both[0]!r} is also a pool split ({self.pool_splits}); the test "
                "images must stay out of the pool"
            )
        if self.synth is not None and self.format not in (None, "coco"):
            raise ValueError(f"synth generates a COCO dataset but format is {self.format!r}; remove format")
        return self

    @property
    def test_splits(self) -> list[str]:
        """``test_split`` as a list."""
        return [self.test_split] if isinstance(self.test_split, str) else list(self.test_split)

    def split_setting(self, dataset: Any, *, human: bool) -> SplitConfig | None:
        """How this config assigns the unassigned images of ``dataset`` (a
        :class:`mgral.data.Dataset`; ``human``: a run labeled by people), or None: not at all
        (see the class docstring)."""
        if not any(r.split is None for r in dataset):
            return None
        if self.split is not None:
            return self.split
        if dataset.image_ids(self.pool_splits) and (human or dataset.image_ids(self.test_split)):
            return None
        return SplitConfig(test=0.0) if human else SplitConfig()

    def check_splits(self, dataset: Any, *, human: bool) -> None:
        """Refuse a dataset whose pool splits (or, unless ``human``, test split) hold no image,
        saying which splits it has and what to set.

        Raises:
            ConfigError: naming the empty split, the dataset's splits and the fix.
        """
        counts = Counter(r.split or "unassigned" for r in dataset)
        others = [k for k in counts if k not in ("unassigned", *self.test_splits, *self.pool_splits)]
        if not dataset.image_ids(self.pool_splits):
            empty = f"the pool splits {self.pool_splits} hold"
            fix = f"set dataset.pool_splits: [{others[0]}]" if others else "give the pool images the split train"
        elif not human and not dataset.image_ids(self.test_split):
            empty = f"the test split {self.test_split!r} holds"
            fix = (
                f"set dataset.test_split: {others[0]}"
                if others
                else f"give some images the split {self.test_splits[0]}"
            )
        else:
            return
        has = ", ".join(f"{k} {v}" for k, v in counts.items()) or "no image"
        raise ConfigError(
            f"{self.path}: {empty} no image (the dataset has {has}); {fix}, or remove the images' split so that "
            "mgral assigns one (dataset.split)"
        )

    def synth_config(self) -> Any:
        """The :class:`mgral.data.synth.SynthConfig` to generate with, or None."""
        from mgral.data.synth import SynthConfig

        return None if self.synth is None else SynthConfig(**self.synth)


_LAYOUTS = ("voc0712", "coco2017")


def _layout_splits(layout: str) -> tuple[tuple[str, ...], tuple[str, ...], str]:
    from mgral.data.formats import LAYOUT_SPLITS  # the readers: only when a config names a layout

    return LAYOUT_SPLITS[layout]


DEFAULT_PRESET = "mobilenet_v2_fpn"
"""The detector of a config that names none: Faster R-CNN that trains on a CPU."""


class DetectorConfig(_Section):
    """A detector: its kind (``torchvision``: a preset, its flat parameters, training overrides
    (epochs, batch_size, lr, ...); ``predictions``: your own model's results files, named in
    ``params``, see :mod:`mgral.detectors.predictions`)."""

    kind: str = "torchvision"
    preset: str | None = Field(default=None, min_length=1)
    weights: str | None = None
    params: dict[str, Any] = {}
    train: dict[str, Any] = {}
    device: str = "auto"
    warm_start: bool = False
    """Cycle c > 0 starts from cycle c-1's weights instead of the preset's initialisation
    (same training recipe). Off by default: the from-scratch protocol of the AL papers."""

    @model_validator(mode="after")
    def _check_kind(self) -> DetectorConfig:
        from mgral.detectors import KINDS

        if self.kind not in KINDS:
            raise ValueError(f"kind {self.kind!r} is not a detector kind; valid kinds: {', '.join(KINDS.names())}")
        if self.kind == "torchvision" and self.preset is None:
            self.preset = DEFAULT_PRESET
        if self.kind != "torchvision" and (self.preset is not None or self.train or self.weights or self.warm_start):
            raise ValueError(
                f"kind {self.kind!r}: your own model trains elsewhere, so preset, weights, train and warm_start do "
                "not apply; remove them"
            )
        return self


class StrategySpec(_Section):
    """A registered strategy, its flat parameters, and a label naming this configuration of it
    (default: the name; labels must be unique and name the series' directory)."""

    name: str = Field(min_length=1)
    params: dict[str, Any] = {}
    label: str | None = None

    @model_validator(mode="after")
    def _default_label(self) -> StrategySpec:
        if self.label is None:
            self.label = self.name
        if self.label == "reference":
            raise ValueError("label 'reference' is reserved for the full-data reference run; choose another label")
        if not LABEL_PATTERN.fullmatch(self.label):
            raise ValueError(
                f"label {self.label!r} cannot name a directory; use letters, digits, '.', '_', '+', "
                "'-', starting with a letter or digit (set label: explicitly)"
            )
        return self


class InitialConfig(_Section):
    """The initial labeled set (cycle 0): exactly one of a size, a fraction of the pool, or an id file.

    With ``oracle.kind: human`` (people label the images) the initial set is labels you
    already have: ``ids_file`` (exactly those pool images; their labels are read from the
    dataset file, an image without boxes there counts as labeled with no objects) or
    ``from_dataset: true`` (the pool images that carry at least one box in the dataset file;
    none at all is a cold start: the first query picks images at random). ``size`` and
    ``fraction`` draw from the hidden labels of a simulation and are refused there.
    """

    size: int | None = Field(default=None, ge=1)
    fraction: float | None = Field(default=None, gt=0, lt=1)
    ids_file: str | None = None
    from_dataset: Literal[True] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> InitialConfig:
        given = [k for k in ("size", "fraction", "ids_file", "from_dataset") if getattr(self, k) is not None]
        if len(given) != 1:
            got = " and ".join(given) if given else "none"
            raise ValueError(
                f"set exactly one of size, fraction, ids_file (got {got}); a human-labeled run may set "
                "from_dataset: true instead"
            )
        return self


class EvaluationConfig(_Section):
    """How every cycle's model is scored on the test split: the record's ``mAP``.

    ``coco``: mAP@[.5:.95] (cocoapi's protocol); ``voc07``: Pascal VOC 11-point AP at IoU 0.5
    (the VOC07 test metric of the VOC AL papers); ``voc12``: all-point AP at IoU 0.5. Under the
    VOC styles ``mAP50`` equals ``mAP`` and ``per_class`` holds AP@0.5; ``difficult`` objects
    are ignored (COCO style ignores ``iscrowd`` ones).
    """

    style: Literal["coco", "voc07", "voc12"] = "coco"


class OracleConfig(_Section):
    """Who labels the images the strategies pick.

    ``kind: simulated`` reveals the dataset's hidden labels at once (an experiment; ``box_cost``
    and the annotation noise ``label_noise`` / ``drop_boxes``, fractions of boxes, apply).
    ``kind: human``: people label them in their own tool, one round at a time (``mgral query``
    writes a labeling package, ``mgral import-labels`` reads the result; ``mgral run`` refuses
    such a config). ``box_cost`` still prices the cost curves; the noise settings must stay 0.
    """

    kind: Literal["simulated", "human"] = "simulated"
    box_cost: float = Field(default=0.0, ge=0)
    label_noise: float = Field(default=0.0, ge=0, le=1)
    drop_boxes: float = Field(default=0.0, ge=0, lt=1)


class JobsConfig(_Section):
    """Where a strategy's own independent jobs run (MGRAL's surrogate fine-tunes with
    ``estimator: finetune``), as :class:`mgral.executors.JobPlacement` describes: ``executor``
    (inline | process | ray), ``workers``, ``ray_address``, ``threads`` (per job), ``device``
    (auto | cpu | cuda | cuda:N) and ``gpus`` (per Ray job). Independent of where the series
    run (the experiment's ``executor``); like it, not part of what the run computes."""

    executor: Literal["inline", "process", "ray"] = "inline"
    workers: int | None = Field(default=None, ge=1)
    ray_address: str | None = None
    threads: int | None = Field(default=None, ge=1)
    device: str = "auto"
    gpus: float = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> JobsConfig:
        if not valid_device(self.device):
            raise ValueError(f"device: expected auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.gpus and self.executor != "ray":
            raise ValueError(f"gpus is set but executor is {self.executor!r}; only Ray places jobs on GPUs")
        if self.ray_address is not None and self.executor != "ray":
            raise ValueError(f"ray_address is set but executor is {self.executor!r}; set executor: ray or remove it")
        return self

    def placement(self) -> JobPlacement:
        """The placement a :class:`~mgral.strategies.SelectionContext` carries."""
        return JobPlacement(**self.model_dump())


class TrackingConfig(_Section):
    """Experiment tracking (:mod:`mgral.tracking`): the run's config, every finished cycle's
    metrics and its report logged to MLflow (``pip install 'mgral[mlflow]'``).

    ``uri``: the MLflow tracking server or database (default: a SQLite store inside the run
    directory, ``RUN/_tracking/mlflow.db``). ``experiment``: the MLflow experiment's name
    (default: the config's ``name``). ``tracking: mlflow`` is short for ``tracking: {kind: mlflow}``.
    """

    kind: Literal["mlflow"] = "mlflow"
    uri: str | None = Field(default=None, min_length=1)
    experiment: str | None = Field(default=None, min_length=1)


class ExperimentConfig(_Section):
    """One experiment: every (strategy, seed) series runs ``cycles`` query rounds of ``budget`` images.

    Only ``dataset``, ``strategies`` and ``budget`` are required (``name`` too, which
    :func:`load_config` takes from the file's name). The defaults: ``cycles`` 5, ``seeds``
    ``[0]``, the ``mobilenet_v2_fpn`` detector (Faster R-CNN that trains on a CPU), and an
    initial set of ``budget`` images (``initial: {size: budget}``; a run labeled by people:
    ``initial: {from_dataset: true}``, the labels the dataset file already has).
    """

    name: str = Field(min_length=1)
    dataset: DatasetConfig
    detector: DetectorConfig = DetectorConfig()
    strategies: list[StrategySpec] = Field(min_length=1)
    initial: InitialConfig | None = None
    budget: int = Field(ge=1)
    budget_boxes: int | None = Field(default=None, ge=1)
    cycles: int = Field(default=5, ge=0)
    seeds: list[NonNegInt] = Field(default=[0], min_length=1)
    oracle: OracleConfig = OracleConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    executor: Literal["inline", "process", "ray"] = "inline"
    ray_address: str | None = None
    workers: int | None = Field(default=None, ge=1)
    """Series run at once (process / ray executors; default: this machine's cores, or as many
    as the Ray cluster schedules)."""
    threads: int | None = Field(default=None, ge=1)
    """Torch threads per series (default: torch's own for inline, 1 for process / ray, so that
    ``workers`` series do not oversubscribe the cores). Also what each Ray task reserves."""
    gpus: float = Field(default=0, ge=0)
    """GPUs each series reserves under ``executor: ray`` (e.g. 1: one series per GPU of the
    cluster, each seeing only its own as ``cuda``). 0: CPU series."""
    jobs: JobsConfig = JobsConfig()
    """Where a strategy's own jobs run (MGRAL's surrogate fine-tunes), see :class:`JobsConfig`."""
    tracking: TrackingConfig | None = None
    """Off by default (see :class:`TrackingConfig`)."""
    full_data_reference: bool = False
    reference_train: dict[str, Any] = {}
    """Training overrides for the full-data reference run, on top of ``detector.train`` (e.g.
    ``{iterations: 720}``: with ``warm_start`` a series' last model has trained for
    ``(cycles + 1) x`` the per-cycle iterations, so the reference should train as long)."""
    reference_seeds: int | None = Field(default=None, ge=1)
    """The full-data reference is trained for the first this-many ``seeds`` (default: every
    seed). Its mean is a ceiling line; a few seeds give it, and a converged reference for
    each of 8 seeds costs more than several series."""

    @field_validator("tracking", mode="before")
    @classmethod
    def _tracking_shorthand(cls, value: Any) -> Any:
        return {"kind": value} if isinstance(value, str) else value

    @property
    def reference_seed_list(self) -> list[int]:
        """The seeds the full-data reference is trained for (none without one)."""
        if not self.full_data_reference:
            return []
        return list(self.seeds[: self.reference_seeds]) if self.reference_seeds is not None else list(self.seeds)

    @model_validator(mode="after")
    def _check(self) -> ExperimentConfig:
        if self.initial is None:
            human = self.oracle.kind == "human"
            self.initial = InitialConfig(from_dataset=True) if human else InitialConfig(size=self.budget)
        labels = [s.label for s in self.strategies]
        for n, label in enumerate(labels):
            if label in labels[:n]:
                raise ValueError(
                    f"strategies: label {label!r} is used by strategies[{labels.index(label)}] and "
                    f"strategies[{n}]; give each a distinct label (e.g. label: {label}-2)"
                )
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds {self.seeds} repeat a seed; list each seed once")
        if self.gpus and self.executor != "ray":
            raise ValueError(
                f"gpus is set but executor is {self.executor!r}; only Ray places series on GPUs (executor: ray), "
                "inline and process runs use detector.device"
            )
        if self.reference_train and not self.full_data_reference:
            raise ValueError("reference_train is set but full_data_reference is false; set it to true or remove it")
        if self.reference_seeds is not None and not self.full_data_reference:
            raise ValueError("reference_seeds is set but full_data_reference is false; set it to true or remove it")
        if self.reference_seeds is not None and self.reference_seeds > len(self.seeds):
            raise ValueError(
                f"reference_seeds is {self.reference_seeds} but there are {len(self.seeds)} seeds; "
                f"expected at most {len(self.seeds)}"
            )
        if self.ray_address is not None and self.executor != "ray":
            raise ValueError(
                f"ray_address is set but executor is {self.executor!r}; set executor: ray or remove ray_address"
            )
        if self.oracle.kind == "human":
            self._check_human()
        elif self.initial.from_dataset:
            raise ValueError(
                "initial.from_dataset is for oracle.kind: human (in a simulation every pool image carries its "
                "hidden label); set initial.size, fraction or ids_file"
            )
        return self

    def _check_human(self) -> None:
        """What a run labeled by people cannot do: anything that reads the pool's hidden labels."""
        if self.initial.size is not None or self.initial.fraction is not None:
            raise ValueError(
                "oracle.kind is human, so the initial set is labels you already have: set initial.ids_file (a file "
                "of pool image ids labeled in the dataset file) or initial.from_dataset: true (the pool images "
                "that carry boxes there), not initial.size / fraction"
            )
        simulated = [k for k in ("label_noise", "drop_boxes") if getattr(self.oracle, k)]
        if simulated:
            raise ValueError(
                f"oracle.{simulated[0]} simulates annotation noise; people make their own: remove it for "
                "oracle.kind: human"
            )
        if self.budget_boxes is not None:
            raise ValueError(
                "budget_boxes counts the boxes of images before they are labeled, which only a simulation "
                "knows; remove it for oracle.kind: human"
            )
        if self.full_data_reference:
            raise ValueError(
                "full_data_reference trains on the labels of the whole pool, which people have not made yet; "
                "set it to false for oracle.kind: human"
            )


_PATH_KEYS = (("dataset", "path"), ("dataset", "image_root"), ("detector", "weights"), ("initial", "ids_file"))


def load_config(path: str | os.PathLike[str], overrides: Iterable[str] = ()) -> ExperimentConfig:
    """Read a YAML config, apply ``--set KEY=VALUE`` overrides, resolve paths, validate. A
    config without ``name`` is named after the file (``cards.yaml``: ``cards``).

    Raises:
        ConfigError: unreadable file, invalid YAML, a bad override, or invalid values,
            naming the file and the key (unknown keys list the valid ones).
    """
    source = str(path)
    expected = "an experiment config (a YAML mapping)"
    try:
        text = read_regular_file(path, expected=expected, error=ConfigError).decode("utf-8")
    except OSError as err:
        raise ConfigError(f"{source}: cannot read the config ({err})") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"{source}: not valid YAML ({err})") from err
    data = load_yaml(text, source=source, expected=expected, error=ConfigError)
    if not isinstance(data, dict):
        valid = ", ".join(ExperimentConfig.model_fields)
        raise ConfigError(f"{source}: expected a mapping with the keys {valid}; got {type(data).__name__}")
    data.setdefault("name", Path(path).stem)
    _resolve_paths(data, Path(path).parent)
    for text in overrides:
        _apply_override(data, text)
    _resolve_paths(data, Path.cwd())  # what is still relative came from --set
    return config_from_dict(data, source=source)


def config_from_dict(data: Mapping[str, Any], *, source: str = "config") -> ExperimentConfig:
    """Validate a config mapping (paths taken as given).

    Raises:
        ConfigError: one line per problem, each naming ``source`` and the key.
    """
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError("\n".join(_describe(e, source) for e in err.errors())) from err


EXECUTION_KEYS = ("executor", "ray_address", "workers", "threads", "gpus", "jobs", "tracking")
"""Where and how parallel a run executes, and where it is tracked: not part of what it computes,
so a run may be resumed with other values (e.g. started inline, continued on a Ray cluster
with tracking switched on)."""


def config_to_dict(config: ExperimentConfig) -> dict[str, Any]:
    """The resolved config (defaults filled in, labels set, paths absolute) as plain JSON/YAML data."""
    data = config.model_dump(mode="json")
    if data["initial"]["from_dataset"] is None:
        # absent unless used, so the configs recorded by runs started before it existed still resume
        del data["initial"]["from_dataset"]
    if not data["reference_train"]:
        del data["reference_train"]  # likewise
    if data["reference_seeds"] is None:
        del data["reference_seeds"]  # likewise
    if data["evaluation"] == EvaluationConfig().model_dump(mode="json"):
        del data["evaluation"]  # likewise
    if data["detector"]["kind"] == "torchvision":
        del data["detector"]["kind"]  # likewise
    if not data["dataset"]["follow_links"]:
        del data["dataset"]["follow_links"]  # likewise
    if data["tracking"] is None:
        del data["tracking"]  # likewise
    if data["jobs"] == JobsConfig().model_dump(mode="json"):
        del data["jobs"]  # likewise
    if data["dataset"]["split"] is None:
        del data["dataset"]["split"]  # likewise
    return data


def dump_config(config: ExperimentConfig, path: str | os.PathLike[str]) -> None:
    """Write the resolved config to ``path`` as YAML, atomically; :func:`load_config` reads it back equal."""
    atomic_write_text(path, yaml.safe_dump(config_to_dict(config), sort_keys=False))


# -- helpers ------------------------------------------------------------------------------


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    keys = list(_PATH_KEYS)
    detector = data.get("detector")
    if isinstance(detector, dict) and detector.get("kind") == "predictions":
        keys += [(("detector", "params"), "results"), (("detector", "params"), "embeddings")]
    for section, key in keys:
        sub: Any = data
        for name in (section,) if isinstance(section, str) else section:
            sub = sub.get(name) if isinstance(sub, dict) else None
        if isinstance(sub, dict) and isinstance(sub.get(key), str) and sub[key]:
            p = Path(sub[key]).expanduser()
            sub[key] = os.path.abspath(base / p)  # an absolute p stays itself, normalized


def _node(annotation: Any) -> Any:
    """What a field holds: a model class, ``list`` (with its item annotation), ``dict``, or None (a value)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _node(args[0]) if len(args) == 1 else None
    if origin is Annotated:
        return _node(typing.get_args(annotation)[0])
    if origin is list:
        return ("list", typing.get_args(annotation)[0])
    if origin is dict:
        return dict
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _where(loc: Iterable[str | int]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _model_at(loc: tuple[str | int, ...]) -> type[BaseModel] | None:
    node: Any = ExperimentConfig
    for part in loc:
        if isinstance(node, tuple):
            node = _node(node[1])
        elif isinstance(node, type) and issubclass(node, BaseModel) and part in node.model_fields:
            node = _node(node.model_fields[part].annotation)
        else:
            return None
    return node if isinstance(node, type) and issubclass(node, BaseModel) else None


def _describe(error: Mapping[str, Any], source: str) -> str:
    loc = tuple(error["loc"])
    parent = _where(loc[:-1]) or "the top level"
    if error["type"] == "extra_forbidden":
        model = _model_at(loc[:-1])
        valid = f"; valid keys: {', '.join(model.model_fields)}" if model else ""
        return f"{source}: unknown key {loc[-1]!r} in {parent}{valid}"
    if error["type"] == "missing":
        return f"{source}: missing key {loc[-1]!r} in {parent} (it is required)"
    msg = error["msg"].removeprefix("Value error, ")
    if error["type"] == "value_error":
        return f"{source}: {_where(loc) or 'config'}: {msg}"
    return f"{source}: {_where(loc) or 'the top level'}: {msg}, got {short_repr(error['input'], 80)}"


def _apply_override(data: dict[str, Any], text: str) -> None:
    """Set one ``KEY=VALUE`` in the raw config, checking the dotted key against the models."""
    key, sep, raw = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE with a dotted key, e.g. detector.train.epochs=3")
    value = load_yaml(raw, source=f"--set {short_repr(text, 80)}", expected="a YAML value", error=ConfigError)
    keys = _check_key(parts, text)
    container: Any = data
    for n, part in enumerate(keys):
        here = _where(keys[:n]) or "the top level"
        if isinstance(container, list) and not (isinstance(part, int) and part < len(container)):
            raise ConfigError(f"--set {text}: {here} has {len(container)} entries; index {part} is out of range")
        if not isinstance(container, (list, dict)):
            raise ConfigError(f"--set {text}: {here} is {short_repr(container, 40)} in the config, not a section")
        if n == len(keys) - 1:
            container[part] = value
        elif isinstance(container, list):
            container = container[part]
        else:
            if not isinstance(container.get(part), (dict, list)):
                container[part] = {}  # a section left out (or null) in the file
            container = container[part]


def _check_key(parts: list[str], text: str) -> list[str | int]:
    """The dotted key as dict keys and list indices; ConfigError for a key no model has."""
    node: Any = ExperimentConfig
    keys: list[str | int] = []
    for part in parts:
        here = _where(keys) or "the top level"
        if isinstance(node, type) and issubclass(node, BaseModel):
            if part not in node.model_fields:
                raise ConfigError(
                    f"--set {text}: unknown key {part!r} in {here}; valid keys: {', '.join(node.model_fields)}"
                )
            keys.append(part)
            node = _node(node.model_fields[part].annotation)
        elif isinstance(node, tuple):
            if not (part.isascii() and part.isdecimal()):
                raise ConfigError(f"--set {text}: {here} is a list; index it ({here}.0...) or set it whole")
            keys.append(int(part))
            node = _node(node[1])
        elif node is dict:
            keys.append(part)  # free parameters: checked by the plug-in that takes them
        else:
            raise ConfigError(f"--set {text}: {here} is a value, not a section; use --set {here}=VALUE")
    return keys
