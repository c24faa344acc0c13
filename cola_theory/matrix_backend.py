"""The matrix backend: the chain on an explicit weight matrix W = W0 + Delta (theory problems).

    W = W0 + merged + (alpha/r) B A,   B: (m, r), A: (r, n)

The gradient of f(W0 + merged + s B A) w.r.t. the factors is taken from the problem's exact
gradient G = grad f(W): dB = s G A^T, dA = s B^T G. The optimizer is a real torch optimizer, so
the knot-time policies are the same code as for transformers (`cola_theory.optim`).
`mode="full"` trains a dense link Delta_k instead of B A: full fine-tuning through the same driver.
"""

from __future__ import annotations

import torch

from cola_theory.config import ChainConfig, Link
from cola_theory.frank_wolfe import fw_gap
from cola_theory.links import draw_generator, new_link, reset_generator
from cola_theory.optim import make_optimizer, reset_optimizer_state, set_lr
from cola_theory.problem_base import Problem

Tensor = torch.Tensor


class MatrixBackend:
    """Implements `ChainBackend` for a `Problem`; optional minibatches give stochastic gradients."""

    def __init__(self, problem: Problem, cfg: ChainConfig, *, batch_size: int | None = None,
                 mode: str = "lora", tau: float | None = None) -> None:
        if mode not in ("lora", "full"):
            raise ValueError(f"mode={mode!r}: use 'lora' (chain of LoRA) or 'full' (full fine-tuning)")
        if mode == "lora":
            cfg.check_rank(min(problem.shape))
        self.problem, self.cfg, self.mode, self.tau = problem, cfg, mode, tau
        self.batch_size = batch_size
        self.data_gen = torch.Generator().manual_seed(cfg.seed)
        self.merged = torch.zeros_like(problem.W0)  # sum of tied links
        self.A = self.B = self.D = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.rank, self.link = 0, -1
        self.first_A: Tensor | None = None

    # -- state -----------------------------------------------------------------------------------
    @property
    def scale(self) -> float:
        return self.cfg.alpha / self.rank

    def delta(self) -> Tensor:
        """Delta = W - W0 = merged + active link."""
        with torch.no_grad():
            if self.mode == "full":
                return self.merged + self.D
            return self.merged + self.scale * self.B @ self.A  # (m, r) @ (r, n)

    def W(self) -> Tensor:
        return self.problem.W0 + self.delta()

    def trainable(self) -> list[torch.nn.Parameter]:
        if self.mode == "full":
            return [self.D]
        return [p for p, name in ((self.B, "B"), (self.A, "A")) if self.cfg.frozen_factor != name]

    # -- the five verbs ----------------------------------------------------------------------------
    def extend(self, link: Link) -> None:
        m, n = self.problem.shape
        r, g = link.rank, draw_generator(self.cfg.seed, link.index, self.cfg.fresh_init)
        same_shape = self.A is not None and r == self.rank
        self.rank, self.link = r, link.index
        with torch.no_grad():
            if self.mode == "full":
                if self.D is None:
                    self.D = torch.nn.Parameter(torch.zeros(m, n, dtype=self.problem.W0.dtype))
                self.D.zero_()
            else:
                if not same_shape:  # rank changed (step-down): new tensors, hence a new optimizer
                    self.A = torch.nn.Parameter(torch.empty(r, n, dtype=self.problem.W0.dtype))
                    self.B = torch.nn.Parameter(torch.empty(m, r, dtype=self.problem.W0.dtype))
                    self.optimizer = None
                A, B = new_link((r, n), (m, r), r, g, self.cfg.init, self.cfg.init_std, self.cfg.frozen_factor,
                                dtype=torch.float64)  # the theory's float64 draw
                self.A.copy_(A)
                self.B.copy_(B)
        if self.optimizer is None:
            self.optimizer = make_optimizer(self.trainable(), self.cfg)

    def step(self, lr: float) -> float:
        idx = None if self.batch_size is None else self.problem.sample(self.batch_size, self.data_gen)
        loss, G = self.problem.loss_grad(self.W(), idx)  # G: (m, n)
        if self.mode == "full":
            self.D.grad = G
        else:
            self.B.grad = self.scale * G @ self.A.detach().T  # (m, r)
            self.A.grad = self.scale * self.B.detach().T @ G  # (r, n)
        set_lr(self.optimizer, lr)
        self.optimizer.step()
        return loss

    def tie_knot(self) -> None:
        with torch.no_grad():
            self.merged = self.delta()  # W <- W + (alpha/r) B A
            if self.mode == "full":
                self.D.zero_()
            else:
                self.B.zero_()  # the tied link no longer contributes (extend() redraws A)

    def reset_optimizer(self, policy: str) -> dict[str, float]:
        g = reset_generator(self.cfg.seed, self.link)
        return reset_optimizer_state(self.optimizer, self.trainable(), policy, g)

    def evaluate(self) -> dict[str, float]:
        p, delta = self.problem, self.delta()
        out = {"f": p.loss_grad(p.W0 + delta)[0], "rank_delta": int(torch.linalg.matrix_rank(delta))}
        if p.f_star is not None:
            out["subopt"] = out["f"] - p.f_star
        if p.Delta_star is not None:
            out["dist"] = float(torch.linalg.norm(delta - p.Delta_star) / torch.linalg.norm(p.Delta_star))
        if self.tau is not None:
            out["fw_gap"] = float(fw_gap(p.loss_grad(p.W0 + delta)[1], delta, self.tau))
        return out
