"""ΔθC: composing, applying, summing and storing circuit-restricted weight updates.

A delta maps parameter names (as in the checkpoint's safetensors files) to dense
float32 tensors that are zero outside the circuit. The sparse file stores each
tensor in the smaller of two layouts, with a manifest naming the base weights'
sha256 so it is only ever applied to the weights it was computed from:

* ``block`` (2-D tensors): the rows and columns that hold a nonzero entry (int32) and
  the dense float32 block at their crossing. A circuit's head slices are whole rows
  (q/k/v) or columns (o_proj) and an MLP is whole matrices, so this costs the values
  alone;
* ``flat``: the flat indices of the nonzero entries (int32, int64 past 2³¹ entries)
  and their float32 values.

Files of format 1 (flat int64 indices for every tensor) are still read.

On disk the manifest is one JSON string (sorted keys) under the safetensors metadata key
``manifest``: the caller's keys (``export_edit``: base model and hash, category,
direction, variant, k, seed, ...) plus ``format``, ``shapes``, ``layouts`` and
``touched``; tensors are named ``{param}::{rows|cols|values}`` or ``{param}::{indices|values}``
in parameter-name order. In memory it is a ``DeltaManifest``, and a file a ``SparseDelta``.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save, save_file

from cdelta.edit.card import write_model_card
from cdelta.errors import CdeltaError
from cdelta.io import atomic_write_bytes
from cdelta.models.architecture import stored_delta
from cdelta.models.loading import weights_hash

DELTA_FORMAT = "cdelta-sparse-delta/2"
READABLE_FORMATS = ("cdelta-sparse-delta/1", DELTA_FORMAT)
Delta = dict[str, torch.Tensor]
_LAYOUT_KEYS = ("format", "shapes", "layouts", "touched")


@dataclass(frozen=True)
class DeltaManifest:
    """The header of a sparse delta file, typed.

    ``format``: ``DELTA_FORMAT`` (or a readable older one); ``shapes``/``layouts``/``touched``:
    the dense shape and stored layout (``block``/``flat``) of each tensor and the number of
    entries changed; the provenance fields are None where the file does not name them;
    ``extra``: every other key, as stored. ``to_dict()`` gives back exactly the stored dict.
    """

    format: str | None = None
    shapes: dict[str, list[int]] | None = None
    layouts: dict[str, str] | None = None
    touched: int | None = None
    base_model: str | None = None
    base_weights_sha256: str | None = None
    category: Any = None
    direction: str | None = None
    variant: str | None = None
    k: float | None = None
    seed: int | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict) -> DeltaManifest:
        """Typed view of a stored manifest (keys holding None stay in ``extra``, so ``to_dict`` round-trips)."""
        known = {f.name for f in fields(cls)} - {"extra"}
        typed = {k: v for k, v in data.items() if k in known and v is not None}
        return cls(**typed, extra={k: v for k, v in data.items() if k not in typed})

    def to_dict(self) -> dict:
        """The manifest as stored in the file's header."""
        typed = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {**self.extra, **{k: v for k, v in typed.items() if v is not None}}

    def provenance(self) -> dict:
        """``to_dict()`` without the layout keys (what a caller passes to ``save_sparse``)."""
        return {k: v for k, v in self.to_dict().items() if k not in _LAYOUT_KEYS}

    def get(self, key: str, default=None):
        """A stored key's value (typed field or extra)."""
        return self.to_dict().get(key, default)


def compose(positive: Delta, negative: Delta | None = None, scale: float = 1.0) -> Delta:
    """``scale · (positive − negative)`` per tensor (``negative`` absent means zero)."""
    negative = negative or {}
    names = sorted(set(positive) | set(negative))
    zero = {n: torch.zeros_like(positive.get(n, negative.get(n))) for n in names}
    return {n: scale * (positive.get(n, zero[n]) - negative.get(n, zero[n])) for n in names}


