"""Predict: calibrated class probabilities for new image files, from the exported ONNX alone.

The ``.onnx`` written by :mod:`tasks.export` carries everything needed to use it (class order,
input size, normalisation, resize mode, referral threshold), so a prediction needs only the
model file (or its registry URI) and the images: no params.yaml, no bundle, no PyTorch model.
New images go through the very decode path of the prepare stage
(:func:`tasks.prepare.decode_one`: EXIF orientation, RGB conversion, centre crop, bicubic
resize), so the model sees new images exactly as it saw the training cache.

A batch job over a folder of real-world files must not die on the one corrupt JPEG in it: each
unreadable file becomes a row with ``error`` set, and every other file is still scored.

Which files get a row is one rule, :func:`scan_inputs`, shared by ``dermaflow predict`` and
``dermaflow explain-batch``: every file passed or found gets exactly one row (a ``notes.txt``
gets an error row whether it was named or found in a folder; a broken symlink gets an error
row under its own name), except segmentation masks (``*_segmentation.png``, which are not
lesion photos) and hidden files (``.DS_Store``, macOS ``._x.jpg``), which are skipped and
counted.

Everything the user controls (the model reference, ``--batch-size``, ``--provider``, the output
path, the ``--metadata`` table) is checked before the first image is decoded:
:func:`run_predict` is the door.

A model trained with a metadata prior (``model.metadata_prior``) reads each patient's age, sex
and site from ``--metadata`` (a CSV keyed by image id, the file name without its suffix, as
HAM10000's and ISIC's metadata files are): the prior's log-odds are added to the graph's
logits and the calibrated probabilities recomputed with the graph's own temperature, as
evaluation scored the model. An image without a row gets the image model's answer alone; the
``metadata`` column says which rows used it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnxruntime as ort
import pandas as pd
from PIL import Image

from tasks.config import DEFAULT_MAX_PIXELS
from tasks.export import INPUT_NAME, OUTPUT_NAMES, decode_metadata, normalize, ort_session
from tasks.fusion import SEXES, has_metadata, prior_from_meta
from tasks.ingest import (
    IMAGE_SUFFIXES,
    MASK_SUFFIX,
    PH2_MASK_FOLDERS,
    clean_value,
    is_transposed,
    pixel_limit_problem,
)
from tasks.io import atomic_path, check_output_file
from tasks.metrics import softmax
from tasks.prepare import PrepareError, decode_one
from tasks.progress import progress_bar

_URI_SCHEMES = ("models:/", "runs:/")
_REQUIRED = ("classes", "input_size", "normalization")
PROVIDER_CHOICES = ("auto", "cuda", "cpu")
# After the class probabilities: the OOD score and flag, the conformal set, the referral.
REFERRAL_COLUMNS = ("ood_score", "ood", "prediction_set", "refer")
# Everything a broken or hostile file can raise while being decoded; anything else is a bug.
_DECODE_ERRORS = (PrepareError, OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class PredictError(ValueError):
    """Bad input to prediction: an unreadable model, an unknown option value, no images."""


class Predictor:
    """An onnxruntime session plus the facts read from the model's own metadata.

    It holds the session (loading a model is the expensive part, so one predictor serves many
    batches) and exposes what preprocessing needs. Build it with :func:`load_predictor`.

    Attributes:
        session: the onnxruntime session.
        provider: the execution provider actually running it.
        source: the model reference it was loaded from (path or ``models:/`` URI).
        metadata: every metadata entry, parsed.
        classes: class names in output order.
        input_size: square side in pixels.
        mean: normalisation mean per channel.
        std: normalisation std per channel.
        resize: ``center_crop`` or ``squash``, as the prepare stage did.
        referral_threshold: confidence below which a case is referred, or None.
    """

    def __init__(
        self,
        session: ort.InferenceSession,
        provider: str,
        metadata: Mapping[str, Any],
        source: str,
    ) -> None:
        missing = [k for k in _REQUIRED if k not in metadata]
        if missing:
            raise PredictError(
                f"{source}: not a dermaflow ONNX model (metadata lacks {missing}); export it "
                "with tasks.export.export_onnx"
            )
        self.session = session
        self.provider = provider
        self.source = source
        self.metadata = dict(metadata)
        self.classes = [str(c) for c in metadata["classes"]]
        size = metadata["input_size"]
        if not isinstance(size, int):
            if len(set(size)) != 1:
                raise PredictError(f"{source}: input_size {size} is not square")
            size = size[0]
        self.input_size = int(size)
        self.mean = [float(m) for m in metadata["normalization"]["mean"]]
        self.std = [float(s) for s in metadata["normalization"]["std"]]
        self.resize = str(metadata.get("resize", "center_crop"))
        self.color_constancy = str(metadata.get("color_constancy", "none"))  # as prepare did
        threshold = metadata.get("referral_threshold")
        self.referral_threshold = None if threshold is None else float(threshold)
        self.ood, self.conformal = guards_from_metadata(metadata, source)
        self.prior = prior_from_meta(metadata)
        self.temperature = np.asarray(metadata.get("temperature", 1.0), dtype=np.float64)

    def __repr__(self) -> str:
        return (
            f"Predictor({self.source!r}, {self.metadata.get('arch')}, classes={self.classes}, "
            f"size={self.input_size}, provider={self.provider})"
        )

    def predict(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Normalised float32 NCHW -> ``(logits, calibrated probabilities)``, both (N, K)."""
        logits, probs = self.session.run(
            list(OUTPUT_NAMES), {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)}
        )
        return logits, probs

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Raw logits -> calibrated probabilities, as the graph computes them (its temperature)."""
        return softmax(np.asarray(logits, dtype=np.float64) / self.temperature).astype(np.float32)


# Columns of a --metadata table: the first name present is used (HAM10000's and ISIC 2019's
# own names included, so their metadata files work as they are).
METADATA_COLUMNS = {
    "image_id": ("image_id", "image"),
    "age": ("age", "age_approx"),
    "sex": ("sex",),
    "site": ("site", "localization", "anatom_site_general"),
}
MAX_AGE = 120


def read_metadata_table(path: str | os.PathLike[str]) -> pd.DataFrame:
    """A ``--metadata`` CSV -> one row per image id (``age``, ``sex``, ``site``).

    Empty cells and HAM10000's ``unknown`` mean "not known". Hand-written (no library checks a
    patient table) so that every bad row is named with its line and rule.

    Raises:
        PredictError: naming the file, and the line and rule of the first bad row: no image id
            column, no age / sex / site column, an image id given twice, an age that is not a
            number in 0-120, a sex other than male or female.
    """
    source = Path(path)
    if not source.is_file():
        raise PredictError(f"--metadata {source}: no such file")
    try:
        raw = pd.read_csv(source, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise PredictError(
            f"--metadata {source}: not a readable CSV ({_first_line(err)})"
        ) from None
    found = {
        key: next((n for n in names if n in raw.columns), None)
        for key, names in METADATA_COLUMNS.items()
    }
    if found["image_id"] is None:
        raise PredictError(f"--metadata {source}: no image_id (or image) column")
    if not any(found[k] for k in ("age", "sex", "site")):
        raise PredictError(
            f"--metadata {source}: no age, sex or site column (site may be named localization "
            "or anatom_site_general, age age_approx)"
        )
    rows: dict[str, dict[str, Any]] = {}
    first: dict[str, int] = {}
    for i, record in enumerate(raw.to_dict("records")):
        line = i + 2  # the header is line 1
        image_id = str(record[found["image_id"]]).strip()
        where = f"--metadata {source} line {line}"
        if not image_id:
            raise PredictError(f"{where}: empty image id")
        if image_id in first:
            raise PredictError(
                f"{where}: image id {image_id} again (first on line {first[image_id]})"
            )
        first[image_id] = line
        values = {k: clean_value(record[c]) if c else None for k, c in found.items()}
        del values["image_id"]
        age = values["age"]
        if age is not None:
            try:
                values["age"] = float(age)
            except ValueError:
                values["age"] = float("nan")
            if not 0 <= values["age"] <= MAX_AGE:
                raise PredictError(f"{where}: age {age!r} is not a number in 0-{MAX_AGE}")
        sex = values["sex"]
        if sex is not None and str(sex).lower() not in SEXES:
            raise PredictError(f"{where}: sex {sex!r} is not male, female or empty")
        rows[image_id] = values
    table = pd.DataFrame.from_dict(rows, orient="index", columns=["age", "sex", "site"])
    table["age"] = pd.to_numeric(table["age"])
    return table


def guards_from_metadata(metadata: Mapping[str, Any], source: str) -> tuple[Any, Any]:
    """The OOD guard and conformal sets stored in a model's metadata (None where absent).

    Models exported before the guard existed have neither; their predictions get no
    ``ood`` flag or ``prediction_set`` (NA), and referral falls back to the confidence rule.

    Raises:
        PredictError: a guard or set entry that is present but unreadable.
    """
    from tasks.conformal import ConformalError, sets_from_dict
    from tasks.ood import OodError, guard_from_dict

    try:
        guard = guard_from_dict(metadata["ood"], f"{source}: ood") if "ood" in metadata else None
        sets = metadata.get("conformal")
        sets = None if sets is None else sets_from_dict(sets, f"{source}: conformal")
    except (OodError, ConformalError) as err:
        raise PredictError(str(err)) from None
    return guard, sets


def referral_columns(
    logits: np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
    threshold: float | None,
    guard: Any,
    sets: Any,
) -> list[dict[str, Any]]:
    """Per image: ``ood_score``, ``ood``, ``prediction_set`` and ``refer``.

    An image is referred when its confidence is below ``threshold``, when the guard flags it
    (whatever its confidence: a confident answer on a photo unlike the training images means
    nothing), or when its conformal set is ambiguous (more than one class, or a malignant class
    that is not the top one). ``refer`` is None only when no rule is available.
    """
    from tasks.conformal import ambiguous, set_labels

    n = len(probs)
    conf = probs.max(axis=1)
    score = guard.scores(logits) if guard is not None else np.full(n, np.nan)
    flag = score > guard.threshold if guard is not None else None
    member = sets.sets(probs) if sets is not None else None
    unsure = ambiguous(member, probs, classes) if member is not None else None
    labels = set_labels(member, classes) if member is not None else [None] * n
    rules = [conf < threshold] if threshold is not None else []
    rules += [r for r in (flag, unsure) if r is not None]
    refer = np.logical_or.reduce(rules) if rules else None
    return [
        {
            "ood_score": float(score[i]),
            "ood": None if flag is None else bool(flag[i]),
            "prediction_set": labels[i],
            "refer": None if refer is None else bool(refer[i]),
        }
        for i in range(n)
    ]


def _find_onnx(path: Path, source: str) -> Path:
    """The model file inside ``path``: itself, ``model.onnx`` (MLflow's layout) or the one .onnx."""
    if path.is_file():
        return path
    if (path / "model.onnx").is_file():
        return path / "model.onnx"
    found = sorted(path.rglob("*.onnx")) if path.is_dir() else []
    if len(found) != 1:
        what = "no .onnx file" if not found else f"{len(found)} .onnx files"
        raise FileNotFoundError(f"{source}: {what} at {path}")
    return found[0]


def load_predictor(
    model_ref: str | os.PathLike[str],
    tracking_uri: str | None = None,
    provider: str = "auto",
) -> Predictor:
    """Open a model for prediction from a local file or the MLflow model registry.

    Args:
        model_ref: a local ``.onnx`` file (or a folder holding ``model.onnx``, e.g. a
            downloaded MLflow model), or ``models:/<name>@<alias>``, ``models:/<name>/<version>``
            or ``runs:/<run_id>/<path>``.
        tracking_uri: MLflow tracking (and registry) URI for ``models:/`` and ``runs:/`` refs;
            None uses MLflow's current one.
        provider: ``auto`` | ``cuda`` | ``cpu`` (see :func:`tasks.export.ort_session`).

    Returns:
        A :class:`Predictor` configured from the model's metadata.

    Raises:
        FileNotFoundError: no such file, or no single ``.onnx`` in the folder / artifact.
        PredictError: an unknown provider; a registry reference that does not resolve; a file
            that is not a readable ONNX model (corrupt, empty, truncated) or lacks dermaflow
            metadata. Each names the model and the cause in one line.
    """
    check_provider(provider)
    ref = str(model_ref)
    if not ref.startswith(_URI_SCHEMES):
        path = Path(ref)
        if not path.exists():
            raise FileNotFoundError(f"{path}: model file not found")
        return _open(_find_onnx(path, ref), ref, provider)
    import mlflow.artifacts  # only registry refs pay for importing MLflow
    from mlflow.exceptions import MlflowException

    # onnxruntime reads weights (external data included) when the session is created, so the
    # downloaded copy can go as soon as the session exists.
    with tempfile.TemporaryDirectory(prefix="dermaflow-model-") as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=ref, dst_path=tmp, tracking_uri=tracking_uri, registry_uri=tracking_uri
            )
        except (MlflowException, OSError) as err:
            store = tracking_uri or mlflow.get_tracking_uri()
            raise PredictError(
                f"{ref}: not found in the MLflow registry at {store} ({_first_line(err)})"
            ) from None
        return _open(_find_onnx(Path(local), ref), ref, provider)


