"""Every checkpoint written, rotated, verified and loaded in one place.

Writing (``atomic_torch_save``): the temporary file lives next to the target, is fsynced and renamed
over it, so a crash or SIGTERM leaves the old or the new checkpoint, never a half-written one
(Lightning's own fsspec save writes it in the system temp dir, and the final move across file
systems is a copy). Its size and sha256, hashed while writing, go into ``<name>.sha256.json`` next
to it. ``last.ckpt`` keeps ``keep_last - 1`` older copies (``last-1.ckpt`` the previous one, ...),
rotated with hard links so that at every moment at most one file disagrees with its record: any
single failure (a kill at any point of the save, a full disk, a truncated copy, a flipped bit) leaves
a checkpoint that verifies.

Reading (``load_checkpoint``): the record is checked before ``torch.load(weights_only=True)``, and
every failure becomes a one-line ``CheckpointError`` naming the file and what is wrong with it.
``newest_valid_checkpoint`` picks what ``--ckpt_path last`` resumes from.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from lightning_fabric.plugins import TorchCheckpointIO
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities import rank_zero_warn

from ssl_lightning.console import first_line

RECORD_SUFFIX = ".sha256.json"
CHECKPOINT_DIR = "checkpoints"  # <run dir>/checkpoints, unless checkpoint.dirpath says otherwise
_HISTORY = re.compile(r"(?P<stem>.+)-(?P<age>\d+)\.ckpt")


class CheckpointError(Exception):
    """A checkpoint that cannot be written, verified or safely loaded; the message is one line for the user."""


def record_path(path: str | os.PathLike) -> Path:
    """``<dir>/last.ckpt`` -> ``<dir>/last.ckpt.sha256.json``: the size and sha256 recorded at write time."""
    path = Path(path)
    return path.with_name(path.name + RECORD_SUFFIX)


def history_path(path: str | os.PathLike, age: int) -> Path:
    """The copy of ``path`` that is ``age`` saves old: 0 -> last.ckpt, 1 -> last-1.ckpt, ..."""
    path = Path(path)
    return path if age == 0 else path.with_name(f"{path.stem}-{age}{path.suffix}")


class _HashingWriter:
    """A file wrapper that hashes and counts what torch.save writes through it."""

    def __init__(self, f: BinaryIO):
        self.f, self.sha256, self.size = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def _write_fsynced(path: Path, write) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _replace_with_link(src: Path, dst: Path) -> None:
    """dst becomes another name of src's file, atomically (dst is never missing or partial)."""
    tmp = dst.with_name(f".{dst.name}.link-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def _rotate(path: Path, keep_last: int) -> None:
    """last-(k-1) -> last-k for k = keep_last-1 .. 1, data before record: each step leaves at most one
    file that disagrees with its record, and the younger copy of it still verifies."""
    for age in range(keep_last - 1, 0, -1):
        src, dst = history_path(path, age - 1), history_path(path, age)
        if not src.is_file():
            continue
        _replace_with_link(src, dst)
        if record_path(src).is_file():
            _replace_with_link(record_path(src), record_path(dst))
        else:
            record_path(dst).unlink(missing_ok=True)


def _drop_older_than(path: Path, keep_last: int) -> None:
    """Copies beyond keep_last (left by a run that kept more) go, so disk use stays keep_last copies."""
    for old in path.parent.glob(f"{path.stem}-*{path.suffix}"):
        match = _HISTORY.fullmatch(old.name)
        if match and match["stem"] == path.stem and int(match["age"]) >= keep_last:
            old.unlink(missing_ok=True)
            record_path(old).unlink(missing_ok=True)


def _fsync_dir(directory: Path) -> None:
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the renames themselves durable
    finally:
        os.close(dir_fd)


def atomic_torch_save(obj: Any, path: str | os.PathLike, keep_last: int = 1) -> None:
    """torch.save to ``path`` via a fsynced sibling temp file and os.replace, with its size and sha256
    recorded in ``record_path(path)``; ``keep_last`` > 1 first moves the previous copies one age older.

    Raises CheckpointError naming the directory and its free space when the disk refuses the write
    (ENOSPC, EIO, read-only): the temp file is removed and the previous copies are untouched.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last {keep_last} must be >= 1 (1 keeps only the newest checkpoint)")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp_record = tmp.with_name(tmp.name + RECORD_SUFFIX)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        writer = None

        def write_checkpoint(f):
            nonlocal writer
            writer = _HashingWriter(f)
            torch.save(obj, writer)

        _write_fsynced(tmp, write_checkpoint)
        record = {"size": writer.size, "sha256": writer.sha256.hexdigest()}
        _write_fsynced(tmp_record, lambda f: f.write(json.dumps(record).encode()))
        _rotate(path, keep_last)
        os.replace(tmp, path)
        os.replace(tmp_record, record_path(path))
        _drop_older_than(path, keep_last)
        _fsync_dir(path.parent)
    except OSError as err:
        raise CheckpointError(_write_failure(path, err)) from err
    finally:
        tmp.unlink(missing_ok=True)
        tmp_record.unlink(missing_ok=True)


def _write_failure(path: Path, err: OSError) -> str:
    directory = next((p for p in (path.parent, *path.parents) if p.exists()), Path("/"))
    try:
        free = f"{shutil.disk_usage(directory).free / 2**30:.2f} GiB free"
    except OSError:
        free = "free space unknown"
    return (f"could not write checkpoint {path}: {err.strerror or err} ({free} in {directory}); the previous "
            "checkpoints there are intact: free space or set checkpoint.dirpath to another disk, then resume "
            "with --ckpt_path last")


def checksum_problem(path: str | os.PathLike) -> str | None:
    """What is wrong with ``path`` against the size and sha256 recorded when it was written, or None
    when it matches. A file without a record (an older version wrote it, or it was copied without
    ``<name>.sha256.json``) is not judged here: it returns None and loading decides."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        return "it is empty (0 bytes)"
    if not record_path(path).is_file():
        return None
    try:
        record = json.loads(record_path(path).read_text())
        expected_size, expected_sha = int(record["size"]), str(record["sha256"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"its record {record_path(path).name} is unreadable ({err})"
    if size != expected_size:
        return f"it is {size} bytes, {expected_size} were written (truncated or overwritten)"
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            sha.update(chunk)
    if sha.hexdigest() != expected_sha:
        return ("its sha256 differs from the one recorded at write time (bit rot, a modified file, or a save "
                "killed between its data and its record)")
    return None


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", mmap: bool = True) -> dict[str, Any]:
    """The checkpoint dict at ``path``, verified against its record and loaded with
    ``torch.load(weights_only=True)``; with ``mmap`` tensors are read from the file on first use.

    Every load path uses this (resume, offline evaluation, landscapes, export). Raises CheckpointError
    with one line naming the file and the problem: missing, empty, truncated, corrupt, or holding a
    pickled object outside torch's weights_only allow-list (which is never unpickled, so its code never runs).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; train first (ssl-lightning fit ...) or fix the path")
    try:
        problem = checksum_problem(path)
        if problem is None and not record_path(path).is_file():
            rank_zero_warn(f"checkpoint {path} has no {RECORD_SUFFIX} record (an older version wrote it, or it "
                           "was copied without it): loading it unverified")
    except OSError as err:
        problem = f"it cannot be read ({err.strerror or err})"
    if problem:
        raise CheckpointError(f"checkpoint {path} is not usable: {problem}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise CheckpointError(_unsafe_message(path, err)) from err
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        reason = first_line(err) or type(err).__name__
        raise CheckpointError(f"checkpoint {path} is not usable: torch.load failed ({reason})") from err
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not a checkpoint dict; "
                              "pass a file written by `ssl-lightning fit`")
    return checkpoint


def _unsafe_message(path: Path, err: pickle.UnpicklingError) -> str:
    match = re.search(r"GLOBAL ([\w.]+)", str(err))
    what = f"a pickled object of type {match[1]}" if match else "a pickled object"
    return (f"checkpoint {path} holds {what}, which is not on torch's weights_only allow-list: unpickling it "
            "could run arbitrary code, so it was refused (nothing in it ran). Use checkpoints written by "
            "`ssl-lightning fit`; if you trust this file and the type is plain data, register it with "
            "torch.serialization.add_safe_globals")


def _newest_first(path: Path) -> tuple[int, int]:
    match = _HISTORY.fullmatch(path.name)
    return -path.stat().st_mtime_ns, int(match["age"]) if match else 0


def newest_valid_checkpoint(dirpath: str | os.PathLike) -> Path | None:
    """The newest ``*.ckpt`` in ``dirpath`` (by write time; last.ckpt before last-1.ckpt on a tie) that
    verifies and loads; each newer one that does not is skipped with a warning naming it and why.
    None when the directory holds no checkpoint; CheckpointError listing every file and its problem
    when none is usable."""
    directory = Path(dirpath)
    candidates = sorted(directory.glob("*.ckpt"), key=_newest_first) if directory.is_dir() else []
    problems = []
    for candidate in candidates:
        try:
            load_checkpoint(candidate)
        except CheckpointError as err:
            problems.append(str(err))
            continue
        for problem in problems:
            rank_zero_warn(f"skipped {problem}; resuming from the older {candidate}")
        return candidate
    if problems:
        raise CheckpointError(f"no usable checkpoint in {directory}: " + "; ".join(problems) +
                              ". Restore one from a backup, or start afresh without --ckpt_path")
    return None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Trainer plugin: every checkpoint the Trainer writes goes through atomic_torch_save.

    ``storage_options={"keep_last": N}`` (LastCheckpoint passes it) keeps N copies of that file."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        options = dict(storage_options or {})
        keep_last = options.pop("keep_last", 1)
        if options:
            raise TypeError(f"AtomicCheckpointIO takes only storage_options={{'keep_last': N}}, "
                            f"got {storage_options!r}")
        nonfinite = [name for name, value in checkpoint.get("state_dict", {}).items()
                     if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all()]
        if nonfinite:
            raise CheckpointError(f"refusing to write checkpoint {path}: non-finite weights in {len(nonfinite)} "
                                  f"tensor(s) ({', '.join(nonfinite[:3])}); the previous checkpoints are kept: "
                                  "resume from them with a lower optimizer.lr or model on_nonfinite skip")
        atomic_torch_save(checkpoint, path, keep_last=keep_last)

    def load_checkpoint(self, path: str | os.PathLike, map_location: Any = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        if weights_only is False:
            raise CheckpointError(f"refusing to load {path} with weights_only=False: checkpoints load with "
                                  "weights_only=True so that a file cannot run code; drop --weights_only false")
        return load_checkpoint(path, map_location=map_location, mmap=False)  # resumed tensors are trained in place


class LastCheckpoint(ModelCheckpoint):
    """Keeps ``<dirpath>/last.ckpt`` up to date: every ``every_n_train_steps`` optimizer steps
    (0 = off), at the end of every ``every_n_epochs``-th epoch (0 = off) and at the step that reaches
    trainer.max_steps; PreemptionHandler adds one on SIGUSR1. ``keep_last`` copies are kept
    (last.ckpt, last-1.ckpt, ...; disk: keep_last checkpoints, one more during a save).
    ``keep_every_n_epochs`` K > 0 also keeps ``<dirpath>/epoch=E.ckpt`` (E = epochs completed) at the
    end of every K-th epoch, through the same atomic, verified save (none by default).

    A ModelCheckpoint subclass so that ``--ckpt_path last`` finds it: "last" means the newest
    checkpoint in dirpath that verifies and loads (newest_valid_checkpoint). Its own save rules
    replace ModelCheckpoint's top-k/monitor logic, which never writes last.ckpt when save_top_k=0.
    """

    def __init__(self, dirpath: str | None = None, every_n_train_steps: int = 0, every_n_epochs: int = 1,
                 keep_last: int = 2, keep_every_n_epochs: int = 0):
        for key, value in (("every_n_train_steps", every_n_train_steps), ("every_n_epochs", every_n_epochs),
                           ("keep_every_n_epochs", keep_every_n_epochs)):
            if value < 0:
                raise ValueError(f"checkpoint.{key} {value} must be >= 0 (0 turns that trigger off)")
        if keep_last < 1:
            raise ValueError(f"checkpoint.keep_last {keep_last} must be >= 1; use 2 or more so that one failed "
                             "save still leaves a valid checkpoint")
        super().__init__(dirpath=dirpath, save_last=True, save_top_k=0, enable_version_counter=False)
        self.every_steps, self.every_epochs, self.keep_last = every_n_train_steps, every_n_epochs, keep_last
        self.keep_every_epochs = keep_every_n_epochs

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if not isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO):
            raise TypeError(f"LastCheckpoint needs Trainer(plugins=[AtomicCheckpointIO()]) to rotate and verify "
                            f"checkpoints; the trainer uses {type(trainer.strategy.checkpoint_io).__name__}")

    def _find_last_checkpoints(self, trainer) -> set[str]:
        """What Lightning resumes from for ckpt_path="last" (on every rank, before setup)."""
        newest = newest_valid_checkpoint(self.dirpath or self._ModelCheckpoint__resolve_ckpt_dir(trainer))
        return {str(newest)} if newest else set()

    def save_now(self, trainer) -> str:
        """Write last.ckpt for the current step, whatever the schedule (preemption)."""
        self._save_last(trainer)
        return self.last_model_path

    def _save_last(self, trainer) -> None:
        if trainer.sanity_checking or trainer.fast_dev_run or self._last_global_step_saved == trainer.global_step \
                and trainer.global_step > 0 and self.last_model_path:
            return
        self.last_model_path = str(Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}")
        trainer.save_checkpoint(self.last_model_path, weights_only=False, storage_options={"keep_last": self.keep_last})
        self._last_global_step_saved = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        last_step = 0 < trainer.max_steps <= trainer.global_step  # a run that ends mid-epoch by max_steps
        if last_step or self.every_steps and trainer.global_step % self.every_steps == 0:
            self._save_last(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.fit_loop.epoch_loop.batch_progress.current.processed < trainer.num_training_batches:
            return  # stopped mid-epoch (preemption): an epoch-end save would mark the epoch as finished
        epochs_done = trainer.current_epoch + 1
        if self.every_epochs and epochs_done % self.every_epochs == 0:
            self._last_global_step_saved = -1  # the epoch-end state (loop counters) differs from the step save
            self._save_last(trainer)
        if self.keep_every_epochs and epochs_done % self.keep_every_epochs == 0 and not trainer.fast_dev_run:
            trainer.save_checkpoint(str(Path(self.dirpath) / f"epoch={epochs_done}{self.FILE_EXTENSION}"),
                                    weights_only=False)

    def on_validation_end(self, trainer, pl_module) -> None:
        pass

    def on_train_end(self, trainer, pl_module) -> None:
        pass  # ModelCheckpoint saves "last" here; after a mid-epoch stop that would mark the epoch finished

    def on_exception(self, trainer, pl_module, exception) -> None:
        pass  # the state after an exception may be mid-step; the previous last.ckpt is the consistent one


def rng_state() -> dict[str, Any]:
    """Every RNG a training step can draw from (augmentations, sampler order, dropout, masks)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)  # weights_only-safe
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
