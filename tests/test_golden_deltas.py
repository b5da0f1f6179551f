"""Golden hashes: the pipeline's delta.safetensors on the tiny random llama, byte for byte.

The hashes were measured at 6b4913b (before the behaviour-preserving restructure of
issue #23) and checked to be identical across separate processes. A change here means
the edit itself changed: a restructure must leave them as they are; a deliberate
change of the method updates them in the same commit and says why. Float reductions
split work by thread, so the test runs torch with the 2 threads they were measured with
(on any number of cores).
"""

import hashlib

import pytest
import torch

from cdelta.config import RunConfig
from cdelta.pipeline import run_pipeline

GOLDEN = {
    "direct": "0d7697449939b28121063e20fccb70e03a5bdb78f624a872c0b30064a4841304",
    "contrastive": "32dc15dfe71ce70a99fb04363e73566e18c8abcb9066766c51bf458db1e84f4b",
    "gated": "55d07c499116b954fb05d0bbef3f1eb2f49fff41a6c9855cb1980ce677d1bb1f",
}

VARIANTS = {
    "direct": {},
    "contrastive": {"variant": "contrastive"},
    "gated": {"variant": "gated", "circuit": "top_k:10", "gate_span": 2},
}


def delta_sha256(variant: str, model_dir, run_dir) -> str:
    """sha256 of the delta.safetensors that ``variant`` writes for the tiny model in ``model_dir``."""
    settings = dict(
        model=model_dir, n_pairs=4, ig_steps=2, circuit="top_k:3", steps=3, k_grid=[1.0],
        retain_harmless=4, retain_lookalike=4, retain_other=1, max_new_tokens=2, mmlu_n=0,
        eval_limit=1, faithfulness=False, judge="marker",
    )
    cfg = RunConfig(**{**settings, **VARIANTS[variant]})
    run_pipeline(cfg, run_dir, log=lambda m: None)
    return hashlib.sha256((run_dir / "delta.safetensors").read_bytes()).hexdigest()


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("variant", sorted(GOLDEN))
def test_delta_matches_golden_hash(variant, tiny_llama_dir, tmp_path, monkeypatch, two_threads):
    monkeypatch.setenv("CDELTA_CACHE_DIR", str(tmp_path / "cache"))
    # the evaluation after export does not touch the delta: a short perplexity text keeps it quick
    monkeypatch.setattr("cdelta.data.public.load_ppl_text", lambda chars: "The sea is blue and the sky is wide. " * 4)
    # the delta's header names the base model as given: a relative name keeps tmp_path out of it
    monkeypatch.chdir(tiny_llama_dir.parent)
    assert delta_sha256(variant, tiny_llama_dir.name, tmp_path / "run") == GOLDEN[variant]
