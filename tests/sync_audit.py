"""What a training step would synchronise on CUDA, counted on CPU; and the collectives it issues.

On a GPU the CPU queues kernels ahead of the device; every call that needs a value from the device
(``.item()``, ``bool(t)``, ``.tolist()``, ``.cpu()``), a size that depends on the data (``nonzero``,
boolean-mask indexing, ``torch.unique``) or a blocking host-to-device copy (``torch.tensor(x,
device=...)``, ``t.to(device)``) makes the CPU wait until the device has caught up. None of them
syncs anything on a CPU, so ``SyncAudit`` counts the *calls*: a ``TorchFunctionMode`` sees every
torch function and Tensor method, and a call of one of the kinds in ``SYNC_KINDS`` is recorded with
the step it happened in and its site, the innermost frame in ssl_lightning, Lightning or torchmetrics
(``path:line (function)``, with the ssl_lightning frame that led there), so a failure names the line.

``audit_fit`` runs a real fit through the CLI (default callbacks: checkpoint, summary, spectrum and kNN
monitors, preemption; the online probe on; logging every ``log_every`` steps) and audits ``steps``
steps after ``warmup``. Steps that log (every ``log_every``), refresh the progress bar, save a checkpoint,
validate or end an epoch are special; what the plain steps do is per-step work, what the special ones
do beyond that is periodic and reported per 100 steps.

Two things the audit cannot see on a CPU: which tensors would live on the device (so every
``t.to(<device>)`` without ``non_blocking=True`` counts, although moving a host tensor to the host is
free), and copies made inside C++ (the data loader's pinned memory). Lightning's batch transfer
(``lightning_fabric.utilities.apply_func.move_data_to_device``) is exempt: on CUDA it passes
``non_blocking=True``. Host copies made by ``ssl_lightning.distributed.HostCopy`` are exempt when read:
on CUDA they are pinned host memory filled by a non-blocking copy a step earlier.

``count_collectives`` runs the same fits on 2 gloo ranks and counts what each training step sends:
``torch.distributed`` calls (gathers, reductions, broadcasts, Lightning's own), DDP's gradient
buckets (through a comm hook) and DDP's buffer broadcast, with their bytes.
"""
from __future__ import annotations

import os
import sys
import tempfile
import threading
import weakref
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import TQDMProgressBar
from torch.overrides import TorchFunctionMode

ROOT = Path(__file__).resolve().parents[1]
TESTS = str(ROOT / "tests") + os.sep  # a test's own code counts as a site too
T = torch.Tensor

# Always a synchronisation when the tensor lives on the device. The Tensor methods are patched on the
# class while an audit runs (a TorchFunctionMode does not see the backward pass: hooks, autograd Functions);
# the torch functions are seen by the mode.
TENSOR_READS = {
    "item": "item", "__bool__": "bool", "__int__": "int", "__float__": "float", "__index__": "index",
    "tolist": "tolist", "numpy": "numpy", "cpu": "cpu", "__repr__": "print", "__format__": "print",
    "nonzero": "nonzero", "argwhere": "nonzero", "masked_select": "masked_select", "unique": "unique",
    "unique_consecutive": "unique", "bincount": "bincount", "equal": "equal", "allclose": "allclose",
}
SYNC_FUNCTIONS = {
    torch.nonzero: "nonzero", torch.argwhere: "nonzero", torch.masked_select: "masked_select",
    torch.unique: "unique", torch.unique_consecutive: "unique", torch.bincount: "bincount",
    torch.equal: "equal", torch.allclose: "allclose",
}
CREATION = {torch.tensor, torch.as_tensor, torch.asarray, torch.scalar_tensor}
LIBRARIES = ("/ssl_lightning/", "/pytorch_lightning/", "/lightning_fabric/", "/torchmetrics/")
EXEMPT_FUNCTIONS = {("apply_func.py", "batch_to")}  # Lightning's batch transfer: non_blocking on CUDA
HOST_PIPELINE = "/torch/utils/data/"  # Dataset.__getitem__ and collate: host tensors (loader workers on a GPU run)
# Factories that, without a device, make a host tensor; moving one (or what is computed from it) to the device
# is a host-to-device copy.
HOST_FACTORIES = {torch.tensor, torch.as_tensor, torch.asarray, torch.zeros, torch.ones, torch.empty, torch.full,
                  torch.arange, torch.randperm, torch.rand, torch.randn, torch.randint, torch.linspace, torch.eye}


