"""Data-parallel training under torchrun, on the CPU with gloo (two processes, tiny data).

- The train stage with ``train.distributed.nproc_per_node=2`` re-launches itself under
  torchrun, finishes, leaves a loadable bundle and one MLflow run, and its metrics count every
  val and test image exactly once.
- Two processes and one process with the same global batch give the same loss curves, and a
  two-process run SIGKILLed after epoch 2 resumes to the uninterrupted two-process result.
- With the lesion-mask side loss the same holds, and the mask head's weights match too.
- The sampler's sharding and the batch rule, without processes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import RandomSampler, WeightedRandomSampler

from tasks.distributed import DistributedError, ShardedSampler, local_batch_size
from tests.helpers import REPO, TINY, env, write_params

# One process and two processes sum the same global batch's gradients in another order (two
# half-batch means averaged by the all-reduce, vs one mean): float32 rounding, which Adam's
# normalisation then amplifies step by step. Seen on 2 CPU cores over 3 epochs: epoch 1's
# training loss equal to 7e-8 relative, epoch 3's to 1.5e-4, test logits to 0.0085 absolute
# (after 12 steps; the test runs 2 epochs, 8 steps). A real fault (ranks reading the same
# images, an image lost or doubled in the global batch, ranks not averaging gradients) moves
# epoch 1's loss by more than 1e-3.
FIRST_EPOCH_RTOL = 1e-5
CURVE_RTOL = 1e-3
LOGIT_ATOL = 0.05
# The lesion-mask head's weights after the same 2 epochs (|w| <= 0.04): measured 3.5e-8 apart
# with the head inside DDP, 4e-3 apart with each rank stepping on its own half-batch gradient
# (and epoch 1's loss then 3e-5 apart, past FIRST_EPOCH_RTOL).
HEAD_ATOL = 1e-4

# Augmentation off, dropout off, no class weights, float32 steps (bf16 autocast, on where the
# CPU has bf16 instructions, rounds each product to 8 bits and would swamp the summation
# order): the runs differ only in how the global batch is split. The class-balanced sampler
# is on: its sharding is what is compared.
# 144 images split 100 / 23 / 21: the training split halves evenly (DistributedSampler adds
# no padding image to the global batches), the val and test splits do not (their padding
# duplicate must be dropped from the gathered predictions).
EQUIVALENT = [
    *TINY,
    "synth.count=144",
    "train.epochs=2",
    "train.class_weights=none",
    "train.weighted_sampler=true",
    "train.augment.crop_scale=[1.0, 1.0]",
    "train.augment.hflip=false",
    "train.augment.vflip=false",
    "train.augment.rotation=0",
    "train.augment.color_jitter=0.0",
    "model.dropout=0.0",
    "train.amp=none",
]


def _prepare_project(root: Path, overrides: list[str]) -> None:
    """synth -> manifest -> split -> prepare, in-process, into the stage's own layout."""
    from tasks.config import load_params
    from tasks.ingest import build_manifest
    from tasks.prepare import prepare
    from tasks.split import split_manifest, write_splits
    from tasks.synth import generate

    p = load_params(write_params(root / "params.yaml", overrides))
    generate(p.synth, root / "data/raw", progress=False)
    manifest = build_manifest(root / "data/raw", progress=False)
    manifest.to_parquet(root / "data/manifest.parquet", index=False)
    frame, _ = split_manifest(manifest, p.split.fractions, p.split.seed)
    write_splits(frame, root / "data/splits")
    prepare(
        root / "data/splits", root / "data/raw", root / "data/prepared", 32, show_progress=False
    )


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    _prepare_project(root, EQUIVALENT)
    return root


# ``python script.py`` trains in one process; under torchrun the same script joins the
# process group. custom_cnn with its BatchNorm layers replaced by identities: per-process
# batch statistics would otherwise differ from the global batch's by design.
WORKER = textwrap.dedent("""
    import json, os, signal, sys
    from torch import nn
    import tasks.train as T
    from tasks import distributed
    from tasks.config import load_params

    build = T.build_model

    def without_batchnorm(*args, **kwargs):
        model = build(*args, **kwargs)
        for module in list(model.modules()):
            for name, child in module.named_children():
                if isinstance(child, nn.BatchNorm2d):
                    setattr(module, name, nn.Identity())
        return model

    T.build_model = without_batchnorm
    root, checkpoint, out, kill_after = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    p = load_params(os.path.join(root, "params.yaml"))

    def on_epoch(record):
        if record["epoch"] == kill_after and distributed.is_main():
            os.kill(os.getpid(), signal.SIGKILL)

    with distributed.process_group(p.train.distributed, p.train.device):
        r = T.train(p.model, p.train, os.path.join(root, "data/prepared"), checkpoint, "v1",
                    on_epoch=on_epoch, show_progress=False)
        if distributed.is_main():
            with open(out, "w") as f:
                json.dump({"history": r.history, "resumed_from": r.resumed_from,
                           "test_logits": r.test_logits.tolist(),
                           "test_labels": r.test_labels.tolist(),
                           "mask_images": r.extra.get("mask_images"),
                           "processes": distributed.world_size()}, f)
""")


