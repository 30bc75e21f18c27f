"""RC-MAE: Exploring the Role of Mean Teachers in Self-supervised Masked Auto-Encoders (Lee et al., ICLR 2023)."""
from __future__ import annotations

import torch

from ssl_lightning.losses.mae import reconstruction_consistency_loss
from ssl_lightning.methods.base import SSLOutput
from ssl_lightning.methods.mae import MAE
from ssl_lightning.methods.momentum import MomentumMethod
from ssl_lightning.models.mae import reconstruct


class RCMAE(MomentumMethod, MAE):
    """MAE student (backbone + decoder) and an EMA teacher of both (MomentumMethod: momentum
    base_momentum -> final_momentum, cosine over the GLOBAL step, updated after each optimizer step).

    The teacher, always in eval mode, reconstructs the SAME masked image (same noise, hence same
    ids); loss = mae_loss + gamma * masked-patch MSE(student pred, sg(teacher pred)). The teacher's
    backbone is what gets evaluated by default (evaluate_teacher=True, as the paper).
    """

    def __init__(self, gamma: float = 1.0, evaluate_teacher: bool = True, **kwargs):
        super().__init__(evaluate_teacher=evaluate_teacher, **kwargs)
        self.add_teachers("backbone", "decoder")
        self.teacher.eval()

    def train(self, mode: bool = True) -> RCMAE:
        """Lightning switches the whole module to train mode; the teacher stays in eval mode
        (no dropout or drop-path in the target, as the official teacher.eval())."""
        super().train(mode)
        self.teacher.eval()
        return self

    def ssl_step(self, views: list[torch.Tensor]) -> SSLOutput:
        images = self.input_view(views)
        noise, ratio = self.mask_noise(images), self.hparams.mask_ratio
        pred, mask, latent = reconstruct(self.backbone, self.decoder, images, ratio, noise)
        with torch.no_grad():
            teacher_pred, _, _ = reconstruct(self.teacher["backbone"], self.teacher["decoder"], images, ratio, noise)
        mae = self.reconstruction_loss(pred, images, mask)
        rc = reconstruction_consistency_loss(pred, teacher_pred, mask)
        return SSLOutput(loss=mae + self.hparams.gamma * rc, features=self.probe_features(images, latent),
                         logs={"mae": mae.detach(), "rc": rc.detach()})
