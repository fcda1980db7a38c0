"""The embedded default dataset: deterministic synthetic dermoscopy in the ISIC 2019 layout.

Why synthetic: the default pipeline has to run end to end offline, on two CPU cores, without a
licence click-through, and through the *same* adapter as real data. So :func:`generate` writes
what the ISIC 2019 challenge ships (JPEGs, one-hot ground truth, metadata) plus ISIC-2018-style
``<image_id>_segmentation.png`` masks beside the images.

Properties the rest of the pipeline relies on:

* Class evidence lies only inside the lesion mask. Skin, hair, vignette and sensor noise come
  from random streams that never see the label, so a saliency map that lights up outside the
  mask is wrong by construction (the pointing game and the gallery rely on it).
* An optional marker (an ink dot or a ruler) is drawn *outside* the mask on a share of one
  class's images: a controlled shortcut that shows what shortcut learning looks like.
* ``difficulty`` pulls each lesion's look towards the class average or towards another class
  and adds noise, so the task is learnable but not trivially so.
* Every random stream is keyed by ``(seed, purpose, lesion, view)``, so the files are
  byte-identical for the same config however the work is scheduled.
"""

from __future__ import annotations

import csv
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from rich.progress import Progress
from scipy import ndimage

from tasks import paths
from tasks.config import Params, SynthConfig
from tasks.io import atomic_dir, write_json
from tasks.labels import ISIC_CLASSES
from tasks.stage import console, main

IMAGES_DIR = "ISIC_2019_Training_Input"
GROUND_TRUTH = "ISIC_2019_Training_GroundTruth.csv"
METADATA = "ISIC_2019_Training_Metadata.csv"
SITES = ("anterior torso", "posterior torso", "lateral torso", "upper extremity",
         "lower extremity", "head/neck", "palms/soles", "oral/genital")  # fmt: skip
ALLOC, SHAPE, SKIN, META, SCENE, MARK = range(1, 7)  # purposes of the random streams

BROWN_L, BROWN, BROWN_D = (0.70, 0.50, 0.34), (0.53, 0.34, 0.21), (0.33, 0.19, 0.12)
BLACK, BLUEGREY, RED = (0.12, 0.09, 0.08), (0.36, 0.40, 0.50), (0.76, 0.26, 0.28)
PINK, WHITE, PURPLE = (0.90, 0.60, 0.60), (0.96, 0.94, 0.91), (0.40, 0.12, 0.30)
PEARL, KERATIN, TAN = (0.94, 0.78, 0.78), (0.95, 0.89, 0.66), (0.82, 0.68, 0.48)
SKIN_LIGHT, SKIN_DARK = np.array([0.96, 0.80, 0.72]), np.array([0.74, 0.53, 0.41])
HAIR, INK, VESSEL = np.array([0.10, 0.07, 0.05]), np.array([0.17, 0.14, 0.48]), (0.70, 0.10, 0.16)


@dataclass(frozen=True)
class Look:
    """How one class looks. Every field is a number or an array, so looks can be blended."""

    radius: Any  # mean radius as a share of the image side
    elong: Any  # most extra elongation of the outline
    asym: Any  # low-order border harmonics and off-centre pigment: asymmetry
    ragged: Any  # high-order border harmonics: irregular border
    soft: Any  # width of the fading rim, share of the radius: ill-defined lesions fade out
    opacity: Any  # how much skin it hides (translucent BCC lets the skin show through)
    base: Any  # main colour (r, g, b)
    patches: Any  # three colour patches (r, g, b, share of the lesion they cover)
    centre: Any  # central spot (r, g, b, strength): DF's white scar, SCC's keratin
    mottle: Any = 0.04  # fine multiplicative texture
    network: Any = 0.0  # reticular pigment network
    vessels: Any = 0.0  # arborizing red vessels
    scale: Any = 0.0  # white scaly speckle
    milia: Any = 0.0  # milia-like light dots
    lacunae: Any = 0.0  # round red-purple lacunae


