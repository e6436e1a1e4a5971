"""A synthetic motor-imagery EEG dataset in MOABB's dataset form, with a learnable class signal."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import mne
import numpy as np
from moabb.datasets.base import BaseDataset

from lightning_maml._checks import check_count

__all__ = ["SyntheticMotorImagery"]

# class -> the motor cortex whose mu rhythm it modulates (contralateral for the hands)
_SOURCES = {"left_hand": "C4", "right_hand": "C3", "feet": "Cz"}
_CHANNELS = ("FC3", "FCz", "FC4", "C5", "C3", "C1", "Cz", "C2", "C4", "C6", "CP3", "CPz", "CP4")


def _montage() -> mne.channels.DigMontage:
    # MNE 1.13 renamed the 10-05 template ("standard_1005" goes in 1.14)
    name = "colin27_1005"
    if name not in mne.channels.get_builtin_montages():
        name = "standard_1005"
    return mne.channels.make_standard_montage(name)


def _narrowband(rng: np.random.Generator, n: int, sfreq: float, freq: float, width: float):
    """Unit-variance noise with a Gaussian spectrum around ``freq`` (Hz) of s.d. ``width``."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1 / sfreq)
    signal = np.fft.irfft(spectrum * np.exp(-0.5 * ((f - freq) / width) ** 2), n)
    return signal / signal.std()


def _pink(rng: np.random.Generator, shape: tuple[int, int], sfreq: float) -> np.ndarray:
    """Unit-variance 1/f noise along the last axis."""
    spectrum = np.fft.rfft(rng.standard_normal(shape), axis=-1)
    f = np.fft.rfftfreq(shape[-1], 1 / sfreq)
    signal = np.fft.irfft(spectrum / np.sqrt(np.maximum(f, 1.0)), shape[-1], axis=-1)
    return signal / signal.std(axis=-1, keepdims=True)


