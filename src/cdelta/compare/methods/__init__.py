"""One module per compared method; each defines ``METHOD = cdelta.compare.Method(...)``."""
