"""Pure loss functions of tensors. Each docstring says which statistics are global."""
from ssl_lightning.losses.barlow import barlow_twins_loss, barlow_twins_terms, cross_correlation
from ssl_lightning.losses.byol import byol_loss, byol_regression_loss
from ssl_lightning.losses.dino import dino_center_update, dino_loss, teacher_temp_at
from ssl_lightning.losses.intl import intl_beta, intl_loss, intl_momentum_terms, intl_terms, st_loss
from ssl_lightning.losses.mae import mae_loss, masked_patch_mse, normalize_patches, reconstruction_consistency_loss
from ssl_lightning.losses.moco import mocov2_loss, mocov3_loss
from ssl_lightning.losses.nt_xent import multiview_nt_xent_loss, nt_xent_loss
from ssl_lightning.losses.supervised import labelled_cross_entropy
from ssl_lightning.losses.swav import sinkhorn, swav_loss
from ssl_lightning.losses.vicreg import vicreg_loss, vicreg_terms
from ssl_lightning.losses.wmse import norm_mse, wmse_loss

__all__ = [
    "barlow_twins_loss", "barlow_twins_terms", "byol_loss", "byol_regression_loss", "cross_correlation",
    "labelled_cross_entropy",
    "dino_center_update", "dino_loss", "teacher_temp_at",
    "mae_loss", "masked_patch_mse", "normalize_patches", "reconstruction_consistency_loss",
    "mocov2_loss", "mocov3_loss", "multiview_nt_xent_loss", "nt_xent_loss", "sinkhorn", "swav_loss", "vicreg_loss",
    "vicreg_terms",
    "intl_beta", "intl_loss", "intl_momentum_terms", "intl_terms", "norm_mse", "st_loss", "wmse_loss"]
