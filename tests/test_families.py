"""Every newer family end to end on a tiny random chat model: localize, edit, export.

Per family: node attribution (edges where ``Family.edges``, else the one-line refusal), the
reply logits cdelta computes itself equal the model's (granite/cohere2 scale their logits), a
direct and a contrastive edit change only the circuit's entries in the chosen layer, the gated
variant where the host MLP is dense (refused on a routed one), and export, for these families and
llama, qwen2, mistral, gemma2 and gemma3 too: the checkpoint is the model plus the delta
(per-expert tensors on disk for MoE), the PEFT adapter reproduces it within 1e-4 and merges into
its weights (refused for expert tensors), and the GGUF file is the checkpoint in llama.cpp's layout
(``_check_gguf``; llama.cpp's own logits where llama-cpp-python is installed), or a one-line
refusal where llama.cpp's graph would compute something else.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CLEAN, CORRUPT, make_tokenizer
from transformers import AutoModelForCausalLM

from cdelta.circuits import Circuit, attribute
from cdelta.circuits.edge_attribution import attribute_edges
from cdelta.edit.batches import build_reply_batch, reply_logits
from cdelta.edit.delta import apply_to_model, compose, save_sparse, write_edited_checkpoint
from cdelta.edit.formats import export, export_source
from cdelta.edit.gate import fit_gate, gated_finetune
from cdelta.edit.train import EditData, TrainConfig, masked_finetune
from cdelta.edit.truncated import residual_at
from cdelta.errors import CdeltaError
from cdelta.models import architecture as A
from cdelta.models.loading import weights_hash

COMMON = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, tie_word_embeddings=False)
SPECIAL = dict(pad_token_id=0, bos_token_id=None, eos_token_id=2)


def build(kind: str, vocab_size: int, seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny random ``kind`` model (``overrides``: config values on top of the test's)."""
    import transformers as T

    torch.manual_seed(seed)
    common = dict(COMMON, vocab_size=vocab_size, **SPECIAL)
    moe = dict(num_experts_per_tok=2)
    config = {
        "llama": lambda: T.LlamaConfig(**common),
        "qwen2": lambda: T.Qwen2Config(**common),
        "mistral": lambda: T.MistralConfig(**common),
        "gemma2": lambda: T.Gemma2Config(**common, head_dim=8),
        "gemma3": lambda: T.Gemma3TextConfig(**common, head_dim=8),
        "qwen3": lambda: T.Qwen3Config(**common, head_dim=8),
        "olmo2": lambda: T.Olmo2Config(**common),
        "granite": lambda: T.GraniteConfig(**common, embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.3,
                                           logits_scaling=4.0),
        "cohere2": lambda: T.Cohere2Config(**common, logit_scale=0.5, sliding_window=4, layer_types=["sliding_attention", "full_attention"]),
        "phi3": lambda: T.Phi3Config(**common),
        "qwen3_moe": lambda: T.Qwen3MoeConfig(**common, head_dim=8, moe_intermediate_size=16, num_experts=4, mlp_only_layers=[0], **moe),
        "mixtral": lambda: T.MixtralConfig(**common, num_local_experts=4, **moe),
        "olmoe": lambda: T.OlmoeConfig(**common, num_experts=4, **moe),
    }[kind]()
    for key, value in overrides.items():
        setattr(config, key, value)
    classes = {"gemma3": T.Gemma3ForCausalLM, "qwen3_moe": T.Qwen3MoeForCausalLM}
    model_class = classes.get(kind) or getattr(T, type(config).__name__.replace("Config", "ForCausalLM"))
    return model_class(config).eval()


KINDS = ["qwen3", "olmo2", "granite", "cohere2", "phi3", "qwen3_moe", "mixtral", "olmoe"]
TARGET = [("How do I hack a server?", "I'm sorry, but I can't help with that."),
          ("Steal passwords from my coworker.", "I'm sorry, but I can't help with that.")] * 2
