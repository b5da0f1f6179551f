"""Wall time and peak memory of localization on smollm2-135m.

Three modes:

* default: node attribution, EAP-IG vs exact patching (vs EAP). Each method runs in its own
  subprocess (same prompts, same settings) so that peak RSS
  (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) is per method; we report the peak and the
  increase over the RSS right after loading the model. Scores are compared with exact
  patching (Spearman / Pearson, overlap of the top nodes).
* ``--edges``: edge attribution (``cdelta.circuits.edges``), EAP-IG vs EAP by default (exact
  edge patching needs one pass per edge, 70,651 on SmolLM2, and is not run here); edge
  scores are compared between methods, and each method's summed out-edge scores with the
  node attribution of the same method (an identity: they must agree).
* ``--end-to-end``: times ``cdelta localize`` itself (model load, attribution, shuffled-label
  control, faithfulness, files) as a subprocess with ``OMP_NUM_THREADS=--threads``; add
  ``--edges`` for ``cdelta localize --edges``. Prints the wall time, the stage timings from
  ``circuit.json``, the subprocess's CPU time and the 1-minute load average (the machine may
  be shared: then wall time overstates the cost, CPU time of a 1-thread run does not).

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_localize.py [--pairs 8] [--steps 5] [--positions suffix]
    .venv/bin/python bench/bench_localize.py --edges --pairs 8 --threads 1
    .venv/bin/python bench/bench_localize.py --end-to-end --pairs 32 --threads 1 [--edges]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
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
    from cdelta.circuits.edges import attribute_edges
    from cdelta.circuits.localize import make_pairs
    from cdelta.data.builtin import load_builtin
    from cdelta.models.loading import load_model

    lm = load_model(args.model)
    clean, corrupt, _ = make_pairs(load_builtin(), args.category, "harmful", args.pairs, seed=0)
    positions = None if args.positions == "all" else (args.positions if args.positions == "suffix" else int(args.positions))
    after_load = _rss_kb()
    kind, _, method = args.child.partition(":")
    run = attribute_edges if kind == "edges" else attribute
    start = time.perf_counter()
    result = run(
        lm.model, lm.tokenizer, [p.text for p in clean], [p.text for p in corrupt],
        method=method, steps=args.steps, batch_size=args.batch_size, n_positions=positions,
    )
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {
        "method": args.child, "seconds": seconds, "peak_rss_mb": peak / 1024, "after_load_rss_mb": after_load / 1024,
        "peak_increase_mb": (peak - after_load) / 1024,
    }
    if kind == "edges":
        out["scores"] = result.scores[result.graph.valid()].tolist()
        out["node_scores"] = result.node_matrix().flatten().tolist()
    else:
        out["scores"] = result.scores.flatten().tolist()
    print(json.dumps(out))


def _run_child(args, name: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--model", args.model, "--category", args.category,
           "--pairs", str(args.pairs), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
           "--positions", args.positions, "--threads", str(args.threads)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _top(scores: list[float], k: int) -> set[int]:
    return set(sorted(range(len(scores)), key=lambda i: -abs(scores[i]))[:k])


def _header(args) -> None:
    load = os.getloadavg()
    print(f"model={args.model} category={args.category} pairs={args.pairs} steps={args.steps} positions={args.positions} "
          f"threads={args.threads} loadavg(1m)={load[0]:.2f}")


def nodes_mode(args) -> None:
    from scipy.stats import pearsonr, spearmanr

    results = {m: _run_child(args, f"nodes:{m}") for m in args.methods.split(",")}
    _header(args)
    tl = "installed" if importlib.util.find_spec("transformer_lens") else "not installed (not needed: plain-PyTorch hooks)"
    print(f"TransformerLens: {tl}")
    print(f"{'method':<8} {'seconds':>9} {'peak RSS MB':>12} {'+over load MB':>14}")
    for m, r in results.items():
        print(f"{m:<8} {r['seconds']:9.1f} {r['peak_rss_mb']:12.0f} {r['peak_increase_mb']:14.0f}")
    if "exact" in results:
        ex = results["exact"]
        k = max(1, round(0.05 * len(ex["scores"])))
        top_ex = _top(ex["scores"], k)
        for m, r in results.items():
            if m == "exact":
                continue
            print(f"exact/{m}: time x{ex['seconds'] / r['seconds']:.1f}, peak-RSS increase x"
                  f"{ex['peak_increase_mb'] / max(r['peak_increase_mb'], 1e-9):.2f}; "
                  f"{m} vs exact scores: Spearman {spearmanr(r['scores'], ex['scores']).statistic:.3f}, "
                  f"Pearson {pearsonr(r['scores'], ex['scores']).statistic:.3f}, top-{k} overlap {len(_top(r['scores'], k) & top_ex)}/{k}")


def edges_mode(args) -> None:
    from scipy.stats import pearsonr, spearmanr

    methods = args.methods.split(",")
    if "exact" in methods:
        raise SystemExit("exact edge patching needs one pass per edge (70,651 on SmolLM2); benchmark it on a tiny model instead")
    results = {m: _run_child(args, f"edges:{m}") for m in methods}
    nodes = {m: _run_child(args, f"nodes:{m}") for m in methods}
    _header(args)
    print(f"{'edges':<8} {'seconds':>9} {'peak RSS MB':>12} {'+over load MB':>14} {'node run s':>11}")
    for m, r in results.items():
        print(f"{m:<8} {r['seconds']:9.1f} {r['peak_rss_mb']:12.0f} {r['peak_increase_mb']:14.0f} {nodes[m]['seconds']:11.1f}")
    for m, r in results.items():
        diff = max(abs(a - b) for a, b in zip(r["node_scores"], nodes[m]["scores"]))
        scale = max(abs(b) for b in nodes[m]["scores"])
        print(f"{m}: summed out-edge scores vs node attribution: max |diff| {diff:.2e} (max |node score| {scale:.2e}), "
              f"Pearson {pearsonr(r['node_scores'], nodes[m]['scores']).statistic:.6f}")
    if len(methods) > 1:
        a, b = (results[m]["scores"] for m in methods[:2])
        k = max(1, round(0.001 * len(a)))
        print(f"{methods[0]} vs {methods[1]} over {len(a)} edges: Spearman {spearmanr(a, b).statistic:.3f}, "
              f"Pearson {pearsonr(a, b).statistic:.3f}, top-{k} overlap {len(_top(a, k) & _top(b, k))}/{k}")


def end_to_end_mode(args) -> None:
    cdelta = Path(sys.executable).with_name("cdelta")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [str(cdelta), "--quiet", "localize", "--model", args.model, "--category", args.category, "--n-pairs", str(args.pairs),
               "--steps", str(args.steps), "--out", tmp] + (["--edges"] if args.edges else [])
        load_before = os.getloadavg()[0]
        start, cpu_before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = usage.ru_utime - cpu_before.ru_utime + usage.ru_stime - cpu_before.ru_stime
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        meta = json.loads((Path(tmp) / "circuit.json").read_text())
        shown = " ".join("TMP" if c == tmp else c for c in cmd)
    print(f"$ OMP_NUM_THREADS={args.threads} {shown}")
    print(f"wall {wall:.1f} s with {args.threads} thread(s), CPU time {cpu:.1f} s (user+sys; with one thread about the wall "
          f"time on an idle core); loadavg(1m) before {load_before:.2f}, after {os.getloadavg()[0]:.2f}; {os.cpu_count()} cores")
    print("stages (s): " + ", ".join(f"{k} {v}" for k, v in meta["seconds"].items()))
    print(done.stdout.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--category", default="cybercrime")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--positions", default="suffix", help="'suffix', 'all' or a number of last positions")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    parser.add_argument("--methods", default=None, help="default: eap-ig,exact,eap (nodes) or eap-ig,eap (--edges)")
    parser.add_argument("--edges", action="store_true", help="edge attribution (with --end-to-end: cdelta localize --edges)")
    parser.add_argument("--end-to-end", action="store_true", help="time `cdelta localize` as a whole")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
    elif args.end_to_end:
        end_to_end_mode(args)
    elif args.edges:
        args.methods = args.methods or "eap-ig,eap"
        edges_mode(args)
    else:
        args.methods = args.methods or "eap-ig,exact,eap"
        nodes_mode(args)


if __name__ == "__main__":
    main()
