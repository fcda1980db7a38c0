"""Out-of-distribution guard: flag images unlike anything the classifier was trained on.

A classifier answers every input with a class, and a small network trained on one kind of
dermoscopy image is often *more* confident on a clinical photo, a texture or a scanned page
than on its own test images. The guard scores how far an image's logits lie from the training
images' and flags those beyond a threshold; a flagged image is referred whatever its
confidence (:mod:`tasks.predict`).

Two scores, both computed from the logits alone, so they work the same on the PyTorch bundle
and on the exported ONNX graph (which returns ``logits``, :data:`tasks.export.OUTPUT_NAMES`):

- ``mahalanobis`` (default): class-conditional Gaussians with a shared covariance, fitted on
  the *training* logits with :class:`pytorch_ood.detector.Mahalanobis` (Lee et al., 2018);
  the score is the distance to the nearest class mean. On 32 px custom CNNs trained on the
  synthetic set (4 epochs) it separated MED-NODE from test with AUROC 0.76-0.91 and noise,
  textures and document scans with 0.9-1.0, where energy ranked them the wrong way round
  (AUROC 0.2-0.3 on MED-NODE, below 0.2 on noise and textures: they get *larger* logits than
  the training images, so they look more in-distribution to energy). Fitting on
  the logits rather than the penultimate features keeps the ONNX graph as it is: predict needs
  only the K class means and the K x K precision matrix, which travel in the ONNX metadata.
- ``energy``: ``-logsumexp(logits)`` (Liu et al., 2020), :meth:`pytorch_ood.detector.
  EnergyBased.score`; nothing to fit but the threshold.

pytorch-ood is used for the fit and as the reference score; :func:`ood_scores` repeats the
same formulas in numpy, because predict runs without torch tensors (onnxruntime outputs) and
both must give the same number (checked by tests/test_ood.py).

The threshold is the ``target_pass_rate`` quantile of the *validation* scores, so that share of
in-distribution images passes; the stage reports the pass rate on test and the detection
AUROC (scikit-learn's ``roc_auc_score``, OOD = positive) against each set in
``ood.external`` (folders of images from other distributions, skipped when absent) and against
non-skin images generated here (:func:`nonskin_images`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from scipy.special import logsumexp
from sklearn.metrics import roc_auc_score

from tasks import paths
from tasks.config import OOD_METHODS, ConfigError, Params
from tasks.io import write_json
from tasks.metrics import DPI, save_figure
from tasks.stage import console, main

GUARD_FILE = paths.MODELS / "ood.json"
REPORTS = Path("reports") / "ood"
NONSKIN_KINDS: tuple[str, ...] = ("noise", "texture", "document")
#: Images normalised to float32 at a time when scoring (bounded memory on a large set).
NORMALIZE_CHUNK = 1024


class OodError(ValueError):
    """Bad input to the OOD guard: too few images to fit, an unreadable image, a bad guard."""


@dataclass(frozen=True)
class OodGuard:
    """A fitted guard: a score over logits and the threshold above which an image is flagged.

    Attributes:
        method: ``mahalanobis`` | ``energy``.
        threshold: scores above it are out of distribution.
        target_pass_rate: share of validation images whose score is <= threshold.
        means: (K, K) class means of the training logits (mahalanobis only).
        precision: (K, K) inverse of the pooled scatter matrix (mahalanobis only).
    """

    method: str
    threshold: float
    target_pass_rate: float
    means: np.ndarray | None = None
    precision: np.ndarray | None = None

    def scores(self, logits: np.ndarray) -> np.ndarray:
        """Outlier scores (larger = less like training), one per row of ``logits``."""
        return ood_scores(self, logits)

    def flags(self, logits: np.ndarray) -> np.ndarray:
        """True where an image is out of distribution (score above the threshold)."""
        return self.scores(logits) > self.threshold

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: ``models/ood.json`` and the ONNX metadata key ``ood``."""
        out: dict[str, Any] = {
            "method": self.method,
            "threshold": float(self.threshold),
            "target_pass_rate": float(self.target_pass_rate),
        }
        if self.means is not None:
            out["means"] = np.asarray(self.means, dtype=np.float64).tolist()
            out["precision"] = np.asarray(self.precision, dtype=np.float64).tolist()
        return out


