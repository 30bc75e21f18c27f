"""The console output of a fit is readable: Lightning's and W&B's messages a user cannot act on are hidden
(ssl_lightning.console), and everything else still shows."""
import logging
import subprocess
import sys
import warnings
from pathlib import Path

from helpers import TINY_CLI_ARGS
from ssl_lightning.console import UNACTIONABLE_WARNINGS, hide_unactionable_messages

REPO = Path(__file__).resolve().parents[1]
HIDDEN = ("LeafSpec", "litlogger", "anonymous setting", "`srun` command is available", "not supported by the model summary")


def test_only_the_listed_messages_are_hidden(caplog):
    hide_unactionable_messages()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        hide_unactionable_messages()  # catch_warnings reset the filters; the CLI sets them once per process
        for category, start in UNACTIONABLE_WARNINGS:
            warnings.warn(f"{start} (and the rest of the message)", category)
        warnings.warn("batch_size 100 is not divisible by 8 devices", UserWarning)
    assert [str(w.message) for w in caught] == ["batch_size 100 is not divisible by 8 devices"]
    log = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    with caplog.at_level(logging.INFO, logger=log.name):
        log.info("💡 Tip: For seamless cloud logging and experiment tracking, try installing litlogger")
        log.info("GPU available: False, used: False")
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False, used: False"]


def test_a_fit_prints_none_of_them(tmp_path):
    """The demo's config (bf16, which the model summary warns about) on the tiny synthetic run."""
    out = subprocess.run([sys.executable, "-m", "ssl_lightning", "fit", "--config",
                          str(REPO / "experiments/fashion_mnist/vicreg.yaml"), *TINY_CLI_ARGS,
                          "--trainer.enable_model_summary", "true", "--trainer.default_root_dir", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    printed = out.stdout + out.stderr
    assert "finished at epoch" in printed and "W&B run" in printed
    assert not [h for h in HIDDEN if h in printed], printed[-3000:]
