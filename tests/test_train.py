"""Training: exact resume after a kill, NaN guard, and the MLflow lineage run on real data."""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks.train import TrainingError, train
from tests.helpers import REPO, env, prepare_tiny, run, write_params


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, object]:
    """A prepared 32-px synthetic set (3 classes, 150 images) and the matching params."""
    root = tmp_path_factory.mktemp("tiny")
    return root, prepare_tiny(root)


def _cfg(p, **train_changes):
    return p.model, dataclasses.replace(p.train, **train_changes)


def test_resume_after_kill_equals_uninterrupted_run(tiny, tmp_path):
    root, p = tiny
    model_cfg, train_cfg = _cfg(p, epochs=3)
    full = train(
        model_cfg, train_cfg, root / "prepared", tmp_path / "full.pt", "v1", show_progress=False
    )

    # A separate process trains the same config and is SIGKILLed right after epoch 2's
    # checkpoint is on disk: no cleanup, no exception handling, like an OOM kill.
    script = textwrap.dedent(f"""
        import os, signal
        from tasks.config import load_params
        from tasks.train import train
        import dataclasses
        p = load_params({str(root / "params.yaml")!r})
        cfg = dataclasses.replace(p.train, epochs=3)
        def die(record):
            if record["epoch"] == 2:
                os.kill(os.getpid(), signal.SIGKILL)
        train(p.model, cfg, {str(root / "prepared")!r}, {str(tmp_path / "killed.pt")!r}, "v1",
              on_epoch=die, show_progress=False)
    """)
    proc = subprocess.run([sys.executable, "-c", script], env=env(), cwd=REPO)
    assert proc.returncode == -signal.SIGKILL
    assert (tmp_path / "killed.pt").exists()

    resumed = train(
        model_cfg, train_cfg, root / "prepared", tmp_path / "killed.pt", "v1", show_progress=False
    )
    assert resumed.resumed_from == 2 and full.resumed_from is None
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    assert resumed.test["balanced_accuracy"] == full.test["balanced_accuracy"]
    assert resumed.history[-1]["train_loss"] == full.history[-1]["train_loss"]
    np.testing.assert_array_equal(resumed.test_logits, full.test_logits)


def test_checkpoint_of_another_config_is_not_resumed(tiny, tmp_path):
    root, p = tiny
    model_cfg, cfg = _cfg(p, epochs=1)
    train(model_cfg, cfg, root / "prepared", tmp_path / "ck.pt", "v1", show_progress=False)
    again = train(model_cfg, cfg, root / "prepared", tmp_path / "ck.pt", "v2", show_progress=False)
    assert again.resumed_from is None  # other data version: start fresh


def test_non_finite_loss_stops_with_a_clear_error(tiny, tmp_path):
    root, p = tiny
    model_cfg, cfg = _cfg(p, epochs=2, optimizer="sgd", lr=1e12, warmup_epochs=0)
    with pytest.raises(TrainingError, match=r"loss became (nan|inf).*lower train.lr"):
        train(model_cfg, cfg, root / "prepared", tmp_path / "nan.pt", "v1", show_progress=False)


class _Scripted(torch.nn.Module):
    """Cross-entropy whose ``bad``-th call (1-based) returns ``value`` instead."""

    def __init__(self, bad: int, value: float) -> None:
        super().__init__()
        self.calls, self.bad, self.value, self.seen = 0, bad, value, []

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        loss = torch.nn.functional.cross_entropy(logits, y)
        if self.calls == self.bad:
            loss = loss * self.value
        self.seen.append(float(loss.detach()))
        return loss


def _one_epoch(p, loss_fn, batches: int = 5):
    """train_one_epoch on ``batches`` random uint8 batches of 4 (one of 3) on the CPU."""
    from tasks.train import build_augment, train_one_epoch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3))
    sizes = [4] * (batches - 1) + [3]
    loader = [
        (torch.randint(0, 256, (n, 8, 8, 3), dtype=torch.uint8), torch.randint(0, 3, (n,)))
        for n in sizes
    ]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    cfg = dataclasses.replace(p.train, channels_last=False, amp="none")
    mean = train_one_epoch(
        model, loader, loss_fn, optimizer, scheduler, torch.device("cpu"), cfg,
        build_augment(cfg, 8), epoch=0,
    )  # fmt: skip
    return mean, sizes


