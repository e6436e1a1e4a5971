"""Write the query predictions of ``trainer.predict`` (``lightning-maml predict``) to a file."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from typing_extensions import override


class PredictionWriter(BasePredictionWriter):
    """Saves what :meth:`~lightning_maml.MAMLModule.predict_step` returns, the query predictions
    of every episode after adaptation on its support set, once prediction ends, with what scores
    them, in ``output_dir/predictions.pt`` (``predictions_rank<r>.pt`` per process under DDP):

    - ``predictions``: one ``[tasks, queries, ...]`` tensor per batch (the network's outputs);
    - ``query_y``: the batches' query targets, alike (accuracy:
      ``(predictions[b].argmax(-1) == query_y[b]).float().mean()``);
    - ``batch_indices``: the episodes (positions in the prediction dataset) of each batch;
    - where that dataset is an
      :class:`~lightning_maml.datamodules.EpisodicDataset` (every episodic data module's): the
      ``query_trials`` (positions in its trials, ``[tasks, queries]`` per batch) and ``tasks``
      (e.g. the subject of each episode).

    Args:
        output_dir: the folder to write to (created where missing).

    Example::

        >>> import tempfile
        >>> import lightning.pytorch as pl
        >>> from lightning_maml import MAMLModule
        >>> from lightning_maml.datamodules import SinusoidDataModule
        >>> from lightning_maml.models import MLP
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     trainer = pl.Trainer(callbacks=[PredictionWriter(folder)], logger=False,
        ...                          enable_progress_bar=False)
        ...     _ = trainer.predict(MAMLModule(MLP()), SinusoidDataModule(num_test_tasks=8))
        ...     saved = torch.load(f"{folder}/predictions.pt")
        >>> [p.shape for p in saved["predictions"]], [y.shape for y in saved["query_y"]]
        ([torch.Size([8, 10, 1])], [torch.Size([8, 10, 1])])
    """

    def __init__(self, output_dir: str | Path) -> None:
        super().__init__(write_interval="epoch")
        self.output_dir = Path(output_dir)
        self._targets: list[torch.Tensor] = []

    @override
    def on_predict_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._targets = []

    @override
    def on_predict_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        from lightning_maml.module import as_episode

        self._targets.append(as_episode(batch).query_y.detach().cpu())
        super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)

    @override
    def write_on_epoch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        predictions: Sequence[Any],
        batch_indices: Sequence[Any],
    ) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        name = (
            "predictions.pt"
            if trainer.world_size == 1
            else f"predictions_rank{trainer.global_rank}.pt"
        )
        # Lightning gives the indices per dataloader, then per batch; one dataloader here
        batches = batch_indices[0] if len(batch_indices) == 1 else batch_indices
        flat = [list(b) for b in batches]
        saved: dict[str, Any] = {
            "predictions": list(predictions),
            "query_y": self._targets,
            "batch_indices": flat,
        }
        loaders = trainer.predict_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        dataset = getattr(loader, "dataset", None)
        if (
            hasattr(dataset, "trial_indices")
            and flat
            and all(isinstance(i, int) for b in flat for i in b)
        ):
            saved["query_trials"] = [
                torch.stack([dataset.trial_indices(int(i))[1] for i in indices]) for indices in flat
            ]
            saved["tasks"] = [[dataset.task_of(int(i)) for i in indices] for indices in flat]
        torch.save(saved, self.output_dir / name)
