"""Re-judge the generations stored in a results.json with the current judge.

Prints refusal % per prompt set and category (base and edited model of ``cdelta run``,
or the one model of ``cdelta eval``), as they would have been reported with today's judge (for
runs made before a judge change; the generations themselves are not redone).

    .venv/bin/python scripts/rejudge.py runs/qwen-lift-cybercrime-gated/results.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cdelta.data.prompts import Prompt, PromptSet
from cdelta.evaluate import RefusalStat, refusal_stats
from cdelta.judge import get_judge


def refusal_rates(generations: dict[str, list[dict]], judge) -> dict[str, dict[str, RefusalStat]]:
    """``{set: {category: RefusalStat}}`` of stored generations (each with prompt, completion, category)."""
    out: dict[str, dict[str, RefusalStat]] = {}
    for set_name, items in generations.items():
        prompts = PromptSet(set_name, [Prompt(str(i), item["prompt"], item["category"], "", set_name) for i, item in enumerate(items)])
        out[set_name] = refusal_stats(prompts, [judge.is_refusal(item["prompt"], item["completion"]) for item in items])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--judge", default=None, help="Judge name (default: the one the run used).")
    args = parser.parse_args()
    results = json.loads(args.results.read_text())
    name = args.judge or results.get("meta", {}).get("config", {}).get("judge", "classifier")
    judge = get_judge(name)
    print(f"judge {name}")
    # cdelta run writes base and edited; cdelta eval writes one model's results
    models = {which: results[which] for which in ("base", "edited") if which in results} or {"model": results}
    for which, result in models.items():
        for set_name, rates in refusal_rates(result["generations"], judge).items():
            cells = "  ".join(f"{c} {cell.refusals}/{cell.n} = {100 * cell.rate:.1f}%" for c, cell in rates.items())
            print(f"{which:>6} {set_name}: {cells}")


if __name__ == "__main__":
    main()
