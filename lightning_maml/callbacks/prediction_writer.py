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
    of every episode after adaptation on its support set, once prediction ends: a list with one
    ``[tasks, queries, ...]`` tensor per batch, in ``output_dir/predictions.pt``
    (``predictions_rank<r>.pt`` per process under DDP, with the episode indices each rank got).

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
        >>> [p.shape for p in saved["predictions"]]
        [torch.Size([8, 10, 1])]
    """

    def __init__(self, output_dir: str | Path) -> None:
        super().__init__(write_interval="epoch")
        self.output_dir = Path(output_dir)

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
        torch.save(
            {"predictions": list(predictions), "batch_indices": list(batch_indices)},
            self.output_dir / name,
        )
