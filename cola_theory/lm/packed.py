"""`PackedChainBackend`: K chains of LoRA trained at once on one frozen base, through the same `run_chain`.

The K runs share the model, the chain shape (links, knots, ranks, alpha), the optimizer kind and the frozen
factor; each has its own ChainConfig (learning rate and schedule, seed -> its own A draws, weight decay, optimizer
reset policy, init). Step t feeds the K runs' batches `batch_fn(t)` (one `CandidateBatch` per run) through ONE
forward of the model (rows concatenated, padded per step to a common shape, see `merge_batches`); the loss is the
sum of the runs' mean losses, so each run's factors get exactly its own gradient. Knots keep the tied links as
frozen factors (`packed_layers`); W never changes, so the base can be shared and is given back untouched.

run_chain sees one chain: `step` returns the mean loss of the live runs (non-finite only when every run has
diverged); the per-run learning rates (`lr_at` of each run's config), losses, knot records and divergences are
recorded here and turned into each run's own history by `run_histories`, in the sequential engine's format.
A run whose loss turns non-finite is frozen from that step on (recorded as diverged, as run_chain would) while
the others go on.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cola_theory.config import ChainConfig, Link, link_plan, lr_at
from cola_theory.links import draw_generator, new_link, reset_generator, set_trainable_
from cola_theory.lm.checkpoint import (
    check_extra_state,
    extra_state_dict,
    load_extra_state,
    rng_tensors,
    set_rng_tensors,
)
from cola_theory.lm.packed_layers import PackedLoRALinear, StackedAdam, attach, detach, lr_tensor
from cola_theory.lm.scoring import CandidateBatch, candidate_logprobs

Tensor = torch.Tensor
STATE_FORMAT = 1
SHARED_CHAIN = ("total_steps", "knots", "n_links", "rank", "alpha", "optimizer", "betas", "frozen_factor")


def check_packable(cfgs: Sequence[ChainConfig]) -> None:
    """Raise ValueError naming the first ChainConfig field that differs where a pack needs one value."""
    if not cfgs:
        raise ValueError("a pack needs at least one ChainConfig")
    plan = link_plan(cfgs[0])
    for i, c in enumerate(cfgs[1:], 1):
        for name in SHARED_CHAIN:
            if getattr(c, name) != getattr(cfgs[0], name):
                raise ValueError(f"ChainConfig.{name} differs within the pack (run 0: {getattr(cfgs[0], name)!r}, "
                                 f"run {i}: {getattr(c, name)!r}); runs of one pack share the chain shape")
        if link_plan(c) != plan:
            raise ValueError(f"run {i} has other links than run 0 ({link_plan(c)} vs {plan})")


def merge_batches(batches: Sequence[CandidateBatch], pad_id: int = 0) -> tuple[CandidateBatch, list[int]]:
    """One batch of K equal blocks of S rows (run k's sequences in block k) and each run's example count.

    Each block is right-padded to the common (S, L); a padding row holds one pad token (attention on it only)
    and is never read. Candidate indices are shifted so `candidate_logprobs` returns the runs' examples in order.
    """
    S = max(b["input_ids"].shape[0] for b in batches)
    L = max(b["input_ids"].shape[1] for b in batches)
    Kt = max(b["target_positions"].shape[1] for b in batches)
    K = len(batches)
    ids = torch.full((K * S, L), pad_id, dtype=torch.long)
    mask = torch.zeros((K * S, L), dtype=torch.long)
    mask[:, 0] = 1
    pos = torch.zeros((K * S, Kt), dtype=torch.long)
    per_cand: dict[str, list[Tensor]] = {k: [] for k in ("target_ids", "target_mask", "cand_seq", "example_index",
                                                         "candidate_index")}
    labels, n_cands, sizes, offset = [], [], [], 0
    for k, b in enumerate(batches):
        s, length = b["input_ids"].shape
        ids[k * S:k * S + s, :length] = b["input_ids"]
        mask[k * S:k * S + s] = 0
        mask[k * S:k * S + s, :length] = b["attention_mask"]
        pos[k * S:k * S + s, :b["target_positions"].shape[1]] = b["target_positions"]
        width = b["target_ids"].shape[1]
        per_cand["target_ids"].append(F.pad(b["target_ids"], (0, Kt - width)))
        per_cand["target_mask"].append(F.pad(b["target_mask"], (0, Kt - width)))
        per_cand["cand_seq"].append(b["cand_seq"] + k * S)
        per_cand["example_index"].append(b["example_index"] + offset)
        per_cand["candidate_index"].append(b["candidate_index"])
        labels.append(b["labels"])
        n_cands.append(b["num_candidates"])
        sizes.append(b["labels"].shape[0])
        offset += sizes[-1]
    merged = {"input_ids": ids, "attention_mask": mask, "target_positions": pos,
              **{k: torch.cat(v) for k, v in per_cand.items()},
              "labels": torch.cat(labels), "num_candidates": torch.cat(n_cands)}
    return merged, sizes


def per_run_loss(scores: Tensor, labels: Tensor, sizes: Sequence[int]) -> Tensor:
    """(K,) mean cross-entropy over candidates of each run's examples (MeZO's classification loss per run)."""
    run = torch.repeat_interleave(torch.arange(len(sizes), device=scores.device),
                                  torch.tensor(list(sizes), device=scores.device))
    ce = F.cross_entropy(scores, labels.to(scores.device), reduction="none")  # (N,)
    total = torch.zeros(len(sizes), dtype=ce.dtype, device=ce.device).index_add_(0, run, ce)
    return total / torch.tensor(list(sizes), dtype=ce.dtype, device=ce.device)


class PackedChainBackend:
    """The `ChainBackend` verbs for K runs on one base (see the module docstring).

    model: a plain transformers model (its target nn.Linear layers are wrapped in place, `release()` unwraps).
    batch_fn(t) -> K CandidateBatches (run k's batch of step t; a function of t only, for exact resume).
    """

    def __init__(self, model: nn.Module, cfgs: Sequence[ChainConfig], batch_fn: Callable[[int], list[CandidateBatch]],
                 *, target_modules: Sequence[str] | str = ("q_proj", "v_proj"), pad_id: int = 0,
                 device: str | torch.device | None = None) -> None:
        check_packable(cfgs)
        self.cfgs, self.K = list(cfgs), len(cfgs)
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device)
        self.batch_fn, self.pad_id = batch_fn, pad_id
        self.target_modules = target_modules
        self.layers: list[tuple[str, PackedLoRALinear]] = []
        self.optimizer: StackedAdam | None = None
        self._grad_flags: list[tuple[nn.Parameter, bool]] = []  # the base's requires_grad, given back by release()
        self.t, self.link, self.rank, self.active = 0, -1, 0, False
        self.alive = torch.ones(self.K, dtype=torch.bool, device=self.device)
        self.n_alive = self.K
        self.losses: list[list[float]] = [[] for _ in cfgs]  # per run, per step
        self.lrs: list[list[float]] = [[] for _ in cfgs]
        self.resets: list[list[dict[str, float]]] = [[] for _ in cfgs]  # per run, per knot
        self.diverged: list[dict[str, Any] | None] = [None] * self.K
        self.tied: list[list[tuple[int, int]]] = [[] for _ in cfgs]  # per run: (link index, rank) of its tied links
        self.extra_state: dict[str, Any] = {}  # helpers' state saved in the checkpoints (e.g. best-dev tracking)

    # -- the five verbs ----------------------------------------------------------------------------
    @torch.no_grad()
    def extend(self, link: Link) -> None:
        """Link k of every run: A (or B for frozen_factor="B") drawn from link_generator(seed_k, k), B = 0."""
        c0 = self.cfgs[0]
        if not self.layers:  # the base is frozen (as PEFT freezes it): only the link factors get gradients
            self._grad_flags = [(p, p.requires_grad) for p in self.model.parameters()]
            self.model.requires_grad_(False)
            self.layers = attach(self.model, self.target_modules, self.K, link.rank, c0.alpha)
        elif link.rank != self.rank:  # rank step-down: new factors, hence a new optimizer (a full reset)
            for _, layer in self.layers:
                layer.set_rank(link.rank)
            self.optimizer = None
        self.rank = link.rank
        for k, cfg in enumerate(self.cfgs):
            g = draw_generator(cfg.seed, link.index, cfg.fresh_init)
            for _, layer in self.layers:  # module order, one generator per run: the sequential engine's draws
                A, B = new_link(tuple(layer.A.shape[1:]), tuple(layer.B.shape[1:]), link.rank, g, cfg.init,
                                cfg.init_std, c0.frozen_factor)
                layer.A[k].copy_(A)
                layer.B[k].copy_(B)
        for _, layer in self.layers:
            set_trainable_(layer.A, layer.B, c0.frozen_factor)
        if self.optimizer is None:
            self.optimizer = StackedAdam(self.trainable(), self.K, c0.optimizer, c0.betas,
                                         [c.weight_decay for c in self.cfgs])
        self.link, self.active = link.index, True
        self._link = link

    def step(self, lr: float) -> float:
        """One optimizer step of every live run (run k at lr_at(cfg_k, t)); returns the live runs' mean loss.
        `lr` (the reference run's) is not used: each run's own schedule gives its rate."""
        if self.optimizer is None:
            raise RuntimeError("step() before extend(): the chain has no link yet")
        lrs = [lr_at(c, self.t, self._link) for c in self.cfgs]
        merged, sizes = merge_batches(self.batch_fn(self.t), self.pad_id)
        self.model.train()
        self.optimizer.zero_grad()
        scores = candidate_logprobs(self.model, merged)
        losses = per_run_loss(scores, merged["labels"], sizes)  # (K,)
        stepping = self.alive & torch.isfinite(losses.detach())
        torch.where(stepping, losses, torch.zeros_like(losses)).sum().backward()
        values = losses.detach().cpu().tolist()
        all_alive = self.n_alive == self.K and all(math.isfinite(v) for v in values)
        self.optimizer.step(lr_tensor(lrs, self.device), stepping, all_alive=all_alive)
        for k, (value, live) in enumerate(zip(values, self.alive.tolist())):
            if not live:
                continue
            self.losses[k].append(value)
            self.lrs[k].append(lrs[k])
            if not math.isfinite(value):
                self.diverged[k] = {"step": self.t, "link": self.link, "loss": str(value)}
        self.alive &= stepping
        self.n_alive = int(self.alive.sum())
        self.t += 1
        live = [v for v, a in zip(values, self.alive.tolist()) if a]
        return sum(live) / len(live) if live else math.nan

    @torch.no_grad()
    def tie_knot(self) -> None:
        """Every run's link joins its tied factors (W_0 + sum_j (alpha/r_j) B_j A_j); B <- 0."""
        if not self.active:
            return
        for _, layer in self.layers:
            layer.tie()
        for tied in self.tied:
            tied.append((self.link, self.rank))
        self.active = False

    def reset_optimizer(self, policy: str) -> dict[str, float]:
        """Each run's own `optimizer_reset` (`policy`, the reference run's, is recorded by run_chain for run 0)."""
        done = [self.optimizer.reset(k, c.optimizer_reset, reset_generator(c.seed, self.link))
                for k, c in enumerate(self.cfgs)]
        for k, d in enumerate(done):
            self.resets[k].append(d)
        return done[0]

    def evaluate(self) -> dict[str, float]:
        return {}

    # -- per-run views -----------------------------------------------------------------------------
    def trainable(self) -> list[nn.Parameter]:
        """[A_1, B_1, A_2, B_2, ...] in module order without a frozen factor (the sequential optimizer's order)."""
        return [p for _, layer in self.layers for p in (layer.A, layer.B) if p.requires_grad]

    def run_links(self, k: int) -> list[dict[str, Any]]:
        """Run k's tied links as the sequential backend records them: {"index", "rank", "factors": {layer:
        (B (m, r), A (r, n), alpha/r)}} (CPU float32), ready for `cola_theory.lm.export.export_chain`."""
        out, start = [], 0
        for index, r in self.tied[k]:
            factors = {name: (layer.T_B[k, :, start:start + r].cpu().clone(),
                              layer.T_A[k, start:start + r].cpu().clone(), float(layer.T_s[k, start]))
                       for name, layer in self.layers}
            out.append({"index": index, "rank": r, "factors": factors})
            start += r
        return out

    def delta(self, k: int) -> dict[str, Tensor]:
        """W - W_0 of run k per adapted layer (float32, CPU)."""
        return {name: layer.delta(k).cpu() for name, layer in self.layers}

    def run_histories(self, pack_history: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
        """Each run's history in run_chain's format: its own lr and loss per step, its own knot records, cut
        after a divergence exactly where run_chain would stop."""
        out = []
        for k in range(self.K):
            hist, knots = [], iter(self.resets[k])
            stop = self.diverged[k]["step"] if self.diverged[k] else math.inf
            for e in pack_history:
                if e["t"] > stop:
                    break
                if e["event"] == "step":
                    e = {**e, "lr": self.lrs[k][e["t"] - 1], "loss": self.losses[k][e["t"] - 1]}
                elif e["event"] == "knot":
                    e = {"event": "knot", "t": e["t"], "link": e["link"], **next(knots)}
                hist.append(e)
            out.append(hist)
        return out

    def release(self) -> nn.Module:
        """The base model with its original nn.Linear layers back (unchanged: packed knots never touch W)."""
        if self.layers:
            detach(self.model, self.layers)
            for p, flag in self._grad_flags:  # requires_grad as it was before the pack
                p.requires_grad_(flag)
            self.layers, self.optimizer, self._grad_flags = [], None, []
        return self.model

    # -- checkpoints (the KnotCheckpointer protocol) -------------------------------------------------
    def _config_json(self) -> list[dict[str, Any]]:
        return [json.loads(json.dumps(c.to_dict())) for c in self.cfgs]

    def state_dict(self) -> dict[str, Any]:
        if not self.layers:
            raise RuntimeError("state_dict() before the first extend(): nothing to save yet")
        tensors = {**rng_tensors(), "alive": self.alive.to(torch.uint8)}
        for name, layer in self.layers:
            for key in ("A", "B", "T_A", "T_B", "T_s"):
                tensors[f"{name}/{key}"] = getattr(layer, key).detach()
        meta = {"format": STATE_FORMAT, "packed": self.K, "t": self.t, "link": self.link, "rank": self.rank,
                "active": self.active, "tied": self.tied, "losses": self.losses, "lrs": self.lrs,
                "resets": self.resets, "diverged": self.diverged, "configs": self._config_json(),
                "layers": [n for n, _ in self.layers], "extra_state": extra_state_dict(self.extra_state, tensors)}
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
        return {"meta": meta, "tensors": tensors, "optimizer": self.optimizer.state_dict()}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        meta, tensors = state["meta"], state["tensors"]
        if meta.get("format") != STATE_FORMAT or meta.get("packed") != self.K:
            raise ValueError(f"checkpoint is not a packed checkpoint of {self.K} runs (format {meta.get('format')!r}, "
                             f"packed {meta.get('packed')!r}); it cannot be restored into this pack")
        if meta["configs"] != self._config_json():
            raise ValueError("checkpoint was written by a pack with other configs; use the same configs to resume")
        plan = {link.index: link for link in link_plan(self.cfgs[0])}
        self.extend(plan[meta["link"]]._replace(rank=meta["rank"]))  # wraps the model, builds the optimizer
        if [n for n, _ in self.layers] != meta["layers"]:
            raise ValueError(f"checkpoint adapts other layers ({meta['layers'][:2]}...) than this model")
        for name, layer in self.layers:
            layer.A.copy_(tensors[f"{name}/A"])
            layer.B.copy_(tensors[f"{name}/B"])
            for key in ("T_A", "T_B", "T_s"):
                setattr(layer, key, tensors[f"{name}/{key}"].to(self.device))
        self.optimizer.load_state_dict(state["optimizer"])
        self.alive = tensors["alive"].to(torch.bool).to(self.device)
        self.n_alive = int(self.alive.sum())
        set_rng_tensors(tensors)
        self.t, self.active = meta["t"], meta["active"]
        self.tied = [[tuple(x) for x in run] for run in meta["tied"]]
        extras = meta.get("extra_state", {})
        check_extra_state(extras, self.extra_state, "pack")
        load_extra_state(self.extra_state, extras, tensors)
        self.losses, self.lrs = meta["losses"], meta["lrs"]
        self.resets, self.diverged = meta["resets"], meta["diverged"]
