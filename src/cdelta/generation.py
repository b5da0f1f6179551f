"""Batched, deterministic generation through the model's chat template (greedy, or
sampled with a fixed seed per batch).

Two backends give the same output (one completion string per prompt, in input order):

* ``transformers`` (default): ``model.generate`` on the loaded module, batched by length.
* ``vllm``: the optional fast engine (``pip install 'cdelta[vllm]'``, CUDA only). vLLM
  loads the weights itself from the model's directory (``model.name_or_path``), so it is
  only right for a model evaluated exactly as it was loaded, e.g. ``cdelta eval`` of an
  exported checkpoint, never for a model edited in memory. Untested here (no GPU).

``auto`` picks vLLM when it is installed and a CUDA GPU is visible, else transformers.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import torch

from cdelta.errors import CdeltaError
from cdelta.models.chat import ChatInput, encode_chat, format_chat
from cdelta.ui import progress_bar

BACKENDS = ("transformers", "vllm", "auto")


def vllm_usable() -> bool:
    """True when the vllm package is importable and a CUDA GPU is visible."""
    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


def resolve_backend(backend: str) -> str:
    """``transformers`` or ``vllm`` for a requested backend (``auto`` falls back to transformers)."""
    if backend not in BACKENDS:
        raise CdeltaError(f"unknown generation backend '{backend}'", f"use one of: {', '.join(BACKENDS)}")
    if backend == "vllm" and not vllm_usable():
        raise CdeltaError("the vllm backend needs the vllm package and a CUDA GPU", "pip install 'cdelta[vllm]' on a GPU machine, or use --backend transformers")
    if backend == "auto":
        return "vllm" if vllm_usable() else "transformers"
    return backend


def _length(prompt: ChatInput) -> int:
    """Characters of a prompt's messages (the batching order's key)."""
    return len(prompt) if isinstance(prompt, str) else sum(len(content) for _, content in prompt)


def generate(
    model: torch.nn.Module,
    tokenizer,
    prompts: list[ChatInput],
    max_new_tokens: int = 48,
    batch_size: int = 16,
    progress: bool = True,
    description: str = "generating",
    backend: str = "transformers",
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> list[str]:
    """Completions for ``prompts``, returned in input order: greedy when ``temperature``
    is 0, else sampled at ``temperature`` with nucleus ``top_p``, the random generator
    seeded with ``seed`` + the batch's index before each batch.

    Prompts are batched by length (left padding) to reduce padding; decoding stops at
    EOS or after ``max_new_tokens`` new tokens. ``backend``: see the module docstring.
    """
    if resolve_backend(backend) == "vllm":
        return _vllm_generate(model, tokenizer, prompts, max_new_tokens, temperature, top_p, seed)
    device = next(model.parameters()).device
    sample = temperature > 0
    order = sorted(range(len(prompts)), key=lambda i: _length(prompts[i]))
    completions: list[str] = [""] * len(prompts)
    with progress_bar(progress) as bar:
        task = bar.add_task(description, total=len(prompts))
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            batch = encode_chat(tokenizer, [prompts[i] for i in index], device)
            if sample:
                torch.manual_seed(seed + start // batch_size)
            with torch.no_grad():
                out = model.generate(
                    **batch,
                    max_new_tokens=max_new_tokens,
                    do_sample=sample,
                    temperature=temperature if sample else None,
                    top_p=top_p if sample else None,
                    top_k=0 if sample else None,
                    pad_token_id=tokenizer.pad_token_id,
                )
            new_tokens = out[:, batch["input_ids"].shape[1] :]
            for i, text in zip(index, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
                completions[i] = text.strip()
            bar.advance(task, len(index))
    return completions


def _model_dir(model: torch.nn.Module) -> Path:
    """The directory ``model`` was loaded from (vLLM reads the weights there)."""
    path = Path(getattr(model, "name_or_path", "") or "")
    if not (path / "config.json").is_file():
        raise CdeltaError(
            "the vllm backend needs a model loaded from a local directory (it reads the weights itself)",
            "export the edited model first (cdelta run writes checkpoint/), or use --backend transformers",
        )
    return path


@lru_cache(maxsize=1)
def _vllm_engine(path: str, dtype: str):
    """One cached vLLM engine (building it loads the weights onto the GPU)."""
    from vllm import LLM

    return LLM(model=path, dtype=dtype, seed=0)


def _vllm_generate(model: torch.nn.Module, tokenizer, prompts: list[ChatInput], max_new_tokens: int,
                   temperature: float, top_p: float, seed: int) -> list[str]:
    """Completions with vLLM, from the same chat-formatted token ids as ``encode_chat``."""
    from vllm import SamplingParams

    engine = _vllm_engine(str(_model_dir(model)), str(next(model.parameters()).dtype).removeprefix("torch."))
    token_ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in format_chat(tokenizer, prompts)]
    params = SamplingParams(temperature=temperature, top_p=top_p, seed=seed, max_tokens=max_new_tokens, skip_special_tokens=True)
    outputs = engine.generate([{"prompt_token_ids": ids} for ids in token_ids], params, use_tqdm=False)
    return [out.outputs[0].text.strip() for out in outputs]
