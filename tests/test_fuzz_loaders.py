"""Fuzzing the loaders of everything a user or a crash can damage (issue #26).

A seeded generator truncates, bit-flips, splices and zeroes the bytes of valid files, and
replaces parts of valid JSON with values of the wrong type; each loader must then either
load or raise ``CdeltaError``: nothing else may escape. Every case is reproducible from
its seed and index, which the failure message names.
"""

from __future__ import annotations

import copy
import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from cdelta.errors import CdeltaError

PARAM = "model.layers.0.mlp.up_proj.weight"
NORM = "model.layers.1.input_layernorm.weight"
WRONG_VALUES = [None, True, False, -1, 0, 1, 3, 2.5, -0.5, float("nan"), "", "x", "L0.H0", [], [1], ["a", None], {}, {"a": 1}]
"""Replacement values of the wrong type (and small ints only: a fuzzed config must not ask for a huge model)."""


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CDELTA_CACHE_DIR", str(tmp_path / "cache"))


# --------------------------------------------------------------------------- generators


def mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    """One random damage: truncation, bit flips, a random splice, a zeroed run, or a duplicated run."""
    if not data:
        return bytes([rng.randrange(256)])
    kind = rng.choice(["truncate", "flip", "flip", "splice", "zero", "duplicate"])
    buf = bytearray(data)
    if kind == "truncate":
        return bytes(buf[: rng.randrange(len(buf))])
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        return bytes(buf)
    i = rng.randrange(len(buf))
    n = rng.randint(1, 64)
    if kind == "splice":
        buf[i:i + n] = bytes(rng.randrange(256) for _ in range(rng.randint(0, 64)))
    elif kind == "zero":
        buf[i:i + n] = bytes(len(buf[i:i + n]))
    else:
        buf[i:i] = buf[i:i + n]
    return bytes(buf)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield from _paths(value, (*prefix, i))


def mutate_json(rng: random.Random, obj):
    """``obj`` with one random part replaced by a value of the wrong type, deleted, or wrapped in a list."""
    obj = copy.deepcopy(obj)
    path = rng.choice(list(_paths(obj)))
    if not path:
        return rng.choice(WRONG_VALUES)
    parent = obj
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    action = rng.choice(["replace", "replace", "replace", "delete", "wrap"])
    if action == "delete":
        del parent[key]
    elif action == "wrap":
        parent[key] = [parent[key]]
    else:
        parent[key] = copy.deepcopy(rng.choice(WRONG_VALUES))
    return obj


def only_cdelta_errors(seed: int, cases: int, case: Callable[[random.Random, int], object]) -> dict[str, int]:
    """Run ``case(rng, i)`` ``cases`` times; fail on any exception but ``CdeltaError``.
    Returns how many cases loaded and how many were refused."""
    counts = {"loaded": 0, "refused": 0}
    for i in range(cases):
        rng = random.Random(seed * 100_003 + i)
        try:
            case(rng, i)
        except CdeltaError as exc:
            assert "\n" not in str(exc).strip(), f"case {seed}/{i}: the error is not one line: {exc}"
            counts["refused"] += 1
        except Exception as exc:  # noqa: BLE001
            pytest.fail(f"case {seed}/{i}: {exc.__class__.__name__} escaped: {exc}")
        else:
            counts["loaded"] += 1
    return counts


# --------------------------------------------------------------------------- deltas


def _valid_delta(path: Path, base_sha: str) -> None:
    from cdelta.edit.delta import save_sparse

    delta = {PARAM: torch.zeros(64, 32), NORM: torch.zeros(32)}
    delta[PARAM][[1, 5, 9]] = 0.01
    delta[NORM][[0, 7]] = -0.02
    save_sparse(delta, path, {"base_model": "tiny", "base_weights_sha256": base_sha, "category": "cybercrime", "k": 1.0})


