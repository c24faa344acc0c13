"""What every synthetic problem shares: the `Problem` contract, the name registry and the planted-change helpers.

The families register themselves here by name: the convex ones in `cola_theory.problems`, the nonconvex ones in
`cola_theory.problems_nonconvex`; `cola_theory.problems.make_problem` imports both and builds one by name.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch

Tensor = torch.Tensor
DT = torch.float64
REGISTRY: dict[str, Callable[..., Problem]] = {}


def register(name: str):
    def deco(fn):
        REGISTRY[name] = fn
        return fn

    return deco


def low_rank(m: int, n: int, k: int, scale: float, g: torch.Generator) -> Tensor:
    """A random m x n matrix of exact rank k with singular values spread over [scale/2, scale]."""
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=DT))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=DT))
    s = torch.linspace(scale, scale / 2, k, dtype=DT)
    return (U * s) @ V.T


def check_sizes(problem: str, *, m: int, n: int, k: int, N: int | None = None,
                scale: float | None = None) -> None:
    """Raise a ValueError naming the field, its value and the fix if a constructor argument is invalid."""
    for field, value in (("m", m), ("n", n)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{problem}: {field}={value!r} is invalid: need an integer >= 1")
    if not isinstance(k, int) or not 1 <= k <= min(m, n):
        raise ValueError(f"{problem}: k={k!r} is invalid: the planted rank needs 1 <= k <= min(m, n) = "
                         f"{min(m, n)}; lower k or enlarge the matrix")
    if N is not None and (not isinstance(N, int) or N < 1):
        raise ValueError(f"{problem}: N={N!r} is invalid: need at least one sample (an integer >= 1)")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"{problem}: scale={scale!r} is invalid: need a finite number > 0")


class Problem(ABC):
    """Base class: subclasses define `_loss(W, idx)` (torch, differentiable) and `_grad(W, idx)`."""

    name = "problem"
    convex = True

    def __init__(self, W0: Tensor, W_star: Tensor | None, beta: float, n_samples: int,
                 f_star: float | None = None, lower_bound: float = 0.0) -> None:
        self.W0, self.W_star, self.beta = W0, W_star, float(beta)
        self.n_samples, self.f_star, self.lower_bound = n_samples, f_star, float(lower_bound)

    # -- interface ---------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.W0.shape)

    @property
    def Delta_star(self) -> Tensor | None:
        """The planted change W* - W0 (None if the optimum is not planted)."""
        return None if self.W_star is None else self.W_star - self.W0

    def loss(self, W: Tensor, idx: Tensor | None = None) -> Tensor:
        """f(W) (mean over the samples `idx`, all samples if None); differentiable in W."""
        return self._loss(W, idx)

    def loss_grad(self, W: Tensor, idx: Tensor | None = None) -> tuple[float, Tensor]:
        """(f(W), grad f(W)) with the exact analytic gradient, over `idx` or all samples."""
        with torch.no_grad():
            return float(self._loss(W, idx)), self._grad(W, idx)

    def sample(self, batch_size: int, g: torch.Generator) -> Tensor:
        """Indices of a uniform minibatch (with replacement), for stochastic gradients."""
        return torch.randint(0, self.n_samples, (batch_size,), generator=g)

    def describe(self) -> dict:
        return {"name": self.name, "convex": self.convex, "shape": list(self.shape), "beta": self.beta,
                "f_star": self.f_star, "lower_bound": self.lower_bound, "n_samples": self.n_samples,
                "target_rank": None if self.W_star is None else int(torch.linalg.matrix_rank(self.Delta_star))}

    @abstractmethod
    def _loss(self, W: Tensor, idx: Tensor | None) -> Tensor:
        """f(W) over the samples idx (all if None), differentiable in W."""

    @abstractmethod
    def _grad(self, W: Tensor, idx: Tensor | None) -> Tensor:
        """The exact gradient of `_loss` w.r.t. W, shape (m, n)."""
