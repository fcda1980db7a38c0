"""Prepare: every image mode decodes to upright 8-bit RGB, masks follow the same geometry."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tasks.config import PrepareConfig
from tasks.ingest import build_manifest
from tasks.prepare import PrepareError, check_cache, class_names, open_split, prepare, to_rgb
from tasks.split import split_manifest, write_splits
from tests.datasets import make_folder

RED = (200, 30, 30)


def _save(path, mode: str) -> None:
    """A 40x20 image: left half red, right half white, in the given PIL mode."""
    arr = np.full((20, 40, 3), 255, np.uint8)
    arr[:, :20] = RED
    img = Image.fromarray(arr, "RGB")
    if mode == "I;16":
        grey = np.asarray(img.convert("L"), np.uint16) * 257
        Image.fromarray(grey).save(path)
        return
    if mode == "RGBA":
        img = img.convert("RGBA")
        img.putalpha(255)
    elif mode == "P":
        img = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    else:
        img = img.convert(mode)
    img.save(path)


@pytest.mark.parametrize(
    ("mode", "suffix"),
    [
        ("RGB", ".jpg"),
        ("L", ".png"),
        ("RGBA", ".png"),
        ("CMYK", ".jpg"),
        ("I;16", ".png"),
        ("P", ".png"),
        ("RGB", ".tif"),
    ],
)
def test_every_mode_decodes_to_rgb(tmp_path, mode, suffix):
    path = tmp_path / f"img{suffix}"
    _save(path, mode)
    with Image.open(path) as img:
        out = np.asarray(to_rgb(img))
    assert out.dtype == np.uint8 and out.shape == (20, 40, 3)
    left, right = out[:, :15].mean(axis=(0, 1)), out[:, 25:].mean(axis=(0, 1))
    assert right.min() > 235  # white stays white
    if mode in {"L", "I;16"}:
        expected = np.asarray(Image.new("RGB", (1, 1), RED).convert("L"))[0, 0]
        assert abs(left.mean() - expected) < 3  # 16-bit rescaled, not clipped to white
    else:
        assert left[0] > 150 and left[1] < 90  # still red


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "rot.jpg"
    _save(path, "RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.open(path).save(path, exif=exif)
    with Image.open(path) as img:
        out = np.asarray(to_rgb(img))
    assert out.shape == (40, 20, 3)
    top, bottom = out[:15].mean(axis=(0, 1)), out[25:].mean(axis=(0, 1))
    assert top[0] > 150 and top[1] < 90 and bottom.min() > 235  # the red left went up


def test_cache_round_trip(tmp_path):
    root = tmp_path / "ds"
    make_folder(root, {"melanoma": 6, "naevus": 8}, size=(60, 40))
    mask_path = root / "melanoma" / "melanoma_0_segmentation.png"
    mask = np.zeros((40, 60), np.uint8)
    mask[10:30, 20:40] = 255
    Image.fromarray(mask).save(mask_path)
    manifest = build_manifest(root, progress=False)
    assert manifest["mask_path"].notna().sum() == 1
    frame, _ = split_manifest(manifest, {"train": 0.5, "val": 0.25, "test": 0.25}, seed=0)
    write_splits(frame, tmp_path / "splits")
    metrics = prepare(
        tmp_path / "splits", root, tmp_path / "prep", size=32, workers=2, show_progress=False
    )
    assert metrics["images"] == 14 and metrics["decode_images_per_s"] > 0
    seen = 0
    for split in ("train", "val", "test"):
        part = open_split(tmp_path / "prep", split)
        assert part.images.shape[1:] == (32, 32, 3) and part.images.dtype == np.uint8
        assert part.classes == ["melanoma", "naevus"]
        seen += len(part.rows)
        for i, row in part.rows.iterrows():
            with Image.open(root / row["path"]) as img:
                crop = to_rgb(img).crop((10, 0, 50, 40)).resize((32, 32), Image.Resampling.BICUBIC)
            assert np.abs(part.images[i].astype(int) - np.asarray(crop)).max() <= 1
            assert part.labels[i] == part.classes.index(row["label"])
            if row["image_id"] == "melanoma_0":
                # The 20x20 square at x 20..40 of a 40x40 centre crop lands at x 8..24 of 32.
                assert row["has_mask"] and part.masks[i].sum() == 16 * 16
                assert part.masks[i][16, 16] == 1 and part.masks[i][2, 2] == 0
            else:
                assert not row["has_mask"] and part.masks[i].sum() == 0
    assert seen == 14
    # The cache is the one these params name; another size or resize mode is refused by name.
    check_cache(tmp_path / "prep", PrepareConfig(size=32, resize="center_crop", workers=1))
    with pytest.raises(PrepareError, match=r"meta.json: .* size 32 but prepare.size is 64;"):
        check_cache(tmp_path / "prep", PrepareConfig(size=64, resize="center_crop", workers=1))
    with pytest.raises(PrepareError, match=r"resize center_crop but prepare.resize is squash"):
        check_cache(tmp_path / "prep", PrepareConfig(size=32, resize="squash", workers=1))


def test_class_order():
    assert class_names(pd.Series(["NV", "MEL", "DF"])) == ["MEL", "NV", "DF"]
    assert class_names(pd.Series(["naevus", "melanoma"])) == ["melanoma", "naevus"]
