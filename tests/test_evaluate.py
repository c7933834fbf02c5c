"""Evaluation: k-NN, linear probe, feature extraction and attention-map pictures."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from stages.evaluate import (
    METRICS,
    EvalError,
    evaluate_model,
    extract_features,
    format_table,
    knn_classify,
    knn_predict,
    linear_probe,
    load_eval_images,
    split_holdout,
)
from stages.viz import PAD, TITLE_HEIGHT, attention_maps, colormap, save_attention_grid
from tec.targets import normalize_images


def tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48,
        depth=3, num_heads=3, num_classes=0,
    ).eval()


def random_images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)


def clusters(n_per_class: int, classes: int, dim: int, noise: float, seed: int):
    """Gaussian blobs around random unit centres: features [n, dim], labels [n]."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(classes, dim, generator=g), dim=1)
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    feats = centres[labels] + noise * torch.randn(labels.numel(), dim, generator=g)
    perm = torch.randperm(labels.numel(), generator=g)
    return feats[perm], labels[perm]


def brute_force_knn(train, train_labels, test, k, temperature, classes):
    """Reference: one test row at a time, plain Python loops over neighbours."""
    preds = []
    for row in test.tolist():
        sims = []
        for j, other in enumerate(train.tolist()):
            dot = sum(a * b for a, b in zip(row, other))
            norm = math.sqrt(sum(a * a for a in row)) * math.sqrt(sum(b * b for b in other))
            sims.append((dot / norm, j))
        sims.sort(key=lambda s: -s[0])
        votes = [0.0] * classes
        for sim, j in sims[:k]:
            votes[int(train_labels[j])] += math.exp(sim / temperature)
        preds.append(max(range(classes), key=lambda c: (votes[c], -c)))
    return torch.tensor(preds)


def test_knn_predictions_match_brute_force_loop_in_any_chunking():
    train, train_labels = clusters(12, 3, 8, noise=0.8, seed=1)
    test, _ = clusters(5, 3, 8, noise=0.8, seed=2)
    expected = brute_force_knn(train, train_labels, test, k=5, temperature=0.07, classes=3)
    for chunk in (1, 4, 1000):
        got = knn_predict(train, train_labels, test, k=5, temperature=0.07, chunk_size=chunk)
        assert torch.equal(got, expected)


def test_knn_small_temperature_does_not_overflow_on_near_parallel_features():
    # A large shared offset puts every cosine similarity near 1: exp(sim / 0.01) ~ exp(100)
    # overflows float32, and a naive vote becomes a tie of infinities won by class 0.
    train, train_labels = clusters(12, 3, 8, noise=0.3, seed=6)
    test, _ = clusters(6, 3, 8, noise=0.3, seed=7)
    offset = 20.0 * torch.ones(8)
    train, test = train + offset, test + offset
    expected = brute_force_knn(train, train_labels, test, k=7, temperature=0.01, classes=3)
    assert len(set(expected.tolist())) > 1  # the reference (float64 exp) does not collapse
    got = knn_predict(train, train_labels, test, k=7, temperature=0.01, chunk_size=5)
    assert torch.equal(got, expected)


def test_knn_separable_clusters_near_100_and_random_labels_near_chance():
    train, train_labels = clusters(100, 10, 32, noise=0.1, seed=3)
    test, test_labels = clusters(50, 10, 32, noise=0.1, seed=4)
    # Same centres for both splits: re-draw test around the train centres.
    g = torch.Generator().manual_seed(5)
    centres = torch.stack([train[train_labels == c].mean(0) for c in range(10)])
    test = centres[test_labels] + 0.1 * torch.randn(test.shape, generator=g)
    assert knn_classify(train, train_labels, test, test_labels, k=20) == pytest.approx(100.0)

    random_train = torch.randint(0, 10, train_labels.shape, generator=g)
    random_test = torch.randint(0, 10, test_labels.shape, generator=g)
    chance = knn_classify(train, random_train, test, random_test, k=20, num_classes=10)
    assert 2.0 < chance < 20.0


def test_knn_rejects_unlabelled_samples():
    feats = torch.randn(4, 3)
    with pytest.raises(EvalError, match="without labels"):
        knn_classify(feats, torch.tensor([0, 1, -1, 0]), feats, torch.tensor([0, 1, 1, 0]))


