"""MetaGradientLogger: documented names in a CSV file, values against independent computations."""

import csv

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from reference import unrolled_meta_loss
from tasks import quiet_trainer, tanh_mlp

import lightning_maml.callbacks.meta_gradient_logger as logger_module
from lightning_maml import MAMLModule
from lightning_maml.callbacks import MetaGradientLogger
from lightning_maml.datamodules import SinusoidDataModule


class _Capture(pl.Callback):
    """Records the meta-gradient at each optimizer step (runs after the logger)."""

    def __init__(self):
        self.grads, self.batches = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append(tuple(t.clone() for t in batch))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append([p.grad.detach().clone() for p in pl_module.net.parameters()])


def _fit(callbacks, logger=False, max_steps=4, module=None):
    pl.seed_everything(0)
    module = module or MAMLModule(tanh_mlp(), inner_lr=0.3, inner_steps=2)
    data = SinusoidDataModule(k_shot=5, query_size=5, meta_batch_size=4, batches_per_epoch=4)
    trainer = quiet_trainer(
        max_steps=max_steps, limit_val_batches=0, logger=logger, callbacks=callbacks
    )
    trainer.fit(module, data)
    return module


def test_logged_names_land_in_the_csv_file(tmp_path):
    callback = MetaGradientLogger(every_n_steps=2, cosine_first_order=True)
    _fit([callback], logger=CSVLogger(tmp_path, name="run"))
    with open(tmp_path / "run" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("meta_grad/norm")]
    assert [int(r["step"]) for r in rows] == [0, 2]
    names = set(rows[0])
    for name in [
        "meta_grad/norm",
        "meta_grad/inner_grad_norm",
        "meta_grad/query_loss_before",
        "meta_grad/query_loss_after",
        "meta_grad/cosine_first_order",
        "meta_grad/norm/0.weight",
        "meta_grad/norm/4.bias",
    ]:
        assert name in names, name
    assert -1.0 <= float(rows[0]["meta_grad/cosine_first_order"]) <= 1.0


def test_logged_values_match_independent_computations():
    callback, capture = MetaGradientLogger(every_n_steps=1, cosine_first_order=True), _Capture()
    module = _fit([callback, capture], max_steps=1)
    grads = capture.grads[0]
    flat = torch.cat([g.flatten() for g in grads])
    metrics = callback.last_metrics
    assert metrics["meta_grad/norm"] == pytest.approx(flat.norm().item(), rel=1e-5)
    assert metrics["meta_grad/norm/0.weight"] == pytest.approx(grads[0].norm().item(), rel=1e-5)
    out = module.last_meta_output
    assert metrics["meta_grad/query_loss_after"] == pytest.approx(out.query_losses.mean().item())


def test_inner_gradient_norm_and_cosine_against_a_plain_autograd_loop(monkeypatch):
    seen = {}
    original = logger_module.support_gradients

    def spy(net, loss_fn, sx, sy, params=None):
        seen["batch"] = (sx.clone(), sy.clone())
        seen["params"] = [p.detach().clone() for p in net.parameters()]
        return original(net, loss_fn, sx, sy, params)

    monkeypatch.setattr(logger_module, "support_gradients", spy)
    callback, capture = MetaGradientLogger(every_n_steps=1, cosine_first_order=True), _Capture()
    module = _fit([callback, capture], max_steps=1)
    sx, sy = seen["batch"]
    net = tanh_mlp()
    with torch.no_grad():
        for p, q in zip(net.parameters(), seen["params"]):
            p.copy_(q)
    norms = []
    for t in range(sx.shape[0]):
        g = torch.autograd.grad(module.loss_fn(net(sx[t]), sy[t]), list(net.parameters()))
        norms.append(torch.cat([x.flatten() for x in g]).norm())
    assert callback.last_metrics["meta_grad/inner_grad_norm"] == pytest.approx(
        torch.stack(norms).mean().item(), rel=1e-5
    )
    params = dict(net.named_parameters())
    first = unrolled_meta_loss(net, params, module.loss_fn, capture.batches[0], 0.3, 2, True)
    fo = torch.cat([g.flatten() for g in torch.autograd.grad(first, list(params.values()))])
    so = torch.cat([g.flatten() for g in capture.grads[0]])
    expected = torch.nn.functional.cosine_similarity(so, fo, dim=0).item()
    assert callback.last_metrics["meta_grad/cosine_first_order"] == pytest.approx(
        expected, abs=1e-5
    )
    assert expected < 0.9999  # the second-order terms change the direction here


def test_skipped_steps_do_no_extra_work(monkeypatch):
    calls = []
    original = logger_module.support_gradients
    monkeypatch.setattr(
        logger_module, "support_gradients", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    monkeypatch.setattr(
        logger_module, "meta_loss", lambda *a, **k: calls.append(2) or pytest.fail("extra pass")
    )
    _fit([MetaGradientLogger(every_n_steps=3)], max_steps=4)
    assert calls == [1, 1]  # steps 0 and 3, no cosine pass asked for


def test_histograms_go_to_tensorboard(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="tb")
    _fit([MetaGradientLogger(every_n_steps=1, histograms=True)], logger=logger, max_steps=1)
    assert list((tmp_path / "tb").rglob("events.out.tfevents*"))


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="`every_n_steps` must be an integer >= 1, got 0"):
        MetaGradientLogger(every_n_steps=0)
