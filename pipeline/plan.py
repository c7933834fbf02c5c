"""``tec plan``: cache size and compute of both stages, before anything runs.

FLOPs are counted analytically for a ViT (a multiply-add is 2 FLOPs): per block and image with N
tokens of width D and MLP ratio r, ``(8 + 4r)·N·D² + 4·N²·D``; the patch embedding adds
``2·L·(3·p²)·D``. The new model adds its encoder adapter, decoder streams, heads and attention
logits (:func:`new_model_forward_flops`); both agree with torch's FLOP counter within 1%.
Training costs about 3x a forward pass (forward + backward). Measured throughput is added when
the speed results file given to :func:`make_plan` (``tec plan --speed-results``, default
``benchmarks/results/speed.json``) holds a run on the same architecture.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from stages.configs import ConfigError
from storage.util import first_line, format_bytes

from .config import PipelineConfig

log = logging.getLogger(__name__)

def vit_forward_flops(*, tokens: int, width: int, depth: int, mlp_ratio: float = 4.0) -> float:
    """FLOPs of ``depth`` transformer blocks on one image of ``tokens`` tokens."""
    per_block = (8 + 4 * mlp_ratio) * tokens * width**2 + 4 * tokens**2 * width
    return depth * per_block


def new_model_forward_flops(m) -> float:
    """FLOPs of one image through the new model (``tec.model.NewModelConfig`` ``m``) in training:
    patch embedding of all L patches, encoder on cls + visible patches, encoder adapter, every
    decoder stream (input projection, shared trunk on 1 + L tokens, head) and the attention
    logits of the k + 1 query rows. Only matmuls count (norms, activations, losses are small).
    """
    L, D, Dd = m.num_patches, m.embed_dim, m.decoder_embed_dim
    n_enc = int(L * (1 - m.mask_ratio)) + 1  # cls + visible patches (as random_masking keeps)
    n_dec = L + 1
    flops = 2 * L * (m.in_chans * m.patch_size**2) * D
    flops += vit_forward_flops(tokens=n_enc, width=D, depth=m.depth, mlp_ratio=m.mlp_ratio)
    if m.use_encoder_adapter:
        groups = m.depth // m.adapter_group
        flops += groups * (2 * n_enc * m.adapter_group * D * D + 2 * 2 * n_enc * D * 4 * Dd)
    if m.target == "pixel":
        heads = [m.patch_size**2 * m.in_chans]
    else:
        heads = [m.base_embed_dim] + ([2 * m.attn_dim] if m.use_attention else [])
    for out in heads:
        flops += 2 * n_enc * D * Dd  # stream input projection
        flops += vit_forward_flops(tokens=n_dec, width=Dd, depth=m.decoder_depth,
                                   mlp_ratio=m.mlp_ratio)
        flops += 2 * n_dec * Dd * out  # head
    if m.target == "tec" and m.use_attention:
        flops += 2 * (m.k + 1) * n_dec * m.attn_dim  # q of the k + 1 rows against every key
    return float(flops)


def _geometry(timm_kwargs: dict, arch: str) -> dict:
    """img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio of a timm ViT config."""
    import timm

    if not timm.is_model(arch):
        raise ConfigError(f"base_model.arch: unknown timm architecture {arch!r}")
    try:
        with _meta_device():
            model = timm.create_model(arch, num_classes=0, pretrained=False, **timm_kwargs)
    except (TypeError, AssertionError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"base_model.timm_kwargs: cannot create {arch} with {timm_kwargs}: "
                          f"{first_line(exc)}") from None
    from stages.resolve import BaseGeometry

    geometry = dataclasses.asdict(BaseGeometry.of_model(model))  # the base model's shape
    return {**geometry, "mlp_ratio": model.blocks[0].mlp.fc1.out_features / model.embed_dim}


class _meta_device:
    """Build models on the meta device: shapes only, no memory, instant even for ViT-L."""

    def __enter__(self):
        import torch

        self._ctx = torch.device("meta")
        self._ctx.__enter__()

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def bytes_per_view(*, num_patches: int, channels: int, heads: int, k_max: int,
                   codec: str, codec_params: dict | None = None) -> dict:
    """Stored bytes of one (sample, view) record before compression, and the raw tensor bytes.

    Raw = the float32 tensors a record stands for (features, mean, std, attention logits, index).
    lowrank: the layout of storage/compact.py with ``codec_params`` (defaults filled in).
    """
    L, C, H, R = num_patches, channels, heads, k_max + 1
    raw = 4 * (L * C + 2 * C + H * R * L) + 8 * k_max
    view_record = 4 * 4 + 1 + 2 * 4 + 4  # crop box, flip, source size, label
    if codec == "float16":
        stored = 2 * L * C + 2 * 4 * C + 2 * H * R * L + 2 * k_max + view_record
    elif codec == "int8":
        # int8 values with one float32 scale per feature row (patch) and per attention row
        stored = (L * C + 4 * L) + 2 * 4 * C + (H * R * L + 4 * H * R) + 2 * k_max + view_record
    elif codec == "lowrank":
        from storage import CacheError, CacheSpec, record_nbytes

        try:
            spec = CacheSpec(num_patches=L, channels=C, heads=H, k_max=k_max, views=1,
                             codec=codec, codec_params=codec_params or None)
        except CacheError as exc:
            raise ConfigError(f"targets.{exc}") from None
        stored = record_nbytes(spec) + 2 * 4 + 4  # + source size, label
    else:
        raise ConfigError(f"targets.codec: unknown codec {codec!r}; use float16, int8 or lowrank")
    return {"stored": stored, "raw": raw}


@dataclass
class Plan:
    samples: int
    samples_known: str
    views: int
    codec: str
    bytes_per_view: int
    raw_bytes_per_view: int
    base: dict
    stage1_flops: float
    runs: list[dict] = field(default_factory=list)
    measured: dict | None = None
    codecs: dict = field(default_factory=dict)  # codec -> stored bytes per view at this geometry
    pixels: str = "none"  # targets.pixels
    pixels_quality: int = 90
    pixel_bytes_per_view: int = 0  # estimate (storage.pixels.estimated_bytes); 0 for none

    @property
    def cache_bytes(self) -> float:
        return self.samples * self.views * self.bytes_per_view

    def format(self) -> str:
        b = self.base
        lines = [
            f"samples          {self.samples:,} ({self.samples_known})",
            f"views (K)        {self.views}  -> {self.samples * self.views:,} cached views",
            f"base model       {b['arch']}: {b['img_size']} px, patch {b['patch_size']}, "
            f"width {b['embed_dim']}, depth {b['depth']}, heads {b['num_heads']}",
            f"bytes per view   {self.bytes_per_view:,} ({self.codec}, before lossless "
            f"compression; {self.bytes_per_view / self.raw_bytes_per_view:.2f} of the float32 "
            f"tensors)",
            f"cache size       {format_bytes(self.cache_bytes, si=True)} (tensor bytes: "
            f"lossless compression shrinks it, file framing adds about 1-3%)",
            *(f"  codec {name:<8} {n:,} B per view ({n / 1024:.1f} KiB), "
              f"{format_bytes(self.samples * self.views * n, si=True)} in all"
              + ("  <- targets.codec" if name == self.codec else "")
              for name, n in self.codecs.items()),
            self._pixels_line(),
            f"stage 1 compute  {self.stage1_flops / 1e15:,.2f} PFLOP "
            f"(base-model forward over every view)",
        ]
        for run in self.runs:
            lines.append(
                f"stage 2 run {run['name']!r}: {run['epochs']} epochs, "
                f"{run['flops_cached'] / 1e15:,.2f} PFLOP from the cache vs "
                f"{run['flops_online'] / 1e15:,.2f} PFLOP fully online "
                f"(online_fraction {run['online_fraction']}: "
                f"{run['flops_planned'] / 1e15:,.2f} PFLOP)")
        if self.measured:
            m = self.measured
            lines.append(f"measured         {m['text']}")
        else:
            lines.append("measured         no recorded throughput for this setup "
                         "(run benchmarks/speed.py)")
        return "\n".join(lines)


    def _pixels_line(self) -> str:
        from storage.pixels import estimated_bytes

        if self.pixels == "none":
            jpeg = estimated_bytes("jpeg", 90, self.base["img_size"])
            return (f"view pixels      none: stage 2 reads the source images (targets.pixels: jpeg "
                    f"makes the cache self-contained for ~{jpeg:,} B more per view at quality 90)")
        what = f"jpeg quality {self.pixels_quality}" if self.pixels == "jpeg" else "png"
        n = self.pixel_bytes_per_view
        return (f"view pixels      {what}: ~{n:,} B per view more (measured on real photos), "
                f"{format_bytes(self.samples * self.views * n, si=True)} in all; "
                "the cache is self-contained")


FASHION_MNIST_TRAIN = 60000


def _shards_exist(pattern: str) -> bool:
    from stages.sources import expand_shards

    try:
        return bool(expand_shards(pattern))
    except ValueError:
        return False


def count_samples(cfg: PipelineConfig) -> tuple[int, str]:
    """Sample count: data.num_samples when given, else counted from the shards' headers."""
    if cfg.data.num_samples is not None:
        return cfg.data.num_samples, "data.num_samples"
    from stages.sources import open_source

    if cfg.data.prepare == "fashion-mnist" and not _shards_exist(cfg.data.train):
        n = min(FASHION_MNIST_TRAIN, cfg.data.train_limit or FASHION_MNIST_TRAIN)
        return n, "Fashion-MNIST training set, not prepared yet"
    src = cfg.targets.source
    kwargs = {"shard_size": src.shard_size} if src.kind == "imagefolder" else {}
    try:
        source = open_source(src.kind, src.path, **kwargs)
        shards = source.shards()
    except (ValueError, OSError) as exc:
        raise ConfigError(  # noqa: B904 (the source error stays the context, as before)
            f"data.train: {exc} (set data.num_samples to plan without the data)")
    return sum(source.count(s) for s in shards), f"counted in {len(shards)} shards"


