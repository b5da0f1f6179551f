"""Where cdelta keeps its user cache: ``$CDELTA_CACHE_DIR``, else the platform's user cache."""

from __future__ import annotations

import os
from pathlib import Path

from platformdirs import user_cache_dir


def cache_home() -> Path:
    """The cdelta user cache directory (model caches, hash cache, base evaluations live under it)."""
    return Path(os.environ.get("CDELTA_CACHE_DIR") or user_cache_dir("cdelta"))
