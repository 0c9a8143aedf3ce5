"""The LSTM sampling agent and its REINFORCE training.

The agent reads the candidates in a shuffled order, cut into chunks that run as one LSTM
batch. The input at step ``k`` is a projection of image ``k``'s features concatenated with
an embedding of the decision at step ``k - 1`` (a learned start vector at ``k = 1``); a
two-layer MLP shared over steps maps each hidden state to a selection logit.

Decision feedback. With Plackett–Luce sampling (default) the batch is drawn after all
logits exist, so the fed-back "decision" is the agent's own inclination on the previous
item, ``sigmoid(logit_{k-1})``, mixing the two decision embeddings: the logits stay a
deterministic function of the features and the order, and the batch's log-probability is
exact. With Bernoulli sampling the sampled bit is fed back (the classic autoregressive
form); the sampled set is then repaired to exactly ``B`` (dropping the lowest logits, or
adding the highest) and the gradient uses the log-probability of the repaired decisions
(the set that earned the reward; with the sampled bits instead, the agent learned to pick
nothing and leave the choice to the repair). An offset centres the expected number of
picks on ``B``; selection feeds back greedy decisions, as in training.

Training (:func:`train_agent`): per update, one forward pass over a fresh order, ``G``
batches sampled, rewards from the reward function, advantage = reward - EMA baseline
(scaled by an EMA of the rewards' spread), loss = -advantage * log-prob - entropy bonus;
Adam with gradient clipping. Selection (:func:`agent_scores`): logits averaged over fixed
orders; the caller takes the top B.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


class SamplingAgent(nn.Module):
    """LSTM over candidates with decision feedback and a shared MLP head."""

    def __init__(self, num_features: int, *, hidden: int = 256, proj: int = 64, decision_dim: int = 16) -> None:
        super().__init__()
        self.num_features = num_features
        self.proj = nn.Sequential(nn.Linear(num_features, proj), nn.ReLU())
        self.decision = nn.Embedding(2, decision_dim)
        self.start = nn.Parameter(torch.zeros(decision_dim))
        self.cell = nn.LSTMCell(proj + decision_dim, hidden)
        self.head = nn.Sequential(nn.Linear(hidden, 64), nn.ReLU(), nn.Linear(64, 1))

    def forward(
        self,
        x: torch.Tensor,
        *,
        feedback: str = "soft",
        generator: torch.Generator | None = None,
        offset: float = 0.0,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits for ``x [C, L, F]`` (C chunks of L steps; padding is harmless: it comes last
        in a chunk and is dropped by the caller).

        ``feedback="soft"``: the previous step's selection probability is fed back (returns
        logits ``[C, L]`` and None); ``"sample"``: Bernoulli decisions sampled step by step
        and fed back; ``"greedy"``: the decisions ``logit > 0`` fed back (both return the
        logits and the decisions ``[C, L]``). ``offset`` is added to every logit (Bernoulli
        sampling centres the expected batch size on B with it).
        """
        c, length, _ = x.shape
        z = self.proj(x)
        h = x.new_zeros(c, self.cell.hidden_size)
        cell = x.new_zeros(c, self.cell.hidden_size)
        prev = self.start.expand(c, -1)
        logits, decisions = [], []
        e0, e1 = self.decision.weight[0], self.decision.weight[1]
        for k in range(length):
            h, cell = self.cell(torch.cat([z[:, k], prev], dim=1), (h, cell))
            logit = self.head(h).squeeze(1) + offset
            logits.append(logit)
            if feedback != "soft":
                if feedback == "sample":
                    d = torch.bernoulli(torch.sigmoid(logit).detach(), generator=generator)
                else:
                    d = (logit.detach() > 0).float()
                decisions.append(d)
                prev = self.decision(d.long())
            else:
                p = torch.sigmoid(logit).unsqueeze(1)
                prev = p * e1 + (1 - p) * e0
        return torch.stack(logits, 1), (torch.stack(decisions, 1) if decisions else None)


