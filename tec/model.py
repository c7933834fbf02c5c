"""The new model (student): a masked ViT encoder with conditional adapters and a multi-target
decoder.

Shapes: B batch, L patches, L_keep visible patches, D encoder width, Dd decoder width,
C base-model width, H base-model heads, P attention projection width, k attention rows - 1.

Built on timm's ``Block`` and ``PatchEmbed`` so that the encoder exports to a timm
``VisionTransformer`` unchanged (see :mod:`tec.export`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from timm.layers import Mlp, PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn

from .losses import attention_loss, feature_loss, pixel_loss

__all__ = [
    "EncoderAdapter",
    "NewModel",
    "NewModelConfig",
    "TargetBatch",
    "get_1d_sincos_pos_embed",
    "get_2d_sincos_pos_embed",
    "init_from_base_model",
    "patchify",
    "random_masking",
]

norm_layer = partial(nn.LayerNorm, eps=1e-6)  # as MAE and timm's ViT


@dataclass
class NewModelConfig:
    """Architecture and loss settings of the new model (defaults: ViT-B/16, TEC with MAE ViT-B)."""

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    decoder_embed_dim: int = 512
    decoder_depth: int = 2
    decoder_num_heads: int = 16
    mask_ratio: float = 0.75
    target: str = "tec"  # 'tec' (base-model targets) | 'pixel' (MAE baseline / bootstrap)
    base_embed_dim: int = 768  # C
    base_num_heads: int = 12  # H
    attn_proj_dim: int | None = None  # P, defaults to embed_dim
    use_attention: bool = True
    use_input_adapter: bool = True
    use_encoder_adapter: bool = True
    adapter_group: int = 3
    k: int = 15
    tau: float = 1.8
    feature_weight: float = 1.0
    attention_weight: float = 1.0
    norm_pix_loss: bool = True

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def attn_dim(self) -> int:
        """P, the width of the attention head's q and k projections."""
        return self.attn_proj_dim if self.attn_proj_dim is not None else self.embed_dim

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> NewModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown new-model config keys {unknown}; "
                             f"known keys: {sorted(known)}")
        return cls(**values).validate()

    def validate(self) -> NewModelConfig:
        """Raise ValueError naming the field at fault; returns self."""

        def fail(field: str, why: str) -> None:
            raise ValueError(f"new-model config {field}={getattr(self, field)!r}: {why}")

        if self.target not in ("tec", "pixel"):
            fail("target", "must be 'tec' or 'pixel'")
        for field in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads",
                      "decoder_embed_dim", "decoder_depth", "decoder_num_heads", "base_embed_dim",
                      "base_num_heads", "adapter_group"):
            if int(getattr(self, field)) < 1:
                fail(field, "must be a positive integer")
        if self.img_size % self.patch_size:
            fail("img_size", f"must be a multiple of patch_size={self.patch_size}")
        if self.embed_dim % self.num_heads:
            fail("embed_dim", f"must be divisible by num_heads={self.num_heads}")
        if self.decoder_embed_dim % self.decoder_num_heads:
            fail("decoder_embed_dim",
                 f"must be divisible by decoder_num_heads={self.decoder_num_heads}")
        if not 0.0 <= self.mask_ratio < 1.0 or int(self.num_patches * (1 - self.mask_ratio)) < 1:
            fail("mask_ratio", f"must leave at least one of {self.num_patches} patches visible")
        if self.use_encoder_adapter and self.depth % self.adapter_group:
            fail("depth", f"must be a multiple of adapter_group={self.adapter_group} when "
                 "use_encoder_adapter is on (or turn the encoder adapter off)")
        if self.target == "tec" and self.use_attention:
            if self.attn_dim < 1 or self.attn_dim % self.base_num_heads:
                fail("attn_proj_dim", f"P={self.attn_dim} must be divisible by base_num_heads="
                     f"{self.base_num_heads}")
            if not 0 <= self.k <= self.num_patches:
                fail("k", f"must be between 0 and the number of patches {self.num_patches}")
            if self.tau <= 0:
                fail("tau", "must be > 0")
        return self


