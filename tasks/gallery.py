"""Pictures of explanations: overlays, outlines, and the HTML pages (Jinja templates).

The explain stage and ``dermaflow explain-batch`` write the same kind of page: one row per
image (the input, every method's overlay at one layer, the plain-language sentence), so both
call :func:`write_gallery`, which renders ``templates/gallery.html.j2``; they differ only in
the words they pass (caption lines, heading, unreadable files). ``dermaflow compare``'s report
is ``templates/compare_report.html.j2``, rendered by the same :func:`render` (autoescaping on,
so no page builds HTML by string concatenation).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from jinja2 import Environment, FileSystemLoader, select_autoescape
from matplotlib import colormaps
from PIL import Image
from skimage.segmentation import find_boundaries

TEMPLATES = Path(__file__).parent / "templates"
GALLERY_TEMPLATE = "gallery.html.j2"


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Heatmap (jet) over the image, as uint8 RGB."""
    colour = colormaps["jet"](heat)[..., :3]
    mixed = (1 - alpha) * image.astype(np.float32) / 255.0 + alpha * colour
    return (np.clip(mixed, 0, 1) * 255).astype(np.uint8)


def outline(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The image with the lesion mask's boundary drawn in cyan."""
    out = image.copy()
    out[find_boundaries(mask.astype(bool), mode="inner")] = (0, 255, 255)
    return out


def save_png(array: np.ndarray, path: Path, scale: int = 1) -> None:
    """A uint8 RGB array as PNG, enlarged ``scale`` times with nearest-neighbour pixels.

    Fast zlib compression (level 1): a run writes hundreds of overlays, and the default level
    spends several times longer for files a few percent smaller; the pixels are the same.
    """
    img = Image.fromarray(array)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    img.save(path, compress_level=1)


def overlay_name(image_id: str, method: str, layer: str | None) -> str:
    """``<image_id>__<method>__<layer>``: the key in ``heatmaps.npz`` and the overlay's stem."""
    return f"{image_id}__{method}__{layer or 'input'}"


@dataclass(frozen=True)
class Cell:
    """One overlay in a row: its file and the hover text (the method's sentence)."""

    src: str
    title: str


@dataclass(frozen=True)
class Row:
    """One image: its picture, caption lines, one cell per column (None: no map), text."""

    image: str
    caption: list[str]
    cells: list[Cell | None]
    text: str
    css: str = ""


def write_gallery(
    path: Path,
    table: pd.DataFrame,
    layer: str,
    *,
    heading: str,
    caption: Callable[[pd.Series], list[str]],
    intro: str = "",
    order: Sequence[str] | None = None,
    css: Callable[[pd.Series], str] | None = None,
    errors: Sequence[str] = (),
    title: str = "dermaflow explanations",
) -> None:
    """The gallery page of ``table`` (rows: image x method x layer with ``image_id``, ``text``).

    Args:
        path: the HTML file to write; overlays are linked as ``overlays/<name>.png`` beside it
            and the input as ``overlays/<image_id>.png``.
        table: the explanations table; rows of ``layer`` and input-level attributions are
            shown, one column per method, in the table's order.
        layer: the CAM layer to show.
        heading: the page's title line.
        caption: the lines under an image's picture, from its first row.
        intro: a paragraph under the heading.
        order: image ids in display order (default: the table's order).
        css: a CSS class for an image's row, from its first row (e.g. misclassified).
        errors: lines listed under "Unreadable files".
        title: the browser tab's title.
    """
    shown = table[table["layer"].isin([layer, "input"])]
    columns = list(dict.fromkeys(shown["method"]))
    ids = list(dict.fromkeys(order if order is not None else shown["image_id"]))
    rows = []
    for image_id in ids:
        part = shown[shown["image_id"] == image_id]
        if part.empty:
            continue
        first = part.iloc[0]
        by_method = {r.method: r for r in part.itertuples()}
        cells = [
            Cell(f"overlays/{overlay_name(image_id, m, by_method[m].layer)}.png", by_method[m].text)
            if m in by_method
            else None
            for m in columns
        ]
        rows.append(
            Row(
                image=f"overlays/{image_id}.png",
                caption=caption(first),
                cells=cells,
                text=str(first["text"]),
                css=css(first) if css is not None else "",
            )
        )
    page = render(
        GALLERY_TEMPLATE,
        title=title,
        heading=heading,
        intro=intro,
        columns=columns,
        rows=rows,
        errors=errors,
    )
    path.write_text(page)


def render(template: str, **context: object) -> str:
    """A template of ``tasks/templates`` rendered with autoescaping (values are escaped)."""
    env = Environment(
        loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html", "j2"])
    )
    return env.get_template(template).render(**context)


def html_table(frame: pd.DataFrame) -> str:
    """A table as HTML for a template's ``| safe`` (pandas escapes the cells); empty: "(none)"."""
    if frame.empty:
        return "<p><em>(none)</em></p>"
    return frame.to_html(index=False, float_format=lambda v: f"{v:.3f}", na_rep="-", border=0)