@pytest.mark.parametrize("bad", [2, 5])  # in the middle, and the last step (checked at the end)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_loss_is_reported_at_its_own_step(tiny, bad, value):
    """The check runs one step late (the host does not wait for each step) yet names the step."""
    _, p = tiny
    with pytest.raises(TrainingError, match=rf"loss became {value} at epoch 1, step {bad};"):
        _one_epoch(p, _Scripted(bad, value))


def test_the_epoch_loss_is_the_sample_weighted_mean_of_the_step_losses(tiny):
    _, p = tiny
    loss_fn = _Scripted(bad=0, value=1.0)
    mean, sizes = _one_epoch(p, loss_fn)
    assert len(loss_fn.seen) == len(sizes) == 5
    expected = sum(v * n for v, n in zip(loss_fn.seen, sizes, strict=True)) / sum(sizes)
    assert mean == pytest.approx(expected, rel=1e-12)  # summed in float64 on the device


def test_channels_last_changes_the_memory_layout_not_the_model(tiny, tmp_path):
    """NHWC on the CPU too (oneDNN's faster convolutions): the same training, other strides."""
    import torch

    root, p = tiny
    runs = {}
    for nhwc in (True, False):  # float32: bf16's rounding would swamp the summation order
        model_cfg, cfg = _cfg(p, epochs=1, channels_last=nhwc, amp="none")
        runs[nhwc] = train(
            model_cfg, cfg, root / "prepared", tmp_path / f"{nhwc}.pt", "v1", show_progress=False
        )
    convs = {
        nhwc: [m.weight for m in r.model.modules() if isinstance(m, torch.nn.Conv2d)]
        for nhwc, r in runs.items()
    }
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convs[True])
    assert not any(w.is_contiguous(memory_format=torch.channels_last) for w in convs[False])
    # Two Adam steps in float32 with other summation orders: Adam's first steps are nearly
    # sign steps, so rounding-level gradient differences move a logit by up to ~1 % of the
    # logit scale. The logits agree to 3 % of that scale and correlate at > 0.999; the
    # predictions are the same but for near-ties.
    a, b = runs[True].test_logits, runs[False].test_logits
    scale = float(np.abs(b).max())
    np.testing.assert_allclose(a, b, rtol=0, atol=0.03 * scale)
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.999
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.9
    assert runs[True].history[0]["train_loss"] == pytest.approx(
        runs[False].history[0]["train_loss"], rel=0.01
    )


def test_deterministic_training_without_the_nan_fill_is_bit_identical(tiny, tmp_path, monkeypatch):
    """Deterministic mode skips torch's NaN fill of new tensors (4-9 % of a CPU step): no kernel
    reads memory it did not write, so the weights and logits equal those of a run with the
    fill on, bit for bit (a kernel that did read it would give NaN with the fill)."""
    import tasks.train as train_module

    root, p = tiny
    model_cfg, cfg = _cfg(p, epochs=1)
    plain = train_module.seed_everything
    runs = {}
    for fill in (False, True):

        def seed(seed: int, deterministic: bool, fill: bool = fill) -> None:
            plain(seed, deterministic)
            torch.utils.deterministic.fill_uninitialized_memory = fill

        monkeypatch.setattr(train_module, "seed_everything", seed)
        runs[fill] = train(
            model_cfg, cfg, root / "prepared", tmp_path / f"{fill}.pt", "v1", show_progress=False
        )
    monkeypatch.setattr(train_module, "seed_everything", plain)
    plain(0, True)  # the process-wide flag as training leaves it
    assert torch.utils.deterministic.fill_uninitialized_memory is False
    np.testing.assert_array_equal(runs[False].test_logits, runs[True].test_logits)
    assert np.isfinite(runs[False].test_logits).all()
    weights = [r.model.state_dict() for r in (runs[False], runs[True])]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


