"""ITA skin tone (tasks/skintone.py) on synthetic skin of known colour.

Each image is painted in a CIELAB colour whose ITA is chosen (via scikit-image's lab2rgb), then
given what real dermoscopy adds around the skin: a dark lesion, hair and a black vignette. The
measured angle must land within a few degrees of the painted one, so in the right category.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from skimage.color import lab2rgb

from tasks.skintone import (
    CATEGORY_NAMES,
    UNKNOWN,
    ita_angle,
    ita_category,
    skin_tones,
    tone_distribution,
)

SIDE = 64
# Painted ITA per category, well inside its bounds (very_light > 55 > light > 41 > ...).
TARGETS = {
    "very_light": 65.0,
    "light": 48.0,
    "intermediate": 34.0,
    "tan": 19.0,
    "brown": -10.0,
    "dark": -45.0,
}
# rgb2lab of an 8-bit rounded colour, plus hair/lesion pixels escaping the masks: a few degrees.
ITA_ATOL = 3.0


def skin(ita: float, b: float = 15.0) -> np.ndarray:
    """An 8-bit RGB colour whose CIELAB ITA is ``ita`` (a* = 8, typical of skin)."""
    lightness = 50.0 + b * math.tan(math.radians(ita))
    if not 25.0 <= lightness <= 95.0:  # keep L* reachable in sRGB; a smaller b* does it
        b = 8.0
        lightness = 50.0 + b * math.tan(math.radians(ita))
    rgb = lab2rgb(np.array([[[lightness, 8.0, b]]]))[0, 0]
    return (rgb * 255).round().astype(np.uint8)


def photo(ita: float) -> tuple[np.ndarray, np.ndarray]:
    """Skin of the given ITA with a dark lesion, two hairs and a black vignette; and its mask."""
    img = np.tile(skin(ita), (SIDE, SIDE, 1))
    yy, xx = np.mgrid[:SIDE, :SIDE]
    r2 = (yy - SIDE / 2) ** 2 + (xx - SIDE / 2) ** 2
    lesion = r2 < 14**2
    img[lesion] = (60, 35, 25)
    img[:, 9:11] = (25, 18, 12)  # hair
    img[40:42, :] = (25, 18, 12)
    img[r2 > (SIDE * 0.53) ** 2] = 0  # vignette corners
    return img, lesion.astype(np.uint8)


@pytest.mark.parametrize("category", list(TARGETS))
def test_known_skin_colour_lands_in_its_category(category: str) -> None:
    img, mask = photo(TARGETS[category])
    with_mask, ring = ita_angle(img, mask), ita_angle(img, None)
    assert with_mask == pytest.approx(TARGETS[category], abs=ITA_ATOL)
    assert ring == pytest.approx(TARGETS[category], abs=ITA_ATOL)
    assert ita_category(with_mask) == ita_category(ring) == category


def test_hair_and_vignette_are_excluded() -> None:
    """Without the exclusions, a third of the ring is hair and black corners: the angle drops."""
    img, _ = photo(TARGETS["very_light"])
    img[:, :20] = (25, 18, 12)  # a thick tuft of hair along one edge
    assert ita_category(ita_angle(img, None)) == "very_light"


def test_category_bounds() -> None:
    assert [ita_category(a) for a in (56, 55, 41.5, 41, 28.1, 10.1, 10, -30, -31)] == [
        "very_light",
        "light",
        "light",
        "intermediate",
        "intermediate",
        "tan",
        "brown",
        "dark",
        "dark",
    ]
    assert ita_category(None) == UNKNOWN


def test_no_visible_skin_is_unknown_and_distribution_lists_every_category() -> None:
    black = np.zeros((SIDE, SIDE, 3), dtype=np.uint8)
    angles, tones = skin_tones([black, photo(TARGETS["tan"])[0]], [None, None])
    assert angles[0] is None and tones == [UNKNOWN, "tan"]
    counts = tone_distribution(tones)
    assert list(counts) == [*CATEGORY_NAMES, UNKNOWN]
    assert counts["tan"] == 1 and counts[UNKNOWN] == 1 and sum(counts.values()) == 2
