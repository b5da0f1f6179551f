"""Bad input: one line naming problem and fix, exit status 2, no traceback, no output file."""

import json
import sys

import pytest

from cdelta import cli


def _run(monkeypatch, capsys, *args) -> str:
    monkeypatch.setattr(sys, "argv", ["cdelta", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    return lines[0]


def test_unknown_model(monkeypatch, capsys, tmp_path):
    out = tmp_path / "r.json"
    message = _run(monkeypatch, capsys, "eval", "--model", "no-such-model", "--out", str(out))
    assert "unknown model 'no-such-model'" in message and "bundled" in message
    assert not out.exists()


def test_unknown_category(monkeypatch, capsys, tmp_path):
    message = _run(monkeypatch, capsys, "run", "--category", "knitting", "--out", str(tmp_path / "run"))
    assert "knitting" in message and "cybercrime" in message
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "content, suffix, needle",
    [
        ("", ".csv", "empty"),
        ('{"prompt": "a"}\n{not json\n', ".jsonl", "line 2"),
        ("foo,bar\n1,2\n", ".csv", "column"),
    ],
)
def test_bad_prompt_files(monkeypatch, capsys, tmp_path, content, suffix, needle):
    path = tmp_path / f"prompts{suffix}"
    path.write_text(content)
    out = tmp_path / "r.json"
    message = _run(monkeypatch, capsys, "eval", "--prompts", str(path), "--out", str(out))
    assert needle in message.lower()
    assert not out.exists()


def test_missing_named_column(monkeypatch, capsys, tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("prompt,cat\nhello,x\n")
    message = _run(monkeypatch, capsys, "eval", "--prompts", f"{path}:text=question", "--out", str(tmp_path / "r.json"))
    assert "question" in message and "prompt" in message


def test_model_without_chat_template(monkeypatch, capsys, tiny_llama_dir, tmp_path):
    config = tiny_llama_dir / "tokenizer_config.json"
    data = json.loads(config.read_text())
    data.pop("chat_template", None)
    config.write_text(json.dumps(data))
    (tiny_llama_dir / "chat_template.jinja").unlink(missing_ok=True)
    out = tmp_path / "r.json"
    message = _run(monkeypatch, capsys, "eval", "--model", str(tiny_llama_dir), "--out", str(out))
    assert "chat template" in message
    assert not out.exists()


def test_apply_delta_to_wrong_base(monkeypatch, capsys, tiny_llama_dir, tmp_path):
    from cdelta.edit.delta import save_sparse
    import torch

    save_sparse({"model.layers.0.mlp.up_proj.weight": torch.ones(64, 32)}, tmp_path / "d.safetensors", {"base_weights_sha256": "0" * 64})
    message = _run(monkeypatch, capsys, "apply-delta", str(tiny_llama_dir), str(tmp_path / "d.safetensors"), str(tmp_path / "out"))
    assert "does not match" in message
    assert not (tmp_path / "out").exists()
