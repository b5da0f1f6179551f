"""Circuit localization on tiny random GQA models: attribution correctness, circuits, controls."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CLEAN, CORRUPT, circuit_prompts, make_model, make_tokenizer, nonlinear_model
from scipy.stats import spearmanr

from cdelta.circuits import Circuit, attribute, faithfulness_curve, get_metric, localize, node_ids, parse_selection
from cdelta.circuits.attribution import (
    frozen,
    integrated_gradients,
    iter_pair_batches,
    patch_metric,
    patch_metrics,
    prepare_pair_batch,
    template_prefix_len,
    template_suffix_len,
)
from cdelta.circuits.circuit import total_params
from cdelta.circuits.faithfulness import random_nodes
from cdelta.circuits.hooks import ATTN, MLP, Recorder, run_with_handler
from cdelta.circuits.localize import shuffled_pairs
from cdelta.circuits.metric import encode_rows, opener_token_sets
from cdelta.errors import CdeltaError
from cdelta.models.architecture import architecture_of
from cdelta.models.loading import LoadedModel

POSITIONS = ["suffix", "all"]


def _batch(model, tok, metric="logodds", n_positions="suffix"):
    arch = architecture_of(model)
    return arch, prepare_pair_batch(model, arch, tok, get_metric(metric, tok), CLEAN, CORRUPT, n_positions)


# ----------------------------------------------------------------------------- metric


def test_opener_token_sets_are_disjoint_and_nonempty(tok):
    refusal, compliance = opener_token_sets(tok)
    assert refusal and compliance
    assert not set(refusal) & set(compliance)
    assert len(set(refusal)) == len(refusal)


def test_teacher_forced_metric_matches_manual_logprobs(model, tok):
    metric = get_metric("teacher-forced", tok)
    enc = metric.encode(tok, CLEAN[:2])
    with torch.no_grad():
        got = metric(model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, logits_to_keep=metric.logits_to_keep).logits, enc)
    for i, prompt in enumerate(CLEAN[:2]):
        means = []
        for reply in (metric.refusal_ids, metric.compliance_ids):
            ids, mask = encode_rows(tok, [prompt], [reply])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            c = len(reply)
            means.append(torch.stack([logp[ids.shape[1] - c - 1 + t, reply[t]] for t in range(c)]).mean())
        assert got[i].item() == pytest.approx((means[0] - means[1]).item(), abs=1e-5)


# ----------------------------------------------------------------------------- hooks and alignment


def test_prefix_cache_run_equals_full_run(model, tok):
    arch, pb = _batch(model, tok)
    metric = pb.metric
    with torch.no_grad():
        full = metric(model(input_ids=pb.clean.input_ids, attention_mask=pb.clean.attention_mask, logits_to_keep=1).logits, pb.clean)
    assert pb.input_ids.shape[1] < pb.clean.input_ids.shape[1]  # the shared template prefix is cached
    torch.testing.assert_close(pb.m_clean, full, atol=1e-9, rtol=0)


def test_window_excludes_template_prefix_and_is_aligned_from_the_end(model, tok):
    arch, pb = _batch(model, tok, n_positions="all")
    p = template_prefix_len(tok)
    lengths = torch.minimum(pb.clean.lengths, prepare_pair_batch(model, arch, tok, pb.metric, CORRUPT, CORRUPT).clean.lengths)
    assert p > 0
    assert pb.window.sum(1).tolist() == (lengths - p).tolist()
    assert pb.window[:, -1].all()  # last prompt token always patched
    _, last3 = _batch(model, tok, n_positions=3)
    assert last3.window.sum(1).tolist() == [3] * len(CLEAN) and last3.input_ids.shape[1] == 3


def test_suffix_window_covers_exactly_the_shared_closing_tokens(model, tok):
    arch, pb = _batch(model, tok, n_positions="suffix")
    k = template_suffix_len(tok)
    assert k > 0 and pb.window.sum(1).tolist() == [k] * len(CLEAN)
    ids = pb.input_ids[:, -k:]
    assert (ids == ids[:1]).all()  # same tokens in every row: only context differs
    _, tf = _batch(model, tok, metric="teacher-forced", n_positions="suffix")
    widths = tf.window.sum(1).tolist()
    metric = tf.metric
    assert widths == [k + len(metric.refusal_ids)] * len(CLEAN) + [k + len(metric.compliance_ids)] * len(CLEAN)
    with pytest.raises(CdeltaError, match="n_positions"):
        attribute(model, tok, CLEAN, CORRUPT, n_positions="middle")


@pytest.mark.parametrize("positions", POSITIONS)
def test_patching_every_node_reproduces_the_corrupted_metric(model, tok, positions):
    """All nodes patched in the window ⇒ final residual at the last position is the corrupted one."""
    arch, pb = _batch(model, tok, n_positions=positions)
    every = {(layer, kind): None for layer in range(arch.n_layers) for kind in (ATTN, MLP)}
    with frozen(model):
        m = patch_metric(model, arch, pb, every)
    torch.testing.assert_close(m, pb.m_corrupt, atol=1e-9, rtol=0)


@pytest.mark.parametrize("positions", POSITIONS)
def test_batched_patching_equals_one_spec_per_pass(model, tok, positions):
    arch, pb = _batch(model, tok, n_positions=positions)
    heads = torch.tensor([True, False, True, False])
    specs = [{}, {(0, ATTN): heads}, {(1, MLP): None, (0, ATTN): None}, {(1, ATTN): ~heads}, {(0, MLP): None}]
    with frozen(model):
        one = [patch_metric(model, arch, pb, spec) for spec in specs]
        many = patch_metrics(model, arch, pb, specs, max_rows=3 * len(CLEAN))  # two passes: 3 specs + 2 specs
    for a, b in zip(one, many):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=0)
    torch.testing.assert_close(many[0], pb.m_clean, atol=1e-9, rtol=0)


@pytest.mark.parametrize("positions", POSITIONS)
def test_hook_gradients_match_finite_differences(model, tok, positions):
    """EAP scores are (a_clean - a_corr)·∂m/∂a at clean; compare with a central difference along that direction.

    The model runs in float64 but transformers' RMSNorm computes in float32, so the step
    cannot be tiny: eps = 1e-2 of the clean-corrupted difference (central difference,
    O(eps^2) truncation), tolerance 0.2%.
    """
    arch, pb = _batch(model, tok, n_positions=positions)
    eap = attribute(model, tok, CLEAN, CORRUPT, method="eap", batch_size=len(CLEAN), n_positions=positions)
    eps = 1e-2
    for layer, head in [(0, 1), (1, 3), (1, None)]:
        site = (layer, ATTN if head is not None else MLP)
        heads = None
        if head is not None:
            heads = torch.zeros(arch.n_heads, dtype=torch.bool)
            heads[head] = True
        delta = pb.clean_acts[site] - pb.target[site]
        with frozen(model):
            plus = patch_metric(model, arch, pb, {site: heads}, {site: pb.clean_acts[site] + eps * delta})
            minus = patch_metric(model, arch, pb, {site: heads}, {site: pb.clean_acts[site] - eps * delta})
        fd = ((plus - minus) / (2 * eps)).mean().item()
        col = arch.n_heads if head is None else head
        assert eap.scores[layer, col].item() == pytest.approx(fd, rel=2e-3, abs=1e-7), (layer, head)


# ----------------------------------------------------------------------------- attribution quality


@pytest.mark.parametrize("positions", POSITIONS)
def test_eap_ig_correlates_with_exact_patching(model, tok, positions):
    """Both IG variants track exact single-node patching (10 nodes; Spearman >= 0.9 at 32 steps).

    The joint variant (default ``eap-ig``) integrates along the path on which *all* nodes
    move together, so it is not an estimator of single-node patching and only agrees
    while interactions are mild; ``eap-ig-layer`` converges to it per layer-cut.
    """
    exact = attribute(model, tok, CLEAN, CORRUPT, method="exact", batch_size=2, n_positions=positions)
    for method in ("eap-ig", "eap-ig-layer"):
        ig = attribute(model, tok, CLEAN, CORRUPT, method=method, steps=32, batch_size=2, n_positions=positions)
        rho = spearmanr(ig.scores.flatten(), exact.scores.flatten()).statistic
        assert rho >= 0.9, (method, rho)
        torch.testing.assert_close(exact.m_clean, ig.m_clean)


@pytest.mark.parametrize("positions", POSITIONS)
def test_single_node_ig_is_complete(model, tok, positions):
    """IG with only one node interpolated sums to m(clean) - m(that node patched)."""
    arch, pb = _batch(model, tok, n_positions=positions)
    with frozen(model):
        for layer, head in [(0, 0), (1, 2), (0, None)]:
            site = (layer, ATTN if head is not None else MLP)
            heads = None
            if head is not None:
                heads = torch.zeros(arch.n_heads, dtype=torch.bool)
                heads[head] = True
            contrib = integrated_gradients(model, arch, pb, 32, {site: heads})[site]
            ig = (contrib[:, head] if head is not None else contrib).sum().item()
            want = (pb.m_clean - patch_metric(model, arch, pb, {site: heads})).sum().item()
            assert ig == pytest.approx(want, rel=2e-3, abs=1e-6)


@pytest.mark.parametrize("positions", POSITIONS)
def test_layer_cut_ig_is_complete(model, tok, positions):
    """IG over all heads of one layer (a cut of the residual stream) sums to the cut's patching effect."""
    arch, pb = _batch(model, tok, n_positions=positions)
    site = (0, ATTN)
    with frozen(model):
        contrib = integrated_gradients(model, arch, pb, 32, {site: None})[site]
        want = (pb.m_clean - patch_metric(model, arch, pb, {site: None})).sum().item()
    assert contrib.sum().item() == pytest.approx(want, rel=2e-3, abs=1e-6)


