"""The chain engine: Chain of LoRA (Algorithm 1 of Xia, Qin & Hazan, 2024) for any backend.

Notation (paper): W frozen weights, link k = (B_k, A_k) of rank r_k, scale alpha/r_k,
T total optimizer steps shared by all links, knots = the steps where a link is merged.

    for each link k:            (B_k = 0, A_k random)            <- extend the chain
        tune the link           (T_k steps of the optimizer on B_k, A_k only)
        tie a knot              W <- W + (alpha/r_k) B_k A_k
        reset optimizer state   (COLA: full reset; variants: none / pruning)

A backend (matrix problems in `cola_theory.matrix_backend`, Hugging Face models in
`cola_theory.lm.backend`) implements the five verbs of `ChainBackend`; `run_chain` never touches a
tensor. Every published variant (LoRA, COLA, rank step-down, RAC-LoRA, ReLoRA-style resets and
jagged schedules) is a setting of `ChainConfig`, not a different loop.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from cola_theory.config import ChainConfig, Link, link_plan, lr_at

__all__ = ["ChainBackend", "ChainResult", "Checkpointer", "run_chain"]


class ChainBackend(Protocol):
    """What the chain driver needs from a model: five verbs, nothing else."""

    def extend(self, link: Link) -> None:
        """Start link `link`: A_k random (seeded by (seed, k)), B_k = 0, so W is unchanged."""

    def step(self, lr: float) -> float | Any:
        """One optimizer step on the current link's trainable factors; returns the minibatch loss
        (a float, or a 0-dim tensor that the driver reads only at log steps)."""

    def tie_knot(self) -> None:
        """Fold the current link into the frozen weights: W <- W + (alpha/r) B A."""

    def reset_optimizer(self, policy: str) -> dict[str, float]:
        """Apply the knot's optimizer policy to the link parameters; returns what it did."""

    def evaluate(self) -> dict[str, float]:
        """Metrics of the current (merged + active link) model."""


class Checkpointer(Protocol):
    """Optional: saves the run every few steps and restores it (see `cola_theory.lm.checkpoint`)."""

    def restore(self, backend: ChainBackend) -> tuple[int, list[dict]] | None:
        """Load the latest checkpoint into `backend`; return (steps done, history) or None."""

    def save(self, backend: ChainBackend, t: int, history: list[dict], at_knot: bool) -> None:
        """Called after step t (t steps done); decides itself whether to write."""


@dataclass
class ChainResult:
    history: list[dict[str, Any]] = field(default_factory=list)
    status: str = "finished"  # "finished" | "diverged"
    diverged: dict[str, Any] | None = None  # {"step", "link", "loss"} of the first non-finite loss
    wall_time_s: float = 0.0


def run_chain(
    backend: ChainBackend,
    cfg: ChainConfig,
    *,
    log_every: int = 1,
    eval_every: int = 0,
    checkpointer: Checkpointer | None = None,
    on_step: Any = None,
) -> ChainResult:
    """Algorithm 1 (tune the link -> tie a knot -> extend the chain) over `cfg.total_steps` steps.

    The last link is also folded at the end (the paper merges every link for deployment), so the
    backend finishes with no active adapter mass: W_T = W_0 + sum_k (alpha/r_k) B_k A_k.
    A non-finite loss stops the run; it is recorded as diverged (step, link), not raised. A backend whose
    `step` returns a tensor is read (and checked) every `log_every` steps only, so a GPU step needs no
    host-device sync; with log_every=1 (the default) every step is checked.
    """
    start_time, res, t = time.perf_counter(), ChainResult(), 0
    if checkpointer is not None and (restored := checkpointer.restore(backend)) is not None:
        t, res.history = restored  # resume after t finished steps
    for link in link_plan(cfg):
        if t >= link.end:
            continue  # link already finished before a restart
        if t == link.start:
            if link.index > 0:
                backend.tie_knot()  # tie a knot: W <- W + (alpha/r) B A
            backend.extend(link)  # extend the chain: fresh A, B = 0
            if link.index > 0:
                reset = backend.reset_optimizer(cfg.optimizer_reset)  # fresh optimizer state
                res.history.append({"event": "knot", "t": t, "link": link.index, **reset})
        first = t
        for t in range(first, link.end):  # tune the link
            lr = lr_at(cfg, t, link)
            loss = backend.step(lr)  # a float, or a 0-dim tensor read only at log steps (no device sync)
            if (t + 1) % log_every == 0 or t + 1 == link.end or isinstance(loss, float):
                loss = float(loss)
                if not math.isfinite(loss):
                    res.status, res.diverged = "diverged", {"step": t, "link": link.index, "loss": str(loss)}
                    res.wall_time_s = time.perf_counter() - start_time
                    return res
            if (t + 1) % log_every == 0 or t + 1 == link.end:
                res.history.append({"event": "step", "t": t + 1, "link": link.index, "lr": lr, "loss": loss})
            if (eval_every and (t + 1) % eval_every == 0) or t + 1 == link.end:
                res.history.append({"event": "eval", "t": t + 1, "link": link.index, **backend.evaluate()})
            if on_step is not None:
                on_step(t + 1, link)
            if checkpointer is not None:
                checkpointer.save(backend, t + 1, res.history, at_knot=t + 1 == link.end)
        t = link.end
    backend.tie_knot()  # final knot: the whole chain lives in W
    res.wall_time_s = time.perf_counter() - start_time
    return res
