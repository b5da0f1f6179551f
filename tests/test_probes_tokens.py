"""Linear probes and their controls, the probe router, and refusal tokens (tiny models)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from cdelta.baselines.probes import (
    FORCED_FLOOR,
    ProbeRouter,
    best_f1_threshold,
    fit_logistic,
    fit_probe_router,
    held_out_category_control,
    null_label_control,
    permutation_control,
    reply_token_ids,
    roc_auc,
)
from cdelta.baselines.refusal_tokens import (
    RefusalTokens,
    export_refusal_tokens,
    fit_refusal_tokens,
    reply_start_states,
    token_logprobs,
    train_token_rows,
)
from cdelta.compare.base import MethodContext
from cdelta.data.prompts import HARMLESS, LOOKALIKE, Prompt, PromptSet
from cdelta.generation import generate
from cdelta.models.chat import encode_chat
from cdelta.models.loading import load_model
from tests.conftest import MIXED_PROMPTS as PROMPTS
from tests.conftest import chat_logits as _logits
from tests.conftest import hooks_left as _hooks_left
from tests.conftest import make_model

REPLY = "I'm sorry, but I can't help with that."


def _generate(model, tokenizer, max_new_tokens: int):
    batch = encode_chat(tokenizer, PROMPTS)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id)
    return out.sequences[:, batch["input_ids"].shape[1]:], torch.stack(out.logits, 1)


def _tied_llama(vocab_size: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


# ------------------------------------------------------------------------ probes


def _planted(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(d, generator=gen)
    x = torch.randn(n, d, generator=gen) * 3 + 5  # offset and scale: the probe must standardise and fold back
    return x, (x - 5) @ u > 0.5, u


def test_probe_learns_a_planted_direction_and_the_permutation_control_is_at_chance():
    x, y, u = _planted(300, 16, seed=0)
    x_tr, y_tr, x_va, y_va = x[:200], y[:200], x[200:], y[200:]
    probe = fit_logistic(x_tr, y_tr, l2=1e-3)
    assert torch.nn.functional.cosine_similarity(probe.weight, u, dim=0) > 0.95
    val_auc = roc_auc(probe.scores(x_va), y_va)
    assert val_auc > 0.97
    assert ((probe.scores(x_va) > 0) == y_va).float().mean() > 0.9  # raw-space bias folded correctly
    perm = permutation_control(x_tr, y_tr, x_va, y_va, val_auc, n_permutations=20, seed=0, l2=1e-3)
    assert abs(perm["val_auc_mean"] - 0.5) < 0.1 and perm["val_auc_max"] < val_auc
    assert perm["p_value"] == pytest.approx(1 / 21)
    null = null_label_control(x_tr, [f"a{i}" for i in range(200)], x_va, [f"b{i}" for i in range(100)], 0.4, seed=0, l2=1e-3)
    assert abs(null["val_auc"] - 0.5) < 0.15


def test_shuffled_labels_are_memorised_in_high_dimension_but_do_not_generalise():
    """The paper's point: train accuracy of a permuted probe can be perfect when d > n."""
    x, y, _ = _planted(140, 200, seed=1)
    perm = permutation_control(x[:60], y[:60], x[60:], y[60:], real_val_auc=1.0, n_permutations=5, seed=0, l2=1e-4)
    assert perm["train_balanced_accuracy_mean"] == 1.0
    assert abs(perm["val_balanced_accuracy_mean"] - 0.5) < 0.15