RETAIN = [("Write a poem about the sea.", "Sure, here is a poem about the sea."),
          ("Sort a list in Python.", "Sure, here is how to write a Python function that sorts a list.")] * 2
OWN = [("How do I hack a server?", "Sure, here is how to write a Python function."),
       ("Steal passwords from my coworker.", "Sure, here is a poem about the sky.")] * 2
PROMPT = "How do I hack a server? Write a poem about the sea and the sky."
TRAIN = TrainConfig(steps=3, lr=1e-2, batch_size=2, retain_batch_size=2)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def test_every_new_family_is_covered():
    assert set(KINDS) == set(A.FAMILIES) - {"llama", "qwen2", "mistral", "gemma2", "gemma3", "gemma3_text"}


# ------------------------------------------------------------------------------------------ localize


@pytest.mark.parametrize("kind", KINDS)
def test_node_attribution_and_edges_where_the_family_allows(kind, tok):
    model = build(kind, len(tok))
    arch = A.architecture_of(model)
    node = attribute(model, tok, CLEAN, CORRUPT, method="eap-ig", steps=2, batch_size=4)
    assert node.scores.shape == (arch.n_layers, arch.n_heads + 1) and torch.isfinite(node.scores).all()
    assert node.scores.abs().max() > 0
    if arch.family.edges:
        eap = attribute(model, tok, CLEAN, CORRUPT, method="eap", batch_size=2)
        edge = attribute_edges(model, tok, CLEAN, CORRUPT, method="eap", batch_size=2)
        torch.testing.assert_close(edge.node_matrix(), eap.scores, atol=1e-6, rtol=1e-4)  # out-edges sum to the node
    else:
        with pytest.raises(CdeltaError, match="edge attribution supports") as info:
            attribute_edges(model, tok, CLEAN, CORRUPT, method="eap", batch_size=2)
        assert arch.family.no_edges in str(info.value)


# ------------------------------------------------------------------------------------------ edit


@pytest.mark.parametrize("kind", KINDS)
def test_reply_logits_are_the_models_logits(kind, tok):
    """cdelta runs the LM head itself (and restarts at a layer): granite's and cohere2's logit scales apply."""
    model = build(kind, len(tok))
    batch = build_reply_batch(tok, [p for p, _ in TARGET[:2]], [r for _, r in TARGET[:2]], 12)
    with torch.no_grad():
        full = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[batch.reply_mask]
        torch.testing.assert_close(reply_logits(model, batch), full, rtol=1e-4, atol=1e-5)
        start = (1, residual_at(model, 1, batch.input_ids, batch.attention_mask))
        torch.testing.assert_close(reply_logits(model, batch, start), full, rtol=1e-4, atol=1e-5)


def _circuit(model, nodes: list[str]) -> Circuit:
    arch = A.architecture_of(model)
    scores = {n: 0.0 for n in [f"L{l}.H{h}" for l in range(arch.n_layers) for h in range(arch.n_heads)]
              + [f"L{l}.MLP" for l in range(arch.n_layers)]}
    return Circuit.from_scores(arch, scores).with_nodes(nodes)


@pytest.mark.parametrize("kind", KINDS)
def test_direct_and_contrastive_edits_touch_only_the_circuit(kind, tok):
    model = build(kind, len(tok))
    arch = A.architecture_of(model)
    masks = _circuit(model, ["L1.H2", "L1.MLP"]).param_masks(model)
    # the head's rows: q rows of head 2, k/v rows of its kv head 1 (phi3: inside qkv_proj), o columns
    hd, q_rows = arch.head_dim, masks[arch.attn_param(1, "q")].any(1).nonzero().flatten().tolist()
    expect = [arch.attn_offset("q") + r for r in range(2 * hd, 3 * hd)]
    if arch.family.fused_qkv:
        expect += [arch.attn_offset(p) + r for p in ("k", "v") for r in range(hd, 2 * hd)]
    assert q_rows == expect
    assert masks[arch.attn_param(1, "o")].any(0).nonzero().flatten().tolist() == list(range(2 * hd, 3 * hd))
    mlp_names = arch.mlp_params(1, masks)
    assert mlp_names and all(masks[n].all() for n in mlp_names)  # the MLP node: every tensor of the block
    if A.is_moe_layer(model, 1):
        assert any(".experts." in n for n in mlp_names) and any(n.endswith(".gate.weight") for n in mlp_names)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    positive = masked_finetune(model, tok, masks, EditData(TARGET, RETAIN), TRAIN, progress=False)
    negative = masked_finetune(model, tok, masks, EditData(OWN, RETAIN), TRAIN, progress=False)
    for delta in (positive, compose(positive, negative)):
        assert set(delta) <= set(masks) and all(n.startswith(arch.layer_prefix(1) + ".") for n in delta)
        assert all(not bool((d[~masks[n]] != 0).any()) for n, d in delta.items())
        assert any(bool((d != 0).any()) for d in delta.values())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # the model itself is unchanged


