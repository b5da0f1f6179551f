"""Composing several ΔθC: `cdelta apply-delta BASE D1 D2 ... OUT` sums deltas made from one base."""

import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from cdelta import cli
from cdelta.edit.delta import apply_sparse_deltas, save_sparse, sum_deltas
from cdelta.errors import CdeltaError
from cdelta.models.loading import load_model

SHARED = "model.layers.0.self_attn.q_proj.weight"


def _delta(model, names, seed) -> dict[str, torch.Tensor]:
    """Random values on ~30% of the entries of ``names``."""
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    return {n: torch.randn(params[n].shape, generator=gen) * (torch.rand(params[n].shape, generator=gen) < 0.3) for n in names}


def _saved_pair(tiny_llama_dir, tmp_path):
    lm = load_model(str(tiny_llama_dir))
    d1 = _delta(lm.model, [SHARED, "model.layers.1.mlp.down_proj.weight"], seed=1)
    d2 = _delta(lm.model, [SHARED, "model.layers.0.mlp.up_proj.weight"], seed=2)
    for name, delta, category, direction in (("d1", d1, "cybercrime", "refuse"), ("d2", d2, "lookalike", "lift")):
        save_sparse(delta, tmp_path / f"{name}.safetensors",
                    {"base_weights_sha256": lm.weights_sha256, "base_model": "tiny", "category": category, "direction": direction, "k": 1.0})
    return lm, d1, d2


def test_sum_deltas_adds_values_and_counts_shared_entries():
    a = {"w": torch.tensor([1.0, 0.0, 2.0, 0.0]), "v": torch.tensor([0.5])}
    b = {"w": torch.tensor([3.0, 4.0, 0.0, 0.0])}
    c = {"w": torch.tensor([1.0, 0.0, 0.0, 0.0]), "u": torch.tensor([2.0])}
    total, overlap = sum_deltas([a, b, c])
    assert torch.equal(total["w"], torch.tensor([5.0, 4.0, 2.0, 0.0])) and set(total) == {"w", "v", "u"}
    assert overlap == 1, "entry 0 is touched three times: one overlapping entry"
    assert torch.equal(a["w"], torch.tensor([1.0, 0.0, 2.0, 0.0])), "inputs untouched"
    assert sum_deltas([a])[1] == 0


def test_composing_equals_applying_d1_then_adding_d2(tiny_llama_dir, tmp_path):
    lm, d1, d2 = _saved_pair(tiny_llama_dir, tmp_path)
    info = apply_sparse_deltas(tiny_llama_dir, [tmp_path / "d1.safetensors", tmp_path / "d2.safetensors"], tmp_path / "both")
    apply_sparse_deltas(tiny_llama_dir, [tmp_path / "d1.safetensors"], tmp_path / "first")

    both = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "both").named_parameters())
    first = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "first").named_parameters())
    base = dict(lm.model.named_parameters())
    for name, param in both.items():
        torch.testing.assert_close(param, first[name] + d2.get(name, 0), rtol=1e-6, atol=1e-6)
        if name not in d1 and name not in d2:
            assert torch.equal(param, base[name]), name

    expected_overlap = int(((d1[SHARED] != 0) & (d2[SHARED] != 0)).sum())
    assert expected_overlap > 0 and info["overlap_entries"] == expected_overlap
    union = {n: (d1[n] != 0) if n in d1 else torch.zeros_like(d2[n], dtype=torch.bool) for n in set(d1) | set(d2)}
    for n, value in d2.items():
        union[n] |= value != 0
    assert info["params_touched"] == sum(int(m.sum()) for m in union.values())
    assert info["params_total"] == sum(p.numel() for p in lm.model.parameters())
    assert (info["category"], info["direction"]) == ("cybercrime+lookalike", "refuse+lift")
    card = (tmp_path / "both" / "README.md").read_text()
    assert lm.weights_sha256 in card and "cybercrime+lookalike" in card and '"overlap_entries"' in card


def test_deltas_from_different_bases_are_refused(tiny_llama_dir, tmp_path):
    lm, _, d2 = _saved_pair(tiny_llama_dir, tmp_path)
    save_sparse(d2, tmp_path / "other.safetensors", {"base_weights_sha256": "f" * 64})
    with pytest.raises(CdeltaError, match="different base weights.*other.safetensors"):
        apply_sparse_deltas(tiny_llama_dir, [tmp_path / "d1.safetensors", tmp_path / "other.safetensors"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_composes_several_deltas(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    _, d1, d2 = _saved_pair(tiny_llama_dir, tmp_path)
    overlap = int(((d1[SHARED] != 0) & (d2[SHARED] != 0)).sum())
    argv = ["cdelta", "apply-delta", str(tiny_llama_dir), str(tmp_path / "d1.safetensors"), str(tmp_path / "d2.safetensors"), str(tmp_path / "out")]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as done:
        cli.main()
    assert done.value.code == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert f"{overlap:,} entries touched by more than one delta" in printed
    assert (tmp_path / "out" / "config.json").is_file()
