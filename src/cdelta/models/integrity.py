"""Integrity of model files: hashes that rest on the bytes, and checks of checkpoints before loading.

``file_sha256`` is the sha256 of a file's bytes. Hashing a multi-GB checkpoint on every
load is slow, so digests are kept in a hash cache (``$CDELTA_CACHE_DIR/hashes.json``)
keyed by the file's real path and its ``(size, mtime_ns, inode, device, ctime_ns)``: any
change to any of them (every write changes mtime and ctime) and the bytes are hashed
again. A digest is only cached once the file's mtime is a few seconds old, so a write in
the same clock tick as the hashing cannot hide behind an unchanged mtime. Nothing else
(in particular no ``cdelta-cache.json`` sidecar) ever vouches for a file's bytes.

``check_safetensors`` parses a safetensors header in pure Python (no pickle, no native
code on untrusted bytes) and checks that the file holds exactly the bytes the header
describes; ``check_checkpoint`` checks a model directory (``config.json``, the shard
index, every shard) so that a damaged checkpoint is one ``CdeltaError`` instead of a
traceback from deep inside transformers.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import time
from contextlib import contextmanager
from pathlib import Path

from cdelta.errors import CdeltaError
from cdelta.paths import cache_home

HASH_CACHE_NAME = "hashes.json"
RACY_SECONDS = 2.0
"""A digest is cached only when the file's mtime is at least this old when it is hashed."""
MAX_HEADER_BYTES = 100_000_000
"""Largest safetensors header accepted (the safetensors library's own limit)."""
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8,
}
"""Bytes per element of the safetensors dtypes whose size is a whole number of bytes."""

_MEMO: dict[str, tuple[list[int], str]] = {}


def sha256_bytes_of(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of one file's bytes, read in 4 MiB chunks (no cache)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _identity(stat: os.stat_result) -> list[int]:
    return [stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_dev, stat.st_ctime_ns]


def hash_cache_path() -> Path:
    """Where digests are cached: next to the model caches (``$CDELTA_CACHE_DIR`` overrides)."""
    return cache_home() / HASH_CACHE_NAME


def _read_store(path: Path) -> dict:
    """The hash cache as a dict; an unreadable or damaged cache counts as empty (it is only a cache)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@contextmanager
def _store_lock(path: Path):
    """An exclusive OS lock on ``path.lock`` (no lock where the OS or file system has none)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:  # pragma: no cover - file system without locks
            pass
        yield


def _remember(real: str, identity: list[int], digest: str) -> None:
    """Store one digest in the hash cache, dropping entries of files that no longer exist."""
    from cdelta.io import atomic_write_json

    path = hash_cache_path()
    try:
        with _store_lock(path):
            store = _read_store(path)
            store = {k: v for k, v in store.items() if os.path.exists(k)}
            store[real] = {"stat": identity, "sha256": digest}
            atomic_write_json(path, store)
    except OSError:
        pass  # a cache we cannot write only costs time


def _valid_record(record, identity: list[int]) -> str | None:
    if not isinstance(record, dict) or record.get("stat") != identity:
        return None
    digest = record.get("sha256")
    if isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest):
        return digest
    return None


def file_sha256(path: Path) -> str:
    """sha256 of ``path``'s bytes, from the hash cache when the file is unchanged since it was hashed."""
    real = os.path.realpath(path)
    identity = _identity(os.stat(real))
    memo = _MEMO.get(real)
    if memo is not None and memo[0] == identity:
        return memo[1]
    digest = _valid_record(_read_store(hash_cache_path()).get(real), identity)
    if digest is None:
        digest = sha256_bytes_of(Path(real))
        after = os.stat(real)
        settled = time.time_ns() - after.st_mtime_ns > RACY_SECONDS * 1e9
        if _identity(after) != identity or not settled:
            return digest  # changed while hashed, or too fresh to trust its mtime: do not cache
        _remember(real, identity, digest)
    _MEMO[real] = (identity, digest)
    return digest


def combine_hashes(per_file: dict[str, str]) -> str:
    """Identity of a set of weight files: one file's own hash, or the sha256 over the
    sorted ``name:digest`` lines of several."""
    if len(per_file) == 1:
        return next(iter(per_file.values()))
    joined = "".join(f"{name}:{digest}\n" for name, digest in sorted(per_file.items()))
    return hashlib.sha256(joined.encode()).hexdigest()


# --------------------------------------------------------------------------- safetensors


def check_safetensors(path: Path, what: str = "safetensors file", fix: str = "") -> dict[str, dict]:
    """The tensors a safetensors file's header describes (name → dtype, shape, data_offsets),
    after checking that the header parses and the file holds exactly the bytes it describes;
    ``CdeltaError`` naming ``path`` and ``what`` it should be otherwise."""
    return read_safetensors_header(path, what, fix)[0]