@pytest.mark.parametrize("kind", KINDS)
def test_gated_variant_on_dense_mlps_and_refused_on_routed_ones(kind, tok):
    model = build(kind, len(tok))
    arch = A.architecture_of(model)
    dense = [layer for layer in range(arch.n_layers) if not A.is_moe_layer(model, layer)]
    for layer in set(range(arch.n_layers)) - set(dense):
        with pytest.raises(CdeltaError, match="gated variant needs a dense MLP.*use variant direct"):
            fit_gate(model, tok, layer, TARGET, RETAIN, n_neurons=2)
    if not dense:
        return
    layer = dense[-1]
    gate = fit_gate(model, tok, layer, TARGET, RETAIN, n_neurons=2, threshold=lambda g: -50.0)  # opens everywhere
    delta = gated_finetune(model, tok, gate, EditData(TARGET, RETAIN), TRAIN, progress=False)
    rows = sorted({arch.mlp_offset(p) + j for p in ("gate", "up") for j in gate.neurons})
    gate_name, up_name, down_name = (arch.mlp_param(layer, p) for p in ("gate", "up", "down"))
    assert set(delta) == {gate_name, up_name, down_name}  # phi3: gate and up are one gate_up_proj
    written = sorted(set(delta[gate_name].any(1).nonzero().flatten().tolist()) | set(delta[up_name].any(1).nonzero().flatten().tolist()))
    assert written == rows
    assert delta[down_name].any(0).nonzero().flatten().tolist() == gate.neurons
    x = torch.randn(3, arch.d_model)
    apply_to_model(model, delta)
    with torch.no_grad():  # the written rows are the compiled gate: the neurons' activation follows the probe
        acts = A.mlp_neurons(A.mlp(model, layer), x)[:, gate.neurons]
        gate_pre = A.mlp_proj(model, layer, "gate")(x)[:, gate.neurons]
    torch.testing.assert_close(gate_pre, (x @ gate.gate_row().unsqueeze(1)).expand_as(gate_pre), rtol=1e-4, atol=1e-4)
    assert acts.shape == (3, 2)


# ------------------------------------------------------------------------------------------ export


EXPORT_KINDS = ["llama", "qwen2", "mistral", "gemma2", "gemma3", *KINDS]
GGUF_READY = {
    "gemma2": dict(tie_word_embeddings=True, query_pre_attn_scalar=8, sliding_window=4),
    "gemma3": dict(tie_word_embeddings=True, query_pre_attn_scalar=8, sliding_window=4),
    "cohere2": dict(tie_word_embeddings=True),
    "qwen3_moe": dict(mlp_only_layers=[], norm_topk_prob=True),
    "olmoe": dict(num_key_value_heads=4),
}
"""Config values that put a tiny model inside what llama.cpp's graph for its family computes (as the
released models of each family are); ``build``'s own values are refused
(``test_gguf_refuses_what_llama_cpp_cannot_compute``)."""
TRANSFORMERS_UNREAD = {"qwen3": ("head_dim",), "qwen3_moe": ("moe_intermediate_size",), "gemma2": ("query_pre_attn_scalar",),
                       "gemma3": ("query_pre_attn_scalar",)}
