"""A new link of the chain, the same for every backend: its random generator, its factor draw and the init rule.

Algorithm 1 extends the chain with a link (B_k: m x r_k, A_k: r_k x n) whose product is zero, so W is unchanged:

    frozen_factor "none" / "A"   A_k random, B_k = 0   (COLA, LoRA; RAC-LoRA with A frozen, only B trained)
    frozen_factor "B"            B_k random, A_k = 0   (RAC-LoRA with B frozen, only A trained)

The random factor of link k is drawn on the CPU from `link_generator(seed, k)` (`draw_generator`; k = 0 for every
link without fresh_init), so every process, backend and resumed run draws the same link; the pruning reset of
knot k draws from `reset_generator(seed, k)`. Used by the matrix backend, the PEFT backends (sequential, FSDP),
the packed backend and the Trainer callback.
"""

from __future__ import annotations

import math

import torch

from cola_theory.config import FROZEN, INITS, ChainConfig

Tensor = torch.Tensor
__all__ = ["check_link_init", "draw_factor", "draw_generator", "init_factor", "link_generator", "new_link",
           "reset_generator", "set_trainable_"]


def link_generator(seed: int, link: int) -> torch.Generator:
    """The RNG of link k's random factor: seeded by (seed, k), identical on every process."""
    return torch.Generator().manual_seed(1_000_003 * seed + 7919 * link + 17)


def draw_generator(seed: int, link: int, fresh_init: bool = True) -> torch.Generator:
    """The generator of link `link`'s random factor: a fresh draw per link, or link 0's draw again for every link
    (`ChainConfig.fresh_init=False`)."""
    return link_generator(seed, link if fresh_init else 0)


def reset_generator(seed: int, link: int) -> torch.Generator:
    """The generator of the knot before link `link` (a "random:p" optimizer reset prunes the same entries on every
    process)."""
    return link_generator(seed + 1, link)


def check_link_init(init: str, frozen_factor: str = "none") -> None:
    """Raise ValueError naming the setting if `init` is not in INITS or `frozen_factor` not in FROZEN."""
    if init not in INITS:
        raise ValueError(f"init={init!r} is invalid: use one of {INITS}")
    if frozen_factor not in FROZEN:
        raise ValueError(f"frozen_factor={frozen_factor!r} is invalid: use one of {FROZEN}")


def draw_factor(shape: tuple[int, int], init: str, rank: int, generator: torch.Generator,
                std: float | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """A random LoRA factor on CPU: PEFT's kaiming_uniform(a=sqrt(5)) (bound 1/sqrt(fan_in)) or N(0, std^2),
    std = 1/r by default (PEFT "gaussian")."""
    check_link_init(init)
    if init == "gaussian":
        return torch.randn(shape, generator=generator, dtype=dtype) * (std if std is not None else 1.0 / rank)
    bound = 1.0 / math.sqrt(shape[1])  # gain sqrt(2/(1+5)) * sqrt(3/fan_in)
    return (torch.rand(shape, generator=generator, dtype=dtype) * 2 - 1) * bound


def init_factor(shape: tuple[int, int], cfg: ChainConfig, rank: int, g: torch.Generator,
                dtype=torch.float64) -> Tensor:
    """`draw_factor` with the init of `cfg` (float64 for the theory problems)."""
    return draw_factor(shape, cfg.init, rank, g, cfg.init_std, dtype)


def new_link(a_shape: tuple[int, int], b_shape: tuple[int, int], rank: int, generator: torch.Generator,
             init: str = "kaiming", init_std: float | None = None, frozen_factor: str = "none",
             dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """(A, B) of a new link on CPU (module docstring): B random and A = 0 when frozen_factor == "B", else A random
    and B = 0. One draw from `generator`, so layers drawn one after another share one generator stream."""
    check_link_init(init, frozen_factor)
    if frozen_factor == "B":
        return torch.zeros(a_shape, dtype=dtype), draw_factor(b_shape, init, rank, generator, init_std, dtype)
    return draw_factor(a_shape, init, rank, generator, init_std, dtype), torch.zeros(b_shape, dtype=dtype)


def set_trainable_(A: Tensor, B: Tensor, frozen_factor: str) -> None:
    """requires_grad of the link factors: all but the frozen one (RAC-LoRA) are trained."""
    A.requires_grad_(frozen_factor != "A")
    B.requires_grad_(frozen_factor != "B")