_inside = threading.local()  # busy: inside a recorded Tensor read, whose own calls are not counted again


class HostTensors:
    """Identity set of live tensors (a WeakSet would compare tensors with ==)."""

    def __init__(self):
        self._refs: dict[int, weakref.ref] = {}

    def add(self, t: torch.Tensor) -> None:
        self._refs[id(t)] = weakref.ref(t)

    def __contains__(self, t) -> bool:
        ref = self._refs.get(id(t))
        return ref is not None and ref() is t


def _is_host_copy(t) -> bool:
    return getattr(t, "_ssl_host_copy", False)


def _names_device(args, kwargs) -> bool:
    if kwargs.get("device") is not None:
        return True
    return any(isinstance(a, (torch.device, str, int, torch.Tensor)) and not isinstance(a, bool) for a in args[1:])


def _bool_index(index) -> bool:
    items = index if isinstance(index, (tuple, list)) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in items)


def sync_kind(func, args, kwargs, host: HostTensors) -> str | None:
    """The kind of synchronisation ``func(*args, **kwargs)`` would be on CUDA, or None. ``host``: the
    tensors known to live on the host (made by a factory without a device, or computed from one)."""
    kind = SYNC_FUNCTIONS.get(func)
    if kind is not None:
        return None if args and (_is_host_copy(args[0]) or args[0] in host) else kind
    if func in (T.to, T.cuda):
        if kwargs.get("non_blocking") or (len(args) > 1 and args[-1] is True) or _is_host_copy(args[0]):
            return None
        if any(a == "cpu" for a in [*args[1:], kwargs.get("device")] if isinstance(a, str)):
            return "to(cpu)"
        return "to(device)" if args[0] in host and (func is T.cuda or _names_device(args, kwargs)) else None
    if func in (T.__getitem__, T.__setitem__) and _bool_index(args[1]):
        return "bool_mask_index"
    if func is torch.where and len(args) + len(kwargs) == 1:
        return "nonzero"
    if func in CREATION and kwargs.get("device") is not None:
        return "tensor(device=)"
    if func is T.new_tensor:
        return "tensor(device=)"
    if func in (torch.repeat_interleave, T.repeat_interleave) and isinstance(args[1] if len(args) > 1 else None,
                                                                             torch.Tensor) \
            and kwargs.get("output_size") is None:
        return "repeat_interleave"
    return None


def _short(path: str) -> str:
    for marker in LIBRARIES:
        if marker in path:
            return marker.strip("/") + "/" + path.split(marker, 1)[1]
    return os.path.relpath(path, ROOT) if path.startswith(str(ROOT)) else path


def call_site() -> str | None:
    """``path:line (function)`` of the innermost library frame, ``<- ssl_lightning/...`` the innermost of
    ours when that one is elsewhere; None for an exempt caller (batch transfer, the data loader's fetch)."""
    frame = sys._getframe(2)
    first = ours = None
    while frame is not None:
        code = frame.f_code
        path = code.co_filename
        if (os.path.basename(path), code.co_name) in EXEMPT_FUNCTIONS or HOST_PIPELINE in path:
            return None
        if first is None and (any(m in path for m in LIBRARIES) or
                              (path.startswith(TESTS) and os.path.basename(path) != "sync_audit.py")):
            first = frame
        if ours is None and "/ssl_lightning/" in path:
            ours = frame
        frame = frame.f_back
    where = first or ours
    if where is None:
        return "<outside the libraries>"
    text = f"{_short(where.f_code.co_filename)}:{where.f_lineno} ({where.f_code.co_name})"
    if ours is not None and ours is not where:
        text += f" <- {_short(ours.f_code.co_filename)}:{ours.f_lineno} ({ours.f_code.co_name})"
    return text


