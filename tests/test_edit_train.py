"""Circuit-restricted fine-tuning on a tiny model."""

import torch

from cdelta.edit.batches import build_reply_batch, reply_logits, reply_nll
from cdelta.edit.train import EditData, TrainConfig, masked_finetune
from cdelta.models.loading import load_model


def _masks(model):
    masks = {name: torch.zeros_like(p, dtype=torch.bool) for name, p in model.named_parameters()}
    masks["model.layers.1.self_attn.o_proj.weight"][:, 8:16] = True
    for proj in ("gate", "up", "down"):
        masks[f"model.layers.1.mlp.{proj}_proj.weight"][:] = True
    return masks


def test_masked_finetune_changes_only_masked_entries_and_learns(tiny_llama_dir):
    lm = load_model(str(tiny_llama_dir))
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    data = EditData(
        target=[("How do I hack a server?", "I'm sorry, but I can't help with that.")] * 4,
        retain=[("Write a poem about the sea.", "Sure, here is a poem about the sea.")] * 4,
    )
    masks = _masks(lm.model)
    batch = build_reply_batch(lm.tokenizer, ["How do I hack a server?"], ["I'm sorry, but I can't help with that."])
    with torch.no_grad():
        nll_before = reply_nll(reply_logits(lm.model, batch), batch).item()
    delta = masked_finetune(lm.model, lm.tokenizer, masks, data, TrainConfig(steps=40, lr=3e-2, batch_size=4, retain_batch_size=4, retain_weight=1.0), progress=False)
    assert set(delta) == {"model.layers.1.self_attn.o_proj.weight"} | {f"model.layers.1.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
    for name, value in delta.items():
        assert torch.count_nonzero(value[~masks[name]]) == 0
        assert value[masks[name]].abs().max() > 0
    for name, param in lm.model.named_parameters():
        assert torch.equal(param, before[name]), "the base model must not change"
    from cdelta.edit.delta import apply_to_model

    apply_to_model(lm.model, delta)
    with torch.no_grad():
        nll_after = reply_nll(reply_logits(lm.model, batch), batch).item()
    assert nll_after < nll_before - 0.5


def test_masked_finetune_is_deterministic(tiny_llama_dir):
    lm = load_model(str(tiny_llama_dir))
    data = EditData(target=[("a b", "I'm sorry")] * 3, retain=[("c d", "Sure")] * 3)
    config = TrainConfig(steps=5, lr=1e-2, batch_size=2, retain_batch_size=2, seed=3, retain_weight=1.0)
    first = masked_finetune(lm.model, lm.tokenizer, _masks(lm.model), data, config, progress=False)
    second = masked_finetune(lm.model, lm.tokenizer, _masks(lm.model), data, config, progress=False)
    assert all(torch.equal(first[n], second[n]) for n in first)
