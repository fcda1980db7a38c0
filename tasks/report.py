"""The data report's files: validation JSON + markdown, and a contact sheet of the images.

Numbers say a dataset is valid; only looking at it says it is the dataset you meant (a class
folder of dermoscopy mixed with clinical photos, masks that outline the wrong thing). The
contact sheet puts a few deterministic examples of every class side by side, with the mask
outline drawn over them, so that look costs one glance per data version.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from PIL import Image, ImageOps
from skimage.segmentation import find_boundaries

from tasks.io import atomic_path, write_json, write_text
from tasks.labels import full_name
from tasks.validate import ValidationReport

OUTLINE_RGB = (0, 255, 255)  # cyan: far from skin tones and from the dark lesion itself
DPI = 100


def write_reports(report: ValidationReport, json_path: Path, md_path: Path) -> None:
    """Write the validation report as JSON (for machines, MLflow) and markdown (for people)."""
    write_json(json_path, report.to_dict())
    write_text(md_path, report.to_markdown())


def _inside(root: Path, rel: str) -> Path | None:
    """The file under ``root`` for a manifest path, or None if it escapes the root."""
    target = (root / rel).resolve()
    return target if target.is_relative_to(root.resolve()) else None


def _thumbnail(root: Path, path: str, mask_path: str | None, thumb: int) -> np.ndarray | None:
    """A square RGB thumbnail (centre crop) with the mask outline painted on, or None."""
    image_file = _inside(root, path)
    if image_file is None:
        return None
    try:
        with Image.open(image_file) as img:
            pixels = np.array(ImageOps.fit(img.convert("RGB"), (thumb, thumb)))
    except (OSError, SyntaxError, ValueError):
        return None
    mask_file = _inside(root, mask_path) if mask_path else None
    if mask_file is not None:
        try:
            with Image.open(mask_file) as m:
                mask = ImageOps.fit(m.convert("L"), (thumb, thumb), Image.Resampling.NEAREST)
            edge = find_boundaries(np.array(mask) > 0, mode="inner")
            edge |= np.roll(edge, 1, axis=0) | np.roll(edge, 1, axis=1)  # 2 px: visible
            pixels[edge] = OUTLINE_RGB
        except (OSError, SyntaxError, ValueError):
            pass  # an unreadable mask is the validation report's business, not the sheet's
    return pixels


def _pick(rows: pd.DataFrame, per_class: int, seed: int) -> pd.DataFrame:
    """A deterministic sample: the same manifest and seed always show the same images."""
    rows = rows.sort_values("image_id", kind="stable")
    return rows.sample(n=min(per_class, len(rows)), random_state=seed)


def contact_sheet(
    manifest: pd.DataFrame,
    root: Path,
    out_png: Path,
    per_class: int = 6,
    thumb: int = 96,
    seed: int = 0,
) -> None:
    """Draw ``per_class`` readable examples of every class, one row per class, to a PNG.

    The label and its image count sit on the left of each row. Rows whose file is flagged by
    ingest, or whose path escapes the root, are never opened; a class without a single readable
    image keeps its row (with its count) so that its absence is visible too.
    """
    root = Path(root)
    labelled = manifest[manifest["label"].notna()]
    counts = labelled["label"].value_counts()
    classes = sorted(counts.index, key=str)
    inside = np.array([_inside(root, str(p)) is not None for p in labelled["path"]], dtype=bool)
    readable = labelled[labelled["file_error"].isna().to_numpy() & inside]
    n_rows = max(len(classes), 1)
    label_width = 1.6  # inches for the class names
    cell = thumb / DPI
    # A bare Figure renders with Agg without touching pyplot's global state (thread-safe).
    title_height = 0.4
    fig = Figure(
        figsize=(label_width + per_class * cell * 1.05, n_rows * cell * 1.05 + title_height),
        dpi=DPI,
    )
    axes = fig.subplots(n_rows, per_class, squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
    for i, label in enumerate(classes):
        name = full_name(str(label))
        axes[i, 0].set_ylabel(
            f"{label}\n{name}\nn={counts[label]}"
            if name != label
            else f"{label}\nn={counts[label]}",
            rotation=0,
            ha="right",
            va="center",
            fontsize=8,
        )
        sample = _pick(readable[readable["label"] == label], per_class, seed)
        for j, row in enumerate(sample.itertuples(index=False)):
            mask_path = row.mask_path if not pd.isna(row.mask_path) else None
            if row.mask_error is not None and not pd.isna(row.mask_error):
                mask_path = None
            pixels = _thumbnail(root, str(row.path), mask_path, thumb)
            if pixels is None:
                axes[i, j].text(0.5, 0.5, "unreadable", ha="center", va="center", fontsize=6)
                continue
            axes[i, j].imshow(pixels)
            axes[i, j].set_title(str(row.image_id)[:18], fontsize=5, pad=1)
    if not classes:
        axes[0, 0].text(0.5, 0.5, "no labelled images", ha="left", va="center")
    masks = " (masks outlined in cyan)" if manifest["mask_path"].notna().any() else ""
    fig.suptitle(f"{len(manifest)} images, {len(classes)} classes{masks}", fontsize=9)
    width, height = fig.get_size_inches()
    fig.subplots_adjust(
        left=label_width / width,
        right=0.99,
        bottom=0.01,
        top=1 - title_height / height,
        wspace=0.05,
        hspace=0.15,
    )
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
