"""Method registry: name -> LightningModule class."""
from ssl_lightning.methods.base import SSLMethod, SSLOutput
from ssl_lightning.methods.vicreg import VICReg

METHODS: dict[str, type[SSLMethod]] = {
    "vicreg": VICReg,
}


def method_class(name: str) -> type[SSLMethod]:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name]


__all__ = ["METHODS", "SSLMethod", "SSLOutput", "VICReg", "method_class"]
