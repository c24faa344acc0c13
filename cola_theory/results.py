"""Self-describing result files: {config, history, metrics, meta}, written atomically with a checksum.

A result is written to a temporary file in the same directory, fsync'ed and renamed over the target,
so a killed run leaves either the old file or the new one, never half of one. The payload carries the
sha256 of its canonical JSON; `load_result` recomputes it and raises `CorruptResultError` naming the
file when it does not match, so a damaged result is recomputed rather than silently used.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any


class CorruptResultError(ValueError):
    """A result or checkpoint file exists but is truncated, unparsable or fails its checksum."""


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (temp file in the same directory + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a result file is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def environment_meta(seed: int | None = None, device: str | None = None) -> dict[str, Any]:
    """Versions, machine, commit: what a reader needs to know where a number came from."""
    import numpy
    import torch

    meta: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
        "platform": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "seed": seed,
        # "high" = TF32 matmuls for float32 tensors on a CUDA device (run_all's default there), "highest" = IEEE
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "device": device or ("cuda:" + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    for dist in ("transformers", "peft", "datasets", "accelerate", "scipy"):
        try:  # package metadata only: importing transformers would cost seconds
            meta[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    meta["git_commit"], meta["git_dirty"] = git_state()
    return meta


def git_state() -> tuple[str | None, bool | None]:
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=5).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True, timeout=5).stdout.strip())
        return sha, dirty
    except Exception:  # noqa: BLE001 - not a git checkout
        return None, None


def save_result(path: str | os.PathLike, *, config: dict, history: list, metrics: dict | None = None,
                meta: dict | None = None) -> dict:
    """Write one self-describing result file atomically; returns the payload written."""
    body = {"config": config, "history": history, "metrics": metrics or {}, "meta": meta or environment_meta()}
    payload = {**body, "sha256": hashlib.sha256(_canonical(body)).hexdigest()}
    atomic_write_text(path, json.dumps(payload, indent=1, default=str))
    return payload


def load_result(path: str | os.PathLike) -> dict:
    """Read a result file and check its checksum; raises CorruptResultError naming the file."""
    path = Path(path)
    try:
        payload = json.loads(path.read_text())
        body = {k: payload[k] for k in ("config", "history", "metrics", "meta")}
        digest = payload["sha256"]
    except FileNotFoundError:
        raise
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise CorruptResultError(f"result file {path} is unreadable ({exc}); delete it to recompute") from exc
    if hashlib.sha256(_canonical(body)).hexdigest() != digest:
        raise CorruptResultError(f"result file {path} fails its sha256 check; delete it to recompute")
    return payload


def load_if_valid(path: str | os.PathLike, warn=print) -> dict | None:
    """The result at `path` if it exists and is intact; None (with a message) if missing or corrupt."""
    try:
        return load_result(path)
    except FileNotFoundError:
        return None
    except CorruptResultError as exc:
        warn(f"[cola] {exc} -> recomputing")
        return None