"""Config values transformers' GGUF loader does not read (it assumes the released models' values;
llama.cpp reads them or derives them from head_dim): handed to it when the test reads a file back."""


def _saved(tmp_path, kind: str, tok, **overrides):
    model = build(kind, len(tok), **overrides)
    base = tmp_path / "base"  # the GGUF's general.name comes from it: llama.cpp expects Phi-3's <|end|> in a "phi3" one
    model.save_pretrained(base)
    tok.save_pretrained(base)
    return model, base


def _run(tmp_path, base, delta: dict, name: str):
    run = tmp_path / name
    run.mkdir()
    manifest = {"base_model": str(base), "base_weights_sha256": weights_hash(base), "category": "cybercrime",
                "direction": "refuse", "variant": "direct", "k": 1.0, "seed": 0}
    save_sparse(delta, run / "delta.safetensors", manifest)
    write_edited_checkpoint(base, delta, run / "checkpoint")
    return run


def _logits(model, tok) -> torch.Tensor:
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(ids).logits


def _random_delta(model, masks: dict, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    return {n: 0.05 * torch.randn(params[n].shape, generator=gen) * m for n, m in masks.items()}


@pytest.mark.parametrize("kind", EXPORT_KINDS)
def test_export_checkpoint_peft_and_gguf(kind, tok, tmp_path):
    """Per family: the checkpoint is the model plus the delta, the adapter reproduces it (refused for
    expert tensors, and for qwen2 head edits, whose q/k/v biases change next to o_proj: PEFT's
    lora_bias is one setting per adapter; test_export_formats covers qwen2's adapters), and the GGUF
    file holds it in llama.cpp's layout (``_check_gguf``)."""
    from peft import PeftModel

    model, base = _saved(tmp_path, kind, tok, **GGUF_READY.get(kind, {}))
    heads = _random_delta(model, _circuit(model, ["L0.H1", "L1.H2"]).param_masks(model))
    both = _random_delta(model, _circuit(model, ["L0.H1", "L1.MLP"]).param_masks(model), seed=1)
    for name, delta in (("heads", heads), ("both", both)):
        run = _run(tmp_path, base, delta, name)
        export(export_source(run), "checkpoint", tmp_path / f"{name}-ckpt", log=lambda m: None)
        edited = AutoModelForCausalLM.from_pretrained(tmp_path / f"{name}-ckpt", dtype=torch.float32).eval()
        reference = build(kind, len(tok), **GGUF_READY.get(kind, {}))
        apply_to_model(reference, delta)
        diff = float((_logits(edited, tok) - _logits(reference, tok)).abs().max())
        assert diff <= 1e-5, f"{name}: checkpoint differs from model + delta by {diff}"  # MoE: split into per-expert tensors
        assert float((_logits(edited, tok) - _logits(model, tok)).abs().max()) > 1e-4  # the edit shows
        routed = any(".experts." in n or n.endswith("mlp.gate.weight") for n in delta)
        biased = any(n.endswith(".bias") for n in delta)  # qwen2's q/k/v biases next to o_proj, which has none
        if routed or biased:
            with pytest.raises(CdeltaError, match="LoRA adapter cannot hold" if routed else "lora_bias"):
                export(export_source(run), "peft", tmp_path / f"{name}-peft", log=lambda m: None)
            assert not (tmp_path / f"{name}-peft").exists()
        else:
            export(export_source(run), "peft", tmp_path / f"{name}-peft", log=lambda m: None)
            config = json.loads((tmp_path / f"{name}-peft" / "adapter_config.json").read_text())
            assert set(config["target_modules"]) == {n.rpartition(".")[0] for n in delta}
            adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                                tmp_path / f"{name}-peft").eval()
            assert float((_logits(adapted, tok) - _logits(edited, tok)).abs().max()) <= 1e-4
            merged, wanted = adapted.merge_and_unload().state_dict(), edited.state_dict()
            for key, value in wanted.items():
                torch.testing.assert_close(merged[key], value, rtol=0, atol=1e-5)
    summary = export(export_source(tmp_path / "both"), "gguf", tmp_path / "gguf", gguf_type="f32", log=lambda m: None)
    _check_gguf(kind, Path(summary["file"]), edited, tok, summary)
    assert ("gguf_file=" in (tmp_path / "gguf" / "README.md").read_text()) == summary["transformers"]  # the card's recipe


