"""Plain nn.Modules: backbones (registry), heads, norms. No training logic here."""
from ssl_lightning.models.backbones import BACKBONES, build_backbone
from ssl_lightning.models.heads import mlp

__all__ = ["BACKBONES", "build_backbone", "mlp"]
