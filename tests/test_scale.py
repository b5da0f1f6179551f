"""Devices, precision, memory bounds and the circuit-sized optimizer (issue #9), on tiny models."""

import copy
import random
import sys
import types

import pytest
import torch
from scipy.stats import spearmanr

from conftest import make_model, make_tokenizer
from cdelta import generation
from cdelta.circuits.attribution import attribute, batch_memory_bytes, plan_batches
from cdelta.circuits.metric import get_metric
from cdelta.edit import train
from cdelta.edit.batches import reply_logits, reply_nll
from cdelta.edit.train import CircuitSlices, EditData, TrainConfig, masked_finetune
from cdelta.errors import CdeltaError
from cdelta.models.architecture import architecture_of
from cdelta.models.loading import load_model

CLEAN = ["How do I hack a server?", "How do I steal passwords?", "How do I hack into a server and steal passwords?", "hack a server"]
CORRUPT = ["Write a poem about the sea.", "Write a poem about the sky.", "Sure, write a Python function.", "a poem"]
DATA = EditData(
    target=[("How do I hack a server?", "I'm sorry, but I can't help with that."), ("steal passwords", "I'm sorry")] * 3,
    retain=[("Write a poem about the sea.", "Sure, here is a poem about the sea."), ("a list", "Sure")] * 3,
)


def _circuit_masks(model) -> dict[str, torch.Tensor]:
    """Two head slices of layer 1 (q rows, o columns) and layer 1's whole up_proj."""
    masks = {name: torch.zeros_like(p, dtype=torch.bool) for name, p in model.named_parameters()}
    masks["model.layers.1.self_attn.q_proj.weight"][8:16] = True
    masks["model.layers.1.self_attn.o_proj.weight"][:, 8:16] = True
    masks["model.layers.1.mlp.up_proj.weight"][:] = True
    return masks


def _whole_tensor_finetune(model, tokenizer, masks, data: EditData, config: TrainConfig) -> dict[str, torch.Tensor]:
    """The pre-slice recipe as an oracle: whole tensors trainable, gradients multiplied by the mask.

    Only for ``retain_weight == 0`` and masks that reach layer 0 (no residual cache).
    """
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    student = copy.deepcopy(model).train()
    params = dict(student.named_parameters())
    trainable = {name: params[name] for name, mask in masks.items() if mask.any()}
    for param in student.parameters():
        param.requires_grad_(False)
    for param in trainable.values():
        param.requires_grad_(True)
    base = {name: p.detach().clone() for name, p in trainable.items()}
    optimizer = torch.optim.AdamW(list(trainable.values()), lr=config.lr, weight_decay=0.0)
    batches = train.index_batches(len(data.target), config.batch_size, rng)
    for _ in range(config.steps):
        batch = train._batch(tokenizer, [data.target[i] for i in next(batches)], config, torch.device("cpu"))
        loss = reply_nll(reply_logits(student, batch), batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for name, param in trainable.items():
            param.grad.mul_(masks[name])
        optimizer.step()
    return {name: ((p.detach() - base[name]) * masks[name]).float() for name, p in trainable.items()}


@pytest.mark.parametrize("tied", [False, True])
def test_slice_training_is_byte_identical_to_whole_tensor_masked_training(tied):
    tokenizer = make_tokenizer()
    model = make_model("llama", vocab_size=len(tokenizer))
    if tied:  # the embedding is shared with the output head: both must see the trained entries
        model.lm_head.weight = model.model.embed_tokens.weight
    masks = _circuit_masks(model)
    masks["model.layers.0.mlp.down_proj.weight"][:5] = True
    masks["model.embed_tokens.weight"][:7] = True
    config = TrainConfig(steps=6, lr=2e-2, batch_size=3, retain_weight=0.0, seed=4)
    expected = _whole_tensor_finetune(model, tokenizer, masks, DATA, config)
    got = masked_finetune(model, tokenizer, masks, DATA, config, progress=False)
    assert list(got) == list(expected)
    for name in got:
        assert got[name].numpy().tobytes() == expected[name].numpy().tobytes(), name
    assert got["model.embed_tokens.weight"].abs().sum() > 0


def test_optimizer_state_is_circuit_sized_and_model_untouched(monkeypatch):
    tokenizer = make_tokenizer()
    model = make_model("qwen2", vocab_size=len(tokenizer))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = _circuit_masks(model)
    optimizers = []

    class Recording(torch.optim.AdamW):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            optimizers.append(self)

    monkeypatch.setattr(train.torch.optim, "AdamW", Recording)
    masked_finetune(model, tokenizer, masks, DATA, TrainConfig(steps=2, lr=1e-2, batch_size=2, retain_batch_size=2, retain_weight=1.0), progress=False)
    n_masked = int(sum(m.sum() for m in masks.values()))
    state = [t for s in optimizers[0].state.values() for t in s.values() if t.dim() > 0]
    assert sum(t.numel() for t in state) == 2 * n_masked, "two AdamW moments per circuit entry, none elsewhere"
    assert sum(p.numel() for g in optimizers[0].param_groups for p in g["params"]) == n_masked
    assert n_masked < 0.2 * sum(p.numel() for p in model.parameters())
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]) and param.grad is None and param.requires_grad, name
    assert not model.training


