"""DINO: self-distillation with no labels (Caron et al., ICCV 2021)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ssl_lightning.losses.dino import dino_center_update, dino_loss, teacher_temp_at
from ssl_lightning.methods.base import SSLOutput
from ssl_lightning.methods.momentum import MomentumMethod
from ssl_lightning.methods.multicrop import check_views, forward_views
from ssl_lightning.models.heads import mlp, parse_spec


class WeightNormLinear(nn.Module):
    """x -> x (gain * v / ||v||)^T, bias-free: ``nn.utils.weight_norm(nn.Linear(...))`` with the gain
    initialised to 1, written out so EMA copies and checkpoints hold two plain parameters.
    fixed_gain keeps the gain at 1 (no gradient): DINO's norm_last_layer."""

    def __init__(self, in_dim: int, out_dim: int, *, fixed_gain: bool = True):
        super().__init__()
        self.weight = nn.Parameter(nn.Linear(in_dim, out_dim, bias=False).weight.detach())  # nn.Linear's init
        self.gain = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not fixed_gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.gain * self.weight / self.weight.norm(dim=1, keepdim=True))


class DINOHead(nn.Module):
    """MLP (Linear[-BN]-GELU hidden layers, Linear to the bottleneck) -> L2-normalise -> weight-normalised
    Linear to out_dim; MLP weights trunc-normal(0.02), biases 0 (official vision_transformer.DINOHead)."""

    def __init__(self, in_dim: int, spec: str, out_dim: int, *, use_bn: bool = False, norm_last_layer: bool = True):
        super().__init__()
        self.mlp = mlp(spec, in_dim, last_bias=True, hidden_norm=use_bn, activation="gelu")
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(parse_spec(spec)[-1], out_dim, fixed_gain=norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


class DINO(MomentumMethod):
    """Student = backbone + DINO head on every crop; teacher = their EMA on the global crops only.
    The teacher's centred, sharpened softmax is the target for every other crop of the student.

    The head is ``self.projector`` so that monitors and evaluation see the teacher's head output;
    by default the teacher is what gets evaluated (evaluate_teacher=True, as in the paper).
    """

    def __init__(
        self,
        projector: str = "2048-2048-256",
        out_dim: int = 65536,
        use_bn: bool = False,
        norm_last_layer: bool = True,
        num_global: int = 2,
        student_temp: float = 0.1,
        teacher_temp: float = 0.07,
        warmup_teacher_temp: float = 0.04,
        warmup_teacher_temp_epochs: int = 30,
        center_momentum: float = 0.9,
        freeze_last_layer: int = 1,
        evaluate_teacher: bool = True,
        **kwargs,
    ):
        super().__init__(evaluate_teacher=evaluate_teacher, **kwargs)
        self.projector = DINOHead(self.feature_dim, projector, out_dim, use_bn=use_bn, norm_last_layer=norm_last_layer)
        self.add_teachers("backbone", "projector")
        self.register_buffer("center", torch.zeros(1, out_dim))

    def frozen_modules(self) -> list[nn.Module]:
        return [self.projector.last_layer] if self.current_epoch < self.hparams.freeze_last_layer else []

    def teacher_temp(self) -> float:
        hp = self.hparams
        return teacher_temp_at(self.current_epoch, warmup_temp=hp.warmup_teacher_temp, final_temp=hp.teacher_temp,
                               warmup_epochs=hp.warmup_teacher_temp_epochs)

    def ssl_step(self, views: list[torch.Tensor]) -> SSLOutput:
        hp = self.hparams
        check_views(views, hp.num_global, "DINO")
        student_features = forward_views(self.backbone, views, by_resolution=True)
        student_out = self.projector(torch.cat(student_features)).chunk(len(views))
        with torch.no_grad():
            teacher_features = forward_views(self.teacher["backbone"], views[:hp.num_global], by_resolution=True)
            teacher_out = self.teacher["projector"](torch.cat(teacher_features))
        temp = self.teacher_temp()
        loss = dino_loss(student_out, teacher_out.chunk(hp.num_global), self.center, teacher_temp=temp,
                         student_temp=hp.student_temp)
        self.center.copy_(dino_center_update(self.center, teacher_out, momentum=hp.center_momentum))
        features = teacher_features[0] if hp.evaluate_teacher else student_features[0]
        return SSLOutput(loss=loss, features=features, logs={"teacher_temp": loss.new_full((), temp)})
