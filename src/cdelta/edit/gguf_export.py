"""A GGUF file (llama.cpp, Ollama, LM Studio) of a Hugging Face checkpoint, written with the ``gguf`` package.

Tensor names come from the package's own HF → GGUF map (``gguf.get_tensor_name_map`` for the
family's llama.cpp architecture, ``Family.gguf``), so every name is one llama.cpp's tensor list for
that architecture holds, and the metadata keys from its ``GGUFWriter`` methods. What llama.cpp's
converter (``convert_hf_to_gguf.py``) does to the values, per architecture (``LAYOUTS``), and what
a reader undoes:

* ``llama`` (llama, mistral, mixtral) and ``granite``: llama.cpp rotates interleaved pairs where HF
  rotates halves, so the rows of ``q_proj``/``k_proj`` are reordered per head; qwen2, qwen3, qwen3moe,
  olmo2, olmoe, phi3 and gemma rotate halves in both and are written as they are; cohere2 rotates
  pairs in both (no reordering either);
* gemma2/gemma3: HF's RMSNorm computes ``x·(1 + w)`` and llama.cpp's ``x·w``, so every norm weight is
  written as ``w + 1``; the token embeddings stay unscaled (llama.cpp multiplies by √d itself);
* phi3: ``qkv_proj`` and ``gate_up_proj`` stay fused (``attn_qkv``; ``ffn_up`` holds the gate rows,
  then the up rows, as llama.cpp's SwiGLU splits it);
* mixture of experts: the per-expert matrices are stacked into one 3-D tensor per projection
  (``ffn_gate_exps``/``ffn_up_exps`` [n_experts, d_expert, d_model], ``ffn_down_exps``
  [n_experts, d_model, d_expert]) and the router is ``ffn_gate_inp``;
* scalars llama.cpp reads as metadata: granite's four multipliers (``attention.scale``,
  ``embedding_scale``, ``residual_scale``, ``logit_scale``), cohere2's ``logit_scale``, sliding
  window and its period (``attention.sliding_window_pattern``), gemma's sliding window and
  soft-capping, the experts' counts.

What llama.cpp's graph for an architecture cannot express is refused before anything is written
(``check_config``), each with a one-line reason: a qwen3_moe with dense layers or without top-k
renormalisation, an olmoe with grouped-query attention (its k_norm spans all heads in llama.cpp),
clipped qkv or top-k renormalisation, a cohere2 or gemma whose lm_head differs from its embeddings,
gemma's query scale or sliding-window layout other than llama.cpp's, rope scaling other than linear.

The tokenizer comes from ``tokenizer.json``: a byte-level BPE (SmolLM, Qwen2/3, Llama 3, OLMo,
Granite, Command R) as llama.cpp's ``gpt2`` vocabulary with its merges and pre-tokenizer; a BPE
with byte fallback, the form Hugging Face keeps SentencePiece vocabularies in (Llama 2, Mistral
7B, Mixtral, Phi-3 mini, Gemma), as llama.cpp's ``llama`` vocabulary with scores that order its
merges as tokenizer.json's merge list does (``_sentencepiece``). Other tokenizers (Unigram,
WordPiece) are refused.

1-D tensors (norms, biases) stay F32 whatever the file type, as llama.cpp keeps them; a tensor
whose rows do not split into Q8_0 blocks of 32 falls back to F16.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cdelta.errors import CdeltaError
from cdelta.models.architecture import FAMILIES

GGUF_TYPES = ("f32", "f16", "q8_0")
GGUF_FAMILIES = tuple(t for t, f in FAMILIES.items() if f.gguf)
"""``model_type`` values GGUF export writes (those with a llama.cpp architecture, ``Family.gguf``)."""


@dataclass(frozen=True)
class Layout:
    """What one llama.cpp architecture expects of the values beyond their names.

    ``permute_qk``: llama.cpp rotates interleaved pairs where the HF model rotates halves (q/k rows
    reordered per head); ``norm_plus_one``: HF norms compute ``x·(1 + w)``, llama.cpp ``x·w``;
    ``output``: ``optional`` (``output.weight`` unless tied; llama.cpp falls back to the
    embeddings), ``required`` (always written, the embeddings when tied) or ``tied`` (llama.cpp
    always uses the embeddings: a different lm_head is refused); ``layer_norm``: LayerNorm eps
    instead of RMSNorm's; ``transformers``: transformers' GGUF loader reads the architecture back
    (dense models only for ``llama``).
    """

    permute_qk: bool = False
    norm_plus_one: bool = False
    output: str = "optional"
    layer_norm: bool = False
    transformers: bool = False


LAYOUTS: dict[str, Layout] = {
    "llama": Layout(permute_qk=True, transformers=True),
    "qwen2": Layout(transformers=True),
    "qwen3": Layout(transformers=True),
    "qwen3moe": Layout(transformers=True),
    "phi3": Layout(transformers=True),
    "gemma2": Layout(norm_plus_one=True, output="tied", transformers=True),
    "gemma3": Layout(norm_plus_one=True, output="tied", transformers=True),
    "olmo2": Layout(output="required"),
    "olmoe": Layout(output="required"),
    "granite": Layout(permute_qk=True),
    "cohere2": Layout(output="tied", layer_norm=True),
}
"""llama.cpp architectures GGUF export writes (``Family.gguf`` of each supported family)."""

_SWA_PERIOD = {"gemma2": 2, "gemma3": 6}
"""llama.cpp's fixed sliding-window period: layer ``i`` is sliding unless ``i % p == p - 1``."""