LOOKS: dict[str, Look] = {
    "MEL": Look(0.30, 0.35, 0.22, 0.16, 0.15, 0.95, BROWN_D,
                ((*BLACK, 0.30), (*BLUEGREY, 0.22), (*RED, 0.12)), (*BROWN_D, 0.0),
                mottle=0.12, network=0.45),
    "NV": Look(0.22, 0.25, 0.03, 0.03, 0.12, 0.90, BROWN,
               ((*BROWN_D, 0.10), (*BROWN_L, 0.06), (*BROWN, 0.0)), (*BROWN, 0.0),
               network=0.35),
    "BCC": Look(0.22, 0.30, 0.10, 0.10, 0.25, 0.65, PEARL,
                ((*BLUEGREY, 0.12), (*WHITE, 0.10), (*PINK, 0.10)), (*WHITE, 0.0),
                mottle=0.05, vessels=1.0),
    "AK": Look(0.24, 0.30, 0.10, 0.14, 0.55, 0.70, (0.86, 0.45, 0.42),
               ((*RED, 0.25), (*WHITE, 0.10), (*PINK, 0.15)), (*WHITE, 0.0),
               mottle=0.12, vessels=0.15, scale=1.0),
    "BKL": Look(0.25, 0.30, 0.08, 0.08, 0.06, 0.90, (0.72, 0.55, 0.38),
                ((*BROWN, 0.12), (*TAN, 0.15), (*BROWN_D, 0.05)), (*BROWN_L, 0.0),
                mottle=0.10, network=0.05, scale=0.2, milia=1.0),
    "DF": Look(0.18, 0.20, 0.05, 0.06, 0.35, 0.90, (0.50, 0.33, 0.24),
               ((*BROWN, 0.10), (*BROWN_L, 0.05), (*PINK, 0.05)), (*WHITE, 1.0),
               mottle=0.05, network=0.15),
    "VASC": Look(0.16, 0.25, 0.08, 0.05, 0.08, 0.95, (0.55, 0.18, 0.28),
                 ((*PURPLE, 0.20), (*RED, 0.15), (*PURPLE, 0.05)), (*RED, 0.0),
                 mottle=0.06, lacunae=1.0),
    "SCC": Look(0.24, 0.30, 0.15, 0.16, 0.35, 0.80, (0.92, 0.70, 0.66),
                ((*RED, 0.15), (*WHITE, 0.15), (*PINK, 0.10)), (*KERATIN, 0.95),
                mottle=0.10, vessels=0.3, scale=0.5),
}  # fmt: skip

# label -> (mean age, sd, P(male), weights over SITES): older carcinomas on the head/neck, young
# naevi on the trunk, dermatofibromas on the legs, melanomas on the back and legs.
DEMOGRAPHY: dict[str, tuple[float, float, float, tuple[float, ...]]] = {
    "MEL": (62, 14, 0.56, (0.15, 0.30, 0.03, 0.14, 0.22, 0.12, 0.03, 0.01)),
    "NV": (38, 11, 0.50, (0.28, 0.28, 0.05, 0.12, 0.18, 0.05, 0.03, 0.01)),
    "BCC": (69, 10, 0.55, (0.15, 0.12, 0.02, 0.08, 0.06, 0.55, 0.01, 0.01)),
    "AK": (72, 8, 0.60, (0.04, 0.03, 0.01, 0.20, 0.07, 0.64, 0.01, 0.00)),
    "BKL": (60, 13, 0.52, (0.22, 0.22, 0.03, 0.12, 0.14, 0.24, 0.02, 0.01)),
    "DF": (45, 12, 0.40, (0.03, 0.02, 0.01, 0.12, 0.78, 0.02, 0.01, 0.01)),
    "VASC": (50, 18, 0.50, (0.22, 0.15, 0.04, 0.15, 0.25, 0.12, 0.03, 0.04)),
    "SCC": (73, 9, 0.62, (0.05, 0.03, 0.01, 0.22, 0.12, 0.55, 0.01, 0.01)),
    "UNK": (55, 18, 0.50, (0.15, 0.15, 0.05, 0.15, 0.15, 0.15, 0.10, 0.10)),
}


def _blend(looks: list[Look], weights: list[float]) -> Look:
    """Weighted average of looks, field by field (colours and strengths alike)."""
    w = np.asarray(weights, float) / np.sum(weights)
    stack = {f.name: [np.asarray(getattr(k, f.name), float) for k in looks] for f in fields(Look)}
    return Look(**{name: np.tensordot(w, values, 1) for name, values in stack.items()})