def test_linear_probe_learns_separable_problem_deterministically():
    g = torch.Generator().manual_seed(0)
    dim, classes = 24, 4
    w = torch.randn(dim, classes, generator=g)
    x = torch.randn(1200, dim, generator=g)
    y = (x @ w).argmax(1)
    # Badly scaled and offset channels: the probe's standardisation has to undo this.
    scale = torch.logspace(-2, 2, dim)
    feats = x * scale + 5.0
    train_x, train_y, test_x, test_y = feats[:1000], y[:1000], feats[1000:], y[1000:]
    acc = linear_probe(train_x, train_y, test_x, test_y, epochs=20, lr=3e-2, batch_size=250)
    assert acc > 90.0
    again = linear_probe(train_x, train_y, test_x, test_y, epochs=20, lr=3e-2, batch_size=250)
    assert again == acc


def test_split_holdout_is_a_deterministic_partition():
    fit, held = split_holdout(50, 0.2, seed=3)
    assert held.numel() == 10 and fit.numel() == 40
    assert torch.equal(torch.cat([fit, held]).sort().values, torch.arange(50))
    fit2, held2 = split_holdout(50, 0.2, seed=3)
    assert torch.equal(held, held2) and torch.equal(fit, fit2)
    assert not torch.equal(held, split_holdout(50, 0.2, seed=4)[1])
    with pytest.raises(EvalError):
        split_holdout(50, 1.0)


def test_extract_features_reads_cls_and_patch_mean_of_final_norm_output():
    model = tiny_vit()
    images, labels = random_images(5), torch.arange(5)
    feats = extract_features(model, images, labels, batch_size=2)
    assert feats["cls"].shape == (5, 48) and feats["mean"].shape == (5, 48)
    assert torch.equal(feats["labels"], labels)
    with torch.no_grad():
        tokens = model.forward_features(normalize_images(images))  # [5, 1 + 16, 48]
    torch.testing.assert_close(feats["cls"], tokens[:, 0])
    torch.testing.assert_close(feats["mean"], tokens[:, 1:].mean(1))

    loader = [(images[:3], labels[:3]), (images[3:], labels[3:])]
    from_loader = extract_features(model, loader)
    torch.testing.assert_close(from_loader["cls"], feats["cls"])
    assert torch.equal(from_loader["labels"], labels)
    assert torch.equal(extract_features(model, images)["labels"], torch.full((5,), -1))


def test_evaluate_model_reports_four_metrics_and_table_lists_them():
    model = tiny_vit()
    train_labels = torch.arange(24) % 3
    test_labels = torch.arange(9) % 3
    result = evaluate_model(
        model, random_images(24, 1), train_labels, random_images(9, 2), test_labels,
        batch_size=8, k=5, linear={"epochs": 3},
    )
    assert tuple(result) == METRICS
    assert all(0.0 <= v <= 100.0 for v in result.values())

    table = format_table([{"model": "base", **result}, {"model": "tec-new", "knn_cls": 12.5}])
    lines = table.splitlines()
    assert len(lines) == 4
    assert lines[0].split() == ["model", "kNN", "cls", "kNN", "mean", "linear", "cls",
                                "linear", "mean"]
    assert lines[2].startswith("base") and f"{result['linear_mean']:.2f}" in lines[2]
    assert lines[3].split() == ["tec-new", "12.50", "-", "-", "-"]


def test_attention_maps_match_unfused_attention_probabilities():
    model = tiny_vit()
    images = normalize_images(random_images(3))
    maps = attention_maps(model, images)
    assert maps.shape == (3, 16)

    attn = model.blocks[-1].attn
    attn.fused_attn = False
    captured = {}
    handle = attn.attn_drop.register_forward_hook(lambda m, i, o: captured.setdefault("p", o))
    with torch.no_grad():
        model.forward_features(images)
    handle.remove()
    probs = captured["p"]  # [B, heads, N, N] softmax probabilities
    expected = probs[:, :, 0, 1:].mean(1)
    torch.testing.assert_close(maps, expected, rtol=1e-5, atol=1e-6)
    # Row mass = what the cls query gives the patches (1 minus its self-attention).
    torch.testing.assert_close(maps.sum(1), 1 - probs[:, :, 0, 0].mean(1), rtol=1e-5, atol=1e-6)


