"""`KnotCheckpointer`: atomic, verified checkpoints of a chain run (the `Checkpointer` protocol of `run_chain`).

One checkpoint is a directory `step-<t>/` holding

    tensors.safetensors  folded target base weights, current link A/B, fp32 master, tied links, RNG state
    optimizer.pt         the optimizer state_dict (torch.save; read back with torch.load(weights_only=True))
    state.json           t, the run history, the backend's small state (link index, rank, config, ...)
    manifest.json        sha256 of each file above

It is written into a temporary directory and renamed into place, so a killed run leaves either the old
checkpoint or the new one. A checkpoint whose files are missing or fail their sha256 raises
`CorruptResultError` naming the file; `restore` reports it, falls back to an older checkpoint (kept when
keep > 1) or starts fresh. Nothing is ever unpickled beyond torch's weights-only loader.
`RankZeroCheckpointer` does the same for a data-parallel run (rank 0 writes, every rank restores).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from cola_theory.lm import collectives
from cola_theory.results import CorruptResultError

FILES = ("tensors.safetensors", "optimizer.pt", "state.json")
MANIFEST = "manifest.json"
PREFIX = "step-"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def verify(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of checkpoint `path` after checking every file's sha256; raises CorruptResultError."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CorruptResultError(f"checkpoint {path}: {MANIFEST} is missing or unreadable ({exc})") from exc
    for name in FILES:
        f = path / name
        if name not in files or not f.is_file():
            raise CorruptResultError(f"checkpoint {path}: file {f} is missing")
        if _sha256(f) != files[name]:
            raise CorruptResultError(f"checkpoint {path}: file {f} fails its sha256 check (truncated or corrupted)")
    return manifest



# -- what every backend's state_dict() holds besides its own tensors -----------------------------------------
def rng_tensors() -> dict[str, torch.Tensor]:
    """This process's RNG states as checkpoint tensors: "rng/cpu" and "rng/cuda/<i>" per CUDA device."""
    tensors = {"rng/cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = s
    return tensors


def set_rng_tensors(tensors: Mapping[str, torch.Tensor]) -> None:
    """Restore the RNG states of `rng_tensors()` (the CUDA ones where the devices are there)."""
    torch.set_rng_state(tensors["rng/cpu"])
    cuda = [tensors[k] for k in (f"rng/cuda/{i}" for i in range(torch.cuda.device_count())) if k in tensors]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def extra_state_dict(extra_state: Mapping[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The helpers' state (`backend.extra_state`: name -> object with state_dict() -> {"meta", "tensors"}): their
    metas by name; their tensors are added to `tensors` as "extra/<name>/<key>"."""
    metas = {}
    for key, obj in extra_state.items():
        extra = obj.state_dict()
        metas[key] = extra["meta"]
        tensors.update({f"extra/{key}/{k}": v for k, v in extra["tensors"].items()})
    return metas


def check_extra_state(metas: Mapping[str, Any], extra_state: Mapping[str, Any], owner: str) -> None:
    """Raise if a checkpoint carries the state of other helpers than `owner` has (e.g. best_dev on one side)."""
    if set(metas) != set(extra_state):
        raise ValueError(f"checkpoint carries the state of {sorted(metas)} but this {owner} of "
                         f"{sorted(extra_state)} (e.g. LMRunConfig.best_dev differs); use the same config")


def load_extra_state(extra_state: Mapping[str, Any], metas: Mapping[str, Any],
                     tensors: Mapping[str, torch.Tensor]) -> None:
    """Give every helper back its part of an `extra_state_dict` checkpoint."""
    for key, obj in extra_state.items():
        prefix = f"extra/{key}/"
        obj.load_state_dict({"meta": metas[key],
                             "tensors": {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}})


class KnotCheckpointer:
    """Saves at every knot (at_knot=True) and every `every_steps` steps; keeps the newest `keep` checkpoints.

    The backend must provide `state_dict()` -> {"meta", "tensors", "optimizer"} and `load_state_dict()`
    (as `PeftChainBackend` does); a restore needs a backend built on the same original base model.
    """

    def __init__(self, directory: str | os.PathLike, every_steps: int = 0, *, keep: int = 1,
                 log: Callable[[str], None] = print) -> None:
        if not isinstance(every_steps, int) or every_steps < 0:
            raise ValueError(f"every_steps={every_steps!r} is invalid: need an integer >= 0 (0 = only at knots)")
        if not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep={keep!r} is invalid: need an integer >= 1 (checkpoints kept on disk)")
        self.directory, self.every_steps, self.keep, self.log = Path(directory), every_steps, keep, log

    def checkpoints(self) -> list[Path]:
        """Finished checkpoint directories, newest first."""
        if not self.directory.is_dir():
            return []
        found = []
        for p in self.directory.iterdir():
            if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit():
                found.append((int(p.name[len(PREFIX):]), p))
        return [p for _, p in sorted(found, reverse=True)]

    # -- Checkpointer protocol ---------------------------------------------------------------------
    def save(self, backend: Any, t: int, history: list[dict], at_knot: bool) -> Path | None:
        """Write checkpoint `step-<t>` if t is a knot or a multiple of every_steps; returns its path."""
        if not (at_knot or (self.every_steps and t % self.every_steps == 0)):
            return None
        state = backend.state_dict()
        if state["meta"].get("t", t) != t:
            raise ValueError(f"backend is at step {state['meta']['t']} but the chain reports t={t}")
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.directory / f"{PREFIX}{t:09d}"
        tmp = self.directory / f".tmp-{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            save_file(state["tensors"], str(tmp / FILES[0]), metadata={"format": "pt"})
            buf = io.BytesIO()
            torch.save(state["optimizer"], buf)
            _write(tmp / FILES[1], buf.getvalue())
            body = {"t": t, "history": history, "backend": state["meta"]}
            _write(tmp / FILES[2], json.dumps(body, indent=1).encode())
            manifest = {"format": 1, "t": t, "files": {name: _sha256(tmp / name) for name in FILES}}
            _write(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
            _fsync_dir(tmp)
            if final.exists():  # the same step saved again: move the old one aside first
                old = self.directory / f".old-{final.name}-{os.getpid()}"
                os.replace(final, old)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, final)
            _fsync_dir(self.directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for stale in self.checkpoints()[self.keep:]:
            shutil.rmtree(stale, ignore_errors=True)
        return final

    def load(self, path: str | os.PathLike) -> dict[str, Any]:
        """{"t", "history", "meta", "tensors", "optimizer"} of a verified checkpoint; raises CorruptResultError."""
        path = Path(path)
        verify(path)
        try:
            body = json.loads((path / FILES[2]).read_text())
            tensors = load_file(str(path / FILES[0]))
            optimizer = torch.load(path / FILES[1], map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a file that passed its checksum but does not parse
            raise CorruptResultError(f"checkpoint {path} is unreadable ({exc})") from exc
        return {"t": body["t"], "history": body["history"], "meta": body["backend"], "tensors": tensors,
                "optimizer": optimizer}

    def _set_aside(self, path: Path, exc: CorruptResultError) -> None:
        aside = path.with_name(f"corrupt-{path.name}")  # kept for inspection, never loaded or pruned
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(path, aside)
        self.log(f"[cola] {exc}; moved to {aside}, trying an older checkpoint")

    def newest_intact(self) -> tuple[Path | None, dict[str, Any] | None, int]:
        """(path, `load(path)`) of the newest checkpoint that loads, corrupt newer ones moved aside as
        `corrupt-step-<t>`; (None, None) if there is none; and how many were moved aside."""
        skipped = 0
        for path in self.checkpoints():
            try:
                return path, self.load(path), skipped
            except CorruptResultError as exc:
                self._set_aside(path, exc)
                skipped += 1
        return None, None, skipped

    @staticmethod
    def _load_into(backend: Any, ckpt: dict[str, Any]) -> tuple[int, list[dict]]:
        backend.load_state_dict({"meta": ckpt["meta"], "tensors": ckpt["tensors"], "optimizer": ckpt["optimizer"]})
        return ckpt["t"], ckpt["history"]

    def restore(self, backend: Any) -> tuple[int, list[dict]] | None:
        """Load the newest intact checkpoint into `backend`; (t, history), or None to start fresh."""
        path, ckpt, skipped = self.newest_intact()
        if ckpt is None:
            if skipped:
                self.log(f"[cola] no intact checkpoint in {self.directory}; starting fresh")
            return None
        done = self._load_into(backend, ckpt)
        self.log(f"[cola] resumed from {path} after {ckpt['t']} steps")
        return done


class RankZeroCheckpointer(KnotCheckpointer):
    """`KnotCheckpointer` for a data-parallel run: every rank takes part in `state_dict()` (it gathers the RNG
    states), rank 0 alone writes, all wait; on restore rank 0 picks the newest intact checkpoint (moving corrupt
    ones aside) and every rank loads that one. The directory must be visible to all ranks (one machine or a
    shared file system)."""

    def save(self, backend: Any, t: int, history: list[dict], at_knot: bool) -> Path | None:
        if not (at_knot or (self.every_steps and t % self.every_steps == 0)):
            return None
        if collectives.info().is_main:
            path = super().save(backend, t, history, at_knot)
        else:
            path = None
            backend.state_dict()  # its collectives (RNG states) need every rank
        if collectives.active():
            dist.barrier()
        return path

    def restore(self, backend: Any) -> tuple[int, list[dict]] | None:
        if not collectives.active() or dist.get_world_size() == 1:
            return super().restore(backend)
        chosen = torch.tensor([-1], dtype=torch.int64, device=collectives.comm_device())
        if collectives.info().is_main:
            path, _, _ = self.newest_intact()
            if path is not None:
                chosen[0] = int(path.name[len(PREFIX):])
        dist.broadcast(chosen, src=0)
        if int(chosen[0]) < 0:
            return None
        ckpt = self.load(self.directory / f"{PREFIX}{int(chosen[0]):09d}")
        done = self._load_into(backend, ckpt)
        self.log(f"[cola] rank {collectives.info().rank} resumed after {ckpt['t']} steps")
        return done
