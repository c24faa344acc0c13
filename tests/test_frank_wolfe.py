"""Frank-Wolfe machinery over K = {||Delta||_* <= tau}: LMO vs brute-force SVD, FW gap vs its definition,
projection, convex FW rate, idealized COLA's inexact oracle, closed-form RAC-LoRA."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cola_theory.baselines import idealized_cola, lora_direction, rac_lora
from cola_theory.bounds import convex_fw_bound
from cola_theory.frank_wolfe import (
    convex_frank_wolfe,
    fw_gap,
    lmo_accuracy,
    minimize_over_ball,
    nonconvex_frank_wolfe,
    nuclear_lmo,
    nuclear_norm,
    project_nuclear_ball,
    top_singular,
)
from cola_theory.problems import make_problem

SMALL = settings(max_examples=15, deadline=None)


def svd_sigma1(G):
    return np.linalg.svd(np.asarray(G), compute_uv=False)[0]


@SMALL
@given(m=st.integers(1, 12), n=st.integers(1, 12), tau=st.floats(0.1, 10.0), seed=st.integers(0, 10_000))
def test_lmo_matches_brute_force_svd(m, n, tau, seed):
    G = np.random.default_rng(seed).standard_normal((m, n))
    V = nuclear_lmo(G, tau)
    assert isinstance(V, np.ndarray) and V.shape == (m, n) and V.dtype == G.dtype
    s1 = svd_sigma1(G)
    assert (G * V).sum() == pytest.approx(-tau * s1, rel=1e-10)  # the LMO value min_K <G, V> = -tau sigma_1
    assert nuclear_norm(V) == pytest.approx(tau, rel=1e-10)  # a vertex of K
    Vt = nuclear_lmo(torch.from_numpy(G), tau)  # torch in -> torch out, same numbers
    assert isinstance(Vt, torch.Tensor) and Vt.dtype == torch.float64
    np.testing.assert_allclose(Vt.numpy(), V, atol=1e-12)


@pytest.mark.parametrize("shape", [(150, 130), (130, 200)])
def test_lanczos_path_accuracy_is_controlled(shape):
    """Large G goes through ARPACK; the tol argument keeps sigma_1 and the LMO value at ~1e-10 relative."""
    rng = np.random.default_rng(0)
    G = rng.standard_normal(shape) + 3 * np.outer(rng.standard_normal(shape[0]), rng.standard_normal(shape[1]))
    acc = lmo_accuracy(G, 2.0, tol=1e-10)
    assert acc["sigma_rel_err"] < 1e-9
    assert -1e-12 <= acc["value_rel_err"] < 1e-9  # never better than the exact minimum
    assert abs(acc["norm_excess"]) < 1e-9
    s, u, v = top_singular(torch.from_numpy(G).float(), tol=1e-6)  # float32 torch input works too
    assert s == pytest.approx(svd_sigma1(G), rel=1e-5)


def test_lmo_rejects_bad_tau():
    with pytest.raises(ValueError, match="tau=-1"):
        nuclear_lmo(np.ones((3, 3)), -1)
    with pytest.raises(ValueError, match="tau=0"):
        fw_gap(np.ones((3, 3)), np.zeros((3, 3)), 0)


def random_point_in_K(rng, m, n, tau, rank):
    X = rng.standard_normal((m, rank)) @ rng.standard_normal((rank, n))
    return X * (tau * rng.uniform(0, 1) / nuclear_norm(X))


@SMALL
@given(m=st.integers(2, 8), n=st.integers(2, 8), seed=st.integers(0, 10_000))
def test_fw_gap_is_the_max_over_K(m, n, seed):
    """g(W) = max_{V in K} <G, W - V>: no feasible V exceeds it, and the LMO vertex attains it."""
    rng, tau = np.random.default_rng(seed), 1.5
    G, W = rng.standard_normal((m, n)), random_point_in_K(rng, m, n, tau, 2)
    g = fw_gap(G, W, tau)
    samples = [random_point_in_K(rng, m, n, tau, rng.integers(1, 3)) for _ in range(300)]
    samples += [tau * np.outer(rng.standard_normal(m), rng.standard_normal(n)) for _ in range(100)]
    samples = [V * min(1.0, tau / nuclear_norm(V)) for V in samples]  # vertices scaled into K
    assert max((G * (W - V)).sum() for V in samples) <= g + 1e-10
    assert (G * (W - nuclear_lmo(G, tau))).sum() == pytest.approx(g, rel=1e-10, abs=1e-12)
    assert g >= -1e-12  # W itself is feasible


@SMALL
@given(m=st.integers(1, 8), n=st.integers(1, 8), tau=st.floats(0.1, 5.0), seed=st.integers(0, 10_000))
def test_projection_onto_K(m, n, tau, seed):
    rng = np.random.default_rng(seed)
    X = 3 * rng.standard_normal((m, n))
    P = project_nuclear_ball(X, tau)
    assert nuclear_norm(P) <= tau * (1 + 1e-10)
    np.testing.assert_allclose(project_nuclear_ball(P, tau), P, atol=1e-10)  # idempotent
    for _ in range(20):  # variational inequality of the projection: <X - P, Y - P> <= 0 for Y in K
        Y = random_point_in_K(rng, m, n, tau, min(m, n))
        assert ((X - P) * (Y - P)).sum() <= 1e-9


@pytest.fixture(scope="module")
def ls():
    return make_problem("least_squares", m=8, n=10, k=3, N=60, seed=1)


def test_convex_fw_meets_jaggi_bound_at_every_t(ls):
    tau = nuclear_norm(ls.Delta_star)  # Delta* in K, so min_K f = f* = 0
    tr = convex_frank_wolfe(ls, tau, 80, keep_iterates=True)
    t = np.arange(1, 81)
    assert np.all(tr.f[1:] - ls.f_star <= convex_fw_bound(ls.beta, 2 * tau, t))
    assert np.all(tr.gap >= tr.f - ls.f_star - 1e-9)  # convexity: the FW gap bounds the suboptimality
    assert all(nuclear_norm(X) <= tau * (1 + 1e-10) for X in tr.iterates)
    assert np.all(tr.eps <= 1e-9 * tau * np.abs(tr.gap[:-1]).max() + 1e-12)  # exact LMO: eps ~ 0
    assert tr.eta[0] == 1.0 and tr.eta[1] == pytest.approx(2 / 3)
    for X, f, g in zip(tr.iterates[::20], tr.f[::20], tr.gap[::20]):  # the trace's g_t is fw_gap at the iterate
        loss, G = ls.loss_grad(ls.W0 + torch.from_numpy(X))
        assert (f, g) == pytest.approx((loss, fw_gap(G, X, tau)), rel=1e-10, abs=1e-12)


def test_min_over_ball_certificate(ls):
    tau = 0.5 * nuclear_norm(ls.Delta_star)  # Delta* outside K: min_K f > 0
    res = minimize_over_ball(ls, tau, iters=3000, tol=1e-10)
    assert res["lower"] <= res["f_best"] and res["certificate_gap"] < 1e-8
    tr = convex_frank_wolfe(ls, tau, 200)
    assert tr.f.min() >= res["lower"] - 1e-12  # no feasible point beats the certified lower bound
    with pytest.raises(ValueError, match="convex=False"):
        minimize_over_ball(make_problem("two_layer", m=4, n=5, k=2, N=20), 1.0)


def test_nonconvex_fw_step_validation(ls):
    with pytest.raises(ValueError, match="eta=1.5"):
        nonconvex_frank_wolfe(ls, 1.0, 5, 1.5)
    with pytest.raises(ValueError, match="T=0"):
        nonconvex_frank_wolfe(ls, 1.0, 0, 0.5)


@SMALL
@given(m=st.integers(2, 9), n=st.integers(2, 9), rank=st.integers(1, 2), steps=st.integers(0, 30),
       seed=st.integers(0, 10_000))
def test_lora_direction_stays_in_K(m, n, rank, steps, seed):
    """||B A||_* <= (||A||^2 + ||B||^2)/2 <= tau after every projected step: V = B A is feasible, eps >= 0."""
    rng, tau = np.random.default_rng(seed), 2.0
    G = rng.standard_normal((m, n))
    B, A = lora_direction(G, tau, rank, steps, 1.0, rng)
    assert B.shape == (m, rank) and A.shape == (rank, n)
    assert (A * A).sum() + (B * B).sum() <= 2 * tau * (1 + 1e-12)
    V = B @ A
    assert nuclear_norm(V) <= tau * (1 + 1e-12)
    assert (G * V).sum() + tau * svd_sigma1(G) >= -1e-10  # eps >= 0


def test_idealized_cola_oracle_error_shrinks_with_inner_steps(ls):
    tau = nuclear_norm(ls.Delta_star)
    eps = [idealized_cola(ls, tau, 15, 0.1, inner_steps=k, seed=3).eps.mean() for k in (1, 5, 50, 400)]
    assert all(e >= -1e-10 for e in eps)
    assert eps[0] > eps[1] > eps[2] > eps[3]
    scale = tau * np.abs(idealized_cola(ls, tau, 15, 0.1, inner_steps=400, seed=3).gap).max()
    assert eps[3] < 1e-3 * scale  # -> the exact LMO with many inner steps (full-gradient objective)


def test_idealized_cola_iterates_feasible_and_eps_nonnegative(ls):
    tau = nuclear_norm(ls.Delta_star)
    tr = idealized_cola(ls, tau, 25, 0.2, rank=2, inner_steps=3, batch_size=8, seed=0, keep_iterates=True)
    assert np.all(tr.eps >= -1e-10)
    assert all(nuclear_norm(X) <= tau * (1 + 1e-10) for X in tr.iterates)
    assert len(tr.f) == len(tr.gap) == 26 and len(tr.eps) == 25


def test_rac_lora_full_rank_sketch_is_gradient_descent(ls):
    """rank = n: H = I, so the RAC iteration is plain GD on W."""
    gamma = 1 / ls.beta
    tr = rac_lora(ls, 10, gamma, rank=ls.shape[1], seed=0)
    W = ls.W0.clone()
    for _ in range(10):
        W = W - gamma * ls.loss_grad(W)[1]
    np.testing.assert_allclose(tr.W, W.numpy(), atol=1e-10)
    assert tr.lam == 1.0


def test_rac_lora_descends_pathwise(ls):
    """gamma <= 1/beta: f(W^{t+1}) <= f(W^t) - (gamma/2) ||G_t H_t||^2 at every step, for any sketch."""
    gamma = 1 / ls.beta
    for side in ("right", "left"):
        tr = rac_lora(ls, 30, gamma, rank=2, side=side, seed=5)
        assert np.all(tr.f[1:] <= tr.f[:-1] - 0.5 * gamma * tr.proj_grad_sq + 1e-10)
        assert np.all(tr.proj_grad_sq <= tr.grad_sq[:-1] + 1e-10)  # a projection never adds gradient
    with pytest.raises(ValueError, match="side='up'"):
        rac_lora(ls, 3, gamma, 1, side="up")
