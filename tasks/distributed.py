"""Data-parallel training over several processes: launch by torchrun, shard, gather, rank 0 writes.

``train.distributed.nproc_per_node > 1`` or ``nnodes > 1`` makes the train stage re-launch
itself through :mod:`torch.distributed.run` (torchrun's own argument parsing and elastic agent),
one worker per GPU; each worker runs the same ``python -m tasks.train`` on the resolved params,
joins the process group (``env://``, set up by torchrun) and trains a
:class:`~torch.nn.parallel.DistributedDataParallel` model. Started by hand as
``torchrun --nproc_per_node 8 -m tasks.train`` the stage sees torchrun's environment and does the
same without re-launching.

The rules every rank follows:

- ``train.batch_size`` is the **global** batch: each of ``W`` processes takes
  ``batch_size / W`` images per step, DDP averages the gradients, and so one step, the number of
  steps per epoch and the LR schedule are those of one process with the same ``batch_size``.
  The learning rate therefore needs no scaling when the process count changes.
- Each rank reads its share of the memory-mapped cache through a
  :class:`~torch.utils.data.DistributedSampler` over the positions of the one global index
  sequence (:class:`ShardedSampler`), so the shuffled and the class-balanced orders are the
  single-process ones, split between the ranks.
- Evaluation gathers every rank's logits (:func:`gather_predictions`) and drops the
  duplicates DistributedSampler pads with, so the metrics cover each image exactly once, on
  every rank (early stopping and the best epoch agree everywhere without another message).
- Only rank 0 logs to MLflow, writes checkpoints, bundles and ``run.json``, and prints;
  every rank reads the checkpoint to resume.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Sized
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DistributedSampler, RandomSampler, Sampler, SequentialSampler

if TYPE_CHECKING:
    from tasks.config import DistributedConfig, Params

T = TypeVar("T")


class DistributedError(RuntimeError):
    """A distributed setting that cannot work (batch does not split, SyncBatchNorm on the CPU)."""


def wants_launch(cfg: DistributedConfig) -> bool:
    """True when the params ask for several processes and this is not yet one of them."""
    return (cfg.nproc_per_node > 1 or cfg.nnodes > 1) and not in_worker()


def in_worker() -> bool:
    """True inside a process started by torchrun (its ``env://`` variables are set)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def active() -> bool:
    """True when a process group of more than one process is up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """Rank 0, the one process that logs, prints and writes (also true without a group)."""
    return rank() == 0


def resolve_backend(backend: str, device: str) -> str:
    """``auto``: nccl when the run is on CUDA, gloo on the CPU."""
    if backend != "auto":
        return backend
    on_cuda = device != "cpu" and torch.cuda.is_available()
    return "nccl" if on_cuda else "gloo"


def local_batch_size(batch_size: int, processes: int | None = None) -> int:
    """The images per step of one process: the global ``train.batch_size`` split evenly.

    Raises:
        DistributedError: the global batch does not split into equal parts.
    """
    processes = world_size() if processes is None else processes
    if batch_size % processes:
        raise DistributedError(
            f"train.batch_size {batch_size} is the global batch and must split evenly over "
            f"{processes} processes; choose a multiple of {processes}"
        )
    return batch_size // processes


@contextlib.contextmanager
def process_group(cfg: DistributedConfig, device: str) -> Iterator[None]:
    """Join torchrun's process group for the duration (nothing outside torchrun).

    On CUDA each process takes the GPU of its ``LOCAL_RANK``. Ranks other than 0 silence the
    stage console, so progress and messages appear once.
    """
    if not in_worker() or int(os.environ["WORLD_SIZE"]) < 2:
        yield
        return
    from tasks.stage import console

    backend = resolve_backend(cfg.backend, device)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    console.quiet = dist.get_rank() != 0
    try:
        yield
    finally:
        dist.destroy_process_group()


def rank_device(device: torch.device) -> torch.device:
    """This process's device: ``cuda:<LOCAL_RANK>`` under torchrun on CUDA, else ``device``."""
    if device.type == "cuda" and active():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def rank_seed(seed: int) -> int:
    """A seed of this rank: rank 0 keeps ``seed`` (the single-process value), others differ.

    Augmentations and dropout draw from torch's global RNG; the same seed on every rank would
    give the i-th image of every rank's batch the same crop, flip and mask.
    """
    return seed + 1_000_003 * rank()


def main_first(fn: Callable[[], T]) -> T:
    """Call ``fn`` on rank 0, then on the other ranks.

    Loading the checkpoint may quarantine an unreadable file; rank 0 does that alone, and the
    others then read what it left.
    """
    result = fn() if is_main() else None
    if active():
        dist.barrier()
    return fn() if not is_main() else result


class ShardedSampler(Sampler[int]):
    """This rank's share of a global sampler's sequence, cut by ``DistributedSampler``.

    Every rank draws the whole sequence of ``sampler`` (a ``RandomSampler`` or a
    ``WeightedRandomSampler`` on a generator seeded alike on every rank, so the sequences are
    equal), and a ``DistributedSampler`` over its *positions* (``shuffle=False``) gives this
    rank the positions ``rank, rank + W, ...``, padded to equal lengths by repeating the
    first ones.

    Written here because torch has no distributed weighted sampler: ``DistributedSampler``
    shards uniformly and ``WeightedRandomSampler`` does not shard. Drawing the global weighted
    sequence with the shared per-epoch seed and taking this rank's slice keeps the
    single-process distribution (each class drawn equally often over the global batch), the
    same global batches as one process with the same ``batch_size``, and the exact resume
    (the sequence depends only on the epoch's seed). Lightning and Catalyst ship the same
    wrapper (``DistributedSamplerWrapper``), but inside training frameworks this project does
    not otherwise use.
    """

    def __init__(self, sampler: Sampler[int], num_replicas: int, rank: int) -> None:
        self.sampler = sampler
        positions: Sized = range(len(sampler))  # type: ignore[arg-type]
        self.positions = DistributedSampler(
            positions,  # type: ignore[arg-type]
            num_replicas=num_replicas,
            rank=rank,
            shuffle=False,
            drop_last=False,
        )

    def __iter__(self) -> Iterator[int]:
        order = list(self.sampler)
        return (order[i] for i in self.positions)

    def __len__(self) -> int:
        return len(self.positions)


def shard_loader_args(dataset: Sized, batch_size: int, kw: dict[str, Any]) -> tuple[int, dict]:
    """DataLoader ``batch_size`` and keywords for this rank (unchanged without a group).

    ``shuffle=True`` becomes a ``RandomSampler`` on the same ``generator`` (what DataLoader
    builds itself), a given ``sampler`` stays the global one, and either is wrapped in a
    :class:`ShardedSampler`; the batch becomes the per-process share of the global batch.
    """
    if not active():
        return batch_size, kw
    kw = dict(kw)
    base = kw.pop("sampler", None)
    shuffle = kw.pop("shuffle", False)
    if base is None:
        base = (
            RandomSampler(dataset, generator=kw.get("generator"))  # type: ignore[arg-type]
            if shuffle
            else SequentialSampler(dataset)  # type: ignore[arg-type]
        )
    kw["sampler"] = ShardedSampler(base, world_size(), rank())
    return local_batch_size(batch_size), kw


def gather_predictions(
    loader: torch.utils.data.DataLoader, logits: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Every rank's logits and labels, in dataset order, each image once.

    Outside a group, or for a loader that is not sharded, returns the inputs. The padding
    duplicates of ``DistributedSampler`` land on their image's own row, so they count once.

    Raises:
        RuntimeError: an image was predicted by no rank (a sharding bug, never data).
    """
    sampler = loader.sampler
    if not active() or not isinstance(sampler, ShardedSampler):
        return logits, labels
    index = np.fromiter(iter(sampler), dtype=np.int64)
    parts: list[Any] = [None] * world_size()
    dist.all_gather_object(parts, (index, logits, labels))
    n = len(loader.dataset)  # type: ignore[arg-type]
    all_logits = np.zeros((n, *logits.shape[1:]), dtype=logits.dtype)
    all_labels = np.zeros(n, dtype=labels.dtype)
    seen = np.zeros(n, dtype=bool)
    for idx, part_logits, part_labels in parts:
        all_logits[idx] = part_logits
        all_labels[idx] = part_labels
        seen[idx] = True
    if not seen.all():
        raise RuntimeError(f"{int((~seen).sum())} of {n} images were predicted by no rank")
    return all_logits, all_labels


def mean_over_ranks(total: float, count: int, device: torch.device) -> float:
    """The mean of a per-sample sum over every rank's samples (``total / count`` alone)."""
    if not active():
        return total / max(count, 1)
    both = torch.tensor([total, float(count)], dtype=torch.float64, device=device)
    dist.all_reduce(both)
    return float(both[0] / both[1].clamp(min=1))


def wrap_model(
    model: nn.Module, device: torch.device, sync_batchnorm: bool, find_unused: bool = False
) -> nn.Module:
    """``model`` in DistributedDataParallel (itself without a group); BatchNorm synced on request.

    ``find_unused``: some parameters get no gradient in some steps (a frozen backbone). The
    returned wrapper is what trains; ``model`` itself stays the module that is evaluated,
    averaged and saved (:func:`revert_sync_batchnorm` undoes the conversion afterwards).

    Raises:
        DistributedError: ``sync_batchnorm`` on the CPU (torch's SyncBatchNorm runs on GPUs).
    """
    if not active():
        return model
    if sync_batchnorm:
        if device.type != "cuda":
            raise DistributedError(
                "train.distributed.sync_batchnorm needs CUDA (torch's SyncBatchNorm does not run "
                "on the CPU); set it to false"
            )
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(
        model, device_ids=ids, find_unused_parameters=find_unused
    )


def revert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """Plain ``BatchNorm2d`` modules again, sharing the synced ones' parameters and statistics.

    The bundle and the MLflow model must run where no process group exists; torch has the
    conversion one way only.
    """
    for name, child in list(model.named_children()):
        if isinstance(child, nn.SyncBatchNorm):
            plain = nn.BatchNorm2d(
                child.num_features, child.eps, child.momentum, child.affine,
                child.track_running_stats, device=child.weight.device if child.affine else None,
            )  # fmt: skip
            if child.affine:
                plain.weight, plain.bias = child.weight, child.bias
            plain.running_mean, plain.running_var = child.running_mean, child.running_var
            plain.num_batches_tracked = child.num_batches_tracked
            plain.train(child.training)
            setattr(model, name, plain)
        else:
            revert_sync_batchnorm(child)
    return model


def write_params(p: Params, folder: Path) -> Path:
    """The resolved params as a file the workers load (the overrides included)."""
    import yaml

    path = folder / "params.yaml"
    plain = json.loads(json.dumps(asdict(p)))  # tuples become lists
    path.write_text(yaml.safe_dump(plain, sort_keys=False))
    return path


def launch(p: Params, module: str) -> None:
    """Run ``python -m <module>`` under torchrun with the params' process counts.

    One node (``nnodes: 1``) uses torchrun's ``--standalone`` rendezvous on a free local port;
    several nodes meet at ``rdzv_endpoint`` (each node runs the same command).

    Raises:
        DistributedError: the global batch does not split; a worker stopped on bad input
            (exit code 2, its message printed above by rank 0).
        RuntimeError: a worker crashed or was killed.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args
    from torch.distributed.run import run as torchrun

    cfg = p.train.distributed
    local_batch_size(p.train.batch_size, cfg.nproc_per_node * cfg.nnodes)
    with tempfile.TemporaryDirectory(prefix="dermaflow-ddp-") as folder:
        params = write_params(p, Path(folder))
        rendezvous = (
            ["--standalone"]
            if cfg.nnodes == 1
            else ["--rdzv-backend=c10d", f"--rdzv-endpoint={cfg.rdzv_endpoint}"]
        )
        args = parse_args(
            [
                f"--nnodes={cfg.nnodes}",
                f"--nproc-per-node={cfg.nproc_per_node}",
                *rendezvous,
                "-m",
                module,
                "--params",
                str(params),
            ]
        )
        try:
            torchrun(args)
        except ChildFailedError as err:
            codes = sorted({f.exitcode for f in err.failures.values()})
            if codes == [2]:
                raise DistributedError(
                    f"distributed training stopped: {len(err.failures)} worker(s) exited with "
                    "code 2 (bad input; the message is above)"
                ) from None
            raise RuntimeError(
                f"distributed training failed: worker exit codes {codes} "
                f"(ranks {sorted(err.failures)}); see the log above"
            ) from err
