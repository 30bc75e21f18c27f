"""``ssl-lightning fit|validate --config experiments/<dataset>/<method>.yaml [--key value ...]``,
``ssl-lightning linear|knn --ckpt <checkpoint>`` (offline evaluation, see ssl_lightning.eval.commands),
``ssl-lightning export --ckpt <checkpoint> --out DIR`` (the backbone as safetensors, see ssl_lightning.export).
``ssl-lightning landscape|hessian --ckpt <checkpoint>`` (loss landscapes and curvature, ssl_lightning.landscape).

Built on LightningCLI: every Trainer, model and data option is settable from YAML or the command
line, ``--print_config`` shows the resolved config. ``model.class_path`` takes a registry name
(``vicreg``) or a class path. The CLI fills in what follows from other settings: the run
directory, last.ckpt location, the W&B run (offline, resumed with the checkpoint) and the
model's view of the data (classes, channels, image size, global batch).
"""
from __future__ import annotations

import importlib
import re
import sys
from datetime import timedelta
from pathlib import Path
from types import TracebackType

from lightning_fabric.plugins.environments import SLURMEnvironment
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from pytorch_lightning.utilities import rank_zero_only

from ssl_lightning.allocator import keep_freed_memory
from ssl_lightning.callbacks import FitSummary, KNNMonitor, PreemptionHandler, SpectrumMonitor
from ssl_lightning.callbacks.time_budget import TimeBudget
from ssl_lightning.checkpointing import CHECKPOINT_DIR, CheckpointError, LastCheckpoint
from ssl_lightning.console import first_line, hide_unactionable_messages
from ssl_lightning.data.datamodule import SSLDataModule
from ssl_lightning.distributed import peer_failure
from ssl_lightning.cluster.failure_requeue import record_fit_error
from ssl_lightning.methods import METHODS, SSLMethod
from ssl_lightning.precision import accept_auto, resolve_precision
from ssl_lightning.strategy import COLLECTIVE_TIMEOUT_S, RENDEZVOUS_TIMEOUT_S
from ssl_lightning.wandb_run import (
    WANDB_LOGGER_CLASSES,
    default_logger_config,
    define_dashboard,
    finish_active_wandb_run,
    finish_wandb_run,
    run_id,
)

SUBCOMMANDS = ("fit", "validate")
PACKAGE_DIR = Path(__file__).resolve().parent


class ConfigError(ValueError):
    """A configuration value our code rejected while building the run; the message is one line for the user."""


def _raised_by_us(tb: TracebackType | None) -> bool:
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(PACKAGE_DIR)


def config_error(err: BaseException) -> ConfigError | None:
    """The ValueError/TypeError our own validation raised, dug out of jsonargparse's wrappers (which
    append a dump of the whole Namespace); None when the error did not come from our code."""
    ours = None
    while err is not None:
        if isinstance(err, (ValueError, TypeError)) and _raised_by_us(err.__traceback__):
            ours = err
        err = err.__cause__ or err.__context__
    return ConfigError(first_line(ours)) if ours is not None else None


