"""Progress a person can watch: step bars (training, pool prediction, a strategy's stages)
and the run display (series k of N, cycle c of C, phase, ETA, last mAP).

Everything goes to one stderr console. On a terminal, bars and the run display are rich live
displays (a step bar started inside the run display shows under it); when stderr is not a
terminal (a CI log, ``nohup``) they print an occasional timestamped line instead; with
``enabled=False``, or after :func:`enable` (False), as ``mgral --no-progress`` does, they print
nothing.

A step bar::

    with bar("predict", len(ids), enabled=progress) as b:
        for batch in batches:
            ...
            b.advance(len(batch), info=f"{boxes} boxes")

The run display, as the loop drives it (``records``: the run's ``cycles.jsonl`` records so far,
whose ``seconds`` give the ETA from the start of a resumed run)::

    with RunProgress(total_series=6, cycles=10, records=done, enabled=progress) as run:
        for k, (label, seed) in enumerate(series, 1):
            run.series_started(label, seed, k)
            for cycle in cycles_left:
                run.phase("train")
                ...
                run.phase("select")
                ...
                run.cycle_done(record)  # the record appended to cycles.jsonl
"""

from __future__ import annotations

import datetime as dt
import math
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from functools import cache
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

PHASES = ("train", "evaluate", "predict", "select", "label")
"""A cycle's phases in the order the loop runs them (the keys of a cycle record's ``seconds``)."""

LINE_PERCENT = 10
"""Off a terminal, a bar prints a line each time it passes another 10% ..."""
LINE_SECONDS = 30.0
"""... or when 30 s have passed since its last line, whichever comes first."""


_enabled = True


def enable(on: bool) -> bool:
    """Show progress (``on``) or nothing, whatever callers pass as ``enabled``: the switch of
    ``mgral --no-progress``. Returns the previous setting."""
    global _enabled
    previous, _enabled = _enabled, on
    return previous


@cache
def stderr_console() -> Console:
    """The one console every bar and the run display share (rich nests live displays only
    within one console)."""
    return Console(stderr=True)


def _print_line(console: Console, text: str) -> None:
    stamp = dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    console.print(f"{stamp} {text}", markup=False, highlight=False, soft_wrap=True)


def _duration(seconds: float | None) -> str:
    return "?" if seconds is None else str(dt.timedelta(seconds=round(seconds)))


def _rate(task: Task) -> float | None:
    """Steps per second since the bar started (None before the first step)."""
    done = task.completed - task.fields["initial"]
    return done / task.elapsed if done > 0 and task.elapsed else None


def _eta(task: Task) -> float | None:
    rate = _rate(task)
    return None if rate is None else task.remaining / rate


class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        rate = _rate(task)
        return Text("" if rate is None else f"{rate:.2f}/s", style="progress.data.speed")


class _EtaColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        return Text(f"ETA {_duration(_eta(task))}", style="progress.remaining")


