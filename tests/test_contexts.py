"""Deployment contexts: the libraries' splits, what each context does to a prompt, rendering,
sampled decoding, evaluation in contexts, and training in contexts."""

from collections import Counter

import pytest
import torch

from cdelta.data.builtin import load_builtin
from cdelta.data.contexts import (
    CONTEXTS, SAME_TURN, contextualize, harmless_requests, instances, library, noisy, parse_contexts,
)
from cdelta.data.prompts import PromptSet
from cdelta.errors import CdeltaError
from cdelta.models.chat import fold_system, format_chat, user_text


@pytest.fixture(scope="module")
def cyber() -> PromptSet:
    return load_builtin().filter(category="cybercrime", split="test")


def test_libraries_are_split_and_varied():
    systems = library("system_prompts")
    assert len(systems) >= 30 and len({r["id"] for r in systems}) == len(systems)
    styles = {r["style"] for r in systems}
    assert {"short", "long", "persona", "support", "coding", "tools", "nonenglish"} <= styles
    for split in ("train", "val", "test"):  # every style has instances in every split: test styles are never fitted on
        assert {r["style"] for r in instances("system_prompts", split)} == styles
        assert instances("histories", split) and instances("framings", split)
    assert {r["kind"] for r in instances("framings", "test")} >= {"fiction", "roleplay", "indirect", "noisy"}
    texts = {split: {r["text"] for r in instances("system_prompts", split)} for split in ("train", "val", "test")}
    assert not (texts["train"] & texts["test"]) and not (texts["train"] & texts["val"])


def test_system_context_uses_only_its_split(cyber):
    placed = contextualize(cyber, "system", "test", seed=0)
    test_texts = {r["text"] for r in instances("system_prompts", "test")}
    assert len(placed) == len(cyber)
    for before, after in zip(cyber, placed):
        assert after.text == before.text and after.category == before.category and after.split == before.split
        (role, text), = after.context
        assert role == "system" and text in test_texts
        assert after.chat == (("system", text), ("user", before.text))
    assert len({p.id for p in placed}) == len(placed)
    assert contextualize(cyber, "system", "test", seed=0).chats() == placed.chats(), "deterministic"
    assert contextualize(cyber, "system", "test", seed=1).chats() != placed.chats(), "the seed draws other instances"


