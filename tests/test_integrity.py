"""Integrity and fault tolerance (issue #26): hashes rest on the bytes, damaged inputs are one-line
errors, run directories are exclusive, loading never unpickles, full disks leave nothing partial."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cdelta import cli
from cdelta.errors import CdeltaError
from cdelta.models import integrity
from cdelta.models.integrity import file_sha256
from cdelta.models.loading import load_model, weights_hash

SRC = Path(__file__).resolve().parents[1] / "src"
PARAM = "model.layers.0.mlp.up_proj.weight"


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Every test here keeps its hash cache (and any bundled-model cache) in tmp_path."""
    monkeypatch.setenv("CDELTA_CACHE_DIR", str(tmp_path / "cache"))
    integrity._MEMO.clear()


def _cli(monkeypatch, capsys, *args) -> str:
    """Run the CLI; assert exit 2 with exactly one ``error:`` line and no traceback; return it."""
    capsys.readouterr()  # drop what fixtures printed (e.g. a progress bar while saving the tiny model)
    monkeypatch.setattr(sys, "argv", ["cdelta", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    return lines[0]


def _nudge(model_dir: Path, amount: float = 1e-3) -> None:
    """Change one weight of ``model_dir`` by ``amount`` (metadata kept)."""
    path = model_dir / "model.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    tensors[PARAM][0, 0] += amount
    save_file(tensors, str(path), metadata=metadata)


def _age(path: Path, seconds: float = 3600) -> None:
    """Set ``path``'s mtime into the past (so its digest may be cached)."""
    past = time.time() - seconds
    os.utime(path, (past, past))


def _delta_for(model_dir: Path, out: Path) -> Path:
    from cdelta.edit.delta import save_sparse

    delta = {PARAM: torch.zeros(64, 32)}
    delta[PARAM][:3] = 0.01
    save_sparse(delta, out, {"base_model": "tiny", "base_weights_sha256": weights_hash(model_dir)})
    return out


# --------------------------------------------------------------------------- 1. hashes are facts


def test_weights_hash_is_the_sha256_of_the_bytes_as_before(tiny_llama_dir, tmp_path):
    single = weights_hash(tiny_llama_dir)
    assert single == hashlib.sha256((tiny_llama_dir / "model.safetensors").read_bytes()).hexdigest()
    # several files: sha256 over sorted "name:digest" lines (the rule existing deltas were made with)
    sharded = tmp_path / "sharded"
    load_model(str(tiny_llama_dir)).model.save_pretrained(sharded, max_shard_size="20KB")
    files = sorted(sharded.glob("*.safetensors"))
    assert len(files) > 1
    lines = "".join(f"{f.name}:{hashlib.sha256(f.read_bytes()).hexdigest()}\n" for f in files)
    assert weights_hash(sharded) == hashlib.sha256(lines.encode()).hexdigest()


def test_a_sidecar_never_vouches_for_bytes(tiny_llama_dir):
    before = weights_hash(tiny_llama_dir)
    marker = {"weights_sha256": {"model.safetensors": before}}
    (tiny_llama_dir / "cdelta-cache.json").write_text(json.dumps(marker))
    _nudge(tiny_llama_dir)
    after = weights_hash(tiny_llama_dir)
    assert after != before
    assert after == hashlib.sha256((tiny_llama_dir / "model.safetensors").read_bytes()).hexdigest()


def test_hash_cache_is_keyed_by_size_mtime_inode_ctime(tiny_llama_dir, monkeypatch):
    path = tiny_llama_dir / "model.safetensors"
    _age(path)
    calls = []
    real = integrity.sha256_bytes_of
    monkeypatch.setattr(integrity, "sha256_bytes_of", lambda p, *a: calls.append(p) or real(p, *a))
    first = file_sha256(path)
    assert len(calls) == 1
    integrity._MEMO.clear()  # as in a new process: the digest comes from the cache file
    assert file_sha256(path) == first and len(calls) == 1
    assert integrity.hash_cache_path().is_file()

    # same size, mtime put back: the inode's ctime still changed, so the bytes are hashed again
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    second = file_sha256(path)
    assert len(calls) == 2 and second != first
    assert second == hashlib.sha256(bytes(data)).hexdigest()


def test_fresh_files_are_hashed_but_not_cached(tmp_path):
    path = tmp_path / "fresh.bin"
    path.write_bytes(b"x" * 100)
    assert file_sha256(path) == hashlib.sha256(b"x" * 100).hexdigest()
    stored = json.loads(integrity.hash_cache_path().read_text()) if integrity.hash_cache_path().exists() else {}
    assert os.path.realpath(path) not in stored


def test_a_damaged_hash_cache_is_ignored(tiny_llama_dir):
    path = tiny_llama_dir / "model.safetensors"
    _age(path)
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    cache = integrity.hash_cache_path()
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text("{not json")
    assert file_sha256(path) == expected
    integrity._MEMO.clear()
    wrong = {os.path.realpath(path): {"stat": "nonsense", "sha256": "0" * 64}}
    cache.write_text(json.dumps(wrong))
    assert file_sha256(path) == expected


def test_apply_delta_refuses_a_base_whose_bytes_differ(monkeypatch, capsys, tiny_llama_dir, tmp_path):
    delta = _delta_for(tiny_llama_dir, tmp_path / "delta.safetensors")
    copy = tmp_path / "copy"
    shutil.copytree(tiny_llama_dir, copy)
    # the copy carries a sidecar with the original hashes, as a copied bundled cache would
    (copy / "cdelta-cache.json").write_text(json.dumps({"weights_sha256": {"model.safetensors": weights_hash(tiny_llama_dir)}}))
    _nudge(copy)
    message = _cli(monkeypatch, capsys, "apply-delta", str(copy), str(delta), str(tmp_path / "out"))
    assert "does not match" in message
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], "no staging directory left"

    # the untouched base takes it
    monkeypatch.setattr(sys, "argv", ["cdelta", "apply-delta", str(tiny_llama_dir), str(delta), str(tmp_path / "ok")])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 0
    assert (tmp_path / "ok" / "model.safetensors").is_file()


def _fake_bundled_cache(tiny_llama_dir: Path) -> Path:
    """The tiny model placed where the bundled smollm2-135m cache lives (under CDELTA_CACHE_DIR)."""
    from cdelta.models.bundled import BUNDLED, cached_dir

    target = cached_dir(BUNDLED["smollm2-135m"])
    shutil.copytree(tiny_llama_dir, target)
    weights = {"model.safetensors": hashlib.sha256((target / "model.safetensors").read_bytes()).hexdigest()}
    (target / "cdelta-cache.json").write_text(json.dumps({"name": "smollm2-135m", "weights_sha256": weights}))
    return target


def test_an_altered_bundled_cache_is_refused(monkeypatch, capsys, tiny_llama_dir, tmp_path):
    from cdelta.models.bundled import BUNDLED, materialize

    target = _fake_bundled_cache(tiny_llama_dir)
    assert materialize(BUNDLED["smollm2-135m"]) == target
    assert load_model("smollm2-135m").weights_sha256 == weights_hash(tiny_llama_dir)
    delta = _delta_for(tiny_llama_dir, tmp_path / "delta.safetensors")

    _nudge(target)
    with pytest.raises(CdeltaError, match="altered on disk.*models install smollm2-135m --force"):
        load_model("smollm2-135m")
    message = _cli(monkeypatch, capsys, "apply-delta", "smollm2-135m", str(delta), str(tmp_path / "out"))
    assert "altered on disk" in message
    assert not (tmp_path / "out").exists()

    (target / "extra.safetensors").write_bytes((target / "model.safetensors").read_bytes())
    with pytest.raises(CdeltaError, match="added or removed"):
        materialize(BUNDLED["smollm2-135m"])
    (target / "cdelta-cache.json").write_text("{")
    with pytest.raises(CdeltaError, match="damaged cdelta-cache.json"):
        materialize(BUNDLED["smollm2-135m"])


# --------------------------------------------------------------------------- 2. damaged inputs: one line, exit 2


def test_corrupt_and_truncated_deltas_are_one_line_errors(monkeypatch, capsys, tiny_llama_dir, tmp_path):
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(os.urandom(4096))
    message = _cli(monkeypatch, capsys, "apply-delta", str(tiny_llama_dir), str(fake), str(tmp_path / "out"))
    assert "not a valid cdelta sparse delta" in message

    good = _delta_for(tiny_llama_dir, tmp_path / "delta.safetensors").read_bytes()
    for cut in (4, len(good) // 2, len(good) - 1):
        (tmp_path / "cut.safetensors").write_bytes(good[:cut])
        message = _cli(monkeypatch, capsys, "apply-delta", str(tiny_llama_dir), str(tmp_path / "cut.safetensors"), str(tmp_path / "out"))
        assert "cut.safetensors" in message and "not a valid cdelta sparse delta" in message
    assert not (tmp_path / "out").exists()


def test_delta_with_wrong_metadata(tiny_llama_dir, tmp_path):
    from safetensors.torch import save

    from cdelta.edit.delta import apply_sparse_deltas, load_sparse

    base = weights_hash(tiny_llama_dir)
    values = {f"{PARAM}::indices": torch.tensor([0, 5], dtype=torch.int32), f"{PARAM}::values": torch.tensor([0.1, 0.2])}
    cases = {
        "no cdelta manifest": ({}, values),
        "not JSON": ({"manifest": "{"}, values),
        "not a JSON object": ({"manifest": "[1]"}, values),
        "unknown delta format": ({"manifest": json.dumps({"format": "x"})}, values),
        "not a sha256": ({"manifest": json.dumps({"format": "cdelta-sparse-delta/2", "base_weights_sha256": 5, "shapes": {}})}, values),
        "shapes or layouts are not maps": ({"manifest": json.dumps({"format": "cdelta-sparse-delta/2", "shapes": [1]})}, values),
        "is missing": ({"manifest": json.dumps({"format": "cdelta-sparse-delta/2", "shapes": {"x": [3]}, "layouts": {"x": "flat"}})}, values),
        "outside its shape": ({"manifest": json.dumps({"format": "cdelta-sparse-delta/2", "shapes": {PARAM: [2, 2]}, "layouts": {PARAM: "flat"}})}, values),
        "non-finite": ({"manifest": json.dumps({"format": "cdelta-sparse-delta/2", "shapes": {PARAM: [64, 32]}, "layouts": {PARAM: "flat"}})},
                       {**values, f"{PARAM}::values": torch.tensor([0.1, float("nan")])}),
        "unknown layout": ({"manifest": json.dumps({"format": "cdelta-sparse-delta/2", "shapes": {PARAM: [64, 32]}, "layouts": {PARAM: "zip"}})}, values),
    }
    for needle, (metadata, tensors) in cases.items():
        path = tmp_path / "d.safetensors"
        path.write_bytes(save(tensors, metadata=metadata))
        with pytest.raises(CdeltaError, match=re.escape(needle)):
            load_sparse(path)
    # right structure, wrong base model shapes: refused before anything is written
    path = tmp_path / "shape.safetensors"
    manifest = {"format": "cdelta-sparse-delta/2", "base_weights_sha256": base, "shapes": {PARAM: [32, 64]}, "layouts": {PARAM: "flat"}}
    path.write_bytes(save(values, metadata={"manifest": json.dumps(manifest)}))
    with pytest.raises(CdeltaError, match="has shape"):
        apply_sparse_deltas(tiny_llama_dir, [path], tmp_path / "out")
    manifest.pop("base_weights_sha256")
    path.write_bytes(save(values, metadata={"manifest": json.dumps(manifest)}))
    with pytest.raises(CdeltaError, match="names no base weights"):
        apply_sparse_deltas(tiny_llama_dir, [path], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_truncated_checkpoint_is_a_one_line_error(monkeypatch, capsys, tiny_llama_dir, tmp_path):
    weights = tiny_llama_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    out = tmp_path / "r.json"
    message = _cli(monkeypatch, capsys, "eval", "--model", str(tiny_llama_dir), "--judge", "marker", "--out", str(out))
    assert "model.safetensors is not a valid safetensors weight file" in message and "truncated" in message
    assert not out.exists()


def test_damaged_checkpoints(tiny_llama_dir, tmp_path):
    sharded = tmp_path / "sharded"
    shutil.copytree(tiny_llama_dir, sharded)
    (sharded / "model.safetensors").unlink()
    load_model(str(tiny_llama_dir)).model.save_pretrained(sharded, max_shard_size="20KB")
    assert load_model(str(sharded)).weights_sha256 == weights_hash(sharded)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    moved = tmp_path / "moved.safetensors"
    shutil.move(sharded / shard, moved)
    with pytest.raises(CdeltaError, match=f"lacks shard {shard}"):
        load_model(str(sharded))
    shutil.move(moved, sharded / shard)

    config = tiny_llama_dir / "config.json"
    original = config.read_text()
    for text, needle in [("{", "not valid JSON"), ("[]", "JSON object expected"), ("{}", "names no model_type"), (b"\xff\xfe", "not valid JSON")]:
        config.write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(CdeltaError, match=needle):
            load_model(str(tiny_llama_dir))
    for change, needle in [({"num_hidden_layers": 3}, "lacks weights"), ({"num_hidden_layers": 1}, "has no place for"),
                           ({"intermediate_size": 48}, "could not load model")]:
        config.write_text(json.dumps({**json.loads(original), **change}))
        with pytest.raises(CdeltaError, match=needle):
            load_model(str(tiny_llama_dir))
    config.write_text(original)
    load_model(str(tiny_llama_dir))


def test_circuit_results_and_stage_files(monkeypatch, capsys, tmp_path):
    from cdelta.circuits.circuit import Circuit
    from cdelta.stages import run_stage

    path = tmp_path / "circuit.json"
    for text, needle in [("[]", "not a cdelta circuit"), ('{"format": "cdelta-circuit"}', "positive integers"),
                         ('{"format": "cdelta-circuit", "n_layers": 2, "n_heads": 2, "scores": {"L9.H0": 1}, "nodes": []}', "outside"),
                         ('{"format": "cdelta-circuit", "n_layers": 2, "n_heads": 2, "scores": {"x": 1}, "nodes": []}', "not a node id"),
                         ('{"format": "cdelta-circuit", "n_layers": 2, "n_heads": 2, "scores": {}, "nodes": "L0.H0"}', "list of node ids")]:
        path.write_text(text)
        with pytest.raises(CdeltaError, match=needle):
            Circuit.from_json(path)

    run = tmp_path / "run"
    run.mkdir()
    for text in ['{"edited": [], "base": 3}', '{"sets": {"a": 1}, "utility": 2}', "[1, 2]", "\x00\x01"]:
        (run / "results.json").write_text(text)
        message = _cli(monkeypatch, capsys, "report", str(run))
        assert "results" in message
        assert not (run / "report.html").exists()

    # stage files: a damaged record, a changed output, an unreadable output are recomputed
    log: list[str] = []
    calls = []

    def compute():
        calls.append(1)
        (run / "out.json").write_text(json.dumps({"value": 7}))
        return 7

    load = lambda: json.loads((run / "out.json").read_text())["value"]  # noqa: E731
    assert run_stage(run, "s", {"a": 1}, ["out.json"], compute, load, log.append) == 7
    assert run_stage(run, "s", {"a": 1}, ["out.json"], compute, load, log.append) == 7 and len(calls) == 1
    (run / ".stages" / "s.json").write_text("{half")
    assert run_stage(run, "s", {"a": 1}, ["out.json"], compute, load, log.append) == 7 and len(calls) == 2
    (run / "out.json").write_text('{"value": 8}')
    assert run_stage(run, "s", {"a": 1}, ["out.json"], compute, load, log.append) == 7 and len(calls) == 3
    assert any("changed since the stage wrote it" in m for m in log)
    record = json.loads((run / ".stages" / "s.json").read_text())
    record.pop("sha256")  # a record from before output digests: reuse rests on load() alone
    (run / ".stages" / "s.json").write_text(json.dumps(record))
    (run / "out.json").write_text("[]")
    assert run_stage(run, "s", {"a": 1}, ["out.json"], compute, load, log.append) == 7 and len(calls) == 4
    assert any("cannot reuse" in m for m in log)


def test_bad_config_files(monkeypatch, capsys, tmp_path):
    from cdelta.config import load_config_file

    path = tmp_path / "run.toml"
    for content, needle in [(b"run = 3\n", "must be a table"), (b"[run\n", "not valid TOML"), (b"\xff\xfe\x00", "not UTF-8"),
                            (b"[run]\nsteps = 'many'\n", "invalid setting steps")]:
        path.write_bytes(content)
        message = _cli(monkeypatch, capsys, "run", "--config", str(path), "--out", str(tmp_path / "run"))
        assert needle in message
        assert not (tmp_path / "run").exists()
    with pytest.raises(CdeltaError, match="cannot read config file"):
        load_config_file(tmp_path)


@pytest.mark.parametrize("n_pairs", ["0", "1", "-3"])
def test_localize_with_too_few_pairs_names_the_pairs(monkeypatch, capsys, tiny_llama_dir, tmp_path, n_pairs):
    message = _cli(monkeypatch, capsys, "localize", "--model", str(tiny_llama_dir), "--n-pairs", n_pairs, "--out", str(tmp_path / "loc"))
    assert f"--n-pairs {n_pairs} is too few" in message and "at least 2" in message
    assert "prompts in the train split" not in message
    assert not (tmp_path / "loc").exists()


def test_make_pairs_checks_n_pairs_itself():
    from cdelta.circuits.localize import make_pairs
    from cdelta.data.builtin import load_builtin

    with pytest.raises(CdeltaError, match="at least 2"):
        make_pairs(load_builtin(), "cybercrime", n_pairs=1)
    clean, corrupt, _ = make_pairs(load_builtin(), "cybercrime", n_pairs=2)
    assert len(clean) == len(corrupt) == 2


# --------------------------------------------------------------------------- 3. exclusive run directories


def _hold_lock(run_dir: Path):
    import fcntl

    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / ".lock", "a+")
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    handle.write("4242")
    handle.flush()
    return handle


def test_a_run_directory_in_use_is_refused_at_once(monkeypatch, capsys, tiny_llama_dir, tmp_path):
    from cdelta.config import RunConfig
    from cdelta.pipeline import run_pipeline

    run_dir = tmp_path / "run"
    handle = _hold_lock(run_dir)
    try:
        clock = time.perf_counter()
        with pytest.raises(CdeltaError, match=r"in use by another cdelta run \(pid 4242\)"):
            run_pipeline(RunConfig(model=str(tiny_llama_dir)), run_dir, log=lambda m: None)
        assert time.perf_counter() - clock < 5
        message = _cli(monkeypatch, capsys, "run", "--model", str(tiny_llama_dir), "--out", str(run_dir))
        assert "in use by another cdelta run" in message and "--out" in message
        assert not (run_dir / ".stages").exists()
    finally:
        handle.close()


def test_the_lock_is_released_on_return_error_and_kill(tmp_path):
    from cdelta.stages import exclusive_run_dir

    run_dir = tmp_path / "run"
    with exclusive_run_dir(run_dir):
        with exclusive_run_dir(run_dir):  # re-entrant in one process
            pass
    with pytest.raises(ZeroDivisionError):
        with exclusive_run_dir(run_dir):
            1 / 0
    _hold_lock(run_dir).close()  # free again

    code = textwrap.dedent(f"""
        import os, sys, time
        from cdelta.stages import exclusive_run_dir
        with exclusive_run_dir({str(run_dir)!r}):
            print("locked", flush=True)
            time.sleep(60)
    """)
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(CdeltaError, match=f"pid {child.pid}"):
            with exclusive_run_dir(run_dir):
                pass
    finally:
        child.kill()
        child.wait()
    with exclusive_run_dir(run_dir):  # the OS released it with the killed process
        pass


def test_taking_the_lock_sweeps_what_killed_writers_left(tmp_path):
    from cdelta.stages import exclusive_run_dir

    run_dir = tmp_path / "run"
    (run_dir / ".stages").mkdir(parents=True)
    stale = [run_dir / ".delta.safetensors.abc123.tmp", run_dir / ".stages" / ".edit.json.xyz.tmp"]
    for path in stale:
        path.write_bytes(b"half")
    (run_dir / ".checkpoint.q1w2e3" / "model").mkdir(parents=True)
    kept = [run_dir / "delta.safetensors", run_dir / "notes.tmp"]
    for path in kept:
        path.write_bytes(b"whole")
    with exclusive_run_dir(run_dir):
        pass
    assert not any(p.exists() for p in stale) and not (run_dir / ".checkpoint.q1w2e3").exists()
    assert all(p.exists() for p in kept)


# --------------------------------------------------------------------------- 4. security defaults


def test_no_pickle_anywhere_in_loading():
    offenders = []
    for path in sorted((SRC / "cdelta").rglob("*.py")):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(r"\bimport pickle\b|\bpickle\.|\bjoblib\b|\bdill\b|allow_pickle\s*=\s*True|weights_only\s*=\s*False", code):
                offenders.append(f"{path.name}:{number}: {line.strip()}")
            if "torch.load(" in code and "weights_only=True" not in code:
                offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert not offenders, offenders


def test_pickled_weights_are_never_loaded(tiny_llama_dir, monkeypatch):
    torch.save({"x": torch.zeros(1)}, tiny_llama_dir / "pytorch_model.bin")
    (tiny_llama_dir / "model.safetensors").unlink()
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    with pytest.raises(CdeltaError, match="only pickled weights"):
        load_model(str(tiny_llama_dir))


@pytest.mark.parametrize("flag", [False, True])
def test_trust_remote_code_only_when_asked(tiny_llama_dir, monkeypatch, flag):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    seen = []
    real_model, real_tok = AutoModelForCausalLM.from_pretrained, AutoTokenizer.from_pretrained

    def model_from_pretrained(*args, **kwargs):
        seen.append(("model", kwargs))
        return real_model(*args, **kwargs)

    def tok_from_pretrained(*args, **kwargs):
        seen.append(("tokenizer", kwargs))
        return real_tok(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", model_from_pretrained)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", tok_from_pretrained)
    load_model(str(tiny_llama_dir), trust_remote_code=flag)
    assert {kind for kind, _ in seen} == {"model", "tokenizer"}
    for kind, kwargs in seen:
        assert kwargs.get("trust_remote_code") is flag, (kind, kwargs)
    model_kwargs = next(k for kind, k in seen if kind == "model")
    assert model_kwargs.get("use_safetensors") is True


def test_cli_passes_trust_remote_code_only_with_the_flag(monkeypatch, tiny_llama_dir, tmp_path):
    import cdelta.models.loading as loading

    seen = []

    def fake_load(name, device="cpu", dtype="float32", trust_remote_code=False, *args, **kwargs):
        seen.append(trust_remote_code)
        raise CdeltaError("stop here")

    monkeypatch.setattr(loading, "load_model", fake_load)
    for extra, expected in [([], False), (["--trust-remote-code"], True)]:
        monkeypatch.setattr(sys, "argv", ["cdelta", "eval", "--model", str(tiny_llama_dir), "--judge", "marker",
                                          "--out", str(tmp_path / "r.json"), *extra])
        with pytest.raises(SystemExit):
            cli.main()
        assert seen[-1] is expected


# --------------------------------------------------------------------------- 5. full disks


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_export_on_a_full_disk_leaves_no_partial_checkpoint(tiny_llama_dir, tmp_path, monkeypatch):
    from cdelta.edit.export import export_edit

    delta_module = sys.modules["cdelta.edit.delta"]  # (the attribute cdelta.edit is the API function)

    lm = load_model(str(tiny_llama_dir))
    delta = {PARAM: torch.full((64, 32), 0.01)}
    out = tmp_path / "run"
    monkeypatch.setattr(delta_module, "save_file", _enospc)
    with pytest.raises(CdeltaError, match="no space left on the device while writing the checkpoint"):
        export_edit(lm, delta, out, {"category": "cybercrime"})
    assert not (out / "checkpoint").exists()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".checkpoint")], "staging directory removed"

    monkeypatch.undo()
    monkeypatch.setenv("CDELTA_CACHE_DIR", str(tmp_path / "cache"))
    import cdelta.io as io_module

    real_fdopen = os.fdopen

    class Full:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, data):
            self.handle.write(data[: len(data) // 2])
            _enospc()

    monkeypatch.setattr(io_module.os, "fdopen", lambda fd, mode: Full(real_fdopen(fd, mode)))
    with pytest.raises(CdeltaError, match="no space left on the device while writing .*delta.safetensors"):
        export_edit(lm, delta, tmp_path / "run2", {"category": "cybercrime"})
    assert not (tmp_path / "run2" / "delta.safetensors").exists()
    assert not [p.name for p in (tmp_path / "run2").iterdir() if p.name.endswith(".tmp")]


def test_eval_on_a_full_disk_is_one_line_and_writes_nothing(monkeypatch, capsys, tiny_llama_dir, tmp_path):
    import cdelta.io as io_module

    real_replace = os.replace

    def full_replace(src, dst):
        if Path(dst).name == "r.json":
            _enospc()
        return real_replace(src, dst)

    monkeypatch.setattr(io_module.os, "replace", full_replace)
    monkeypatch.setattr("cdelta.data.public.load_ppl_text", lambda chars: "The sea is blue and the sky is wide. " * 4)
    out = tmp_path / "r.json"
    message = _cli(monkeypatch, capsys, "eval", "--model", str(tiny_llama_dir), "--judge", "marker", "--limit-per-category", "1",
                   "--max-new-tokens", "2", "--mmlu-n", "0", "--backend", "transformers", "--out", str(out))
    assert "no space left on the device while writing" in message and "r.json" in message
    assert not out.exists() and not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_full_disk_anywhere_is_one_line(monkeypatch, capsys, tmp_path):
    def full_app():
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run.log"))

    monkeypatch.setattr(cli, "app", full_app)
    message = _cli(monkeypatch, capsys, "run")
    assert "no space left on the device" in message and "run.log" in message

    def other_error():
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(cli, "app", other_error)
    monkeypatch.setattr(sys, "argv", ["cdelta"])
    with pytest.raises(OSError):  # not a disk-space or permission problem: not disguised as one
        cli.main()
