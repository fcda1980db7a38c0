"""Ingest: turn a dataset root (ISIC 2019, HAM10000 or class-per-folder) into one manifest.

Adapters only *describe* what they find; they never drop a row. A missing, empty or broken
file becomes a row with ``file_error`` set, and a ground-truth row that is not one-hot keeps
``label=None`` with its ``onehot_sum``, so that the validate stage can report every defect of
the dataset in one run instead of the first one only.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from PIL import Image

from tasks.labels import HAM_TO_ISIC, ISIC_CLASSES
from tasks.progress import progress_bar

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}
MASK_SUFFIX = "_segmentation"

MANIFEST_COLUMNS = [
    "image_id",  # unique id (ISIC/HAM image id, or the file stem for folder sets)
    "path",  # image path relative to the dataset root (posix)
    "label",  # class name; None when the ground truth is not exactly one class
    "lesion_id",  # lesion the image shows (image_id when the dataset has none)
    "age",  # float years, NaN when unknown
    "sex",  # male | female | None
    "site",  # anatomical site or None
    "mask_path",  # segmentation mask relative to the root, or None
    "sha256",  # hex digest of the image bytes (None if the file could not be read)
    "width",  # pixels (None if the image did not decode)
    "height",
    "source",  # adapter: isic2019 | ham10000 | folder
    "source_label",  # the adapter's label before dataset.label_map (equal to label without one)
    "onehot_sum",  # ISIC ground truth: number of classes marked 1 on the row (None elsewhere)
    "file_error",  # None | missing | empty | not_an_image | truncated
    "mask_error",  # None | missing | not_an_image | truncated
]

ISIC_GT = "ISIC_2019_Training_GroundTruth.csv"
ISIC_META = "ISIC_2019_Training_Metadata.csv"
HAM_META = "HAM10000_metadata.csv"


class IngestError(ValueError):
    """The dataset root cannot be read as any known layout."""


def detect_layout(root: Path) -> str:
    """Name the adapter for ``root`` from the files it holds."""
    if (root / ISIC_GT).exists():
        return "isic2019"
    if (root / HAM_META).exists() or (root / "HAM10000_metadata").exists():
        return "ham10000"
    if any(p.is_dir() and not p.name.startswith(".") for p in root.iterdir()):
        return "folder"
    raise IngestError(
        f"{root}: no {ISIC_GT}, no {HAM_META} and no class folders; "
        "set dataset.layout or point dataset.root at the dataset"
    )


def index_images(root: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """Map file stem -> path for images and for ``*_segmentation`` masks under ``root``.

    Real archives nest their images differently (HAM10000 ships two part folders, ISIC zips
    add a level), so adapters look files up by id in this index rather than by a fixed path.
    """
    images: dict[str, Path] = {}
    masks: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if p.suffix.lower() not in IMAGE_SUFFIXES or name.startswith("."):
                continue
            if p.stem.endswith(MASK_SUFFIX):
                masks.setdefault(p.stem[: -len(MASK_SUFFIX)], p)
            else:
                images.setdefault(p.stem, p)
    return images, masks


def _rel(path: Path | None, root: Path) -> str | None:
    if path is None:
        return None
    return Path(os.path.relpath(path, root)).as_posix()


def _clean(value: object) -> object:
    """Strip a metadata value; empty, NaN and HAM10000's literal ``unknown`` become None."""
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return None
    text = str(value).strip()
    return None if not text or text.lower() == "unknown" else text


def read_isic2019(root: Path) -> pd.DataFrame:
    """ISIC 2019: one-hot ground truth + metadata CSV (image, age_approx, site, lesion_id, sex)."""
    gt = pd.read_csv(root / ISIC_GT)
    classes = [c for c in gt.columns if c != "image"]
    unknown = sorted(set(classes) - set(ISIC_CLASSES))
    if "image" not in gt.columns or unknown:
        raise IngestError(
            f"{root / ISIC_GT}: expected columns image + {', '.join(ISIC_CLASSES)}; "
            f"unexpected {unknown or 'missing image column'}"
        )
    hot = gt[classes].fillna(0).to_numpy() >= 0.5
    sums = hot.sum(axis=1)
    labels = [classes[row.argmax()] if s == 1 else None for row, s in zip(hot, sums, strict=True)]
    frame = pd.DataFrame({"image_id": gt["image"].astype(str), "label": labels, "onehot_sum": sums})
    meta_path = root / ISIC_META
    if meta_path.exists():
        meta = pd.read_csv(meta_path, dtype={"lesion_id": str, "sex": str})
        meta = meta.rename(
            columns={"image": "image_id", "age_approx": "age", "anatom_site_general": "site"}
        )
        keep = [c for c in ("image_id", "age", "site", "lesion_id", "sex") if c in meta.columns]
        frame = frame.merge(meta[keep], on="image_id", how="left")
    frame["source"] = "isic2019"
    return frame


