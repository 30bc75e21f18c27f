"""2 epochs straight == 1 epoch, stop, resume from last.ckpt for 1 more: bit-identical weights.

This needs the optimizer (LARS momentum), the per-step lr schedule, the probe, the loop counters
and the RNG (augmentations, shuffling) all restored; any one missing changes the weights.
"""
import pytorch_lightning as pl
import pytest
import torch

from helpers import StopAfterEpochs, tiny_data, tiny_trainer, tiny_vicreg

pytestmark = pytest.mark.slow


def fit(ckpt_dir, *, stop_after=None, ckpt_path=None):
    pl.seed_everything(0)
    data = tiny_data()
    model = tiny_vicreg(data)
    trainer = tiny_trainer(ckpt_dir)
    if stop_after:
        trainer.callbacks.append(StopAfterEpochs(stop_after))
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return model, trainer


def test_resume_gives_identical_weights(tmp_path):
    straight, t_straight = fit(tmp_path / "straight")
    _, t_first = fit(tmp_path / "split", stop_after=1)
    assert t_first.current_epoch == 1 and (tmp_path / "split" / "last.ckpt").is_file()
    resumed, t_resumed = fit(tmp_path / "split", ckpt_path="last")
    assert t_resumed.global_step == t_straight.global_step == 8  # 128 samples / 32 per step * 2 epochs
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ after resume: {different}"
    opt_a = t_straight.optimizers[0].state_dict()["state"]
    opt_b = t_resumed.optimizers[0].state_dict()["state"]
    assert all(torch.equal(opt_a[i]["momentum_buffer"], opt_b[i]["momentum_buffer"]) for i in opt_a)
    assert t_straight.lr_scheduler_configs[0].scheduler.last_epoch == t_resumed.lr_scheduler_configs[0].scheduler.last_epoch


def test_last_checkpoint_is_replaced_atomically(tmp_path, monkeypatch):
    """A crash while writing leaves the previous last.ckpt intact and no temp files behind."""
    from ssl_lightning import checkpointing

    target = tmp_path / "last.ckpt"
    checkpointing.atomic_torch_save({"step": 1}, target)

    def dying_save(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt("SIGTERM during save")

    monkeypatch.setattr(checkpointing.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        checkpointing.atomic_torch_save({"step": 2}, target)
    monkeypatch.undo()
    assert torch.load(target)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "last.ckpt.sha256.json"]
