"""Run configuration: one pydantic model whose fields mirror the ``cdelta run`` flags.

A TOML file (``--config run.toml``) supplies any subset of the fields; flags given on
the command line override it. ``config.default.toml`` in the package lists them all.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cdelta.errors import CdeltaError


DEFAULT_LR = 1e-3
"""Learning rate of the direct and contrastive fine-tunes when none is given."""
GATED_LR = 1e-2
"""Learning rate of the gated variant when none is given (measured: docs/gated.md)."""


class RunConfig(BaseModel):
    """Everything that determines a ``cdelta run``; its fingerprint keys the resumable stages."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("smollm2-135m", description="Bundled model name, local HF directory, or hub id.")
    category: list[str] = Field(
        ["cybercrime"], description="Target harm categories (several: one composed edit), or lookalike alone with direction lift (over-refusal repair)."
    )
    direction: Literal["refuse", "lift"] = Field(
        "refuse", description="refuse: make the model refuse the category; lift: make it answer the category, keeping its other refusals."
    )
    seed: int = Field(0, description="Random seed for splits, sampling, training and controls.")
    device: str = Field("cpu", description="auto, cpu, cuda or mps.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="float32, bfloat16 or float16.")
    device_map: Literal["auto"] | None = Field(None, description="auto: split a model too large for one GPU over all GPUs (overrides device).")
    max_memory_mb: float | None = Field(None, gt=0, description="Working-memory budget of attribution in MB, on top of the weights (None: no bound).")
    trust_remote_code: bool = Field(False, description="Allow model repos to run their own code.")
    # localize
    n_pairs: int = Field(32, ge=2, description="Clean/corrupted prompt pairs for EAP-IG.")
    method: Literal["eap-ig", "eap"] = Field("eap-ig", description="Attribution method: eap-ig or eap.")
    ig_steps: int = Field(5, ge=1, description="Integration steps of EAP-IG.")
    localize_metric: Literal["logodds", "teacher-forced", "category"] = Field(
        "logodds", description="Attribution metric: refusal log-odds, teacher-forced refusal, or category evidence (for bases that do not refuse; contrast auto then means harmful)."
    )
    contrast: Literal["auto", "harmful", "harmless"] = Field(
        "auto", description="Corrupted prompts: other harmful categories, harmless, or auto (harmful when the base's refusal separates them, else harmless)."
    )
    circuit: str = Field("params:0.02", description="Circuit selection: top_k:N, top_frac:F, threshold:S or params:F.")
    pairs: bool = Field(False, description="Also train and select on the project's look-alike twins and over-refusal minimal pairs, harmful sides as their harm category (always on for target lookalike).")
    domain: bool = Field(False, description="Also retain (train) and select on (val) the target categories' domain look-alikes: benign requests from the category's own field (docs/categories.md).")
    train_contexts: list[Literal["system", "conversation", "rephrased"]] = Field(
        [], description="Deployment contexts the edit is also fitted and trained in: every target and retain prompt of the train split is added once per context, with context instances from the train split of the library (docs/contexts.md)."
    )
    refusal_openings: Literal["any", "decisive"] = Field(
        "any", description="Refusal replies learned for direction refuse: any of the project's refusals, or decisive: only those whose first words already refuse (\"I can't\", \"I won't\"), so a gate open on the reply's first tokens (gate_span) commits the model to the refusal (docs/contexts.md)."
    )
    # edit
    variant: Literal["direct", "contrastive", "gated"] = Field(
        "direct", description="direct: one masked fine-tune; contrastive: k·M⊙(θ_pos − θ_neg); gated: neurons of the circuit's top MLP rewritten as a category gate (docs/gated.md)."
    )
    gate_neurons: int = Field(1, ge=1, description="Neurons the gated variant rewrites in its host MLP.")
    gate_threshold: float | Literal["auto"] = Field(1.0, description="Threshold τ of the gated variant's gate (probe-logit units); auto: chosen on the validation split from the gate's opening rates at the decision position (docs/gated.md).")
    gate_layer: int | None = Field(None, ge=0, description="Gated: the host MLP's layer; None: the MLP that EAP-IG ranks highest (docs/gated.md).")
    gate_span: int | None = Field(None, ge=1, description="Reply positions the gated variant's gate is fitted to open on: the last prompt token and the next N − 1 (later reply positions are negatives, so the gate shuts once a reply is under way); None: the whole reply.")
    steps: int = Field(30, ge=1, description="Optimizer steps of each masked fine-tune.")
    lr: float | None = Field(None, gt=0, description="Learning rate of the masked fine-tune; None: 1e-3 (direct, contrastive) or 1e-2 (gated, whose trained down column is in units of the residual norm).")
    batch_size: int = Field(8, ge=1, description="Target (prompt, reply) pairs per fine-tune step.")
    retain_weight: float = Field(3.0, ge=0, description="Weight of the KL-to-base retain loss.")
    first_token_weight: float = Field(10.0, ge=0, description="Weight of the first reply token inside the retain KL.")
    retain_harmless: int = Field(64, ge=0, description="Retain prompts drawn from the harmless train prompts.")
    retain_lookalike: int = Field(48, ge=0, description="Retain prompts drawn from the look-alike train prompts (domain look-alikes are all kept).")
    retain_other: int = Field(24, ge=0, description="Retain prompts per other harmful category.")
    k: float | None = Field(None, description="Scale of ΔθC; None chooses it on the validation split from k_grid (gated: None means 1).")
    k_grid: list[float] = Field([1.0, 1.5, 2.0], description="Scales tried on the validation split when k is None.")
    search: bool = Field(False, description="Choose circuit size and k by an Optuna multi-objective search on the validation split (docs/search.md).")
    search_sizes: list[str] = Field(["params:0.005", "params:0.01", "params:0.02", "params:0.04"], description="Circuit sizes tried by the search.")
    search_trials: int = Field(12, ge=1, description="Search trials in total (one training per size).")
    k_range: list[float] = Field([0.5, 3.0], min_length=2, max_length=2, description="Range of k searched.")
    controls: list[Literal["random", "full"]] = Field([], description="Also edit an equal-size random circuit and/or all parameters.")
    # eval
    judge: str = Field("classifier", description="Refusal judge: marker or classifier.")
    max_new_tokens: int = Field(32, ge=1, description="Tokens generated per evaluated prompt (the judge reads the opening).")
    eval_batch_size: int = Field(32, ge=1, description="Generation batch size of the evaluation.")
    mmlu_n: int = Field(100, ge=0, description="MMLU questions in the fixed sample (0 to skip).")
    eval_prompts: list[str] = Field(["builtin"], description="Prompt sets for the before/after evaluation.")
    eval_contexts: list[str] = Field(["plain"], description="Deployment contexts of the before/after evaluation: plain, system, conversation, rephrased, sampled, or all (docs/contexts.md).")
    eval_limit: int | None = Field(None, ge=1, description="Evaluate at most this many prompts per category (None: all).")
    faithfulness: bool = Field(True, description="Measure the circuit's faithfulness curve during localize.")

    def retain_counts(self) -> dict[str, int]:
        """Retain prompts drawn per kind (``other`` is per other harmful category)."""
        return {"harmless": self.retain_harmless, "lookalike": self.retain_lookalike, "other": self.retain_other}


    @field_validator("category")
    @classmethod
    def _known_categories(cls, value: list[str]) -> list[str]:
        from cdelta.data.prompts import HARM_CATEGORIES, LOOKALIKE

        unknown = [c for c in value if c not in (*HARM_CATEGORIES, LOOKALIKE)]
        if unknown or not value:
            raise ValueError(f"unknown category {unknown}; use one or more of {', '.join(HARM_CATEGORIES)} (or {LOOKALIKE} with direction lift)")
        return value

    @field_validator("eval_contexts")
    @classmethod
    def _known_contexts(cls, value: list[str]) -> list[str]:
        from cdelta.data.contexts import parse_contexts

        try:
            return parse_contexts(value)
        except CdeltaError as exc:
            raise ValueError(str(exc)) from None

    @model_validator(mode="after")
    def _targets_fit_direction(self) -> RunConfig:
        check_targets(self.category, self.direction)
        if self.lr is None:
            self.lr = GATED_LR if self.variant == "gated" else DEFAULT_LR
        if self.variant == "gated" and self.k is None:
            self.k = 1.0  # k would scale the compiled gate rows too (output ≈ k³): the gate is used as compiled
        if self.variant == "gated" and self.search:
            raise ValueError("search chooses circuit size and k, and variant gated depends on neither (its host is the "
                             "top-ranked MLP at any size, k is 1): set search = false")
        if self.gate_layer is not None and self.variant != "gated":
            raise ValueError(f"gate_layer hosts the gated variant's gate, and variant is {self.variant}: set variant = \"gated\" or drop gate_layer")
        if self.variant == "gated" and len(self.category) > 1:
            raise ValueError("variant gated edits one category (one gate); compose several gated edits with cdelta apply-delta BASE D1 D2 OUT")
        return self


def default_of(name: str):
    """``RunConfig``'s default of its field ``name``: CLI, API and stage defaults all come from there."""
    return RunConfig.model_fields[name].default


def check_targets(category: list[str], direction: str) -> None:
    """CdeltaError unless the targets fit the direction.

    ``lookalike`` (over-refusal repair: answer benign look-alikes, keep every harm
    category's refusal) is a target only with ``direction = "lift"`` and only alone.
    """
    from cdelta.data.prompts import LOOKALIKE

    if LOOKALIKE not in category:
        return
    if direction != "lift":
        raise CdeltaError(
            "category lookalike can only be lifted (made answered): refusing benign look-alikes is over-refusal",
            "use --direction lift --category lookalike, or pick a harm category to refuse",
        )
    if category != [LOOKALIKE]:
        raise CdeltaError(
            f"category lookalike cannot be combined with other categories ({', '.join(c for c in category if c != LOOKALIKE)})",
            "lift lookalike alone (its retain set keeps every harm category's refusal); combine edits with cdelta apply-delta BASE D1 D2 OUT",
        )


def load_config_file(path: Path) -> dict:
    """Parse a TOML config file into a dict of RunConfig fields (validated later)."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CdeltaError(f"config file {path} not found", "check the path given to --config") from None
    except tomllib.TOMLDecodeError as exc:
        raise CdeltaError(f"config file {path} is not valid TOML ({exc})", "fix the syntax; see config.default.toml") from None
    except UnicodeDecodeError:
        raise CdeltaError(f"config file {path} is not UTF-8 text", "save it as UTF-8 TOML; see config.default.toml") from None
    except OSError as exc:
        raise CdeltaError(f"cannot read config file {path}: {exc.strerror or exc}", "check the path given to --config") from None
    table = data.get("run", data)
    if not isinstance(table, dict):
        raise CdeltaError(f"config file {path}: [run] must be a table of settings, not a {type(table).__name__}", "see config.default.toml")
    return table


def make_config(file_values: dict, overrides: dict) -> RunConfig:
    """RunConfig from file values overridden by command-line values (None = not given)."""
    merged = {**file_values, **{k: v for k, v in overrides.items() if v is not None}}
    try:
        return RunConfig(**merged)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "config"
        raise CdeltaError(f"invalid setting {where}: {first['msg']}", "see config.default.toml or cdelta run --help") from None
