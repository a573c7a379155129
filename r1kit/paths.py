"""Where r1kit finds the shared, read-only data (benchmarks, reference templates)."""
from __future__ import annotations

import os
from pathlib import Path


def shared_data_dir() -> Path:
    """`$R1KIT_SHARED_DATA`, else `../shared/data` beside the repository checkout."""
    env = os.environ.get("R1KIT_SHARED_DATA")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent.parent  # the repository root for a source checkout
    for root in (here, Path.cwd()):
        candidate = root.parent / "shared" / "data"
        if candidate.is_dir():
            return candidate
    return here.parent / "shared" / "data"


def benchmarks_dir() -> Path:
    return shared_data_dir() / "benchmarks"


def templates_dir() -> Path:
    return shared_data_dir() / "templates"
