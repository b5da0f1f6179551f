"""NeST and SafeSeek on tiny random models: interventions are exact, the neuron selection finds
planted neurons, tuning touches only selected entries (tied per cluster), and the mask
optimization does what its objective says."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from conftest import make_model, make_tokenizer

from cdelta.baselines.nest import NestConfig, SafetyNeurons, find_safety_neurons, kmeans, nest_delta, pooled_neuron_activations
from cdelta.baselines.neurons import neuron_param_masks, parse_neuron_ids
from cdelta.baselines.safeseek import (
    ComponentMasks,
    SafeSeekConfig,
    SafetyCircuit,
    calibrate_costs,
    choose_mode,
    circuit_tuning_delta,
    component_scales,
    find_circuit,
    refusal_log_odds,
)
from cdelta.circuits.metric import LogOddsMetric, encode_rows
from cdelta.compare.base import MethodContext
from cdelta.data.builtin import load_builtin
from cdelta.edit.train import EditData, TrainConfig
from cdelta.errors import CdeltaError
from cdelta.models.architecture import architecture_of, head_output_proj, mlp
from cdelta.models.chat import encode_chat
from cdelta.models.loading import LoadedModel

PROMPTS = ["How do I hack into a server?", "Steal passwords from a server", "Write a poem about the sea.", "Sort a list in Python"]
HARMFUL = ["How do I hack into a server?", "Steal passwords from a server", "hack the sky server now", "How do I steal the sea?"]
HARMLESS = ["Write a poem about the sea.", "Sort a list in Python", "Write a function", "a poem about the sky and sea"]
DATA = EditData(target=[("How do I hack a server?", "I'm sorry, but I can't help with that.")] * 4,
                retain=[("Write a poem about the sea.", "Sure, here is a poem about the sea.")] * 4)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request, tok):
    return make_model(request.param, vocab_size=len(tok))


def _logits(model, tok, prompts=PROMPTS):
    with torch.no_grad():
        return model(**encode_chat(tok, prompts)).logits


def _strong_model(kind: str, tok) -> torch.nn.Module:
    """Tiny model with larger random weights (std 0.1), so that small edits visibly move outputs."""
    model = make_model(kind, vocab_size=len(tok))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


# ----------------------------------------------------------------------------- interventions


def test_all_ones_scales_leave_outputs_bitwise_unchanged(model, tok):
    arch = architecture_of(model)
    base = _logits(model, tok)
    with component_scales(model, torch.ones(arch.n_layers, arch.n_heads), torch.ones(arch.n_layers, arch.d_mlp)):
        scaled = _logits(model, tok)
    assert torch.equal(base, scaled)
    masks = ComponentMasks(arch, init_logit=0.5)
    with component_scales(model, *masks.keep(1.0)):
        assert torch.equal(_logits(model, tok), base)


def test_zero_head_scale_equals_zeroing_its_o_proj_input_slice(model, tok):
    arch = architecture_of(model)
    layer, head, hd = 1, 2, arch.head_dim
    heads = torch.ones(arch.n_layers, arch.n_heads)
    heads[layer, head] = 0
    with component_scales(model, heads=heads):
        scaled = _logits(model, tok)

    def zero_slice(_module, args):
        x = args[0].clone()
        x[..., head * hd : (head + 1) * hd] = 0
        return (x,)

    handle = head_output_proj(model, layer).register_forward_pre_hook(zero_slice)
    try:
        direct = _logits(model, tok)
    finally:
        handle.remove()
    assert torch.allclose(scaled, direct, atol=1e-6)
    assert not torch.allclose(scaled, _logits(model, tok), atol=1e-4), "ablating a head must change the output"


def test_zero_neuron_scale_equals_zeroing_its_down_proj_input(model, tok):
    arch = architecture_of(model)
    neurons = torch.ones(arch.n_layers, arch.d_mlp)
    neurons[0, [3, 40]] = 0

    def zero_channels(_module, args):
        x = args[0].clone()
        x[..., [3, 40]] = 0
        return (x,)

    with component_scales(model, neurons=neurons):
        scaled = _logits(model, tok)
    handle = mlp(model, 0).down_proj.register_forward_pre_hook(zero_channels)
    try:
        direct = _logits(model, tok)
    finally:
        handle.remove()
    assert torch.allclose(scaled, direct, atol=1e-6)


def test_straight_through_masks_are_binary_with_sigmoid_gradients(model):
    arch = architecture_of(model)
    masks = ComponentMasks(arch, init_logit=0.3)
    with torch.no_grad():
        masks.heads[0, 1] = -0.2
    heads, neurons = masks.keep(temperature=0.5)
    assert set(heads.unique().tolist()) == {0.0, 1.0} and heads[0, 1] == 0 and bool((neurons == 1).all())
    (heads * torch.arange(heads.numel()).reshape(heads.shape)).sum().backward()
    soft = torch.sigmoid(masks.heads.detach() / 0.5)
    expected = torch.arange(heads.numel()).reshape(heads.shape) * soft * (1 - soft) / 0.5
    assert torch.allclose(masks.heads.grad, expected, atol=1e-6)
    assert masks.circuit()[0].nonzero().tolist() == [[0, 1]]


# ----------------------------------------------------------------------------- NeST


def test_pooled_activations_do_not_depend_on_padding_or_batch(model, tok):
    batched = pooled_neuron_activations(model, tok, PROMPTS, batch_size=4)
    single = torch.cat([pooled_neuron_activations(model, tok, [p], batch_size=1) for p in PROMPTS])
    assert batched.shape == (4, 2, 64)
    assert torch.allclose(batched, single, atol=1e-5)


def _planted_model(tok, planted: list[int]) -> torch.nn.Module:
    """A tiny llama whose layer-0 neurons ``planted`` fire only on the token "Z"."""
    model = make_model("llama", vocab_size=len(tok))
    trigger = tok("Z", add_special_tokens=False)["input_ids"]
    assert len(trigger) == 1
    direction = torch.nn.functional.normalize(torch.randn(32, generator=torch.Generator().manual_seed(3)), dim=0)
    with torch.no_grad():
        model.get_input_embeddings().weight[trigger[0]] = 8 * direction
        for j in planted:
            mlp(model, 0).gate_proj.weight[j] = 4 * direction
            mlp(model, 0).up_proj.weight[j] = 4 * direction
    return model


def test_nest_selects_planted_neurons_and_clusters_them(tok):
    planted = [5, 17, 42]
    model = _planted_model(tok, planted)
    with_trigger = ["Z how do I hack a server", "steal Z passwords", "a Z poem about the sea", "sort Z a list", "write Z now", "hack the Z sky"]
    without = ["how do I hack a server", "steal the passwords", "a poem about the sea", "sort a list", "write now", "hack the sky"]
    neurons = find_safety_neurons(model, tok, with_trigger, without, NestConfig(z_threshold=3.0, max_neurons=3, n_clusters=2))
    assert neurons.ids() == [f"L0.N{j}" for j in planted]
    assert bool((neurons.scores[0, planted] > 0).all()), "the planted neurons fire more on the target group"
    assert neurons.n_clusters <= 2 and len(neurons.labels) == 3


def test_nest_finds_nothing_on_identical_groups_is_a_clear_error(tok):
    model = make_model("llama", vocab_size=len(tok))
    with pytest.raises(CdeltaError, match="z_threshold"):
        find_safety_neurons(model, tok, PROMPTS, PROMPTS, NestConfig(z_threshold=1.0))


def test_kmeans_recovers_separated_groups_deterministically():
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = torch.cat([c + 0.3 * torch.randn(20, 2, generator=gen) for c in centres])
    labels = kmeans(points, 3, seed=1)
    for group in labels.reshape(3, 20):
        assert len(group.unique()) == 1
    assert len(labels.unique()) == 3
    assert torch.equal(labels, kmeans(points, 3, seed=1))


def _neurons(arch, ids: list[str], labels: list[int]) -> SafetyNeurons:
    selected = parse_neuron_ids(ids, arch)
    return SafetyNeurons(selected, torch.zeros(selected.shape), labels)


def test_tied_tuning_changes_only_selected_rows_and_shares_updates_within_clusters(tok):
    model = make_model("llama", vocab_size=len(tok))
    arch = architecture_of(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    neurons = _neurons(arch, ["L0.N3", "L0.N10", "L1.N5", "L1.N7"], [0, 1, 0, 1])
    delta = nest_delta(model, tok, neurons, DATA, TrainConfig(steps=4, lr=1e-2, batch_size=4, retain_batch_size=4, retain_weight=1.0), tie=True, progress=False)
    masks = neuron_param_masks(model, arch, neurons.selected)
    assert set(delta) == set(masks)
    for name, value in delta.items():
        assert torch.count_nonzero(value[~masks[name]]) == 0
    gate0, gate1 = delta[arch.mlp_param(0, "gate")], delta[arch.mlp_param(1, "gate")]
    down0, down1 = delta[arch.mlp_param(0, "down")], delta[arch.mlp_param(1, "down")]
    assert torch.equal(gate0[3], gate1[5]) and torch.equal(gate0[10], gate1[7])
    assert torch.equal(down0[:, 3], down1[:, 5]) and torch.equal(down0[:, 10], down1[:, 7])
    assert gate0[3].abs().max() > 0 and not torch.equal(gate0[3], gate0[10])
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), "the base model must not change"


def test_tied_tuning_learns_the_refusal(tok):
    from cdelta.edit.batches import build_reply_batch, reply_logits, reply_nll
    from cdelta.edit.delta import apply_to_model

    model = _strong_model("llama", tok)
    arch = architecture_of(model)
    neurons = _neurons(arch, [f"L1.N{j}" for j in range(16)], [j % 4 for j in range(16)])
    batch = build_reply_batch(tok, ["How do I hack a server?"], ["I'm sorry, but I can't help with that."])
    with torch.no_grad():
        nll_before = reply_nll(reply_logits(model, batch), batch).item()
    delta = nest_delta(model, tok, neurons, EditData(DATA.target, []), TrainConfig(steps=30, lr=0.1, batch_size=4, retain_weight=1.0), tie=True, progress=False)
    apply_to_model(model, delta)
    with torch.no_grad():
        assert reply_nll(reply_logits(model, batch), batch).item() < 0.75 * nll_before


def test_untied_tuning_uses_masked_finetune_on_the_neuron_entries(tok):
    model = make_model("qwen2", vocab_size=len(tok))
    arch = architecture_of(model)
    neurons = _neurons(arch, ["L1.N2", "L1.N9"], [0, 0])
    delta = nest_delta(model, tok, neurons, DATA, TrainConfig(steps=3, lr=1e-2, batch_size=4, retain_batch_size=4, retain_weight=1.0), tie=False, progress=False)
    masks = neuron_param_masks(model, arch, neurons.selected)
    assert set(delta) == set(masks) == {arch.mlp_param(1, p) for p in ("gate", "up", "down")}
    for name, value in delta.items():
        assert torch.count_nonzero(value[~masks[name]]) == 0
    assert not torch.equal(delta[arch.mlp_param(1, "gate")][2], delta[arch.mlp_param(1, "gate")][9])


# ----------------------------------------------------------------------------- SafeSeek


def _refusing_model(tok, metric: LogOddsMetric, planted: list[int]) -> torch.nn.Module:
    """A tiny llama whose layer-1 neurons ``planted`` fire on the last template token of every
    prompt and write a direction the LM head reads as refusal: they carry the refusal."""
    model = make_model("llama", vocab_size=len(tok))
    last = int(encode_rows(tok, ["hello"])[0][0, -1])
    gen = torch.Generator().manual_seed(3)
    trigger, write = (torch.nn.functional.normalize(torch.randn(32, generator=gen), dim=0) for _ in range(2))
    with torch.no_grad():
        model.get_input_embeddings().weight[last] = 8 * trigger
        model.get_output_embeddings().weight[metric.refusal_ids] += 0.5 * write
        for j in planted:
            mlp(model, 1).gate_proj.weight[j] = 4 * trigger
            mlp(model, 1).up_proj.weight[j] = 4 * trigger
            mlp(model, 1).down_proj.weight[:, j] = 0.05 * write
    return model


def test_mask_optimization_finds_the_planted_refusal_neurons_and_removing_them_removes_refusal(tok):
    metric = LogOddsMetric(tok)
    planted = [5, 17, 42]
    model = _refusing_model(tok, metric, planted)
    with torch.no_grad():
        assert bool((refusal_log_odds(model, metric, tok, HARMFUL) > 1).all()), "the toy base refuses"
    config = SafeSeekConfig(steps=15, lr=0.2, sufficiency_weight=0.0, batch_size=4, mode="refusal", head_fraction=0.1, neuron_fraction=0.05)
    circuit = find_circuit(model, tok, HARMFUL, HARMLESS, config, progress=False)
    assert {f"L1.N{j}" for j in planted} <= set(circuit.neuron_ids())
    assert circuit.n_heads + circuit.n_neurons < (8 + 128) // 4
    with torch.no_grad(), circuit.ablated(model):
        assert bool((refusal_log_odds(model, metric, tok, HARMFUL) < 0).all()), "removing the circuit removes the refusal"
    history = circuit.meta["history"]
    assert history[-1]["necessity"] < 0.2 * history[0]["necessity"]


def test_gap_mode_lowers_the_target_excess_log_odds(tok):
    model = _strong_model("llama", tok)
    metric = LogOddsMetric(tok)
    config = SafeSeekConfig(steps=25, lr=0.2, sufficiency_weight=0.0, batch_size=4, mode="gap", head_fraction=0.2, neuron_fraction=0.1)
    circuit = find_circuit(model, tok, HARMFUL, HARMLESS, config, progress=False)

    def objective(ablate: bool) -> float:
        with torch.no_grad(), circuit.ablated(model) if ablate else nullcontext():
            values = refusal_log_odds(model, metric, tok, HARMFUL + HARMLESS)
        return float(torch.nn.functional.softplus(values[:4] - values[4:]).mean())

    assert circuit.meta["mode"] == "gap" and 0 < circuit.n_heads + circuit.n_neurons
    assert objective(True) < 0.9 * objective(False)


def test_calibrated_costs_match_the_gradient_quantiles(tok):
    model = _strong_model("qwen2", tok)
    arch = architecture_of(model)
    masks = ComponentMasks(arch, 0.5)
    masks.heads.grad = torch.arange(arch.n_layers * arch.n_heads, dtype=torch.float32).reshape(arch.n_layers, arch.n_heads)
    masks.neurons.grad = -torch.ones(arch.n_layers, arch.d_mlp)
    config = SafeSeekConfig(init_logit=0.5, head_fraction=0.25, neuron_fraction=0.01)
    heads_cost, neurons_cost = calibrate_costs(masks, config)
    slope = torch.sigmoid(torch.tensor(0.5)) * (1 - torch.sigmoid(torch.tensor(0.5)))
    assert heads_cost == pytest.approx(float(torch.quantile(masks.heads.grad.flatten(), 0.75) / slope))
    assert neurons_cost == pytest.approx(float(1 / slope))


def test_auto_mode_follows_the_base_refusal_fraction(tok):
    model = _strong_model("llama", tok)
    metric = LogOddsMetric(tok)
    assert choose_mode(model, tok, metric, HARMFUL, SafeSeekConfig(refusal_fraction=0.0))[0] == "refusal"
    assert choose_mode(model, tok, metric, HARMFUL, SafeSeekConfig(refusal_fraction=1.01))[0] == "gap"
    assert choose_mode(model, tok, metric, HARMFUL, SafeSeekConfig(mode="gap", refusal_fraction=0.0))[0] == "gap"
    with pytest.raises(CdeltaError, match="mode"):
        find_circuit(model, tok, HARMFUL, HARMLESS, SafeSeekConfig(mode="bogus"), progress=False)


def _circuit(arch) -> SafetyCircuit:
    heads = torch.zeros(arch.n_layers, arch.n_heads, dtype=torch.bool)
    heads[1, 3] = True
    return SafetyCircuit(heads, parse_neuron_ids(["L0.N7"], arch), {"mode": "gap"})


def test_circuit_parameters_and_json(tok):
    model = make_model("qwen2", vocab_size=len(tok))
    arch = architecture_of(model)
    circuit = _circuit(arch)
    masks = circuit.param_masks(model)
    hd, kv = arch.head_dim, arch.kv_head(3)
    assert masks[arch.attn_param(1, "q")].nonzero()[:, 0].unique().tolist() == list(range(3 * hd, 4 * hd))
    assert masks[arch.attn_bias_param(1, "k")].nonzero().flatten().tolist() == list(range(kv * hd, (kv + 1) * hd))
    assert masks[arch.attn_param(1, "o")].nonzero()[:, 1].unique().tolist() == list(range(3 * hd, 4 * hd))
    assert masks[arch.mlp_param(0, "gate")].nonzero()[:, 0].unique().tolist() == [7]
    assert masks[arch.mlp_param(0, "down")].nonzero()[:, 1].unique().tolist() == [7]
    back = SafetyCircuit.from_dict(circuit.to_dict(), arch)
    assert torch.equal(back.heads, circuit.heads) and torch.equal(back.neurons, circuit.neurons) and back.meta == {"mode": "gap"}


def test_circuit_tuning_touches_only_the_circuit(tok):
    model = make_model("llama", vocab_size=len(tok))
    circuit = _circuit(architecture_of(model))
    masks = circuit.param_masks(model)
    delta = circuit_tuning_delta(model, tok, circuit, DATA, TrainConfig(steps=3, lr=1e-2, batch_size=4, retain_batch_size=4, retain_weight=1.0), progress=False)
    assert set(delta) == set(masks)
    for name, value in delta.items():
        assert torch.count_nonzero(value[~masks[name]]) == 0 and value[masks[name]].abs().max() > 0
    empty = SafetyCircuit(torch.zeros_like(circuit.heads), torch.zeros_like(circuit.neurons))
    with pytest.raises(CdeltaError, match="empty"):
        circuit_tuning_delta(model, tok, empty, DATA, TrainConfig(steps=1, lr=1e-4, retain_weight=1.0), progress=False)


# ----------------------------------------------------------------------------- compare methods


@pytest.mark.parametrize("name", ["nest", "safeseek"])
def test_compare_methods_fit_edit_a_copy_and_count_changed_entries(tok, tmp_path, name):
    from cdelta.compare.base import get_method

    model = make_model("llama", vocab_size=len(tok))
    lm = LoadedModel(model, tok, "tiny", None, "0" * 64)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    options = {"steps": 2, "retain_harmless": 2, "retain_lookalike": 2, "retain_other": 1, "k_grid": [1.0, 2.0], "judge": "marker",
               "nest.z_threshold": 2.0, "nest.max_neurons": 8, "safeseek.steps": 4, "safeseek.lr": 0.3, "safeseek.head_fraction": 0.3, "safeseek.neuron_fraction": 0.1}
    context = MethodContext(lm, load_builtin(), "cybercrime", 0, tmp_path / name, log=lambda _: None, options=options, shared_dir=tmp_path / "shared")
    result = get_method(name).fit(context)
    changed = sum(int((p != before[n]).sum()) for n, p in result.model.named_parameters())
    assert result.params_touched == changed > 0
    assert result.info["k"] in (1.0, 2.0)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), "the base model must not change"
    again = get_method(name).fit(context)
    assert all(torch.equal(p, q) for p, q in zip(again.model.parameters(), result.model.parameters())), "cached refit must reproduce"


def test_unknown_method_option_is_a_clear_error(tok, tmp_path):
    from cdelta.compare.tuning import method_config

    lm = LoadedModel(make_model("llama", vocab_size=len(tok)), tok, "tiny", None, "0" * 64)
    context = MethodContext(lm, load_builtin(), "cybercrime", 0, tmp_path, options={"nest.zz": 1})
    with pytest.raises(CdeltaError, match="nest.z_threshold"):
        method_config(NestConfig, context, "nest.")
