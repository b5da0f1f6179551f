"""Edge attribution on tiny random float64 GQA models: exactness identities, agreement with edge patching, circuits."""

from __future__ import annotations

import json

import pytest
import torch
from scipy.stats import spearmanr
from conftest import CLEAN, CORRUPT, circuit_prompts, nonlinear_model

import cdelta.circuits.edge_patching as patching_mod
import cdelta.circuits.edges as edges_mod
from cdelta.circuits import Circuit, attribute, localize
from cdelta.circuits.attribution import frozen, patch_metric, prepare_pair_batch
from cdelta.circuits.edge_attribution import EdgeAttribution, attribute_edges
from cdelta.circuits.edge_patching import EdgeWeights, patch_edges, writer_acts
from cdelta.circuits.edges import edge_circuit, edge_faithfulness_curve, select_edges
from cdelta.circuits.graph import EdgeGraph, component_param_slices, node_param_slices
from cdelta.circuits.hooks import ATTN, MLP
from cdelta.circuits.metric import get_metric
from cdelta.errors import CdeltaError
from cdelta.models.architecture import architecture_of
from cdelta.models.loading import LoadedModel

POSITIONS = ["suffix", "all"]


def _batch(model, tok, n_positions="suffix"):
    arch = architecture_of(model)
    return arch, prepare_pair_batch(model, arch, tok, get_metric("logodds", tok), CLEAN, CORRUPT, n_positions)


def _edge(graph: EdgeGraph, writer: str, reader: str) -> tuple[int, int]:
    return graph.writers().index(writer), graph.readers().index(reader)


def _spec(graph: EdgeGraph, edges: list[tuple[int, int]]) -> torch.Tensor:
    spec = torch.zeros((graph.n_writers, graph.n_readers), dtype=torch.bool)
    for w, r in edges:
        spec[w, r] = True
    return spec


# ----------------------------------------------------------------------------- graph


