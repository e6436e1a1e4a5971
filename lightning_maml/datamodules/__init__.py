"""DataModules yielding :class:`~lightning_maml.Episode` batches of support/query tasks."""

from lightning_maml.datamodules.sinusoid import SinusoidDataModule, sample_sinusoid_tasks

__all__ = ["SinusoidDataModule", "sample_sinusoid_tasks"]
