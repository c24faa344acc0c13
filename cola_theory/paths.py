"""Paths that come from configs or the command line stay inside their output directory.

`safe_join(root, relative)` is the one gate: a result or checkpoint name built from a config value (a task,
a model id such as "facebook/opt-1.3b", a job id) may add folders below `root`, but an absolute path, a
drive letter, a `..` that climbs out of `root`, a NUL byte or a symbolic link that points outside `root` is
refused with a ValueError that names the value and what to do instead.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path, PurePosixPath, PureWindowsPath

__all__ = ["check_writable", "safe_join"]


def check_writable(path: Path, flag: str) -> str | None:
    """None if the output directory `path` can be created and written, else a message naming the command-line
    flag, the path and the reason."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        return f"{flag} {path} is not writable ({exc.strerror or exc}); choose another directory with {flag}"
    return None


def safe_join(root: str | os.PathLike, relative: str | os.PathLike, *, what: str = "path") -> Path:
    """`root / relative`, guaranteed to lie inside `root` (after resolving `..` and symbolic links).

    `what` names the source of `relative` in the error message (e.g. "LMRunConfig.task").
    """
    text = os.fspath(relative)
    if not isinstance(text, str):
        raise TypeError(f"{what}={text!r} must be a str path, not {type(text).__name__}")
    fix = f"use a relative name below {os.fspath(root)!r} without '..' (e.g. 'lm/run-1.json')"
    if not text.strip() or "\x00" in text:
        raise ValueError(f"{what}={text!r} is empty or holds a NUL byte; {fix}")
    if PurePosixPath(text).is_absolute() or PureWindowsPath(text).is_absolute() or PureWindowsPath(text).drive:
        raise ValueError(f"{what}={text!r} is an absolute path; it must stay inside the output directory: {fix}")
    base = Path(root).resolve()
    target = (base / text).resolve()
    if target != base and base not in target.parents:
        raise ValueError(f"{what}={text!r} escapes the output directory {str(base)!r} (resolves to {str(target)!r}); "
                         f"{fix}")
    return target
