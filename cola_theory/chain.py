"""The chain engine: Chain of LoRA (Algorithm 1 of Xia, Qin & Hazan, 2024) for any backend.

Notation (paper): W frozen weights, link k = (B_k, A_k) of rank r_k, scale alpha/r_k,
T total optimizer steps shared by all links, knots = the steps where a link is merged.

    for each link k:
        extend the chain        B_k = 0, A_k random (W unchanged)
        reset optimizer state   before every link but the first (COLA: full reset; variants: none / pruning)
        tune the link           T_k steps of the optimizer on B_k, A_k only
        tie a knot              W <- W + (alpha/r_k) B_k A_k

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


class _Tuning:
    """The bookkeeping of one optimizer step: the divergence check, the log, eval, `on_step` and checkpoint."""

    def __init__(self, backend: ChainBackend, cfg: ChainConfig, res: ChainResult, log_every: int, eval_every: int,
                 checkpointer: Checkpointer | None, on_step: Any) -> None:
        self.backend, self.cfg, self.res = backend, cfg, res
        self.log_every, self.eval_every, self.checkpointer, self.on_step = log_every, eval_every, checkpointer, on_step

    def step(self, t: int, link: Link) -> bool:
        """Step t (0-based) of `link`; False when its loss is not finite (recorded as diverged: the run stops).

        The loss is read at log steps (every `log_every` steps and the link's last) and whenever the backend
        returns a float; a 0-dim tensor is not read in between (no device sync). After the step (t + 1 done):
        the log entry, the eval at `eval_every` and at the link's end, `on_step(t + 1, link)`, then the checkpoint
        (at the link's end it is taken before the knot is tied).
        """
        lr = lr_at(self.cfg, t, link)
        loss = self.backend.step(lr)
        done, link_end = t + 1, t + 1 == link.end
        logged = done % self.log_every == 0 or link_end
        if logged or isinstance(loss, float):
            loss = float(loss)
            if not math.isfinite(loss):
                self.res.status, self.res.diverged = "diverged", {"step": t, "link": link.index, "loss": str(loss)}
                return False
        history = self.res.history
        if logged:
            history.append({"event": "step", "t": done, "link": link.index, "lr": lr, "loss": loss})
        if (self.eval_every and done % self.eval_every == 0) or link_end:
            history.append({"event": "eval", "t": done, "link": link.index, **self.backend.evaluate()})
        if self.on_step is not None:
            self.on_step(done, link)
        if self.checkpointer is not None:
            self.checkpointer.save(self.backend, done, history, at_knot=link_end)
        return True


def run_chain(
    backend: ChainBackend,
    cfg: ChainConfig,
    *,
    log_every: int = 1,
    eval_every: int = 0,
    checkpointer: Checkpointer | None = None,
    on_step: Any = None,
) -> ChainResult:
    """Algorithm 1 (extend the chain -> reset the optimizer -> tune the link -> tie a knot) over `cfg.total_steps`.

    Every link is folded at its end, the last one too (the paper merges every link for deployment), so the
    backend finishes with no active adapter mass: W_T = W_0 + sum_k (alpha/r_k) B_k A_k.
    A non-finite loss stops the run; it is recorded as diverged (step, link), not raised, and no knot is tied.
    A backend whose `step` returns a tensor is read (and checked) every `log_every` steps only, so a GPU step
    needs no host-device sync; with log_every=1 (the default) every step is checked.
    A checkpointer restores the run after t finished steps; a checkpoint taken at a link's end holds the link
    untied, so the resumed run ties that knot first.
    """
    start_time, res, t = time.perf_counter(), ChainResult(), 0
    if checkpointer is not None and (restored := checkpointer.restore(backend)) is not None:
        t, res.history = restored  # resume after t finished steps
    tuning = _Tuning(backend, cfg, res, log_every, eval_every, checkpointer, on_step)
    for link in link_plan(cfg):
        if t > link.end:
            continue  # tied before the checkpoint the run resumed from
        if t == link.start:
            backend.extend(link)  # extend the chain: fresh A, B = 0
            if link.index > 0:  # the knot's optimizer policy (COLA: a fresh state)
                reset = backend.reset_optimizer(cfg.optimizer_reset)
                res.history.append({"event": "knot", "t": t, "link": link.index, **reset})
        for step in range(t, link.end):  # tune the link
            if not tuning.step(step, link):
                res.wall_time_s = time.perf_counter() - start_time
                return res
        t = link.end
        backend.tie_knot()  # tie a knot: W <- W + (alpha/r) B A
    res.wall_time_s = time.perf_counter() - start_time
    return res
