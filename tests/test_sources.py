"""Image sources and decoding (stages/sources.py)."""

from __future__ import annotations

import io
import logging
import pickle
import tarfile
import time

import numpy as np
import pytest
from image_helpers import (
    encode,
    make_bad_shard,
    make_shards,
    png_header_only,
    smooth_image,
    write_tar,
)
from PIL import Image

from stages.sources import (
    BadSample,
    ImageFolderSource,
    ShardSpecError,
    WebDatasetSource,
    decode_image,
    expand_shards,
    open_source,
)


def _outcome(sample) -> str | None:
    """None if the sample decodes, else its error / BadSample reason."""
    if sample.error is not None:
        return sample.error
    try:
        decode_image(sample.data)
    except BadSample as exc:
        return exc.reason
    return None


# ----------------------------------------------------------------------------- shard specs


def test_expand_shards_brace_glob_directory_list_and_double_colon(tmp_path):
    paths = make_shards(tmp_path, n_shards=3, per_shard=1, size_range=(8, 8))
    brace = str(tmp_path / "shard-{000000..000002}.tar")
    assert expand_shards(brace) == paths
    assert expand_shards(str(tmp_path / "shard-00000[02].tar")) == [paths[0], paths[2]]
    assert expand_shards(tmp_path) == paths
    assert expand_shards([paths[2], paths[0]]) == [paths[2], paths[0]]
    assert expand_shards(f"{paths[1]}::{paths[0]}::{paths[1]}") == [paths[1], paths[0]]


def test_expand_shards_names_the_pattern_that_matches_nothing(tmp_path):
    with pytest.raises(ShardSpecError, match="nothing-"):
        expand_shards(str(tmp_path / "nothing-*.tar"))
    with pytest.raises(ShardSpecError):
        expand_shards(str(tmp_path))  # a directory without tars
    make_shards(tmp_path, n_shards=2, per_shard=1, size_range=(8, 8))
    with pytest.raises(FileNotFoundError, match=r"1 shard\(s\).*shard-000002.tar") as info:
        expand_shards(str(tmp_path / "shard-{000000..000002}.tar"))
    assert isinstance(info.value, ValueError)  # callers catching either kind of user error see it


# ----------------------------------------------------------------------------- decoding


def test_decode_good_rgb_matches_pixels():
    rgb = smooth_image(np.random.default_rng(0), 20, 30)
    out = decode_image(encode(rgb, "PNG"))
    assert out.dtype == np.uint8 and out.shape == (20, 30, 3) and out.flags.c_contiguous
    assert np.array_equal(out, rgb)


def test_decode_converts_odd_modes_exactly():
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 256, (6, 7), dtype=np.uint8)
    out = decode_image(encode(gray, "PNG"))
    assert np.array_equal(out, np.repeat(gray[:, :, None], 3, axis=2))

    # 16-bit grayscale is scaled, not clipped: 65535 -> 255, 32768 -> 128, 257 -> 1.
    g16 = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    assert decode_image(encode(Image.fromarray(g16), "PNG"))[0, :, 0].tolist() == [0, 1, 128, 255]

    # Alpha is composited onto white.
    rgba = np.array([[[10, 20, 30, 255], [10, 20, 30, 0], [0, 0, 0, 128]]], dtype=np.uint8)
    out = decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert out[0].tolist() == [[10, 20, 30], [255, 255, 255], [127, 127, 127]]

    # Palette with a transparent index: that index becomes white.
    pal = Image.fromarray(np.array([[0, 1]], dtype=np.uint8), "P")
    pal.putpalette([200, 0, 0, 0, 200, 0] + [0] * 762)
    out = decode_image(encode(pal, "PNG", transparency=0))
    assert out[0].tolist() == [[255, 255, 255], [0, 200, 0]]

    # CMYK comes back as (lossy-JPEG-close) RGB.
    rgb = smooth_image(rng, 16, 16)
    out = decode_image(encode(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=98))
    assert out.shape == (16, 16, 3) and np.abs(out.astype(int) - rgb).mean() < 8


def test_decode_applies_exif_orientation():
    rgb = smooth_image(np.random.default_rng(2), 10, 20)
    img = Image.fromarray(rgb)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    out = decode_image(encode(img, "PNG", exif=exif.tobytes()))
    assert np.array_equal(out, np.rot90(rgb, k=-1))


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty data"),
        (b"definitely not an image" * 4, "not an image"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "not an image"),
        (png_header_only(20000, 20000), "too many pixels"),
    ],
)
def test_decode_rejects_bad_bytes_with_a_reason(data, reason):
    with pytest.raises(BadSample, match=reason):
        decode_image(data)