def count_touched(delta: Delta) -> int:
    """Number of weight entries the delta changes."""
    return int(sum((value != 0).sum().item() for value in delta.values()))


@torch.no_grad()
def apply_to_model(model: torch.nn.Module, delta: Delta) -> None:
    """Add ``delta`` to the model's parameters in place (cast to each parameter's dtype)."""
    params = dict(model.named_parameters())
    missing = [name for name in delta if name not in params]
    if missing:
        raise CdeltaError(f"delta names parameters the model lacks: {missing[:3]}", "apply it to the base model it was made for")
    wrong = [name for name, value in delta.items() if tuple(value.shape) != tuple(params[name].shape)]
    if wrong:
        raise CdeltaError(f"delta tensor {wrong[0]} has shape {list(delta[wrong[0]].shape)}, the model's "
                          f"{list(params[wrong[0]].shape)}", "apply it to the base model it was made for")
    for name, value in delta.items():
        param = params[name]
        param.copy_((param.float() + value.to(param.device)).to(param.dtype))


def _index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2**31 else torch.int64


def _encode(value: torch.Tensor) -> tuple[str, dict[str, torch.Tensor]] | None:
    """``(layout, tensors)`` of one delta tensor in its smaller layout; None if it is all zero."""
    flat = value.reshape(-1).float()
    index = torch.nonzero(flat, as_tuple=False).reshape(-1)
    if index.numel() == 0:
        return None
    if value.dim() == 2:
        nonzero = value != 0
        rows = torch.nonzero(nonzero.any(1), as_tuple=False).reshape(-1)
        cols = torch.nonzero(nonzero.any(0), as_tuple=False).reshape(-1)
        block_bytes = 4 * (rows.numel() * cols.numel() + rows.numel() + cols.numel())
        if block_bytes <= index.numel() * (4 + _index_dtype(flat.numel()).itemsize):
            block = value.float()[rows][:, cols]
            return "block", {"rows": rows.to(torch.int32), "cols": cols.to(torch.int32), "values": block.contiguous()}
    return "flat", {"indices": index.to(_index_dtype(flat.numel())), "values": flat[index].contiguous()}


def save_sparse(delta: Delta, path: Path, manifest: dict | DeltaManifest) -> None:
    """Write the sparse delta (each tensor ``block`` or ``flat``) with ``manifest`` in its header, atomically.

    ``manifest``: the provenance keys (a ``DeltaManifest`` gives its ``provenance()``); the
    layout keys are computed here. Output is byte-identical for identical deltas and manifests.
    """
    if isinstance(manifest, DeltaManifest):
        manifest = manifest.provenance()
    tensors: dict[str, torch.Tensor] = {}
    shapes, layouts = {}, {}
    touched = 0
    for name in sorted(delta):
        encoded = _encode(delta[name])
        if encoded is None:
            continue
        layouts[name], parts = encoded
        tensors.update({f"{name}::{part}": t.contiguous() for part, t in parts.items()})
        shapes[name] = list(delta[name].shape)
        touched += int((parts["values"] != 0).sum())  # a block's zeros are not touched entries
    header = {**manifest, "format": DELTA_FORMAT, "shapes": shapes, "layouts": layouts, "touched": touched}
    atomic_write_bytes(path, save(tensors, metadata={"manifest": json.dumps(header, sort_keys=True)}))


_DELTA_FIX = "pass a delta.safetensors written by cdelta (this one is damaged, truncated or not a delta: copy it again)"
MAX_DELTA_ENTRIES = 2**34
"""Largest dense tensor a delta may describe (a damaged shape must not allocate the machine's memory)."""


def _not_a_delta(path: Path, reason: str) -> CdeltaError:
    return CdeltaError(f"{path} is not a valid cdelta sparse delta: {reason}", _DELTA_FIX)


