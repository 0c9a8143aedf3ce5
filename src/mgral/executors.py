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
import contextlib
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from mgral.errors import ConfigError

ExecutorKind = Literal["inline", "process", "ray"]
EXECUTORS: tuple[str, ...] = ("inline", "process", "ray")


@dataclass(frozen=True)
class JobPlacement:
    """Where a strategy's own independent jobs run (MGRAL's surrogate fine-tunes): the
    experiment's ``jobs`` section (:class:`mgral.config.JobsConfig`), which the loop hands to
    the strategy in its :class:`~mgral.strategies.SelectionContext`. Where series run is the
    experiment's ``executor``; these are the jobs one series' selection starts.

    ``threads``: torch threads per job (default: torch's own inline, else the cores shared
    among ``workers``); ``device``: ``auto`` (the task detector's, or the CPU in a job process
    that sees no GPU), ``cpu``, ``cuda`` or ``cuda:N``; ``gpus``: what each Ray job reserves."""

    executor: str = "inline"
    workers: int | None = None
    ray_address: str | None = None
    threads: int | None = None
    device: str = "auto"
    gpus: float = 0

    def job_threads(self, inline_threads: int) -> int:
        """Torch threads each job uses; ``inline_threads``: this process's (the inline default)."""
        if self.threads:
            return self.threads
        if self.executor == "inline":
            return inline_threads
        return max(1, (os.cpu_count() or 1) // (self.workers or os.cpu_count() or 1))

    def executor_for(self, cpus_per_job: float) -> InlineExecutor:
        """The executor (a context manager) for jobs of ``cpus_per_job`` threads each."""
        return make_executor(
            self.executor,
            workers=self.workers,
            ray_address=self.ray_address,
            cpus_per_job=cpus_per_job,
            gpus_per_job=self.gpus,
        )


def valid_device(device: Any) -> bool:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    if device in ("auto", "cpu", "cuda"):
        return True
    prefix, _, index = str(device).partition(":")
    return isinstance(device, str) and prefix == "cuda" and index.isdigit()


_SHARED: Any = None  # a process-pool worker's copy of the shared payload (set by its initializer)


def _init_worker(shared: Any, parent: int) -> None:
    global _SHARED
    _SHARED = shared
    # Ctrl-C reaches the whole foreground process group: the parent alone decides, and stops
    # the workers itself (see ProcessExecutor), instead of each worker dying mid-job on its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    _die_with(parent)


def _die_with(parent: int) -> None:
    """Kill this worker when its parent dies, even by SIGKILL (nothing of the parent runs then
    to stop it, and an orphan would go on writing into a run it no longer holds the lock of).
    Linux's prctl(PR_SET_PDEATHSIG) does it; the standard library has no wrapper, hence ctypes.
    SIGKILL, not SIGTERM: a SystemExit raised in a job is caught by concurrent.futures, whose
    worker then waits forever on its dead parent's queue. Every state file is written
    atomically, so dying anywhere loses nothing; a worker's own workers die with it in turn.
    Elsewhere than Linux a worker ends when it next talks to its dead parent."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGKILL)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    # Raised rather than Python's instant death: the job's `with` blocks run on the way out, so
    # an executor the job started itself (a strategy's surrogate jobs) stops its own workers.
    signal.signal(signum, signal.SIG_DFL)  # a second SIGTERM ends the worker at once
    raise SystemExit(128 + signum)


def _terminate(pool: concurrent.futures.ProcessPoolExecutor) -> None:
    """End a pool's worker processes now (SIGTERM, then SIGKILL) and wait for them.

    ``shutdown`` alone waits for the running jobs (or, with ``wait=False``, leaves them
    running after this process is gone). Python 3.14 has ``terminate_workers`` for this;
    before it the pool's processes are only reachable through its private ``_processes``.
    """
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in processes:
        with contextlib.suppress(ProcessLookupError, ValueError):
            proc.terminate()
    for proc in processes:
        with contextlib.suppress(ValueError):
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()


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
        self._live: set[concurrent.futures.ProcessPoolExecutor] = set()

    def map(self, fn, items, shared=None):
        if not items:
            return
        pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=min(self.workers, len(items)),
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(shared, os.getpid()),
        )
        self._live.add(pool)
        try:
            futures = {pool.submit(_call_with_worker_shared, fn, item): i for i, item in enumerate(items)}
            for future in concurrent.futures.as_completed(futures):
                yield futures[future], future.result()
        except BaseException:
            # An error, a signal (KeyboardInterrupt, mgral.loop.Stopped) or an abandoned
            # iteration: end the running jobs now; left alone they would go on writing.
            _terminate(pool)
            raise
        else:
            pool.shutdown()
        finally:
            self._live.discard(pool)

    def close(self) -> None:
        """End the jobs of any ``map`` still running (one whose caller stopped iterating)."""
        while self._live:
            _terminate(self._live.pop())


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
        self._running: set[Any] = set()  # object refs of tasks not yet collected
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if address is None:  # room for ``workers`` jobs at once (default: one CPU each)
                kwargs["num_cpus"] = workers * cpus_per_job if workers else max(1, os.cpu_count() or 1)
            sigterm = signal.getsignal(signal.SIGTERM)
            try:
                ray.init(address=address, **kwargs)
            except (ConnectionError, RuntimeError, ValueError) as err:
                raise ConfigError(
                    f"could not connect to the Ray cluster at {address!r} ({err}); start one with "
                    "`ray start --head`, or leave ray_address unset for a local Ray instance"
                ) from err
            finally:
                # ray.init replaces the SIGTERM handler (with sys.exit) in the main thread: keep
                # the caller's, e.g. mgral run's, which stops the run and says how to resume it
                if sigterm is not None and threading.current_thread() is threading.main_thread():
                    signal.signal(signal.SIGTERM, sigterm)
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
        self._running.update(pending)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                self._running.discard(done[0])
                yield refs[done[0]], ray.get(done[0])
        finally:
            for ref in pending:  # a failure, a signal or an abandoned iteration cancels the rest
                self._cancel(ref)

    def _cancel(self, ref: Any) -> None:
        self._running.discard(ref)
        with contextlib.suppress(Exception):  # already finished, or Ray is going down anyway
            self._ray.cancel(ref, force=True)

    def close(self) -> None:
        # tasks of a map whose caller stopped iterating (it was interrupted): on a cluster
        # they would otherwise run on after this process is gone
        for ref in list(self._running):
            self._cancel(ref)
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
