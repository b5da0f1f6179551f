"""ActAdd and directional ablation as exported weight edits (baselines; their hook forms:
``cdelta.directions.hooks``).

* **ActAdd**: ``alpha · r`` added to the residual stream after decoder layer ``L`` is a
  bias on layer ``L``'s ``down_proj`` (the MLP output is added straight into the residual
  stream, so the two are the same computation).
* **Directional ablation** (Arditi et al. 2024): ``W ← W − r̂ r̂ᵀ W`` for every matrix
  writing to the residual stream (``o_proj.weight`` and ``down_proj.weight`` are
  ``[d_model, in]`` in transformers, so their output rows), ``W_E ← W_E − W_E r̂ r̂ᵀ``
  for the embedding ``[vocab, d_model]``, and the same projection of any output bias.

Weight edits are ``WeightEdit``s: a dense delta for existing tensors, tensors to
create, and config changes, so that the exported directory loads with plain
``AutoModelForCausalLM.from_pretrained``:

* ActAdd on llama: ``config.mlp_bias = True`` with zero gate/up/down biases everywhere
  except ``down_proj.bias`` of layer ``L``. Qwen2 and Mistral cannot carry MLP biases,
  so the checkpoint is re-labelled as the identical llama architecture (``model_type
  "llama"``, ``attention_bias=True`` plus zero ``o_proj`` biases for qwen2, whose q/k/v
  biases carry over) — the nearest faithful alternative. Refused for sliding-window
  attention, which llama lacks.
* Directional ablation with tied input/output embeddings: by default (``tied="untie"``)
  the output head keeps the original embedding (``tie_word_embeddings=False`` and an
  explicit ``lm_head.weight``), which reproduces the hooked model exactly;
  ``tied="edit"`` edits the shared matrix as Arditi et al. do for tied models (the
  unembedding changes too, so it no longer matches the hooks).

Gemma2/3 normalise each sublayer's output before adding it to the residual stream, so
neither edit is equivalent there; both raise ``CdeltaError``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cdelta.directions.hooks import layer_of, require_pre_norm, vector_of
from cdelta.directions.vectors import Direction, unit
from cdelta.errors import CdeltaError
from cdelta.models.architecture import ATTN_PROJS, architecture_of, attention, attn_proj, require_separate_mlp

TIED_MODES = ("untie", "edit")


# ---------------------------------------------------------------------- weight edits


@dataclass
class WeightEdit:
    """A weight edit: ``delta`` is added to existing tensors (dense, float32), ``created``
    tensors are new (written as given: zero biases, an ActAdd bias, an untied output
    head), ``config_updates`` are set in config.json. ``info`` describes the edit."""

    delta: dict[str, torch.Tensor]
    created: dict[str, torch.Tensor] = field(default_factory=dict)
    config_updates: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)


def _param_name(model: torch.nn.Module, module: torch.nn.Module, attr: str = "weight") -> str:
    for name, candidate in model.named_modules():
        if candidate is module:
            return f"{name}.{attr}" if name else attr
    raise CdeltaError("module not found in model", "pass the model the module belongs to")


def _is_tied(model: torch.nn.Module) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


@torch.no_grad()
def ablation_edit(model: torch.nn.Module, direction: Direction | torch.Tensor, tied: str = "untie") -> WeightEdit:
    """Directional ablation as weights: orthogonalize every residual-stream writer against ``r̂``."""
    require_pre_norm(model, "directional ablation as weights")
    if tied not in TIED_MODES:
        raise CdeltaError(f"unknown tied mode {tied!r}", f"use one of: {', '.join(TIED_MODES)}")
    arch = architecture_of(model)
    if arch.family.moe:
        require_separate_mlp(model, "directional ablation as weights")
    r = unit(vector_of(direction))
    params = dict(model.named_parameters())
    delta: dict[str, torch.Tensor] = {}
    created: dict[str, torch.Tensor] = {}
    config_updates: dict = {}

    embed = model.get_input_embeddings()
    embed_name = _param_name(model, embed)
    w_e = embed.weight.detach().float().cpu()
    delta[embed_name] = -torch.outer(w_e @ r, r)
    if _is_tied(model) and tied == "untie":
        created[_param_name(model, model.get_output_embeddings())] = w_e.clone()
        config_updates["tie_word_embeddings"] = False

    for layer in range(arch.n_layers):
        for name in (arch.attn_param(layer, "o"), arch.mlp_param(layer, "down")):
            w = params[name].detach().float().cpu()
            delta[name] = -torch.outer(r, r @ w)
        for name in (arch.attn_bias_param(layer, "o"), arch.mlp_bias_param(layer, "down")):
            if name in params:
                b = params[name].detach().float().cpu()
                delta[name] = -(b @ r) * r
    info = {"method": "directional_ablation", "tied": tied if _is_tied(model) else None, "direction_norm": float(vector_of(direction).float().norm())}
    if isinstance(direction, Direction):
        info.update({"direction_layer": direction.layer, "direction_position": direction.position, "recipe": direction.recipe})
    return WeightEdit(delta=delta, created=created, config_updates=config_updates, info=info)


def _llama_relabel(model: torch.nn.Module) -> dict:
    """Config changes that re-label a qwen2/mistral checkpoint as the equivalent llama one."""
    config = model.config
    model_type = architecture_of(model).model_type
    sliding = getattr(config, "sliding_window", None)
    uses_sliding = getattr(config, "use_sliding_window", model_type == "mistral")
    layer_types = getattr(config, "layer_types", None) or []
    if (uses_sliding and sliding) or any(t != "full_attention" for t in layer_types):
        raise CdeltaError(
            f"this {model_type} model uses sliding-window attention, which the llama architecture cannot express",
            "use the ActAdd hook (actadd_hooks / CAST) instead of a baked bias for this model",
        )
    updates = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "mlp_bias": True}
    if model_type == "qwen2":
        updates["attention_bias"] = True
    return updates


@torch.no_grad()
def actadd_edit(
    model: torch.nn.Module, direction: Direction | torch.Tensor, layer: int | None = None, alpha: float = 1.0
) -> WeightEdit:
    """ActAdd as weights: ``alpha · r`` baked into the bias of layer ``layer``'s ``down_proj``."""
    require_pre_norm(model, "ActAdd as weights")
    layer = layer_of(direction, layer)
    arch = architecture_of(model)
    params = dict(model.named_parameters())
    shift = alpha * vector_of(direction).float().cpu()
    target = arch.mlp_bias_param(layer, "down")
    delta: dict[str, torch.Tensor] = {}
    created: dict[str, torch.Tensor] = {}
    config_updates: dict = {}
    if target in params:
        delta[target] = shift.clone()
    else:
        if arch.model_type not in ("llama", "qwen2", "mistral"):
            raise CdeltaError(f"ActAdd as weights needs an MLP bias, which this {arch.model_type} model cannot carry",
                              "use the ActAdd hook (actadd_hooks / CAST) instead of a baked bias for this model")
        if arch.model_type == "llama":
            config_updates["mlp_bias"] = True
        else:
            config_updates.update(_llama_relabel(model))
        for i in range(arch.n_layers):
            created[arch.mlp_bias_param(i, "gate")] = torch.zeros(arch.d_mlp)
            created[arch.mlp_bias_param(i, "up")] = torch.zeros(arch.d_mlp)
            created[arch.mlp_bias_param(i, "down")] = shift.clone() if i == layer else torch.zeros(arch.d_model)
            if config_updates.get("attention_bias"):
                for proj in ATTN_PROJS:
                    name = arch.attn_bias_param(i, proj)
                    if name not in params:
                        out_features = attn_proj(model, i, proj).out_features
                        created[name] = torch.zeros(out_features)
    info = {"method": "actadd", "layer": layer, "alpha": alpha, "direction_norm": float(vector_of(direction).float().norm())}
    if config_updates.get("model_type"):
        info["relabelled_from"] = arch.model_type
    if isinstance(direction, Direction):
        info.update({"direction_layer": direction.layer, "direction_position": direction.position, "recipe": direction.recipe})
    return WeightEdit(delta=delta, created=created, config_updates=config_updates, info=info)


