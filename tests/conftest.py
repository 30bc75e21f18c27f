import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # tests/ddp.py and friends
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
