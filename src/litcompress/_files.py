"""Writing files so that an interrupted write never costs the user the file that was there."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def written_atomically(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` that replaces it only when the block succeeds: a file from an earlier run is
    never lost to a failed or interrupted write. Its name is unique (a fixed one overwrote, then deleted, a user's
    file of that name) and ends in `path`'s suffix (writers choose the format by it); the writer creates it, with
    the permissions of any new file (``tempfile.mkstemp`` would make it private to the user)."""
    partial = path.with_name(f"{path.stem}.{uuid.uuid4().hex[:12]}.partial{path.suffix}")
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