def read_safetensors_header(path: Path, what: str = "safetensors file", fix: str = "") -> tuple[dict[str, dict], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file, checked as ``check_safetensors`` does."""
    path = Path(path)
    fix = fix or "the file is damaged or truncated: copy or download it again"

    def bad(reason: str) -> CdeltaError:
        return CdeltaError(f"{path} is not a valid {what}: {reason}", fix)

    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise bad(f"{size} bytes, shorter than a safetensors header")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES or length > size - 8:
                raise bad(f"its header claims {length:,} bytes and the file has {size:,} (truncated or not safetensors)")
            raw = handle.read(length)
    except OSError as exc:
        raise CdeltaError(f"cannot read {path}: {exc.strerror or exc}", "check that the file exists and is readable") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise bad("its header is not JSON") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise bad("its __metadata__ is not a map of strings")
    spans = []
    for name, info in header.items():
        if not isinstance(info, dict):
            raise bad(f"tensor {name!r} has no dtype/shape/offsets")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        ints = lambda xs, n=None: isinstance(xs, list) and (n is None or len(xs) == n) and all(  # noqa: E731
            isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in xs)
        if not isinstance(dtype, str) or not ints(shape) or not ints(offsets, 2) or offsets[0] > offsets[1]:
            raise bad(f"tensor {name!r} has a malformed dtype, shape or data_offsets")
        if dtype in DTYPE_BYTES and offsets[1] - offsets[0] != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise bad(f"tensor {name!r} of shape {shape} ({dtype}) does not fit its {offsets[1] - offsets[0]} bytes")
        spans.append(tuple(offsets))
    end = 0
    for begin, stop in sorted(spans):
        if begin != end:
            raise bad("its tensors' data overlap or leave gaps")
        end = stop
    if 8 + length + end != size:
        raise bad(f"the header describes {8 + length + end:,} bytes and the file has {size:,} (truncated or damaged)")
    return header, metadata or {}


def read_json_object(path: Path, what: str, fix: str) -> dict:
    """The JSON object in ``path``; a ``CdeltaError`` naming ``what`` was expected (and ``fix``)
    when the file cannot be read, is not JSON or is not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CdeltaError(f"cannot read {path}: {exc.strerror or exc}", fix) from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise CdeltaError(f"{path} is not valid JSON ({exc.__class__.__name__}: {str(exc).splitlines()[0][:120]})", fix) from None
    if not isinstance(data, dict):
        raise CdeltaError(f"{path} is not a {what} (a JSON object expected, found {type(data).__name__})", fix)
    return data


def check_checkpoint(directory: Path) -> dict[str, dict[str, dict]]:
    """Check a local model directory before it is loaded; returns each weight file's tensors.

    ``config.json`` must be a JSON object naming a ``model_type``; there must be
    safetensors weights (pickled ``.bin`` weights are never loaded); a shard index must
    parse and every shard it names must exist and hold the tensors it lists; every
    ``*.safetensors`` file must be whole (``check_safetensors``).
    """
    directory = Path(directory)
    fix = f"the checkpoint in {directory} is damaged or incomplete: copy or export it again"
    config = read_json_object(directory / "config.json", "model config", fix)
    if not isinstance(config.get("model_type"), str):
        raise CdeltaError(f"{directory / 'config.json'} names no model_type", fix)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in directory.glob("*.bin"))
        if pickled:
            raise CdeltaError(f"{directory} holds only pickled weights ({', '.join(pickled[:3])}); cdelta loads safetensors only",
                              "convert the checkpoint to safetensors (e.g. save_pretrained(..., safe_serialization=True))")
        raise CdeltaError(f"no *.safetensors weights in {directory}", "point --model at a Hugging Face model directory")
    tensors = {f.name: check_safetensors(f, "safetensors weight file", fix) for f in files}
    for index_path in sorted(directory.glob("*.safetensors.index.json")):
        index = read_json_object(index_path, "safetensors shard index", fix)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CdeltaError(f"{index_path} has no weight_map of tensor names to shard files", fix)
        missing = sorted({shard for shard in weight_map.values() if shard not in tensors})
        if missing:
            raise CdeltaError(f"{directory} lacks shard {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                              + f" named in {index_path.name}", fix)
        absent = [name for name, shard in weight_map.items() if name not in tensors[shard]]
        if absent:
            raise CdeltaError(f"{weight_map[absent[0]]} lacks tensor {absent[0]} that {index_path.name} places there", fix)
    return tensors
