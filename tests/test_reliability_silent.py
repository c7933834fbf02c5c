"""Reliability: no silent wrong results (issue 18).

Paths that used to give silently wrong results or block a run forever, each checked end to end
on tiny data:

* ``duplicate_keys``: shards that share member names and image folders with ``x.jpg`` beside
  ``x.png``: every sample cached under its own key, never two samples trained against one record;
* ``missing_records``: a committed part whose records do not cover its shard (a part folder
  replaced by a link to another part): refused with one line naming the part, never a silent
  fall-back to online targets; an allowed fall-back is counted;
* ``stale_reuse``: ``tec run`` after the cache, the base model or a run setting changed trains
  anew and says what changed, never "reused finished run" for old results;
* ``deterministic_failures``: a failure a retry cannot change (a base model producing NaN) fails
  once, with a message saying what to change, not "rerun to resume";
* ``deep_damage``: damage that keeps the checksums right (non-finite values written by a broken
  writer) is found by ``tec cache verify --deep`` and ``tec cache repair`` recomputes exactly the
  damaged parts.

Plus YAML files with a key given twice and byte-reproducible WebDataset parts.
"""
from __future__ import annotations

import pytest

from test_reliability_common import (category, no_fsync,  # noqa: F401
                                     one_thread)


# ------------------------------------------------------------------------------ YAML
def test_yaml_key_given_twice_is_one_line_naming_the_key_and_both_lines(tmp_path):
    from pipeline.config import ConfigError, load_config

    path = tmp_path / "p.yaml"
    path.write_text("workdir: w\nruns:\n  - name: a\n    epochs: 1\n    blr: 0.1\n"
                    "    epochs: 2\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message
    assert "runs.0.epochs" in message and "lines 4 and 6" in message and "p.yaml" in message


def test_yaml_same_key_in_different_mappings_is_fine(tmp_path):
    from pipeline.config import check_duplicate_keys

    check_duplicate_keys("a:\n  x: 1\nb:\n  x: 2\nc: [{x: 1}, {x: 2}]\n")


# ------------------------------------------------------------------------------ WebDataset bytes
def test_webdataset_parts_are_byte_reproducible(tmp_path, monkeypatch, no_fsync, one_thread):
    """Two identical stage-1 runs (at other times) write byte-identical WebDataset parts."""
    import hashlib
    import time

    from test_reliability_common import (make_data, save_base_model, stage1_config,
                                         stage1_in_process)

    make_data(tmp_path / "shards", n_shards=1, per_shard=3)
    base = save_base_model(tmp_path / "base.safetensors")
    digests = []
    for run, clock in enumerate((1.0e9, 2.0e9)):
        monkeypatch.setattr(time, "time", lambda clock=clock: clock)
        cfg = stage1_config(tmp_path / "shards", tmp_path / f"cache{run}", backend="webdataset")
        stage1_in_process(cfg, base)
        parts = tmp_path / f"cache{run}" / "parts"
        digests.append({p.relative_to(parts).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                        for p in sorted(parts.rglob("*")) if p.is_file()})
    assert digests[0] and digests[0] == digests[1]
