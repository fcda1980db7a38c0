"""Ingest: turn a dataset root (ISIC 2019, HAM10000 or class-per-folder) into one manifest.

Adapters only *describe* what they find; they never drop a row. A missing, empty or broken
file becomes a row with ``file_error`` set, a ground-truth row that is not one-hot keeps
``label=None`` with its ``onehot_sum``, and an age that is not a number keeps its text in
``age_text``, so that the validate stage can report every defect of the dataset in one run
instead of the first one only.

What is not a row is still counted, never ignored without a word: image files that no
ground-truth row lists, a missing metadata CSV (which turns lesion grouping off), and which
layout ``layout: auto`` chose and why. These dataset-level facts travel with the manifest in
its parquet metadata (``manifest.attrs["ingest"]``) to the validate stage, which judges them
under the severities in params.yaml, and into ``metrics/ingest.json``.

A CSV that cannot be read (not UTF-8, zero bytes, malformed, missing columns) stops ingest with
a one-line :class:`IngestError` naming the file, the line and the cause.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import io
import os
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from tasks import paths
from tasks.config import DEFAULT_MAX_PIXELS, Params
from tasks.io import write_json, write_parquet
from tasks.labels import HAM_TO_ISIC, ISIC_CLASSES
from tasks.progress import progress_bar
from tasks.stage import console, main

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}
MASK_SUFFIX = "_segmentation"

MANIFEST_COLUMNS = [
    "image_id",  # unique id (ISIC/HAM image id, or the file stem for folder sets)
    "path",  # image path relative to the dataset root (posix)
    "label",  # class name; None when the ground truth is not exactly one class
    "lesion_id",  # lesion the image shows (image_id when the dataset has none)
    "age",  # float years, NaN when unknown (or when age_text holds a non-number)
    "sex",  # male | female | None
    "site",  # anatomical site or None
    "mask_path",  # segmentation mask relative to the root, or None
    "sha256",  # hex digest of the image bytes (None if the file could not be read)
    "width",  # pixels (None if the image did not decode)
    "height",
    "source",  # adapter: isic2019 | isic2018 | ham10000 | ph2 | folder
    "source_label",  # the adapter's label before dataset.label_map (equal to label without one)
    "onehot_sum",  # ISIC ground truth: number of classes marked 1 on the row (None elsewhere)
    "file_error",  # None | missing | empty | not_an_image | truncated | too_large
    "mask_error",  # None | missing | empty | not_an_image | truncated | too_large
    "age_text",  # the age as written when it is not a number (e.g. "abc"), else None
    "mask_width",  # mask pixels in the image's stored orientation (None without a mask)
    "mask_height",
    "mask_foreground",  # share of mask pixels marking the lesion (> 127), None without a mask
    "csv_line",  # line of the ground-truth CSV the row comes from (header = line 1), or None
    "meta_line",  # line of the metadata CSV its age/sex/site come from, or None
]

ISIC_GT = "ISIC_2019_Training_GroundTruth.csv"
# Any part of ISIC 2019 (Training; Test, whose ground truth ISIC released after the challenge),
# with its metadata CSV beside it as ISIC_2019_<Part>_Metadata.csv.
ISIC2019_GT_GLOB = "ISIC_2019_*_GroundTruth.csv"
# ISIC 2018 Task 3 ground truth, one file per part (Training, Validation, Test).
ISIC2018_GT_GLOB = "ISIC2018_Task3_*_GroundTruth.csv"
# The lesion ids ISIC published for the 2018 training part (image, lesion_id, ...).
ISIC2018_GROUPS_GLOB = "ISIC2018_Task3_*_LesionGroupings.csv"
ISIC2018_CLASSES = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
ISIC2018_TO_ISIC = {"AKIEC": "AK"}  # the 2018 AKIEC column is ISIC 2019's AK
# Columns of ISIC's test ground truths that are not classes: the challenge's scoring weight.
ISIC_NOT_CLASSES = ("score_weight",)
ISIC_INPUT = "ISIC_2019_Training_Input"
HAM_META = "HAM10000_metadata.csv"
# Harvard Dataverse's default download of it: tab-separated, quoted, one more column (dataset).
HAM_META_TAB = "HAM10000_metadata.tab"
HAM_META_NAMES = (HAM_META, HAM_META_TAB, "HAM10000_metadata")  # looked for in this order
HAM_PART_PREFIX = "HAM10000_images_part_"
# PH2 as distributed: PH2_dataset.txt ('||' table) + "PH2 Dataset images/<id>/" per case.
PH2_TXT = "PH2_dataset.txt"
PH2_IMAGES = "PH2 Dataset images"
PH2_MASK_FOLDERS = ("lesion", "roi")  # <id>_lesion/ (the lesion mask), <id>_roi/ (colours)
# The txt's Clinical Diagnosis codes; map them to a model's classes with dataset.label_map
# (e.g. common_nevus: NV, atypical_nevus: NV, melanoma: MEL).
PH2_CLASSES = {"0": "common_nevus", "1": "atypical_nevus", "2": "melanoma"}
PH2_COLUMNS = ("histological diagnosis", "clinical diagnosis")  # after Name, any case
MAX_LISTED_FILES = 1000  # unlisted image paths kept in the facts (the count is always exact)
# EXIF orientations 5-8 turn the picture by 90 degrees: prepare swaps width and height.
_TRANSPOSED = {5, 6, 7, 8}
_ORIENTATION_TAG = 0x0112


class IngestError(ValueError):
    """The dataset root cannot be read as any known layout, or one of its CSVs is unreadable."""


# --------------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------------


def choose_layout(root: Path) -> tuple[str, str]:
    """The adapter for ``root`` and the reason, from the files it holds.

    A root that looks like ISIC 2019, HAM10000 or PH2 (their image folders or metadata CSV)
    but lacks the ground-truth file is an error naming that file: read as class-per-folder, an
    ISIC root would pass validation as a one-class set named ``ISIC_2019_Training_Input``.

    Raises:
        IngestError: no known layout, or an ISIC/HAM root without its ground truth.
    """
    isic2019 = sorted(root.glob(ISIC2019_GT_GLOB))
    if isic2019:
        return "isic2019", f"{isic2019[0].name} found at the root"
    isic2018 = _at_root_or_below(root, ISIC2018_GT_GLOB)
    if isic2018:
        where = "at the root" if isic2018[0].parent == root else f"in {isic2018[0].parent.name}/"
        return "isic2018", f"{isic2018[0].name} found {where}"
    for name in HAM_META_NAMES:
        if (root / name).is_file():
            return "ham10000", f"{name} found at the root"
    if (root / PH2_TXT).is_file():
        return "ph2", f"{PH2_TXT} found at the root"
    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    if (root / PH2_IMAGES).is_dir():
        raise IngestError(
            f"{root / PH2_TXT}: missing; the root looks like PH2 ({PH2_IMAGES}) but has no "
            f"{PH2_TXT}. Put it there, or set dataset.layout: folder to read it as "
            "class-per-folder on purpose"
        )
    isic_signs = [p.name for p in entries if p.name.startswith("ISIC_2019_")]
    if isic_signs:
        raise IngestError(
            f"{root / ISIC_GT}: missing; the root looks like ISIC 2019 ({', '.join(isic_signs)}) "
            f"but has no ground-truth CSV. Put {ISIC_GT} there, or set dataset.layout: folder "
            "to read it as class-per-folder on purpose"
        )
    ham_signs = [p.name for p in entries if p.is_dir() and p.name.startswith(HAM_PART_PREFIX)]
    if ham_signs:
        raise IngestError(
            f"{root / HAM_META}: missing; the root looks like HAM10000 ({', '.join(ham_signs)}) "
            f"but has no {HAM_META}. Put it there, or set dataset.layout: folder to read it as "
            "class-per-folder on purpose"
        )
    folders = [p.name for p in entries if p.is_dir()]
    if folders:
        shown = ", ".join(folders[:8]) + (", ..." if len(folders) > 8 else "")
        return "folder", f"no {ISIC_GT} or {HAM_META}; {len(folders)} class folder(s): {shown}"
    raise IngestError(
        f"{root}: no {ISIC_GT}, no {HAM_META} and no class folders; "
        "set dataset.layout or point dataset.root at the dataset"
    )


def _at_root_or_below(root: Path, pattern: str) -> list[Path]:
    """Files matching ``pattern`` at the root, else in its sub-folders (one level).

    ISIC's archives unzip to a folder of their own (``ISIC2018_Task3_Test_GroundTruth/`` holds
    ``ISIC2018_Task3_Test_GroundTruth.csv``), so a root holding the unzipped archives is read
    as it is.
    """
    return sorted(root.glob(pattern)) or sorted(root.glob(f"*/{pattern}"))


def detect_layout(root: Path) -> str:
    """Name the adapter for ``root`` from the files it holds (see :func:`choose_layout`)."""
    return choose_layout(Path(root))[0]


# --------------------------------------------------------------------------------------------
# CSVs
# --------------------------------------------------------------------------------------------


def read_table(
    path: Path, required: Iterable[str], dtype: Any = None, sep: str = ","
) -> pd.DataFrame:
    """Read a dataset CSV, with ``_line`` (its line in the file), or fail naming the file.

    Accepts UTF-8 with or without a byte-order mark (Excel writes one). Every other way a CSV
    can be unreadable is an :class:`IngestError` naming the file and the cause, in one line.

    Raises:
        IngestError: missing, zero bytes, not UTF-8 (with the line of the first bad byte),
            malformed, or without a required column.
    """
    required = list(required)
    text = _read_text(path)
    if not text.strip():
        raise IngestError(
            f"{path}: empty file ({path.stat().st_size} bytes of whitespace at most); expected "
            f"a CSV with a header row ({', '.join(required)}, ...)"
        )
    try:
        frame = pd.read_csv(io.StringIO(text), dtype=dtype, skipinitialspace=True, sep=sep)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise IngestError(f"{path}: not a readable CSV ({reason})") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise IngestError(f"{path}: missing column(s) {missing}; found {list(frame.columns)[:12]}")
    lines = _record_lines(text, sep)
    frame["_line"] = lines if len(lines) == len(frame) else range(2, len(frame) + 2)
    return frame


def _read_text(path: Path) -> str:
    """A dataset table's text, UTF-8 with or without a byte-order mark.

    Raises:
        IngestError: missing, or not UTF-8 (with the line of the first bad byte).
    """
    if not path.is_file():
        raise IngestError(f"{path}: not found")
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise IngestError(
            f"{path}: not UTF-8 text (byte {data[err.start]:#04x} on line {line}; saved as "
            "Latin-1 or Windows-1252?); re-save it as UTF-8"
        ) from None


def _record_lines(text: str, sep: str = ",") -> list[int]:
    """The first line of every data record (quoted fields may span lines; blanks skipped)."""
    reader = csv.reader(io.StringIO(text), delimiter=sep)
    starts: list[int] = []
    previous = 0
    for record in reader:
        start, previous = previous + 1, reader.line_num
        if record and any(field.strip() for field in record):
            starts.append(start)
    return starts[1:]  # the header is not a record


# --------------------------------------------------------------------------------------------
# Adapters
# --------------------------------------------------------------------------------------------


@dataclass
class Adapted:
    """What an adapter read: one row per ground-truth entry, plus facts about the set."""

    frame: pd.DataFrame
    label_csv: str | None = None  # the file csv_line refers to
    meta_csv: str | None = None  # the file meta_line refers to
    metadata: dict[str, Any] | None = None  # {"file", "present", "lesion_ids", "note"}
    other_files: list[str] | None = None  # non-image files the adapter skipped


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


def clean_value(value: object) -> object:
    """Strip a metadata value; empty, NaN and HAM10000's literal ``unknown`` become None."""
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return None
    text = str(value).strip()
    return None if not text or text.lower() == "unknown" else text


