"""Target-enhancing module: the base model's patch-normalised features and top-k attention logits.

Shapes: B batch, L patches, C base-model width, H base-model heads, k_max attention rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "FEATURE_EPS",
    "FEATURE_TARGET_MODES",
    "Targets",
    "extract_targets",
    "feature_target",
    "normalize_images",
    "patch_normalize",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FEATURE_EPS = 1e-6
FEATURE_TARGET_MODES = ("patch", "channel", "none")


def normalize_images(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 pixels [B,3,H,W] (or [3,H,W]) -> float32 model input (x/255 - mean)/std.

    The one place pixel -> model-input conversion happens; runs on the tensor's device.
    """
    if images_uint8.dtype != torch.uint8:
        raise ValueError(f"normalize_images expects uint8 pixels, got {images_uint8.dtype}")
    shape = (3, 1, 1) if images_uint8.ndim == 3 else (1, 3, 1, 1)
    mean = torch.tensor(IMAGENET_MEAN, device=images_uint8.device).view(shape)
    std = torch.tensor(IMAGENET_STD, device=images_uint8.device).view(shape)
    return (images_uint8.float() / 255.0 - mean) / std


@dataclass
class Targets:
    """Base-model targets for one batch of views (all float32 except the int64 index).

    features: [B,L,C] patch-normalised feature target (Yf); feature_mean, feature_std: [B,C]
    (raw target = features * std + mean); attn_logits: [B,H,k_max+1,L] pre-softmax logits, row 0
    the cls query, rows 1.. the top-k_max patches in rank order, columns the L patch keys;
    attn_index: [B,k_max] int64 patch indices (0..L-1) of rows 1..k_max.
    """

    features: torch.Tensor
    feature_mean: torch.Tensor
    feature_std: torch.Tensor
    attn_logits: torch.Tensor
    attn_index: torch.Tensor


def patch_normalize(y: torch.Tensor, eps: float = FEATURE_EPS
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalise y [B,L,C] along the patch dimension (unbiased variance).

    Returns (features [B,L,C], mean [B,C], std [B,C]) with std = sqrt(var + eps).
    """
    y = y.float()
    mean = y.mean(dim=1)
    std = torch.sqrt(y.var(dim=1, unbiased=True) + eps)
    return (y - mean[:, None]) / std[:, None], mean, std


def feature_target(features: torch.Tensor, feature_mean: torch.Tensor, feature_std: torch.Tensor,
                   mode: str = "patch") -> torch.Tensor:
    """Feature target [B,L,C] for a normalisation mode, from the stored patch-normalised features.

    features: [B,L,C]; feature_mean, feature_std: [B,C].
    patch: as stored; none: the raw target features*std+mean; channel: the raw target normalised
    over C per patch (mean, unbiased variance, eps 1e-6).
    """
    if mode == "patch":
        return features.float()
    if mode not in FEATURE_TARGET_MODES:
        raise ValueError(f"feature target mode {mode!r} is not one of {FEATURE_TARGET_MODES}")
    raw = features.float() * feature_std.float()[:, None] + feature_mean.float()[:, None]
    if mode == "none":
        return raw
    mean = raw.mean(dim=-1, keepdim=True)
    var = raw.var(dim=-1, unbiased=True, keepdim=True)
    return (raw - mean) / torch.sqrt(var + FEATURE_EPS)


def _queries_keys(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k [B,H,N,C/H] (float32) of a timm Block on its input x [B,N,D].

    Recomputes them the way timm's Attention does (norm1, qkv, q_norm/k_norm), so that it works
    whether or not the block uses fused attention (which never materialises the logits).
    """
    attn = block.attn
    B, N, _ = x.shape
    qkv = attn.qkv(block.norm1(x)).reshape(B, N, 3, attn.num_heads, attn.head_dim)
    q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return attn.q_norm(q).float(), attn.k_norm(k).float()


@torch.no_grad()
def extract_targets(base_model: nn.Module, images: torch.Tensor, last_n: int = 2,
                    k_max: int = 16) -> Targets:
    """Run the frozen base model once on images [B,3,H,W] (normalised) and build the targets.

    Feature target: mean of the last ``last_n`` block outputs, patch tokens only (prefix tokens
    dropped), before the final norm, normalised along the patch dimension.
    Attention target: the last block's logits; patches ranked by the head-mean cls-query logits
    over patch columns (descending); rows cls + top k_max, columns the L patch keys.
    Outputs are float32 even under autocast.
    """
    depth = len(base_model.blocks)
    if not 1 <= last_n <= depth:
        raise ValueError(f"last_n={last_n} must be between 1 and the base model depth {depth}")
    if not getattr(base_model, "has_class_token", base_model.cls_token is not None):
        raise ValueError("the base model has no class token; the attention target needs one")
    num_prefix = base_model.num_prefix_tokens
    num_patches = base_model.patch_embed.num_patches
    if not 0 <= k_max <= num_patches:
        raise ValueError(f"k_max={k_max} must be between 0 and the number of patches {num_patches}")

    x = base_model.patch_embed(images)
    x = base_model._pos_embed(x)
    x = base_model.patch_drop(x)
    x = base_model.norm_pre(x)
    feature_sum = None
    for i, block in enumerate(base_model.blocks):
        if i == depth - 1:
            q, k = _queries_keys(block, x)  # from the last block's input, [B,H,N,C/H]
        x = block(x)
        if i >= depth - last_n:
            out = x[:, num_prefix:].float()
            feature_sum = out if feature_sum is None else feature_sum + out
    # float32 from here on, whatever the caller's autocast; only k_max + 1 query rows are
    # ever multiplied out, never the full [B,H,N,N] attention matrix
    with torch.autocast(device_type=images.device.type, enabled=False):
        features, feature_mean, feature_std = patch_normalize(feature_sum / last_n)
        scale = q.shape[-1] ** -0.5  # (C/H)^-0.5
        patch_keys = k[:, :, num_prefix:]  # [B,H,L,C/H]
        cls_row = (q[:, :, :1] @ patch_keys.transpose(-2, -1))[:, :, 0] * scale  # [B,H,L]
        attn_index = cls_row.mean(dim=1).topk(k_max, dim=-1, largest=True, sorted=True).indices
        rows = torch.cat([torch.zeros_like(attn_index[:, :1]), attn_index + num_prefix], dim=1)
        B, H, _, width = q.shape
        queries = torch.gather(q, 2, rows[:, None, :, None].expand(B, H, k_max + 1, width))
        attn_logits = (queries @ patch_keys.transpose(-2, -1)) * scale  # [B,H,k_max+1,L]
    return Targets(
        features=features,
        feature_mean=feature_mean,
        feature_std=feature_std,
        attn_logits=attn_logits,
        attn_index=attn_index.long(),
    )
