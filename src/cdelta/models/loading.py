"""Load a chat model by bundled name, local directory, or hub id."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from cdelta.errors import CdeltaError
from cdelta.models.bundled import BUNDLED, get_bundled, materialize
from cdelta.models.integrity import check_checkpoint, combine_hashes, file_sha256

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """A causal LM, its tokenizer, and where it came from.

    ``weights_sha256`` is the sha256 over the sorted safetensors files' own hashes
    (one file: that file's hash); it identifies the base weights a delta applies to.
    """

    model: torch.nn.Module
    tokenizer: object
    name: str
    path: Path | None
    weights_sha256: str

    @property
    def device(self) -> torch.device:
        """Where inputs go: the device of the first parameter (the input embeddings, also
        under a multi-GPU ``device_map``, whose hooks move activations between devices)."""
        return next(self.model.parameters()).device


def resolve_device(device: str) -> torch.device:
    """Map ``auto|cpu|cuda|mps`` to a torch device, failing clearly if unavailable."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CdeltaError("device 'cuda' requested but no CUDA GPU is visible", "use --device cpu or auto")
    if device == "mps" and not torch.backends.mps.is_available():
        raise CdeltaError("device 'mps' requested but MPS is not available", "use --device cpu or auto")
    if device not in {"cpu", "mps"} and not device.startswith("cuda"):
        raise CdeltaError(f"unknown device '{device}'", "use one of: auto, cpu, cuda, mps")
    return torch.device(device)


def resolve_dtype(dtype: str) -> torch.dtype:
    """Map a dtype name to a torch dtype."""
    if dtype not in DTYPES:
        raise CdeltaError(f"unknown dtype '{dtype}'", f"use one of: {', '.join(DTYPES)}")
    return DTYPES[dtype]


DEVICE_MAPS = ("auto",)


def check_device_map(device_map: str | None) -> str | None:
    """Validate ``device_map``: None (one device) or ``"auto"`` (accelerate spreads the layers over the GPUs)."""
    if device_map is None:
        return None
    if device_map not in DEVICE_MAPS:
        raise CdeltaError(f"unknown device map '{device_map}'", "use --device-map auto, or leave it unset for one device")
    return device_map


def weights_hash(directory: Path) -> str:
    """Identity hash of a model directory's safetensors weights (see ``LoadedModel``).

    Always computed from the files' bytes (``integrity.file_sha256``, cached by each file's
    size, mtime, inode and ctime); a ``cdelta-cache.json`` sidecar's recorded hashes are
    never taken on trust.
    """
    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise CdeltaError(f"no *.safetensors weights in {directory}", "point --model at a Hugging Face model directory")
    return combine_hashes({f.name: file_sha256(f) for f in files})


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else exc.__class__.__name__)[:300]


def _check_loading_info(name: str, info: dict) -> None:
    """CdeltaError when the weights and the architecture ``config.json`` builds do not match
    (transformers would leave missing weights randomly initialized and drop unexpected ones)."""
    for key, meaning in (("missing_keys", "lacks weights its config.json calls for"),
                         ("unexpected_keys", "holds weights its config.json has no place for"),
                         ("mismatched_keys", "holds weights of other shapes than its config.json says")):
        names = sorted(str(n) for n in (info.get(key) or ()))
        if names:
            raise CdeltaError(f"model '{name}' {meaning} ({len(names)}: {', '.join(names[:3])})",
                              "check that config.json belongs to these weights, or copy or export the checkpoint again")


def resolve_model_path(name_or_path: str) -> Path | None:
    """Local directory for a bundled name or path; None means "treat as a hub id"."""
    if name_or_path in BUNDLED:
        return materialize(get_bundled(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise CdeltaError(f"{path} is not a model directory (no config.json)", "pass a Hugging Face model directory or a bundled name")
        return path
    if "/" not in name_or_path:
        known = ", ".join(sorted(BUNDLED))
        raise CdeltaError(f"unknown model '{name_or_path}'", f"use a bundled model ({known}), a local directory, or a hub id like org/name")
    return None


def load_model(
    name_or_path: str,
    device: str = "cpu",
    dtype: str = "float32",
    trust_remote_code: bool = False,
    require_chat_template: bool = True,
    device_map: str | None = None,
) -> LoadedModel:
    """Load model and tokenizer in eval mode, with left padding for batched generation.

    ``device``: one device (``auto`` picks cuda, then mps, then cpu). ``device_map="auto"``
    instead lets accelerate split a model too large for one GPU over all visible GPUs
    (and CPU memory after them); ``device`` is then ignored.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device_map = check_device_map(device_map)
    target = None if device_map else resolve_device(device)
    path = resolve_model_path(name_or_path)
    source = str(path) if path is not None else name_or_path
    if path is not None:
        check_checkpoint(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        model, info = AutoModelForCausalLM.from_pretrained(
            source, dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code, device_map=device_map,
            use_safetensors=True, output_loading_info=True,
        )
    except OSError as exc:
        raise CdeltaError(
            f"could not load model '{name_or_path}': {_first_line(exc)}",
            "check the name, or pass a local model directory (this machine may be offline)",
        ) from None
    except Exception as exc:  # noqa: BLE001 - any failure to build the model from these files is a loading error
        raise CdeltaError(
            f"could not load model '{name_or_path}': {exc.__class__.__name__}: {_first_line(exc)}",
            "check that its config.json matches its weights and that the files are whole (copy or export it again)",
        ) from None
    _check_loading_info(name_or_path, info)
    if require_chat_template and not getattr(tokenizer, "chat_template", None):
        raise CdeltaError(f"model '{name_or_path}' has no chat template", "use an instruction-tuned chat model whose tokenizer defines chat_template")
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if target is not None:
        model.to(target)
    model.eval()
    digest = weights_hash(path) if path is not None else "unhashed-hub-download"
    return LoadedModel(model=model, tokenizer=tokenizer, name=name_or_path, path=path, weights_sha256=digest)
