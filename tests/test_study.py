"""lightning_maml.study: episodes, folds, the methods against references written without the
study (pyriemann's documented RPA pipeline, a hand-fitted recentred tangent space + LR), no query
trial reaching anything fitted, and the study end to end on real PhysioNet subjects."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tasks import REAL_EEG, needs_real_eeg

from lightning_maml.study import (
    Ensemble,
    Fold,
    NetworkMethod,
    PipelineMethod,
    RecentredTangentSpace,
    RiemannianProcrustes,
    StudyResult,
    calibration_episodes,
    subject_folds,
    t_interval,
)

pytest.importorskip("pyriemann")
pytest.importorskip("sklearn")


class _Study:
    """What a Fold asks of its study, over arrays: trials per subject."""

    def __init__(self, data: dict, classes: list[str]) -> None:
        self.data, self.classes, self.seed, self.shared = data, classes, 0, {}
        self.data_options = {"standardize": "trial"}

    def trials(self, subject):
        return self.data[subject]


def _subjects(n_subjects=4, n_trials=20, channels=6, samples=64, seed=0):
    """Two classes differing in the power of one channel pair; each subject its own mixing."""
    g = np.random.default_rng(seed)
    data = {}
    for s in range(1, n_subjects + 1):
        mixing = np.eye(channels) + 0.3 * g.standard_normal((channels, channels))
        labels = np.array(["left", "right"] * (n_trials // 2))
        x = g.standard_normal((n_trials, channels, samples))
        x[labels == "left", 0] *= 2.5
        x[labels == "right", 1] *= 2.5
        data[s] = ((mixing @ x).astype(np.float32), labels)
    return data


def _fold(data, test=(4,), train=(1, 2, 3)):
    return Fold(_Study(data, ["left", "right"]), list(test), list(train))


# ---- episodes and folds ---------------------------------------------------------------------


def test_episodes_are_class_balanced_disjoint_and_seeded():
    y = np.array([0] * 12 + [1] * 9)
    episodes = calibration_episodes(y, k=3, episodes=4, seed=[0, 7, 3])
    for (a, b), (c, d) in zip(episodes, calibration_episodes(y, 3, 4, [0, 7, 3])):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, d)
    for support, query in episodes:
        assert not set(support) & set(query)
        assert np.bincount(y[support]).tolist() == [3, 3]
        assert np.bincount(y[query]).tolist() == [6, 6]  # the smallest class's 9 minus K
    other = calibration_episodes(y, k=3, episodes=4, seed=[0, 8, 3])
    assert any((a != c).any() for (a, _), (c, _) in zip(episodes, other))
    with pytest.raises(ValueError, match="k=9 leaves no query trial"):
        calibration_episodes(y, k=9, episodes=1)


def test_folds_loso_groups_and_a_fixed_training_set():
    assert subject_folds([1, 2], [1, 2, 3]) == [([1], [2, 3]), ([2], [1, 3])]
    groups = subject_folds(list(range(1, 20)), range(1, 20), folds=5)
    assert [len(t) for t, _ in groups] == [4, 4, 4, 4, 3]
    assert sorted(s for t, _ in groups for s in t) == list(range(1, 20))
    assert all(not set(t) & set(tr) and len(t) + len(tr) == 19 for t, tr in groups)
    assert subject_folds([4, 5], range(1, 6), train_subjects=[1, 2]) == [([4, 5], [1, 2])]
    with pytest.raises(ValueError, match="`folds` must be 'loso' or a number"):
        subject_folds([1, 2], [1, 2, 3], folds=3)
    with pytest.raises(ValueError, match="must be non-empty and hold none of them"):
        subject_folds([1], [1, 2], train_subjects=[1, 2])


# ---- methods against references -------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Convergence not reached")
def test_rpa_per_source_is_pyriemanns_documented_pipeline():
    from pyriemann.estimation import Covariances
    from pyriemann.tangentspace import TangentSpace
    from pyriemann.transfer import (
        TLCenter,
        TLClassifier,
        TLRotate,
        TLScale,
        encode_domains,
    )
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    data = _subjects()
    fold = _fold(data)
    support, query = calibration_episodes(data[4][1], k=3, episodes=1, seed=1)[0]
    method = RiemannianProcrustes(pool_sources=False)
    ours = fold.predict(method, 4, support, query)

    def cov(s):
        return Covariances("oas").transform(data[s][0].astype(np.float64))

    x = np.concatenate([cov(1), cov(2), cov(3), cov(4)[support]])
    y = np.concatenate([data[s][1] for s in (1, 2, 3)] + [data[4][1][support]])
    domains = np.concatenate([[f"s{s}"] * 20 for s in (1, 2, 3)] + [["target"] * len(support)])
    pipeline = make_pipeline(
        TLCenter("target"),
        TLScale("target", centered_data=True),
        TLRotate("target", metric="euclid"),
        TLClassifier("target", make_pipeline(TangentSpace(metric="riemann"),
                                             LogisticRegression(max_iter=1000))),
    )  # fmt: skip
    pipeline.fit(*encode_domains(x, y, domains))
    reference = pipeline.predict_proba(cov(4)[query])
    # TLRotate's gradient descent stops at its iteration limit on directions the loss hardly
    # sees: inputs 1e-15 apart give rotations apart by O(1) and probabilities by about 1e-4
    np.testing.assert_allclose(ours, reference, atol=2e-3)
    np.testing.assert_array_equal(ours.argmax(1), reference.argmax(1))
    assert (ours.argmax(1) == (data[4][1][query] == "right")).mean() > 0.7  # it learned
    # one training subject: pooled and per-source rotations are the same computation
    one = _fold(data, train=(1,))
    np.testing.assert_allclose(
        one.predict(RiemannianProcrustes(), 4, support, query),
        one.predict(RiemannianProcrustes(pool_sources=False), 4, support, query),
    )


def test_recentred_tangent_space_plus_k_against_a_hand_fit():
    from pyriemann.estimation import Covariances
    from pyriemann.geometry.base import invsqrtm
    from pyriemann.geometry.mean import mean_riemann
    from pyriemann.tangentspace import TangentSpace
    from sklearn.linear_model import LogisticRegression

    data = _subjects()
    fold = _fold(data)
    support, query = calibration_episodes(data[4][1], k=2, episodes=1, seed=2)[0]
    ours = fold.predict(RecentredTangentSpace(), 4, support, query)

    def whiten(c, ref):
        w = invsqrtm(mean_riemann(ref))
        return w @ c @ w

    covs = {s: Covariances("oas").transform(data[s][0].astype(np.float64)) for s in data}
    train = [whiten(covs[s], covs[s]) for s in (1, 2, 3)]
    mine = whiten(covs[4], covs[4][support])
    features = TangentSpace(metric="riemann").fit(np.concatenate([*train, mine[support]]))
    labels = np.concatenate([data[s][1] for s in (1, 2, 3)] + [data[4][1][support]])
    lr = LogisticRegression(max_iter=1000).fit(
        features.transform(np.concatenate([*train, mine[support]])), labels
    )
    reference = lr.predict_proba(features.transform(mine[query]))
    np.testing.assert_allclose(ours, reference, atol=1e-10)


def test_an_ensemble_averages_its_members_with_their_weights():
    data = _subjects()
    fold = _fold(data)
    support, query = calibration_episodes(data[4][1], k=3, episodes=1, seed=3)[0]
    members = [RecentredTangentSpace(), RecentredTangentSpace(mode="zero-shot")]
    ensemble = Ensemble("both", members, weights=[3, 1])
    p = fold.predict(ensemble, 4, support, query)
    expected = sum(w * fold.predict(m, 4, support, query) for w, m in zip([0.75, 0.25], members))
    np.testing.assert_allclose(p, expected)
    with pytest.raises(ValueError, match="at least 2 members"):
        Ensemble("one", members[:1])
    with pytest.raises(ValueError, match="`weights` must be 2 non-negative numbers"):
        Ensemble("bad", members, weights=[1, -1])


def _scratch():
    from lightning_maml.models import EEGNet

    def network(channels, samples, classes):
        return EEGNet(channels, samples, classes, sampling_rate=32)

    return NetworkMethod("scratch", network, meta_train=False, eval_steps=2, inner_lr=0.05)


@pytest.mark.parametrize("make", [
    lambda: RecentredTangentSpace(),
    lambda: RiemannianProcrustes(),
    lambda: _scratch(),
    lambda: NetworkMethod("aligned", _scratch().network, meta_train=False, eval_steps=1,
                          alignment="euclidean"),
    lambda: PipelineMethod("CSP+LDA + K", __import__("sklearn.pipeline").pipeline.make_pipeline(
        __import__("mne.decoding").decoding.CSP(n_components=2, log=True),
        __import__("sklearn.discriminant_analysis").discriminant_analysis
        .LinearDiscriminantAnalysis())),
    lambda: Ensemble("e", [RecentredTangentSpace(), _scratch()]),
], ids=["ts-lr", "rpa", "network", "network-aligned", "pipeline", "ensemble"])  # fmt: skip
def test_a_query_trial_is_classified_without_the_other_query_trials(make):
    torch.manual_seed(0)
    data = _subjects()
    support, query = calibration_episodes(data[4][1], k=3, episodes=1, seed=4)[0]
    poisoned = {s: (x.copy(), y) for s, (x, y) in data.items()}
    rest = query[1:]  # every query trial but the first
    poisoned[4][0][rest] = 30 * np.random.default_rng(9).standard_normal(poisoned[4][0][rest].shape)
    p = _fold(data).predict(make(), 4, support, query)
    torch.manual_seed(0)
    q = _fold(poisoned).predict(make(), 4, support, query)
    np.testing.assert_allclose(p[0], q[0], atol=1e-6)
    assert np.abs(p[1:] - q[1:]).max() > 1e-3  # the others did change
    assert p.shape == (len(query), 2) and np.allclose(p.sum(1), 1)


def test_results_summary_differences_and_table():
    rows = [
        {"method": m, "K": 5, "subject": s, "accuracies": [a, a]}
        for m, base in (("A", 0.7), ("B", 0.6))
        for s, a in zip((1, 2, 3), (base, base + 0.05, base - 0.02))
    ]
    result = StudyResult(rows, [5])
    (a, b) = result.summary()
    assert a["accuracy"] == pytest.approx(0.71) and a["subjects"] == [1, 2, 3]
    (d,) = result.differences("A")
    assert d["versus"] == "B" and d["difference"] == pytest.approx(0.1)
    assert d["ci95_subjects"] == pytest.approx(0.0, abs=1e-12)  # the same gap for every subject
    assert t_interval([1.0])[1] != t_interval([1.0])[1]  # NaN for one subject
    table = result.markdown(reference="A")
    assert "| B | 0.610 ± " in table and "+0.100 ± 0.000" in table
    with pytest.raises(ValueError, match="`reference` 'C' is not among"):
        result.differences("C")
    with pytest.raises(ValueError, match="both results hold"):
        result + result


# ---- end to end on real subjects -------------------------------------------------------------


@needs_real_eeg
def test_the_study_end_to_end_on_real_subjects_stored_and_resumed(tmp_path, monkeypatch):
    pytest.importorskip("moabb")
    from moabb.datasets import PhysionetMI
    from moabb.paradigms import LeftRightImagery

    from lightning_maml.study import CalibrationStudy

    folder = tmp_path / "mne_data"
    shutil.copytree(REAL_EEG, folder)
    for name in ("MNE_DATA", "MNE_DATASETS_EEGBCI_PATH"):
        monkeypatch.setenv(name, str(folder))
    monkeypatch.setenv("MOABB_DOWNLOAD_PROVIDER", "upstream")

    def study():
        return CalibrationStudy(
            PhysionetMI(imagined=True, executed=False),
            LeftRightImagery(fmin=8, fmax=30, resample=80),
            subjects=[1, 2, 3],
            k_shots=[1, 5],
            episodes=2,
            store=tmp_path / "store",
            cache_dir=str(tmp_path / "cache"),
            data_options={"standardize": "trial",
                          "dataset_attributes": {"hand_runs": [4, 8, 12], "feet_runs": []}},
            progress=False,
        )  # fmt: skip

    maml = NetworkMethod("MAML", _eegnet80, meta_steps=2, eval_steps=2)
    methods = [maml, RecentredTangentSpace(), RiemannianProcrustes(k_shots=[5]),
               Ensemble("MAML & TS+LR + K", [maml, RecentredTangentSpace()])]  # fmt: skip
    result = study().run(methods, test_subjects=[2, 3], folds=2)
    assert {(r["method"], r["K"], r["subject"]) for r in result.rows} == {
        *((m, k, s) for m in ("MAML", "TS+LR + K", "MAML & TS+LR + K") for k in (1, 5)
          for s in (2, 3)),
        ("RPA + K", 5, 2), ("RPA + K", 5, 3),
    }  # fmt: skip
    assert all(len(r["accuracies"]) == 2 for r in result.rows)
    assert all(r["skipped_steps"] == 0 for r in result.rows if r["method"] == "MAML")
    stored = sorted((tmp_path / "store").glob("*.json"))
    assert len(stored) == 2 * 4  # 2 folds x 4 methods
    assert {tuple(json.loads(p.read_text())["fold"]["train"]) for p in stored} == {(1, 3), (1, 2)}
    killed = next(p for p in stored if json.loads(p.read_text())["method"] == "MAML")
    times = {p: p.stat().st_mtime_ns for p in stored}
    killed.unlink()
    again = study().run(methods, test_subjects=[2, 3], folds=2)
    assert again.rows == result.rows  # the killed (fold, method) computed again, identically
    assert all(p == killed or p.stat().st_mtime_ns == times[p] for p in stored)
    assert result.differences("MAML & TS+LR + K")

    # two worker processes, a fresh store: the same rows
    parallel = study()
    parallel.store = tmp_path / "parallel"
    assert parallel.run(methods, test_subjects=[2, 3], folds=2, workers=2).rows == result.rows
    assert len(list(parallel.store.glob("*.json"))) == 2 * 4
    local = NetworkMethod("local", lambda c, t, n: _eegnet80(c, t, n), meta_steps=1)
    with pytest.raises(ValueError, match="workers > 1 send the methods to other processes"):
        parallel.run([local], test_subjects=[2, 3], folds=2, workers=2)


def _eegnet80(channels, samples, classes):
    from lightning_maml.models import EEGNet

    return EEGNet(channels, samples, classes, sampling_rate=80)


def test_network_methods_differing_only_in_adaptation_steps_share_their_training():
    fold = _fold(_subjects())
    ten, twenty = _scratch(), _scratch()
    twenty.eval_steps = 20
    aligned = NetworkMethod("aligned", ten.network, meta_train=False, alignment="euclidean")
    assert fold.fit(ten) is fold.fit(twenty)
    assert fold.fit(aligned) is not fold.fit(ten)


def test_a_subclass_described_alike_does_not_share_its_parents_predictions():
    class Flipped(RecentredTangentSpace):
        def predict_proba(self, state, fold, subject, support, query):
            return super().predict_proba(state, fold, subject, support, query)[:, ::-1]

    data = _subjects()
    fold = _fold(data)
    support, query = calibration_episodes(data[4][1], k=3, episodes=1, seed=5)[0]
    p = fold.predict(RecentredTangentSpace(), 4, support, query)
    np.testing.assert_allclose(fold.predict(Flipped(), 4, support, query), p[:, ::-1])


@needs_real_eeg
def test_the_eeg_guides_physionet_study_runs_as_written_on_three_subjects(tmp_path, monkeypatch):
    pytest.importorskip("moabb")
    text = (Path(__file__).parents[1] / "docs" / "eeg.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    block = blocks[2]
    assert "PhysionetMI" in block and "CalibrationStudy(" in block
    cut = {
        "range(1, 20)": "[1, 2, 3]",
        "episodes=10": "episodes=2",
        "k_shots=(1, 5, 10)": "k_shots=(1, 5)",
        "k_shots=[5, 10]": "k_shots=[5]",
        "folds=5, workers=2": "folds=3, workers=1",  # its functions live in no module here
        "eval_steps=10)": "eval_steps=2, meta_steps=2)",
        "inner_steps=0)": "inner_steps=0, meta_steps=2)",
    }
    for long, short in cut.items():
        assert long in block, long
        block = block.replace(long, short)
    folder = tmp_path / "mne_data"
    shutil.copytree(REAL_EEG, folder)
    for name in ("MNE_DATA", "MNE_DATASETS_EEGBCI_PATH"):
        monkeypatch.setenv(name, str(folder))
    monkeypatch.setenv("MOABB_DOWNLOAD_PROVIDER", "upstream")
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "docs/eeg.md", "exec"), {"__name__": "__main__"})
    assert (tmp_path / "accuracy.png").exists()
    assert len(list((tmp_path / "outputs" / "study").glob("*.json"))) == 3 * 6
