"""Pure loss functions of tensors. Each docstring says which statistics are global."""
from ssl_lightning.losses.vicreg import vicreg_loss, vicreg_terms

__all__ = ["vicreg_loss", "vicreg_terms"]
