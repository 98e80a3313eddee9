"""Files that are either whole or absent: write under a temporary name in the same folder, flush
to disk, then rename into place (a rename within a filesystem is atomic), so a reader or a crash
never sees a half-written checkpoint marker, config or weights file."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Union


def write_atomic(path: Union[str, os.PathLike], content: Union[str, bytes, Callable[[Path], None]]) -> Path:
    """Write `content` to `path`: text, bytes, or a function that writes a file at the temporary
    path it is given (e.g. `lambda p: save_file(state, str(p))`). Returns the path."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        if callable(content):
            content(tmp)
        else:
            with open(tmp, "wb") as f:
                f.write(content.encode() if isinstance(content, str) else content)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
