"""Atomic file output and run provenance (seed, versions, base-model hash)."""

from __future__ import annotations

import errno
import json
import os
import platform
import sys
import tempfile
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from cdelta.errors import CdeltaError

DISK_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded", errno.EFBIG: "file too large",
               errno.EROFS: "read-only file system", errno.EACCES: "permission denied", errno.EPERM: "operation not permitted"}
"""Errors of the disk (not of cdelta) that a write can meet, and how they are named to the user."""


@contextmanager
def disk_errors(action: str):
    """Turn a write's disk errors (full disk, quota, read-only, permissions) into a one-line
    ``CdeltaError`` saying what was being written; callers write to a temporary file or
    directory first, so nothing partial is left behind."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in DISK_ERRNOS:
            raise
        where = f" ({exc.filename})" if exc.filename else ""
        raise CdeltaError(f"{DISK_ERRNOS[exc.errno]} while {action}{where}; nothing partial was kept",
                          "free disk space or fix the permissions (or write elsewhere), then run again") from None
    except Exception as exc:  # safetensors reports its own write errors as SafetensorError
        text = str(exc)
        if exc.__class__.__name__ != "SafetensorError" or not any(s in text for s in ("No space left", "os error 28", "StorageFull")):
            raise
        raise CdeltaError(f"no space left on the device while {action}; nothing partial was kept",
                          "free disk space (or write elsewhere), then run again") from None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same directory and a rename."""
    path = Path(path)
    with disk_errors(f"writing {path}"):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def atomic_write_json(path: Path, obj) -> None:
    """Write ``obj`` as indented, key-sorted JSON, atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def _version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def versions() -> dict[str, str]:
    """Versions of Python and the libraries whose behaviour affects results."""
    libs = ("cdelta", "torch", "transformers", "safetensors", "numpy", "optuna")
    return {"python": platform.python_version(), **{lib: _version(lib) for lib in libs}}


def provenance(seed: int, model_name: str, weights_sha256: str, **extra) -> dict:
    """Metadata stamped into every output: seed, versions, base model and its hash."""
    return {
        "seed": seed,
        "model": model_name,
        "weights_sha256": weights_sha256,
        "versions": versions(),
        "command": " ".join(Path(sys.argv[0]).name.split() + sys.argv[1:]),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }
