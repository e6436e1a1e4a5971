"""The episode type shared by every DataModule: a batch of tasks, each a support and a query set."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class Episode(NamedTuple):
    """Support and query sets of one task, or of a batch of tasks with a leading task dimension.

    A DataLoader collates a sequence of single-task episodes into one batched episode
    (``default_collate`` keeps the named fields).

    Attributes:
        support_x: ``[K, *features]`` (or ``[T, K, *features]`` batched) adaptation inputs.
        support_y: ``[K, *targets]`` adaptation targets.
        query_x: ``[Q, *features]`` evaluation inputs.
        query_y: ``[Q, *targets]`` evaluation targets.

    Example::

        >>> import torch
        >>> from torch.utils.data import default_collate
        >>> x = torch.zeros(5, 1)
        >>> task = Episode(support_x=x, support_y=x, query_x=x, query_y=x)
        >>> default_collate([task, task]).support_x.shape
        torch.Size([2, 5, 1])
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
