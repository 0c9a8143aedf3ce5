"""Where independent jobs run: in this process, in a local process pool, or on a Ray cluster.

MGRAL's surrogate fine-tunes (and, later, independent runs) are independent jobs: a
picklable top-level function applied to a list of items, plus one ``shared`` payload all
items need (a model's weights, a dataset). Each backend hands the work to the tool made for
it — :class:`concurrent.futures.ProcessPoolExecutor` for local processes, Ray tasks for a
cluster — and none schedules anything itself.

``map`` yields ``(index, result)`` pairs as jobs finish (so a caller can persist each
result at once and resume after a crash); every backend returns the same results for the
same jobs, because each job seeds itself and fixes its own thread count.

Pointing at a Ray cluster: ``ray_address="ray://head:10001"`` or ``"auto"`` (a cluster this
machine has joined); ``None`` starts a local Ray instance for the duration of the executor.
Workers need mgral installed and the dataset paths readable (a shared filesystem). Ray
itself keeps retrying an address where no cluster answers (for about a minute) before it
fails; the error then names the address.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

from mgral.errors import ConfigError

ExecutorKind = Literal["inline", "process", "ray"]
EXECUTORS: tuple[str, ...] = ("inline", "process", "ray")

_SHARED: Any = None  # a process-pool worker's copy of the shared payload (set by its initializer)


def _init_worker(shared: Any) -> None:
    global _SHARED
    _SHARED = shared


def _call_with_worker_shared(fn: Callable[[Any, Any], Any], item: Any) -> Any:
    return fn(item, _SHARED)


class InlineExecutor:
    """Runs each job in this process, one after another (debugging, tests, one core)."""

    kind = "inline"

    def map(self, fn: Callable[[Any, Any], Any], items: Sequence[Any], shared: Any = None) -> Iterator[tuple[int, Any]]:
        for index, item in enumerate(items):
            yield index, fn(item, shared)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ProcessExecutor(InlineExecutor):
    """A local pool of ``workers`` processes (spawned, so no forked torch state); the shared
    payload is sent once per worker, not once per job."""

    kind = "process"

    def __init__(self, workers: int | None = None) -> None:
        self.workers = workers or max(1, os.cpu_count() or 1)

    def map(self, fn, items, shared=None):
        if not items:
            return
        with concurrent.futures.ProcessPoolExecutor(
            max_workers=min(self.workers, len(items)),
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(shared,),
        ) as pool:
            futures = {pool.submit(_call_with_worker_shared, fn, item): i for i, item in enumerate(items)}
            for future in concurrent.futures.as_completed(futures):
                yield futures[future], future.result()


class RayExecutor(InlineExecutor):
    """Ray tasks: on the cluster at ``address``, or on a local Ray instance started (and shut
    down) by this executor. ``cpus_per_job`` is what each task reserves; the shared payload
    goes to Ray's object store once."""

    kind = "ray"

    def __init__(
        self,
        address: str | None = None,
        *,
        workers: int | None = None,
        cpus_per_job: float = 1,
        gpus_per_job: float = 0,
    ) -> None:
        try:
            import ray
        except ImportError as err:  # a dependency of mgral, so only a broken install lands here
            raise ConfigError("executor 'ray' needs the ray package: pip install 'ray>=2.40'") from err
        self._ray = ray
        self.cpus_per_job, self.gpus_per_job = cpus_per_job, gpus_per_job
        self._started = False
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if address is None:  # room for ``workers`` jobs at once (default: one CPU each)
                kwargs["num_cpus"] = workers * cpus_per_job if workers else max(1, os.cpu_count() or 1)
            try:
                ray.init(address=address, **kwargs)
            except (ConnectionError, RuntimeError, ValueError) as err:
                raise ConfigError(
                    f"could not connect to the Ray cluster at {address!r} ({err}); start one with "
                    "`ray start --head`, or leave ray_address unset for a local Ray instance"
                ) from err
            self._started = True
        gpus = ray.cluster_resources().get("GPU", 0)
        if gpus_per_job > gpus:  # Ray would wait forever for a GPU that never comes
            self.close()
            raise ConfigError(
                f"each job asks for {gpus_per_job} GPU(s) but the Ray cluster has {gpus:g}; add GPU nodes or "
                "set gpus to 0 (CPU jobs)"
            )

    def map(self, fn, items, shared=None):
        if not items:
            return
        ray = self._ray
        # a task given a GPU sees only its own (Ray sets CUDA_VISIBLE_DEVICES): "cuda" is that one
        remote = ray.remote(num_cpus=self.cpus_per_job, num_gpus=self.gpus_per_job, max_retries=0)(fn)
        shared_ref = ray.put(shared)
        refs = {remote.remote(item, shared_ref): i for i, item in enumerate(items)}
        pending = list(refs)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                yield refs[done[0]], ray.get(done[0])
        finally:
            for ref in pending:  # a failure or an abandoned iteration cancels the rest
                ray.cancel(ref, force=True)

    def close(self) -> None:
        if self._started and self._ray.is_initialized():
            self._ray.shutdown()
        self._started = False


def make_executor(
    kind: str,
    *,
    workers: int | None = None,
    ray_address: str | None = None,
    cpus_per_job: float = 1,
    gpus_per_job: float = 0,
) -> InlineExecutor:
    """Build the executor named ``kind`` (``inline``, ``process`` or ``ray``); use it as a
    context manager so a local Ray instance or process pool is shut down afterwards.
    ``cpus_per_job`` / ``gpus_per_job``: what each Ray task reserves (the threads it uses; its GPU).

    Raises:
        ConfigError: an unknown kind, or a Ray cluster that cannot be reached.
    """
    if kind == "inline":
        return InlineExecutor()
    if kind == "process":
        return ProcessExecutor(workers)
    if kind == "ray":
        return RayExecutor(ray_address, workers=workers, cpus_per_job=cpus_per_job, gpus_per_job=gpus_per_job)
    raise ConfigError(f"unknown executor {kind!r}; valid: {', '.join(EXECUTORS)}")