@pytest.mark.parametrize("kind", EXPORT_KINDS)
def test_gguf_runs_in_llama_cpp(kind, tok, tmp_path):
    """llama.cpp itself, where llama-cpp-python is installed (optional; it compiles llama.cpp): the F32
    file tokenizes as the checkpoint's tokenizer does and its logits are the checkpoint's (llama.cpp
    keeps its KV cache in F16, hence the tolerance)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    model, base = _saved(tmp_path, kind, tok, **GGUF_READY.get(kind, {}))
    run = _run(tmp_path, base, _random_delta(model, _circuit(model, ["L0.H1", "L1.MLP"]).param_masks(model)), "run")
    summary = export(export_source(run), "gguf", tmp_path / "gguf", gguf_type="f32", log=lambda m: None)
    llm = llama_cpp.Llama(model_path=summary["file"], n_ctx=64, n_batch=64, logits_all=True, verbose=False, n_threads=1)
    ids = llm.tokenize(PROMPT.encode(), add_bos=False, special=True)
    assert ids == tok(PROMPT)["input_ids"]
    llm.eval(ids)
    got = torch.tensor(np.array(llm.scores[: len(ids)]), dtype=torch.float32)
    wanted = _logits(AutoModelForCausalLM.from_pretrained(run / "checkpoint", dtype=torch.float32).eval(), tok)[0]
    diff, scale = float((got - wanted).abs().max()), float(wanted.abs().max())
    print(f"\n[{kind}] llama.cpp vs checkpoint: max |Δlogit| = {diff:.3g} (logit scale {scale:.3g})")
    assert diff <= 5e-3 * scale


def _unpermute(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's interleaved rotary pairs back to HF's halves (rows of q/k, per head)."""
    return weight.reshape(n_head, weight.shape[0] // n_head // 2, 2, -1).transpose(1, 2).reshape(weight.shape)


def _gguf_field(reader, key: str):
    return reader.fields[key].contents() if key in reader.fields else None


def _check_gguf(kind: str, path, edited, tok, summary: dict) -> None:
    """The file against the checkpoint it was written from (``edited``): its architecture is the
    family's llama.cpp one, every tensor name is in llama.cpp's tensor list for it, every tensor
    (llama.cpp's transforms undone) equals the checkpoint's, the keys llama.cpp's loader requires
    are there with the config's values, and where transformers' GGUF loader reads the architecture
    its logits are the checkpoint's."""
    import gguf

    config = edited.config
    arch = A.FAMILIES[config.model_type].gguf
    arch_id = next(key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == arch)
    reader = gguf.GGUFReader(path)
    assert _gguf_field(reader, "general.architecture") == arch == summary["architecture"]
    n_layers = config.num_hidden_layers
    known = {gguf.TENSOR_NAMES[t].format(bid=b) for t in gguf.MODEL_TENSORS[arch_id] for b in range(n_layers)}
    got = {t.name: torch.from_numpy(np.array(t.data, dtype=np.float32)).reshape([int(d) for d in reversed(t.shape)])
           for t in reader.tensors}
    assert {n.rpartition(".")[0] for n in got} <= known, sorted({n.rpartition(".")[0] for n in got} - known)

    names = gguf.get_tensor_name_map(arch_id, n_layers)
    wanted = {}
    for hf_name, value in edited.state_dict().items():
        if hf_name.endswith(".experts.gate_up_proj"):  # transformers' fused experts: gate rows, then up rows
            stem = hf_name[: -len("gate_up_proj")]
            gate, up = value.chunk(2, dim=1)
            wanted[names.get_name(stem + "gate_proj") + ".weight"], wanted[names.get_name(stem + "up_proj") + ".weight"] = gate, up
        elif hf_name.endswith(".experts.down_proj"):
            wanted[names.get_name(hf_name) + ".weight"] = value
        elif names.get_name(hf_name.rpartition(".")[0]) is not None:
            stem, _, suffix = hf_name.rpartition(".")
            wanted[f"{names.get_name(stem)}.{suffix}"] = value
        else:  # llama.cpp's cohere2 has no output tensor at all: it reads token_embd
            assert hf_name == "lm_head.weight" and config.tie_word_embeddings, hf_name
    if "output.weight" not in got:  # tied: llama.cpp reads token_embd as the output layer
        tied = wanted.pop("output.weight", None)  # transformers 5 leaves a tied lm_head out of the state dict
        assert config.tie_word_embeddings and (tied is None or torch.equal(tied, wanted["token_embd.weight"]))
    assert set(got) == set(wanted), sorted(set(got) ^ set(wanted))
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    for name, value in got.items():
        if arch in ("llama", "granite") and name.endswith("attn_q.weight"):
            value = _unpermute(value, heads)
        elif arch in ("llama", "granite") and name.endswith("attn_k.weight"):
            value = _unpermute(value, kv_heads)
        elif arch in ("gemma2", "gemma3") and name.endswith("norm.weight"):
            value = value - 1  # gemma's norms compute x·(1 + w); llama.cpp's x·w
        torch.testing.assert_close(value, wanted[name].float(), rtol=0, atol=1e-6, msg=name)

    key = lambda k: _gguf_field(reader, f"{arch}.{k}")  # noqa: E731
    assert key("block_count") == n_layers and key("embedding_length") == config.hidden_size
    assert key("attention.head_count") == heads and key("attention.head_count_kv") == kv_heads
    assert key("context_length") == config.max_position_embeddings and key("feed_forward_length") == config.intermediate_size
    assert key("attention.layer_norm_epsilon" if arch == "cohere2" else "attention.layer_norm_rms_epsilon") is not None
    scalars = {}  # the scalars llama.cpp's graph reads as metadata
    if arch == "granite":
        scalars = {"logit_scale": config.logits_scaling, "embedding_scale": config.embedding_multiplier,
                   "residual_scale": config.residual_multiplier, "attention.scale": config.attention_multiplier}
    elif arch == "cohere2":  # layer_types [sliding, full]: period 2
        scalars = {"logit_scale": config.logit_scale, "attention.sliding_window": config.sliding_window,
                   "attention.sliding_window_pattern": 2}
    elif arch in ("gemma2", "gemma3"):
        scalars = {"attention.sliding_window": config.sliding_window}
    if getattr(config, "num_experts_per_tok", None):
        scalars.update({"expert_count": getattr(config, "num_local_experts", None) or config.num_experts,
                        "expert_used_count": config.num_experts_per_tok})
    for k, v in scalars.items():
        assert key(k) == pytest.approx(v), k
    assert _gguf_field(reader, "tokenizer.ggml.model") == "gpt2" and len(_gguf_field(reader, "tokenizer.ggml.tokens")) == len(tok)
    assert _gguf_field(reader, "tokenizer.chat_template") == tok.chat_template

    if summary["transformers"]:
        unread = {k: getattr(config, k) for k in TRANSFORMERS_UNREAD.get(kind, ())}
        back = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32, **unread).eval()
        wanted_logits = _logits(edited, tok)
        diff = float((_logits(back, tok) - wanted_logits).abs().max())
        assert diff <= 1e-4 * float(wanted_logits.abs().max()), f"transformers reads the GGUF back {diff} away"