def test_methods_agree_on_shapes_and_clean_metric(model, tok):
    arch = architecture_of(model)
    results = {m: attribute(model, tok, CLEAN, CORRUPT, method=m, steps=2, batch_size=3) for m in ("eap", "eap-ig", "eap-ig-inputs", "eap-ig-layer")}
    for r in results.values():
        assert r.scores.shape == (arch.n_layers, arch.n_heads + 1)
        assert r.per_example.shape == (len(CLEAN), arch.n_layers, arch.n_heads + 1)
        assert torch.isfinite(r.scores).all()
        assert list(r.node_scores()) == node_ids(arch)


def test_teacher_forced_attribution_runs(model, tok):
    r = attribute(model, tok, CLEAN[:2], CORRUPT[:2], method="eap-ig", steps=2, metric="teacher-forced")
    assert torch.isfinite(r.scores).all() and r.metric["name"] == "teacher-forced"


def test_attribution_is_deterministic_and_order_independent(model, tok):
    a = attribute(model, tok, CLEAN, CORRUPT, method="eap-ig", steps=3, batch_size=3)
    b = attribute(model, tok, CLEAN[::-1], CORRUPT[::-1], method="eap-ig", steps=3, batch_size=3)
    torch.testing.assert_close(a.per_example, b.per_example.flip(0), atol=1e-9, rtol=1e-7)


