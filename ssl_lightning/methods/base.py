"""What every SSL method shares, and nothing more: backbone, online probe, optimizer wiring.

A method subclasses SSLMethod, builds its heads in __init__ and implements ``ssl_step(views)``
returning an SSLOutput (loss, backbone features of the first view for the probe, terms to log).
A method that learns from the labels (the supervised baseline) sets ``uses_labels`` and implements
``ssl_step(views, labels)``.
Monitoring lives in callbacks; math lives in ssl_lightning.losses.
"""
from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass, field

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import TQDMProgressBar
from pytorch_lightning.utilities import rank_zero_warn
from torchmetrics.classification import MulticlassAccuracy

from ssl_lightning.callbacks.progress import LogIntervalProgressBar
from ssl_lightning.checkpointing import rng_state, set_rng_state
from ssl_lightning.distributed import DelayedHostRead, layout_line
from ssl_lightning.losses.supervised import labelled_cross_entropy
from ssl_lightning.metrics import topk_accuracy
from ssl_lightning.models.backbones import build_backbone
from ssl_lightning.models.norm import convert_to_global_bn
from ssl_lightning.models.probe import LinearProbe
from ssl_lightning.optim import (
    FiniteStep,
    OptimizerConfig,
    build_optimizer,
    build_scheduler,
    gradients_finite,
    param_groups,
)


@dataclass
class SSLOutput:
    loss: torch.Tensor
    features: torch.Tensor  # backbone features of views[0], (b, feature_dim)
    logs: dict[str, torch.Tensor] = field(default_factory=dict)


