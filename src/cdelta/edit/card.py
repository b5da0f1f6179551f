"""The model card (README.md) written next to every edited checkpoint, adapter and GGUF file.

It follows the Hugging Face conventions: YAML front matter (``base_model`` as the upstream hub id
where known, ``base_model_relation``, ``library_name``, ``license``, ``tags``), then the results
(base vs edited refusal per category with 95% intervals, per deployment context, utility), how to
load the files, and the sparse delta with the hash of the base weights it applies to.
"""

from __future__ import annotations

import json
from pathlib import Path

from cdelta.io import atomic_write_bytes

LIBRARY = {"checkpoint": "transformers", "peft": "peft", "gguf": "gguf"}
TAGS = ["cdelta", "refusal", "safety", "circuit-restricted-edit"]


def _yaml_scalar(value) -> str:
    """A YAML scalar: JSON's quoting is valid YAML, for strings and numbers alike."""
    return json.dumps(value)


def front_matter(fields: dict) -> list[str]:
    """``---``-delimited YAML lines of ``fields`` (scalars and lists of scalars; None values left out)."""
    lines = ["---"]
    for key, value in fields.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            lines.append(f"{key}:")
            lines += [f"- {_yaml_scalar(item)}" for item in value]
        else:
            lines.append(f"{key}: {_yaml_scalar(value)}")
    return [*lines, "---"]


def _pct(rate) -> str:
    return "–" if rate is None else f"{100 * rate:.1f}%"


def _ci(cell: dict | None) -> str:
    if not cell or "ci95" not in cell:
        return ""
    lo, hi = cell["ci95"]
    return f" [{100 * lo:.1f}, {100 * hi:.1f}]"


