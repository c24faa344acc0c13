"""Forked runs: a chain that agrees with another run up to its first knot starts from that run's knot checkpoint.

The runs of a grid often share their beginning. The rank step-down chains 8->2, 8->4, 8->6 and 8->8 of one
(task, learning rate, seed) are the same rank-8 link for 3 epochs: the same sample and batch order, the same first
A draw, the same learning rates; they differ only from the knot on. So do COLA-3 with a full optimizer reset and
COLA-3 with none (the reset acts at the knot). Training that link once instead of four times saves 3 of every 5
epochs of three of the four step-down runs.

How: the first run of a family to reach its first knot leaves a copy of its knot checkpoint (taken before the knot
is tied) under `trunk_root/<key>/`; a later run with the same key restores that checkpoint as if it were its own
and goes on with its own links (knot, reset policy, next rank). The key (`trunk_key`) hashes everything the first
link depends on: every config field except the ones that act only from the first knot on (`FORK_FREE_LM`,
`FORK_FREE_CHAIN`), the first link's end and rank, and the learning rate of every step of it (so the schedules
are compared by their values: a global linear decay and a per-link restart differ, a full and a missing reset do
not), the engine (a pack forks from a pack of the same members, in order; a sequential run from a sequential
run) and the device type. Restoring a checkpoint is exact (a resumed run writes what an uninterrupted one writes:
tests/test_checkpoint.py, tests/test_packed.py), so a forked run's result is its unforked run's
(tests/test_fork.py checks both engines). A run's result records `forked_at_step` when it forked.

LoRA (one link, no knot) neither makes nor uses a trunk: its history has no eval at step s, so it is not the
chain's prefix entry for entry. A trunk that cannot be read is reported and the run starts from scratch.
`paper_repro.lm.runner` runs a family's units one after the other, gives a trunk directory only to families of
more than one unit, and deletes it after the family's last unit.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cola_theory.config import ChainConfig, link_plan, lr_at
from cola_theory.lm.checkpoint import PREFIX, KnotCheckpointer
from cola_theory.lm.run_config import LMRunConfig, epochs_per_link
from cola_theory.results import CorruptResultError

# LMRunConfig fields that act only from the first knot on (or are compared through the chain below): the chain's
# later shape and ranks, the knot's optimizer policy, the schedule (compared by its values over the first link),
# the chain overrides (compared as ChainConfig fields), the untrained model's evaluation and checkpoint spacing
FORK_FREE_LM = ("method", "n_links", "link_epochs", "rank", "optimizer_reset", "lr_schedule", "chain_overrides",
                "zero_shot", "checkpoint_every")
# ChainConfig fields of the same kind (knots and ranks: through the first link; schedule: through its values)
FORK_FREE_CHAIN = ("n_links", "knots", "rank", "optimizer_reset", "lr_schedule", "warmup_steps",
                   "restart_warmup_steps", "min_lr_ratio")


def prefix(cfg: LMRunConfig, chain: ChainConfig) -> dict[str, Any] | None:
    """What a run's first link depends on (JSON-able), or None for a run without a knot (LoRA)."""
    links = link_plan(chain)
    if len(links) < 2:
        return None
    first = links[0]
    return {"lm": {k: v for k, v in cfg.to_dict().items() if k not in FORK_FREE_LM},
            "chain": {k: v for k, v in chain.to_dict().items() if k not in FORK_FREE_CHAIN},
            "first_link": [first.start, first.end, first.rank],
            "lrs": [repr(lr_at(chain, t, first)) for t in range(first.start, first.end)]}


def family(cfg: LMRunConfig) -> tuple:
    """A coarse, data-free `trunk_key`: runs of one family may share a trunk (same fields, first link's epochs and
    rank, schedule kind), runs of different families never do. For placing a family's runs in one shard."""
    d = cfg.to_dict()
    free = set(FORK_FREE_LM) - {"lr_schedule", "chain_overrides"}
    first = (epochs_per_link(cfg.epochs, cfg.n_links, cfg.link_epochs)[0], cfg.rank if isinstance(cfg.rank, int)
             else cfg.rank[0]) if cfg.n_links > 1 else ("lora", cfg.method, cfg.rank)
    return (*sorted((k, repr(v)) for k, v in d.items() if k not in free), ("first_link", repr(first)))


