"""The streaming profiler on a tiny model: exact counts, interruption and resume, counts files, the task."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from sparse_lm.models.capture import capture_forward, set_capture
from sparse_lm.models.ffn import CapturePoint
from sparse_lm.models.presets import TINY
from sparse_lm.models.transformer import Transformer
from sparse_lm.profiling.counts import CountsFileError, FiringCounts
from sparse_lm.profiling.firing import FiringConfig, FiringRule
from sparse_lm.profiling.profiler import profile_sequences

SEQUENCES = np.asarray(jax.random.randint(jax.random.key(0), (12, 16), 0, 257), np.int32)
THRESHOLDS = np.array([0.05, 0.08])


@pytest.fixture(scope="module")
def model():
    return Transformer(TINY, rngs=nnx.Rngs(3))


def direct_counts(model, sequences, threshold):
    set_capture(model, [CapturePoint.ffn_hidden, CapturePoint.ffn_gate])
    _, captured = capture_forward(model, sequences)
    set_capture(model, [])
    hidden = [np.asarray(h) for h in captured[CapturePoint.ffn_hidden]]
    gate = [np.asarray(g) for g in captured[CapturePoint.ffn_gate]]
    magnitude = np.stack([(np.abs(h) > t).sum(axis=(0, 1)) for h, t in zip(hidden, threshold, strict=True)])
    positive = np.stack([(h > 0).sum(axis=(0, 1)) for h in hidden])
    gate_positive = np.stack([(g > 0).sum(axis=(0, 1)) for g in gate])
    abs_sum = np.stack([np.abs(h).sum(axis=(0, 1)) for h in hidden])
    return magnitude, positive, gate_positive, abs_sum


def test_counts_equal_a_direct_computation(model):
    counts, _, _ = profile_sequences(
        model,
        SEQUENCES,
        FiringConfig(thresholds=(0.0,)),
        THRESHOLDS,
        batch_size=4,
        progress=False,
        extra_rules=(FiringRule.positive, FiringRule.gate_positive),
    )
    magnitude, positive, gate_positive, abs_sum = direct_counts(model, SEQUENCES, THRESHOLDS)
    assert counts.tokens == 12 * 16 and counts.batches == 3
    np.testing.assert_array_equal(counts.counts, magnitude)
    np.testing.assert_array_equal(counts.extra["positive"], positive)
    np.testing.assert_array_equal(counts.extra["gate_positive"], gate_positive)
    np.testing.assert_allclose(counts.abs_sum, abs_sum, rtol=1e-4)


def test_interrupted_profile_resumes_to_identical_counts(model, tmp_path):
    firing = FiringConfig(thresholds=(0.0,))
    kwargs = dict(
        batch_size=2, checkpoint_every=2, fingerprint="run-a", progress=False, extra_rules=(FiringRule.positive,)
    )
    uninterrupted, _, _ = profile_sequences(
        model, SEQUENCES, firing, THRESHOLDS, checkpoint=tmp_path / "a.npz", **kwargs
    )
    partial, _, _ = profile_sequences(
        model, SEQUENCES, firing, THRESHOLDS, checkpoint=tmp_path / "b.npz", stop_after_batches=3, **kwargs
    )
    assert partial.batches == 3 and FiringCounts.load(tmp_path / "b.npz").batches == 3
    resumed, _, _ = profile_sequences(model, SEQUENCES, firing, THRESHOLDS, checkpoint=tmp_path / "b.npz", **kwargs)
    assert resumed.batches == uninterrupted.batches == 6
    assert resumed.tokens == uninterrupted.tokens
    np.testing.assert_array_equal(resumed.counts, uninterrupted.counts)
    np.testing.assert_array_equal(resumed.extra["positive"], uninterrupted.extra["positive"])
    np.testing.assert_array_equal(resumed.abs_sum, uninterrupted.abs_sum)


def test_a_checkpoint_of_another_run_is_refused(model, tmp_path):
    FiringCounts.zeros(2, TINY.d_ff, "run-a").save(tmp_path / "c.npz")
    with pytest.raises(ValueError, match="another profile"):
        profile_sequences(
            model,
            SEQUENCES,
            FiringConfig(thresholds=(0.0,)),
            THRESHOLDS,
            batch_size=2,
            checkpoint=tmp_path / "c.npz",
            fingerprint="run-b",
            progress=False,
        )


def test_counts_file_round_trip_and_corruption(tmp_path):
    counts = FiringCounts.zeros(2, 4, "fp", ["positive"])
    counts.add(np.array([[1, 0, 2, 3], [0, 0, 1, 1]]), np.ones((2, 4)), 3, {"positive": np.ones((2, 4))})
    path = counts.save(tmp_path / "counts.npz")
    loaded = FiringCounts.load(path)
    np.testing.assert_array_equal(loaded.counts, counts.counts)
    assert (loaded.tokens, loaded.batches, loaded.fingerprint) == (3, 1, "fp")
    np.testing.assert_array_equal(loaded.extra["positive"], np.ones((2, 4)))
    data = path.read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(CountsFileError, match="cut.npz"):
        FiringCounts.load(tmp_path / "cut.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a counts file")
    with pytest.raises(CountsFileError, match="junk.npz"):
        FiringCounts.load(tmp_path / "junk.npz")
    bad = FiringCounts(np.array([[5]]), np.zeros((1, 1)), tokens=2)
    bad.save(tmp_path / "bad.npz")
    with pytest.raises(CountsFileError, match="outside"):
        FiringCounts.load(tmp_path / "bad.npz")


def test_wrong_threshold_count_and_empty_batches(model):
    with pytest.raises(ValueError, match="2 layers"):
        profile_sequences(model, SEQUENCES, FiringConfig(), np.zeros(3), batch_size=2, progress=False)
    with pytest.raises(ValueError, match="no batch"):
        profile_sequences(model, SEQUENCES[:1], FiringConfig(), THRESHOLDS, batch_size=2, progress=False)
