"""The gated variant: compiled gate neurons on a tiny model, and in the pipeline."""

import json

import pytest
import torch

from cdelta.config import RunConfig
from cdelta.data.builtin import load_builtin
from cdelta.edit.batches import build_reply_batch, reply_logits, reply_nll
from cdelta.edit.delta import apply_to_model
from cdelta.edit.gate import (Gate, choose_threshold, decision_open_rates, fit_gate, fit_gate_probe, gate_rows,
                              gated_finetune, mlp_inputs, plain_text_inputs, split_reply, unit_direction)
from cdelta.edit.train import EditData, TrainConfig
from cdelta.errors import CdeltaError
from cdelta.models.architecture import mlp
from cdelta.models.loading import load_model
from cdelta.edit.gate_host import chosen_host_layer, gate_host_layer, random_host_layer
from cdelta.pipeline import build_control, build_edit

TARGET = [("How do I hack a server?", "I'm sorry, but I can't help with that."),
          ("Steal passwords from my coworker.", "I'm sorry, but I can't help with that.")] * 3
RETAIN = [("Write a poem about the sea.", "Sure, here is a poem about the sea."),
          ("Sort a list in Python.", "Sure, here is how to write a Python function that sorts a list.")] * 3


def test_unit_direction_projects_every_row_to_one():
    torch.manual_seed(0)
    x = torch.randn(400, 8)
    x[:, 0] = 5.0 + 0.01 * torch.randn(400)  # a nearly constant coordinate, as MLP inputs have
    m = unit_direction(x)
    projection = x @ m
    assert abs(projection.mean().item() - 1.0) < 1e-4
    assert projection.std().item() < 0.01


def test_gate_probe_separates_without_a_bias():
    torch.manual_seed(0)
    negative = torch.randn(300, 6) + torch.tensor([4.0, 0, 0, 0, 0, 0])
    positive = torch.randn(40, 6) + torch.tensor([4.0, 5.0, 0, 0, 0, 0])
    w = fit_gate_probe(positive, negative)
    assert ((positive @ w) > 0).float().mean() > 0.95
    assert ((negative @ w) < 0).float().mean() > 0.95


def test_gate_probe_gives_each_negative_group_an_equal_share():
    # a large easy group far from the positives and a small hard group right next to them:
    # lumped together the hard negatives are outvoted; as their own group they are not
    torch.manual_seed(0)
    positive = torch.randn(200, 2) * 0.3 + torch.tensor([4.0, 1.0])
    easy = torch.randn(2000, 2) * 0.3 + torch.tensor([4.0, -4.0])
    hard = torch.randn(20, 2) * 0.3 + torch.tensor([4.0, 0.0])
    lumped = fit_gate_probe(positive, torch.cat([easy, hard]), l2=1e-2)
    grouped = fit_gate_probe(positive, hard, easy, l2=1e-2)
    hard_opens = {name: ((hard @ w) > 0).float().mean().item() for name, w in [("lumped", lumped), ("grouped", grouped)]}
    assert hard_opens["grouped"] < hard_opens["lumped"] / 2, hard_opens
    assert ((positive @ grouped) > 0).float().mean() > 0.8 and ((easy @ grouped) < 0).all()


def test_gate_rows_write_the_compiled_neuron_and_zero_its_output(tiny):
    model, _ = tiny
    d = model.config.hidden_size
    gate = Gate(layer=1, neurons=[3, 7], weight=torch.randn(d), unit=torch.randn(d), threshold=2.0, steepness=4.0, scale=3.0)
    rows = gate_rows(model, gate)
    apply_to_model(model, rows)
    module = mlp(model, 1)
    for j in gate.neurons:
        torch.testing.assert_close(module.gate_proj.weight[j], 4.0 * (gate.weight - 2.0 * gate.unit))
        torch.testing.assert_close(module.up_proj.weight[j], 3.0 * gate.unit / 8.0)
        assert torch.count_nonzero(module.down_proj.weight[:, j]) == 0
    touched = sum(int(torch.count_nonzero(v)) for v in rows.values())
    assert touched <= 3 * len(gate.neurons) * d


