"""Synthetic fine-tuning problems with known constants (torch, float64).

Each problem has a "pre-trained" W0 (m x n) and a planted fine-tuning change Delta* = W* - W0 of
chosen rank k (> r, so a single rank-r LoRA cannot reach it). It knows its loss f(W), its exact
gradient, a certified smoothness constant beta (||grad f(W) - grad f(V)||_F <= beta ||W - V||_F),
a certified lower bound of f, f* where it is planted, and minibatch stochastic gradients.
The chain works on the change Delta = W - W0 (Delta_1 = 0).

Convex: least_squares, matrix_completion, logistic, rac_quadratic (RAC-LoRA's counterexample) - here.
Nonconvex smooth: robust_cauchy, robust_geman_mcclure, two_layer, sigmoid_sensing - `problems_nonconvex`.
"""

from __future__ import annotations

import math

import torch

import cola_theory.problems_nonconvex  # noqa: F401 - registers the nonconvex family, so REGISTRY holds both
from cola_theory.problem_base import DT, REGISTRY, Problem, check_sizes, low_rank, register

Tensor = torch.Tensor


def make_problem(name: str, **kwargs) -> Problem:
    """Build a registered problem by name (see `REGISTRY`: the convex family below and `problems_nonconvex`)."""
    if name not in REGISTRY:
        raise ValueError(f"unknown problem {name!r}; choose one of {sorted(REGISTRY)}")
    return REGISTRY[name](**kwargs)


@register("least_squares")
class LeastSquares(Problem):
    """Multi-output least squares f(W) = 1/(2N) ||X W^T - Y||_F^2 with Y = X W*^T (noiseless).

    Convex; beta = sigma_max(X)^2 / N; f* = 0 at the planted W* = W0 + Delta*, rank(Delta*) = k.
    """

    name = "least_squares"

    def __init__(self, m: int = 30, n: int = 40, k: int = 6, N: int = 400, scale: float = 3.0,
                 seed: int = 0) -> None:
        check_sizes("LeastSquares", m=m, n=n, k=k, N=N, scale=scale)
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


@register("matrix_completion")
class MatrixCompletion(Problem):
    """Matrix completion f(W) = 1/(2|Omega|) sum_{(i,j) in Omega} (W_ij - M*_ij)^2 with M* = W*.

    Omega: N distinct entries drawn uniformly without replacement; one sample = one observed entry.
    Convex. The Hessian is diag(1_Omega) / |Omega| (an entry mask), so beta = 1/|Omega| exactly.
    f* = 0 at the planted W* = W0 + Delta*, rank(Delta*) = k (unique only when Omega pins it down).
    """

    name = "matrix_completion"

    def __init__(self, m: int = 30, n: int = 40, k: int = 6, N: int | None = None, scale: float = 3.0,
                 seed: int = 0) -> None:
        N = (m * n) // 2 if N is None and isinstance(m, int) and isinstance(n, int) else N
        check_sizes("MatrixCompletion", m=m, n=n, k=k, N=N, scale=scale)
        if N > m * n:
            raise ValueError(f"MatrixCompletion: N={N} is invalid: at most m * n = {m * n} entries can be observed")
        g = torch.Generator().manual_seed(seed)
        W0 = torch.randn(m, n, generator=g, dtype=DT) / math.sqrt(n)
        W_star = W0 + low_rank(m, n, k, scale, g)
        flat = torch.randperm(m * n, generator=g)[:N]
        self.rows, self.cols = flat // n, flat % n  # (N,), (N,): Omega
        self.M = W_star[self.rows, self.cols]  # (N,) observed values M*_ij
        super().__init__(W0, W_star, 1.0 / N, N, f_star=0.0)

    def _entries(self, idx):
        return (self.rows, self.cols, self.M) if idx is None else (self.rows[idx], self.cols[idx], self.M[idx])

    def _loss(self, W, idx):
        i, j, M = self._entries(idx)
        return 0.5 * ((W[i, j] - M) ** 2).mean()

    def _grad(self, W, idx):
        i, j, M = self._entries(idx)
        G = torch.zeros_like(W)  # (m, n)
        return G.index_put_((i, j), (W[i, j] - M) / i.numel(), accumulate=True)  # repeats add up


