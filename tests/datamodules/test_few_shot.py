"""FewShotDataModule: lazy episodes from map-style datasets, class/group splits, errors, DDP."""

import multiprocessing
import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden
from tasks import quiet_trainer
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from lightning_maml import MAMLModule
from lightning_maml.datamodules import FewShotDataModule, read_labels
from lightning_maml.datamodules.resumable import ResumableLoader


class CountingDataset(Dataset):
    """40 samples of each of 10 classes; counts every __getitem__ (across worker processes)."""

    def __init__(self, n_classes=10, per_class=40, with_targets=False):
        self.y = torch.arange(n_classes).repeat_interleave(per_class)
        self.x = torch.randn(len(self.y), 4, generator=torch.Generator().manual_seed(0))
        self.calls = multiprocessing.Value("i", 0)
        self.reads = multiprocessing.Manager().list()
        if with_targets:
            self.targets = self.y.tolist()

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        with self.calls.get_lock():
            self.calls.value += 1
        self.reads.append(i)
        return self.x[i] * 1.0, int(self.y[i])


def test_nothing_is_read_up_front_and_each_sample_once_per_episode():
    data = CountingDataset(with_targets=True)
    dm = FewShotDataModule(
        data, n_way=3, k_shot=2, query_size=3, meta_batch_size=2, fractions=(0.4, 0.3, 0.3)
    )
    dm.setup("fit")
    assert data.calls.value == 0  # labels from `targets`, episodes not drawn yet
    batch = next(iter(dm.train_dataloader()))
    assert data.calls.value == 2 * 3 * (2 + 3)
    assert len(set(data.reads)) == len(data.reads)  # no sample read twice
    # the samples are the dataset's own, and the episode's labels are 0..n_way-1
    assert sorted(batch.support_y[0].tolist()) == [0, 0, 1, 1, 2, 2]


def test_labels_are_read_once_when_not_given_and_samples_in_workers():
    data = CountingDataset()
    dm = FewShotDataModule(
        data,
        n_way=3,
        k_shot=2,
        query_size=3,
        meta_batch_size=2,
        num_workers=2,
        fractions=(0.4, 0.3, 0.3),
    )
    dm.setup("fit")
    assert data.calls.value == len(data)  # one pass for the labels
    dm.setup("fit")
    assert data.calls.value == len(data)
    before = data.calls.value
    next(iter(dm.train_dataloader()))
    assert data.calls.value > before  # counted in the worker processes


def test_classes_are_split_disjointly_and_episodes_use_their_split_only():
    labels = torch.arange(10).repeat_interleave(40)
    data = TensorDataset(labels.float().view(-1, 1).repeat(1, 4), labels)  # input = its class
    dm = FewShotDataModule(
        data,
        classes={"train": [0, 1, 2, 3, 4, 5], "test": [7, 8, 9]},
        n_way=3,
        k_shot=2,
        query_size=3,
        meta_batch_size=8,
    )
    dm.setup()
    assert not is_overridden("val_dataloader", dm)  # no val classes: no validation loader
    assert is_overridden("test_dataloader", dm)
    for split, allowed in (("train", {0, 1, 2, 3, 4, 5}), ("test", {7, 8, 9})):
        loader = dm.train_dataloader() if split == "train" else dm.test_dataloader()
        for batch in loader:
            seen = set(batch.support_x[..., 0].flatten().tolist())
            seen |= set(batch.query_x[..., 0].flatten().tolist())
            assert seen <= allowed
            assert batch.support_x.shape[1] == 6 and batch.query_x.shape[1] == 9


def test_given_classes_with_too_few_for_an_episode_are_refused_clearly():
    data = TensorDataset(torch.randn(400, 4), torch.arange(10).repeat_interleave(40))
    dm = FewShotDataModule(data, classes={"train": [0, 1, 2], "test": [7, 8]}, n_way=3)
    with pytest.raises(ValueError, match=r"the test split has 2 classes, fewer than n_way=3: the "
                       r"splits have train 3, test 2"):  # fmt: skip
        dm.setup()
    short = TensorDataset(torch.randn(60, 4), torch.tensor([0] * 50 + [1] * 5 + [2] * 5))
    dm = FewShotDataModule(short, classes={"train": [0, 1, 2]}, n_way=2, k_shot=3, query_size=5)
    with pytest.raises(ValueError, match=r"short of that: \{1: 5, 2: 5\}"):
        dm.setup()


