"""``cdelta export``: an edit in the format its users run models in.

* ``checkpoint``: the drop-in Hugging Face directory (base + ΔθC), as ``cdelta run`` writes it;
* ``peft``: a PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``) for the
  base model: ``PeftModel.from_pretrained(base, PATH)``, vLLM ``--enable-lora``;
* ``gguf``: one GGUF file of the edited model (llama.cpp, Ollama, LM Studio): ``gguf_export``.

Every output directory gets the same Hugging Face model card (``card.write_model_card``).

The adapter factors each edited matrix ΔW [out, in] as B·A (``lora_B`` [out, r], ``lora_A``
[r, in]) with scaling 1 (``lora_alpha`` = r per module). A circuit's edits are slices: head rows
of q/k/v, head columns of o_proj, one row of gate/up and one column of down per gated neuron, so
ΔW is zero outside ``rows × cols`` and factors exactly through the smaller of the two: B one-hot
on the rows and A the changed rows (or B the changed columns and A one-hot). When that rank
exceeds the cap (``rank``: 64 unless given; 0: no cap) the block is replaced by its truncated SVD
and the relative Frobenius error reported. Bias changes go into ``lora_B``'s bias (``lora_bias``),
which PEFT allows only on one setting for the whole adapter; other parameters (norms,
embeddings) have no LoRA form and are refused.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cdelta.edit.card import provenance_of, write_model_card
from cdelta.edit.delta import Delta, count_touched, load_sparse, write_edited_checkpoint
from cdelta.errors import CdeltaError

FORMATS = ("checkpoint", "peft", "gguf")
GGUF_PRE = {"HuggingFaceTB/SmolLM2-135M-Instruct": "smollm", "Qwen/Qwen2.5-Coder-0.5B-Instruct": "qwen2"}
"""llama.cpp's pre-tokenizer of the bundled models' upstream (their dequantized copies' tokenizer.json
no longer says: transformers rebuilt it from the GGUF with its default byte-level split)."""
DEFAULT_RANK_CAP = 64


@dataclass
class ExportSource:
    """What an export starts from: the delta and its manifest, and the directories found for it.

    ``base_dir``: the verified base weights (None when a run directory's base cannot be found);
    ``checkpoint_dir``: the run's edited checkpoint, if there is one; ``results``: its results.json.
    """

    delta: Delta
    manifest: dict
    base_dir: Path | None = None
    checkpoint_dir: Path | None = None
    results: dict | None = None
    scratch: list = field(default_factory=list)

    def config(self) -> dict:
        """The model's config.json (from the edited checkpoint, else the base)."""
        for directory in (self.checkpoint_dir, self.base_dir):
            if directory is not None and (directory / "config.json").is_file():
                return json.loads((directory / "config.json").read_text(encoding="utf-8"))
        raise CdeltaError("neither the run's checkpoint nor its base model directory can be found",
                          "pass --delta DELTA --base MODEL with the base model the delta was made from")

    def edited_checkpoint(self) -> Path:
        """A directory holding the edited model: the run's, or base + delta written to a scratch directory."""
        if self.checkpoint_dir is not None:
            return self.checkpoint_dir
        if self.base_dir is None:
            raise CdeltaError("the run's checkpoint/ is missing and its base model cannot be found",
                              "pass --delta DELTA --base MODEL with the base model the delta was made from")
        scratch = Path(tempfile.mkdtemp(prefix="cdelta-export-"))
        self.scratch.append(scratch)
        write_edited_checkpoint(self.base_dir, self.delta, scratch / "checkpoint")
        self.checkpoint_dir = scratch / "checkpoint"
        return self.checkpoint_dir

    def cleanup(self) -> None:
        for scratch in self.scratch:
            shutil.rmtree(scratch, ignore_errors=True)
        self.scratch.clear()


def export_source(run_dir: Path | None = None, delta_path: Path | None = None, base: str | None = None) -> ExportSource:
    """The delta of ``run_dir`` (its delta.safetensors, checkpoint/ and results.json), or ``delta_path``
    applied to ``base`` (a bundled name or local directory, checked against the delta's base hash)."""
    from cdelta.models.loading import resolve_model_path, weights_hash

    if (run_dir is None) == (delta_path is None):
        raise CdeltaError("give either a run directory or --delta with --base", "e.g. cdelta export runs/default --format peft --out adapter")
    if run_dir is not None:
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise CdeltaError(f"run directory {run_dir} not found", "pass a directory written by cdelta run")
        if not (run_dir / "delta.safetensors").is_file():
            raise CdeltaError(f"{run_dir} has no delta.safetensors", "pass a directory written by cdelta run (it finished its export stage)")
        delta, manifest = load_sparse(run_dir / "delta.safetensors")
        checkpoint = run_dir / "checkpoint" if (run_dir / "checkpoint" / "config.json").is_file() else None
        results = None
        if (run_dir / "results.json").is_file():
            try:
                results = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
            except ValueError:
                results = None
        base_dir = _find_base(manifest)
        return ExportSource(delta, manifest, base_dir, checkpoint, results if isinstance(results, dict) else None)
    if base is None:
        raise CdeltaError("--delta needs --base", "pass the base model (bundled name or local directory) the delta was made from")
    delta_path = Path(delta_path)
    delta, manifest = load_sparse(delta_path)
    base_dir = resolve_model_path(str(base))
    if base_dir is None:
        raise CdeltaError(f"base model {base} is not a local directory or bundled model", "pass a local base model directory or a bundled name")
    expected = manifest.get("base_weights_sha256")
    actual = weights_hash(base_dir)
    if expected is not None and actual != expected:
        raise CdeltaError(f"base weights hash {actual[:12]}… does not match the delta's base {expected[:12]}…",
                          "export with the exact base checkpoint the delta was computed from")
    manifest = {**manifest, "base_model": manifest.get("base_model") or str(base)}
    return ExportSource(delta, manifest, base_dir)


def _find_base(manifest: dict) -> Path | None:
    """The base model directory a run's manifest names, if it is still where it was (None otherwise)."""
    from cdelta.models.bundled import BUNDLED, cached_dir

    name = manifest.get("base_model")
    if not isinstance(name, str):
        return None
    if name in BUNDLED:
        directory = cached_dir(BUNDLED[name])
        return directory if (directory / "config.json").is_file() else None
    path = Path(name).expanduser()
    return path if (path / "config.json").is_file() else None


# ------------------------------------------------------------------------------------------ provenance


def base_provenance(source: ExportSource) -> dict:
    """``{"base_model": upstream hub id or None, "license": ... or None, "note": ...}`` of the base."""
    try:
        config = source.config()
    except CdeltaError:
        config = None
    return provenance_of(source.manifest.get("base_model"), source.base_dir, config)


# ------------------------------------------------------------------------------------------ PEFT


@dataclass(frozen=True)
class Factor:
    """One module's LoRA factors: ``B`` [out, r] and ``A`` [r, in] with ``B @ A`` ≈ ΔW."""

    module: str
    B: torch.Tensor
    A: torch.Tensor
    exact_rank: int
    rel_error: float


def factorize(delta: torch.Tensor, rank_cap: int | None = DEFAULT_RANK_CAP, name: str = "") -> Factor:
    """``B``, ``A`` of one 2-D delta: exact through its changed rows or columns when that rank is
    within ``rank_cap`` (None or 0: no cap), else the truncated SVD of its changed block."""
    delta = delta.float()
    nonzero = delta != 0
    rows = torch.nonzero(nonzero.any(1)).reshape(-1)
    cols = torch.nonzero(nonzero.any(0)).reshape(-1)
    out_features, in_features = delta.shape
    structural = min(rows.numel(), cols.numel())
    if structural == 0:
        raise ValueError(f"{name}: empty delta")
    if not rank_cap or structural <= rank_cap:
        if rows.numel() <= cols.numel():
            B = torch.zeros(out_features, rows.numel())
            B[rows, torch.arange(rows.numel())] = 1.0
            A = delta[rows].clone()
        else:
            B = delta[:, cols].clone()
            A = torch.zeros(cols.numel(), in_features)
            A[torch.arange(cols.numel()), cols] = 1.0
        return Factor(name, B, A, structural, 0.0)
    block = delta[rows][:, cols].double()
    U, S, Vh = torch.linalg.svd(block, full_matrices=False)
    tol = S[0] * max(block.shape) * torch.finfo(torch.float32).eps
    numeric = int((S > tol).sum())
    r = min(numeric, rank_cap)
    B = torch.zeros(out_features, r, dtype=torch.float64)
    A = torch.zeros(r, in_features, dtype=torch.float64)
    B[rows] = U[:, :r] * S[:r]
    A[:, cols] = Vh[:r]
    error = float(torch.linalg.norm(S[r:]) / torch.linalg.norm(S)) if r < S.numel() else 0.0
    return Factor(name, B.float(), A.float(), numeric, error)


def _linear_modules(config: dict) -> dict[str, bool]:
    """``{module name: has bias}`` of the model's ``nn.Linear`` modules (built on the meta device)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "config.json").write_text(json.dumps(config), encoding="utf-8")
            hf_config = AutoConfig.from_pretrained(tmp)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config)
    except (ValueError, KeyError, ImportError, OSError) as exc:
        raise CdeltaError(f"cannot build the {config.get('model_type')!r} model from its config to find its Linear modules: "
                          f"{str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__}",
                          "export --format checkpoint, or a model transformers knows without remote code") from None
    return {name: module.bias is not None for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}


def write_peft_adapter(source: ExportSource, out_dir: Path, rank: int | None = None, log=print) -> dict:
    """Write the LoRA adapter directory; returns ``{"modules": {name: {rank, exact_rank, rel_error}}, ...}``."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    from cdelta.io import disk_errors

    cap = DEFAULT_RANK_CAP if rank is None else rank
    if cap < 0:
        raise CdeltaError(f"--rank {rank} is negative", "pass a positive rank cap, or 0 for exact factors whatever their rank")
    linear = _linear_modules(source.config())
    weights, biases, other = {}, {}, []
    for name, value in source.delta.items():
        if not bool((value != 0).any()):
            continue
        module, _, leaf = name.rpartition(".")
        if module in linear and leaf == "weight" and value.dim() == 2:
            weights[module] = value
        elif module in linear and leaf == "bias":
            biases[module] = value
        else:
            other.append(name)
    if other:
        raise CdeltaError(f"a LoRA adapter cannot hold the changes to {', '.join(sorted(other)[:4])}"
                          f"{' …' if len(other) > 4 else ''} (not nn.Linear weights)",
                          "export --format checkpoint or gguf instead")
    targets = sorted(set(weights) | set(biases))
    if biases:
        bare = [m for m in targets if not linear[m]]
        if bare:
            raise CdeltaError(f"the edit changes the biases of {', '.join(sorted(biases)[:3])} and also {', '.join(bare[:3])}, "
                              "which has no bias: PEFT's lora_bias is one setting for the whole adapter and could not be merged",
                              "export --format checkpoint or gguf instead")
    factors: dict[str, Factor] = {}
    for module in targets:
        if module in weights:
            factors[module] = factorize(weights[module], cap, module)
        else:  # a bias change alone: a rank-1 pair of zeros carries lora_B's bias
            out_features = biases[module].shape[0]
            in_features = _in_features(source, module)
            factors[module] = Factor(module, torch.zeros(out_features, 1), torch.zeros(1, in_features), 0, 0.0)
    ranks = {m: f.B.shape[1] for m, f in factors.items()}
    provenance = base_provenance(source)
    base_name = provenance["base_model"] or (str(source.base_dir.resolve()) if source.base_dir else source.manifest.get("base_model"))
    default_rank = max(set(ranks.values()), key=list(ranks.values()).count)
    config = LoraConfig(
        r=default_rank, lora_alpha=default_rank, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
        target_modules=targets, rank_pattern={m: r for m, r in ranks.items() if r != default_rank},
        alpha_pattern={m: r for m, r in ranks.items() if r != default_rank}, lora_bias=bool(biases),
        base_model_name_or_path=base_name,
    )
    tensors = {}
    for module, factor in factors.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = factor.A.contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = factor.B.contiguous()
        if biases:
            bias = biases.get(module)
            tensors[f"base_model.model.{module}.lora_B.bias"] = (bias if bias is not None else torch.zeros(factor.B.shape[0])).float().contiguous()
    out_dir = Path(out_dir)
    with disk_errors(f"writing the adapter {out_dir}"):
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.") as tmp:
            staging = Path(tmp) / "adapter"
            staging.mkdir()
            config.save_pretrained(str(staging))
            save_file(tensors, str(staging / "adapter_model.safetensors"), metadata={"format": "pt"})
            if out_dir.exists():
                shutil.rmtree(out_dir)
            staging.rename(out_dir)
    modules = {m: {"rank": ranks[m], "exact_rank": f.exact_rank, "rel_error": f.rel_error} for m, f in factors.items()}
    lossy = {m: v for m, v in modules.items() if v["rel_error"] > 0}
    for module, info in sorted(lossy.items()):
        log(f"{module}: rank {info['exact_rank']} > cap {cap}, truncated SVD to rank {info['rank']}: "
            f"relative Frobenius error {info['rel_error']:.3e}")
    worst = max((v["rel_error"] for v in modules.values()), default=0.0)
    return {"modules": modules, "lora_bias": bool(biases), "max_rel_error": worst, "rank_cap": cap,
            "parameters": int(sum(t.numel() for t in tensors.values())), "base_model_name_or_path": base_name}


def _in_features(source: ExportSource, module: str) -> int:
    from safetensors import safe_open

    directory = source.checkpoint_dir or source.base_dir
    for weights in sorted(directory.glob("*.safetensors")):
        with safe_open(str(weights), framework="pt") as handle:
            if f"{module}.weight" in handle.keys():
                return handle.get_slice(f"{module}.weight").get_shape()[1]
    raise CdeltaError(f"{module}.weight not found in {directory}", "pass the base model the delta was made from")


# ------------------------------------------------------------------------------------------ dispatch


def card_info(source: ExportSource) -> dict:
    """The model card's info: the delta's manifest with the counts it may lack."""
    info = {k: v for k, v in source.manifest.items() if k not in {"shapes", "layouts"}}
    touched = count_touched(source.delta)
    info.setdefault("params_touched", touched)
    if "params_total" not in info:
        directory = source.checkpoint_dir or source.base_dir
        if directory is not None:
            from cdelta.edit.delta import _weights_numel

            info["params_total"] = _weights_numel(directory)
    if info.get("params_total"):
        info.setdefault("params_touched_fraction", info["params_touched"] / info["params_total"])
    return info


def check_format(fmt: str, gguf_type: str = "f16") -> None:
    """CdeltaError for an unknown format or GGUF type (before anything is loaded)."""
    from cdelta.edit.gguf_export import GGUF_TYPES

    if fmt not in FORMATS:
        raise CdeltaError(f"unknown export format {fmt!r}", f"use one of: {', '.join(FORMATS)}")
    if fmt == "gguf" and gguf_type not in GGUF_TYPES:
        raise CdeltaError(f"unknown GGUF type {gguf_type!r}", f"use one of: {', '.join(GGUF_TYPES)}")


def export(source: ExportSource, fmt: str, out: Path, rank: int | None = None, gguf_type: str = "f16", log=print) -> dict:
    """Write ``source`` in ``fmt`` to ``out`` (a directory; for gguf it holds ``model-{type}.gguf``
    and the card); returns a summary for the command line."""
    from cdelta.edit.gguf_export import write_gguf

    check_format(fmt, gguf_type)
    out = Path(out)
    provenance = base_provenance(source)
    info = card_info(source)
    summary: dict = {"format": fmt, "out": str(out)}
    if fmt == "checkpoint":
        if source.checkpoint_dir is not None:
            _copy_dir(source.checkpoint_dir, out)
        elif source.base_dir is not None:
            write_edited_checkpoint(source.base_dir, source.delta, out)
        else:
            source.edited_checkpoint()  # raises: neither the run's checkpoint nor its base
    elif fmt == "peft":
        summary.update(write_peft_adapter(source, out, rank, log))
    else:
        if gguf_type == "q8_0" and source.manifest.get("variant") == "gated":
            log("warning: 8-bit Q8_0 can move a gated edit's gate enough to lose its refusals (docs/formats.md); "
                "prefer --gguf-type f16 or f32")
        checkpoint = source.edited_checkpoint()
        created = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        name = Path(str(provenance["base_model"] or info.get("base_model") or "model")).name
        try:
            summary.update(write_gguf(checkpoint, out / f"{_slug(name)}-cdelta-{gguf_type}.gguf", gguf_type,
                                      name=f"{name} cdelta {info.get('category', '')}".strip(), pre=GGUF_PRE.get(provenance["base_model"])))
        except BaseException:
            if created:
                shutil.rmtree(out, ignore_errors=True)
            raise
    write_model_card(out, info, results=source.results, fmt=fmt, provenance=provenance,
                     files={k: summary[k] for k in ("file", "gguf_type", "transformers") if k in summary}, adapter=summary if fmt == "peft" else None)
    return summary


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip("-") or "model"


def _copy_dir(src: Path, dst: Path) -> None:
    from cdelta.io import disk_errors

    with disk_errors(f"writing the checkpoint {dst}"):
        dst.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dst.parent, prefix=f".{dst.name}.") as tmp:
            staging = Path(tmp) / "model"
            shutil.copytree(src, staging, ignore=shutil.ignore_patterns("cdelta-cache.json"))
            if dst.exists():
                shutil.rmtree(dst)
            staging.rename(dst)


def rank_summary(modules: dict) -> str:
    """``"12 modules, ranks 1-8, exact"`` or with the worst truncation error."""
    ranks = [v["rank"] for v in modules.values()]
    worst = max((v["rel_error"] for v in modules.values()), default=0.0)
    span = f"{min(ranks)}-{max(ranks)}" if min(ranks) != max(ranks) else str(ranks[0])
    return f"{len(modules)} modules, rank {span}, " + ("exact" if worst == 0 else f"worst relative Frobenius error {worst:.2e}")


__all__ = ["FORMATS", "ExportSource", "check_format", "export", "export_source", "factorize", "write_peft_adapter", "rank_summary"]