def read_manifest(path: Path) -> dict:
    """The manifest stored in a sparse delta file, checked against the tensors its header lists.

    Every problem (missing file, damaged or truncated safetensors, a manifest that is not
    the JSON ``save_sparse`` writes, tensors missing or of the wrong dtype or shape) is a
    one-line ``CdeltaError``.
    """
    return _read_checked(Path(path))[0]


def _read_checked(path: Path) -> tuple[dict, dict[str, dict]]:
    """``(manifest, header tensors)`` of a delta file, structurally checked."""
    from cdelta.models.integrity import read_safetensors_header

    if not path.is_file():
        raise CdeltaError(f"delta file {path} not found", "pass an existing delta.safetensors written by cdelta")
    header, metadata = read_safetensors_header(path, "cdelta sparse delta", _DELTA_FIX)
    if "manifest" not in metadata:
        raise _not_a_delta(path, "its header has no cdelta manifest")
    try:
        manifest = json.loads(metadata["manifest"])
    except ValueError:
        raise _not_a_delta(path, "its manifest is not JSON") from None
    if not isinstance(manifest, dict):
        raise _not_a_delta(path, "its manifest is not a JSON object")
    if manifest.get("format") not in READABLE_FORMATS:
        raise CdeltaError(f"{path} has unknown delta format {manifest.get('format')!r}", f"expected {DELTA_FORMAT}")
    base = manifest.get("base_weights_sha256")
    if base is not None and not (isinstance(base, str) and len(base) == 64 and all(c in "0123456789abcdef" for c in base)):
        raise _not_a_delta(path, f"base_weights_sha256 {str(base)[:20]!r} is not a sha256")
    shapes, layouts = manifest.get("shapes"), manifest.get("layouts", {})
    if not isinstance(shapes, dict) or not isinstance(layouts, dict):
        raise _not_a_delta(path, "its manifest's shapes or layouts are not maps")
    expected: dict[str, tuple[tuple[str, ...], list]] = {}
    for name, shape in shapes.items():
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise _not_a_delta(path, f"the shape of {name} is not a list of sizes")
        if math.prod(shape) > MAX_DELTA_ENTRIES:
            raise _not_a_delta(path, f"the shape {shape} of {name} is implausibly large")
        layout = layouts.get(name, "flat")
        if layout == "block" and len(shape) == 2:
            expected[name] = (("I32", "I64"), [None]), (("I32", "I64"), [None]), (("F32",), [None, None])
            parts = ("rows", "cols", "values")
        elif layout == "flat":
            expected[name] = (("I32", "I64"), [None]), (("F32",), [None])
            parts = ("indices", "values")
        else:
            raise _not_a_delta(path, f"{name} has unknown layout {layout!r} for shape {shape}")
        for part, (dtypes, dims) in zip(parts, expected[name]):
            info = header.get(f"{name}::{part}")
            if info is None:
                raise _not_a_delta(path, f"tensor {name}::{part} is missing")
            if info["dtype"] not in dtypes or len(info["shape"]) != len(dims):
                raise _not_a_delta(path, f"tensor {name}::{part} has dtype {info['dtype']} and shape {info['shape']}")
        if layout == "block":
            n_rows, n_cols = header[f"{name}::rows"]["shape"][0], header[f"{name}::cols"]["shape"][0]
            if header[f"{name}::values"]["shape"] != [n_rows, n_cols]:
                raise _not_a_delta(path, f"the block of {name} is not {n_rows}×{n_cols}")
        elif header[f"{name}::values"]["shape"] != header[f"{name}::indices"]["shape"]:
            raise _not_a_delta(path, f"{name} has {header[f'{name}::values']['shape']} values for "
                                     f"{header[f'{name}::indices']['shape']} indices")
    stray = sorted(t for t in header if t.partition("::")[0] not in shapes)
    if stray:
        raise _not_a_delta(path, f"tensor {stray[0]} belongs to no parameter of its manifest")
    return manifest, header