@pytest.mark.slow
def test_mednode_training_run_lands_in_mlflow(mednode, tmp_path):
    """Real photos, folder layout, binary task: every stage by its CLI, then check MLflow."""
    write_params(
        tmp_path / "params.yaml",
        [
            f"dataset.root={mednode}",
            "dataset.layout=folder",
            "dataset.name=mednode",
            "validate.min_side=128",
            "prepare.size=32",
            "train.epochs=2",
            "train.batch_size=32",
            "train.class_weights=inverse",
        ],
    )
    for stage in ("ingest", "validate", "split", "prepare"):
        run(["dermaflow", stage], tmp_path)
    # Training reports live: each epoch's line reaches the terminal, and train.log, while the
    # stage still runs (epoch 2 and the MLflow logging are still ahead).
    proc = subprocess.Popen(
        ["dermaflow", "train"], cwd=tmp_path, env=env(), stderr=subprocess.PIPE, text=True
    )
    seen: list[str] = []
    for line in proc.stderr:
        seen.append(line)
        if "train: epoch 1/2" in line:
            assert proc.poll() is None, "the epoch line arrived only after the stage ended"
            assert "epoch=1 " in (tmp_path / "reports/train/train.log").read_text()
            break
    rest = proc.communicate()[1]
    assert proc.returncode == 0, "".join(seen) + rest
    assert "ETA" in "".join(seen)

    import mlflow
    from mlflow.tracking import MlflowClient

    info = json.loads((tmp_path / "models/run.json").read_text())
    assert info["tracking_uri"] == f"sqlite:///{tmp_path / 'mlruns/mlflow.db'}"
    client = MlflowClient(tracking_uri=info["tracking_uri"], registry_uri=info["tracking_uri"])
    r = client.get_run(info["run_id"])
    assert client.get_experiment(r.info.experiment_id).name == "mednode"
    assert r.data.params["model.arch"] == "custom_cnn"
    assert r.data.params["dataset.root"] == str(mednode)
    for tag in ("git_commit", "data_version", "dataset", "device", "torch_version"):
        assert r.data.tags[tag]
    # The run page shows its data: each split as an MLflow dataset with its context.
    inputs = {
        next(t.value for t in d.tags if t.key == "mlflow.data.context"): d.dataset
        for d in r.inputs.dataset_inputs
    }
    assert set(inputs) == {"train", "validation", "test"}
    assert inputs["test"].source and r.data.tags["data_version"] in inputs["test"].digest
    split_sizes = json.loads((tmp_path / "metrics/split.json").read_text())["images"]
    assert json.loads(inputs["train"].profile)["num_rows"] == split_sizes["train"]
    history = client.get_metric_history(r.info.run_id, "val_balanced_accuracy")
    assert [m.step for m in history] == [1, 2]
    for key in (
        "test_balanced_accuracy",
        "test_accuracy",
        "test_macro_f1",
        "test_auroc_macro",
        "test_recall_melanoma",
        "class_weight_melanoma",
    ):
        assert key in r.data.metrics
    assert r.data.metrics["class_weight_melanoma"] > r.data.metrics["class_weight_naevus"]

    def listed(path: str) -> set[str]:
        return {f.path for f in client.list_artifacts(r.info.run_id, path)}

    assert {
        "train/confusion_matrix.png",
        "train/confusion_matrix_normalized.png",
        "train/roc_curves.png",
        "train/training_curves.png",
        "train/train.log",
    } <= listed("train")
    assert {"data/validation.md", "data/validation.json", "data/contact_sheet.png"} <= listed(
        "data"
    )
    assert "data/split/split.json" in listed("data/split")
    assert "bundle/model.pt" in listed("bundle")

    name = info["registered_model"]  # one name per task: MED-NODE's two folder classes
    assert name.startswith("dermaflow-") and "-2cls-" in name
    version = client.get_model_version(name, info["model_version"])
    assert json.loads(version.tags["classes"]) == ["melanoma", "naevus"]
    assert version.tags["dataset"] == "mednode" and version.tags["data_version"]
    assert "custom_cnn trained on mednode" in version.description
    assert version.run_id == r.info.run_id
    mlflow.set_tracking_uri(info["tracking_uri"])
    model = mlflow.pytorch.load_model(f"models:/{name}/{info['model_version']}")
    import torch

    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 2)
    assert hasattr(model, "register_forward_hook")  # hookable for the CAM stage
    # A fresh process that never imported dermaflow loads the registered model by name: the
    # classes it pickles come with it (code_paths), not from this checkout.
    script = textwrap.dedent(f"""
        import sys
        import mlflow.pytorch, torch
        assert "tasks" not in sys.modules
        m = mlflow.pytorch.load_model("models:/{name}/{info["model_version"]}")
        print(m(torch.zeros(1, 3, 32, 32)).shape[1], sys.modules["tasks"].__file__)
    """)
    fresh = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path / "data",  # no tasks/ here, and the repo is not on sys.path
        env={**env(), "MLFLOW_TRACKING_URI": info["tracking_uri"]},
        capture_output=True,
        text=True,
    )
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    classes_out, tasks_file = fresh.stdout.split()
    assert classes_out == "2" and str(REPO) not in tasks_file
    preds = np.load(tmp_path / "data/predictions/test.npz")
    assert preds["logits"].shape[1] == 2 and len(preds["labels"]) == len(preds["image_ids"])