@register("logistic")
class Logistic(Problem):
    """Multinomial logistic regression with m classes: f(W) = 1/N sum_i [logsumexp(W x_i) - (W x_i)_{y_i}].

    Labels y_i ~ softmax(W* x_i) are drawn from the planted model W* = W0 + Delta*, rank(Delta*) = k.
    Convex. beta = ||X||_2^2 / (2N): with p_i = softmax(W x_i), S_i = diag(p_i) - p_i p_i^T,
    <U, Hess f(W) U> = 1/N sum_i (U x_i)^T S_i (U x_i) and 0 <= u^T S_i u = Var_{p_i}(u) <= (max u - min u)^2 / 4
    <= ||u||^2 / 2 (Popoviciu), so 0 <= <U, Hess U> <= ||X U^T||_F^2 / (2N) <= ||X||_2^2 ||U||_F^2 / (2N).
    The minimiser is not planted in closed form (f_star None; W_star is the generating matrix); f >= 0.
    """

    name = "logistic"

    def __init__(self, m: int = 20, n: int = 30, k: int = 6, N: int = 600, scale: float = 3.0,
                 seed: int = 0) -> None:
        check_sizes("Logistic", m=m, n=n, k=k, N=N, scale=scale)
        g = torch.Generator().manual_seed(seed)
        W0 = torch.randn(m, n, generator=g, dtype=DT) / math.sqrt(n)
        W_star = W0 + low_rank(m, n, k, scale, g)
        self.X = torch.randn(N, n, generator=g, dtype=DT)  # (N, n)
        probs = torch.softmax(self.X @ W_star.T, dim=1)  # (N, m)
        self.y = torch.multinomial(probs, 1, generator=g).squeeze(1)  # (N,) class labels
        self.onehot = torch.nn.functional.one_hot(self.y, m).to(DT)  # (N, m)
        beta = torch.linalg.matrix_norm(self.X, ord=2).item() ** 2 / (2 * N)
        super().__init__(W0, W_star, beta, N, f_star=None)

    def _rows(self, idx):
        return (self.X, self.onehot) if idx is None else (self.X[idx], self.onehot[idx])

    def _loss(self, W, idx):
        X, Y = self._rows(idx)
        Z = X @ W.T  # (b, m) logits
        return (torch.logsumexp(Z, dim=1) - (Z * Y).sum(1)).mean()

    def _grad(self, W, idx):
        X, Y = self._rows(idx)
        return (torch.softmax(X @ W.T, dim=1) - Y).T @ X / X.shape[0]  # (m, n)


@register("rac_quadratic")
class RacQuadratic(Problem):
    """RAC-LoRA's counterexample (Malinovsky et al. 2024, section 3): LoRA and COLA diverge at step 1/L.

    3 x 3 W, f(W) = 1/2 vec(W - W*)^T diag(L, 1, ..., 1) vec(W - W*): the stiff coordinate is W_00.
    Hessian = diag(L, 1, ..., 1), so beta = L = 10 and f is mu-strongly convex (hence PL) with mu = 1;
    f* = 0, W0 = 0, Delta* = W* of rank k (default 3, full rank) and Frobenius norm `scale`.
    Full batch: n_samples = 1 (idx is ignored).

    The scale matters, and was chosen by experiment (rank 1, alpha = r = 1, PEFT kaiming-uniform A, SGD,
    constant step 0.1 = 1/L, via `run_chain(MatrixBackend(...))`, problem seeds 0-39 x init seeds 0-3, plain
    LoRA and a 10-link chain, k = 3 and k = 2): at ||W*||_F = 3 LoRA almost never diverges (312 of 320 runs
    did not; it stalls at a rank-1 stationary point with 5-25% of f(W0) left); at 10, 6-12% of runs do not
    diverge (W* with little weight on the stiff W_00 direction); at the default ||W*||_F = 20 all 320 runs
    diverged within 30 steps (so a chain diverges in its first link unless links are shorter than that),
    while RAC-LoRA (A frozen random, B trained, same step) reached f / f(W0) < 5e-4 after 30 links of 100
    steps (init seeds 0-1) and < 1e-4 after 40 links (seeds 0-7). Plain GD in W converges at step 1/L.
    """

    name = "rac_quadratic"
    mu = 1.0  # strong convexity (so PL) constant: the smallest Hessian eigenvalue

    def __init__(self, k: int = 3, scale: float = 20.0, L: float = 10.0, seed: int = 0) -> None:
        check_sizes("RacQuadratic", m=3, n=3, k=k, scale=scale)
        if not (isinstance(L, (int, float)) and 1.0 <= L < math.inf):
            raise ValueError(f"RacQuadratic: L={L!r} is invalid: need 1 <= L < inf (the other curvatures are 1)")
        g = torch.Generator().manual_seed(seed)
        M = low_rank(3, 3, k, 1.0, g)
        W_star = scale * M / torch.linalg.norm(M)  # (3, 3), ||W*||_F = scale
        self.D = torch.ones(3, 3, dtype=DT)  # diag(L, 1, ..., 1) as an entry-wise weight on W - W*
        self.D[0, 0] = L
        super().__init__(torch.zeros(3, 3, dtype=DT), W_star, float(L), 1, f_star=0.0)

    def _loss(self, W, idx):
        return 0.5 * (self.D * (W - self.W_star) ** 2).sum()

    def _grad(self, W, idx):
        return self.D * (W - self.W_star)  # (3, 3)
