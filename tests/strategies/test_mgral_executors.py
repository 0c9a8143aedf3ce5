"""Every executor backend runs the same jobs to the same results: inline, a local process
pool, and a local Ray instance (real Ray, started and shut down by the executor)."""

from __future__ import annotations

import numpy as np
import pytest

from mgral.errors import ConfigError
from mgral.executors import make_executor
from mgral.strategies.mgral.surrogate import SurrogateJob, SurrogateShared, run_surrogate


@pytest.fixture
def surrogate_jobs(make_context, for_strategy):
    from mgral.strategies import build_strategy

    ctx = for_strategy(make_context(num_pool=6, num_labeled=9), build_strategy("mgral"))
    lab, pool = ctx.labeled_ids, ctx.pool_ids
    shared = SurrogateShared(ctx.detector.to_bytes(), ctx.dataset, lab[:6], lab[6:], {"lr": 1e-3}, 2, 2, seed=1)
    pseudo = {i: (d.boxes[d.scores > 0.3], d.labels[d.scores > 0.3]) for i, d in ctx.predictions.items()}
    jobs = [SurrogateJob("control"), SurrogateJob("m0", pool[:2], pseudo), SurrogateJob("m1", pool[2:5], pseudo)]
    return jobs, shared


def _run(kind, jobs, shared, **kw):
    with make_executor(kind, **kw) as ex:
        out = dict(ex.map(run_surrogate, jobs, shared))
    return [out[k] for k in range(len(jobs))]


def _same(a, b):
    for x, y in zip(a, b, strict=True):
        assert x["name"] == y["name"]
        for key in ("mAP", "loss_sup", "loss_pseudo", "loss_cons"):
            assert x[key] == pytest.approx(y[key], rel=1e-6, abs=1e-9), key
        assert np.allclose(x["per_class"], y["per_class"], equal_nan=True)


@pytest.mark.slow  # 40-85 s on 2 cores; the executors' own contract stays in the default suite (next tests)
def test_inline_process_and_ray_give_the_same_results(surrogate_jobs):
    jobs, shared = surrogate_jobs
    inline = _run("inline", jobs, shared)
    assert inline[0]["loss_cons"] == 0 and inline[1]["loss_cons"] > 0
    _same(inline, _run("process", jobs, shared, workers=2))
    _same(inline, _run("ray", jobs, shared, workers=2))
    import ray

    assert not ray.is_initialized()  # the local instance the executor started is shut down


def _fail(item, shared):
    if item == 2:
        raise ValueError("job 2 failed")
    return item * shared


def test_results_come_back_by_index_and_failures_surface():
    with make_executor("inline") as ex:
        assert sorted(ex.map(_fail, [0, 1, 3], 10)) == [(0, 0), (1, 10), (2, 30)]
        with pytest.raises(ValueError, match="job 2 failed"):
            list(ex.map(_fail, [1, 2], 1))
    with make_executor("process", workers=2) as ex:
        assert sorted(ex.map(_fail, [0, 1, 3], 10)) == [(0, 0), (1, 10), (2, 30)]
        with pytest.raises(ValueError, match="job 2 failed"):
            list(ex.map(_fail, [1, 2], 1))


def test_unknown_executor_is_a_clear_error():
    with pytest.raises(ConfigError, match="unknown executor 'slurm'; valid: inline, process, ray"):
        make_executor("slurm")


def test_ray_jobs_asking_for_gpus_the_cluster_lacks_are_refused_not_left_waiting():
    import ray

    from mgral.executors import RayExecutor

    if ray.is_initialized():  # left by an earlier test in this process: this check needs a Ray the executor starts
        ray.shutdown()
    with pytest.raises(ConfigError, match=r"each job asks for 1 GPU\(s\) but the Ray cluster has 0"):
        RayExecutor(workers=1, gpus_per_job=1)
    assert not ray.is_initialized()  # the local instance it started is shut down again
