"""Prepare: decode every image once into a memory-mappable cache that training reads.

Decoding a JPEG and resizing it costs far more than a training step of a small model, so it is
done once per dataset version: each split becomes ``<split>_images.npy`` (N, S, S, 3) uint8,
``<split>_masks.npy`` (N, S, S) uint8 in {0, 1}, and ``<split>.parquet`` (the rows, in order,
with ``label_idx``). ``np.load(..., mmap_mode="r")`` then serves batches without decoding.

:func:`decode_one` is the one preprocessing function of the project: the cache, ``predict``,
``explain-batch`` and the external evaluation all decode through it, so an image is seen the
same way everywhere, colour constancy (``prepare.color_constancy``) included.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageOps
from rich.progress import Progress

from tasks import paths
from tasks.config import Params, PrepareConfig
from tasks.io import atomic_dir, write_json
from tasks.labels import ISIC_CLASSES
from tasks.progress import progress_bar
from tasks.split import SPLITS, read_split
from tasks.stage import console, main

_HIGH_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}


class PrepareError(ValueError):
    """An image that passed validation still failed to decode, or a cache params do not name."""


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB, upright.

    EXIF orientation is applied first (phone photos are often stored sideways). 16-bit and
    float greyscale are rescaled by their actual range instead of clipped, CMYK is converted,
    and transparency is composited onto white rather than dropped to black.
    """
    img = ImageOps.exif_transpose(img)
    if img.mode in _HIGH_BIT_MODES:
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in {"RGBA", "LA", "PA"}:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def square(img: Image.Image, size: int, resize: str, resample: int) -> Image.Image:
    """Center-crop to a square (``center_crop``) or stretch (``squash``), then resize."""
    if resize == "center_crop":
        w, h = img.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
    return img.resize((size, size), resample=resample, reducing_gap=3.0)


COLOR_CONSTANCY = ("none", "shades_of_gray")
SHADES_OF_GRAY_P = 6


def shades_of_gray(rgb: np.ndarray, p: int = SHADES_OF_GRAY_P) -> np.ndarray:
    """Shades of Gray colour constancy (Finlayson & Trezzi 2004) of uint8 RGB ``(..., H, W, 3)``.

    The illuminant of each channel is estimated as the Minkowski p-norm mean of its pixels
    (``p = 6``: between grey-world, p = 1, and max-RGB, p = inf, as in Barata et al. 2015 and
    the ISIC 2018 / 2019 winners), and each channel is scaled so that the illuminant becomes
    neutral grey of the same brightness. Hand-written: it is a few numpy lines, and neither
    torchvision nor PIL offers it. Float64 throughout and one final rounding, so the same
    pixels give the same bytes on every path (cache, predict, evaluation).
    """
    x = np.asarray(rgb, dtype=np.float64)
    illuminant = np.power(np.mean(np.power(x, p), axis=(-3, -2), keepdims=True), 1.0 / p)
    illuminant = np.maximum(illuminant, 1e-6)
    gain = np.linalg.norm(illuminant, axis=-1, keepdims=True) / (np.sqrt(3.0) * illuminant)
    return np.clip(np.rint(x * gain), 0, 255).astype(np.uint8)


def color_constancy(rgb: np.ndarray, method: str) -> np.ndarray:
    """``prepare.color_constancy`` on resized uint8 RGB: ``none`` or ``shades_of_gray``.

    Applied after the resize (the illuminant of the square image the model sees, and a
    fraction of the cost at full resolution).
    """
    if method == "none":
        return np.asarray(rgb, dtype=np.uint8)
    if method == "shades_of_gray":
        return shades_of_gray(rgb)
    raise ValueError(f"color constancy must be one of {'|'.join(COLOR_CONSTANCY)}, got {method!r}")