class SSLMethod(pl.LightningModule):
    """Base LightningModule. ``batch_size`` is the GLOBAL batch (for lr scaling); ``num_classes``,
    ``in_chans`` and ``image_size`` are filled from the data module by the CLI. ``compile``: True, or
    the keyword arguments of ``torch.compile`` (``{mode: max-autotune}``), compiles the backbone for
    ``fit`` (in place, so checkpoints keep their keys). ``on_nonfinite``: a non-finite loss (on any rank)
    or gradient stops the fit with FloatingPointError ("stop"), or ("skip") skips that optimizer step,
    up to ``max_nonfinite_skips`` times per fit, then stops. Either way the step is undone on the
    device, so weights and optimizer state never see its values, and the host learns of it one step
    later or at the next checkpoint, whichever comes first (docs/failures.md)."""

    uses_labels: bool = False  # ssl_step(views, labels) instead of ssl_step(views)

    def __init__(
        self,
        backbone: str = "resnet18",
        backbone_kwargs: dict | None = None,
        optimizer: OptimizerConfig = OptimizerConfig(),
        sync_bn: bool = True,
        channels_last: bool = False,
        compile: bool | dict = False,
        batch_size: int = 256,
        num_classes: int = 0,
        in_chans: int = 3,
        image_size: int = 32,
        on_nonfinite: str = "stop",
        max_nonfinite_skips: int = 10,
    ):
        super().__init__()
        if on_nonfinite not in ("stop", "skip") or max_nonfinite_skips < 0:
            raise ValueError(f"on_nonfinite {on_nonfinite!r} must be 'stop' or 'skip' and max_nonfinite_skips "
                             f"{max_nonfinite_skips} >= 0")
        self.save_hyperparameters()
        self.nonfinite_skips = 0
        self._step_flags = DelayedHostRead(delay=1)  # (finite, loss) of each optimizer step, read a step later
        self.optim_cfg = optimizer
        self.backbone, self.feature_dim = build_backbone(
            backbone, in_chans=in_chans, image_size=image_size, **(backbone_kwargs or {}))
        self.probe = LinearProbe(self.feature_dim, num_classes) if num_classes > 0 else None
        if self.probe is not None:
            self.probe_topk = sorted({1, min(5, num_classes)})
            self.probe_metrics = torch.nn.ModuleDict({  # validation: accumulated over the epoch, synced once
                f"val_top{k}": MulticlassAccuracy(num_classes, top_k=k, average="micro") for k in self.probe_topk})
        else:
            warnings.warn("num_classes is 0 (unlabelled data): the online linear probe is off", stacklevel=2)

    # ---- what a method implements -------------------------------------------------------
    def ssl_step(self, views: list[torch.Tensor]) -> SSLOutput:
        raise NotImplementedError(f"{type(self).__name__} must implement ssl_step(views)")

    def objective(self, views: list[torch.Tensor], labels: torch.Tensor) -> SSLOutput:
        """The training objective on one batch: ssl_step, given the labels where the method learns from them."""
        return self.ssl_step(views, labels) if self.uses_labels else self.ssl_step(views)

    def evaluated_modules(self) -> tuple[torch.nn.Module, torch.nn.Module | None]:
        """(backbone, projector or None): the network that forward(), the monitors and offline
        evaluation look at. Methods that evaluate an EMA teacher return the teacher's."""
        projector = getattr(self, "projector", None)
        return self.backbone, projector if isinstance(projector, torch.nn.Module) else None

    def frozen_modules(self) -> list[torch.nn.Module]:
        """Modules whose gradients are dropped this step (SwAV prototypes and DINO's last layer
        during the first epoch). The optimizer skips parameters without a gradient entirely."""
        return []

    # ---- Lightning hooks ----------------------------------------------------------------
    def configure_model(self) -> None:
        if self.hparams.sync_bn:
            convert_to_global_bn(self)
        if self.hparams.channels_last:
            self.to(memory_format=torch.channels_last)

    def configure_callbacks(self) -> list[pl.Callback]:
        """Lightning's progress bar reads the loss (``.item()``: on a GPU the host waits for the device)
        at every refresh; this one refreshes at the log interval (see LogIntervalProgressBar)."""
        bar = self.trainer.progress_bar_callback
        if type(bar) is TQDMProgressBar and bar.refresh_rate == 1:
            return [LogIntervalProgressBar(refresh_rate=max(1, self.trainer.log_every_n_steps))]
        return []

    def on_fit_start(self) -> None:
        options = self.hparams.compile
        if options:
            if not isinstance(options, dict):
                options = {}
            self.backbone.compile(**options)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.hparams.channels_last else x

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Backbone features (N, feature_dim): the representation being learned."""
        return self.evaluated_modules()[0](self._prepare(images))

    @torch.no_grad()
    def embeddings(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """What the monitors look at: backbone features and, where the method has one, projector output."""
        features = self(images)
        out = {"backbone": features.float()}
        projector = self.evaluated_modules()[1]
        if projector is not None:
            out["projector"] = projector(features).float()
        return out

    def training_step(self, batch: tuple[list[torch.Tensor], torch.Tensor], batch_idx: int) -> torch.Tensor:
        views, labels = batch
        out = self.objective([self._prepare(v) for v in views], labels)
        # Logged values stay on the device until Lightning reads them at the log interval.
        self.log("train/loss", out.loss)  # not prog_bar: Lightning would read it every step (.item())
        self.log_dict({f"train/{k}": v for k, v in out.logs.items()})
        self.log("train/lr", self.device_scalar("lr", self.optimizers().param_groups[0]["lr"]))
        loss = out.loss
        if self.probe is not None:
            logits = self.probe(out.features)
            probe_loss = labelled_cross_entropy(logits, labels)
            self.log("probe/train_loss", probe_loss)
            for k in self.probe_topk:  # over the labelled samples, without boolean indexing (a sync on CUDA)
                self.log(f"probe/train_top{k}", topk_accuracy(logits.detach(), labels, k))
            loss = loss + probe_loss
        # A non-finite loss on this rank makes every gradient NaN (x * 1.0 is exact otherwise), so DDP's
        # gradient average carries it to every rank, and gradients_finite decides alike on all of them.
        self._last_loss = out.loss.detach()
        return loss * torch.where(torch.isfinite(self._last_loss), 1.0, float("nan"))

    def device_scalar(self, name: str, value: float) -> torch.Tensor:
        """A 0-dim tensor on the device holding ``value``, to log: filled in place (a kernel), where
        ``self.log(name, float)`` copies the number from the host every step (a synchronisation on a GPU)."""
        scalars = self.__dict__.setdefault("_device_scalars", {})
        if name not in scalars or scalars[name].device != self.device:
            scalars[name] = torch.empty((), device=self.device)
        return scalars[name].fill_(value)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        """The step, undone on the device where a gradient is non-finite (``FiniteStep``); then the host
        reads the previous step's flag, which the device computed a whole step ago (``DelayedHostRead``)."""
        guard, step = None, self.global_step  # Lightning counts the step once the optimizer has stepped

        def closure():
            nonlocal guard
            result = optimizer_closure()
            finite = gradients_finite(optimizer)
            guard = FiniteStep(optimizer, finite) if finite is not None else None
            return result

        super().optimizer_step(epoch, batch_idx, optimizer, closure)
        if guard is None:
            return
        guard.apply()
        flags = torch.stack([guard.finite.to(torch.float32), self._last_loss.float()])
        self._act_on_nonfinite([self._step_flags.push(flags, tag=step)])

    def _act_on_nonfinite(self, reads: list) -> None:
        """Warns about (skip), or raises for (stop, or one skip too many), each step read as non-finite."""
        for read in reads:
            if read is None or read[1][0]:
                continue
            step, loss = read[0], read[1][1]
            what = (f"loss is {loss}" if not math.isfinite(loss) else
                    f"gradient is non-finite (this rank's loss is {loss})")
            message = (f"{type(self).__name__} {what} at step {step}; lower optimizer.lr, raise warmup_epochs, "
                       "or check the inputs")
            if self.hparams.on_nonfinite == "stop" or self.nonfinite_skips >= self.hparams.max_nonfinite_skips:
                raise FloatingPointError(f"{message} (on_nonfinite {self.hparams.on_nonfinite}, "
                                         f"{self.nonfinite_skips} step(s) skipped before)")
            self.nonfinite_skips += 1
            rank_zero_warn(f"{message}; step skipped ({self.nonfinite_skips} of at most "
                           f"{self.hparams.max_nonfinite_skips})")

    def resolve_nonfinite(self) -> None:
        """Reads every step flag still pending (the host waits for the device here): before a checkpoint
        is written, so that none records a run that had to stop, and at the end of the fit."""
        self._act_on_nonfinite(self._step_flags.drain())

    def on_train_end(self) -> None:
        self.resolve_nonfinite()

    def on_after_backward(self) -> None:
        for module in self.frozen_modules():
            for p in module.parameters():
                p.grad = None

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        if self.probe is None:
            return
        images, labels = batch
        probe_loss, logits, kept = self.probe.loss(self(images), labels)
        self.log("probe/val_loss", probe_loss, sync_dist=True)
        for name, metric in self.probe_metrics.items():  # accumulated over the epoch, synced once
            metric(logits, kept)
            self.log(f"probe/{name}", metric, on_step=False, on_epoch=True, prog_bar=name == "val_top1")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.resolve_nonfinite()
        checkpoint["rng_state"] = rng_state()  # so a resumed run draws the same augmentations
        checkpoint["method_class"] = f"{type(self).__module__}.{type(self).__qualname__}"  # for offline eval

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "rng_state" in checkpoint:
            set_rng_state(checkpoint["rng_state"])

    def configure_optimizers(self):
        trainer = self.trainer
        global_batch = self.hparams.batch_size * trainer.accumulate_grad_batches
        optimizer = build_optimizer(param_groups(self, self.probe, self.optim_cfg, global_batch), self.optim_cfg)
        print(layout_line(trainer, global_batch, self.optim_cfg.peak_lr(global_batch)), file=sys.stderr, flush=True)
        total = int(trainer.estimated_stepping_batches)  # also sets up the train loader
        per_epoch = max(1, int(min(trainer.num_training_batches, total)) // trainer.accumulate_grad_batches)
        scheduler = build_scheduler(optimizer, self.optim_cfg, total_steps=total, steps_per_epoch=per_epoch)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
