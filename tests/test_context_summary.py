"""The per-context summary of an edited model against its base (``cdelta contexts``)."""

import json

import pytest

from cdelta.context_summary import context_summary, markdown
from cdelta.errors import CdeltaError


def _cell(refusals: int, n: int, kind: str, garbled: int = 0) -> dict:
    return {"refusal_rate": refusals / n, "n": n, "refusals": refusals, "kind": kind, "garbled_rate": garbled / n, "garbled": garbled}


def _result(cyber: int, weapons: int, harmless: int, field: int, garbled: int = 0) -> dict:
    sets = {"builtin": {"cybercrime": _cell(cyber, 10, "harmful"), "weapons": _cell(weapons, 10, "harmful"),
                        "harmless": _cell(harmless, 20, "harmless", garbled), "lookalike": _cell(field, 10, "lookalike"),
                        "lookalike:cybercrime": _cell(field, 4, "lookalike-field")}}
    return {"sets": sets, "pooled": {"harmless": sets["builtin"]["harmless"], "lookalike": sets["builtin"]["lookalike"]}}


def test_summary_rows_per_context_with_rises_against_the_base():
    base = {**_result(0, 1, 0, 0), "contexts": {"system": _result(1, 1, 0, 0)}}
    edited = {**_result(9, 3, 1, 1, garbled=2), "contexts": {"system": _result(6, 1, 0, 0)}}
    summary = context_summary(base, edited, ["cybercrime"])
    assert list(summary) == ["plain", "system"]
    plain = summary["plain"]
    assert plain["target"] == {"builtin": 90.0}
    assert plain["other_rise"] == pytest.approx(20.0) and plain["other_rise_cell"] == "builtin/weapons"
    assert plain["harmless"] == pytest.approx(5.0) and plain["harmless_garbled"] == pytest.approx(10.0)
    assert plain["own_field"] == pytest.approx(25.0) and plain["own_field_base"] == 0.0
    assert summary["system"]["target"] == {"builtin": 60.0} and summary["system"]["other_rise"] == 0.0
    table = markdown(summary)
    assert "| plain | 90.0 | +20.0 (builtin/weapons) | +5.0 | +10.0 |" in table and "| system | 60.0 |" in table


def test_summary_refuses_an_edited_context_the_base_lacks(tmp_path):
    base, edited = _result(0, 0, 0, 0), {**_result(9, 0, 0, 0), "contexts": {"system": _result(6, 0, 0, 0)}}
    with pytest.raises(CdeltaError, match="lacks context"):
        context_summary(base, edited, ["cybercrime"])


def test_contexts_command_prints_the_table_and_rejects_a_wrong_file(tmp_path, monkeypatch, capsys):
    import sys

    from cdelta import cli

    (tmp_path / "base.json").write_text(json.dumps(_result(0, 1, 0, 0)))
    (tmp_path / "edited.json").write_text(json.dumps(_result(9, 1, 0, 0)))
    (tmp_path / "bad.json").write_text("[1, 2]")
    monkeypatch.setattr(sys, "argv", ["cdelta", "contexts", str(tmp_path / "base.json"), str(tmp_path / "edited.json")])
    with pytest.raises(SystemExit) as ok:
        cli.main()
    assert ok.value.code == 0 and "| plain | 90.0 |" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", ["cdelta", "contexts", str(tmp_path / "base.json"), str(tmp_path / "bad.json")])
    with pytest.raises(SystemExit) as bad:
        cli.main()
    err = capsys.readouterr().err
    assert bad.value.code == 2 and "not a cdelta eval result" in err and "Traceback" not in err
