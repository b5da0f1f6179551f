"""Scaling bench: CPU time and peak memory of localize, edit and eval on the bundled models.

One subprocess per model (1 thread) measures, with small settings:

* localize: EAP-IG (5 steps, suffix window) on ``--pairs`` cybercrime-vs-other-harmful
  pairs, no faithfulness curve; also on ``--pair-sweep`` pair counts (first model only);
* edit: ``--edit-steps`` steps of the circuit-restricted fine-tune on the localized
  circuit (``params:0.02``), 4 target and 8 retain examples per step (16 of each in all);
* eval: ``evaluate_model`` on ``--eval-prompts`` builtin test prompts x ``--tokens``
  new tokens (marker judge, perplexity on 2,000 characters, no MMLU); also on
  ``--eval-sweep`` prompt counts (first model only);
* edit memory vs circuit size: circuits of 1/4/16 heads and 1/4 MLPs, all starting at
  layer ``n_layers - 4`` (so the forward/backward depth is the same), 1 step each.

Times are CPU seconds of the single-threaded worker (on an idle machine, its wall time;
robust when other jobs share the cores); wall seconds are stored too. Peak memory is the
peak resident set size during the stage minus the resident size just before it (Linux
``VmHWM``, reset through ``/proc/self/clear_refs``): the stage's working memory on top of
the loaded float32 weights. Workers run with ``WORKER_ENV`` so that freed tensors leave
the resident set, and every stage runs once, small, before it is measured (warm-up).
The main process prints the tables, the growth exponents (least-squares slope of log y
on log x), the edit-memory model and the 8B / 70B extrapolation used in docs/scaling.md,
and writes everything to ``--out``.

    .venv/bin/python bench/scaling.py [--models smollm2-135m qwen2.5-0.5b] [--out bench/results/scaling.json]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "1048576", "MALLOC_ARENA_MAX": "2"}
"""One thread; tensors of 1 MB or more get their own mmap and are unmapped when freed, so
the resident size follows live memory (repeat measurements then agree within ~10 MB)."""

PIPELINE_SCALE = {"batch": 2, "retain": 232 / 16}
"""``cdelta run`` defaults relative to the bench: 8 target + 16 retain examples per step
(bench: 4 + 8) and 64 + 48 + 5 x 24 = 232 retain prompts in the reference cache (bench: 16)."""

TARGETS = {
    # name: (parameters, layers, heads, kv heads, d_model, d_mlp, vocab) of the extrapolation targets
    "llama-3.1-8b": (8.03e9, 32, 32, 8, 4096, 14336, 128256),
    "llama-3.1-70b": (70.6e9, 80, 64, 8, 8192, 28672, 128256),
}


# ----------------------------------------------------------------------------- measuring (worker side)


def _status_kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


@contextmanager
def measured(into: dict, key: str):
    """Record ``{seconds, wall_seconds, peak_mb}`` of the block into ``into[key]``.

    ``seconds`` is the process's CPU time (with one thread, the wall time of an idle
    machine; robust when other jobs share the cores), ``peak_mb`` the peak RSS above the
    RSS at entry.
    """
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    start_kb, cpu, wall = _status_kb("VmRSS"), time.process_time(), time.perf_counter()
    yield
    into[key] = {
        "seconds": round(time.process_time() - cpu, 2),
        "wall_seconds": round(time.perf_counter() - wall, 2),
        "peak_mb": round((_status_kb("VmHWM") - start_kb) / 1024, 1),
    }


def _fixed_circuit(circuit, arch, heads: int, mlps: int):
    """``heads`` heads and ``mlps`` MLPs taken in order from layer ``n_layers - 4`` upwards."""
    first = arch.n_layers - 4
    head_ids = [f"L{layer}.H{h}" for layer in range(first, arch.n_layers) for h in range(arch.n_heads)][:heads]
    mlp_ids = [f"L{layer}.MLP" for layer in range(first, arch.n_layers)][:mlps]
    return circuit.with_nodes(head_ids + mlp_ids, {"kind": "bench", "heads": heads, "mlps": mlps})


def _edit_shape(lm, arch, masks: dict, data, config) -> dict:
    """What the edit's memory depends on: circuit entries, entries of the tensors it touches,
    decoder layers trained through, and the largest step's padded tokens and reply positions
    (replaying the fine-tune's seeded batch order), plus all retain reply positions (the
    reference cache)."""
    import random

    from cdelta.edit import train
    from cdelta.edit.batches import build_reply_batch
    from cdelta.edit.truncated import lowest_layer

    names = [name for name, mask in masks.items() if mask.any()]
    rng = random.Random(config.seed)
    batches = train.index_batches(len(data.target), config.batch_size, rng), train.index_batches(len(data.retain), config.retain_batch_size, rng)
    worst = {"tokens": 0, "positions": 0}
    for _ in range(config.steps):
        tokens = positions = 0
        for pairs, order in zip((data.target, data.retain), batches):
            chosen = [pairs[i] for i in next(order)]
            batch = build_reply_batch(lm.tokenizer, [p for p, _ in chosen], [r for _, r in chosen], config.max_reply_tokens)
            tokens, positions = tokens + batch.input_ids.numel(), positions + int(batch.reply_mask.sum())
        worst = {"tokens": max(worst["tokens"], tokens), "positions": max(worst["positions"], positions)}
    retain = build_reply_batch(lm.tokenizer, [p for p, _ in data.retain], [r for _, r in data.retain], config.max_reply_tokens)
    params = dict(lm.model.named_parameters())
    return {
        "entries": int(sum(int(masks[n].sum()) for n in names)),
        "touched": int(sum(params[n].numel() for n in names)),
        "layers_trained": arch.n_layers - (lowest_layer(names, arch.layers_prefix) or 0),
        "retain_positions": int(retain.reply_mask.sum()),
        **worst,
    }


def worker(args) -> None:
    import torch

    torch.set_num_threads(1)
    from transformers.utils import logging as hf_logging

    from cdelta.circuits.attribution import pair_batch_cost, plan_batches
    from cdelta.circuits.localize import localize, make_pairs
    from cdelta.circuits.metric import get_metric
    from cdelta.data.builtin import load_builtin
    from cdelta.data.prompts import PromptSet
    from cdelta.edit.data import refusal_pairs
    from cdelta.edit.train import EditData, TrainConfig, masked_finetune
    from cdelta.evaluate import EvalConfig, evaluate_model
    from cdelta.models.architecture import architecture_of
    from cdelta.models.loading import load_model

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    lm = load_model(args.worker)
    arch = architecture_of(lm.model)
    prompts = load_builtin()
    n_params = sum(p.numel() for p in lm.model.parameters())
    out: dict = {"model": args.worker, "params": n_params, "layers": arch.n_layers, "heads": arch.n_heads,
                 "kv_heads": arch.n_kv_heads, "d_model": arch.d_model, "d_mlp": arch.d_mlp,
                 "vocab": lm.model.get_output_embeddings().weight.shape[0], "stages": {}, "sweeps": {}}
    stages = out["stages"]

    def run_localize(n_pairs: int, steps: int = 5):
        return localize(lm, "cybercrime", prompts, contrast="harmful", n_pairs=n_pairs, steps=steps, faithfulness=False,
                        progress=False, selection="params:0.02")

    def run_eval(n_prompts: int, tokens: int):
        builtin = PromptSet("builtin", prompts.filter(split="test").prompts)
        cfg = EvalConfig("test", "marker", tokens, 16, max(1, n_prompts // 8), mmlu_n=0, ppl_chars=2000)
        return evaluate_model(lm.model, lm.tokenizer, [builtin], cfg, progress=False)

    target = prompts.filter(split="train", category="cybercrime").sample(16, 0)
    retain_set = prompts.filter(split="train", kind="harmless").sample(16, 0)
    reply = "Sure! Here is a short, clear answer to your question, step by step."
    data = EditData(refusal_pairs(target, "cybercrime", 0), [(p.text, reply) for p in retain_set])

    # warm-up: first calls allocate caches and pools that would otherwise count as the first stage's memory
    warm = run_localize(2, steps=1)
    run_eval(8, 2)
    masked_finetune(lm.model, lm.tokenizer, _fixed_circuit(warm.circuit, arch, 1, 0).param_masks(lm.model), data,
                    TrainConfig(steps=1, batch_size=4, retain_batch_size=8, lr=1e-4, retain_weight=1.0), progress=False)

    with measured(stages, "localize"):
        found = run_localize(args.pairs)
    clean, corrupt, _ = make_pairs(prompts, "cybercrime", "harmful", args.pairs, 0)
    metric = get_metric("logodds", lm.tokenizer)
    texts = [p.text for p in clean], [p.text for p in corrupt]
    cost = pair_batch_cost(lm.model, arch, lm.tokenizer, metric, *texts, "suffix")
    estimate = max(cost(b) for b in plan_batches(lm.model, arch, lm.tokenizer, metric, *texts, 8, "suffix"))
    stages["localize"]["estimate_mb"] = round(estimate / 2**20, 1)

    def run_edit(into: dict, masks: dict, steps: int) -> None:
        config = TrainConfig(steps=steps, lr=1e-3, batch_size=4, retain_batch_size=8, retain_weight=3.0)
        with measured(into, "edit"):
            masked_finetune(lm.model, lm.tokenizer, masks, data, config, progress=False)
        into["edit"]["shape"] = _edit_shape(lm, arch, masks, data, config)

    run_edit(stages, found.circuit.param_masks(lm.model), args.edit_steps)

    with measured(stages, "eval"):
        run_eval(args.eval_prompts, args.tokens)

    circuits = []
    for heads, mlps in [(1, 0), (4, 0), (16, 0), (0, 1), (0, 4)]:
        row = {"heads": heads, "mlps": mlps}
        run_edit(row, _fixed_circuit(found.circuit, arch, heads, mlps).param_masks(lm.model), 1)
        circuits.append(row)
    out["sweeps"]["circuit"] = circuits

    if args.pair_sweep:
        out["sweeps"]["localize_pairs"] = []
        for n in args.pair_sweep:
            row = {"n": n}
            with measured(row, "localize"):
                run_localize(n)
            out["sweeps"]["localize_pairs"].append(row)
    if args.eval_sweep:
        out["sweeps"]["eval_prompts"] = []
        for n in args.eval_sweep:
            row = {"n": n}
            with measured(row, "eval"):
                run_eval(n, args.tokens)
            out["sweeps"]["eval_prompts"].append(row)
    Path(args.json).write_text(json.dumps(out, indent=1))


# ----------------------------------------------------------------------------- fitting and printing (main side)


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares exponent ``b`` of ``y ∝ x^b`` (slope of log y on log x)."""
    lx, ly = [math.log(x) for x in xs], [math.log(max(y, 1e-9)) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def edit_terms(shape: dict, d_model: int, d_mlp: int, vocab: int, dtype_bytes: int) -> tuple[float, float, float]:
    """Bytes of the edit's three memory terms for one ``_edit_shape``.

    ``known``: 16 B per circuit entry (float32 value, gradient, two AdamW moments), the
    touched tensors' scattered copy and its gradient, and the bfloat16 reference cache
    ``[retain positions, vocab]``; ``act``: one value per padded token, trained layer and
    ``12 · d_model + 4 · d_mlp`` width; ``logit``: one float32 ``[reply positions, vocab]``
    tensor. The peak is modelled as ``known + α · act + γ · logit`` (``fit_edit_memory``).
    """
    known = 16 * shape["entries"] + 2 * dtype_bytes * shape["touched"] + 2 * shape["retain_positions"] * vocab
    act = shape["tokens"] * shape["layers_trained"] * (12 * d_model + 4 * d_mlp) * dtype_bytes
    return known, act, shape["positions"] * vocab * 4


def edit_rows(results: list[dict]) -> list[tuple[dict, dict]]:
    """Every measured edit: (model result, measurement)."""
    return [(r, m) for r in results for m in [r["stages"]["edit"], *(c["edit"] for c in r["sweeps"]["circuit"])]]


def fit_edit_memory(results: list[dict]) -> tuple[float, float]:
    """Least-squares ``α, γ`` of ``peak − known = α · act + γ · logit`` over every measured edit."""
    rows = [(edit_terms(m["shape"], r["d_model"], r["d_mlp"], r["vocab"], 4), m["peak_mb"] * 2**20) for r, m in edit_rows(results)]
    saa = sum(a * a for (_, a, _), _ in rows)
    sll = sum(g * g for (_, _, g), _ in rows)
    sal = sum(a * g for (_, a, g), _ in rows)
    say = sum(a * (y - k) for (k, a, _), y in rows)
    sly = sum(g * (y - k) for (k, _, g), y in rows)
    det = saa * sll - sal * sal
    return (say * sll - sly * sal) / det, (sly * saa - say * sal) / det


def summarize(results: list[dict]) -> dict:
    """Growth exponents, the edit-memory model and the 8B / 70B extrapolation."""
    from cdelta.circuits.attribution import batch_memory_bytes
    from cdelta.models.architecture import Architecture

    summary: dict = {"exponents": {}, "edit_memory_model": {}, "extrapolation": {}}
    first = results[0]
    for stage in ("localize", "edit", "eval"):
        for quantity in ("seconds", "peak_mb"):
            ys = [r["stages"][stage][quantity] for r in results]
            row = {
                "params": slope([r["params"] for r in results], ys) if len(results) > 1 else None,
                "layers_x_heads": slope([r["layers"] * r["heads"] for r in results], ys) if len(results) > 1 else None,
            }
            sweep = first["sweeps"].get({"localize": "localize_pairs", "eval": "eval_prompts"}.get(stage, ""), [])
            row["prompts"] = slope([s["n"] for s in sweep], [s[stage][quantity] for s in sweep]) if len(sweep) > 1 else None
            summary["exponents"][f"{stage}.{quantity}"] = row
    if len(results) < 2:
        return summary
    alpha, gamma = fit_edit_memory(results)
    summary["edit_memory_model"] = {"alpha": alpha, "gamma": gamma}
    largest = max(results, key=lambda r: r["params"])
    shape = largest["stages"]["edit"]["shape"]
    for name, (params, layers, heads, kv, d, d_mlp, vocab) in TARGETS.items():
        ratio = params / largest["params"]
        row: dict = {"weights_bf16_gb": 2 * params / 1e9}
        for stage in ("localize", "eval"):
            e, t = (summary["exponents"][f"{stage}.{q}"]["params"] for q in ("peak_mb", "seconds"))
            row[stage] = {"cpu_hours": largest["stages"][stage]["seconds"] * ratio**t / 3600,
                          "working_gb_fit": largest["stages"][stage]["peak_mb"] * ratio**e / 1024}
        arch = Architecture("llama", layers, heads, kv, d // heads, d, d_mlp)
        row["localize"]["working_gb_planner"] = batch_memory_bytes(arch, vocab, 8, 70, 6, 1, 2) / 2**30
        # the pipeline's recipe on the measured prompts (PIPELINE_SCALE), a params:0.02 circuit touching tensors
        # in the same proportion as the larger model's, trained through every layer (worst case), bfloat16
        entries = 0.02 * params
        target = {
            "entries": entries, "touched": entries * shape["touched"] / shape["entries"], "layers_trained": layers,
            "tokens": shape["tokens"] * PIPELINE_SCALE["batch"], "positions": shape["positions"] * PIPELINE_SCALE["batch"],
            "retain_positions": shape["retain_positions"] * PIPELINE_SCALE["retain"],
        }
        known, act, logit = edit_terms(target, d, d_mlp, vocab, 2)
        t = summary["exponents"]["edit.seconds"]["params"]
        row["edit"] = {"cpu_hours": largest["stages"]["edit"]["seconds"] * ratio**t / 3600,
                       "optimizer_gb": 16 * entries / 2**30, "working_gb_model": (known + alpha * act + gamma * logit) / 2**30}
        summary["extrapolation"][name] = row
    return summary


def print_tables(results: list[dict], summary: dict) -> None:
    print("\n== CPU time (1 thread) and peak working memory on top of the weights (float32) ==")
    print(f"{'model':14} {'params':>7} {'LxH':>4} {'stage':12} {'CPU s':>7} {'wall s':>7} {'peak MB':>8}")
    rows = [(r, stage, m) for r in results for stage, m in r["stages"].items()]
    first = results[0]
    for key, stage in (("localize_pairs", "localize"), ("eval_prompts", "eval")):
        rows += [(first, f"{stage}@{s['n']}", s[stage]) for s in first["sweeps"].get(key, [])]
    for r, stage, m in rows:
        extra = f"  (planner estimate {m['estimate_mb']:.0f} MB)" if "estimate_mb" in m else ""
        print(f"{r['model']:14} {r['params'] / 1e6:6.0f}M {r['layers'] * r['heads']:4} {stage:12} {m['seconds']:7.1f} "
              f"{m['wall_seconds']:7.1f} {m['peak_mb']:8.0f}{extra}")
    print("\n== growth exponents b in y ∝ x^b (params, LxH: two-point fits across the models; prompts: first model's sweep) ==")
    print(f"{'quantity':18} {'vs params':>10} {'vs LxH':>8} {'vs prompts':>11}")
    fmt = lambda v: f"{v:.2f}" if v is not None else "-"  # noqa: E731
    for key, row in summary["exponents"].items():
        print(f"{key:18} {fmt(row['params']):>10} {fmt(row['layers_x_heads']):>8} {fmt(row['prompts']):>11}")
    print("\n== edit peak memory vs circuit size (circuits start at layer n_layers - 4; 1 step) ==")
    print(f"{'model':14} {'circuit':10} {'entries':>11} {'touched':>11} {'16 B/entry MB':>14} {'peak MB':>8} {'CPU s':>6}")
    for r in results:
        for c in r["sweeps"]["circuit"]:
            label = f"{c['heads']} heads" if c["heads"] else f"{c['mlps']} MLPs"
            shape = c["edit"]["shape"]
            print(f"{r['model']:14} {label:10} {shape['entries']:11,} {shape['touched']:11,} {16 * shape['entries'] / 2**20:14.1f} "
                  f"{c['edit']['peak_mb']:8.0f} {c['edit']['seconds']:6.1f}")
    model = summary["edit_memory_model"]
    if not model:
        return
    print(f"\n== edit memory model: peak = known + {model['alpha']:.2f} x activations + {model['gamma']:.2f} x logits ==")
    print(f"{'model':14} {'edit':22} {'known MB':>9} {'act MB':>8} {'logit MB':>9} {'model MB':>9} {'measured':>9}")
    for r, m in edit_rows(results):
        known, act, logit = edit_terms(m["shape"], r["d_model"], r["d_mlp"], r["vocab"], 4)
        label = f"{m['shape']['entries']:,} entries, {m['shape']['layers_trained']} layers"
        predicted = known + model["alpha"] * act + model["gamma"] * logit
        print(f"{r['model']:14} {label:22} {known / 2**20:9.0f} {act / 2**20:8.0f} {logit / 2**20:9.0f} {predicted / 2**20:9.0f} {m['peak_mb']:9.0f}")
    print("\n== extrapolation: bfloat16; localize 8 pairs (planner); edit with cdelta run's batches (memory model); "
          "power-law fits from the larger model ==")
    for name, row in summary["extrapolation"].items():
        loc, edit, ev = row["localize"], row["edit"], row["eval"]
        print(f"{name}: weights {row['weights_bf16_gb']:.0f} GB | localize: planner {loc['working_gb_planner']:.2f} GB "
              f"(power-law fit {loc['working_gb_fit']:.2f} GB), {loc['cpu_hours']:.2f} CPU-h | edit (params:0.02, all layers): "
              f"{edit['working_gb_model']:.1f} GB incl. optimizer {edit['optimizer_gb']:.1f} GB, {edit['cpu_hours']:.1f} CPU-h | "
              f"eval: power-law fit {ev['working_gb_fit']:.1f} GB, {ev['cpu_hours']:.2f} CPU-h")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "qwen2.5-0.5b"])
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--edit-steps", type=int, default=10)
    parser.add_argument("--eval-prompts", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--pair-sweep", type=int, nargs="*", default=[4, 16])
    parser.add_argument("--eval-sweep", type=int, nargs="*", default=[8, 32])
    parser.add_argument("--out", type=Path, default=Path("bench/results/scaling.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    results = []
    clock = time.perf_counter()
    for i, model in enumerate(args.models):
        tmp = args.out.with_suffix(f".{i}.part.json")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, __file__, "--worker", model, "--json", str(tmp), "--pairs", str(args.pairs),
                   "--edit-steps", str(args.edit_steps), "--eval-prompts", str(args.eval_prompts), "--tokens", str(args.tokens)]
        if i == 0:
            command += ["--pair-sweep", *map(str, args.pair_sweep), "--eval-sweep", *map(str, args.eval_sweep)]
        else:
            command += ["--pair-sweep", "--eval-sweep"]
        subprocess.run(command, check=True, env={**os.environ, **WORKER_ENV})
        results.append(json.loads(tmp.read_text()))
        tmp.unlink()
        print(f"{model}: measured in {time.perf_counter() - clock:.0f} s", file=sys.stderr)
    summary = summarize(results)
    print_tables(results, summary)
    args.out.write_text(json.dumps({"results": results, "summary": summary, "total_seconds": time.perf_counter() - clock}, indent=1))
    print(f"\ntotal {time.perf_counter() - clock:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