def trunk_key(cfgs: Sequence[LMRunConfig], chains: Sequence[ChainConfig], engine: str,
              device: str) -> tuple[int, str] | None:
    """(first knot step s, key) shared by every unit of runs whose first links are the same, member by member;
    None when a run has no knot or the runs' first knots differ."""
    parts = [prefix(c, ch) for c, ch in zip(cfgs, chains)]
    if not parts or any(p is None for p in parts) or len({p["first_link"][1] for p in parts}) != 1:
        return None
    body = {"engine": engine, "device": device.split(":")[0], "members": parts}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True, default=repr).encode()).hexdigest()[:24]
    return parts[0]["first_link"][1], digest


def _retarget(meta: dict[str, Any], backend: Any) -> None:
    """Give a trunk checkpoint's backend meta this run's own config(s), so the backend's config check passes (the
    key has already shown that the configs agree on everything before the knot)."""
    if "configs" in meta:  # PackedChainBackend
        meta["configs"] = [json.loads(json.dumps(c.to_dict())) for c in backend.cfgs]
    else:  # PeftChainBackend
        meta["config"] = json.loads(json.dumps(backend.cfg.to_dict()))


class ForkingCheckpointer(KnotCheckpointer):
    """`KnotCheckpointer` that also shares the first knot's checkpoint: `save` copies it to `trunk_dir` (when no
    run of the family has), `restore` falls back to it when the run has no checkpoint of its own."""

    def __init__(self, directory: str | os.PathLike, every_steps: int = 0, *, trunk_dir: str | os.PathLike,
                 step: int, keep: int = 1, log: Callable[[str], None] = print) -> None:
        super().__init__(directory, every_steps, keep=keep, log=log)
        self.trunk_dir, self.step, self.forked_at = Path(trunk_dir), step, None

    @property
    def trunk(self) -> Path:
        return self.trunk_dir / f"{PREFIX}{self.step:09d}"

    def _publish(self, path: Path) -> None:
        """Copy this run's own first-knot checkpoint `path` to the trunk, unless a family member got there first."""
        if self.trunk.exists() or not path.is_dir():
            return
        self.trunk_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.trunk_dir / f".tmp-{self.trunk.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(path, tmp)
        try:
            os.replace(tmp, self.trunk)  # atomic
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
        if self.trunk.exists():
            self.log(f"[cola] trunk of step {self.step} saved to {self.trunk_dir} (runs that agree up to this knot "
                     "will start from it)")

    def save(self, backend: Any, t: int, history: list[dict], at_knot: bool) -> Path | None:
        path = super().save(backend, t, history, at_knot)
        if path is not None and t == self.step:
            self._publish(path)
        return path

    def restore(self, backend: Any) -> tuple[int, list[dict]] | None:
        own = super().restore(backend)
        if own is not None:
            if own[0] == self.step:  # killed after its first knot's checkpoint: that checkpoint is the trunk too
                self._publish(self.directory / f"{PREFIX}{self.step:09d}")
            return own
        if not self.trunk.is_dir():
            return None
        try:
            ckpt = self.load(self.trunk)
        except CorruptResultError as exc:  # shared by other runs: reported, left in place, not loaded
            self.log(f"[cola] trunk {self.trunk} not used ({exc}); starting from scratch")
            return None
        _retarget(ckpt["meta"], backend)
        done = self._load_into(backend, ckpt)
        self.forked_at = ckpt["t"]
        self.log(f"[cola] forked from trunk {self.trunk} after {ckpt['t']} steps (same first link)")
        return done


def checkpointer(checkpoint_dir: str | os.PathLike | None, every_steps: int, trunk_root: str | os.PathLike | None,
                 cfgs: Sequence[LMRunConfig], chains: Sequence[ChainConfig], engine: str,
                 device: str) -> KnotCheckpointer | None:
    """The checkpointer of a run or pack: a `ForkingCheckpointer` when `trunk_root` is given and the runs have a
    first knot, a plain `KnotCheckpointer` otherwise (None without a checkpoint directory)."""
    if checkpoint_dir is None:
        return None
    key = trunk_key(cfgs, chains, engine, device) if trunk_root is not None else None
    if key is None:
        return KnotCheckpointer(checkpoint_dir, every_steps=every_steps)
    step, digest = key
    return ForkingCheckpointer(checkpoint_dir, every_steps, trunk_dir=Path(trunk_root) / digest, step=step)