def results_tables(results: dict) -> list[str]:
    """Markdown tables of a ``cdelta run`` results.json: refusal per set and category (base and
    edited, 95% intervals), per deployment context if evaluated, and utility."""
    base, edited = results.get("base") or {}, results.get("edited") or {}
    lines = ["| set | category | base refusal [95% CI] | edited refusal [95% CI] | n |", "|---|---|---|---|---|"]
    for name, cells in (edited.get("sets") or {}).items():
        for category, cell in cells.items():
            before = ((base.get("sets") or {}).get(name) or {}).get(category)
            lines.append(f"| {name} | {category} | {_pct(before and before.get('refusal_rate'))}{_ci(before)} | "
                         f"{_pct(cell.get('refusal_rate'))}{_ci(cell)} | {cell.get('n', '')} |")
    contexts = edited.get("contexts") or {}
    if contexts:
        names = list(contexts)
        lines += ["", "Refusal per deployment context (base → edited):", "",
                  "| set | category | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
        for name, cells in (edited.get("sets") or {}).items():
            for category in cells:
                row = []
                for context in names:
                    after = ((contexts[context].get("sets") or {}).get(name) or {}).get(category) or {}
                    before = ((((base.get("contexts") or {}).get(context) or {}).get("sets") or {}).get(name) or {}).get(category) or {}
                    row.append(f"{_pct(before.get('refusal_rate'))} → {_pct(after.get('refusal_rate'))}")
                lines.append(f"| {name} | {category} | " + " | ".join(row) + " |")
    utility = edited.get("utility") or {}
    base_utility = base.get("utility") or {}
    rows = []
    if "mmlu_accuracy" in utility:
        rows.append(f"| MMLU accuracy (n={utility.get('mmlu_n', '?')}) | {_pct(base_utility.get('mmlu_accuracy'))} | {_pct(utility['mmlu_accuracy'])} |")
    if "perplexity" in utility:
        rows.append(f"| perplexity | {utility.get('reference_perplexity', base_utility.get('perplexity', float('nan'))):.3f} | {utility['perplexity']:.3f} |")
    if "first_token_kl" in utility:
        rows.append(f"| first-token KL to base | 0 | {utility['first_token_kl']:.4f} |")
    if rows:
        lines += ["", "| utility | base | edited |", "|---|---|---|", *rows]
    return lines


def _headline_table(metrics: dict) -> list[str]:
    lines = ["| category | base refusal | edited refusal | n |", "|---|---|---|---|"]
    for category, cell in metrics.items():
        if isinstance(cell, dict):
            lines.append(f"| {category} | {_pct(cell.get('base'))} | {_pct(cell.get('edited'))} | {cell.get('n', '')} |")
    return lines


def _vllm_rank(rank: int) -> int:
    """The smallest ``--max-lora-rank`` vLLM accepts that holds ``rank``."""
    return next((r for r in (8, 16, 32, 64, 128, 256, 320, 512) if r >= rank), rank)


def _how_to_load(fmt: str, base: str, files: dict, adapter: dict | None) -> list[str]:
    if fmt == "peft":
        max_rank = max((m["rank"] for m in (adapter or {}).get("modules", {}).values()), default=8)
        lines = [
            "With [PEFT](https://huggingface.co/docs/peft) on the base model:", "", "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer", "from peft import PeftModel", "",
            f'base = AutoModelForCausalLM.from_pretrained("{base}")',
            'model = PeftModel.from_pretrained(base, "PATH/TO/THIS/DIRECTORY")',
            "model = model.merge_and_unload()  # optional: plain transformers weights, identical to the edited checkpoint",
            f'tokenizer = AutoTokenizer.from_pretrained("{base}")', "```", "",
            "Served by [vLLM](https://docs.vllm.ai/en/latest/features/lora.html) as a LoRA module:", "", "```bash",
            f"vllm serve {base} --enable-lora --lora-modules cdelta=PATH/TO/THIS/DIRECTORY --max-lora-rank {_vllm_rank(max_rank)}",
            "```",
        ]
        if adapter and adapter.get("lora_bias"):
            lines += ["", "The adapter carries bias changes (`lora_bias`): PEFT loads and merges it; LoRA servers without "
                      "bias support (vLLM) do not."]
        if adapter and adapter.get("max_rel_error", 0) > 0:
            lines += ["", f"Some factors are truncated (worst relative Frobenius error {adapter['max_rel_error']:.2e}): "
                      "the adapter approximates the edit; the checkpoint and the GGUF are exact."]
        return lines
    if fmt == "gguf":
        name = Path(files.get("file", "model.gguf")).name
        lines = [
            "With [llama.cpp](https://github.com/ggml-org/llama.cpp) (or Ollama, LM Studio):", "", "```bash",
            f"llama-cli -m {name} -cnv", f"llama-server -m {name}", "```",
        ]
        if not files.get("transformers", True):  # transformers' GGUF loader does not know this architecture
            return lines
        return lines + [
            "", "With transformers (dequantized on load):", "", "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            f'model = AutoModelForCausalLM.from_pretrained("PATH/TO/THIS/DIRECTORY", gguf_file="{name}")',
            f'tokenizer = AutoTokenizer.from_pretrained("PATH/TO/THIS/DIRECTORY", gguf_file="{name}")', "```",
        ]
    return [
        "With plain transformers; no runtime hooks:", "", "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
        'model = AutoModelForCausalLM.from_pretrained("PATH/TO/THIS/DIRECTORY")',
        'tokenizer = AutoTokenizer.from_pretrained("PATH/TO/THIS/DIRECTORY")', "```",
    ]


def model_card(info: dict, metrics: dict | None = None, *, results: dict | None = None, fmt: str = "checkpoint",
               provenance: dict | None = None, files: dict | None = None, adapter: dict | None = None) -> str:
    """The README.md text: front matter, results, how to load, the sparse delta, settings.

    ``info``: the delta's manifest (base model and hash, category, direction, k, seed, counts);
    ``metrics``: headline rates ``{category: {base, edited, n}}``, used when ``results`` (a ``cdelta
    run`` results.json) is not given; ``provenance``: ``{"base_model": upstream hub id, "license",
    "note"}``; ``files``/``adapter``: what the export wrote (GGUF file and type; adapter ranks).
    """
    if provenance is None:
        provenance = provenance_of(info.get("base_model"))
    files = files or {}
    upstream = provenance.get("base_model")
    quantized = fmt == "gguf" and str(files.get("gguf_type", "")).lower() not in ("", "f32", "f16")
    relation = "adapter" if fmt == "peft" else "quantized" if quantized else "finetune"
    tags = [*TAGS, *(["lora"] if fmt == "peft" else []), *(["gguf"] if fmt == "gguf" else [])]
    category, direction = info.get("category", "?"), info.get("direction", "refuse")
    lines = front_matter({
        "base_model": upstream,
        "base_model_relation": relation if upstream else None,
        "library_name": LIBRARY.get(fmt, "transformers"),
        "license": provenance.get("license"),
        "pipeline_tag": "text-generation",
        "tags": tags,
        "base_model_sha256": info.get("base_weights_sha256"),
    })
    what = {"checkpoint": "checkpoint", "peft": "LoRA adapter", "gguf": "GGUF file"}.get(fmt, "checkpoint")
    lines += [
        f"# {upstream or info.get('base_model', 'model')} + C-Δθ ({direction} {category})", "",
        f"This {what} is the base model plus a circuit-restricted weight update ΔθC made with "
        "[cdelta](https://pypi.org/project/cdelta/): it changes only the weights of the circuit that decides "
        f"whether the model refuses `{category}` requests (direction `{direction}`).", "",
        f"- base model: `{info.get('base_model')}`" + (f" (upstream `{upstream}`)" if upstream and upstream != info.get("base_model") else ""),
    ]
    if provenance.get("note"):
        lines.append(f"- base weights: {provenance['note']}; the edit is exact on those weights, and close on the upstream ones")
    if info.get("params_touched") is not None:
        total = info.get("params_total")
        share = f" of {total:,} ({info['params_touched_fraction']:.3%})" if total and "params_touched_fraction" in info else ""
        lines.append(f"- parameters touched: {info['params_touched']:,}{share}")
    lines += [f"- category: `{category}`, direction: `{direction}`, variant: `{info.get('variant', 'direct')}`",
              f"- seed: {info.get('seed')}, k: {info.get('k')}", ""]
    if fmt == "gguf" and files:
        lines += [f"File: `{Path(files.get('file', '')).name}` ({str(files.get('gguf_type', '')).upper()}).", ""]
    if results:
        lines += ["## Results", "", "Refusal rate on the held-out test prompts (judge as configured in the run):", "",
                  *results_tables(results), ""]
    elif metrics:
        lines += ["## Results", "", *_headline_table(metrics), ""]
    base_ref = upstream or info.get("base_model", "BASE")
    lines += ["## How to load", "", *_how_to_load(fmt, base_ref, files, adapter), ""]
    lines += [
        "## The sparse delta", "",
        "The same edit is a sparse delta (`delta.safetensors`, written by `cdelta run`) that applies only to "
        f"base weights with sha256 `{info.get('base_weights_sha256')}` (over the base's safetensors files):", "",
        "```bash", f"cdelta apply-delta {info.get('base_model', 'BASE')} delta.safetensors edited-checkpoint/",
        "cdelta export --delta delta.safetensors --base BASE --format peft --out adapter/   # or checkpoint, gguf", "```", "",
        "## Settings", "```json",
        json.dumps({k: v for k, v in info.items() if k not in {"shapes", "layouts"}}, indent=2, sort_keys=True, default=str),
        "```",
    ]
    if metrics and results:
        lines += ["", "## Measured", "```json", json.dumps(metrics, indent=2, sort_keys=True), "```"]
    return "\n".join(lines) + "\n"


def write_model_card(checkpoint: Path, info: dict, metrics: dict | None = None, **kwargs) -> None:
    """Write ``model_card(info, metrics, **kwargs)`` to ``checkpoint/README.md``, atomically."""
    atomic_write_bytes(Path(checkpoint) / "README.md", model_card(info, metrics, **kwargs).encode())


def provenance_of(name, base_dir: Path | None = None, config: dict | None = None) -> dict:
    """The upstream hub id, license and a note on the weights of the base model ``name`` (as a run
    records it: bundled name, local directory or hub id): from the bundled table, the name itself
    when it is a hub id, else the ``_name_or_path`` recorded in the config when that is one."""
    from cdelta.models.bundled import BUNDLED, cache_info

    upstream = license_ = note = None
    spec = BUNDLED.get(name) if isinstance(name, str) else None
    info = cache_info(base_dir) if base_dir is not None else None
    if spec is None and info and info.get("name") in BUNDLED:
        spec = BUNDLED[info["name"]]
    if spec is not None:
        upstream, license_ = spec.upstream.split(" (")[0], spec.license.lower()
        quant = spec.upstream.partition(" (")[2].rstrip(")")
        note = f"cdelta's bundled `{spec.name}`: the {quant or 'copy'} of {upstream}, dequantized to float32"
    elif isinstance(name, str) and _looks_like_hub_id(name) and not Path(name).expanduser().exists():
        upstream = name
    else:
        recorded = (config or {}).get("_name_or_path")
        if isinstance(recorded, str) and _looks_like_hub_id(recorded) and not Path(recorded).expanduser().exists():
            upstream = recorded
    return {"base_model": upstream, "license": license_, "note": note}


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~")) and not name.endswith((".gguf", ".safetensors"))
