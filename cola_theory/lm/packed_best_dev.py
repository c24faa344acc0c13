"""Best-dev-loss model selection for a pack (`LMRunConfig.best_dev` under `run_lm_packed`): the rule of
`cola_theory.lm.best_dev` (MeZO's load_best_model_at_end), run by run.

After the last step of every epoch each live run's dev loss (mean candidate cross-entropy over its dev sample,
computed in one packed evaluation) is recorded; a strictly lower one (ties: the earlier epoch) snapshots that
run's chain: its tied factors, the active link's A and B, which links were tied. `restore_best(k)` (after the
final knot) makes run k's model the best epoch's: its tied factors become the snapshot's plus the best epoch's
active link (the other runs' columns are untouched; run k's unused columns are zero). The losses and snapshots
ride in the pack's knot checkpoints (`PackedChainBackend.extra_state`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

Tensor = torch.Tensor
KEYS = ("A", "B", "T_A", "T_B", "T_s")


class PackedBestDev:
    """Per-run dev losses and best snapshots of a `PackedChainBackend`; hook: run_chain(on_step=tracker)."""

    def __init__(self, backend: Any, loss_fn: Callable[[list[int]], Sequence[float]], steps_per_epoch: int,
                 total_steps: int) -> None:
        self.backend, self.loss_fn = backend, loss_fn  # loss_fn(runs) -> the dev loss of each run in `runs`
        self.steps_per_epoch, self.total_steps = steps_per_epoch, total_steps
        K = backend.K
        self.losses: list[list[float]] = [[] for _ in range(K)]
        self.best_epoch: list[int | None] = [None] * K
        self.snapshots: list[dict[str, Tensor]] = [{} for _ in range(K)]
        self.snapshot_meta: list[dict[str, Any]] = [{} for _ in range(K)]

    def best_loss(self, k: int) -> float | None:
        e = self.best_epoch[k]
        return None if e is None else self.losses[k][e - 1]

    def __call__(self, t: int, link: Any = None) -> None:
        if not (t % self.steps_per_epoch == 0 or t == self.total_steps):
            return
        epoch = math.ceil(t / self.steps_per_epoch)
        live = [k for k in range(self.backend.K) if self.backend.diverged[k] is None]
        for k, loss in zip(live, self.loss_fn(live)):
            if epoch != len(self.losses[k]) + 1:
                raise RuntimeError(f"best_dev: run {k}: dev loss of epoch {epoch} but {len(self.losses[k])} recorded")
            loss = float(loss)
            self.losses[k].append(loss)
            if math.isfinite(loss) and (self.best_loss(k) is None or loss < self.best_loss(k)):
                self.best_epoch[k] = epoch
                self._snapshot(k)

    @torch.no_grad()
    def _snapshot(self, k: int) -> None:
        b = self.backend
        R = sum(r for _, r in b.tied[k])
        snap = {}
        for name, layer in b.layers:
            snap[f"{name}/A"], snap[f"{name}/B"] = layer.A[k].cpu().clone(), layer.B[k].cpu().clone()
            snap[f"{name}/T_A"] = layer.T_A[k, :R].cpu().clone()
            snap[f"{name}/T_B"] = layer.T_B[k, :, :R].cpu().clone()
            snap[f"{name}/T_s"] = layer.T_s[k, :R].cpu().clone()
        self.snapshots[k] = snap
        self.snapshot_meta[k] = {"link": b.link, "rank": b.rank, "tied": [list(x) for x in b.tied[k]]}

    @torch.no_grad()
    def restore_best(self, k: int) -> bool:
        """Run k's model becomes its best epoch's (after the final knot); False when the last epoch is the best."""
        b = self.backend
        if self.best_epoch[k] is None or self.best_epoch[k] == len(self.losses[k]):
            return False
        if b.active:
            raise RuntimeError("restore_best() needs the chain's final knot tied (run_chain does it)")
        meta, snap = self.snapshot_meta[k], self.snapshots[k]
        dev = b.device
        for name, layer in b.layers:
            A, B = snap[f"{name}/A"].to(dev), snap[f"{name}/B"].to(dev)
            T_A = torch.cat([snap[f"{name}/T_A"].to(dev), A])  # the best epoch's active link becomes tied
            T_B = torch.cat([snap[f"{name}/T_B"].to(dev), B], dim=1)
            T_s = torch.cat([snap[f"{name}/T_s"].to(dev), torch.full((A.shape[0],), layer.alpha / A.shape[0],
                                                                      device=dev)])
            R = T_A.shape[0]
            layer.T_A[k].zero_()
            layer.T_B[k].zero_()
            layer.T_s[k].zero_()
            layer.T_A[k, :R], layer.T_B[k, :, :R], layer.T_s[k, :R] = T_A, T_B, T_s
        b.tied[k] = [tuple(x) for x in meta["tied"]] + [(meta["link"], meta["rank"])]
        return True

    def metrics(self, k: int) -> dict[str, Any]:
        return {"best_epoch": self.best_epoch[k], "best_dev_loss": self.best_loss(k),
                "dev_loss_per_epoch": self.losses[k]}

    # -- checkpoints (PackedChainBackend.extra_state) ----------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        meta = {"losses": self.losses, "best_epoch": self.best_epoch, "snapshot": self.snapshot_meta,
                "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps}
        tensors = {f"{k}/{key}": v for k, snap in enumerate(self.snapshots) for key, v in snap.items()}
        return {"meta": meta, "tensors": tensors}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        meta = state["meta"]
        if (meta["steps_per_epoch"], meta["total_steps"]) != (self.steps_per_epoch, self.total_steps):
            raise ValueError(f"best_dev state of a pack with {meta['steps_per_epoch']} steps per epoch and "
                             f"{meta['total_steps']} steps, not {self.steps_per_epoch} / {self.total_steps}")
        self.losses = [[float(x) for x in run] for run in meta["losses"]]
        self.best_epoch, self.snapshot_meta = list(meta["best_epoch"]), [dict(m) for m in meta["snapshot"]]
        self.snapshots = [{} for _ in self.losses]
        for key, v in state["tensors"].items():
            k, _, rest = key.partition("/")
            self.snapshots[int(k)][rest] = v