def load_sparse(path: Path) -> tuple[Delta, dict]:
    """Dense delta and manifest from a sparse delta file (``CdeltaError`` if it is damaged:
    see ``read_manifest``; indices out of range and non-finite values count as damage)."""
    path = Path(path)
    manifest, _ = _read_checked(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise _not_a_delta(path, f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    delta: Delta = {}
    layouts = manifest.get("layouts", {})
    for name, shape in manifest["shapes"].items():
        dense = torch.zeros(shape, dtype=torch.float32)
        values = tensors[f"{name}::values"]
        if not bool(torch.isfinite(values).all()):
            raise _not_a_delta(path, f"{name} holds non-finite values")
        if layouts.get(name, "flat") == "block":
            rows, cols = tensors[f"{name}::rows"].long(), tensors[f"{name}::cols"].long()
            _check_range(path, name, rows, shape[0])
            _check_range(path, name, cols, shape[1])
            dense[rows.unsqueeze(1), cols.unsqueeze(0)] = values
        else:
            indices = tensors[f"{name}::indices"].long()
            _check_range(path, name, indices, dense.numel())
            dense.view(-1)[indices] = values
        delta[name] = dense
    return delta, manifest


def _check_range(path: Path, name: str, index: torch.Tensor, size: int) -> None:
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= size):
        raise _not_a_delta(path, f"{name} has indices outside its shape")


@dataclass(frozen=True)
class SparseDelta:
    """A sparse delta file in memory: the dense ``tensors`` (zero outside the edit) and its manifest."""

    tensors: Delta
    manifest: DeltaManifest

    @classmethod
    def load(cls, path: Path) -> SparseDelta:
        delta, manifest = load_sparse(path)
        return cls(delta, DeltaManifest.from_dict(manifest))

    def save(self, path: Path) -> None:
        """Write with ``save_sparse`` (layout keys recomputed from ``tensors``)."""
        save_sparse(self.tensors, path, self.manifest)

    def apply_to(self, model: torch.nn.Module) -> None:
        """Add the delta to ``model``'s parameters in place (``apply_to_model``)."""
        apply_to_model(model, self.tensors)


def write_edited_checkpoint(base_dir: Path, delta: Delta, out_dir: Path) -> None:
    """Copy a model directory, adding ``delta`` to its safetensors weights, atomically.

    Every non-weight file (config, tokenizer, chat template, generation config) is
    copied unchanged, so the result loads with plain ``from_pretrained``. The copy is
    built in a temporary sibling and renamed into place: a failure (a full disk included:
    ``CdeltaError``) leaves no partial checkpoint at ``out_dir``.
    """
    from cdelta.io import disk_errors
    from cdelta.models.integrity import check_checkpoint

    base_dir, out_dir = Path(base_dir), Path(out_dir)
    headers = check_checkpoint(base_dir)
    delta = stored_delta(delta, {name for h in headers.values() for name in h})  # per-expert tensors of a mixture of experts
    remaining = set(delta)
    for name in sorted(remaining):
        stored = next((h[name] for h in headers.values() if name in h), None)
        if stored is not None and list(stored["shape"]) != list(delta[name].shape):
            raise CdeltaError(f"delta tensor {name} has shape {list(delta[name].shape)}, {base_dir}'s {stored['shape']}",
                              "apply it to the base model it was made for")
    with disk_errors(f"writing the checkpoint {out_dir}"):
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.") as tmp:
            staging = Path(tmp) / "model"
            shutil.copytree(base_dir, staging, ignore=shutil.ignore_patterns("*.safetensors", "cdelta-cache.json"))
            for weights in sorted(base_dir.glob("*.safetensors")):
                with safe_open(str(weights), framework="pt") as handle:
                    metadata = handle.metadata()
                tensors = load_file(str(weights))
                for name in sorted(remaining & set(tensors)):
                    tensors[name] = (tensors[name].float() + delta[name]).to(tensors[name].dtype)
                    remaining.discard(name)
                save_file(tensors, str(staging / weights.name), metadata=metadata)
            if remaining:
                raise CdeltaError(f"delta names tensors absent from {base_dir}: {sorted(remaining)[:3]}", "apply it to the base model it was made for")
            if out_dir.exists():
                shutil.rmtree(out_dir)
            staging.rename(out_dir)


def sum_deltas(deltas: list[Delta]) -> tuple[Delta, int]:
    """The element-wise sum of ``deltas`` and the number of entries nonzero in more than one of them."""
    total: Delta = {}
    hits: dict[str, torch.Tensor] = {}
    for delta in deltas:
        for name, value in delta.items():
            total[name] = total[name] + value if name in total else value.clone()
            touched = (value != 0).to(torch.int32)
            hits[name] = hits[name] + touched if name in hits else touched
    return total, int(sum(int((h > 1).sum()) for h in hits.values()))


def apply_sparse_deltas(base_dir: Path, delta_paths: list[Path], out_dir: Path) -> dict:
    """Write base + the sum of one or more sparse deltas as a drop-in checkpoint with a model card.

    Every delta must carry the same base weights sha256, and it must be ``base_dir``'s;
    entries touched by several deltas get the sum of their values. Returns the model
    card's info: base, ``params_touched`` (entries the sum changes), ``params_total``,
    ``overlap_entries`` (entries touched by more than one delta), the parts' categories,
    directions and k joined with ``+``, and ``composed_from`` (one summary per delta).
    """
    if not delta_paths:
        raise CdeltaError("no delta given", "pass at least one delta.safetensors written by cdelta run")
    loaded = [SparseDelta.load(Path(path)) for path in delta_paths]
    bases = [part.manifest.base_weights_sha256 for part in loaded]
    if len(set(bases)) > 1:
        listing = ", ".join(f"{path} from {str(base)[:12]}…" for path, base in zip(delta_paths, bases))
        raise CdeltaError(
            f"the deltas were computed from different base weights ({listing})",
            "compose only deltas made from the same base checkpoint (same base_weights_sha256 in their manifests)",
        )
    if bases[0] is None:
        raise CdeltaError(f"{delta_paths[0]} names no base weights (no base_weights_sha256 in its manifest)",
                          "apply only deltas exported by cdelta run, which record the base they were computed from")
    actual = weights_hash(Path(base_dir))
    if actual != bases[0]:
        raise CdeltaError(
            f"base weights hash {actual[:12]}… does not match the delta's base {str(bases[0])[:12]}…",
            "apply the delta to the exact base checkpoint it was computed from",
        )
    total, overlap = sum_deltas([part.tensors for part in loaded])
    write_edited_checkpoint(Path(base_dir), total, Path(out_dir))
    touched, params_total = count_touched(total), _weights_numel(Path(base_dir))
    manifests = [part.manifest for part in loaded]
    info = {
        "base_model": manifests[0].get("base_model", Path(base_dir).name),
        "base_weights_sha256": actual,
        "params_touched": touched,
        "params_total": params_total,
        "params_touched_fraction": touched / params_total,
        "overlap_entries": overlap,
        **{key: "+".join(str(m.get(key)) for m in manifests) for key in ("category", "direction", "k")},
        "composed_from": [
            {"delta": str(path), "params_touched": count_touched(delta), **{key: m.get(key) for key in ("category", "direction", "k", "seed")}}
            for path, (delta, m) in zip(delta_paths, [(part.tensors, part.manifest) for part in loaded])
        ],
    }
    write_model_card(Path(out_dir), info)
    return info


def _weights_numel(directory: Path) -> int:
    """Entries stored in a model directory's safetensors weights (read from the headers only)."""
    total = 0
    for weights in sorted(directory.glob("*.safetensors")):
        with safe_open(str(weights), framework="pt") as handle:
            total += sum(math.prod(handle.get_slice(name).get_shape()) for name in handle.keys())
    return total