AVERAGE = _blend(list(LOOKS.values()), [1.0] * len(LOOKS))


def _look_for(label: str, rng: np.random.Generator, difficulty: float) -> Look:
    """The textbook look of ``label``, pulled towards the average or another class, and noised.

    Half of the lesions drift towards the shared average (everything gets vaguer), half towards
    one random class (look-alikes: BKL vs MEL, BCC vs SCC), by a random share that grows with
    ``difficulty``; colours and feature strengths then get noise that grows with it too.
    """
    names = list(LOOKS)
    if label in LOOKS:
        look = LOOKS[label]
    else:  # UNK, or any label without a look of its own: half one class, half another
        a, b = rng.choice(len(names), 2, replace=False)
        look = _blend([LOOKS[names[a]], LOOKS[names[b]]], [1.0, 1.0])
    target = AVERAGE if rng.random() < 0.5 else LOOKS[names[rng.integers(len(names))]]
    share = difficulty * rng.uniform(0.0, 0.6)
    look = _blend([look, target], [1 - share, share])
    noisy = {}
    for f in fields(Look):
        v = np.asarray(getattr(look, f.name), float)
        if v.ndim:  # colours (and patch shares) shift
            noisy[f.name] = np.clip(v + rng.normal(0, 0.06 * difficulty, v.shape), 0, 1)
        else:  # sizes and strengths scale
            noisy[f.name] = float(v * np.exp(rng.normal(0, 0.35 * difficulty)))
    noisy["opacity"] = min(noisy["opacity"], 1.0)
    return Look(**noisy)


def _rng(seed: int, purpose: int, lesion: int = 0, view: int = 0) -> np.random.Generator:
    """One independent stream per (purpose, lesion, view); fixed-length keys never collide."""
    return np.random.default_rng([int(seed), purpose, lesion, view])


def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [-0.5, 0.5), so shapes do not depend on the resolution."""
    c = (np.arange(n) + 0.5) / n - 0.5
    return np.meshgrid(c, c, indexing="ij")


def _field(rng: np.random.Generator, n: int, sigma: float) -> np.ndarray:
    """Smooth Gaussian noise with unit variance; ``sigma`` is a share of the side."""
    f = ndimage.gaussian_filter(rng.standard_normal((n, n)), max(sigma * n, 0.5), mode="wrap")
    return (f - f.mean()) / (f.std() + 1e-8)


def _over(rgb: np.ndarray, colour: Any, weight: np.ndarray) -> np.ndarray:
    """Paint ``colour`` over ``rgb`` with per-pixel opacity ``weight``."""
    return rgb + (np.asarray(colour, float)[..., :3] - rgb) * np.clip(weight, 0, 1)[..., None]


def _stroke(n: int, ys: np.ndarray, xs: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Coverage (0..1) of thin anti-aliased curves through the points (normalised coords)."""
    yi, xi = np.floor((ys + 0.5) * n).astype(int), np.floor((xs + 0.5) * n).astype(int)
    ok = (yi >= 0) & (yi < n) & (xi >= 0) & (xi < n)
    canvas = np.zeros((n, n))
    np.maximum.at(canvas, (yi[ok], xi[ok]), weight[ok])
    return np.clip(ndimage.gaussian_filter(canvas, 0.5) * 2.5, 0, 1)


def _blob(y: np.ndarray, x: np.ndarray, cy: float, cx: float, r: float, rim: float) -> np.ndarray:
    """A filled disc with a soft rim ``rim`` wide (normalised units)."""
    return np.clip((r - np.hypot(y - cy, x - cx)) / rim + 0.5, 0, 1)


