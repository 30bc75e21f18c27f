"""Preemption without SLURM: a SIGUSR1 mid-epoch saves last.ckpt at the end of that step and stops;
resuming from it finishes the run with exactly the weights of an uninterrupted run.

Bit-identical weights need the loader to restart at the next batch of the same epoch order (no
sample repeated or skipped), the step counter, the schedule, the optimizer and the RNG restored.
(The SLURM requeue path is tested against a real cluster in test_slurm.py.)
"""

import pytest
import pytorch_lightning as pl
import torch

from helpers import SignalAtStep, tiny_data, tiny_trainer, tiny_vicreg
from ssl_lightning.callbacks import PreemptionHandler

pytestmark = pytest.mark.slow
STEPS_PER_EPOCH = 4  # 128 samples / 32


class SeenSamples(pl.Callback):
    def __init__(self):
        self.steps: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append(trainer.global_step)


def fit(ckpt_dir, *callbacks, ckpt_path=None):
    pl.seed_everything(0)
    data = tiny_data(augment="device")
    model = tiny_vicreg(data)
    trainer = tiny_trainer(ckpt_dir)
    trainer.callbacks += [PreemptionHandler(), *callbacks]
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return model, trainer


def test_signal_mid_epoch_then_resume_equals_uninterrupted(tmp_path):
    straight, t_straight = fit(tmp_path / "straight")
    steps = SeenSamples()
    _, t_first = fit(tmp_path / "split", SignalAtStep(6), steps)
    assert t_first.global_step == 6 and steps.steps[-1] == 6, "stopped at the end of the signalled step"
    saved = torch.load(tmp_path / "split" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 6 and saved["epoch"] == 1, "the checkpoint is the mid-epoch step, not an epoch end"
    resumed_steps = SeenSamples()
    resumed, t_resumed = fit(tmp_path / "split", resumed_steps, ckpt_path="last")
    assert resumed_steps.steps == [7, 8], "only the rest of the interrupted epoch runs"
    assert t_resumed.global_step == t_straight.global_step == 2 * STEPS_PER_EPOCH
    a, b = straight.state_dict(), resumed.state_dict()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ after preemption + resume: {different}"


def test_unknown_signal_name_is_rejected():
    with pytest.raises(ValueError, match="SIGFOO"):
        PreemptionHandler("SIGFOO")
