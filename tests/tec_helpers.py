"""Tiny models shared by the tec tests (kept out of conftest so other test files are unaffected)."""

from __future__ import annotations

import timm
import torch

from tec.model import NewModel, NewModelConfig

ARCH = "vit_base_patch16_224"
# a tiny base model: 32 px images, 8 px patches -> L = 16 patches, C = 40, H = 2
BASE_KWARGS = dict(img_size=32, patch_size=8, embed_dim=40, depth=3, num_heads=2)


def tiny_vit(seed: int = 0, **overrides) -> torch.nn.Module:
    """A randomly initialised tiny timm ViT (num_classes=0 unless overridden), eval mode, with
    non-trivial LayerNorm/bias values so that every weight matters."""
    torch.manual_seed(seed)
    kwargs = dict(BASE_KWARGS, num_classes=0)
    kwargs.update(overrides)
    model = timm.create_model(ARCH, pretrained=False, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def tiny_config(**overrides) -> NewModelConfig:
    """A tiny new-model config matching the tiny base model (C=40, H=2, L=16)."""
    values = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3,
                  decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=2,
                  base_embed_dim=40, base_num_heads=2, k=4)
    values.update(overrides)
    return NewModelConfig(**values)


def tiny_new_model(seed: int = 0, **overrides) -> NewModel:
    torch.manual_seed(seed)
    return NewModel(tiny_config(**overrides))


def images(batch: int = 2, seed: int = 1, size: int = 32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=generator)
