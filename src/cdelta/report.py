"""The HTML report of a run: one self-contained ``report.html`` (no network, no external files).

``write_report(run_dir)`` reads ``run_dir/results.json`` (plus, for a ``cdelta run``
directory, ``localize/<category>/circuit.json``, ``localize/<category>/faithfulness.json``
and ``search.json`` when present, unless ``results["search"]`` holds the search) and writes
``run_dir/report.html``. Every chart is drawn with matplotlib on an Agg canvas and embedded
as a base64 PNG ``data:`` URI; the CSS is inline; there are no scripts and no ``http(s)``
links, so the file opens offline and can be mailed or archived as is.

Sections (HTML ids): ``summary`` (run metadata), ``refusal`` (before/after per category
and prompt set), ``utility`` (over-refusal and utility), ``circuit`` (heat map),
``faithfulness`` (curve vs controls), ``pareto`` (k / circuit-size search) and
``generations`` (sample completions). The result of ``cdelta eval`` (no ``edit``) gives a
reduced report: ``summary``, ``refusal``, ``utility`` and ``generations``.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import math
import tempfile
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cdelta.errors import CdeltaError
from cdelta.io import atomic_write_bytes

REPORT_NAME = "report.html"
SAMPLES_PER_CATEGORY = 3
"""Sample generations shown per (prompt set, category)."""
MAX_TEXT_CHARS = 400
"""Prompts and completions longer than this are truncated (with an ellipsis)."""

EDIT_SECTIONS = ("circuit", "faithfulness", "pareto")
SECTIONS = ("summary", "refusal", "contexts", "utility", *EDIT_SECTIONS, "generations")
"""HTML ids of the report's sections, in order (eval-only reports omit ``EDIT_SECTIONS``)."""

SECTION_TITLES = {
    "summary": "Run",
    "refusal": "Refusal before / after",
    "contexts": "Deployment contexts",
    "utility": "Over-refusal and utility",
    "circuit": "Circuit",
    "faithfulness": "Faithfulness",
    "pareto": "Choice of k / circuit size",
    "generations": "Sample generations",
}
ARM_LABELS = {"base": "base", "edited": "C-Δθ", "random": "random circuit", "full": "full fine-tune", "model": "model"}
ARM_COLORS = {"base": "#9e9e9e", "edited": "#d62728", "random": "#1f77b4", "full": "#9467bd", "model": "#d62728"}
FALLBACK_COLORS = ("#2ca02c", "#ff7f0e", "#8c564b", "#17becf")
GROUPS = ("target", "other harmful", "harmful", "harmless", "lookalike")
"""Pooled groups: ``harmful`` only when there are no targets (eval-only), else target / other harmful."""


# --------------------------------------------------------------------------- inputs


@dataclass
class Arm:
    """One evaluated model: the base, the C-Δθ edit, a control, or the single model of ``cdelta eval``."""

    key: str
    label: str
    results: dict
    params_touched: int | None = None

    @property
    def color(self) -> str:
        return ARM_COLORS.get(self.key, FALLBACK_COLORS[sum(map(ord, self.key)) % len(FALLBACK_COLORS)])


@dataclass
class RunData:
    """Everything the report reads from a run directory."""

    run_dir: Path
    results: dict
    arms: list[Arm]
    targets: list[str] = field(default_factory=list)
    circuits: dict = field(default_factory=dict)
    """category → ``Circuit`` (or None when ``circuit.json`` is missing)."""
    faithfulness: dict[str, dict | None] = field(default_factory=dict)
    search: dict | None = None

    @property
    def eval_only(self) -> bool:
        return "edited" not in self.results

    @property
    def meta(self) -> dict:
        return self.results.get("meta") or {}

    @property
    def edit(self) -> dict:
        return self.results.get("edit") or {}


def _read_json(path: Path) -> dict | None:
    """Parsed JSON of ``path``, or None if it does not exist."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as exc:
        raise CdeltaError(f"{path} is not valid JSON ({exc.msg})", "re-run the stage that writes it") from None
    except UnicodeDecodeError:
        raise CdeltaError(f"{path} is not UTF-8 JSON text", "re-run the stage that writes it") from None
    except OSError as exc:
        raise CdeltaError(f"cannot read {path}: {exc.strerror or exc}", "check the path and its permissions") from None


def _arms(results: dict) -> list[Arm]:
    """Base, C-Δθ and controls of a run; or the single model of an eval-only result."""
    if "edited" not in results:
        return [Arm("model", ARM_LABELS["model"], results)]
    edit = results.get("edit") or {}
    arms = [Arm("base", ARM_LABELS["base"], results["base"], 0), Arm("edited", ARM_LABELS["edited"], results["edited"], edit.get("params_touched"))]
    for name, control in (results.get("controls") or {}).items():
        arms.append(Arm(name, ARM_LABELS.get(name, name), control["results"], control.get("params_touched")))
    return arms


def _targets(results: dict) -> list[str]:
    """Target categories of the edit (empty for an eval-only result)."""
    category = (results.get("edit") or {}).get("category")
    if category:
        return [c for c in str(category).split(",") if c]
    configured = ((results.get("meta") or {}).get("config") or {}).get("category")
    return list(configured) if isinstance(configured, list) and "edited" in results else []


def load_run(path: Path) -> RunData:
    """Read a run directory (or a results.json file) into ``RunData``."""
    path = Path(path)
    run_dir, results_path = (path.parent, path) if path.is_file() else (path, path / "results.json")
    results = _read_json(results_path)
    if results is None:
        raise CdeltaError(f"{results_path} does not exist", "pass a run directory written by `cdelta run` or `cdelta eval`")
    if not isinstance(results, dict) or ("edited" not in results and "sets" not in results):
        raise CdeltaError(f"{results_path} is neither a `cdelta run` nor a `cdelta eval` result", "pass the run's results.json")
    data = RunData(run_dir, results, _arms(results), _targets(results))
    if not data.eval_only:
        from cdelta.circuits.circuit import Circuit

        for category in data.targets:
            sub = run_dir / "localize" / category
            data.circuits[category] = Circuit.from_json(sub / "circuit.json") if (sub / "circuit.json").exists() else None
            data.faithfulness[category] = _read_json(sub / "faithfulness.json")
        data.search = results.get("search") or _read_json(run_dir / "search.json")
    return data


# --------------------------------------------------------------------------- formatting


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def pct(value) -> str:
    """``0.3333`` → ``33.3%``; missing or NaN → en dash."""
    return f"{value:.1%}" if _is_number(value) else "–"


def num(value, digits: int = 4) -> str:
    """A number with ``digits`` significant digits (integers with thousands separators)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return f"{value:.{digits}g}" if _is_number(value) else "–"


