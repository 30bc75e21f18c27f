"""What the console shows: Lightning's and W&B's messages that a user of this CLI cannot act on are
hidden, so that what is left (progress, results, our own errors and warnings) can be read."""
from __future__ import annotations

import logging
import re
import warnings

# (category, start of the message) of Python warnings raised inside the libraries, not by the user's setup
UNACTIONABLE_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    # Lightning's SLURM environment on any machine with srun; `ssl-lightning submit` runs srun itself
    (UserWarning, "The `srun` command is available on your system but is not used"),
    # pytorch-lightning 2.6 calling a torch API that torch has deprecated
    (Warning, "`isinstance(treespec, LeafSpec)` is deprecated"),
    # the model summary's size estimate under bf16; the parameter counts it prints are right
    (UserWarning, "Precision bf16-mixed is not supported by the model summary"),
)
# Lightning's advertisement for its own cloud logger, printed by every Trainer
UNACTIONABLE_LOG_PREFIXES: tuple[str, ...] = ("💡 Tip: For seamless cloud logging",)


def first_line(err: BaseException) -> str:
    """The first line of an exception's message ("" when it has none): what a one-line error quotes."""
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


class _DropPrefixes(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(UNACTIONABLE_LOG_PREFIXES)


def hide_unactionable_messages() -> None:
    """Filters UNACTIONABLE_WARNINGS and UNACTIONABLE_LOG_PREFIXES for this process (idempotent)."""
    for category, start in UNACTIONABLE_WARNINGS:
        warnings.filterwarnings("ignore", message=f"^{re.escape(start)}", category=category)
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropPrefixes) for f in log.filters):
            log.addFilter(_DropPrefixes())