def guard_from_dict(data: Mapping[str, Any], source: str = "guard") -> OodGuard:
    """Rebuild an :class:`OodGuard` from :meth:`OodGuard.to_dict` (file or ONNX metadata).

    Raises:
        OodError: an unknown method or missing fields, naming ``source``.
    """
    method = data.get("method")
    if method not in OOD_METHODS:
        raise OodError(f"{source}: OOD method {method!r} is not one of {OOD_METHODS}")
    try:
        threshold = float(data["threshold"])
        rate = float(data.get("target_pass_rate", float("nan")))
        if method == "mahalanobis":
            means = np.asarray(data["means"], dtype=np.float64)
            precision = np.asarray(data["precision"], dtype=np.float64)
            if means.ndim != 2 or precision.shape != (means.shape[1], means.shape[1]):
                raise ValueError(f"means {means.shape} and precision {precision.shape} differ")
            return OodGuard(method, threshold, rate, means, precision)
    except (KeyError, TypeError, ValueError) as err:
        raise OodError(f"{source}: not a fitted OOD guard ({err})") from None
    return OodGuard(method, threshold, rate)


def _check_logits(logits: Any) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] < 2:
        raise OodError(f"logits must be 2-D (samples, classes >= 2), got shape {x.shape}")
    return x


def ood_scores(guard: OodGuard, logits: np.ndarray) -> np.ndarray:
    """The guard's outlier score of each row of ``logits``, in numpy (the ONNX path).

    ``mahalanobis``: ``min_c 0.5 (z - mu_c)^T P (z - mu_c)``, which is minus the maximum of
    pytorch-ood's per-class Gaussian terms (its outlier score). ``energy``:
    ``-logsumexp(z)``. Both equal pytorch-ood's scores (tests/test_ood.py).
    """
    x = _check_logits(logits)
    if guard.method == "energy":
        return -logsumexp(x, axis=1)
    if guard.means is None or guard.means.shape[1] != x.shape[1]:
        k = None if guard.means is None else guard.means.shape[1]
        raise OodError(f"logits have {x.shape[1]} classes, the OOD guard was fitted on {k}")
    centred = x[:, None, :] - guard.means[None, :, :]  # (n, K classes, D)
    d2 = np.einsum("ncd,de,nce->nc", centred, guard.precision, centred)
    return 0.5 * d2.min(axis=1)


def fit_guard(
    method: str,
    train_logits: np.ndarray,
    train_labels: np.ndarray,
    val_logits: np.ndarray,
    target_pass_rate: float,
) -> OodGuard:
    """Fit the score on the training logits and set the threshold on validation.

    The threshold is the ``target_pass_rate`` empirical quantile of the validation scores
    (``method="higher"``, so at least that share of validation images passes). Validation,
    not training, sets it: training logits sit closer to their own class means than any new
    image's, and a threshold set on them would flag too many in-distribution images.

    Raises:
        OodError: an unknown method, an empty validation split, or a class absent from the
            training logits (its mean cannot be fitted).
    """
    if method not in OOD_METHODS:
        raise OodError(f"ood.method {method!r} is not one of {OOD_METHODS}")
    z = _check_logits(train_logits)
    v = _check_logits(val_logits)
    if len(v) == 0:
        raise OodError("the validation split is empty; the OOD threshold cannot be set")
    means = precision = None
    if method == "mahalanobis":
        from pytorch_ood.detector import Mahalanobis

        y = np.asarray(train_labels, dtype=np.int64)
        missing = sorted(set(range(z.shape[1])) - set(y.tolist()))
        if missing:
            raise OodError(
                f"classes {missing} have no training images; the Mahalanobis guard needs "
                "every class mean"
            )
        detector = Mahalanobis(None).fit_features(torch.tensor(z), torch.tensor(y))
        means = detector.mu.double().numpy()
        precision = detector.precision.double().numpy()
    provisional = OodGuard(method, float("inf"), target_pass_rate, means, precision)
    threshold = float(np.quantile(ood_scores(provisional, v), target_pass_rate, method="higher"))
    return OodGuard(method, threshold, target_pass_rate, means, precision)