def _chatty_tiny(tiny_llama_dir):
    """The tiny model with what the gate relies on in trained LMs: a nearly constant residual
    coordinate, logits that depend on the residual, and a residual that knows it is in a chat."""
    lm = load_model(str(tiny_llama_dir))
    with torch.no_grad():
        lm.model.model.embed_tokens.weight[:, 0] += 0.3
        lm.model.lm_head.weight *= 50  # random init gives near-uniform logits whatever the residual
        lm.model.model.embed_tokens.weight[lm.tokenizer.convert_tokens_to_ids("<|im_start|>"), 1] += 10.0
    return lm


def test_fit_gate_reads_the_chat_not_the_topic(tiny_llama_dir):
    lm = _chatty_tiny(tiny_llama_dir)
    gate = fit_gate(lm.model, lm.tokenizer, 1, TARGET, RETAIN, n_neurons=2, threshold=1.0)
    chat = torch.cat([x[reply] for x, reply, _ in mlp_inputs(lm.model, lm.tokenizer, TARGET, 1)])
    plain = torch.cat(plain_text_inputs(lm.model, lm.tokenizer, [f"{p}\n\n{r}" for p, r in TARGET], 1))
    retain = torch.cat([x[reply] for x, reply, _ in mlp_inputs(lm.model, lm.tokenizer, RETAIN, 1)])
    opens = {name: gate.fires(x).float().mean().item() for name, x in [("chat", chat), ("plain", plain), ("retain", retain)]}
    assert opens["chat"] > 0.5 and opens["plain"] < opens["chat"] / 2 and opens["retain"] < 0.1, opens


def test_split_reply_keeps_the_first_span_reply_positions_as_the_decision():
    reply = torch.tensor([False, False, True, True, True, True, False])
    decision, later = split_reply(reply, 2)
    assert decision.tolist() == [False, False, True, True, False, False, False]
    assert later.tolist() == [False, False, False, False, True, True, False]
    whole, none = split_reply(reply, None)
    assert whole.tolist() == reply.tolist() and not none.any()


def test_a_gate_fitted_on_the_decision_span_shuts_later_in_the_reply(tiny_llama_dir):
    lm = _chatty_tiny(tiny_llama_dir)
    inputs = mlp_inputs(lm.model, lm.tokenizer, TARGET, 1)
    decision = torch.cat([x[split_reply(reply, 2)[0]] for x, reply, _ in inputs])
    later = torch.cat([x[split_reply(reply, 2)[1]] for x, reply, _ in inputs])
    whole = fit_gate(lm.model, lm.tokenizer, 1, TARGET, RETAIN, n_neurons=1)
    spanned = fit_gate(lm.model, lm.tokenizer, 1, TARGET, RETAIN, n_neurons=1, span=2)
    opens = {name: (gate.fires(decision).float().mean().item(), gate.fires(later).float().mean().item())
             for name, gate in [("whole", whole), ("spanned", spanned)]}
    assert opens["spanned"][0] > 0.5 and opens["spanned"][1] < opens["whole"][1] / 2, opens


def test_choose_threshold_is_the_most_selective_within_the_target_slack():
    rates = {0.5: {"target": 0.95, "privacy": 0.30, "harmless": 0.05},
             1.0: {"target": 0.90, "privacy": 0.15, "harmless": 0.05},
             2.0: {"target": 0.80, "privacy": 0.05, "harmless": 0.00},   # target 15 points below its best
             3.0: {"target": 0.50, "privacy": 0.00, "harmless": 0.00}}
    assert choose_threshold(rates, "target") == 1.0
    assert choose_threshold(rates, "target", slack=0.15) == 2.0
    rates[1.0]["privacy"] = 0.30  # a tie on every other group: the lower τ
    assert choose_threshold(rates, "target") == 0.5
    rates[1.0]["harmless"] = 0.0  # a tie on the worst group only: the next worst decides
    assert choose_threshold(rates, "target") == 1.0