class LogConfigCallback(SaveConfigCallback):
    """Writes config.yaml into the run directory and sends the whole resolved config to the logger."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        if trainer.logger is not None:
            trainer.logger.log_hyperparams({"config": self.config.as_dict()})


def resolve_method_names(args: list[str]) -> list[str]:
    """Let users write ``--model vicreg`` / ``model.class_path: vicreg``: registry name -> class path.

    Unknown names that are not class paths get an error listing the registered methods.
    """
    out = []
    for i, arg in enumerate(args):
        prev = args[i - 1] if i else ""
        if prev in ("--model", "--model.class_path") and "." not in arg and not arg.startswith(("{", "-")):
            out.append(_class_path(arg))
        elif arg.startswith(("--model=", "--model.class_path=")) and "." not in arg.split("=", 1)[1]:
            key, name = arg.split("=", 1)
            out.append(f"{key}={_class_path(name)}")
        else:
            out.append(arg)
    return out


def _class_path(name: str) -> str:
    for key, cls in METHODS.items():
        if name.lower() in (key, cls.__name__.lower()):
            return f"{cls.__module__}.{cls.__name__}"
    raise SystemExit(f"error: unknown method {name!r}; choose one of {sorted(METHODS)}")


def one_line_parse_error(message: str) -> str:
    """jsonargparse's multi-line type error (subtypes, per-subtype errors, the given value, often a
    whole Namespace) -> one sentence naming the key, the value and what it accepts."""
    key = re.search(r'Parser key "([^"]+)"', message)
    value = re.search(r"(?:Given|Got) value: (.*)$", message, re.M)
    if not key or not value or "Namespace(" in value[1]:
        return message
    types = [cls or f"one of {choices}" for cls, choices in
             re.findall(r"Expected a (?:<class '([\w.]+)'>|typing\.Literal\[(.*)\])$", message, re.M)
             if cls != "NoneType"]
    others = [r.strip() for r in re.findall(r"^\s*- (.*)$", message, re.M)
              if not r.startswith(("Expected a <class", "Expected a typing.", "Does not validate"))]
    accepted = "; ".join([f"expected {' or '.join(types)}"] * bool(types) + others) or "wrong type"
    return f"{key[1]} {value[1].strip()!r} is not accepted ({accepted}); see --help for its type"


class SSLArgumentParser(LightningArgumentParser):
    """One-line type errors; adds the valid method names to errors about model.class_path."""

    def error(self, message: str, ex: Exception | None = None):
        message = one_line_parse_error(message)
        if ("class_path" in message or "dot import path" in message) and "Problem with given class_path" not in message:
            names = ", ".join(f"{k} ({c.__name__})" for k, c in sorted(METHODS.items()))
            message += (f"\nmodel.class_path takes a method class name or class path; registered methods: {names}. "
                        "On the command line --model <name> also works.")
        super().error(message, ex)


class SSLCLI(LightningCLI):
    def __init__(self, args: list[str] | None = None, **kwargs):
        keep_freed_memory()  # before any DataLoader worker forks, so workers share the setting
        if args is None:
            sys.argv[1:] = resolve_method_names(sys.argv[1:])
        super().__init__(
            SSLMethod,
            SSLDataModule,
            subclass_mode_model=True,
            save_config_callback=LogConfigCallback,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            parser_class=SSLArgumentParser,
            trainer_defaults={
                "logger": default_logger_config(),
                "plugins": [{"class_path": "ssl_lightning.checkpointing.AtomicCheckpointIO"}],
            },
            args=resolve_method_names(args) if args is not None else None,
            **kwargs,
        )

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {k: v for k, v in LightningCLI.subcommands().items() if k in SUBCOMMANDS}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        precision = parser._option_string_actions["--trainer.precision"]  # Lightning's choices plus "auto"
        precision._typehint = accept_auto(precision._typehint)
        parser.add_lightning_class_args(LastCheckpoint, "checkpoint")
        parser.add_lightning_class_args(FitSummary, "summary")
        parser.add_lightning_class_args(SpectrumMonitor, "spectrum")
        parser.add_lightning_class_args(KNNMonitor, "knn")
        parser.add_lightning_class_args(PreemptionHandler, "preemption")
        parser.add_lightning_class_args(TimeBudget, "budget")
        parser.add_argument("--collective_timeout_s", type=int, default=COLLECTIVE_TIMEOUT_S,
                            help="with strategy ddp: once training runs, a collective that waits longer for "
                                 "another process (dead or hung) ends the run with an error instead of hanging")
        parser.add_argument("--rendezvous_timeout_s", type=int, default=RENDEZVOUS_TIMEOUT_S,
                            help="with strategy ddp: how long ranks may take to start, join and finish the "
                                 "first training step together (nodes of a job may start minutes apart)")
        parser.link_arguments("data.batch_size", "model.init_args.batch_size")
        for source, target in (("num_classes", "num_classes"), ("channels", "in_chans"), ("image_size", "image_size")):
            parser.link_arguments(f"data.{source}", f"model.init_args.{target}", apply_on="instantiate")

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as err:
            clean = config_error(err)
            if clean is None:
                raise
            raise clean from err

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if "weights_only" in config:  # fit/validate: resuming loads with weights_only=True, always
            if config.weights_only is False:
                raise ConfigError("weights_only false is not supported: checkpoints load with weights_only=True so "
                                  "that a checkpoint file cannot run code; drop --weights_only")
            config.weights_only = True
        trainer = config.trainer
        trainer.precision, line = resolve_precision(trainer.precision, trainer.accelerator)
        if line and rank_zero_only.rank == 0:
            print(line, file=sys.stderr, flush=True)
        for key, example in (("collective_timeout_s", COLLECTIVE_TIMEOUT_S),
                             ("rendezvous_timeout_s", RENDEZVOUS_TIMEOUT_S)):
            if config[key] <= 0:
                raise ConfigError(f"{key} {config[key]} must be > 0 (seconds), e.g. {example}")
        if trainer.strategy == "ddp":  # DDP with our two timeouts instead of torch's one of 30 minutes
            trainer.strategy = {"class_path": "ssl_lightning.strategy.TwoTimeoutDDPStrategy",
                                "init_args": {"rendezvous_timeout": timedelta(seconds=config.rendezvous_timeout_s),
                                              "collective_timeout": timedelta(seconds=config.collective_timeout_s)}}
        if not trainer.default_root_dir:
            method = str(config.model.class_path).rsplit(".", 1)[-1].lower()
            trainer.default_root_dir = str(Path("runs") / f"{config.data.dataset}-{method}")
        if SLURMEnvironment.detect():  # PreemptionHandler requeues; Lightning's handler would save mid-step
            trainer.plugins = list(trainer.plugins or []) + [
                {"class_path": "lightning_fabric.plugins.environments.SLURMEnvironment",
                 "init_args": {"auto_requeue": False}}]
        if not config.checkpoint.dirpath:
            config.checkpoint.dirpath = str(Path(trainer.default_root_dir) / CHECKPOINT_DIR)
        logger = trainer.logger
        if getattr(logger, "class_path", None) in WANDB_LOGGER_CLASSES:
            args = logger.init_args
            if args.get("save_dir") in (None, "", "."):
                args["save_dir"] = trainer.default_root_dir
            if not args.get("id"):
                resume = bool(config.get("ckpt_path"))
                args["id"] = run_id(trainer.default_root_dir, resume=resume, is_rank_zero=rank_zero_only.rank == 0)
                args["resume"] = "allow"

    def before_fit(self) -> None:
        if self.trainer.is_global_zero:
            define_dashboard(self.trainer.logger)

    def after_fit(self) -> None:
        finish_wandb_run(self.trainer.logger)

    def after_validate(self) -> None:
        finish_wandb_run(self.trainer.logger)


EVAL_COMMANDS = ("linear", "knn", "finetune")


def main(args: list[str] | None = None) -> None:
    """Runs the command; a bad configuration value or an unusable checkpoint ends it with one line
    ``error: ...`` on stderr (exit status 2), not a traceback."""
    hide_unactionable_messages()
    try:
        run_command(args)
    except (ConfigError, CheckpointError) as err:
        record_fit_error(err, exit_code=2)
        finish_active_wandb_run(exit_code=2)
        sys.stderr.flush()
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except Exception as err:
        lost = peer_failure(err)
        if lost is None:
            record_fit_error(err, exit_code=1)
            raise
        finish_active_wandb_run(exit_code=3)
        sys.stderr.flush()
        print(f"error: rank {rank_zero_only.rank} lost another process of "
              f"this distributed run in a collective ({lost}); that process died or did not answer within "
              "collective_timeout_s (rendezvous_timeout_s until the first step is done). The newest valid "
              "checkpoint is kept: resume with --ckpt_path last (a job of ssl-lightning submit requeues itself: "
              "--max-failure-requeues)", file=sys.stderr, flush=True)
        raise SystemExit(3) from None


# Commands outside LightningCLI: name -> (module, function taking the remaining arguments)
COMMANDS: dict[str, tuple[str, str]] = {
    "submit": ("ssl_lightning.cluster.submit", "main"),
    "results": ("ssl_lightning.results", "main"),
    "landscape": ("ssl_lightning.landscape", "main"),
    "hessian": ("ssl_lightning.landscape.hessian_command", "main"),
    "export": ("ssl_lightning.export", "main"),
    "audit": ("ssl_lightning.audit.command", "main"),
    "embed": ("ssl_lightning.eval.embed", "main"),
    "label-efficiency": ("ssl_lightning.eval.label_efficiency", "main"),
    "robustness": ("ssl_lightning.eval.robustness", "main"),
    **{name: ("ssl_lightning.eval.commands", "main") for name in EVAL_COMMANDS},
}


def run_command(args: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] in COMMANDS:
        module, function = COMMANDS[argv[0]]
        command = getattr(importlib.import_module(module), function)  # imported only when used: fast start-up
        if argv[0] in EVAL_COMMANDS:  # one entry point for linear, knn and finetune
            command(argv[0], argv[1:])
        else:
            command(argv[1:])
        return
    SSLCLI(args=args)


if __name__ == "__main__":
    main()