class Bar:
    """One step's progress, from :func:`bar`. ``advance`` it; ``info`` is shown after the
    counts (e.g. ``loss 0.412``) and is blank until given."""

    def __init__(self, progress: Progress, task: TaskID, lines: Console | None, clock: Callable[[], float]) -> None:
        self._progress, self._task, self._lines, self._clock = progress, task, lines, clock
        self._percent, self._last_line, self._unprinted = 0, clock(), False

    def advance(self, steps: float = 1, *, description: str | None = None, info: str | None = None) -> None:
        fields = {} if info is None else {"info": info}
        self._progress.update(self._task, advance=steps, description=description, **fields)
        if self._lines is not None:
            self._unprinted = True
            percent = int(self._state().percentage // LINE_PERCENT) * LINE_PERCENT
            if percent > self._percent or self._clock() - self._last_line >= LINE_SECONDS:
                self._percent = max(self._percent, percent)
                self._line()

    def _state(self) -> Task:
        return self._progress.tasks[0]

    def _line(self) -> None:
        task = self._state()
        rate, eta = _rate(task), _eta(task)
        rate = "" if rate is None else f", {rate:.2f}/s"
        eta = f", ETA {_duration(eta)}" if eta else ""
        info = f", {task.fields['info']}" if task.fields["info"] else ""
        counts = f"{task.completed:.0f}/{task.total:.0f} ({task.percentage:.0f}%)"
        _print_line(self._lines, f"{task.description}: {counts}{rate}{eta}{info}")
        self._last_line, self._unprinted = self._clock(), False

    def _close(self) -> None:
        if self._lines is not None and self._unprinted:
            self._line()


@contextmanager
def bar(
    description: str,
    total: float,
    *,
    enabled: bool = True,
    completed: float = 0,
    console: Console | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[Bar]:
    """A step bar: description, bar, done/total, rate, elapsed, ETA, info. On a terminal a
    transient rich bar (it leaves the one-line summaries readable); elsewhere a timestamped
    line every :data:`LINE_PERCENT` % or :data:`LINE_SECONDS` s and one at the end; nothing
    when ``enabled`` is false. ``console``: default :func:`stderr_console`; ``clock``: seconds,
    for rate and ETA."""
    console = console or stderr_console()
    enabled = enabled and _enabled
    live = enabled and console.is_terminal
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _RateColumn(),
        TimeElapsedColumn(),
        _EtaColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        disable=not live,
        transient=True,
        get_time=clock,
        redirect_stdout=_stdout_shares_screen(),
    )
    task = progress.add_task(description, total=total, completed=completed, info="", initial=completed)
    steps = Bar(progress, task, console if enabled and not live else None, clock)
    with progress:
        yield steps
    steps._close()


def _stdout_shares_screen() -> bool:
    """Whether printed lines should go through the live display (stdout is the same terminal);
    a stdout piped to a file is left alone."""
    return sys.stdout is not None and sys.stdout.isatty()


class RunProgress:
    """The run display: series k/N, cycle c/C, phase, cycles done, ETA, last mAP.

    On a terminal a rich live line with a bar over all cycles; elsewhere a timestamped line
    when a series starts, a phase starts and a cycle ends; nothing when ``enabled`` is false.
    Use it as a context manager (see the module doc).

    The ETA is measured: a phase's mean seconds over the finished cycles' records (the ones
    given as ``records`` and those passed to :meth:`cycle_done`), summed per cycle, times the
    cycles left; of the cycle in progress, only its phases still to come and what remains of
    the current one's mean. ``workers`` series running side by side divide it. Unknown (``?``)
    until a cycle has finished.

    Args:
        total_series: series in the run (N), the full-data references included.
        cycles: active-learning cycles per series (C); a series runs cycles 0..C.
        references: how many of the series are full-data references (one cycle each).
        records: finished cycles' records (``strategy``, ``seed``, ``cycle``, ``seconds``,
            ``mAP``), e.g. a resumed run's ``cycles.jsonl``; they count as done.
        workers: series that run at once.
        enabled: false: print nothing.
        console: default :func:`stderr_console`.
        clock: seconds, for the time spent in the current phase.
    """

    def __init__(
        self,
        total_series: int,
        cycles: int,
        *,
        references: int = 0,
        records: Iterable[Mapping[str, Any]] = (),
        workers: int = 1,
        enabled: bool = True,
        console: Console | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        console = console or stderr_console()
        enabled = enabled and _enabled
        self.total_series, self.cycles, self.workers, self._clock = total_series, cycles, workers, clock
        self.total_cycles = (total_series - references) * (cycles + 1) + references
        self._done, self._timed, self._seconds = 0, 0, Counter()
        self._per_series: Counter = Counter()
        self._last_map: float | None = None
        self._series: tuple[str, int, int, int] | None = None  # label, seed, k, cycles of the series
        self._cycle = 0
        self._phase: str | None = None
        self._phase_start = 0.0
        live = enabled and console.is_terminal
        self._lines = console if enabled and not live else None
        self._live = (
            Live(
                get_renderable=self._render,
                console=console,
                transient=True,
                redirect_stdout=_stdout_shares_screen(),
            )
            if live
            else None
        )
        for record in records:
            self._count(record)

    def __enter__(self) -> RunProgress:
        if self._live is not None:
            self._live.start(refresh=True)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.stop()

    def series_started(self, label: str, seed: int, k: int, *, cycles: int | None = None) -> None:
        """Series ``k`` of N (1-based) starts, or resumes after the cycles its records hold;
        ``cycles``: this series' C where it differs (a full-data reference: 0)."""
        self._series = (label, seed, k, self.cycles if cycles is None else cycles)
        self._cycle, self._phase = self._per_series[(label, seed)], None
        self._show()

    def phase(self, name: str) -> None:
        """The current cycle enters phase ``name`` (one of :data:`PHASES`)."""
        if name not in PHASES:
            raise ValueError(f"unknown phase {name!r}; valid phases: {', '.join(PHASES)}")
        self._phase, self._phase_start = name, self._clock()
        self._show()

    def cycle_done(self, record: Mapping[str, Any]) -> None:
        """A cycle finished; ``record`` is what the loop appended to ``cycles.jsonl``."""
        self._count(record)
        self._cycle, self._phase = int(record["cycle"]) + 1, None
        self._show()

    def eta(self) -> float | None:
        """Seconds until the run ends, from the measured phase times (None before any)."""
        if not self._timed:
            return None
        mean = {p: s / self._timed for p, s in self._seconds.items()}
        left = max(0, self.total_cycles - self._done)
        seconds = left * sum(mean.values())
        if self._phase is not None and left:  # of the cycle in progress: its phases done, the current one's spent
            i = PHASES.index(self._phase)
            spent = self._clock() - self._phase_start
            seconds -= sum(mean.get(p, 0.0) for p in PHASES[:i]) + min(mean.get(self._phase, 0.0), spent)
        return seconds / max(1, self.workers)

    def status(self) -> str:
        """The display as one line of text, e.g. ``series 2/6 random seed 1 | cycle 3/10 |
        select | 14/66 cycles | ETA 0:42:10 | last mAP 0.4120``."""
        parts = []
        if self._series is not None:
            label, seed, k, cycles = self._series
            at = f"cycle {self._cycle}/{cycles}" if self._cycle <= cycles else "done"
            parts += [f"series {k}/{self.total_series} {label} seed {seed}", at]
        if self._phase is not None:
            parts.append(self._phase)
        parts += [f"{self._done}/{self.total_cycles} cycles", f"ETA {_duration(self.eta())}"]
        if self._last_map is not None:
            parts.append(f"last mAP {self._last_map:.4f}")
        return " | ".join(parts)

    def _count(self, record: Mapping[str, Any]) -> None:
        self._done += 1
        self._per_series[(record["strategy"], record["seed"])] += 1
        if record.get("seconds"):  # a new Counter, not an update: the live display's thread reads the old one
            self._timed += 1
            self._seconds = self._seconds + Counter(record["seconds"])
        if record.get("mAP") is not None and math.isfinite(record["mAP"]):
            self._last_map = float(record["mAP"])

    def _render(self) -> Table:
        line = Table.grid(padding=(0, 1))
        line.add_row(ProgressBar(total=self.total_cycles, completed=self._done, width=30), Text(self.status()))
        return line

    def _show(self) -> None:
        if self._live is not None:
            self._live.refresh()
        elif self._lines is not None:
            _print_line(self._lines, self.status())