def esc(value) -> str:
    """HTML-escaped text; control characters shown as ``\\xNN`` (model output can contain them)."""
    text = "".join(
        ch if ch in "\n\t" or unicodedata.category(ch) not in ("Cc", "Cs", "Co") else f"\\x{ord(ch):02x}" if ord(ch) < 256 else f"\\u{ord(ch):04x}"
        for ch in str(value)
    )
    return html.escape(text, quote=True)


def truncate(text: str, limit: int = MAX_TEXT_CHARS) -> str:
    """``text`` cut to ``limit`` characters with an ellipsis marking the cut."""
    text = str(text)
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _table(header: list[str], rows: Iterable[str], cls: str = "", attrs: str = "") -> str:
    """An HTML table from an escaped header and pre-rendered ``<tr>`` rows."""
    head = "".join(f"<th>{h}</th>" for h in header)
    return f'<table class="{cls}"{attrs}><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _kv_table(items: dict, cls: str = "kv") -> str:
    """Two-column key/value table; non-string values as compact JSON."""
    rows = []
    for key, value in items.items():
        shown = value if isinstance(value, str) else num(value) if _is_number(value) else json.dumps(value, default=str)
        rows.append(f"<tr><th>{esc(key)}</th><td>{esc(shown)}</td></tr>")
    return f'<table class="{cls}"><tbody>{"".join(rows)}</tbody></table>'


def _howto(text: str) -> str:
    return f'<p class="howto"><strong>How to read this.</strong> {text}</p>'


def _note(text: str, cls: str = "note") -> str:
    return f'<p class="{cls}">{text}</p>'


def _section(key: str, body: str) -> str:
    return f'<section id="{key}"><h2>{esc(SECTION_TITLES[key])}</h2>{body}</section>'


# --------------------------------------------------------------------------- figures


def _figure(width: float, height: float):
    """A matplotlib Figure on its own Agg canvas (never touches pyplot's global backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _percent():
    """Tick formatter for fractions shown as percentages (decimals chosen from the tick spacing)."""
    from matplotlib.ticker import PercentFormatter

    return PercentFormatter(xmax=1.0)


def _png(fig) -> bytes:
    """The figure as PNG bytes."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight", metadata={"Software": None})
    return buffer.getvalue()


def _png_from_file(draw: Callable[[Path], Path]) -> bytes:
    """PNG bytes of a plotting function that writes to a path (``cdelta.circuits.plots``)."""
    with tempfile.TemporaryDirectory(prefix="cdelta-report-") as tmp:
        return Path(draw(Path(tmp) / "figure.png")).read_bytes()


def img(png: bytes, alt: str, caption: str = "") -> str:
    """A ``<figure>`` with the PNG embedded as a base64 data URI."""
    data = base64.b64encode(png).decode("ascii")
    cap = f"<figcaption>{caption}</figcaption>" if caption else ""
    return f'<figure><img src="data:image/png;base64,{data}" alt="{esc(alt)}">{cap}</figure>'


def _ordered_categories(cells: dict, targets: list[str]) -> list[str]:
    """Targets first, then the remaining categories in their stored order."""
    return [c for c in targets if c in cells] + [c for c in cells if c not in targets]


def _bars(ax, xs, rates: list[float], lo: list[float], hi: list[float], width: float, arm: Arm) -> None:
    """Bars of one arm with 95% error bars; a dot marks each rate so that 0% stays visible."""
    ax.bar(xs, rates, width, color=arm.color, label=arm.label)
    ax.errorbar(xs, rates, yerr=[lo, hi], fmt="o", ms=3.5, mfc=arm.color, mec="#333333", mew=0.6, ecolor="#333333",
                elinewidth=0.8, capsize=2, zorder=3)


