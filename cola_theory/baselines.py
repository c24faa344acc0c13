"""Idealized COLA (paper Algorithm 2) and the closed-form RAC-LoRA iteration (RAC-LoRA Eq. 3/4).

Idealized COLA is nonconvex Frank-Wolfe over K = {||Delta||_* <= tau} whose linear oracle is INEXACT:
at step t a rank-r LoRA link (B: m x r, A: r x n) is trained from B = 0, A random, by projected SGD on
the stochastic linear objective phi(B, A) = <G~_t, B A> (G~_t a minibatch gradient at Delta_t), over
    S = {(B, A) : ||A||_F^2 + ||B||_F^2 <= 2 tau}.
Since ||B A||_* <= ||B||_F ||A||_F <= (||A||_F^2 + ||B||_F^2) / 2 <= tau, every V_t = B A lies in K, and
min_S phi = -tau sigma_1(G~_t) (B = sqrt(tau) u1, A = sqrt(tau) v1^T) equals the exact LMO value.
The oracle error eps_t = <V_t, G_t> + tau sigma_1(G_t) >= 0 is measured with the EXACT full gradient G_t.

RAC-LoRA (right sketch): W^{t+1} = W^t - gamma grad f(W^t) H_t, H_t = A_t^T (A_t A_t^T)^+ A_t for a fresh
Gaussian A_t (r x n): the exact minimizer of one link with the random factor frozen, in closed form.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cola_theory.frank_wolfe import FWTrace, fw_loop
from cola_theory.problem_base import Problem


def lora_direction(G: np.ndarray, tau: float, rank: int, steps: int, lr: float = 1.0,
                   rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Train one LoRA link on phi(B, A) = <G, B A> by projected gradient steps; returns (B: m x r, A: r x n).

    Start: B = 0, A Gaussian with ||A||_F^2 = tau (inside S). Step: the simultaneous gradient step
    B <- B - a G A^T, A <- A - a B^T G with a = lr / ||G||_F (<= lr / sigma_1(G)), then the Euclidean
    projection of the pair onto S (a rescaling). This is normalized power iteration on [[0, G], [G^T, 0]]:
    the pair aligns with (u1, -v1), so eps decays like ((1 + a sigma_2) / (1 + a sigma_1))^(2 steps).
    """
    if not (isinstance(rank, (int, np.integer)) and 1 <= rank <= min(G.shape)):
        raise ValueError(f"rank={rank!r}: need an integer 1 <= rank <= min(m, n) = {min(G.shape)}")
    if not (isinstance(steps, (int, np.integer)) and steps >= 0):
        raise ValueError(f"steps={steps!r}: the number of inner SGD steps must be an integer >= 0")
    if not lr > 0:
        raise ValueError(f"lr={lr!r}: the inner step (in units of 1/||G||_F) must be > 0")
    rng = rng if rng is not None else np.random.default_rng(0)
    m, n = G.shape
    A = rng.standard_normal((rank, n))  # (r, n)
    A *= np.sqrt(tau) / np.linalg.norm(A)
    B = np.zeros((m, rank))  # (m, r)
    gnorm = np.linalg.norm(G)
    if gnorm == 0:
        return B, A
    a, radius = lr / gnorm, np.sqrt(2.0 * tau)
    for _ in range(steps):
        B, A = B - a * G @ A.T, A - a * B.T @ G  # (m, r), (r, n): simultaneous SGD step on phi
        norm = np.sqrt(np.linalg.norm(A) ** 2 + np.linalg.norm(B) ** 2)
        if norm > radius:  # projection onto S
            B, A = B * (radius / norm), A * (radius / norm)
    return B, A


