"""Where a training step's time goes, and what it makes the host wait for, per method.

    python benchmarks/step_anatomy.py --device cpu --methods vicreg,simclr --steps 10
    python benchmarks/step_anatomy.py --device cuda --methods vicreg,byol,dino,mocov2,swav --steps 30
    python benchmarks/step_anatomy.py --device cpu --collectives      # + the 2-rank gloo collective table

Each method runs ``ssl-lightning fit`` with its config from ``--config_dir`` (default experiments/cifar10 on
CUDA: ResNet-18 at 32 px, 2 views, the config's precision; experiments/fashion_mnist on the CPU) on
``--synthetic`` in-memory images, logger and progress bar off, validation and monitors at the end of the
one epoch the run spans. After ``--warmup`` steps, ``--steps`` steps are timed, split into

- data: from the end of a step to the start of the next (fetch, transfer, views made on the device),
- forward: ``training_step`` (the method's loss and the probe), backward, optimizer (the rest of
  ``optimizer_step``: the update, the non-finite guard, EMA teachers),
- callbacks: the batch-end hooks (checkpoint, preemption, summary); and, not per step, the epoch-end
  monitors (spectrum, kNN) once: ``monitors/epoch``.

On CUDA the sections are timed with CUDA events (recorded in the stream, read after the timed steps, so
timing adds no synchronisation); ``step ms`` is the wall time per step. Then ``--sync_steps`` more steps
run under ``torch.cuda.set_sync_debug_mode("error")`` from batch start to batch end: a synchronising call
in the step raises, and the table shows where (``sync check``). On the CPU the same columns come from
the clock, and the sync column is tests/sync_audit.py's count over ``--steps`` more steps (per step, and
periodic work per 100 steps). ``--collectives`` adds, per method, the collectives of one training step on
2 gloo ranks (tests/sync_audit.count_collectives, the tiny test configs): calls and bytes per kind.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
import sys
import tempfile
import time
import traceback
import warnings
from collections import defaultdict
from pathlib import Path

import pytorch_lightning as pl
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the sync audit and the collective counter live with the tests

from ssl_lightning.callbacks import KNNMonitor, SpectrumMonitor  # noqa: E402
from ssl_lightning.cli import SSLCLI  # noqa: E402
from ssl_lightning.methods import METHODS  # noqa: E402

SECTIONS = ("data", "forward", "backward", "optimizer", "callbacks", "monitors")
CONFIG_NAMES = {"supervised": ("supervised", "supervised_resnet")}  # fashion_mnist names it differently


class Clock:
    """Marks on the CPU clock, or CUDA events in the current stream (read once, after the timed steps)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def ms(self, start, end) -> float:
        return start.elapsed_time(end) if self.cuda else 1000 * (end - start)


