"""Fashion-MNIST IDX -> WebDataset shards (stages/datasets.py)."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from stages.datasets import FASHION_MNIST_DIR, IdxError, fashion_mnist_to_shards, read_idx
from stages.sources import WebDatasetSource, decode_image, expand_shards


def _write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    header = (struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
              + struct.pack(f">{array.ndim}I", *array.shape))
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def _fake_fashion_mnist(root: Path, n_train: int = 25, n_test: int = 7) -> dict:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    data = {}
    for split, prefix, n, gz in (("train", "train", n_train, True),
                                 ("test", "t10k", n_test, False)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        _write_idx(root / f"{prefix}-images-idx3-ubyte", images, gz)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte", labels, gz)
        data[split] = (images, labels)
    return data


def _read_split(pattern: str):
    source = WebDatasetSource(pattern)
    samples = [s for shard in source.shards() for s in source.samples(shard)]
    assert all(s.error is None for s in samples)
    return source, samples


def test_idx_files_become_png_and_cls_shards(tmp_path):
    data = _fake_fashion_mnist(tmp_path / "idx")
    patterns = fashion_mnist_to_shards(tmp_path / "idx", tmp_path / "out", shard_size=10)
    assert patterns == [str(tmp_path / "out" / "train-{000000..000002}.tar"),
                        str(tmp_path / "out" / "test-000000.tar")]
    assert len(expand_shards(patterns[0])) == 3
    for pattern, split in zip(patterns, ("train", "test")):
        images, labels = data[split]
        source, samples = _read_split(pattern)
        assert [s.key for s in samples] == [f"{split}_{i:06d}" for i in range(len(images))]
        assert [s.label for s in samples] == labels.tolist()
        for s, image in zip(samples, images):
            assert s.data[:8] == b"\x89PNG\r\n\x1a\n"
            pixels = decode_image(s.data)
            assert pixels.shape == (28, 28, 3) and np.array_equal(pixels[:, :, 0], image)
        assert [source.count(shard) for shard in source.shards()] == (
            [10, 10, 5] if split == "train" else [7]
        )
    assert not [p for p in os.listdir(tmp_path / "out") if p.startswith(".")]  # no temp files left


def test_rerun_skips_complete_shards_and_rewrites_broken_ones(tmp_path):
    _fake_fashion_mnist(tmp_path / "idx")
    out = tmp_path / "out"
    fashion_mnist_to_shards(tmp_path / "idx", out, shard_size=10, splits=("train",))
    first, second = out / "train-000000.tar", out / "train-000001.tar"
    content = second.read_bytes()
    os.utime(first, (1, 1))
    second.write_bytes(content[: len(content) // 2])  # a damaged shard
    fashion_mnist_to_shards(tmp_path / "idx", out, shard_size=10, splits=("train",))
    assert first.stat().st_mtime == 1  # untouched
    assert second.read_bytes() == content  # rewritten, byte-identical (reproducible shards)


def test_limit_takes_the_first_samples_of_each_split(tmp_path):
    data = _fake_fashion_mnist(tmp_path / "idx")
    patterns = fashion_mnist_to_shards(tmp_path / "idx", tmp_path / "out", shard_size=4, limit=6)
    _, samples = _read_split(patterns[0])
    assert [s.label for s in samples] == data["train"][1][:6].tolist()
    _, samples = _read_split(patterns[1])
    assert len(samples) == 6


def test_missing_idx_files_say_how_to_install_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as info:
        fashion_mnist_to_shards(tmp_path / "nowhere", tmp_path / "out")
    assert "\n" not in str(info.value) and "train-images-idx3-ubyte" in str(info.value)


def test_corrupt_idx_file_is_a_one_line_error(tmp_path):
    bad = tmp_path / "train-images-idx3-ubyte"
    bad.write_bytes(b"\x00\x00\x08\x03" + struct.pack(">3I", 10, 28, 28) + b"\x00" * 100)
    with pytest.raises(IdxError, match="train-images-idx3-ubyte holds 100 data bytes"):
        read_idx(bad)
    bad.write_bytes(b"GIF89a....")
    with pytest.raises(IdxError, match="not an IDX file"):
        read_idx(bad)


@pytest.mark.skipif(not Path(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz").exists()
                    and not Path(FASHION_MNIST_DIR, "train-images-idx3-ubyte").exists(),
                    reason="dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_converts(tmp_path):
    patterns = fashion_mnist_to_shards(None, tmp_path, shard_size=50, limit=120)
    assert len(expand_shards(patterns[0])) == 3 and len(expand_shards(patterns[1])) == 3
    images = read_idx(next(Path(FASHION_MNIST_DIR).glob("train-images-idx3-ubyte*")))
    assert images.shape == (60000, 28, 28)
    _, samples = _read_split(patterns[0])
    assert len(samples) == 120 and {s.label for s in samples} <= set(range(10))
    assert len({s.label for s in samples}) == 10
    assert np.array_equal(decode_image(samples[7].data)[:, :, 0], images[7])
