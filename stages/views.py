"""Views: the view policy and the one pixel function shared by every stage.

A view is (crop box in source pixels, horizontal flip). View `v` of sample `key` is a pure
function of (policy.seed, key, v, source height, source width): the same on every machine, in
every process and on every run, so stage 1 never has to record how it drew a view and stage 2 can
both replay cached views and draw fresh ones (v >= K) from the same policy.

The crop box follows torchvision's `RandomResizedCrop.get_params` step for step (10 attempts of
area-scale and log-uniform aspect ratio, then a central crop clamped to the ratio range). Its
random numbers come from a counter-based stream over BLAKE2b of (seed, key, view) instead of a
global or numpy generator: hashing is identical on every platform and Python/numpy version, and
Python's salted `hash()` is never involved.

`render_view` (crop -> resize -> flip on uint8 pixels) is THE pixel function: stage 1 computes
the base model's targets on its output and stage 2 feeds the student the bit-identical pixels.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "INTERPOLATIONS",
    "ViewPolicyError",
    "ViewPolicy",
    "View",
    "view_params",
    "view_params_many",
    "random_resized_crop_params",
    "render_view",
    "render_views",
    "views_to_arrays",
    "views_from_arrays",
]

# Resize modes (torch.nn.functional.interpolate names; antialiased except 'nearest').
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")

# Keys of a manifest's 'view_policy' dict that belong to the cache, not to the policy itself.
_MANIFEST_ONLY_KEYS = frozenset({"views"})


class ViewPolicyError(ValueError):
    """A view policy or view that cannot be used (one-line message naming the field)."""


@dataclass
class ViewPolicy:
    """How views are drawn: RandomResizedCrop(scale, ratio, interpolation) + flip, seeded.

    seed: int, mixed with each sample key and view index.
    scale: (min, max) fraction of the source area covered by the crop, 0 < min <= max <= 1.
    ratio: (min, max) crop aspect ratio width/height, 0 < min <= max.
    flip_p: probability of a horizontal flip.
    interpolation: 'bicubic' | 'bilinear' | 'nearest' (resize of the crop to output_size).
    output_size: side S of the square view in pixels.
    """

    seed: int = 0
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    interpolation: str = "bicubic"
    output_size: int = 224

    def __post_init__(self) -> None:
        # JSON/YAML give lists; keep tuples so policies compare and hash predictably.
        if isinstance(self.scale, list):
            self.scale = tuple(self.scale)
        if isinstance(self.ratio, list):
            self.ratio = tuple(self.ratio)

    def validate(self) -> ViewPolicy:
        """Raise ViewPolicyError (one line, naming the field) if the policy is unusable."""
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise ViewPolicyError(f"view_policy.seed must be an integer, got {self.seed!r}")
        for name in ("scale", "ratio"):
            value = getattr(self, name)
            if (
                not isinstance(value, (tuple, list))
                or len(value) != 2
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value)
            ):
                raise ViewPolicyError(
                    f"view_policy.{name} must be two numbers [min, max], got {value!r}"
                )
            lo, hi = value
            if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi):
                raise ViewPolicyError(
                    f"view_policy.{name} must satisfy 0 < min <= max, got {list(value)}"
                )
        if self.scale[1] > 1:
            raise ViewPolicyError(
                f"view_policy.scale max must be <= 1 (fraction of the image), got {self.scale[1]}"
            )
        if not (isinstance(self.flip_p, (int, float)) and 0.0 <= self.flip_p <= 1.0):
            raise ViewPolicyError(f"view_policy.flip_p must be in [0, 1], got {self.flip_p!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ViewPolicyError(
                f"view_policy.interpolation must be one of {list(INTERPOLATIONS)}, "
                f"got {self.interpolation!r}"
            )
        if (
            isinstance(self.output_size, bool)
            or not isinstance(self.output_size, (int, np.integer))
            or self.output_size < 1
        ):
            raise ViewPolicyError(
                f"view_policy.output_size must be a positive integer, got {self.output_size!r}"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (lists, plain floats) as stored in a cache manifest's 'view_policy'."""
        return {
            "seed": int(self.seed),
            "scale": [float(x) for x in self.scale],
            "ratio": [float(x) for x in self.ratio],
            "flip_p": float(self.flip_p),
            "interpolation": str(self.interpolation),
            "output_size": int(self.output_size),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ViewPolicy:
        """Inverse of to_dict; tolerates a manifest's extra 'views' (K) key, rejects other unknown
        keys."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - _MANIFEST_ONLY_KEYS)
        if unknown:
            raise ViewPolicyError(
                f"unknown view_policy field(s) {unknown}; known fields are {sorted(known)}"
            )
        policy = cls(**{k: v for k, v in data.items() if k in known})
        return policy.validate()


@dataclass(frozen=True)
class View:
    """One view: crop box (top, left, height, width) in source pixels, then horizontal flip."""

    top: int
    left: int
    height: int
    width: int
    flip: bool

    @property
    def box(self) -> tuple[int, int, int, int]:
        return (self.top, self.left, self.height, self.width)

    def check_fits(self, height: int, width: int) -> None:
        """Raise ViewPolicyError if the crop box is not inside a height x width image."""
        if not (
            self.height >= 1
            and self.width >= 1
            and 0 <= self.top
            and 0 <= self.left
            and self.top + self.height <= height
            and self.left + self.width <= width
        ):
            raise ViewPolicyError(f"crop box {self.box} does not fit a {height}x{width} image")


class _HashStream:
    """Counter-based random stream: block n = BLAKE2b-256(key, n), four 64-bit words per block."""

    def __init__(self, *parts: Any) -> None:
        # JSON-like repr of the parts with explicit types/lengths: no ambiguity between
        # ('a_1', 2) and ('a', '1_2'), and no dependence on Python's salted hash().
        material = b"".join(_encode_part(p) for p in parts)
        self._key = hashlib.blake2b(material, digest_size=32, person=b"tec-views-v1").digest()
        self._counter = 0
        self._words: list[int] = []

    def next_u64(self) -> int:
        if not self._words:
            block = hashlib.blake2b(
                struct.pack("<Q", self._counter), digest_size=32, key=self._key
            ).digest()
            self._counter += 1
            self._words = list(struct.unpack("<4Q", block))[::-1]
        return self._words.pop()

    def uniform(self, low: float, high: float) -> float:
        """Float in [low, high) with 53 random bits."""
        u = (self.next_u64() >> 11) * (1.0 / (1 << 53))
        return low + (high - low) * u

    def integers(self, low: int, high: int) -> int:
        """Integer in [low, high) (modulo bias < 2**-32 for ranges below 2**32)."""
        if high <= low:
            raise ValueError(f"empty integer range [{low}, {high})")
        return low + self.next_u64() % (high - low)


def _encode_part(part: Any) -> bytes:
    if isinstance(part, bool) or not isinstance(part, (int, np.integer, str)):
        raise TypeError(f"view stream parts must be int or str, got {type(part).__name__}")
    if isinstance(part, str):
        raw = part.encode("utf-8")
        return b"s" + struct.pack("<Q", len(raw)) + raw
    raw = str(int(part)).encode("ascii")
    return b"i" + struct.pack("<Q", len(raw)) + raw


def random_resized_crop_params(
    height: int,
    width: int,
    scale: Sequence[float],
    ratio: Sequence[float],
    uniform: Callable[[float, float], float],
    randint: Callable[[int, int], int],
) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop.get_params with the random draws passed in.

    uniform(lo, hi) -> float in [lo, hi); randint(lo, hi) -> int in [lo, hi).
    Returns (top, left, crop_height, crop_width). The draw order is torchvision's, so feeding
    torch's own draws reproduces torchvision's boxes (see tests).
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * uniform(scale[0], scale[1])
        aspect_ratio = math.exp(uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = randint(0, height - h + 1)
            j = randint(0, width - w + 1)
            return i, j, h, w
    # Fallback: central crop, clamped to the ratio range.
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w = width
        h = height
    i = (height - h) // 2
    j = (width - w) // 2
    return i, j, h, w


def view_params(policy: ViewPolicy, key: str, view: int, height: int, width: int) -> View:
    """View `view` of sample `key` for a height x width source image (pure, deterministic).

    Crop draws and the flip draw use separate streams, so changing flip_p leaves crops unchanged
    and changing scale/ratio leaves flips unchanged.
    """
    if not isinstance(key, str):
        raise ViewPolicyError(f"sample key must be a str, got {type(key).__name__} {key!r}")
    if isinstance(view, bool) or not isinstance(view, (int, np.integer)) or view < 0:
        raise ViewPolicyError(
            f"view index must be a non-negative integer, got {view!r} (key {key!r})"
        )
    if height < 1 or width < 1:
        raise ViewPolicyError(f"source image of sample {key!r} has no pixels ({height}x{width})")
    seed, view = int(policy.seed), int(view)
    crop_stream = _HashStream(seed, key, view, "crop")
    top, left, h, w = random_resized_crop_params(
        int(height), int(width), policy.scale, policy.ratio, crop_stream.uniform,
        crop_stream.integers,
    )
    flip = _HashStream(seed, key, view, "flip").uniform(0.0, 1.0) < policy.flip_p
    return View(top=top, left=left, height=h, width=w, flip=bool(flip))


def view_params_many(
    policy: ViewPolicy, key: str, views: Sequence[int] | int, height: int, width: int
) -> list[View]:
    """[view_params(...) for v in views]; an int K means views 0..K-1."""
    indices = range(views) if isinstance(views, (int, np.integer)) else views
    return [view_params(policy, key, v, height, width) for v in indices]


def _as_chw_uint8(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ViewPolicyError(
                f"image must be uint8 [H,W,3], got {image.dtype} {list(image.shape)}"
            )
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
            raise ViewPolicyError(
                f"image tensor must be uint8 [3,H,W], got {image.dtype} {list(image.shape)}"
            )
        return image.cpu()
    raise ViewPolicyError(
        f"image must be a numpy array or torch tensor, got {type(image).__name__}"
    )


def _render_chw(
    chw: torch.Tensor, view: View, output_size: int, interpolation: str
) -> torch.Tensor:
    if interpolation not in INTERPOLATIONS:
        raise ViewPolicyError(
            f"interpolation must be one of {list(INTERPOLATIONS)}, got {interpolation!r}"
        )
    view.check_fits(chw.shape[1], chw.shape[2])
    crop = chw[:, view.top : view.top + view.height, view.left : view.left + view.width]
    if (view.height, view.width) == (output_size, output_size):
        out = crop  # torchvision's resize is the identity here too
    else:
        # torch's native uint8 kernel, exactly what torchvision.transforms.v2.functional.resize
        # runs for bicubic on CPU. Calling it directly keeps 'bilinear' identical on machines
        # without AVX2 too (torchvision switches bilinear to a float path there).
        out = F.interpolate(
            crop.unsqueeze(0).contiguous(),
            size=[output_size, output_size],
            mode=interpolation,
            align_corners=None if interpolation == "nearest" else False,
            antialias=interpolation != "nearest",
        )[0]
    if view.flip:
        out = out.flip(-1)
    return out.contiguous()


def render_view(
    image: np.ndarray | torch.Tensor,
    view: View,
    output_size: int,
    interpolation: str = "bicubic",
) -> torch.Tensor:
    """THE pixel function: crop `view` from `image`, resize to output_size (antialiased), flip.

    image: uint8 numpy [H, W, 3] or uint8 torch [3, H, W] (moved to CPU).
    Returns uint8 torch [3, S, S], S = output_size, computed on CPU so that stage 1, stage-2
    replay and the online fallback produce bit-identical pixels for the same view.
    """
    return _render_chw(_as_chw_uint8(image), view, int(output_size), interpolation)


def render_views(
    image: np.ndarray | torch.Tensor,
    views: Sequence[View],
    output_size: int,
    interpolation: str = "bicubic",
) -> torch.Tensor:
    """render_view for several views of one image: uint8 torch [K, 3, S, S]."""
    chw = _as_chw_uint8(image)
    if len(views) == 0:
        return torch.empty((0, 3, int(output_size), int(output_size)), dtype=torch.uint8)
    return torch.stack([_render_chw(chw, v, int(output_size), interpolation) for v in views])


def views_to_arrays(views: Sequence[View]) -> tuple[np.ndarray, np.ndarray]:
    """Views -> (crop int32 [K, 4] as (top, left, height, width), flip bool [K]) for the cache."""
    crop = np.array([v.box for v in views], dtype=np.int32).reshape(len(views), 4)
    flip = np.array([v.flip for v in views], dtype=bool)
    return crop, flip


def views_from_arrays(crop: np.ndarray, flip: np.ndarray) -> list[View]:
    """Inverse of views_to_arrays: crop [K, 4] (top, left, height, width), flip [K] -> views."""
    crop = np.asarray(crop).reshape(-1, 4)
    flip = np.asarray(flip).reshape(-1)
    if len(crop) != len(flip):
        raise ViewPolicyError(f"crop has {len(crop)} rows but flip has {len(flip)}")
    return [View(int(t), int(l), int(h), int(w), bool(f)) for (t, l, h, w), f in zip(crop, flip)]