class SyntheticMotorImagery(BaseDataset):
    """Synthetic motor-imagery EEG whose classes are learnable and whose subjects differ.

    Each trial imagines moving the left hand, the right hand or the feet. Imagery changes the power
    of the mu rhythm over the motor cortex that controls the limb: over C4 for the left hand, C3
    for the right hand, Cz for the feet (event-related desynchronisation, ERD). Subjects differ as
    real ones do: their mu frequency (8.5-12.5 Hz), the position and spread of each source on the
    scalp, the depth of the modulation, channel gains, and for a fraction of subjects
    (``ers_fraction``) imagery raises the power instead of lowering it (synchronisation, ERS), so a
    model must adapt to a subject to read it well. Background activity is 1/f noise on every
    channel plus a class-independent mu source and sensor noise.

    The data are generated (seeded per subject), never downloaded; MOABB's paradigms cut them into
    trials like any other dataset's.

    Args:
        n_subjects: number of subjects (default 10).
        trials_per_class: trials of each class per subject (default 40), in one session and run.
        events: the classes, a subset of ``("left_hand", "right_hand", "feet")``.
        channels: EEG channel names of the 10-05 system (default 13 over the motor cortex).
        sfreq: sampling rate in Hz (default 128).
        trial_duration: imagery period after each cue in seconds (default 3); the paradigm's
            interval.
        modulation: mean relative change of the mu power's amplitude during imagery (default 0.5).
        ers_fraction: fraction of subjects whose power rises during imagery (default 0.3).
        snr: amplitude of the motor mu sources relative to the background (default 1.0).
        seed: seed of the generation; subject ``s`` is drawn from ``(seed, s)``.

    Raises:
        ValueError: on unknown events or channels, or a count or rate out of range.

    Example::

        >>> import mne
        >>> from moabb.paradigms import LeftRightImagery
        >>> mne.set_log_level("error")
        >>> dataset = SyntheticMotorImagery(n_subjects=2, trials_per_class=10)
        >>> x, y, meta = LeftRightImagery().get_data(dataset, subjects=[1])
        >>> x.shape, sorted(set(y.tolist()))
        ((20, 13, 385), ['left_hand', 'right_hand'])
    """

    def __init__(
        self,
        n_subjects: int = 10,
        trials_per_class: int = 40,
        events: tuple[str, ...] = ("left_hand", "right_hand", "feet"),
        channels: tuple[str, ...] = _CHANNELS,
        sfreq: float = 128.0,
        trial_duration: float = 3.0,
        modulation: float = 0.5,
        ers_fraction: float = 0.3,
        snr: float = 1.0,
        seed: int = 0,
    ) -> None:
        check_count(n_subjects, "n_subjects")
        check_count(trials_per_class, "trials_per_class")
        unknown = sorted(set(events) - set(_SOURCES))
        if unknown or not events:
            raise ValueError(
                f"`events` must be a non-empty subset of {tuple(_SOURCES)}, got {tuple(events)}"
            )
        positions = _montage().get_positions()["ch_pos"]
        unknown = sorted(set(channels) - set(positions))
        if unknown:
            raise ValueError(f"`channels` {unknown} are not 10-05 channel names")
        for name, value, low, high in (
            ("sfreq", sfreq, 40.0, 10_000.0),
            ("trial_duration", trial_duration, 0.5, 60.0),
            ("modulation", modulation, 0.0, 0.9),
            ("ers_fraction", ers_fraction, 0.0, 1.0),
            ("snr", snr, 0.0, 100.0),
        ):
            if not low <= value <= high:
                raise ValueError(f"`{name}` must be in [{low}, {high}], got {value!r}")
        self.n_subjects, self.trials_per_class = n_subjects, trials_per_class
        self.channels, self.sfreq, self.trial_duration = tuple(channels), sfreq, trial_duration
        self.modulation, self.ers_fraction, self.snr, self.seed = (
            modulation,
            ers_fraction,
            snr,
            seed,
        )
        self._positions = np.array([positions[c][:2] for c in channels])  # metres, x to the right
        self._source_positions = {c: positions[s][:2] for c, s in _SOURCES.items()}
        super().__init__(
            subjects=list(range(1, n_subjects + 1)),
            sessions_per_subject=1,
            events={name: i + 1 for i, name in enumerate(events)},
            code=f"SyntheticMotorImagery-{seed}",
            interval=[0, trial_duration],
            paradigm="imagery",
        )

    def get_data(self, *args: Any, **kwargs: Any) -> dict:
        """MOABB's ``get_data``. MOABB looks for a data folder per dataset code; these data are
        generated in memory, so unless MNE's configuration names one, a temporary folder serves
        for the call and is removed after it (the environment is restored)."""
        key = f"MNE_DATASETS_{self.code.upper()}_PATH"
        configured = mne.get_config(key)
        if configured and Path(configured).is_dir():
            return super().get_data(*args, **kwargs)
        before = os.environ.get(key)
        with tempfile.TemporaryDirectory() as folder:
            os.environ[key] = folder
            try:
                return super().get_data(*args, **kwargs)
            finally:
                if before is None:
                    del os.environ[key]
                else:
                    os.environ[key] = before

    def subject_profile(self, subject: int) -> dict:
        """The drawn properties of one subject (mu frequency, modulation sign and depth, ...)."""
        rng = np.random.default_rng([self.seed, subject, 0])
        return {
            "mu_frequency": rng.uniform(8.5, 12.5),
            "sign": -1.0 if rng.uniform() >= self.ers_fraction else 1.0,  # -1: ERD, +1: ERS
            "depth": self.modulation * rng.uniform(0.6, 1.4),
            "spread": rng.uniform(0.02, 0.035),  # metres
            "shift": {c: rng.normal(0, 0.01, size=2) for c in _SOURCES},
            "gain": rng.uniform(0.7, 1.3, size=len(self.channels)),
        }

    def _get_single_subject_data(self, subject: int) -> dict:
        profile = self.subject_profile(subject)
        rng = np.random.default_rng([self.seed, subject, 1])
        sfreq, classes = self.sfreq, list(self.event_id)
        labels = rng.permutation(np.repeat(np.arange(len(classes)), self.trials_per_class))
        trial, rest = int(self.trial_duration * sfreq), int(2.0 * sfreq)
        onsets = rest + np.arange(len(labels)) * (trial + rest)
        n = int(onsets[-1] + trial + rest)

        eeg = _pink(rng, (len(self.channels), n), sfreq) + 0.3 * rng.standard_normal(
            (len(self.channels), n)
        )
        # class-independent mu over the whole scalp, then one modulated source per class
        eeg += 0.5 * _narrowband(rng, n, sfreq, profile["mu_frequency"], 1.0)
        for index, name in enumerate(classes):
            envelope = np.ones(n)
            ramp = np.clip(np.arange(trial) / (0.5 * sfreq), 0, 1)  # 0.5 s onset
            change = 1 + profile["sign"] * profile["depth"] * ramp
            for onset in onsets[labels == index]:
                envelope[onset : onset + trial] = change
            centre = self._source_positions[name] + profile["shift"][name]
            distance2 = ((self._positions - centre) ** 2).sum(axis=1)
            pattern = np.exp(-0.5 * distance2 / profile["spread"] ** 2)
            source = _narrowband(rng, n, sfreq, profile["mu_frequency"], 1.0) * envelope
            eeg += self.snr * 2.0 * pattern[:, None] * source[None, :]
        eeg *= profile["gain"][:, None] * 1e-5  # volts

        stim = np.zeros((1, n))
        stim[0, onsets] = labels + 1
        info = mne.create_info(
            list(self.channels) + ["stim"], sfreq, ["eeg"] * len(self.channels) + ["stim"]
        )
        raw = mne.io.RawArray(np.vstack([eeg, stim]), info, verbose=False)
        raw.set_montage(_montage())
        return {"0": {"0": raw}}

    def data_path(
        self, subject, path=None, force_update=False, update_path=None, verbose=None
    ) -> list[str]:
        """Nothing to download: the data are generated."""
        return []
