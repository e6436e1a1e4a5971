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