def one_hot_rows(
    gt: pd.DataFrame, classes: list[str], gt_path: Path
) -> tuple[np.ndarray, np.ndarray]:
    """The 0/1 matrix of a one-hot ground-truth table and the number of classes set per row.

    Shared by the ISIC 2019 and ISIC 2018 Task 3 layouts, which differ only in their class
    columns. A cell that is not a number stops ingest, naming its file, line and column.
    """
    values = gt[classes].apply(pd.to_numeric, errors="coerce")
    bad = values.isna() & gt[classes].notna()
    if bad.to_numpy().any():
        row, col = np.argwhere(bad.to_numpy())[0]
        raise IngestError(
            f"{gt_path} line {gt['_line'].iat[row]}: column {classes[col]} is "
            f"{gt[classes[col]].iat[row]!r}, not 0 or 1"
        )
    hot = values.fillna(0).to_numpy() >= 0.5
    return hot, hot.sum(axis=1)


def _isic2019_files(root: Path) -> tuple[Path, Path]:
    """The ground-truth CSV of the one ISIC 2019 part at the root, and its metadata CSV's path.

    Raises:
        IngestError: no ground truth, or two parts in one root (they would silently merge).
    """
    found = sorted(root.glob(ISIC2019_GT_GLOB))
    if not found:
        raise IngestError(f"{root / ISIC_GT}: not found")
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise IngestError(
            f"{root}: expected one {ISIC2019_GT_GLOB}, found {names}; "
            "put each part in its own folder"
        )
    part = found[0].name.removeprefix("ISIC_2019_").removesuffix("_GroundTruth.csv")
    return found[0], root / f"ISIC_2019_{part}_Metadata.csv"


