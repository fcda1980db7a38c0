"""The workload every part reads, and part 2: the data path, prepared cache vs original JPEGs.

The workload is made with the project's own stages' code, not stand-ins: dermoscopy-like JPEGs
drawn by the ``synth`` renderer at a real-data size (HAM10000's 600x450 by default, saved at the
``synth`` stage's JPEG quality), then decoded into the memory-mapped cache by
:func:`tasks.prepare.prepare_split`, so training and the explanations read exactly the layout
:func:`tasks.prepare.open_split` serves in the pipeline.

Part 2 answers what the ``prepare`` stage buys: images/s of "decode + augment" when the decode is
a memory-mapped read of the cache (what ``train`` does) against decoding the original JPEG with
the prepare stage's own decoder (:func:`tasks.prepare.decode_one`: EXIF, RGB, centre crop,
bicubic resize) every epoch, with the same training augmentations after both. Both sides run in
one process on warm files (page cache), so the comparison is decode work, not disk.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from bench.common import PASS, Part, Settings, Target, judge, measure_many

#: Issue target: batched GPU augmentation, images/s at 224 px (a ResNet-50 on a GPU takes ~2,600).
AUGMENT_TARGET = 10_000.0
#: JPEG quality of the synth stage's files (tasks.synth saves with quality=92).
JPEG_QUALITY = 92
CLASSES = ("NV", "MEL", "BCC", "BKL", "AK", "SCC", "VASC", "DF")


@dataclass(frozen=True)
class Workload:
    """Source JPEGs and the prepared cache made from them.

    Attributes:
        root: dataset root; ``rows["path"]`` is relative to it.
        files: the distinct JPEG files (the cache's rows cycle through them).
        rows: the cached rows in order (``path``, ``label``).
        prepared: the prepared folder (``train_images.npy`` ...), for ``open_split``.
        jpeg_size: (width, height) of the JPEGs.
        jpeg_kib: mean file size.
        prepare_seconds: wall time of :func:`tasks.prepare.prepare_split` over all rows.
        prepare_workers: its decode processes.
    """

    root: Path
    files: list[Path]
    rows: pd.DataFrame
    prepared: Path
    jpeg_size: tuple[int, int]
    jpeg_kib: float
    prepare_seconds: float
    prepare_workers: int


def make_workload(settings: Settings, rows: int, files: int) -> Workload:
    """Render ``files`` distinct JPEGs and prepare a cache of ``rows`` rows cycling them.

    The renderer draws a square; a non-square size is its centre crop, as a camera frame of
    the same scene would be. Labels cycle through eight ISIC classes.
    """
    from tasks.prepare import class_names, prepare_split
    from tasks.synth import render_lesion_image

    width, height = settings.jpeg_size
    root = settings.workdir / "dataset"
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names: list[Path] = []
    for i in range(files):
        label = CLASSES[i % len(CLASSES)]
        side = max(width, height)
        rgb, _ = render_lesion_image(label, rng, side, 0.5)
        top, left = (side - height) // 2, (side - width) // 2
        rel = Path("images") / f"BENCH_{i:05d}.jpg"
        Image.fromarray(rgb[top : top + height, left : left + width]).save(
            root / rel, quality=JPEG_QUALITY
        )
        names.append(rel)
    frame = pd.DataFrame(
        {
            "image_id": [f"BENCH_{i:07d}" for i in range(rows)],
            "path": [str(names[i % files]) for i in range(rows)],
            "mask_path": [None] * rows,
            "label": [CLASSES[(i % files) % len(CLASSES)] for i in range(rows)],
        }
    )
    classes = class_names(frame["label"])
    prepared = settings.workdir / "prepared"
    prepared.mkdir(parents=True, exist_ok=True)
    workers = max(1, min(4, settings.threads))
    start = time.perf_counter()
    prepare_split(frame, root, prepared, "train", classes, settings.size, "center_crop", workers)
    seconds = time.perf_counter() - start
    meta = {"classes": classes, "size": settings.size, "resize": "center_crop"}
    (prepared / "meta.json").write_text(json.dumps({**meta, "counts": {"train": rows}}))
    kib = float(np.mean([(root / n).stat().st_size for n in names])) / 1024
    return Workload(root, names, frame, prepared, (width, height), kib, seconds, workers)


def augment_batch(
    images: torch.Tensor, device: torch.device, augment, channels_last: bool
) -> torch.Tensor:
    """uint8 NHWC -> augmented, normalised NCHW on ``device``: the data half of a train step.

    The same operations, in the same order, as the first lines of
    :func:`tasks.train.train_one_epoch` (to the device, to float in [0, 1], the augmentations,
    normalisation), so timing this times that. The augmentations are
    :class:`tasks.train.BatchAugment`: one image at a time on the CPU, batched on CUDA.
    """
    from tasks.train import normalize

    x = images.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
    return normalize(augment(x), channels_last)


def run(settings: Settings, workload: Workload, part: Part) -> None:
    """Part 2: decode + augment images/s from the prepared cache vs from the JPEGs."""
    from bench.training import train_config
    from tasks.prepare import decode_one, open_split
    from tasks.train import _loader, build_augment

    device = torch.device(settings.device)
    cfg = train_config(settings)
    channels_last = cfg.channels_last
    augment = build_augment(cfg, settings.size)
    split = open_split(workload.prepared, "train")
    n = len(split.labels)
    batch = settings.batch
    loader = _loader(split, cfg, device, shuffle=False)  # the train stage's DataLoader
    paths = [workload.root / p for p in workload.rows["path"]]
    part.config.update(
        {
            "images": n,
            "batch": batch,
            "jpeg_size": list(workload.jpeg_size),
            "jpeg_mean_kib": round(workload.jpeg_kib, 1),
            "jpeg_quality": JPEG_QUALITY,
            "distinct_jpegs": len(workload.files),
            "cache_size": settings.size,
            "augment_device": device.type,
            "dataloader_workers": cfg.workers,
            "augment": {k: getattr(cfg.augment, k) for k in cfg.augment.__dataclass_fields__},
        }
    )

    def cache_read() -> None:
        for images, _labels in loader:
            images.to(device, non_blocking=True)

    def cache_augment() -> None:
        for images, labels in loader:
            augment_batch(images, device, augment, channels_last)
            labels.to(device, non_blocking=True)

    def jpeg_decode() -> None:
        for p in paths:
            decode_one(p, None, settings.size, "center_crop")

    def jpeg_augment() -> None:
        for start in range(0, n, batch):
            chunk = [
                decode_one(p, None, settings.size, "center_crop")[0]
                for p in paths[start : start + batch]
            ]
            augment_batch(torch.from_numpy(np.stack(chunk)), device, augment, channels_last)

    # The augmentations alone on one batch already on the device: the per-image v2 loop (the
    # CPU path) and the batched path (what CUDA runs), side by side.
    on_device = torch.from_numpy(np.array(split.images[: min(batch, n)])).to(device)
    on_device = on_device.permute(0, 3, 1, 2).float().div_(255.0)

    def augment_loop() -> None:
        augment(on_device, batched=False)

    def augment_batched() -> None:
        augment(on_device, batched=True)

    torch.manual_seed(0)
    fns = {
        "augment_loop": augment_loop,
        "augment_batched": augment_batched,
        "cache_read": cache_read,
        "cache_decode_augment": cache_augment,
        "jpeg_decode": jpeg_decode,
        "jpeg_decode_augment": jpeg_augment,
    }
    timings = measure_many(
        fns, device, warmup=1, repeats=settings.repeats, budget_s=settings.budget_s
    )
    rate = {k: n / t.median_s for k, t in timings.items()}
    part.add(
        "cache_decode_augment_images_per_s",
        rate["cache_decode_augment"],
        "images/s",
        reference="jpeg_decode_augment_images_per_s",
        ratio=rate["cache_decode_augment"] / rate["jpeg_decode_augment"],
        timing=timings["cache_decode_augment"],
        note="memory-mapped read + train_one_epoch's augmentations; ratio = cache / JPEG",
    )
    part.add(
        "jpeg_decode_augment_images_per_s",
        rate["jpeg_decode_augment"],
        "images/s",
        timing=timings["jpeg_decode_augment"],
        note=f"decode_one on {workload.jpeg_size[0]}x{workload.jpeg_size[1]} JPEGs + the same "
        "augmentations",
    )
    part.add(
        "cache_read_images_per_s",
        rate["cache_read"],
        "images/s",
        reference="jpeg_decode_images_per_s",
        ratio=rate["cache_read"] / rate["jpeg_decode"],
        timing=timings["cache_read"],
        note="the train stage's DataLoader over CachedImages only (no augmentation)",
    )
    part.add(
        "jpeg_decode_images_per_s",
        rate["jpeg_decode"],
        "images/s",
        timing=timings["jpeg_decode"],
        note=f"decode_one only (EXIF, RGB, centre crop, bicubic to {settings.size} px)",
    )
    part.add(
        "augment_share_of_cache_path",
        1.0 - rate["cache_decode_augment"] / rate["cache_read"],
        "fraction",
        note="share of the cache path's time spent in the augmentations",
    )
    rows = len(on_device)
    r_loop = rows / timings["augment_loop"].median_s
    r_batched = rows / timings["augment_batched"].median_s
    part.add(
        "augment_batched_images_per_s",
        r_batched,
        "images/s",
        reference="augment_loop_images_per_s",
        ratio=r_batched / r_loop,
        timing=timings["augment_batched"],
        note=f"tasks.train.batched_augment (per-sample parameters), batch {rows} "
        f"already on the {device.type}; ratio = batched / per-image loop",
    )
    part.add(
        "augment_loop_images_per_s",
        r_loop,
        "images/s",
        timing=timings["augment_loop"],
        note=f"the per-image torchvision v2 loop (the CPU path), same batch on the {device.type}",
    )
    on_cuda = device.type == "cuda"
    verdict = judge(r_batched, AUGMENT_TARGET, scope="gpu", on_cuda=on_cuda)
    part.targets.append(
        Target(
            "augment_gpu_images_per_s",
            f"batched augmentation >= {AUGMENT_TARGET:,.0f} images/s at {settings.size} px (GPU)",
            r_batched,
            AUGMENT_TARGET,
            ">=",
            "images/s",
            "gpu",
            verdict,
            ""
            if verdict == PASS
            else f"batched {r_batched:.4g} img/s vs the per-image loop's {r_loop:.4g} img/s "
            f"(batch {rows}); the loader alone runs at {rate['cache_read']:.4g} img/s",
        )
    )
    part.add(
        "prepare_decode_images_per_s",
        n / workload.prepare_seconds,
        "images/s",
        note=f"tasks.prepare.prepare_split, {workload.prepare_workers} worker process(es), "
        "paid once per dataset version",
    )