def test_overlapping_splits_and_bad_labels_are_refused():
    data = TensorDataset(torch.randn(400, 4), torch.arange(10).repeat_interleave(40))
    with pytest.raises(ValueError, match=r"train and test splits share classes \[2\]"):
        FewShotDataModule(data, classes={"train": [0, 1, 2], "test": [2, 3, 4]}).setup()
    other = TensorDataset(torch.randn(40, 4), torch.full((40,), 3))
    with pytest.raises(ValueError, match=r"train and val splits share classes \[3\]"):
        FewShotDataModule(train=data, val=other).setup()
    floats = TensorDataset(torch.randn(40, 4), torch.rand(40))
    with pytest.raises(ValueError, match="must be integer class labels; item 0 is"):
        FewShotDataModule(floats).setup()
    with pytest.raises(ValueError, match="either `dataset`"):
        FewShotDataModule(data, train=data)
    with pytest.raises(ValueError, match="`labels` has 3 entries for 400 samples"):
        FewShotDataModule(data, labels=[0, 1, 2]).setup()


def test_groups_make_tasks_and_split_disjointly():
    labels = np.tile([0, 1], 200)
    subjects = np.repeat(np.arange(1, 11), 40)
    data = TensorDataset(torch.randn(400, 4), torch.as_tensor(labels))
    dm = FewShotDataModule(
        data,
        groups=subjects,
        n_way=2,
        k_shot=3,
        query_size=3,
        meta_batch_size=5,
        fractions=(0.6, 0.2, 0.2),
    )
    dm.setup()
    assert sorted(sum(dm.split_classes.values(), [])) == list(range(1, 11))
    train_subjects = set(dm.split_classes["train"])
    _, _, tasks = dm.splits["train"]
    assert set(tasks.tolist()) == train_subjects


def test_fresh_seeded_episodes_every_epoch_and_a_resumable_loader():
    data = TensorDataset(torch.randn(400, 4), torch.arange(10).repeat_interleave(40))

    def first(epoch, seed=0):
        dm = FewShotDataModule(
            data, n_way=3, k_shot=2, query_size=3, seed=seed, fractions=(0.4, 0.3, 0.3)
        )
        dm.setup()
        loader = dm.train_dataloader()
        assert isinstance(loader, ResumableLoader)
        loader.sampler.set_epoch(epoch)
        loader.dataset.set_epoch(epoch)
        return next(iter(torch.utils.data.DataLoader(loader.dataset, batch_size=4))).support_x

    assert torch.equal(first(0), first(0))
    assert not torch.equal(first(0), first(1))
    assert not torch.equal(first(0), first(0, seed=1))


class _Digits(pl.LightningDataModule):
    """An ordinary project DataModule: train/val/test datasets with disjoint classes."""

    def setup(self, stage=None):
        x = torch.randn(600, 4, generator=torch.Generator().manual_seed(0))
        y = torch.arange(15).repeat_interleave(40)
        self.train_set = TensorDataset(x[:360], y[:360])
        self.val_set = TensorDataset(x[360:480], y[360:480])
        self.test_set = TensorDataset(x[480:], y[480:])

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.train_set, batch_size=32, shuffle=True)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(self.val_set, batch_size=32)

    def test_dataloader(self):
        return torch.utils.data.DataLoader(self.test_set, batch_size=32)


def test_episodes_from_an_existing_datamodule_train_and_test():
    dm = FewShotDataModule.from_datamodule(
        _Digits(),
        n_way=3,
        k_shot=2,
        query_size=3,
        meta_batch_size=2,
        episodes_per_epoch=6,
        num_eval_episodes=4,
    )
    dm.setup()
    assert dm.split_classes == {"train": list(range(9)), "val": [9, 10, 11], "test": [12, 13, 14]}
    module = MAMLModule(torch.nn.Linear(4, 3), loss="cross_entropy", inner_lr=0.1)
    trainer = quiet_trainer(max_steps=3)
    trainer.fit(module, dm)
    assert trainer.test(module, dm, verbose=False)[0]["test/query_acc_after"] >= 0


def test_read_labels_refuses_samples_without_labels():
    with pytest.raises(ValueError, match="sample 0 of TensorDataset is not an"):
        read_labels(TensorDataset(torch.randn(3, 2)))


class _RecordBatches(pl.Callback):
    def __init__(self, directory):
        self.directory = directory

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        torch.save(batch.support_x, self.directory / f"rank{trainer.global_rank}-{batch_idx}.pt")