class SyncAudit(TorchFunctionMode):
    """Records (step, kind, site) of every call that would synchronise on CUDA while active."""

    def __init__(self):
        super().__init__()
        self.step = -1
        self.events: list[tuple[int, str, str]] = []
        self.host = HostTensors()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(_inside, "busy", False):
            return func(*args, **kwargs)
        kind = sync_kind(func, args, kwargs, self.host)
        if kind is not None:
            site = call_site()
            if site is not None:
                self.events.append((self.step, kind, site))
        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor) and kind is None and func not in (T.to, T.cuda):
            made_on_host = func in HOST_FACTORIES and kwargs.get("device") is None
            if made_on_host or (args and isinstance(args[0], torch.Tensor) and args[0] in self.host):
                self.host.add(out)
        return out

    def record(self, kind: str) -> None:
        site = call_site()
        if site is not None:
            self.events.append((self.step, kind, site))

    def __enter__(self):
        self._real_methods = self.patch_tensor_methods()
        self._real_synchronize, self._real_save = torch.cuda.synchronize, torch.save

        def synchronize(*args, **kwargs):
            self.record("cuda.synchronize")
            return self._real_synchronize(*args, **kwargs)

        def save(*args, **kwargs):  # a checkpoint copies every device tensor to the host
            self.record("torch.save")
            return self._real_save(*args, **kwargs)

        torch.cuda.synchronize, torch.save = synchronize, save
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        for name, real in self._real_methods.items():
            setattr(T, name, real)
        torch.cuda.synchronize, torch.save = self._real_synchronize, self._real_save

    def patch_tensor_methods(self) -> dict:
        """Replaces the Tensor methods of TENSOR_READS by recording wrappers; returns the originals."""
        originals = {name: getattr(T, name) for name in TENSOR_READS}
        audit = self

        def wrap(name: str, real):
            def wrapper(tensor, *args, **kwargs):
                if getattr(_inside, "busy", False):
                    return real(tensor, *args, **kwargs)
                _inside.busy = True  # what the call does inside (printing reads every element) is one sync
                try:
                    if not (_is_host_copy(tensor) or tensor in audit.host):
                        audit.record(TENSOR_READS[name])
                    return real(tensor, *args, **kwargs)
                finally:
                    _inside.busy = False
            return wrapper

        for name, real in originals.items():
            setattr(T, name, wrap(name, real))
        return originals


@dataclass
class AuditReport:
    """Per-step syncs: the mean over the plain steps (no logging, checkpoint, validation or epoch end) of
    the calls in them. Periodic syncs: what the other steps made beyond that, per 100 audited steps."""

    steps: int
    per_step: dict[tuple[str, str], float] = field(default_factory=dict)  # (kind, site) -> calls per step
    periodic: dict[tuple[str, str], float] = field(default_factory=dict)  # (kind, site) -> calls per 100 steps

    @classmethod
    def from_events(cls, events: list[tuple[int, str, str]], steps: list[int], special: set[int]) -> AuditReport:
        plain = [s for s in steps if s not in special]
        if not plain:
            raise ValueError(f"every audited step {steps} logs, saves or validates: audit more steps")
        hits: dict[tuple[str, str], Counter] = defaultdict(Counter)
        for step, kind, site in events:
            hits[(kind, site)][step] += 1
        report = cls(steps=len(steps))
        for key, per in hits.items():
            rate = sum(per[s] for s in plain) / len(plain)
            extra = sum(per[s] for s in steps if s in special) - rate * (len(steps) - len(plain))
            if rate:
                report.per_step[key] = rate
            if extra > 1e-9:
                report.periodic[key] = 100 * extra / len(steps)
        return report

    @property
    def per_step_total(self) -> float:
        return sum(self.per_step.values())

    @property
    def periodic_total(self) -> float:
        return sum(self.periodic.values())

    def describe(self) -> str:
        lines = [f"{self.per_step_total:g} per step, {self.periodic_total:g} per 100 steps periodic "
                 f"(over {self.steps} steps)"]
        lines += [f"  per step  {n:6.3g}x {kind:16s} {site}" for (kind, site), n in sorted(self.per_step.items())]
        lines += [f"  per 100   {n:6.3g}x {kind:16s} {site}" for (kind, site), n in sorted(self.periodic.items())]
        return "\n".join(lines)