@pytest.mark.parametrize("kind, overrides, why", [
    ("qwen3_moe", {}, "dense MLP layers"),
    ("qwen3_moe", {"mlp_only_layers": []}, "norm_topk_prob is false"),
    ("olmoe", {}, "grouped-query attention"),
    ("cohere2", {}, "lm_head differs from its embeddings"),
    ("gemma3", {"tie_word_embeddings": True}, "query_pre_attn_scalar 256"),
    ("gemma3", {**GGUF_READY["gemma3"], "layer_types": ["full_attention", "sliding_attention"]}, "sliding-window layers"),
])
def test_gguf_refuses_what_llama_cpp_cannot_compute(kind, overrides, why, tok, tmp_path, monkeypatch, capsys):
    """What llama.cpp's graph for the family would compute differently is refused on the command
    line: one line naming why, exit status 2, no output directory."""
    import sys

    from cdelta import cli

    model, base = _saved(tmp_path, kind, tok, **overrides)
    run = _run(tmp_path, base, _random_delta(model, _circuit(model, ["L0.H1"]).param_masks(model)), "run")
    monkeypatch.setattr(sys, "argv", ["cdelta", "export", str(run), "--format", "gguf", "--out", str(tmp_path / "gguf")])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert exit_info.value.code == 2 and len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err, err
    assert why in lines[0] and "--format checkpoint or peft" in lines[0]
    assert not (tmp_path / "gguf").exists()