def test_ddp_ranks_draw_different_episodes(tmp_path):
    data = TensorDataset(torch.randn(400, 4), torch.arange(10).repeat_interleave(40))
    dm = FewShotDataModule(
        data,
        n_way=3,
        k_shot=2,
        query_size=3,
        meta_batch_size=2,
        episodes_per_epoch=8,
        fractions=(0.4, 0.3, 0.3),
    )
    module = MAMLModule(torch.nn.Linear(4, 3), loss="cross_entropy", inner_lr=0.1)
    trainer = quiet_trainer(
        max_steps=2,
        devices=2,
        strategy="ddp_spawn",
        limit_val_batches=0,
        callbacks=[_RecordBatches(tmp_path)],
    )
    trainer.fit(module, dm)
    for i in range(2):
        rank0, rank1 = (torch.load(tmp_path / f"rank{r}-{i}.pt") for r in (0, 1))
        assert not torch.equal(rank0, rank1)


@pytest.mark.parametrize(
    "n_classes, fractions, counts",
    [
        (7, (0.6, 0.2, 0.2), [4, 2, 1]),
        (5, (0.5, 0.5, 0.0), [3, 2, 0]),
        (10, (0.5, 0.2, 0), [5, 2, 0]),
    ],
)
def test_fractions_summing_to_one_use_every_class(n_classes, fractions, counts):
    data = TensorDataset(torch.randn(n_classes * 10, 2), torch.arange(n_classes).repeat(10))
    dm = FewShotDataModule(data, n_way=1, k_shot=2, query_size=3, fractions=fractions)
    dm.setup("fit")
    split = [len(dm.split_classes.get(s, [])) for s in ("train", "val", "test")]
    assert split == counts
    used = [c for classes in dm.split_classes.values() for c in classes]
    assert len(set(used)) == len(used) == sum(counts)


class DictDataset(Dataset):
    """Samples as mappings, the way many dataset libraries give them."""

    def __init__(self):
        self.x, self.y = torch.randn(200, 4), torch.arange(200) % 10

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"image": self.x[i], "label": int(self.y[i])}


def test_mapping_samples_are_read_through_input_and_label_keys():
    data = DictDataset()
    dm = FewShotDataModule(data, n_way=2, k_shot=1, query_size=2, input_key="image", labels=data.y)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch.support_x.shape == (4, 2, 4)
    keyed = FewShotDataModule(data, n_way=2, input_key="image", label_key="label")
    keyed.setup("fit")
    assert keyed.split_classes == dm.split_classes
    with pytest.raises(ValueError, match=r"mapping with keys \['image', 'label'\]: pass input_key"):
        no_key = FewShotDataModule(data, n_way=2, k_shot=1, query_size=2, labels=data.y)
        no_key.setup("fit")
        next(iter(no_key.train_dataloader()))
    with pytest.raises(ValueError, match=r"no label at label_key='target'.*\['image', 'label'\]"):
        FewShotDataModule(data, n_way=2, label_key="target").setup("fit")


def test_a_split_with_fewer_classes_than_n_way_names_fractions_n_way_and_the_counts():
    data = TensorDataset(torch.randn(400, 2), torch.arange(20).repeat(20))
    with pytest.raises(
        ValueError,
        match=r"the val split has 4 classes, fewer than n_way=5: `fractions` \(0.6, 0.2, 0.2\) "
        r"of the 20 classes give train 12, val 4, test 4",
    ):
        FewShotDataModule(data).setup("fit")
    FewShotDataModule(data, fractions=(0.5, 0.25, 0.25)).setup("fit")  # the advice works


def test_without_a_validation_split_fit_trains_quietly_and_test_names_the_missing_loader():
    data = TensorDataset(torch.randn(200, 3), torch.arange(10).repeat(20))
    dm = FewShotDataModule(
        data, fractions=(0.6, 0.0, 0.0), n_way=2, k_shot=2, query_size=2, episodes_per_epoch=4
    )
    module = MAMLModule(nn.Linear(3, 2), loss="cross_entropy", inner_lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(max_steps=2).fit(module, dm)
    # what Lightning says of any project without a validation loader, not "Total length of
    # `list` across ranks is zero" for an empty one
    messages = [
        str(w.message) for w in caught if "LeafSpec" not in str(w.message)
    ]  # torch's, in Lightning
    assert all("Skipping val loop" in m for m in messages), messages
    with pytest.raises(MisconfigurationException, match="test_dataloader"):
        quiet_trainer().test(module, dm)
    with pytest.raises(ValueError, match="no test split to predict on"):
        dm.predict_dataloader()


def test_a_nonzero_fraction_that_gives_no_class_is_refused():
    data = TensorDataset(torch.randn(100, 3), torch.arange(10).repeat(10))
    dm = FewShotDataModule(data, fractions=(0.9, 0.04, 0.06), n_way=2)
    with pytest.raises(ValueError, match=r"leave the val split\(s\) empty"):
        dm.setup()
