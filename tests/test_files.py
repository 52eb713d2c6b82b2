"""litcompress._files: a file is replaced whole or not at all."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from litcompress._files import written_atomically


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
