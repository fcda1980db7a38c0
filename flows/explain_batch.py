"""Explain-batch: predict and explain NEW images with a trained classifier, as a Prefect flow.

The explain stage studies a sample of the test split; this flow is its counterpart for images
the model has never seen (a clinic's folder, a new archive). It cuts the files into chunks and
runs one Prefect task per chunk (decode, calibrated prediction, explanations), so the work fans
out over the task runner: threads locally, a Dask cluster with ``dask_address``. The chunks
write the explain stage's per-image outputs into a staging folder that replaces ``out_dir``
atomically, and the flow logs them to an MLflow run of its own, tagged with the model version.

``out_dir`` holds ``heatmaps.npz`` (float16, keys ``<image_id>__<method>__<layer>``),
``overlays/*.png``, ``explanations.{parquet,csv}`` (a row per image x method x layer with the
sentence, plus an error row per unreadable file), ``predictions.csv`` (a row per file, as
``dermaflow predict`` writes it), ``summary.json``, ``config.json`` and ``gallery.html``.

Choices:

- Of the faithfulness metrics only Average Drop and Increase in Confidence are kept (one extra
  forward pass per map); deletion/insertion AUC and ROAD cost tens of passes per map and stay
  in the explain stage.
- Lesion masks that come with the images are used, by the layouts ingest reads
  (:func:`tasks.predict.match_masks`: PH2's ``<case>_lesion/``, ISIC's ``<id>_segmentation``
  beside the image, HAM10000's ``HAM10000_segmentations/`` under the inputs). An image with a
  mask gets the explain stage's localisation scores (pointing game, energy pointing game: the
  share of the map inside the lesion, IoU of the top ``top_k_percent``) and the outside flag of
  its sentence; its overlay of the input outlines the lesion. A mask that does not
  decode, or whose shape disagrees with its image (the validate stage's rule), turns the file
  into an error row naming the mask: a score against the wrong region would look valid.
- Every method explains every image: the Score-CAM/LIME budgets of ``explain`` are for its
  test sample, not for a batch job, so choose ``methods`` for the volume at hand.
- The explained class is the predicted one (new images have no truth), unless
  ``explain.target`` names a class.
- Calibration, first found: the ``temperature`` argument; the calibrator of the model's own
  lineage (``calibrate/calibrator.json`` in the registered version's MLflow run, or
  ``reports/calibrate/calibrator.json`` for the pipeline's ``models/model.pt``); else the
  bundle's temperature (1.0 as train writes it). The referral threshold comes with the
  lineage calibrator only.
- Images decode as the prepare stage did, with ``prepare.resize`` from params.yaml (the bundle
  does not record it).
- Tasks receive the model's reference (a path or ``runs:/`` URI), never the nn.Module: a Dask
  worker cannot share the flow's memory. A registry bundle is downloaded once per process and
  every chunk builds its own model, since CAM hooks on a module shared by concurrent threads
  would mix. A multi-machine cluster needs the inputs and ``out_dir`` on a shared filesystem.
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import json
import shutil
import tempfile
import threading
import time
import zipfile
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from tasks import paths
from tasks.config import ConfigError, ExplainConfig, flatten, load_params
from tasks.gallery import write_gallery
from tasks.io import atomic_dir, write_json
from tasks.labels import full_name

if TYPE_CHECKING:
    import torch

# torch, MLflow, Captum and onnxruntime are imported where they are used: flows/cli.py imports
# this module for its command, and `dermaflow --help` must not pay seconds for them.

BUNDLE_ARTIFACT = "bundle/model.pt"  # where the train stage logs the bundle in its run
CALIBRATOR_ARTIFACT = "calibrate/calibrator.json"
BUNDLE, OUT_DIR = str(paths.BUNDLE), Path("reports/explain_batch")
TABLE = ["image_id", "image", "method", "layer", "predicted", "confidence", "target"]
TABLE += ["average_drop", "increase_in_confidence", "location", "area_percent", "text", "error"]
TABLE += ["mask", "pointing_game", "energy_pointing_game", "iou", "outside_flag"]
LOCALISATION = ["pointing_game", "energy_pointing_game", "iou"]


class ExplainBatchError(RuntimeError):
    """No images, or a model that cannot be found or loaded: the job cannot start."""


@dataclasses.dataclass(frozen=True)
class ModelRef:
    """A model as the user named it and where its bundle is (a path or a ``runs:/`` URI)."""

    source: str
    bundle: str
    name: str | None = None
    version: str | None = None
    alias: str | None = None
    run_id: str | None = None


@dataclasses.dataclass(frozen=True)
class BatchResult:
    """What the flow returns: the written folder, its two tables, the summary, the MLflow run."""

    out_dir: Path
    table: pd.DataFrame
    predictions: pd.DataFrame
    summary: dict[str, Any]
    mlflow_run_id: str


def find_images(inputs: list[str]) -> list[Path]:
    """The files under ``inputs`` that get a row, as absolute paths (a Dask worker has another cwd).

    The rule is ``dermaflow predict``'s (:func:`tasks.predict.scan_inputs`): every file named or
    found gets one row, masks and hidden files are skipped and counted. Paths are made absolute
    without resolving symlinks, so a broken link's error row carries the link's own name.
    """
    return [image for image, _, _ in find_items(inputs)]


def find_items(inputs: list[str]) -> list[tuple[Path, Path | None, str | None]]:
    """:func:`find_images`, each with its lesion mask among the skipped masks, or None, and
    the problem that stops the pairing (several candidates), or None
    (:func:`tasks.predict.match_masks`)."""
    import os

    from tasks.predict import match_masks, scan_inputs

    scan = scan_inputs(inputs)
    skipped = scan.skipped()
    if not scan.files:
        more = f" ({skipped})" if skipped else ""
        raise ExplainBatchError(f"no image files under {', '.join(map(str, inputs))}{more}")
    if skipped and tuple(inputs) not in _ANNOUNCED:  # the flow looks again: say it once
        _ANNOUNCED.add(tuple(inputs))
        print(f"explain-batch: {len(scan.files)} file(s) to explain; {skipped}", flush=True)
    files = [Path(os.path.abspath(f)) for f in scan.files]
    pairs = match_masks(files, scan.masks)
    return [(f, m, problem) for f, (m, problem) in zip(files, pairs, strict=True)]


_ANNOUNCED: set[tuple[str, ...]] = set()


def resolve_model(model: str, tracking_uri: str) -> ModelRef:
    """Pin ``models:/<name>@<alias>`` (or ``/<version>``) to one version's run, once per job.

    Resolving the alias in the flow, not in each task, means every chunk explains with the
    same version even if the alias moves while the job runs.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    if not model.startswith("models:/"):
        path = Path(model).resolve()
        if not path.is_file():
            raise ExplainBatchError(f"{model}: model bundle not found")
        return ModelRef(model, str(path))
    name, at, alias = model.removeprefix("models:/").partition("@")
    version = None
    if not at:
        name, _, version = name.rpartition("/")
    if not name or not (alias or version):
        raise ExplainBatchError(f"{model}: use models:/<name>@<alias> or models:/<name>/<version>")
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    try:
        mv = (
            client.get_model_version_by_alias(name, alias)
            if at
            else client.get_model_version(name, version)
        )
    except MlflowException as err:
        raise ExplainBatchError(f"{model}: not found in the registry ({err.message})") from None
    if not any(a.path == BUNDLE_ARTIFACT for a in client.list_artifacts(mv.run_id, "bundle")):
        raise ExplainBatchError(
            f"{model}: run {mv.run_id} of version {mv.version} has no {BUNDLE_ARTIFACT} "
            "artifact (the train stage logs it beside the model)"
        )
    uri = f"runs:/{mv.run_id}/{BUNDLE_ARTIFACT}"
    return ModelRef(model, uri, name, str(mv.version), alias or None, mv.run_id)