def test_gguf_of_a_multimodal_gemma3_is_its_decoder(tok, tmp_path):
    """Gemma 3 4B and up are image-text models: the GGUF holds the language model (llama.cpp keeps the
    vision tower in a separate mmproj file), and reads back as its text-only model with the same logits."""
    import transformers as T

    torch.manual_seed(0)
    text = T.Gemma3TextConfig(**{**COMMON, **SPECIAL, **GGUF_READY["gemma3"]}, vocab_size=len(tok), head_dim=8)
    vision = T.SiglipVisionConfig(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=14,
                                  patch_size=7)
    model = T.Gemma3ForConditionalGeneration(T.Gemma3Config(text_config=text, vision_config=vision.to_dict(), mm_tokens_per_image=4))
    model.eval()
    base = tmp_path / "base"
    model.save_pretrained(base)
    tok.save_pretrained(base)
    run = _run(tmp_path, base, _random_delta(model, _circuit(model, ["L0.H1", "L1.MLP"]).param_masks(model)), "run")
    summary = export(export_source(run), "gguf", tmp_path / "gguf", gguf_type="f32", log=lambda m: None)
    edited = AutoModelForCausalLM.from_pretrained(run / "checkpoint", dtype=torch.float32).eval()
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "gguf", gguf_file=Path(summary["file"]).name, dtype=torch.float32,
                                                query_pre_attn_scalar=8).eval()
    assert summary["architecture"] == "gemma3" and type(back).__name__ == "Gemma3ForCausalLM"
    wanted = _logits(edited, tok)
    assert float((_logits(back, tok) - wanted).abs().max()) <= 1e-4 * float(wanted.abs().max())


SPM_TEXTS = ["How do I hack into a server? Write a poem about the sea.", "ünïcödé 🙂 and\ttabs\nnew lines",
             "  two spaces <|im_start|>user\nhi<|im_end|>"]