def test_bad_inputs_are_clear_errors(model, tok):
    with pytest.raises(CdeltaError, match="unknown attribution method"):
        attribute(model, tok, CLEAN, CORRUPT, method="acdc")
    with pytest.raises(CdeltaError, match="unknown metric"):
        attribute(model, tok, CLEAN, CORRUPT, metric="kl")
    with pytest.raises(CdeltaError, match="equally many"):
        attribute(model, tok, CLEAN, CORRUPT[:2])


# ----------------------------------------------------------------------------- circuit


def _circuit(model, **meta) -> Circuit:
    arch = architecture_of(model)
    scores = {n: float(i % 7 - 3) * (1 + i / 100) for i, n in enumerate(node_ids(arch))}
    return Circuit.from_scores(arch, scores, model="tiny", weights_sha256="0" * 64, method="eap-ig", steps=5,
                               metric={"name": "logodds"}, seed=0, category="cybercrime", **meta)


def test_circuit_json_round_trip(model, tmp_path):
    circuit = _circuit(model).select(top_k=3, model=model)
    path = circuit.to_json(tmp_path / "c" / "circuit.json")
    assert [p.name for p in path.parent.iterdir()] == ["circuit.json"]  # no temp file left behind
    data = json.loads(path.read_text())
    for key in ("model", "weights_sha256", "method", "steps", "metric", "seed", "category", "selection", "cdelta_version", "nodes", "scores"):
        assert key in data
    back = Circuit.from_json(path)
    assert back.nodes == circuit.nodes and back.scores == circuit.scores and back.meta == circuit.meta
    assert back.ranked() == circuit.ranked()
    with pytest.raises(CdeltaError, match="does not exist"):
        Circuit.from_json(tmp_path / "missing.json")


