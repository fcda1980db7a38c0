"""Architectures, weight loading, freezing and the model bundle, on tiny random inputs.

Every registered architecture really trains one step here (forward, backward, optimizer
step), with ``weights=None`` and small images so the whole file fits a 2-core machine.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from tasks.models import (
    ARCHITECTURES,
    WeightsFileError,
    WeightsUnavailableError,
    backbone_parameters,
    build_model,
    count_parameters,
    head_layer,
    head_parameters,
    imagenet_weights_file,
    load_bundle,
    param_groups,
    save_bundle,
    set_backbone_frozen,
    target_layers,
)

HEAVY = {"densenet201", "convnext_tiny"}
# torchvision models downsample 32x: 64 px keeps a 2x2 deep map; the custom CNN (16x) and the
# ResNets (fast, the spec'd size) run at 32 px.
SIZE = {a: 32 if a == "custom_cnn" or a.startswith("resnet") else 64 for a in ARCHITECTURES}
ARCHS = [pytest.param(a, marks=pytest.mark.slow) if a in HEAVY else a for a in ARCHITECTURES]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("num_classes", [3, 9])
@pytest.mark.parametrize("arch", ARCHS)
def test_one_train_step(arch: str, num_classes: int) -> None:
    model = build_model(arch, num_classes, dropout=0.2).train()
    x = torch.randn(2, 3, SIZE[arch], SIZE[arch])
    y = torch.tensor([0, num_classes - 1])
    first = next(model.parameters())
    before = {"first": first.detach().clone(), "head": head_layer(model, arch).weight.clone()}

    activations: dict[str, torch.Size] = {}
    hooks = [
        layer.register_forward_hook(lambda _m, _i, out, n=name: activations.update({n: out.shape}))
        for name, layer in target_layers(model, arch).items()
    ]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    logits = model(x)
    loss = nn.functional.cross_entropy(logits, y)
    loss.backward()
    optimizer.step()
    for hook in hooks:
        hook.remove()

    assert logits.shape == (2, num_classes)
    assert torch.isfinite(loss)
    assert head_layer(model, arch).out_features == num_classes
    assert not torch.equal(head_layer(model, arch).weight, before["head"])
    assert not torch.equal(first, before["first"]), "no gradient reached the first layer"
    assert set(activations) == {"early", "middle", "deep"}
    for name, shape in activations.items():
        assert len(shape) == 4 and shape[0] == 2 and min(shape[2:]) >= 1, (name, shape)
    assert activations["early"][-1] > activations["middle"][-1] >= activations["deep"][-1]


def test_unknown_arch_lists_choices() -> None:
    with pytest.raises(ValueError, match="resnet18.*custom_cnn"):
        build_model("resnet19", 3)


def test_custom_cnn_is_input_size_agnostic() -> None:
    model = build_model("custom_cnn", 4).eval()
    with torch.no_grad():
        for side in (16, 48, 96):
            assert model(torch.randn(1, 3, side, side)).shape == (1, 4)
    assert target_layers(model, "custom_cnn")["deep"] is model.block4


@pytest.mark.parametrize(
    "arch", ["resnet18", "efficientnet_b0", "mobilenet_v3_large", "custom_cnn"]
)
def test_dropout_knob_reaches_the_layer_before_the_head(arch: str) -> None:
    model = build_model(arch, 3, dropout=0.35)
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert drops and drops[-1].p == 0.35


@pytest.mark.parametrize("arch", ARCHS)
def test_freezing_leaves_only_the_head_trainable(arch: str) -> None:
    model = build_model(arch, 5)
    head = list(head_parameters(model, arch))
    backbone = list(backbone_parameters(model, arch))
    groups = param_groups(model, arch)
    assert [g["name"] for g in groups] == ["backbone", "head"]
    assert len(head) + len(backbone) == len(list(model.parameters()))
    assert {id(p) for p in head}.isdisjoint(id(p) for p in backbone)

    set_backbone_frozen(model, arch, True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in head}
    assert count_parameters(model, trainable_only=True) == sum(p.numel() for p in head)

    set_backbone_frozen(model, arch, False)
    assert count_parameters(model, trainable_only=True) == count_parameters(model)


def test_frozen_step_changes_only_the_head() -> None:
    model = build_model("resnet18", 3).train()
    set_backbone_frozen(model, "resnet18", True)
    before = {k: v.clone() for k, v in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    nn.functional.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 2])).backward()
    optimizer.step()
    changed = {k for k, v in model.named_parameters() if not torch.equal(v, before[k])}
    assert changed == {"fc.1.weight", "fc.1.bias"}


# ---------------------------------------------------------------------------------------------
# Pretrained weights
# ---------------------------------------------------------------------------------------------


def _assert_backbone_equal(model: nn.Module, state: dict[str, torch.Tensor], head: str) -> None:
    own = model.state_dict()
    checked = 0
    for key, value in state.items():
        if key.startswith(head + "."):
            continue
        assert torch.equal(own[key], value), key
        checked += 1
    assert checked >= 20


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "ddp_prefix", "pre_0.4"])
def test_weights_path_loads_the_backbone(tmp_path: Path, wrap: str) -> None:
    source = torchvision.models.resnet18(weights=None)  # random init, 1000-class head
    state = source.state_dict()
    saved = {
        "plain": state,
        "state_dict": {"state_dict": state, "epoch": 3},
        "model": {"model": state},
        "ddp_prefix": {f"module.{k}": v for k, v in state.items()},
        # torchvision's 2017 ImageNet files predate BatchNorm's num_batches_tracked
        "pre_0.4": {k: v for k, v in state.items() if "num_batches_tracked" not in k},
    }[wrap]
    path = tmp_path / "resnet18.pth"
    torch.save(saved, path)

    model = build_model("resnet18", 3, weights_path=path)
    _assert_backbone_equal(model, state, "fc")
    assert head_layer(model, "resnet18").out_features == 3


def test_weights_path_accepts_old_densenet_keys(tmp_path: Path) -> None:
    source = torchvision.models.densenet121(weights=None)
    state = source.state_dict()
    old = {
        k.replace(".norm1.", ".norm.1.").replace(".conv2.", ".conv.2."): v for k, v in state.items()
    }
    assert old.keys() != state.keys()
    torch.save(old, tmp_path / "densenet121-old.pth")
    model = build_model("densenet121", 4, weights_path=tmp_path / "densenet121-old.pth")
    _assert_backbone_equal(model, state, "classifier")


def test_corrupt_weights_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.pth"
    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(WeightsFileError, match="broken.pth.*not a readable weights file"):
        build_model("resnet18", 3, weights_path=path)


def test_weights_of_another_arch_are_refused(tmp_path: Path) -> None:
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), tmp_path / "r34.pth")
    with pytest.raises(WeightsFileError, match=r"resnet18 backbone.*unexpected: layer1\.2\."):
        build_model("resnet18", 3, weights_path=tmp_path / "r34.pth")
    torch.save(build_model("custom_cnn", 3).state_dict(), tmp_path / "cnn.pth")
    with pytest.raises(WeightsFileError, match="missing: conv1.weight"):
        build_model("resnet18", 3, weights_path=tmp_path / "cnn.pth")


def test_weights_with_wrong_shapes_are_refused(tmp_path: Path) -> None:
    state = build_model("custom_cnn", 3).state_dict()
    state["block1.0.weight"] = torch.zeros(64, 1, 3, 3)  # a grayscale stem
    torch.save(state, tmp_path / "gray.pth")
    with pytest.raises(WeightsFileError, match=r"shape: block1\.0\.weight \(64, 1, 3, 3\)"):
        build_model("custom_cnn", 3, weights_path=tmp_path / "gray.pth")


def test_missing_weights_path(tmp_path: Path) -> None:
    with pytest.raises(WeightsUnavailableError, match="nope.pth: weights file not found"):
        build_model("resnet18", 3, weights_path=tmp_path / "nope.pth")


def test_imagenet_offline_fails_fast_naming_both_remedies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(*_args: object, **_kwargs: object) -> None:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known (test: offline)")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(socket, "getaddrinfo", offline)
    cache_file = (
        tmp_path
        / "hub"
        / "checkpoints"
        / os.path.basename(torchvision.models.ResNet18_Weights.DEFAULT.url)
    )
    assert imagenet_weights_file("resnet18") == cache_file

    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as error:
        build_model("resnet18", 3, pretrained="imagenet")
    # No network wait: it fails at once. 30 s is far above the ~1 s it takes on a busy
    # 2-core CI box and far below a socket timeout, so load cannot flip it.
    assert time.monotonic() - start < 30
    message = str(error.value)
    assert "model.weights_path" in message
    assert str(cache_file) in message
    assert f"$TORCH_HOME/hub/checkpoints/{cache_file.name}" in message
    assert not cache_file.exists()


def test_imagenet_comes_from_the_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache_file = imagenet_weights_file("resnet18")
    cache_file.parent.mkdir(parents=True)
    state = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(state, cache_file)
    model = build_model("resnet18", 7, pretrained="imagenet")
    _assert_backbone_equal(model, state, "fc")

    cache_file.write_bytes(b"truncated download")
    with pytest.raises(WeightsFileError, match=cache_file.name):
        build_model("resnet18", 7, pretrained="imagenet")


def test_custom_cnn_has_no_imagenet_weights() -> None:
    with pytest.raises(ValueError, match="custom_cnn has no ImageNet weights"):
        build_model("custom_cnn", 3, pretrained="imagenet")


# ---------------------------------------------------------------------------------------------
# Bundle
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["custom_cnn", "resnet18", "efficientnet_b0"])
def test_bundle_round_trip(tmp_path: Path, arch: str) -> None:
    model = build_model(arch, 4, dropout=0.3).train()
    model(torch.randn(4, 3, 32, 32))  # move BatchNorm running stats away from their init
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    classes = ["MEL", "NV", "BCC", "BKL"]
    path = save_bundle(
        tmp_path / "models" / "model.pt",
        model,
        arch,
        classes,
        input_size=32,
        mean=(0.6, 0.5, 0.4),
        std=[0.2, 0.2, 0.2],
        temperature=1.7,
        data_version="md5:abc123",
        extra={"metrics": {"balanced_accuracy": 0.5}, "epochs": [1, 2]},
    )
    assert sorted(os.listdir(path.parent)) == ["model.pt"]  # atomic: no temp file left

    loaded, meta = load_bundle(path)
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    assert meta["arch"] == arch
    assert meta["classes"] == classes
    assert meta["input_size"] == 32
    assert meta["normalization"] == {"mean": [0.6, 0.5, 0.4], "std": [0.2, 0.2, 0.2]}
    assert meta["temperature"] == 1.7
    assert meta["data_version"] == "md5:abc123"
    assert meta["dropout"] == pytest.approx(0.3)
    assert meta["extra"] == {"metrics": {"balanced_accuracy": 0.5}, "epochs": [1, 2]}
    assert "state_dict" not in meta


def test_bundle_refuses_what_weights_only_cannot_load(tmp_path: Path) -> None:
    model = build_model("custom_cnn", 2)
    with pytest.raises(TypeError, match=r"extra\.when: datetime"):
        save_bundle(
            tmp_path / "m.pt", model, "custom_cnn", ["a", "b"], 32, [0.5] * 3, [0.2] * 3,
            extra={"when": __import__("datetime").datetime.now()},
        )  # fmt: skip
    assert not (tmp_path / "m.pt").exists()
    with pytest.raises(ValueError, match="2 outputs but 3 classes"):
        save_bundle(tmp_path / "m.pt", model, "custom_cnn", ["a", "b", "c"], 32, [0] * 3, [1] * 3)


def test_load_bundle_rejects_a_plain_state_dict(tmp_path: Path) -> None:
    torch.save(build_model("custom_cnn", 2).state_dict(), tmp_path / "sd.pt")
    with pytest.raises(ValueError, match="sd.pt: not a model bundle"):
        load_bundle(tmp_path / "sd.pt")


def test_a_bundle_can_seed_a_new_model(tmp_path: Path) -> None:
    """Fine-tuning from an earlier run: the bundle is a valid weights_path, head replaced."""
    old = build_model("custom_cnn", 2)
    path = save_bundle(tmp_path / "m.pt", old, "custom_cnn", ["a", "b"], 32, [0.5] * 3, [0.2] * 3)
    new = build_model("custom_cnn", 5, weights_path=path)
    _assert_backbone_equal(new, old.state_dict(), "classifier.3")
    assert head_layer(new, "custom_cnn").out_features == 5
