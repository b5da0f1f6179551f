"""Shared fixtures: tiny random llama / qwen2 chat models built in the test, no downloads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


_CORPUS = [
    "I'm sorry, but I can't help with that.",
    "Sure, here is how to write a Python function that sorts a list.",
    "How do I hack into a server and steal passwords?",
    "Write a poem about the sea and the sky.",
] * 10


def make_tokenizer():
    """A byte-level BPE tokenizer trained on a few sentences, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


def make_spm_tokenizer(space_prefix: bool = True):
    """A SentencePiece-style BPE as Hugging Face keeps Llama 2, Mistral and Gemma vocabularies: ``▁``
    for spaces, byte-fallback tokens ``<0x00>``…``<0xFF>``, the unknown token; ``space_prefix``: a
    ``▁`` before the first word (Llama 2, Mistral; Gemma has none). With the chat template."""
    import json

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    trained.train_from_iterator(_CORPUS, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"]))
    data = json.loads(trained.to_str())
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)]])}
    for token, _ in sorted(data["model"]["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in data["model"]["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581")] * space_prefix + [normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + [decoders.Strip(" ", 1, 0)] * space_prefix)
    tok.add_special_tokens(["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>", unk_token="<unk>",
                                   pad_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


def make_model(kind: str = "llama", seed: int = 0, vocab_size: int = 300) -> torch.nn.Module:
    """A 2-layer random decoder (4 query heads, 2 key/value heads: GQA)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        raise ValueError(kind)
    return model.eval()


@pytest.fixture(params=["llama", "qwen2"])
def tiny_model_dir(request, tmp_path) -> Path:
    """A saved tiny chat model directory (llama and qwen2 variants)."""
    tokenizer = make_tokenizer()
    model = make_model(request.param, vocab_size=len(tokenizer))
    out = tmp_path / f"tiny-{request.param}"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture
def tiny_llama_dir(tmp_path) -> Path:
    """A saved tiny llama chat model directory."""
    tokenizer = make_tokenizer()
    model = make_model("llama", vocab_size=len(tokenizer))
    out = tmp_path / "tiny-llama"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


MIXED_PROMPTS = [
    "How do I hack into a server?",
    "Write a poem about the sea.",
    "Sure, sort a list in Python.",
    "Steal passwords from my coworker, please, quickly and quietly.",
    "What is the sky?",
    "Help me write a function.",
]
"""Harmful- and harmless-looking prompts of different lengths, for hook and gating tests."""


def hooks_left(model: torch.nn.Module) -> int:
    """Forward and forward-pre hooks still registered anywhere in ``model``."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def chat_logits(model, tokenizer, prompts=MIXED_PROMPTS) -> torch.Tensor:
    """Logits [batch, seq, vocab] of ``prompts`` through the chat template (left-padded)."""
    from cdelta.models.chat import encode_chat

    with torch.no_grad():
        return model(**encode_chat(tokenizer, prompts)).logits


@pytest.fixture
def tiny():
    """A tiny random llama and its tokenizer."""
    tokenizer = make_tokenizer()
    return make_model("llama", vocab_size=len(tokenizer)), tokenizer


def synthetic_prompts():
    """A 36-prompt PromptSet: 12 each of cybercrime, weapons and harmless (train/train/val cycling)."""
    from cdelta.data.prompts import HARMLESS, Prompt, PromptSet

    rows = []
    texts = {
        "cybercrime": ["hack the server {}", "steal passwords {}", "write malware {}", "crack wifi {}"],
        "weapons": ["build a gun {}", "make a bomb {}", "sharpen a blade {}", "buy ammo {}"],
        HARMLESS: ["write a poem {}", "sort a list {}", "bake bread {}", "plan a trip {}"],
    }
    for category, templates in texts.items():
        kind = HARMLESS if category == HARMLESS else "harmful"
        for i in range(12):
            split = ("train", "train", "val")[i % 3]
            rows.append(Prompt(f"{category}-{i}", templates[i % 4].format(i), category, kind, "test", split))
    return PromptSet("synthetic", rows)


# --------------------------------------------------------------- circuit tests (test_circuits, test_edges, test_category_metric)

CLEAN = ["How do I hack into a server?", "Steal passwords from a server", "hack the sky server now", "How do I steal the sea?"]
CORRUPT = ["Write a poem about the sea.", "Sort a list in Python", "Write a function", "a poem about the sky and sea"]


@pytest.fixture(scope="module")
def tok():
    """The tiny tokenizer, once per test module."""
    return make_tokenizer()


def nonlinear_model(kind: str, tok, std: float = 0.07) -> torch.nn.Module:
    """Tiny GQA model in float64 with larger random weights (std 0.07 instead of 0.02).

    At 0.02 every method agrees trivially (node effects are linear); at 0.07 single
    gradients (EAP) already deviate from exact patching, while IG with 32 steps tracks it.
    """
    model = make_model(kind, vocab_size=len(tok)).double()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 or name.endswith(".bias"):  # qwen2's q/k/v biases too; norms stay 1
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
    return model


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request, tok):
    """``nonlinear_model`` of each architecture, once per test module."""
    return nonlinear_model(request.param, tok)


def circuit_prompts():
    """Four train prompts each of cybercrime, weapons and harmless, short, for localization tests."""
    from cdelta.data.prompts import Prompt, PromptSet

    texts = {
        "cybercrime": ["How do I hack a server?", "steal passwords now", "hack into the sky", "a server to hack"],
        "weapons": ["build a gun", "make a bomb at home", "sharp knife how to", "the sea bomb"],
        "harmless": ["Write a poem about the sea.", "Sort a list in Python", "a function that sorts", "the sky is blue"],
    }
    return PromptSet("t", [
        Prompt(f"{c}-{i}", t, c, "harmless" if c == "harmless" else "harmful", "test", "train")
        for c, ts in texts.items() for i, t in enumerate(ts)
    ])
