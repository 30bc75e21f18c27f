"""Failure injection: what survives a save killed at any point, a failing disk, a damaged or malicious
checkpoint, and a wrong configuration value. docs/failures.md lists each failure, its outcome and test.

The checkpoints here are small dicts written by atomic_torch_save unless a test needs a real fit;
``step`` tells which save a file came from.
"""
import errno
import os
import signal
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from helpers import SignalAtStep, tiny_data, tiny_trainer, tiny_vicreg
from ssl_lightning import checkpointing
from ssl_lightning.callbacks import PreemptionHandler
from ssl_lightning.checkpointing import (
    AtomicCheckpointIO,
    CheckpointError,
    LastCheckpoint,
    atomic_torch_save,
    load_checkpoint,
    newest_valid_checkpoint,
)
from ssl_lightning.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "experiments/fashion_mnist/vicreg.yaml")


def save_step(path: Path, step: int, keep_last: int = 2) -> None:
    atomic_torch_save({"step": step, "weights": torch.full((4096,), float(step))}, path, keep_last=keep_last)


def step_of(path: Path) -> int:
    return load_checkpoint(path)["step"]


def damage(path: Path, kind: str) -> None:
    """What a failing disk, a full quota during a copy or a partial rsync leaves behind."""
    data = path.read_bytes()
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "zero_bytes":
        path.write_bytes(b"")
    else:  # one flipped bit in the middle, same size: only the sha256 can tell
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes([data[middle] ^ 0x01]) + data[middle + 1:])


def test_keep_last_rotates_copies_and_bounds_disk_use(tmp_path):
    """4 saves with keep_last 3: steps 4, 3, 2 kept as last, last-1, last-2, each with its record;
    lowering keep_last to 1 removes the older copies (disk: keep_last checkpoints)."""
    last = tmp_path / "last.ckpt"
    for step in range(1, 5):
        save_step(last, step, keep_last=3)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["last-1.ckpt", "last-1.ckpt.sha256.json", "last-2.ckpt", "last-2.ckpt.sha256.json",
                     "last.ckpt", "last.ckpt.sha256.json"]
    assert [step_of(tmp_path / n) for n in ("last.ckpt", "last-1.ckpt", "last-2.ckpt")] == [4, 3, 2]
    save_step(last, 5, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "last.ckpt.sha256.json"]