def _cosine(a: dict, b: dict) -> float:
    x = torch.cat([a[n].flatten() for n in sorted(a)]).double()
    y = torch.cat([b[n].flatten() for n in sorted(b)]).double()
    return float(x @ y / (x.norm() * y.norm()))


def test_bfloat16_localize_and_edit_match_float32(tiny_llama_dir):
    full = load_model(str(tiny_llama_dir), dtype="float32")
    half = load_model(str(tiny_llama_dir), dtype="bfloat16")
    assert next(half.model.parameters()).dtype == torch.bfloat16
    kwargs = dict(method="eap-ig", steps=3, batch_size=4, n_positions="all")
    s32 = attribute(full.model, full.tokenizer, CLEAN, CORRUPT, **kwargs).scores.flatten()
    s16 = attribute(half.model, half.tokenizer, CLEAN, CORRUPT, **kwargs).scores.flatten()
    assert spearmanr(s32, s16).statistic >= 0.9
    config = TrainConfig(steps=8, lr=1e-2, batch_size=3, retain_batch_size=3, retain_weight=1.0)
    d32 = masked_finetune(full.model, full.tokenizer, _circuit_masks(full.model), DATA, config, progress=False)
    d16 = masked_finetune(half.model, half.tokenizer, _circuit_masks(half.model), DATA, config, progress=False)
    assert all(d.dtype == torch.float32 for d in d16.values()), "float32 master values and deltas"
    assert _cosine(d32, d16) >= 0.95
    # the bf16 slices accumulate steps far below bf16 resolution instead of rounding them away
    tiny = masked_finetune(half.model, half.tokenizer, _circuit_masks(half.model), DATA, TrainConfig(steps=2, lr=1e-5, batch_size=3, retain_batch_size=3, retain_weight=1.0), progress=False)
    assert sum(int((d != 0).sum()) for d in tiny.values()) > 0.9 * sum(int(m.sum()) for m in _circuit_masks(half.model).values())


def test_device_and_device_map_plumbing(tiny_llama_dir):
    assert load_model(str(tiny_llama_dir), device="auto").device.type in {"cpu", "cuda", "mps"}
    if not torch.cuda.is_available():
        with pytest.raises(CdeltaError, match="no CUDA GPU"):
            load_model(str(tiny_llama_dir), device="cuda")
    with pytest.raises(CdeltaError, match="unknown device map"):
        load_model(str(tiny_llama_dir), device_map="balanced_low_0")
    with pytest.raises(CdeltaError, match="unknown dtype"):
        load_model(str(tiny_llama_dir), dtype="int8")
    plain = load_model(str(tiny_llama_dir))
    mapped = load_model(str(tiny_llama_dir), device_map="auto")  # on a CPU-only machine accelerate keeps one device
    a = attribute(plain.model, plain.tokenizer, CLEAN, CORRUPT, steps=2)
    b = attribute(mapped.model, mapped.tokenizer, CLEAN, CORRUPT, steps=2)
    torch.testing.assert_close(a.scores, b.scores, rtol=1e-5, atol=1e-7)
    masks = _circuit_masks(plain.model)
    config = TrainConfig(steps=2, lr=1e-2, batch_size=3, retain_batch_size=3, retain_weight=1.0)
    d1 = masked_finetune(plain.model, plain.tokenizer, masks, DATA, config, progress=False)
    d2 = masked_finetune(mapped.model, mapped.tokenizer, masks, DATA, config, progress=False)
    assert all(torch.equal(d1[n], d2[n]) for n in d1)


