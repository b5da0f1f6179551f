"""Loading tiny model directories through the same path as real models."""

import pytest

from cdelta.errors import CdeltaError
from cdelta.models.architecture import architecture_of
from cdelta.models.loading import load_model


def test_load_tiny_model_reads_architecture(tiny_model_dir):
    lm = load_model(str(tiny_model_dir))
    arch = architecture_of(lm.model)
    assert (arch.n_layers, arch.n_heads, arch.n_kv_heads, arch.head_dim) == (2, 4, 2, 8)
    assert arch.kv_head(3) == 1
    assert lm.tokenizer.padding_side == "left"
    assert len(lm.weights_sha256) == 64
    assert arch.attn_param(1, "q") in dict(lm.model.named_parameters())


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(CdeltaError, match="unknown model 'nope'"):
        load_model("nope")


def test_model_without_chat_template_is_rejected(tiny_llama_dir):
    import json

    cfg = tiny_llama_dir / "tokenizer_config.json"
    data = json.loads(cfg.read_text())
    data.pop("chat_template", None)
    cfg.write_text(json.dumps(data))
    (tiny_llama_dir / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(CdeltaError, match="no chat template"):
        load_model(str(tiny_llama_dir))
