"""Writing files so that an interrupted write never costs the user the file that was there."""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path


def partial_path(path: Path) -> Path:
    """A name beside `path` for writing it first: unique (a fixed one overwrote, then deleted, a user's file of that
    name) and ending in `path`'s suffix (writers choose the format by it). Nothing is created: the writer makes the
    file, with the permissions of any new file (``tempfile.mkstemp`` would make it private to the user)."""
    # (writers choose the format by a short suffix: a long "suffix" is part of the name, and may be dropped)
    suffix = path.suffix if len(path.suffix.encode()) <= 16 else ""
    tail = f".{uuid.uuid4().hex[:12]}.partial{suffix}"
    # the name's stem shortened where the whole would pass the file system's limit on a name (255 bytes on most):
    # a legal name of ~240 characters failed, naming this file
    room = _name_max(path.parent) - len(tail.encode())
    stem = path.stem.encode()[:max(room, 1)].decode(errors="ignore") or "m"
    return path.with_name(stem + tail)


def what_is_in_the_way(folder: Path, folder_word: str = "folder") -> str | None:
    """What stops `folder` being made or written into, in words ("out is a file, not a folder"): `folder` or the
    first of its parents that is a file or a broken link (``mkdir`` says only "File exists" or "Not a directory");
    None when there is none, or when a parent cannot be read (the write then says so)."""
    try:
        for part in (folder, *folder.parents):
            if part.is_symlink() and not part.exists():  # (exists() follows the link)
                return f"{part} is a broken link (to {os.readlink(part)!r}), not a {folder_word}"
            if part.exists() and not part.is_dir():
                return f"{part} is a file, not a {folder_word}"
    except OSError:
        return None
    return None


def cannot_write(directory: Path) -> str | None:
    """Make `directory` (and its parents) and write a temporary file in it: None when that works, else why not (an
    output folder that cannot be written then fails before any training, not at the first file written after it)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as error:
        return error.strerror or str(error)
    return None


def folders_in_the_way(directory: Path, names: Iterable[str], *,
                       written_through_links: Iterable[str] = ()) -> list[str]:
    """The `names` that are folders in `directory`, where a run writes files of those names: the write would fail
    after all the work before it (renaming a file over a folder; over a link to one, :func:`written_atomically`
    replaces the link). `written_through_links`: names written by others, which follow a link (Lightning's
    checkpoint save moves its file into the folder linked): a link to a folder is in the way of those too."""
    through = set(written_through_links)
    return [name for name in (*names, *through) if (directory / name).is_dir()
            and (name in through or not (directory / name).is_symlink())]


def _name_max(directory: Path) -> int:
    """The longest file name (in bytes) `directory`'s file system takes; 255 where it cannot be asked."""
    try:
        return os.pathconf(directory if directory.exists() else ".", "PC_NAME_MAX")
    except (AttributeError, OSError, ValueError):
        return 255


@contextlib.contextmanager
def written_atomically(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` (:func:`partial_path`) that replaces it only when the block succeeds: a file
    from an earlier run is never lost to a failed or interrupted write."""
    if not path.parent.is_dir():  # else the error named the partial file, a name the user never gave
        blocking = what_is_in_the_way(path.parent)
        if blocking is not None:
            raise NotADirectoryError(f"cannot write {path}: {blocking}")
        raise FileNotFoundError(f"cannot write {path}: its folder {path.parent} does not exist (create it first)")
    if path.is_dir() and not path.is_symlink():  # else found at the rename, naming the partial file
        raise IsADirectoryError(f"cannot write {path}: it is a folder; give a file path")
    partial = partial_path(path)
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
