"""The comparison table as text cells (shared by the CLI, ``compare.md`` and ``compare.html``)
and a refusal bar chart (matplotlib, embedded as a base64 PNG; the HTML has no scripts and
no external links)."""

from __future__ import annotations

from pathlib import Path

from cdelta.io import atomic_write_bytes
from cdelta.report import _figure, _percent, _png, esc, img

GROUP_LABELS = {"target": "target", "other_harmful": "other harmful", "harmless": "harmless", "lookalike": "look-alike"}
NOTES = (
    "Refusal: share of test-split prompts the judge marks as refused, with its Wilson 95% interval; "
    "Δ = method − base in percentage points (the base row is the reference).",
    "ppl ratio: perplexity on the fixed public-domain text / the base's. KL: mean first-token KL(base ‖ method) "
    "on harmless test prompts, in nats.",
    "params touched: weight entries that differ from the base (share of all parameters). "
    "hooks: needs runtime hooks at inference.",
    "tok/s vs base: greedy generation throughput / the base's, same batch and token count, median of "
    "interleaved pairs (range); the base row's own value shows the measurement noise.",
    "fit s: seconds to fit the method from scratch: a cached artifact it reused (the shared refusal direction, "
    "CAST's condition) is charged its recorded fit time.",
)


def _rate(cell: dict) -> str:
    lo, hi = cell["ci95"]
    return f"{cell['refusal_rate']:.1%} [{lo:.0%}, {hi:.0%}]"


def _delta(cell: dict, is_base: bool) -> str:
    return "–" if is_base else f"{100 * cell['delta_vs_base']:+.1f} pp"


def _fraction(share: float) -> str:
    """A share of the model's parameters as a percentage with 3 significant digits (0.000428%, 48.2%)."""
    return f"{100 * share:.3g}%"


def _method(row: dict) -> str:
    return row["method"] + (" †" if row.get("needs_refusing_base") else "")


