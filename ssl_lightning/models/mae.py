"""Masked autoencoder pieces around the registry's timm VisionTransformer (He et al., CVPR 2022).

Mirrors facebookresearch/mae models_mae.py: ``patchify``/``unpatchify``, ``random_masking``,
``forward_encoder`` (the ViT on the visible patches), ``MAEDecoder`` (forward_decoder). The encoder is
NOT a copy: ``forward_encoder(vit, ...)`` runs the very modules of the backbone (patch_embed,
cls_token, pos_embed, blocks, norm) whose plain ``vit(images)`` gives the features that the probe,
the monitors and offline evaluation see. ``init_mae_weights`` applies the official initialisation:
fixed 2-D sin-cos position embeddings (no gradient), xavier-uniform Linear layers and patch
projection, normal(0.02) class and mask tokens.
"""
from __future__ import annotations

from functools import partial

import torch
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn


# ---- pixels <-> patches --------------------------------------------------------------------
def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, L, patch*patch*C), L = (H/patch)(W/patch) row-major, pixels ordered
    (row, column, channel) inside a patch as in the official code."""
    n, c, h, w = images.shape
    if h % patch or w % patch:
        raise ValueError(f"image size {h}x{w} is not divisible by patch size {patch}")
    x = images.reshape(n, c, h // patch, patch, w // patch, patch)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(n, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(patches: torch.Tensor, patch: int, channels: int, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Inverse of patchify: (N, L, patch*patch*C) -> (N, C, H, W); grid (rows, cols) defaults to square."""
    n, length, _ = patches.shape
    if grid is None:
        side = round(length ** 0.5)
        if side * side != length:
            raise ValueError(f"{length} patches are not a square grid; pass grid=(rows, cols)")
        grid = (side, side)
    rows, cols = grid
    x = patches.reshape(n, rows, cols, patch, patch, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(n, channels, rows * patch, cols * patch)


# ---- masking --------------------------------------------------------------------------------
def random_masking(x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masking by argsort of uniform noise (small noise = kept).

    x: (N, L, D) tokens; noise: (N, L), drawn here from torch's global RNG when None (so
    ``torch.manual_seed`` fixes the masks), or given to repeat a mask (RC-MAE's teacher).
    Returns (kept tokens (N, int(L (1 - mask_ratio)), D) in shuffled order, mask (N, L) with
    1 = masked in the original patch order, ids_restore (N, L): the argsort that unshuffles).
    """
    n, length, dim = x.shape
    keep = int(length * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(n, length, device=x.device)
    elif noise.shape != (n, length):
        raise ValueError(f"mask noise has shape {tuple(noise.shape)}, expected ({n}, {length})")
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    kept = torch.gather(x, 1, ids_shuffle[:, :keep, None].expand(-1, -1, dim))
    mask = torch.ones(n, length, device=x.device)
    mask[:, :keep] = 0
    return kept, torch.gather(mask, 1, ids_restore), ids_restore


# ---- position embeddings and initialisation ------------------------------------------------
def sincos_pos_embed_2d(dim: int, grid: tuple[int, int], cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding (1, [1 +] rows*cols, dim), the official
    get_2d_sincos_pos_embed: the first dim/2 channels encode the column, the rest the row, each as
    [sin(pos * omega), cos(pos * omega)] with omega_i = 10000^(-i / (dim/4)); the class token gets 0."""
    if dim % 4:
        raise ValueError(f"sin-cos position embeddings need an embedding dim divisible by 4, got {dim}")
    rows, cols = grid
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    row, col = torch.meshgrid(torch.arange(rows, dtype=torch.float64), torch.arange(cols, dtype=torch.float64),
                              indexing="ij")

    def embed_1d(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega
        return torch.cat([out.sin(), out.cos()], dim=1)

    emb = torch.cat([embed_1d(col), embed_1d(row)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb])
    return emb.float().unsqueeze(0)


def _init_linear_and_norm(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)  # the official JAX ViT / MAE choice
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def check_mae_vit(vit: nn.Module) -> None:
    """MAE needs the classic layout: a class token whose position embedding is part of pos_embed."""
    if not isinstance(vit, VisionTransformer):
        raise ValueError(f"MAE needs a timm VisionTransformer backbone (vit_tiny, vit_small, vit_base), "
                         f"got {type(vit).__name__}")
    problems = [name for name, bad in (
        ("a class token (class_token=True)", vit.cls_token is None),
        ("no register tokens (reg_tokens=0)", vit.num_reg_tokens > 0),
        ("position embeddings that include the class token (no_embed_class=False)", vit.no_embed_class),
        ("position embeddings (pos_embed='learn')", vit.pos_embed is None),
        ("a fixed image size (dynamic_img_size=False)", vit.dynamic_img_size),
        ("token or avg pooling (global_pool 'token' or 'avg')", vit.global_pool not in ("token", "avg")),
    ) if bad]
    if problems:
        raise ValueError(f"MAE's ViT needs {'; '.join(problems)}: fix backbone_kwargs")


def init_mae_weights(vit: VisionTransformer) -> None:
    """The official initialize_weights on the backbone: fixed sin-cos pos_embed (requires_grad False,
    so no optimizer, weight decay or DDP sees it), xavier patch projection and Linear layers,
    normal(0.02) class token, LayerNorms at 1/0."""
    vit.apply(_init_linear_and_norm)
    w = vit.patch_embed.proj.weight
    nn.init.xavier_uniform_(w.data.view(w.shape[0], -1))  # like a Linear on the flattened patch
    nn.init.normal_(vit.cls_token, std=0.02)
    with torch.no_grad():
        vit.pos_embed.copy_(sincos_pos_embed_2d(vit.pos_embed.shape[-1], vit.patch_embed.grid_size))
    vit.pos_embed.requires_grad_(False)


def encoder_norm(vit: VisionTransformer) -> nn.Module:
    """The LayerNorm on the encoder's output tokens. timm moves it after the pooling (fc_norm) for
    global_pool='avg'; MAE normalises every token, so that norm is applied per token here (and every
    backbone parameter gets a gradient, as DDP needs)."""
    return vit.norm if not isinstance(vit.norm, nn.Identity) else vit.fc_norm


# ---- encoder and decoder --------------------------------------------------------------------
def forward_encoder(vit: VisionTransformer, images: torch.Tensor, mask_ratio: float,
                    noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backbone's own modules on the visible patches only (official forward_encoder).

    images (N, C, H, W) -> (latent (N, 1 + kept, D) with the class token first, mask (N, L),
    ids_restore (N, L)); see random_masking for ``noise``.
    """
    x = vit.patch_embed(images) + vit.pos_embed[:, 1:]
    x, mask, ids_restore = random_masking(x, mask_ratio, noise)
    cls = (vit.cls_token + vit.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
    x = vit.norm_pre(vit.pos_drop(torch.cat([cls, x], dim=1)))
    return encoder_norm(vit)(vit.blocks(x)), mask, ids_restore


class MAEDecoder(nn.Module):
    """Light transformer decoder (official forward_decoder): embed the encoder tokens to
    decoder_dim, put a shared mask token at every masked position, unshuffle, add fixed sin-cos
    position embeddings, ``depth`` timm Blocks, LayerNorm, Linear to patch*patch*C pixels."""

    def __init__(self, *, embed_dim: int, grid: tuple[int, int], patch: int, in_chans: int,
                 decoder_dim: int = 512, depth: int = 8, num_heads: int = 16, mlp_ratio: float = 4.0):
        super().__init__()
        if decoder_dim % num_heads:
            raise ValueError(f"decoder_dim {decoder_dim} is not divisible by decoder_heads {num_heads}")
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.embed = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.pos_embed = nn.Parameter(sincos_pos_embed_2d(decoder_dim, grid), requires_grad=False)
        self.blocks = nn.Sequential(*[Block(decoder_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm)
                                      for _ in range(depth)])
        self.norm = norm(decoder_dim)
        self.pred = nn.Linear(decoder_dim, patch * patch * in_chans)
        self.apply(_init_linear_and_norm)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent (N, 1 + kept, D), ids_restore (N, L) -> predicted patches (N, L, patch*patch*C)."""
        x = self.embed(latent)
        n, length, dim = x.shape[0], ids_restore.shape[1], x.shape[2]
        tokens = torch.cat([x[:, 1:], self.mask_token.expand(n, length + 1 - x.shape[1], -1)], dim=1)
        tokens = torch.gather(tokens, 1, ids_restore[:, :, None].expand(-1, -1, dim))
        x = torch.cat([x[:, :1], tokens], dim=1) + self.pos_embed
        return self.pred(self.norm(self.blocks(x)))[:, 1:]


def reconstruct(vit: VisionTransformer, decoder: MAEDecoder, images: torch.Tensor, mask_ratio: float,
                noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encoder on the visible patches, decoder on all: (pred (N, L, p*p*C), mask (N, L), latent)."""
    latent, mask, ids_restore = forward_encoder(vit, images, mask_ratio, noise)
    return decoder(latent, ids_restore), mask, latent
