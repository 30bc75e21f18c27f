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


def _signalled_ddp_fit(rank: int, world: int, signum: int, root: str) -> dict:
    """A 2-rank fit (gloo) of the tiny VICReg in which only rank 1 gets ``signum`` during step 3."""
    import os
    import signal

    from sync_audit import tiny_cli

    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(world), RANK=str(rank))
    pl.seed_everything(0)
    cli = tiny_cli("vicreg", root, devices=world, max_steps=8, steps_per_epoch=8, batch=16 * world)
    cli.trainer.callbacks.append(SignalAtStep(3, signum, rank=1))
    stopped_by = None
    try:
        cli.trainer.fit(cli.model, cli.datamodule)
    except SystemExit as err:
        stopped_by = type(err).__name__
    saved = torch.load(os.path.join(root, "checkpoints", "last.ckpt"), weights_only=False)["global_step"]
    return {"step": cli.trainer.global_step, "saved": saved, "stopped_by": stopped_by,
            "sigterm_handler_restored": signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None)}


@pytest.mark.distributed
@pytest.mark.parametrize("signum", ["SIGUSR1", "SIGTERM"])
def test_a_signal_on_one_ddp_rank_stops_every_rank_at_the_same_step(tmp_path, signum):
    """Rank 1 alone gets the signal during step 3 (global_step 2 -> 3). The flags are all-reduced on the
    device and read a step later: both ranks save last.ckpt at step 4 and stop there; SIGTERM ends the fit
    with Lightning's SIGTERMException on both ranks, and the default SIGTERM handler is back afterwards."""
    import signal

    from ddp import run_distributed

    ranks = run_distributed(_signalled_ddp_fit, int(getattr(signal, signum)), str(tmp_path / "run"),
                            out_dir=tmp_path)
    expected_exit = "SIGTERMException" if signum == "SIGTERM" else None
    for r in ranks:
        assert (r["step"], r["saved"], r["stopped_by"]) == (4, 4, expected_exit), ranks
        assert r["sigterm_handler_restored"], ranks
