"""Projector / predictor MLPs built from a spec string such as "2048-2048-2048"."""
from __future__ import annotations

from torch import nn


def parse_spec(spec: str | int) -> list[int]:
    """"2048-2048-256" -> [2048, 2048, 256]; a bare int is a one-layer spec."""
    try:
        dims = [int(part) for part in str(spec).split("-")]
    except ValueError:
        dims = []
    if not dims or any(d < 1 for d in dims):
        raise ValueError(f"MLP spec {spec!r} is not a '-'-separated list of positive widths, e.g. '2048-2048-2048'")
    return dims


ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}


def mlp(spec: str | int, in_dim: int, *, last_bias: bool = False, last_norm: bool = False,
        hidden_norm: bool = True, activation: str = "relu") -> nn.Sequential:
    """Linear-BN-ReLU for every hidden width, then a final Linear (VICReg/Barlow expander).

    last_bias=False matches the official VICReg/Barlow expanders; last_norm appends an affine-free BN
    (MoCo v3 projector, SimCLR v2) when a method wants it. hidden_norm=False gives Linear-act
    hidden layers (MoCo v2's head, DINO's ViT head); activation is "relu" or "gelu".
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}")
    dims = [in_dim] + parse_spec(spec)
    layers: list[nn.Module] = []
    for d_in, d_out in zip(dims[:-2], dims[1:-1]):
        if hidden_norm:
            layers += [nn.Linear(d_in, d_out, bias=False), nn.BatchNorm1d(d_out)]
        else:
            layers.append(nn.Linear(d_in, d_out))
        layers.append(ACTIVATIONS[activation]())
    layers.append(nn.Linear(dims[-2], dims[-1], bias=last_bias))
    if last_norm:
        layers.append(nn.BatchNorm1d(dims[-1], affine=False))
    return nn.Sequential(*layers)
