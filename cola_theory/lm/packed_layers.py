"""K chains of LoRA on ONE frozen base: batched link factors and a per-run optimizer (the packed engine's tensors).

A packed forward takes the K runs' batches concatenated row-wise in K equal blocks of S rows (run k owns rows
[k S, (k+1) S)). Every adapted linear layer computes, for run k's rows x_k (S L, n):

    h_k = W x_k  +  sum_{j tied} (alpha/r_j) B_kj A_kj x_k  +  (alpha/r) B_k A_k x_k

W (m, n) is shared and frozen, so its GEMM runs once over all K S rows. The current link is stacked,
A: (K, r, n), B: (K, m, r), and applied with two batched matmuls (no loop over runs). Knots cannot fold into
the shared W: a tied link is kept as frozen factors appended to T_A: (K, R, n), T_B: (K, m, R) (with the scale
alpha/r_j of each column in T_s: (K, R)), R = sum of the tied ranks. In exact arithmetic this is Algorithm 1's
W_0 + sum_j (alpha/r_j) B_j A_j (departure from the paper: the sum is not materialised in W; the result differs
from a folded W only by float rounding, and it is exported exactly like the sequential path's links).

`StackedAdam` is Adam/AdamW/SGD on stacked tensors with one learning rate, one step count and one weight decay per
run (torch's optimizers take one scalar lr per parameter group, so K runs would need K groups and a Python loop
per step); its update is torch.optim.AdamW's (non-fused) formula, elementwise, run k's slice with run k's scalars.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from cola_theory.config import parse_reset
from cola_theory.optim import prune_moment_

Tensor = torch.Tensor


class PackedLoRALinear(nn.Module):
    """A frozen nn.Linear plus K stacked chains of LoRA links (see the module docstring)."""

    def __init__(self, base: nn.Linear, n_runs: int, rank: int, alpha: float) -> None:
        super().__init__()
        self.base, self.n_runs, self.alpha = base, n_runs, alpha
        m, n = base.out_features, base.in_features
        dev = base.weight.device
        self.A = nn.Parameter(torch.zeros(n_runs, rank, n, device=dev))  # (K, r, n), float32 as PEFT's adapters
        self.B = nn.Parameter(torch.zeros(n_runs, m, rank, device=dev))  # (K, m, r)
        self.register_buffer("T_A", torch.zeros(n_runs, 0, n, device=dev), persistent=False)  # (K, R, n)
        self.register_buffer("T_B", torch.zeros(n_runs, m, 0, device=dev), persistent=False)  # (K, m, R)
        self.register_buffer("T_s", torch.zeros(n_runs, 0, device=dev), persistent=False)  # (K, R): alpha/r_j

    @property
    def rank(self) -> int:
        return self.A.shape[1]

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def set_rank(self, rank: int) -> None:
        """New (zero) factors of another rank (rank step-down): new Parameters, so a new optimizer state."""
        K, _, n = self.A.shape
        self.A = nn.Parameter(torch.zeros(K, rank, n, device=self.A.device))
        self.B = nn.Parameter(torch.zeros(K, self.B.shape[1], rank, device=self.B.device))

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)  # the shared GEMM over all K blocks
        K = self.n_runs
        xs = x.to(self.A.dtype).reshape(K, -1, x.shape[-1])  # (K, S L, n): run k's rows are block k
        lora = torch.bmm(torch.bmm(xs, self.A.transpose(1, 2)), self.B.transpose(1, 2)) * self.scaling
        if self.T_A.shape[1]:  # tied links, kept as frozen low-rank factors
            h = torch.bmm(xs, self.T_A.transpose(1, 2)) * self.T_s[:, None]  # (K, S L, R)
            lora = lora + torch.bmm(h, self.T_B.transpose(1, 2))
        # as PEFT: the adapter path in float32 added to the base output, then cast back to the base's dtype
        return (out + lora.reshape(out.shape)).to(out.dtype)

    @torch.no_grad()
    def tie(self) -> None:
        """Append the current link to the tied factors (T_A <- [T_A; A], T_B <- [T_B, B], T_s <- [T_s, alpha/r]),
        then B <- 0 (the model's function is unchanged)."""
        self.T_A = torch.cat([self.T_A, self.A.detach().float()], dim=1)
        self.T_B = torch.cat([self.T_B, self.B.detach().float()], dim=2)
        self.T_s = torch.cat([self.T_s, torch.full((self.n_runs, self.rank), self.scaling, device=self.T_s.device)], 1)
        self.B.zero_()

    def delta(self, k: int) -> Tensor:
        """W - W_0 of run k (float32): tied links plus the active link."""
        with torch.no_grad():
            return (self.T_B[k] * self.T_s[k]) @ self.T_A[k] + self.scaling * self.B[k] @ self.A[k]


def matches(name: str, targets: Sequence[str] | str) -> bool:
    """PEFT's target_modules rule: a list matches a module whose name is a key or ends with '.' + key; a string
    is a regular expression matched against the full name."""
    if isinstance(targets, str):
        import re

        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith(f".{t}") for t in targets)