def read_isic2019(root: Path) -> Adapted:
    """ISIC 2019: one-hot ground truth + metadata CSV (image, age_approx, site, lesion_id, sex).

    The training part's files (``ISIC_2019_Training_GroundTruth.csv``, ``..._Metadata.csv``)
    or, named the same way, the test part's; one part per root (:func:`_isic2019_files`).
    """
    gt_path, meta_path = _isic2019_files(root)
    gt = read_table(gt_path, ["image"], dtype={"image": str})
    classes = [c for c in gt.columns if c not in ("image", "_line", *ISIC_NOT_CLASSES)]
    unknown = sorted(set(classes) - set(ISIC_CLASSES))
    if unknown or not classes:
        raise IngestError(
            f"{gt_path}: expected columns image + {', '.join(ISIC_CLASSES)}; "
            f"unexpected {unknown or 'no class columns'}"
        )
    hot, sums = one_hot_rows(gt, classes, gt_path)
    labels = [classes[row.argmax()] if s == 1 else None for row, s in zip(hot, sums, strict=True)]
    frame = pd.DataFrame(
        {
            "image_id": gt["image"].astype(str).str.strip(),
            "label": labels,
            "onehot_sum": sums,
            "csv_line": gt["_line"].to_numpy(),
        }
    )
    metadata: dict[str, Any] = {"file": meta_path.name, "present": meta_path.is_file()}
    if meta_path.is_file():
        meta = read_table(meta_path, ["image"], dtype={"image": str, "lesion_id": str, "sex": str})
        meta = meta.rename(
            columns={
                "image": "image_id",
                "age_approx": "age",
                "anatom_site_general": "site",
                "_line": "meta_line",
            }
        )
        meta["image_id"] = meta["image_id"].astype(str).str.strip()
        meta = meta.drop_duplicates("image_id", keep="first")
        keep = [
            c for c in ("image_id", "age", "site", "lesion_id", "sex", "meta_line") if c in meta
        ]
        frame = frame.merge(meta[keep], on="image_id", how="left")
        metadata["lesion_ids"] = "lesion_id" in meta.columns
        if not metadata["lesion_ids"]:
            metadata["note"] = f"{meta_path.name} has no lesion_id column"
    else:
        metadata["lesion_ids"] = False
        metadata["note"] = f"{meta_path} is missing"
    frame["source"] = "isic2019"
    meta_csv = meta_path.name if meta_path.is_file() else None
    return Adapted(frame, gt_path.name, meta_csv, metadata)