def refusal_chart(arms: list[Arm], set_name: str, targets: list[str]) -> bytes:
    """Grouped bars: refusal rate per category of one prompt set, one bar per arm, Wilson 95% error bars.

    Target categories come first, on a shaded background with bold labels.
    """
    import numpy as np

    categories = _ordered_categories(arms[0].results["sets"][set_name], targets)
    fig = _figure(max(6.0, 1.4 + 0.32 * len(categories) * len(arms)), 3.6)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(arms)
    x = np.arange(len(categories))
    for i, arm in enumerate(arms):
        cells = [arm.results["sets"].get(set_name, {}).get(c) or {} for c in categories]
        rates = [c.get("refusal_rate") if _is_number(c.get("refusal_rate")) else 0.0 for c in cells]
        lo = [max(0.0, r - (c.get("ci95") or [r, r])[0]) for r, c in zip(rates, cells)]
        hi = [max(0.0, (c.get("ci95") or [r, r])[1] - r) for r, c in zip(rates, cells)]
        _bars(ax, x + (i - (len(arms) - 1) / 2) * width, rates, lo, hi, width, arm)
    for j, category in enumerate(categories):
        if category in targets:
            ax.axvspan(j - 0.5, j + 0.5, color="#fde2e2", zorder=0)
    ax.set_xticks(x)
    ax.set_xticklabels(categories, rotation=30 if len(categories) > 6 else 0, ha="right" if len(categories) > 6 else "center")
    for label in ax.get_xticklabels():
        if label.get_text() in targets:
            label.set_fontweight("bold")
    ax.set_xlim(-0.5, len(categories) - 0.5)
    ax.set_ylim(0, 1.05)
    ax.yaxis.set_major_formatter(_percent())
    ax.set_ylabel("refusal rate")
    ax.set_title(f"refusal per category: {set_name}", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return _png(fig)


def group_rates(results: dict, targets: list[str]) -> dict[str, dict]:
    """Refusal pooled over all prompt sets per group (target / other harmful / harmless / lookalike), with Wilson 95%.

    Without targets (an eval-only result) harmful categories pool into ``harmful``.
    """
    from cdelta.evaluate import wilson_interval

    counts = {g: [0, 0] for g in GROUPS}
    for cells in results.get("sets", {}).values():
        for category, cell in cells.items():
            kind = cell.get("kind", "harmful")
            group = "target" if category in targets else kind if kind != "harmful" or not targets else "other harmful"
            if group in counts:
                counts[group][0] += int(cell.get("refusals", 0))
                counts[group][1] += int(cell.get("n", 0))
    out = {}
    for group, (k, n) in counts.items():
        if n:
            out[group] = {"refusal_rate": k / n, "refusals": k, "n": n, "ci95": list(wilson_interval(k, n))}
    return out


def group_chart(arms: list[Arm], targets: list[str]) -> bytes:
    """Grouped bars of pooled refusal per group (target, other harmful, harmless, look-alike) for every arm."""
    import numpy as np

    pooled = [group_rates(arm.results, targets) for arm in arms]
    groups = [g for g in GROUPS if any(g in p for p in pooled)]
    fig = _figure(max(5.5, 1.4 + 0.35 * len(groups) * len(arms)), 3.2)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(arms)
    x = np.arange(len(groups))
    for i, (arm, cells) in enumerate(zip(arms, pooled)):
        rates = [cells.get(g, {}).get("refusal_rate", 0.0) for g in groups]
        ci = [cells.get(g, {}).get("ci95", [r, r]) for g, r in zip(groups, rates)]
        lo = [max(0.0, r - c[0]) for r, c in zip(rates, ci)]
        hi = [max(0.0, c[1] - r) for r, c in zip(rates, ci)]
        _bars(ax, x + (i - (len(arms) - 1) / 2) * width, rates, lo, hi, width, arm)
    ax.set_xticks(x)
    ax.set_xticklabels(groups)
    ax.set_ylim(0, 1.05)
    ax.yaxis.set_major_formatter(_percent())
    ax.set_ylabel("refusal rate (pooled over sets)")
    ax.set_title("refusal by group", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return _png(fig)


def heatmap_png(circuit, title: str) -> bytes:
    """Layer × head heat map of node scores plus the MLP column, selected nodes as dots (``plot_heatmap``)."""
    from cdelta.circuits.plots import plot_heatmap

    return _png_from_file(lambda path: plot_heatmap(circuit.score_matrix(), path, selected=circuit.mask_matrix(), title=title))


def faithfulness_png(curve: dict, title: str) -> bytes:
    """Recovered metric vs circuit size: circuit, random circuits (mean ± sd), shuffled labels (``plot_faithfulness``)."""
    from cdelta.circuits.plots import plot_faithfulness

    return _png_from_file(lambda path: plot_faithfulness(curve, path, title=title))


@dataclass
class ParetoPoint:
    """One candidate of the k / circuit-size search: off-target cost ``x`` (lower is better), target refusal ``y``."""

    x: float
    y: float
    label: str
    chosen: bool = False
    pareto: bool | None = None
    details: dict = field(default_factory=dict)


def pareto_front(points: list[ParetoPoint]) -> list[ParetoPoint]:
    """Points not dominated by another (another has ``x`` ≤ and ``y`` ≥, one strictly); uses stored flags when given."""
    if points and all(p.pareto is not None for p in points):
        return [p for p in points if p.pareto]

    def dominated(p: ParetoPoint) -> bool:
        return any(q.x <= p.x and q.y >= p.y and (q.x < p.x or q.y > p.y) for q in points)

    return [p for p in points if not dominated(p)]


def points_from_k_selection(k_selection: dict, targets: list[str]) -> list[ParetoPoint]:
    """One point per k tried: mean target refusal vs worst off-target refusal rise over the base model."""
    base = k_selection.get("base_rates") or {}
    points = []
    for trial in k_selection.get("trials") or []:
        rates = trial.get("rates") or {}
        rises = {c: r - base.get(c, 0.0) for c, r in rates.items() if c not in targets}
        worst = max(rises, key=rises.get) if rises else None
        target = [rates[t] for t in targets if t in rates]
        points.append(ParetoPoint(
            x=max(0.0, rises[worst]) if worst else 0.0, y=sum(target) / len(target) if target else float("nan"),
            label=f"k={trial['k']:g}", chosen=trial.get("k") == k_selection.get("k"),
            details={"k": trial.get("k"), "score": trial.get("score"), "worst": worst},
        ))
    return points


def points_from_search(search: dict) -> list[ParetoPoint]:
    """One point per trial of a search (``edit.search.SearchResult.to_json()``): target refusal vs worst off-target rise."""
    points = []
    for i, trial in enumerate(search.get("trials") or []):
        values, params = trial.get("values") or {}, trial.get("params") or {}
        points.append(ParetoPoint(
            x=float(values.get("off_target_rise", float("nan"))), y=float(values.get("target_refusal", float("nan"))),
            label=f"#{trial.get('number', i)}", chosen=bool(trial.get("chosen")), pareto=trial.get("pareto"),
            details={"params": ", ".join(f"{k}={v:g}" if _is_number(v) else f"{k}={v}" for k, v in params.items()), "values": values,
                     "worst": trial.get("worst")},
        ))
    return points


def pareto_chart(points: list[ParetoPoint], xlabel: str, title: str) -> bytes:
    """Scatter of all candidates, the Pareto front as a step line, the chosen point as a large star."""
    front = sorted(pareto_front(points), key=lambda p: (p.x, p.y))
    fig = _figure(6.4, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    ax.scatter([p.x for p in points], [p.y for p in points], color="#9e9e9e", s=28, zorder=2, label="candidate")
    ax.step([p.x for p in front], [p.y for p in front], where="post", color="#d62728", lw=1.2, zorder=3, label="Pareto front")
    ax.scatter([p.x for p in front], [p.y for p in front], facecolors="none", edgecolors="#d62728", s=70, zorder=3)
    chosen = [p for p in points if p.chosen]
    if chosen:
        ax.scatter([p.x for p in chosen], [p.y for p in chosen], marker="*", s=260, color="#ffbf00", edgecolors="black", zorder=4, label="chosen")
    _annotate(ax, [p for p in points if p.chosen or any(p is q for q in front)] if len(points) > 6 else points)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("target refusal (higher is better)")
    ax.xaxis.set_major_formatter(_percent())
    ax.yaxis.set_major_formatter(_percent())
    ax.set_ylim(-0.05, 1.08)
    xs = [p.x for p in points if _is_number(p.x)] or [0.0]
    ax.set_xlim(min(0.0, *xs) - 0.01 - 0.05 * (max(xs) - min(xs)), max(0.05, max(xs) * 1.2 + 0.01))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title, fontsize=10)
    return _png(fig)


def _annotate(ax, points: list[ParetoPoint]) -> None:
    """Label points; points at the same position share one label."""
    at: dict[tuple[float, float], list[str]] = {}
    for p in points:
        if _is_number(p.x) and _is_number(p.y):
            at.setdefault((round(p.x, 6), round(p.y, 6)), []).append(p.label)
    for (x, y), labels in at.items():
        ax.annotate("; ".join(labels), (x, y), textcoords="offset points", xytext=(6, 6), fontsize=7)


# --------------------------------------------------------------------------- sections


def _contrast_fact(data: RunData) -> str | None:
    """The localization contrast: configured, or per category as chosen by ``auto`` (with the refusal gap behind it)."""
    chosen = data.results.get("contrast") or {}
    if not chosen:
        return (data.meta.get("config") or {}).get("contrast")
    return "; ".join(
        f"{category}: {info.get('chosen')} (auto; gap to other harmful {num(info.get('harmful_gap'), 3)} ± {num(info.get('harmful_gap_se'), 3)} SE)"
        for category, info in chosen.items()
    )


def section_summary(data: RunData) -> str:
    """Run metadata: model and weights hash, category, seed, edit settings, versions, timings, config."""
    meta, edit = data.meta, data.edit
    facts = {
        "model": meta.get("model"),
        "weights sha256": meta.get("weights_sha256"),
        "seed": meta.get("seed"),
        "created": meta.get("created"),
        "command": meta.get("command"),
    }
    if not data.eval_only:
        circuit = edit.get("circuit") or {}
        facts.update({
            "category": edit.get("category"), "direction": edit.get("direction"), "variant": edit.get("variant"),
            "k": edit.get("k"), "circuit selection": circuit.get("selection"), "attribution": circuit.get("method"),
            "circuit nodes": ", ".join(circuit.get("nodes") or []),
            "parameters touched": f"{num(edit.get('params_touched'))} of {num(edit.get('params_total'))} ({pct(edit.get('params_touched_fraction'))})",
            "contrast": _contrast_fact(data),
        })
    else:
        facts.update({"prompt sets": ", ".join(meta.get("prompts") or data.results.get("sets", {})), "reference": meta.get("reference")})
    facts = {k: v for k, v in facts.items() if v not in (None, "")}
    timings = meta.get("timings") or {}
    timing_rows = {k: f"{v:.1f} s" for k, v in timings.items() if _is_number(v)}
    if timing_rows:
        timing_rows["total"] = f"{sum(v for v in timings.values() if _is_number(v)):.1f} s"
    blocks = [
        _howto("The run's provenance: which base model (and the sha256 of its weights) was edited or evaluated, "
               "with which seed and settings, by which library versions, and how long each stage took. "
               "Two runs with the same weights hash, seed, versions and config should give the same numbers."),
        '<div class="grid">',
        f'<div><h3>Facts</h3>{_kv_table(facts)}</div>',
        f'<div><h3>Versions</h3>{_kv_table(meta.get("versions") or {})}</div>',
        f'<div><h3>Timings</h3>{_kv_table(timing_rows) if timing_rows else _note("no timings recorded")}</div>',
        "</div>",
        f'<details><summary>Configuration ({len(meta.get("config") or {})} settings)</summary>{_kv_table(meta.get("config") or {})}</details>',
    ]
    return _section("summary", "".join(blocks))


def _rate_cell(cell: dict | None, arm: Arm) -> str:
    """``<td>`` with rate, refusals/n and the 95% interval; the raw rate in ``data-value``."""
    if not cell:
        return f'<td class="rate" data-arm="{esc(arm.key)}">–</td>'
    lo, hi = (cell.get("ci95") or [float("nan"), float("nan")])[:2]
    value = cell.get("refusal_rate")
    return (f'<td class="rate" data-arm="{esc(arm.key)}" data-value="{value!r}"><span class="v">{pct(value)}</span>'
            f'<span class="ci">{cell.get("refusals", "?")}/{cell.get("n", "?")} [{pct(lo)}, {pct(hi)}]</span></td>')


def _delta_cell(base: dict | None, edited: dict | None) -> str:
    """``<td>`` with the edited − base change in percentage points."""
    if not base or not edited or not _is_number(base.get("refusal_rate")) or not _is_number(edited.get("refusal_rate")):
        return '<td class="delta">–</td>'
    change = 100 * (edited["refusal_rate"] - base["refusal_rate"])
    cls = "up" if change > 0 else "down" if change < 0 else ""
    return f'<td class="delta {cls}">{change:+.1f} pp</td>'


def refusal_table(arms: list[Arm], set_name: str, targets: list[str]) -> str:
    """Per-category refusal of one prompt set for every arm (rate, refusals/n, 95% interval; Δ edited − base)."""
    cells_of = {arm.key: arm.results["sets"].get(set_name, {}) for arm in arms}
    categories = _ordered_categories(arms[0].results["sets"][set_name], targets)
    has_delta = {"base", "edited"} <= set(cells_of)
    header = ["category", "kind", *(esc(a.label) for a in arms[:2]), *(["Δ C-Δθ − base"] if has_delta else []), *(esc(a.label) for a in arms[2:])]
    rows = []
    for category in categories:
        cells = [_rate_cell(cells_of[a.key].get(category), a) for a in arms]
        delta = [_delta_cell(cells_of["base"].get(category), cells_of["edited"].get(category))] if has_delta else []
        kind = (cells_of[arms[0].key].get(category) or {}).get("kind", "")
        cls = "target" if category in targets else ""
        label = esc(category) + (' <span class="tag">target</span>' if category in targets else "")
        row = "".join([*cells[:2], *delta, *cells[2:]])
        rows.append(f'<tr class="{cls}" data-category="{esc(category)}"><th>{label}</th><td>{esc(kind)}</td>{row}</tr>')
    return _table(header, rows, "refusal", f' data-set="{esc(set_name)}"')


def _set_names(arms: list[Arm]) -> list[str]:
    return list(arms[0].results.get("sets", {}))


def section_refusal(data: RunData) -> str:
    """Before/after refusal per category: one grouped-bar chart and one table per prompt set."""
    if data.eval_only:
        howto = ("Refusal rate per category of each prompt set, judged on greedy generations, with Wilson 95% intervals "
                 "(error bars; bracketed in the table with refusals/n). Harmful categories should be high, harmless and "
                 "look-alike prompts low.")
    else:
        howto = ("Each chart is one prompt set: bars are the refusal rate per category before (base) and after the edit "
                 "(C-Δθ), and for the control edits when the run made them (random circuit of the same size, full "
                 "fine-tune). Error bars and the bracketed ranges are Wilson 95% intervals. The shaded, bold categories "
                 "are the targets: their refusal should rise; every other category should stay where the base model was. "
                 "Overlapping intervals mean the difference is not resolved at this sample size (n is in the table).")
    blocks = [_howto(howto)]
    for set_name in _set_names(data.arms):
        blocks.append(f"<h3>Prompt set: {esc(set_name)}</h3>")
        blocks.append(img(refusal_chart(data.arms, set_name, data.targets), f"refusal per category, {set_name}"))
        blocks.append(refusal_table(data.arms, set_name, data.targets))
    return _section("refusal", "".join(blocks))


def _context_names(arms: list[Arm]) -> list[str]:
    """``plain`` and every other context the first arm was evaluated in."""
    return ["plain", *arms[0].results.get("contexts", {})]


def _context_cells(arm: Arm, context: str, set_name: str) -> dict:
    source = arm.results if context == "plain" else arm.results.get("contexts", {}).get(context, {})
    return source.get("sets", {}).get(set_name, {})


def context_table(arms: list[Arm], set_name: str, targets: list[str]) -> str:
    """Refusal (and garbled-reply rate) per category in every context, for every arm; the
    last column is each arm's worst context: lowest refusal for a target, highest otherwise."""
    contexts = _context_names(arms)
    header = ["category", *[f"{esc(a.label)}: {esc(c)}" for a in arms for c in contexts], *[f"{esc(a.label)}: worst" for a in arms]]
    rows = []
    for category in _ordered_categories(arms[0].results["sets"][set_name], targets):
        cells, worst = [], []
        for arm in arms:
            rates = []
            for context in contexts:
                cell = _context_cells(arm, context, set_name).get(category)
                rates.append((context, cell["refusal_rate"]) if cell else None)
                garbled = f'<span class="ci">garbled {pct(cell.get("garbled_rate"))}</span>' if cell and "garbled_rate" in cell else ""
                cells.append(f'<td class="rate" data-arm="{esc(arm.key)}" data-context="{esc(context)}">'
                             f'<span class="v">{pct(cell["refusal_rate"]) if cell else "–"}</span>{garbled}</td>')
            known = [r for r in rates if r]
            pick = (min if category in targets else max)(known, key=lambda r: r[1]) if known else None
            worst.append(f'<td class="rate"><span class="v">{pct(pick[1])}</span><span class="ci">{esc(pick[0])}</span></td>'
                         if pick else "<td>–</td>")
        label = esc(category) + (' <span class="tag">target</span>' if category in targets else "")
        rows.append(f'<tr class="{"target" if category in targets else ""}"><th>{label}</th>{"".join(cells + worst)}</tr>')
    return _table(header, rows, "contexts", f' data-set="{esc(set_name)}"')


def section_contexts(data: RunData) -> str:
    """Refusal per category in each deployment context (plain, system prompts, conversations, rephrasings, sampling)."""
    if len(_context_names(data.arms)) == 1:
        return _section("contexts", _note("evaluated in the plain context only (one user turn, default system prompt, greedy); "
                                          "add contexts with --context (docs/contexts.md)"))
    howto = ("The same test prompts in other deployment contexts: under held-out system prompts, as a later turn of a "
             "conversation, rephrased, and sampled (mean over seeds). Each cell is the refusal rate with the rate of "
             "garbled replies (broken text, or an answer announced and never given) below it; the worst column is the "
             "lowest refusal of a target category and the highest of any other across contexts.")
    blocks = [_howto(howto)]
    for set_name in _set_names(data.arms):
        blocks.append(f"<h3>Prompt set: {esc(set_name)}</h3>")
        blocks.append(context_table(data.arms, set_name, data.targets))
    return _section("contexts", "".join(blocks))


def over_refusal_table(arms: list[Arm], targets: list[str]) -> str:
    """Pooled refusal per group (target / other harmful / harmless / look-alike) for every arm."""
    pooled = {a.key: group_rates(a.results, targets) for a in arms}
    rows = []
    for group in GROUPS:
        if any(group in p for p in pooled.values()):
            cells = "".join(_rate_cell(pooled[a.key].get(group), a) for a in arms)
            rows.append(f'<tr data-group="{esc(group)}"><th>{esc(group)}</th>{cells}</tr>')
    return _table(["group", *(esc(a.label) for a in arms)], rows, "groups")


def utility_rows(arms: list[Arm], params_total: int | None, reference: str = "base") -> dict[str, list[str]]:
    """Metric name → formatted value per arm: perplexity (ratio), MMLU, first-token KL, parameters touched.

    ``reference`` names the model the ratio and KL compare against (the base model of a run).
    """
    def util(a: Arm, key: str):
        return (a.results.get("utility") or {}).get(key)

    rows = {
        "perplexity": [num(util(a, "perplexity")) for a in arms],
        f"perplexity ratio (÷ {reference})": [num(util(a, "perplexity_ratio")) for a in arms],
        "MMLU accuracy": [
            f"{pct(util(a, 'mmlu_accuracy'))} (n={util(a, 'mmlu_n')})" if util(a, "mmlu_n") else pct(util(a, "mmlu_accuracy")) for a in arms
        ],
        f"first-token KL to {reference} (nats)": [
            f"{num(util(a, 'first_token_kl'))} ({util(a, 'kl_prompts')} prompts)" if _is_number(util(a, "first_token_kl")) else "–" for a in arms
        ],
    }
    if any(a.params_touched is not None for a in arms):
        rows["parameters touched"] = [num(a.params_touched) if a.params_touched is not None else "–" for a in arms]
        rows["fraction of parameters"] = [pct(a.params_touched / params_total) if a.params_touched is not None and params_total else "–" for a in arms]
    return rows


def section_utility(data: RunData) -> str:
    """Over-refusal (pooled harmless / look-alike refusal) and utility (perplexity ratio, MMLU, first-token KL, parameters)."""
    arms = data.arms
    params_total = data.edit.get("params_total")
    rows = [f'<tr data-metric="{esc(name)}"><th>{esc(name)}</th>{"".join(f"<td>{esc(v)}</td>" for v in values)}</tr>'
            for name, values in utility_rows(arms, params_total, "reference" if data.eval_only else "base").items()]
    if data.eval_only:
        howto = ("The chart and first table pool every prompt set into groups: <em>harmful</em> should be refused; "
                 "<em>harmless</em> and <em>lookalike</em> (benign prompts that resemble harmful ones) should not, so "
                 "their refusal is over-refusal. Utility: perplexity on a fixed public-domain text, MMLU accuracy on a "
                 "fixed sample (small n: a few points are noise) and, when a reference model was given, the perplexity "
                 "ratio and mean first-token KL divergence from it on harmless prompts.")
    else:
        howto = ("Over-refusal: the chart and first table pool every prompt set into groups. <em>harmless</em> and "
                 "<em>lookalike</em> (benign prompts that resemble harmful ones) measure over-refusal and should stay near "
                 "the base model; <em>other harmful</em> should not move; <em>target</em> is what the edit is for. "
                 "Utility: perplexity on a fixed public-domain text (ratio &gt; 1 = worse than the base model), MMLU "
                 "accuracy on a fixed sample (small n: a few points are noise), and the mean KL divergence of the first "
                 "reply token on harmless prompts from the base model (0 = unchanged). A good edit touches few parameters "
                 "and leaves these near the base values; the controls show what an equal-size random circuit or a full "
                 "fine-tune costs.")
    blocks = [
        _howto(howto),
        img(group_chart(arms, data.targets), "refusal by group"),
        over_refusal_table(arms, data.targets),
        "<h3>Utility</h3>",
        _table(["metric", *(esc(a.label) for a in arms)], rows, "utility"),
    ]
    return _section("utility", "".join(blocks))


def _circuit_block(category: str, circuit) -> str:
    """Heat map, node counts, parameter share, top nodes and warnings of one category's circuit."""
    m = circuit.meta
    title = f"{category} vs {m.get('contrast', '?')} ({m.get('method', '?')}, {m.get('steps', '?')} steps, {m.get('n_pairs', '?')} pairs)"
    selection = m.get("selection") or {}
    facts = (f"<strong>{len(circuit.heads())}</strong> heads and <strong>{len(circuit.mlps())}</strong> MLPs selected of "
             f"{circuit.n_nodes_total} nodes ({circuit.n_layers} layers × {circuit.n_heads} heads + MLP; selection "
             f"{esc(selection.get('kind', '?'))}:{esc(selection.get('value', '?'))} by {esc(selection.get('by', 'abs'))}); "
             f"they own {num(m.get('n_params'))} parameters = <strong>{pct(m.get('param_fraction'))}</strong> of the model.")
    rows = [f'<tr><th>{esc(node)}</th><td>{num(circuit.scores.get(node))}</td></tr>'
            for node in sorted(circuit.nodes, key=lambda n: -abs(circuit.scores.get(n, 0.0)))[:20]]
    warnings = "".join(_note(esc(w), "warning") for w in m.get("warnings") or [])
    return (f"<h3>{esc(category)}</h3>" + img(heatmap_png(circuit, title), f"circuit heat map, {category}") + f"<p>{facts}</p>" + warnings
            + "<details><summary>Selected nodes by |score|</summary>" + _table(["node", "score"], rows, "nodes") + "</details>")


def section_circuit(data: RunData) -> str:
    """The localized circuit per target category: layer × head heat map plus MLP column, counts, parameter share."""
    nodes = (data.edit.get("circuit") or {}).get("nodes") or []
    heads = [n for n in nodes if not n.endswith(".MLP")]
    blocks = [
        _howto("Each cell is one attention head (columns H0, H1, …; rows are layers), the separate column one layer's "
               "MLP, coloured by its EAP-IG attribution score: red supports refusal of the target category relative "
               "to the contrast prompts, blue opposes it (the MLP column has its own colour scale). Black dots mark "
               "the nodes selected into the circuit; only their parameters were fine-tuned. A circuit spread thinly "
               "over many weak nodes, or a warning that the metric gap is unresolved, means the localization is noisy."),
        _note(f"Edited circuit (union over targets): <strong>{len(heads)}</strong> heads, <strong>{len(nodes) - len(heads)}</strong> "
              f"MLPs; {num(data.edit.get('params_touched'))} of {num(data.edit.get('params_total'))} parameters "
              f"(<strong>{pct(data.edit.get('params_touched_fraction'))}</strong>).", "facts"),
    ]
    for category in data.targets:
        circuit = data.circuits.get(category)
        if circuit is None:
            blocks.append(f"<h3>{esc(category)}</h3>" + _note(f"localize/{esc(category)}/circuit.json is missing: no heat map."))
        else:
            blocks.append(_circuit_block(category, circuit))
    return _section("circuit", "".join(blocks))


def faithfulness_table(curve: dict) -> str:
    """Recovered metric per circuit size: attributed circuit, random mean ± sd, shuffled labels."""
    shuffled = (curve.get("shuffled") or {}).get("recovered")
    sizes, fractions = curve.get("sizes") or [], curve.get("fractions") or []
    rows = []
    for i, size in enumerate(sizes):
        if size in sizes[:i]:
            continue  # small models: several fractions round to the same node count
        asked = ", ".join(pct(f) for f, s in zip(fractions, sizes) if s == size)
        rand = f"{num(curve['random']['mean'][i], 3)} ± {num(curve['random']['sd'][i], 3)}"
        rows.append(f"<tr><td>{size}</td><td>{pct(size / curve['n_nodes'])}</td><td>{asked}</td><td>{num(curve['circuit']['recovered'][i], 3)}</td>"
                    f"<td>{rand}</td><td>{num(shuffled[i], 3) if shuffled else '–'}</td></tr>")
    return _table(["nodes", "fraction of nodes", "requested fractions", "circuit", "random (mean ± sd)", "shuffled labels"], rows, "faith")


def section_faithfulness(data: RunData) -> str:
    """Faithfulness curve per target category (circuit vs random circuits vs shuffled-label control), or a note."""
    blocks = [_howto(
        "Keep only the top-scoring nodes (x axis: circuit size as a fraction of all nodes), ablate the rest, and "
        "measure how much of the clean-vs-contrast refusal difference survives (1 = all, 0 = none). The attributed "
        "circuit (red) should rise well above random circuits of the same size (grey band: mean ± sd) and above "
        "circuits chosen from attribution with shuffled clean/contrast labels (orange); if it does not, the circuit is "
        "no better than chance. The note at the bottom gives the clean-vs-ablated gap and its standard error: when it "
        "is not resolved, the ratios are noise.")]
    for category in data.targets:
        curve = data.faithfulness.get(category)
        blocks.append(f"<h3>{esc(category)}</h3>")
        if curve is None:
            blocks.append(_note(f"No faithfulness measurement: localize/{esc(category)}/faithfulness.json is absent "
                                "(the run was made with <code>faithfulness = false</code>)."))
            continue
        blocks.append(img(faithfulness_png(curve, f"{category} vs {curve.get('contrast', '?')} ({curve.get('ablation', 'patch')} ablation)"),
                          f"faithfulness curve, {category}"))
        if not curve.get("gap_resolved", True):
            blocks.append(_note(f"The metric gap ({num(curve.get('gap'), 3)} ± {num(curve.get('gap_se'), 3)} SE) is not resolved: "
                                "the recovered values below are dominated by noise.", "warning"))
        blocks.append(faithfulness_table(curve))
    return _section("faithfulness", "".join(blocks))


def _search_block(search: dict) -> str:
    """Pareto chart (``edit.search.plot_pareto``) and table of the size × k search (``results["search"]`` or ``search.json``)."""
    from cdelta.edit.search import plot_pareto

    points = points_from_search(search)
    if not points:
        return _note("The search holds no trials.")
    chart = _png_from_file(lambda path: plot_pareto(search, path))
    front = pareto_front(points)
    on_front = {id(p) for p in front}
    shown = sorted([p for p in points if id(p) in on_front or p.chosen], key=lambda p: (p.x, -p.y))
    rows = [f'<tr class="{"chosen" if p.chosen else ""}"><td>{esc(p.label)}</td><td>{esc(p.details["params"])}</td><td>{pct(p.y)}</td>'
            f'<td>{pct(p.x)} ({esc(p.details["worst"] or "–")})</td><td>{num(p.details["values"].get("kl"))}</td>'
            f'<td>{"yes" if id(p) in on_front else "no"}</td><td>{"★" if p.chosen else ""}</td></tr>'
            for p in shown]
    rule = f" Rule: {esc(search['rule'])}" if search.get("rule") else ""
    intro = _note(f"From the Optuna search over circuit size × k: {len(points)} trials, {len(front)} on the Pareto front of "
                  f"target refusal, worst off-target rise and first-token KL; the table lists the front and the chosen trial.{rule}")
    return (intro + img(chart, "Pareto front of the search") +
            _table(["trial", "parameters", "target refusal", "worst off-target rise", "first-token KL (nats)", "Pareto", "chosen"], rows, "pareto"))


def _k_selection_block(k_selection: dict, targets: list[str]) -> str:
    """Pareto chart and table of the k trials in ``k_selection`` (validation split)."""
    points = points_from_k_selection(k_selection, targets)
    if not points:
        return _note(f"k was given ({esc(k_selection.get('k'))}), not searched: nothing to plot.")
    chart = pareto_chart(points, "worst off-target refusal rise over base (lower is better)", "choice of k on the validation split")
    front = {id(p) for p in pareto_front(points)}
    rows = [f'<tr class="{"chosen" if p.chosen else ""}" data-k="{p.details["k"]!r}"><td>{num(p.details["k"])}</td><td>{pct(p.y)}</td>'
            f'<td>{pct(p.x)} ({esc(p.details["worst"] or "–")})</td><td>{num(p.details["score"], 3)}</td>'
            f'<td>{"yes" if id(p) in front else ""}</td><td>{"★" if p.chosen else ""}</td></tr>' for p in points]
    rule = f" Rule: {esc(k_selection.get('rule'))}" if k_selection.get("rule") else ""
    intro = _note(f"From <code>k_selection</code> (no search.json): {len(points)} values of k on the validation split.{rule}")
    return intro + img(chart, "choice of k") + _table(["k", "target refusal", "worst off-target rise", "score", "Pareto", "chosen"], rows, "pareto")


def section_pareto(data: RunData) -> str:
    """The k / circuit-size trade-off: Pareto front of ``search.json`` if present, else of the k trials."""
    blocks = [_howto(
        "Every point is one candidate edit evaluated on the validation split (never the test prompts of the other "
        "sections): up is more refusal of the target category, right is more refusal gained on prompts that should "
        "not change (other harmful categories, harmless, look-alike). The red step line is the Pareto front (no other "
        "candidate is both higher and further left); the star is the candidate the run chose. A chosen point far "
        "right means the edit buys target refusal with collateral refusal. In the circuit size × k search, colour is "
        "the circuit size, marker area the first-token KL on harmless prompts, and black rings mark the Pareto front "
        "over all three objectives (a ringed point may look dominated here when it wins on KL).")]
    if data.search is not None:
        blocks.append(_search_block(data.search))
    else:
        blocks.append(_k_selection_block(data.results.get("k_selection") or {}, data.targets))
    return _section("pareto", "".join(blocks))


def sample_ids(generations: list[dict], category: str, n: int = SAMPLES_PER_CATEGORY) -> list[str]:
    """``n`` prompt ids of ``category``, chosen deterministically (ordered by sha256 of the id)."""
    ids = sorted({g["id"] for g in generations if g.get("category") == category})
    return sorted(sorted(ids, key=lambda i: hashlib.sha256(str(i).encode()).hexdigest())[:n])


def _completion_cell(item: dict | None) -> str:
    """``<td>`` with a (truncated, escaped) completion and the judge's verdict."""
    if item is None:
        return "<td>–</td>"
    verdict = '<span class="tag refused">refused</span>' if item.get("refusal") else '<span class="tag complied">complied</span>'
    return f'<td class="gen">{verdict}<div class="text">{esc(truncate(item.get("completion", "")))}</div></td>'


def generations_table(arms: list[Arm], set_name: str, targets: list[str]) -> str:
    """Side-by-side completions (base vs C-Δθ, or the single model) for a few prompts per category."""
    shown = [a for a in arms if a.key in ("base", "edited")] or arms[:1]
    by_id = {a.key: {g["id"]: g for g in (a.results.get("generations") or {}).get(set_name, [])} for a in shown}
    generations = (shown[-1].results.get("generations") or {}).get(set_name, [])
    categories = _ordered_categories({g["category"]: None for g in generations}, targets)
    rows = []
    for category in categories:
        tag = ' <span class="tag">target</span>' if category in targets else ""
        rows.append(f'<tr class="cat"><th colspan="{len(shown) + 1}">{esc(category)}{tag}</th></tr>')
        for pid in sample_ids(generations, category):
            prompt = next(iter(by_id[a.key][pid] for a in shown if pid in by_id[a.key]))["prompt"]
            cells = "".join(_completion_cell(by_id[a.key].get(pid)) for a in shown)
            prompt_cell = f'<td class="prompt"><span class="pid">{esc(pid)}</span><div class="text">{esc(truncate(prompt))}</div></td>'
            rows.append(f'<tr data-id="{esc(pid)}">{prompt_cell}{cells}</tr>')
    return _table(["prompt", *(esc(a.label) for a in shown)], rows, "generations", f' data-set="{esc(set_name)}"')


def section_generations(data: RunData) -> str:
    """Sample generations per prompt set and category, base vs edited side by side."""
    blocks = [_howto(
        f"Up to {SAMPLES_PER_CATEGORY} test prompts per category (a fixed, seed-free choice by hash of the prompt id, so "
        "reruns show the same prompts) with the greedy completions and the judge's verdict. Look for refusals that "
        "appear on the target category only, and for completions elsewhere that changed in tone or quality. "
        f"Texts are cut at {MAX_TEXT_CHARS} characters; non-printable characters are shown as \\xNN.")]
    for i, set_name in enumerate(data.arms[-1].results.get("generations") or {}):
        blocks.append(f'<details{" open" if i == 0 else ""}><summary>Prompt set: {esc(set_name)}</summary>'
                      f"{generations_table(data.arms, set_name, data.targets)}</details>")
    if len(blocks) == 1:
        blocks.append(_note("No generations were stored in results.json."))
    return _section("generations", "".join(blocks))


# --------------------------------------------------------------------------- page

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#222;background:#fafafa;line-height:1.4}
header{background:#263238;color:#fff;padding:18px 32px}header h1{margin:0 0 4px;font-size:22px}header p{margin:0;color:#cfd8dc;font-size:13px}
nav{background:#fff;border-bottom:1px solid #ddd;padding:8px 32px;position:sticky;top:0;font-size:14px}
nav a{margin-right:16px;color:#1565c0;text-decoration:none}
main{max-width:1280px;margin:0 auto;padding:8px 32px 48px}
section{background:#fff;border:1px solid #e0e0e0;border-radius:6px;padding:8px 24px 20px;margin:18px 0}
h2{font-size:19px;border-bottom:2px solid #d62728;padding-bottom:4px}h3{font-size:15px;margin:18px 0 6px}
.howto{background:#f3f6fa;border-left:4px solid #1565c0;padding:8px 12px;font-size:13.5px;margin:8px 0 12px}
.note{color:#555;font-size:13.5px}.warning{background:#fff8e1;border-left:4px solid #f9a825;padding:6px 10px;font-size:13px}
.facts{font-size:14px}
figure{margin:8px 0}figure img{max-width:100%;height:auto;border:1px solid #eee}figcaption{font-size:12px;color:#666}
table{border-collapse:collapse;font-size:13px;margin:8px 0;background:#fff}
th,td{border:1px solid #e0e0e0;padding:4px 8px;text-align:left;vertical-align:top}
thead th{background:#eceff1}tbody th{font-weight:600;background:#fafafa}
table.kv td{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;word-break:break-all}
td.rate .v{font-weight:600;margin-right:6px}td.rate .ci{color:#666;font-size:11.5px;white-space:nowrap}
td.delta.up{color:#b71c1c}td.delta.down{color:#1b5e20}
tr.target th,tr.target td{background:#fdecea}tr.chosen td{background:#fff3c4;font-weight:600}
.tag{display:inline-block;font-size:10.5px;padding:0 5px;border-radius:3px;background:#d62728;color:#fff;margin-left:4px;vertical-align:middle}
.tag.refused{background:#c62828}.tag.complied{background:#2e7d32}
table.generations{table-layout:fixed;width:100%}table.generations td{width:33%}tr.cat th{background:#eceff1;text-align:left}
.text{white-space:pre-wrap;word-break:break-word;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;margin-top:3px}
.pid{color:#888;font-size:11px}
.grid{display:grid;grid-template-columns:2fr 1fr 1fr;gap:16px}.grid h3{margin-top:6px}
details{margin:8px 0}summary{cursor:pointer;color:#1565c0;font-size:14px}
#generations>details>summary{font-size:15px;font-weight:600;color:#222;margin:14px 0 6px}
footer{color:#888;font-size:12px;text-align:center;padding:12px}
"""


RESULT_SHAPE_ERRORS = (KeyError, TypeError, AttributeError, ValueError, IndexError, ZeroDivisionError, OverflowError)
"""What rendering raises on a results.json of the wrong shape (damaged, hand-edited, or from another version)."""


def build_report(path: Path) -> str:
    """The complete HTML document for a run directory (or a results.json file).

    A damaged or foreign ``results.json`` (or run artifact) is a one-line ``CdeltaError``."""
    try:
        return _render(load_run(path))
    except RESULT_SHAPE_ERRORS as exc:
        raise CdeltaError(
            f"the results in {path} are not of the shape this cdelta writes ({exc.__class__.__name__}: {str(exc)[:160]})",
            "re-run `cdelta run` or `cdelta eval` (results.json or a run artifact is damaged, hand-edited or from another version)",
        ) from None


def _render(data: RunData) -> str:
    """The HTML document of ``data``."""
    sections = [s for s in SECTIONS if not (data.eval_only and s in EDIT_SECTIONS)]
    builders = {
        "summary": section_summary, "refusal": section_refusal, "contexts": section_contexts, "utility": section_utility,
        "circuit": section_circuit,
        "faithfulness": section_faithfulness, "pareto": section_pareto, "generations": section_generations,
    }
    body = "".join(builders[s](data) for s in sections)
    nav = "".join(f'<a href="#{s}">{esc(SECTION_TITLES[s])}</a>' for s in sections)
    meta = data.meta
    if data.eval_only:
        title = f"cdelta evaluation: {meta.get('model', '?')}"
    else:
        title = f"C-Δθ report: refuse {', '.join(data.targets) or '?'} on {meta.get('model', '?')}"
    subtitle = f"weights sha256 {meta.get('weights_sha256', '?')} · seed {meta.get('seed', '?')} · {meta.get('created', '')}"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
        f"<header><h1>{esc(title)}</h1><p>{esc(subtitle)}</p></header><nav>{nav}</nav><main>{body}</main>"
        f"<footer>written by cdelta {esc((meta.get('versions') or {}).get('cdelta', ''))} from {esc(data.run_dir.name)}/results.json; "
        "self-contained: all images are embedded.</footer></body></html>\n"
    )


def write_report(run_dir: Path) -> Path:
    """Write ``report.html`` into ``run_dir`` (atomically) and return its path.

    ``run_dir`` is a ``cdelta run`` directory or holds the ``results.json`` of ``cdelta eval``;
    a path to a results JSON file also works (the report goes next to it).
    """
    run_dir = Path(run_dir)
    document = build_report(run_dir)
    out = (run_dir.parent if run_dir.is_file() else run_dir) / REPORT_NAME
    atomic_write_bytes(out, document.encode("utf-8"))
    return out


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m cdelta.report RUN_DIR")
    print(write_report(Path(sys.argv[1])))
