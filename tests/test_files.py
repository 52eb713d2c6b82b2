"""litcompress._files: a file is replaced whole or not at all."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from litcompress._files import what_is_in_the_way, written_atomically


@settings(max_examples=30, deadline=None)
@given(old=st.binary(max_size=64), new=st.binary(max_size=64), fails=st.booleans())
def test_a_write_that_fails_midway_leaves_the_earlier_file_and_no_partial_one(tmp_path_factory, old: bytes,
                                                                             new: bytes, fails: bool) -> None:
    folder = tmp_path_factory.mktemp("files")
    path = folder / "model.pt"
    path.write_bytes(old)
    if fails:
        with pytest.raises(RuntimeError, match="killed"):
            with written_atomically(path) as partial:
                partial.write_bytes(new)  # bytes on disk beside it, then the writer fails
                raise RuntimeError("killed")
    else:
        with written_atomically(path) as partial:
            partial.write_bytes(new)
    assert path.read_bytes() == (old if fails else new)
    assert [p.name for p in folder.iterdir()] == ["model.pt"]


def test_a_missing_folder_is_named_not_the_partial_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"its folder .*absent does not exist"):
        with written_atomically(tmp_path / "absent" / "model.pt"):
            pass


def test_a_file_where_the_folder_should_be_and_a_folder_where_the_file_should_be_are_named(tmp_path: Path) -> None:
    """A file as the folder was said not to exist ("create it first"); a folder at the path was found only at the
    rename, in words naming the partial file."""
    (tmp_path / "afile").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"afile is a file, not a folder"):
        with written_atomically(tmp_path / "afile" / "model.pt"):
            pass
    (tmp_path / "model.pt").mkdir()
    with pytest.raises(IsADirectoryError, match=r"model\.pt: it is a folder; give a file path"):
        with written_atomically(tmp_path / "model.pt"):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "model.pt"]


def test_a_broken_link_where_the_folder_should_be_is_named_as_one(tmp_path: Path) -> None:
    """A link to nothing does not exist (exists() follows it), so it was not found in the way: mkdir then said only
    "File exists"."""
    (tmp_path / "gone").symlink_to(tmp_path / "missing")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    assert what_is_in_the_way(tmp_path / "gone" / "sub") == (
        f"{tmp_path / 'gone'} is a broken link (to {str(tmp_path / 'missing')!r}), not a folder")
    assert what_is_in_the_way(tmp_path / "loop", "directory") == (
        f"{tmp_path / 'loop'} is a broken link (to {str(tmp_path / 'loop')!r}), not a directory")
    assert what_is_in_the_way(tmp_path / "missing" / "sub") is None  # a folder not there yet is made
    (tmp_path / "folder").mkdir()
    (tmp_path / "to_folder").symlink_to(tmp_path / "folder")
    assert what_is_in_the_way(tmp_path / "to_folder" / "sub") is None  # a link to a folder is a folder
    with pytest.raises(NotADirectoryError, match=r"cannot write .*model\.pt: .*gone is a broken link"):
        with written_atomically(tmp_path / "gone" / "model.pt"):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "gone", "loop", "to_folder"]