@torch.no_grad()
def apply_weight_edit(model: torch.nn.Module, edit: WeightEdit) -> None:
    """Apply ``edit`` to a loaded model in place (new tensors become new parameters).

    Config flags are set on ``model.config`` except ``model_type``/``architectures``
    (the in-memory classes already compute the same function).
    """
    params = dict(model.named_parameters())
    for name, tensor in edit.created.items():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        like = next(model.parameters())
        setattr(module, attr, torch.nn.Parameter(tensor.to(like.device, like.dtype).clone(), requires_grad=False))
    missing = [n for n in edit.delta if n not in params]
    if missing:
        raise CdeltaError(f"edit names parameters the model lacks: {missing[:3]}", "apply it to the model it was computed on")
    for name, value in edit.delta.items():
        param = params[name]
        param.copy_((param.float() + value.to(param.device)).to(param.dtype))
    for key, value in edit.config_updates.items():
        if key not in ("model_type", "architectures"):
            setattr(model.config, key, value)


# --------------------------------------------------------------------------- export


def _add_tensors(directory: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Add new tensors to a safetensors checkpoint (single file, or a new shard of an indexed one)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    if not tensors:
        return
    index_path = directory / "model.safetensors.index.json"
    files = sorted(directory.glob("*.safetensors"))
    with safe_open(str(files[0]), framework="pt") as handle:
        metadata = handle.metadata() or {"format": "pt"}
        dtype = handle.get_tensor(next(iter(handle.keys()))).dtype
    new = {name: t.to(dtype).contiguous() for name, t in tensors.items()}
    if index_path.is_file():
        index = json.loads(index_path.read_text())
        shard = "model-cdelta-directions.safetensors"
        save_file(new, str(directory / shard), metadata=metadata)
        index["weight_map"].update({name: shard for name in new})
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True))
        return
    if len(files) != 1:
        raise CdeltaError(f"{directory} has {len(files)} safetensors files and no index", "export from a single-file or indexed checkpoint")
    existing = load_file(str(files[0]))
    clash = sorted(set(existing) & set(new))
    if clash:
        raise CdeltaError(f"tensors to create already exist: {clash[:3]}", "compute the edit on the base model")
    save_file({**existing, **new}, str(files[0]), metadata=metadata)


