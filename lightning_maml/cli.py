"""``lightning-maml`` command line: LightningCLI over :class:`~lightning_maml.MAMLModule`.

The network and the DataModule are chosen by class path in the config, e.g.
``lightning-maml fit --config configs/sinusoid.yaml``; ``--print_config`` shows every setting.
"""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI

from lightning_maml.distributed import end_process_group
from lightning_maml.module import MAMLModule


def build_cli(args: list[str] | None = None) -> LightningCLI:
    """Run the CLI (``fit``, ``validate``, ``test``, ``predict``) with ``args`` or ``sys.argv`` and
    return it (with its ``trainer``, ``model`` and ``datamodule``).

    Example::

        >>> import tempfile
        >>> from lightning_maml.cli import build_cli
        >>> with tempfile.TemporaryDirectory() as root:  # the run's config.yaml is saved there
        ...     cli = build_cli(["fit", "--model.net=lightning_maml.models.MLP",
        ...             "--data=lightning_maml.datamodules.SinusoidDataModule",
        ...             "--data.meta_batch_size=2", "--data.batches_per_epoch=2",
        ...             "--data.num_val_tasks=2", "--trainer.max_steps=2",
        ...             f"--trainer.default_root_dir={root}",
        ...             "--trainer.logger=false", "--trainer.enable_checkpointing=false",
        ...             "--trainer.enable_progress_bar=false",
        ...             "--trainer.enable_model_summary=false"])
        >>> cli.trainer.global_step
        2
    """
    return LightningCLI(
        MAMLModule,
        pl.LightningDataModule,
        subclass_mode_data=True,
        # each run saves its config beside its logs; without a logger that is the working
        # directory, and an earlier run's config.yaml there is refused rather than overwritten
        save_config_kwargs={"overwrite": False},
        # the program's name in usage lines and errors, also when run as `python -m lightning_maml`
        parser_kwargs={"prog": "lightning-maml"},
        args=args,
    )


def main() -> None:
    """Entry point of the ``lightning-maml`` console script and ``python -m lightning_maml``."""
    # raised inside Lightning 2.6 on every run (torch deprecated LeafSpec); nothing to act on
    warnings.filterwarnings("ignore", message=r".*LeafSpec", category=FutureWarning)
    # the task streams split their batches between DataLoader workers: their lengths are exact
    warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")
    build_cli()
    end_process_group()  # under DDP on CPU, see end_process_group


if __name__ == "__main__":
    main()
