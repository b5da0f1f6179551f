"""A GGUF file (llama.cpp, Ollama, LM Studio) of a Hugging Face checkpoint, written with the ``gguf`` package.

Tensor names come from the package's own HF → GGUF map (``gguf.get_tensor_name_map``) and the
metadata keys from its ``GGUFWriter`` methods, so they are llama.cpp's. What llama.cpp's converter
does to the values, and what is undone on reading (transformers' GGUF loader undoes the same):

* llama and mistral (``llama`` architecture): the rows of ``q_proj``/``k_proj`` are reordered from
  the rotary halves HF uses to llama.cpp's interleaved pairs, per head;
* qwen2: no reordering (llama.cpp's rotary mode for qwen2 is the halves' one).

The tokenizer is written as llama.cpp's ``gpt2`` (byte-level BPE) vocabulary: SmolLM, Qwen2,
Llama 3 and the like. SentencePiece vocabularies (Llama 2, Mistral 7B, Gemma) need the scores of
their ``tokenizer.model`` and are refused, as are the Gemma families, whose GGUF layout differs.

1-D tensors (norms, biases) stay F32 whatever the file type, as llama.cpp keeps them; a matrix
whose rows do not split into Q8_0 blocks of 32 falls back to F16.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cdelta.errors import CdeltaError

GGUF_TYPES = ("f32", "f16", "q8_0")
GGUF_FAMILIES = ("llama", "mistral", "qwen2")
_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}


def _config(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))


def _rope_theta(config: dict) -> float:
    params = config.get("rope_parameters") or {}
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(config.get("rope_theta", 10000.0))


def _rope_scaling(config: dict) -> dict | None:
    """The rope scaling the config asks for beyond the default (None: plain rotary)."""
    for key in ("rope_scaling", "rope_parameters"):
        value = config.get(key)
        if isinstance(value, dict) and value.get("rope_type", value.get("type", "default")) not in ("default", None):
            return value
    return None


def _permute_rotary(weight: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotary halves → llama.cpp's interleaved pairs, per head (rows of q_proj/k_proj)."""
    head_dim = weight.shape[0] // n_head
    return weight.reshape(n_head, 2, head_dim // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _pre_tokenizer(tokenizer_json: dict, model_type: str) -> str:
    """llama.cpp's name of the tokenizer's pre-tokenization (``tokenizer.ggml.pre``)."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre else []
    kinds = [p.get("type") for p in parts]
    pattern = next((str((p.get("pattern") or {}).get("Regex", "")) for p in parts if p.get("type") == "Split"), "")
    if "Split" in kinds and r"\p{N}{1,3}" in pattern and "(?i:'s" in pattern:
        return "llama-bpe"
    if "Split" in kinds and r"\p{N}| ?" in pattern or model_type == "qwen2" and "Split" in kinds:
        return "qwen2"
    if kinds == ["Digits", "ByteLevel"] and any(p.get("individual_digits") for p in parts):
        return "smollm"
    return "gpt-2" if kinds == ["ByteLevel"] else "default"


def _write_tokenizer(writer, checkpoint: Path, model_type: str, pre: str | None = None) -> None:
    """Vocabulary, merges, special ids and chat template of a byte-level BPE tokenizer."""
    import gguf
    from transformers import AutoTokenizer

    path = checkpoint / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    model = data.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or "merges" not in model:
        raise CdeltaError(f"GGUF export supports byte-level BPE tokenizers only; {checkpoint} has a "
                          f"{model.get('type', 'missing')} tokenizer{' with byte fallback' if model.get('byte_fallback') else ''}",
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
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else tokenizer.chat_template)


def _hyperparameters(writer, config: dict, model_type: str) -> None:
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(int(hidden))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(int(heads))
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or heads))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_vocab_size(int(config["vocab_size"]))
    if model_type in ("llama", "mistral"):
        writer.add_rope_dimension_count(int(head_dim))
    if head_dim != hidden // heads:
        writer.add_key_length(int(head_dim))
        writer.add_value_length(int(head_dim))
    scaling = _rope_scaling(config)
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind != "linear":
            raise CdeltaError(f"GGUF export does not support rope scaling {kind!r}", "export --format checkpoint or peft")
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))


def write_gguf(checkpoint: Path, out_file: Path, gguf_type: str = "f16", name: str | None = None, pre: str | None = None) -> dict:
    """Write ``checkpoint`` (a safetensors HF directory) as one GGUF file; returns a summary.

    ``gguf_type``: ``f32``, ``f16`` or ``q8_0`` (matrices; 1-D tensors stay F32); ``pre``: llama.cpp's
    pre-tokenizer name (default: recognized from tokenizer.json). CdeltaError for a family or
    tokenizer llama.cpp's layout is not written for here.
    """
    import gguf
    import torch
    from safetensors.torch import load_file

    from cdelta.io import disk_errors

    checkpoint, out_file = Path(checkpoint), Path(out_file)
    if gguf_type not in GGUF_TYPES:
        raise CdeltaError(f"unknown GGUF type {gguf_type!r}", f"use one of: {', '.join(GGUF_TYPES)}")
    config = _config(checkpoint)
    model_type = config.get("model_type")
    if model_type not in _ARCH:
        raise CdeltaError(f"GGUF export does not know the {model_type!r} family", f"supported: {', '.join(GGUF_FAMILIES)}; "
                          "export --format checkpoint or peft")
    arch_name = _ARCH[model_type]
    arch = next(key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == arch_name)
    n_layers = int(config["num_hidden_layers"])
    names = gguf.get_tensor_name_map(arch, n_layers)
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]

    tensors: dict[str, torch.Tensor] = {}
    for weights in sorted(checkpoint.glob("*.safetensors")):
        tensors.update(load_file(str(weights)))
    if config.get("tie_word_embeddings"):
        tensors.pop("lm_head.weight", None)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type]

    tmp = out_file.with_name(f".{out_file.name}.tmp")
    counts: dict[str, int] = {}
    with disk_errors(f"writing {out_file}"):
        out_file.parent.mkdir(parents=True, exist_ok=True)
        writer = gguf.GGUFWriter(str(tmp), arch_name)
        writer.add_name(name or checkpoint.name)
        writer.add_file_type(int(file_type))
        if gguf_type == "q8_0":
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _hyperparameters(writer, config, model_type)
        _write_tokenizer(writer, checkpoint, model_type, pre)
        for hf_name in sorted(tensors):
            stem, _, suffix = hf_name.rpartition(".")
            mapped = names.get_name(stem)
            if mapped is None:
                if hf_name.endswith("rotary_emb.inv_freq"):
                    continue
                raise CdeltaError(f"GGUF export: no llama.cpp name for tensor {hf_name} ({model_type})", "export --format checkpoint or peft")
            data = tensors[hf_name].float().numpy()
            if arch_name == "llama" and stem.endswith("self_attn.q_proj"):
                data = _permute_rotary(data, heads)
            elif arch_name == "llama" and stem.endswith("self_attn.k_proj"):
                data = _permute_rotary(data, kv_heads)
            data, qtype = _encode(np.ascontiguousarray(data, dtype=np.float32), gguf_type)
            counts[qtype.name] = counts.get(qtype.name, 0) + 1
            writer.add_tensor(f"{mapped}.{suffix}", data, raw_dtype=qtype)
        try:
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
            tmp.replace(out_file)
        finally:
            tmp.unlink(missing_ok=True)
    return {"file": str(out_file), "architecture": arch_name, "gguf_type": gguf_type, "tensor_types": counts,
            "bytes": out_file.stat().st_size}


def _encode(data: np.ndarray, gguf_type: str):
    """``(array, GGMLQuantizationType)`` of one tensor in the file's type (1-D: F32)."""
    import gguf

    T = gguf.GGMLQuantizationType
    if data.ndim == 1 or gguf_type == "f32":
        return data, T.F32
    if gguf_type == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[T.Q8_0][0] == 0:
        return gguf.quants.quantize(data, T.Q8_0), T.Q8_0
    return data.astype(np.float16), T.F16
