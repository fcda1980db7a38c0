"""Plain-language explanations from synthetic heatmaps whose answers are known by construction."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.explain_text import ARTEFACT_SENTENCE, describe_heatmap, explain_text, metadata_text

SIZE = 64


def gaussian(row: float, col: float, sigma_r: float, sigma_c: float | None = None) -> np.ndarray:
    sigma_c = sigma_r if sigma_c is None else sigma_c
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    return np.exp(-0.5 * (((yy - row) / sigma_r) ** 2 + ((xx - col) / sigma_c) ** 2))


def disk(row: float, col: float, radius: float) -> np.ndarray:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    return (((yy - row) ** 2 + (xx - col) ** 2) <= radius**2).astype(np.float32)


@pytest.mark.parametrize(
    ("row", "col", "location"),
    [
        (48, 12, "lower left"),
        (10, 10, "upper left"),
        (10, 32, "upper centre"),
        (10, 54, "upper right"),
        (32, 10, "centre left"),
        (32, 32, "centre"),
        (32, 54, "centre right"),
        (54, 32, "lower centre"),
        (54, 54, "lower right"),
    ],
)
def test_location_in_thirds(row: int, col: int, location: str) -> None:
    facts = describe_heatmap(gaussian(row, col, 4))
    assert facts["location"] == location


@pytest.mark.parametrize(
    ("heatmap", "size_word"),
    [
        (gaussian(48, 12, 4), "small"),  # ~1.7 % of the image above half the peak
        (disk(32, 32, 10), "medium"),  # ~7.7 %
        (disk(32, 32, 25), "large"),  # ~48 %
    ],
)
def test_size_word(heatmap: np.ndarray, size_word: str) -> None:
    facts = describe_heatmap(heatmap)
    assert facts["size_word"] == size_word
    assert facts["area_percent"] == pytest.approx(
        100 * np.count_nonzero(heatmap >= 0.5 * heatmap.max()) / heatmap.size
    )


@pytest.mark.parametrize(
    ("heatmap", "shape"),
    [
        (gaussian(32, 32, 3, 10), "elongated"),
        (gaussian(32, 32, 10, 3), "elongated"),
        (gaussian(32, 32, 6), "round"),
        (disk(32, 32, 8), "round"),
    ],
)
def test_shape(heatmap: np.ndarray, shape: str) -> None:
    assert describe_heatmap(heatmap)["shape"] == shape


@pytest.mark.parametrize(
    ("heatmap", "boundary"),
    [
        (disk(32, 32, 12), "sharp"),
        (gaussian(32, 32, 12), "diffuse"),
        (gaussian(32, 32, 3), "diffuse"),  # narrow but still a smooth fall-off
    ],
)
def test_boundary(heatmap: np.ndarray, boundary: str) -> None:
    facts = describe_heatmap(heatmap)
    assert facts["boundary"] == boundary


def test_peak_mean_and_largest_component() -> None:
    heatmap = 0.8 * disk(16, 16, 10) + 0.6 * disk(48, 48, 3)
    facts = describe_heatmap(heatmap)
    assert facts["components"] == 2
    assert facts["location"] == "upper left"  # the larger region wins
    assert facts["peak"] == pytest.approx(0.8) and facts["mean"] == pytest.approx(0.8)


def test_mask_around_the_blob_reports_the_inside_share() -> None:
    heatmap = gaussian(48, 14, 4)
    mask = disk(48, 14, 12).astype(np.uint8)
    facts = describe_heatmap(heatmap, mask)
    share = heatmap[mask.astype(bool)].sum() / heatmap.sum()
    assert facts["inside_share"] == pytest.approx(share) and not facts["outside_flag"]
    text = explain_text("MEL", 0.87, facts)
    assert f"; {round(100 * share)} % of its attention lies inside the lesion." in text
    assert ARTEFACT_SENTENCE not in text


def test_blob_outside_the_mask_flags_an_artefact() -> None:
    heatmap = gaussian(8, 56, 4)  # upper right, where a ruler might sit
    mask = disk(40, 24, 12)
    facts = describe_heatmap(heatmap, mask)
    assert facts["outside_flag"] and facts["inside_share"] < 0.01
    text = explain_text("NV", 0.6, facts)
    assert text.endswith(" " + ARTEFACT_SENTENCE)
    assert "0 % of its attention lies inside the lesion" in text


def test_without_a_mask_there_is_no_lesion_clause() -> None:
    facts = describe_heatmap(gaussian(32, 32, 4))
    assert facts["inside_share"] is None and not facts["outside_flag"]
    text = explain_text("BCC", 0.5, facts)
    assert "lesion" not in text
    assert text == (
        "Predicted basal cell carcinoma (50 %). "
        "The model focused on a small, round region in the centre with a diffuse boundary."
    )


def test_exact_sentence() -> None:
    facts = {
        "empty": False,
        "size_word": "medium",
        "shape": "round",
        "location": "lower left",
        "boundary": "sharp",
        "inside_share": 0.92,
        "outside_flag": False,
    }
    assert explain_text("MEL", 0.87, facts) == (
        "Predicted melanoma (87 %). The model focused on a medium, round region in the lower left "
        "with a sharp boundary; 92 % of its attention lies inside the lesion."
    )


def test_end_to_end_sentence_from_a_hard_disk() -> None:
    heatmap = disk(48, 14, 9)  # 255 px = 6.2 %: medium, lower left, round, sharp
    mask = disk(48, 14, 9)
    text = explain_text("MEL", 0.874, describe_heatmap(heatmap, mask))
    assert text == (
        "Predicted melanoma (87 %). The model focused on a medium, round region in the lower left "
        "with a sharp boundary; 100 % of its attention lies inside the lesion."
    )


def test_empty_map_and_bad_inputs() -> None:
    facts = describe_heatmap(np.zeros((SIZE, SIZE)), disk(32, 32, 5))
    assert facts["empty"] and not facts["outside_flag"]
    assert "no region" in explain_text("UNK", 0.3, facts)
    assert describe_heatmap(gaussian(32, 32, 4), np.zeros((SIZE, SIZE)))["inside_share"] is None
    with pytest.raises(ValueError, match="does not match"):
        describe_heatmap(gaussian(32, 32, 4), np.ones((8, 8)))
    with pytest.raises(ValueError, match="probability"):
        explain_text("MEL", 87.0, describe_heatmap(gaussian(32, 32, 4)))


def test_folder_labels_are_worded_plainly() -> None:
    facts = describe_heatmap(disk(32, 32, 10))
    assert explain_text("benign_naevus", 0.9, facts).startswith("Predicted benign naevus (90 %).")


@pytest.mark.parametrize(
    ("patient", "said"),
    [
        ((70.0, "male", "face"), "age 70, male, face"),
        ((float("nan"), None, "back"), "back"),
        ((41.6, "female", float("nan")), "age 42, female"),
    ],
)
def test_metadata_sentence_says_what_the_prior_changed(patient: tuple, said: str) -> None:
    text = metadata_text("BCC", 0.412, 0.634, *patient)
    assert text == (
        f"From the image alone, basal cell carcinoma has 41 %; with the patient's {said} "
        "(metadata prior) it has 63 %."
    )