def test_decompression_bomb_guard_reads_only_the_header():
    bomb = png_header_only(5000, 5000)  # 25 Mpx claimed, 60-odd bytes of data
    start = time.perf_counter()
    with pytest.raises(BadSample, match="too many pixels: 5000x5000 > max_pixels 1000000"):
        decode_image(bomb, max_pixels=1_000_000)
    assert time.perf_counter() - start < 0.5
    small = encode(smooth_image(np.random.default_rng(3), 40, 40), "PNG")
    with pytest.raises(BadSample, match="too many pixels"):
        decode_image(small, max_pixels=1000)
    assert decode_image(small, max_pixels=1600).shape == (40, 40, 3)


def test_truncated_jpeg_is_rejected():
    jpeg = encode(smooth_image(np.random.default_rng(4), 64, 64), "JPEG")
    with pytest.raises(BadSample, match="corrupt image data"):
        decode_image(jpeg[: len(jpeg) * 2 // 3])


# ----------------------------------------------------------------------------- WebDataset


def test_generated_shards_read_back_with_labels_in_order(tmp_path):
    paths = make_shards(tmp_path, n_shards=2, per_shard=5, size_range=(20, 30), seed=3)
    source = WebDatasetSource(str(tmp_path / "shard-{000000..000001}.tar"))
    assert source.shards() == paths
    keys, labels = [], []
    for shard in source.shards():
        samples = list(source.samples(shard))
        assert len(samples) == source.count(shard) == 5
        for s in samples:
            assert s.error is None
            image = decode_image(s.data)
            assert 20 <= image.shape[0] <= 30 and 20 <= image.shape[1] <= 30
            keys.append(s.key)
            labels.append(s.label)
    assert keys == [f"s{s:03d}_{i:05d}" for s in range(2) for i in range(5)]
    assert labels == [i % 10 for i in range(10)]
    # Same seed, same bytes: keys and pixels are stable across runs.
    again = make_shards(tmp_path / "again", n_shards=2, per_shard=5, size_range=(20, 30), seed=3)
    assert [open(p, "rb").read() for p in again] == [open(p, "rb").read() for p in paths]


def test_bad_shard_every_kind_gets_the_expected_outcome(tmp_path, monkeypatch, caplog):
    def forbidden(*args, **kwargs):
        raise AssertionError("a pickle member was unpickled")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    path = tmp_path / "bad-000000.tar"
    expected = make_bad_shard(path)
    assert len(expected.bad) >= 8 and len(expected.good) >= 12
    source = WebDatasetSource(str(path))
    with caplog.at_level(logging.WARNING, logger="stages.sources"):
        samples = list(source.samples(str(path)))
    assert len(samples) == source.count(str(path))

    first = {}
    repeats = {}
    for s in samples:
        (repeats if s.key in first else first)[s.key] = s
    assert list(first) == list(expected)  # tar order, non-image keys skipped
    assert not set(expected.ignored) & set(first)
    for key, reason in expected.items():
        outcome = _outcome(first[key])
        if reason is None:
            assert outcome is None, (key, outcome)
            assert first[key].label == expected.labels[key], key
            assert decode_image(first[key].data).shape[:2] == expected.sizes[key], key
        else:
            assert outcome is not None and reason in outcome, (key, outcome)
    assert {k: _outcome(s) for k, s in repeats.items()}.keys() == expected.duplicates.keys()
    for key, reason in expected.duplicates.items():
        assert reason in repeats[key].error

    pickle_warnings = [r for r in caplog.records if "pickle" in r.getMessage()]
    assert len(pickle_warnings) == 1
    assert any("truncated tar shard" in r.getMessage() for r in caplog.records)


def _tar_bytes(members):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_tar_cut_inside_a_header_reports_the_sample_before_it(tmp_path):
    jpg = encode(smooth_image(np.random.default_rng(5), 16, 16), "JPEG")
    members = [("a.jpg", jpg), ("a.cls", b"1"), ("b.jpg", jpg), ("b.cls", b"2"), ("c.jpg", jpg)]
    data = _tar_bytes(members)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        headers = {m.name: m.offset for m in tar.getmembers()}
    path = tmp_path / "cut.tar"
    path.write_bytes(data)
    source = WebDatasetSource(str(path))
    # Cut in b.cls's header: b may have lost its label, so it is reported, not passed on.
    for cut_member in ("b.cls", "c.jpg"):
        path.write_bytes(data[: headers[cut_member] + 100])
        samples = list(source.samples(str(path)))
        assert [(s.key, s.label, s.error) for s in samples[:1]] == [("a", 1, None)]
        assert [s.key for s in samples] == ["a", "b"]
        assert "truncated tar shard" in samples[1].error and samples[1].data is None
        assert source.count(str(path)) == 2


def test_unreadable_shard_is_one_error_sample_not_an_exception(tmp_path):
    path = tmp_path / "junk.tar"
    path.write_bytes(b"this is not a tar archive at all" * 40)
    source = WebDatasetSource(str(path))
    samples = list(source.samples(str(path)))
    assert len(samples) == source.count(str(path)) == 1
    assert samples[0].data is None and "unreadable tar shard" in samples[0].error


def test_webdataset_keys_follow_the_first_dot_convention(tmp_path):
    jpg = encode(smooth_image(np.random.default_rng(6), 8, 8), "JPEG")
    path = tmp_path / "keys.tar"
    write_tar(path, [("dir/x.y.seg.png", jpg), ("dir/x.jpg", jpg), ("dir/x.cls", b" 7\n"),
                     ("z.JPG", jpg), ("noext", b"")])
    samples = list(WebDatasetSource(str(path)).samples(str(path)))
    # dir/x.y.seg.png has key 'dir/x' and field 'y.seg.png' (not an image field); same sample as
    # dir/x.jpg.
    assert [(s.key, s.label) for s in samples] == [("dir/x", 7), ("z", -1)]


# ----------------------------------------------------------------------------- image folders


def _write_image(path, seed, fmt="PNG", size=(12, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode(smooth_image(np.random.default_rng(seed), *size), fmt))


def test_image_folder_keys_labels_and_shards(tmp_path):
    root = tmp_path / "folder"
    for i, name in enumerate(["dog/b.png", "dog/a.jpg", "cat/z.png", "cat/sub/y.png",
                              "cat/notes.txt", "eel/x.webp"]):
        fmt = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP", "txt": None}[name.rsplit(".", 1)[1]]
        if fmt is None:
            (root / name).write_text("not an image")
        else:
            _write_image(root / name, i, fmt)
    source = open_source("imagefolder", root, shard_size=2)
    assert source.classes == ["cat", "dog", "eel"]
    assert source.shards() == ["imagefolder-00000", "imagefolder-00001", "imagefolder-00002"]
    got = [(s.key, s.label) for shard in source.shards() for s in source.samples(shard)]
    assert got == [("cat/sub/y", 0), ("cat/z", 0), ("dog/a", 1), ("dog/b", 1), ("eel/x", 2)]
    assert [source.count(s) for s in source.shards()] == [2, 2, 1]
    assert all(decode_image(s.data).shape == (12, 10, 3)
               for s in source.samples("imagefolder-00001"))
    with pytest.raises(ValueError, match="imagefolder-00009"):
        source.count("imagefolder-00009")


def test_flat_image_folder_has_unknown_labels(tmp_path):
    for i in range(3):
        _write_image(tmp_path / f"img{i}.png", i)
    source = ImageFolderSource(tmp_path)
    assert [(s.key, s.label) for s in source.samples(source.shards()[0])] == [
        ("img0", -1), ("img1", -1), ("img2", -1)]


def test_open_source_dispatches_and_rejects_unknown_kinds(tmp_path):
    paths = make_shards(tmp_path, n_shards=1, per_shard=2, size_range=(8, 8))
    assert isinstance(open_source("webdataset", paths[0]), WebDatasetSource)
    with pytest.raises(ValueError, match="'lmdb'"):
        open_source("lmdb", tmp_path)
    with pytest.raises(FileNotFoundError):
        ImageFolderSource(tmp_path / "missing")


def test_any_cut_point_gives_consistent_counts_and_never_raises(tmp_path):
    path = tmp_path / "bad.tar"
    make_bad_shard(path)
    data = path.read_bytes()
    cut_path = tmp_path / "cut.tar"
    source = WebDatasetSource(str(path))
    previous_good = 0
    for cut in list(range(0, len(data), 211)) + [len(data) - 1]:
        cut_path.write_bytes(data[:cut])
        samples = list(source.samples(str(cut_path)))
        assert len(samples) == source.count(str(cut_path)), cut
        good = sum(s.error is None for s in samples)
        assert good >= previous_good  # a longer prefix never yields fewer readable samples
        previous_good = good
        if 0 < cut < len(data) - 1024 and samples:
            assert samples[-1].error is not None, cut  # the damage is always reported
