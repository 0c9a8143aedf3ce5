"""Experiment tracking: a run's config, its cycle metrics and its report, logged to MLflow.

One MLflow run per mgral run (the *parent*: the config as params, the report as artifacts)
and one nested child run per series (strategy label, seed: the config with that series'
strategy and seed as params, one point per finished cycle for each metric). The metrics of a
cycle record (:func:`cycle_metrics`) are logged with ``step`` = the number of labeled images,
the x axis of an AL curve: strategies whose cycles add different numbers of images (a box
budget, skipped images) line up where they spent the same labels, and the reference series'
single point sits at the size of the pool. The cycle itself is the metric ``cycle``.

:meth:`Tracker.sync` is the only way anything is logged, and it may be called at any time,
by any number of processes: it reads the run's finished cycle records (``cycles.jsonl``, see
:mod:`mgral.runs`) and logs every record not logged yet. What was logged, and the MLflow run
ids, are kept per tracking store in ``RUN/_tracking/state.json`` (written atomically, under
an ``flock`` on ``RUN/_tracking/lock``), so a killed and resumed run continues the same
MLflow runs and never logs a cycle twice. A kill between a log and the state write that
follows it re-logs the same points with their recorded timestamps, which MLflow's database
stores keep once. The default store is a SQLite database, ``RUN/_tracking/mlflow.db``
(artifacts in ``RUN/_tracking/artifacts``): view it with
``mlflow ui --backend-store-uri sqlite:///RUN/_tracking/mlflow.db``.

MLflow is an optional dependency: ``pip install 'mgral[mlflow]'``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import math
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from mgral import __version__
from mgral._io import atomic_write_json
from mgral.config import EXECUTION_KEYS, ExperimentConfig
from mgral.errors import ConfigError, RunError, TrackingError
from mgral.runs import REFERENCE_LABEL, RunDir, SeriesDir, flatten, read_cycle_records

INSTALL_HINT = "pip install 'mgral[mlflow]'"
STATE_FILE = "state.json"
LOCAL_STORE = "local"
"""The state's name for the default store in the run directory (its path may change with the run's)."""

_MAX_PARAM_LENGTH = 6000  # MLflow refuses longer param values
_NOT_IN_NAME = re.compile(r"[^\w.\- ]")  # MLflow metric and param names: letters, digits, _ . - space, and /


def open_tracker(config: ExperimentConfig, run_dir: str | os.PathLike[str]) -> Tracker | None:
    """The tracker of a run whose config has ``tracking`` set (None when it is off).

    Raises:
        ConfigError: MLflow (or, for the default store, SQLAlchemy / Alembic) is not installed.
    """
    if config.tracking is None:
        return None
    return Tracker(run_dir, uri=config.tracking.uri, experiment=config.tracking.experiment)


def trackers_of(run_dir: str | os.PathLike[str]) -> list[Tracker]:
    """A tracker for every store the run has been synced to (none for a run never tracked)."""
    stores = _read_state(RunDir(run_dir).tracking / STATE_FILE)["stores"]
    return [Tracker(run_dir, uri=None if key == LOCAL_STORE else key) for key in stores]


class Tracker:
    """Logs one run directory to one MLflow tracking store (see the module docstring).

    ``uri``: a tracking server (``http://host:5000``) or database URI; None: the run's own
    SQLite store. ``experiment``: the MLflow experiment the parent run is created in (default:
    the config's ``name``; an existing experiment of that name is used). A tracker holds no
    connection between calls, so it pickles (to a process or Ray worker) as its settings.

    Raises:
        ConfigError: MLflow (or, for a database store, SQLAlchemy / Alembic) is not installed.
    """

    def __init__(
        self, run_dir: str | os.PathLike[str], *, uri: str | None = None, experiment: str | None = None
    ) -> None:
        self.run = RunDir(run_dir)
        self.key = uri or LOCAL_STORE
        self.uri = uri or f"sqlite:///{(self.run.tracking / 'mlflow.db').resolve()}"
        self.experiment = experiment
        _import_mlflow(self.uri)  # a missing install is found before the run starts, not after its first cycle

    def sync(self) -> int:
        """Log every finished cycle record not logged yet (creating the parent and child runs
        when missing); mark a series' run FINISHED after its last cycle, and the parent after
        every series of the config. Returns how many records were logged.

        Raises:
            RunError: no run in the run directory, or a corrupt state file or cycle record.
            TrackingError: the store refused a write or could not be reached.
        """
        config = self.run.config()
        logged = 0
        with self._session() as s:
            parent = self._parent(s, config)
            for sdir in self.run.list_series():
                key = f"{sdir.label}/seed-{sdir.seed}"
                records = read_cycle_records(sdir.records)
                if key not in s.state["series"] and not records:
                    continue
                entry = s.state["series"].setdefault(key, {"cycle": -1})
                tags = {"mlflow.parentRunId": parent, "mgral.strategy": sdir.label, "mgral.seed": str(sdir.seed)}
                run_id = self._run(s, entry, f"{sdir.label} seed {sdir.seed}", tags, config, sdir.label, sdir.seed)
                new = [r for r in records if r["cycle"] > entry["cycle"]]
                if new:
                    s.client.log_batch(run_id, [m for r in new for m in _metrics(sdir, r)])
                    entry["cycle"] = new[-1]["cycle"]
                    s.save()
                    logged += len(new)
                if not entry.get("finished") and entry["cycle"] >= _last_cycle(config, sdir.label):
                    self._finish(s, entry)
            if not s.state["run"].get("finished") and all(
                s.state["series"].get(key, {}).get("finished") for key in _planned(config)
            ):
                self._finish(s, s.state["run"])
        return logged

    def log_report(self, path: str | os.PathLike[str]) -> None:
        """Sync, then log the report directory ``path`` (what ``mgral report`` wrote) as the parent
        run's artifacts under ``report/`` (replacing the files of an earlier report).

        Raises:
            as :meth:`sync`.
        """
        self.sync()
        with self._session() as s:
            s.client.log_artifacts(s.state["run"]["run_id"], str(path), "report")

    @contextlib.contextmanager
    def _session(self) -> Iterator[_Session]:
        """This store's state and a client, under the tracking lock; a store's refusal becomes a TrackingError."""
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self.run.tracking.mkdir(parents=True, exist_ok=True)
        with open(self.run.tracking / "lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or its process dies
            try:
                state = _read_state(self.run.tracking / STATE_FILE)  # a corrupt one stops us before the store opens
                yield _Session(self.run.tracking / STATE_FILE, state, self.key, MlflowClient(self.uri))
            except MlflowException as err:
                raise TrackingError(
                    f"{self.uri}: logging run {self.run.path} failed ({err.message}); the run's own files are "
                    f"intact: fix the store (or the uri), then mgral track {self.run.path} logs what is missing"
                ) from err

    def _parent(self, s: _Session, config: Mapping[str, Any]) -> str:
        """The parent run's id (its experiment found or created first)."""
        if "experiment_id" not in s.state:
            name = self.experiment or config["name"]
            found = s.client.get_experiment_by_name(name)
            if found is not None:
                s.state["experiment_id"] = found.experiment_id
            else:
                artifacts = (self.run.tracking / "artifacts").resolve().as_uri() if self.key == LOCAL_STORE else None
                s.state["experiment_id"] = s.client.create_experiment(name, artifact_location=artifacts)
        tags = {"mgral.run_dir": str(self.run.path.resolve()), "mgral.version": __version__}
        return self._run(s, s.state.setdefault("run", {}), self.run.path.resolve().name, tags, config)

    def _run(
        self, s: _Session, entry: dict[str, Any], name: str, tags: dict[str, str], config: Mapping, *series: Any
    ) -> str:
        """The MLflow run of a state ``entry``: created if it has none, its params
        (:func:`config_params` of ``config`` and ``series``) logged if they are not yet."""
        from mlflow.entities import Param

        if "run_id" not in entry:
            entry["run_id"] = s.client.create_run(s.state["experiment_id"], run_name=name, tags=tags).info.run_id
            s.save()  # a kill before this leaves an empty MLflow run behind; after it, one the next sync completes
        if not entry.get("params"):
            params = [Param(k, v) for k, v in config_params(config, *series).items()]
            s.client.log_batch(entry["run_id"], params=params)
            entry["params"] = True
            s.save()
        return entry["run_id"]

    @staticmethod
    def _finish(s: _Session, entry: dict[str, Any]) -> None:
        s.client.set_terminated(entry["run_id"])
        entry["finished"] = True
        s.save()


class _Session:
    """``state.json`` read under the lock, this store's entry of it, and a client of the store."""

    def __init__(self, path: Path, whole: dict[str, Any], key: str, client: Any) -> None:
        self.path, self.whole, self.client = path, whole, client
        self.state = whole["stores"].setdefault(key, {"series": {}})

    def save(self) -> None:
        atomic_write_json(self.path, self.whole, indent=1)


def _metrics(sdir: SeriesDir, record: Mapping[str, Any]) -> list[Any]:
    """The MLflow metrics of one cycle record, at step = its number of labeled images and at
    the time it was recorded (so that logging it again is the same point)."""
    from mlflow.entities import Metric

    finished = record.get("finished_at")
    when = dt.datetime.fromisoformat(finished) if isinstance(finished, str) else dt.datetime.now(dt.UTC)
    ms = int(when.timestamp() * 1000)
    values = cycle_metrics(record, _selection_info(sdir.cycle(record["cycle"]).selection))
    return [Metric(k, v, ms, record["num_labeled"]) for k, v in values.items()]


# -- what is logged ---------------------------------------------------------------------------


def cycle_metrics(record: Mapping[str, Any], info: Mapping[str, Any] | None = None) -> dict[str, float]:
    """The metrics of one cycle record (:func:`mgral.loop.cycle_record`) and its selection's
    ``info`` (``selection.json``; MGRAL's diagnostics), by MLflow metric name: ``mAP``,
    ``mAP50``, ``AP/<class>``, ``cycle``, ``num_labeled``, ``num_boxes_labeled``,
    ``labeling_cost``, ``num_selected``, ``seconds/<phase>``, and ``selection/<key>/...`` for
    every number in ``info``. Values that are not finite numbers (a class absent from the
    test images, a cycle not evaluated) are left out."""
    values: dict[str, Any] = {k: record.get(k) for k in ("mAP", "mAP50", "cycle", "num_labeled", "num_boxes_labeled")}
    values["labeling_cost"] = record.get("labeling_cost")
    values["num_selected"] = len(record.get("selected") or [])
    for prefix, nested in (("AP", record.get("per_class")), ("seconds", record.get("seconds")), ("selection", info)):
        values.update(flatten({_name(prefix): _named(nested or {})}, sep="/"))
    return {k: float(v) for k, v in values.items() if _is_number(v)}


def config_params(config: Mapping[str, Any], label: str | None = None, seed: int | None = None) -> dict[str, str]:
    """The recorded config as MLflow params, flattened (``detector.train.epochs``), without
    where the run executes (:data:`mgral.config.EXECUTION_KEYS`). The run's params list every
    strategy (``strategies.<label>.name``, ``.params.<key>``) and ``seeds``; a series' params
    (``label`` and ``seed`` given) hold its own ``strategy.*`` and ``seed`` instead."""
    data = {k: v for k, v in config.items() if k not in (*EXECUTION_KEYS, "strategies", "seeds")}
    specs = {s["label"]: s for s in config.get("strategies", [])}
    if label is None:
        data.update(strategies=specs, seeds=config.get("seeds"))
    else:
        data.update(strategy=specs.get(label, {"label": label, "name": "full-data"}), seed=seed)
    return {k: _param_value(v) for k, v in flatten(_named(data)).items()}


def _named(d: Mapping[str, Any]) -> dict[str, Any]:
    """``d`` with every key, at every depth, made a valid part of an MLflow name."""
    return {_name(k): _named(v) if isinstance(v, Mapping) else v for k, v in d.items()}


def _name(key: Any) -> str:
    part = _NOT_IN_NAME.sub("_", str(key))
    return part if part.strip(".") else part.replace(".", "_") or "_"  # "", "." and ".." would not stay themselves


def _param_value(v: Any) -> str:
    text = v if isinstance(v, str) else json.dumps(v)
    return text if len(text) <= _MAX_PARAM_LENGTH else text[: _MAX_PARAM_LENGTH - 3] + "..."


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _selection_info(path: Path) -> dict[str, Any]:
    """The ``info`` of a cycle's ``selection.json`` ({} where the cycle selected nothing)."""
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("info") or {}
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
        raise RunError(f"{path}: cannot read the selection's info ({err}); the file is corrupt") from err


def _last_cycle(config: Mapping[str, Any], label: str) -> float:
    """The cycle that finishes a series; a series labeled by people has no last cycle."""
    if config.get("oracle", {}).get("kind") == "human":
        return math.inf
    return 0 if label == REFERENCE_LABEL else config["cycles"]


def _planned(config: Mapping[str, Any]) -> list[str]:
    """The state keys of the series the config runs."""
    labels = [s["label"] for s in config["strategies"]]
    keys = [f"{label}/seed-{seed}" for label in labels for seed in config["seeds"]]
    if config.get("full_data_reference"):
        seeds = config["seeds"][: config.get("reference_seeds") or len(config["seeds"])]
        keys += [f"{REFERENCE_LABEL}/seed-{seed}" for seed in seeds]
    return keys


def _read_state(path: Path) -> dict[str, Any]:
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {"stores": {}}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunError(
            f"{path}: cannot read the tracking state ({err}); it says which cycles were logged to which MLflow "
            "runs. Restore it, or delete it to log the whole run again as new MLflow runs"
        ) from err
    if not isinstance(state, dict) or not isinstance(state.get("stores"), dict):
        raise RunError(f"{path}: expected an object with 'stores'; restore the file or delete it (see above)")
    return state


_DATABASES = ("sqlite", "postgresql", "mysql", "mssql")  # MLflow's SQLAlchemy stores (scheme or scheme+driver)


def _import_mlflow(uri: str) -> None:
    """ConfigError with the install hint when MLflow, or what its database stores need, is missing."""
    try:
        import mlflow  # noqa: F401

        if uri.partition(":")[0].partition("+")[0] in _DATABASES:
            import alembic  # noqa: F401
            import sqlalchemy  # noqa: F401
    except ImportError as err:
        missing = (err.name or "mlflow").partition(".")[0]
        raise ConfigError(
            f"tracking: logging to MLflow ({uri}) needs {missing}, which is not installed ({err}); install it "
            f"with: {INSTALL_HINT}"
        ) from err
