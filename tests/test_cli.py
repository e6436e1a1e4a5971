"""The lightning-maml command line over LightningCLI."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_maml.cli import build_cli

ROOT = Path(__file__).resolve().parents[1]


def _tiny_config(tmp_path):
    config = yaml.safe_load((ROOT / "configs" / "sinusoid.yaml").read_text())
    config["trainer"].update(
        max_steps=6, val_check_interval=3, enable_progress_bar=False, default_root_dir=str(tmp_path)
    )
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path)
    config["data"]["init_args"].update(
        meta_batch_size=4, batches_per_epoch=6, num_val_tasks=8, num_test_tasks=8
    )
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_cli_fit_then_test_with_the_shipped_config(tmp_path):
    path = _tiny_config(tmp_path)
    cli = build_cli(["fit", "--config", str(path)])
    assert cli.trainer.global_step == 6
    assert type(cli.model.net).__name__ == "MLP"
    assert isinstance(cli.model.trainer.optimizers[0], __import__("torch").optim.Adam)
    metrics = next(tmp_path.glob("sinusoid/version_*/metrics.csv")).read_text()
    assert "val/query_loss_after" in metrics
    ckpt = next(tmp_path.glob("sinusoid/version_*/checkpoints/*.ckpt"))
    cli = build_cli(["test", "--config", str(path), "--ckpt_path", str(ckpt)])
    assert "test/query_loss_after" in cli.trainer.callback_metrics


def test_console_script_runs_and_prints_the_config(tmp_path):
    path = _tiny_config(tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "lightning_maml", "fit", "--config", str(path), "--print_config"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "class_path: lightning_maml.models.MLP" in out.stdout
    assert "inner_lr: 0.01" in out.stdout


def test_help_names_the_program_also_under_python_dash_m():
    out = subprocess.run(
        [sys.executable, "-m", "lightning_maml", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.startswith("usage: lightning-maml ")


def test_cli_fit_with_the_shipped_eeg_config(tmp_path):
    pytest.importorskip("moabb")
    config = yaml.safe_load((ROOT / "configs" / "eeg.yaml").read_text())
    config["trainer"].update(
        max_steps=2,
        val_check_interval=2,
        enable_progress_bar=False,
        enable_checkpointing=False,
        default_root_dir=str(tmp_path),
    )
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path)
    config["data"]["init_args"].update(num_eval_episodes=2, episodes_per_epoch=8)
    config["data"]["init_args"]["dataset_kwargs"]["trials_per_class"] = 20
    path = tmp_path / "eeg.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = build_cli(["fit", "--config", str(path)])
    assert cli.trainer.global_step == 2
    assert type(cli.datamodule.dataset).__name__ == "SyntheticMotorImagery"
    assert cli.datamodule.data["train"][0].shape[1:] == (13, 192)  # matches the EEGNet settings
    assert "val/query_acc_after" in cli.trainer.callback_metrics


def test_a_run_without_logger_does_not_overwrite_an_earlier_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    earlier = tmp_path / "config.yaml"
    earlier.write_text("# an earlier run's config\n")
    args = [
        "fit",
        "--model.net=lightning_maml.models.MLP",
        "--data=lightning_maml.datamodules.SinusoidDataModule",
        "--data.meta_batch_size=2",
        "--data.batches_per_epoch=2",
        "--data.num_val_tasks=2",
        "--trainer.max_steps=1",
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
    ]
    with pytest.raises(RuntimeError, match="config.yaml"):
        build_cli(args)
    assert earlier.read_text() == "# an earlier run's config\n"


@pytest.mark.parametrize(
    "arguments",
    [
        ["--model.algorithm=maml++"],
        [
            "--model.algorithm=lightning_maml.functional.ANIL",
            "--model.algorithm.head=[layers.4.*]",
        ],
        [
            "--model.algorithm=lightning_maml.functional.IMAML",
            "--model.algorithm.lam=100.0",
            "--model.algorithm.cg_steps=3",
        ],
    ],
    ids=["name", "class_path", "imaml"],
)
def test_cli_trains_any_algorithm_and_tests_from_its_checkpoint(tmp_path, arguments):
    path = _tiny_config(tmp_path)
    cli = build_cli(["fit", "--config", str(path), *arguments])
    algorithm = cli.model.algorithm
    assert algorithm.name == arguments[0].split("=")[1].rpartition(".")[2].lower()
    if algorithm.name == "anil":
        assert algorithm.adapted(dict(cli.model.net.named_parameters())) == [
            "layers.4.weight",
            "layers.4.bias",
        ]
    elif algorithm.name == "imaml":
        assert (algorithm.lam, algorithm.cg_steps) == (100.0, 3)
    else:  # the learned step sizes were meta-trained
        assert any((p != 0.01).any() for p in algorithm.parameters())
    ckpt = next(tmp_path.glob("sinusoid/version_*/checkpoints/*.ckpt"))
    cli = build_cli(["test", "--config", str(path), *arguments, "--ckpt_path", str(ckpt)])
    assert cli.model.algorithm.init_args() == algorithm.init_args()
    trained = {n: p for n, p in algorithm.state_dict().items()}
    assert all((cli.model.algorithm.state_dict()[n] == p).all() for n, p in trained.items())


def test_test_from_a_checkpoint_restores_an_algorithm_object_and_keeps_meta_lr_unset(tmp_path):
    path = _tiny_config(tmp_path)
    anil = [
        "--model.algorithm=lightning_maml.functional.ANIL",
        "--model.algorithm.head=[layers.4.*]",
        "--model.algorithm.first_order=true",
    ]
    build_cli(["fit", "--config", str(path), *anil])
    ckpt = next(tmp_path.glob("sinusoid/version_*/checkpoints/*.ckpt"))
    cli = build_cli(["test", "--config", str(path), "--ckpt_path", str(ckpt)])
    algorithm = cli.model.algorithm
    assert type(algorithm).__name__ == "ANIL" and algorithm.first_order
    assert algorithm.adapt == ["layers.4.*"]
    # the default meta_lr was never given: another optimizer may replace the default Adam
    sgd = ["--model.optimizer=torch.optim.SGD", "--model.optimizer.lr=0.1"]
    cli = build_cli(["test", "--config", str(path), *sgd, "--ckpt_path", str(ckpt)])
    assert cli.model.meta_lr is None and "test/query_loss_after" in cli.trainer.callback_metrics


@pytest.mark.parametrize(
    "given, expected", [([], 1), (["--threads=3"], 3), (["--threads=null"], 5)]
)
def test_threads_are_set_before_the_run_from_the_flag_or_config(tmp_path, given, expected):
    before = torch.get_num_threads()
    torch.set_num_threads(5)
    try:
        path = _tiny_config(tmp_path)
        build_cli(["fit", "--config", str(path), "--trainer.max_steps=1", *given])
        assert torch.get_num_threads() == expected
    finally:
        torch.set_num_threads(before)
    with pytest.raises(SystemExit):  # jsonargparse names the key and the value it refuses
        build_cli(["fit", "--config", str(path), "--threads=0"])


def test_predict_from_a_checkpoint_writes_each_episodes_adapted_query_predictions(tmp_path):
    path = _tiny_config(tmp_path)
    build_cli(["fit", "--config", str(path)])
    ckpt = next(tmp_path.glob("sinusoid/version_*/checkpoints/*.ckpt"))
    writer = [
        "--trainer.callbacks+=lightning_maml.callbacks.PredictionWriter",
        f"--trainer.callbacks.output_dir={tmp_path / 'predictions'}",
    ]
    cli = build_cli(["predict", "--config", str(path), *writer, "--ckpt_path", str(ckpt)])
    saved = torch.load(tmp_path / "predictions" / "predictions.pt")["predictions"]
    assert [p.shape for p in saved] == [(4, 10, 1), (4, 10, 1)]  # the 8 test tasks in batches of 4
    module = type(cli.model).load_from_checkpoint(ckpt, net=cli.model.net)
    module.eval()
    batch = next(iter(cli.datamodule.test_dataloader()))
    expected = module.meta_forward(batch, module.eval_inner_steps, train=False)
    torch.testing.assert_close(saved[0], expected.query_predictions)


def test_a_second_run_in_one_folder_is_refused_with_advice_the_command_takes(tmp_path):
    path = _tiny_config(tmp_path)
    arguments = ["fit", "--config", str(path), "--trainer.logger=false", "--trainer.max_steps=1"]
    arguments += [f"--trainer.default_root_dir={tmp_path / 'run'}"]
    build_cli(arguments)
    with pytest.raises(RuntimeError, match="config.yaml holds the config of an earlier run; pass "
                       "--overwrite_config=true"):  # fmt: skip
        build_cli(arguments)
    build_cli([*arguments, "--overwrite_config=true"])  # the advice works


def test_a_run_that_fails_leaves_no_empty_run_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = yaml.safe_load((ROOT / "configs" / "sinusoid.yaml").read_text())
    config["data"] = {"class_path": "tasks.FailingDataModule"}
    (tmp_path / "failing.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(RuntimeError, match="the data could not be loaded"):
        build_cli(["fit", "--config", "failing.yaml"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["failing.yaml"]
