import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # tests/ddp.py and friends
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


import pytest


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    """LightningCLI(args=...) warns when sys.argv also has arguments (pytest's own)."""
    monkeypatch.setattr(sys, "argv", ["ssl-lightning"])
