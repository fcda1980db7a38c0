"""Plain-language explanations: turn a heatmap (and a lesion mask) into facts and a sentence.

A clinician reading a gallery should not have to interpret a colour map to learn where the model
looked. :func:`describe_heatmap` measures the map's main region (size, place, shape, how crisp
its edge is, how much of the attention lies on the lesion) with fixed, documented rules, and
:func:`explain_text` words those facts, e.g.

    Predicted melanoma (87 %). The model focused on a medium, round region in the lower left
    with a sharp boundary; 92 % of its attention lies inside the lesion.

The facts are plain Python values (str, float, bool, None), so they can be logged to MLflow or
written to JSON next to the sentence. The rules are deliberately simple and scale-free (shares of
the image and ratios rather than pixel counts), so the same words mean the same thing at 224 px
and at 32 px.

Rules:

- **Region**: pixels >= ``threshold`` x the map's maximum; the largest 8-connected component.
- **Size**: the region's share of the image: small < 5 %, medium 5-20 %, large > 20 %.
- **Location**: the region's centroid in thirds of the image, vertically upper / centre /
  lower and horizontally left / centre / right ("centre" alone for the middle cell).
- **Shape**: major / minor axis of the region's second moments; elongated above 1.8 (an
  eccentricity of about 0.83), else round.
- **Boundary**: area above 0.5 x max divided by area above 0.2 x max, over the whole map. A
  hard-edged region keeps the same area at both levels (ratio near 1); a smooth fall-off
  spreads the lower level much wider (any Gaussian gives ln 2 / ln 5 = 0.43, whatever its
  width). Sharp at >= 0.6, else diffuse.
- **Inside share** (with a mask): the share of the map's heat inside the lesion (the energy
  pointing game); ``outside_flag`` when more than half lies outside, a hint of an artefact.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from skimage.measure import label as label_components
from skimage.measure import regionprops

from tasks.labels import full_name
from tasks.xai_metrics import energy_pointing_game

SMALL_PERCENT = 5.0  # regions below this share of the image are "small"
LARGE_PERCENT = 20.0  # regions above this share are "large"; in between "medium"
ELONGATED_RATIO = 1.8  # major / minor axis above this is "elongated"
SHARP_RATIO = 0.6  # area(>= 0.5 max) / area(>= 0.2 max) at or above this is "sharp"
BOUNDARY_LEVELS = (0.5, 0.2)  # the two levels (share of the maximum) of the boundary ratio
OUTSIDE_SHARE = 0.5  # more than this share of the heat outside the lesion sets outside_flag

ARTEFACT_SENTENCE = (
    "Most of its attention falls outside the lesion, which may point to an artefact such as a "
    "ruler, ink mark or hair."
)


def _third(position: float, length: int, words: tuple[str, str, str]) -> str:
    """Which third of an axis a (sub-pixel) coordinate falls in."""
    share = (position + 0.5) / length
    if share < 1 / 3:
        return words[0]
    if share < 2 / 3:
        return words[1]
    return words[2]


def _size_word(area_percent: float) -> str:
    if area_percent < SMALL_PERCENT:
        return "small"
    if area_percent <= LARGE_PERCENT:
        return "medium"
    return "large"


def describe_heatmap(
    heatmap: np.ndarray, mask: np.ndarray | None = None, threshold: float = 0.5
) -> dict[str, Any]:
    """Measure the main region of a heatmap in words and numbers (rules in the module docstring).

    Args:
        heatmap: (H, W) map, non-negative (negative values are clipped to 0).
        mask: optional (H, W) lesion mask, non-zero inside. An all-zero mask carries no lesion
            and is treated as no mask, rather than flagging every map as "outside".
        threshold: share of the map's maximum that defines the region.

    Returns:
        ``empty`` (True for an all-zero map; the region fields are then None), ``area_percent``,
        ``size_word``, ``vertical``, ``horizontal``, ``location`` (e.g. "lower left",
        "centre"), ``centroid`` ((row, col) as shares of the height and width), ``axis_ratio``,
        ``eccentricity``, ``shape`` ("round" | "elongated"), ``peak`` and ``mean`` (heat inside
        the region), ``boundary_ratio``, ``boundary`` ("sharp" | "diffuse"), ``components``
        (connected regions above the threshold), ``inside_share`` (None without a mask) and
        ``outside_flag``.
    """
    h = np.asarray(heatmap, dtype=np.float64)
    if h.ndim != 2:
        raise ValueError(f"heatmap must be a 2-D (H, W) array, got shape {h.shape}")
    if not np.all(np.isfinite(h)):
        raise ValueError("heatmap contains NaN or infinite values")
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    h = np.clip(h, 0, None)
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != h.shape:
            raise ValueError(f"mask shape {mask.shape} does not match heatmap shape {h.shape}")
        mask = mask.astype(bool)
        if not mask.any():
            mask = None

    inside_share = None if mask is None else energy_pointing_game(h, mask)
    facts: dict[str, Any] = {
        "empty": True,
        "area_percent": 0.0,
        "size_word": None,
        "vertical": None,
        "horizontal": None,
        "location": None,
        "centroid": None,
        "axis_ratio": None,
        "eccentricity": None,
        "shape": None,
        "peak": 0.0,
        "mean": 0.0,
        "boundary_ratio": None,
        "boundary": None,
        "components": 0,
        "inside_share": inside_share,
        "outside_flag": False,
    }
    peak = h.max()
    if peak <= 0:
        return facts

    labels = label_components(h >= threshold * peak, connectivity=2)
    regions = regionprops(labels)
    region = max(regions, key=lambda r: (r.area, -r.label))
    height, width = h.shape
    area_percent = 100.0 * region.area / h.size
    row, col = region.centroid
    vertical = _third(row, height, ("upper", "centre", "lower"))
    horizontal = _third(col, width, ("left", "centre", "right"))
    location = "centre" if vertical == horizontal == "centre" else f"{vertical} {horizontal}"
    # A one-pixel-wide region has a zero minor axis in moment terms; count it as one pixel wide.
    major, minor = region.axis_major_length, region.axis_minor_length
    axis_ratio = 1.0 if major == 0 else major / max(minor, 1.0)
    values = h[labels == region.label]
    upper, lower = (np.count_nonzero(h >= level * peak) for level in BOUNDARY_LEVELS)
    boundary_ratio = upper / lower

    facts.update(
        {
            "empty": False,
            "area_percent": float(area_percent),
            "size_word": _size_word(area_percent),
            "vertical": vertical,
            "horizontal": horizontal,
            "location": location,
            "centroid": (float(row / height), float(col / width)),
            "axis_ratio": float(axis_ratio),
            "eccentricity": float(region.eccentricity),
            "shape": "elongated" if axis_ratio > ELONGATED_RATIO else "round",
            "peak": float(values.max()),
            "mean": float(values.mean()),
            "boundary_ratio": float(boundary_ratio),
            "boundary": "sharp" if boundary_ratio >= SHARP_RATIO else "diffuse",
            "components": len(regions),
            "outside_flag": inside_share is not None and (1.0 - inside_share) > OUTSIDE_SHARE,
        }
    )
    return facts


def _percent(share: float) -> str:
    """A share as a whole percent, halves rounded up (0.865 -> "87 %"; round() would say 86)."""
    return f"{int(np.floor(100 * share + 0.5)):d} %"


def explain_text(label: str, confidence: float, facts: dict[str, Any]) -> str:
    """One or two plain sentences from a label, its probability and :func:`describe_heatmap`'s
    facts.

    The lesion clause ("N % of its attention lies inside the lesion") appears only when the
    facts carry an ``inside_share`` (a mask existed); the artefact sentence is added when
    ``outside_flag`` is set, because attention off the lesion is the classic sign of a shortcut
    (rulers, ink marks, hair, vignetting) rather than of lesion features.

    Args:
        label: class code (e.g. "MEL"); worded with :func:`tasks.labels.full_name`.
        confidence: probability of that class, in [0, 1].
        facts: the dict from :func:`describe_heatmap`.
    """
    if not 0.0 <= confidence <= 1.0:
        raise ValueError(f"confidence must be a probability in [0, 1], got {confidence}")
    head = f"Predicted {full_name(label)} ({_percent(confidence)})."
    if facts.get("empty"):
        return f"{head} The explanation map is empty, so it shows no region the model relied on."
    location = facts["location"]
    place = "in the centre" if location == "centre" else f"in the {location}"
    body = (
        f"The model focused on a {facts['size_word']}, {facts['shape']} region {place} "
        f"with a {facts['boundary']} boundary"
    )
    inside = facts.get("inside_share")
    if inside is not None:
        body += f"; {_percent(inside)} of its attention lies inside the lesion"
    text = f"{head} {body}."
    if facts.get("outside_flag"):
        text += f" {ARTEFACT_SENTENCE}"
    return text


def metadata_text(
    label: str, image_only: float, confidence: float, age: Any, sex: Any, site: Any
) -> str:
    """One sentence on what the metadata prior did to the predicted class's probability.

    A heatmap shows only the image's part of a fused answer; this sentence shows the rest, so a
    reader can tell a prediction the image carries from one that age, sex and site carry.

    Args:
        label: the predicted class code.
        image_only: its calibrated probability from the image alone.
        confidence: its calibrated probability with the metadata prior.
        age, sex, site: the patient's values (None or NaN where unknown).
    """
    known = [
        f"age {float(age):.0f}" if age is not None and age == age else None,
        None if sex is None or sex != sex else str(sex),
        None if site is None or site != site else str(site),
    ]
    said = ", ".join(k for k in known if k)
    return (
        f"From the image alone, {full_name(label)} has {_percent(image_only)}; with the "
        f"patient's {said} (metadata prior) it has {_percent(confidence)}."
    )