def decode_one(
    image: Path,
    mask: Path | None,
    size: int,
    resize: str,
    color: str = "none",
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Decode, orient, resize and colour-correct one image (its mask with the same geometry).

    Args:
        color: ``prepare.color_constancy`` (``none`` | ``shades_of_gray``); inference reads it
            from the model bundle / ONNX metadata, never from params.yaml.
    """
    try:
        with Image.open(image) as img:
            rgb = square(to_rgb(img), size, resize, Image.Resampling.BICUBIC)
    except (OSError, ValueError, SyntaxError) as err:
        raise PrepareError(f"{image}: cannot decode ({err})") from err
    out_mask = np.zeros((size, size), dtype=np.uint8)
    has_mask = mask is not None
    if has_mask:
        with Image.open(mask) as m:
            m = ImageOps.exif_transpose(m).convert("L")
            m = square(m, size, resize, Image.Resampling.NEAREST)
            out_mask = (np.asarray(m) > 127).astype(np.uint8)
    return color_constancy(np.asarray(rgb, dtype=np.uint8), color), out_mask, has_mask


def _decode_chunk(args: tuple[list[tuple[Path, Path | None]], int, str, str]):
    items, size, resize, color = args
    results = [decode_one(i, m, size, resize, color) for i, m in items]
    return (
        np.stack([r[0] for r in results]),
        np.stack([r[1] for r in results]),
        [r[2] for r in results],
    )


def class_names(labels: pd.Series) -> list[str]:
    """Class order: ISIC order when every label is an ISIC name, else sorted folder names."""
    present = set(labels.dropna().unique())
    if present <= set(ISIC_CLASSES):
        return [c for c in ISIC_CLASSES if c in present]
    return sorted(present)


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def prepare_split(
    rows: pd.DataFrame,
    root: Path,
    out_dir: Path,
    split: str,
    classes: list[str],
    size: int,
    resize: str,
    workers: int,
    progress: Progress | None = None,
    color: str = "none",
) -> int:
    """Decode one split's rows into ``out_dir``; returns the number of images written."""
    n = len(rows)
    images = np.lib.format.open_memmap(
        out_dir / f"{split}_images.npy", mode="w+", dtype=np.uint8, shape=(n, size, size, 3)
    )
    masks = np.lib.format.open_memmap(
        out_dir / f"{split}_masks.npy", mode="w+", dtype=np.uint8, shape=(n, size, size)
    )
    items = [
        (root / p, (root / m) if isinstance(m, str) and m else None)
        for p, m in zip(rows["path"], rows["mask_path"], strict=True)
    ]
    chunk = 32
    jobs = [(items[s], size, resize, color) for s in _chunks(n, chunk)]
    has_mask: list[bool] = []
    task = progress.add_task(f"decoding {split}", total=n) if progress else None
    pool = ProcessPoolExecutor(max_workers=workers) if workers > 1 else None
    try:
        results = pool.map(_decode_chunk, jobs) if pool else map(_decode_chunk, jobs)
        for sl, (img, msk, flags) in zip(_chunks(n, chunk), results, strict=True):
            images[sl] = img
            masks[sl] = msk
            has_mask.extend(flags)
            if progress is not None:
                progress.advance(task, len(flags))
    finally:
        if pool:
            pool.shutdown()
    images.flush()
    masks.flush()
    del images, masks
    index = rows.reset_index(drop=True).copy()
    index["label_idx"] = [classes.index(label) for label in index["label"]]
    index["has_mask"] = has_mask
    index.to_parquet(out_dir / f"{split}.parquet", index=False)
    return n


def prepare(
    split_dir: str | Path,
    root: str | Path,
    out_dir: str | Path,
    size: int,
    resize: str = "center_crop",
    workers: int = 1,
    show_progress: bool = True,
    color: str = "none",
) -> dict:
    """Build the cache for every split; returns stage metrics (decode throughput included).

    ``color`` (``prepare.color_constancy``) is applied to the cached pixels and recorded in
    ``meta.json``, from where training copies it into the model bundle.
    """
    root = Path(root)
    splits = {s: read_split(split_dir, s) for s in SPLITS}
    classes = class_names(pd.concat([f["label"] for f in splits.values()]))
    start = time.perf_counter()
    with (
        atomic_dir(out_dir) as tmp,
        progress_bar(show_progress) as bar,
    ):
        counts = {
            s: prepare_split(frame, root, tmp, s, classes, size, resize, workers, bar, color)
            for s, frame in splits.items()
        }
        meta = {
            "classes": classes, "size": size, "resize": resize, "color_constancy": color,
            "counts": counts,
        }  # fmt: skip
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    seconds = time.perf_counter() - start
    total = sum(counts.values())
    return {
        "images": total,
        "seconds": round(seconds, 3),
        "decode_images_per_s": round(total / seconds, 1) if seconds else None,
        "size": size,
        "workers": workers,
    }


@dataclass(frozen=True)
class PreparedSplit:
    """A split of the cache: memory-mapped arrays plus the row table and the class list."""

    images: np.ndarray  # (N, S, S, 3) uint8, memory-mapped
    masks: np.ndarray  # (N, S, S) uint8 in {0, 1}; all zero where has_mask is False
    rows: pd.DataFrame  # manifest rows in array order, with label_idx and has_mask
    classes: list[str]
    color_constancy: str = "none"  # what prepare applied to the cached pixels
    resize: str = "center_crop"  # how prepare made the images square

    @property
    def labels(self) -> np.ndarray:
        return self.rows["label_idx"].to_numpy()


def open_split(prepared_dir: str | Path, split: str) -> PreparedSplit:
    """Open one split of the cache without reading it into memory."""
    d = Path(prepared_dir)
    meta = json.loads((d / "meta.json").read_text())
    return PreparedSplit(
        images=np.load(d / f"{split}_images.npy", mmap_mode="r"),
        masks=np.load(d / f"{split}_masks.npy", mmap_mode="r"),
        rows=pd.read_parquet(d / f"{split}.parquet"),
        classes=list(meta["classes"]),
        color_constancy=str(meta.get("color_constancy", "none")),
        resize=str(meta.get("resize", "center_crop")),
    )


def check_cache(prepared_dir: str | Path, cfg: PrepareConfig) -> None:
    """Refuse a cache that was not written with the ``prepare`` params in force.

    ``dvc repro`` keeps ``data/prepared`` current, but ``--no-repro`` (compare, tune) and a
    hand-run stage use it as it is: a cache left at 160 px by an earlier run would be trained
    on while params, MLflow and the report all say 96. The size and resize mode cannot be
    changed on load, so they must match. Colour constancy is not checked here: training
    applies it on load over an uncorrected cache and refuses the irreversible other way.

    Raises:
        PrepareError: naming ``meta.json``, the key, the cached and the requested value.
        FileNotFoundError: there is no cache.
    """
    path = Path(prepared_dir) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{Path(prepared_dir)}: no prepared cache; run `dvc repro prepare` first"
        )
    meta = json.loads(path.read_text())
    cached = {"size": meta.get("size"), "resize": meta.get("resize", "center_crop")}
    for key, want in (("size", cfg.size), ("resize", cfg.resize)):
        if cached[key] != want:
            raise PrepareError(
                f"{path}: the cache was prepared with {key} {cached[key]} but prepare.{key} is "
                f"{want}; run `dvc repro prepare` to rebuild it (--no-repro takes it as it is)"
            )


def run(p: Params) -> dict:
    """The ``prepare`` stage: decode every split image once into ``data/prepared``."""
    metrics = prepare(
        paths.SPLITS, p.dataset.root, paths.PREPARED, p.prepare.size, p.prepare.resize,
        p.prepare.workers, color=p.prepare.color_constancy,
    )  # fmt: skip
    write_json(paths.METRICS / "prepare.json", metrics)
    console.print(
        f"prepare: {metrics['images']} images at {metrics['decode_images_per_s']} images/s"
    )
    return metrics


if __name__ == "__main__":
    raise SystemExit(main("prepare"))