def _vessels(rng: np.random.Generator, radius: float, n: int) -> np.ndarray:
    """Arborizing vessels: a few trunks that wander and fork twice into thinner branches."""
    ys, xs, ws = [], [], []
    stack = [(*rng.uniform(-0.6, 0.6, 2) * radius, rng.uniform(0, 2 * np.pi), 0.9 * radius, 1.0)
             for _ in range(rng.integers(2, 5))]  # fmt: skip
    while stack:
        y, x, angle, length, w = stack.pop()
        steps = max(int(length * n * 2), 2)
        turn = np.cumsum(rng.normal(0, 0.25, steps)) + angle
        ys.append(y + np.cumsum(np.sin(turn)) * length / steps)
        xs.append(x + np.cumsum(np.cos(turn)) * length / steps)
        ws.append(np.full(steps, w))
        if w > 0.5:
            for side in (-1, 1):
                fork = turn[-1] + side * rng.uniform(0.3, 0.9)
                stack.append((ys[-1][-1], xs[-1][-1], fork, length * 0.6, w * 0.7))
    return _stroke(n, np.concatenate(ys), np.concatenate(xs), np.concatenate(ws))


def _paint_lesion(look: Look, rng: np.random.Generator, n: int):
    """Paint one lesion on its own canvas: colour (n, n, 3), opacity (n, n), outline (n, n).

    The canvas is the lesion's own frame; :func:`_render` warps it into each view, so the
    repeat images of a lesion show the same lesion shifted, turned and zoomed.
    """
    y, x = _grid(n)
    radius = look.radius * rng.uniform(0.8, 1.2)
    stretch = np.sqrt(1 + rng.uniform(0, look.elong))
    rho, theta = np.hypot(x / stretch, y * stretch), np.arctan2(y, x)
    edge = np.ones_like(theta)
    for k in range(1, 13):
        amp = (look.asym if k <= 2 else look.ragged * 2 / k) * rng.uniform(0.3, 1.0)
        edge += amp * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    r = np.minimum(radius * np.clip(edge, 0.35, 1.6), 0.46)
    depth = (r - rho) / radius  # 0 on the border, about 1 in the middle
    outline = depth > 0
    alpha = np.clip(depth / max(look.soft, 0.02), 0, 1) * look.opacity

    rgb = np.empty((n, n, 3))
    rgb[:] = look.base
    phi = rng.uniform(0, 2 * np.pi)
    tilt = (x * np.cos(phi) + y * np.sin(phi)) / radius  # off-centre pigment: asymmetry
    for patch in np.asarray(look.patches):
        f = _field(rng, n, 0.05) + 3 * look.asym * tilt
        share = np.clip(patch[3], 0, 1)
        cut = np.quantile(f[outline], 1 - share) if outline.any() else 0.0
        rgb = _over(rgb, patch, min(share * 4, 1) / (1 + np.exp(-(f - cut) / 0.2)))
    rgb *= 1 + look.mottle * _field(rng, n, 0.015)[..., None]
    net = np.exp(-((_field(rng, n, 0.012) / 0.35) ** 2)) * (0.6 + 0.4 * _field(rng, n, 0.1))
    rgb *= 1 - np.clip(look.network * 0.6 * net * np.clip(depth * 2, 0, 1), 0, 0.9)[..., None]
    rgb = _over(rgb, WHITE, look.scale * 0.8 * np.clip(_field(rng, n, 0.006) - 1.0, 0, 1))
    for _ in range(rng.poisson(look.milia * 6)):
        cy, cx = rng.uniform(-0.6, 0.6, 2) * radius
        dot = _blob(y, x, cy, cx, rng.uniform(0.012, 0.025), 0.01)
        rgb = _over(rgb, (0.95, 0.90, 0.76), dot * min(look.milia, 1) * 0.85)
    for _ in range(rng.poisson(look.lacunae * 9)):
        cy, cx = rng.uniform(-0.7, 0.7, 2) * radius
        colour = 0.9 * (np.asarray(RED) + (np.asarray(PURPLE) - RED) * rng.uniform())
        lacuna = _blob(y, x, cy, cx, radius * rng.uniform(0.12, 0.28), 0.012)
        rgb = _over(rgb, colour, lacuna * min(look.lacunae, 1))
    if look.vessels > 0.02:
        rgb = _over(rgb, VESSEL, min(look.vessels, 1) * 0.9 * _vessels(rng, radius, n))
    core = np.exp(-2 * (rho / (0.45 * np.maximum(r, 1e-3))) ** 2) * (1 + 0.3 * _field(rng, n, 0.04))
    rgb = _over(rgb, look.centre, look.centre[3] * core)
    return np.clip(rgb, 0, 1), alpha, outline