class StepAnatomy(pl.Callback):
    """Section marks of steps warmup .. warmup + steps - 1, and a sync check (CUDA) or audit (CPU) after."""

    def __init__(self, clock: Clock, warmup: int, steps: int, sync_steps: int):
        self.clock, self.warmup, self.steps, self.sync_steps = clock, warmup, steps, sync_steps
        self.marks: dict[int, dict[str, object]] = defaultdict(dict)
        self.monitor_spans: list[tuple[object, object]] = []
        self.wall: list[float] = []
        self.sync_error: str | None = None
        self.audit_window = None
        self._last_end = None

    def timing(self, step: int) -> bool:
        return self.warmup <= step < self.warmup + self.steps

    def checking(self, step: int) -> bool:
        return self.warmup + self.steps <= step < self.warmup + self.steps + self.sync_steps

    def instrument(self, model: pl.LightningModule, trainer: pl.Trainer) -> None:
        """Wraps training_step, backward and optimizer_step of this model, and the monitors' measure."""
        anatomy = self

        def wrap(obj, name: str, before: str, after: str):
            inner = getattr(obj, name)

            def wrapper(*args, **kwargs):
                step = trainer.global_step
                if anatomy.timing(step):
                    anatomy.marks[step][before] = anatomy.clock.mark()
                out = inner(*args, **kwargs)
                if anatomy.timing(step):
                    anatomy.marks[step][after] = anatomy.clock.mark()
                return out
            setattr(obj, name, wrapper)

        wrap(model, "training_step", "forward_start", "forward_end")
        wrap(model, "backward", "backward_start", "backward_end")
        wrap(model, "optimizer_step", "optimizer_start", "optimizer_end")
        for callback in trainer.callbacks:
            if isinstance(callback, (SpectrumMonitor, KNNMonitor)):
                inner = callback.measure

                def measure(*args, _inner=inner, **kwargs):
                    start = anatomy.clock.mark()
                    try:
                        return _inner(*args, **kwargs)
                    finally:
                        anatomy.monitor_spans.append((start, anatomy.clock.mark()))
                callback.measure = measure

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.global_step
        if self.timing(step):
            self.marks[step]["start"] = self.clock.mark()
            if self._last_end is not None:
                self.marks[step]["previous_end"] = self._last_end
            if step == self.warmup:
                self.wall.append(self._wall())
        if self.checking(step) and self.clock.cuda and self.sync_error is None:
            torch.cuda.set_sync_debug_mode("error")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step - 1
        if self.clock.cuda:
            torch.cuda.set_sync_debug_mode("default")
        if self.timing(step):
            self._last_end = self.marks[step]["end"] = self.clock.mark()
            if step == self.warmup + self.steps - 1:
                self.wall.append(self._wall())

    def on_exception(self, trainer, pl_module, exception):
        if self.clock.cuda:
            torch.cuda.set_sync_debug_mode("default")

    def _wall(self) -> float:
        if self.clock.cuda:
            torch.cuda.synchronize()  # section boundary of the benchmark: the start and end of the timed steps
        return time.perf_counter()

    def table_row(self) -> dict[str, float]:
        ms = self.clock.ms
        sums = dict.fromkeys(SECTIONS, 0.0)
        for m in self.marks.values():
            if "previous_end" in m:
                sums["data"] += ms(m["previous_end"], m["start"])
            sums["forward"] += ms(m["forward_start"], m["forward_end"])
            sums["backward"] += ms(m["backward_start"], m["backward_end"])
            sums["optimizer"] += (ms(m["optimizer_start"], m["optimizer_end"])  # the closure runs inside it
                                  - ms(m["forward_start"], m["forward_end"]) - ms(m["backward_start"], m["backward_end"]))
            sums["callbacks"] += ms(m["optimizer_end"], m["end"])
        row = {k: v / self.steps for k, v in sums.items()}
        row["monitors"] = sum(ms(a, b) for a, b in self.monitor_spans)  # once per epoch, not per step
        row["data"] = sums["data"] / max(1, self.steps - 1)
        row["step"] = 1000 * (self.wall[1] - self.wall[0]) / self.steps
        return row


def config_for(method: str, config_dir: Path) -> Path | None:
    for name in CONFIG_NAMES.get(method, (method,)):
        if (config_dir / f"{name}.yaml").is_file():
            return config_dir / f"{name}.yaml"
    return None


