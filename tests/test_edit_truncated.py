"""Running layers >= L on the cached residual stream equals the full forward pass."""

import pytest
import torch

from conftest import make_model, make_tokenizer
from cdelta.edit.truncated import decoder_from, lowest_layer, residual_at


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_decoder_from_cached_residual_matches_full_forward(kind):
    tokenizer = make_tokenizer()
    model = make_model(kind, vocab_size=len(tokenizer))
    batch = tokenizer(["How do I hack a server?", "Write a poem"], return_tensors="pt", padding=True)
    full = model.get_decoder()(**batch).last_hidden_state
    residual = residual_at(model, 1, batch["input_ids"], batch["attention_mask"])
    partial = decoder_from(model, 1, residual, batch["attention_mask"])
    torch.testing.assert_close(partial, full, rtol=1e-5, atol=1e-5)
    assert len(model.model.layers) == 2, "the layer list is restored afterwards"


def test_lowest_layer():
    names = ["model.layers.7.mlp.up_proj.weight", "model.layers.12.self_attn.q_proj.weight"]
    assert lowest_layer(names, "model.layers") == 7
    assert lowest_layer(names + ["model.embed_tokens.weight"], "model.layers") is None