def _skin(tone: float, rng: np.random.Generator, n: int) -> np.ndarray:
    """Skin of the given tone with low-frequency shading, blotchy redness and fine grain."""
    rgb = np.empty((n, n, 3))
    rgb[:] = SKIN_LIGHT + (SKIN_DARK - SKIN_LIGHT) * tone
    rgb *= 1 + 0.05 * _field(rng, n, 0.15)[..., None]
    rgb += np.array([0.025, -0.005, -0.005]) * _field(rng, n, 0.08)[..., None]
    return rgb + 0.012 * _field(rng, n, 0.008)[..., None]


def _hairs(rng: np.random.Generator, n: int) -> np.ndarray:
    """Coverage of a few dark hairs: quadratic Bezier curves from edge to edge."""
    t = np.linspace(0, 1, 4 * n)[:, None]
    curves = [np.zeros((0, 2))]
    for _ in range(min(rng.poisson(1.5), 6)):
        a, b = rng.uniform(0, 2 * np.pi, 2)
        p0, p2 = 0.75 * np.array([np.sin(a), np.cos(a)]), 0.75 * np.array([np.sin(b), np.cos(b)])
        p1 = rng.uniform(-0.3, 0.3, 2)
        curves.append((1 - t) ** 2 * p0 + 2 * t * (1 - t) * p1 + t**2 * p2)
    pts = np.concatenate(curves)
    return _stroke(n, pts[:, 0], pts[:, 1], np.ones(len(pts)))


def _vignette(rng: np.random.Generator, n: int) -> np.ndarray:
    """Light through the dermoscope: 1 inside its circle, falling to black at the corners."""
    y, x = _grid(n)
    cy, cx = rng.normal(0, 0.02, 2)
    reach = rng.uniform(0.50, 0.80)
    d = np.hypot(y - cy, x - cx)
    return np.clip((reach - d) / 0.04, 0, 1) * (1 - 0.2 * (d / reach) ** 2)


def _warp(layers: np.ndarray, centre: np.ndarray, angle: float, zoom: float) -> np.ndarray:
    """Place a lesion canvas into the image: turn it by ``angle``, zoom, move to ``centre``."""
    n = layers.shape[0]
    y, x = _grid(n)
    dy, dx = y - centre[0], x - centre[1]
    c, s = np.cos(angle), np.sin(angle)
    rows = ((-s * dx + c * dy) / zoom + 0.5) * n - 0.5
    cols = ((c * dx + s * dy) / zoom + 0.5) * n - 0.5
    planes = np.moveaxis(layers, -1, 0)
    return np.stack([ndimage.map_coordinates(p, [rows, cols], order=1) for p in planes], axis=-1)


def _marker(kind: str, rng: np.random.Generator, mask: np.ndarray, light: np.ndarray):
    """Coverage and colour of a spurious marker, placed where it cannot touch the lesion.

    ``ink``: a dark-blue dot in the lit area, as near to a random corner as the lesion allows.
    ``ruler``: a striped bar along the edge that keeps clearest of the lesion.
    """
    n = mask.shape[0]
    y, x = _grid(n)
    free = ndimage.distance_transform_edt(~mask) / n  # distance to the lesion
    if kind == "ink":
        r = rng.uniform(0.035, 0.055)
        lit = ndimage.distance_transform_edt(light > 0.9) / n
        room = np.minimum(free - r - 2 / n, lit - r)
        corner = rng.integers(4) * np.pi / 2 + np.pi / 4 + rng.normal(0, 0.25)
        goal = 0.34 * np.array([np.sin(corner), np.cos(corner)])
        score = np.where(room > 0, -np.hypot(y - goal[0], x - goal[1]), room - 10)
        cy, cx = np.unravel_index(np.argmax(score), score.shape)
        dot = _blob(y, x, y[cy, cx], x[cy, cx], r, 1.0 / n) * 0.95
        return dot * (free > 1.5 / n), INK * rng.uniform(0.8, 1.2)
    if kind != "ruler":
        raise ValueError(f"synth.marker.kind: unknown marker {kind!r}; expected ink or ruler")
    width, inset = rng.uniform(0.07, 0.10), rng.uniform(0.08, 0.13)
    lo, hi = -0.5 + inset, -0.5 + inset + width
    bars = [(y > lo) & (y < hi), (-y > lo) & (-y < hi), (x > lo) & (x < hi), (-x > lo) & (-x < hi)]
    bars = [bar & (np.abs(x if i < 2 else y) < 0.3) for i, bar in enumerate(bars)]
    clear = free > 2.0 / n
    best = int(np.argmax([(bar & clear).sum() - 10 * (bar & ~clear).sum() for bar in bars]))
    period = rng.uniform(0.035, 0.05)
    ticks = ((x if best < 2 else y) + 1) % period < 0.35 * period
    colour = np.where(ticks[..., None], [0.15, 0.15, 0.15], [0.92, 0.90, 0.82])
    return (bars[best] & clear) * 0.95, colour