def run_method(method: str, args) -> dict:
    config = config_for(method, args.config_dir)
    if config is None:
        return {"error": f"no {method} config in {args.config_dir}"}
    cuda = args.device == "cuda"
    # + 2: the last step saves a checkpoint (LastCheckpoint at max_steps), outside the checked or audited steps
    total = args.warmup + args.steps + (args.sync_steps if cuda else args.steps) + 2
    batch = args.batch_size or None
    with tempfile.TemporaryDirectory() as root:
        overrides = ["--data.dataset", "synthetic", "--data.synthetic_size",
                     str(max(args.synthetic, total * (batch or 256))), "--trainer.max_steps", str(total),
                     "--trainer.max_epochs", "1", "--trainer.accelerator", "gpu" if cuda else "cpu",
                     "--trainer.devices", "1", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
                     "--trainer.enable_model_summary", "false", "--trainer.num_sanity_val_steps", "0",
                     "--trainer.limit_val_batches", str(args.val_batches), "--trainer.log_every_n_steps", "1000",
                     "--trainer.default_root_dir", root, "--data.num_workers", str(args.workers),
                     "--checkpoint.every_n_train_steps", "0", "--checkpoint.every_n_epochs", "0"]
        if batch:
            overrides += ["--data.batch_size", str(batch)]
        cli = SSLCLI(args=["--config", str(config), *overrides], run=False)
        anatomy = StepAnatomy(Clock(cuda), args.warmup, args.steps, args.sync_steps if cuda else 0)
        cli.trainer.callbacks.append(anatomy)
        if not cuda:
            from sync_audit import AuditWindow, SyncAudit

            anatomy.audit_window = AuditWindow(SyncAudit(), args.warmup + args.steps, args.steps)
            cli.trainer.callbacks.append(anatomy.audit_window)
        anatomy.instrument(cli.model, cli.trainer)
        try:
            cli.trainer.fit(cli.model, cli.datamodule)
        except RuntimeError as err:
            if not (cuda and "synchronizing" in str(err)):
                raise
            frames = [f for f in traceback.extract_tb(err.__traceback__) if "/ssl_lightning/" in f.filename
                      or "/pytorch_lightning/" in f.filename]
            where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
            anatomy.sync_error = f"SYNC at {where}"
        finally:
            if anatomy.audit_window is not None:
                anatomy.audit_window.exit()
    if len(anatomy.wall) < 2:
        return {"error": anatomy.sync_error or "fewer steps ran than timed"}
    if cuda:
        torch.cuda.synchronize()  # the end of the run: every event is read now
    row = anatomy.table_row()
    row["batch"] = cli.datamodule.hparams.batch_size
    if cuda:
        row["sync"] = anatomy.sync_error or f"0 in {args.sync_steps} steps"
    else:
        from sync_audit import AuditReport

        window = anatomy.audit_window
        report = AuditReport.from_events(window.audit.events, window.audited, window.special)
        row["sync"] = f"{report.per_step_total:g}/step, {report.periodic_total:.0f}/100 periodic"
        row["sync_sites"] = report.describe()
    return row


def collective_table(methods: list[str]) -> str:
    from sync_audit import count_collectives

    with tempfile.TemporaryDirectory() as out:
        counts = count_collectives(methods, out)
    lines = ["| method | collectives / step | bytes / step (rank 0) | by kind: calls (who) |", "|---|---|---|---|"]
    for method in methods:
        calls, sizes = counts[method]["calls"], counts[method]["bytes"]
        kinds = "; ".join(f"{n:g} {kind} ({site})" for (kind, site), n in sorted(calls.items()))
        lines.append(f"| {method} | {sum(calls.values()):g} | {sum(sizes.values()):,.0f} | {kinds} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--methods", default="", help="comma-separated registry names (default: all)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (and audited steps on the CPU)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--sync_steps", type=int, default=5, help="CUDA: steps under set_sync_debug_mode('error')")
    p.add_argument("--config_dir", type=Path, default=None)
    p.add_argument("--batch_size", type=int, default=0, help="0: the config's")
    p.add_argument("--synthetic", type=int, default=0, help="synthetic images (default: enough for the run)")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--val_batches", type=int, default=2)
    p.add_argument("--collectives", action="store_true", help="also count collectives on 2 gloo ranks (CPU)")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    if args.config_dir is None:
        args.config_dir = ROOT / "experiments" / ("cifar10" if args.device == "cuda" else "fashion_mnist")
    methods = [m for m in args.methods.split(",") if m] or sorted(METHODS)
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; choose from {sorted(METHODS)}")
    warnings.filterwarnings("ignore")
    for name in ("pytorch_lightning", "lightning_fabric", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.backends.cudnn.benchmark = True
    print(f"device {args.device} ({torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU'}), "
          f"configs {args.config_dir}, {args.steps} timed steps after {args.warmup}; times in ms per step")
    print("| method | batch | step | data | forward | backward | optimizer | callbacks | monitors/epoch | syncs |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    details = []
    for method in methods:
        with contextlib.redirect_stdout(io.StringIO()):  # the fit's own summary lines
            row = run_method(method, args)
        if "error" in row:
            print(f"| {method} | {row['error']} |||||||||", flush=True)
            continue
        cells = " | ".join(f"{row[k]:.1f}" for k in ("step", *SECTIONS))
        print(f"| {method} | {row['batch']} | {cells} | {row['sync']} |", flush=True)
        if "sync_sites" in row:
            details.append(f"{method}: {row['sync_sites']}")
    if details:
        print("\nsync sites (per step / per 100 steps):\n" + "\n".join(details))
    if args.collectives:
        print("\ncollectives per training step, 2 gloo ranks (tiny configs of tests/sync_audit.py):")
        print(collective_table(methods))


if __name__ == "__main__":
    main()
