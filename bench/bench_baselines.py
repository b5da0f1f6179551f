"""Baselines on the bundled model: refusal direction, CAST, ActAdd and directional ablation.

Fits a refusal direction and a CAST model for one target category (train split for the
vectors, validation split for every choice), then evaluates on the test split with
``cdelta.evaluate.evaluate_model`` (greedy, classifier judge):

* CAST, hooks attached around the evaluation;
* ActAdd, exported as a drop-in checkpoint (baked ``down_proj`` bias) and reloaded with
  ``load_model``; its hooked and exported logits are compared first;
* directional ablation: exported and checked against its hooks (no refusal eval: the
  base model refuses almost nothing, so there is nothing to remove);
* optionally the base model.

Every stage writes JSON into ``--out`` (default ``runs/baselines``); fitted vectors are
saved and reused (``--refit`` to recompute). Wall times are recorded per stage.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_baselines.py [--category cybercrime] [--stages direction,cast,actadd,ablation,base]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def _summary(result: dict, category: str) -> dict:
    cells = next(iter(result["sets"].values()))
    harmful_other = [c for name, c in cells.items() if c["kind"] == "harmful" and name != category]
    k = sum(c["refusals"] for c in harmful_other)
    n = sum(c["n"] for c in harmful_other)
    return {
        "target": cells[category]["refusal_rate"],
        "target_n": cells[category]["n"],
        "other_harmful": k / n if n else None,
        "other_harmful_n": n,
        "harmless": cells.get("harmless", {}).get("refusal_rate"),
        "harmless_n": cells.get("harmless", {}).get("n"),
        "lookalike": cells.get("lookalike", {}).get("refusal_rate"),
        "lookalike_n": cells.get("lookalike", {}).get("n"),
        "per_category": {name: c["refusal_rate"] for name, c in cells.items()},
        "utility": result["utility"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--category", default="cybercrime")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stages", default="direction,cast,actadd,ablation")
    parser.add_argument("--out", default="runs/baselines")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--mmlu-n", type=int, default=50)
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--lookalike", action="store_true", help="add look-alikes to the CAST contrast set")
    parser.add_argument("--centers", default="0,1", help="CAST centring options searched on val: '0' = plain CAST, '0,1' = also centred cosine")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--refit", action="store_true")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from cdelta.baselines.cast import CastModel, fit_cast
    from cdelta.baselines.steering import ablation_edit, actadd_edit, export_direction_edit
    from cdelta.data.builtin import load_builtin
    from cdelta.directions import Direction, ablation_hooks, actadd_hooks, fit_refusal_direction
    from cdelta.evaluate import EvalConfig, evaluate_model, first_token_kl, next_token_logprobs
    from cdelta.models.chat import encode_chat
    from cdelta.models.loading import load_model

    out = Path(args.out)
    stages = set(args.stages.split(","))
    prompts = load_builtin()
    config = EvalConfig(split="test", judge="classifier", max_new_tokens=args.max_new_tokens, mmlu_n=args.mmlu_n, seed=args.seed)
    times: dict[str, float] = {}

    t = time.perf_counter()
    lm = load_model(args.model)
    times["load"] = time.perf_counter() - t
    harmless_test = prompts.filter(split="test", kind="harmless").texts()[: config.kl_prompts]
    base_first = next_token_logprobs(lm.model, lm.tokenizer, harmless_test)

    direction_path = out / "direction.safetensors"
    if direction_path.exists() and not args.refit:
        direction = Direction.load(direction_path)
    else:
        t = time.perf_counter()
        direction = fit_refusal_direction(lm, prompts, seed=args.seed, alpha=args.alpha)
        times["fit_direction"] = time.perf_counter() - t
        direction.save(direction_path)
        _write(out / "direction.json", direction.to_json())
    print(f"direction: recipe={direction.recipe} layer={direction.layer} position={direction.position} norm={direction.norm:.2f}")

    def record(name: str, model, seconds: float, extra: dict) -> None:
        summary = {**_summary(result, args.category), **extra, "eval_seconds": seconds}
        _write(out / f"{name}.json", {"summary": summary, "result": result})
        print(name, json.dumps({k: v for k, v in summary.items() if k not in ("utility", "per_category")}), flush=True)

    if "cast" in stages:
        centers = tuple(bool(int(c)) for c in args.centers.split(","))
        tag = "cast" if True in centers else "cast-plain"
        cast_path = out / f"{tag}-{args.category}.safetensors"
        if cast_path.exists() and not args.refit:
            cast = CastModel.load(cast_path)
        else:
            t = time.perf_counter()
            cast = fit_cast(lm, prompts, args.category, seed=args.seed, behavior=direction, alpha=args.alpha, lookalike=args.lookalike, centers=centers)
            times["fit_cast"] = time.perf_counter() - t
            cast.save(cast_path)
        print(f"{tag}: condition layer={cast.condition_layer} centred={cast.condition_center is not None} {cast.comparator} {cast.threshold:.4f} val F1={cast.grid[0]['f1']:.3f}")
        t = time.perf_counter()
        with cast.attach(lm.model) as hooks:
            result = evaluate_model(lm.model, lm.tokenizer, [prompts], config, progress=False)
            kl = first_token_kl(base_first, next_token_logprobs(lm.model, lm.tokenizer, harmless_test))
        times["eval_cast"] = time.perf_counter() - t
        record(tag, lm.model, times["eval_cast"], {
            "centred": cast.condition_center is not None,
            "first_token_kl_harmless": kl, "condition_layer": cast.condition_layer, "threshold": cast.threshold,
            "comparator": cast.comparator, "behavior_layers": list(cast.behavior_layers), "alpha": cast.alpha,
            "val_grid_top": cast.grid[:5], "prompt_passes": len(hooks.history),
        })

    probe = encode_chat(lm.tokenizer, prompts.filter(split="val").sample(8, args.seed).texts())
    if "actadd" in stages:
        t = time.perf_counter()
        edit = actadd_edit(lm.model, direction, alpha=args.alpha)
        path = export_direction_edit(lm, edit, out / "actadd-checkpoint", {"category": "all (unconditional)"})
        times["export_actadd"] = time.perf_counter() - t
        edited = load_model(str(path))
        with torch.no_grad(), actadd_hooks(lm.model, direction, alpha=args.alpha):
            hooked = lm.model(**probe).logits
        with torch.no_grad():
            gap = (edited.model(**probe).logits - hooked).abs().max().item()
        t = time.perf_counter()
        result = evaluate_model(edited.model, edited.tokenizer, [prompts], config, reference=(lm.model, lm.tokenizer), progress=False)
        times["eval_actadd"] = time.perf_counter() - t
        record("actadd", edited.model, times["eval_actadd"], {"export_vs_hook_max_logit_gap": gap, "layer": direction.layer, "alpha": args.alpha})
        del edited

    if "ablation" in stages:
        t = time.perf_counter()
        edit = ablation_edit(lm.model, direction)
        path = export_direction_edit(lm, edit, out / "ablation-checkpoint")
        times["export_ablation"] = time.perf_counter() - t
        edited = load_model(str(path))
        with torch.no_grad(), ablation_hooks(lm.model, direction):
            hooked = lm.model(**probe).logits
        with torch.no_grad():
            gap = (edited.model(**probe).logits - hooked).abs().max().item()
            base = lm.model(**probe).logits
        kl = first_token_kl(base_first, next_token_logprobs(edited.model, edited.tokenizer, harmless_test))
        summary = {"export_vs_hook_max_logit_gap": gap, "logit_change_vs_base": (hooked - base).abs().max().item(), "first_token_kl_harmless": kl}
        _write(out / "ablation.json", {"summary": summary})
        print("ablation", json.dumps(summary), flush=True)
        del edited

    if "base" in stages:
        t = time.perf_counter()
        result = evaluate_model(lm.model, lm.tokenizer, [prompts], config, progress=False)
        times["eval_base"] = time.perf_counter() - t
        record("base", lm.model, times["eval_base"], {})

    _write(out / f"times-{'-'.join(sorted(stages))}.json", times)
    print("times", json.dumps({k: round(v, 1) for k, v in times.items()}))


if __name__ == "__main__":
    main()
