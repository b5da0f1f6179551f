"""Prompt sets from user files (CSV, TSV, JSONL, JSON) and from known public file formats.

``load_prompt_file`` reads any table of prompts. The format-specific loaders read the
public files kept in ``../shared/data`` (XSTest, AdvBench, Alpaca harmless, and the CSV
copies of JailbreakBench and StrongREJECT, which reuse the mappings in ``public.py``).

Every problem raises ``CdeltaError`` naming the problem and its fix before anything is
returned: missing file, unknown extension, undecodable or empty file, malformed CSV/JSONL/
JSON (with the line number), a named column that does not exist (listing the columns),
no detectable text column, an empty prompt, or an unknown kind. Prompts get ids
``"<source>:<row>"`` (0-based data row) and split ``"test"``; re-split with
``PromptSet.with_splits``.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from cdelta.data.prompts import HARMLESS, KINDS, LOOKALIKE, Prompt, PromptSet
from cdelta.data.public import (
    OTHER,
    XSTEST_UNSAFE_CATEGORIES,
    jailbreakbench_prompts,
    map_category,
    strongreject_prompts,
)
from cdelta.errors import CdeltaError

SUPPORTED_EXTENSIONS = (".csv", ".tsv", ".jsonl", ".json")
TEXT_COLUMNS = ("prompt", "text", "forbidden_prompt", "goal", "instruction", "behavior", "question", "query")
"""Columns tried, in order and ignoring case, when no text column is named."""
CATEGORY_COLUMNS = ("category",)
"""Columns used as the category, ignoring case, when no category column is named."""
JSON_LIST_KEYS = ("prompts", "data", "examples", "rows", "items")
"""Keys under which a top-level JSON object may hold its list of records."""


Record = Union[dict[str, Any], str]


@dataclass(frozen=True)
class Table:
    """Records read from one file: column names in first-seen order, and (line, record) pairs.

    A record is a dict, or a bare string (a JSON/JSONL string), which is its own text.
    """

    path: Path
    columns: list[str]
    rows: list[tuple[int, Record]]


# --------------------------------------------------------------------------- reading


def _fix_options() -> str:
    return "Name the column with text_column=... (CLI: FILE:text=COLUMN,category=COLUMN,kind=KIND)"


def read_table(path: str | Path) -> Table:
    """All records of a CSV/TSV/JSONL/JSON file, or a ``CdeltaError`` saying what is wrong."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CdeltaError(
            f"prompt file not found: {path}", "Check the path (relative paths start at the current directory)"
        )
    if not path.is_file():
        raise CdeltaError(f"{path} is not a file", "Give the path of a .csv, .tsv, .jsonl or .json file")
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_EXTENSIONS:
        raise CdeltaError(
            f"cannot read prompts from {path}: unknown extension {path.suffix or '(none)'!r}",
            f"Save the prompts as one of {', '.join(SUPPORTED_EXTENSIONS)}",
        )
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise CdeltaError(
            f"{path} is not UTF-8 text ({e.reason} at byte {e.start})", "Re-save the file as UTF-8"
        ) from None
    if not text.strip():
        raise CdeltaError(f"prompt file {path} is empty", "Add prompts to it, one record per line or row")
    if suffix in (".csv", ".tsv"):
        table = _read_csv(path, text, "\t" if suffix == ".tsv" else ",")
    elif suffix == ".jsonl":
        table = _read_jsonl(path, text)
    else:
        table = _read_json(path, text)
    if not table.rows:
        raise CdeltaError(f"prompt file {path} has no records (only a header)", "Add at least one prompt")
    return table


