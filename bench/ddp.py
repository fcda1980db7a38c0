"""Part 6: data-parallel training throughput, one process against two (or every GPU).

The real code path: :func:`tasks.train.train` in each process, joined by torchrun
(``python -m torch.distributed.run --standalone``) into a gloo (CPU) or nccl (CUDA) process
group, exactly as the train stage runs with ``train.distributed.nproc_per_node``. One process
is the single-process path, with no process group. The number is the training images per
second of an epoch (the ``images_per_s`` that :func:`tasks.train.train` records: the whole
split over the wall time of ``train_one_epoch``), the median over the epochs after the first.

On the CPU two processes share the cores: each runs ``threads / 2`` torch threads, and the
one-process run is timed both with one thread (the per-process share) and with all of them
(the fair comparison on the same cores). On CUDA, one process per GPU.

The workload is the project's own: a synthetic set rendered by ``synth``, split and prepared
at a small size, ``custom_cnn`` on the CPU (``--arch`` and ``--size`` on CUDA); augmentation
as params.yaml sets it, global batch ``--batch`` (split over the processes).

``python -m bench.ddp <project> <out.json>`` is the worker each process runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from statistics import median

from bench.common import REPO, Part, Settings


def _prepare(root: Path, overrides: list[str]) -> None:
    """synth -> manifest -> split -> prepare into ``root/data``, with params at ``root``."""
    import yaml

    from tasks.config import apply_override, load_params
    from tasks.ingest import build_manifest
    from tasks.prepare import prepare
    from tasks.split import split_manifest, write_splits
    from tasks.synth import generate

    tree = yaml.safe_load((REPO / "params.yaml").read_text())
    for text in overrides:
        apply_override(tree, text)
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    p = load_params(root / "params.yaml")
    generate(p.synth, root / "data/raw", progress=False)
    manifest = build_manifest(root / "data/raw", progress=False)
    frame, _ = split_manifest(manifest, p.split.fractions, p.split.seed)
    write_splits(frame, root / "data/splits")
    prepare(
        root / "data/splits", root / "data/raw", root / "data/prepared", p.prepare.size,
        show_progress=False,
    )  # fmt: skip


def _launch(project: Path, out: Path, processes: int, threads: int) -> dict:
    launcher = (
        ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
        if processes > 1
        else []
    )
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    (project / "checkpoint.pt").unlink(missing_ok=True)  # each run starts at epoch 1
    cmd = [sys.executable, *launcher, "-m", "bench.ddp", str(project), str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return json.loads(out.read_text())


def run(settings: Settings, part: Part) -> None:
    """Images/s of a training epoch with 1 process and with 2 (CPU) or every GPU (CUDA)."""
    import torch

    on_cuda = settings.on_cuda
    gpus = torch.cuda.device_count() if on_cuda else 0
    arch, size = (settings.arch, settings.size) if on_cuda else ("custom_cnn", 64)
    count, epochs = (96, 2) if settings.quick else (400, 4)
    if settings.quick:
        arch, size = "custom_cnn", 32
    many = max(gpus, 2) if on_cuda else 2
    batch = max(settings.batch // many, 1) * many
    overrides = [
        f"synth.count={count}",
        f"synth.image_size={max(size, 48)}",
        "synth.class_mix={NV: 0.5, MEL: 0.3, BCC: 0.2}",
        "validate.min_side=32",
        f"prepare.size={size}",
        f"model.arch={arch}",
        f"train.epochs={epochs}",
        f"train.batch_size={batch}",
        "train.warmup_epochs=0",
        f"train.device={'cuda' if on_cuda else 'cpu'}",
    ]
    project = settings.workdir / "ddp"
    _prepare(project, overrides)
    part.config.update(
        {
            "arch": arch,
            "size": size,
            "images": count,
            "epochs": epochs,
            "global_batch": batch,
            "launcher": "python -m torch.distributed.run --standalone",
            "backend": "nccl" if on_cuda else "gloo",
        }
    )
    runs = [(1, settings.threads, "1_process")]
    if not on_cuda and settings.threads > 1:
        runs.insert(0, (1, max(settings.threads // many, 1), "1_process_share"))
    runs.append((many, max(settings.threads // many, 1) if not on_cuda else 1, f"{many}_processes"))
    if on_cuda and gpus < 2:
        part.skip(f"{many}_processes_images_per_s", "images/s", "needs 2 GPUs")
        runs = runs[:-1]
    rates: dict[str, float] = {}
    for processes, threads, name in runs:
        result = _launch(project, settings.workdir / f"ddp-{name}.json", processes, threads)
        per_epoch = [h["images_per_s"] for h in result["history"]]
        rates[name] = median(per_epoch[1:] or per_epoch)
        part.add(
            f"{name}_images_per_s",
            rates[name],
            "images/s",
            reference="1_process_images_per_s" if processes > 1 else None,
            ratio=rates[name] / rates["1_process"] if processes > 1 else None,
            note=f"{processes} process(es) x {threads} torch thread(s); epochs {per_epoch}",
        )


def _worker(project: Path, out: Path) -> None:
    """One process of the measurement: train, and on rank 0 write the history."""
    from tasks import distributed
    from tasks.config import load_params
    from tasks.train import train

    p = load_params(project / "params.yaml")
    with distributed.process_group(p.train.distributed, p.train.device):
        result = train(
            p.model, p.train, project / "data/prepared", project / "checkpoint.pt", "bench",
            show_progress=False,
        )  # fmt: skip
        if distributed.is_main():
            out.write_text(json.dumps({"history": result.history}))


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), Path(sys.argv[2]))
