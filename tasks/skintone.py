"""Skin tone from a lesion photo: the Individual Typology Angle (ITA) and its six categories.

ITA = arctan((L* - 50) / b*) * 180 / pi, in CIELAB, is the colorimetric skin-tone measure of
Chardon et al. (1991) that dermatology-AI audits use when the Fitzpatrick type is not recorded
(Kinyanjui et al. 2020, Groh et al. 2021). It must be measured on *skin*, not on the lesion,
the dark vignette of a dermoscope or hair, so:

- where there is a lesion mask, the skin is every pixel outside the (slightly dilated) mask;
- otherwise it is a ring along the image border, where dermoscopy photos show the most skin.

From that region, vignette pixels (L* below :data:`VIGNETTE_L`) and hair (thin dark
structures found with a morphological black-hat, as in DullRazor, Lee et al. 1997) are removed.
The angle is taken from the median L* and median b* of what is left: a per-pixel angle is
unstable where b* is near 0, and medians ignore the few lesion or hair pixels that escape the
masks. The colour conversion is scikit-image's (``rgb2lab``, D65); only the region choice and
the binning are written here, as no library measures ITA.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from skimage.color import rgb2lab
from skimage.morphology import black_tophat, dilation, disk

# The six categories of Del Bino & Bernerd (2013), lightest first: name -> lower bound (deg).
CATEGORIES: tuple[tuple[str, float], ...] = (
    ("very_light", 55.0),
    ("light", 41.0),
    ("intermediate", 28.0),
    ("tan", 10.0),
    ("brown", -30.0),
    ("dark", -np.inf),
)
CATEGORY_NAMES: tuple[str, ...] = tuple(name for name, _ in CATEGORIES)
UNKNOWN = "unknown"  # too little visible skin to measure
VIGNETTE_L = 15.0  # L* below this is the dermoscope's dark vignette or a black frame, not skin
HAIR_CONTRAST = 12.0  # black-hat response (L* units) above which a pixel is hair
RING_SHARE = 0.15  # border ring width as a share of the image side (no mask)
MIN_SKIN_PIXELS = 20  # fewer skin pixels than this: the tone is unknown


def skin_region(rgb: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Boolean (H, W): the pixels ITA is measured on (see the module docstring).

    Args:
        rgb: uint8 (H, W, 3) image.
        mask: lesion mask (H, W), non-zero on the lesion, or None (or all zero) for none.
    """
    h, w = rgb.shape[:2]
    lightness = rgb2lab(rgb)[..., 0]
    if mask is not None and np.any(mask):
        margin = max(1, round(0.03 * min(h, w)))
        region = ~dilation(np.asarray(mask) > 0, disk(margin))
    else:
        band = max(1, round(RING_SHARE * min(h, w)))
        region = np.zeros((h, w), dtype=bool)
        region[:band, :] = region[-band:, :] = True
        region[:, :band] = region[:, -band:] = True
    hair_size = max(1, round(0.02 * min(h, w)))
    hair = black_tophat(lightness, disk(hair_size)) > HAIR_CONTRAST
    return region & ~hair & (lightness >= VIGNETTE_L)


def ita_angle(rgb: np.ndarray, mask: np.ndarray | None = None) -> float | None:
    """The ITA in degrees of the skin around the lesion, or None with too little skin visible.

    Args:
        rgb: uint8 (H, W, 3) image.
        mask: optional lesion mask (H, W).
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {rgb.shape}")
    region = skin_region(rgb, mask)
    if int(region.sum()) < MIN_SKIN_PIXELS:
        return None
    lab = rgb2lab(rgb)[region]
    lightness, b = float(np.median(lab[:, 0])), float(np.median(lab[:, 2]))
    # arctan2 equals arctan((L - 50) / b) for b > 0 and stays finite at b = 0.
    return float(np.clip(np.degrees(np.arctan2(lightness - 50.0, b)), -90.0, 90.0))


def ita_category(angle: float | None) -> str:
    """The category of an ITA angle: very_light > 55 >= light > 41 >= intermediate > 28 >= tan
    > 10 >= brown > -30 >= dark; ``unknown`` for None.
    """
    if angle is None or not np.isfinite(angle):
        return UNKNOWN
    for name, lower in CATEGORIES:
        if angle > lower:
            return name
    return CATEGORY_NAMES[-1]


def skin_tones(
    images: Iterable[np.ndarray], masks: Iterable[np.ndarray | None]
) -> tuple[list[float | None], list[str]]:
    """ITA angle and category of each image (with its mask or None)."""
    angles = [ita_angle(img, m) for img, m in zip(images, masks, strict=True)]
    return angles, [ita_category(a) for a in angles]


def tone_distribution(categories: Iterable[str]) -> dict[str, int]:
    """Count per category, every category listed (lightest first, then ``unknown``)."""
    values = list(categories)
    return {name: values.count(name) for name in (*CATEGORY_NAMES, UNKNOWN)}