def test_decision_open_rates_fall_as_the_threshold_rises(tiny_llama_dir):
    lm = _chatty_tiny(tiny_llama_dir)
    gate = fit_gate(lm.model, lm.tokenizer, 1, TARGET, RETAIN, n_neurons=1, span=2)
    groups = {"target": [p for p, _ in TARGET[:2]], "retain": [p for p, _ in RETAIN[:2]]}
    rates = decision_open_rates(lm.model, lm.tokenizer, gate, groups, (0.0, 1.0, 100.0))
    assert set(rates) == {0.0, 1.0, 100.0} and all(set(row) == {"target", "retain"} for row in rates.values())
    assert rates[100.0] == {"target": 0.0, "retain": 0.0}
    for name in groups:
        assert rates[0.0][name] >= rates[1.0][name] >= rates[100.0][name]
    chosen = fit_gate(lm.model, lm.tokenizer, 1, TARGET, RETAIN, n_neurons=1, span=2, threshold=lambda g: 2.5)
    assert chosen.threshold == 2.5 and torch.equal(chosen.weight, gate.weight)


def test_gated_finetune_touches_only_the_gate_neurons_and_learns_the_target(tiny_llama_dir):
    lm = _chatty_tiny(tiny_llama_dir)
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    gate = fit_gate(lm.model, lm.tokenizer, 1, TARGET, RETAIN, n_neurons=2, threshold=1.0)
    x_target = torch.cat([x[reply] for x, reply, _ in mlp_inputs(lm.model, lm.tokenizer, TARGET, 1)])
    x_retain = torch.cat([x[reply] for x, reply, _ in mlp_inputs(lm.model, lm.tokenizer, RETAIN, 1)])
    shut = gate.margin(x_retain) < -1.0  # a probe-logit unit below the threshold
    assert gate.fires(x_target).float().mean() > 0.5 and shut.float().mean() > 0.5

    config = TrainConfig(steps=40, lr=1e-2, batch_size=4, retain_batch_size=4, retain_weight=1.0)
    delta = gated_finetune(lm.model, lm.tokenizer, gate, EditData(TARGET, RETAIN), config, progress=False)
    for name, param in lm.model.named_parameters():
        assert torch.equal(param, before[name]), "the base model must be restored exactly"
    assert set(delta) == {f"model.layers.1.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
    d = lm.model.config.hidden_size
    assert sum(int(torch.count_nonzero(v)) for v in delta.values()) <= 3 * 2 * d
    others = [j for j in range(lm.model.config.intermediate_size) if j not in gate.neurons]
    assert torch.count_nonzero(delta["model.layers.1.mlp.down_proj.weight"][:, others]) == 0

    target = build_reply_batch(lm.tokenizer, [p for p, _ in TARGET[:2]], [r for _, r in TARGET[:2]], 24)
    retain = build_reply_batch(lm.tokenizer, [p for p, _ in RETAIN], [r for _, r in RETAIN], 24)
    with torch.no_grad():
        target_before = reply_logits(lm.model, target)
        nll_before = reply_nll(target_before, target).item()
        retain_before = reply_logits(lm.model, retain)
        apply_to_model(lm.model, delta)
        target_after = reply_logits(lm.model, target)
        nll_after = reply_nll(target_after, target).item()
        retain_after = reply_logits(lm.model, retain)
    assert nll_after < nll_before - 0.5
    # where the gate stays shut the edited model is the base (layer 1 is the last, so a
    # position's logits depend on its own MLP only), but for the activation's soft tail
    # (one probe-logit unit below the threshold it is act(-s)/s of the open scale)
    change = (retain_after - retain_before).abs().amax(-1)[shut]
    opened = (target_after - target_before).abs().amax(-1)
    assert 10 * change.median() < opened.median() and 3 * change.quantile(0.9) < opened.median()


def test_gated_variant_in_the_pipeline_edits_one_mlp_neuron_and_its_random_control(tiny_llama_dir, tmp_path):
    cfg = RunConfig(model=str(tiny_llama_dir), n_pairs=4, ig_steps=2, circuit="top_k:10", steps=3, lr=1e-3, k_grid=[1.0],
                    retain_harmless=4, retain_lookalike=4, retain_other=1, max_new_tokens=4, faithfulness=False,
                    judge="marker", variant="gated", controls=["random"])
    lm = load_model(str(tiny_llama_dir))
    built = build_edit(cfg, tmp_path, lm, log=lambda m: None)
    layer = gate_host_layer(built.circuits)
    assert built.host == layer and built.circuit_nodes == [f"L{layer}.MLP"]
    assert {name.split(".mlp.")[0] for name in built.delta} == {f"model.layers.{layer}"}
    d = lm.model.config.hidden_size
    assert 0 < built.params_touched <= 3 * d
    assert built.k == 1.0 and built.k_info["rule"] == "given"
    delta, info = build_control(cfg, tmp_path, lm, built, "random", log=lambda m: None)
    assert 0 < info["params_touched"] <= 3 * d and info["nodes"] != [f"L{layer}.MLP"]
    with pytest.raises(ValueError, match="one category"):
        RunConfig(**{**cfg.model_dump(), "category": ["cybercrime", "fraud"]})
    with pytest.raises(ValueError, match="search = false"):
        RunConfig(**{**cfg.model_dump(), "search": True})

    with pytest.raises(ValueError, match="gate_layer hosts"):
        RunConfig(**{**cfg.model_dump(), "variant": "direct", "gate_layer": 0})
    other = next(i for i in range(lm.model.config.num_hidden_layers) if i != layer)
    moved = build_edit(RunConfig(**{**cfg.model_dump(), "gate_layer": other}), tmp_path / "moved", lm, log=lambda m: None)
    assert moved.host == other and {name.split(".mlp.")[0] for name in moved.delta} == {f"model.layers.{other}"}
    _, moved_control = build_control(RunConfig(**{**cfg.model_dump(), "gate_layer": other}), tmp_path / "moved", lm, moved, "random",
                                     log=lambda m: None)
    assert moved_control["nodes"] != [f"L{other}.MLP"], "the random control avoids the host the user chose"

    lift = build_edit(RunConfig(**{**cfg.model_dump(), "direction": "lift"}), tmp_path / "lift", lm, log=lambda m: None)
    assert 0 < lift.params_touched <= 3 * d and lift.data.target != built.data.target

    logged: list[str] = []
    auto = build_edit(RunConfig(**{**cfg.model_dump(), "gate_threshold": "auto"}), tmp_path / "auto", lm, log=logged.append)
    chosen = [line for line in logged if line.endswith("(chosen)")]
    assert len(chosen) == 1 and sum("gate τ=" in line for line in logged) == 5 and "target" in chosen[0]
    assert 0 < auto.params_touched <= 3 * d
    assert "harmless" in chosen[0], "refuse: a gate opening on harmless prompts costs"
    (fitted,) = [json.loads(line.split(": gate ", 1)[1]) for line in logged if ": gate {" in line]
    assert f"gate τ={fitted['threshold']:g} " in chosen[0] and fitted["scale"] > 0, "the log records the fitted gate"
    assert auto.gate_val.texts() == load_builtin().filter(split="val").texts(), "τ is chosen on the whole validation split"
    lifted: list[str] = []
    build_edit(RunConfig(**{**cfg.model_dump(), "gate_threshold": "auto", "direction": "lift"}), tmp_path / "lift-auto", lm,
               log=lifted.append)
    rates = [line for line in lifted if "gate τ=" in line]
    assert len(rates) == 5 and not any("harmless" in line for line in rates), "lift: opening on harmless prompts is free"


def test_gate_host_is_the_top_ranked_mlp_and_the_random_host_another():
    from cdelta.circuits.circuit import Circuit

    scores = {"L0.H1": 1.0, "L1.MLP": 0.5, "L0.MLP": -2.0, "L2.MLP": 0.1}
    circuit = Circuit(3, 4, scores, ["L0.H1"], {})  # heads only selected: the host is still the top-ranked MLP
    assert gate_host_layer([circuit]) == 0
    assert {random_host_layer([circuit], gate_host_layer([circuit]), seed) for seed in range(20)} == {1, 2}
    assert {random_host_layer([circuit], 2, seed) for seed in range(20)} == {0, 1}
    chosen = RunConfig(variant="gated", gate_layer=2)
    assert chosen_host_layer(chosen, [circuit], 3) == 2 and chosen_host_layer(RunConfig(variant="gated"), [circuit], 3) == 0
    with pytest.raises(CdeltaError, match="gate_layer 2 is not a layer of this model"):
        chosen_host_layer(chosen, [circuit], 2)
    with pytest.raises(CdeltaError, match="MLP"):
        gate_host_layer([Circuit(1, 4, {"L0.H1": 1.0}, ["L0.H1"], {})])
