"""PyTorch Lightning: `GeometryCallback` measures a Trainer's ViT with tgo's probe at the start of fit
(epoch 0, the initialisation) and after every `every_n_epochs` training epochs (and the last), and
records it as `tgo train` records its geometry, through `tgo.GeometryMonitor`.

    from lightning.pytorch.loggers import MLFlowLogger
    from tgo.integrations.lightning import GeometryCallback

    trainer = L.Trainer(max_epochs=30, logger=MLFlowLogger(experiment_name="vit"),
                        callbacks=[GeometryCallback(val_dataset, probe_size=512)])
    trainer.fit(module, train_loader)

The run is the trainer's `MLFlowLogger`'s when it has one, else the active MLflow run, else a new
one. Under DDP every rank probes its shard of the probe set and the sums are all-reduced (as
`train_ddp` does); rank 0 records. The ViT is the LightningModule itself if it is one, else the
attribute `model_attr` names, else its first submodule with a ViT's token layout.

The run's alarm rules (`alarms`, `alarm_action`, as in tgo train) are tested at every measured
epoch; with alarm_action="stop" a firing sets `trainer.should_stop` (Lightning's own way to end a
fit, as EarlyStopping does), and the run is tagged tgo.stopped_by when the fit ends.

Needs the `lightning` extra (`pip install "tgo[lightning]"`).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from tgo.errors import ConfigError
from tgo.monitor import GeometryMonitor

__all__ = ["GeometryCallback"]


def _is_vit(module: torch.nn.Module) -> bool:
    return hasattr(module, "forward_intermediates") and hasattr(module, "patch_embed")


class GeometryCallback(pl.Callback):
    """Measure the geometry of a LightningModule's ViT during `Trainer.fit`.

    Args:
        probe_data: a dataset of transformed (image, label) pairs, or a DataLoader over one: the fixed
            probe set is drawn from it (tgo's probe_size and probe_seed).
        every_n_epochs: measure after every n-th training epoch (and after the last).
        model_attr: the attribute of the LightningModule that holds the ViT (default: found).
        **settings: tgo train's settings for the probe (tgo.config.TrainConfig names: probe_size,
            probe_folds, probe_seed, probe_batch_size, feature_epochs, weight_spectra, alarms,
            alarm_action, ...).
    """

    def __init__(self, probe_data: Dataset | DataLoader, *, every_n_epochs: int = 1, model_attr: str = "", **settings: Any) -> None:
        if not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ConfigError(f"every_n_epochs: expected a whole number >= 1, got {every_n_epochs!r}.")
        self.probe_data, self.every_n_epochs, self.model_attr, self.settings = probe_data, every_n_epochs, model_attr, settings
        self.monitor: GeometryMonitor | None = None

    def _vit(self, pl_module: pl.LightningModule) -> torch.nn.Module:
        if self.model_attr:
            found = getattr(pl_module, self.model_attr, None)
            if not isinstance(found, torch.nn.Module):
                raise ConfigError(f"model_attr: the LightningModule has no module {self.model_attr!r}.")
            return found
        if _is_vit(pl_module):
            return pl_module
        for _, child in pl_module.named_modules():
            if _is_vit(child):
                return child
        raise ConfigError(
            "GeometryCallback: the LightningModule holds no timm ViT (a module with forward_intermediates and patch_embed); "
            "name it with model_attr=."
        )

    def _run_id(self, trainer: pl.Trainer) -> str:
        """The run of the trainer's MLFlowLogger (rank 0), or "" for the active or a new run."""
        from lightning.pytorch.loggers import MLFlowLogger

        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger) and trainer.is_global_zero:
                return logger.run_id or ""
        return ""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        settings = dict(self.settings)
        if trainer.max_epochs is not None and trainer.max_epochs > 0:
            settings.setdefault("epochs", trainer.max_epochs)  # feature_epochs' "last"
        self.monitor = GeometryMonitor(self._vit(pl_module), self.probe_data, run_id=self._run_id(trainer) or None, **settings)
        if trainer.global_step == 0:  # a fit that starts from a checkpoint has measured its epoch 0 already
            self._measure(trainer, 0)

    def _measure(self, trainer: pl.Trainer, epoch: int) -> None:
        """Measure, and ask the trainer to stop when an alarm with action stop has fired (every rank
        sees the same `should_stop`: the monitor broadcasts rank 0's)."""
        assert self.monitor is not None
        self.monitor.measure(epoch)
        if self.monitor.should_stop:
            trainer.should_stop = True

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.monitor is None or trainer.sanity_checking:
            return
        done = trainer.current_epoch + 1  # training epochs completed (Lightning counts from 0)
        last = trainer.max_epochs is not None and done >= trainer.max_epochs
        if done % self.every_n_epochs == 0 or last:
            self._measure(trainer, done)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.monitor is not None:
            self.monitor.close()
