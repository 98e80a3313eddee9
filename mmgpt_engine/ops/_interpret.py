"""Whether Triton runs interpreted on CPU tensors (TRITON_INTERPRET=1).

A leaf module: the dispatch and the Triton kernel files both read it without importing each other.
"""
from __future__ import annotations

import os


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
