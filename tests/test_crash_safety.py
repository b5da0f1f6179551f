"""Crash safety (issue #26): a `cdelta run` killed with SIGKILL at every stage resumes to the same delta.

A tiny run is killed the moment each new stage record or export artifact appears (the next
stage is then under way), rerun, killed at the next one, and so on until a rerun finishes.
Its delta.safetensors and checkpoint must be byte-identical to an uninterrupted run's: no
stage may reuse a half-written artifact. Runs in subprocesses (about two minutes on two
cores); the number of kill points tried is printed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
SETTINGS = """
[run]
model = "{model}"
n_pairs = 4
ig_steps = 2
circuit = "top_k:3"
steps = 3
lr = 1e-3
k_grid = [1.0, 1.5]
retain_harmless = 4
retain_lookalike = 4
retain_other = 1
max_new_tokens = 2
mmlu_n = 0
eval_limit = 1
faithfulness = false
judge = "marker"
"""


def _events(run_dir: Path) -> set[str]:
    """What the run has finished so far: stage records and export artifacts."""
    found = {f"stage:{p.stem}" for p in (run_dir / ".stages").glob("*.json")} if (run_dir / ".stages").is_dir() else set()
    found |= {name for name in ("delta.safetensors", "checkpoint", "results_base.json", "results.json") if (run_dir / name).exists()}
    return found


def _command(config: Path, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "cdelta.cli", "--quiet", "run", "--config", str(config), "--out", str(run_dir)]


def test_sigkill_at_every_stage_then_rerun_gives_the_same_delta(tiny_llama_dir, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(SETTINGS.format(model=tiny_llama_dir))
    env = {**os.environ, "PYTHONPATH": str(SRC), "CDELTA_CACHE_DIR": str(tmp_path / "cache-ref")}
    reference = tmp_path / "reference"
    done = subprocess.run(_command(config, reference), env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]

    env["CDELTA_CACHE_DIR"] = str(tmp_path / "cache-killed")  # no base evaluation shared with the reference
    run_dir = tmp_path / "killed"
    killed_at: list[str] = []
    deadline = time.monotonic() + 1200
    while True:
        assert time.monotonic() < deadline, f"no finished run after kills at {killed_at}"
        seen = _events(run_dir)
        child = subprocess.Popen(_command(config, run_dir), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        new: set[str] = set()
        while child.poll() is None and not new:
            time.sleep(0.02)
            new = _events(run_dir) - seen - {"results.json"}
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
            killed_at.append(",".join(sorted(new)))
            continue
        stderr = child.stderr.read()
        assert child.returncode == 0, stderr[-2000:]
        break
    print(f"SIGKILL at {len(killed_at)} points: {killed_at}")
    assert len(killed_at) >= 5, killed_at
    assert (run_dir / "delta.safetensors").read_bytes() == (reference / "delta.safetensors").read_bytes()
    for path in sorted((reference / "checkpoint").glob("*.safetensors")):
        assert (run_dir / "checkpoint" / path.name).read_bytes() == path.read_bytes(), path.name
    assert (run_dir / "results.json").is_file()
    leftovers = [p for p in run_dir.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".checkpoint.")]
    assert not leftovers, leftovers
