"""Synthetic fine-tuning problems with known constants (torch, float64).

Each problem has a "pre-trained" W0 (m x n) and a planted fine-tuning change Delta* = W* - W0 of
chosen rank k (> r, so a single rank-r LoRA cannot reach it). It knows its loss f(W), its exact
gradient, a certified smoothness constant beta (||grad f(W) - grad f(V)||_F <= beta ||W - V||_F),
a certified lower bound of f, f* where it is planted, and minibatch stochastic gradients.
The chain works on the change Delta = W - W0 (Delta_1 = 0).
"""

from __future__ import annotations

import math
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


def make_problem(name: str, **kwargs) -> Problem:
    """Build a registered problem by name (see `REGISTRY`)."""
    if name not in REGISTRY:
        raise ValueError(f"unknown problem {name!r}; choose one of {sorted(REGISTRY)}")
    return REGISTRY[name](**kwargs)


def low_rank(m: int, n: int, k: int, scale: float, g: torch.Generator) -> Tensor:
    """A random m x n matrix of exact rank k with singular values spread over [scale/2, scale]."""
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=DT))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=DT))
    s = torch.linspace(scale, scale / 2, k, dtype=DT)
    return (U * s) @ V.T


class Problem:
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

    def _loss(self, W: Tensor, idx: Tensor | None) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _grad(self, W: Tensor, idx: Tensor | None) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


@register("least_squares")
class LeastSquares(Problem):
    """Multi-output least squares f(W) = 1/(2N) ||X W^T - Y||_F^2 with Y = X W*^T (noiseless).

    Convex; beta = sigma_max(X)^2 / N; f* = 0 at the planted W* = W0 + Delta*, rank(Delta*) = k.
    """

    name = "least_squares"

    def __init__(self, m: int = 30, n: int = 40, k: int = 6, N: int = 400, scale: float = 3.0,
                 seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        W0 = torch.randn(m, n, generator=g, dtype=DT) / math.sqrt(n)
        W_star = W0 + low_rank(m, n, k, scale, g)
        self.X = torch.randn(N, n, generator=g, dtype=DT)  # (N, n)
        self.Y = self.X @ W_star.T  # (N, m)
        beta = torch.linalg.matrix_norm(self.X, ord=2).item() ** 2 / N
        super().__init__(W0, W_star, beta, N, f_star=0.0)

    def _rows(self, idx):
        return (self.X, self.Y) if idx is None else (self.X[idx], self.Y[idx])

    def _loss(self, W, idx):
        X, Y = self._rows(idx)
        return 0.5 * ((X @ W.T - Y) ** 2).sum() / X.shape[0]

    def _grad(self, W, idx):
        X, Y = self._rows(idx)
        return (X @ W.T - Y).T @ X / X.shape[0]  # (m, n)
