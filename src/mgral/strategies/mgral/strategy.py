"""MGRAL: the mAP-guided reinforced sampling agent (arXiv 2601.15688; design in MGRAL.md).

Two estimators of a batch's mAP gain (``estimator: head`` and ``finetune``), and ``none``: the
prior's top-B, no estimate and no policy (the cost floor of the head path: its candidates and
mirrored pass only). ``auto``, the default, is ``none`` with the label-free reward, and
``finetune`` with the research rewards (``labeled_simulation``, ``oracle``): measured, neither
estimate earned its cost (benchmarks/README.md, "MGRAL measurements"): the head estimate
ranked random batches at Spearman 0.08 against their true gain on pinochle, and on BCCD its
safe selection took the prior's batch in all 10 loop cycles, for 1.5-1.7x the training per
cycle against ``none``'s 0.10x; the fine-tune one cost 1.2-5.8x and its estimate was noise.

**Head estimator** (:meth:`MGRAL._select_head`): candidates are the pool's top by a prior of
standardised baseline scores (:mod:`.prior`); every batch the prior-tied policy
(:mod:`.policy`) samples is estimated label-free by cross-fitted head-only surrogates
(:mod:`.estimate`) and memoised; safe selection takes the policy's batch only when its
estimate beats the prior's top-B by ``safe_z`` paired standard errors.

**Fine-tune estimator**, the paper-faithful table of full surrogate fine-tunes. One
selection, in stages (each timed, each written under ``work_dir/mgral/``):

1. **splits** — the labeled set ``L_t`` is split (seeded) into ``L_fit`` and the reward set
   ``E_t`` (``reward_fraction``, at least one image per class where possible);
2. **candidates** — ``P_t``: a seeded random subset of the pool (``candidate_pool``,
   default ``20 * B``);
3. **features** — label-free features of every candidate from the task detector's cached
   detections plus one mirrored pass (:mod:`.features`);
4. **table** — ``M`` random combinations of ``B_c`` candidates and a control, each a
   surrogate fine-tune (:mod:`.surrogate`) run through an executor (inline, process pool,
   Ray), scored on ``E_t``: ``dmAP_m = mAP_m - mAP_control``;
5. **reward model** — ``R(S)`` fitted on this and earlier cycles' rows (:mod:`.reward`);
   leave-one-out Spearman reported;
6. **agent** — the LSTM agent trained by REINFORCE on ``R`` (:mod:`.agent`), warm-started
   from the previous cycle; or, as ablations, greedy maximisation of ``R`` or top-B credits;
7. **selection** — top-B of the agent's logits averaged over fixed orders.

When the labeled set is too small to hold out a reward set with boxes (fewer than 2
images, or no box in ``E_t``), no table can be scored: the cycle falls back to the
highest label-free uncertainty (``max_entropy``) and says so in ``info["fallback"]``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from mgral._io import atomic_write_bytes, atomic_write_json, atomic_write_text
from mgral.data.records import Dataset, ImageId
from mgral.executors import JobPlacement
from mgral.progress import bar
from mgral.runs import CycleDir, MgralDir, reward_trend
from mgral.strategies._detection_math import hflip
from mgral.strategies.base import Selection, SelectionContext, Strategy, check_budget, register_strategy, select_top
from mgral.strategies.mgral import agent as agent_mod
from mgral.strategies.mgral import prior as prior_mod
from mgral.strategies.mgral import settings
from mgral.strategies.mgral.estimate import CrossFitGain, GainEstimate, paired_se
from mgral.strategies.mgral.features import Features, compact_features, feature_names, raw_features
from mgral.strategies.mgral.policy import (
    BatchMemo,
    PolicySettings,
    PriorTiedAgent,
    SafeChoice,
    policy_scores,
    safe_choice,
    standardise,
    top_b,
    train_policy,
)
from mgral.strategies.mgral.reward import TableRows, cluster_term, fit_reward_model, loo_spearman
from mgral.strategies.mgral.surrogate import SurrogateJob, SurrogateShared, run_surrogate

HEAD_IMAGE_STEP = 1 / 400
"""One image in one full-batch head-only step, in detector training image-steps (planning
only): 1.2 ms against 0.46 s, measured on BCCD with ``mobilenet_v2_fpn`` on 2 CPU cores."""


@register_strategy("MGRAL: mAP-guided; default a prior of baseline scores, estimator: finetune the paper's agent")
class MGRAL(Strategy):
    """The mAP-guided reinforced sampling agent. Its parameters are flat and all optional; each
    belongs to one group of :mod:`.settings`, where its default and meaning are:

    - :class:`~.settings.Table` (the fine-tune estimator's table): ``combinations``, ``steps``,
      ``combination_size``, ``candidate_pool``, ``reward_fraction``, ``surrogate_batch``,
      ``surrogate_lr``, ``unsup_weight``, ``ramp``, ``pseudo_threshold``, ``reward_source``;
    - :class:`~.settings.Reward` (its reward model): ``pca_components``, ``clusters``,
      ``cluster_term``, ``keep_history``, ``history_decay``, ``ridge_alpha``;
    - :class:`~.settings.Agent` (the LSTM): ``optimizer``, ``sampling``, ``updates``,
      ``samples``, ``hidden``, ``chunk``, ``agent_lr``, ``entropy``, ``orders``, ``warm_start``;
    - :class:`~.settings.Head` (the estimator and the head path): ``estimator`` (auto | head |
      finetune | none; ``auto``: none, or finetune with a research ``reward_source``),
      ``folds``, ``labelings``, ``head_iterations``, ``resamples``, ``policy_updates``,
      ``policy_samples``, ``policy_lr``, ``kl``, ``safe_z``, ``patience``, ``score_batches``.

    Where the surrogate fine-tunes run is the experiment's ``jobs`` section (``context.jobs``:
    executor, workers, ray_address, threads, device, gpus), not a parameter.
    """

    name = "mgral"
    requires: ClassVar[frozenset[str]] = frozenset({"predictions", "embeddings", "detector"})
    detector_needs: ClassVar[frozenset[str]] = frozenset({"augment", "clone", "self_training"})
    selection_cost = 5.0  # estimator finetune, M + 1 surrogate fine-tunes: 1.2 (digits) to 5.8 (BCCD) trainings
    # per cycle measured; __init__ sets the other routes' (the loop orders series by the instance's)
    micro_params: ClassVar[Mapping[str, Any]] = {
        "combinations": 2,
        "steps": 1,
        "surrogate_batch": 1,
        "updates": 4,
        "samples": 2,
        "hidden": 16,
        "chunk": 8,
        "orders": 1,
        "pca_components": 2,
    }
    moved_params: ClassVar[Mapping[str, str]] = {
        "executor": "jobs.executor",
        "workers": "jobs.workers",
        "ray_address": "jobs.ray_address",
        "job_threads": "jobs.threads",
        "device": "jobs.device",
        "job_gpus": "jobs.gpus",
    }

    def workload(self, *, labeled: int, unlabeled: int, budget: int) -> tuple[float, float]:
        """Fine-tune estimator: the candidates predicted once mirrored, and ``combinations + 1``
        surrogate fine-tunes of ``steps`` steps (3 x ``surrogate_batch`` training images a step:
        labeled batch, pseudo-labeled batch, flipped pair), each evaluated on its reward set.

        Head estimator: the candidates predicted mirrored, labeled + candidates once more for
        the head cache, and at most ``2 + policy_updates x policy_samples`` rows (patience
        usually stops sooner; ``score_batches`` adds one per prior score), each
        ``folds x labelings`` head fine-tunes of ``head_iterations`` full-batch steps over the
        other folds' images, counted as :data:`HEAD_IMAGE_STEP`
        detector image-steps each. ``none``: the mirrored pass alone."""
        route = self._route()
        if route == "finetune":
            candidates = min(unlabeled, max(budget, self.table.candidate_pool or 20 * budget))
            jobs = self.table.combinations + 1
            infer = candidates + jobs * max(1, round(self.table.reward_fraction * labeled))
            return float(jobs * self.table.steps * 3 * self.table.surrogate_batch), float(infer)
        candidates = min(unlabeled, max(budget, self.table.candidate_pool or 4 * budget))
        if route == "none" or labeled < 2:
            return 0.0, float(candidates)
        rows = 2 + self.head.policy_updates * self.head.policy_samples
        rows += len(prior_mod.PRIOR_SCORES) if self.head.score_batches else 0
        folds = min(self.head.folds, labeled)
        steps = (
            rows * self.head.labelings * self.head.head_iterations * (folds - 1) * labeled
        )  # image-steps of the heads
        return steps * HEAD_IMAGE_STEP, float(2 * candidates + labeled)

    def __init__(self, **params: Any) -> None:
        """The flat parameters of :mod:`.settings`' groups (their defaults there), checked by
        each group; build_strategy has refused any other name."""
        self.table, self.reward, self.agent, self.head = settings.groups(params)
        estimator, reward_source = self.head.estimator, self.table.reward_source
        if reward_source == "oracle":  # research only: the true gains need the true labels
            self.requires = frozenset({*MGRAL.requires, "oracle"})
        settings.check(
            "estimator",
            estimator != "head" or reward_source == "surrogate",
            "finetune or auto with reward_source " + repr(reward_source) + " (the head estimator is label-free)",
            estimator,
        )
        settings.check(
            "estimator",
            estimator != "none" or reward_source == "surrogate",
            "auto or finetune with reward_source " + repr(reward_source) + " (none estimates nothing)",
            estimator,
        )
        route = self._route()
        if route == "head":  # the mirrored pass (consistency) and the head cache
            self.detector_needs = frozenset({"augment", "head_cache"})
            self.selection_cost = 1.6  # 1.5-1.7 trainings per cycle measured on BCCD
        elif route == "none":  # the mirrored pass alone
            self.detector_needs = frozenset({"augment"})
            self.selection_cost = 0.1  # 0.10 trainings per cycle measured on BCCD

    def _route(self) -> str:
        """``head``, ``finetune`` or ``none``: the estimator set, ``auto`` being ``none`` with
        the label-free reward and ``finetune`` with a research reward (which needs the table).
        ``head`` on a detector without ``head_cache`` is refused before the run (``detector_needs``)."""
        if self.head.estimator != "auto":
            return self.head.estimator
        return "none" if self.table.reward_source == "surrogate" else "finetune"

    # -- the cycle ---------------------------------------------------------------------------
    def select(self, context: SelectionContext, budget: int) -> Selection:
        n = check_budget(context, budget, self.requires)
        pool = list(context.pool_ids)
        rng = context.rng
        if n == len(pool):  # the whole pool is the batch: nothing to learn
            return select_top(pool, np.zeros(n), n, rng, {"note": "the budget covers the whole pool"})
        seed = int(rng.integers(2**31))
        out = CycleDir(Path(context.work_dir)).mgral.mkdir() if context.work_dir is not None else None
        if self._route() != "finetune":
            return self._select_head(context, n, pool, rng, seed, out)
        seconds: dict[str, float] = {}
        dataset = context.dataset

        # 1-2: splits and candidates
        split = self._candidates(context, n, pool, rng)
        fit_ids, eval_ids, cand, sim_ids = split.fit_ids, split.eval_ids, split.ids, split.sim_ids

        # 3: features
        t0 = time.perf_counter()
        feats = self._features(context, cand + sim_ids, out)
        rows_all = feats.ids
        index = {i: k for k, i in enumerate(rows_all)}
        ref = np.zeros(len(rows_all), dtype=bool)
        ref[[index[i] for i in cand]] = True
        phi, phi_names = compact_features(
            feats.stats,
            feats.embeddings,
            ref,
            components=self.reward.pca_components,
            seed=seed,
            stat_names=feature_names([c.name for c in dataset.categories]),
        )
        clusters, num_clusters = self._clusters(phi, phi_names, ref, n, seed)
        seconds["features"] = time.perf_counter() - t0

        info: dict[str, Any] = {"candidates": len(cand), "fit": len(fit_ids), "reward_set": len(eval_ids)}
        has_boxes = any(len(dataset[i].target) for i in eval_ids)
        if not eval_ids or not fit_ids or not has_boxes:
            scores = feats.stats[[index[i] for i in cand], 0]
            info["fallback"] = (
                f"no reward set with boxes (labeled {len(context.labeled_ids)} images, reward set {len(eval_ids)}): "
                "ranked by label-free max_entropy instead of a surrogate table"
            )
            return self._finish(context, cand, scores, n, rng, info, seconds, feats, index, out, None, [])

        # 4: the look-up table
        t0 = time.perf_counter()
        table, rows = self._table(context, n, split, phi, index, clusters, num_clusters, seed, out)
        seconds["table"] = time.perf_counter() - t0

        # 5: the reward model
        t0 = time.perf_counter()
        history = self._history(context, phi.shape[1]) if self.reward.keep_history else []
        all_rows = TableRows.concat([rows, *history])
        current = np.zeros(len(all_rows), dtype=bool)
        current[: len(rows)] = True
        usable = np.isfinite(all_rows.dmap)
        all_rows, current = all_rows.take(usable), current[usable]
        model = fit_reward_model(all_rows, alpha=self.reward.ridge_alpha, use_cluster=self.reward.cluster_term)
        rho, loo = loo_spearman(all_rows, current, alpha=self.reward.ridge_alpha, use_cluster=self.reward.cluster_term)
        seconds["reward_model"] = time.perf_counter() - t0
        cand_rows = np.array([index[i] for i in cand])
        credits = model.credits(phi[cand_rows])
        cand_clusters = clusters[cand_rows]
        if out is not None:  # R(S) of any batch of candidates can be recomputed from this file
            buf = io.BytesIO()
            np.savez(
                buf,
                ids=np.array(json.dumps(cand)),
                credits=credits,
                clusters=cand_clusters,
                cluster_coef=np.array(model.cluster_coef),
            )
            atomic_write_bytes(out.candidates, buf.getvalue())
        info.update({"loo_spearman": rho, "table_rows": int(current.sum()), "history_rows": int((~current).sum())})
        if out is not None:
            atomic_write_json(
                out.reward_model,
                {
                    **model.to_dict(phi_names),
                    "loo_spearman": rho,
                    "loo_predictions": [float(v) for v in loo],
                    "loo_truth": [float(v) for v in all_rows.dmap[current]],
                    "rows": len(all_rows),
                    "current_rows": int(current.sum()),
                },
                indent=1,
            )

        # 6-7: optimise R and select
        t0 = time.perf_counter()
        curve: list[dict[str, float]] = []
        if self.agent.optimizer == "credits":
            scores = credits
        elif self.agent.optimizer == "greedy":
            return self._greedy(
                context,
                cand,
                credits,
                cand_clusters,
                model.cluster_coef,
                n,
                info,
                seconds,
                t0,
                feats,
                index,
                out,
            )
        else:
            agent = self._agent(context, phi.shape[1])
            training = agent_mod.AgentSettings(
                updates=self.agent.updates,
                samples=self.agent.samples,
                lr=self.agent.agent_lr,
                entropy=self.agent.entropy,
                chunk=self.agent.chunk,
                sampling=self.agent.sampling,
            )
            with (
                torch.random.fork_rng(devices=[]),
                bar("MGRAL agent", self.agent.updates, enabled=context.progress) as steps,
            ):
                torch.manual_seed(seed)
                curve = agent_mod.train_agent(
                    agent,
                    phi[cand_rows],
                    n,
                    lambda b: model.batch_rewards(credits, cand_clusters, b),
                    training,
                    seed=seed,
                    on_update=lambda u: steps.advance(info=f"reward {u['reward_mean']:.4f}"),
                )
            seconds["agent"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            orders = [np.random.default_rng([seed, k]).permutation(len(cand)) for k in range(self.agent.orders)]
            scores = agent_mod.agent_scores(
                agent, phi[cand_rows], orders, self.agent.chunk, sampling=self.agent.sampling, budget=n
            )
            if out is not None:
                buf = io.BytesIO()
                torch.save(agent.state_dict(), buf)
                atomic_write_bytes(out.agent, buf.getvalue())
        random_batches = np.stack([rng.choice(len(cand), n, replace=False) for _ in range(64)])
        info["reward_random_batch"] = float(model.batch_rewards(credits, cand_clusters, random_batches).mean())
        selection = select_top(cand, scores, n, rng)
        picked = np.array([cand.index(i) for i in selection.image_ids]) if len(cand) < 5000 else None
        if picked is not None:
            info["reward_selected_batch"] = float(model.batch_rewards(credits, cand_clusters, picked[None])[0])
        seconds.setdefault("selection", time.perf_counter() - t0)
        return self._finish(context, cand, scores, n, rng, info, seconds, feats, index, out, selection, curve)

    # -- the head estimator (issue 19): prior, label-free table, policy tied to the prior ------
    def _select_head(
        self, context: SelectionContext, n: int, pool: list[ImageId], rng: np.random.Generator, seed: int, out
    ) -> Selection:
        """Candidates = the pool's top by the prior; the look-up table = label-free cross-fitted
        gains (:class:`~.estimate.CrossFitGain`) of every batch the policy samples, memoised;
        the policy = prior logits + an LSTM residual (:mod:`.policy`); the cycle takes the
        learned batch only when its estimate beats the prior's top-B by ``safe_z`` paired SEs.
        With ``estimator: none`` the cycle stops after the prior: its top-B."""
        from mgral.detectors.heads import cache_head_inputs, cache_nbytes

        dataset, labeled = context.dataset, list(context.labeled_ids)
        seconds: dict[str, float] = {}
        route = self._route()  # head or none
        info: dict[str, Any] = {"estimator": route}

        # candidates: the pool's highest by the prior's cheap scores
        t0 = time.perf_counter()
        raw = prior_mod.pool_scores(dataset, context.predictions, context.embeddings, pool, labeled)
        size = min(len(pool), max(n, self.table.candidate_pool or 4 * n))
        order = np.argsort(-prior_mod.pool_prior(raw), kind="stable")[:size]
        keep = np.sort(order)  # the pool's order: nothing below depends on how the prior ranked them
        cand = [pool[k] for k in keep]
        feats = self._features(context, cand, out)
        index = {i: k for k, i in enumerate(feats.ids)}
        stats = feats.stats
        consistency = stats[:, feature_names([]).index("flip_class_consistency")]
        z, z_names = standardise({**{k: v[keep] for k, v in raw.items()}, "inconsistency": 1.0 - consistency})
        phi, _ = compact_features(
            stats,
            feats.embeddings,
            np.ones(len(cand), dtype=bool),
            components=self.reward.pca_components,
            seed=seed,
            stat_names=feature_names([c.name for c in dataset.categories]),
        )
        beta0 = np.ones(z.shape[1])
        prior_batch = top_b(z @ beta0, n)
        seconds["features"] = time.perf_counter() - t0
        info.update({"candidates": len(cand), "prior_scores": z_names, "prior_weights": beta0.tolist()})

        def finish(batch: np.ndarray, scores: np.ndarray, curve: list[dict[str, float]], rows) -> Selection:
            chosen = [cand[k] for k in batch]
            info["table_rows"] = len(rows)
            if out is not None and rows:
                self._write_head_table(out, context.cycle, [([cand[k] for k in key], e, t) for (key, e), t in rows])
            selection = Selection(chosen, [float(scores[k]) for k in batch], {})
            return self._finish(context, cand, None, n, rng, info, seconds, feats, index, out, selection, curve)

        if route == "none":
            info["choice"] = SafeChoice(False, math.nan, math.nan, "estimator none: the prior's top batch").to_dict()
            return finish(prior_batch, z @ beta0, [], [])
        if len(labeled) < 2:
            info["fallback"] = f"{len(labeled)} labeled image(s): no cross-fitting, the prior's top-{n}"
            return finish(prior_batch, z @ beta0, [], [])

        # the look-up table: cached head inputs, cross-fitted control heads
        t0 = time.perf_counter()
        cache = cache_head_inputs(context.detector, dataset, labeled + cand, labeled=labeled)
        info["head_cache"] = {"images": len(cache), "bytes": cache_nbytes(cache)}
        estimator = CrossFitGain(
            context.detector,
            cache,
            dataset,
            labeled,
            folds=min(self.head.folds, len(labeled)),
            labelings=self.head.labelings,
            seed=seed,
            resamples=self.head.resamples,
            train={"iterations": self.head.head_iterations},
        )
        estimates: dict[tuple[int, ...], GainEstimate] = {}
        row_seconds: list[float] = []

        def estimate(key: tuple[int, ...]) -> GainEstimate:
            if key not in estimates:
                t = time.perf_counter()
                estimates[key] = estimator.estimate([cand[k] for k in key])
                row_seconds.append(time.perf_counter() - t)
                steps.advance(info=f"gain {estimates[key].gain:+.4f}")
            return estimates[key]

        rows_bound = (
            2 + self.head.policy_updates * self.head.policy_samples + (len(z_names) if self.head.score_batches else 0)
        )
        with bar("MGRAL table", rows_bound, enabled=context.progress) as steps:
            info["control_mAP"] = estimator.control_mAP
            prior_est = estimate(tuple(sorted(prior_batch.tolist())))
            seconds["table"] = time.perf_counter() - t0
            rows = lambda: list(zip(estimates.items(), row_seconds, strict=True))  # noqa: E731 - evaluation order
            if not math.isfinite(prior_est.gain):
                info["fallback"] = "the labeled set's mAP is undefined (no boxes): the prior's top batch"
                return finish(prior_batch, z @ beta0, [], rows())

            # the single scores' top batches, rows beside the prior's (score_batches)
            singles: dict[str, tuple[tuple[int, ...], GainEstimate]] = {}
            for col, name in enumerate(z_names if self.head.score_batches else ()):
                key = tuple(sorted(top_b(z[:, col], n).tolist()))
                singles[name] = (key, estimate(key))

            # the policy, trained on the memoised table; it stops once `patience` updates in a
            # row sampled no batch that beats the prior's by more than safe_z paired SEs
            t0 = time.perf_counter()
            memo = BatchMemo(lambda key: estimate(key).gain)
            quiet = {"updates": 0, "seen": len(estimates)}

            def stop() -> bool:
                fresh = list(estimates.values())[quiet["seen"] :]
                quiet["seen"] = len(estimates)
                beats = any(
                    safe_choice(e.gain - prior_est.gain, paired_se(e, prior_est), z=self.head.safe_z).learned
                    for e in fresh
                )
                quiet["updates"] = 0 if beats else quiet["updates"] + 1
                return self.head.patience is not None and quiet["updates"] >= self.head.patience

            agent = PriorTiedAgent(phi.shape[1], beta0, seed=seed, hidden=self.agent.hidden)
            policy_settings = PolicySettings(
                updates=self.head.policy_updates,
                samples=self.head.policy_samples,
                lr=self.head.policy_lr,
                kl=self.head.kl,
                chunk=self.agent.chunk,
                orders=self.agent.orders,
            )
            curve = train_policy(agent, phi, z, n, memo, policy_settings, seed=seed, stop=stop)
            scores = policy_scores(agent, phi, z, policy_settings, seed=seed)
            seconds["agent"] = time.perf_counter() - t0

            # safe selection
            t0 = time.perf_counter()
            learned = top_b(scores, n)
            stopped = len(curve) < self.head.policy_updates
            if stopped:  # the learned batch is not estimated: the policy found nothing to learn
                learned_est = estimates.get(tuple(sorted(learned.tolist())))
            else:
                learned_est = estimate(tuple(sorted(learned.tolist())))
        same = set(learned.tolist()) == set(prior_batch.tolist())
        diff, se = (
            (learned_est.gain - prior_est.gain, paired_se(learned_est, prior_est))
            if learned_est is not None
            else (math.nan, math.nan)
        )
        if stopped:
            reason = (
                f"no sampled batch beat the prior's by more than {self.head.safe_z:g} paired SEs in "
                f"{self.head.patience} updates: training stopped after {len(curve)}, the prior's batch"
            )
            choice = SafeChoice(False, diff, se, reason)
        else:
            choice = safe_choice(diff, se, z=self.head.safe_z, same=same)
        # a single score's batch replaces the choice when it beats the prior's by safe_z SEs
        # and has the highest estimated gain of those that do
        picked, picked_gain = learned, (learned_est.gain if choice.learned else -math.inf)
        singles_info = {}
        for name, (key, est) in singles.items():
            single = safe_choice(
                est.gain - prior_est.gain,
                paired_se(est, prior_est),
                z=self.head.safe_z,
                same=set(key) == set(prior_batch.tolist()),
                name=f"score:{name}",
            )
            singles_info[name] = {"gain": est.gain, "se": est.se, "diff": single.diff, "paired_se": single.se}
            if single.learned and est.gain > picked_gain:
                choice, picked, picked_gain = single, np.array(key), est.gain
                scores = z[:, z_names.index(name)]
        if singles:
            info["score_batches"] = singles_info
        seconds["selection"] = time.perf_counter() - t0
        info.update(
            {
                "choice": choice.to_dict(),
                "prior_gain": prior_est.gain,
                "prior_se": prior_est.se,
                "learned_gain": learned_est.gain if learned_est is not None else None,
                "learned_se": learned_est.se if learned_est is not None else None,
                "policy_updates_run": len(curve),
                "policy_kl": curve[-1]["kl"] if curve else 0.0,
            }
        )
        if choice.learned:
            return finish(picked, scores, curve, rows())
        return finish(prior_batch, z @ beta0, curve, rows())

    def _write_head_table(self, out: MgralDir, cycle: int, rows) -> None:
        """``table.csv`` of the head estimator: the control, then each batch evaluated (its image
        ids; ``dmAP`` = its estimated gain, ``se`` its bootstrap SE, ``mAP`` = control + gain);
        ``table.json`` adds each labeling's gain and the row's wall seconds."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["cycle", "combination", "dmAP", "se", "mAP"])
        if rows:
            control = rows[0][1].control_mAP
            w.writerow([cycle, "control", _fmt(0.0), "", _fmt(control)])
        table = []
        for ids, est, seconds in rows:
            w.writerow([cycle, json.dumps(ids), _fmt(est.gain), _fmt(est.se), _fmt(est.control_mAP + est.gain)])
            table.append(
                {"cycle": cycle, "batch": ids, "gain": est.gain, "se": est.se, "gains": est.gains, "seconds": seconds}
            )
        atomic_write_text(out.table, buf.getvalue())
        atomic_write_json(out.table_json, _jsonable(table), indent=1)

    # -- stages ------------------------------------------------------------------------------
    def _candidates(
        self, context: SelectionContext, n: int, pool: list[ImageId], rng: np.random.Generator
    ) -> Candidates:
        """Stages 1-2 of the fine-tune estimator: the labeled set split into ``L_fit`` and the
        reward set, a seeded random subset of the pool as candidates (``candidate_pool``,
        default 20 x budget), and for ``labeled_simulation`` half of ``L_fit`` as simulated
        candidates (drawn in this order from ``rng``: the cycle's selections depend on it)."""
        fit_ids, eval_ids = split_labeled(context.dataset, list(context.labeled_ids), self.table.reward_fraction, rng)
        size = max(n, self.table.candidate_pool or 20 * n)
        cand = pool if len(pool) <= size else [pool[k] for k in sorted(rng.choice(len(pool), size, replace=False))]
        sim_ids: list[ImageId] = []
        if self.table.reward_source == "labeled_simulation" and len(fit_ids) >= 4:
            k = max(2, len(fit_ids) // 2)
            sim_ids = [fit_ids[j] for j in sorted(rng.choice(len(fit_ids), k, replace=False))]
        return Candidates(fit_ids, eval_ids, cand, sim_ids)

    def _features(self, context: SelectionContext, ids: list[ImageId], out: MgralDir | None) -> Features:
        """Raw statistics and embeddings of ``ids`` (cached per cycle in ``features.npz``)."""
        cache = out.features if out is not None else None
        if cache is not None and cache.exists():
            with np.load(cache, allow_pickle=False) as z:
                cached = Features(json.loads(str(z["ids"])), z["stats"], z["embeddings"])
            if set(ids) <= set(cached.ids):
                return cached.take(ids)
        detector = context.detector
        preds = dict(context.predictions or {})
        known = dict(context.embeddings or {})
        missing = [i for i in ids if i not in preds or (i not in known and preds[i].embedding is None)]
        if missing:  # labeled-simulation candidates are not in the pool's cached predictions
            preds.update(detector.predict(context.dataset, missing, progress=context.progress and "MGRAL features"))
        mirrored = detector.predict(
            context.dataset, ids, embeddings=False, augment=hflip, progress=context.progress and "MGRAL mirrored"
        )
        stats = raw_features(context.dataset, ids, preds, mirrored)
        emb = [np.asarray(known[i] if i in known else preds[i].embedding, dtype=np.float64) for i in ids]
        embeddings = np.stack(emb)
        if cache is not None:
            buf = io.BytesIO()
            np.savez(buf, ids=np.array(json.dumps(list(ids))), stats=stats, embeddings=embeddings)
            atomic_write_bytes(cache, buf.getvalue())
        return Features(list(ids), stats, embeddings)

    def _clusters(self, phi, names, ref, budget, seed) -> tuple[np.ndarray, int]:
        from sklearn.cluster import KMeans

        emb_cols = [k for k, nm in enumerate(names) if nm.startswith("pc")] or list(range(phi.shape[1]))
        k = self.reward.clusters or max(2, min(budget, int(ref.sum()) // 2))
        k = min(k, int(ref.sum()))
        km = KMeans(n_clusters=k, n_init=3, random_state=seed).fit(phi[ref][:, emb_cols])
        return km.predict(phi[:, emb_cols]), k

    def _table(self, context, budget, split: Candidates, phi, index, clusters, num_clusters, seed, out):
        """Run the control and the M combinations' fine-tunes; return (rows for the CSV, TableRows)."""
        cand, sim_ids, fit_ids, eval_ids = split.ids, split.sim_ids, split.fit_ids, split.eval_ids
        from mgral.detectors.training import trainable_boxes

        detector = context.detector
        config = detector.train_config()
        train = {
            "optimizer": config.optimizer,
            "lr": self.table.surrogate_lr or config.lr,
            "momentum": config.momentum,
            "weight_decay": config.weight_decay,
            "grad_clip": config.grad_clip,
            "ignored_boxes": config.ignored_boxes,
            "progress": False,
        }
        rng = np.random.default_rng([seed, 17])
        if self.table.reward_source == "labeled_simulation" and sim_ids:
            source, base_fit, semi = sim_ids, [i for i in fit_ids if i not in set(sim_ids)], False
            targets = {i: trainable_boxes(context.dataset[i].target, config.ignored_boxes) for i in sim_ids}
        elif self.table.reward_source == "oracle":
            truth = context.oracle_dataset
            source, base_fit, semi = cand, fit_ids, False
            targets = {i: trainable_boxes(truth[i].target, config.ignored_boxes) for i in cand}
        else:
            source, base_fit, semi = cand, fit_ids, True
            targets = {}
            for i in cand:
                d = context.predictions[i]
                keep = d.scores >= self.table.pseudo_threshold
                targets[i] = (d.boxes[keep], d.labels[keep])
        # B_c = B by default; at most half the source, so that combinations differ
        bc = min(self.table.combination_size or budget, max(1, len(source) // 2))
        combos = [sorted(rng.choice(len(source), bc, replace=False).tolist()) for _ in range(self.table.combinations)]
        jobs = [SurrogateJob("control")] + [
            SurrogateJob(f"m{m}", [source[k] for k in c], {source[k]: targets[source[k]] for k in c}, semi)
            for m, c in enumerate(combos)
        ]
        placement = context.jobs
        shared = SurrogateShared(
            model=detector.to_bytes(),
            dataset=context.dataset,
            fit_ids=list(base_fit),
            eval_ids=list(eval_ids),
            train=train,
            steps=self.table.steps,
            batch_size=self.table.surrogate_batch,
            unsup_weight=self.table.unsup_weight,
            ramp=self.table.ramp,
            threads=placement.job_threads(torch.get_num_threads()),
            seed=seed,
            device=str(detector.device) if placement.device == "auto" else placement.device,
            device_fallback=placement.device == "auto",
            kind=detector.kind,
        )
        results = run_jobs(jobs, shared, placement, out, progress=context.progress)
        control = results["control"]
        names = [c.name for c in context.dataset.categories]
        table, combos, dmap = [], [], []
        for job in jobs:
            r = results[job.name]
            dm = r["mAP"] - control["mAP"] if job.extra_ids else 0.0
            table.append(
                {
                    "cycle": context.cycle,
                    "combination": job.extra_ids if job.extra_ids else "control",
                    "dmAP": dm,
                    "mAP": r["mAP"],
                    "per_class": dict(zip(names, r["per_class"], strict=True)),
                    "loss_sup": r["loss_sup"],
                    "loss_pseudo": r["loss_pseudo"],
                    "loss_cons": r["loss_cons"],
                    "consistency": r["consistency"],
                    "device": r.get("device", "cpu"),  # jobs saved before the key existed ran on the CPU
                    "seconds": r["seconds"],
                }
            )
            if job.extra_ids:
                combos.append(job.extra_ids)
                dmap.append(dm)
        rows = table_rows(combos, dmap, phi, index, clusters, num_clusters)
        if out is not None:
            self._write_table(out, table, names)
            buf = io.BytesIO()
            np.savez(
                buf,
                phi_sum=rows.phi_sum,
                sizes=rows.sizes,
                cluster=rows.cluster,
                dmap=rows.dmap,
                cycle=np.array(context.cycle),
            )
            atomic_write_bytes(out.table_rows, buf.getvalue())
        return table, rows

    def _write_table(self, out: MgralDir, table: list[dict], names: list[str]) -> None:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["cycle", "combination", "dmAP", "mAP", *(f"AP[{n}]" for n in names)])
        for row in table:
            combo = row["combination"] if isinstance(row["combination"], str) else json.dumps(row["combination"])
            w.writerow(
                [row["cycle"], combo, _fmt(row["dmAP"]), _fmt(row["mAP"]), *(_fmt(row["per_class"][n]) for n in names)]
            )
        atomic_write_text(out.table, buf.getvalue())
        atomic_write_json(out.table_json, table, indent=1)

    def _history(self, context: SelectionContext, num_features: int) -> list[TableRows]:
        """Rows of this series' earlier cycles (``../cycle-<c>/mgral/table_rows.npz``),
        down-weighted by ``history_decay ** age``; rows of another feature width are skipped."""
        if context.work_dir is None:
            return []
        parts = []
        for c in range(context.cycle):
            path = CycleDir(Path(context.work_dir)).series.cycle(c).mgral.table_rows
            if not path.exists():
                continue
            with np.load(path, allow_pickle=False) as z:
                if z["phi_sum"].ndim != 2 or z["phi_sum"].shape[1] != num_features:
                    continue
                w = self.reward.history_decay ** (context.cycle - int(z["cycle"]))
                parts.append(TableRows(z["phi_sum"], z["sizes"], z["cluster"], z["dmap"], np.full(len(z["dmap"]), w)))
        return parts

    def _agent(self, context: SelectionContext, num_features: int) -> agent_mod.SamplingAgent:
        """A fresh agent, or the previous cycle's (warm start) when its shape fits."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            agent = agent_mod.SamplingAgent(num_features, hidden=self.agent.hidden)
        if self.agent.warm_start and context.work_dir is not None and context.cycle > 0:
            prev = CycleDir(Path(context.work_dir)).series.cycle(context.cycle - 1).mgral.agent
            if prev.exists():
                state = torch.load(prev, map_location="cpu", weights_only=True)
                try:
                    agent.load_state_dict(state)
                except RuntimeError:
                    pass  # another feature width (e.g. changed settings): start fresh
        return agent

    def _greedy(self, context, cand, credits, clusters, lam, n, info, seconds, t0, feats, index, out):
        """Greedy maximisation of ``R``: add the image with the largest marginal gain."""
        counts = np.zeros(int(clusters.max()) + 1)
        chosen = np.zeros(len(cand), dtype=bool)
        picks, gains = [], []
        for _ in range(n):
            gain = credits + lam * (np.sqrt(counts[clusters] + 1) - np.sqrt(counts[clusters]))
            gain[chosen] = -np.inf
            best = int(np.argmax(gain))
            picks.append(best)
            gains.append(float(gain[best]))
            chosen[best] = True
            counts[clusters[best]] += 1
        seconds["agent"] = 0.0
        seconds["selection"] = time.perf_counter() - t0
        selection = Selection([cand[k] for k in picks], gains, {})
        return self._finish(context, cand, None, n, context.rng, info, seconds, feats, index, out, selection, [])

    def _finish(self, context, cand, scores, n, rng, info, seconds, feats, index, out, selection, curve):
        if selection is None:
            selection = select_top(cand, scores, n, rng)
        picked = np.array([index[i] for i in selection.image_ids])
        info["diversity"] = diversity(feats, picked, [c.name for c in context.dataset.categories])
        info["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
        if curve:
            _, trend = reward_trend(
                np.array([c["update"] for c in curve]), np.array([c["reward_mean"] for c in curve], dtype=float)
            )
            if len(trend):  # the same running means as the report's table and plot
                info["reward"] = {"first": float(trend[0]), "last": float(trend[-1])}
        if out is not None:
            if curve:
                buf = io.StringIO()
                w = csv.DictWriter(buf, list(curve[0]), lineterminator="\n")
                w.writeheader()
                w.writerows(curve)
                atomic_write_text(out.agent_rewards, buf.getvalue())
            atomic_write_json(
                out.summary,
                {
                    "loo_spearman": info.get("loo_spearman"),
                    "table_rows": info.get("table_rows", 0),
                    "seconds": info["seconds"],
                    "diversity": info["diversity"],
                    "reward": info.get("reward"),
                    **{k: v for k, v in info.items() if k not in ("seconds", "diversity", "reward")},
                },
                indent=1,
            )
        return Selection(list(selection.image_ids), [float(v) for v in selection.scores], _jsonable(info))


MGRAL.__init__.__signature__ = settings.signature()  # type: ignore[attr-defined]  # what build_strategy accepts


@dataclass(frozen=True)
class Candidates:
    """The fine-tune estimator's splits and candidates (stages 1-2): ``fit_ids`` (L_fit) and
    ``eval_ids`` (the reward set E_t) partition the labeled set; ``ids``: the pool candidates;
    ``sim_ids``: labeled images posing as candidates (``labeled_simulation``), else empty."""

    fit_ids: list[ImageId]
    eval_ids: list[ImageId]
    ids: list[ImageId]
    sim_ids: list[ImageId]


def table_rows(
    combinations: list[list[ImageId]],
    dmap: list[float] | np.ndarray,
    phi: np.ndarray,
    index: dict[ImageId, int],
    clusters: np.ndarray,
    num_clusters: int,
) -> TableRows:
    """The reward model's samples from the table: per combination (image ids, rows of ``phi``
    found through ``index``) its summed features, size, cluster term and ``dmap``, weight 1."""
    phi_sum, sizes, cterm = [], [], []
    for combo in combinations:
        rows = np.array([index[i] for i in combo])
        phi_sum.append(phi[rows].sum(axis=0))
        sizes.append(len(rows))
        cterm.append(cluster_term(clusters[rows], num_clusters))
    dmap = np.array(dmap, dtype=float)
    return TableRows(np.array(phi_sum), np.array(sizes, float), np.array(cterm), dmap, np.ones(len(dmap)))


def diversity(feats: Features, rows: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """Mean pairwise embedding distance and the predicted-class histogram of a batch."""
    from scipy.spatial.distance import pdist

    emb = feats.embeddings[rows]
    mean_dist = float(pdist(emb).mean()) if len(rows) > 1 else 0.0
    hist_cols = feats.stats[rows][:, -len(class_names) :] if class_names else np.zeros((len(rows), 0))
    return {
        "mean_pairwise_distance": mean_dist,
        "class_histogram": {n: int(v) for n, v in zip(class_names, hist_cols.sum(axis=0), strict=True)},
    }


def split_labeled(
    dataset: Dataset, labeled: list[ImageId], fraction: float, rng: np.random.Generator
) -> tuple[list[ImageId], list[ImageId]]:
    """``(L_fit, E_t)``: ``E_t`` holds ``round(fraction * |L|)`` images (at least 1, and
    ``L_fit`` keeps at least 1), first one image per class where possible, then at random."""
    if len(labeled) < 2:
        return list(labeled), []
    target = min(len(labeled) - 1, max(1, round(fraction * len(labeled))))
    order = [labeled[k] for k in rng.permutation(len(labeled))]
    held: list[ImageId] = []
    covered: set[int] = set()
    for i in order:
        if len(held) >= target:
            break
        classes = set(dataset[i].target.labels.tolist())
        if classes - covered:
            held.append(i)
            covered |= classes
    first = set(held)
    rest = [i for i in order if i not in first]
    held += rest[: target - len(held)]
    kept = set(held)
    return [i for i in labeled if i not in kept], [i for i in labeled if i in kept]


def run_jobs(jobs, shared, placement: JobPlacement, out: MgralDir | None, *, progress: bool = False) -> dict[str, dict]:
    """Run the fine-tunes where ``placement`` says; each result is saved as it finishes
    (``jobs/<name>.json``) and reused on a re-run, so a killed cycle resumes its table.
    A Ray job reserves ``shared.threads`` CPUs and ``placement.gpus`` GPUs; ``progress``: a
    bar over the table's rows."""
    results: dict[str, dict] = {}
    todo = []
    jobs_dir = out.jobs if out is not None else None
    if jobs_dir is not None:
        jobs_dir.mkdir(exist_ok=True)
    for job in jobs:
        path = jobs_dir / f"{job.name}.json" if jobs_dir is not None else None
        if path is not None and path.exists():
            saved = json.loads(path.read_text(encoding="utf-8"))
            if saved.get("extra_ids") == list(job.extra_ids):
                results[job.name] = saved
                continue
        todo.append(job)
    if todo:
        with (
            placement.executor_for(shared.threads) as ex,
            bar("MGRAL table", len(jobs), completed=len(jobs) - len(todo), enabled=progress) as steps,
        ):
            for k, result in ex.map(run_surrogate, todo, shared):
                result["extra_ids"] = list(todo[k].extra_ids)
                results[todo[k].name] = result
                if jobs_dir is not None:
                    atomic_write_json(jobs_dir / f"{todo[k].name}.json", _jsonable(result))
                steps.advance(info=f"{todo[k].name}: mAP {result['mAP']:.4f}")
    return results


def _fmt(v: float) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.6f}"


def _jsonable(value: Any) -> Any:
    """NaN/inf -> None, numpy scalars -> Python (JSON has no NaN)."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    return value
