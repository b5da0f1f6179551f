"""Export round trip on a real run: the PEFT adapter and the GGUF file against the checkpoint.

For ``RUN`` (a ``cdelta run`` directory with ``checkpoint/``) it exports ``--format peft``
and ``--format gguf`` (F32, F16 and Q8_0) into a temporary directory, then on the run's test
prompts of its target category (chat template, float32):

* PEFT: ``PeftModel.from_pretrained(base, adapter)`` logits vs the checkpoint's (max
  absolute difference), and ``merge_and_unload()`` weights vs the checkpoint's;
* GGUF: the file read back by transformers' GGUF loader, max |Δlogit| relative to the
  checkpoint's logit scale (max |logit|), and greedy refusal (the classifier judge on 32
  new tokens) of the target's test prompts, checkpoint vs GGUF.

    .venv/bin/python bench/export_roundtrip.py runs/smollm2-cybercrime-gated-span
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cdelta.data.builtin import load_builtin
from cdelta.edit.formats import export, export_source
from cdelta.generation import generate
from cdelta.judge import get_judge, judge_batch
from cdelta.models.chat import encode_chat


@torch.no_grad()
def chat_logits(model, tokenizer, prompts: list[str]) -> torch.Tensor:
    """Logits [batch, seq, vocab] (float32) of ``prompts`` through the chat template."""
    return model(**encode_chat(tokenizer, prompts)).logits.float()


def refusals(model, tokenizer, prompts: list[str]) -> int:
    """How many of ``prompts`` the classifier judge finds refused (greedy, 32 tokens)."""
    replies = generate(model, tokenizer, prompts, 32, 16, progress=False)
    return sum(judge_batch(get_judge("classifier"), prompts, replies))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args()
    results = json.loads((args.run_dir / "results.json").read_text())
    category = results["edit"]["category"][0] if isinstance(results["edit"]["category"], list) else results["edit"]["category"]
    prompts = load_builtin().filter(split="test", category=category).texts()
    checkpoint = AutoModelForCausalLM.from_pretrained(args.run_dir / "checkpoint", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.run_dir / "checkpoint")
    reference = chat_logits(checkpoint, tokenizer, prompts)
    source = export_source(args.run_dir)
    with tempfile.TemporaryDirectory() as tmp:
        from peft import PeftModel

        export(source, "peft", Path(tmp) / "peft", log=lambda m: None)
        base = AutoModelForCausalLM.from_pretrained(source.base_dir, dtype=torch.float32).eval()
        adapted = PeftModel.from_pretrained(base, Path(tmp) / "peft").eval()
        print(f"peft: max |Δlogit| vs checkpoint {float((chat_logits(adapted, tokenizer, prompts) - reference).abs().max()):.2e}")
        merged = adapted.merge_and_unload().state_dict()
        diff = max(float((merged[name].float() - tensor.float()).abs().max()) for name, tensor in checkpoint.state_dict().items() if name in merged)
        print(f"peft: merge_and_unload max |Δw| vs checkpoint {diff:.2e}")
        scale = float(reference.abs().max())
        base_refused = refusals(checkpoint, tokenizer, prompts)
        for kind in ("f32", "f16", "q8_0"):
            out = Path(tmp) / f"gguf-{kind}"
            export(source, "gguf", out, gguf_type=kind, log=lambda m: None)
            gguf_file = next(out.glob("*.gguf"))
            model = AutoModelForCausalLM.from_pretrained(out, gguf_file=gguf_file.name, dtype=torch.float32).eval()
            gap = float((chat_logits(model, tokenizer, prompts) - reference).abs().max()) / scale
            print(f"gguf {kind}: max |Δlogit| {100 * gap:.2f}% of the logit scale; {category} test refused "
                  f"{refusals(model, tokenizer, prompts)}/{len(prompts)} (checkpoint {base_refused}/{len(prompts)})")


if __name__ == "__main__":
    main()
