"""SinusoidDataModule: the task distribution of Finn et al. 2017, seeding, and argument checks."""

import math

import pytest
import torch

from lightning_maml.datamodules import SinusoidDataModule, sample_sinusoid_tasks
from lightning_maml.datamodules.sinusoid import SinusoidBatches


def test_tasks_follow_the_paper_distribution():
    episode, amplitude, phase = sample_sinusoid_tasks(
        4000, 10, 10, generator=torch.Generator().manual_seed(0), return_parameters=True
    )
    assert 0.1 <= amplitude.min() and amplitude.max() <= 5.0
    assert 0.0 <= phase.min() and phase.max() <= math.pi
    assert amplitude.mean().item() == pytest.approx(2.55, abs=0.1)
    assert -5 <= episode.support_x.min() and episode.query_x.max() <= 5
    expected = amplitude.view(-1, 1, 1) * torch.sin(episode.query_x - phase.view(-1, 1, 1))
    torch.testing.assert_close(episode.query_y, expected)


def test_validation_and_test_tasks_are_fixed_and_training_tasks_fresh():
    dm = SinusoidDataModule(k_shot=5, meta_batch_size=4, batches_per_epoch=3, num_val_tasks=8)
    again = SinusoidDataModule(k_shot=5, meta_batch_size=4, batches_per_epoch=3, num_val_tasks=8)
    val = [b.support_x for b in dm.val_dataloader()]
    assert [v.shape for v in val] == [torch.Size([4, 5, 1])] * 2
    assert all(torch.equal(a, b.support_x) for a, b in zip(val, again.val_dataloader()))
    assert not torch.equal(
        dm.fixed_tasks("val").support_x[:4], dm.fixed_tasks("test").support_x[:4]
    )
    loader = dm.train_dataloader()
    first, second = list(loader), list(loader)
    assert len(first) == 3
    assert not torch.equal(first[0].support_x, first[1].support_x)
    assert not torch.equal(first[0].support_x, second[0].support_x)  # a new epoch, new tasks


def test_ranks_draw_disjoint_slices_of_the_single_process_batch(monkeypatch):
    import lightning_maml.datamodules.sinusoid as sinusoid

    data = SinusoidDataModule(k_shot=3, meta_batch_size=6, batches_per_epoch=2, seed=5)
    single = list(data.train_dataloader())
    parts = []
    for rank in (0, 1):
        monkeypatch.setattr(sinusoid, "_rank_and_world_size", lambda r=rank: (r, 2))
        half = SinusoidDataModule(k_shot=3, meta_batch_size=3, batches_per_epoch=2, seed=5)
        parts.append(list(half.train_dataloader()))
    for b, whole in enumerate(single):
        joined = torch.cat([part[b].support_x for part in parts])
        torch.testing.assert_close(joined, whole.support_x)
    kwargs = data.sampler_kwargs
    assert torch.equal(SinusoidBatches(kwargs, 3, 2, 5, 1, 2)[1].query_y, single[1].query_y[3:])


def test_the_training_loader_is_map_style_with_a_distributed_sampler_lightning_keeps():
    from torch.utils.data import DistributedSampler, IterableDataset

    loader = SinusoidDataModule(meta_batch_size=2, batches_per_epoch=3).train_dataloader()
    assert not isinstance(loader.dataset, IterableDataset)  # no "IterableDataset has __len__"
    assert isinstance(loader.sampler, DistributedSampler) and len(loader) == 3


def test_workers_split_batches_without_repeats():
    dm = SinusoidDataModule(meta_batch_size=2, batches_per_epoch=4, num_workers=2)
    batches = [b.support_x for b in dm.train_dataloader()]
    serial = [
        b.support_x
        for b in SinusoidDataModule(meta_batch_size=2, batches_per_epoch=4).train_dataloader()
    ]
    assert len(batches) == 4
    for a, b in zip(sorted(batches, key=lambda t: t.sum()), sorted(serial, key=lambda t: t.sum())):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"k_shot": 0}, "`k_shot` must be an integer >= 1, got 0"),
        ({"meta_batch_size": 0}, "`meta_batch_size` must be an integer >= 1, got 0"),
        ({"query_size": -3}, "`query_size` must be an integer >= 1, got -3"),
        (
            {"amplitude_range": (5.0, 0.1)},
            r"`amplitude_range` must be a pair \(low, high\).*\(5.0, 0.1\)",
        ),
        ({"x_range": (-5.0, math.inf)}, "`x_range` must be a pair"),
    ],
)
def test_bad_arguments_are_refused_naming_argument_and_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SinusoidDataModule(**kwargs)