def _train(project: Path, tmp: Path, name: str, processes: int, kill_after: int = 0):
    script = tmp / "worker.py"
    script.write_text(WORKER)
    launcher = (
        ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
        if processes > 1
        else []
    )
    out = tmp / f"{name}.json"
    args = [str(project), str(tmp / f"{name}.pt"), str(out), str(kill_after)]
    proc = subprocess.run(
        [sys.executable, *launcher, str(script), *args],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    result = json.loads(out.read_text()) if out.exists() else None
    return proc, result


def _assert_same_training(one: dict, two: dict) -> None:
    """One and two processes trained alike: loss curves, test labels' order and logits."""
    first = two["history"][0]["train_loss"], one["history"][0]["train_loss"]
    np.testing.assert_allclose(*first, rtol=FIRST_EPOCH_RTOL)
    for key in ("train_loss", "val_loss"):
        curve_one = [h[key] for h in one["history"]]
        curve_two = [h[key] for h in two["history"]]
        np.testing.assert_allclose(curve_two, curve_one, rtol=CURVE_RTOL, err_msg=key)
    assert one["history"][0]["train_loss"] != one["history"][-1]["train_loss"]  # it trained
    assert two["test_labels"] == one["test_labels"]  # gathered back into dataset order
    np.testing.assert_allclose(two["test_logits"], one["test_logits"], rtol=0, atol=LOGIT_ATOL)


@pytest.mark.slow
def test_two_processes_match_one_and_resume_after_a_kill(project, tmp_path):
    one_proc, one = _train(project, tmp_path, "one", 1)
    assert one_proc.returncode == 0, one_proc.stderr[-3000:]
    two_proc, two = _train(project, tmp_path, "two", 2)
    assert two_proc.returncode == 0, two_proc.stderr[-3000:]
    assert one["processes"] == 1 and two["processes"] == 2

    # Same global batch (32 = 2 x 16), same class-balanced order: the same loss curves.
    _assert_same_training(one, two)

    # Rank 0 SIGKILLed right after epoch 1's checkpoint: torchrun tears the group down.
    killed_proc, killed = _train(project, tmp_path, "killed", 2, kill_after=1)
    assert killed_proc.returncode != 0 and killed is None
    state = torch.load(tmp_path / "killed.pt", weights_only=True)
    assert state["epoch"] == 0  # 0-based: epoch 1 is done

    resumed_proc, resumed = _train(project, tmp_path, "killed", 2)
    assert resumed_proc.returncode == 0, resumed_proc.stderr[-3000:]
    assert resumed["resumed_from"] == 1 and two["resumed_from"] is None
    assert [h["epoch"] for h in resumed["history"]] == [1, 2]
    # Every rank reseeds each epoch from (seed, epoch, rank) and loads the same checkpoint, and
    # gloo sums two ranks' gradients in a fixed order: the resumed run is the uninterrupted one.
    assert resumed["history"][-1]["train_loss"] == two["history"][-1]["train_loss"]
    np.testing.assert_array_equal(resumed["test_logits"], two["test_logits"])


@pytest.mark.slow
def test_the_mask_loss_trains_alike_on_one_and_two_processes(project, tmp_path):
    """The lesion-mask head trains in its own DDP wrapper: two processes match one.

    Outside DDP each rank's head would step on its own half-batch gradient: the two-process
    head would then leave the one-process head by far more than float rounding, and its loss
    with it.
    """
    import shutil

    root = tmp_path / "mask"
    shutil.copytree(project / "data", root / "data")
    write_params(root / "params.yaml", [*EQUIVALENT, "train.mask_loss=0.5"])
    one_proc, one = _train(root, tmp_path, "one", 1)
    assert one_proc.returncode == 0, one_proc.stderr[-3000:]
    two_proc, two = _train(root, tmp_path, "two", 2)
    assert two_proc.returncode == 0, two_proc.stderr[-3000:]
    assert one["mask_images"] == two["mask_images"] == 100  # every training image's mask

    _assert_same_training(one, two)
    heads = [
        torch.load(tmp_path / f"{n}.pt", weights_only=True)["mask_head"] for n in ("one", "two")
    ]
    assert heads[0].keys() == heads[1].keys() == {"conv.weight", "conv.bias"}
    for name in heads[0]:
        np.testing.assert_allclose(heads[1][name], heads[0][name], rtol=0, atol=HEAD_ATOL)


@pytest.mark.slow
def test_train_stage_on_two_processes(project, tmp_path):
    """``python -m tasks.train`` with nproc_per_node=2: bundle, predictions once, one MLflow run."""
    import shutil

    import pandas as pd

    from tasks.models import load_bundle
    from tasks.prepare import open_split

    root = tmp_path / "stage"
    shutil.copytree(project / "data", root / "data")
    write_params(
        root / "params.yaml",
        [*TINY, "synth.count=144", "train.epochs=1", "train.distributed.nproc_per_node=2"],
    )
    proc = subprocess.run(
        [sys.executable, "-m", "tasks.train"],
        cwd=root,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    # Rank 0 alone prints progress: the epoch line once.
    assert proc.stderr.count("train: epoch 1/1") == 1, proc.stderr[-4000:]

    model, meta = load_bundle(root / "models/model.pt")
    assert set(meta["classes"]) == {"BCC", "MEL", "NV"}
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 3)

    for split in ("val", "test"):
        cached = open_split(root / "data/prepared", split)
        preds = np.load(root / f"data/predictions/{split}.npz", allow_pickle=False)
        # Each image once, in the cache's order: rank r predicted rows r, r + 2, ... and the
        # padding duplicate of an odd-sized split is dropped, so every label is in its row.
        assert len(preds["logits"]) == len(cached.labels) == len(set(preds["image_ids"]))
        np.testing.assert_array_equal(preds["labels"], cached.labels)
        assert list(preds["image_ids"]) == list(cached.rows["image_id"])
    summary = json.loads((root / "metrics/train.json").read_text())
    assert np.asarray(summary["test"]["confusion_matrix"]).sum() == len(
        pd.read_parquet(root / "data/splits/test.parquet")
    )

    from mlflow.tracking import MlflowClient

    info = json.loads((root / "models/run.json").read_text())
    client = MlflowClient(tracking_uri=info["tracking_uri"])
    experiment = client.get_run(info["run_id"]).info.experiment_id
    runs = client.search_runs(experiment_ids=[experiment])
    assert len(runs) == 1  # rank 1 opened no run
    run = runs[0]
    assert run.data.tags["processes"] == "2"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert steps == [1]  # logged once per epoch, by rank 0


def test_sharded_sampler_splits_the_global_weighted_order():
    """Each rank's slice interleaves back into the one global draw; padding evens lengths."""
    weights = torch.tensor([1.0, 1.0, 4.0, 0.5, 2.0, 1.0, 3.0])

    def draw(rank: int) -> list[int]:
        gen = torch.Generator().manual_seed(7)
        sampler = WeightedRandomSampler(weights, len(weights), generator=gen)
        return list(ShardedSampler(sampler, num_replicas=2, rank=rank))

    gen = torch.Generator().manual_seed(7)
    whole = list(WeightedRandomSampler(weights, len(weights), generator=gen))
    first, second = draw(0), draw(1)
    assert len(first) == len(second) == 4
    interleaved = [i for pair in zip(first, second, strict=True) for i in pair]
    assert interleaved[:7] == whole and interleaved[7] == whole[0]  # one padding duplicate

    gen = torch.Generator().manual_seed(3)
    shuffled = ShardedSampler(RandomSampler(range(6), generator=gen), num_replicas=3, rank=2)
    assert len(shuffled) == 2


def test_global_batch_must_split_over_the_processes():
    assert local_batch_size(64, 8) == 8
    with pytest.raises(DistributedError, match="batch_size 30 .* over 4 processes"):
        local_batch_size(30, 4)


def test_sync_batchnorm_reverts_to_plain_batchnorm():
    from tasks.distributed import revert_sync_batchnorm

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    weight = synced[1].weight
    plain = revert_sync_batchnorm(synced)
    assert type(plain[1]) is nn.BatchNorm2d and plain[1].weight is weight
    assert plain.eval()(torch.zeros(1, 3, 8, 8)).shape == (1, 4, 6, 6)