def _raw_config(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))


def text_config(config: dict) -> dict:
    """The decoder's config (a multimodal wrapper's ``text_config``, with the wrapper's ids)."""
    text = config.get("text_config")
    if not isinstance(text, dict):
        return config
    merged = {k: v for k, v in config.items() if k.endswith("_token_id") or k == "tie_word_embeddings"}
    return {**merged, **text}


def _rope_params(config: dict, layer_type: str = "full_attention") -> dict:
    """The rope parameters of ``layer_type`` layers (transformers 5 nests them per layer type for gemma3)."""
    params = config.get("rope_parameters")
    if isinstance(params, dict) and isinstance(params.get(layer_type), dict):
        return params[layer_type]
    if isinstance(params, dict) and params:
        return params
    legacy = dict(config.get("rope_scaling") or {})
    legacy.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    return legacy


def _rope_theta(config: dict, layer_type: str = "full_attention") -> float:
    return float(_rope_params(config, layer_type).get("rope_theta", config.get("rope_theta", 10000.0)))


def _rope_scaling(config: dict, layer_type: str = "full_attention") -> dict | None:
    """The rope scaling the config asks for beyond the default (None: plain rotary)."""
    params = _rope_params(config, layer_type)
    kind = params.get("rope_type", params.get("type", "default"))
    return None if kind in ("default", None) else params


def _head_dim(config: dict) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def _n_experts(config: dict) -> int:
    return int(config.get("num_local_experts") or config.get("num_experts") or 0)


def _swa_period(layer_types: list) -> int | None:
    """The period ``p`` with layer ``i`` sliding unless ``i % p == p - 1`` (None: no such period)."""
    n = len(layer_types)
    for p in range(1, n + 2):
        if all((t == "sliding_attention") == (i % p < p - 1) for i, t in enumerate(layer_types)):
            return p
    return None


def _refuse(model_type: str, why: str, fix: str = "export --format checkpoint or peft") -> CdeltaError:
    return CdeltaError(f"GGUF export of this {model_type} model: {why}", fix)