def test_fuzz_delta_files(tiny_llama_dir, tmp_path):
    from safetensors import safe_open

    from cdelta.edit.delta import apply_sparse_deltas, load_sparse
    from cdelta.models.loading import weights_hash

    base_sha = weights_hash(tiny_llama_dir)
    good = tmp_path / "good.safetensors"
    _valid_delta(good, base_sha)
    data = good.read_bytes()
    with safe_open(str(good), framework="pt") as handle:
        manifest = json.loads(handle.metadata()["manifest"])
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    path = tmp_path / "fuzzed.safetensors"
    out = tmp_path / "out"

    def damaged_bytes(rng, i):
        path.write_bytes(mutate_bytes(rng, data))
        load_sparse(path)

    def wrong_manifest(rng, i):
        fuzzed = dict(tensors)
        if rng.random() < 0.3:  # a tensor of another dtype or length
            name = rng.choice(sorted(fuzzed))
            t = fuzzed[name]
            fuzzed[name] = rng.choice([t.double(), t.float(), t.to(torch.int64), t.reshape(-1)[: max(0, t.numel() - 1)].contiguous(),
                                       torch.cat([t.reshape(-1), t.reshape(-1)[:1]])])
        meta = mutate_json(rng, manifest) if rng.random() < 0.9 else manifest
        path.write_bytes(save(fuzzed, metadata={"manifest": json.dumps(meta)}))
        if i % 4 == 0:  # the whole apply path too: refused before anything is written, or written whole
            shutil.rmtree(out, ignore_errors=True)
            try:
                apply_sparse_deltas(tiny_llama_dir, [path], out)
            except CdeltaError:
                assert not out.exists()
                raise
        else:
            load_sparse(path)

    first = only_cdelta_errors(1, 300, damaged_bytes)
    second = only_cdelta_errors(2, 200, wrong_manifest)
    print(f"delta files: damaged bytes {first}, wrong manifests {second}")
    assert first["refused"] > 100 and second["refused"] > 50


# --------------------------------------------------------------------------- checkpoints


def test_fuzz_checkpoints(tiny_llama_dir, tmp_path):
    from cdelta.models.loading import load_model

    sharded = tmp_path / "sharded"
    shutil.copytree(tiny_llama_dir, sharded)
    (sharded / "model.safetensors").unlink()
    load_model(str(tiny_llama_dir)).model.save_pretrained(sharded, max_shard_size="20KB")
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    weights = (tiny_llama_dir / "model.safetensors").read_bytes()
    work = tmp_path / "work"

    def case(rng, i):
        source = sharded if i % 4 == 3 else tiny_llama_dir
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(source, work)
        which = i % 4
        if which == 0:
            (work / "model.safetensors").write_bytes(mutate_bytes(rng, weights))
        elif which == 1:
            (work / "config.json").write_text(json.dumps(mutate_json(rng, config)))
        elif which == 2:
            (work / "config.json").write_bytes(mutate_bytes(rng, json.dumps(config).encode()))
        else:
            (work / "model.safetensors.index.json").write_text(json.dumps(mutate_json(rng, index)))
        load_model(str(work))

    counts = only_cdelta_errors(3, 60, case)
    print(f"checkpoints: {counts}")
    assert counts["refused"] > 15


# --------------------------------------------------------------------------- run-directory artifacts


def _circuit_dict() -> dict:
    from cdelta.circuits.circuit import Circuit

    scores = {f"L{layer}.{node}": 0.1 * (layer + 1) for layer in range(2) for node in ("H0", "H1", "H2", "H3", "MLP")}
    return Circuit(2, 4, scores, ["L0.H1", "L1.MLP"], {"category": "cybercrime", "selection": {"kind": "top_k", "value": 2}}).to_dict()


def test_fuzz_circuit_files(tmp_path):
    from cdelta.circuits.circuit import Circuit

    valid = _circuit_dict()
    path = tmp_path / "circuit.json"

    def case(rng, i):
        if i % 3 == 0:
            path.write_bytes(mutate_bytes(rng, json.dumps(valid).encode()))
        else:
            path.write_text(json.dumps(mutate_json(rng, valid)))
        circuit = Circuit.from_json(path)
        circuit.heads(), circuit.mlps(), circuit.ranked(), circuit.mask_matrix(), circuit.score_matrix()

    counts = only_cdelta_errors(4, 400, case)
    print(f"circuit.json: {counts}")
    assert counts["refused"] > 100


def _eval_results() -> dict:
    from cdelta.evaluate import wilson_interval

    def cell(r, n, kind):
        return {"refusal_rate": r / n, "n": n, "refusals": r, "ci95": list(wilson_interval(r, n)), "kind": kind}

    cells = {"cybercrime": cell(3, 8, "harmful"), "harmless": cell(0, 8, "harmless"), "lookalike": cell(1, 8, "lookalike")}
    generations = [{"id": f"builtin:{c}-{i}", "category": c, "prompt": f"prompt {i}", "completion": "I'm sorry" if i else "Sure",
                    "refusal": bool(i)} for c in cells for i in range(2)]
    return {"sets": {"builtin": cells}, "pooled": {}, "generations": {"builtin": generations},
            "utility": {"perplexity": 12.5, "perplexity_ratio": 1.0, "mmlu_accuracy": 0.4, "mmlu_n": 4, "first_token_kl": 0.0},
            "meta": {"seed": 0, "model": "tiny", "weights_sha256": "ab" * 32, "versions": {"cdelta": "0.1.0"}, "prompts": ["builtin"]}}


