"""Tiny real datasets on disk in the layouts ingest reads, plus ways to break files.

Every image is a real, small JPEG or PNG with its own pixels (seeded by its path), so that two
files share a sha256 only when a test means them to. Tests build a clean dataset with
``make_isic`` / ``make_ham`` / ``make_folder`` / ``make_ph2`` and then damage single files with
``truncate``, ``empty`` or ``not_an_image``, the way real archives break.
"""

from __future__ import annotations

import csv
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from tasks.labels import ISIC_CLASSES

ISIC_INPUT = "ISIC_2019_Training_Input"
ISIC_MASKS = "ISIC_2018_Task1_GroundTruth"


def write_image(
    path: Path, size: tuple[int, int] = (48, 48), mode: str = "RGB", seed: int | None = None
) -> Path:
    """Write a small noisy image with a dark blob; format from the suffix (.jpg, .png)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(zlib.crc32(str(path).encode()) if seed is None else seed)
    w, h = size
    pixels = rng.integers(150, 230, size=(h, w, 3), dtype=np.uint8)
    img = Image.fromarray(pixels, "RGB")
    ImageDraw.Draw(img).ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=(90, 50, 40))
    img.convert(mode).save(path)
    return path


def write_mask(path: Path, size: tuple[int, int] = (48, 48)) -> Path:
    """Write an ISIC-2018-style binary mask (0/255 PNG) of a centred ellipse."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=255)
    mask.save(path)
    return path


def truncate(path: Path) -> Path:
    """Cut a file's bytes in half: the header still parses, the pixels do not."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def empty(path: Path) -> Path:
    """Make a zero-byte file (an interrupted download)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def not_an_image(path: Path) -> Path:
    """Put text behind an image suffix (an HTML error page saved as .jpg)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("<html>403 Forbidden</html>\n")
    return path


def _write_csv(path: Path, header: list[str], rows: Iterable[list[Any]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def make_isic(root: Path, rows: list[dict[str, Any]]) -> Path:
    """ISIC 2019 layout: ground-truth and metadata CSVs, images, optional masks.

    Each row: ``image`` (id); ``label`` (one class, or a list of classes for a multi-hot row,
    ``[]`` for all-zero); optional ``age``, ``sex``, ``site``, ``lesion_id``, ``size``,
    ``mask`` (True writes ``<id>_segmentation.png``) and ``write`` (False: list the image in
    the CSVs but write no file). An id listed twice gets one image and one metadata row.
    """
    root.mkdir(parents=True, exist_ok=True)
    gt_rows, meta_rows, seen = [], [], set()
    for row in rows:
        marked = row["label"] if isinstance(row["label"], list) else [row["label"]]
        gt_rows.append([row["image"]] + [1.0 if c in marked else 0.0 for c in ISIC_CLASSES])
        if row["image"] in seen:
            continue
        seen.add(row["image"])
        meta_rows.append(
            [row["image"], row.get("age", 50), row.get("site", "anterior torso")]
            + [row.get("lesion_id", ""), row.get("sex", "female")]
        )
        size = row.get("size", (48, 48))
        if row.get("write", True):
            write_image(root / ISIC_INPUT / f"{row['image']}.jpg", size)
        if row.get("mask"):
            write_mask(root / ISIC_MASKS / f"{row['image']}_segmentation.png", size)
    _write_csv(root / "ISIC_2019_Training_GroundTruth.csv", ["image", *ISIC_CLASSES], gt_rows)
    _write_csv(
        root / "ISIC_2019_Training_Metadata.csv",
        ["image", "age_approx", "anatom_site_general", "lesion_id", "sex"],
        meta_rows,
    )
    return root


def make_ham(root: Path, rows: list[dict[str, Any]]) -> Path:
    """HAM10000 layout: metadata CSV and images split over the two part folders.

    Each row: ``image_id``, ``dx`` (HAM code: akiec bcc bkl df mel nv vasc, or anything else
    to provoke label_known); optional ``lesion_id``, ``age``, ``sex``, ``localization``,
    ``size``. Images alternate between ``HAM10000_images_part_1`` and ``_part_2``.
    """
    root.mkdir(parents=True, exist_ok=True)
    meta = []
    for i, row in enumerate(rows):
        meta.append(
            [
                row.get("lesion_id", f"HAM_L{i:05d}"),
                row["image_id"],
                row["dx"],
                "histo",
                row.get("age", 45),
                row.get("sex", "male"),
                row.get("localization", "back"),
            ]
        )
        part = root / f"HAM10000_images_part_{1 + i % 2}"
        write_image(part / f"{row['image_id']}.jpg", row.get("size", (48, 48)))
    header = ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"]
    _write_csv(root / "HAM10000_metadata.csv", header, meta)
    return root


def make_folder(
    root: Path, counts: dict[str, int], size: tuple[int, int] = (48, 48), suffix: str = ".jpg"
) -> dict[str, list[Path]]:
    """Class-per-folder layout: ``root/<class>/<class>_<i><suffix>``; returns the files."""
    return {
        label: [write_image(root / label / f"{label}_{i}{suffix}", size) for i in range(n)]
        for label, n in counts.items()
    }


PH2_CODES = {"common_nevus": 0, "atypical_nevus": 1, "melanoma": 2}


def make_ph2(root: Path, labels: list[str], size: tuple[int, int] = (64, 48)) -> Path:
    """PH2 as distributed: ``PH2_dataset.txt`` ('||' table + legend) and a folder per case.

    Each case ``IMD<n>`` gets its dermoscopic BMP, its lesion mask and one colour-region BMP
    (``<id>_roi``), the three kinds of image the real case folders hold.
    """
    root.mkdir(parents=True, exist_ok=True)
    lines = [
        "|| Name || Histological Diagnosis || Clinical Diagnosis || Asymmetry | Pigment Network"
        " | Dots/Globules | Streaks | Regression Areas | Blue-Whitish Veil || Colors ||"
    ]
    for i, label in enumerate(labels):
        case = f"IMD{i + 2:03d}"
        histology = "Melanoma" if label == "melanoma" else ""
        lines.append(
            f"|| {case} || {histology:>22} || {PH2_CODES[label]:>18} || 0 | T | A | A | A | A"
            " || 3  4 ||"
        )
        folder = root / "PH2 Dataset images" / case
        write_image(folder / f"{case}_Dermoscopic_Image" / f"{case}.bmp", size)
        write_mask(folder / f"{case}_lesion" / f"{case}_lesion.bmp", size)
        write_mask(folder / f"{case}_roi" / f"{case}_R1_Label4.bmp", size)
    lines += ["", "Legends:", "Clinical Diagnosis: 0 - Common Nevus; 1 - Atypical; 2 - Melanoma"]
    (root / "PH2_dataset.txt").write_text("\n".join(lines) + "\n")
    return root
