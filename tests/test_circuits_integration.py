"""Localization on the bundled real model (smollm2-135m): small but end to end."""

from __future__ import annotations

import json

import pytest
import torch

from cdelta.circuits import Circuit, localize
from cdelta.data.builtin import load_builtin
from cdelta.models.loading import load_model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def lm():
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    return load_model("smollm2-135m")


def test_localize_smollm2_writes_a_small_circuit(lm, tmp_path):
    result = localize(
        lm, "cybercrime", load_builtin(), n_pairs=8, steps=3, batch_size=8, seed=0, out_dir=tmp_path,
        progress=False, selection="params:0.02", n_random=2, fractions=(0.01, 0.05),
    )
    circuit = Circuit.from_json(tmp_path / "circuit.json")
    assert circuit.nodes == result.circuit.nodes and len(circuit) > 0
    assert circuit.meta["model"] == "smollm2-135m" and len(circuit.meta["weights_sha256"]) == 64
    assert circuit.meta["n_pairs"] == 8 and circuit.meta["steps"] == 3
    assert (circuit.n_layers, circuit.n_heads, len(circuit.scores)) == (30, 9, 300)
    assert 0 < result.param_fraction <= 0.05
    assert result.param_fraction == pytest.approx(circuit.fraction(lm.model))
    masks = circuit.param_masks(lm.model)
    assert sum(int(m.sum()) for m in masks.values()) == result.n_params
    curve = json.loads((tmp_path / "faithfulness.json").read_text())
    assert curve["sizes"] == [3, 15] and len(curve["random"]["recovered"][0]) == 2
    assert curve["m_all_ablated"] == pytest.approx(curve["m_corrupt"], abs=1e-3)
    for name in ("heatmap.png", "faithfulness.png"):
        assert (tmp_path / name).stat().st_size > 1000