def attach(model: nn.Module, targets: Sequence[str] | str, n_runs: int, rank: int, alpha: float
           ) -> list[tuple[str, PackedLoRALinear]]:
    """Replace every targeted nn.Linear of `model` by a PackedLoRALinear (module order); returns them."""
    found = [(name, mod) for name, mod in model.named_modules()
             if matches(name, targets) and isinstance(mod, nn.Linear)]
    if not found:
        raise ValueError(f"target_modules={targets!r} matches no nn.Linear of {type(model).__name__}; name the "
                         "linear layers to adapt, e.g. ['q_proj', 'v_proj']")
    layers = []
    for name, mod in found:
        if rank > min(mod.in_features, mod.out_features):
            raise ValueError(f"rank={rank} exceeds min(m, n) = {min(mod.in_features, mod.out_features)} of the "
                             f"adapted layer {name}; use a smaller rank")
        mod.weight.requires_grad_(False)
        packed = PackedLoRALinear(mod, n_runs, rank, alpha)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, packed)
        layers.append((name, packed))
    return layers


def detach(model: nn.Module, layers: list[tuple[str, PackedLoRALinear]]) -> nn.Module:
    """Put the original nn.Linear modules back (the base is unchanged: packed knots never touch W)."""
    for name, packed in layers:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, packed.base)
    return model


