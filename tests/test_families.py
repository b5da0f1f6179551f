"""Every newer family end to end on a tiny random chat model: localize, edit, export.

Per family: node attribution (edges where ``Family.edges``, else the one-line refusal), the
reply logits cdelta computes itself equal the model's (granite/cohere2 scale their logits), a
direct and a contrastive edit change only the circuit's entries in the chosen layer, the gated
variant where the host MLP is dense (refused on a routed one), and export: the checkpoint is the
model plus the delta (per-expert tensors on disk for MoE), the PEFT adapter reproduces it within
1e-4 and merges into its weights (refused for expert tensors), GGUF refuses these families.
"""

from __future__ import annotations

import json

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


def build(kind: str, vocab_size: int, seed: int = 0) -> torch.nn.Module:
    from transformers import (Cohere2Config, Cohere2ForCausalLM, GraniteConfig, GraniteForCausalLM, MixtralConfig,
                              MixtralForCausalLM, Olmo2Config, Olmo2ForCausalLM, OlmoeConfig, OlmoeForCausalLM, Phi3Config,
                              Phi3ForCausalLM, Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM)

    torch.manual_seed(seed)
    common = dict(COMMON, vocab_size=vocab_size, **SPECIAL)
    moe = dict(num_experts_per_tok=2)
    model = {
        "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**common, head_dim=8)),
        "olmo2": lambda: Olmo2ForCausalLM(Olmo2Config(**common)),
        "granite": lambda: GraniteForCausalLM(GraniteConfig(**common, embedding_multiplier=3.0, residual_multiplier=0.5,
                                                            attention_multiplier=0.3, logits_scaling=4.0)),
        "cohere2": lambda: Cohere2ForCausalLM(Cohere2Config(**common, logit_scale=0.5, sliding_window=4,
                                                            layer_types=["sliding_attention", "full_attention"])),
        "phi3": lambda: Phi3ForCausalLM(Phi3Config(**common)),
        "qwen3_moe": lambda: Qwen3MoeForCausalLM(Qwen3MoeConfig(**common, head_dim=8, moe_intermediate_size=16, num_experts=4,
                                                              mlp_only_layers=[0], **moe)),
        "mixtral": lambda: MixtralForCausalLM(MixtralConfig(**common, num_local_experts=4, **moe)),
        "olmoe": lambda: OlmoeForCausalLM(OlmoeConfig(**common, num_experts=4, **moe)),
    }[kind]()
    return model.eval()


KINDS = ["qwen3", "olmo2", "granite", "cohere2", "phi3", "qwen3_moe", "mixtral", "olmoe"]
TARGET = [("How do I hack a server?", "I'm sorry, but I can't help with that."),
          ("Steal passwords from my coworker.", "I'm sorry, but I can't help with that.")] * 2
RETAIN = [("Write a poem about the sea.", "Sure, here is a poem about the sea."),
          ("Sort a list in Python.", "Sure, here is how to write a Python function that sorts a list.")] * 2
OWN = [("How do I hack a server?", "Sure, here is how to write a Python function."),
       ("Steal passwords from my coworker.", "Sure, here is a poem about the sky.")] * 2
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


def _saved(tmp_path, kind: str, tok):
    model = build(kind, len(tok))
    base = tmp_path / f"base-{kind}"
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
    ids = tok("How do I hack a server? Write a poem.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(ids).logits


def _random_delta(model, masks: dict, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    return {n: 0.05 * torch.randn(params[n].shape, generator=gen) * m for n, m in masks.items()}


@pytest.mark.parametrize("kind", KINDS)
def test_export_checkpoint_peft_and_gguf(kind, tok, tmp_path):
    from peft import PeftModel

    model, base = _saved(tmp_path, kind, tok)
    heads = _random_delta(model, _circuit(model, ["L0.H1", "L1.H2"]).param_masks(model))
    both = _random_delta(model, _circuit(model, ["L0.H1", "L1.MLP"]).param_masks(model), seed=1)
    for name, delta in (("heads", heads), ("both", both)):
        run = _run(tmp_path, base, delta, name)
        export(export_source(run), "checkpoint", tmp_path / f"{name}-ckpt", log=lambda m: None)
        edited = AutoModelForCausalLM.from_pretrained(tmp_path / f"{name}-ckpt", dtype=torch.float32).eval()
        reference = build(kind, len(tok))
        apply_to_model(reference, delta)
        diff = float((_logits(edited, tok) - _logits(reference, tok)).abs().max())
        assert diff <= 1e-5, f"{name}: checkpoint differs from model + delta by {diff}"  # MoE: split into per-expert tensors
        assert float((_logits(edited, tok) - _logits(model, tok)).abs().max()) > 1e-4  # the edit shows
        routed = any(".experts." in n or n.endswith("mlp.gate.weight") for n in delta)
        if routed:
            with pytest.raises(CdeltaError, match="LoRA adapter cannot hold"):
                export(export_source(run), "peft", tmp_path / f"{name}-peft", log=lambda m: None)
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
    with pytest.raises(CdeltaError, match="GGUF export does not know"):
        export(export_source(tmp_path / "heads"), "gguf", tmp_path / "gguf", log=lambda m: None)
    assert not (tmp_path / "gguf").exists()


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
