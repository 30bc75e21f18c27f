"""``ssl-lightning fit|validate --config experiments/<dataset>/<method>.yaml [--key value ...]``,
``ssl-lightning linear|knn --ckpt <checkpoint>`` (offline evaluation, see ssl_lightning.eval.commands).

Built on LightningCLI: every Trainer, model and data option is settable from YAML or the command
line, ``--print_config`` shows the resolved config. ``model.class_path`` takes a registry name
(``vicreg``) or a class path. The CLI fills in what follows from other settings: the run
directory, last.ckpt location, the W&B run (offline, resumed with the checkpoint) and the
model's view of the data (classes, channels, image size, global batch).
"""
from __future__ import annotations

import sys
from pathlib import Path

from lightning_fabric.plugins.environments import SLURMEnvironment
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from pytorch_lightning.utilities import rank_zero_only

from ssl_lightning.allocator import keep_freed_memory
from ssl_lightning.callbacks import FitSummary, KNNMonitor, PreemptionHandler, SpectrumMonitor
from ssl_lightning.checkpointing import LastCheckpoint
from ssl_lightning.data.datamodule import SSLDataModule
from ssl_lightning.methods import METHODS, SSLMethod
from ssl_lightning.wandb_run import (
    WANDB_LOGGER_CLASSES,
    default_logger_config,
    define_dashboard,
    finish_wandb_run,
    run_id,
)

SUBCOMMANDS = ("fit", "validate")


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


class SSLArgumentParser(LightningArgumentParser):
    """Adds the valid method names to errors about model.class_path."""

    def error(self, message: str, ex: Exception | None = None):
        if "class_path" in message or "dot import path" in message:
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
        parser.add_lightning_class_args(LastCheckpoint, "checkpoint")
        parser.add_lightning_class_args(FitSummary, "summary")
        parser.add_lightning_class_args(SpectrumMonitor, "spectrum")
        parser.add_lightning_class_args(KNNMonitor, "knn")
        parser.add_lightning_class_args(PreemptionHandler, "preemption")
        parser.link_arguments("data.batch_size", "model.init_args.batch_size")
        for source, target in (("num_classes", "num_classes"), ("channels", "in_chans"), ("image_size", "image_size")):
            parser.link_arguments(f"data.{source}", f"model.init_args.{target}", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.trainer
        if not trainer.default_root_dir:
            method = str(config.model.class_path).rsplit(".", 1)[-1].lower()
            trainer.default_root_dir = str(Path("runs") / f"{config.data.dataset}-{method}")
        if SLURMEnvironment.detect():  # PreemptionHandler requeues; Lightning's handler would save mid-step
            trainer.plugins = list(trainer.plugins or []) + [
                {"class_path": "lightning_fabric.plugins.environments.SLURMEnvironment",
                 "init_args": {"auto_requeue": False}}]
        if not config.checkpoint.dirpath:
            config.checkpoint.dirpath = str(Path(trainer.default_root_dir) / "checkpoints")
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
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] == "submit":
        from ssl_lightning.slurm import main as submit_main

        submit_main(argv[1:])
        return
    if argv and argv[0] == "results":
        from ssl_lightning.results import main as results_main

        results_main(argv[1:])
        return
    if argv and argv[0] == "landscape":
        from ssl_lightning.landscape import main as landscape_main

        landscape_main(argv[1:])
        return
    if argv and argv[0] in EVAL_COMMANDS:
        from ssl_lightning.eval.commands import main as eval_main

        eval_main(argv[0], argv[1:])
        return
    SSLCLI(args=args)


if __name__ == "__main__":
    main()
