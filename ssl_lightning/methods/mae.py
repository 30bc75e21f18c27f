"""MAE: Masked Autoencoders Are Scalable Vision Learners (He et al., CVPR 2022)."""
from __future__ import annotations

import torch

from ssl_lightning.distributed import rank, world_size
from ssl_lightning.losses.mae import mae_loss
from ssl_lightning.methods.base import SSLMethod, SSLOutput
from ssl_lightning.models.mae import MAEDecoder, check_mae_vit, init_mae_weights, patchify, reconstruct


def global_mask_noise(local_batch: int, num_patches: int, device: torch.device) -> torch.Tensor:
    """(b, L) masking noise: this rank's rows of one (W*b, L) draw from torch's global RNG.

    With the same seed on every rank (Lightning's seed_everything), rank r's samples get exactly the
    noise, hence the masks, that the same samples get in one process on the concatenated batch (the
    DDP-equivalence tests rely on it), and no two ranks reuse one mask. Costs W*b*L random numbers.
    """
    r = rank()
    return torch.rand(world_size() * local_batch, num_patches, device=device)[r * local_batch:(r + 1) * local_batch]


class MAE(SSLMethod):
    """One view (crop + flip) -> patchify -> keep a random int(L (1 - mask_ratio)) patches -> ViT
    encoder (the backbone itself, see ssl_lightning.models.mae) -> light decoder -> pixels of every
    patch; loss = mae_loss on the masked patches, per-patch normalised targets when norm_pix_loss
    (the official pre-training recipe; default on).

    The backbone gets MAE's initialisation, including the fixed 2-D sin-cos position embedding
    (no gradient), as the official code. Its plain forward (no masking; CLS token or mean by
    backbone_kwargs.global_pool) is what the probe, the monitors and offline evaluation see. With
    the online probe on, that costs one extra no-grad forward of the full, unmasked view per step.
    """

    def __init__(self, mask_ratio: float = 0.75, decoder_dim: int = 512, decoder_depth: int = 8,
                 decoder_heads: int = 16, norm_pix_loss: bool = True, backbone: str = "vit_base", **kwargs):
        super().__init__(backbone=backbone, **kwargs)
        if not 0 < mask_ratio < 1:
            raise ValueError(f"mask_ratio {mask_ratio} must be in (0, 1), e.g. 0.75")
        check_mae_vit(self.backbone)
        init_mae_weights(self.backbone)
        embed = self.backbone.patch_embed
        self.patch_size, self.num_patches = embed.patch_size[0], embed.num_patches
        if int(self.num_patches * (1 - mask_ratio)) < 1:
            raise ValueError(f"mask_ratio {mask_ratio} keeps no patch of {self.num_patches}; lower it")
        self.decoder = MAEDecoder(embed_dim=self.feature_dim, grid=embed.grid_size, patch=self.patch_size,
                                  in_chans=self.hparams.in_chans, decoder_dim=decoder_dim, depth=decoder_depth,
                                  num_heads=decoder_heads)

    def input_view(self, views: list[torch.Tensor]) -> torch.Tensor:
        if len(views) != 1:
            raise ValueError(f"{type(self).__name__} takes exactly 1 view, got {len(views)}; configure data.views "
                             "with one entry (random resized crop + flip, as MAE)")
        return views[0]

    def mask_noise(self, images: torch.Tensor) -> torch.Tensor:
        return global_mask_noise(images.shape[0], self.num_patches, images.device)

    def reconstruction_loss(self, pred: torch.Tensor, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return mae_loss(pred, patchify(images, self.patch_size), mask, norm_pix_loss=self.hparams.norm_pix_loss)

    def probe_features(self, images: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """Features of the unmasked view (an extra no-grad forward) when the probe is on; otherwise
        nothing reads them and the pooled latent of the visible patches stands in for free."""
        if self.probe is None:
            return self.backbone.pool(latent.detach())
        with torch.no_grad():
            return self(images)

    def ssl_step(self, views: list[torch.Tensor]) -> SSLOutput:
        images = self.input_view(views)
        pred, mask, latent = reconstruct(self.backbone, self.decoder, images, self.hparams.mask_ratio,
                                         self.mask_noise(images))
        loss = self.reconstruction_loss(pred, images, mask)
        return SSLOutput(loss=loss, features=self.probe_features(images, latent), logs={"mae": loss.detach()})