def test_save_attention_grid_writes_png_of_expected_layout(tmp_path):
    images = random_images(2)
    maps = {
        "base": torch.rand(2, 16, generator=torch.Generator().manual_seed(0)),
        "new": torch.rand(2, 16, generator=torch.Generator().manual_seed(1)),
    }
    path = save_attention_grid(tmp_path / "fig" / "attn.png", images, maps, grid=(4, 4),
                               cell_size=64)
    with Image.open(path) as png:
        assert png.format == "PNG" and png.mode == "RGB"
        assert png.size == (3 * 64 + 4 * PAD, TITLE_HEIGHT + 2 * 64 + 3 * PAD)
        pixels = np.asarray(png)
    top = TITLE_HEIGHT + PAD
    base_cell = pixels[top:top + 64, PAD + 64 + PAD:PAD + 2 * 64 + PAD]
    new_cell = pixels[top:top + 64, PAD + 2 * (64 + PAD):PAD + 2 * (64 + PAD) + 64]
    assert not np.array_equal(base_cell, new_cell)  # each column shows its own map
    assert pixels[:TITLE_HEIGHT].min() < 128  # titles were drawn

    with pytest.raises(ValueError, match="grid"):
        save_attention_grid(tmp_path / "bad.png", images, {"x": torch.rand(2, 15)})


def test_colormap_runs_dark_to_bright():
    ends = colormap(np.array([0.0, 1.0]))
    assert ends.dtype == np.uint8 and ends.shape == (2, 3)
    assert ends[0].sum() < ends[1].sum()


def write_shard(path, samples):
    """A webdataset tar: samples = [(key, {ext: bytes})]."""
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for key, fields in samples:
            for ext, data in fields.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def png_bytes(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_load_eval_images_resizes_whole_images_and_skips_bad_samples(tmp_path):
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (28, 28), dtype=np.uint8)  # Fashion-MNIST-like
    wide = rng.integers(0, 256, (20, 40, 3), dtype=np.uint8)
    write_shard(tmp_path / "eval-000000.tar", [
        ("a", {"png": png_bytes(gray), "cls": b"3"}),
        ("b", {"png": b"not an image", "cls": b"1"}),
    ])
    write_shard(tmp_path / "eval-000001.tar", [("c", {"png": png_bytes(wide), "cls": b"7"})])

    images, labels = load_eval_images(str(tmp_path / "eval-{000000..000001}.tar"), 32)
    assert images.dtype == torch.uint8 and images.shape == (2, 3, 32, 32)
    assert labels.tolist() == [3, 7]
    expected = TF.resize(torch.from_numpy(wide).permute(2, 0, 1), [32, 32],
                         interpolation=InterpolationMode.BICUBIC, antialias=True)
    assert torch.equal(images[1], expected)
    assert torch.equal(images[0][0], images[0][2])  # grey expanded to three equal channels

    first, _ = load_eval_images(str(tmp_path), 16, limit=1)
    assert first.shape == (1, 3, 16, 16)


def test_benchmark_knn_grid_agrees_with_knn_classify_at_every_k_and_temperature():
    """benchmarks/quality.py scores a whole (k, T) grid from one neighbour search; every cell
    must equal stages.evaluate.knn_classify, also at T = 0.01 on near-parallel features."""
    import importlib.util
    import sys

    root = Path(__file__).resolve().parent.parent / "benchmarks"
    sys.path.insert(0, str(root))
    try:
        spec = importlib.util.spec_from_file_location("bench_quality", root / "quality.py")
        quality = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(quality)
    finally:
        sys.path.remove(str(root))
    train, train_labels = clusters(30, 4, 8, noise=0.6, seed=8)
    val, val_labels = clusters(10, 4, 8, noise=0.6, seed=9)
    train, val = train + 10.0, val + 10.0  # cosine similarities crowd near 1
    ks, temperatures = [1, 5, 20], [0.01, 0.07, 0.5]
    grid = quality.knn_grid(train, train_labels, val, val_labels, ks, temperatures, 4)
    for k in ks:
        for t in temperatures:
            expected = knn_classify(train, train_labels, val, val_labels, k=k, temperature=t,
                                    num_classes=4)
            assert grid[(k, t)] == pytest.approx(expected), (k, t)
