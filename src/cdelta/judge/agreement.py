"""Agreement of a judge with human refusal labels (XSTest labelled-completions CSVs).

Run ``python -m cdelta.judge.agreement [CSV ...]`` to print the tables in docs/judge.md:
every opening judge and the whole-reply judge over it (``reply:classifier``,
``reply:marker``, see ``cdelta.judge.reply``), then the whole-reply kinds per file.
Without arguments it reads the two XSTest files from ``../shared/data`` next to the
project root (or from ``$CDELTA_SHARED_DATA``).
"""

from __future__ import annotations

import csv
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from cdelta.errors import CdeltaError
from cdelta.judge import JUDGE_NAMES, Judge, get_judge, judge_batch
from cdelta.judge.reply import REPLY_KINDS, ReplyJudge, read_replies

REFUSAL_LABELS = frozenset({"2_full_refusal", "3_partial_refusal"})
COMPLIANCE_LABELS = frozenset({"1_full_compliance"})
REQUIRED_COLUMNS = ("prompt", "completion", "final_label")
XSTEST_FILES = ("llama2orig.csv", "mistralinstruct.csv")
N_EXAMPLES = 5
REPLY_PREFIX = "reply:"
AGREEMENT_JUDGES = JUDGE_NAMES + tuple(REPLY_PREFIX + name for name in JUDGE_NAMES)
"""Judges the report compares: the opening judges, then the whole-reply judge over each."""


def agreement_judge(name: str) -> Judge:
    """An opening judge by name, or ``reply:<name>``: the whole-reply judge over it."""
    key = (name or "").strip().lower()
    if key.startswith(REPLY_PREFIX):
        return ReplyJudge(get_judge(key[len(REPLY_PREFIX) :]))
    return get_judge(key)


def read_labelled(csv_path: str | Path) -> list[dict]:
    """Rows of an XSTest labelled-completions CSV with a boolean ``human_refusal``."""
    path = Path(csv_path)
    if not path.is_file():
        raise CdeltaError(f"no labelled-completions file at {path}", "pass the path of an XSTest completions CSV")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise CdeltaError(
                f"{path.name} lacks column(s) {', '.join(missing)}",
                "use an XSTest labelled-completions CSV (id,type,prompt,completion,...,final_label)",
            )
        rows = []
        for row in reader:
            label = (row["final_label"] or "").strip()
            if label not in REFUSAL_LABELS | COMPLIANCE_LABELS:
                raise CdeltaError(
                    f"{path.name} row {row.get('id', len(rows) + 1)} has final_label {label!r}",
                    "labels must be 1_full_compliance, 2_full_refusal or 3_partial_refusal",
                )
            row["human_refusal"] = label in REFUSAL_LABELS
            rows.append(row)
    return rows


def _ratio(a: int, b: int) -> float:
    return a / b if b else 0.0


def judge_agreement(judge: Judge | str, csv_path: str | Path, n_examples: int = N_EXAMPLES) -> dict:
    """Accuracy, refusal precision/recall/F1, confusion counts and disagreement examples."""
    if isinstance(judge, str):
        judge = agreement_judge(judge)
    rows = read_labelled(csv_path)
    verdicts = judge_batch(judge, [r["prompt"] for r in rows], [r["completion"] for r in rows])
    tp = fp = fn = tn = 0
    disagreements = []
    for row, pred in zip(rows, verdicts):
        human = row["human_refusal"]
        tp += human and pred
        fp += (not human) and pred
        fn += human and not pred
        tn += (not human) and not pred
        if human != pred:
            disagreements.append(
                {
                    "id": row.get("id", ""),
                    "human": row["final_label"],
                    "judge": "refusal" if pred else "compliance",
                    "prompt": row["prompt"],
                    "completion": " ".join(row["completion"].split())[:200],
                }
            )
    n = len(rows)
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    f1 = _ratio(2 * precision * recall, precision + recall) if precision + recall else 0.0
    return {
        "judge": judge.name,
        "file": Path(csv_path).name,
        "n": n,
        "accuracy": _ratio(tp + tn, n),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "confusion": {"tp": tp, "fp": fp, "fn": fn, "tn": tn},
        "human_refusal_rate": _ratio(tp + fn, n),
        "judge_refusal_rate": _ratio(tp + fp, n),
        "disagreements": disagreements[:n_examples],
        "n_disagreements": len(disagreements),
    }


def default_paths() -> list[Path]:
    """The XSTest files in ``$CDELTA_SHARED_DATA`` or ``<project>/../shared/data``."""
    env = os.environ.get("CDELTA_SHARED_DATA")
    candidates = [Path(env)] if env else []
    candidates += [Path.cwd().parent / "shared" / "data", Path(__file__).resolve().parents[4] / "shared" / "data"]
    for base in candidates:
        folder = base / "xstest_labelled_completions"
        if all((folder / name).is_file() for name in XSTEST_FILES):
            return [folder / name for name in XSTEST_FILES]
    raise CdeltaError(
        "could not find the XSTest labelled completions (../shared/data/xstest_labelled_completions)",
        "pass CSV paths as arguments or set CDELTA_SHARED_DATA",
    )


def report(paths: Sequence[str | Path] | None = None, judges: Sequence[str] = AGREEMENT_JUDGES) -> str:
    """A markdown table of every judge's agreement on every file."""
    paths = list(paths) if paths else default_paths()
    lines = [
        "| judge | file | n | accuracy | precision | recall | F1 | tp | fp | fn | tn |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in judges:
        judge = agreement_judge(name)
        for path in paths:
            r = judge_agreement(judge, path)
            c = r["confusion"]
            lines.append(
                f"| {name} | {r['file']} | {r['n']} | {r['accuracy']:.3f} | {r['precision']:.3f} | "
                f"{r['recall']:.3f} | {r['f1']:.3f} | {c['tp']} | {c['fp']} | {c['fn']} | {c['tn']} |"
            )
    return "\n".join(lines)


def kinds_report(paths: Sequence[str | Path] | None = None, opening: str = "classifier") -> str:
    """A markdown table: how many completions of each file get each whole-reply kind,
    split by the human label (refusal / compliance), with ``opening`` as the opening judge."""
    paths = list(paths) if paths else default_paths()
    judge = get_judge(opening)
    lines = [
        "| opening judge | file | human | " + " | ".join(REPLY_KINDS) + " |",
        "|---|---|---|" + "---|" * len(REPLY_KINDS),
    ]
    for path in paths:
        rows = read_labelled(path)
        verdicts = read_replies(judge, [r["prompt"] for r in rows], [r["completion"] for r in rows])
        for human in (True, False):
            counts = {k: 0 for k in REPLY_KINDS}
            for row, v in zip(rows, verdicts):
                if row["human_refusal"] == human:
                    counts[v.kind] += 1
            label = "refusal" if human else "compliance"
            lines.append(
                f"| {opening} | {Path(path).name} | {label} | " + " | ".join(str(counts[k]) for k in REPLY_KINDS) + " |"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        print(report(args or None))
        print()
        print(kinds_report(args or None))
    except CdeltaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
