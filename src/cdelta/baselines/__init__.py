"""The comparison methods that are not C-Δθ: each baseline in its own module.

* ``steering`` — ActAdd and directional ablation (Arditi et al. 2024) as weight edits
  (their hook forms are core: ``cdelta.directions.hooks``);
* ``cast`` — CAST, conditional activation steering (Lee et al. 2025);
* ``ot`` — Gaussian optimal-transport refusal ablation (Nanfack et al. 2026);
* ``spectral`` — SRA, surgical refusal ablation (Cristofano 2026);
* ``probes`` — a linear probe with a detect-then-route refuser;
* ``refusal_tokens`` — one new refusal token per harm category (Jain et al. 2024);
* ``nest`` — NeST, neuron-selective safety tuning (``neurons``: neuron ids and the
  parameter entries they own, shared with SafeSeek);
* ``safeseek`` — SafeSeek, a mask-optimized head+neuron safety circuit, then circuit tuning.

``cdelta compare`` wraps each in a method adapter (``cdelta.compare.methods``). The core
(localization, the edit, the pipeline) never imports this package. See docs/baselines.md.
"""
