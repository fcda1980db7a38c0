"""Split: stratified, grouped by lesion and by file hash, deterministic, leak-free."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tasks.split import SPLITS, SplitError, leak_groups, split_manifest

FRACTIONS = {"train": 0.7, "val": 0.15, "test": 0.15}


def toy_manifest(seed: int = 0, n_lesions: int = 120) -> pd.DataFrame:
    """Imbalanced labels, 1-4 images per lesion, and a few byte-identical files across lesions."""
    rng = np.random.default_rng(seed)
    rows = []
    labels = rng.choice(["NV", "MEL", "BCC", "DF"], size=n_lesions, p=[0.6, 0.25, 0.1, 0.05])
    for lesion, label in enumerate(labels):
        for _ in range(int(rng.integers(1, 5))):
            rows.append(
                {
                    "image_id": f"img{len(rows):04d}",
                    "label": label,
                    "lesion_id": f"les{lesion:03d}",
                    "sha256": f"h{len(rows):04d}",
                    "file_error": None,
                }
            )
    frame = pd.DataFrame(rows)
    # Three duplicated files: same bytes under another lesion (same label).
    for a, b in [(0, 40), (5, 90), (12, 130)]:
        frame.loc[b, "sha256"] = frame.loc[a, "sha256"]
        frame.loc[b, "label"] = frame.loc[a, "label"]
    return frame


def test_groups_join_lesions_and_hashes():
    frame = pd.DataFrame(
        {
            "lesion_id": ["a", "a", "b", "c", "d"],
            "sha256": ["1", "2", "2", "3", "4"],
        }
    )
    g = leak_groups(frame)
    assert g[0] == g[1] == g[2]  # a-a by lesion, a-b by hash
    assert len({g[0], g[3], g[4]}) == 3


def test_split_is_deterministic_and_seed_sensitive():
    frame = toy_manifest()
    a, _ = split_manifest(frame, FRACTIONS, seed=7)
    b, _ = split_manifest(frame, FRACTIONS, seed=7)
    c, _ = split_manifest(frame, FRACTIONS, seed=8)
    assert (a["split"] == b["split"]).all()
    assert (a["split"] != c["split"]).any()


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_no_leaks_and_stratified(seed):
    frame = toy_manifest(seed)
    out, report = split_manifest(frame, FRACTIONS, seed=seed)
    assert report["leakage"] == {"shared_lesions": 0, "shared_hashes": 0}
    for column in ("lesion_id", "sha256"):
        assert (out.groupby(column)["split"].nunique() == 1).all()
    # Every class reaches every split, near its target share.
    for label, counts in report["per_class"].items():
        assert all(counts[s] > 0 for s in SPLITS), (label, counts)
    assert abs(report["fractions"]["train"] - 0.7) < 0.06
    assert sum(report["images"].values()) == len(frame)


def test_small_class_is_an_error_or_goes_to_train():
    frame = toy_manifest()
    frame.loc[frame.index[-2:], ["label", "lesion_id"]] = [["VASC", "v1"], ["VASC", "v2"]]
    with pytest.raises(SplitError, match="VASC.*2 lesion group"):
        split_manifest(frame, FRACTIONS, seed=0)
    out, report = split_manifest(frame, FRACTIONS, seed=0, small_class="train_only")
    assert set(out.loc[out["label"] == "VASC", "split"]) == {"train"}
    assert report["train_only_classes"] == ["VASC"]


def test_unlabelled_rows_are_refused():
    frame = toy_manifest()
    frame.loc[3, "label"] = None
    with pytest.raises(SplitError, match="run validate first"):
        split_manifest(frame, FRACTIONS, seed=0)
