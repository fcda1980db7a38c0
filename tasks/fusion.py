"""Metadata fusion: age, sex and anatomical site next to the image features.

Dermatologists read a lesion together with the patient: melanoma is rarer in the young, BCC
favours the head and neck, acral sites have their own naevi. ISIC 2019 and HAM10000 ship age,
sex and site for almost every image, so a model may use them. ``model.metadata: true`` builds a
:class:`FusionNet`: the chosen image architecture, its head replaced by an ``EMBED``-wide
feature layer, concatenated with a small MLP over the encoded metadata, then a linear
classifier. ``dermaflow compare`` trains it beside the image-only model (the ablation).

Explanations stay image explanations: :class:`ImageOnly` holds one case's metadata fixed, so
every explainer (CAMs hook the image backbone's layers, IG/DeepLIFT/LIME perturb the image)
sees the usual ``model(x) -> logits``.

Encoding (no library does this for a manifest's three columns, hence hand-written):
``age/100`` and an ``age_missing`` flag, one-hot ``sex`` (male, female; missing is all zero)
and one-hot ``site`` over the sites seen in the training split (unseen or missing: all zero).
The site vocabulary travels in the model bundle, so a model meets new data with the same
columns.

A second, lighter way to use the same columns is :class:`MetadataPrior`
(``model.metadata_prior: true``): the image model stays image-only and a logistic regression
on the metadata alone adds ``log p(class | age, sex, site) - log p(class)`` to its logits
(late fusion). See its docstring for why that sum is the right one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

EMBED = 64  # width of the image feature vector that meets the metadata
META_HIDDEN = 16  # width of the metadata branch
SEXES = ("male", "female")


def site_vocabulary(rows: pd.DataFrame) -> list[str]:
    """Sites present in ``rows`` (the training split), sorted: the one-hot columns."""
    return sorted({str(s) for s in rows["site"].dropna().unique()})


def feature_names(sites: Sequence[str]) -> list[str]:
    """Column names of :func:`metadata_features`, for reports and the bundle."""
    return ["age", "age_missing", *[f"sex_{s}" for s in SEXES], *[f"site_{s}" for s in sites]]


def metadata_features(rows: pd.DataFrame, sites: Sequence[str]) -> np.ndarray:
    """Encode the manifest's age, sex and site columns as an ``(N, D)`` float32 matrix."""
    age = pd.to_numeric(rows["age"], errors="coerce").to_numpy(dtype=float)
    missing = np.isnan(age)
    columns = [np.where(missing, 0.0, age / 100.0), missing.astype(float)]
    sex = rows["sex"].astype("string").str.lower()
    columns += [(sex == s).fillna(False).to_numpy(dtype=float) for s in SEXES]
    site = rows["site"].astype("string")
    columns += [(site == s).fillna(False).to_numpy(dtype=float) for s in sites]
    return np.stack(columns, axis=1).astype(np.float32)


