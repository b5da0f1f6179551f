"""Serving cost: generation throughput and transient memory of the base model, a C-Δθ
checkpoint and the CAST-hooked base, in one process, interleaved.

* base: the bundled model as loaded by ``cdelta.models.loading.load_model``;
* C-Δθ: a checkpoint directory written by ``cdelta run`` (``RUN/checkpoint``), loaded with
  plain ``transformers.AutoModelForCausalLM.from_pretrained`` as a user would;
* CAST: the base with ``CastModel.attach`` hooks (loaded from ``--cast``, else fitted on
  the train/val splits and saved there).

For each batch size, every variant generates exactly ``--max-new-tokens`` greedy tokens
(EOS suppressed) for the same prompts; after one warm-up per variant, ``--repeats`` rounds
run the variants in turn. Throughput is reported as the median ratio to the base over
the rounds (with the range). Memory is the peak resident set size during a generation
minus the RSS just before it (``/proc/self/statm`` sampled every millisecond in a thread,
after ``malloc_trim`` returns freed heap to the OS): the KV cache, activations and hook
overhead, as torch's CPU allocator really takes them. ``weights MB`` is the static size
of the parameters (plus CAST's vectors); RSS right after loading is not used for it
because safetensors checkpoints are memory-mapped and paged in lazily.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_serving.py [--checkpoint runs/smollm2-cybercrime/checkpoint] [--batch-sizes 1,8]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import threading
import time
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")
MB = 2**20


def rss() -> int:
    """Resident set size of this process, in bytes (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * PAGE


def tensor_mb(tensors) -> float:
    """Bytes of ``tensors`` in MB."""
    return sum(t.numel() * t.element_size() for t in tensors) / MB


def release_freed_memory() -> None:
    """Ask glibc to return freed heap pages to the OS, so the next RSS delta is not hidden by reuse."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class PeakRss:
    """Context manager sampling RSS in a thread: ``start`` (bytes before) and ``peak`` (max seen)."""

    def __init__(self, interval: float = 0.001) -> None:
        self.interval, self.start, self.peak = interval, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRss:
        self.start = self.peak = rss()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


def measure(model, tokenizer, prompts: list[str], max_new_tokens: int, hooks=None) -> tuple[float, float]:
    """(tokens per second, peak RSS growth in MB) of one fixed-length greedy generation."""
    from cdelta.compare.run import generation_speed

    release_freed_memory()
    with PeakRss() as memory:
        speed = generation_speed(model, tokenizer, prompts, max_new_tokens, hooks)
    return speed, (memory.peak - memory.start) / MB


def load_cast(lm, category: str, path: Path, seed: int):
    """The CAST model at ``path``, fitted (train split, choices on val) and saved there if missing."""
    from cdelta.baselines.cast import CastModel, fit_cast
    from cdelta.data.builtin import load_builtin

    if path.is_file():
        return CastModel.load(path)
    print(f"fitting CAST for {category} (saved to {path}; pass --cast to reuse another)", flush=True)
    cast = fit_cast(lm, load_builtin().filter(split=["train", "val"]), category, seed=seed)
    cast.save(path)
    return cast


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--category", default="cybercrime")
    parser.add_argument("--checkpoint", type=Path, default=Path("runs/smollm2-cybercrime/checkpoint"))
    parser.add_argument("--cast", type=Path, default=None, help="CAST model file (default runs/serving/cast-CATEGORY.safetensors)")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    from cdelta.data.builtin import load_builtin
    from cdelta.models.loading import load_model

    lm = load_model(args.model)
    variants = {"base": (lm.model, None)}
    weights = {"base": tensor_mb(lm.model.parameters())}
    if args.checkpoint.is_dir():
        edited = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32).eval()
        variants["C-Δθ"] = (edited, None)
        weights["C-Δθ"] = tensor_mb(edited.parameters())
    else:
        print(f"no C-Δθ checkpoint at {args.checkpoint}: make one with\n"
              f"  OMP_NUM_THREADS=1 .venv/bin/cdelta run --model {args.model} --category {args.category} --out {args.checkpoint.parent}\n"
              "or pass --checkpoint DIR; measuring the base and CAST only.", flush=True)
    cast = load_cast(lm, args.category, args.cast or Path("runs/serving") / f"cast-{args.category}.safetensors", args.seed)
    variants["CAST (hooks)"] = (lm.model, cast.attach)
    extra = [cast.behavior_vector, cast.condition_vector] + ([cast.condition_center] if cast.condition_center is not None else [])
    weights["CAST (hooks)"] = weights["base"] + tensor_mb(extra)

    sizes = [int(s) for s in args.batch_sizes.split(",")]
    prompts = load_builtin().filter(split="val").sample(max(sizes), args.seed).texts()
    print(f"{args.model}: {args.max_new_tokens} new tokens, {args.repeats} interleaved rounds, {args.threads} thread(s)")
    header = f"{'batch':>5}  {'variant':<13} {'tokens/s':>9} {'vs base':>7} {'range':>13} {'peak RSS Δ MB':>14} {'vs base':>7}  {'weights MB':>10}"
    print(header)
    for size in sizes:
        batch = prompts[:size]
        for model, hooks in variants.values():
            measure(model, lm.tokenizer, batch, args.max_new_tokens, hooks)
        runs = {name: [] for name in variants}
        for _ in range(args.repeats):
            for name, (model, hooks) in variants.items():
                runs[name].append(measure(model, lm.tokenizer, batch, args.max_new_tokens, hooks))
        base = runs["base"]
        for name, samples in runs.items():
            speed = [s / b for (s, _), (b, _) in zip(samples, base)]
            memory = statistics.median(m for _, m in samples)
            base_memory = statistics.median(m for _, m in base)
            print(f"{size:>5}  {name:<13} {statistics.median(s for s, _ in samples):>9.1f} {statistics.median(speed):>7.3f} "
                  f"{f'[{min(speed):.3f}, {max(speed):.3f}]':>13} {memory:>14.1f} "
                  f"{memory / base_memory if base_memory > 0 else float('nan'):>7.2f}  {weights[name]:>10.1f}", flush=True)


if __name__ == "__main__":
    main()
