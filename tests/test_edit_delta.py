"""ΔθC storage and application: sparse round trip, hash checks, identical results."""

import json

import torch
from transformers import AutoModelForCausalLM

import pytest

from cdelta.edit.delta import apply_sparse_deltas, apply_to_model, compose, load_sparse, save_sparse, write_edited_checkpoint
from cdelta.errors import CdeltaError
from cdelta.models.loading import load_model


def _random_delta(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    delta = {}
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        shape = dict(model.named_parameters())[name].shape
        mask = torch.rand(shape, generator=gen) < 0.1
        delta[name] = torch.randn(shape, generator=gen) * mask
    return delta


def test_sparse_round_trip_is_exact_and_byte_identical(tiny_llama_dir, tmp_path):
    lm = load_model(str(tiny_llama_dir))
    delta = _random_delta(lm.model)
    manifest = {"base_weights_sha256": lm.weights_sha256}
    save_sparse(delta, tmp_path / "a.safetensors", manifest)
    save_sparse(delta, tmp_path / "b.safetensors", manifest)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    loaded, header = load_sparse(tmp_path / "a.safetensors")
    assert header["touched"] == sum(int((d != 0).sum()) for d in delta.values())
    for name in delta:
        assert torch.equal(loaded[name], delta[name])


def test_apply_delta_matches_in_memory_edit_and_checks_hash(tiny_llama_dir, tmp_path):
    lm = load_model(str(tiny_llama_dir))
    delta = _random_delta(lm.model)
    save_sparse(delta, tmp_path / "d.safetensors", {"base_weights_sha256": lm.weights_sha256})
    apply_sparse_deltas(tiny_llama_dir, [tmp_path / "d.safetensors"], tmp_path / "edited")
    edited = AutoModelForCausalLM.from_pretrained(tmp_path / "edited")
    apply_to_model(lm.model, delta)
    for (name, a), (_, b) in zip(lm.model.named_parameters(), edited.named_parameters()):
        assert torch.equal(a, b), name
    other = tmp_path / "other"
    write_edited_checkpoint(tiny_llama_dir, {k: v * 0 + 1 for k, v in delta.items()}, other)
    with pytest.raises(CdeltaError, match="does not match"):
        apply_sparse_deltas(other, [tmp_path / "d.safetensors"], tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_compose_is_scaled_difference():
    pos = {"w": torch.tensor([1.0, 2.0, 0.0])}
    neg = {"w": torch.tensor([0.5, 2.0, 0.0])}
    assert torch.equal(compose(pos, neg, 2.0)["w"], torch.tensor([1.0, 0.0, 0.0]))


def test_head_and_mlp_slices_are_stored_as_dense_blocks(tmp_path):
    q = torch.zeros(64, 32)
    q[16:24] = torch.randn(8, 32)  # one head's rows
    o = torch.zeros(32, 64)
    o[:, 16:24] = torch.randn(32, 8)  # the same head's columns
    o[3, 20] = 0.0  # a zero inside the block stays zero and is not counted
    scattered = torch.zeros(64, 64)
    scattered.view(-1)[torch.randperm(4096)[:10]] = 1.0
    bias = torch.zeros(64)
    bias[16:24] = 1.0
    delta = {"q.weight": q, "o.weight": o, "mlp.weight": torch.randn(16, 8), "scattered.weight": scattered, "q.bias": bias}
    save_sparse(delta, tmp_path / "d.safetensors", {"base_weights_sha256": "0" * 64})
    loaded, header = load_sparse(tmp_path / "d.safetensors")
    assert header["layouts"] == {"q.weight": "block", "o.weight": "block", "mlp.weight": "block", "scattered.weight": "flat", "q.bias": "flat"}
    assert header["touched"] == sum(int((d != 0).sum()) for d in delta.values())
    for name, value in delta.items():
        assert torch.equal(loaded[name], value), name
    values_bytes = 4 * (8 * 32 + 32 * 8 + 16 * 8)
    assert (tmp_path / "d.safetensors").stat().st_size < values_bytes + 4096, "blocks cost their values, not an index per entry"


def test_format_1_files_still_load(tmp_path):
    from safetensors.torch import save_file

    dense = torch.zeros(4, 4)
    dense[1, 2], dense[3, 0] = 0.5, -2.0
    index = torch.tensor([6, 12], dtype=torch.int64)
    manifest = {"format": "cdelta-sparse-delta/1", "shapes": {"w": [4, 4]}, "touched": 2, "base_weights_sha256": "0" * 64}
    save_file({"w::indices": index, "w::values": dense.view(-1)[index]}, str(tmp_path / "v1.safetensors"), metadata={"manifest": json.dumps(manifest)})
    loaded, header = load_sparse(tmp_path / "v1.safetensors")
    assert torch.equal(loaded["w"], dense) and header["format"] == "cdelta-sparse-delta/1"


def test_typed_manifest_round_trips_the_file_bytes(tmp_path):
    from cdelta.edit.delta import DeltaManifest, SparseDelta

    delta = {"b.weight": torch.tensor([[0.0, 1.5], [0.0, -2.0]]), "a.bias": torch.tensor([0.0, 0.25, 0.0])}
    manifest = {"base_model": "tiny", "base_weights_sha256": "ab" * 32, "category": "cybercrime", "variant": "direct",
                "k": 1.0, "seed": 0, "circuit": {"nodes": ["L0.MLP"]}, "note": None}
    save_sparse(delta, tmp_path / "a.safetensors", manifest)
    loaded = SparseDelta.load(tmp_path / "a.safetensors")
    assert loaded.manifest.base_weights_sha256 == "ab" * 32 and loaded.manifest.variant == "direct"
    assert set(loaded.manifest.layouts) == {"a.bias", "b.weight"} and loaded.manifest.touched == 3
    assert loaded.manifest.to_dict() == load_sparse(tmp_path / "a.safetensors")[1]
    assert DeltaManifest.from_dict(loaded.manifest.to_dict()) == loaded.manifest
    loaded.save(tmp_path / "b.safetensors")
    assert (tmp_path / "b.safetensors").read_bytes() == (tmp_path / "a.safetensors").read_bytes()