def test_graph_of_smollm2_shape():
    """30 layers, 9 query heads, 3 kv heads: 301 writers, 481 readers, 70,651 edges."""
    g = EdgeGraph(30, 9, 3)
    writers, readers = g.writers(), g.readers()
    assert (g.n_writers, g.n_readers, g.n_edges) == (301, 481, 70651)
    assert writers[:2] == ["input", "L0.H0"] and writers[10] == "L0.MLP" and writers[-1] == "L29.MLP"
    assert readers[:10] == [f"L0.H{h}.q" for h in range(9)] + ["L0.KV0.k"]
    assert readers[12:16] == ["L0.KV0.v", "L0.KV1.v", "L0.KV2.v", "L0.MLP"] and readers[-1] == "output"
    valid = g.valid()
    w, r = writers.index("L3.H2"), readers.index
    assert not valid[w, r("L3.H0.q")] and valid[w, r("L3.MLP")] and valid[w, r("L4.KV1.k")] and valid[w, r("output")]
    assert not valid[writers.index("L3.MLP"), r("L3.MLP")] and valid[writers.index("L3.MLP"), r("L4.H8.q")]
    assert valid[0].all()  # the embeddings feed every reader
    assert g.reader_nodes(r("L5.KV1.v")) == ["L5.H3", "L5.H4", "L5.H5"]  # kv head 1 serves query heads 3..5
    assert g.reader_component(r("L5.MLP")) == "L5.MLP.in" and g.writer_component(w) == "L3.H2.o"
    assert g.reader_component(r("output")) is None and g.writer_component(0) is None


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("positions", POSITIONS)
def test_edge_scores_sum_to_node_scores(model, tok, positions):
    """Σ over readers of a node's out-edges = the node's own attribution (EAP; EAP-IG where embeddings agree)."""
    edge = attribute_edges(model, tok, CLEAN, CORRUPT, method="eap", batch_size=2, n_positions=positions)
    node = attribute(model, tok, CLEAN, CORRUPT, method="eap", batch_size=2, n_positions=positions)
    assert node.scores.abs().max() > 1e-3
    torch.testing.assert_close(edge.node_matrix(), node.scores, atol=1e-8, rtol=1e-6)
    assert list(edge.node_scores()) == list(node.node_scores())
    if positions == "suffix":
        edge = attribute_edges(model, tok, CLEAN, CORRUPT, method="eap-ig", steps=4, batch_size=2, n_positions=positions)
        node = attribute(model, tok, CLEAN, CORRUPT, method="eap-ig", steps=4, batch_size=2, n_positions=positions)
        torch.testing.assert_close(edge.node_matrix(), node.scores, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("positions", POSITIONS)
def test_eap_edges_match_finite_differences(model, tok, positions):
    """EAP(u→v) = d/dε m(x_v + ε·Δa_u) at 0, for q, k, v, MLP and output readers (only v's input moves).

    Central difference with ε = 1e-2; RMSNorm computes in float32 (relative rounding ~1e-7 of
    m, divided by 2ε), hence 0.2% relative and 2e-6 absolute tolerance.
    """
    arch, pb = _batch(model, tok, positions)
    g = EdgeGraph.of(arch)
    eap = attribute_edges(model, tok, CLEAN, CORRUPT, method="eap", batch_size=len(CLEAN), n_positions=positions)
    pairs = [("L0.H1", "L1.H2.q"), ("L0.MLP", "L1.KV1.k"), ("L0.H3", "L1.KV0.v"), ("L0.H2", "L1.MLP"), ("L0.H0", "L0.MLP"), ("L1.H0", "output")]
    if positions == "all":
        pairs.append(("input", "L0.H1.q"))  # token embeddings differ only off the suffix window
    w = EdgeWeights.of(model, arch)
    clean, corr = writer_acts(g, w, pb.clean_acts), writer_acts(g, w, pb.target)
    eps = 1e-2
    for writer, reader in pairs:
        edge = _edge(g, writer, reader)
        with frozen(model):
            # patching with source s gives reader input x - (a_clean - s): s = a_clean ± ε·Δ moves it by ±ε·Δ
            plus, minus = (patch_edges(model, arch, pb, [_spec(g, [edge])], source=clean + sign * eps * (clean - corr))[0] for sign in (1, -1))
        fd = ((plus - minus) / (2 * eps)).mean().item()
        assert abs(eap.scores[edge].item()) > 1e-5, (writer, reader)
        assert eap.scores[edge].item() == pytest.approx(fd, rel=2e-3, abs=2e-6), (writer, reader)


@pytest.mark.parametrize("positions", POSITIONS)
def test_edge_patching_reduces_to_node_and_full_patching(model, tok, positions):
    """No edge patched = clean; every edge = corrupted; every out-edge of a node = patching that node."""
    arch, pb = _batch(model, tok, positions)
    g = EdgeGraph.of(arch)
    valid = g.valid()
    head = torch.zeros(arch.n_heads, dtype=torch.bool)
    head[2] = True
    with frozen(model):
        none, every, out_head, out_mlp, into_output = patch_edges(model, arch, pb, [
            torch.zeros_like(valid), valid,
            _spec(g, [(g.writer_head(0, 2), r) for r in range(g.n_readers)]),
            _spec(g, [(g.writer_mlp(0), r) for r in range(g.n_readers)]),
            _spec(g, [(w, g.output) for w in range(g.n_writers)]),
        ], max_rows=2 * len(CLEAN))  # several specs per pass, and more than one pass
        node_head = patch_metric(model, arch, pb, {(0, ATTN): head})
        node_mlp = patch_metric(model, arch, pb, {(0, MLP): None})
    torch.testing.assert_close(none, pb.m_clean, atol=1e-9, rtol=0)
    torch.testing.assert_close(every, pb.m_corrupt, atol=1e-6, rtol=0)
    torch.testing.assert_close(into_output, pb.m_corrupt, atol=1e-6, rtol=0)
    torch.testing.assert_close(out_head, node_head, atol=1e-6, rtol=0)
    torch.testing.assert_close(out_mlp, node_mlp, atol=1e-6, rtol=0)
    assert (out_head - pb.m_clean).abs().max() > 1e-4  # the patch changes something


def test_eap_ig_scores_into_the_output_are_complete(model, tok):
    """Joint EAP-IG: Σ_u score(u → output) = m(clean) - m(corrupt) up to the Riemann error (16 steps)."""
    ig = attribute_edges(model, tok, CLEAN, CORRUPT, method="eap-ig", steps=16, batch_size=4)
    want = (ig.m_clean - ig.m_corrupt).mean().item()
    assert abs(want) > 1e-2
    assert ig.scores[:, ig.graph.output].sum().item() == pytest.approx(want, rel=1e-3)
    assert ig.scores[~ig.graph.valid()].abs().max() == 0


@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_eap_ig_correlates_with_exact_edge_patching(tok, kind, positions):
    """EAP-IG (32 steps) ranks edges like single-edge patching (Spearman >= 0.9) at the default init scale.

    The ``input`` writer is left out in ``suffix`` mode, where its edges are 0 in both (up to
    float64 rounding of the cached prefix).
    """
    model = nonlinear_model(kind, tok, std=0.02)
    exact = attribute_edges(model, tok, CLEAN, CORRUPT, method="exact", batch_size=2, n_positions=positions)
    ig = attribute_edges(model, tok, CLEAN, CORRUPT, method="eap-ig", steps=32, batch_size=2, n_positions=positions)
    edges = exact.graph.valid()
    if positions == "suffix":
        assert exact.scores[0].abs().max() < 1e-12 and ig.scores[0].abs().max() < 1e-12
        edges[0] = False
    assert spearmanr(ig.scores[edges], exact.scores[edges]).statistic >= 0.9
    torch.testing.assert_close(exact.m_clean, ig.m_clean)


def test_eap_tracks_exact_edge_patching_under_strong_nonlinearity(model, tok):
    """At init scale 0.07 a single-edge patch is still a small move of one reader's input: the
    one-gradient estimate tracks it (joint EAP-IG need not, see docs/localize.md)."""
    exact = attribute_edges(model, tok, CLEAN, CORRUPT, method="exact", batch_size=4)
    eap = attribute_edges(model, tok, CLEAN, CORRUPT, method="eap", batch_size=4)
    edges = exact.graph.valid()
    edges[0] = False
    assert spearmanr(eap.scores[edges], exact.scores[edges]).statistic >= 0.95


def test_position_chunking_and_batching_do_not_change_scores(model, tok, monkeypatch):
    whole = attribute_edges(model, tok, CLEAN, CORRUPT, method="eap-ig", steps=2, batch_size=4, n_positions="all")
    monkeypatch.setattr(patching_mod, "CHUNK_ELEMENTS", 1)  # one position per chunk, one spec per pass
    chunked = attribute_edges(model, tok, CLEAN[::-1], CORRUPT[::-1], method="eap-ig", steps=2, batch_size=4, n_positions="all")
    torch.testing.assert_close(chunked.scores, whole.scores, atol=1e-12, rtol=1e-9)
    arch, pb = _batch(model, tok, "all")
    specs = [_spec(EdgeGraph.of(arch), [(1, 4)]), EdgeGraph.of(arch).valid()]
    one_by_one = patch_edges(model, arch, pb, specs)
    monkeypatch.undo()
    for a, b in zip(one_by_one, patch_edges(model, arch, pb, specs)):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=0)