def test_selection_modes(model):
    c = _circuit(model)
    ranked = c.ranked()
    assert c.select(top_k=4).nodes == ranked[:4]
    assert len(c.select(top_frac=0.2).nodes) == 2
    assert all(abs(c.scores[n]) >= 3 for n in c.select(threshold=3).nodes)
    assert c.select(threshold=3, by="signed").nodes == [n for n in c.ranked("signed") if c.scores[n] >= 3]
    budget = c.select(param_budget=0.1, model=model)
    assert 0.05 < budget.fraction(model) <= 0.1 and len(budget) > 0
    assert budget.meta["n_params"] == budget.n_params(model)
    skipped = [n for n in c.ranked() if n not in budget.nodes]
    assert skipped and budget.nodes == [n for n in c.ranked() if n in budget.nodes]
    assert parse_selection("params:0.05") == {"kind": "params", "value": 0.05}
    assert c.select_spec("top_k:2").nodes == ranked[:2]
    with pytest.raises(CdeltaError):
        parse_selection("top:3")
    with pytest.raises(CdeltaError):
        c.select(top_k=1, top_frac=0.1)


def test_param_masks_count_shared_gqa_rows_once(model):
    arch = architecture_of(model)
    hd, d, group = arch.head_dim, arch.d_model, arch.group_size
    assert group == 2
    params = dict(model.named_parameters())
    has_bias = arch.attn_bias_param(0, "q") in params
    c = _circuit(model).with_nodes(["L0.H0", "L0.H1"])  # both query heads read kv head 0
    masks = c.param_masks(model)
    k_mask = masks[arch.attn_param(0, "k")]
    assert k_mask[:hd].all() and not k_mask[hd:].any()
    assert masks[arch.attn_param(0, "o")][:, : 2 * hd].all() and not masks[arch.attn_param(0, "o")][:, 2 * hd :].any()
    per_q = hd * d + (hd if has_bias else 0)
    per_kv = hd * d + (hd if has_bias else 0)
    expected = 2 * per_q + 2 * hd * d + 2 * per_kv  # two q blocks, two o blocks, one k block, one v block
    assert c.n_params(model) == expected
    one = c.with_nodes(["L0.H0"]).n_params(model)
    assert one == per_q + hd * d + 2 * per_kv
    mlp = c.with_nodes(["L1.MLP"])
    assert mlp.n_params(model) == 3 * d * arch.d_mlp
    assert c.fraction(model) == pytest.approx(expected / total_params(model))
    slices = c.param_slices(model)
    assert slices[arch.attn_param(0, "k")] == [(0, 0, hd)]
    assert slices[arch.attn_param(0, "q")] == [(0, 0, hd), (0, hd, 2 * hd)]


def test_tied_embeddings_counted_once(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True))
    names = dict(model.named_parameters(remove_duplicate=False))
    assert total_params(model) == sum(p.numel() for n, p in names.items() if n != "lm_head.weight")


# ----------------------------------------------------------------------------- controls and faithfulness