def main_table(result: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the comparison table (one row per method, the base first)."""
    rows = result["rows"]
    base = rows[0]
    header = ["method"]
    for group, label in GROUP_LABELS.items():
        name = result["category"] if group == "target" else label
        header += [f"{name} (n={base[group]['n']})", "Δ"]
    header += ["ppl ratio", "KL", "params touched", "hooks", "tok/s vs base", "fit s"]
    body = []
    for i, row in enumerate(rows):
        cells = [_method(row)]
        for group in GROUP_LABELS:
            cells += [_rate(row[group]), _delta(row[group], i == 0)]
        lo, hi = row["speed"]["ratio_range"]
        cells += [
            f"{row['perplexity_ratio']:.3f}",
            f"{row['first_token_kl']:.4f}",
            f"{row['params_touched']:,} ({_fraction(row['params_fraction'])})",
            "yes" if row["runtime_hooks"] else "no",
            f"×{row['tokens_per_s_ratio']:.2f} ({lo:.2f}–{hi:.2f})",
            f"{row['fit_seconds']:.1f}",
        ]
        body.append(cells)
    return header, body


def transposed_table(result: dict) -> tuple[list[str], list[list[str]]]:
    """The comparison with one column per method and one row per measure (narrow enough for a terminal)."""
    rows = result["rows"]
    header = ["", *(_method(r) for r in rows)]
    body = []
    for group, label in GROUP_LABELS.items():
        name = result["category"] if group == "target" else label
        body.append([f"{name} (n={rows[0][group]['n']})", *(f"{r[group]['refusal_rate']:.1%}" for r in rows)])
        body.append(["  95% CI", *(f"{r[group]['ci95'][0]:.0%}–{r[group]['ci95'][1]:.0%}" for r in rows)])
        body.append(["  Δ vs base", *(_delta(r[group], i == 0) for i, r in enumerate(rows))])
        for context in rows[0].get("contexts", {}):
            body.append([f"  {context}", *(f"{r['contexts'][context][group]['refusal_rate']:.1%}" if context in r.get("contexts", {}) else "–"
                                           for r in rows)])
    body += [
        ["ppl ratio", *(f"{r['perplexity_ratio']:.3f}" for r in rows)],
        ["first-token KL", *(f"{r['first_token_kl']:.4f}" for r in rows)],
        ["params touched", *(f"{r['params_touched']:,}" for r in rows)],
        ["  share", *(_fraction(r["params_fraction"]) for r in rows)],
        ["runtime hooks", *("yes" if r["runtime_hooks"] else "no" for r in rows)],
        ["tok/s vs base", *(f"×{r['tokens_per_s_ratio']:.2f}" for r in rows)],
        ["  range", *("{:.2f}–{:.2f}".format(*r["speed"]["ratio_range"]) for r in rows)],
        ["fit s", *(f"{r['fit_seconds']:.1f}" for r in rows)],
    ]
    return header, body


def category_table(result: dict) -> tuple[list[str], list[list[str]]]:
    """Refusal per category (rows) and method (columns), with n."""
    rows = result["rows"]
    categories = list(rows[0]["per_category"])
    header = ["category", "n", *(_method(r) for r in rows)]
    body = [
        [c, str(rows[0]["per_category"][c]["n"]), *(f"{r['per_category'][c]['refusal_rate']:.1%}" for r in rows)]
        for c in categories
    ]
    return header, body


def _legend(result: dict) -> list[str]:
    lines = [f"{row['method']}: {row['summary']}" for row in result["rows"]]
    if any(row.get("needs_refusing_base") for row in result["rows"]):
        lines.append("†: removes refusal; informative only when the base model already refuses.")
    return lines


def _meta_line(result: dict) -> str:
    meta = result["meta"]
    judge, tokens = meta["eval"]["judge"], meta["eval"]["max_new_tokens"]
    limit = meta["eval"]["limit_per_category"]
    return (f"model {meta['model']} (weights sha256 {meta['weights_sha256'][:12]}), target category {result['category']}, "
            f"{meta['split']} split{f' (≤ {limit} per category)' if limit else ''}, judge {judge}, greedy, "
            f"{tokens} new tokens, seed {meta['seed']}")


def markdown(result: dict) -> str:
    """``compare.md``: the main table, the per-category table, legend and column notes."""
    def md_table(header: list[str], rows: list[list[str]]) -> str:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])

    parts = [
        f"# cdelta compare: {result['category']}", "", _meta_line(result), "", md_table(*main_table(result)), "",
        *(f"- {line}" for line in _legend(result)), "", "## Refusal per category", "", md_table(*category_table(result)),
        "", "## Columns", "", *(f"- {note}" for note in NOTES), "",
    ]
    return "\n".join(parts)


def refusal_chart(result: dict) -> bytes:
    """Grouped bars: refusal per group (x) and method (bars), Wilson 95% intervals as error bars."""
    rows = result["rows"]
    fig = _figure(max(6.0, 1.2 + 0.35 * len(rows) * len(GROUP_LABELS)), 3.2)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        xs = [g + (i - (len(rows) - 1) / 2) * width for g in range(len(GROUP_LABELS))]
        rates = [row[g]["refusal_rate"] for g in GROUP_LABELS]
        errors = [[r - row[g]["ci95"][0] for g, r in zip(GROUP_LABELS, rates)], [row[g]["ci95"][1] - r for g, r in zip(GROUP_LABELS, rates)]]
        ax.bar(xs, rates, width, yerr=errors, capsize=2, label=_method(row), color=f"C{i % 10}", error_kw={"lw": 0.8})
    labels = [result["category"] if g == "target" else label for g, label in GROUP_LABELS.items()]
    ax.set_xticks(range(len(GROUP_LABELS)), labels)
    ax.set_ylim(0, 1.05)
    ax.yaxis.set_major_formatter(_percent())
    ax.set_ylabel("refusal (test split)")
    ax.legend(fontsize=7, ncol=min(len(rows), 6), loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    return _png(fig)


CSS = (
    "body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;max-width:1200px}"
    "table{border-collapse:collapse;margin:.8em 0;font-size:13px}"
    "th,td{border:1px solid #ccc;padding:3px 6px;text-align:right}th:first-child,td:first-child{text-align:left}"
    "thead th{background:#f2f2f2}figure{margin:0}img{max-width:100%}.meta,li{color:#444}"
)


def html(result: dict) -> str:
    """``compare.html``: self-contained (inline CSS, the chart as a data URI)."""
    def table(header: list[str], rows: list[list[str]]) -> str:
        head = "".join(f"<th>{esc(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    def items(lines) -> str:
        return "<ul>" + "".join(f"<li>{esc(line)}</li>" for line in lines) + "</ul>"

    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>cdelta compare: {esc(result['category'])}</title>"
        f"<style>{CSS}</style></head><body><h1>cdelta compare: {esc(result['category'])}</h1>"
        f"<p class='meta'>{esc(_meta_line(result))}</p>"
        f"{img(refusal_chart(result), 'refusal per group and method')}"
        f"{table(*main_table(result))}{items(_legend(result))}"
        f"<h2>Refusal per category</h2>{table(*category_table(result))}<h2>Columns</h2>{items(NOTES)}</body></html>\n"
    )


def write_reports(result: dict, out_dir: Path) -> list[Path]:
    """Write ``compare.md`` and ``compare.html`` into ``out_dir`` (atomically)."""
    paths = [Path(out_dir) / "compare.md", Path(out_dir) / "compare.html"]
    atomic_write_bytes(paths[0], markdown(result).encode())
    atomic_write_bytes(paths[1], html(result).encode())
    return paths