def test_bad_inputs_are_clear_errors(model, tok):
    with pytest.raises(CdeltaError, match="unknown edge attribution method"):
        attribute_edges(model, tok, CLEAN, CORRUPT, method="eap-ig-inputs")
    with pytest.raises(CdeltaError, match="equally many"):
        attribute_edges(model, tok, CLEAN, CORRUPT[:1])


def test_gemma_layout_is_refused(tok):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    gemma = Gemma2ForCausalLM(Gemma2Config(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=8))
    with pytest.raises(CdeltaError, match="node-level"):
        attribute_edges(gemma, tok, CLEAN, CORRUPT)


# ----------------------------------------------------------------------------- circuits


def _scores(arch) -> torch.Tensor:
    """Deterministic edge scores with distinct magnitudes (0 on non-edges)."""
    g = EdgeGraph.of(arch)
    n = g.n_writers * g.n_readers
    s = torch.arange(n, dtype=torch.float64).view(g.n_writers, g.n_readers)
    s = torch.where(torch.arange(n).view_as(s) % 3 == 0, -s, s) / n
    return torch.where(g.valid(), s, torch.zeros(()))


def _result(model, scores=None) -> EdgeAttribution:
    arch = architecture_of(model)
    z = torch.zeros(2, dtype=torch.float64)
    return EdgeAttribution(arch, _scores(arch) if scores is None else scores, "eap-ig", 5, {"name": "logodds"}, "suffix", z, z, 0.0)