def _read_csv(path: Path, text: str, delimiter: str) -> Table:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    start = 1
    try:
        header = next(reader)
        header = [h.strip() for h in header]
        if not any(header):
            raise CdeltaError(f"{path} line 1: the header row is empty", "Put the column names on the first line")
        dupes = sorted({h for h in header if header.count(h) > 1})
        if dupes:
            raise CdeltaError(f"{path} line 1: duplicate column names {dupes}", "Give every column a distinct name")
        rows = []
        start = reader.line_num + 1
        for fields in reader:
            if fields and len(fields) != len(header):
                raise CdeltaError(
                    f"malformed CSV {path} line {start}: {len(fields)} fields, but the header has {len(header)}",
                    "Quote fields that contain the delimiter or line breaks, "
                    "and give every row as many fields as the header",
                )
            if fields:
                rows.append((start, dict(zip(header, fields))))
            start = reader.line_num + 1
    except csv.Error as e:
        raise CdeltaError(
            f"malformed CSV {path} line {start}: {e}",
            "Check the quoting on that line (a field with a quote must be wrapped in quotes, inner quotes doubled)",
        ) from None
    return Table(path, header, rows)


def _record(path: Path, line: int, value: Any) -> Record:
    if isinstance(value, (str, dict)):
        return value
    where = f"{path} {'record' if path.suffix.lower() == '.json' else 'line'} {line}"
    raise CdeltaError(
        f"{where}: expected a JSON object (or a string), got {type(value).__name__}",
        'Write one object per record, e.g. {"prompt": "...", "category": "..."}',
    )


def _columns(rows: list[tuple[int, Record]]) -> list[str]:
    columns = list(dict.fromkeys(k for _, r in rows if isinstance(r, dict) for k in r))
    return columns or ["text"]  # only bare strings: call their column "text"


def _read_jsonl(path: Path, text: str) -> Table:
    rows = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise CdeltaError(
                f"malformed JSONL {path} line {line_no}: {e.msg} (column {e.colno})",
                "Write exactly one complete JSON object per line",
            ) from None
        rows.append((line_no, _record(path, line_no, value)))
    return Table(path, _columns(rows), rows)


def _read_json(path: Path, text: str) -> Table:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise CdeltaError(
            f"malformed JSON {path} line {e.lineno}: {e.msg} (column {e.colno})",
            "Fix the JSON syntax there (or save one object per line as .jsonl)",
        ) from None
    if isinstance(value, dict):
        key = next((k for k in JSON_LIST_KEYS if isinstance(value.get(k), list)), None)
        if key is None:
            raise CdeltaError(
                f"{path} holds a JSON object without a list of records under any of {list(JSON_LIST_KEYS)}",
                "Make the file a JSON list of objects, or put the list under one of those keys",
            )
        value = value[key]
    if not isinstance(value, list):
        raise CdeltaError(
            f"{path} must hold a JSON list of records, not {type(value).__name__}",
            "Make the file a JSON list of objects",
        )
    # A JSON list has no line per record: report 1-based record numbers instead.
    rows = [(i, _record(path, i, v)) for i, v in enumerate(value, start=1)]
    return Table(path, _columns(rows), rows)


# --------------------------------------------------------------------------- columns and values


def _where(table: Table, line: int) -> str:
    return f"{table.path} {'record' if table.path.suffix.lower() == '.json' else 'line'} {line}"


def _resolve_column(table: Table, column: str, role: str) -> str:
    if column in table.columns:
        return column
    folded = [c for c in table.columns if c.lower() == column.lower()]
    if len(folded) == 1:
        return folded[0]
    raise CdeltaError(
        f"{table.path} has no {role} column {column!r}; its columns are {table.columns}",
        f"Name one of those columns as the {role} column",
    )


def _detect_column(table: Table, candidates: tuple[str, ...]) -> str | None:
    by_lower = {c.lower(): c for c in reversed(table.columns)}
    return next((by_lower[c] for c in candidates if c in by_lower), None)


