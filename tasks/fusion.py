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
"""

from __future__ import annotations

from collections.abc import Sequence

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
