"""EpisodicDataset: balanced, seeded, without replacement; clear errors for short tasks."""

import pytest
import torch

from lightning_maml.datamodules import EpisodicDataset


def _data():
    # 2 tasks; task 0 has classes 0,1,2 with 10 trials each; task 1 has classes 0,1 with 6 each
    x, y, ids = [], [], []
    for task, classes, n in ((0, (0, 1, 2), 10), (1, (0, 1), 6)):
        for c in classes:
            for _ in range(n):
                x.append(len(x))
                y.append(c)
                ids.append(task)
    return torch.tensor(x, dtype=torch.float32).view(-1, 1), torch.tensor(y), torch.tensor(ids)


def test_episodes_are_balanced_disjoint_and_seeded():
    x, y, ids = _data()
    episodes = EpisodicDataset(x, y, ids, n_way=2, k_shot=2, query_size=3, num_episodes=20, seed=3)
    again = EpisodicDataset(x, y, ids, n_way=2, k_shot=2, query_size=3, num_episodes=20, seed=3)
    for i in range(20):
        e = episodes[i]
        assert e.support_y.tolist() == [0, 0, 1, 1] and e.query_y.tolist() == [0, 0, 0, 1, 1, 1]
        used = torch.cat([e.support_x, e.query_x]).flatten().long()
        assert len(set(used.tolist())) == 10  # no trial twice in an episode
        assert set(ids[used].tolist()) == {i % 2}  # one task per episode
        original = y[used]
        assert (original[:2] == original[0]).all() and (original[4:7] == original[0]).all()
        torch.testing.assert_close(e.support_x, again[i].support_x)
    assert not torch.equal(episodes[0].support_x, episodes[2].support_x)


def test_labels_can_be_kept():
    x, y, ids = _data()
    e = EpisodicDataset(x, y, ids, 2, 1, 1, 5, relabel=False)[0]
    assert torch.equal(y[e.support_x.flatten().long()], e.support_y)


def test_too_few_trials_names_task_and_class():
    x, y, ids = _data()
    with pytest.raises(
        ValueError, match=r"task 1 has 0 classes with at least .* 8 trials.*\{0: 6, 1: 6\}"
    ):
        EpisodicDataset(x, y, ids, n_way=2, k_shot=4, query_size=4, num_episodes=5)
    with pytest.raises(ValueError, match="task 1 has 2 classes .* 3 needed"):
        EpisodicDataset(x, y, ids, n_way=3, k_shot=1, query_size=1, num_episodes=5)
    with pytest.raises(ValueError, match="task 7 has no trials"):
        EpisodicDataset(x, y, ids, 2, 1, 1, 5, tasks=[7])


def test_kept_labels_are_the_original_classes_in_ascending_order():
    x, y, ids = _data()
    episodes = EpisodicDataset(x, y, ids, 2, 2, 3, num_episodes=30, relabel=False, tasks=[0])
    seen = set()
    for i in range(30):
        e = episodes[i]
        classes = sorted(set(e.support_y.tolist()))
        seen.add(tuple(classes))
        assert e.support_y.tolist() == [classes[0]] * 2 + [classes[1]] * 2
        # each trial's kept label is its true class (x holds the trial index)
        assert torch.equal(y[e.query_x.flatten().long()], e.query_y)
    assert seen == {(0, 1), (0, 2), (1, 2)}


def test_set_epoch_draws_fresh_episodes_and_epoch_zero_is_the_initial_set():
    x, y, ids = _data()
    episodes = EpisodicDataset(x, y, ids, 2, 2, 3, num_episodes=10, seed=1)
    initial = [episodes[i].support_x for i in range(10)]
    episodes.set_epoch(1)
    fresh = [episodes[i].support_x for i in range(10)]
    assert sum(torch.equal(a, b) for a, b in zip(initial, fresh)) < 5
    episodes.set_epoch(0)
    assert all(torch.equal(a, episodes[i].support_x) for i, a in enumerate(initial))
    with pytest.raises(ValueError, match="`epoch` must be an integer >= 0"):
        episodes.set_epoch(-1)


def test_trainer_gives_each_epoch_new_training_episodes():
    import lightning.pytorch as pl
    from tasks import quiet_trainer

    from lightning_maml.datamodules import EpisodeSampler

    x, y, ids = _data()
    episodes = EpisodicDataset(x, y, ids, 2, 2, 3, num_episodes=4, seed=1)
    loader = torch.utils.data.DataLoader(
        episodes, batch_size=2, sampler=EpisodeSampler(episodes, seed=1)
    )
    seen = []

    class Record(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch, batch_idx):
            seen.append((self.current_epoch, batch.support_x.flatten().tolist()))
            return (self.w - 1).pow(2).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    quiet_trainer(max_epochs=3).fit(Record(), loader)
    by_epoch = [sorted(tuple(s) for e, s in seen if e == epoch) for epoch in range(3)]
    assert len(seen) == 6
    assert by_epoch[0] != by_epoch[1] != by_epoch[2]
    # epoch 0 is the dataset's initial episode set
    episodes.set_epoch(0)
    initial = sorted(tuple(episodes[i].support_x.flatten().tolist()) for i in range(4))
    assert sorted(sum((list(p) for p in by_epoch[0]), [])) == sorted(sum(map(list, initial), []))
