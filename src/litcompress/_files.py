"""Writing files so that an interrupted write never costs the user the file that was there."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path


def partial_path(path: Path) -> Path:
    """A name beside `path` for writing it first: unique (a fixed one overwrote, then deleted, a user's file of that
    name) and ending in `path`'s suffix (writers choose the format by it). Nothing is created: the writer makes the
    file, with the permissions of any new file (``tempfile.mkstemp`` would make it private to the user)."""
    return path.with_name(f"{path.stem}.{uuid.uuid4().hex[:12]}.partial{path.suffix}")


@contextlib.contextmanager
def written_atomically(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` (:func:`partial_path`) that replaces it only when the block succeeds: a file
    from an earlier run is never lost to a failed or interrupted write."""
    partial = partial_path(path)
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
