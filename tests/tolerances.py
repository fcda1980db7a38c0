"""Float tolerances for tests that must pass on any CPU, set from dtype and scale.

Two runs of the same float32 math through different kernel paths (oneDNN or reference
convolutions, batch 1 or batch N, AVX-512 on an Intel Xeon or AVX2 on an AMD EPYC) sum in a
different order and differ by a few ulps of their partial sums (float32 eps = 1.19e-7).
A CAM is min-max normalised per image; on a 2x2 or 4x4 map the range can be ~1 % of the
largest activation, so one ulp there becomes ~1e-5 in the [0, 1] map (1.9e-5 was seen on an
Intel Xeon for LayerCAM). :data:`MAP_ATOL` leaves ~5x room above that.

It stays tight enough to catch real bugs, and the property that matters is checked on its own:
a wrong target class, a wrong channel or a wrong layer changes a normalised map by O(0.1) and
breaks its correlation and its peak, which :func:`assert_maps_match` asserts separately.
"""

from __future__ import annotations

import numpy as np

MAP_ATOL = 1e-4  # [0, 1] float32 heatmaps after per-image min-max normalisation
MAP_MIN_CORRELATION = 0.999  # Pearson r between two computations of the same map
PROB_ATOL = 1e-5  # float32 softmax outputs in [0, 1] (~100 eps; logits of O(10))


def assert_maps_match(actual: np.ndarray, expected: np.ndarray, what: str = "") -> None:
    """Same heatmaps up to kernel-path noise: values, correlation and peak location.

    Args:
        actual: (N, H, W) maps.
        expected: (N, H, W) maps of the same images and targets.
        what: named in the failure message (e.g. the layer).
    """
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: {actual.shape} vs {expected.shape}"
    np.testing.assert_allclose(actual, expected, rtol=0, atol=MAP_ATOL, err_msg=what)
    for i, (a, e) in enumerate(
        zip(actual.reshape(len(actual), -1), expected.reshape(len(expected), -1), strict=True)
    ):
        if e.std() < 1e-3:  # a flat map has no peak and no defined correlation
            continue
        r = float(np.corrcoef(a, e)[0, 1])
        assert r >= MAP_MIN_CORRELATION, f"{what}: image {i}: correlation {r:.6f}"
        # The peak lands where the expected map peaks (ties within the tolerance allowed).
        assert e[a.argmax()] >= e.max() - MAP_ATOL, f"{what}: image {i}: peak moved"
