"""ssl-lightning: self-supervised learning of image representations with PyTorch Lightning."""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["load_backbone"]


def __getattr__(name: str):
    # lazy: `import ssl_lightning` (every CLI start) must not pay for torch and timm
    if name == "load_backbone":
        from ssl_lightning.export import load_backbone

        return load_backbone
    raise AttributeError(f"module 'ssl_lightning' has no attribute {name!r}")
