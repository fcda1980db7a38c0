"""Predict: calibrated class probabilities for new image files, from the exported ONNX alone.

The ``.onnx`` written by :mod:`tasks.export` carries everything needed to use it (class order,
input size, normalisation, resize mode, referral threshold), so a prediction needs only the
model file (or its registry URI) and the images: no params.yaml, no bundle, no PyTorch model.
New images go through the very decode path of the prepare stage
(:func:`tasks.prepare.decode_one`: EXIF orientation, RGB conversion, centre crop, bicubic
resize), so the model sees new images exactly as it saw the training cache.

A batch job over a folder of real-world files must not die on the one corrupt JPEG in it: each
unreadable file becomes a row with ``error`` set, and every other file is still scored.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnxruntime as ort
import pandas as pd
from PIL import Image

from tasks.export import INPUT_NAME, OUTPUT_NAMES, decode_metadata, normalize, ort_session
from tasks.ingest import IMAGE_SUFFIXES
from tasks.io import atomic_path
from tasks.prepare import PrepareError, decode_one
from tasks.progress import progress_bar

_URI_SCHEMES = ("models:/", "runs:/")
_REQUIRED = ("classes", "input_size", "normalization")
# Everything a broken or hostile file can raise while being decoded; anything else is a bug.
_DECODE_ERRORS = (PrepareError, OSError, ValueError, SyntaxError, Image.DecompressionBombError)


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
            raise ValueError(
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
                raise ValueError(f"{source}: input_size {size} is not square")
            size = size[0]
        self.input_size = int(size)
        self.mean = [float(m) for m in metadata["normalization"]["mean"]]
        self.std = [float(s) for s in metadata["normalization"]["std"]]
        self.resize = str(metadata.get("resize", "center_crop"))
        threshold = metadata.get("referral_threshold")
        self.referral_threshold = None if threshold is None else float(threshold)

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
        ValueError: the file lacks dermaflow metadata.
    """
    ref = str(model_ref)
    if not ref.startswith(_URI_SCHEMES):
        path = Path(ref)
        if not path.exists():
            raise FileNotFoundError(f"{path}: model file not found")
        return _open(_find_onnx(path, ref), ref, provider)
    import mlflow.artifacts  # only registry refs pay for importing MLflow

    # onnxruntime reads weights (external data included) when the session is created, so the
    # downloaded copy can go as soon as the session exists.
    with tempfile.TemporaryDirectory(prefix="dermaflow-model-") as tmp:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=ref, dst_path=tmp, tracking_uri=tracking_uri, registry_uri=tracking_uri
        )
        return _open(_find_onnx(Path(local), ref), ref, provider)


def _open(path: Path, source: str, provider: str) -> Predictor:
    session, used = ort_session(path, provider)
    metadata = decode_metadata(session.get_modelmeta().custom_metadata_map)
    return Predictor(session, used, metadata, source)


def load_image(path: str | os.PathLike[str], size: int, resize: str = "center_crop") -> np.ndarray:
    """Decode one file exactly as the prepare stage does: uint8 (size, size, 3).

    Raises:
        PrepareError: the file does not decode (its message names the file).
    """
    rgb, _, _ = decode_one(Path(path), None, size, resize)
    return rgb


def preprocess(
    path: str | os.PathLike[str],
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    resize: str = "center_crop",
) -> np.ndarray:
    """One image file -> the model's input, float32 (3, size, size), as training saw it.

    The decode is the prepare stage's (:func:`load_image`) and the normalisation is the
    training one (:func:`tasks.export.normalize`), so there is no second implementation of
    either to drift apart.
    """
    return normalize(load_image(path, size, resize)[None], mean, std)[0]


def _confidence_columns(classes: Sequence[str]) -> list[str]:
    return [f"p_{c}" for c in classes]


def predict_files(
    predictor: Predictor,
    files: Sequence[str | os.PathLike[str]],
    batch_size: int = 32,
    referral_threshold: float | None | Literal["model"] = "model",
    progress: bool = True,
) -> pd.DataFrame:
    """Score image files in batches; one row per file, in the order given.

    Args:
        predictor: from :func:`load_predictor`.
        files: image paths (see :func:`collect_images`).
        batch_size: images per onnxruntime call.
        referral_threshold: refer a case when its confidence is below this; ``"model"`` (the
            default) uses the threshold stored in the model (``predictor.referral_threshold``),
            None turns referral off (``refer`` is NA).
        progress: show a progress bar.

    Returns:
        Columns ``image`` (path as given), ``predicted`` (class), ``confidence`` (its calibrated
        probability), ``p_<class>`` for each class, ``refer`` (nullable bool) and ``error``
        (None, or why the file could not be scored; its other columns are then empty).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
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
                    arrays.append(load_image(f, size, predictor.resize))
                    good.append(row)
                except _DECODE_ERRORS as err:
                    row["error"] = str(err) if isinstance(err, PrepareError) else f"{f}: {err}"
                batch_rows.append(row)
            if arrays:
                _, probs = predictor.predict(normalize(np.stack(arrays), mean, std))
                for row, p in zip(good, probs, strict=True):
                    k = int(p.argmax())
                    row["predicted"] = predictor.classes[k]
                    row["confidence"] = float(p[k])
                    row.update(zip(prob_cols, (float(v) for v in p), strict=True))
                    if threshold is not None:
                        row["refer"] = bool(p[k] < threshold)
            rows.extend(batch_rows)
            bar.advance(task, len(chunk))
    columns = ["image", "predicted", "confidence", *prob_cols, "refer", "error"]
    frame = pd.DataFrame(rows, columns=columns)
    frame = frame.astype({c: "float64" for c in ["confidence", *prob_cols]})
    frame["refer"] = frame["refer"].astype("boolean")
    frame["error"] = frame["error"].astype(object).where(frame["error"].notna(), None)
    return frame


def collect_images(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Expand files and folders into a sorted, de-duplicated list of image files.

    Folders are searched recursively for the image suffixes ingest accepts (any case); hidden
    files and folders are skipped (macOS ``._x.jpg`` resource forks are not images). A file
    named explicitly is kept whatever its suffix: the user asked for it, and if it does not
    decode it gets an error row instead of silently vanishing.

    Raises:
        FileNotFoundError: a path that does not exist (named).
    """
    found: set[Path] = set()
    for p in map(Path, paths):
        if p.is_file():
            found.add(p)
        elif p.is_dir():
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                found.update(
                    Path(dirpath) / name
                    for name in filenames
                    if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES
                )
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    return sorted(found)


def write_csv(frame: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write the predictions table atomically (a crash never leaves half a CSV)."""
    target = Path(path)
    with atomic_path(target) as tmp:
        frame.to_csv(tmp, index=False)
    return target