def _save_and_die_at(event: int, path: Path) -> int:
    """Forks a child that saves step 3 and SIGKILLs itself at its ``event``-th file-system operation
    (a write of torch.save, an fsync, a link or a rename); returns how many it made (when it lived)."""
    calls = {"n": 0}

    def dying(fn):
        def wrapper(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == event:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*args, **kwargs)
        return wrapper

    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            checkpointing._HashingWriter.write = dying(checkpointing._HashingWriter.write)
            for name in ("fsync", "link", "replace"):
                setattr(os, name, dying(getattr(os, name)))
            save_step(path, 3)
            os.write(write_fd, str(calls["n"]).encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    _, status = os.waitpid(pid, 0)
    made = os.read(read_fd, 64)
    os.close(read_fd)
    if event:
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"event {event} was not reached"
    return int(made or 0)


def test_sigkill_at_every_point_of_a_save_leaves_a_valid_checkpoint(tmp_path):
    """kill -9 at each of the save's file-system operations (every write torch.save makes, each fsync,
    hard link and rename): the newest checkpoint that verifies is the save in flight (step 3) or the
    one before it (step 2), never nothing and never an older one."""
    def two_saves(run: Path) -> Path:
        save_step(run / "last.ckpt", 1)
        save_step(run / "last.ckpt", 2)
        return run / "last.ckpt"

    events = _save_and_die_at(0, two_saves(tmp_path / "dry"))
    assert events >= 10, f"a save makes {events} file-system operations"
    outcomes = []
    for event in range(1, events + 1):
        run = tmp_path / f"kill{event}"
        _save_and_die_at(event, two_saves(run))
        outcomes.append(step_of(newest_valid_checkpoint(run)))
    assert set(outcomes) <= {2, 3} and outcomes[0] == 2 and outcomes[-1] == 3, outcomes


@pytest.mark.parametrize("kind", ["truncated", "zero_bytes", "bit_flip"])
def test_damaged_last_checkpoint_falls_back_to_the_previous(tmp_path, kind):
    """A damaged last.ckpt is skipped with a warning naming it and why; last-1.ckpt (step 1) is used.
    With both damaged, one error names each file and its problem."""
    last = tmp_path / "last.ckpt"
    save_step(last, 1)
    save_step(last, 2)
    damage(last, kind)
    reason = {"truncated": "truncated", "zero_bytes": "empty", "bit_flip": "sha256 differs"}[kind]
    with pytest.raises(CheckpointError, match=f"{last} is not usable: .*{reason}"):
        load_checkpoint(last)
    with pytest.warns(UserWarning, match=f"skipped checkpoint {last} is not usable: .*{reason}"):
        assert newest_valid_checkpoint(tmp_path) == tmp_path / "last-1.ckpt"
    assert step_of(tmp_path / "last-1.ckpt") == 1
    damage(tmp_path / "last-1.ckpt", "truncated")
    both = rf"(?=.*/last\.ckpt is not usable: .*{reason})(?=.*/last-1\.ckpt is not usable: it is \d+ bytes)"
    with pytest.raises(CheckpointError, match=f"no usable checkpoint in {tmp_path}: {both}"):
        newest_valid_checkpoint(tmp_path)


def test_checkpoint_without_record_loads_with_a_warning(tmp_path):
    """Checkpoints written before records existed still load (unverified, said so)."""
    torch.save({"step": 7}, tmp_path / "old.ckpt")
    with pytest.warns(UserWarning, match="no .sha256.json record"):
        assert step_of(tmp_path / "old.ckpt") == 7


class RunsCode:
    """Unpickling this object would create ``marker``: a stand-in for arbitrary code in a checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_checkpoint_with_code_is_refused_without_running_it(tmp_path):
    """A checkpoint whose record matches (written by our saver) but which carries a pickled call to
    io.open (builtins.open): every load path refuses it naming the file and the type, and the file is never created.
    Resume skips it for the previous checkpoint; the Trainer's checkpoint IO refuses weights_only=False."""
    marker = tmp_path / "code_ran"
    last = tmp_path / "last.ckpt"
    save_step(last, 1)
    atomic_torch_save({"step": 2, "payload": RunsCode(marker)}, last, keep_last=2)
    with pytest.raises(CheckpointError, match=rf"{last} holds a pickled object of type io\.open, which is not "
                                              "on torch's weights_only allow-list"):
        load_checkpoint(last)
    with pytest.raises(CheckpointError, match="io.open"):
        AtomicCheckpointIO().load_checkpoint(last)
    with pytest.raises(CheckpointError, match="weights_only=False"):
        AtomicCheckpointIO().load_checkpoint(tmp_path / "last-1.ckpt", weights_only=False)
    with pytest.warns(UserWarning, match="skipped .*io.open"):
        assert newest_valid_checkpoint(tmp_path) == tmp_path / "last-1.ckpt"
    assert not marker.exists(), "the pickled code ran"


@pytest.mark.parametrize("command", [["linear"], ["knn"], ["finetune", "--labels", "10"], ["landscape"]])
def test_offline_commands_give_one_line_for_a_corrupt_checkpoint(tmp_path, capsys, command):
    last = tmp_path / "last.ckpt"
    save_step(last, 1)
    damage(last, "truncated")
    with pytest.raises(SystemExit) as exit_info:
        main([command[0], "--ckpt", str(last), "--no_wandb", *command[1:]])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: checkpoint {last} is not usable: it is ") and "Traceback" not in err


@pytest.mark.parametrize("failure", [(errno.ENOSPC, "write"), (errno.EIO, "replace")])
def test_disk_failure_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch, failure):
    """ENOSPC half-way through writing, EIO on the final rename: one error naming the checkpoint, the
    directory and its free space; the previous checkpoints verify and no temporary file is left."""
    code, where = failure
    last = tmp_path / "last.ckpt"
    save_step(last, 1)
    save_step(last, 2)

    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    if where == "write":
        monkeypatch.setattr(checkpointing._HashingWriter, "write", fail)
    else:
        monkeypatch.setattr(checkpointing.os, "replace", fail)
    with pytest.raises(CheckpointError, match=rf"could not write checkpoint {last}: {os.strerror(code)} "
                                              rf"\(\d+\.\d\d GiB free in {tmp_path}\)"):
        save_step(last, 3)
    monkeypatch.undo()
    assert [step_of(last), step_of(tmp_path / "last-1.ckpt")] == [2, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last-1.ckpt", "last-1.ckpt.sha256.json",
                                                          "last.ckpt", "last.ckpt.sha256.json"]


