import io
import re

import pytest
from rich.console import Console

from mgral.progress import RunProgress, bar

STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ")


def console(terminal: bool) -> Console:
    return Console(file=io.StringIO(), force_terminal=terminal, width=160)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def record(strategy: str, seed: int, cycle: int, mAP: float, **seconds: float) -> dict:
    return {"strategy": strategy, "seed": seed, "cycle": cycle, "mAP": mAP, "seconds": seconds}


# Two finished cycles of "random" seed 0: mean train 50, evaluate 10, predict 10, select 30, label 5 s
# (label ran in one of the two cycles): 105 s a cycle.
DONE = [
    record("random", 0, 0, 0.25, train=40, evaluate=10, predict=5, select=25, label=10),
    record("random", 0, 1, 0.375, train=60, evaluate=10, predict=15, select=35),
]


def lines(c: Console) -> list[str]:
    return c.file.getvalue().splitlines()


def test_run_lines_off_a_terminal_say_series_cycle_and_an_eta_from_measured_phase_times():
    out, clock = console(terminal=False), Clock()
    with RunProgress(2, 2, records=DONE, console=out, clock=clock) as run:
        assert run.eta() == 4 * 105  # a resumed run: 4 of 6 cycles left, known from the start
        run.series_started("random", 0, 1)  # resumes at its third cycle (2 of 0..2)
        clock.now = 100.0
        run.phase("train")
        clock.now = 120.0  # 20 s into a 50 s mean: 30 s left of it, then evaluate, predict, select, label
        assert run.eta() == 30 + 55 + 3 * 105
        clock.now = 300.0  # training overran its mean: the ETA does not go below the phases to come
        assert run.eta() == 55 + 3 * 105
        run.phase("select")
        run.cycle_done(record("random", 0, 2, 0.5, train=50, evaluate=10, predict=10, select=30))
        run.series_started("cald", 0, 2)
    got = lines(out)
    assert all(STAMP.match(line) for line in got), got
    assert got[0].endswith("series 1/2 random seed 0 | cycle 2/2 | 2/6 cycles | ETA 0:07:00 | last mAP 0.3750")
    assert got[1].endswith("series 1/2 random seed 0 | cycle 2/2 | train | 2/6 cycles | ETA 0:07:00 | last mAP 0.3750")
    # select at 300 s: evaluate, predict done; select's 30 s and label's 5 s to come, then 3 cycles
    assert "| select | 2/6 cycles | ETA 0:05:50 |" in got[2]
    # three cycles averaged: (105 + 105 + 100) / 3 s a cycle, 3 left
    assert got[3].endswith("series 1/2 random seed 0 | done | 3/6 cycles | ETA 0:05:10 | last mAP 0.5000")
    assert got[4].endswith("series 2/2 cald seed 0 | cycle 0/2 | 3/6 cycles | ETA 0:05:10 | last mAP 0.5000")


def test_eta_is_unknown_before_a_cycle_and_shared_by_workers_and_references_have_one_cycle():
    run = RunProgress(3, 4, references=1, enabled=False)
    assert run.total_cycles == 2 * 5 + 1
    assert run.eta() is None and "ETA ?" in run.status()
    wide = RunProgress(3, 4, references=1, records=DONE, workers=3, enabled=False)
    assert wide.eta() == pytest.approx(9 * 105 / 3)
    with pytest.raises(ValueError, match="unknown phase 'fit'; valid phases: train, evaluate"):
        wide.phase("fit")


def test_the_live_run_display_on_a_terminal():
    out = console(terminal=True)
    with RunProgress(2, 2, records=DONE, console=out) as run:
        run.series_started("random", 0, 1)
        run.phase("predict")
    text = out.file.getvalue()
    assert "series 1/2 random seed 0 | cycle 2/2 | predict | 2/6 cycles | ETA" in text
    assert "\x1b[" in text  # drawn in place, not printed as lines


@pytest.mark.parametrize("terminal", [False, True])
def test_disabled_progress_prints_nothing(terminal):
    out = console(terminal)
    with RunProgress(2, 2, records=DONE, console=out, enabled=False) as run:
        run.series_started("random", 0, 1)
        run.phase("train")
        with bar("train", 10, enabled=False, console=out) as b:
            for _ in range(10):
                b.advance(info="loss 0.5")
        run.cycle_done(DONE[0])
    assert out.file.getvalue() == ""


def test_a_bar_on_a_terminal_shows_no_nan_before_the_first_loss():
    out = console(terminal=True)
    with bar("train", 10, console=out) as b:
        first = out.file.getvalue()
        b.advance(description="train epoch 1/2", info="loss 0.512")
    assert "train" in first and "0/10" in first and "nan" not in first.lower()
    assert "train epoch 1/2" in out.file.getvalue() and "loss 0.512" in out.file.getvalue()


def test_a_bar_off_a_terminal_prints_a_line_each_tenth_with_rate_and_eta():
    out, clock = console(terminal=False), Clock()
    with bar("predict", 20, console=out, clock=clock) as b:
        for _ in range(20):
            clock.now += 0.5
            b.advance()
    got = lines(out)
    assert len(got) == 10 and all(STAMP.match(line) for line in got)
    assert got[0].endswith("predict: 2/20 (10%), 2.00/s, ETA 0:00:09")
    assert got[-1].endswith("predict: 20/20 (100%), 2.00/s")


def test_a_slow_bar_off_a_terminal_prints_every_30_seconds_with_a_rate_from_its_first_step():
    out, clock = console(terminal=False), Clock()
    with bar("MGRAL table", 1000, console=out, clock=clock) as b:
        for _ in range(2):
            clock.now += 50.0
            b.advance(info="m0: mAP 0.1000")
        clock.now += 10.0
        b.advance(info="m1: mAP 0.2000")  # 10 s after the last line: printed only at the end
    assert [line.split(" ", 2)[2] for line in lines(out)] == [
        "MGRAL table: 1/1000 (0%), 0.02/s, ETA 13:52:30, m0: mAP 0.1000",
        "MGRAL table: 2/1000 (0%), 0.02/s, ETA 13:51:40, m0: mAP 0.1000",
        "MGRAL table: 3/1000 (0%), 0.03/s, ETA 10:09:17, m1: mAP 0.2000",
    ]
