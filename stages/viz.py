"""Attention-map pictures (the paper's Fig. 2): cls-token attention of base vs new model.

``attention_maps`` reads the last block's cls-query attention over the patch tokens of a timm
VisionTransformer; ``save_attention_grid`` draws one row per image (the image, then one overlay
per model) into a PNG with numpy and PIL only.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor, nn

from stages.evaluate import encoder_tokens

PAD = 4  # pixels between cells and around the grid
TITLE_HEIGHT = 16  # pixels of the column-title band above the first row

# Anchor colours of a viridis-like ramp (dark blue = low attention, yellow = high).
_RAMP = np.array(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]],
    dtype=np.float64,
)


@torch.no_grad()
def attention_maps(model: nn.Module, images: Tensor) -> Tensor:
    """Head-mean cls-query attention over the patch tokens of the last block.

    model: timm VisionTransformer with a class token (or a NewModel, read through its unmasked
    encoder). images: float [B, 3, H, W], normalised.
    Returns float32 [B, L]: softmax(q_cls k^T * scale) averaged over heads, restricted to the L
    patch columns (so a row sums to the probability mass the cls query puts on patches, <= 1).

    timm computes attention with a fused kernel that never materialises the probabilities, so the
    last block's attention input (its norm1 output) is captured with a hook and q, k are recomputed
    from ``attn.qkv`` (with ``q_norm`` / ``k_norm``) here.
    """
    blocks = getattr(model, "blocks", None)
    attn = getattr(blocks[-1], "attn", None) if blocks is not None and len(blocks) else None
    if attn is None or not hasattr(attn, "qkv"):
        raise ValueError(
            f"attention_maps: {type(model).__name__} is not a timm ViT with blocks[-1].attn.qkv; "
            "export the model to timm first"
        )
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    captured: dict[str, Tensor] = {}

    def grab_input(module: nn.Module, args: tuple) -> None:
        captured["x"] = args[0]

    was_training = model.training
    model.eval()
    handle = attn.register_forward_pre_hook(grab_input)
    try:
        encoder_tokens(model, images)
    finally:
        handle.remove()
        model.train(was_training)

    x = captured["x"].float()  # [B, N, D], N = prefix + L
    batch, tokens, _ = x.shape
    qkv = F.linear(x, attn.qkv.weight.float(),
                   None if attn.qkv.bias is None else attn.qkv.bias.float())
    qkv = qkv.reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])  # [B, heads, N, head_dim]
    logits = (q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)  # [B, heads, 1, N]
    probs = logits.softmax(dim=-1)[:, :, 0]  # [B, heads, N]
    return probs.mean(dim=1)[:, prefix:]


def colormap(values: np.ndarray) -> np.ndarray:
    """values in [0, 1], any shape [...] -> uint8 RGB [..., 3] on a viridis-like ramp."""
    v = np.clip(values, 0.0, 1.0) * (len(_RAMP) - 1)
    positions = np.arange(len(_RAMP))
    rgb = np.stack([np.interp(v, positions, _RAMP[:, c]) for c in range(3)], axis=-1)
    return np.round(rgb).astype(np.uint8)


def _overlay(
    image: Image.Image, attn_map: Tensor, grid: tuple[int, int], alpha: float
) -> Image.Image:
    """RGB cell: ``image`` blended with the min-max normalised map [L] upsampled to its size."""
    size = image.size[0]
    m = attn_map.float().reshape(1, 1, *grid)
    m = (m - m.min()) / (m.max() - m.min()).clamp_min(1e-12)
    m = F.interpolate(m, size=(size, size), mode="nearest")[0, 0].numpy()  # patch blocks
    heat = colormap(m).astype(np.float32)
    base = np.asarray(image, dtype=np.float32)
    return Image.fromarray(np.round((1 - alpha) * base + alpha * heat).astype(np.uint8))


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def save_attention_grid(
    path_png: str | Path,
    images_uint8: Tensor,
    maps: dict[str, Tensor],
    grid: tuple[int, int] | None = None,
    *,
    cell_size: int | None = None,
    alpha: float = 0.6,
) -> Path:
    """Write a PNG: one row per image, columns ``image`` then one attention overlay per model.

    images_uint8: [B, 3, S, S]. maps: model name -> [B, L] (from :func:`attention_maps`), each
    reshaped to ``grid`` (patch rows, patch columns; default square) and min-max normalised per
    image. Cells are ``cell_size`` pixels square (default max(S, 112) so titles fit).
    The PNG is ``(1 + len(maps)) * cell + (2 + len(maps)) * PAD`` wide and
    ``TITLE_HEIGHT + B * cell + (B + 1) * PAD`` high. Returns the path.
    """
    if images_uint8.dtype != torch.uint8 or images_uint8.ndim != 4 or images_uint8.shape[1] != 3:
        raise ValueError(
            f"save_attention_grid: expected uint8 images [B, 3, S, S], got "
            f"{images_uint8.dtype} {tuple(images_uint8.shape)}"
        )
    batch = images_uint8.shape[0]
    for name, m in maps.items():
        if m.ndim != 2 or m.shape[0] != batch:
            raise ValueError(f"save_attention_grid: map {name!r} has shape {tuple(m.shape)}, "
                             f"expected [{batch}, L]")
        side = int(round(m.shape[1] ** 0.5))
        map_grid = grid or (side, side)
        if map_grid[0] * map_grid[1] != m.shape[1]:
            raise ValueError(f"save_attention_grid: map {name!r} has {m.shape[1]} patches, "
                             f"not a {map_grid[0]}x{map_grid[1]} grid; pass grid=(rows, cols)")
    cell = cell_size or max(images_uint8.shape[-1], 112)
    columns = 1 + len(maps)
    width = columns * cell + (columns + 1) * PAD
    height = TITLE_HEIGHT + batch * cell + (batch + 1) * PAD
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()

    titles = ["image", *maps]
    for col, title in enumerate(titles):
        x = PAD + col * (cell + PAD)
        draw.text((x, 2), _fit_text(draw, title, font, cell), fill="black", font=font)

    for row in range(batch):
        y = TITLE_HEIGHT + PAD + row * (cell + PAD)
        image = Image.fromarray(images_uint8[row].permute(1, 2, 0).cpu().numpy())
        image = image.resize((cell, cell), Image.Resampling.BICUBIC)
        canvas.paste(image, (PAD, y))
        for col, m in enumerate(maps.values(), start=1):
            side = int(round(m.shape[1] ** 0.5))
            cell_img = _overlay(image, m[row].detach().cpu(), grid or (side, side), alpha)
            canvas.paste(cell_img, (PAD + col * (cell + PAD), y))

    path = Path(path_png)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG")
    return path
