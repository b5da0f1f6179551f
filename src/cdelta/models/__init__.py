"""Model loading, bundled offline models, and per-architecture component naming."""