def test_the_mask_loss_trains_a_side_head_that_is_not_exported(tiny, tmp_path):
    """train.mask_loss: the head's loss changes the training, not the model that is saved."""
    root, p = tiny
    model_cfg, plain = _cfg(p, epochs=2)
    _, masked = _cfg(p, epochs=2, mask_loss=0.5, mask_layer="middle")
    a = train(model_cfg, plain, root / "prepared", tmp_path / "a.pt", "v1", show_progress=False)
    b = train(model_cfg, masked, root / "prepared", tmp_path / "b.pt", "v1", show_progress=False)
    assert a.model.state_dict().keys() == b.model.state_dict().keys()  # no head exported
    assert all(not m._forward_hooks for m in b.model.modules())  # nor its hook
    assert not np.array_equal(a.test_logits, b.test_logits)  # but the loss changed training
    head = torch.load(tmp_path / "b.pt", weights_only=True)["mask_head"]
    assert head["conv.weight"].shape[0] == 1 and head["conv.weight"].shape[2:] == (1, 1)
    assert "mask_head" not in torch.load(tmp_path / "a.pt", weights_only=True)

    # The head is part of the resumable state: stopped after epoch 1 and resumed, the run
    # ends where the uninterrupted one did (a fresh head would steer epoch 2 elsewhere).
    class Stop(Exception):
        pass

    def stop(record: dict) -> None:
        if record["epoch"] == 1:
            raise Stop

    cut = tmp_path / "cut.pt"
    with pytest.raises(Stop):
        train(model_cfg, masked, root / "prepared", cut, "v1", on_epoch=stop, show_progress=False)
    again = train(model_cfg, masked, root / "prepared", cut, "v1", show_progress=False)
    assert again.resumed_from == 1
    assert again.history[-1]["train_loss"] == b.history[-1]["train_loss"]  # epoch 2 itself
    np.testing.assert_array_equal(again.test_logits, b.test_logits)


def test_the_mask_loss_trains_on_the_masks_a_set_has_with_mask_missing_skip(tiny, tmp_path):
    """A cache whose first half of training images came without masks (all-zero, has_mask
    false): error refuses it, skip trains the head on the other half."""
    import shutil

    import pandas as pd

    root, p = tiny
    prepared = tmp_path / "prepared"
    shutil.copytree(root / "prepared", prepared)
    rows = pd.read_parquet(prepared / "train.parquet")
    half = len(rows) // 2
    rows.loc[rows.index[:half], "has_mask"] = False
    rows.to_parquet(prepared / "train.parquet")
    masks = np.load(prepared / "train_masks.npy")
    masks[:half] = 0
    np.save(prepared / "train_masks.npy", masks)
    model_cfg, strict = _cfg(p, epochs=1, mask_loss=0.5)
    with pytest.raises(TrainingError, match=rf"{half} of {len(rows)} have none"):
        train(model_cfg, strict, prepared, tmp_path / "a.pt", "v1", show_progress=False)
    _, lenient = _cfg(p, epochs=1, mask_loss=0.5, mask_missing="skip")
    got = train(model_cfg, lenient, prepared, tmp_path / "b.pt", "v1", show_progress=False)
    assert got.extra["mask_images"] == len(rows) - half
    assert np.isfinite(got.history[-1]["train_loss"])
    assert "mask_head" in torch.load(tmp_path / "b.pt", weights_only=True)
    # No mask at all: the same training as with the loss off, to the last logit.
    rows["has_mask"] = False
    rows.to_parquet(prepared / "train.parquet")
    np.save(prepared / "train_masks.npy", np.zeros_like(masks))
    none = train(model_cfg, lenient, prepared, tmp_path / "c.pt", "v1", show_progress=False)
    _, off = _cfg(p, epochs=1)
    plain = train(model_cfg, off, prepared, tmp_path / "d.pt", "v1", show_progress=False)
    assert none.extra["mask_images"] == 0
    np.testing.assert_array_equal(none.test_logits, plain.test_logits)


