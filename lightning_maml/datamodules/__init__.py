"""DataModules yielding :class:`~lightning_maml.Episode` batches of support/query tasks."""

from lightning_maml.datamodules.episodic import (
    EpisodeSampler,
    EpisodicDataModule,
    EpisodicDataset,
)
from lightning_maml.datamodules.few_shot import FewShotDataModule, read_labels
from lightning_maml.datamodules.moabb import MOABBDataModule
from lightning_maml.datamodules.recordings import EEGPreprocessing
from lightning_maml.datamodules.sinusoid import SinusoidDataModule, sample_sinusoid_tasks

__all__ = [
    "EEGPreprocessing",
    "EpisodeSampler",
    "EpisodicDataModule",
    "EpisodicDataset",
    "FewShotDataModule",
    "MOABBDataModule",
    "SinusoidDataModule",
    "read_labels",
    "sample_sinusoid_tasks",
]