def idealized_cola(problem: Problem, tau: float, T: int, eta: float, *, rank: int = 1, inner_steps: int = 20,
                   inner_lr: float = 1.0, batch_size: int | None = None, seed: int = 0,
                   keep_iterates: bool = False, tol: float = 1e-10) -> FWTrace:
    """Algorithm 2: Delta_{t+1} = Delta_t + eta (V_t - Delta_t), V_t = B_t A_t a LoRA link trained on <G~_t, B A>.

    G~_t is the gradient on a minibatch of `batch_size` samples (the full gradient if None). Returns a
    `FWTrace` with the exact FW gap g_t at every iterate and the measured oracle error eps_t per step.
    """
    if not 0 < eta <= 1:
        raise ValueError(f"eta={eta!r}: the Frank-Wolfe step must lie in (0, 1] so iterates stay in K")
    if batch_size is not None and not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size={batch_size!r}: need an integer >= 1, or None for the full gradient")
    rng = np.random.default_rng(seed)
    data_gen = torch.Generator().manual_seed(seed)
    W0 = problem.W0

    def direction(t: int, Delta: np.ndarray, G: np.ndarray, vertex: np.ndarray) -> np.ndarray:
        G_tilde = G
        if batch_size is not None:  # stochastic linear objective: one minibatch gradient at Delta_t
            idx = problem.sample(batch_size, data_gen)
            G_tilde = problem.loss_grad(W0 + torch.from_numpy(Delta).to(W0.dtype), idx)[1].numpy()
        B, A = lora_direction(G_tilde, tau, rank, inner_steps, inner_lr, rng)
        return B @ A  # V_t: (m, n), in K

    return fw_loop(problem, tau, T, lambda t: eta, direction, keep_iterates=keep_iterates, tol=tol)


@dataclass
class RACTrace:
    """Per-step record of the closed-form RAC-LoRA iteration (T steps, T + 1 iterates)."""

    f: np.ndarray  # (T+1,) f(W^t), t = 0..T
    grad_sq: np.ndarray  # (T+1,) ||grad f(W^t)||_F^2
    proj_grad_sq: np.ndarray  # (T,) ||grad f(W^t) H_t||_F^2 (the part the sketch lets through)
    W: np.ndarray  # (m, n) final iterate
    lam: float  # lambda_min(E[H]) = r / (sketched side)


def rac_lora(problem: Problem, T: int, gamma: float, rank: int, *, side: str = "right", seed: int = 0) -> RACTrace:
    """W^{t+1} = W^t - gamma G_t H_t (right: H_t = P_row(A_t), A_t r x n) or - gamma H_t G_t (left: B_t m x r).

    H_t is the orthogonal projection onto a fresh Gaussian sketch's r-dimensional span (QR of the sketch).
    Starts at W^0 = problem.W0. The bound needs gamma <= 1/beta; this function does not enforce it.
    """
    if side not in ("right", "left"):
        raise ValueError(f"side={side!r}: use 'right' (frozen A, the sketch acts on rows) or 'left' (frozen B)")
    if not (isinstance(T, int) and T >= 1):
        raise ValueError(f"T={T!r}: the number of RAC-LoRA steps must be an integer >= 1")
    if not gamma > 0:
        raise ValueError(f"gamma={gamma!r}: the step must be > 0 (the bound needs gamma <= 1/beta)")
    m, n = problem.shape
    size = n if side == "right" else m
    if not (isinstance(rank, int) and 1 <= rank <= size):
        raise ValueError(f"rank={rank!r}: need an integer 1 <= rank <= {size} (the sketched side)")
    rng = np.random.default_rng(seed)
    W = problem.W0.detach().cpu().numpy().astype(np.float64).copy()
    f, gsq, pgsq = [], [], []
    for t in range(T + 1):
        ft, G = problem.loss_grad(torch.from_numpy(W).to(problem.W0.dtype))
        G = G.numpy()
        f.append(ft)
        gsq.append(float((G * G).sum()))
        if t == T:
            break
        Q, _ = np.linalg.qr(rng.standard_normal((size, rank)))  # (size, r): orthonormal basis of the sketch
        GH = (G @ Q) @ Q.T if side == "right" else Q @ (Q.T @ G)  # (m, n)
        pgsq.append(float((GH * GH).sum()))
        W = W - gamma * GH
    return RACTrace(np.array(f), np.array(gsq), np.array(pgsq), W, rank / size)