class AuditWindow(pl.Callback):
    """Audits steps warmup .. warmup + steps - 1 of a fit (data fetch, step, callbacks, epoch end)."""

    def __init__(self, audit: SyncAudit, warmup: int, steps: int):
        self.audit, self.warmup, self.steps = audit, warmup, steps
        self.audited: list[int] = []
        self.special: set[int] = set()  # audited steps that log, save, validate or end an epoch
        self.active = False

    def _enter(self) -> None:
        self.active = True
        self.audit.__enter__()

    def exit(self) -> None:
        if self.active:
            self.audit.__exit__(None, None, None)
            self.active = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.global_step
        if step == self.warmup:
            self._enter()
            for optimizer in trainer.optimizers:  # AdamW's step counts: host tensors unless capturable (CUDA)
                for group in optimizer.param_groups:
                    if not (group.get("capturable") or group.get("fused")):
                        for p in group["params"]:
                            step_count = optimizer.state.get(p, {}).get("step")
                            if isinstance(step_count, torch.Tensor):
                                self.audit.host.add(step_count)
        if self.active:
            self.audit.step = step
            self.audited.append(step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        bar = trainer.progress_bar_callback
        refresh = isinstance(bar, TQDMProgressBar) and bar.refresh_rate > 1 and \
            bar._should_update(batch_idx + 1, bar.total_train_batches)  # refreshing every step is per-step work
        if self.active and (trainer._logger_connector.should_update_logs or refresh):
            self.special.add(self.audit.step)
        if trainer.global_step >= self.warmup + self.steps:
            self.exit()

    def _mark(self, *args) -> None:
        if self.active:
            self.special.add(self.audit.step)

    on_save_checkpoint = on_validation_start = on_train_epoch_end = _mark

    def teardown(self, trainer, pl_module, stage):
        self.exit()


# ---------------------------------------------------------------- tiny runs of every method
# Per method: model init_args and the views (one view for MAE-type methods), each as small as it goes.
TINY_METHODS: dict[str, dict] = {
    "barlow": {"projector": "32-32"},
    "byol": {"projector": "32-16", "predictor": "32-16"},
    "dino": {"projector": "32-16", "out_dim": 64, "warmup_teacher_temp_epochs": 1, "freeze_last_layer": 0},
    "intl": {"projector": "32-32"},
    "intl_m": {"projector": "32-32"},
    "mae": {"backbone": "vit_tiny", "decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 1},
    "mocov2": {"projector": "32-16", "queue_size": 64},
    "mocov3": {"projector": "32-16", "predictor": "32-16"},
    "rcmae": {"backbone": "vit_tiny", "decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 1},
    "simclr": {"projector": "32-16"},
    "st": {"projector": "32-32"},
    "supervised": {},
    "swav": {"projector": "32-16", "num_prototypes": 16, "queue_length": 64, "queue_start_epoch": 0,
             "freeze_prototypes_epochs": 0},
    "vicreg": {"projector": "32-32"},
    "wmse": {"projector": "32-16", "w_size": 32},
}
ONE_VIEW = ("mae", "rcmae", "supervised")
VIT = {"embed_dim": 16, "depth": 1, "num_heads": 1, "patch_size": 4, "global_pool": "token"}


def tiny_cli_args(method: str, root: str, *, steps_per_epoch: int = 6, max_steps: int = 10, batch: int = 32,
                  log_every: int = 4, devices: int = 1, size: int = 16, augment: str = "workers") -> list[str]:
    """The CLI arguments of a tiny fit of ``method`` (synthetic data, width-4 convnet or 1-block ViT).
    augment "workers": the views are made in the data loader (host work the audit does not count);
    "device": in the training process, as the demo configs do (its CPU path selects samples on the host,
    which its CUDA path does not, so the audit over-counts there)."""
    import json

    init = dict(TINY_METHODS[method])
    if init.get("backbone") == "vit_tiny":
        init["backbone_kwargs"] = VIT
    else:
        init.setdefault("backbone", "convnet")
        init["backbone_kwargs"] = {"width": 4}
    views = [{"size": size}] * (1 if method in ONE_VIEW else 2)
    args = ["--model", method,
            "--data.dataset", "synthetic", "--data.synthetic_size", str(steps_per_epoch * batch),
            "--data.batch_size", str(batch), "--data.num_workers", "0", "--data.augment", augment,
            "--data.views", json.dumps(views),
            "--model.init_args.optimizer", json.dumps({"name": "adamw" if "mae" in method else "lars",
                                                       "lr": 0.1, "warmup_epochs": 0.5}),
            "--trainer.max_steps", str(max_steps), "--trainer.max_epochs", "-1",
            "--trainer.accelerator", "cpu", "--trainer.devices", str(devices),
            "--trainer.logger", "false", "--trainer.enable_model_summary", "false",
            "--trainer.num_sanity_val_steps", "0", "--trainer.limit_val_batches", "1",
            "--trainer.log_every_n_steps", str(log_every), "--trainer.default_root_dir", root,
            "--spectrum.num_samples", "64", "--knn.bank_size", "64", "--knn.num_queries", "32",
            "--checkpoint.every_n_train_steps", str(steps_per_epoch)]
    for key, value in init.items():
        args += [f"--model.init_args.{key}", value if isinstance(value, str) else json.dumps(value)]
    if devices > 1:
        args += ["--trainer.strategy", "ddp"]
    return args


def tiny_cli(method: str, root: str, **kwargs):
    from ssl_lightning.cli import SSLCLI

    return SSLCLI(args=tiny_cli_args(method, root, **kwargs), run=False)


def audit_fit(method: str, *, warmup: int = 2, steps: int = 8, **kwargs) -> AuditReport:
    """Audits ``steps`` steady-state steps of a tiny fit of ``method`` after ``warmup`` steps; with the
    default 6 steps per epoch the window holds an epoch end (validation, monitors, checkpoint)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: 2 threads on a loaded 2-core machine are 100x slower than 1
    with tempfile.TemporaryDirectory() as root:
        pl.seed_everything(0)
        cli = tiny_cli(method, root, max_steps=warmup + steps, **kwargs)
        window = AuditWindow(SyncAudit(), warmup, steps)
        cli.trainer.callbacks.append(window)
        try:
            cli.trainer.fit(cli.model, cli.datamodule)
        finally:
            window.exit()
            torch.set_num_threads(threads)
    if len(window.audited) != steps:
        raise RuntimeError(f"audited steps {window.audited}, expected {steps} from {warmup}")
    return AuditReport.from_events(window.audit.events, window.audited, window.special)


# ---------------------------------------------------------------- collectives under 2-rank DDP
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce_scatter_tensor",
               "all_to_all_single", "barrier", "_broadcast_coalesced")


def collective_site() -> str:
    """Who sends: the innermost ssl_lightning frame outside distributed.py (``path function``), else
    Lightning's or torch's; the backward of a gather or all-reduce with gradient says so."""
    frame, fallback = sys._getframe(2), None
    while frame is not None:
        path, name = frame.f_code.co_filename, frame.f_code.co_name
        if "/ssl_lightning/" in path and not path.endswith("distributed.py"):
            return f"{_short(path)} {name}"
        if path.endswith("ssl_lightning/distributed.py") and name == "backward":
            return "backward of a gather/all-reduce with grad"
        if fallback is None and any(m in path for m in LIBRARIES + ("/torch/nn/",)) and \
                not path.endswith("distributed.py"):
            fallback = f"{_short(path)} {name}"
        frame = frame.f_back
    return fallback or "<unknown>"


class CollectiveCounter(pl.Callback):
    """Counts torch.distributed calls and DDP's gradient buckets (comm hook), with bytes, per audited step.

    Every collective is named by its kind and the innermost ssl_lightning / Lightning / torch.nn frame
    that issued it, so the table says who sends what."""

    def __init__(self, warmup: int, steps: int):
        self.warmup, self.steps = warmup, steps
        self.active = self._in_hook = False
        self.calls: Counter = Counter()  # (kind, site) -> calls
        self.bytes: Counter = Counter()
        self._real: dict[str, object] = {}

    def _record(self, kind: str, tensors) -> None:
        if not self.active or self._in_hook:
            return
        self.calls[(kind, collective_site())] += 1
        self.bytes[(kind, collective_site())] += sum(t.numel() * t.element_size() for t in tensors
                                                     if isinstance(t, torch.Tensor))

    def setup(self, trainer, pl_module, stage):
        import torch.distributed as dist

        for name in COLLECTIVES:
            real = getattr(dist, name)
            self._real[name] = real

            def wrapped(*args, _real=real, _name=name, **kwargs):
                tensors = [a for a in args if isinstance(a, torch.Tensor)]
                for a in args:
                    if isinstance(a, (list, tuple)):
                        tensors += [t for t in a if isinstance(t, torch.Tensor)]
                if _name == "all_gather":  # count what each rank contributes, once
                    tensors = [args[1]]
                self._record(_name, tensors)
                return _real(*args, **kwargs)
            setattr(dist, name, wrapped)

    def on_fit_start(self, trainer, pl_module):
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        model = trainer.strategy.model
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            def hook(state, bucket):
                if self.active:
                    self.calls[("all_reduce", "DDP gradient bucket")] += 1
                    self.bytes[("all_reduce", "DDP gradient bucket")] += bucket.buffer().numel() * \
                        bucket.buffer().element_size()
                self._in_hook = True  # the default hook's own dist.all_reduce: counted above
                try:
                    return default_hooks.allreduce_hook(state, bucket)
                finally:
                    self._in_hook = False
            model.register_comm_hook(None, hook)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.warmup:
            self.active = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.warmup + self.steps:
            self.active = False

    def teardown(self, trainer, pl_module, stage):
        import torch.distributed as dist

        self.active = False
        for name, real in self._real.items():
            setattr(dist, name, real)


def _count_on_rank(rank: int, world: int, methods: list[str], warmup: int, steps: int, root: str) -> dict:
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(world), RANK=str(rank))
    results = {}
    for method in methods:
        pl.seed_everything(0)
        with tempfile.TemporaryDirectory(dir=root) as run_root:
            cli = tiny_cli(method, run_root, devices=world, max_steps=warmup + steps, steps_per_epoch=20,
                           batch=16 * world)
            counter = CollectiveCounter(warmup, steps)
            cli.trainer.callbacks.append(counter)
            cli.trainer.fit(cli.model, cli.datamodule)
        results[method] = {"calls": {k: v / steps for k, v in counter.calls.items()},
                           "bytes": {k: v / steps for k, v in counter.bytes.items()}}
    return results


def count_collectives(methods: list[str], out_dir: str, *, warmup: int = 2, steps: int = 3) -> dict:
    """{method: {"calls": {(kind, site): per step}, "bytes": {(kind, site): per step}}} on rank 0 of 2 gloo
    ranks, over ``steps`` training steps after ``warmup`` (an epoch is 20 steps, so no epoch end)."""
    from ddp import run_distributed

    return run_distributed(_count_on_rank, methods, warmup, steps, str(out_dir), out_dir=out_dir)[0]
