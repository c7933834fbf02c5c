"""TEC losses, computed in float32 whatever the autocast context.

Shapes: B batch, L patches, C target channels, H heads, R attention rows (k + 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["attention_loss", "feature_loss", "pixel_loss"]


def _no_autocast(t: torch.Tensor):
    return torch.autocast(device_type=t.device.type, enabled=False)


def feature_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked feature regression: mean over channels of (pred - target)^2, averaged over masked
    patches.

    pred, target: [B,L,C]; mask: [B,L], 1 = masked (predicted), 0 = visible (ignored).
    Returns a float32 scalar.
    """
    with _no_autocast(pred):
        per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)  # [B,L]
        mask = mask.float()
        return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)


def attention_loss(pred_logits: torch.Tensor, target_logits: torch.Tensor,
                   tau: float) -> torch.Tensor:
    """Cross-entropy between softmax(target/tau) and softmax(pred) over the L columns.

    pred_logits, target_logits: [B,H,R,L]; averaged over every (image, head, row).
    Returns a float32 scalar.
    """
    if tau <= 0:
        raise ValueError(f"attention temperature tau must be > 0, got {tau}")
    with _no_autocast(pred_logits):
        target = F.softmax(target_logits.float() / tau, dim=-1)
        log_pred = F.log_softmax(pred_logits.float(), dim=-1)
        return -(target * log_pred).sum(dim=-1).mean()


def pixel_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
               norm_pix_loss: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """MAE pixel loss: per-patch normalised pixels (norm_pix_loss), squared error, masked patches.

    pred, target: [B,L,p*p*3] patchified; mask: [B,L], 1 = masked. Returns a float32 scalar.
    """
    with _no_autocast(pred):
        target = target.float()
        if norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, unbiased=True, keepdim=True)
            target = (target - mean) / (var + eps) ** 0.5
        return feature_loss(pred, target, mask)