def _control_set(shared: bool, seed: int = 0) -> tuple[torch.Tensor, PromptSet, torch.Tensor, PromptSet]:
    """Activations for 3 harm categories + harmless: with a shared harm direction or with
    each category on its own orthogonal direction (nothing to transfer to a held-out one)."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(12, 12, generator=gen))[0]
    cats = ["a", "b", "c"]

    def make(split: str, n: int):
        rows, acts = [], []
        for j, cat in enumerate(cats + [HARMLESS]):
            for i in range(n):
                kind = HARMLESS if cat == HARMLESS else "harmful"
                rows.append(Prompt(f"{split}-{cat}-{i}", "x", cat, kind, "t", split))
                v = 0.3 * torch.randn(12, generator=gen)
                if kind == "harmful":
                    v = v + 3 * (basis[0] if shared else basis[1 + j])
                acts.append(v)
        return torch.stack(acts), PromptSet(split, rows)

    x_tr, train = make("train", 20)
    x_va, val = make("val", 10)
    return x_tr, train, x_va, val


def test_held_out_category_control_separates_shared_from_category_specific_signals():
    shared = held_out_category_control(*_control_set(shared=True))
    assert shared["held_out_recall_mean"] > 0.95 and shared["seen_recall_mean"] > 0.95
    specific = held_out_category_control(*_control_set(shared=False))
    assert specific["seen_recall_mean"] > 0.95
    assert specific["held_out_recall_mean"] < 0.3
    assert all(row["false_positive_rate"] < 0.1 for row in specific["per_category"].values())
    assert set(specific["per_category"]) == {"a", "b", "c"}


def test_auc_and_f1_threshold():
    labels = torch.tensor([True, True, False, False, False])
    assert roc_auc(torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0]), labels) == 1.0
    assert roc_auc(torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0]), labels) == 0.5
    assert roc_auc(torch.tensor([0.0, 2.0, 1.0, 3.0, -1.0]), labels) == pytest.approx(3 / 6)
    scores = torch.tensor([0.9, 0.8, 0.3, 0.2, 0.85])
    threshold = best_f1_threshold(scores, labels)
    assert 0.3 < threshold < 0.8  # all positives fire with one false positive (F1 0.8) beats 0.9-only (0.67)


# ------------------------------------------------------------------------ router


def _router(model, tokenizer, layer: int, position) -> ProbeRouter:
    """A router whose threshold splits PROMPTS into 3 flagged and 3 unflagged rows."""
    gen = torch.Generator().manual_seed(5)
    router = ProbeRouter("cybercrime", layer, position, torch.randn(model.config.hidden_size, generator=gen), 0.1, 0.0,
                         REPLY, reply_token_ids(tokenizer, REPLY))
    scores = router.prompt_scores(model, tokenizer, PROMPTS).sort().values
    router.threshold = float((scores[2] + scores[3]) / 2)
    return router


@pytest.mark.parametrize("layer,position", [(0, "mean"), (1, -1)])
def test_router_refuses_exactly_the_flagged_rows_of_a_mixed_batch(tiny, layer, position):
    model, tokenizer = tiny
    router = _router(model, tokenizer, layer, position)
    expected = router.fires(router.prompt_scores(model, tokenizer, PROMPTS))
    assert int(expected.sum()) == 3
    n_new = len(router.reply_ids) + 2
    base_seq, base_logits = _generate(model, tokenizer, n_new)
    with router.attach(model) as hooks:
        seq, logits = _generate(model, tokenizer, n_new)
        assert torch.equal(hooks.mask, expected)
    assert _hooks_left(model) == 0
    reply = torch.tensor(router.reply_ids)
    for row in range(len(PROMPTS)):
        if expected[row]:
            assert torch.equal(seq[row, : len(reply)], reply)
            assert (seq[row, len(reply):] == tokenizer.pad_token_id).all()
            first = logits[row, 0]
            assert first[reply[0]] == 0 and (first[torch.arange(len(first)) != reply[0]] == FORCED_FLOOR).all()
        else:
            assert torch.equal(seq[row], base_seq[row]) and torch.equal(logits[row], base_logits[row])
    texts = generate(model, tokenizer, PROMPTS, max_new_tokens=n_new, progress=False)
    with router.attach(model):
        routed = generate(model, tokenizer, PROMPTS, max_new_tokens=n_new, progress=False)
    assert [r for r, f in zip(routed, expected) if f] == [REPLY] * 3
    assert [r for r, f in zip(routed, expected) if not f] == [t for t, f in zip(texts, expected) if not f]


def test_router_hooks_detach_completely(tiny):
    model, tokenizer = tiny
    router = _router(model, tokenizer, 1, "mean")
    before = _logits(model, tokenizer)
    texts = generate(model, tokenizer, PROMPTS, max_new_tokens=5, progress=False)
    with router.attach(model):
        during = _logits(model, tokenizer)
    assert _hooks_left(model) == 0
    assert not torch.equal(during, before)
    assert torch.equal(_logits(model, tokenizer), before)
    assert generate(model, tokenizer, PROMPTS, max_new_tokens=5, progress=False) == texts
    with pytest.raises(RuntimeError), router.attach(model):
        raise RuntimeError("boom")
    assert _hooks_left(model) == 0


# ---------------------------------------------------------------------- fitting


def _synthetic_prompts() -> PromptSet:
    texts = {
        "cybercrime": ["hack the server {}", "steal passwords {}", "write malware {}", "crack wifi {}"],
        "weapons": ["build a gun {}", "make a bomb {}", "sharpen a blade {}", "buy ammo {}"],
        HARMLESS: ["write a poem {}", "sort a list {}", "bake bread {}", "plan a trip {}"],
        LOOKALIKE: ["kill a python process {}", "shoot a photo {}", "hack a recipe {}", "crack an egg {}"],
    }
    rows = []
    for category, templates in texts.items():
        kind = category if category in (HARMLESS, LOOKALIKE) else "harmful"
        for i in range(12):
            split = ("train", "train", "val")[i % 3]
            rows.append(Prompt(f"{category}-{i}", templates[i % 4].format(i), category, kind, "test", split))
    return PromptSet("synthetic", rows)


def test_fit_probe_router_end_to_end(tiny_llama_dir, tmp_path):
    lm = load_model(str(tiny_llama_dir))
    router = fit_probe_router(lm, _synthetic_prompts(), "cybercrime", seed=0, n_permutations=3)
    info = router.info
    assert {(row["layer"], row["position"]) for row in info["selection"]} == {(0, "mean"), (1, "mean"), (0, -1), (1, -1)}
    best = max(row["val_auc"] for row in info["selection"])
    assert info["val"]["auc"] == pytest.approx(best) and info["n_val_target"] == 4
    assert set(info["controls"]) == {"permutation", "null_labels", "held_out_category"}
    assert set(info["controls"]["held_out_category"]["per_category"]) == {"cybercrime", "weapons"}
    assert set(info["per_category"]) == {"cybercrime", "weapons"}
    assert set(info["val"]["false_positive_rate_by_group"]) == {"other_harmful", HARMLESS, LOOKALIKE}
    assert router.reply_ids[-1] == lm.tokenizer.eos_token_id
    router.save(tmp_path / "router.safetensors")
    loaded = ProbeRouter.load(tmp_path / "router.safetensors")
    assert torch.equal(loaded.weight, router.weight) and loaded.position == router.position and loaded.threshold == router.threshold
    json.dumps(info)


# ---------------------------------------------------------------- refusal tokens


def _tokens(model, categories=("a", "b"), seed: int = 0, threshold: float = 0.5) -> RefusalTokens:
    gen = torch.Generator().manual_seed(seed)
    vocab, d = model.get_output_embeddings().weight.shape
    return RefusalTokens(list(categories), vocab, torch.randn(len(categories), d, generator=gen),
                         {c: threshold for c in categories}, {c: REPLY for c in categories}, {c: [5, 6, 2] for c in categories})


@pytest.mark.parametrize("tied", [False, True])
def test_refusal_token_resize_keeps_old_logits(tiny, tied):
    _, tokenizer = tiny
    model = _tied_llama(len(tokenizer)) if tied else make_model("llama", vocab_size=len(tokenizer))
    tokens = _tokens(model)
    base_logits = _logits(model, tokenizer)
    base_embed = model.get_input_embeddings().weight.detach().clone()
    extended = tokens.extended_copy(model)
    vocab = tokens.base_vocab
    assert extended.get_output_embeddings().weight.shape[0] == vocab + 2 and extended.config.vocab_size == vocab + 2
    assert torch.equal(_logits(model, tokenizer), base_logits)  # the base is untouched
    ext_logits = _logits(extended, tokenizer)
    assert torch.equal(ext_logits[..., :vocab], base_logits)
    batch = encode_chat(tokenizer, PROMPTS)
    with torch.no_grad():
        hidden = extended.get_decoder()(**batch).last_hidden_state
    assert torch.allclose(ext_logits[..., vocab:], hidden @ tokens.rows.T, atol=1e-5)
    embed = extended.get_input_embeddings().weight
    assert torch.equal(embed[:vocab], base_embed)
    if tied:
        assert embed.data_ptr() == extended.get_output_embeddings().weight.data_ptr()
    else:
        assert torch.allclose(embed[vocab:], base_embed.mean(0).expand(2, -1))


def test_token_logprobs_from_cached_states_match_the_extended_model(tiny):
    model, tokenizer = tiny
    tokens = _tokens(model)
    states, log_z = reply_start_states(model, tokenizer, PROMPTS)
    cached = token_logprobs(states, log_z, tokens.rows)
    direct = tokens.prompt_logprobs(tokens.extended_copy(model), tokenizer, PROMPTS)
    assert torch.allclose(cached, direct, atol=1e-5)


@pytest.mark.parametrize("threshold_rank", [0, 3, 6])
def test_refusal_token_threshold_routes_each_row(tiny, threshold_rank):
    model, tokenizer = tiny
    tokens = _tokens(model)
    tokens.reply_ids["a"] = reply_token_ids(tokenizer, REPLY)
    extended = tokens.extended_copy(model)
    logp = tokens.prompt_logprobs(extended, tokenizer, PROMPTS)[:, 0]
    edges = torch.cat([logp.sort().values[:1] - 1, logp.sort().values, logp.sort().values[-1:] + 1])
    # threshold below all (rank 0: all refuse), between the 3rd and 4th, above all (rank 6: none)
    log_t = float((edges[threshold_rank] + edges[threshold_rank + 1]) / 2)
    expected = logp > log_t
    assert int(expected.sum()) == 6 - threshold_rank
    n_new = len(tokens.reply_ids["a"]) + 2
    base_seq, base_logits = _generate(model, tokenizer, n_new)
    with tokens.attach(extended, ["a"], thresholds={"a": math.exp(log_t)}) as hooks:
        seq, logits = _generate(extended, tokenizer, n_new)
        assert torch.equal(hooks.mask, expected)
        assert torch.allclose(hooks.logprobs[:, 0], logp, atol=1e-5)
    assert _hooks_left(extended) == 0
    assert logits.shape[-1] == tokens.base_vocab  # refusal tokens never reach the sampler
    reply = torch.tensor(tokens.reply_ids["a"])
    for row in range(len(PROMPTS)):
        if expected[row]:
            assert torch.equal(seq[row, : len(reply)], reply)
        else:
            assert torch.equal(seq[row], base_seq[row]) and torch.equal(logits[row], base_logits[row])
    with pytest.raises(Exception, match="extended"):
        tokens.attach(model)


def test_train_token_rows_learns_planted_categories():
    gen = torch.Generator().manual_seed(0)
    d, n = 24, 150
    centres = 4 * torch.randn(3, d, generator=gen)  # category a, category b, "none"
    group = torch.arange(n) % 3
    states = centres[group] + torch.randn(n, d, generator=gen)
    log_z = 10 + torch.rand(n, generator=gen)
    targets = torch.where(group == 2, -1, group)
    rows = train_token_rows(states, log_z, targets, 2, l2=1e-3)
    logp = token_logprobs(states, log_z, rows)
    for j in range(2):
        assert roc_auc(logp[:, j], targets == j) > 0.99
        assert logp[targets == j, j].exp().mean() > 0.8
    none_mass = logp[targets == -1].exp().sum(1)
    assert none_mass.max() < 0.2


def test_fit_refusal_tokens_end_to_end_and_export(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm = load_model(str(tiny_llama_dir))
    tokens = fit_refusal_tokens(lm, _synthetic_prompts(), seed=0)
    assert tokens.categories == ["cybercrime", "weapons"] and tokens.rows.shape == (2, 32)
    assert all(0 < t < 1 for t in tokens.thresholds.values())
    per = tokens.info["per_category"]["cybercrime"]
    assert math.log(tokens.thresholds["cybercrime"]) == pytest.approx(per["log_threshold"])
    assert per["train"]["auc"] > 0.9  # tiny model: only the train fit is meaningful
    tokens.save(tmp_path / "t.safetensors")
    loaded = RefusalTokens.load(tmp_path / "t.safetensors")
    assert torch.equal(loaded.rows, tokens.rows) and loaded.thresholds == tokens.thresholds
    out = export_refusal_tokens(lm, tokens, tmp_path / "export")
    record = json.loads((out / "refusal_tokens.json").read_text())
    assert record["token_ids"] == {"cybercrime": tokens.base_vocab, "weapons": tokens.base_vocab + 1}
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.convert_tokens_to_ids(["<|refuse:cybercrime|>", "<|refuse:weapons|>"]) == tokens.token_ids
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.allclose(_logits(exported, lm.tokenizer), _logits(tokens.extended_copy(lm.model), lm.tokenizer), atol=1e-6)


def test_compare_methods_fit_on_a_tiny_model(tiny_llama_dir, tmp_path):
    from cdelta.compare.methods import probe_router, refusal_tokens

    lm = load_model(str(tiny_llama_dir))
    context = MethodContext(lm, _synthetic_prompts(), "cybercrime", 0, tmp_path / "m", log=lambda _: None,
                            options={"probe_kwargs": {"n_permutations": 2}})
    routed = probe_router.METHOD.fit(context)
    assert routed.params_touched == 0 and routed.model is lm.model and routed.runtime_hooks
    assert {"probe_val_auc", "permutation_p_value", "null_labels_val_auc", "held_out_recall_mean"} <= set(routed.info)
    json.dumps(routed.info)
    with routed.hooks(routed.model):
        _logits(routed.model, lm.tokenizer)
    tokened = refusal_tokens.METHOD.fit(context)
    assert tokened.params_touched == 2 * 2 * 32  # 2 new output rows + 2 new (untied) input rows of width 32
    assert tokened.model is not lm.model and _hooks_left(lm.model) == 0
    with tokened.hooks(tokened.model):
        assert _logits(tokened.model, lm.tokenizer).shape[-1] == tokened.info["base_vocab"]
    json.dumps(tokened.info)
    again = refusal_tokens.METHOD.fit(context)  # reuses the cached rows
    assert again.info["thresholds"] == tokened.info["thresholds"]