def read_ham10000(root: Path) -> Adapted:
    """HAM10000: metadata CSV (lesion_id, image_id, dx, dx_type, age, sex, localization).

    ``HAM10000_metadata.csv``, else Harvard Dataverse's tab-separated ``.tab`` (what its
    download button gives), else the file without an extension.
    """
    meta_path = next((root / n for n in HAM_META_NAMES if (root / n).exists()), root / HAM_META)
    meta = read_table(
        meta_path,
        ["lesion_id", "image_id", "dx"],
        dtype={"lesion_id": str, "image_id": str},
        sep="\t" if meta_path.suffix == ".tab" else ",",
    )
    frame = pd.DataFrame(
        {
            "image_id": meta["image_id"].astype(str).str.strip(),
            # Unknown dx codes keep their raw name so that validation can name them.
            "label": [HAM_TO_ISIC.get(str(d).strip().lower(), str(d)) for d in meta["dx"]],
            "lesion_id": meta["lesion_id"],
            "age": meta.get("age"),
            "sex": meta.get("sex"),
            "site": meta.get("localization"),
            "csv_line": meta["_line"].to_numpy(),
            "meta_line": meta["_line"].to_numpy(),
        }
    )
    frame["source"] = "ham10000"
    metadata = {"file": meta_path.name, "present": True, "lesion_ids": True}
    return Adapted(frame, meta_path.name, meta_path.name, metadata)


def read_folder(root: Path) -> Adapted:
    """Class-per-folder (e.g. MED-NODE melanoma/ naevus/): the folder name is the label.

    Images directly under the root belong to no class and non-image files are no images:
    both are counted (``other_files``, and unlisted images for validation), never read.
    """
    rows, other = [], []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for p in sorted(class_dir.rglob("*")):
            if p.name.startswith(".") or not (p.is_file() or p.is_symlink()):
                continue
            if p.suffix.lower() in IMAGE_SUFFIXES and not p.stem.endswith(MASK_SUFFIX):
                rows.append({"image_id": p.stem, "label": class_dir.name, "path": _rel(p, root)})
            elif p.suffix.lower() not in IMAGE_SUFFIXES:
                other.append(_rel(p, root))
    if not rows:
        raise IngestError(f"{root}: class folders hold no images ({sorted(IMAGE_SUFFIXES)})")
    frame = pd.DataFrame(rows)
    frame["source"] = "folder"
    return Adapted(frame, other_files=other)


