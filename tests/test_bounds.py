"""Bounds as code: formulas, the step-size form vs the paper's form, and the bounds measured on seeded runs."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cola_theory.baselines import idealized_cola, rac_lora
from cola_theory.bounds import (
    PAPER_FORM_CAPPED_LIMIT,
    convex_fw_bound,
    rac_lora_bound,
    rac_lora_pl_rate,
    sketch_lambda,
    theorem41_bound,
    theorem41_eta,
    theorem41_stepsize_bound,
)
from cola_theory.frank_wolfe import nonconvex_frank_wolfe, nuclear_norm
from cola_theory.problems import make_problem

SMALL = settings(max_examples=12, deadline=None)
POS = st.floats(1e-3, 1e3)


def test_formulas():
    assert theorem41_bound(4.0, 1.0, 3.0, 9, eps=0.5) == pytest.approx(2 * 2 * 3 / 3 + 0.5)
    assert theorem41_stepsize_bound(4.0, 1.0, 3.0, 8, 0.5, eps=0.1) == pytest.approx(4 / 4 + 0.5 * 9 / 2 + 0.1)
    assert theorem41_eta(1.0, 2.0, 1.0, 4) == pytest.approx(0.5)  # sqrt(2/(2*4))
    assert theorem41_eta(100.0, 1.0, 1.0, 2) == 1.0  # capped
    assert convex_fw_bound(2.0, 3.0, 1) == pytest.approx(2 * 2 * 9 / 3)
    np.testing.assert_allclose(convex_fw_bound(1.0, 1.0, np.array([1, 2, 8])), [2 / 3, 2 / 4, 2 / 10])
    assert rac_lora_bound(5.0, 1.0, 0.25, 0.1, 20) == pytest.approx(2 * 4 / (0.25 * 0.1 * 20))
    assert rac_lora_pl_rate(1.0, 0.5, 0.1, 3) == pytest.approx(0.95**3)
    np.testing.assert_allclose(rac_lora_pl_rate(1.0, 0.5, 0.1, np.arange(3)), [1, 0.95, 0.95**2])
    assert sketch_lambda(2, 8) == 0.25


@SMALL
@given(M=POS, beta=POS, D=POS, T=st.integers(1, 10_000), eps=st.floats(0, 10))
def test_eta_form_below_paper_form(M, beta, D, T, eps):
    """At theorem41_eta the step-size form is <= the paper's 2 sqrt(M beta) D/sqrt(T) + eps (docstring proof),
    uncapped always; capped exactly when M/T <= (1.5 + sqrt 2) beta D^2."""
    eta = theorem41_eta(M, beta, D, T)
    step = theorem41_stepsize_bound(M, beta, D, T, eta, eps)
    paper = theorem41_bound(M, beta, D, T, eps)
    if eta < 1 or M / T <= PAPER_FORM_CAPPED_LIMIT * beta * D * D * (1 - 1e-9):
        assert step <= paper * (1 + 1e-12)
    else:
        assert step > paper  # the caveat: with too few steps the paper's form is not a bound
    if eta < 1:  # eta minimizes the step-size form over (0, 1]
        for other in (0.5 * eta, min(1.0, 2 * eta)):
            assert step <= theorem41_stepsize_bound(M, beta, D, T, other, eps) * (1 + 1e-12)


@pytest.mark.parametrize("call, field", [
    (lambda: theorem41_bound(-1.0, 1.0, 1.0, 5), "M=-1.0"),
    (lambda: theorem41_bound(1.0, 0.0, 1.0, 5), "beta=0.0"),
    (lambda: theorem41_stepsize_bound(1.0, 1.0, 1.0, 5, 1.5), "eta=1.5"),
    (lambda: theorem41_eta(1.0, 1.0, 1.0, 0), "T=0"),
    (lambda: theorem41_eta(0.0, 1.0, 1.0, 3), "M=0.0"),
    (lambda: convex_fw_bound(1.0, 1.0, 0), "t=0"),
    (lambda: rac_lora_bound(1.0, 2.0, 0.5, 0.1, 3), "f0=1.0"),
    (lambda: rac_lora_bound(2.0, 1.0, 1.5, 0.1, 3), "lam=1.5"),
    (lambda: rac_lora_pl_rate(1.0, 1.0, 2.0, 3), "gamma=2.0"),
    (lambda: sketch_lambda(5, 3), "rank=5"),
])
def test_bad_input_names_the_field(call, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        call()


SMALL_PROBLEMS = {
    "robust_cauchy": dict(m=6, n=8, k=3, N=40),
    "two_layer": dict(m=6, n=8, k=3, N=40),
    "sigmoid_sensing": dict(m=5, n=6, k=2, N=60),
}


@settings(max_examples=10, deadline=None)
@given(name=st.sampled_from(sorted(SMALL_PROBLEMS)), seed=st.integers(0, 1000), T=st.integers(2, 40),
       inner=st.integers(0, 6), batch=st.sampled_from([None, 4, 16]), rank=st.integers(1, 2))
def test_theorem41_holds_step_by_step(name, seed, T, inner, batch, rank):
    """Idealized COLA on a nonconvex problem: the one-step inequality of the proof holds at every t,
    f_{t+1} <= f_t - eta g_t + eta eps_t + eta^2 beta D^2/2, hence the averaged bound for every T."""
    p = make_problem(name, seed=seed, **SMALL_PROBLEMS[name])
    tau = nuclear_norm(p.Delta_star)
    D = 2 * tau
    M = p.loss_grad(p.W0)[0] - p.lower_bound
    eta = theorem41_eta(M, p.beta, D, T)
    tr = idealized_cola(p, tau, T, eta, rank=rank, inner_steps=inner, batch_size=batch, seed=seed)
    assert np.all(tr.eps >= -1e-10)
    slack = tr.f[:-1] - eta * tr.gap[:-1] + eta * tr.eps + eta**2 * p.beta * D**2 / 2 - tr.f[1:]
    assert np.all(slack >= -1e-9 * max(1.0, M))
    bound = theorem41_stepsize_bound(M, p.beta, D, T, eta, float(tr.eps.mean()))
    assert tr.avg_gap() <= bound
    assert tr.f.min() >= p.lower_bound  # the M used is a true bound on f(Delta_1) - f(Delta_{T+1})


def test_theorem41_exact_oracle_and_bound_tightens_with_T():
    p = make_problem("robust_cauchy", m=6, n=8, k=3, N=40, seed=2)
    tau = nuclear_norm(p.Delta_star)
    M, D = p.loss_grad(p.W0)[0], 2 * tau
    ratios = []
    for T in (10, 40, 160):
        eta = theorem41_eta(M, p.beta, D, T)
        tr = nonconvex_frank_wolfe(p, tau, T, eta)
        bound = theorem41_stepsize_bound(M, p.beta, D, T, eta, float(tr.eps.mean()))
        assert tr.avg_gap() <= bound <= theorem41_bound(M, p.beta, D, T, float(tr.eps.mean()))
        ratios.append(tr.avg_gap() / bound)
    assert tr.eps.max() < 1e-8 * tau * tr.gap.max() + 1e-12  # the exact LMO: eps ~ 0
    assert min(ratios) > 1e-3  # not a vacuous comparison


def test_sketch_lambda_is_the_mean_projection():
    """E[H] = (r/n) I for the row-space projection of a Gaussian r x n sketch (Monte Carlo)."""
    rng, r, n = np.random.default_rng(0), 2, 5
    H = np.zeros((n, n))
    for _ in range(4000):
        Q, _ = np.linalg.qr(rng.standard_normal((n, r)))
        H += Q @ Q.T
    np.testing.assert_allclose(H / 4000, sketch_lambda(r, n) * np.eye(n), atol=0.02)


def test_rac_bounds_hold_in_mean_over_sketches():
    """RAC-LoRA closed form, gamma = 1/beta: the averaged ||grad||^2 and the PL rate, mean over sketch seeds."""
    p = make_problem("rac_quadratic", seed=1)
    gamma, lam, T = 1 / p.beta, sketch_lambda(1, 3), 60
    runs = [rac_lora(p, T, gamma, 1, seed=s) for s in range(48)]
    f0 = runs[0].f[0]
    avg = np.mean([r.grad_sq[:T].mean() for r in runs])
    assert avg <= rac_lora_bound(f0, p.f_star, lam, gamma, T)
    sub = np.mean([r.f for r in runs], axis=0) - p.f_star
    pl = rac_lora_pl_rate(p.mu, lam, gamma, np.arange(T + 1)) * (f0 - p.f_star)
    assert np.all(sub[1:] <= pl[1:])
    assert sub[-1] < 0.05 * sub[0]  # converges faster than the PL bound (0.13 here): not met by standing still
    ls = make_problem("least_squares", m=6, n=7, k=2, N=50, seed=0)  # nonconvex-rate check on another f
    runs = [rac_lora(ls, 40, 1 / ls.beta, 2, seed=s) for s in range(32)]
    avg = np.mean([r.grad_sq[:40].mean() for r in runs])
    assert avg <= rac_lora_bound(runs[0].f[0], 0.0, sketch_lambda(2, 7), 1 / ls.beta, 40)
    assert math.isfinite(avg)
