"""storage.layout's atomic writers: the one way files are replaced atomically in the project."""
from __future__ import annotations

import json

import pytest

from storage import layout

pytestmark = pytest.mark.usefixtures("no_fsync")

OBJ = {"b": [1, 2], "a": {"z": None, "y": "x"}}


def test_dumps_json_styles_are_exact():
    assert layout.dumps_json(OBJ, "compact") == '{"b":[1,2],"a":{"z":null,"y":"x"}}\n'
    assert layout.dumps_json(OBJ, "sorted") == json.dumps(OBJ, indent=2, sort_keys=True) + "\n"
    assert layout.dumps_json(OBJ) == layout.dumps_readable(OBJ) + "\n"
    assert layout.dumps_json(OBJ).startswith('{"b": [1, 2]')  # short: one line, key order kept
    with pytest.raises(ValueError, match="JSON style 'pretty' is not one of readable"):
        layout.dumps_json(OBJ, "pretty")


def test_write_json_atomic_replaces_the_file_and_leaves_nothing_else(tmp_path):
    path = tmp_path / "sub" / "run.json"  # the folder is created
    layout.write_json_atomic(path, {"old": 1})
    layout.write_json_atomic(path, OBJ, style="sorted")
    assert path.read_text() == json.dumps(OBJ, indent=2, sort_keys=True) + "\n"
    assert [p.name for p in path.parent.iterdir()] == ["run.json"]


def test_atomic_file_error_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    path = tmp_path / "index.npz"
    layout.write_text_atomic(path, "old\n")
    with pytest.raises(RuntimeError, match="killed"):
        with layout.atomic_file(path, "wb") as f:
            f.write(b"half of the new")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["index.npz"]
    with layout.atomic_file(path, "wb") as f:
        f.write(b"new")
        assert path.read_bytes() == b"old\n"  # readers see the old file until the rename
    assert path.read_bytes() == b"new"