def read_isic2018(root: Path) -> Adapted:
    """ISIC 2018 Task 3: ``ISIC2018_Task3_<Part>_GroundTruth.csv``, one-hot over 7 classes.

    The columns are MEL NV BCC AKIEC BKL DF VASC; AKIEC becomes ISIC 2019's AK, so a model
    trained on either vocabulary scores this set. The images (``<image>.jpg``) may sit
    anywhere under the root (the archives nest them in ``..._Input`` folders). The lesion ids
    come from ``ISIC2018_Task3_<Part>_LesionGroupings.csv`` where it is there (ISIC published
    it for the training part, which is HAM10000: about 1.4 images per lesion, so splits
    without it leak lesions); without it every image is its own lesion. Exactly one
    ground-truth file, at the root or in one of its folders (the unzipped archive's): two
    parts in one root would silently merge two sets.

    Raises:
        IngestError: several ground-truth or grouping files, an unexpected column, or a class
            cell that is not a number (naming the file, line and column).
    """
    found = _at_root_or_below(root, ISIC2018_GT_GLOB)
    if len(found) != 1:
        names = ", ".join(_rel(p, root) for p in found) or "none"
        raise IngestError(
            f"{root}: expected one {ISIC2018_GT_GLOB} at the root or in one of its folders, "
            f"found {names}; put each part in its own folder"
        )
    gt_path = found[0]
    gt = read_table(gt_path, ["image"], dtype={"image": str})
    classes = [c for c in gt.columns if c not in ("image", "_line", *ISIC_NOT_CLASSES)]
    if sorted(classes) != sorted(ISIC2018_CLASSES):
        raise IngestError(
            f"{gt_path}: expected columns image + {', '.join(ISIC2018_CLASSES)}; "
            f"found {', '.join(classes) or 'no class columns'}"
        )
    hot, sums = one_hot_rows(gt, classes, gt_path)
    names = [ISIC2018_TO_ISIC.get(c, c) for c in classes]
    frame = pd.DataFrame(
        {
            "image_id": gt["image"].astype(str).str.strip(),
            "label": [
                names[row.argmax()] if n == 1 else None for row, n in zip(hot, sums, strict=True)
            ],
            "onehot_sum": sums,
            "csv_line": gt["_line"].to_numpy(),
        }
    )
    frame["source"] = "isic2018"
    groups = _at_root_or_below(root, ISIC2018_GROUPS_GLOB)
    if len(groups) > 1:
        names = ", ".join(_rel(p, root) for p in groups)
        raise IngestError(f"{root}: expected one {ISIC2018_GROUPS_GLOB} at most, found {names}")
    metadata: dict[str, Any] = {
        "file": None,
        "present": False,
        "lesion_ids": False,
        "note": "ISIC 2018 Task 3 ships no metadata CSV and this root no lesion groupings",
    }
    meta_csv = None
    if groups:
        meta_csv = _rel(groups[0], root)
        table = read_table(
            groups[0], ["image", "lesion_id"], dtype={"image": str, "lesion_id": str}
        )
        table = table.rename(columns={"image": "image_id", "_line": "meta_line"})
        table["image_id"] = table["image_id"].astype(str).str.strip()
        table = table.drop_duplicates("image_id", keep="first")
        frame = frame.merge(
            table[["image_id", "lesion_id", "meta_line"]], on="image_id", how="left"
        )
        metadata = {"file": meta_csv, "present": True, "lesion_ids": True}
    return Adapted(frame, _rel(gt_path, root), meta_csv, metadata)


def read_ph2(root: Path) -> Adapted:
    """PH2 as distributed: ``PH2_dataset.txt`` and one folder per case.

    The txt is a '||'-separated table, not a CSV: a header row (``|| Name || Histological
    Diagnosis || Clinical Diagnosis || ...``), one row per case, then a free-text legend. The
    label is the Clinical Diagnosis code (:data:`PH2_CLASSES`); a case's dermoscopic image is
    ``<id>_Dermoscopic_Image/<id>.bmp`` and its lesion mask ``<id>_lesion/<id>_lesion.bmp``
    (so the localisation scores work on PH2). The case folders' colour-region images are
    neither images nor masks of the set. PH2 has no age, sex or site, and one image per lesion.

    Raises:
        IngestError: the txt is missing, unreadable or has no header row, or a row's Clinical
            Diagnosis is not 0, 1 or 2 (naming the file, line and column).
    """
    path = root / PH2_TXT
    text = _read_text(path)
    header = "|| Name || Histological Diagnosis || Clinical Diagnosis ||"
    rows, seen_header = [], False
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip().startswith("||"):
            continue  # blank lines and the legend below the table
        fields = [" ".join(f.split()) for f in line.strip().split("||")]
        if [f.lower() for f in fields[1:4]] == ["name", *PH2_COLUMNS]:
            seen_header = True
            continue
        if not seen_header:
            raise IngestError(f"{path} line {number}: a table row before the header {header!r}")
        code = fields[3] if len(fields) > 3 else ""
        if code not in PH2_CLASSES:
            raise IngestError(
                f"{path} line {number}: column Clinical Diagnosis is {code!r}, not "
                + ", ".join(f"{k} ({v})" for k, v in PH2_CLASSES.items())
            )
        case = fields[1]
        folder = f"{PH2_IMAGES}/{case}"
        rows.append(
            {
                "image_id": case,
                "label": PH2_CLASSES[code],
                "csv_line": number,
                "path": f"{folder}/{case}_Dermoscopic_Image/{case}.bmp",
                "mask_path": f"{folder}/{case}_lesion/{case}_lesion.bmp",
            }
        )
    if not seen_header:
        raise IngestError(f"{path}: no header row {header!r}; is it PH2's table?")
    if not rows:
        raise IngestError(f"{path}: the table lists no cases")
    frame = pd.DataFrame(rows)
    frame["mask_path"] = [m if (root / m).is_file() else None for m in frame["mask_path"]]
    frame["source"] = "ph2"
    # One image per lesion: the case ids are the lesion ids (grouping is exact, not off).
    metadata = {"file": None, "present": False, "lesion_ids": True}
    return Adapted(frame, PH2_TXT, None, metadata)


