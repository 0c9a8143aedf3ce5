"""The pool ledger: request / resolve rules, id types, persistence and its validation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mgral.errors import PoolError
from mgral.pool import Ledger

POOL = [3, "a", 1, "b", 7, "c"]


@pytest.fixture
def ledger() -> Ledger:
    return Ledger.create(POOL, [1])


def test_create_puts_initial_ids_in_cycle_zero(ledger):
    assert ledger.labeled_in == {1: 0}
    assert ledger.labeled() == [1]
    assert ledger.unlabeled() == [3, "a", "b", 7, "c"]
    assert ledger.last_cycle == 0


def test_request_resolve_skip_round_trip(ledger, tmp_path):
    ledger.request([7, "a", "c"], cycle=1)
    assert ledger.pending == {7: 1, "a": 1, "c": 1}
    assert ledger.unlabeled() == [3, "b"]  # pending ids are not offered again
    ledger.resolve(["a"], ["c"], cycle=1)
    assert ledger.pending == {7: 1}  # a partial answer leaves the rest pending
    ledger.resolve([7], [], cycle=1)
    assert ledger.labeled() == ["a", 1, 7]
    assert ledger.labeled(0) == [1]
    assert ledger.added_in(1) == ["a", 7]
    assert ledger.skipped == {"c": 1}
    assert ledger.unlabeled() == [3, "b"]
    ledger.save(tmp_path / "ledger.json")
    assert Ledger.load(tmp_path / "ledger.json") == ledger


def test_answers_keep_their_order(ledger, tmp_path):
    ledger.request(["c", 7, "a"], cycle=1)
    ledger.resolve(["c", 7, "a"], [], cycle=1)
    assert list(ledger.labeled_in) == [1, "c", 7, "a"]  # the file's order does not depend on hashing


def test_ids_keep_their_type_through_save_and_load(tmp_path):
    ledger = Ledger.create([1, "1", 2, "x"], ["1"])
    ledger.request([1], cycle=1)
    ledger.save(tmp_path / "ledger.json")
    back = Ledger.load(tmp_path / "ledger.json")
    assert back.pool == (1, "1", 2, "x")
    assert back.labeled_in == {"1": 0} and back.pending == {1: 1}
    assert [type(i) for i in back.pool] == [int, str, int, str]


def test_numpy_ids_are_stored_as_plain_python(tmp_path):
    ledger = Ledger.create(np.arange(4), [np.int64(0)])
    ledger.request(np.array([2, 3]), cycle=1)
    assert all(type(i) is int for i in [*ledger.pool, *ledger.pending])
    ledger.save(tmp_path / "l.json")
    assert Ledger.load(tmp_path / "l.json") == ledger


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        ([99], "image 99 is not in the pool"),
        ([1], "image 1 is already labeled (cycle 0)"),
        ([3, 3], "image 3 is listed twice"),
        ([True], "True is a bool, not an image id"),
        ([2.5], "2.5 (float) is not an image id"),
    ],
)
def test_request_refusals_name_the_id(ledger, ids, message):
    with pytest.raises(PoolError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ledger.request(ids, cycle=1)
    assert ledger.pending == {}  # all-or-nothing


def test_request_refuses_pending_skipped_and_past_cycles(ledger):
    ledger.request([3, "b"], cycle=1)
    with pytest.raises(PoolError, match="image 3 is already requested for cycle 1"):
        ledger.request([3], cycle=2)
    ledger.resolve([3], ["b"], cycle=1)
    with pytest.raises(PoolError, match="'b' was skipped by the annotator in cycle 1; skipped images are not asked"):
        ledger.request(["b"], cycle=2)
    ledger.request([7], cycle=2)
    with pytest.raises(PoolError, match="already records cycle 2"):
        ledger.request(["c"], cycle=1)
    with pytest.raises(PoolError, match="cycle must be an integer >= 1, got 0"):
        ledger.request(["c"], cycle=0)


def test_resolve_refuses_ids_that_were_not_asked_for(ledger):
    ledger.request([3], cycle=1)
    with pytest.raises(PoolError, match="image 'a' cannot be marked labeled: it was never requested; labels apply"):
        ledger.resolve([3, "a"], [], cycle=1)
    assert ledger.pending == {3: 1}  # nothing applied
    with pytest.raises(PoolError, match="image 99 cannot be marked skipped: it is not in the pool"):
        ledger.resolve([], [99], cycle=1)
    with pytest.raises(PoolError, match="image 3 cannot be marked labeled: it was requested for cycle 1"):
        ledger.resolve([3], [], cycle=2)
    with pytest.raises(PoolError, match="image 3 is both labeled and skipped"):
        ledger.resolve([3], [3], cycle=1)


def test_resolve_is_idempotent_and_refuses_a_changed_answer(ledger):
    ledger.request([3, "a"], cycle=1)
    ledger.resolve([3], ["a"], cycle=1)
    before = Ledger.create(POOL, [1])
    before.labeled_in, before.skipped = dict(ledger.labeled_in), dict(ledger.skipped)
    ledger.resolve([3], ["a"], cycle=1)  # replayed after a crash
    assert ledger == before
    with pytest.raises(PoolError, match="image 'a' cannot be marked labeled: it was skipped in cycle 1"):
        ledger.resolve(["a"], [], cycle=1)
    with pytest.raises(PoolError, match="image 3 cannot be marked labeled: it is already labeled"):
        ledger.resolve([3], [], cycle=2)


def test_create_refusals():
    with pytest.raises(PoolError, match="initial image 9 is not in the pool"):
        Ledger.create([1, 2], [9])
    with pytest.raises(PoolError, match="pool: image 2 is listed twice"):
        Ledger.create([1, 2, 2], [])


def _write(tmp_path, obj):
    path = tmp_path / "ledger.json"
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


GOOD = {"version": 1, "pool": [1, "a", 2], "labeled": [[1, 0]], "pending": [["a", 1]], "skipped": []}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"labeled": [[1, -1]]}, r"labeled entry 0 \(\[1, -1\]\): cycle must be an integer >= 0"),
        ({"labeled": [["1", 0]]}, "image '1' is not in the pool"),
        ({"labeled": [[1, 0], [2]]}, r"labeled entry 1 \(\[2\]\): expected an \[id, cycle\] pair"),
        ({"skipped": [[1, 1]]}, r"skipped entry 0 .*image 1 is also in 'labeled'"),
        ({"pending": [["a", 0]]}, "cycle must be an integer >= 1, got 0"),
        ({"pending": [[None, 1]]}, "the id must be an int or a str"),
        ({"pool": [1, 1]}, "image 1 is listed twice"),
        ({"version": 9}, "ledger version 9, expected 1"),
        ({"extra": 1}, "expected an object with keys version, pool, labeled, pending, skipped"),
    ],
)
def test_load_refuses_hand_edited_files_naming_the_file(tmp_path, change, message):
    path = _write(tmp_path, {**GOOD, **change})
    with pytest.raises(PoolError, match=message) as info:
        Ledger.load(path)
    assert str(path) in str(info.value)


def test_load_refuses_corrupt_and_missing_files(tmp_path):
    path = _write(tmp_path, '{"version": 1, "pool": [1, 2')
    with pytest.raises(PoolError, match=f"{path}: not valid JSON"):
        Ledger.load(path)
    with pytest.raises(PoolError, match="cannot read the ledger"):
        Ledger.load(tmp_path / "missing.json")
    assert Ledger.load(_write(tmp_path, GOOD)).pending == {"a": 1}