def test_controls_are_deterministic(model, tok):
    arch = architecture_of(model)
    shape = (arch.n_layers, arch.n_heads + 1)
    assert torch.equal(random_nodes(shape, 3, 7), random_nodes(shape, 3, 7))
    assert int(random_nodes(shape, 3, 7).sum()) == 3
    assert shuffled_pairs(CLEAN, CORRUPT, 0) == shuffled_pairs(CLEAN, CORRUPT, 0)
    assert shuffled_pairs(CLEAN, CORRUPT, 0) != shuffled_pairs(CLEAN, CORRUPT, 1)
    scores = attribute(model, tok, CLEAN, CORRUPT, method="eap", batch_size=4).scores
    s_clean, s_corrupt = shuffled_pairs(CLEAN, CORRUPT, 0)
    shuffled = attribute(model, tok, s_clean, s_corrupt, method="eap", batch_size=4).scores
    kwargs = dict(shuffled_scores=shuffled, fractions=(0.1, 0.3, 0.5), n_random=5, seed=3, batch_size=4)
    a = faithfulness_curve(model, tok, CLEAN, CORRUPT, scores, **kwargs)
    b = faithfulness_curve(model, tok, CLEAN, CORRUPT, scores, **kwargs)
    assert a == b
    json.dumps(a)
    assert len(a["random"]["recovered"]) == 3 and all(len(r) == 5 for r in a["random"]["recovered"])
    assert a["shuffled"] is not None and a["sizes"] == [1, 3, 5]
    assert a["m_all_ablated"] == pytest.approx(a["m_corrupt"], abs=1e-9)
    full = faithfulness_curve(model, tok, CLEAN, CORRUPT, scores, fractions=(1.0,), n_random=2, batch_size=4)
    assert full["circuit"]["recovered"][0] == pytest.approx(1.0, abs=1e-9)
    mean = faithfulness_curve(model, tok, CLEAN, CORRUPT, scores, fractions=(0.3,), n_random=2, batch_size=4, ablation="mean")
    assert mean["ablation"] == "mean" and all(v == v for v in mean["circuit"]["recovered"])


# ----------------------------------------------------------------------------- pipeline


def test_localize_writes_outputs(tok, tmp_path):
    lm = LoadedModel(nonlinear_model("llama", tok), tok, "tiny", None, "0" * 64)
    r = localize(lm, "cybercrime", circuit_prompts(), n_pairs=4, steps=2, batch_size=2, out_dir=tmp_path, progress=False,
                 selection="top_k:2", n_random=2, fractions=(0.1, 0.5))
    for name in ("circuit.json", "faithfulness.json", "heatmap.png", "faithfulness.png"):
        assert (tmp_path / name).stat().st_size > 0
    back = Circuit.from_json(tmp_path / "circuit.json")
    assert back.nodes == r.circuit.nodes and len(back) == 2
    assert back.meta["category"] == "cybercrime" and back.meta["weights_sha256"] == "0" * 64
    assert 0 < r.param_fraction < 1 and r.n_params == back.meta["n_params"]
    again = localize(lm, "cybercrime", circuit_prompts(), n_pairs=4, steps=2, batch_size=2, progress=False, selection="top_k:2",
                     n_random=2, fractions=(0.1, 0.5))
    assert again.circuit.scores == r.circuit.scores and again.faithfulness == r.faithfulness
    harmless = localize(lm, "cybercrime", circuit_prompts(), contrast="harmless", n_pairs=2, steps=1, progress=False, faithfulness=False)
    assert harmless.faithfulness is None and all(k.startswith("harmless") for _, k in harmless.pairs)


def test_localize_unknown_category_lists_categories(tok):
    lm = LoadedModel(make_model("llama", vocab_size=len(tok)), tok, "tiny", None, "0" * 64)
    with pytest.raises(CdeltaError, match="unknown category 'nope'") as err:
        localize(lm, "nope", circuit_prompts(), progress=False)
    assert "cybercrime" in err.value.fix and "weapons" in err.value.fix
    with pytest.raises(CdeltaError, match="unknown contrast"):
        localize(lm, "cybercrime", circuit_prompts(), contrast="nothing", progress=False)


def test_recorder_sees_every_node_site(model, tok):
    arch = architecture_of(model)
    ids, mask = encode_rows(tok, CLEAN[:2])
    rec = Recorder()
    with torch.no_grad():
        run_with_handler(model, arch, ids, mask, 1, rec)
    assert rec.acts[(0, ATTN)].shape == (2, ids.shape[1], arch.n_heads, arch.head_dim)
    assert rec.acts[(1, MLP)].shape == (2, ids.shape[1], arch.d_model)


def test_iter_pair_batches_covers_all_pairs(model, tok):
    arch = architecture_of(model)
    seen = []
    for idx, pb in iter_pair_batches(model, arch, tok, get_metric("logodds", tok), CLEAN, CORRUPT, 3, None):
        seen += idx
        assert pb.n_examples == len(idx)
    assert sorted(seen) == list(range(len(CLEAN)))
