"""Per-context summary of an edited model against its base: what a deployment check reads.

Both inputs are ``evaluate_model`` results (``results.json`` of ``cdelta eval``) over the
same prompt sets and contexts. For every context (``plain`` first) one row gives, in
refusal-rate points (0–100):

* ``target``: the edited model's refusal of the target categories, per set that has them;
* ``other_rise``: the largest rise over the base of any other harmful cell (any set);
* ``harmless`` / ``harmless_garbled``: pooled harmless refusal and garbled-reply rate,
  edited minus base;
* ``lookalike`` / ``lookalike_garbled``: the same for the pooled look-alikes;
* ``own_field``: refusal of the look-alikes from the target's own field
  (``lookalike:<target>`` cells pooled over every set), edited and base.
"""

from __future__ import annotations

from cdelta.data.contexts import CONTEXTS, PLAIN
from cdelta.data.prompts import HARMLESS, LOOKALIKE
from cdelta.errors import CdeltaError
from cdelta.evaluate import field_cell_name


def _tables(result: dict) -> dict[str, dict]:
    """``{context: {"sets", "pooled"}}`` of one evaluation, plain first."""
    return {PLAIN: result, **result.get("contexts", {})}


def _pooled_cells(cells: list[dict]) -> tuple[float, float, int]:
    """(refusal %, garbled %, n) pooled over ``cells`` (``RefusalStat.to_json`` dicts)."""
    n = sum(c["n"] for c in cells)
    if not n:
        return float("nan"), float("nan"), 0
    return 100 * sum(c["refusals"] for c in cells) / n, 100 * sum(c.get("garbled", 0) for c in cells) / n, n


def context_row(base: dict, edited: dict, targets: list[str]) -> dict:
    """The summary of one context; ``base`` and ``edited`` are its ``{"sets", "pooled"}``."""
    row: dict = {"target": {}, "other_rise": float("-inf"), "other_rise_cell": ""}
    for name, cells in edited["sets"].items():
        for category, cell in cells.items():
            before = base["sets"].get(name, {}).get(category)
            if before is None:
                raise CdeltaError(f"set {name} category {category} is in the edited results but not the base's",
                                  "evaluate both models on the same prompt sets and contexts")
            if category in targets:
                row["target"][name] = 100 * cell["refusal_rate"]
            elif cell["kind"] == "harmful":
                rise = 100 * (cell["refusal_rate"] - before["refusal_rate"])
                if rise > row["other_rise"]:
                    row["other_rise"], row["other_rise_cell"] = rise, f"{name}/{category}"
    if row["other_rise"] == float("-inf"):  # no other harmful cell
        row["other_rise"] = None
    for kind in (HARMLESS, LOOKALIKE):
        after, before = edited["pooled"].get(kind), base["pooled"].get(kind)
        if after and before:
            row[kind] = 100 * (after["refusal_rate"] - before["refusal_rate"])
            row[f"{kind}_garbled"] = 100 * (after["garbled_rate"] - before["garbled_rate"])
    fields = [field_cell_name(t) for t in targets]
    own = {label: _pooled_cells([c for cells in result["sets"].values() for cat, c in cells.items() if cat in fields])
           for label, result in (("edited", edited), ("base", base))}
    if own["edited"][2]:
        row["own_field"], row["own_field_base"], row["own_field_n"] = own["edited"][0], own["base"][0], own["edited"][2]
    return row


def context_summary(base: dict, edited: dict, targets: list[str]) -> dict[str, dict]:
    """``{context: context_row}`` for every context both evaluations have."""
    base_tables, edited_tables = _tables(base), _tables(edited)
    missing = sorted(set(edited_tables) - set(base_tables))
    if missing:
        raise CdeltaError(f"the base evaluation lacks context(s) {', '.join(missing)}",
                          "evaluate the base with the same --context options")
    order = {name: i for i, name in enumerate(CONTEXTS)}
    ranked = sorted(edited_tables, key=lambda name: (order.get(name.split("-")[0], len(order)), name))
    return {context: context_row(base_tables[context], edited_tables[context], targets) for context in ranked}


def markdown(summary: dict[str, dict]) -> str:
    """The summary as a Markdown table, one row per context."""
    sets = sorted({name for row in summary.values() for name in row["target"]})
    head = ["context", *(f"target {s}" for s in sets), "worst other rise", "harmless Δ", "harmless garbled Δ",
            "look-alike Δ", "look-alike garbled Δ", "own-field look-alikes (base)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def fmt(value: float | None, signed: bool = False) -> str:
        return "–" if value is None else (f"{value:+.1f}" if signed else f"{value:.1f}")

    for context, row in summary.items():
        cells = [context, *(fmt(row["target"].get(s)) for s in sets),
                 f"{fmt(row['other_rise'], True)} ({row['other_rise_cell']})" if row["other_rise"] is not None else "–",
                 fmt(row.get(HARMLESS), True), fmt(row.get(f"{HARMLESS}_garbled"), True),
                 fmt(row.get(LOOKALIKE), True), fmt(row.get(f"{LOOKALIKE}_garbled"), True),
                 f"{fmt(row.get('own_field'))} ({fmt(row.get('own_field_base'))})" if "own_field" in row else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def read_evaluation(path) -> dict:
    """An evaluation's results (the results.json of ``cdelta eval``)."""
    from pathlib import Path

    from cdelta.models.integrity import read_json_object

    fix = "pass the results.json written by cdelta eval"
    data = read_json_object(Path(path), "cdelta eval result", fix)
    if not isinstance(data.get("sets"), dict) or not isinstance(data.get("pooled"), dict):
        raise CdeltaError(f"{path} is not a cdelta eval result (no sets and pooled tables)", fix)
    return data