def read_ham10000(root: Path) -> pd.DataFrame:
    """HAM10000: metadata CSV (lesion_id, image_id, dx, dx_type, age, sex, localization)."""
    meta_path = root / HAM_META if (root / HAM_META).exists() else root / "HAM10000_metadata"
    meta = pd.read_csv(meta_path, dtype={"lesion_id": str, "image_id": str})
    missing = {"lesion_id", "image_id", "dx"} - set(meta.columns)
    if missing:
        raise IngestError(f"{meta_path}: missing column(s) {sorted(missing)}")
    frame = pd.DataFrame(
        {
            "image_id": meta["image_id"],
            # Unknown dx codes keep their raw name so that validation can name them.
            "label": [HAM_TO_ISIC.get(str(d).strip().lower(), str(d)) for d in meta["dx"]],
            "lesion_id": meta["lesion_id"],
            "age": meta.get("age"),
            "sex": meta.get("sex"),
            "site": meta.get("localization"),
        }
    )
    frame["source"] = "ham10000"
    return frame


def read_folder(root: Path) -> pd.DataFrame:
    """Class-per-folder (e.g. MED-NODE melanoma/ naevus/): the folder name is the label."""
    rows = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for p in sorted(class_dir.rglob("*")):
            if p.suffix.lower() in IMAGE_SUFFIXES and not p.stem.endswith(MASK_SUFFIX):
                rows.append({"image_id": p.stem, "label": class_dir.name, "path": _rel(p, root)})
    if not rows:
        raise IngestError(f"{root}: class folders hold no images ({sorted(IMAGE_SUFFIXES)})")
    frame = pd.DataFrame(rows)
    frame["source"] = "folder"
    return frame


ADAPTERS = {"isic2019": read_isic2019, "ham10000": read_ham10000, "folder": read_folder}


@dataclass(frozen=True)
class FileFacts:
    sha256: str | None
    width: int | None
    height: int | None
    file_error: str | None
    mask_error: str | None


def inspect_file(image: Path, mask: Path | None = None) -> FileFacts:
    """Read an image once: hash its bytes and fully decode them (catches truncation)."""
    sha = width = height = error = None
    if not image.is_file():
        error = "missing"
    else:
        data = image.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        if not data:
            error = "empty"
        else:
            width, height, error = _decode(data)
    mask_error = None
    if mask is not None:
        if not mask.is_file():
            mask_error = "missing"
        else:
            mask_error = _decode(mask.read_bytes())[2] if mask.stat().st_size else "empty"
    return FileFacts(sha, width, height, error, mask_error)


_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"BM", b"II*\x00", b"MM\x00*", b"GIF8")