def _update_config(directory: Path, updates: dict) -> None:
    if not updates:
        return
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(updates)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def export_direction_edit(lm, edit: WeightEdit, out_dir: Path, manifest: dict | None = None) -> Path:
    """Write ``out_dir``: a drop-in checkpoint = base weights + ``edit`` (plus ``direction-edit.json``).

    ``lm`` is a ``LoadedModel``; hub models are first saved to a scratch directory. The
    directory is built next to ``out_dir`` and renamed into place at the end.
    """
    from cdelta.edit.delta import write_edited_checkpoint
    from cdelta.edit.export import base_model_dir

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.") as tmp:
        staging = Path(tmp) / "checkpoint"
        base = base_model_dir(lm, Path(tmp) / "base")
        write_edited_checkpoint(base, edit.delta, staging)
        _add_tensors(staging, edit.created)
        _update_config(staging, edit.config_updates)
        record = {
            **(manifest or {}),
            **edit.info,
            "base_model": lm.name,
            "base_weights_sha256": lm.weights_sha256,
            "config_updates": edit.config_updates,
            "created_tensors": sorted(edit.created),
            "edited_tensors": len(edit.delta),
        }
        (staging / "direction-edit.json").write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
        (staging / "README.md").write_text(
            f"# {lm.name} + {edit.info.get('method', 'direction edit')}\n\n"
            "Baseline weight edit made with cdelta (`cdelta.baselines.steering`); loads with plain transformers, "
            "no runtime hooks. Settings in `direction-edit.json`.\n"
        )
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    return out_dir