def _first_line(err: BaseException) -> str:
    text = getattr(err, "message", None) or str(err) or type(err).__name__
    return str(text).strip().splitlines()[0][:300]


def check_provider(provider: str) -> str:
    """``--provider`` / ``export.provider`` is one of :data:`PROVIDER_CHOICES`."""
    if provider not in PROVIDER_CHOICES:
        raise PredictError(
            f"--provider {provider!r}: unknown execution provider; choose one of "
            f"{', '.join(PROVIDER_CHOICES)}"
        )
    return provider


def _open(path: Path, source: str, provider: str) -> Predictor:
    if path.stat().st_size == 0:
        raise PredictError(f"{path}: empty file (0 bytes), not an ONNX model; export it again")
    try:
        session, used = ort_session(path, provider)
    except RuntimeError as err:  # cuda asked for, onnxruntime cannot use it
        raise PredictError(_first_line(err)) from None
    except Exception as err:  # noqa: BLE001 - onnxruntime's errors derive from Exception only
        reason = _first_line(err).split("failed:")[-1].strip()
        raise PredictError(
            f"{path}: not a readable ONNX model, corrupt or truncated ({reason}); export it again"
        ) from None
    metadata = decode_metadata(session.get_modelmeta().custom_metadata_map)
    return Predictor(session, used, metadata, source)