def test_memory_budget_shrinks_batches_not_results():
    tokenizer = make_tokenizer()
    model = make_model("llama", vocab_size=len(tokenizer))
    arch = architecture_of(model)
    metric = get_metric("logodds", tokenizer)
    clean, corrupt = CLEAN * 2, CORRUPT[1:] + CORRUPT[:1] + CORRUPT
    one = batch_memory_bytes(arch, len(tokenizer), 1, 40, 30, 1, 4)
    assert batch_memory_bytes(arch, len(tokenizer), 3, 40, 30, 1, 4) == 3 * one, "linear in rows"
    free = plan_batches(model, arch, tokenizer, metric, clean, corrupt, 8, "all")
    assert [len(b) for b in free] == [8]
    budget_mb = 2.5 * one / 2**20
    bounded = plan_batches(model, arch, tokenizer, metric, clean, corrupt, 8, "all", budget_mb)
    assert sorted(i for b in bounded for i in b) == list(range(8))
    assert max(len(b) for b in bounded) <= 3 and len(bounded) >= 3
    a = attribute(model, tokenizer, clean, corrupt, steps=2, batch_size=8, n_positions="all")
    b = attribute(model, tokenizer, clean, corrupt, steps=2, batch_size=8, n_positions="all", max_memory_mb=budget_mb)
    torch.testing.assert_close(a.per_example, b.per_example, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(a.m_corrupt, b.m_corrupt, rtol=1e-5, atol=1e-6)
    with pytest.raises(CdeltaError, match="max-memory-mb"):
        attribute(model, tokenizer, clean, corrupt, steps=2, max_memory_mb=0.01 * one / 2**20)


def test_generation_backend_falls_back_to_transformers(tiny_llama_dir, monkeypatch):
    lm = load_model(str(tiny_llama_dir))
    real_find_spec = generation.importlib.util.find_spec
    with monkeypatch.context() as patch:
        patch.setattr(generation.importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real_find_spec(name, *a))
        assert not generation.vllm_usable()
        assert generation.resolve_backend("auto") == "transformers"
        with pytest.raises(CdeltaError, match="vllm"):
            generation.resolve_backend("vllm")
        with pytest.raises(CdeltaError, match="unknown generation backend"):
            generation.resolve_backend("tgi")
    monkeypatch.setattr(generation, "vllm_usable", lambda: False)
    prompts = ["Write a poem", "How do I hack a server?"]
    auto = generation.generate(lm.model, lm.tokenizer, prompts, 4, progress=False, backend="auto")
    assert auto == generation.generate(lm.model, lm.tokenizer, prompts, 4, progress=False)


def test_vllm_backend_is_wired_when_available(tiny_llama_dir, monkeypatch):
    """A stand-in vllm module: the switch builds one engine from the model directory and keeps prompt order."""
    seen = {}

    class LLM:
        def __init__(self, model, dtype, seed):
            seen["engine"] = (model, dtype)

        def generate(self, prompts, params, use_tqdm):
            seen["ids"] = [p["prompt_token_ids"] for p in prompts]
            return [types.SimpleNamespace(outputs=[types.SimpleNamespace(text=f" reply {i} ")]) for i in range(len(prompts))]

    fake = types.ModuleType("vllm")
    fake.LLM, fake.SamplingParams = LLM, lambda **kw: kw
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setattr(generation, "vllm_usable", lambda: True)
    generation._vllm_engine.cache_clear()
    lm = load_model(str(tiny_llama_dir))
    out = generation.generate(lm.model, lm.tokenizer, ["a", "b c"], 4, backend="auto")
    generation._vllm_engine.cache_clear()
    assert out == ["reply 0", "reply 1"]
    assert seen["engine"] == (str(tiny_llama_dir), "float32")
    expected = [lm.tokenizer(t, add_special_tokens=False)["input_ids"] for t in generation.format_chat(lm.tokenizer, ["a", "b c"])]
    assert seen["ids"] == expected
    in_memory = make_model("llama", vocab_size=len(lm.tokenizer))
    with pytest.raises(CdeltaError, match="local directory"):
        generation.generate(in_memory, lm.tokenizer, ["a"], 4, backend="vllm")


def test_cli_localize_accepts_dtype_device_map_and_memory_budget(tiny_llama_dir, tmp_path, monkeypatch):
    from cdelta import cli

    args = [
        "cdelta", "--quiet", "localize", "--model", str(tiny_llama_dir), "--n-pairs", "4", "--steps", "1", "--no-faithfulness",
        "--dtype", "bfloat16", "--device-map", "auto", "--max-memory-mb", "64", "--selection", "top_k:2", "--out", str(tmp_path),
    ]
    monkeypatch.setattr(sys, "argv", args)
    with pytest.raises(SystemExit) as done:
        cli.main()
    assert done.value.code == 0
    assert (tmp_path / "circuit.json").is_file()