_DOWNLOADS: dict[tuple[str, str | None], Path] = {}
_DOWNLOAD_LOCK = threading.Lock()


def bundle_file(bundle: str, tracking_uri: str | None) -> Path:
    """The bundle as a local file; a ``runs:/`` artifact is downloaded once per process."""
    if not bundle.startswith("runs:/"):
        return Path(bundle)
    import mlflow.artifacts

    with _DOWNLOAD_LOCK:
        if (bundle, tracking_uri) not in _DOWNLOADS:
            dst = tempfile.mkdtemp(prefix="dermaflow-bundle-")
            atexit.register(shutil.rmtree, dst, True)
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=bundle, dst_path=dst, tracking_uri=tracking_uri
            )
            _DOWNLOADS[(bundle, tracking_uri)] = Path(local)
        return _DOWNLOADS[(bundle, tracking_uri)]


def open_model(model: str, tracking_uri: str) -> tuple[ModelRef, dict[str, Any]]:
    """Resolve and load the model once, so a bad reference fails before any chunk starts."""
    from mlflow.exceptions import MlflowException

    from tasks.models import load_bundle

    ref = resolve_model(model, tracking_uri)
    try:
        _, meta = load_bundle(bundle_file(ref.bundle, tracking_uri))
    except (OSError, ValueError, MlflowException) as err:
        raise ExplainBatchError(f"{model}: cannot load the model bundle ({err})") from None
    return ref, meta