def _lesion(
    label: str, seed: int, lesion: int, size: int, difficulty: float
) -> tuple[np.ndarray, float, np.ndarray]:
    """One lesion as every view of it starts: placement, turn and painted canvas.

    All of it comes from the lesion's SHAPE stream, the only one that sees the label, so the
    views of a lesion can share one painting (more than half of a view's rendering time).

    Returns:
        ``(where, turn, canvas)``: the centre offset (2,), the angle, and the (n, n, 5) layers
        colour, opacity and outline.
    """
    shape_rng = _rng(seed, SHAPE, lesion)
    where, turn = shape_rng.normal(0, 0.05, 2), shape_rng.uniform(0, 2 * np.pi)
    rgb, alpha, outline = _paint_lesion(_look_for(label, shape_rng, difficulty), shape_rng, size)
    return where, turn, np.dstack([rgb, alpha, outline])


def _render(
    label: str,
    seed: int,
    lesion: int,
    view: int,
    size: int,
    difficulty: float,
    marker: str | None,
    lesion_canvas: tuple[np.ndarray, float, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One view of one lesion: image and mask as uint8.

    Only the SHAPE stream sees the label. Skin tone (per lesion), texture, hair, vignette,
    framing and noise (per view) come from streams that never see it, so for a given key the
    pixels outside the mask are the same whatever the class. ``lesion_canvas`` is the lesion's
    :func:`_lesion`, when the caller renders several views of it; painted here otherwise.
    """
    where, turn, canvas = lesion_canvas or _lesion(label, seed, lesion, size, difficulty)
    scene_rng = _rng(seed, SCENE, lesion, view)
    shift, tilt = scene_rng.normal(0, 0.03, 2), scene_rng.normal(0, 0.3)
    zoom, gain = scene_rng.uniform(0.9, 1.1), scene_rng.uniform(0.9, 1.1)
    placed = _warp(canvas, where + shift, turn + tilt, zoom)
    mask = placed[..., 4] > 0.5
    img = _skin(_rng(seed, SKIN, lesion).uniform(), scene_rng, size)
    img = _over(img, placed[..., :3], placed[..., 3] * mask)
    light = _vignette(scene_rng, size)
    img = _over(img, HAIR, 0.85 * _hairs(scene_rng, size))
    img = img * light[..., None] + 0.03 * (1 - light[..., None])
    if marker:
        cover, colour = _marker(marker, _rng(seed, MARK, lesion, view), mask, light)
        img = _over(img, colour, cover)
    img = img * gain + scene_rng.normal(0, 0.01, img.shape)
    return np.round(np.clip(img, 0, 1) * 255).astype(np.uint8), mask.astype(np.uint8) * 255


def render_lesion_image(
    label: str,
    rng: np.random.Generator,
    size: int,
    difficulty: float,
    marker: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Render one synthetic dermoscopy image and its lesion mask.

    Args:
        label: ISIC class (``MEL``, ``NV``, ...); any other label gets a two-class mixture.
        rng: the only source of randomness. Generators in the same state give the same
            background whatever the label and marker: only the lesion (and marker) change.
        size: side of the square image in pixels.
        difficulty: 0 gives textbook lesions, 1 heavy overlap between classes.
        marker: ``None``, ``"ink"`` or ``"ruler"``: a spurious mark outside the lesion.

    Returns:
        The RGB image (size, size, 3) uint8 and the binary mask (size, size) uint8 in {0, 255}.
    """
    return _render(label, int(rng.integers(2**63)), 0, 0, size, difficulty, marker)


def _allocate(mix: dict[str, float], count: int) -> dict[str, int]:
    """Images per class by largest remainder, then >= 3 per class where there is room.

    Three images make three lesions: the least a stratified train/val/test split needs.
    """
    bad = sorted(set(mix) - set(ISIC_CLASSES))
    if bad or not any(v > 0 for v in mix.values()):
        raise ValueError(f"synth.class_mix: needs ISIC classes with positive weights, got {mix}")
    labels = [c for c in ISIC_CLASSES if mix.get(c, 0) > 0]
    share = np.array([mix[c] for c in labels]) / sum(mix[c] for c in labels) * count
    n = np.floor(share).astype(int)
    n[np.argsort(n - share, kind="stable")[: count - n.sum()]] += 1
    while n.min() < min(3, count // len(labels)):
        n[np.argmax(n)] -= 1
        n[np.argmin(n)] += 1
    return dict(zip(labels, n.tolist(), strict=True))


def _lesion_sizes(n: int, most: int, rng: np.random.Generator) -> list[int]:
    """Split ``n`` images into lesions of 1..``most`` views, mostly single (as in HAM10000)."""
    p = 0.55 ** np.arange(max(most, 1))
    sizes: list[int] = []
    while sum(sizes) < n:
        sizes.append(int(rng.choice(len(p), p=p / p.sum())) + 1)
    sizes[-1] -= sum(sizes) - n
    while len(sizes) < min(3, n):
        sizes[int(np.argmax(sizes))] -= 1
        sizes.append(1)
    return sizes


def _demography(label: str, rng: np.random.Generator) -> list[str]:
    """Age (a multiple of 5), site and sex of one lesion; a few missing, as in ISIC 2019."""
    mean, sd, male, sites = DEMOGRAPHY.get(label, DEMOGRAPHY["UNK"])
    age = f"{float(np.clip(5 * round(rng.normal(mean, sd) / 5), 5, 85)):.1f}"
    site = SITES[rng.choice(len(SITES), p=np.array(sites) / sum(sites))]
    sex = "male" if rng.random() < male else "female"
    gaps = rng.random(3) < (0.015, 0.05, 0.01)
    return ["" if gap else v for v, gap in zip((age, site, sex), gaps, strict=True)]


_CHUNK = 25  # images per worker job: enough to amortise the hand-off, small for the bar


def _write_chunk(args: tuple) -> int:
    """Render and save one chunk of lesions, each painted once for all its views; returns how
    many views (a worker process's job)."""
    lesions, folder, seed, size, difficulty = args
    for label, lesion, views in lesions:
        canvas = _lesion(label, seed, lesion, size, difficulty)
        for image_id, view, mark in views:
            img, mask = _render(label, seed, lesion, view, size, difficulty, mark, canvas)
            Image.fromarray(img).save(folder / f"{image_id}.jpg", quality=92)
            Image.fromarray(mask).save(folder / f"{image_id}_segmentation.png")
    return sum(len(views) for _, _, views in lesions)


def _lesion_chunks(jobs: list[tuple], per_chunk: int) -> list[list[tuple]]:
    """The views grouped by lesion (``(label, lesion, [(image_id, view, marker), ...])``, in
    order of first appearance), then into chunks of at least ``per_chunk`` views: a lesion's
    views never span two chunks, so each lesion is painted once."""
    by_lesion: dict[int, tuple[str, int, list[tuple]]] = {}
    for image_id, label, lesion, view, mark in jobs:
        by_lesion.setdefault(lesion, (label, lesion, []))[2].append((image_id, view, mark))
    chunks: list[list[tuple]] = [[]]
    count = 0
    for group in by_lesion.values():
        if count >= per_chunk:
            chunks.append([])
            count = 0
        chunks[-1].append(group)
        count += len(group[2])
    return [chunk for chunk in chunks if chunk]


def generate(cfg: SynthConfig, out_root: Path, progress: bool = True, workers: int = 1) -> dict:
    """Write the synthetic dataset in the ISIC 2019 layout under ``out_root``, atomically.

    Images per class come from ``class_mix`` by largest remainder; each class's images are
    grouped into lesions of up to ``images_per_lesion`` views; lesions and images are shuffled
    and numbered. Every view renders from its own keyed streams, so the bytes depend on the
    config only, and ``out_root`` is replaced only once everything is written.

    Args:
        cfg: the ``synth`` section of params.yaml.
        out_root: dataset root; gets ``ISIC_2019_Training_Input/`` (``<id>.jpg`` and
            ``<id>_segmentation.png``), ``ISIC_2019_Training_GroundTruth.csv`` and
            ``ISIC_2019_Training_Metadata.csv``.
        progress: show a progress bar.
        workers: processes rendering the views; every view draws from its own keyed streams,
            so the bytes are the same for any number of workers.

    Returns:
        ``count``, ``per_class`` image counts, ``lesions``, ``marked`` images, ``seconds``.
    """
    start = time.perf_counter()
    if cfg.marker.label is not None and cfg.marker.kind not in ("ink", "ruler"):
        raise ValueError(f"synth.marker.kind: {cfg.marker.kind!r} is not ink or ruler")
    rng = _rng(cfg.seed, ALLOC)
    lesions = [
        (label, k)
        for label, n in _allocate(cfg.class_mix, cfg.count).items()
        for k in _lesion_sizes(n, cfg.images_per_lesion, rng)
    ]
    lesions = [lesions[i] for i in rng.permutation(len(lesions))]
    views = [(j, v) for j, (_, k) in enumerate(lesions) for v in range(k)]
    views = [views[i] for i in rng.permutation(len(views))]
    marked = np.zeros(len(views), bool)
    if cfg.marker.label is not None:
        own = [i for i, (j, _) in enumerate(views) if lesions[j][0] == cfg.marker.label]
        marked[rng.permutation(own)[: round(cfg.marker.fraction * len(own))]] = True

    demo = [_demography(label, _rng(cfg.seed, META, j)) for j, (label, _) in enumerate(lesions)]
    truth = [["image", *ISIC_CLASSES]]
    meta = [["image", "age_approx", "anatom_site_general", "lesion_id", "sex"]]
    jobs: list[tuple] = []  # (image_id, label, lesion, view, marker) per file pair
    for i, (j, v) in enumerate(views):
        image_id, label = f"ISIC_{i:07d}", lesions[j][0]
        truth.append([image_id] + ["1.0" if c == label else "0.0" for c in ISIC_CLASSES])
        meta.append([image_id, demo[j][0], demo[j][1], f"HAM_{j + 1:07d}", demo[j][2]])
        jobs.append((image_id, label, j, v, cfg.marker.kind if marked[i] else None))
    with atomic_dir(out_root) as tmp:
        (tmp / IMAGES_DIR).mkdir()
        chunks = [
            (chunk, tmp / IMAGES_DIR, cfg.seed, cfg.image_size, cfg.difficulty)
            for chunk in _lesion_chunks(jobs, _CHUNK)
        ]
        pool = ProcessPoolExecutor(max_workers=workers) if workers > 1 and len(chunks) > 1 else None
        try:
            done = pool.map(_write_chunk, chunks) if pool else map(_write_chunk, chunks)
            with Progress(console=console, disable=not progress) as bar:
                task = bar.add_task("synth images", total=len(jobs))
                for written in done:
                    bar.advance(task, written)
        finally:
            if pool:
                pool.shutdown(cancel_futures=True)
        for name, rows in ((GROUND_TRUTH, truth), (METADATA, meta)):
            with open(tmp / name, "w", newline="") as fh:
                csv.writer(fh, lineterminator="\n").writerows(rows)
    labels = [lesions[j][0] for j, _ in views]
    return {
        "count": len(views),
        "per_class": {c: labels.count(c) for c in ISIC_CLASSES if c in labels},
        "lesions": len(lesions),
        "marked": int(marked.sum()),
        "seconds": round(time.perf_counter() - start, 2),
    }


def run(p: Params) -> dict[str, Any]:
    """The ``synth`` stage: draw the set into ``data/raw/synthetic``, write its summary."""
    summary = generate(p.synth, paths.SYNTH_ROOT, workers=p.synth.workers)
    write_json(paths.METRICS / "synth.json", summary)
    console.print(f"synth: {summary['count']} images -> {paths.SYNTH_ROOT}")
    return summary


if __name__ == "__main__":
    raise SystemExit(main("synth"))