def chunked(features: torch.Tensor, order: np.ndarray, chunk: int) -> tuple[torch.Tensor, np.ndarray]:
    """``features[order]`` cut into ``[C, chunk, F]`` (zero-padded) and the positions of the
    real items in the flattened ``[C * chunk]`` output."""
    n, f = features.shape
    c = -(-n // chunk)
    padded = features.new_zeros(c * chunk, f)
    padded[:n] = features[torch.as_tensor(order)]
    return padded.view(c, chunk, f), np.arange(n)


def logits_in_order(
    agent: SamplingAgent, features: torch.Tensor, order: np.ndarray, chunk: int, **forward
) -> torch.Tensor:
    """Logits ``[N]`` indexed like ``features`` (read in ``order``; soft feedback unless
    ``forward`` says otherwise)."""
    x, _ = chunked(features, order, chunk)
    flat = agent(x, **forward)[0].reshape(-1)[: len(order)]
    out = torch.empty_like(flat)
    out[torch.as_tensor(order)] = flat
    return out


def plackett_luce_log_prob(logits: torch.Tensor, picks: torch.Tensor) -> torch.Tensor:
    """Log-probability of drawing ``picks [G, B]`` in that order without replacement, each
    draw proportional to ``exp(logit)`` among the items not drawn yet. ``[G]``."""
    shift = logits.max().detach()
    e = torch.exp(logits - shift)
    chosen = e[picks]  # [G, B]
    before = torch.cumsum(chosen, dim=1) - chosen
    denom = (e.sum() - before).clamp_min(1e-30)
    return (logits[picks] - shift - torch.log(denom)).sum(dim=1)


def gumbel_top_b(logits: torch.Tensor, b: int, g: int, generator: torch.Generator) -> torch.Tensor:
    """``g`` Plackett–Luce samples of ``b`` distinct items (Gumbel top-b), in draw order."""
    u = torch.rand(g, logits.shape[0], generator=generator).clamp(1e-12, 1 - 1e-12)
    perturbed = logits.detach() - torch.log(-torch.log(u))
    return torch.topk(perturbed, b, dim=1).indices


def repair_to_b(decisions: np.ndarray, logits: np.ndarray, b: int) -> np.ndarray:
    """Indices of exactly ``b`` items: the chosen ones, dropping the lowest logits or adding
    the highest unchosen."""
    chosen = np.flatnonzero(decisions > 0.5)
    if len(chosen) > b:
        return chosen[np.argsort(-logits[chosen], kind="stable")[:b]]
    if len(chosen) < b:
        rest = np.flatnonzero(decisions <= 0.5)
        return np.concatenate([chosen, rest[np.argsort(-logits[rest], kind="stable")[: b - len(chosen)]]])
    return chosen


@dataclass(frozen=True)
class AgentSettings:
    updates: int = 300
    samples: int = 8
    lr: float = 1e-3
    entropy: float = 0.01
    baseline_decay: float = 0.9
    grad_clip: float = 1.0
    chunk: int = 64
    sampling: str = "plackett_luce"


def train_agent(
    agent: SamplingAgent,
    features: np.ndarray,
    budget: int,
    reward_fn: Callable[[np.ndarray], np.ndarray],
    settings: AgentSettings,
    *,
    seed: int,
    on_update: Callable[[dict[str, float]], object] | None = None,
) -> list[dict[str, float]]:
    """REINFORCE on ``reward_fn(batches [G, B] of row indices) -> [G]``; returns one record
    per update (``update``, ``reward_mean``, ``reward_max``, ``baseline``, ``entropy``),
    each also passed to ``on_update`` as it is made (e.g. to advance a progress bar)."""
    x = torch.as_tensor(features, dtype=torch.float32)
    n = x.shape[0]
    b = min(budget, n)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
    optimizer = torch.optim.Adam(agent.parameters(), lr=settings.lr)
    baseline, spread = None, None
    curve: list[dict[str, float]] = []
    agent.train()
    for update in range(settings.updates):
        order = rng.permutation(n)
        if settings.sampling == "bernoulli":
            xc, _ = chunked(x, order, settings.chunk)
            reps = xc.repeat(settings.samples, 1, 1)
            offset = bernoulli_offset(b, n)
            logit_c, dec_c = agent(reps, feedback="sample", generator=gen, offset=offset)
            per = logit_c.reshape(settings.samples, -1)[:, :n]
            dec = dec_c.reshape(settings.samples, -1)[:, :n]
            batches_ordered = np.stack(
                [repair_to_b(dec[s].numpy(), per[s].detach().numpy(), b) for s in range(settings.samples)]
            )
            final = torch.zeros_like(dec)
            final[torch.arange(settings.samples)[:, None], torch.as_tensor(batches_ordered)] = 1.0
            # log-probability of the repaired decisions: the set that earned the reward
            logp = (final * nn.functional.logsigmoid(per) + (1 - final) * nn.functional.logsigmoid(-per)).sum(1)
            batches = order[batches_ordered]
            p = torch.sigmoid(per)
            entropy = -(p * torch.log(p + 1e-12) + (1 - p) * torch.log(1 - p + 1e-12)).mean()
        else:
            logits = logits_in_order(agent, x, order, settings.chunk)
            picks = gumbel_top_b(logits, b, settings.samples, gen)
            logp = plackett_luce_log_prob(logits, picks)
            batches = picks.numpy()
            probs = torch.softmax(logits, 0)
            entropy = -(probs * torch.log(probs + 1e-12)).sum() / np.log(max(n, 2))
        rewards = np.asarray(reward_fn(batches), dtype=np.float64)
        mean = float(rewards.mean())
        baseline = (
            mean if baseline is None else settings.baseline_decay * baseline + (1 - settings.baseline_decay) * mean
        )
        dev = float(np.abs(rewards - baseline).mean())
        spread = dev if spread is None else settings.baseline_decay * spread + (1 - settings.baseline_decay) * dev
        adv = torch.as_tensor((rewards - baseline) / max(spread, 1e-8), dtype=torch.float32)
        loss = -(adv * logp).mean() - settings.entropy * entropy
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(agent.parameters(), settings.grad_clip)
        optimizer.step()
        curve.append(
            {
                "update": update,
                "reward_mean": mean,
                "reward_max": float(rewards.max()),
                "baseline": float(baseline),
                "entropy": float(entropy.detach()),
            }
        )
        if on_update is not None:
            on_update(curve[-1])
    return curve


def bernoulli_offset(b: int, n: int) -> float:
    """The logit offset at which independent decisions pick ``b`` of ``n`` on average."""
    return float(np.log(b / (n - b))) if 0 < b < n else 0.0


@torch.no_grad()
def agent_scores(
    agent: SamplingAgent,
    features: np.ndarray,
    orders: list[np.ndarray],
    chunk: int,
    *,
    sampling: str = "plackett_luce",
    budget: int = 1,
) -> np.ndarray:
    """Logits averaged over the fixed ``orders`` (``[N]``): soft feedback for a
    Plackett–Luce agent, greedy decisions fed back for a Bernoulli one (as it was trained)."""
    agent.eval()
    x = torch.as_tensor(features, dtype=torch.float32)
    forward = {}
    if sampling == "bernoulli":
        forward = {"feedback": "greedy", "offset": bernoulli_offset(min(budget, len(x)), len(x))}
    return np.mean([logits_in_order(agent, x, order, chunk, **forward).numpy() for order in orders], axis=0)