def resolve_calibration(
    ref: ModelRef, meta: dict[str, Any], temperature: float | None, tracking_uri: str
) -> dict[str, Any]:
    """The calibrator (as ``calibrator.json`` holds it), its source and referral threshold."""
    import mlflow.artifacts
    from mlflow.tracking import MlflowClient

    def found(calibrator: dict, source: str, threshold: float | None = None) -> dict[str, Any]:
        return {"calibrator": calibrator, "source": source, "referral_threshold": threshold}

    if temperature is not None:
        return found({"method": "temperature", "temperature": temperature}, "temperature arg")
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    if ref.run_id and any(
        a.path == CALIBRATOR_ARTIFACT for a in client.list_artifacts(ref.run_id, "calibrate")
    ):
        uri = f"runs:/{ref.run_id}/{CALIBRATOR_ARTIFACT}"
        with tempfile.TemporaryDirectory() as tmp:
            local = mlflow.artifacts.download_artifacts(
                uri, dst_path=tmp, tracking_uri=tracking_uri
            )
            calibrator = json.loads(Path(local).read_text())
        return found(
            calibrator, uri, client.get_run(ref.run_id).data.metrics.get("referral_threshold")
        )
    local, metrics = paths.CALIBRATION / "calibrator.json", paths.METRICS / "calibrate.json"
    if not ref.run_id and Path(ref.bundle) == paths.BUNDLE.resolve() and local.is_file():
        threshold = json.loads(metrics.read_text()) if metrics.is_file() else {}
        return found(json.loads(local.read_text()), str(local), threshold.get("referral_threshold"))
    bundled = float(meta.get("temperature", 1.0))
    return found({"method": "temperature", "temperature": bundled}, "bundle temperature")