class StackedAdam:
    """Adam / AdamW / SGD over stacked (K, ...) tensors: run k's slice is stepped with run k's lr and step count.

    The formula is torch.optim.AdamW's (decoupled decay: p <- p (1 - lr wd)) or Adam's (L2: g <- g + wd p), or
    plain SGD (no momentum, as `cola_theory.optim.make_optimizer` builds it). Runs marked dead (a non-finite
    loss) are not updated.
    """

    def __init__(self, params: Sequence[nn.Parameter], n_runs: int, kind: str, betas: tuple[float, float],
                 weight_decay: Sequence[float], eps: float = 1e-8) -> None:
        if kind not in ("adamw", "adam", "sgd"):
            raise ValueError(f"optimizer={kind!r}: use adamw, adam or sgd")
        self.params, self.kind, self.betas, self.eps = list(params), kind, betas, eps
        dev = self.params[0].device
        self.wd = torch.tensor(list(weight_decay), dtype=torch.float32, device=dev)  # (K,)
        self.step_count = torch.zeros(n_runs, dtype=torch.float32, device=dev)  # (K,)
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]

    @staticmethod
    def _per_run(v: Tensor, like: Tensor) -> Tensor:
        return v.view(-1, *([1] * (like.dim() - 1)))  # (K,) -> (K, 1, 1)

    @torch.no_grad()
    def step(self, lr: Tensor, alive: Tensor, all_alive: bool = False) -> None:
        """One step; lr: (K,) learning rates, alive: (K,) bool (dead runs keep their values and state);
        all_alive=True (the caller knows no run is dead) takes the multi-tensor path."""
        b1, b2 = self.betas
        live = alive.to(lr.dtype)
        self.step_count += live
        bc1 = 1 - b1 ** self.step_count.clamp(min=1)
        bc2_sqrt = torch.sqrt(1 - b2 ** self.step_count.clamp(min=1))
        if self.kind != "sgd" and all_alive:
            return self._step_all(lr, bc1, bc2_sqrt)
        for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq):
            if p.grad is None:
                continue
            g = torch.where(self._per_run(alive, p), p.grad, torch.zeros_like(p.grad))
            lr_p, wd_p, live_p = (self._per_run(x, p) for x in (lr * live, self.wd, live))
            if self.kind == "sgd":
                p.sub_(lr_p * (g + wd_p * p))
                continue
            if self.kind == "adamw":
                p.mul_(1 - lr_p * wd_p)
            else:
                g = g + wd_p * p
            # torch.optim.AdamW's operations in its order (the moments match it bitwise)
            m.copy_(torch.where(live_p.bool(), torch.lerp(m, g, 1 - b1), m))
            v.copy_(torch.where(live_p.bool(), (v * b2).addcmul_(g, g, value=1 - b2), v))
            denom = (v.sqrt() / self._per_run(bc2_sqrt, p)).add_(self.eps)
            p.add_((m / denom) * -(lr_p / self._per_run(bc1, p)))

    def _step_all(self, lr: Tensor, bc1: Tensor, bc2_sqrt: Tensor) -> None:
        """Adam/AdamW on every run with torch's multi-tensor (_foreach) kernels: the same operations in the same
        order as the per-tensor path (and as torch.optim.AdamW), one call per operation for all tensors."""
        b1, b2 = self.betas
        ps, ms, vs = self.params, self.exp_avg, self.exp_avg_sq
        gs = [p.grad for p in ps]
        if self.kind == "adamw":
            torch._foreach_mul_(ps, [self._per_run(1 - lr * self.wd, p) for p in ps])
        else:
            gs = torch._foreach_add(gs, torch._foreach_mul(ps, [self._per_run(self.wd, p) for p in ps]))
        torch._foreach_lerp_(ms, gs, 1 - b1)
        torch._foreach_mul_(vs, b2)
        torch._foreach_addcmul_(vs, gs, gs, 1 - b2)
        denom = torch._foreach_sqrt(vs)
        torch._foreach_div_(denom, [self._per_run(bc2_sqrt, p) for p in ps])
        torch._foreach_add_(denom, self.eps)
        update = torch._foreach_div(ms, denom)
        torch._foreach_mul_(update, [self._per_run(-(lr / bc1), p) for p in ps])
        torch._foreach_add_(ps, update)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def reset(self, k: int, policy: str, generator: torch.Generator | None = None) -> dict[str, float]:
        """Run k's knot policy on its slices, as `cola_theory.optim.reset_optimizer_state` does on one run's
        tensors (full: moments and step count to 0; none: kept; magnitude:p / random:p: a fraction p of each
        moment zeroed, the step count kept). Returns {"reset_fraction", "reset_params"}."""
        kind, frac = parse_reset(policy)
        moments = [(m, v) for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq) if p.requires_grad]
        n_params = len(moments) if self.step_count[k] > 0 else 0
        zeroed = total = 0
        if n_params == 0:
            return {"reset_fraction": 0.0, "reset_params": 0.0}
        for m, v in moments:
            for mom in (m[k], v[k]):
                total += mom.numel()
                if kind == "full":
                    mom.zero_()
                    zeroed += mom.numel()
                elif kind in ("magnitude", "random") and frac > 0:
                    zeroed += prune_moment_(mom, kind, frac, generator)
        if kind == "full":
            self.step_count[k] = 0
        return {"reset_fraction": zeroed / total if total else 0.0, "reset_params": float(n_params)}

    def state_dict(self) -> dict[str, object]:
        return {"kind": self.kind, "step": self.step_count.clone(), "exp_avg": [t.clone() for t in self.exp_avg],
                "exp_avg_sq": [t.clone() for t in self.exp_avg_sq]}

    def load_state_dict(self, state: dict) -> None:
        if state["kind"] != self.kind or len(state["exp_avg"]) != len(self.params):
            raise ValueError(f"optimizer state of kind {state['kind']!r} with {len(state['exp_avg'])} tensors does "
                             f"not fit this {self.kind!r} optimizer of {len(self.params)} tensors")
        self.step_count.copy_(state["step"])
        for dst, src in zip(self.exp_avg + self.exp_avg_sq, state["exp_avg"] + state["exp_avg_sq"]):
            dst.copy_(src)


def lr_tensor(lrs: Sequence[float], device: torch.device) -> Tensor:
    if not all(math.isfinite(x) for x in lrs):
        raise ValueError(f"learning rates {list(lrs)} must be finite")
    return torch.tensor(list(lrs), dtype=torch.float32, device=device)
