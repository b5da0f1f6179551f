"""``cdelta export``: PEFT LoRA adapters and GGUF files of an edit, on tiny random llama and qwen2 models.

The adapter on the base must give the edited checkpoint's logits and merge into its weights; the GGUF
file read back with transformers' GGUF loader must give its logits (F32 exactly up to float error,
Q8_0 within its quantization error); bad input is one line.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from cdelta import cli
from cdelta.edit.delta import save_sparse, write_edited_checkpoint
from cdelta.edit.card import provenance_of
from cdelta.edit.formats import export, export_source, factorize, rank_summary
from cdelta.errors import CdeltaError
from cdelta.models.loading import weights_hash
from conftest import make_model, make_tokenizer

PROMPT_IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64, 128, 31, 2, 1]])


def _base_dir(tmp_path: Path, kind: str) -> Path:
    tokenizer = make_tokenizer()
    out = tmp_path / f"base-{kind}"
    make_model(kind, vocab_size=len(tokenizer)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _sliced_delta(base: Path, *, bias: bool = False, norm: bool = False, dense: bool = False, seed: int = 0) -> dict:
    """A delta shaped like cdelta's edits: two gated neurons (rows of gate/up, columns of down) in
    layer 1, one query head's rows and a KV group's rows in layer 0, the head's o_proj columns; optionally
    the q/k/v bias slices, a norm weight, a dense down_proj."""
    model = AutoModelForCausalLM.from_pretrained(base)
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(seed)
    delta = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}

    def fill(name, index):
        view = delta[name][index]
        delta[name][index] = 0.05 * torch.randn(view.shape, generator=gen)

    neurons = torch.tensor([3, 41])
    fill("model.layers.1.mlp.gate_proj.weight", (neurons,))
    fill("model.layers.1.mlp.up_proj.weight", (neurons,))
    fill("model.layers.1.mlp.down_proj.weight", (slice(None), neurons))
    fill("model.layers.0.self_attn.q_proj.weight", (slice(8, 16),))
    fill("model.layers.0.self_attn.k_proj.weight", (slice(0, 8),))
    fill("model.layers.0.self_attn.v_proj.weight", (slice(0, 8),))
    if not bias:
        fill("model.layers.0.self_attn.o_proj.weight", (slice(None), slice(8, 16)))
    else:
        for proj, rows in (("q", slice(8, 16)), ("k", slice(0, 8)), ("v", slice(0, 8))):
            fill(f"model.layers.0.self_attn.{proj}_proj.bias", (rows,))
        for name in ("model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.down_proj.weight"):
            delta[name].zero_()
    if norm:
        fill("model.layers.0.input_layernorm.weight", (slice(None),))
    if dense:
        fill("model.layers.0.mlp.down_proj.weight", (slice(None),))
    return {name: value for name, value in delta.items() if bool((value != 0).any())}


RESULTS = {
    "base": {
        "sets": {"builtin": {"cybercrime": {"refusal_rate": 0.1, "n": 10, "ci95": [0.02, 0.4]},
                             "harmless": {"refusal_rate": 0.0, "n": 10, "ci95": [0.0, 0.28]}}},
        "utility": {"mmlu_accuracy": 0.3, "mmlu_n": 20},
        "contexts": {"system": {"sets": {"builtin": {"cybercrime": {"refusal_rate": 0.2}, "harmless": {"refusal_rate": 0.0}}}}},
    },
    "edited": {
        "sets": {"builtin": {"cybercrime": {"refusal_rate": 0.9, "n": 10, "ci95": [0.6, 0.98]},
                             "harmless": {"refusal_rate": 0.1, "n": 10, "ci95": [0.02, 0.4]}}},
        "utility": {"mmlu_accuracy": 0.3, "mmlu_n": 20, "perplexity": 12.5, "reference_perplexity": 12.0,
                    "perplexity_ratio": 1.04, "first_token_kl": 0.012},
        "contexts": {"system": {"sets": {"builtin": {"cybercrime": {"refusal_rate": 0.8}, "harmless": {"refusal_rate": 0.1}}}}},
    },
}


def _run_dir(tmp_path: Path, base: Path, delta: dict, base_model: str | None = None, name: str = "run") -> Path:
    """A directory laid out as ``cdelta run`` leaves it: delta.safetensors, checkpoint/, results.json."""
    run = tmp_path / name
    run.mkdir()
    manifest = {"base_model": base_model or str(base), "base_weights_sha256": weights_hash(base), "category": "cybercrime",
                "direction": "refuse", "variant": "gated", "k": 1.0, "seed": 0}
    save_sparse(delta, run / "delta.safetensors", manifest)
    write_edited_checkpoint(base, delta, run / "checkpoint")
    (run / "results.json").write_text(json.dumps(RESULTS))
    return run


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(PROMPT_IDS).logits


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    block = text.split("---\n")[1]
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load(block)


# ------------------------------------------------------------------------------------------ factorization


def test_factorize_is_exact_on_slices_and_truncates_dense_blocks():
    gen = torch.Generator().manual_seed(0)
    rows = torch.zeros(48, 32)
    rows[[2, 7, 30]] = torch.randn(3, 32, generator=gen)
    factor = factorize(rows)
    assert factor.B.shape == (48, 3) and factor.exact_rank == 3 and factor.rel_error == 0
    assert torch.equal(factor.B @ factor.A, rows)  # one-hot B: bit for bit

    cols = torch.zeros(32, 64)
    cols[:, 10:18] = torch.randn(32, 8, generator=gen)
    factor = factorize(cols)
    assert factor.A.shape == (8, 64) and torch.equal(factor.B @ factor.A, cols)

    dense = torch.randn(32, 64, generator=gen)
    exact = factorize(dense)  # rank 32 ≤ 64: exact
    assert exact.B.shape[1] == 32 and torch.equal(exact.B @ exact.A, dense)
    truncated = factorize(dense, rank_cap=4)
    s = torch.linalg.svdvals(dense.double())
    assert truncated.B.shape[1] == 4 and truncated.exact_rank == 32
    assert truncated.rel_error == pytest.approx(float(torch.linalg.norm(s[4:]) / torch.linalg.norm(s)), rel=1e-6)
    measured = torch.linalg.norm(dense - truncated.B @ truncated.A) / torch.linalg.norm(dense)
    assert float(measured) == pytest.approx(truncated.rel_error, rel=1e-4)


# ------------------------------------------------------------------------------------------ PEFT


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_peft_adapter_on_base_is_the_checkpoint(kind, tmp_path):
    from peft import PeftModel

    base = _base_dir(tmp_path, kind)
    delta = _sliced_delta(base)
    run = _run_dir(tmp_path, base, delta)
    summary = export(export_source(run), "peft", tmp_path / "adapter", log=lambda m: None)

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    edited_modules = {name.rpartition(".")[0] for name in delta}
    assert set(config["target_modules"]) == edited_modules
    ranks = {m: config["rank_pattern"].get(m, config["r"]) for m in edited_modules}
    assert ranks == {"model.layers.1.mlp.gate_proj": 2, "model.layers.1.mlp.up_proj": 2, "model.layers.1.mlp.down_proj": 2,
                     "model.layers.0.self_attn.q_proj": 8, "model.layers.0.self_attn.k_proj": 8,
                     "model.layers.0.self_attn.v_proj": 8, "model.layers.0.self_attn.o_proj": 8}
    assert all(config["alpha_pattern"].get(m, config["lora_alpha"]) == r for m, r in ranks.items())  # scaling 1
    assert summary["max_rel_error"] == 0 and config["base_model_name_or_path"] == str(base.resolve())

    checkpoint = AutoModelForCausalLM.from_pretrained(run / "checkpoint", dtype=torch.float32)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), tmp_path / "adapter")
    wanted, got = _logits(checkpoint), _logits(adapted)
    diff = float((got - wanted).abs().max())
    print(f"\n[{kind}] peft adapter vs checkpoint: max |Δlogit| = {diff:.3g}")
    assert diff <= 1e-4
    assert float((_logits(AutoModelForCausalLM.from_pretrained(base)) - wanted).abs().max()) > 1e-3  # the edit shows

    merged = adapted.merge_and_unload().state_dict()
    reference = checkpoint.state_dict()
    assert set(merged) == set(reference)
    worst = max(float((merged[n] - reference[n]).abs().max()) for n in reference)
    print(f"[{kind}] merge_and_unload vs checkpoint weights: max |Δw| = {worst:.3g}")
    for name, value in reference.items():
        torch.testing.assert_close(merged[name], value, rtol=0, atol=1e-5)

    card = (tmp_path / "adapter" / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["library_name"] == "peft" and "cdelta" in meta["tags"] and "base_model" not in meta  # a local base: omitted
    assert weights_hash(base) in card and "PeftModel.from_pretrained" in card and "--enable-lora" in card


def test_peft_rank_cap_truncates_dense_edits_and_reports_the_error(tmp_path):
    from peft import PeftModel

    base = _base_dir(tmp_path, "llama")
    run = _run_dir(tmp_path, base, _sliced_delta(base, dense=True))
    messages: list[str] = []
    summary = export(export_source(run), "peft", tmp_path / "exact", log=messages.append)
    assert summary["modules"]["model.layers.0.mlp.down_proj"]["rank"] == 32 and not messages  # 32 ≤ 64: exact
    summary = export(export_source(run), "peft", tmp_path / "cut", rank=4, log=messages.append)
    info = summary["modules"]["model.layers.0.mlp.down_proj"]
    assert info["rank"] == 4 and info["exact_rank"] == 32 and 0 < info["rel_error"] < 1
    assert len(messages) == 5 and any("model.layers.0.mlp.down_proj" in m and "relative Frobenius error" in m for m in messages)
    # q/k/v/o head slices are rank 8 > 4: truncated too; gate/up/down neurons are rank 2: still exact
    assert summary["modules"]["model.layers.1.mlp.gate_proj"]["rel_error"] == 0
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "cut")
    checkpoint = AutoModelForCausalLM.from_pretrained(run / "checkpoint")
    assert float((_logits(adapted) - _logits(checkpoint)).abs().max()) > 1e-6
    assert "truncated" in (tmp_path / "cut" / "README.md").read_text()


def test_peft_carries_qkv_bias_changes_with_lora_bias(tmp_path):
    from peft import PeftModel

    base = _base_dir(tmp_path, "qwen2")
    delta = _sliced_delta(base, bias=True)
    assert "model.layers.0.self_attn.q_proj.bias" in delta
    run = _run_dir(tmp_path, base, delta)
    summary = export(export_source(run), "peft", tmp_path / "adapter", log=lambda m: None)
    assert summary["lora_bias"]
    checkpoint = AutoModelForCausalLM.from_pretrained(run / "checkpoint")
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "adapter")
    assert float((_logits(adapted) - _logits(checkpoint)).abs().max()) <= 1e-4
    merged = adapted.merge_and_unload().state_dict()
    for name, value in checkpoint.state_dict().items():
        torch.testing.assert_close(merged[name], value, rtol=0, atol=1e-5)


def test_peft_refuses_bias_changes_next_to_modules_without_bias(tmp_path):
    base = _base_dir(tmp_path, "qwen2")
    delta = _sliced_delta(base, bias=True)
    delta["model.layers.1.mlp.down_proj.weight"] = torch.zeros(32, 64)
    delta["model.layers.1.mlp.down_proj.weight"][:, 5] = 0.1
    run = _run_dir(tmp_path, base, delta)
    with pytest.raises(CdeltaError, match="lora_bias") as info:
        export(export_source(run), "peft", tmp_path / "adapter")
    assert "\n" not in str(info.value) and "down_proj" in str(info.value)
    assert not (tmp_path / "adapter").exists()


# ------------------------------------------------------------------------------------------ GGUF


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_gguf_read_back_gives_the_checkpoint_logits(kind, tmp_path):
    from transformers import AutoTokenizer

    base = _base_dir(tmp_path, kind)
    run = _run_dir(tmp_path, base, _sliced_delta(base), base_model="acme/tiny-chat")
    checkpoint = AutoModelForCausalLM.from_pretrained(run / "checkpoint", dtype=torch.float32)
    wanted = _logits(checkpoint)
    scale = float(wanted.abs().max())
    limits = {"f32": 1e-4, "f16": 1e-2, "q8_0": 5e-2}  # of the logit scale
    for gguf_type, limit in limits.items():
        out = tmp_path / f"gguf-{gguf_type}"
        summary = export(export_source(run), "gguf", out, gguf_type=gguf_type)
        name = Path(summary["file"]).name
        assert sorted(p.name for p in out.iterdir()) == sorted(["README.md", name])
        model = AutoModelForCausalLM.from_pretrained(out, gguf_file=name, dtype=torch.float32)
        assert type(model) is type(checkpoint)
        diff = float((_logits(model) - wanted).abs().max())
        print(f"\n[{kind}] gguf {gguf_type}: max |Δlogit| = {diff:.3g} (logit scale {scale:.3g}, relative {diff / scale:.3g})")
        assert diff <= limit * scale
        meta = _front_matter((out / "README.md").read_text())
        assert meta["library_name"] == "gguf" and meta["base_model"] == "acme/tiny-chat"
        assert meta["base_model_relation"] == ("quantized" if gguf_type == "q8_0" else "finetune")
    assert summary["tensor_types"]["Q8_0"] >= 7 * 2  # every matrix quantized, 1-D tensors F32
    tokenizer = AutoTokenizer.from_pretrained(out, gguf_file=name)
    reference = AutoTokenizer.from_pretrained(run / "checkpoint")
    text = "How do I hack into a server and steal passwords? <|im_start|>user\nhi<|im_end|>"
    assert tokenizer(text).input_ids == reference(text).input_ids
    assert tokenizer.chat_template == reference.chat_template and tokenizer.eos_token == "<|im_end|>"


def test_gguf_of_a_mistral_and_a_unigram_tokenizer_is_refused(tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)).eval()
    base = tmp_path / "base-mistral"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    run = _run_dir(tmp_path, base, _sliced_delta(base))
    summary = export(export_source(run), "gguf", tmp_path / "g", gguf_type="f32")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "g", gguf_file=Path(summary["file"]).name)
    checkpoint = AutoModelForCausalLM.from_pretrained(run / "checkpoint")
    assert type(back).__name__ in ("MistralForCausalLM", "LlamaForCausalLM")  # llama.cpp's llama architecture: the same computation
    assert float((_logits(back) - _logits(checkpoint)).abs().max()) <= 1e-4 * float(_logits(checkpoint).abs().max())

    unigram = json.loads((run / "checkpoint" / "tokenizer.json").read_text())
    unigram["model"]["type"] = "Unigram"  # T5-style: neither byte-level BPE nor SentencePiece BPE
    (run / "checkpoint" / "tokenizer.json").write_text(json.dumps(unigram))
    with pytest.raises(CdeltaError, match="writes BPE tokenizers") as info:
        export(export_source(run), "gguf", tmp_path / "g2")
    assert "\n" not in str(info.value) and "Unigram" in str(info.value) and not (tmp_path / "g2").exists()


def test_gguf_from_delta_and_base_needs_the_matching_base(tmp_path):
    base = _base_dir(tmp_path, "llama")
    delta = _sliced_delta(base)
    run = _run_dir(tmp_path, base, delta)
    summary = export(export_source(delta_path=run / "delta.safetensors", base=str(base)), "gguf", tmp_path / "g", gguf_type="f32")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "g", gguf_file=Path(summary["file"]).name)
    checkpoint = AutoModelForCausalLM.from_pretrained(run / "checkpoint")
    assert float((_logits(model) - _logits(checkpoint)).abs().max()) <= 1e-4 * float(_logits(checkpoint).abs().max())
    other = tmp_path / "other"
    make_model("llama", seed=1, vocab_size=len(make_tokenizer())).save_pretrained(other)
    with pytest.raises(CdeltaError, match="does not match the delta's base"):
        export_source(delta_path=run / "delta.safetensors", base=str(other))


# ------------------------------------------------------------------------------------------ model cards


def test_cards_follow_hub_conventions(tmp_path):
    assert provenance_of("smollm2-135m") == {
        "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "license": "apache-2.0",
        "note": "cdelta's bundled `smollm2-135m`: the Q4_1 GGUF of HuggingFaceTB/SmolLM2-135M-Instruct, dequantized to float32"}
    assert provenance_of("qwen2.5-0.5b")["base_model"] == "Qwen/Qwen2.5-Coder-0.5B-Instruct"
    base = _base_dir(tmp_path, "llama")
    run = _run_dir(tmp_path, base, _sliced_delta(base), base_model="acme/tiny-chat")  # base not found: config from checkpoint/
    source = export_source(run)
    assert source.base_dir is None
    export(source, "peft", tmp_path / "adapter", log=lambda m: None)
    export(source, "checkpoint", tmp_path / "ckpt")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == "acme/tiny-chat"
    for directory, relation, library in (("adapter", "adapter", "peft"), ("ckpt", "finetune", "transformers")):
        card = (tmp_path / directory / "README.md").read_text()
        meta = _front_matter(card)
        assert meta["base_model"] == "acme/tiny-chat" and meta["base_model_relation"] == relation
        assert meta["library_name"] == library and {"cdelta", "refusal", "safety"} <= set(meta["tags"])
        assert meta["base_model_sha256"] == weights_hash(base)
        assert "| builtin | cybercrime | 10.0% [2.0, 40.0] | 90.0% [60.0, 98.0] | 10 |" in card
        assert "| builtin | cybercrime | 20.0% → 80.0% |" in card  # the system context
        assert "| first-token KL to base | 0 | 0.0120 |" in card and "MMLU accuracy (n=20)" in card
    ckpt = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert torch.equal(_logits(ckpt), _logits(AutoModelForCausalLM.from_pretrained(run / "checkpoint")))


# ------------------------------------------------------------------------------------------ command line


def _cli_error(monkeypatch, capsys, *args) -> str:
    monkeypatch.setattr(sys, "argv", ["cdelta", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error:"), err
    return lines[0]


def test_cli_bad_inputs_are_one_line(monkeypatch, capsys, tmp_path):
    message = _cli_error(monkeypatch, capsys, "export", str(tmp_path / "nope"), "--format", "peft", "--out", str(tmp_path / "a"))
    assert "nope not found" in message
    base = _base_dir(tmp_path, "llama")
    run = _run_dir(tmp_path, base, _sliced_delta(base, norm=True))
    message = _cli_error(monkeypatch, capsys, "export", str(run), "--format", "onnx", "--out", str(tmp_path / "a"))
    assert "unknown export format 'onnx'" in message and "peft" in message
    message = _cli_error(monkeypatch, capsys, "export", str(run), "--format", "peft", "--out", str(tmp_path / "a"))
    assert "model.layers.0.input_layernorm.weight" in message and "--format checkpoint or gguf" in message
    assert not (tmp_path / "a").exists()
    message = _cli_error(monkeypatch, capsys, "export", "--delta", str(run / "delta.safetensors"), "--format", "gguf", "--out", str(tmp_path / "a"))
    assert "--base" in message
    message = _cli_error(monkeypatch, capsys, "export", str(run), "--format", "gguf", "--gguf-type", "q4_k", "--out", str(tmp_path / "a"))
    assert "q4_k" in message
    orphan = _run_dir(tmp_path, base, _sliced_delta(base), base_model="gone/model", name="orphan")
    shutil.rmtree(orphan / "checkpoint")
    for fmt in ("checkpoint", "gguf", "peft"):
        message = _cli_error(monkeypatch, capsys, "export", str(orphan), "--format", fmt, "--out", str(tmp_path / "a"))
        assert "--delta DELTA --base MODEL" in message
    assert not (tmp_path / "a").exists()


def _cli_ok(monkeypatch, *args) -> None:
    monkeypatch.setattr(sys, "argv", ["cdelta", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 0


def test_cli_exports_a_run(monkeypatch, capsys, tmp_path):
    base = _base_dir(tmp_path, "qwen2")
    run = _run_dir(tmp_path, base, _sliced_delta(base))
    _cli_ok(monkeypatch, "export", str(run), "--format", "peft", "--out", str(tmp_path / "adapter"))
    assert "7 modules, rank 2-8, exact" in " ".join(capsys.readouterr().out.split())
    _cli_ok(monkeypatch, "export", str(run), "--format", "gguf", "--gguf-type", "Q8_0", "--out", str(tmp_path / "g"))
    captured = capsys.readouterr()
    out = " ".join(captured.out.split())
    assert "Q8_0" in out and len(list((tmp_path / "g").glob("*-q8_0.gguf"))) == 1
    assert "warning: 8-bit Q8_0 can move a gated edit's gate" in " ".join((captured.out + captured.err).split())
    _cli_ok(monkeypatch, "export", str(run), "--format", "gguf", "--out", str(tmp_path / "g16"))
    captured = capsys.readouterr()
    assert "warning" not in captured.out + captured.err


def test_a_tiny_gated_run_exports_exactly(tiny_llama_dir, tmp_path, monkeypatch):
    """End to end: ``cdelta run --variant gated`` on the tiny llama, then the adapter and the GGUF of its run directory."""
    from peft import PeftModel

    from cdelta.config import RunConfig
    from cdelta.pipeline import run_pipeline

    monkeypatch.setenv("CDELTA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr("cdelta.data.public.load_ppl_text", lambda chars: "The sea is blue and the sky is wide. " * 4)
    cfg = RunConfig(model=str(tiny_llama_dir), n_pairs=4, ig_steps=2, circuit="top_k:10", steps=3, k_grid=[1.0],
                    retain_harmless=4, retain_lookalike=4, retain_other=1, max_new_tokens=2, mmlu_n=0, eval_limit=1,
                    faithfulness=False, judge="marker", variant="gated", gate_span=2)
    run = tmp_path / "run"
    run_pipeline(cfg, run, log=lambda m: None)
    summary = export(export_source(run), "peft", tmp_path / "adapter", log=lambda m: None)
    assert summary["max_rel_error"] == 0
    checkpoint = AutoModelForCausalLM.from_pretrained(run / "checkpoint", dtype=torch.float32)
    wanted = _logits(checkpoint)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32), tmp_path / "adapter")
    diff = float((_logits(adapted) - wanted).abs().max())
    print(f"\n[gated run] {rank_summary(summary['modules'])}; peft vs checkpoint max |Δlogit| = {diff:.3g}")
    assert diff <= 1e-4
    gguf = export(export_source(run), "gguf", tmp_path / "gguf", gguf_type="f32")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "gguf", gguf_file=Path(gguf["file"]).name, dtype=torch.float32)
    diff = float((_logits(model) - wanted).abs().max())
    print(f"[gated run] gguf f32 vs checkpoint max |Δlogit| = {diff:.3g}")
    assert diff <= 1e-4 * float(wanted.abs().max())
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert _front_matter(card)["library_name"] == "peft" and "| builtin | cybercrime |" in card
