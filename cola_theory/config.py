"""`ChainConfig`: every published chain variant as one frozen, validated setting of the same loop.

| variant            | n_links / knots | rank        | optimizer_reset | frozen_factor | lr_schedule    |
|--------------------|-----------------|-------------|-----------------|---------------|----------------|
| LoRA               | 1               | r           | -               | none          | linear         |
| COLA (paper)       | m               | r           | full            | none          | linear         |
| COLA step-down     | 2               | (8, 2)      | full            | none          | linear         |
| RAC-LoRA (code)    | m               | r           | none            | A or B        | any            |
| ReLoRA-style       | m               | r           | magnitude:0.9   | none          | jagged_cosine  |
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

RESETS = ("full", "none", "magnitude:p", "random:p")
SCHEDULES = ("linear", "restart", "jagged_cosine", "constant")
INITS = ("kaiming", "gaussian")
FROZEN = ("none", "A", "B")
OPTIMIZERS = ("adamw", "adam", "sgd")


class Link(NamedTuple):
    index: int  # k = 0, 1, ...
    start: int  # first step of the link (inclusive)
    end: int  # last step + 1
    rank: int  # r_k


def parse_reset(policy: str) -> tuple[str, float]:
    """'full' -> ('full', 1.0); 'magnitude:0.9' -> ('magnitude', 0.9). Raises ValueError."""
    kind, _, p = policy.partition(":")
    if kind in ("full", "none") and not p:
        return kind, 1.0 if kind == "full" else 0.0
    if kind in ("magnitude", "random") and p:
        try:
            frac = float(p)
        except ValueError:
            frac = math.nan
        if 0.0 <= frac <= 1.0:
            return kind, frac
    raise ValueError(
        f"optimizer_reset={policy!r} is not a valid policy; use one of {RESETS} with 0 <= p <= 1 "
        "(e.g. 'full' for COLA, 'magnitude:0.9' for ReLoRA)"
    )


def _bad(field_name: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"ChainConfig.{field_name}={value!r} is invalid: {allowed}")


def check_ranks(rank: Any, max_rank: int | None = None, *, name: str = "rank",
                of: str = "the adapted matrix") -> tuple[int, ...]:
    """The ranks of `rank` (one integer, or one per link) after checking that each is an integer >= 1 and, given
    `max_rank` = min(m, n) of the adapted matrix, at most that; a ValueError naming `name` and the value if not.
    The one rank rule of the chain: ChainConfig, the matrix backend and the PEFT adapter all call it."""
    try:
        ranks = (rank,) if isinstance(rank, int) else tuple(rank)
    except TypeError:
        ranks = (rank,)
    if not ranks or any(not isinstance(r, int) or r < 1 for r in ranks):
        raise ValueError(f"{name}={rank!r} is invalid: need positive integers (e.g. 8)")
    if max_rank is not None and max(ranks) > max_rank:
        raise ValueError(f"{name}={rank!r} exceeds min(m, n) = {max_rank} of {of}; use a smaller rank")
    return ranks


@dataclass(frozen=True)
class ChainConfig:
    """One chain run. `knots` (explicit steps) wins over `n_links` (evenly spaced knots)."""

    total_steps: int  # T: optimizer steps shared by all links
    n_links: int = 1  # m; 1 = plain LoRA
    knots: tuple[int, ...] = ()  # explicit knot steps 0 < k_1 < ... < T (overrides n_links)
    rank: int | tuple[int, ...] = 8  # r, or one rank per link (rank step-down, e.g. (8, 2))
    alpha: float = 16.0  # the update is (alpha / r) B A
    lr: float = 1e-3  # eta (peak learning rate)
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    lr_schedule: str = "linear"  # one global linear decay over T (default)
    warmup_steps: int = 0
    restart_warmup_steps: int = 0  # jagged_cosine: re-warm-up after each knot (ReLoRA)
    min_lr_ratio: float = 0.0  # floor of the cosine / linear decay, as a fraction of lr
    init: str = "kaiming"  # A ~ kaiming_uniform(a=sqrt(5)) (PEFT default) or gaussian
    init_std: float | None = None  # gaussian std; None = 1/r (PEFT "gaussian")
    fresh_init: bool = True  # a fresh random A per link (False: every link reuses link 0's draw)
    optimizer_reset: str = "full"
    frozen_factor: str = "none"  # RAC-LoRA: a random frozen A (train B) or frozen B (train A)
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.total_steps, int) or self.total_steps < 1:
            raise _bad("total_steps", self.total_steps, "need an integer >= 1")
        knots = tuple(int(k) for k in self.knots)
        object.__setattr__(self, "knots", knots)
        if knots:
            if list(knots) != sorted(set(knots)) or knots[0] <= 0 or knots[-1] >= self.total_steps:
                raise _bad("knots", knots, f"need strictly increasing steps inside (0, {self.total_steps})")
            object.__setattr__(self, "n_links", len(knots) + 1)
        if not isinstance(self.n_links, int) or self.n_links < 1:
            raise _bad("n_links", self.n_links, "need at least 1 link (1 = plain LoRA)")
        if self.n_links > self.total_steps:
            raise _bad("n_links", self.n_links, f"more links than steps (total_steps={self.total_steps})")
        ranks = check_ranks(self.rank, name="ChainConfig.rank")
        if len(ranks) not in (1, self.n_links):
            raise _bad("rank", self.rank, f"give one rank or one per link ({self.n_links} links)")
        object.__setattr__(self, "rank", ranks[0] if len(ranks) == 1 else ranks)
        for name, value, allowed in [
            ("lr_schedule", self.lr_schedule, SCHEDULES),
            ("init", self.init, INITS),
            ("frozen_factor", self.frozen_factor, FROZEN),
            ("optimizer", self.optimizer, OPTIMIZERS),
        ]:
            if value not in allowed:
                raise _bad(name, value, f"allowed values are {allowed}")
        parse_reset(self.optimizer_reset)
        for name in ("alpha", "lr"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise _bad(name, value, "need a finite number > 0")
        if not (0.0 <= self.min_lr_ratio <= 1.0):
            raise _bad("min_lr_ratio", self.min_lr_ratio, "need 0 <= min_lr_ratio <= 1")
        if self.init_std is not None and not self.init_std > 0:
            raise _bad("init_std", self.init_std, "need > 0 or None")
        for name in ("warmup_steps", "restart_warmup_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value < self.total_steps:
                raise _bad(name, value, f"need an integer in [0, total_steps={self.total_steps})")
        if self.weight_decay < 0:
            raise _bad("weight_decay", self.weight_decay, "need >= 0")

    def ranks(self) -> tuple[int, ...]:
        """One rank per link."""
        return self.rank if isinstance(self.rank, tuple) else (self.rank,) * self.n_links

    def check_rank(self, max_rank: int) -> None:
        """Raise if a link's rank exceeds min(m, n) of the adapted layer."""
        check_ranks(self.rank, max_rank, name="ChainConfig.rank")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def link_plan(cfg: ChainConfig) -> list[Link]:
    """The links of a chain: [0, k_1), [k_1, k_2), ..., [k_{m-1}, T) with their ranks."""
    knots = cfg.knots or tuple(round(i * cfg.total_steps / cfg.n_links) for i in range(1, cfg.n_links))
    bounds = (0, *knots, cfg.total_steps)
    return [Link(i, bounds[i], bounds[i + 1], r) for i, r in enumerate(cfg.ranks())]


