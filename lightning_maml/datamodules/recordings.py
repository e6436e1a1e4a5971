"""A new person's recordings, prepared exactly as a network's training trials were.

:class:`EEGPreprocessing` records how :class:`~lightning_maml.datamodules.MOABBDataModule` made
its trials (channels and their order, band, window, sampling rate, scaling, standardisation,
class names). A :class:`~lightning_maml.MAMLModule` trained on such a data module keeps it in its
checkpoints (``module.preprocessing``), so a network and the way to feed it travel together::

    preprocessing = EEGPreprocessing.of(module)
    x, y = preprocessing.prepare(raws, events={"left_hand": "T1", "right_hand": "T2"})

Continuous recordings (MNE ``Raw``, one per run) go through MOABB's own steps, as training's did:
band-pass filter of each run, epochs cut around the cues, resampling, scaling. Trials already cut
and filtered (MNE ``Epochs`` or arrays with channel names and a sampling rate) are checked and
standardised. Other channels, a channel order that cannot be mapped by name, another sampling
rate or window are refused, naming what differs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

#: standardisations :meth:`EEGPreprocessing.prepare` reproduces (``MOABBDataModule(standardize=)``)
STANDARDIZATIONS = ("trial", "subject", "none")


def _key(name: str) -> str:
    # channel names as written by different tools: "Fc5." (PhysioNet's EDF), "FC5" (MOABB)
    return name.strip(" .").upper()


def standardize_trials(x: np.ndarray, how: str) -> np.ndarray:
    """``x`` (``[n, channels, samples]``) standardised as ``MOABBDataModule`` does: each channel to
    zero mean and unit variance over each trial's samples (``"trial"``), over all trials and
    samples (``"subject"``), or unchanged (``"none"``).

    Example::

        >>> x = np.random.default_rng(0).normal(3.0, 2.0, (4, 2, 50)).astype(np.float32)
        >>> bool(np.allclose(standardize_trials(x, "trial").std(axis=2), 1, atol=1e-3))
        True
    """
    if how not in STANDARDIZATIONS:
        raise ValueError(f"`standardize` must be one of {STANDARDIZATIONS}, got {how!r}")
    if how == "none":
        return x
    axes = (0, 2) if how == "subject" else (2,)
    mean = x.mean(axis=axes, keepdims=True)
    std = x.std(axis=axes, keepdims=True) + 1e-8
    return (x - mean) / std


@dataclass(frozen=True)
class EEGPreprocessing:
    """How a network's trials were made from recordings.

    Attributes:
        channels: the channel names, in the order of the network's input rows.
        sampling_rate: of the trials, in Hz (after any resampling).
        n_samples: samples per trial.
        fmin: low edge of the band-pass filter in Hz (``None``: none).
        fmax: high edge (``None``: none).
        tmin: start of the window, in seconds from the cue.
        tmax: end of the window (inclusive, as MNE's epochs).
        unit_factor: what the recordings (in volts) were multiplied by (MOABB's).
        standardize: ``"trial"``, ``"subject"`` or ``"none"`` (:func:`standardize_trials`).
        alignment: the data module's ``alignment`` (``"none"``; with ``"euclidean"`` a new
            person's trials are aligned by the calibration trials' matrix:
            :func:`~lightning_maml.datamodules.alignment.alignment_matrix`).
        classes: class names, in the order of the network's outputs.

    Example::

        >>> p = EEGPreprocessing(channels=("C3", "Cz", "C4"), sampling_rate=80.0, n_samples=240,
        ...                      fmin=8.0, fmax=30.0, tmin=0.0, tmax=3.0, unit_factor=1e6,
        ...                      standardize="trial", alignment="none",
        ...                      classes=("left_hand", "right_hand"))
        >>> trials = np.random.default_rng(0).normal(size=(5, 3, 240))
        >>> x = p.prepare(trials[:, [2, 0, 1]], channel_names=["c4", "C3", "CZ"],
        ...               sampling_rate=80)  # reordered by name
        >>> x.shape, bool(torch.allclose(x, p.prepare(trials, channel_names=p.channels,
        ...                                                 sampling_rate=80)))
        (torch.Size([5, 3, 240]), True)
    """

    channels: tuple[str, ...]
    sampling_rate: float
    n_samples: int
    fmin: float | None
    fmax: float | None
    tmin: float
    tmax: float
    unit_factor: float
    standardize: str
    alignment: str
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        # plain strings (NumPy's would not load from a checkpoint read as data)
        object.__setattr__(self, "channels", tuple(str(c) for c in self.channels))
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        if self.standardize not in STANDARDIZATIONS:
            raise ValueError(
                f"`standardize` must be one of {STANDARDIZATIONS}, got {self.standardize!r}"
            )
        keys = [_key(c) for c in self.channels]
        if len(set(keys)) != len(keys):
            raise ValueError(f"`channels` names a channel twice: {list(self.channels)}")

    def as_dict(self) -> dict[str, Any]:
        """Plain values (lists, numbers, strings), as a checkpoint stores them."""
        values = asdict(self)
        values["channels"], values["classes"] = list(self.channels), list(self.classes)
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> EEGPreprocessing:
        """The preprocessing :meth:`as_dict` describes."""
        return cls(**dict(values))

    @classmethod
    def of(cls, module: Any) -> EEGPreprocessing:
        """The preprocessing a trained :class:`~lightning_maml.MAMLModule` (or one loaded from its
        checkpoint) recorded from its data module.

        Raises:
            ValueError: if the module was not trained on a data module that describes it.
        """
        values = getattr(module, "preprocessing", None)
        if not values:
            raise ValueError(
                "this module records no preprocessing: it was not fitted on a data module that "
                "describes its trials (MOABBDataModule does), or its checkpoint predates that; "
                "build an EEGPreprocessing(...) with the settings it was trained with"
            )
        return cls.from_dict(values)

    @property
    def window(self) -> str:
        return f"{self.tmin:g}-{self.tmax:g} s from the cue at {self.sampling_rate:g} Hz"

    def channel_order(self, names: Sequence[str]) -> list[int]:
        """Where each of :attr:`channels` is among ``names`` (matched by name, ignoring case and
        PhysioNet's trailing dots).

        Raises:
            ValueError: naming the channels that are missing or matched twice.
        """
        index: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            index.setdefault(_key(name), []).append(i)
        missing = [c for c in self.channels if _key(c) not in index]
        twice = [c for c in self.channels if len(index.get(_key(c), [])) > 1]
        if missing or twice:
            raise ValueError(
                "the recordings' channels cannot be mapped onto the network's: "
                + (f"missing {missing}" if missing else "")
                + ("; " if missing and twice else "")
                + (f"named more than once {twice}" if twice else "")
                + f" (the network takes {len(self.channels)} channels: {list(self.channels)})"
            )
        return [index[_key(c)][0] for c in self.channels]

    def prepare(
        self,
        recordings: Any,
        events: Mapping[str, str] | None = None,
        *,
        channel_names: Sequence[str] | None = None,
        sampling_rate: float | None = None,
    ) -> Any:
        """A new person's trials as the network takes them: ``[n, channels, samples]`` float32.

        Args:
            recordings: continuous recordings: an MNE ``Raw`` or a list of them (one per run,
                each filtered on its own, as training's runs were), with ``events``; or trials
                already cut to the window and band-passed as training's were (MNE ``Epochs``, or
                an array ``[n, channels, samples]`` with ``channel_names`` and
                ``sampling_rate``), which are checked, reordered and standardised.
            events: for ``Raw``: each class name (of :attr:`classes`) and the annotation that
                marks its cues in the recordings, e.g. ``{"left_hand": "T1", "right_hand":
                "T2"}`` for PhysioNet's EDF files; the trials of other annotations are left out.
            channel_names: for an array, its channels' names.
            sampling_rate: for an array, its sampling rate in Hz.

        Returns:
            For ``Raw``: ``(trials, labels)``, labels the class indices (the network's outputs,
            in the order of :attr:`classes`); otherwise the trials.

        Raises:
            ValueError: on channels that cannot be mapped, another sampling rate or window, an
                unknown class, or recordings without any cue of the classes.
        """
        import mne

        if isinstance(recordings, mne.io.BaseRaw) or (
            isinstance(recordings, (list, tuple))
            and recordings
            and all(isinstance(r, mne.io.BaseRaw) for r in recordings)
        ):
            raws = [recordings] if isinstance(recordings, mne.io.BaseRaw) else list(recordings)
            return self._from_raws(raws, events)
        if events is not None:
            raise ValueError("`events` is for continuous recordings (MNE Raw); trials are cut")
        if isinstance(recordings, mne.BaseEpochs):
            if channel_names is not None or sampling_rate is not None:
                raise ValueError("MNE Epochs carry their channel names and sampling rate")
            channel_names = recordings.ch_names
            sampling_rate = recordings.info["sfreq"]
            recordings = recordings.get_data(copy=True) * self.unit_factor
        if channel_names is None or sampling_rate is None:
            raise ValueError(
                "an array of trials needs `channel_names` and `sampling_rate` (of its "
                f"channels and samples), got {channel_names!r} and {sampling_rate!r}"
            )
        x = np.asarray(recordings)
        if x.ndim != 3 or len(channel_names) != x.shape[1]:
            raise ValueError(
                f"trials must be [n, channels, samples] with one name per channel, got shape "
                f"{x.shape} and {len(channel_names)} channel names"
            )
        x = self._finish(x, channel_names, float(sampling_rate))
        return torch.as_tensor(standardize_trials(x, self.standardize))

    def _finish(self, x: np.ndarray, names: Sequence[str], rate: float) -> np.ndarray:
        if not np.isclose(rate, self.sampling_rate):
            raise ValueError(
                f"the trials are sampled at {rate:g} Hz, the network's at {self.sampling_rate:g} "
                "Hz: resample the recordings first (or pass the continuous recordings)"
            )
        if x.shape[2] != self.n_samples:
            raise ValueError(
                f"the trials have {x.shape[2]} samples, the network takes {self.n_samples} "
                f"({self.window}): cut them to that window"
            )
        return x[:, self.channel_order(names)].astype(np.float32)

    def _from_raws(self, raws: list, events: Mapping[str, str] | None) -> tuple[Tensor, Tensor]:
        import mne
        from moabb.datasets.preprocessing import (
            RawToEpochs,
            get_filter_pipeline,
            get_resample_pipeline,
        )

        if not events:
            raise ValueError(
                f"continuous recordings need `events`: each class of {list(self.classes)} and "
                "the annotation marking its cues, e.g. {'left_hand': 'T1', 'right_hand': 'T2'}"
            )
        unknown = sorted(set(events) - set(self.classes))
        if unknown:
            raise ValueError(f"`events` names classes {unknown}; the network's are {self.classes}")
        codes = {name: self.classes.index(name) + 1 for name in events}
        xs, ys = [], []
        for raw in raws:
            raw = raw.copy().load_data()
            order = self.channel_order(raw.ch_names)
            raw.rename_channels({raw.ch_names[i]: c for i, c in zip(order, self.channels)})
            try:
                found, _ = mne.events_from_annotations(
                    raw, event_id={events[n]: code for n, code in codes.items()}, verbose=False
                )
            except ValueError:  # MNE: none of them in this run
                continue
            if len(found) == 0:
                continue
            raw = get_filter_pipeline(self.fmin, self.fmax).transform(raw)
            epochs = RawToEpochs(
                event_id=codes, tmin=self.tmin, tmax=self.tmax, baseline=None,
                channels=list(self.channels),
            ).transform({"raw": raw, "events": found})  # fmt: skip
            if not np.isclose(epochs.info["sfreq"], self.sampling_rate):
                epochs = get_resample_pipeline(self.sampling_rate).transform(epochs)
            x = epochs.get_data(copy=True) * self.unit_factor
            xs.append(self._finish(x, epochs.ch_names, epochs.info["sfreq"]))
            ys.append(epochs.events[:, 2] - 1)
        if not xs:
            raise ValueError(
                f"no cue annotated {sorted(events.values())} in the recordings: `events` maps "
                "class names to the annotation descriptions that mark them"
            )
        # "subject": over all of the person's trials, as training did over each subject's
        x = standardize_trials(np.concatenate(xs), self.standardize)
        return torch.as_tensor(x), torch.as_tensor(np.concatenate(ys), dtype=torch.long)
