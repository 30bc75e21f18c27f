"""budget.seconds: the fit measures its speed in the first steps and ends when the budget is spent,
with the schedules ending at that step; the number is checkpointed, so a resume keeps it."""
import pytest
import pytorch_lightning as pl
import torch

from helpers import TINY_CLI_ARGS, tiny_data, tiny_trainer, tiny_vicreg
from ssl_lightning.callbacks import time_budget
from ssl_lightning.callbacks.time_budget import TimeBudget
from ssl_lightning.checkpointing import LastCheckpoint, load_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:num_classes is 0")
STEP_S = 0.1  # the fake clock's seconds per step: the budget buys a known number of steps


class FakeClock(pl.Callback):
    """time.monotonic for the budget: STEP_S more after every step, so the test never depends on the machine."""

    def __init__(self, monkeypatch):
        self.now = 0.0
        monkeypatch.setattr(time_budget.time, "monotonic", lambda: self.now)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.now += STEP_S


class StopAtStep(pl.Callback):
    """A job killed after step ``step`` (its last.ckpt written by LastCheckpoint every step)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def budget_fit(ckpt_dir, monkeypatch, seconds: float, *extra, ckpt_path=None):
    """The tiny VICReg run, 64 steps configured (2 epochs of 32), with a budget timed by the fake clock."""
    pl.seed_everything(0)
    data = tiny_data(synthetic_size=1024)
    model = tiny_vicreg(data)
    budget = TimeBudget(seconds=seconds, skip_steps=2, calibration_steps=5)
    trainer = tiny_trainer(ckpt_dir, limit_val_batches=0, callbacks=[
        LastCheckpoint(dirpath=str(ckpt_dir), every_n_train_steps=1), FakeClock(monkeypatch), budget, *extra])
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return trainer, budget


def test_the_fit_ends_when_the_budget_is_spent_and_the_schedule_ends_with_it(tmp_path, monkeypatch, caplog):
    """3 s at 0.1 s per step, 90% of it for steps: 0.7 s spent by the end of calibration (step 7), 2.0 s
    left = 20 more steps: 27 of the 64 configured. The warmup-cosine reaches its floor (min_lr_ratio
    0.001) at step 27 instead of 64."""
    with caplog.at_level("INFO"):
        trainer, budget = budget_fit(tmp_path, monkeypatch, 3)
    assert budget.planned_steps == trainer.global_step == 27
    schedule = trainer.lr_scheduler_configs[0].scheduler.lr_lambdas[0]
    assert schedule.total_steps == 27 and schedule(27) == pytest.approx(0.001) and schedule(26) > 0.01
    assert load_checkpoint(tmp_path / "last.ckpt")["global_step"] == 27
    assert "10.00 steps/s over steps 3-7 -> 27 of 64 steps; the learning-rate and momentum schedules end there" \
        in caplog.text


def test_a_budget_larger_than_the_run_changes_nothing(tmp_path, monkeypatch):
    trainer, budget = budget_fit(tmp_path, monkeypatch, 600)
    assert budget.planned_steps == trainer.global_step == 64
    assert trainer.lr_scheduler_configs[0].scheduler.lr_lambdas[0].total_steps == 64


@pytest.mark.slow
def test_a_resumed_run_keeps_the_number_of_steps_and_ends_bit_identical(tmp_path, monkeypatch):
    straight, _ = budget_fit(tmp_path / "straight", monkeypatch, 3)
    budget_fit(tmp_path / "split", monkeypatch, 3, StopAtStep(10))  # decided 27 at step 7, killed after 10
    # resumed where the budget would buy every step: the decision stays, and so does the schedule
    resumed, budget = budget_fit(tmp_path / "split", monkeypatch, 3000, ckpt_path="last")
    assert budget.planned_steps == resumed.global_step == 27
    a, b = straight.lightning_module.state_dict(), resumed.lightning_module.state_dict()
    assert not [k for k in a if not torch.equal(a[k], b[k])], "weights differ after resume"


def test_the_cli_option_and_its_bad_value(tmp_path, capsys):
    from ssl_lightning.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "experiments/fashion_mnist/vicreg.yaml", *TINY_CLI_ARGS, "--budget.seconds", "-5",
              "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        "error: budget.seconds -5.0 must be >= 0 (0: off)")