def _require(table: Table, columns: tuple[str, ...], fmt: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise CdeltaError(
            f"{table.path} is not a {fmt} file: missing columns {missing}; its columns are {table.columns}",
            f"Use the original {fmt} file, or load it as a generic prompt file naming its text column",
        )


def _text(table: Table, line: int, record: Record, column: str) -> str:
    value = record if isinstance(record, str) else record.get(column)
    if not isinstance(value, str) or not value.strip():
        raise CdeltaError(
            f"{_where(table, line)}: the text column {column!r} is empty or not a string",
            "Fill in or delete that record",
        )
    return value.strip()


def _label(record: Record, column: str | None) -> str:
    value = record.get(column) if column and isinstance(record, dict) else None
    return "" if value is None else str(value).strip()


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise CdeltaError(f"unknown prompt kind {kind!r}", f"Use one of {', '.join(KINDS)}")


# --------------------------------------------------------------------------- generic loader


def load_prompt_file(
    path: str | Path,
    text_column: str | None = None,
    category_column: str | None = None,
    kind: str = "harmful",
    default_category: str = OTHER,
    name: str | None = None,
    detect_format: bool = True,
) -> PromptSet:
    """Prompts from a CSV, TSV, JSONL or JSON-list file.

    ``text_column`` defaults to the first of ``TEXT_COLUMNS`` present (ignoring case), and
    ``category_column`` to a column named ``category``; a JSON/JSONL record that is a bare
    string is a prompt. For ``kind="harmful"`` a prompt's category is its category value,
    or ``default_category`` when empty or absent; for ``harmless``/``lookalike`` the
    category is the kind and the value is kept in ``source_category`` only. ``source`` and
    the set's name are ``name`` or the file's stem.

    With ``detect_format`` (the default), a harmful file read without naming any column is
    checked against the known formats (XSTest, JailbreakBench, StrongREJECT, AdvBench) and
    then loaded with that format's loader and mapping (``name`` then names the set only;
    ``source`` and ids stay the format's, e.g. ``strongreject:0``).
    """
    _check_kind(kind)
    table = read_table(path)
    if detect_format and text_column is None and category_column is None and kind == "harmful":
        fmt = detect_known_format(table)
        if fmt is not None:
            return _FORMAT_LOADERS[fmt](table, name)
    source = name or table.path.stem
    if text_column is not None:
        text_col = _resolve_column(table, text_column, "text")
    else:
        text_col = _detect_column(table, TEXT_COLUMNS)
        if text_col is None:
            raise CdeltaError(
                f"cannot tell which column of {table.path} holds the prompts: none of {list(TEXT_COLUMNS)} "
                f"among its columns {table.columns}",
                _fix_options(),
            )
    if category_column is not None:
        cat_col: str | None = _resolve_column(table, category_column, "category")
    else:
        cat_col = _detect_column(table, CATEGORY_COLUMNS)
    prompts = []
    for i, (line, record) in enumerate(table.rows):
        text = _text(table, line, record, text_col)
        label = _label(record, cat_col)
        category = (label or default_category) if kind == "harmful" else kind
        prompts.append(Prompt(f"{source}:{i}", text, category, kind, source, "test", label))
    return PromptSet(name or source, prompts)


# --------------------------------------------------------------------------- known formats


def detect_known_format(table: Table) -> str | None:
    """The known format whose columns ``table`` has (``xstest``, ``jailbreakbench``, ...), or None."""
    cols = set(table.columns)
    if {"prompt", "type", "label"} <= cols:
        return "xstest"
    if {"Goal", "Category"} <= cols:
        return "jailbreakbench"
    if {"forbidden_prompt", "category"} <= cols:
        return "strongreject"
    if cols == {"goal", "target"}:
        return "advbench"
    return None


def _xstest(table: Table, name: str | None) -> PromptSet:
    _require(table, ("prompt", "type", "label"), "XSTest")
    prompts = []
    for i, (line, r) in enumerate(table.rows):
        text, label, type_ = _text(table, line, r, "prompt"), _label(r, "label"), _label(r, "type")
        if label == "safe":
            prompts.append(Prompt(f"xstest:{i}", text, LOOKALIKE, LOOKALIKE, "xstest", "test", type_))
        elif label == "unsafe":
            category = map_category(type_, text, XSTEST_UNSAFE_CATEGORIES)
            prompts.append(Prompt(f"xstest:{i}", text, category, "harmful", "xstest", "test", type_))
        else:
            raise CdeltaError(
                f"{_where(table, line)}: XSTest label {label!r} is neither 'safe' nor 'unsafe'", "Fix the label column"
            )
    return PromptSet(name or "xstest", prompts)


def _advbench(table: Table, name: str | None) -> PromptSet:
    _require(table, ("goal",), "AdvBench")
    return PromptSet(
        name or "advbench",
        [
            Prompt(f"advbench:{i}", _text(table, line, r, "goal"), OTHER, "harmful", "advbench", "test", "")
            for i, (line, r) in enumerate(table.rows)
        ],
    )


def _alpaca(table: Table, name: str | None) -> PromptSet:
    _require(table, ("instruction",), "Alpaca")
    prompts = []
    for i, (line, r) in enumerate(table.rows):
        text = _text(table, line, r, "instruction")
        extra = r.get("input") if isinstance(r, dict) else None
        if isinstance(extra, str) and extra.strip():
            text = f"{text}\n\n{extra.strip()}"
        prompts.append(Prompt(f"alpaca:{i}", text, HARMLESS, HARMLESS, "alpaca", "test", _label(r, "category")))
    return PromptSet(name or "alpaca", prompts)


def _checked(table: Table, columns: tuple[str, ...], fmt: str) -> list[dict[str, Any]]:
    """Rows with the label column(s) as stripped strings and the text column (last) checked non-empty."""
    _require(table, columns, fmt)
    *labels, text_col = columns
    return [
        {**{c: _label(r, c) for c in labels}, text_col: _text(table, line, r, text_col)}
        for line, r in table.rows
    ]


def _jailbreakbench(table: Table, name: str | None) -> PromptSet:
    rows = _checked(table, ("Category", "Goal"), "JailbreakBench")
    return PromptSet(name or "jailbreakbench", jailbreakbench_prompts(rows))


def _strongreject(table: Table, name: str | None) -> PromptSet:
    rows = _checked(table, ("category", "forbidden_prompt"), "StrongREJECT")
    return PromptSet(name or "strongreject", strongreject_prompts(rows))


_FORMAT_LOADERS: dict[str, Callable[[Table, str | None], PromptSet]] = {
    "xstest": _xstest,
    "jailbreakbench": _jailbreakbench,
    "strongreject": _strongreject,
    "advbench": _advbench,
}


def load_xstest(path: str | Path, name: str | None = None) -> PromptSet:
    """XSTest v2 prompts (``xstest_prompts.csv``: ``prompt``, ``type``, ``label``).

    ``safe`` prompts are look-alikes (kind and category ``lookalike``); ``unsafe`` ones are
    harmful, mapped by ``XSTEST_UNSAFE_CATEGORIES`` (``type``, with keyword rules). The
    XSTest ``type`` is kept as ``source_category``. Ids are ``xstest:<row>`` (row = XSTest
    id - 1).
    """
    return _xstest(read_table(path), name)


def load_advbench(path: str | Path, name: str | None = None) -> PromptSet:
    """AdvBench harmful behaviours (``goal``, ``target``): harmful, category ``other`` (no labels)."""
    return _advbench(read_table(path), name)


def load_alpaca_harmless(path: str | Path, name: str | None = None) -> PromptSet:
    """Alpaca-derived harmless instructions (JSON list of ``{"instruction", "category"}``).

    Kind and category ``harmless``; an ``input`` field, when present and non-empty, is
    appended to the instruction after a blank line.
    """
    return _alpaca(read_table(path), name)


def load_jailbreakbench_csv(path: str | Path, name: str | None = None) -> PromptSet:
    """A JailbreakBench behaviours CSV (``Goal``, ``Category``) mapped like ``load_jailbreakbench``."""
    return _jailbreakbench(read_table(path), name)


def load_strongreject_csv(path: str | Path, name: str | None = None) -> PromptSet:
    """A StrongREJECT CSV (``category``, ``forbidden_prompt``) mapped like ``load_strongreject``."""
    return _strongreject(read_table(path), name)