def check_config(config: dict) -> tuple[str, Layout]:
    """llama.cpp's architecture and layout for ``config`` (a checkpoint's config.json), or a
    one-line ``CdeltaError`` naming what llama.cpp's graph for it cannot express."""
    config = text_config(config)
    model_type = config.get("model_type")
    fam = FAMILIES.get(model_type)
    if fam is None or not fam.gguf:
        raise CdeltaError(f"GGUF export does not know the {model_type!r} family",
                          f"supported: {', '.join(GGUF_FAMILIES)}; export --format checkpoint or peft")
    arch = fam.gguf
    layout = LAYOUTS[arch]
    scaling = _rope_scaling(config)
    if scaling is not None and scaling.get("rope_type", scaling.get("type")) != "linear":
        raise _refuse(model_type, f"rope scaling {scaling.get('rope_type', scaling.get('type'))!r} is not written here "
                      "(only linear)")
    heads, head_dim = int(config["num_attention_heads"]), _head_dim(config)
    kv_heads = int(config.get("num_key_value_heads") or heads)
    if fam.moe:
        if arch == "qwen3moe":
            if config.get("mlp_only_layers") or int(config.get("decoder_sparse_step", 1)) != 1:
                raise _refuse(model_type, "it has dense MLP layers (mlp_only_layers / decoder_sparse_step), and "
                              "llama.cpp's qwen3moe routes every layer")
            if not config.get("norm_topk_prob", False):
                raise _refuse(model_type, "norm_topk_prob is false, and llama.cpp's qwen3moe always renormalises "
                              "the chosen experts' weights")
        if arch == "olmoe":
            if config.get("norm_topk_prob", False):
                raise _refuse(model_type, "norm_topk_prob is true, and llama.cpp's olmoe never renormalises "
                              "the chosen experts' weights")
            if kv_heads != heads:
                raise _refuse(model_type, f"it has {kv_heads} key/value heads for {heads} query heads, and "
                              "llama.cpp's olmoe expects k_norm over all heads (no grouped-query attention)")
            if config.get("clip_qkv"):
                raise _refuse(model_type, "clip_qkv is set, and llama.cpp's olmoe does not clip q/k/v")
    if arch in _SWA_PERIOD:
        period = _SWA_PERIOD[arch]
        wanted = ["full_attention" if i % period == period - 1 else "sliding_attention"
                  for i in range(int(config["num_hidden_layers"]))]
        if config.get("layer_types") and list(config["layer_types"]) != wanted:
            raise _refuse(model_type, f"its sliding-window layers differ from llama.cpp's fixed {arch} layout "
                          f"(every layer sliding but each {period}th)")
        scalar = config.get("query_pre_attn_scalar", head_dim)
        big = int(config["num_hidden_layers"]) == {"gemma2": 46, "gemma3": 62}[arch]
        if scalar != (config["hidden_size"] // heads if big else head_dim):
            raise _refuse(model_type, f"query_pre_attn_scalar {scalar} is not the one llama.cpp derives for "
                          f"{arch} (head_dim {head_dim})")
        if arch == "gemma3":
            local = _rope_params(config, "sliding_attention")
            if _rope_theta(config, "sliding_attention") != 10000.0 or local.get("rope_type", "default") != "default":
                raise _refuse(model_type, "its sliding layers' rope is not llama.cpp's fixed one (theta 10000, unscaled)")
            if config.get("attn_logit_softcapping") or config.get("final_logit_softcapping"):
                raise _refuse(model_type, "it soft-caps logits, which llama.cpp's gemma3 does not")
    if arch == "cohere2" and _swa_period(list(config.get("layer_types") or [])) is None:
        raise _refuse(model_type, "its sliding-window layers are not periodic (llama.cpp reads one period)")
    if arch in ("olmo2", "olmoe") and head_dim != config["hidden_size"] // heads:
        raise _refuse(model_type, f"head_dim {head_dim} is not hidden_size / heads, which llama.cpp's {arch} assumes")
    return arch, layout


def _pre_tokenizer(tokenizer_json: dict, model_type: str) -> str:
    """llama.cpp's name of the tokenizer's pre-tokenization (``tokenizer.ggml.pre``)."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre else []
    kinds = [p.get("type") for p in parts]
    pattern = next((str((p.get("pattern") or {}).get("Regex", "")) for p in parts if p.get("type") == "Split"), "")
    if "Split" in kinds and r"\p{N}{1,3}" in pattern and "(?i:'s" in pattern:
        return "llama-bpe"
    if "Split" in kinds and r"\p{N}| ?" in pattern or model_type in ("qwen2", "qwen3", "qwen3_moe") and "Split" in kinds:
        return "qwen2"
    if kinds == ["Digits", "ByteLevel"] and any(p.get("individual_digits") for p in parts):
        return "smollm"
    return "gpt-2" if kinds == ["ByteLevel"] else "default"


def _write_tokenizer(writer, checkpoint: Path, model_type: str, pre: str | None = None) -> None:
    """Vocabulary, special ids and chat template: llama.cpp's ``gpt2`` model for a byte-level BPE,
    its ``llama`` (SentencePiece) model for a BPE with byte fallback (``_sentencepiece``)."""
    import gguf
    from transformers import AutoTokenizer

    path = checkpoint / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    model = data.get("model") or {}
    if model.get("type") != "BPE" or "merges" not in model:
        raise CdeltaError(f"GGUF export writes BPE tokenizers (byte-level or SentencePiece-style) from tokenizer.json; "
                          f"{checkpoint} has a {model.get('type', 'missing')} tokenizer",
                          "export --format checkpoint or peft, or convert the checkpoint with llama.cpp's convert_hf_to_gguf.py")
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    vocab = tokenizer.get_vocab()
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for token, index in vocab.items():
        tokens[index], types[index] = token, gguf.TokenType.NORMAL
    for added in data.get("added_tokens", []):
        if added["id"] < size:
            types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    if model.get("byte_fallback"):
        _sentencepiece(writer, data, tokens, types, merges, tokenizer)
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre or _pre_tokenizer(data, model_type))
        writer.add_token_list(tokens)
        writer.add_token_types([int(t) for t in types])
        writer.add_token_merges(merges)
    for attr, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                      ("pad_token_id", writer.add_pad_token_id), ("unk_token_id", writer.add_unk_token_id)):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            add(int(value))
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)) and tokenizer.bos_token_id is not None)
    if model.get("byte_fallback"):
        writer.add_add_eos_token(bool(getattr(tokenizer, "add_eos_token", False)) and tokenizer.eos_token_id is not None)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else tokenizer.chat_template)


_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _sentencepiece(writer, data: dict, tokens: list, types: list, merges: list, tokenizer) -> None:
    """llama.cpp's SentencePiece (``llama``) vocabulary from the BPE-with-byte-fallback form HF keeps it in.

    llama.cpp merges the adjacent pair whose joined piece scores highest; HF merges the pair that
    comes first in ``merges``. A piece scores minus the rank of the first merge that makes it, so
    both pick the same pairs (pieces no merge makes, single characters and bytes, score 0: they are
    never the result of a merge). ``<0xXX>`` pieces are llama.cpp's byte tokens; the unknown token
    is its UNKNOWN. A space before the first word (``add_space_prefix``) is llama.cpp's default;
    it is written as the tokenizer's normalizer or pre-tokenizer says (Gemma adds none).
    """
    import gguf

    rank: dict[str, int] = {}
    for index, merge in enumerate(merges):
        left, _, right = merge.partition(" ")
        rank.setdefault(left + right, index)
    scores = [0.0] * len(tokens)
    for index, token in enumerate(tokens):
        if types[index] == gguf.TokenType.NORMAL and _BYTE_TOKEN.fullmatch(token):
            types[index] = gguf.TokenType.BYTE
        elif types[index] == gguf.TokenType.NORMAL and token in rank:
            scores[index] = -float(rank[token] + 1)
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and unk < len(types):
        types[unk] = gguf.TokenType.UNKNOWN
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types([int(t) for t in types])
    writer.add_add_space_prefix(_adds_space_prefix(data))


def _adds_space_prefix(data: dict) -> bool:
    """Whether the tokenizer puts ``▁`` before the first word (a ``Prepend`` normalizer, or a
    ``Metaspace`` pre-tokenizer that prepends)."""
    def parts(node, key):
        if not node:
            return []
        return [p for child in node.get(key, []) for p in parts(child, key)] if "Sequence" in node.get("type", "") else [node]

    if any(p.get("type") == "Prepend" and p.get("prepend") == "\u2581" for p in parts(data.get("normalizer"), "normalizers")):
        return True
    return any(p.get("type") == "Metaspace" and p.get("prepend_scheme", "always" if p.get("add_prefix_space", True) else "never")
               in ("first", "always") for p in parts(data.get("pre_tokenizer"), "pretokenizers"))


def _hyperparameters(writer, config: dict, arch: str, layout: Layout) -> None:
    import gguf

    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = _head_dim(config)
    n_layers = int(config["num_hidden_layers"])
    writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(int(hidden))
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(int(heads))
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or heads))
    if layout.layer_norm:
        writer.add_layer_norm_eps(float(config.get("layer_norm_eps", 1e-5)))
    else:
        writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_vocab_size(int(config["vocab_size"]))
    partial = float(_rope_params(config).get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)))
    writer.add_rope_dimension_count(int(head_dim * partial))
    writer.add_key_length(int(head_dim))
    writer.add_value_length(int(head_dim))
    scaling = _rope_scaling(config)
    if scaling is not None:  # linear (check_config refuses the others)
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    if experts := _n_experts(config):
        writer.add_expert_count(experts)
        writer.add_expert_used_count(int(config["num_experts_per_tok"]))
        if config.get("moe_intermediate_size"):
            writer.add_expert_feed_forward_length(int(config["moe_intermediate_size"]))
    if arch == "granite":
        writer.add_attention_scale(float(config.get("attention_multiplier", head_dim**-0.5)))
        writer.add_embedding_scale(float(config.get("embedding_multiplier", 1.0)))
        writer.add_residual_scale(float(config.get("residual_multiplier", 1.0)))
        writer.add_logit_scale(float(config.get("logits_scaling", 1.0)))
    elif arch == "cohere2":
        writer.add_logit_scale(float(config.get("logit_scale", 1.0)))
        writer.add_sliding_window(int(config["sliding_window"]))
        writer.add_sliding_window_pattern(int(_swa_period(list(config["layer_types"]))))
    elif arch in ("gemma2", "gemma3"):
        writer.add_sliding_window(int(config.get("sliding_window") or 0))
        if arch == "gemma2":
            writer.add_attn_logit_softcapping(float(config.get("attn_logit_softcapping") or 0.0))
            writer.add_final_logit_softcapping(float(config.get("final_logit_softcapping") or 0.0))
    elif arch == "phi3":
        writer.add_rope_scaling_orig_ctx_len(int(config.get("original_max_position_embeddings")
                                                 or config.get("max_position_embeddings", 4096)))
        if config.get("sliding_window"):
            writer.add_sliding_window(int(config["sliding_window"]))


_EXPERT = re.compile(r"^(?P<block>.+)\.experts\.(?P<e>\d+)\.(?P<proj>\w+)\.weight$")
_MULTIMODAL_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
                        ("language_model.lm_head.", "lm_head."))


def _decoder_tensors(tensors: dict, multimodal: bool) -> dict:
    """A multimodal checkpoint's decoder tensors under the plain decoder's names (vision towers dropped)."""
    if not multimodal:
        return tensors
    out = {}
    for name, value in tensors.items():
        for old, new in _MULTIMODAL_PREFIXES:
            if name.startswith(old):
                out[new + name[len(old):]] = value
                break
        else:
            if name == "lm_head.weight":
                out[name] = value
    return out


def stack_experts(tensors: dict) -> dict:
    """Per-expert matrices (``….experts.{e}.{proj}.weight``, as checkpoints store them) stacked into
    one ``….experts.{proj}.weight`` [n_experts, out, in] each; transformers' fused in-memory form
    (``….experts.gate_up_proj`` [n_experts, 2·d_expert, d_model]) is split into gate and up."""
    import torch

    groups: dict[tuple[str, str], dict[int, object]] = {}
    out = {}
    for name, value in tensors.items():
        match = _EXPERT.match(name)
        if match:
            groups.setdefault((match["block"], match["proj"]), {})[int(match["e"])] = value
        else:
            out[name] = value
    for (block, proj), experts in groups.items():
        if sorted(experts) != list(range(len(experts))):
            raise CdeltaError(f"GGUF export: the experts of {block} are not numbered 0..{len(experts) - 1}",
                              "export --format checkpoint")
        out[f"{block}.experts.{proj}.weight"] = torch.stack([experts[e] for e in range(len(experts))])
    for name in [n for n in out if n.endswith(".experts.gate_up_proj")]:
        gate, up = out.pop(name).chunk(2, dim=1)
        stem = name[: -len("gate_up_proj")]
        out[stem + "gate_proj.weight"], out[stem + "up_proj.weight"] = gate, up
    for name in [n for n in out if n.endswith(".experts.down_proj")]:
        out[name + ".weight"] = out.pop(name)
    return out


def write_gguf(checkpoint: Path, out_file: Path, gguf_type: str = "f16", name: str | None = None, pre: str | None = None) -> dict:
    """Write ``checkpoint`` (a safetensors HF directory) as one GGUF file; returns a summary.

    ``gguf_type``: ``f32``, ``f16`` or ``q8_0`` (matrices; 1-D tensors stay F32); ``pre``: llama.cpp's
    pre-tokenizer name (default: recognized from tokenizer.json). CdeltaError for a family, a
    configuration or a tokenizer llama.cpp's layout is not written for here.
    """
    import gguf
    import torch
    from safetensors.torch import load_file

    from cdelta.io import disk_errors

    checkpoint, out_file = Path(checkpoint), Path(out_file)
    if gguf_type not in GGUF_TYPES:
        raise CdeltaError(f"unknown GGUF type {gguf_type!r}", f"use one of: {', '.join(GGUF_TYPES)}")
    raw = _raw_config(checkpoint)
    arch, layout = check_config(raw)
    config = text_config(raw)
    model_type = config["model_type"]
    arch_id = next(key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == arch)
    n_layers = int(config["num_hidden_layers"])
    names = gguf.get_tensor_name_map(arch_id, n_layers)
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)

    tensors: dict[str, torch.Tensor] = {}
    for weights in sorted(checkpoint.glob("*.safetensors")):
        tensors.update(load_file(str(weights)))
    tensors = stack_experts(_decoder_tensors(tensors, "text_config" in raw))
    embed = tensors.get("model.embed_tokens.weight")
    tied = bool(raw.get("tie_word_embeddings", config.get("tie_word_embeddings", False)))
    if tied:
        tensors.pop("lm_head.weight", None)
    if layout.output == "tied" and "lm_head.weight" in tensors:
        if embed is None or not torch.equal(tensors["lm_head.weight"], embed):
            raise _refuse(model_type, f"its lm_head differs from its embeddings, and llama.cpp's {arch} always "
                          "uses the embeddings as the output layer")
        tensors.pop("lm_head.weight")
    if layout.output == "required" and "lm_head.weight" not in tensors and embed is not None:
        tensors["lm_head.weight"] = embed  # llama.cpp's olmo2/olmoe load output.weight unconditionally
    for bias in [n for n in tensors if arch == "cohere2" and n.endswith(".bias")]:
        if bool(tensors[bias].any()):
            raise _refuse(model_type, f"{bias} is not zero, and llama.cpp's cohere2 has no biases")
        tensors.pop(bias)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type]

    mapped_names = {}
    for hf_name in sorted(tensors):
        stem, _, suffix = hf_name.rpartition(".")
        mapped = names.get_name(stem)
        if mapped is None:
            if hf_name.endswith("rotary_emb.inv_freq"):
                continue
            raise CdeltaError(f"GGUF export: no llama.cpp {arch} tensor for {hf_name} ({model_type})", "export --format checkpoint or peft")
        mapped_names[hf_name] = f"{mapped}.{suffix}"

    tmp = out_file.with_name(f".{out_file.name}.tmp")
    counts: dict[str, int] = {}
    with disk_errors(f"writing {out_file}"):
        writer = gguf.GGUFWriter(str(tmp), arch)
        writer.add_name(name or checkpoint.name)
        writer.add_file_type(int(file_type))
        if gguf_type == "q8_0":
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _hyperparameters(writer, config, arch, layout)
        _write_tokenizer(writer, checkpoint, model_type, pre)
        out_file.parent.mkdir(parents=True, exist_ok=True)
        for hf_name, gguf_name in mapped_names.items():
            data = tensors[hf_name].float().numpy()
            if layout.permute_qk and hf_name.endswith("self_attn.q_proj.weight"):
                data = _permute_rotary(data, heads)
            elif layout.permute_qk and hf_name.endswith("self_attn.k_proj.weight"):
                data = _permute_rotary(data, kv_heads)
            if layout.norm_plus_one and hf_name.endswith("norm.weight"):
                data = data + 1.0
            data, qtype = _encode(np.ascontiguousarray(data, dtype=np.float32), gguf_type)
            counts[qtype.name] = counts.get(qtype.name, 0) + 1
            writer.add_tensor(gguf_name, data, raw_dtype=qtype)
        try:
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
            tmp.replace(out_file)
        finally:
            tmp.unlink(missing_ok=True)
    transformers = layout.transformers and not (arch == "llama" and _n_experts(config))
    return {"file": str(out_file), "architecture": arch, "gguf_type": gguf_type, "tensor_types": counts,
            "bytes": out_file.stat().st_size, "transformers": transformers}


def _permute_rotary(weight: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotary halves → llama.cpp's interleaved pairs, per head (rows of q_proj/k_proj)."""
    head_dim = weight.shape[0] // n_head
    return weight.reshape(n_head, 2, head_dim // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _encode(data: np.ndarray, gguf_type: str):
    """``(array, GGMLQuantizationType)`` of one tensor in the file's type (1-D: F32)."""
    import gguf

    T = gguf.GGMLQuantizationType
    if data.ndim == 1 or gguf_type == "f32":
        return data, T.F32
    if gguf_type == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[T.Q8_0][0] == 0:
        return gguf.quants.quantize(data, T.Q8_0), T.Q8_0
    return data.astype(np.float16), T.F16
