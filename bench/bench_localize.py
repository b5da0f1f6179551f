"""Wall time and peak memory of node attribution on smollm2-135m: EAP-IG vs exact patching (vs EAP).

Each method runs in its own subprocess (same prompts, same settings) so that peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) is per method; we report the peak and the
increase over the RSS right after loading the model. Scores are compared with exact
patching (Spearman / Pearson, overlap of the top nodes).

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_localize.py [--pairs 8] [--steps 5] [--positions suffix]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def _rss_kb() -> int:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") // 1024


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from cdelta.circuits.attribution import attribute
    from cdelta.circuits.localize import make_pairs
    from cdelta.data.builtin import load_builtin
    from cdelta.models.loading import load_model

    lm = load_model(args.model)
    clean, corrupt, _ = make_pairs(load_builtin(), args.category, "harmful", args.pairs, seed=0)
    positions = None if args.positions == "all" else (args.positions if args.positions == "suffix" else int(args.positions))
    after_load = _rss_kb()
    start = time.perf_counter()
    result = attribute(
        lm.model, lm.tokenizer, [p.text for p in clean], [p.text for p in corrupt],
        method=args.child, steps=args.steps, batch_size=args.batch_size, n_positions=positions,
    )
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({
        "method": args.child, "seconds": seconds, "peak_rss_mb": peak / 1024, "after_load_rss_mb": after_load / 1024,
        "peak_increase_mb": (peak - after_load) / 1024, "scores": result.scores.flatten().tolist(),
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--category", default="cybercrime")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--positions", default="suffix", help="'suffix', 'all' or a number of last positions")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    parser.add_argument("--methods", default="eap-ig,exact,eap")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    from scipy.stats import pearsonr, spearmanr

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    results = {}
    for method in args.methods.split(","):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", method, "--model", args.model, "--category", args.category,
               "--pairs", str(args.pairs), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
               "--positions", args.positions, "--threads", str(args.threads)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        results[method] = json.loads(out.stdout.strip().splitlines()[-1])
    load = os.getloadavg()
    print(f"model={args.model} category={args.category} pairs={args.pairs} steps={args.steps} positions={args.positions} "
          f"threads={args.threads} loadavg(1m)={load[0]:.2f}")
    tl = "installed" if importlib.util.find_spec("transformer_lens") else "not installed (not needed: plain-PyTorch hooks)"
    print(f"TransformerLens: {tl}")
    print(f"{'method':<8} {'seconds':>9} {'peak RSS MB':>12} {'+over load MB':>14}")
    for m, r in results.items():
        print(f"{m:<8} {r['seconds']:9.1f} {r['peak_rss_mb']:12.0f} {r['peak_increase_mb']:14.0f}")
    if "exact" in results:
        ex = results["exact"]
        k = max(1, round(0.05 * len(ex["scores"])))
        top_ex = set(sorted(range(len(ex["scores"])), key=lambda i: -abs(ex["scores"][i]))[:k])
        for m, r in results.items():
            if m == "exact":
                continue
            top = set(sorted(range(len(r["scores"])), key=lambda i: -abs(r["scores"][i]))[:k])
            print(f"exact/{m}: time x{ex['seconds'] / r['seconds']:.1f}, peak-RSS increase x"
                  f"{ex['peak_increase_mb'] / max(r['peak_increase_mb'], 1e-9):.2f}; "
                  f"{m} vs exact scores: Spearman {spearmanr(r['scores'], ex['scores']).statistic:.3f}, "
                  f"Pearson {pearsonr(r['scores'], ex['scores']).statistic:.3f}, top-{k} overlap {len(top & top_ex)}/{k}")


if __name__ == "__main__":
    main()
