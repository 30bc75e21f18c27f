"""Method registry: name -> LightningModule class."""
from ssl_lightning.methods.barlow import BarlowTwins
from ssl_lightning.methods.base import SSLMethod, SSLOutput
from ssl_lightning.methods.byol import BYOL
from ssl_lightning.methods.dino import DINO
from ssl_lightning.methods.intl import INTL, INTLM
from ssl_lightning.methods.mae import MAE
from ssl_lightning.methods.mocov2 import MoCoV2
from ssl_lightning.methods.mocov3 import MoCoV3
from ssl_lightning.methods.rcmae import RCMAE
from ssl_lightning.methods.simclr import SimCLR
from ssl_lightning.methods.st import SpectralTransform
from ssl_lightning.methods.supervised import Supervised
from ssl_lightning.methods.swav import SwAV
from ssl_lightning.methods.vicreg import VICReg
from ssl_lightning.methods.wmse import WMSE

METHODS: dict[str, type[SSLMethod]] = {
    "barlow": BarlowTwins,
    "byol": BYOL,
    "dino": DINO,
    "intl": INTL,
    "intl_m": INTLM,
    "mae": MAE,
    "mocov2": MoCoV2,
    "mocov3": MoCoV3,
    "rcmae": RCMAE,
    "simclr": SimCLR,
    "st": SpectralTransform,
    "supervised": Supervised,
    "swav": SwAV,
    "vicreg": VICReg,
    "wmse": WMSE,
}


def method_class(name: str) -> type[SSLMethod]:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name]


__all__ = ["METHODS", "BYOL", "BarlowTwins", "DINO", "INTL", "INTLM", "MAE", "MoCoV2", "MoCoV3", "RCMAE", "SSLMethod",
           "SSLOutput", "SimCLR", "SpectralTransform", "Supervised", "SwAV", "VICReg", "WMSE", "method_class"]