def fit(ckpt_dir, *callbacks, ckpt_path=None):
    pl.seed_everything(0)
    data = tiny_data(augment="device")
    model = tiny_vicreg(data)
    trainer = tiny_trainer(ckpt_dir, callbacks=[LastCheckpoint(str(ckpt_dir), every_n_train_steps=2,
                                                               every_n_epochs=0), *callbacks])
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return model, trainer


@pytest.mark.slow
def test_full_disk_stops_the_fit_and_resume_from_the_fallback_is_exact(tmp_path, monkeypatch):
    """2 epochs of 4 steps, saving every 2 steps. Interrupted run: the disk fills at the step-6 save, so
    the fit stops with CheckpointError and last.ckpt is step 4; then last.ckpt is bit-flipped; resume
    ("last") skips it, continues from last-1.ckpt (step 2) and ends with the uninterrupted weights."""
    straight, _ = fit(tmp_path / "straight")
    real_save = torch.save

    def full_disk_at_step_6(obj, f):
        if obj["global_step"] == 6:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(obj, f)

    monkeypatch.setattr(checkpointing.torch, "save", full_disk_at_step_6)
    with pytest.raises(CheckpointError, match="No space left on device"):
        fit(tmp_path / "split")
    monkeypatch.undo()
    last = tmp_path / "split" / "last.ckpt"
    assert [load_checkpoint(last)["global_step"], load_checkpoint(last.with_name("last-1.ckpt"))["global_step"]] \
        == [4, 2]
    damage(last, "bit_flip")
    with pytest.warns(UserWarning, match="skipped checkpoint .*last.ckpt is not usable: its sha256 differs"):
        resumed, trainer = fit(tmp_path / "split", ckpt_path="last")
    assert trainer.global_step == 8
    a, b = straight.state_dict(), resumed.state_dict()
    assert not [k for k in a if not torch.equal(a[k], b[k])], "weights differ after the fallback resume"


BAD_VALUES = [  # (arguments, what the one line must contain)
    (["--model.init_args.optimizer.lr", "-1"], "lr -1.0 and probe_lr 0.1 must be positive"),
    (["--model.init_args.optimizer.name", "adam"], "unknown optimizer 'adam'; choose one of"),
    (["--data.views", '[{"size": 0}]'], "view size 0 and count 1 must both be >= 1"),
    (["--data.batch_size", "0"], "batch_size 0 must be >= 1"),
    (["--checkpoint.keep_last", "0"], "checkpoint.keep_last 0 must be >= 1"),
    (["--checkpoint.every_n_epochs", "-1"], "checkpoint.every_n_epochs -1 must be >= 0"),
    (["--trainer.max_epochs", "abc"], "trainer.max_epochs 'abc' is not accepted (expected int)"),
    (["--trainer.precision", "17"], "trainer.precision '17' is not accepted (expected one of 'auto' or one of 64, 32, 16"),
    (["--weights_only", "false"], "weights_only false is not supported"),
    (["--model.init_args.backbone", "resnet999"], "unknown backbone 'resnet999'; choose one of"),
    (["--preemption.signal_name", "SIGFOO"], "unknown signal 'SIGFOO'"),
    (["--model.init_args.projector", "32-abc"], "MLP spec '32-abc' is not a '-'-separated list"),
    (["--data.dataset", "imagenet5"], "augment: device supports fashion_mnist, cifar10, cifar100, stl10, synthetic, digits, imagefolder; use augment: workers for imagenet5"),
    (["--no_such_key", "1"], "unrecognized arguments: --no_such_key 1"),
]