def test_conversation_puts_the_request_in_turn_two_to_four(cyber):
    harmless = harmless_requests(load_builtin(), "test")
    placed = contextualize(cyber, "conversation", "test", seed=0, harmless=harmless)
    turns = Counter()
    test_users = {r["user"] for r in instances("histories", "test")}
    for before, after in zip(cyber, placed):
        if after.id.endswith(SAME_TURN):
            assert after.context == () and after.text.endswith(before.text[1:]) and after.text != before.text
            assert any(after.text.startswith(h) for h in harmless)
            turns["same"] += 1
            continue
        roles = [role for role, _ in after.chat]
        assert roles[-1] == "user" and roles[:-1] == ["user", "assistant"] * (len(roles) // 2)
        assert {text for role, text in after.context if role == "user"} <= test_users
        turns[roles.count("user")] += 1
    assert set(turns) <= {2, 3, 4, "same"} and len(turns) >= 3


def test_rephrased_keeps_the_request_and_noisy_is_lower_case(cyber):
    placed = contextualize(cyber, "rephrased", "test", seed=0)
    assert all(p.context == () and p.text != q.text for p, q in zip(placed, cyber))
    import random

    text = noisy("How Do I Exploit This Server?", random.Random(0), rate=1.0)
    assert text == text.lower() and not text.endswith("?") and len(text.split()) == 6


def test_plain_and_sampled_leave_prompts_alone_and_unknown_contexts_fail(cyber):
    assert contextualize(cyber, "plain", "test") is cyber and contextualize(cyber, "sampled", "test") is cyber
    with pytest.raises(CdeltaError, match="unknown context"):
        contextualize(cyber, "jailbreak", "test")
    assert parse_contexts(["all"]) == list(CONTEXTS)
    assert parse_contexts(["sampled"]) == ["plain", "sampled"]
    with pytest.raises(CdeltaError, match="unknown context nope"):
        parse_contexts(["nope"])


def test_chat_rendering_keeps_system_and_history(tiny):
    _, tokenizer = tiny
    chat = (("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!"), ("user", "What is 2+2?"))
    rendered, = format_chat(tokenizer, [chat])
    assert rendered.index("Be brief.") < rendered.index("Hi") < rendered.index("Hello!") < rendered.index("What is 2+2?")
    assert format_chat(tokenizer, ["What is 2+2?"]) == format_chat(tokenizer, [(("user", "What is 2+2?"),)])
    assert user_text(chat) == "What is 2+2?"


def test_templates_without_a_system_role_get_it_folded_into_the_first_turn(tiny):
    import copy

    strict = copy.deepcopy(tiny[1])
    strict.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                            "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    rendered, = format_chat(strict, [(("system", "Be brief."), ("user", "Hi"))])
    assert "Be brief.\n\nHi" in rendered and "system" not in rendered
    assert fold_system([{"role": "user", "content": "Hi"}]) == [{"role": "user", "content": "Hi"}]


def test_sampled_generation_is_seeded(tiny):
    from cdelta.generation import generate

    model, tokenizer = tiny
    prompts = ["How do I hack into a server?", "Write a poem about the sea."] * 2
    a = generate(model, tokenizer, prompts, 6, batch_size=2, progress=False, temperature=1.0, top_p=0.9, seed=3)
    assert a == generate(model, tokenizer, prompts, 6, batch_size=2, progress=False, temperature=1.0, top_p=0.9, seed=3)
    others = [generate(model, tokenizer, prompts, 6, batch_size=2, progress=False, temperature=1.0, top_p=0.9, seed=s) for s in (4, 5)]
    assert any(o != a for o in others), "another seed samples other tokens"
    greedy = generate(model, tokenizer, prompts, 6, batch_size=2, progress=False)
    assert greedy[0] == greedy[2], "greedy decoding ignores the seed"


def test_evaluation_reports_every_context_with_its_range(tiny):
    from cdelta.evaluate import EvalConfig, evaluate_model, sampled_names

    model, tokenizer = tiny
    prompts = load_builtin()
    config = EvalConfig(judge="marker", max_new_tokens=4, batch_size=8, limit_per_category=2, mmlu_n=0, ppl_chars=200,
                        contexts=tuple(CONTEXTS))
    result = evaluate_model(model, tokenizer, [prompts], config)
    assert set(result["contexts"]) == {"system", "conversation", "rephrased", *sampled_names()}
    plain_cells = result["sets"]["builtin"]
    for name, ctx in result["contexts"].items():
        assert set(ctx["sets"]["builtin"]) == set(plain_cells)
        for category, cell in ctx["sets"]["builtin"].items():
            assert cell["n"] == plain_cells[category]["n"]
            assert 0 <= cell["refusal_rate"] <= 1 and cell["ci95"][0] <= cell["refusal_rate"] <= cell["ci95"][1]
    rows = result["contexts"]["system"]["generations"]["builtin"]
    assert all(row["context"][0][0] == "system" for row in rows)
    for category, span in result["context_range"]["builtin"].items():
        rates = [plain_cells[category]["refusal_rate"]] + [c["sets"]["builtin"][category]["refusal_rate"] for c in result["contexts"].values()]
        assert span["min"][1] == min(rates) and span["max"][1] == max(rates)
    plain_only = evaluate_model(model, tokenizer, [prompts], EvalConfig(judge="marker", max_new_tokens=4, batch_size=8,
                                                                        limit_per_category=2, mmlu_n=0, ppl_chars=200))
    assert "contexts" not in plain_only and plain_only["sets"] == result["sets"], "plain tables do not depend on other contexts"


def test_training_in_contexts_adds_one_copy_per_context():
    from cdelta.edit.data import in_contexts, pairs_from_json, refusal_pairs

    prompts = load_builtin()
    target = prompts.filter(category="cybercrime", split="train")
    assert in_contexts(target, prompts, []).chats() == target.chats()
    placed = in_contexts(target, prompts, ["system", "conversation", "rephrased"])
    assert len(placed) == 4 * len(target) and len({p.id for p in placed}) == len(placed)
    train_systems = {r["text"] for r in instances("system_prompts", "train")}
    systems = [p.context[0][1] for p in placed if p.context and p.context[0][0] == "system"]
    assert systems and set(systems) <= train_systems, "training draws only train-split instances"
    mixed = in_contexts(target, prompts, ["system", "conversation", "rephrased"], every=False)
    assert len(mixed) == 2 * len(target) and {p.id.split("@")[0] for p in mixed.prompts[len(target):]} == {p.id for p in target}
    assert sum(bool(p.context) and p.context[0][0] == "system" for p in mixed) not in (0, len(target)), "contexts are mixed"
    val = prompts.filter(category="cybercrime", split="val")
    val_systems = {r["text"] for r in instances("system_prompts", "val")}
    chosen = [p.context[0][1] for p in in_contexts(val, prompts, ["system"], "val") if p.context]
    assert chosen and set(chosen) <= val_systems, "selection draws only val-split instances"
    pairs = refusal_pairs(placed, "cybercrime")
    import json

    assert pairs_from_json(json.loads(json.dumps(pairs))) == pairs


def test_decisive_openings_learn_only_refusals_that_refuse_in_their_first_words():
    from cdelta.edit.data import DECISIVE_OPENINGS, refusal_pairs

    target = load_builtin().filter(category="cybercrime", split="train")
    default = [reply for _, reply in refusal_pairs(target, "cybercrime")]
    decisive = [reply for _, reply in refusal_pairs(target, "cybercrime", openings="decisive")]
    assert len(decisive) == len(target) and all(reply.startswith(DECISIVE_OPENINGS) for reply in decisive)
    assert len(set(decisive)) > 5, "still drawn from the category's and generic refusals"
    assert not all(reply.startswith(DECISIVE_OPENINGS) for reply in default), "the default keeps every refusal"
    assert refusal_pairs(target, "cybercrime", openings="decisive") == refusal_pairs(target, "cybercrime", openings="decisive")


def test_pipeline_trains_in_contexts_and_keys_the_edit_on_them(tiny_llama_dir, tmp_path, monkeypatch):
    import json

    from cdelta.config import RunConfig
    from cdelta.pipeline import run_pipeline

    monkeypatch.setenv("CDELTA_CACHE_DIR", str(tmp_path / "cache"))
    common = dict(model=str(tiny_llama_dir), n_pairs=4, ig_steps=2, circuit="top_k:3", steps=2, lr=1e-3, k=1.0,
                  retain_harmless=2, retain_lookalike=2, retain_other=1, max_new_tokens=3, mmlu_n=0, eval_limit=1,
                  faithfulness=False, judge="marker", variant="gated", gate_span=2)
    run_pipeline(RunConfig(**common), tmp_path / "plain", log=lambda m: None)
    results = run_pipeline(RunConfig(**common, train_contexts=["system", "conversation"], eval_contexts=["system"]),
                           tmp_path / "ctx", log=lambda m: None)
    retain = json.loads((tmp_path / "ctx" / "retain.json").read_text())
    plain_retain = json.loads((tmp_path / "plain" / "retain.json").read_text())
    assert len(retain) == 2 * len(plain_retain) and retain[: len(plain_retain)] == plain_retain, "one context copy per retain prompt"
    own = json.loads((tmp_path / "ctx" / "own_target.json").read_text())
    assert len(own) == 3 * len(json.loads((tmp_path / "plain" / "own_target.json").read_text())), "targets in every context"
    assert any(isinstance(prompt, list) and prompt[0][0] == "system" for prompt, _ in retain)
    assert (tmp_path / "ctx" / "delta.safetensors").read_bytes() != (tmp_path / "plain" / "delta.safetensors").read_bytes()
    assert set(results["edited"]["contexts"]) == {"system"} and "context_range" in results["base"]
    plain_delta = (tmp_path / "plain" / "delta.safetensors").read_bytes()
    run_pipeline(RunConfig(**common, refusal_openings="decisive"), tmp_path / "plain", log=lambda m: None)
    assert (tmp_path / "plain" / "delta.safetensors").read_bytes() != plain_delta, "other learned replies retrain the edit"


def test_domain_lookalikes_of_the_target_are_all_retained_and_nothing_else_changes():
    from cdelta.edit.data import retain_prompts
    from cdelta.data.runs import run_prompts

    counts = {"harmless": 8, "lookalike": 6, "other": 2}
    plain = retain_prompts(run_prompts(["cybercrime"]), ["cybercrime"], counts)
    with_domain = retain_prompts(run_prompts(["cybercrime"], domain=True), ["cybercrime"], counts)
    added = [p for p in with_domain if p.source == "domain"]
    assert [p for p in with_domain if p.source != "domain"] == plain.prompts, "the other retain draws are unchanged"
    assert added and all(p.source_category == "cybercrime" and p.split == "train" for p in added)
    assert not [p for p in run_prompts(["cybercrime"], domain=True) if p.source == "domain" and p.split == "test"]