def make_plan(cfg: PipelineConfig, speed_results: Path | None = None) -> Plan:
    t = cfg.targets
    base = {"arch": cfg.base_model.arch, **_geometry(cfg.base_model.timm_kwargs,
                                                     cfg.base_model.arch)}
    grid = base["img_size"] // base["patch_size"]
    L = grid * grid
    geometry = dict(num_patches=L, channels=base["embed_dim"], heads=base["num_heads"],
                    k_max=t.k_max)
    sizes = bytes_per_view(**geometry, codec=t.codec, codec_params=t.codec_params)
    # every codec at this geometry (lowrank with the configured parameters, else its defaults)
    codecs = {}
    for c in ("float16", "int8", "lowrank"):
        try:
            codecs[c] = bytes_per_view(**geometry, codec=c, codec_params=t.codec_params
                                       if c == t.codec else None)["stored"]
        except ConfigError:  # lowrank needs L, C >= 8: not available at this geometry
            continue
    samples, known = count_samples(cfg)
    base_fwd = vit_forward_flops(tokens=L + 1, width=base["embed_dim"], depth=base["depth"],
                                 mlp_ratio=base["mlp_ratio"])
    base_fwd += 2 * L * 3 * base["patch_size"] ** 2 * base["embed_dim"]
    plan = Plan(samples=samples, samples_known=known, views=t.views, codec=t.codec,
                bytes_per_view=sizes["stored"], raw_bytes_per_view=sizes["raw"], base=base,
                stage1_flops=samples * t.views * base_fwd, codecs=codecs)
    from storage.pixels import estimated_bytes

    plan.pixels, plan.pixels_quality = t.pixels, t.pixels_quality
    plan.pixel_bytes_per_view = estimated_bytes(t.pixels, t.pixels_quality, base["img_size"])
    from stages.resolve import BaseGeometry, build_model_config

    geo = BaseGeometry(**{k: v for k, v in base.items() if k not in ("arch", "mlp_ratio")})
    for run in cfg.runs:
        m = build_model_config(run.model, geo)
        student = 3 * new_model_forward_flops(m)  # forward + backward
        per_epoch = samples * student
        online = samples * (student + base_fwd)
        plan.runs.append({
            "name": run.name, "epochs": run.epochs, "online_fraction": run.online_fraction,
            "flops_cached": run.epochs * per_epoch, "flops_online": run.epochs * online,
            "flops_planned": run.epochs * (per_epoch + run.online_fraction * samples * base_fwd),
        })
    plan.measured = _measured(base, speed_results)
    return plan


def _measured(base: dict, speed_results: Path | None) -> dict | None:
    """Throughput from ``speed_results`` (benchmarks/speed.py's JSON) when it measured the same
    architecture; None without one."""
    if speed_results is None or not Path(speed_results).is_file():
        return None
    try:
        result = json.loads(Path(speed_results).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    model = result.get("config", {}).get("base_model", {})
    if model.get("embed_dim") != base["embed_dim"] or model.get("depth") != base["depth"]:
        return None
    raw = result.get("raw", {})
    parts = [f"on {result.get('device', '?')}:"]
    for key, label in (("stage1_images_per_s", "stage 1 images/s"),
                       ("train_cached_samples_per_s", "stage 2 samples/s from cache"),
                       ("train_online_samples_per_s", "stage 2 samples/s online")):
        if key in raw:
            parts.append(f"{label} {raw[key]:.1f}")
    return {"text": " ".join(parts), "result": result}