def test_fuzz_results_json(tmp_path):
    from cdelta.report import build_report

    valid = _eval_results()
    (tmp_path / "results.json").write_text(json.dumps(valid))
    assert "<html" in build_report(tmp_path)

    def case(rng, i):
        if i % 4 == 0:
            (tmp_path / "results.json").write_bytes(mutate_bytes(rng, json.dumps(valid).encode()))
        else:
            (tmp_path / "results.json").write_text(json.dumps(mutate_json(rng, valid)))
        build_report(tmp_path)

    counts = only_cdelta_errors(5, 40, case)
    print(f"results.json: {counts}")
    assert counts["refused"] > 5


def test_fuzz_stage_records_and_outputs(tmp_path):
    from cdelta.stages import run_stage

    run = tmp_path / "run"
    run.mkdir()
    out = {"k": 1.5, "rates": {"cybercrime": 0.5}}

    def compute():
        (run / "k_selection.json").write_text(json.dumps(out))
        return out

    def load():
        value = json.loads((run / "k_selection.json").read_text())
        float(value["k"])
        return value

    assert run_stage(run, "choose-k", {"a": 1}, ["k_selection.json"], compute, load) == out
    record = json.loads((run / ".stages" / "choose-k.json").read_text())

    def case(rng, i):
        target = run / (".stages/choose-k.json" if i % 2 else "k_selection.json")
        original = record if i % 2 else out
        if i % 4 < 2:
            target.write_text(json.dumps(mutate_json(rng, original)))
        else:
            target.write_bytes(mutate_bytes(rng, json.dumps(original).encode()))
        assert run_stage(run, "choose-k", {"a": 1}, ["k_selection.json"], compute, load) == out

    counts = only_cdelta_errors(6, 200, case)
    assert counts["refused"] == 0, "a damaged stage file is recomputed, never an error"


# --------------------------------------------------------------------------- config and prompt files


def test_fuzz_config_files(tmp_path):
    import tomllib
    from importlib.resources import files

    from cdelta.config import load_config_file, make_config

    text = files("cdelta").joinpath("config.default.toml").read_text()
    parsed = tomllib.loads(text)
    values = parsed.get("run", parsed)
    assert isinstance(values, dict) and values
    path = tmp_path / "run.toml"

    def case(rng, i):
        if i % 2:
            path.write_bytes(mutate_bytes(rng, text.encode()))
            make_config(load_config_file(path), {})
        else:
            fuzzed = mutate_json(rng, values)
            make_config(fuzzed if isinstance(fuzzed, dict) else {"model": fuzzed}, {})

    counts = only_cdelta_errors(7, 300, case)
    print(f"config: {counts}")
    assert counts["refused"] > 50


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".json"])
def test_fuzz_prompt_files(tmp_path, suffix):
    from cdelta.data.registry import load_source

    records = [{"prompt": f"How do I do thing {i}?", "category": ["cybercrime", "weapons", "other"][i % 3]} for i in range(6)]
    if suffix == ".csv":
        text = "prompt,category\n" + "".join(f'"{r["prompt"]}",{r["category"]}\n' for r in records)
    elif suffix == ".jsonl":
        text = "".join(json.dumps(r) + "\n" for r in records)
    else:
        text = json.dumps({"prompts": records})
    path = tmp_path / f"prompts{suffix}"
    path.write_text(text)
    assert len(load_source(str(path))) == 6

    def case(rng, i):
        if suffix == ".csv" or i % 2:
            path.write_bytes(mutate_bytes(rng, text.encode()))
        elif suffix == ".jsonl":
            lines = text.splitlines()
            j = rng.randrange(len(lines))
            lines[j] = json.dumps(mutate_json(rng, json.loads(lines[j])))
            path.write_text("\n".join(lines) + "\n")
        else:
            path.write_text(json.dumps(mutate_json(rng, json.loads(text))))
        for prompt in load_source(str(path)):
            assert isinstance(prompt.text, str) and prompt.text

    counts = only_cdelta_errors(8, 200, case)
    print(f"prompt files {suffix}: {counts}")
    assert counts["refused"] > 10


def test_generators_are_deterministic():
    a = [mutate_bytes(random.Random(i), b"0123456789" * 10) for i in range(20)]
    b = [mutate_bytes(random.Random(i), b"0123456789" * 10) for i in range(20)]
    assert a == b