def test_selection_modes(model):
    arch = architecture_of(model)
    g, s = EdgeGraph.of(arch), _scores(arch)
    top3 = select_edges(s, arch, "top_k:3")
    assert int(top3.sum()) == 3 and s[top3].abs().min() >= s[g.valid() & ~top3].abs().max()
    assert int(select_edges(s, arch, "top_frac:0.1").sum()) == round(0.1 * g.n_edges)
    thr = select_edges(s, arch, "threshold:0.5")
    assert torch.equal(thr, g.valid() & (s.abs() >= 0.5))
    signed = select_edges(s, arch, {"kind": "threshold", "value": 0.5, "by": "signed"})
    assert torch.equal(signed, g.valid() & (s >= 0.5))
    with pytest.raises(CdeltaError, match="needs the model"):
        select_edges(s, arch, "params:0.1")


def test_edge_components_own_exactly_their_parameter_slices(model):
    """q-only selection → only q rows; k edge → the kv head's rows and every query head of its group;
    writer edge → o columns; MLP reader/writer → gate+up / down; a head's components = the head node."""
    arch = architecture_of(model)
    g = EdgeGraph.of(arch)
    hd, d = arch.head_dim, arch.d_model
    base = edge_circuit(_result(model), "top_k:1", model)
    params = dict(model.named_parameters())

    def circuit_of(edges):
        sel = _spec(g, edges)
        meta = dict(base.meta, edges=dict(base.meta["edges"], components=edges_mod.edge_components(g, sel)))
        return Circuit(base.n_layers, base.n_heads, base.scores, edges_mod.implied_nodes(g, sel), meta)

    q_only = circuit_of([_edge(g, "input", "L1.H3.q")])
    assert q_only.nodes == ["L1.H3"] and list(q_only.param_masks(model)) == sorted(
        [arch.attn_param(1, "q")] + ([arch.attn_bias_param(1, "q")] if arch.attn_bias_param(1, "q") in params else []))
    q_mask = q_only.param_masks(model)[arch.attn_param(1, "q")]
    assert q_mask[3 * hd : 4 * hd].all() and int(q_mask.sum()) == hd * d
    k_edge = circuit_of([_edge(g, "L0.H0", "L1.KV1.k")])
    assert k_edge.nodes == ["L0.H0", "L1.H2", "L1.H3"]  # writer head, then both query heads of kv head 1
    masks = k_edge.param_masks(model)
    assert masks[arch.attn_param(1, "k")][hd:].all() and not masks[arch.attn_param(1, "k")][:hd].any()
    assert masks[arch.attn_param(0, "o")][:, :hd].all() and int(masks[arch.attn_param(0, "o")].sum()) == hd * d
    assert arch.attn_param(1, "q") not in masks and arch.attn_param(0, "q") not in masks
    mlp = circuit_of([_edge(g, "L0.MLP", "L1.MLP")]).param_masks(model)
    assert set(mlp) == {arch.mlp_param(0, "down"), arch.mlp_param(1, "gate"), arch.mlp_param(1, "up")}
    names = set(params)
    for layer, head in [(0, 0), (1, 3)]:
        parts = [f"L{layer}.H{head}.q", f"L{layer}.H{head}.o", f"L{layer}.KV{arch.kv_head(head)}.k", f"L{layer}.KV{arch.kv_head(head)}.v"]
        union = {s for c in parts for s in component_param_slices(arch, c, names)}
        assert union == set(node_param_slices(arch, f"L{layer}.H{head}", names))
    with pytest.raises(CdeltaError, match="edge component"):
        component_param_slices(arch, "L9.H0.q", names)