def load_image(
    path: str | os.PathLike[str],
    size: int,
    resize: str = "center_crop",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    color: str = "none",
) -> np.ndarray:
    """Decode one file exactly as the prepare stage does: uint8 (size, size, 3).

    ``color`` is the model's colour constancy (bundle extra / ONNX metadata).

    Raises:
        PrepareError: the file does not decode, is a broken link or has more than
            ``max_pixels`` pixels (its message names the file and the cause).
    """
    problem = file_problem(Path(path), max_pixels)
    if problem:
        raise PrepareError(problem)
    rgb, _, _ = decode_one(Path(path), None, size, resize, color)
    return rgb


def preprocess(
    path: str | os.PathLike[str],
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    resize: str = "center_crop",
    color: str = "none",
) -> np.ndarray:
    """One image file -> the model's input, float32 (3, size, size), as training saw it.

    The decode is the prepare stage's (:func:`load_image`) and the normalisation is the
    training one (:func:`tasks.export.normalize`), so there is no second implementation of
    either to drift apart.
    """
    return normalize(load_image(path, size, resize, color=color)[None], mean, std)[0]


def _confidence_columns(classes: Sequence[str]) -> list[str]:
    return [f"p_{c}" for c in classes]


def predict_files(
    predictor: Predictor,
    files: Sequence[str | os.PathLike[str]],
    batch_size: int = 32,
    referral_threshold: float | None | Literal["model"] = "model",
    progress: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    metadata: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Score image files in batches; one row per file, in the order given.

    Args:
        predictor: from :func:`load_predictor`.
        files: image paths (see :func:`collect_images`).
        batch_size: images per onnxruntime call.
        referral_threshold: refer a case when its confidence is below this; ``"model"`` (the
            default) uses the threshold stored in the model (``predictor.referral_threshold``),
            None turns the confidence rule off (``refer`` is NA unless the model also
            carries an OOD guard or conformal sets, whose rules still apply).
        progress: show a progress bar.
        max_pixels: larger images get an error row instead of being decoded
            (``validate.max_pixels``).
        metadata: age, sex and site per image id (:func:`read_metadata_table`), for a model
            with a metadata prior; None scores the images alone.

    Returns:
        Columns ``image`` (path as given), ``predicted`` (class), ``confidence`` (its calibrated
        probability), ``p_<class>`` for each class, ``ood_score`` / ``ood`` (the guard's score
        and flag), ``prediction_set`` (the conformal set, e.g. ``{MEL, NV}``), ``refer``
        (nullable bool; see :func:`referral_columns`), ``metadata`` (True where the metadata
        prior used the image's age, sex or site) and ``error`` (None, or why the file could
        not be scored; its other columns are then empty). Without a guard or sets in the
        model, their columns are NA. The OOD score is the image's alone: the guard was fitted
        on image logits.
    """
    if batch_size < 1:
        raise PredictError(f"--batch-size {batch_size}: must be >= 1")
    threshold = (
        predictor.referral_threshold if referral_threshold == "model" else referral_threshold
    )
    prob_cols = _confidence_columns(predictor.classes)
    rows: list[dict[str, Any]] = []
    size, mean, std = predictor.input_size, predictor.mean, predictor.std
    with progress_bar(progress) as bar:
        task = bar.add_task("predicting", total=len(files))
        for start in range(0, len(files), batch_size):
            chunk = [Path(f) for f in files[start : start + batch_size]]
            batch_rows, good, arrays = [], [], []
            for f in chunk:
                row: dict[str, Any] = {"image": str(f), "error": None}
                try:
                    arrays.append(
                        load_image(f, size, predictor.resize, max_pixels, predictor.color_constancy)
                    )
                    good.append(row)
                except _DECODE_ERRORS as err:
                    row["error"] = str(err) if isinstance(err, PrepareError) else f"{f}: {err}"
                batch_rows.append(row)
            if arrays:
                logits, probs = predictor.predict(normalize(np.stack(arrays), mean, std))
                used = np.zeros(len(good), dtype=bool)
                if predictor.prior is not None and metadata is not None:
                    patients = metadata.reindex([Path(r["image"]).stem for r in good])
                    used = has_metadata(patients)
                    probs = predictor.probabilities(logits + predictor.prior.log_odds(patients))
                extra = referral_columns(
                    logits, probs, predictor.classes, threshold, predictor.ood, predictor.conformal
                )
                for row, p, more, u in zip(good, probs, extra, used, strict=True):
                    row["metadata"] = bool(u)
                    k = int(p.argmax())
                    row["predicted"] = predictor.classes[k]
                    row["confidence"] = float(p[k])
                    row.update(zip(prob_cols, (float(v) for v in p), strict=True))
                    row.update(more)
            rows.extend(batch_rows)
            bar.advance(task, len(chunk))
    columns = [
        "image", "predicted", "confidence", *prob_cols, *REFERRAL_COLUMNS, "metadata", "error"
    ]  # fmt: skip
    frame = pd.DataFrame(rows, columns=columns)
    frame = frame.astype({c: "float64" for c in ["confidence", *prob_cols, "ood_score"]})
    frame["refer"] = frame["refer"].astype("boolean")
    frame["ood"] = frame["ood"].astype("boolean")
    frame["metadata"] = frame["metadata"].astype("boolean")
    frame["error"] = frame["error"].astype(object).where(frame["error"].notna(), None)
    return frame


def file_problem(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> str | None:
    """Why a file gets an error row before any decode (a broken link, too many pixels), or None."""
    if path.is_symlink() and not path.exists():
        return f"{path}: broken symbolic link (its target {os.readlink(path)} does not exist)"
    if path.is_dir():
        return f"{path}: a linked folder, not followed; pass it by name to include its files"
    return pixel_limit_problem(path, max_pixels)


@dataclass
class InputScan:
    """What a list of files and folders holds, by the one rule of :func:`scan_inputs`.

    Attributes:
        files: every file that gets a row, as given or found (never resolved: a symlink keeps
            its own name), sorted and de-duplicated.
        masks: segmentation masks skipped (``*_segmentation.<image suffix>``).
        hidden: hidden files skipped inside folders (``.DS_Store``, ``._x.jpg``, dot folders).
    """

    files: list[Path] = field(default_factory=list)
    masks: list[Path] = field(default_factory=list)
    hidden: list[Path] = field(default_factory=list)

    def skipped(self) -> str:
        """``"2 masks and 1 hidden file skipped"``, or ``""``."""
        parts = []
        if self.masks:
            parts.append(f"{len(self.masks)} mask(s)")
        if self.hidden:
            parts.append(f"{len(self.hidden)} hidden file(s)")
        return f"{' and '.join(parts)} skipped" if parts else ""


def is_mask(path: Path) -> bool:
    """A segmentation mask, not a lesion photo.

    ISIC's ``<id>_segmentation.png``, or an image in one of PH2's per-case mask folders
    (``<id>_lesion/<id>_lesion.bmp``, the colour regions ``<id>_roi/<id>_R1_Label4.bmp``), so
    that a PH2 folder given as is yields its dermoscopic images only.
    """
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return False
    case, _, kind = path.parent.name.rpartition("_")
    in_ph2_mask_folder = bool(case) and kind in PH2_MASK_FOLDERS and path.stem.startswith(case)
    return path.stem.endswith(MASK_SUFFIX) or in_ph2_mask_folder


def match_masks(
    images: Sequence[Path], masks: Sequence[Path]
) -> list[tuple[Path | None, str | None]]:
    """Each image's lesion mask among the ``masks`` a scan skipped: ``(mask, None)``,
    ``(None, None)`` when it has none, or ``(None, problem)`` when several could be it.

    The rules are the layouts the ingest stage reads, first match wins:

    1. PH2: ``<case>_lesion/<case>_lesion.<ext>`` beside the image's ``<case>_Dermoscopic_Image/``;
    2. ISIC: ``<stem>_segmentation.<ext>`` in the image's own folder;
    3. HAM10000: ``<stem>_segmentation.<ext>`` anywhere else under the inputs (its
       ``HAM10000_segmentations/`` folder), when exactly one such file exists.

    Two candidates under one rule (``a_segmentation.png`` and ``.jpg``, or two folders) are a
    problem naming both, never a guess. Paths are compared as absolute paths.
    """
    by_stem: dict[str, list[Path]] = {}
    for m in masks:
        by_stem.setdefault(m.stem.lower(), []).append(Path(os.path.abspath(m)))
    out: list[tuple[Path | None, str | None]] = []
    for image in images:
        image = Path(os.path.abspath(image))
        stem, folder = image.stem.lower(), image.parent
        ph2 = folder.name.lower() == f"{stem}_dermoscopic_image"
        rules = [
            [m for m in by_stem.get(f"{stem}_lesion", []) if m.parent.parent == folder.parent]
            if ph2
            else [],
            [m for m in by_stem.get(stem + MASK_SUFFIX, []) if m.parent == folder],
            [m for m in by_stem.get(stem + MASK_SUFFIX, []) if m.parent != folder],
        ]
        found = next((r for r in rules if r), [])
        if len(found) > 1:
            named = ", ".join(map(str, sorted(found)))
            out.append((None, f"{image}: {len(found)} masks could be its mask ({named})"))
        else:
            out.append((found[0] if found else None, None))
    return out


def load_image_and_mask(
    path: str | os.PathLike[str],
    mask: str | os.PathLike[str],
    size: int,
    resize: str = "center_crop",
    color: str = "none",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    aspect_tolerance: float = 0.02,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`load_image` plus its lesion mask, (size, size) uint8 in {0, 1}, cut the same way.

    The validate stage's mask rule holds: the mask has the image's size (upright), or its
    aspect ratio within ``aspect_tolerance`` (``validate.mask_aspect_tolerance``), since a
    mask of another shape would be cropped to another part of the scene.

    Raises:
        PrepareError: the image or the mask does not decode, is a broken link or too large, or
            the two shapes disagree; the message names the file and the rule.
    """
    path, mask = Path(path), Path(mask)
    for file in (path, mask):
        problem = file_problem(file, max_pixels)
        if problem:
            raise PrepareError(problem)
    try:
        with Image.open(mask) as m:
            mask_w, mask_h = _upright_size(m)
    except _DECODE_ERRORS as err:
        raise PrepareError(f"{mask}: cannot decode the mask ({err})") from err
    try:
        with Image.open(path) as img:
            width, height = _upright_size(img)
    except _DECODE_ERRORS as err:
        raise PrepareError(f"{path}: cannot decode ({err})") from err
    gap = abs((mask_w / mask_h) / (width / height) - 1.0)
    if (mask_w, mask_h) != (width, height) and gap > aspect_tolerance:
        raise PrepareError(
            f"{mask}: mask {mask_w}x{mask_h} px vs image {width}x{height} px: aspect "
            f"{mask_w / mask_h:.3f} vs {width / height:.3f}, more than {aspect_tolerance:g} "
            "apart (validate.mask_aspect_tolerance)"
        )
    try:
        rgb, out, _ = decode_one(path, mask, size, resize, color)
    except PrepareError:
        raise
    except _DECODE_ERRORS as err:  # the mask's pixels (the image's raise PrepareError)
        raise PrepareError(f"{mask}: cannot decode the mask ({err})") from err
    return rgb, out


def _upright_size(img: Image.Image) -> tuple[int, int]:
    """Width and height after the EXIF orientation that :func:`tasks.prepare.to_rgb` applies."""
    width, height = img.size
    return (height, width) if is_transposed(img) else (width, height)


def scan_inputs(paths: Iterable[str | os.PathLike[str]]) -> InputScan:
    """Apply the one input rule to files and folders (see the module docstring).

    Every file named or found in a folder (recursively, whatever its suffix) gets exactly one
    row, except masks (skipped, counted, whether named or found) and hidden entries inside a
    folder (skipped, counted). A symlink, even a broken one, is a file under its own name.

    Raises:
        FileNotFoundError: a path that does not exist (named).
    """
    scan = InputScan()
    seen: set[str] = set()

    def take(path: Path, hidden: bool = False) -> None:
        key = os.path.abspath(path)
        if key in seen:
            return
        seen.add(key)
        if is_mask(path):
            scan.masks.append(path)
        elif hidden:
            scan.hidden.append(path)
        else:
            scan.files.append(path)

    for p in map(Path, paths):
        if p.is_dir():
            for dirpath, dirnames, filenames in os.walk(p):
                inside = Path(dirpath)
                for d in dirnames:
                    if (inside / d).is_symlink() or d.startswith("."):
                        take(inside / d, hidden=d.startswith("."))
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                dirnames[:] = [d for d in dirnames if not (inside / d).is_symlink()]
                for name in sorted(filenames):
                    take(inside / name, hidden=name.startswith("."))
        elif p.is_file() or p.is_symlink():
            take(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    scan.files.sort()
    return scan


def collect_images(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """The files that get a row: :func:`scan_inputs` without the skipped masks and hidden files.

    Raises:
        FileNotFoundError: a path that does not exist (named).
    """
    return scan_inputs(paths).files


@dataclass
class PredictRun:
    """What :func:`run_predict` did: the table, the CSV written and what was skipped."""

    frame: pd.DataFrame
    out: Path
    scan: InputScan
    provider: str
    prior: bool = False  # the model carries a metadata prior

    def summary(self) -> str:
        bad = int(self.frame["error"].notna().sum())
        referred = int(self.frame["refer"].fillna(False).astype(bool).sum())
        skipped = self.scan.skipped()
        used = int(self.frame["metadata"].fillna(False).astype(bool).sum())
        prior = (
            f"; age, sex or site used for {used} of {len(self.frame) - bad}" if self.prior else ""
        )
        return (
            f"predict: {len(self.frame) - bad} images scored, {bad} unreadable (error rows), "
            f"{referred} to refer to a dermatologist"
            + prior
            + (f"; {skipped}" if skipped else "")
            + f" -> {self.out} ({self.provider})"
        )


def run_predict(
    inputs: Sequence[str | os.PathLike[str]],
    model: str,
    out: str | os.PathLike[str],
    batch_size: int = 32,
    provider: str = "auto",
    progress: bool = True,
    metadata: str | os.PathLike[str] | None = None,
) -> PredictRun:
    """``dermaflow predict``: check every option and the output path, then score and write.

    Nothing is decoded before the options, the output path, the inputs and the model are
    known to be usable, so a typo costs a second, not a batch job.

    Raises:
        PredictError, FileNotFoundError, tasks.io.OutputPathError: naming the culprit.
    """
    if batch_size < 1:
        raise PredictError(f"--batch-size {batch_size}: must be >= 1")
    check_provider(provider)
    out = check_output_file(out, "-o/--out CSV")
    scan = scan_inputs(inputs)
    if not scan.files:
        skipped = scan.skipped()
        raise PredictError(
            f"no image files under {', '.join(map(str, inputs))}"
            + (f" ({skipped})" if skipped else "")
        )
    uri = None
    if str(model).startswith(_URI_SCHEMES):
        from tasks import tracking

        uri = tracking.configure()  # the registry resolves aliases through the global URI
    patients = None if metadata is None else read_metadata_table(metadata)
    predictor = load_predictor(model, tracking_uri=uri, provider=provider)
    if patients is not None and predictor.prior is None:
        raise PredictError(
            f"--metadata {metadata}: {model} carries no metadata prior (it was trained with "
            "model.metadata_prior: false), so age, sex and site cannot change its answer; "
            "leave --metadata out"
        )
    frame = predict_files(
        predictor, scan.files, batch_size=batch_size, progress=progress, metadata=patients
    )
    write_csv(frame, out)
    return PredictRun(frame, Path(out), scan, predictor.provider, predictor.prior is not None)


def write_csv(frame: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write the predictions table atomically (a crash never leaves half a CSV)."""
    target = Path(path)
    with atomic_path(target) as tmp:
        frame.to_csv(tmp, index=False)
    return target