def knots_from_epochs(epochs_per_link: Sequence[float], steps_per_epoch: int) -> tuple[int, tuple[int, ...]]:
    """(T, knots) for links that last the given numbers of epochs, e.g. (3, 2) -> knot after epoch 3."""
    if steps_per_epoch < 1 or not epochs_per_link or any(e <= 0 for e in epochs_per_link):
        raise ValueError(
            f"epochs_per_link={tuple(epochs_per_link)} with steps_per_epoch={steps_per_epoch}: "
            "need positive epochs per link and at least one step per epoch"
        )
    ends = [round(sum(epochs_per_link[: i + 1]) * steps_per_epoch) for i in range(len(epochs_per_link))]
    if len(set(ends)) != len(ends) or ends[0] == 0:
        raise ValueError(f"links of {tuple(epochs_per_link)} epochs collapse at {steps_per_epoch} steps/epoch")
    return ends[-1], tuple(ends[:-1])


def lr_at(cfg: ChainConfig, t: int, link: Link) -> float:
    """Learning rate of step t (0-based) inside `link`.

    linear: one global linear decay (HF `get_linear_schedule_with_warmup`) across all links;
    restart: the same shape restarted inside every link (one fresh schedule per link);
    jagged_cosine: ReLoRA's global cosine, set to 0 at each knot and re-warmed linearly;
    constant: lr (after warm-up).
    """
    lo, T, w = cfg.min_lr_ratio, cfg.total_steps, cfg.warmup_steps
    if cfg.lr_schedule == "restart":
        t, T = t - link.start, link.end - link.start
        w = min(w, T - 1)
    if t < w:
        return cfg.lr * t / w  # as transformers' warm-up: 0 at step 0
    if cfg.lr_schedule == "constant":
        return cfg.lr
    frac = (t - w) / max(1, T - w)  # 0 at the end of warm-up, -> 1 at the last step
    if cfg.lr_schedule in ("linear", "restart"):
        return cfg.lr * (lo + (1 - lo) * (1 - frac))

    def cosine(s: int) -> float:
        f = (s - w) / max(1, T - w)
        return cfg.lr * (lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * min(1.0, f))))

    s, rw = t - link.start, cfg.restart_warmup_steps
    if link.index > 0 and s < rw:  # ReLoRA: lr -> 0 at the knot, then a short linear re-warm-up
        return s / rw * cosine(min(link.start + rw, T - 1))
    return cosine(t)