def test_edge_circuit_json_round_trip_and_budget(model, tmp_path):
    arch = architecture_of(model)
    result = _result(model)
    circuit = edge_circuit(result, "params:0.1", model, n_top=20, model_name="tiny")
    edges = circuit.meta["edges"]
    assert 0.05 < circuit.fraction(model) <= 0.1 and edges["n_selected"] > 0
    assert len(edges["top"]) == 20 and edges["top"][0][:2] == list(result.top(1)[0][:2])
    assert sum(edges["selected_by_reader"].values()) == edges["n_selected"]
    assert circuit.scores == result.node_scores()
    back = Circuit.from_json(circuit.to_json(tmp_path / "circuit.json"))
    assert back.meta == json.loads(json.dumps(circuit.meta)) and back.nodes == circuit.nodes
    assert back.n_params(model) == circuit.meta["n_params"]
    assert {k: v.sum() for k, v in back.param_masks(model).items()} == {k: v.sum() for k, v in circuit.param_masks(model).items()}
    node_level = back.with_nodes(back.nodes)  # re-selecting nodes gives a node circuit with whole-node parameters
    assert "edges" not in node_level.meta and node_level.n_params(model) >= back.n_params(model)
    assert "edges" not in back.select(top_k=2).meta
    small = edge_circuit(result, "top_k:2", model)
    assert small.meta["edges"]["n_selected"] == 2 and small.n_params(model) < circuit.n_params(model)
    assert arch.n_layers == small.n_layers


# ----------------------------------------------------------------------------- faithfulness and pipeline


def test_edge_faithfulness_curve(model, tok):
    ig = attribute_edges(model, tok, CLEAN, CORRUPT, method="eap", batch_size=4)
    kwargs = dict(fractions=(0.05, 0.3, 1.0), n_random=3, seed=1, batch_size=4)
    a = edge_faithfulness_curve(model, tok, CLEAN, CORRUPT, ig.scores, shuffled_scores=-ig.scores, **kwargs)
    assert a == edge_faithfulness_curve(model, tok, CLEAN, CORRUPT, ig.scores, shuffled_scores=-ig.scores, **kwargs)
    json.dumps(a)
    assert a["unit"] == "edges" and a["sizes"][-1] == a["n_edges"] == EdgeGraph.of(architecture_of(model)).n_edges
    assert a["m_all_ablated"] == pytest.approx(a["m_corrupt"], abs=1e-6)
    assert a["circuit"]["recovered"][-1] == pytest.approx(1.0, abs=1e-6)  # all edges kept = clean
    assert a["random"]["recovered"][-1] == pytest.approx([1.0] * 3, abs=1e-6)
    assert len(a["shuffled"]["recovered"]) == 3
    with pytest.raises(CdeltaError, match="patch ablation"):
        edge_faithfulness_curve(model, tok, CLEAN, CORRUPT, ig.scores, ablation="mean")


def test_localize_with_edges_writes_an_edge_circuit(tok, tmp_path):
    lm = LoadedModel(nonlinear_model("llama", tok), tok, "tiny", None, "0" * 64)
    r = localize(lm, "cybercrime", circuit_prompts(), n_pairs=4, steps=2, batch_size=2, out_dir=tmp_path, progress=False,
                 selection="top_k:5", n_random=2, fractions=(0.05, 0.5), edges=True)
    for name in ("circuit.json", "faithfulness.json", "heatmap.png", "faithfulness.png"):
        assert (tmp_path / name).stat().st_size > 0
    back = Circuit.from_json(tmp_path / "circuit.json")
    assert back.meta["edges"]["n_selected"] == 5 and back.nodes == r.circuit.nodes
    assert back.scores == pytest.approx(r.attribution.node_scores())
    assert r.n_params == back.n_params(lm.model) and r.faithfulness["unit"] == "edges"
    assert json.loads((tmp_path / "faithfulness.json").read_text())["sizes"] == r.faithfulness["sizes"]
    with pytest.raises(CdeltaError, match="unknown edge attribution method"):
        localize(lm, "cybercrime", circuit_prompts(), n_pairs=2, method="eap-ig-layer", edges=True, progress=False)