class FusionNet(nn.Module):
    """Image backbone features ++ metadata MLP -> linear classifier (late feature fusion).

    Args:
        image_backbone: a model from :func:`tasks.models.build_model` with ``num_classes=EMBED``
            (its replaced head is the image feature layer).
        meta_dim: number of metadata features.
        num_classes: output classes.
        dropout: dropout before the fused classifier.
    """

    def __init__(
        self, image_backbone: nn.Module, meta_dim: int, num_classes: int, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.image_backbone = image_backbone
        self.meta_branch = nn.Sequential(nn.Linear(meta_dim, META_HIDDEN), nn.ReLU())
        self.fusion_head = nn.Sequential(
            nn.ReLU(), nn.Dropout(dropout), nn.Linear(EMBED + META_HIDDEN, num_classes)
        )

    def forward(self, x: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        image = self.image_backbone(x)
        return self.fusion_head(torch.cat([image, self.meta_branch(meta.to(image))], dim=1))


class ImageOnly(nn.Module):
    """A fusion model with one case's metadata fixed: ``model(x)`` for the image explainers.

    The metadata row is broadcast over the batch, so perturbation methods (Score-CAM, LIME,
    deletion curves) that batch many copies of one image see the same patient every time.
    ``image_backbone`` and ``fusion_head`` are properties, not submodules: registering them a
    second time would make Captum's DeepLIFT hook each layer twice. The row lives in
    ``meta_row`` (``meta`` would clash with ``torch.fx.GraphModule.meta``) and is broadcast
    with a traceable ``repeat``, so :func:`tasks.cams.deeplift_ready` can rewrite the model.
    """

    def __init__(self, model: FusionNet, meta: torch.Tensor | np.ndarray) -> None:
        super().__init__()
        self.model = model
        row = torch.as_tensor(meta, dtype=torch.float32).reshape(1, -1)
        self.register_buffer("meta_row", row.to(next(model.parameters()).device))

    @property
    def image_backbone(self) -> nn.Module:
        return self.model.image_backbone

    @property
    def fusion_head(self) -> nn.Module:
        return self.model.fusion_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, self.meta_row.repeat(x.shape[0], 1))


def is_fusion(model: nn.Module) -> bool:
    """True for a :class:`FusionNet` (needs metadata) or an :class:`ImageOnly` view of one."""
    return hasattr(model, "fusion_head")


# --------------------------------------------------------------------------------------------
# Late fusion: a metadata prior added to an image-only model's logits
# --------------------------------------------------------------------------------------------


def has_metadata(rows: pd.DataFrame) -> np.ndarray:
    """True for the rows with any of age, sex or site (a folder set's rows have none)."""
    known = [pd.to_numeric(rows["age"], errors="coerce").notna()]
    known += [rows[c].astype("string").notna() for c in ("sex", "site")]
    return np.logical_or.reduce([k.to_numpy(dtype=bool) for k in known])


@dataclass(frozen=True)
class MetadataPrior:
    """What age, sex and site say about the class, as log-odds to add to image logits.

    If the image and the metadata are independent given the class, Bayes' rule gives
    ``p(y | x, m) ∝ p(y | x) · p(y | m) / p(y)``: the metadata enters as the log likelihood
    ratio ``log p(y | m) - log p(y)``, added to whatever the image logits are. For a model
    trained with plain cross-entropy (logits ≈ ``log p(y | x)``) the sum is the posterior;
    for a logit-adjusted one (logits ≈ ``log p(x | y)``) it is the balanced posterior. Either
    way the image model is left exactly as trained: its explanations, ONNX graph and OOD
    scores stay image-only, and a case without metadata gets a term of zero (``p(y | m) =
    p(y)``), which is the image model's own answer rather than a guess from "all missing".

    ``p(y | m)`` is a multinomial logistic regression (scikit-learn) over
    :func:`metadata_features`, fitted on the training split: a convex fit with one strength
    knob, ``C``, that cannot disturb the image features, unlike :class:`FusionNet`, which
    learns both at once.

    Attributes:
        classes: class names, in logit order.
        sites: the one-hot site columns (the training split's sites).
        coef: ``(K, D)`` regression weights over :func:`feature_names`.
        intercept: ``(K,)`` regression intercepts.
        log_prior: ``(K,)`` log class frequencies of the training split.
    """

    classes: tuple[str, ...]
    sites: tuple[str, ...]
    coef: np.ndarray
    intercept: np.ndarray
    log_prior: np.ndarray

    def log_odds(self, rows: pd.DataFrame) -> np.ndarray:
        """``(N, K)`` float32 ``log p(y | m) - log p(y)``; zero for rows without metadata."""
        from scipy.special import log_softmax

        x = metadata_features(rows, self.sites).astype(np.float64)
        term = log_softmax(x @ self.coef.T + self.intercept, axis=1) - self.log_prior
        return np.where(has_metadata(rows)[:, None], term, 0.0).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        """Plain numbers and strings, for the model bundle and the ONNX metadata."""
        return {
            "classes": list(self.classes),
            "sites": list(self.sites),
            "coef": np.round(self.coef, 8).tolist(),
            "intercept": np.round(self.intercept, 8).tolist(),
            "log_prior": np.round(self.log_prior, 8).tolist(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MetadataPrior:
        """The inverse of :meth:`to_dict` (checks the shapes agree)."""
        prior = cls(
            classes=tuple(str(c) for c in d["classes"]),
            sites=tuple(str(s) for s in d["sites"]),
            coef=np.asarray(d["coef"], dtype=np.float64),
            intercept=np.asarray(d["intercept"], dtype=np.float64),
            log_prior=np.asarray(d["log_prior"], dtype=np.float64),
        )
        k, dim = len(prior.classes), len(feature_names(prior.sites))
        if (
            prior.coef.shape != (k, dim)
            or prior.intercept.shape != (k,)
            or prior.log_prior.shape != (k,)
        ):
            raise ValueError(
                f"metadata prior: coef {prior.coef.shape}, intercept {prior.intercept.shape} "
                f"and log_prior {prior.log_prior.shape} do not fit {k} classes x {dim} features"
            )
        return prior


class MetadataPriorError(ValueError):
    """The training split cannot give a metadata prior (a class has no row with metadata)."""


def fit_metadata_prior(
    rows: pd.DataFrame, labels: np.ndarray, classes: Sequence[str], c: float = 1.0
) -> MetadataPrior | None:
    """Fit :class:`MetadataPrior` on the training split's rows that have metadata.

    Args:
        rows: the training split's manifest rows (``age``, ``sex``, ``site``).
        labels: their class indices into ``classes``.
        classes: class names, in logit order.
        c: inverse L2 strength of the logistic regression (scikit-learn's ``C``).

    Returns:
        The prior; None when no row has any metadata (a class-per-folder set): then
        ``p(y | m) = p(y)`` for every case and the prior would add exactly zero.

    Raises:
        MetadataPriorError: some rows have metadata but no row of a class has (the
            regression would give that class no probability at all).
    """
    from sklearn.linear_model import LogisticRegression

    known = has_metadata(rows)
    if not known.any():
        return None
    y = np.asarray(labels)[known]
    missing = [str(classes[k]) for k in range(len(classes)) if not (y == k).any()]
    if missing:
        raise MetadataPriorError(
            f"model.metadata_prior: the training split has no row with age, sex or site for "
            f"class {', '.join(missing)}; set model.metadata_prior: false for this dataset"
        )
    sites = site_vocabulary(rows[known])
    x = metadata_features(rows[known], sites).astype(np.float64)
    fit = LogisticRegression(C=c, max_iter=5000).fit(x, y)
    counts = np.bincount(y, minlength=len(classes)).astype(np.float64)
    return MetadataPrior(
        classes=tuple(str(k) for k in classes),
        sites=tuple(sites),
        coef=fit.coef_.astype(np.float64),
        intercept=fit.intercept_.astype(np.float64),
        log_prior=np.log(counts / counts.sum()),
    )


def prior_from_meta(meta: Mapping[str, Any] | None) -> MetadataPrior | None:
    """The prior a bundle's ``extra`` or an ONNX file's metadata carries, or None."""
    found = (meta or {}).get("metadata_prior")
    return MetadataPrior.from_dict(found) if found else None