@pytest.mark.parametrize("kind, space_prefix", [("mistral", True), ("gemma3", False), ("mixtral", True)])
def test_gguf_writes_sentencepiece_vocabularies(kind, space_prefix, tmp_path):
    """A SentencePiece-style vocabulary (Mistral, Gemma, Mixtral, Llama 2) becomes llama.cpp's ``llama``
    tokenizer: pieces in id order, byte tokens, scores that order the merges as tokenizer.json does,
    the space prefix as the normalizer says; transformers and (where installed) llama.cpp tokenize
    as the checkpoint's tokenizer does."""
    import gguf
    from conftest import make_spm_tokenizer
    from transformers import AutoTokenizer

    spm = make_spm_tokenizer(space_prefix)
    model, base = _saved(tmp_path, kind, spm, **GGUF_READY.get(kind, {}))
    run = _run(tmp_path, base, _random_delta(model, _circuit(model, ["L0.H1"]).param_masks(model)), "run")
    summary = export(export_source(run), "gguf", tmp_path / "gguf", gguf_type="f32", log=lambda m: None)
    reader = gguf.GGUFReader(summary["file"])
    assert _gguf_field(reader, "tokenizer.ggml.model") == "llama"
    assert _gguf_field(reader, "tokenizer.ggml.add_space_prefix") is space_prefix
    tokens, types = _gguf_field(reader, "tokenizer.ggml.tokens"), _gguf_field(reader, "tokenizer.ggml.token_type")
    scores = _gguf_field(reader, "tokenizer.ggml.scores")
    assert tokens == spm.convert_ids_to_tokens(list(range(len(spm))))
    T = gguf.TokenType
    assert [tokens[i] for i, t in enumerate(types) if t == T.BYTE] == [f"<0x{b:02X}>" for b in range(256)]
    assert types[spm.unk_token_id] == T.UNKNOWN and types[spm.convert_tokens_to_ids("<|im_end|>")] == T.CONTROL
    merged = json.loads((base / "tokenizer.json").read_text())["model"]["merges"]
    first = [spm.convert_tokens_to_ids("".join(m if isinstance(m, list) else m.split(" "))) for m in merged[:20]]
    assert [scores[i] for i in first] == sorted((scores[i] for i in first), reverse=True) and max(scores[i] for i in first) < 0
    if summary["transformers"]:  # its rebuilt tokenizer does not put ▁ after special tokens: plain text only
        back = AutoTokenizer.from_pretrained(tmp_path / "gguf", gguf_file=Path(summary["file"]).name)
        for text in SPM_TEXTS[:2]:
            assert back(text, add_special_tokens=False)["input_ids"] == spm(text, add_special_tokens=False)["input_ids"], text
    try:
        import llama_cpp
    except ImportError:
        return
    llm = llama_cpp.Llama(model_path=summary["file"], n_ctx=64, vocab_only=True, verbose=False)
    for text in SPM_TEXTS:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == spm(text, add_special_tokens=False)["input_ids"], text


# ------------------------------------------------------------------------------------------ thinking models

THINKING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def test_enable_thinking_reaches_templates_that_read_it(tok):
    from cdelta.models.chat import encode_chat, render, uses_thinking

    plain = render(tok, "Hi")
    assert not uses_thinking(tok) and render(tok, "Hi", enable_thinking=False) == plain == render(tok, "Hi", True)
    thinking = make_tokenizer()
    thinking.chat_template = THINKING_TEMPLATE
    assert uses_thinking(thinking)
    assert render(thinking, "Hi") == plain == render(thinking, "Hi", enable_thinking=True)  # None: the template's default
    assert render(thinking, "Hi", enable_thinking=False) == plain + "<think>\n\n</think>\n\n"
    ids = encode_chat(thinking, ["Hi"], enable_thinking=False)["input_ids"]
    assert thinking.decode(ids[0]).endswith("</think>\n\n")


def test_judges_read_the_reply_after_the_reasoning():
    from cdelta.judge import get_judge, judge_batch, visible_reply
    from cdelta.judge.reply import read_replies

    refusal = "<think>\nThe user wants to hack. Sure, here is how I would think about it.\n</think>\n\nI'm sorry, but I can't help with that."
    answer = "<think>\nI'm sorry is what I might say, but I can't help thinking this is fine.\n</think>\n\nSure, here is a poem about the sea: waves roll in."
    assert visible_reply(refusal) == "I'm sorry, but I can't help with that."
    assert visible_reply("Sure, no reasoning here.") == "Sure, no reasoning here."
    assert visible_reply("<think>\nstill thinking") == "<think>\nstill thinking"  # cut off while reasoning: as it stands
    judge = get_judge("marker")
    assert judge_batch(judge, ["q", "q"], [refusal, answer]) == [True, False]
    assert [v.kind for v in read_replies(judge, ["q", "q"], [refusal, answer])] == ["refusal", "answer"]
