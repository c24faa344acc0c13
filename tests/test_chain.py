"""Invariants of the chain engine on the matrix backend (least squares, float64)."""

import pytest
import torch

from cola_theory import ChainConfig, MatrixBackend, link_plan, lr_at, make_problem, run_chain
from cola_theory.links import init_factor, link_generator


@pytest.fixture(scope="module")
def problem():
    return make_problem("least_squares", m=12, n=16, k=5, N=120, seed=3)


def cfg_(**kw):
    base = dict(total_steps=120, n_links=3, rank=2, alpha=2.0, lr=2e-2, seed=1)
    return ChainConfig(**{**base, **kw})


def test_one_link_equals_plain_lora(problem):
    """run_chain with one link == a hand-written LoRA loop (autograd through f(W0 + s B A), torch AdamW)."""
    cfg = cfg_(n_links=1, warmup_steps=10)
    backend = MatrixBackend(problem, cfg)
    run_chain(backend, cfg)
    m, n = problem.shape
    r, s = 2, cfg.alpha / 2
    A = torch.nn.Parameter(init_factor((r, n), cfg, r, link_generator(cfg.seed, 0)))
    B = torch.nn.Parameter(torch.zeros(m, r, dtype=torch.float64))
    opt = torch.optim.AdamW([B, A], lr=cfg.lr, weight_decay=0.0)
    (link,) = link_plan(cfg)
    for t in range(cfg.total_steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, t, link)
        opt.zero_grad()
        problem.loss(problem.W0 + s * B @ A).backward()
        opt.step()
    torch.testing.assert_close(backend.W(), problem.W0 + s * (B @ A).detach(), rtol=1e-9, atol=1e-10)


class Recorder(MatrixBackend):
    """Records f just before each knot and just after the next link starts (B = 0)."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.before, self.after, self.B_at_start, self.A_draws, self.state_sizes = [], [], [], [], []

    def tie_knot(self):
        self.before.append(self.problem.loss_grad(self.W())[0])
        super().tie_knot()

    def extend(self, link):
        super().extend(link)
        self.after.append(self.problem.loss_grad(self.W())[0])
        self.B_at_start.append(self.B.detach().clone())
        self.A_draws.append(self.A.detach().clone())

    def reset_optimizer(self, policy):
        out = super().reset_optimizer(policy)
        self.state_sizes.append(sum(len(self.optimizer.state.get(p, {})) for p in self.trainable()))
        return out


def test_knots_preserve_the_function_and_start_links_at_zero(problem):
    cfg = cfg_(n_links=4)
    b = Recorder(problem, cfg)
    res = run_chain(b, cfg)
    assert res.status == "finished"
    # a knot is function-preserving: f just before tie == f after the new link starts (B = 0)
    torch.testing.assert_close(torch.tensor(b.before[:3]), torch.tensor(b.after[1:]), rtol=1e-12, atol=1e-12)
    assert all(float(B.abs().max()) == 0.0 for B in b.B_at_start)
    # fresh A per link by default
    assert all(not torch.equal(a, c) for a, c in zip(b.A_draws, b.A_draws[1:]))
    # full reset: the optimizer state of the link parameters is empty at the start of each link
    assert b.state_sizes == [0, 0, 0]
    knots = [h for h in res.history if h["event"] == "knot"]
    assert [h["t"] for h in knots] == [30, 60, 90] and all(h["reset_fraction"] == 1.0 for h in knots)


def test_reused_init_and_kept_state(problem):
    cfg = cfg_(n_links=3, fresh_init=False, optimizer_reset="none")
    b = Recorder(problem, cfg)
    run_chain(b, cfg)
    assert all(torch.equal(a, b.A_draws[0]) for a in b.A_draws)
    assert all(size > 0 for size in b.state_sizes)  # Adam moments survive the knot


def test_magnitude_pruning_zeroes_fraction_p(problem):
    cfg = cfg_(n_links=2, optimizer_reset="magnitude:0.75")
    b = MatrixBackend(problem, cfg)
    b.extend(link_plan(cfg)[0])
    for _ in range(5):
        b.step(1e-2)
    moments = [b.optimizer.state[p][k] for p in b.trainable() for k in ("exp_avg", "exp_avg_sq")]
    small = [m.abs().flatten().sort().values for m in moments]
    out = b.reset_optimizer("magnitude:0.75")
    assert out["reset_fraction"] == pytest.approx(0.75, abs=0.01)
    for m, s in zip(moments, small):
        kept = m[m != 0].abs()
        assert kept.min() >= s[int(0.75 * len(s)) - 1]  # survivors are the large entries
    assert all(b.optimizer.state[p]["step"] > 0 for p in b.trainable())  # step count kept (ReLoRA)


def test_rank_of_the_change_is_bounded_by_the_chain(problem):
    for links, ranks in [(1, 2), (2, (3, 1)), (4, 2)]:
        cfg = cfg_(n_links=links, rank=ranks)
        b = MatrixBackend(problem, cfg)
        run_chain(b, cfg)
        assert int(torch.linalg.matrix_rank(b.delta())) <= sum(cfg.ranks())


def test_chain_reaches_what_one_lora_cannot(problem):
    """Planted change of rank 5: LoRA r=2 stalls; a chain of 3 links of r=2 reaches f* (= 0)."""
    lora, cola = cfg_(n_links=1, total_steps=600, lr=3e-2), cfg_(n_links=3, total_steps=600, lr=3e-2)
    f = {}
    for name, cfg in (("lora", lora), ("cola", cola)):
        b = MatrixBackend(problem, cfg)
        f[name] = run_chain(b, cfg).history[-1]["subopt"]
    assert f["cola"] < 1e-3 * f["lora"]


def test_same_seed_same_history_and_minibatches(problem):
    cfg = cfg_(n_links=3)
    h1 = run_chain(MatrixBackend(problem, cfg, batch_size=8), cfg).history
    h2 = run_chain(MatrixBackend(problem, cfg, batch_size=8), cfg).history
    h3 = run_chain(MatrixBackend(problem, cfg_(n_links=3, seed=2), batch_size=8), cfg).history
    assert h1 == h2 and h1 != h3


def test_divergence_is_recorded_not_raised(problem):
    cfg = cfg_(n_links=2, lr=1e3, optimizer="sgd", lr_schedule="constant")
    res = run_chain(MatrixBackend(problem, cfg), cfg)
    assert res.status == "diverged" and res.diverged["step"] < cfg.total_steps
    assert res.diverged["link"] in (0, 1)


def test_frozen_factor_and_full_finetuning(problem):
    cfg = cfg_(n_links=2, frozen_factor="A")
    b = Recorder(problem, cfg)
    b.extend(link_plan(cfg)[0])
    A0 = b.A.detach().clone()
    for _ in range(10):
        b.step(1e-2)
    assert torch.equal(b.A, A0) and b.B.abs().max() > 0  # RAC-LoRA: A frozen, B trained
    cfg = cfg_(n_links=1, total_steps=400, lr=5e-2)
    full = MatrixBackend(problem, cfg, mode="full")
    assert run_chain(full, cfg).history[-1]["dist"] < 1e-2  # full fine-tuning reaches Delta*


def test_step_down_rebuilds_factors(problem):
    cfg = cfg_(n_links=2, rank=(4, 1))
    b = Recorder(problem, cfg)
    run_chain(b, cfg)
    assert [a.shape[0] for a in b.A_draws] == [4, 1]
    assert b.before[0] == pytest.approx(b.after[1], rel=1e-12)
