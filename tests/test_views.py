"""The view policy and the pixel function (stages/views.py)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from stages.views import (
    View,
    ViewPolicy,
    ViewPolicyError,
    random_resized_crop_params,
    render_view,
    render_views,
    view_params,
    view_params_many,
    views_from_arrays,
    views_to_arrays,
)

REPO = Path(__file__).resolve().parents[1]

# Computed in this process and in a fresh one (different PYTHONHASHSEED): views and pixel hashes.
_FINGERPRINT_SCRIPT = r"""
import hashlib, json
import numpy as np
from stages.views import ViewPolicy, view_params, render_view
policy = ViewPolicy(seed=1234)
rng = np.random.default_rng(7)
views, digest = [], hashlib.sha256()
for n in range(12):
    h, w = (int(x) for x in rng.integers(16, 300, size=2))
    image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    for v in range(3):
        view = view_params(policy, f"sample/{n}.jpg", v, h, w)
        views.append([view.top, view.left, view.height, view.width, view.flip])
        for interp in ("bicubic", "bilinear"):
            digest.update(render_view(image, view, 32, interp).numpy().tobytes())
print(json.dumps({"views": views, "pixels": digest.hexdigest()}))
"""


def _fingerprint_here() -> dict:
    scope: dict = {}
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(_FINGERPRINT_SCRIPT, scope)
    return json.loads(buf.getvalue())


def test_policy_round_trips_through_json_and_tolerates_manifest_views_key():
    policy = ViewPolicy(seed=5, scale=(0.3, 0.9), flip_p=0.25, output_size=32).validate()
    data = json.loads(json.dumps(policy.to_dict()))
    assert ViewPolicy.from_dict(data) == policy
    assert ViewPolicy.from_dict({**data, "views": 4}) == policy
    assert data["scale"] == [0.3, 0.9] and isinstance(data["seed"], int)


@pytest.mark.parametrize(
    "field, value",
    [
        ("seed", 1.5),
        ("scale", (0.0, 1.0)),
        ("scale", (0.5, 0.2)),
        ("scale", (0.2, 1.5)),
        ("ratio", (2.0, 1.0)),
        ("ratio", (1.0,)),
        ("flip_p", 1.5),
        ("interpolation", "lanczos"),
        ("output_size", 0),
    ],
)
def test_invalid_policy_field_gives_one_line_error_naming_it(field, value):
    with pytest.raises(ViewPolicyError) as info:
        ViewPolicy(**{field: value}).validate()
    message = str(info.value)
    assert field in message and "\n" not in message


def test_unknown_policy_key_is_rejected():
    with pytest.raises(ViewPolicyError, match="scal"):
        ViewPolicy.from_dict({"seed": 0, "scal": [0.2, 1.0]})


def test_view_params_is_a_pure_function_of_seed_key_view_and_size():
    policy = ViewPolicy(seed=3)
    a = view_params(policy, "n01440764/img_1", 2, 375, 500)
    assert a == view_params(policy, "n01440764/img_1", 2, 375, 500)
    draws = {view_params(policy, "n01440764/img_1", v, 375, 500) for v in range(8)}
    assert len(draws) == 8  # views differ
    assert view_params(ViewPolicy(seed=4), "n01440764/img_1", 2, 375, 500) != a
    assert view_params(policy, "n01440764/img_2", 2, 375, 500) != a
    # Flip and crop use separate streams: flip_p does not move the crop.
    b = view_params(ViewPolicy(seed=3, flip_p=1.0), "n01440764/img_1", 2, 375, 500)
    assert b.box == a.box and b.flip


def test_views_and_pixels_are_identical_in_a_fresh_process():
    # Another hash seed, one thread and torch's portable (non-SIMD) CPU kernels stand in for
    # "another machine": the views and the rendered pixels must not change.
    env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=str(REPO),
               ATEN_CPU_CAPABILITY="default", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-c", _FINGERPRINT_SCRIPT], capture_output=True, text=True, env=env,
        cwd=REPO, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == _fingerprint_here()


def test_view_distribution_respects_scale_ratio_and_flip_probability():
    policy = ViewPolicy(seed=0)
    height, width = 300, 400
    views = [view_params(policy, f"k{i}", i % 4, height, width) for i in range(2000)]
    areas, ratios = [], []
    for v in views:
        assert 0 <= v.top and v.top + v.height <= height
        assert 0 <= v.left and v.left + v.width <= width
        areas.append(v.height * v.width / (height * width))
        ratios.append(v.width / v.height)
    areas, ratios = np.array(areas), np.array(ratios)
    # Rounding of w and h moves area and ratio slightly past the nominal ranges.
    assert areas.min() >= 0.2 * 0.97 and areas.max() <= 1.0
    assert ratios.min() >= 0.75 * 0.98 and ratios.max() <= 4 / 3 * 1.02
    # Same distribution as torchvision's own sampler (large crops that do not fit are redrawn).
    torch.manual_seed(0)
    dummy = torch.empty((3, height, width))
    reference = [RandomResizedCrop.get_params(dummy, [0.2, 1.0], [3 / 4, 4 / 3])
                 for _ in range(2000)]
    reference_areas = np.array([h * w / (height * width) for _, _, h, w in reference])
    assert abs(areas.mean() - reference_areas.mean()) < 0.02
    reference_ratios = np.array([w / h for _, _, h, w in reference])
    assert abs(np.median(ratios) - np.median(reference_ratios)) < 0.03
    assert abs(np.mean([v.flip for v in views]) - 0.5) < 0.05
    # Tops and lefts spread over the whole admissible range.
    assert min(v.top for v in views) == 0 and max(v.top + v.height for v in views) == height


def test_flip_probability_extremes():
    for flip_p, expected in ((0.0, False), (1.0, True)):
        policy = ViewPolicy(seed=1, flip_p=flip_p)
        assert all(view_params(policy, f"k{i}", 0, 50, 60).flip is expected for i in range(50))


class _TorchDraws:
    """torch's own random draws, in torchvision's order and precision."""

    def uniform(self, lo: float, hi: float) -> float:
        lo, hi = (float(torch.tensor(x, dtype=torch.float32)) for x in (lo, hi))
        return torch.empty(1).uniform_(lo, hi).item()

    def randint(self, lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi, size=(1,)).item())


def test_crop_algorithm_matches_torchvision_get_params_on_the_same_draws():
    rng = np.random.default_rng(0)
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    draws = _TorchDraws()
    for n in range(300):
        h, w = (int(x) for x in rng.integers(1, 120, size=2))
        dummy = torch.empty((3, h, w), dtype=torch.uint8)
        torch.manual_seed(n)
        expected = RandomResizedCrop.get_params(dummy, list(scale), list(ratio))
        torch.manual_seed(n)
        got = random_resized_crop_params(h, w, scale, ratio, draws.uniform, draws.randint)
        assert got == tuple(expected), (h, w)


@pytest.mark.parametrize("height, width", [(1000, 10), (10, 1000), (5, 5)])
def test_fallback_central_crop_matches_torchvision(height, width):
    # A 1000x10 image can never fit a crop of scale >= 0.9 at ratio 3/4..4/3: the central
    # fallback clamps to the ratio range. 5x5 with scale (1.1, 1.2) falls back to the whole image.
    scale = (1.1, 1.2) if height == width else (0.9, 1.0)
    ratio = (3 / 4, 4 / 3)
    expected = RandomResizedCrop.get_params(torch.empty((3, height, width)), list(scale),
                                            list(ratio))
    # (ViewPolicy.validate rejects scale > 1; view_params itself does not need it.)
    view = view_params(ViewPolicy(seed=0, scale=scale, ratio=ratio), "tall", 0, height, width)
    assert view.box == tuple(expected)


def _random_image(seed: int, height: int, width: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def test_render_view_shape_dtype_and_bit_determinism():
    image = _random_image(0, 90, 120)
    view = view_params(ViewPolicy(seed=2), "x", 0, 90, 120)
    out = render_view(image, view, 48)
    assert out.dtype == torch.uint8 and out.shape == (3, 48, 48) and out.is_contiguous()
    assert torch.equal(out, render_view(image.copy(), view, 48))
    # numpy HWC and torch CHW inputs give the same pixels; non-contiguous input is fine.
    chw = torch.from_numpy(image).permute(2, 0, 1)
    assert torch.equal(out, render_view(chw, view, 48))
    assert torch.equal(out, render_view(np.asfortranarray(image), view, 48))


@pytest.mark.parametrize(
    "interpolation, mode",
    [("bicubic", InterpolationMode.BICUBIC), ("bilinear", InterpolationMode.BILINEAR),
     ("nearest", InterpolationMode.NEAREST)],
)
def test_render_view_equals_torchvision_resized_crop_and_flip(interpolation, mode):
    policy = ViewPolicy(seed=9)
    for n in range(25):
        h, w = 8 + 13 * n, 300 - 11 * n
        image = _random_image(n, h, w)
        view = view_params(policy, f"img{n}", n % 3, h, w)
        expected = TF.resized_crop(
            torch.from_numpy(image).permute(2, 0, 1), view.top, view.left, view.height, view.width,
            [40, 40], interpolation=mode, antialias=True,
        )
        if view.flip:
            expected = TF.horizontal_flip(expected)
        assert torch.equal(render_view(image, view, 40, interpolation), expected), (n, view)


def test_render_view_flip_mirrors_columns_and_identity_crop_copies_pixels():
    image = _random_image(1, 32, 32)
    whole = View(0, 0, 32, 32, False)
    assert np.array_equal(render_view(image, whole, 32).permute(1, 2, 0).numpy(), image)
    flipped = render_view(image, View(0, 0, 32, 32, True), 32)
    assert np.array_equal(flipped.permute(1, 2, 0).numpy(), image[:, ::-1])


def test_render_views_stacks_views():
    image = _random_image(2, 64, 80)
    views = view_params_many(ViewPolicy(seed=0), "k", 4, 64, 80)
    out = render_views(image, views, 24)
    assert out.shape == (4, 3, 24, 24) and out.dtype == torch.uint8
    for k, v in enumerate(views):
        assert torch.equal(out[k], render_view(image, v, 24))


def test_render_view_rejects_boxes_outside_the_image_and_bad_dtypes():
    image = _random_image(3, 20, 20)
    with pytest.raises(ViewPolicyError, match="does not fit"):
        render_view(image, View(10, 0, 11, 5, False), 8)
    with pytest.raises(ViewPolicyError, match="uint8"):
        render_view(image.astype(np.float32), View(0, 0, 5, 5, False), 8)


def test_views_round_trip_through_cache_arrays():
    views = view_params_many(ViewPolicy(seed=0), "k", 5, 100, 70)
    crop, flip = views_to_arrays(views)
    assert crop.shape == (5, 4) and flip.shape == (5,) and flip.dtype == bool
    assert views_from_arrays(crop, flip) == views
