"""``lightning-maml`` command line: LightningCLI over :class:`~lightning_maml.MAMLModule`.

The network and the DataModule are chosen by class path in the config, e.g.
``lightning-maml fit --config configs/sinusoid.yaml``; ``--print_config`` shows every setting.
"""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from jsonargparse.typing import PositiveInt
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_maml._trust import _lookup, check_checkpoint_names, read_hyperparameters
from lightning_maml.distributed import end_process_group
from lightning_maml.module import MAMLModule

#: torch intra-op threads of a run unless ``--threads`` (or ``threads:`` in a config) says otherwise
DEFAULT_THREADS = 1


class SaveConfig(SaveConfigCallback):
    """Saves each run's config beside its logs, refusing to overwrite an earlier run's with advice
    a command-line user can follow (``--overwrite_config=true``); a run that fails leaves no empty
    log folder behind (the run's folder and its empty parents, up to the working folder)."""

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if not trainer.is_global_zero or trainer.log_dir is None:
            return
        folder, stop = Path(trainer.log_dir).resolve(), Path.cwd().resolve()
        while folder != stop and stop in folder.parents:
            try:
                folder.rmdir()  # only an empty one
            except OSError:
                return
            folder = folder.parent

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        try:
            super().setup(trainer, pl_module, stage)
        except RuntimeError as error:
            if self.overwrite or "NOT exist" not in str(error):
                raise
            path = f"{trainer.log_dir}/{self.config_filename}"
            raise RuntimeError(
                f"{path} holds the config of an earlier run; pass --overwrite_config=true to "
                "replace it, delete it, or run with a logger (each run then has a folder of its "
                "own)"
            ) from None


class MAMLCLI(LightningCLI):
    """LightningCLI with a ``threads`` setting: torch's intra-op threads for the run, set before
    anything is built (``--threads 2``, ``threads: 2`` in a config; ``null`` leaves torch's
    setting, by default one per core), and ``--overwrite_config=true`` to replace the config an
    earlier run saved in the same folder."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--threads",
            type=PositiveInt | None,
            default=DEFAULT_THREADS,
            help=(
                "torch intra-op threads (default 1: small networks gain nothing from more, and "
                "every network loses most of its speed with more threads than free cores; on a "
                "quiet machine convolution networks gain from one per core; null leaves torch's "
                "setting, one per core unless changed)"
            ),
        )

        parser.add_argument(
            "--overwrite_config",
            type=bool,
            default=False,
            help="replace the config.yaml an earlier run saved in this run's folder",
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, then check ``--ckpt_path`` before Lightning reads the checkpoint's
        hyper-parameters into the config: ``predict`` needs a checkpoint; a checkpoint naming an
        untrusted loss, network, algorithm or optimizer is refused before anything is imported
        (see :meth:`MAMLModule.load_from_checkpoint`); flags the checkpoint's values replace are
        named in a warning."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand is None:
            return
        config = self.config[subcommand]
        ckpt_path = config.get("ckpt_path")
        if not ckpt_path:
            if subcommand == "predict":
                raise MisconfigurationException(
                    "`predict` without --ckpt_path would predict with the network as initialised "
                    "(untrained): pass --ckpt_path=<a checkpoint of a fit>"
                )
            if subcommand in ("validate", "test"):
                rank_zero_warn(
                    f"`{subcommand}` without --ckpt_path scores the network as initialised "
                    "(untrained): pass --ckpt_path=<a checkpoint of a fit> to score a trained one"
                )
            return
        if not Path(ckpt_path).is_file():
            return  # Lightning names the missing file
        hparams = read_hyperparameters(ckpt_path)
        given = config.model.as_dict() if hasattr(config.model, "as_dict") else dict(config.model)
        check_checkpoint_names(
            hparams,
            given,
            replaces=False,
            how_to_pass="--model.{argument}=<the path it names> (or the same in your config)",
        )
        replaced = _replaced_flags(hparams, given)
        if replaced:
            rank_zero_warn(
                "the checkpoint's hyper-parameters replace "
                + ", ".join(
                    f"--model.{k}={mine!r} (the checkpoint has {saved!r})"
                    for k, mine, saved in replaced
                )  # fmt: skip
                + ": a checkpoint is restored as it was trained; to change these, build the "
                "module in Python and load the weights (MAMLModule.load_from_checkpoint(path, "
                "<argument>=...))"
            )

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.get("threads") is not None:
            torch.set_num_threads(config["threads"])
        if config.get("overwrite_config"):
            self.save_config_kwargs = {**self.save_config_kwargs, "overwrite": True}


def _replaced_flags(hparams: dict[str, Any], given: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(argument, the user's value, the checkpoint's)`` for each model argument the user set to
    something other than its default that the checkpoint's value replaces."""
    from lightning_maml.module import MAMLModule

    defaults = {
        name: p.default for name, p in inspect.signature(MAMLModule.__init__).parameters.items()
    }
    replaced = []
    for key, saved in hparams.items():
        if key.startswith("_") or key not in given or key not in defaults:
            continue
        mine = given[key]
        if mine == defaults[key] or mine == saved:
            continue
        if isinstance(mine, dict) and isinstance(saved, dict):  # compare the classes named
            a, b = _lookup(str(mine.get("class_path"))), _lookup(str(saved.get("class_path")))
            if a is not None and a is b:  # its arguments: jsonargparse fills in defaults
                continue
        replaced.append((key, mine, saved))
    return replaced


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
    return MAMLCLI(
        MAMLModule,
        pl.LightningDataModule,
        subclass_mode_data=True,
        save_config_callback=SaveConfig,
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
    build_cli()
    end_process_group()  # under DDP on CPU, see end_process_group


if __name__ == "__main__":
    main()
