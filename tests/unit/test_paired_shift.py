import numpy as np

from nbsmt_onnx.calibration.statistics import PairedShift


def test_merge_equals_one_shot():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(50, 4)), rng.normal(size=(50, 4))
    one = PairedShift.from_samples(a, b)
    parts = PairedShift.from_samples(a[:13], b[:13]).merge(PairedShift.from_samples(a[13:], b[13:]))
    np.testing.assert_allclose(parts.shift, one.shift, rtol=1e-12)
    np.testing.assert_allclose(parts.se2, one.se2, rtol=1e-10)


def test_true_shift_kept_and_noise_shrunk():
    rng = np.random.default_rng(1)
    clean = rng.normal(size=(200, 3))
    kept = PairedShift.from_samples(clean + 1.0 + 0.01 * rng.normal(size=(200, 3)), clean)
    assert np.all(kept.shrink_factor(2.0) > 0.99)
    noise = PairedShift.from_samples(clean + 0.5 * rng.normal(size=(200, 3)), clean)
    assert np.all(noise.shrink_factor(2.0) * np.abs(noise.shift) < 0.02)
    assert np.all(noise.shrink_factor(0.0) == 1.0)