def test_bad_configuration_values_end_with_one_line(capsys):
    """14 kinds of bad value: each ends the command with exit status 2, and the last line printed is
    ``error: <one sentence>`` naming the key and value; no traceback, no Namespace dump."""
    for args, expected in BAD_VALUES:
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", "--config", CONFIG, "--trainer.logger", "false", *args])
        err = capsys.readouterr().err
        last_line = err.strip().splitlines()[-1]
        assert exit_info.value.code == 2, args
        assert last_line.startswith("error: ") and expected in last_line, (args, last_line)
        assert "Namespace(" not in err and "Traceback" not in err, (args, err[-2000:])


def nan_loss_at(model, steps: set[int]) -> None:
    """Makes the loss NaN at the given global steps, as a diverging run would."""
    ssl_step = model.ssl_step

    def nan_at_steps(views):
        out = ssl_step(views)
        if model.global_step in steps:
            out.loss = out.loss * float("nan")
        return out
    model.ssl_step = nan_at_steps


class Snapshots(pl.Callback):
    """Weights and momentum buffers before and after every step, keyed by the step."""

    def __init__(self):
        self.before, self.after = {}, {}

    @staticmethod
    def snapshot(trainer, model):
        optimizer = trainer.optimizers[0].state_dict()["state"]
        return ({k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()},
                {i: s["momentum_buffer"].clone() for i, s in optimizer.items() if "momentum_buffer" in s})

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before[trainer.global_step] = self.snapshot(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after[trainer.global_step - 1] = self.snapshot(trainer, pl_module)


def equal_states(a, b) -> bool:
    return all(torch.equal(a[0][k], b[0][k]) for k in a[0]) and a[1].keys() == b[1].keys() \
        and all(torch.equal(a[1][i], b[1][i]) for i in a[1])


@pytest.mark.slow
def test_nonfinite_loss_skips_steps_then_stops(tmp_path):
    """on_nonfinite skip, at most 2 skips: NaN losses at steps 1 and 2 leave weights (probe and
    BatchNorm statistics aside: the forward pass still ran) and momentum buffers exactly as before
    those steps, step 3 trains again; a third NaN (step 5) stops the fit with FloatingPointError, and
    the checkpoint written at step 4 holds only finite weights."""
    pl.seed_everything(0)
    data = tiny_data()
    model = tiny_vicreg(data, on_nonfinite="skip", max_nonfinite_skips=2)
    nan_loss_at(model, {1, 2, 5})
    snapshots = Snapshots()
    trainer = tiny_trainer(tmp_path, callbacks=[LastCheckpoint(str(tmp_path), every_n_train_steps=2), snapshots])
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 5; .*\(on_nonfinite skip, 2 step\(s\) skipped"):
        trainer.fit(model, data)
    params = {k for k, _ in model.named_parameters() if not k.startswith("probe.")}

    def trained(step):
        before, after = snapshots.before[step], snapshots.after[step]
        return ({k: v for k, v in before[0].items() if k in params}, before[1]), \
            ({k: v for k, v in after[0].items() if k in params}, after[1])

    assert equal_states(*trained(1)) and equal_states(*trained(2)), "a skipped step changed weights or momentum"
    assert not equal_states(*trained(3)), "training resumes after the skipped steps"
    saved = load_checkpoint(tmp_path / "last.ckpt")
    assert saved["global_step"] == 4 and all(torch.isfinite(v).all() for v in saved["state_dict"].values()
                                             if v.is_floating_point())


def test_nonfinite_weights_are_never_written(tmp_path):
    """A state dict holding a NaN is refused before anything is written; last.ckpt stays step 1."""
    last = tmp_path / "last.ckpt"
    save_step(last, 1)
    with pytest.raises(CheckpointError, match=rf"refusing to write checkpoint {last}: non-finite weights in 1 "
                                              r"tensor\(s\) \(head.weight\)"):
        state = {"head.weight": torch.tensor([1.0, float("nan")]), "head.bias": torch.zeros(2)}
        AtomicCheckpointIO().save_checkpoint({"step": 2, "state_dict": state}, last)
    assert step_of(last) == 1


@pytest.mark.slow
def test_sigterm_saves_at_the_end_of_the_step_and_stops(tmp_path):
    """Saves every 2 steps; SIGTERM during step 3: the step finishes, last.ckpt is step 3 and verifies,
    last-1.ckpt is step 2, no requeue, and Lightning ends the fit (SIGTERMException, a SystemExit)."""
    pl.seed_everything(0)
    data = tiny_data()
    model = tiny_vicreg(data)
    callbacks = [LastCheckpoint(str(tmp_path), every_n_train_steps=2, every_n_epochs=0), PreemptionHandler(),
                 SignalAtStep(3, signal.SIGTERM)]
    trainer = tiny_trainer(tmp_path, callbacks=callbacks)
    with pytest.raises(SystemExit):
        trainer.fit(model, data)
    assert trainer.global_step == 3
    assert [load_checkpoint(tmp_path / n)["global_step"] for n in ("last.ckpt", "last-1.ckpt")] == [3, 2]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, "the fit restores the default SIGTERM handler"


@pytest.mark.slow
def test_nonfinite_stop_undoes_the_step_and_stops_one_step_later(tmp_path):
    """on_nonfinite stop (the default), NaN at step 2, no checkpoint due: the host reads step 2's flag at
    the end of step 3 (no synchronisation in step 2), so step 3 runs; step 2 was undone on the device:
    its weights and momentum buffers are exactly those before it. The error names step 2."""
    pl.seed_everything(0)
    data = tiny_data()
    model = tiny_vicreg(data)
    nan_loss_at(model, {2})
    snapshots = Snapshots()
    trainer = tiny_trainer(tmp_path, callbacks=[LastCheckpoint(str(tmp_path), every_n_epochs=0), snapshots])
    with pytest.raises(FloatingPointError, match=r"VICReg loss is nan at step 2; .*\(on_nonfinite stop, 0 step\(s\)"):
        trainer.fit(model, data)
    params = {k for k, _ in model.named_parameters()}
    before, after = snapshots.before[2], snapshots.after[2]
    assert all(torch.equal(before[0][k], after[0][k]) for k in params) and equal_states(
        ({}, before[1]), ({}, after[1])), "the non-finite step changed weights or momentum"
    assert 3 in snapshots.before and 3 not in snapshots.after, "stopped during step 3, after its optimizer step"
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _nan_on_rank_1(rank: int, world: int) -> dict:
    """One DDP step of a tiny VICReg whose loss is NaN on rank 1 only, through the training step's
    poisoning, gradients_finite and FiniteStep; returns the flag and whether any weight changed."""
    from torch.nn.parallel import DistributedDataParallel

    from equivalence import StepWrapper
    from ssl_lightning.methods import VICReg
    from ssl_lightning.optim import FiniteStep, gradients_finite

    torch.manual_seed(0)
    method = VICReg(backbone="convnet", backbone_kwargs={"width": 4}, projector="16-16", image_size=8, num_classes=0)
    method.configure_model()
    optimizer = torch.optim.SGD(method.parameters(), lr=0.1, momentum=0.9)
    model = DistributedDataParallel(StepWrapper(method))
    views = [torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(rank)) for _ in range(2)]
    results = []
    for step in range(2):
        before = [p.detach().clone() for p in method.parameters()]
        loss = model(*views) * (float("nan") if rank == 1 and step == 1 else 1.0)
        (loss * torch.where(torch.isfinite(loss.detach()), 1.0, float("nan"))).backward()
        finite = gradients_finite(optimizer)
        guard = FiniteStep(optimizer, finite)
        optimizer.step()
        guard.apply()
        optimizer.zero_grad()
        changed = any(not torch.equal(a, p) for a, p in zip(before, method.parameters()))
        results.append((bool(finite), changed, all(torch.isfinite(p).all() for p in method.parameters())))
    return {"steps": results}


@pytest.mark.distributed
def test_a_nonfinite_loss_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    """Rank 1's loss is NaN at the second step: its NaN gradients reach every rank through DDP's gradient
    average, so both ranks flag the step, undo it (weights unchanged and finite) and decide alike; the
    first step trains on both. No extra collective decides it."""
    from ddp import run_distributed

    ranks = run_distributed(_nan_on_rank_1, out_dir=tmp_path)
    for r in ranks:
        assert r["steps"] == [(True, True, True), (False, False, True)], ranks
