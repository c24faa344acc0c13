"""The synthetic problems: exact gradients, certified smoothness, planted optima, minibatches, convexity,
and RAC-LoRA's counterexample run through the real chain engine."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cola_theory import ChainConfig, MatrixBackend, run_chain
from cola_theory.problems import REGISTRY, make_problem

NAMES = sorted(REGISTRY)
CONVEX = ("least_squares", "matrix_completion", "logistic", "rac_quadratic")
NONCONVEX = ("robust_cauchy", "robust_geman_mcclure", "two_layer", "sigmoid_sensing")
FAST = settings(max_examples=6, deadline=None)


@functools.cache
def default(name: str):
    return make_problem(name)


def points(p, seed: int) -> list[torch.Tensor]:
    """W0, W*, their midpoint, and random points near and far from W* (relative to ||Delta*||)."""
    g = torch.Generator().manual_seed(seed)
    d = torch.linalg.norm(p.Delta_star).item()
    out = [p.W0, p.W_star, (p.W0 + p.W_star) / 2]
    for r in (0.1, 1.0, 5.0):
        D = torch.randn(p.shape, generator=g, dtype=torch.float64)
        out.append(p.W_star + r * d * D / torch.linalg.norm(D))
    return out


def autograd_grad(p, W, idx=None) -> torch.Tensor:
    W = W.clone().requires_grad_(True)
    (G,) = torch.autograd.grad(p.loss(W, idx), W)
    return G


def test_registry_holds_every_problem():
    assert set(CONVEX + NONCONVEX) == set(NAMES)
    for name in CONVEX:
        assert default(name).convex
    for name in NONCONVEX:
        assert not default(name).convex


@pytest.mark.parametrize("name", NAMES)
@given(seed=st.integers(0, 10_000))
@FAST
def test_gradient_matches_autograd(name, seed):
    p = default(name)
    idx = p.sample(7, torch.Generator().manual_seed(seed))  # a minibatch, repeats allowed
    for W in points(p, seed):
        for i in (None, idx):
            torch.testing.assert_close(p.loss_grad(W, i)[1], autograd_grad(p, W, i), rtol=1e-10, atol=1e-12)
            assert p.loss_grad(W, i)[0] == pytest.approx(p.loss(W, i).item(), rel=1e-14)


@pytest.mark.parametrize("name", NAMES)
@given(seed=st.integers(0, 10_000))
@FAST
def test_gradient_matches_central_differences(name, seed):
    p, g = default(name), torch.Generator().manual_seed(seed)
    for W in points(p, seed):
        G = p.loss_grad(W)[1]
        D = torch.randn(p.shape, generator=g, dtype=torch.float64)
        D /= torch.linalg.norm(D)
        h = 1e-5 * max(1.0, torch.linalg.norm(W).item())
        fd = (p.loss(W + h * D).item() - p.loss(W - h * D).item()) / (2 * h)
        assert fd == pytest.approx(float((G * D).sum()), rel=1e-6, abs=1e-9 * max(1.0, abs(p.loss(W).item())))


@pytest.mark.parametrize("name", NAMES)
def test_planted_optimum(name):
    p = default(name)
    assert p.lower_bound == 0.0 and p.loss(p.W0).item() > 0
    for W in points(p, 0):
        assert p.loss(W).item() >= p.lower_bound
    if p.f_star is None:  # logistic: labels are sampled, so W* is the generator, not the minimiser
        assert name == "logistic" and p.W_star is not None
        return
    assert p.loss(p.W_star).item() == pytest.approx(p.f_star, abs=1e-14)
    assert torch.linalg.norm(p.loss_grad(p.W_star)[1]).item() < 1e-12


@pytest.mark.parametrize("name", NAMES)
@given(seed=st.integers(0, 10_000))
@FAST
def test_beta_bounds_gradient_differences(name, seed):
    p = default(name)
    P = points(p, seed)
    pairs = [(P[i], P[j]) for i in range(len(P)) for j in range(i + 1, len(P))]
    g = torch.Generator().manual_seed(seed + 1)
    pairs += [(W, W + 1e-3 * torch.randn(p.shape, generator=g, dtype=torch.float64)) for W in P]  # close pairs
    for W, V in pairs:
        lhs = torch.linalg.norm(p.loss_grad(W)[1] - p.loss_grad(V)[1]).item()
        assert lhs <= p.beta * torch.linalg.norm(W - V).item() * (1 + 1e-9)


def top_curvature(p, W: torch.Tensor, iters: int = 60, seed: int = 0) -> float:
    """Power iteration with autograd Hessian-vector products: an estimate (from below) of ||Hess f(W)||_2."""
    W = W.clone().requires_grad_(True)
    (G,) = torch.autograd.grad(p.loss(W), W, create_graph=True)
    v = torch.randn(p.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    est = 0.0
    for _ in range(iters):
        v = v / torch.linalg.norm(v)
        (Hv,) = torch.autograd.grad(G, W, grad_outputs=v, retain_graph=True)
        est, v = torch.linalg.norm(Hv).item(), Hv
    return est


@pytest.mark.parametrize("name", NAMES)
def test_beta_bounds_hessian_and_is_not_absurdly_loose(name):
    p = default(name)
    est = max(top_curvature(p, W) for W in points(p, 0))
    print(f"{name}: beta = {p.beta:.4g}, power-iteration curvature = {est:.4g}, ratio = {est / p.beta:.3f}")
    assert est <= p.beta * (1 + 1e-9)
    assert est / p.beta > 1e-3


@pytest.mark.parametrize("name", NAMES)
@given(seed=st.integers(0, 10_000), batch=st.integers(1, 64))
@FAST
def test_minibatch_gradients_average_to_full(name, seed, batch):
    p = default(name)
    W = points(p, seed)[-2]
    f, G = p.loss_grad(W)
    f_all, G_all = p.loss_grad(W, torch.arange(p.n_samples))
    assert f_all == pytest.approx(f, rel=1e-12)
    torch.testing.assert_close(G_all, G, rtol=1e-10, atol=1e-13)
    perm = torch.randperm(p.n_samples, generator=torch.Generator().manual_seed(seed))
    parts = [(len(c), p.loss_grad(W, c)) for c in torch.split(perm, batch)]  # uneven last chunk
    assert sum(b * fc for b, (fc, _) in parts) / p.n_samples == pytest.approx(f, rel=1e-12)
    torch.testing.assert_close(sum(b * Gc for b, (_, Gc) in parts) / p.n_samples, G, rtol=1e-10, atol=1e-13)
    idx = p.sample(batch, torch.Generator().manual_seed(seed))
    assert idx.shape == (batch,) and idx.dtype == torch.long and 0 <= idx.min() and idx.max() < p.n_samples
    i = idx[:1]  # a repeated index is a mean over equal terms
    torch.testing.assert_close(p.loss_grad(W, i.repeat(3))[1], p.loss_grad(W, i)[1], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", NAMES)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 3))
@FAST
def test_target_rank_is_k(name, seed, k):
    small = {} if name == "rac_quadratic" else {"m": 7, "n": 9, "N": 40}
    p = make_problem(name, k=k, seed=seed, **small)
    assert p.shape == ((3, 3) if name == "rac_quadratic" else (7, 9))
    assert int(torch.linalg.matrix_rank(p.Delta_star)) == k
    assert p.describe()["target_rank"] == k
    assert default(name).describe()["target_rank"] == (3 if name == "rac_quadratic" else 6)


def jensen_violation(p, seed: int, n_rays: int = 4) -> float:
    """max of f(mid) - (f(a) + f(b))/2 over segments [W* + s D, W* + (s + 2t) D] (random D, many scales)."""
    g = torch.Generator().manual_seed(seed)
    d, worst = torch.linalg.norm(p.Delta_star).item(), -float("inf")
    for _ in range(n_rays):
        D = torch.randn(p.shape, generator=g, dtype=torch.float64)
        D *= d / torch.linalg.norm(D)
        for s in (-2.0, -0.5, 0.0, 0.5):
            for t in (0.01, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0):
                a, m, b = (p.loss(p.W_star + x * D).item() for x in (s, s + t, s + 2 * t))
                worst = max(worst, (m - (a + b) / 2) / max(1.0, abs(a) + abs(b)))
    return worst


@pytest.mark.parametrize("name", CONVEX)
@given(seed=st.integers(0, 10_000))
@FAST
def test_convex_problems_satisfy_jensen(name, seed):
    p = default(name)
    assert jensen_violation(p, seed) <= 1e-12
    P, lam = points(p, seed), torch.rand(1, generator=torch.Generator().manual_seed(seed)).item()
    for a, b in zip(P, P[1:]):
        fm = p.loss(lam * a + (1 - lam) * b).item()
        assert fm <= lam * p.loss(a).item() + (1 - lam) * p.loss(b).item() + 1e-12 * (1 + fm)


@pytest.mark.parametrize("name", NONCONVEX)
def test_nonconvex_problems_violate_jensen(name):
    assert jensen_violation(default(name), 0) > 1e-6


def rac_run(p, n_links: int, total_steps: int, frozen: str = "none", seed: int = 0):
    cfg = ChainConfig(total_steps=total_steps, n_links=n_links, rank=1, alpha=1.0, lr=0.1, optimizer="sgd",
                      lr_schedule="constant", frozen_factor=frozen, seed=seed)
    backend = MatrixBackend(p, cfg)
    return run_chain(backend, cfg, log_every=10**9), backend


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rac_quadratic_lora_and_cola_diverge_rac_lora_converges(seed):
    p = make_problem("rac_quadratic", seed=seed)
    assert (p.beta, p.mu, p.shape, p.n_samples) == (10.0, 1.0, (3, 3), 1)
    assert torch.linalg.norm(p.W_star).item() == pytest.approx(20.0)
    H = torch.autograd.functional.hessian(lambda w: p.loss(w.reshape(3, 3)), torch.zeros(9, dtype=torch.float64))
    assert torch.equal(H, torch.diag(torch.tensor([10.0] + [1.0] * 8, dtype=torch.float64)))
    f0 = p.loss(p.W0).item()
    for n_links in (1, 10):  # plain LoRA, and COLA with 10 links of 60 steps
        res, _ = rac_run(p, n_links, 600, seed=seed)
        assert res.status == "diverged" and res.diverged["link"] == 0, (n_links, res.diverged)
    res, backend = rac_run(p, 40, 4000, frozen="A", seed=seed)  # RAC-LoRA: A frozen random, B trained
    assert res.status == "finished"
    assert p.loss(backend.W()).item() < 1e-4 * f0
    per_link = [h["f"] for h in res.history if h["event"] == "eval"]
    assert all(b <= a * (1 + 1e-12) for a, b in zip(per_link, per_link[1:]))  # monotone, link by link
    full_cfg = ChainConfig(total_steps=100, lr=0.1, optimizer="sgd", lr_schedule="constant")
    full = MatrixBackend(p, full_cfg, mode="full")  # plain GD in W at step 1/L is fine
    assert run_chain(full, full_cfg).status == "finished" and p.loss(full.W()).item() < 1e-6 * f0


def test_unknown_problem_lists_names():
    with pytest.raises(ValueError, match="unknown problem 'nope'.*least_squares.*two_layer"):
        make_problem("nope")


BAD = [(name, kw, field) for name in NAMES for kw, field in
       [({"k": 0}, "k=0"), ({"k": 41}, "k=41"), ({"k": 2.5}, "k=2.5"), ({"scale": -1.0}, "scale=-1.0")]]
BAD += [(name, {"N": 0}, "N=0") for name in NAMES if name != "rac_quadratic"]
BAD += [("matrix_completion", {"m": 4, "n": 5, "k": 2, "N": 21}, "N=21"), ("robust_cauchy", {"c": 0.0}, "c=0.0"),
        ("rac_quadratic", {"k": 4}, "k=4"), ("rac_quadratic", {"L": 0.5}, "L=0.5"), ("two_layer", {"m": 0}, "m=0")]


@pytest.mark.parametrize(("name", "kwargs", "field"), BAD)
def test_bad_constructor_arguments_raise(name, kwargs, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        make_problem(name, **kwargs)