ADAPTERS = {
    "isic2019": read_isic2019,
    "isic2018": read_isic2018,
    "ham10000": read_ham10000,
    "ph2": read_ph2,
    "folder": read_folder,
}


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileFacts:
    sha256: str | None
    width: int | None
    height: int | None
    file_error: str | None
    mask_error: str | None
    mask_width: int | None = None
    mask_height: int | None = None
    mask_foreground: float | None = None


_PIXEL_LIMIT_LOCK = threading.Lock()


@contextlib.contextmanager
def _no_pixel_limit() -> Iterator[None]:
    """Let PIL open any header: the size is checked against ``max_pixels`` here instead.

    PIL raises DecompressionBombError from ``Image.open`` above twice its own limit, which
    used to make a valid 14000x14000 JPEG look "truncated".
    """
    with _PIXEL_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def inspect_file(
    image: Path, mask: Path | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> FileFacts:
    """Read an image once: hash its bytes and fully decode them (catches truncation).

    An image above ``max_pixels`` is not decoded (``too_large``); its size comes from the
    header. A mask is decoded too: its size (in the image's stored orientation, EXIF applied
    to both as prepare does) and its share of lesion pixels feed the mask rules.
    """
    sha = width = height = error = None
    transposed = False
    if not image.is_file():
        error = "missing"
    else:
        data = image.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        if not data:
            error = "empty"
        else:
            width, height, error, transposed = _decode(data, max_pixels)
    mask_error = mask_w = mask_h = foreground = None
    if mask is not None:
        if not mask.is_file():
            mask_error = "missing"
        elif not mask.stat().st_size:
            mask_error = "empty"
        else:
            mask_w, mask_h, mask_error, mask_transposed, foreground = _decode_mask(
                mask.read_bytes(), max_pixels
            )
            if mask_w is not None and transposed != mask_transposed:
                mask_w, mask_h = mask_h, mask_w  # aligned only after prepare rotates one
    return FileFacts(sha, width, height, error, mask_error, mask_w, mask_h, foreground)


_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"BM", b"II*\x00", b"MM\x00*", b"GIF8")
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def is_transposed(img: Image.Image) -> bool:
    """Whether the EXIF orientation turns the image by 90 degrees (width and height swap)."""
    try:
        return img.getexif().get(_ORIENTATION_TAG) in _TRANSPOSED
    except Exception:  # noqa: BLE001 - a broken EXIF block is not the image's defect
        return False


def _decode(data: bytes, max_pixels: int) -> tuple[int | None, int | None, str | None, bool]:
    """Decode fully; a broken file with an image signature counts as truncated."""
    with _no_pixel_limit():
        try:
            with Image.open(io.BytesIO(data)) as img:
                w, h = img.size
                turned = is_transposed(img)
                if w * h > max_pixels:
                    return w, h, "too_large", turned
                try:
                    img.load()
                except _DECODE_ERRORS:
                    return w, h, "truncated", turned
                return w, h, None, turned
        except _DECODE_ERRORS:
            return None, None, "truncated" if data.startswith(_MAGIC) else "not_an_image", False


def _decode_mask(
    data: bytes, max_pixels: int
) -> tuple[int | None, int | None, str | None, bool, float | None]:
    """A mask's size, decode error, orientation and share of lesion pixels (> 127)."""
    with _no_pixel_limit():
        try:
            with Image.open(io.BytesIO(data)) as img:
                w, h = img.size
                turned = is_transposed(img)
                if w * h > max_pixels:
                    return w, h, "too_large", turned, None
                try:
                    grey = np.asarray(img.convert("L"))
                except _DECODE_ERRORS:
                    return w, h, "truncated", turned, None
                return w, h, None, turned, float((grey > 127).mean())
        except _DECODE_ERRORS:
            error = "truncated" if data.startswith(_MAGIC) else "not_an_image"
            return None, None, error, False, None