def test_the_mask_loss_refuses_images_without_masks(tiny, capsys):
    from tasks.prepare import open_split
    from tasks.train import _check_masks

    root, _ = tiny
    split = open_split(root / "prepared", "train")
    n = len(split.rows)
    assert _check_masks(split, "error") == n  # the synthetic set has every mask
    rows = split.rows.copy()
    rows.loc[rows.index[3], "has_mask"] = False
    partial = dataclasses.replace(split, rows=rows)
    with pytest.raises(TrainingError, match=r"1 of \d+ have none \(first: .*mask_missing: skip"):
        _check_masks(partial, "error")
    # skip: the images without a mask are counted out loud, not refused
    capsys.readouterr()
    assert _check_masks(partial, "skip") == n - 1
    said = " ".join(capsys.readouterr().err.split())
    assert f"1 of {n} training images have no lesion mask" in said and "is off" not in said
    rows["has_mask"] = False
    assert _check_masks(dataclasses.replace(split, rows=rows), "skip") == 0
    assert "so the mask loss is off" in " ".join(capsys.readouterr().err.split())


def test_the_mask_loss_counts_only_the_images_that_have_a_mask():
    import torch
    from torch import nn

    from tasks.train import MaskHead

    torch.manual_seed(0)
    layer = nn.Conv2d(3, 5, 3, padding=1)
    x = torch.randn(4, 3, 8, 8)
    masks = (torch.rand(4, 1, 8, 8) > 0.5).float()
    masks[[1, 3]] = 0  # two images came without a mask

    def loss(images: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        with MaskHead(layer, 5, 0.5) as head:
            head.conv.load_state_dict(reference.state_dict())
            layer(images)
            return head(m)

    reference = nn.Conv2d(5, 1, 1)
    kept = loss(x, masks)
    torch.testing.assert_close(kept, loss(x[[0, 2]], masks[[0, 2]]))  # the others add nothing
    target = nn.functional.adaptive_avg_pool2d(masks, (8, 8))
    plain = 0.5 * nn.functional.binary_cross_entropy_with_logits(reference(layer(x)), target)
    assert not torch.allclose(kept, plain)  # the unmasked images would pull towards "no lesion"
    full = masks.clone()
    full[[1, 3]] = 1.0
    torch.testing.assert_close(  # every image masked: the plain mean over the batch
        loss(x, full),
        0.5 * nn.functional.binary_cross_entropy_with_logits(reference(layer(x)), full),
    )
    with MaskHead(layer, 5, 0.5) as head:  # a batch without any mask: nothing to learn
        layer(x)
        none = head(torch.zeros_like(masks))
        none.backward()
    assert none.item() == 0.0 and not head.conv.weight.grad.any()


def test_cached_images_reach_loader_workers_by_file_name(tiny):
    """forkserver workers get the cache's path (a few hundred bytes), not a copy of its pixels."""
    import pickle

    import torch
    from torch.utils.data import DataLoader

    from tasks.prepare import open_split
    from tasks.train import CachedImages

    root, _ = tiny
    data = CachedImages(open_split(root / "prepared", "val"))
    blob = pickle.dumps(data)
    assert len(blob) < data.images[0].nbytes  # not even one image's pixels
    again = pickle.loads(blob)
    assert torch.equal(again[3][0], data[3][0]) and again[3][1] == data[3][1]
    batches = DataLoader(data, batch_size=8, num_workers=1, multiprocessing_context="forkserver")
    seen = torch.cat([images for images, _ in batches])
    assert torch.equal(seen, torch.from_numpy(np.array(data.images)))
    # With train.mask_loss the mask is a fourth channel (0 | 255), also sent by file name.
    masked = CachedImages(open_split(root / "prepared", "val"), masks=True)
    assert len(pickle.dumps(masked)) < data.images[0].nbytes
    image = pickle.loads(pickle.dumps(masked))[3][0]
    assert torch.equal(image[..., :3], data[3][0])
    assert torch.equal(image[..., 3], torch.from_numpy(np.array(masked.masks[3]) * 255))
    assert set(image[..., 3].unique().tolist()) == {0, 255}


AUTOCAST_RULE = [
    ("cpu", "bf16", True, torch.bfloat16),
    ("cpu", "bf16", False, None),  # emulated bf16 is 2-11x slower than float32
    ("cpu", "fp16", True, None),  # no fast CPU fp16 kernels
    ("cpu", "none", True, None),
    ("cuda", "bf16", False, torch.bfloat16),  # the CPU's instructions do not matter
    ("cuda", "fp16", False, torch.float16),
    ("cuda", "none", True, None),
]


@pytest.mark.parametrize(("device", "amp", "native", "expected"), AUTOCAST_RULE)
def test_training_autocasts_where_the_hardware_has_the_dtype(device, amp, native, expected):
    from tasks.train import autocast_dtype

    assert autocast_dtype(torch.device(device), amp, native_bf16=native) is expected


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("amp", ["int8", "BF16", "float32", ""])
def test_an_unknown_autocast_setting_is_an_error_not_float32(device, amp):
    """The rule is shared by train.amp and explain.score_amp; a value it does not know must
    not quietly run float32 (config refuses it first; this guards direct callers)."""
    from tasks.forward import autocast_dtype

    with pytest.raises(ValueError, match=f"amp must be one of .*got '{amp}'"):
        autocast_dtype(torch.device(device), amp, native_bf16=True)


@pytest.mark.filterwarnings("ignore:torch.cuda.amp.GradScaler is enabled")
@pytest.mark.parametrize(("device", "amp", "native", "expected"), AUTOCAST_RULE)
def test_a_loss_scaler_exactly_when_the_steps_run_float16(
    device, amp, native, expected, monkeypatch
):
    """fp16 steps need loss scaling (float16 underflows small gradients), bf16 and float32
    steps must not get it: the scaler follows the same rule as the autocast dtype."""
    import tasks.forward
    import tasks.train as train_module

    monkeypatch.setattr(tasks.forward, "cpu_has_native_bf16", lambda: native)
    scaler = train_module.grad_scaler(torch.device(device), amp)
    assert (scaler is not None) == (expected is torch.float16)


def test_the_autocast_context_runs_the_precision_it_reports():
    """On whatever CPU runs the suite, a convolution inside ``autocast`` comes out in the dtype
    that ``precision_name`` logs, so the logged precision is the one that trained."""
    from tasks.train import autocast, precision_name

    cpu = torch.device("cpu")
    conv = torch.nn.Conv2d(3, 4, 3)
    with autocast(cpu, "bf16"):
        out = conv(torch.rand(1, 3, 8, 8))
    expected = {"bf16 autocast": torch.bfloat16, "float32": torch.float32}
    assert out.dtype is expected[precision_name(cpu, "bf16")]
    with autocast(cpu, "none"):
        assert conv(torch.rand(1, 3, 8, 8)).dtype is torch.float32


def test_cpu_bf16_training_is_bf16_deterministic_and_resumes_exactly(tiny, tmp_path, monkeypatch):
    """bf16 steps (forced on, so every CPU runs them; emulated ones only slower) give other
    weights than float32, yet a run stopped after its first epoch and resumed equals the
    uninterrupted run bit for bit, as float32 does."""
    import tasks.forward

    root, p = tiny
    model_cfg, cfg = _cfg(p, epochs=2)
    monkeypatch.setattr(tasks.forward, "cpu_has_native_bf16", lambda: False)
    fp32 = train(model_cfg, cfg, root / "prepared", tmp_path / "f.pt", "v1", show_progress=False)
    monkeypatch.setattr(tasks.forward, "cpu_has_native_bf16", lambda: True)
    full = train(model_cfg, cfg, root / "prepared", tmp_path / "b.pt", "v1", show_progress=False)
    assert (fp32.precision, full.precision) == ("float32", "bf16 autocast")
    assert not np.array_equal(fp32.test_logits, full.test_logits)

    class Stop(Exception):
        pass

    def stop(record: dict) -> None:
        if record["epoch"] == 1:
            raise Stop  # after epoch 1's checkpoint is on disk

    with pytest.raises(Stop):
        train(model_cfg, cfg, root / "prepared", tmp_path / "cut.pt", "v1", stop, False)
    resumed = train(
        model_cfg, cfg, root / "prepared", tmp_path / "cut.pt", "v1", show_progress=False
    )
    assert resumed.resumed_from == 1
    assert resumed.history[-1]["train_loss"] == full.history[-1]["train_loss"]
    np.testing.assert_array_equal(resumed.test_logits, full.test_logits)
