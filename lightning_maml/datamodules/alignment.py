"""Euclidean alignment of EEG trials across subjects (He & Wu 2019).

Each subject's trials ``X_i`` (channels x samples) are whitened by the inverse square root of
their mean spatial covariance ``R = mean_i X_i X_i^T / T``: ``X_i -> R^{-1/2} X_i``. After it,
every subject's mean covariance is the identity, which removes much of what differs between
subjects (head shape, electrode impedances) before a network sees the trials. ``R`` must come from
trials the method may look at: a training subject's own trials, and for a new subject its
labelled calibration (support) trials, never the trials it is scored on, unless asked for the
transductive variant (all of a subject's unlabelled trials).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from lightning_maml.episode import Episode


def alignment_matrix(trials: Tensor | np.ndarray) -> Tensor:
    """``R^{-1/2}`` of ``trials`` (``[n, channels, samples]``), ``R`` their mean spatial
    covariance, computed in float64 by an eigendecomposition (eigenvalues below ``1e-10`` of the
    largest are raised to it, so a rank-deficient ``R`` stays finite).

    Example::

        >>> x = torch.randn(20, 3, 100, dtype=torch.float64) * torch.tensor([[1.0], [5.0], [0.2]])
        >>> aligned = align(x, alignment_matrix(x))
        >>> torch.allclose((aligned @ aligned.transpose(1, 2) / 100).mean(0), torch.eye(3).double())
        True
    """
    x = torch.as_tensor(trials).to(torch.float64)
    if x.dim() != 3 or len(x) == 0:
        raise ValueError(
            f"`trials` must be [trials, channels, samples] with at least one trial, got shape "
            f"{tuple(x.shape)}"
        )
    covariance = (x @ x.transpose(1, 2)).mean(0) / x.shape[2]
    values, vectors = torch.linalg.eigh(covariance)
    values = values.clamp_min(values.max() * 1e-10)
    return (vectors * values.rsqrt()) @ vectors.T


def align(trials: Tensor, matrix: Tensor) -> Tensor:
    """``matrix @ X`` for every trial ``X`` of ``trials`` (``[..., channels, samples]``), in the
    trials' dtype."""
    return (matrix.to(trials.dtype) @ trials).contiguous()


class SupportAlignment:
    """An episode transform: both sets of an episode aligned with the matrix of its support trials
    alone (a new subject's calibration trials), so no query trial informs anything fitted.

    Example::

        >>> sx, qx = torch.randn(4, 3, 50), torch.randn(6, 3, 50)
        >>> y = torch.zeros(4, dtype=torch.long)
        >>> out = SupportAlignment()(Episode(sx, y, qx, y[:2].repeat(3)))
        >>> torch.allclose(out.query_x, align(qx, alignment_matrix(sx)))
        True
    """

    def __call__(self, episode: Episode) -> Episode:
        matrix = alignment_matrix(episode.support_x)
        return episode._replace(
            support_x=align(episode.support_x, matrix), query_x=align(episode.query_x, matrix)
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