def resolve_guards(ref: ModelRef, tracking_uri: str) -> dict[str, Any]:
    """The OOD guard and conformal sets of the model's lineage (``ood`` / ``conformal``: None
    where the run or the project has none): the run's ``ood_guard`` and ``conformal_sets``
    artifacts, or ``models/ood.json`` and ``models/conformal.json`` beside the local bundle."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    from tasks.conformal import SETS_FILE
    from tasks.ood import GUARD_FILE

    found: dict[str, Any] = {"ood": None, "conformal": None}
    for key, local, artifact in (
        ("ood", GUARD_FILE, "ood_guard/ood.json"),
        ("conformal", SETS_FILE, "conformal_sets/conformal.json"),
    ):
        if ref.run_id:
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    got = mlflow.artifacts.download_artifacts(
                        f"runs:/{ref.run_id}/{artifact}", dst_path=tmp, tracking_uri=tracking_uri
                    )
                    found[key] = json.loads(Path(got).read_text())
                except (MlflowException, OSError):
                    pass  # a run from before the guard existed: no flag, no set
        elif Path(ref.bundle) == paths.BUNDLE.resolve() and local.is_file():
            found[key] = json.loads(local.read_text())
    return found


def image_ids(files: list[Path]) -> list[str]:
    """File stems, made unique across folders with a short hash of the path where they clash."""
    counts = Counter(f.stem for f in files)
    digest = lambda f: hashlib.sha1(str(f).encode()).hexdigest()[:8]  # noqa: E731
    return [f.stem if counts[f.stem] == 1 else f"{f.stem}-{digest(f)}" for f in files]


def explain_images(
    model: torch.nn.Module,
    meta: dict[str, Any],
    raw: np.ndarray,
    calibrator: dict[str, Any],
    cfg: ExplainConfig,
    masks: np.ndarray | None = None,
    prior_term: np.ndarray | None = None,
) -> tuple[
    np.ndarray, np.ndarray, dict[tuple[str, str | None], np.ndarray], pd.DataFrame, np.ndarray
]:
    """Calibrated probabilities, explained classes, per (method, layer) maps and their scores,
    and the probabilities from the image alone.

    ``prior_term``: the metadata prior's log-odds per image (a model trained with one, given
    ``--metadata``), added to the logits before calibration, as evaluate and predict do; the
    maps stay the image model's own.

    A pure function of decoded uint8 images (N, H, W, 3) and optional lesion masks (N, H, W),
    all-zero for an image without one: the explanation engine (:func:`tasks.engine.explain`)
    computes the maps, Average Drop / Increase in Confidence (one extra forward pass per map)
    and, where there is a mask, the localisation scores; this only predicts and picks the
    explained class.
    """
    import torch

    from tasks import engine
    from tasks.calibrate import calibrator_from_dict
    from tasks.export import normalize
    from tasks.models import with_tta

    mean, std = meta["normalization"]["mean"], meta["normalization"]["std"]
    x = torch.from_numpy(normalize(raw, mean, std)).to(next(model.parameters()).device)
    with torch.no_grad():  # the bundle's train.tta, as calibrated, evaluated and exported
        logits = with_tta(model, (meta.get("extra") or {}).get("tta"))(x).float().cpu().numpy()
    calibrate = calibrator_from_dict(calibrator).probabilities
    image_only = calibrate(logits)
    probs = image_only if prior_term is None else calibrate(logits + prior_term)
    classes = list(meta["classes"])
    targets = probs.argmax(axis=1)
    if cfg.target in classes:
        targets = np.full(len(raw), classes.index(cfg.target))
    result = engine.explain(
        model,
        meta["arch"],
        x,
        targets,
        engine.plan(cfg.methods, cfg.layers, meta["arch"]),
        options=engine.options(cfg, mean, std),
        scores=("average_drop", "localisation") if masks is not None else ("average_drop",),
        masks=masks,
        top_k_percent=cfg.top_k_percent,
    )
    return probs, targets, result.maps, result.table, image_only


def guard_referral(
    model: torch.nn.Module,
    meta: dict[str, Any],
    images: dict[str, np.ndarray],
    probs: np.ndarray,
    calibration: dict[str, Any],
) -> list[dict[str, Any]]:
    """Per image: OOD score and flag, conformal set and referral, by predict's rule
    (:func:`tasks.predict.referral_columns`); the guard needs the logits, one more forward."""
    from tasks.conformal import sets_from_dict
    from tasks.models import with_tta
    from tasks.ood import guard_from_dict, model_logits
    from tasks.predict import referral_columns

    guard, sets = calibration.get("ood"), calibration.get("conformal")
    guard = None if guard is None else guard_from_dict(guard, "ood guard")
    sets = None if sets is None else sets_from_dict(sets, "conformal sets")
    norm = meta["normalization"]
    tta = with_tta(model, (meta.get("extra") or {}).get("tta"))
    raw = np.stack(list(images.values()))
    logits = model_logits(tta, raw, norm["mean"], norm["std"]) if guard else probs
    threshold = calibration["referral_threshold"]
    return referral_columns(logits, probs, list(meta["classes"]), threshold, guard, sets)


@task(name="explain-chunk", cache_policy=NO_CACHE)  # it writes files: never skip it from cache
def explain_chunk(
    items: list[tuple[str, str]],
    index: int,
    bundle: str,
    tracking_uri: str | None,
    calibration: dict[str, Any],
    cfg: ExplainConfig,
    resize: str,
    staging: str,
    aspect_tolerance: float = 0.02,
    patients: dict[str, dict[str, Any]] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Decode, predict and explain one chunk of ``(path, image_id, mask, mask problem)``; write
    its files (``aspect_tolerance``: ``validate.mask_aspect_tolerance``; ``patients``: age, sex
    and site by file stem, for a model with a metadata prior).

    Overlays go to ``staging/overlays``, the heatmaps to a shard ``staging/_shards/<index>.npz``
    that the flow merges. An unreadable file becomes an error row; the rest still run.

    Returns:
        ``rows`` (the explanations table) and ``predictions`` (one per file), in file order.
    """
    import torch

    from tasks.explain_text import describe_heatmap, explain_text, metadata_text
    from tasks.fusion import has_metadata, prior_from_meta
    from tasks.gallery import outline, overlay, overlay_name, save_png
    from tasks.models import load_bundle
    from tasks.predict import _DECODE_ERRORS, load_image, load_image_and_mask
    from tasks.prepare import PrepareError

    model, meta = load_bundle(bundle_file(bundle, tracking_uri))
    model.to("cuda" if torch.cuda.is_available() else "cpu")  # the worker's hardware decides
    size = meta["input_size"] if isinstance(meta["input_size"], int) else meta["input_size"][0]
    images, masks, errors = {}, {}, {}
    color = (meta.get("extra") or {}).get("color_constancy", "none")  # as trained
    for path, image_id, mask, problem in items:
        try:
            if problem:
                raise PrepareError(problem)
            if mask is None:
                images[image_id] = load_image(path, size, resize, color=color)
            else:
                images[image_id], masks[image_id] = load_image_and_mask(
                    path, mask, size, resize, color, aspect_tolerance=aspect_tolerance
                )
        except _DECODE_ERRORS as err:
            errors[image_id] = str(err) if isinstance(err, PrepareError) else f"{path}: {err}"
    empty = np.zeros((size, size), dtype=np.uint8)
    lesions = np.stack([masks.get(i, empty) for i in images]) if masks else None
    prior = prior_from_meta(meta.get("extra")) if patients is not None else None
    stems = {image_id: Path(path).stem for path, image_id, _, _ in items}
    rows_of = pd.DataFrame(
        [(patients or {}).get(stems[i], {}) for i in images], columns=["age", "sex", "site"]
    )
    used = has_metadata(rows_of) if prior is not None else np.zeros(len(images), dtype=bool)
    term = None if prior is None or not images else prior.log_odds(rows_of)
    probs, targets, maps, scores, alone = (
        explain_images(
            model,
            meta,
            np.stack(list(images.values())),
            calibration["calibrator"],
            cfg,
            lesions,
            term,
        )  # fmt: skip
        if images
        else (None, None, {}, None, None)
    )
    out, classes = Path(staging), meta["classes"]
    referral = guard_referral(model, meta, images, probs, calibration) if images else []
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    (out / "_shards").mkdir(exist_ok=True)
    rows, predictions, arrays, scale = [], [], {}, max(1, 256 // size)
    position = {image_id: i for i, image_id in enumerate(images)}
    drops = {} if scores is None else {(r.method, r.layer, r.index): r for r in scores.itertuples()}
    for path, image_id, mask, _ in items:
        if image_id in errors:
            rows.append({"image_id": image_id, "image": path, "error": errors[image_id]})
            predictions.append(rows[-1].copy())
            continue
        i, raw = position[image_id], images[image_id]
        k = int(probs[i].argmax())
        head = {"image_id": image_id, "image": path, "predicted": classes[k]}
        head["confidence"] = float(probs[i, k])
        probabilities = {f"p_{c}": float(p) for c, p in zip(classes, probs[i], strict=True)}
        said = ""
        if used[i]:
            patient = rows_of.iloc[i]
            said = " " + metadata_text(
                classes[k], float(alone[i, k]), head["confidence"],
                patient["age"], patient["sex"], patient["site"],
            )  # fmt: skip
        predictions.append(
            {**head, **probabilities, **referral[i], "metadata": bool(used[i]), "error": None}
        )
        lesion = masks.get(image_id)
        picture = raw if lesion is None else outline(raw, lesion)
        save_png(picture, out / "overlays" / f"{image_id}.png", scale)
        for (method, layer), heat in maps.items():
            name = overlay_name(image_id, method, layer)
            arrays[name] = heat[i].astype(np.float16)
            save_png(overlay(raw, heat[i]), out / "overlays" / f"{name}.png", scale)
            facts = describe_heatmap(heat[i], lesion)
            score = drops[(method, layer or "input", i)]._asdict()
            rows.append(
                {**head, "method": method, "layer": layer or "input"}
                | {"target": classes[targets[i]], "average_drop": score["average_drop"]}
                | {"increase_in_confidence": score["increase_in_confidence"]}
                | {"location": facts["location"], "area_percent": facts["area_percent"]}
                | {"text": explain_text(classes[k], head["confidence"], facts) + said}
                | {"error": None}
                | {"mask": None if mask is None else str(mask)}
                | {key: score.get(key) for key in LOCALISATION}
                | {"outside_flag": None if lesion is None else facts["outside_flag"]}
            )
    np.savez_compressed(out / "_shards" / f"{index:06d}.npz", **arrays)
    return {"rows": rows, "predictions": predictions}


def merge_shards(shards: list[Path], target: Path) -> None:
    """Join the chunks' ``.npz`` shards into one, an array at a time (memory stays flat)."""
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as merged:
        for shard in shards:
            with zipfile.ZipFile(shard) as part:
                for name in part.namelist():
                    merged.writestr(name, part.read(name))


def write_batch_gallery(path: Path, table: pd.DataFrame, layer: str) -> None:
    """The gallery (:func:`tasks.gallery.write_gallery`): per image, the input, every method's
    overlay at ``layer`` and the text; unreadable files are listed below."""
    write_gallery(
        path,
        table[table["error"].isna()],
        layer,
        heading=f"Explanations of new images ({layer} layer)",
        caption=lambda first: [
            str(first["image_id"]),
            f"{full_name(first['predicted'])} ({first['confidence']:.0%})",
        ],
        errors=[str(e) for e in table["error"].dropna()],
        title="dermaflow explain-batch",
    )


def write_outputs(
    tmp: Path, results: list[dict], classes: list[str], cfg: ExplainConfig
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """Gather the chunks into the job's tables, ``heatmaps.npz`` and gallery; summarise."""
    merge_shards(sorted((tmp / "_shards").glob("*.npz")), tmp / "heatmaps.npz")
    shutil.rmtree(tmp / "_shards")
    table = pd.DataFrame([r for res in results for r in res["rows"]], columns=TABLE)
    columns = ["image_id", "image", "predicted", "confidence", *[f"p_{c}" for c in classes]]
    columns += ["ood_score", "ood", "prediction_set", "refer", "metadata", "error"]
    preds = pd.DataFrame([r for res in results for r in res["predictions"]], columns=columns)
    table.to_parquet(tmp / "explanations.parquet", index=False)
    table.to_csv(tmp / "explanations.csv", index=False)
    preds.to_csv(tmp / "predictions.csv", index=False)
    layer = "deep" if "deep" in cfg.layers else cfg.layers[-1]
    write_batch_gallery(tmp / "gallery.html", table, layer)
    faith = table.dropna(subset=["method"]).groupby(["method", "layer"], sort=False)
    faith = faith[["average_drop", "increase_in_confidence"]].mean().reset_index()
    located = table.dropna(subset=["method", "mask"])
    located = located.astype({k: float for k in LOCALISATION})
    where = located.groupby(["method", "layer"], sort=False)[LOCALISATION]
    where = where.mean().join(where.size().rename("images")).reset_index()
    referred = preds["refer"].dropna()
    summary = {
        "files": len(preds),
        "images": int(preds["error"].isna().sum()),
        "errors": int(preds["error"].notna().sum()),
        "chunks": len(results),
        "predicted": {k: int(v) for k, v in preds["predicted"].value_counts().items()},
        "referred": int(referred.sum()) if len(referred) else None,
        "faithfulness": faith.to_dict(orient="records"),
        "masks": int(preds["image"].isin(located["image"]).sum()),
        "localisation": where.astype(object).where(where.notna(), None).to_dict("records"),
    }
    return table, preds, summary


@flow(name="explain-batch")
def explain_batch_flow(
    inputs: list[str],
    model: str = BUNDLE,
    methods: list[str] | None = None,
    layers: list[str] | None = None,
    out_dir: str = str(OUT_DIR),
    chunk_size: int | None = None,
    params_path: str = "params.yaml",
    temperature: float | None = None,
    metadata: str | None = None,
) -> BatchResult:
    """Predict and explain every image under ``inputs``; write ``out_dir``; log an MLflow run.

    Args:
        inputs: image files and/or folders (searched recursively).
        model: a bundle path, or ``models:/<name>@<alias>`` / ``models:/<name>/<version>``.
        methods: explanation methods (default ``explain.methods``).
        layers: CAM layers (default ``explain.layers``).
        out_dir: the output folder, replaced as a whole when the job succeeds.
        chunk_size: images per task (default ``orchestration.chunk_size``).
        params_path: params.yaml to read the explain, orchestration and tracking sections from.
        temperature: calibration temperature overriding the model's own calibrator.
        metadata: a ``--metadata`` table (:func:`tasks.predict.read_metadata_table`) for a
            model with a metadata prior.
    """
    from tasks import tracking
    from tasks.calibrate import calibrator_from_dict
    from tasks.cams import method_layers
    from tasks.predict import read_metadata_table

    start, log, p = time.perf_counter(), get_run_logger(), load_params(params_path)
    cfg = dataclasses.replace(
        p.explain,
        methods=list(methods or p.explain.methods),
        layers=list(layers or p.explain.layers),
    )
    size = chunk_size or p.orchestration.chunk_size
    if size < 1:
        raise ConfigError(f"chunk_size must be >= 1, got {size}")
    files, uri = find_items(inputs), tracking.configure()
    ref, meta = open_model(model, uri)
    pairs = method_layers(cfg.methods, cfg.layers, meta["arch"])
    calibration = resolve_calibration(ref, meta, temperature, uri)
    calibration.update(resolve_guards(ref, uri))
    calibrator_from_dict(calibration["calibrator"])  # a broken calibrator fails here, not per chunk
    ids = image_ids([image for image, _, _ in files])
    items = [
        (str(image), image_id, None if mask is None else str(mask), problem)
        for (image, mask, problem), image_id in zip(files, ids, strict=True)
    ]
    chunks = [items[i : i + size] for i in range(0, len(items), size)]
    table = None if metadata is None else read_metadata_table(metadata)
    patients = [  # each chunk gets its own images' rows (plain dicts: any task runner)
        None
        if table is None
        else {
            stem: table.loc[stem].to_dict()
            for stem in {Path(path).stem for path, *_ in chunk}
            if stem in table.index
        }
        for chunk in chunks
    ]
    paired = sum(mask is not None for _, mask, _ in files)
    log.info(
        "%d files (%d with a lesion mask), %d chunks, %d maps per image",
        len(files), paired, len(chunks), len(pairs),
    )  # fmt: skip
    run_chunk = explain_chunk.with_options(
        retries=p.orchestration.retries, retry_delay_seconds=p.orchestration.retry_delay_s
    )
    config = {
        "inputs": inputs, "model": dataclasses.asdict(ref), "arch": meta["arch"],
        "classes": meta["classes"], "calibration": calibration, "chunk_size": size,
        "resize": p.prepare.resize, "explain": dataclasses.asdict(cfg),
        "prefect_flow_run_id": str(flow_run.id),
    }  # fmt: skip
    out = Path(out_dir).resolve()
    with atomic_dir(out) as tmp:
        futures = [
            run_chunk.submit(
                chunk,
                k,
                ref.bundle,
                uri,
                calibration,
                cfg,
                p.prepare.resize,
                str(tmp),
                p.validate.mask_aspect_tolerance,
                patients[k],
            )  # fmt: skip
            for k, chunk in enumerate(chunks)
        ]
        table, preds, summary = write_outputs(
            tmp, [f.result() for f in futures], meta["classes"], cfg
        )
        summary["seconds"] = round(time.perf_counter() - start, 1)
        write_json(tmp / "summary.json", summary)
        write_json(tmp / "config.json", config)
    run_id = log_run(p.tracking.experiment or p.dataset.name, ref, inputs, out, summary, config)
    n, bad = summary["images"], summary["errors"]
    log.info("%d images, %d unreadable -> %s (MLflow run %s)", n, bad, out, run_id)
    return BatchResult(out, table, preds, summary, run_id)


def log_run(
    experiment: str, ref: ModelRef, inputs: list[str], out: Path, summary: dict, config: dict
) -> str:
    """The job's own MLflow run, tagged with the model version (and lineage run) it explains."""
    import mlflow

    from tasks import tracking

    tags = {
        "job": "explain-batch", "model_uri": ref.source, "model_name": ref.name,
        "model_version": ref.version, "model_alias": ref.alias, "model_run_id": ref.run_id,
        "source": ", ".join(inputs)[:5000], "prefect_flow_run_id": str(flow_run.id),
    }  # fmt: skip
    metrics = {k: summary[k] for k in ("files", "images", "errors", "seconds")}
    for row in summary["faithfulness"]:
        for key in ("average_drop", "increase_in_confidence"):
            metrics[f"xai_{row['method']}_{row['layer']}_{key}"] = row[key]
    for row in summary["localisation"]:  # images with a lesion mask only
        for key in LOCALISATION:
            if row[key] is not None:  # None: every map of the pair empty
                metrics[f"xai_{row['method']}_{row['layer']}_{key}"] = row[key]
    metrics["masks"] = summary["masks"]
    experiment_id = tracking.ensure_experiment(experiment)
    run_name = f"explain-batch-{Path(inputs[0]).name}"
    clean = {k: str(v) for k, v in tags.items() if v is not None}
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=clean) as run:
        tracking.log_params(flatten({k: v for k, v in config.items() if k != "inputs"}))
        tracking.log_metrics(metrics)
        tracking.log_artifacts({"explain_batch": out})
    return run.info.run_id


def run_explain_batch(
    inputs: list[str | Path],
    model: str = BUNDLE,
    methods: list[str] | None = None,
    layers: list[str] | None = None,
    out_dir: str | Path = OUT_DIR,
    chunk_size: int | None = None,
    params_path: str | Path = "params.yaml",
    temperature: float | None = None,
    dask_address: str | None = None,
    local_dask: bool = False,
    metadata: str | Path | None = None,
) -> BatchResult:
    """Check inputs, model and methods first (a typo starts no flow run), pick the runner, run.

    Default: Prefect's thread pool. ``dask_address`` sends the chunks to a running Dask
    scheduler; ``local_dask`` starts a temporary LocalCluster (one worker process per core).
    """
    from tasks import tracking
    from tasks.cams import method_layers
    from tasks.io import check_output_dir

    inputs = [str(i) for i in inputs]
    if chunk_size is not None and chunk_size < 1:
        raise ExplainBatchError(f"--chunk-size {chunk_size}: must be >= 1")
    if temperature is not None and not temperature > 0:
        raise ExplainBatchError(f"--temperature {temperature}: must be > 0")
    check_output_dir(out_dir, "-o/--out folder")
    find_images(inputs)
    if metadata is not None:
        from tasks.predict import read_metadata_table

        read_metadata_table(metadata)  # a bad line stops here, before any flow run
    _, meta = open_model(model, tracking.configure())
    if metadata is not None and not (meta.get("extra") or {}).get("metadata_prior"):
        raise ExplainBatchError(
            f"--metadata {metadata}: {model} carries no metadata prior (it was trained with "
            "model.metadata_prior: false), so age, sex and site cannot change its answer; "
            "leave --metadata out"
        )
    p = load_params(params_path)
    method_layers(methods or p.explain.methods, layers or p.explain.layers, meta["arch"])
    job = explain_batch_flow
    if dask_address or local_dask:
        from prefect_dask import DaskTaskRunner

        runner = (
            DaskTaskRunner(address=dask_address)
            if dask_address
            else DaskTaskRunner(cluster_kwargs={"threads_per_worker": 1})
        )
        job = explain_batch_flow.with_options(task_runner=runner)
    return job(
        inputs, model, methods, layers, str(out_dir), chunk_size, str(params_path), temperature,
        None if metadata is None else str(metadata),
    )  # fmt: skip
