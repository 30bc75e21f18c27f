"""ssl-lightning: self-supervised learning of image representations with PyTorch Lightning."""
__version__ = "0.1.0"