@dataclass
class TargetBatch:
    """Targets for one training batch, already in the chosen feature-normalisation mode.

    features: [B,L,C]; attn_logits: [B,H,k'+1,L] or None; attn_index: [B,k'] int64 or None,
    k' >= cfg.k (extra rows are dropped; rows are in rank order).
    """

    features: torch.Tensor
    attn_logits: torch.Tensor | None = None
    attn_index: torch.Tensor | None = None


# --------------------------------------------------------------------------------------------
# Fixed position embeddings (MAE's formula: first half encodes the column, second half the row)


def get_1d_sincos_pos_embed(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    """pos [M] -> [M, embed_dim]: [sin(pos * w_i), cos(pos * w_i)],
    w_i = 10000^(-i / (embed_dim/2))."""
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding width {embed_dim} must be even")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = pos.double().reshape(-1)[:, None] * omega[None, :]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int,
                            cls_token: bool = False) -> torch.Tensor:
    """[grid_size**2 (+1), embed_dim] float32; patch (row i, col j) at index i*grid_size + j.

    Half the channels encode the column j, half the row i (MAE's get_2d_sincos_pos_embed);
    with cls_token a zero row comes first.
    """
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos embedding width {embed_dim} must be a multiple of 4")
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    emb = torch.cat([get_1d_sincos_pos_embed(embed_dim // 2, cols),
                     get_1d_sincos_pos_embed(embed_dim // 2, rows)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()


# --------------------------------------------------------------------------------------------
# Masking and patches


def random_masking(x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE per-sample random masking: keep the int(L*(1-mask_ratio)) lowest-noise patches.

    x: [B,L,D]; noise: [B,L] (uniform if None).
    Returns x_visible [B,L_keep,D] (in ascending noise order), mask [B,L] (1 = masked, float),
    ids_restore [B,L] (the argsort that unshuffles [visible, masked] back to patch order).
    """
    B, L, D = x.shape
    len_keep = int(L * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(B, L, device=x.device)
    elif noise.shape != (B, L):
        raise ValueError(f"masking noise has shape {tuple(noise.shape)}, expected {(B, L)}")
    ids_shuffle = torch.argsort(noise.to(x.device), dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_visible = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, D))
    mask = torch.ones(B, L, device=x.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return x_visible, mask, ids_restore


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """images [B,c,H,W] -> [B,L,p*p*c] in MAE's (p, q, c) order, patches row-major."""
    B, c, H, W = images.shape
    h, w = H // patch_size, W // patch_size
    x = images.reshape(B, c, h, patch_size, w, patch_size)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(B, h * w, patch_size * patch_size * c)


# --------------------------------------------------------------------------------------------
# Modules


class EncoderAdapter(nn.Module):
    """Ze = LN(sum_n Z'_n), Z'_n = Z_n + MLP(Z_n),
    Z_n = FC_n(group n of LN(concat of block outputs)).

    Groups are ``group`` consecutive blocks; FC_n: group*D -> D; MLP: D -> hidden -> D (GELU).
    """

    def __init__(self, dim: int, depth: int, group: int, hidden_dim: int):
        super().__init__()
        if depth % group:
            raise ValueError(f"encoder adapter: depth={depth} must be a multiple of the group size "
                             f"{group}")
        self.dim, self.group = dim, group
        self.norm_in = norm_layer(depth * dim)
        self.fuse = nn.ModuleList([nn.Linear(group * dim, dim) for _ in range(depth // group)])
        self.mlp = nn.ModuleList([Mlp(dim, hidden_dim, dim) for _ in range(depth // group)])
        self.norm_out = norm_layer(dim)

    def forward(self, block_outputs: list[torch.Tensor]) -> torch.Tensor:
        """block_outputs: depth tensors [B,N,D] (the last after the encoder's final norm)
        -> [B,N,D]."""
        x = self.norm_in(torch.cat(block_outputs, dim=-1))
        total = None
        for chunk, fuse, mlp in zip(x.split(self.group * self.dim, dim=-1), self.fuse, self.mlp):
            z = fuse(chunk)
            z = z + mlp(z)
            total = z if total is None else total + z
        return self.norm_out(total)


class DecoderStream(nn.Module):
    """One target's decoder input projection (with its mask token), output LayerNorm and head."""

    def __init__(self, embed_dim: int, decoder_dim: int, out_dim: int):
        super().__init__()
        self.embed = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.norm = norm_layer(decoder_dim)
        self.head = nn.Linear(decoder_dim, out_dim)

    def tokens(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent [B,1+L_keep,D] -> [B,1+L,Dd]: projected, mask tokens filled in, patch order."""
        x = self.embed(latent)
        B, n_vis, Dd = x.shape
        L = ids_restore.shape[1]
        mask_tokens = self.mask_token.to(x.dtype).expand(B, L + 1 - n_vis, Dd)
        patches = torch.cat([x[:, 1:], mask_tokens], dim=1)
        patches = torch.gather(patches, 1, ids_restore[..., None].expand(-1, -1, Dd))
        return torch.cat([x[:, :1], patches], dim=1)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Shared-trunk output [B,1+L,Dd] -> head output [B,1+L,out_dim]."""
        return self.head(self.norm(x))


class NewModel(nn.Module):
    """The TEC new model (or an MAE pixel model with ``target='pixel'``)."""

    def __init__(self, cfg: NewModelConfig):
        super().__init__()
        self.cfg = cfg.validate()
        D, Dd = cfg.embed_dim, cfg.decoder_embed_dim

        # encoder
        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, D)
        grid = self.patch_embed.grid_size[0]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.register_buffer("pos_embed", get_2d_sincos_pos_embed(D, grid, cls_token=True)[None],
                             persistent=False)
        self.input_adapter = Mlp(D, 4 * D, D) if cfg.use_input_adapter else None
        self.blocks = nn.ModuleList([
            Block(D, cfg.num_heads, cfg.mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(cfg.depth)])
        self.norm = norm_layer(D)
        self.encoder_adapter = (EncoderAdapter(D, cfg.depth, cfg.adapter_group, 4 * Dd)
                                if cfg.use_encoder_adapter else None)

        # decoder: target-specific streams around one shared trunk
        self.register_buffer("decoder_pos_embed",
                             get_2d_sincos_pos_embed(Dd, grid, cls_token=True)[None],
                             persistent=False)
        self.decoder_blocks = nn.ModuleList([
            Block(Dd, cfg.decoder_num_heads, cfg.mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(cfg.decoder_depth)])
        streams = {}
        if cfg.target == "pixel":
            streams["pixel"] = DecoderStream(D, Dd, cfg.patch_size ** 2 * cfg.in_chans)
        else:
            streams["feature"] = DecoderStream(D, Dd, cfg.base_embed_dim)
            if cfg.use_attention:
                streams["attention"] = DecoderStream(D, Dd, 2 * cfg.attn_dim)
        self.decoder_streams = nn.ModuleDict(streams)
        self.initialize_weights()

    # ---- init ------------------------------------------------------------------------------

    def initialize_weights(self) -> None:
        """MAE's init: patch_embed as a linear layer, xavier_uniform linears, normal(0.02)
        tokens."""
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.normal_(self.cls_token, std=0.02)
        for stream in self.decoder_streams.values():
            nn.init.normal_(stream.mask_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # ---- encoder ---------------------------------------------------------------------------

    def cls_input(self) -> torch.Tensor:
        """The encoder's cls input [1,1,D]: cls' = MLP(cls) with the input adapter, plus its (zero)
        position embedding. This is the token that export folds into timm's cls_token."""
        cls = self.cls_token
        if self.input_adapter is not None:
            cls = self.input_adapter(cls)
        return cls + self.pos_embed[:, :1]

    def _run_blocks(self, x: torch.Tensor, adapt: bool) -> torch.Tensor:
        """x [B,N,D] -> final-norm output, or the encoder adapter's output when adapt is set."""
        keep = adapt and self.encoder_adapter is not None
        outputs = []
        for block in self.blocks:
            x = block(x)
            if keep:
                outputs.append(x)
        x = self.norm(x)
        if keep:
            outputs[-1] = x
            return self.encoder_adapter(outputs)
        return x

    def forward_encoder(self, images: torch.Tensor, noise: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """images [B,c,H,W] -> latent [B,1+L_keep,D] (adapted), mask [B,L], ids_restore [B,L]."""
        x = self.patch_embed(images) + self.pos_embed[:, 1:]
        x, mask, ids_restore = random_masking(x, self.cfg.mask_ratio, noise)
        x = torch.cat([self.cls_input().expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        return self._run_blocks(x, adapt=True), mask, ids_restore

    def forward_encoder_features(self, images: torch.Tensor) -> torch.Tensor:
        """Unmasked encoder output after the final norm, no adapters applied: [B,1+L,D].

        Equals timm's ``forward_features`` of the exported model.
        """
        x = self.patch_embed(images) + self.pos_embed[:, 1:]
        x = torch.cat([self.cls_input().expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        return self._run_blocks(x, adapt=False)

    # ---- decoder ---------------------------------------------------------------------------

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor
                        ) -> dict[str, torch.Tensor]:
        """latent [B,1+L_keep,D] -> {stream name: head output [B,1+L,out]}.

        All streams go through the shared trunk as one batch of (number of streams) * B.
        """
        names = list(self.decoder_streams)
        x = torch.cat([self.decoder_streams[n].tokens(latent, ids_restore) for n in names], dim=0)
        x = x + self.decoder_pos_embed.to(x.dtype)
        for block in self.decoder_blocks:
            x = block(x)
        return {n: self.decoder_streams[n].predict(part)
                for n, part in zip(names, x.chunk(len(names), dim=0))}

    def attention_logits(self, qk: torch.Tensor, attn_index: torch.Tensor) -> torch.Tensor:
        """Predicted attention logits [B,H,k+1,L] (float32).

        qk: attention-head output [B,1+L,2P] (q then k); attn_index: [B,k] patch indices 0..L-1.
        Query rows: cls and the selected patches; keys: all tokens, cls column dropped;
        scale P^-0.5.
        """
        P, H = self.cfg.attn_dim, self.cfg.base_num_heads
        B, N, _ = qk.shape
        with torch.autocast(device_type=qk.device.type, enabled=False):
            q, k = qk.float().split(P, dim=-1)
            rows = torch.cat([torch.zeros_like(attn_index[:, :1]), attn_index + 1], dim=1)
            q = torch.gather(q, 1, rows[..., None].expand(-1, -1, P))  # [B,k+1,P]
            q = q.reshape(B, -1, H, P // H).transpose(1, 2)  # [B,H,k+1,P/H]
            k = k.reshape(B, N, H, P // H).transpose(1, 2)  # [B,H,1+L,P/H]
            logits = (q @ k.transpose(-2, -1)) * P ** -0.5
        return logits[..., 1:]

    # ---- training step ---------------------------------------------------------------------

    def forward(self, images: torch.Tensor, targets: TargetBatch | None = None, *,
                noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """images [B,c,H,W] normalised; targets for 'tec' (None for 'pixel'); noise [B,L] fixes
        the mask.

        Returns {'loss': scalar, 'loss_feature', 'loss_attention'} ('tec'; the attention term only
        with use_attention) or {'loss', 'loss_pixel'} ('pixel'); all float32.
        """
        cfg = self.cfg
        latent, mask, ids_restore = self.forward_encoder(images, noise)
        preds = self.forward_decoder(latent, ids_restore)
        if cfg.target == "pixel":
            loss = pixel_loss(preds["pixel"][:, 1:], patchify(images, cfg.patch_size), mask,
                              norm_pix_loss=cfg.norm_pix_loss)
            return {"loss": loss, "loss_pixel": loss}

        if targets is None:
            raise ValueError("the 'tec' new model needs base-model targets (TargetBatch)")
        expected = (images.shape[0], cfg.num_patches, cfg.base_embed_dim)
        if tuple(targets.features.shape) != expected:
            raise ValueError(f"feature target shape {tuple(targets.features.shape)} != expected "
                             f"{expected} (B, L, base_embed_dim)")
        loss_feature = feature_loss(preds["feature"][:, 1:], targets.features, mask)
        out = {"loss_feature": loss_feature}
        loss = cfg.feature_weight * loss_feature
        if cfg.use_attention:
            attn_index, attn_target = self._attention_targets(targets, images.shape[0])
            pred_logits = self.attention_logits(preds["attention"], attn_index)
            loss_attention = attention_loss(pred_logits, attn_target, cfg.tau)
            out["loss_attention"] = loss_attention
            loss = loss + cfg.attention_weight * loss_attention
        out["loss"] = loss
        return out

    def _attention_targets(self, targets: TargetBatch, batch: int
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """Validated (attn_index [B,k], attn_logits [B,H,k+1,L]) sliced to cfg.k rows."""
        cfg = self.cfg
        if targets.attn_logits is None or targets.attn_index is None:
            raise ValueError("use_attention is on but the targets carry no attention logits/index")
        index, logits = targets.attn_index, targets.attn_logits
        if (index.ndim != 2 or index.shape[0] != batch or index.shape[1] < cfg.k
                or tuple(logits.shape) != (batch, cfg.base_num_heads, index.shape[1] + 1,
                                           cfg.num_patches)):
            raise ValueError(
                f"attention targets index {tuple(index.shape)} / logits {tuple(logits.shape)} "
                f"do not fit k={cfg.k}, base_num_heads={cfg.base_num_heads}, "
                f"L={cfg.num_patches}")
        return index[:, :cfg.k].long(), logits[:, :, :cfg.k + 1]


# --------------------------------------------------------------------------------------------
# Initialising the new model from the base model (paper Tab. 6(d))

_ENCODER_PREFIXES = ("patch_embed.", "blocks.", "norm.")


def init_from_base_model(model: NewModel, base_model: nn.Module) -> list[str]:
    """Copy a timm ViT base model's encoder weights into the new model; returns the keys copied.

    Copied: ``patch_embed``, ``cls_token`` (with the input adapter on, the adapter's MLP still
    acts on it), every encoder ``blocks.*`` and the final ``norm``: the same names in both. Not
    copied: the position embedding (the new model's is fixed sin-cos, as MAE's), the adapters
    and the decoder, which stay randomly initialised. The paper (Tab. 6(d)) finds random
    initialisation 0.4 points better; this is its ablation. Raises ValueError naming the first
    key whose shape differs (the encoders must have the same geometry).
    """
    target = model.state_dict()
    source = base_model.state_dict()
    wanted = [k for k in target if k.startswith(_ENCODER_PREFIXES) or k == "cls_token"]
    for key in wanted:
        if key not in source:
            raise ValueError(f"init_from_base: the base model has no {key!r}; it needs a timm "
                             "ViT encoder of the new model's depth")
        if tuple(source[key].shape) != tuple(target[key].shape):
            raise ValueError(
                f"init_from_base: {key} is {tuple(source[key].shape)} in the base model and "
                f"{tuple(target[key].shape)} in the new model; give the new model the base "
                "model's patch_size, embed_dim, depth, num_heads and mlp_ratio")
    extra = sorted(k for k in source if k.startswith("blocks.") and k not in target)
    if extra:
        raise ValueError(f"init_from_base: the base model has more blocks than the new model "
                         f"({extra[0]}); give the new model the base model's depth")
    with torch.no_grad():
        params = dict(model.named_parameters())
        buffers = dict(model.named_buffers())
        for key in wanted:
            (params.get(key) if key in params else buffers[key]).copy_(source[key])
    return wanted
