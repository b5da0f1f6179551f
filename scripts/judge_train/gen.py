"""Compose the classifier judge's training set from the hand-written sources (seeded, deterministic).

    .venv/bin/python scripts/judge_train/gen.py [OUT]

OUT defaults to the packaged ``src/cdelta/data/builtin/judge_train.jsonl``, which
``cdelta.judge.classifier`` fits its logistic regression on the first time it is needed
(docs/judge.md); the same sources always give the same file, byte for byte.

``sources.jsonl`` (next to this script) holds every hand-written piece, one JSON object a
line, told apart by ``part``:

* ``template``: one text of a template list ``slot`` (refusal openers, reasons, closings,
  partial-refusal pivots and bodies, moralizing non-answers, over-refusals, degenerate
  outputs, compliance openers, warnings, go-along outlines). ``{topic}`` / ``{Topic}`` is a
  gerund phrase for the harmful request, ``{victims}`` who gets hurt, ``{redirect}`` where
  to get help, ``{warn}`` / ``{warn_lower}`` a warning;
* ``harmful``: a harmful request with its ``topic``, ``victims`` and ``redirect`` phrases;
* ``safe``: a safe (some sensitive-sounding) request with a helpful answer ``body``;
* ``hand``: a fully hand-written example (``prompt``, ``completion``, ``label``, ``note``;
  ``section`` says which kind of hard case it covers), copied as it is.

Rows are composed from these in a fixed order with a seeded RNG, then deduplicated on
(prompt, completion); a new source row changes the file from that row on.
"""

import collections
import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCES = HERE / "sources.jsonl"
DEFAULT_OUT = HERE.parents[1] / "src" / "cdelta" / "data" / "builtin" / "judge_train.jsonl"
SEED = 20240607


def load_sources(path: Path = SOURCES):
    """(template lists by slot, harmful tuples, safe tuples, hand-written tuples) from ``path``."""
    templates: dict[str, list[str]] = collections.defaultdict(list)
    harmful, safe, hand = [], [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        part = row["part"]
        if part == "template":
            templates[row["slot"]].append(row["text"])
        elif part == "harmful":
            harmful.append((row["prompt"], row["topic"], row["victims"], row["redirect"]))
        elif part == "safe":
            safe.append((row["prompt"], row["body"]))
        elif part == "hand":
            hand.append((row["prompt"], row["completion"], row["label"], row["note"]))
        else:
            raise ValueError(f"{path}: unknown part {part!r}")
    return dict(templates), harmful, safe, hand


def fill(t, h):
    """Template ``t`` with the phrases of harmful request ``h``."""
    prompt, topic, victims, redirect = h
    out = t.replace("{Topic}", topic[0].upper() + topic[1:]).replace("{topic}", topic)
    out = out.replace("{victims}", victims).replace("{redirect}", redirect)
    return out


def join(*parts):
    return " ".join(p for p in parts if p).strip()


def compose(templates, HARMFUL, SAFE, HAND) -> list[dict]:
    """The training rows (prompt, completion, label, note), deduplicated, in a fixed order."""
    T = templates
    rng = random.Random(SEED)
    rows = []

    def add(prompt, completion, label, note):
        rows.append({"prompt": prompt, "completion": completion, "label": label, "note": note})

    # 1. full refusals on harmful requests: two per prompt
    openers = T["REFUSAL_OPENERS"][:]
    rng.shuffle(openers)
    k = 0
    for h in HARMFUL:
        for _ in range(2):
            o = openers[k % len(openers)]; k += 1
            add(h[0], join(fill(o, h), fill(rng.choice(T["REASONS"]), h), fill(rng.choice(T["CLOSINGS"]), h)), "refusal", "full refusal")

    # 2. partial refusals: refuse, then an alternative or watered-down answer
    for h in HARMFUL:
        o = rng.choice(T["REFUSAL_OPENERS"])
        reason = fill(rng.choice(T["REASONS"]), h) if rng.random() < 0.5 else ""
        text = join(fill(o, h), reason) + "\n\n" + rng.choice(T["PARTIAL_PIVOTS"]) + "\n\n" + fill(rng.choice(T["PARTIAL_BODIES"]), h)
        add(h[0], text, "refusal", "partial refusal: declines, then offers alternatives")

    # 3. moralizing non-answers
    for h in HARMFUL:
        if "self-harm" in h[1]:
            add(h[0], "I'm really sorry you're feeling this way. You deserve support, and you don't have to face this alone. " + h[3], "refusal", "supportive non-answer")
            continue
        add(h[0], fill(rng.choice(T["MORALIZING"]), h), "refusal", "moralizing non-answer")

    # 4. over-refusals of safe requests (still refusals)
    for i, t in enumerate(T["OVERREFUSAL"] * 3):
        p = SAFE[(i * 7) % len(SAFE)][0]
        add(p, t, "refusal", "refuses a safe request")

    # 5. degenerate outputs
    for i, t in enumerate(T["DEGENERATE"]):
        p = (SAFE + [(h[0], "") for h in HARMFUL])[(i * 11) % (len(SAFE) + len(HARMFUL))][0]
        add(p, t, "refusal", "degenerate output")

    # 6. compliance on safe requests: plain, apology/disclaimer first, warnings
    for i, (p, body) in enumerate(SAFE):
        add(p, rng.choice(T["COMPLY_PLAIN"]) + body, "compliance", "plain compliance")
        if i % 6 != 5:
            add(p, rng.choice(T["COMPLY_APOLOGY"]) + body, "compliance", "apology or disclaimer, then helps")
        warn = rng.choice(T["WARNINGS"])
        if i % 2 == 0:
            o = rng.choice(T["COMPLY_WARNING_OPEN"]).replace("{warn}", warn).replace("{warn_lower}", warn[0].lower() + warn[1:])
            add(p, o + body, "compliance", "warning first, then helps")
        else:
            add(p, body + rng.choice(T["COMPLY_WARNING_CLOSE"]).replace("{warn}", warn), "compliance", "helps, with a warning")

    # 7. compliance on harmful requests (vague, non-operational outlines)
    GO_ALONG = T["GO_ALONG"]
    for i, h in enumerate(HARMFUL):
        if "self-harm" in h[1]:
            continue
        if i % 5 in (0, 2, 3):
            add(h[0], fill(GO_ALONG[i % len(GO_ALONG)], h), "compliance", "complies with a harmful request")

    # 8. hand-written examples
    for p, c, label, note in HAND:
        add(p, c, label, note or f"{label} (hand-written)")

    seen, out = set(), []
    for r in rows:
        key = (r["prompt"], r["completion"])
        if key in seen:
            continue
        seen.add(key); out.append(r)
    return out


def main(argv: list[str]) -> None:
    out_path = Path(argv[0]) if argv else DEFAULT_OUT
    out = compose(*load_sources())
    with open(out_path, "w", encoding="utf-8") as f:
        for r in out:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(out_path, len(out), collections.Counter(r["label"] for r in out))


if __name__ == "__main__":
    main(sys.argv[1:])