def pixel_limit_problem(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> str | None:
    """The one-line reason an image is refused for its pixel count (header only), or None.

    Files that do not open are left to the decoder, which names their defect.
    """
    try:
        with _no_pixel_limit(), Image.open(path) as img:
            width, height = img.size
    except (*_DECODE_ERRORS, FileNotFoundError):
        return None
    if width * height <= max_pixels:
        return None
    return (
        f"{path}: larger than the decompression-bomb limit ({width}x{height} = "
        f"{width * height} pixels > {max_pixels}; validate.max_pixels)"
    )


def _inspect_pair(pair: tuple[Path, Path | None], max_pixels: int) -> FileFacts:
    return inspect_file(pair[0], pair[1], max_pixels)


def inspect_files(
    pairs: list[tuple[Path, Path | None]],
    workers: int,
    progress: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> list[FileFacts]:
    """Inspect (image, mask) pairs in ``workers`` processes, with a progress bar."""
    chunk = max(1, min(64, len(pairs) // (4 * max(workers, 1)) or 1))
    inspect = functools.partial(_inspect_pair, max_pixels=max_pixels)
    with progress_bar(progress) as bar:
        task = bar.add_task("hashing + decoding images", total=len(pairs))
        results: list[FileFacts] = []
        if workers <= 1 or len(pairs) <= 1:
            for facts in map(inspect, pairs):
                results.append(facts)
                bar.advance(task)
            return results
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for facts in pool.map(inspect, pairs, chunksize=chunk):
                results.append(facts)
                bar.advance(task)
    return results


# --------------------------------------------------------------------------------------------
# The manifest
# --------------------------------------------------------------------------------------------


def _ages(raw: pd.Series) -> tuple[pd.Series, list[str | None]]:
    """Numeric ages, and the text of every given age that is not a number (else None)."""
    numbers = pd.to_numeric(raw, errors="coerce").astype(float)
    texts: list[str | None] = []
    for value, number in zip(raw, numbers, strict=True):
        given = clean_value(value)
        texts.append(str(given) if given is not None and pd.isna(number) else None)
    return numbers, texts


def _unlisted_images(
    images: dict[str, Path], listed: pd.Series, root: Path, layout: str
) -> list[str]:
    """Image files under the root that no ground-truth row names (folder sets: root level)."""
    if layout == "folder":
        return sorted(
            p.name
            for p in root.iterdir()
            if p.is_file()
            and p.suffix.lower() in IMAGE_SUFFIXES
            and not p.name.startswith(".")
            and not p.stem.endswith(MASK_SUFFIX)
        )
    names = set(listed.astype(str))
    if layout == "ph2":  # a listed case's folder also holds its mask and colour regions
        return sorted(
            _rel(path, root)
            for path in images.values()
            if not names.intersection(Path(_rel(path, root)).parts[:-1])
        )
    return sorted(_rel(path, root) for stem, path in images.items() if stem not in names)


def build_manifest(
    root: str | Path,
    layout: str = "auto",
    masks: str | Path | None = None,
    workers: int = 1,
    progress: bool = True,
    label_map: dict[str, str | None] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> pd.DataFrame:
    """Build the manifest of a dataset root (see ``MANIFEST_COLUMNS``).

    Args:
        root: dataset root; manifest paths are relative to it.
        layout: ``auto`` or an adapter name (isic2019, isic2018, ham10000, ph2, folder).
        masks: optional folder of ``<image_id>_segmentation.png``; by default masks are looked
            up anywhere under ``root``.
        workers: processes for hashing and decoding.
        progress: show a progress bar.
        label_map: ``dataset.label_map``: old label -> new label, ``None`` drops the images
            (applied before any file is read, so dropped images cost nothing).
        max_pixels: ``validate.max_pixels``: larger images are flagged ``too_large`` and never
            decoded.

    Returns:
        The manifest; ``manifest.attrs["ingest"]`` holds the dataset-level facts (layout and
        why, unlisted images, metadata presence, CSV names) that validation judges.
    """
    root = Path(root)
    if not root.is_dir():
        raise IngestError(f"{root}: dataset root does not exist or is not a folder")
    if layout == "auto":
        layout, reason = choose_layout(root)
    else:
        reason = "set by dataset.layout"
    if layout not in ADAPTERS:
        raise IngestError(f"unknown layout {layout!r}; choose one of {sorted(ADAPTERS)}")
    adapted = ADAPTERS[layout](root)
    images, mask_index = index_images(root)
    unlisted = _unlisted_images(images, adapted.frame["image_id"], root, layout)
    frame = apply_label_map(adapted.frame, label_map or {})
    if masks is not None:
        if not Path(masks).is_dir():
            raise IngestError(f"{masks}: dataset.masks is not a folder")
        mask_index.update(index_images(Path(masks))[1])

    if "path" not in frame.columns:
        default_dir = {"isic2019": f"{ISIC_INPUT}/", "isic2018": ""}.get(layout, "images/")
        frame["path"] = [
            _rel(images[i], root) if i in images else f"{default_dir}{i}.jpg"
            for i in frame["image_id"]
        ]
    found = [_rel(mask_index.get(i), root) for i in frame["image_id"]]
    given = frame["mask_path"] if "mask_path" in frame.columns else [None] * len(frame)
    frame["mask_path"] = [
        g if isinstance(g, str) and g else f for g, f in zip(given, found, strict=True)
    ]  # an adapter's own mask paths (PH2) come first
    for column in MANIFEST_COLUMNS:
        if column not in frame.columns:
            frame[column] = None
    frame["lesion_id"] = [
        clean_value(lesion) or image
        for lesion, image in zip(frame["lesion_id"], frame["image_id"], strict=True)
    ]
    frame["sex"] = [clean_value(v) for v in frame["sex"]]
    frame["site"] = [clean_value(v) for v in frame["site"]]
    frame["age"], frame["age_text"] = _ages(frame["age"])

    pairs = [
        (root / p, (root / m) if isinstance(m, str) and m else None)
        for p, m in zip(frame["path"], frame["mask_path"], strict=True)
    ]
    facts = inspect_files(pairs, workers=workers, progress=progress, max_pixels=max_pixels)
    for name in FileFacts.__dataclass_fields__:
        frame[name] = [getattr(f, name) for f in facts]
    for name in ("width", "height", "mask_width", "mask_height", "onehot_sum"):
        frame[name] = frame[name].astype("Int64")
    for name in ("csv_line", "meta_line"):
        frame[name] = pd.to_numeric(frame[name], errors="coerce").astype("Int64")
    frame["mask_foreground"] = pd.to_numeric(frame["mask_foreground"]).astype(float)
    out = frame[MANIFEST_COLUMNS].reset_index(drop=True)
    out.attrs["ingest"] = {
        "layout": layout,
        "layout_reason": reason,
        "label_csv": adapted.label_csv,
        "meta_csv": adapted.meta_csv,
        "metadata": adapted.metadata,
        "unlisted_images": {"count": len(unlisted), "paths": unlisted[:MAX_LISTED_FILES]},
        "other_files": {
            "count": len(adapted.other_files or []),
            "paths": (adapted.other_files or [])[:MAX_LISTED_FILES],
        },
    }
    return out


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
        line = frame.at[first, "csv_line"] if "csv_line" in frame.columns else None
        where = f", CSV line {line}" if line is not None and not pd.isna(line) else ""
        raise IngestError(
            f"dataset.label_map does not map {missing}"
            f"; first at manifest row {first} (image_id {frame.at[first, 'image_id']}{where}). "
            "Map every class, or map it to null to drop its images"
        )
    frame.loc[labelled, "label"] = frame.loc[labelled, "label"].map(label_map)
    dropped = labelled & frame["label"].isna()
    return frame[~dropped].reset_index(drop=True)


def label_vocabulary(label_map: dict[str, str | None]) -> list[str] | None:
    """The classes a label map produces (sorted), or None without a map."""
    return sorted({v for v in label_map.values() if v is not None}) if label_map else None


def ingest_facts(frame: pd.DataFrame) -> dict[str, Any]:
    """The dataset-level facts ingest recorded with a manifest ({} for an older manifest)."""
    return dict(frame.attrs.get("ingest") or {})


def manifest_summary(frame: pd.DataFrame) -> dict:
    """Counts a person reads first: images, lesions, classes, defects flagged for validation."""
    facts = ingest_facts(frame)
    metadata = facts.get("metadata") or {}
    return {
        "images": int(len(frame)),
        "lesions": int(frame["lesion_id"].nunique()),
        "with_mask": int(frame["mask_path"].notna().sum()),
        "per_class": {str(k): int(v) for k, v in frame["label"].value_counts().items()},
        "file_errors": int(frame["file_error"].notna().sum()),
        "layout": facts.get("layout"),
        "layout_reason": facts.get("layout_reason"),
        "unlisted_images": int((facts.get("unlisted_images") or {}).get("count", 0)),
        "unlisted_examples": list((facts.get("unlisted_images") or {}).get("paths", []))[:20],
        "other_files": int((facts.get("other_files") or {}).get("count", 0)),
        "other_file_examples": list((facts.get("other_files") or {}).get("paths", []))[:20],
        "lesion_grouping": bool(metadata.get("lesion_ids", False)),
    }


def run(p: Params) -> dict:
    """The ``ingest`` stage: the dataset root through its adapter into the manifest."""
    manifest = build_manifest(
        p.dataset.root,
        p.dataset.layout,
        p.dataset.masks,
        workers=p.ingest.workers,
        label_map=p.dataset.label_map,
        max_pixels=p.validate.max_pixels,
    )
    write_parquet(paths.MANIFEST, manifest)
    summary = manifest_summary(manifest)
    write_json(paths.METRICS / "ingest.json", summary)
    console.print(
        f"ingest: layout {summary['layout']} ({summary['layout_reason']}); "
        f"{summary['images']} images, {summary['lesions']} lesions",
        highlight=False,
    )
    if summary["unlisted_images"]:
        console.print(
            f"ingest: {summary['unlisted_images']} image file(s) have no ground-truth row and "
            "are not in the manifest (rule image_unlisted in the validation report)",
            highlight=False,
        )
    if summary["other_files"]:
        console.print(
            f"ingest: {summary['other_files']} non-image file(s) in the class folders skipped "
            f"(listed in {paths.METRICS / 'ingest.json'})",
            highlight=False,
        )
    return summary


if __name__ == "__main__":
    raise SystemExit(main("ingest"))