def _decode(data: bytes) -> tuple[int | None, int | None, str | None]:
    """Decode fully; a broken file with an image signature counts as truncated."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            size = img.size
            try:
                img.load()
            except (OSError, SyntaxError, ValueError):
                return size[0], size[1], "truncated"
            return size[0], size[1], None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None, None, "truncated" if data.startswith(_MAGIC) else "not_an_image"


def _inspect_pair(pair: tuple[Path, Path | None]) -> FileFacts:
    return inspect_file(*pair)


def inspect_files(
    pairs: list[tuple[Path, Path | None]], workers: int, progress: bool = True
) -> list[FileFacts]:
    """Inspect (image, mask) pairs in ``workers`` processes, with a progress bar."""
    chunk = max(1, min(64, len(pairs) // (4 * max(workers, 1)) or 1))
    with progress_bar(progress) as bar:
        task = bar.add_task("hashing + decoding images", total=len(pairs))
        results: list[FileFacts] = []
        if workers <= 1:
            mapped: Iterable[FileFacts] = map(_inspect_pair, pairs)
            for facts in mapped:
                results.append(facts)
                bar.advance(task)
            return results
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for facts in pool.map(_inspect_pair, pairs, chunksize=chunk):
                results.append(facts)
                bar.advance(task)
    return results


def build_manifest(
    root: str | Path,
    layout: str = "auto",
    masks: str | Path | None = None,
    workers: int = 1,
    progress: bool = True,
    label_map: dict[str, str | None] | None = None,
) -> pd.DataFrame:
    """Build the manifest of a dataset root (see ``MANIFEST_COLUMNS``).

    Args:
        root: dataset root; manifest paths are relative to it.
        layout: ``auto`` or an adapter name (isic2019, ham10000, folder).
        masks: optional folder of ``<image_id>_segmentation.png``; by default masks are looked
            up anywhere under ``root``.
        workers: processes for hashing and decoding.
        progress: show a progress bar.
        label_map: ``dataset.label_map``: old label -> new label, ``None`` drops the images
            (applied before any file is read, so dropped images cost nothing).
    """
    root = Path(root)
    if not root.is_dir():
        raise IngestError(f"{root}: dataset root does not exist or is not a folder")
    layout = detect_layout(root) if layout == "auto" else layout
    if layout not in ADAPTERS:
        raise IngestError(f"unknown layout {layout!r}; choose one of {sorted(ADAPTERS)}")
    frame = apply_label_map(ADAPTERS[layout](root), label_map or {})
    images, mask_index = index_images(root)
    if masks is not None:
        mask_index.update(index_images(Path(masks))[1])

    if "path" not in frame.columns:
        default_dir = "ISIC_2019_Training_Input" if layout == "isic2019" else "images"
        frame["path"] = [
            _rel(images[i], root) if i in images else f"{default_dir}/{i}.jpg"
            for i in frame["image_id"]
        ]
    frame["mask_path"] = [_rel(mask_index.get(i), root) for i in frame["image_id"]]
    for column in MANIFEST_COLUMNS:
        if column not in frame.columns:
            frame[column] = None
    frame["lesion_id"] = [
        _clean(lesion) or image
        for lesion, image in zip(frame["lesion_id"], frame["image_id"], strict=True)
    ]
    frame["sex"] = [_clean(v) for v in frame["sex"]]
    frame["site"] = [_clean(v) for v in frame["site"]]
    frame["age"] = pd.to_numeric(frame["age"], errors="coerce").astype(float)

    pairs = [
        (root / p, (root / m) if isinstance(m, str) and m else None)
        for p, m in zip(frame["path"], frame["mask_path"], strict=True)
    ]
    facts = inspect_files(pairs, workers=workers, progress=progress)
    for name in ("sha256", "width", "height", "file_error", "mask_error"):
        frame[name] = [getattr(f, name) for f in facts]
    frame["width"] = frame["width"].astype("Int64")
    frame["height"] = frame["height"].astype("Int64")
    frame["onehot_sum"] = frame["onehot_sum"].astype("Int64")
    return frame[MANIFEST_COLUMNS].reset_index(drop=True)


def apply_label_map(frame: pd.DataFrame, label_map: dict[str, str | None]) -> pd.DataFrame:
    """Relabel for a coarser task (e.g. benign vs malignant); a ``None`` target drops the rows.

    Rows whose label is already missing (a broken one-hot row) are kept for validation to
    report. The adapter's label stays in ``source_label``.

    Raises:
        IngestError: a label present in the data that the map does not mention, naming it,
            its count and its first row (a silent fall-through would invent a class).
    """
    frame = frame.copy()
    frame["source_label"] = frame["label"]
    if not label_map:
        return frame
    labelled = frame["label"].notna()
    unmapped = labelled & ~frame["label"].isin(list(label_map))
    if unmapped.any():
        counts = frame.loc[unmapped, "label"].value_counts()
        first = frame.index[unmapped][0]
        missing = ", ".join(f"{label} ({n} images)" for label, n in counts.items())
        raise IngestError(
            f"dataset.label_map does not map {missing}"
            f"; first at manifest row {first} (image_id {frame.at[first, 'image_id']}). "
            "Map every class, or map it to null to drop its images"
        )
    frame.loc[labelled, "label"] = frame.loc[labelled, "label"].map(label_map)
    dropped = labelled & frame["label"].isna()
    return frame[~dropped].reset_index(drop=True)


def label_vocabulary(label_map: dict[str, str | None]) -> list[str] | None:
    """The classes a label map produces (sorted), or None without a map."""
    return sorted({v for v in label_map.values() if v is not None}) if label_map else None


def manifest_summary(frame: pd.DataFrame) -> dict:
    """Counts a person reads first: images, lesions, classes, defects flagged for validation."""
    return {
        "images": int(len(frame)),
        "lesions": int(frame["lesion_id"].nunique()),
        "with_mask": int(frame["mask_path"].notna().sum()),
        "per_class": {str(k): int(v) for k, v in frame["label"].value_counts().items()},
        "file_errors": int(frame["file_error"].notna().sum()),
    }
