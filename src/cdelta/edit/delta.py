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
from safetensors import safe_open
from safetensors.torch import load_file, save, save_file

from cdelta.edit.card import write_model_card
from cdelta.errors import CdeltaError
from cdelta.io import atomic_write_bytes
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


def read_manifest(path: Path) -> dict:
    """The manifest stored in a sparse delta file."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            manifest = json.loads((handle.metadata() or {})["manifest"])
    except (OSError, KeyError, ValueError, json.JSONDecodeError) as exc:
        raise CdeltaError(f"{path} is not a cdelta sparse delta ({exc.__class__.__name__})", "pass the delta.safetensors written by cdelta") from None
    if manifest.get("format") not in READABLE_FORMATS:
        raise CdeltaError(f"{path} has unknown delta format {manifest.get('format')!r}", f"expected {DELTA_FORMAT}")
    return manifest


def load_sparse(path: Path) -> tuple[Delta, dict]:
    """Dense delta and manifest from a sparse delta file."""
    manifest = read_manifest(path)
    tensors = load_file(str(path))
    delta: Delta = {}
    layouts = manifest.get("layouts", {})
    for name, shape in manifest["shapes"].items():
        dense = torch.zeros(shape, dtype=torch.float32)
        values = tensors[f"{name}::values"]
        if layouts.get(name, "flat") == "block":
            rows, cols = tensors[f"{name}::rows"].long(), tensors[f"{name}::cols"].long()
            dense[rows.unsqueeze(1), cols.unsqueeze(0)] = values
        else:
            dense.view(-1)[tensors[f"{name}::indices"].long()] = values
        delta[name] = dense
    return delta, manifest


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
    copied unchanged, so the result loads with plain ``from_pretrained``.
    """
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remaining = set(delta)
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