def detection_auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """AUROC of telling ``out`` (positive) from ``in`` by the score; 0.5 is chance."""
    y = np.r_[np.zeros(len(in_scores)), np.ones(len(out_scores))]
    return float(roc_auc_score(y, np.r_[in_scores, out_scores]))


# --------------------------------------------------------------------------- image sets


def nonskin_images(count: int, size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Images that are not skin at all, uint8 (count, size, size, 3) per kind.

    - ``noise``: uniform RGB noise;
    - ``texture``: saturated stripes and checkerboards of random period, angle and colours;
    - ``document``: a white page with dark lines of "text" and a margin, as a scanner sees it.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    noise = rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8)
    texture = np.empty_like(noise)
    document = np.empty_like(noise)
    for i in range(count):
        angle, period = rng.uniform(0, np.pi), rng.uniform(3, size / 3)
        wave = np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period)
        if i % 2:
            wave = wave * np.sin(2 * np.pi * (xx * np.sin(angle) - yy * np.cos(angle)) / period)
        a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        mask = (wave > 0)[..., None]
        texture[i] = np.where(mask, a, b).astype(np.uint8)
        page = np.full((size, size, 3), rng.integers(225, 256), dtype=np.uint8)
        step = max(3, size // 10)
        for row in range(step, size - step, step):
            end = int(rng.integers(size // 2, size - 2))
            page[row : row + max(1, step // 3), 3:end] = rng.integers(0, 60)
        document[i] = page
    return {"noise": noise, "texture": texture, "document": document}


def folder_images(
    root: str | Path, size: int, resize: str = "center_crop", color: str = "none"
) -> tuple[np.ndarray, list[Path]]:
    """Every image file under ``root`` (masks and hidden files skipped), decoded as predict does.

    Files whose suffix is not an image suffix (a README, a CSV) are ignored.

    Raises:
        OodError: no image under ``root``, or a file that does not decode (named).
    """
    from tasks.ingest import IMAGE_SUFFIXES
    from tasks.predict import _DECODE_ERRORS, collect_images, load_image

    files = [f for f in collect_images([root]) if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise OodError(f"{root}: no image files (ood.external)")
    arrays = []
    for f in files:
        try:
            arrays.append(load_image(f, size, resize, color=color))
        except _DECODE_ERRORS as err:
            raise OodError(f"{f}: cannot be decoded for the OOD report ({err})") from None
    return np.stack(arrays), files


def model_logits(
    model: torch.nn.Module,
    images: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 0,
) -> np.ndarray:
    """Logits (float32) of uint8 NHWC images, normalised as in training, in eval mode.

    The passes run on the model's inference twin (:func:`tasks.forward.inference_twin`:
    BatchNorm folded, channels-last; its logits equal the model's to float32 rounding), in
    batches sized to the device (``batch_size`` 0) or of ``batch_size``: on two CPU cores that
    scores the default's 1,500 images about twice as fast as eager batches of 64.
    """
    from tasks.export import normalize
    from tasks.forward import device_of, forward_batch, inference_twin, run_batched

    if not len(images):
        return np.zeros((0, 0), np.float32)
    twin = inference_twin(model)
    device = device_of(twin)
    out: list[np.ndarray] = []
    batch = 0
    for start in range(0, len(images), NORMALIZE_CHUNK):  # bounded float32 copies
        x = torch.from_numpy(
            normalize(np.asarray(images[start : start + NORMALIZE_CHUNK]), mean, std)
        ).to(device)
        batch = batch or forward_batch(twin, x, batch_size, work=len(images))
        run_batched(twin, x, batch, lambda logits, _rows: out.append(logits.float().cpu().numpy()))
    return np.concatenate(out)


# --------------------------------------------------------------------------- report


def plot_scores(
    guard: OodGuard, test_scores: np.ndarray, others: Mapping[str, np.ndarray]
) -> Figure:
    """Histograms of the test scores and each other set's, with the threshold."""
    fig = Figure(figsize=(7, 4), dpi=DPI)
    ax = fig.subplots()
    every = np.concatenate([test_scores, *others.values()])
    finite = every[np.isfinite(every)]
    lo, hi = np.quantile(finite, [0.0, 0.98]) if finite.size else (0.0, 1.0)
    bins = np.linspace(lo, max(hi, guard.threshold * 1.05 + 1e-9), 40)
    ax.hist(np.clip(test_scores, lo, bins[-1]), bins, alpha=0.6, label="test (in-distribution)")
    for name, s in others.items():
        ax.hist(np.clip(s, lo, bins[-1]), bins, alpha=0.4, histtype="stepfilled", label=name)
    ax.axvline(guard.threshold, color="black", ls="--", label="threshold")
    ax.set_xlabel(f"{guard.method} score (larger = less like training)")
    ax.set_ylabel("images")
    ax.set_title(f"OOD guard: {guard.target_pass_rate:.0%} of validation passes")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def evaluate_guard(
    guard: OodGuard, test_logits: np.ndarray, others: Mapping[str, np.ndarray]
) -> dict[str, Any]:
    """The card's contract (``metrics/ood.json``) plus the share flagged per other set."""
    test_scores = guard.scores(test_logits)
    other_scores = {name: guard.scores(x) for name, x in others.items()}
    return {
        "method": guard.method,
        "threshold": float(guard.threshold),
        "target_pass_rate": float(guard.target_pass_rate),
        "test_pass_rate": float(np.mean(test_scores <= guard.threshold)),
        "detection_auroc": {
            name: detection_auroc(test_scores, s) for name, s in other_scores.items()
        },
        "flagged_rate": {
            name: float(np.mean(s > guard.threshold)) for name, s in other_scores.items()
        },
        "n": {"test": len(test_scores), **{k: len(v) for k, v in other_scores.items()}},
    }


def read_guard(path: str | Path = GUARD_FILE) -> OodGuard:
    """The OOD stage's fitted guard, as export reads it."""
    path = Path(path)
    return guard_from_dict(json.loads(path.read_text()), str(path))


def run(p: Params) -> dict:
    """The ``ood`` stage: fit on train/val logits of the bundle, report on test and other sets."""
    from tasks import tracking
    from tasks.models import load_image_bundle, with_tta
    from tasks.prepare import open_split

    c = p.ood
    model, meta = load_image_bundle(paths.BUNDLE, "ood")
    extra = meta.get("extra") or {}
    model = with_tta(model, extra.get("tta"))  # the model that is exported
    color = extra.get("color_constancy", "none")
    mean, std = meta["normalization"]["mean"], meta["normalization"]["std"]
    size = meta["input_size"] if isinstance(meta["input_size"], int) else meta["input_size"][0]
    splits = {s: open_split(paths.PREPARED, s) for s in ("train", "val", "test")}
    logits = {s: model_logits(model, sp.images, mean, std) for s, sp in splits.items()}
    guard = fit_guard(
        c.method, logits["train"], splits["train"].labels, logits["val"], c.target_pass_rate
    )
    others: dict[str, np.ndarray] = {}
    for ext in c.external:
        root = Path(ext.root)
        if not root.is_dir():
            console.print(f"[yellow]ood: {ext.name}: {root} not found; skipped[/]")
            continue
        images, _ = folder_images(root, int(size), p.prepare.resize, color)
        others[ext.name] = model_logits(model, images, mean, std)
    for kind, images in nonskin_images(c.nonskin_count, int(size), c.seed).items():
        others[kind] = model_logits(model, images, mean, std)
    if not splits["test"].labels.size:
        raise ConfigError("ood: the test split is empty")
    report = evaluate_guard(guard, logits["test"], others)
    write_json(GUARD_FILE, guard.to_dict())
    fig = plot_scores(
        guard, guard.scores(logits["test"]), {k: guard.scores(v) for k, v in others.items()}
    )
    save_figure(fig, REPORTS / "scores.png")
    write_json(paths.METRICS / "ood.json", report)
    with tracking.resume_lineage_run():
        tracking.log_ood_conformal("ood", report, {"ood": REPORTS, "ood_guard": GUARD_FILE})
    aurocs = ", ".join(f"{k} {v:.3f}" for k, v in report["detection_auroc"].items())
    console.print(
        f"ood ({guard.method}): threshold {guard.threshold:.4g}; test pass rate "
        f"{report['test_pass_rate']:.1%} (target {guard.target_pass_rate:.0%}); AUROC {aurocs}"
    )
    return report


if __name__ == "__main__":
    raise SystemExit(main("ood"))
