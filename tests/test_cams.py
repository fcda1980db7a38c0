"""Every explanation method through the one entry, on tiny random-init models.

Parametrized like pytorch-grad-cam's own tests: each method (at each layer, for layer-wise
ones) on custom_cnn and resnet18, plus the identities that make the methods trustworthy:
the engine's shared-pass CAMs equal each pytorch-grad-cam class run on its own, IG, DeepLIFT
and LIME equal Captum's classes called by hand, batched CAMs equal per-image CAMs, exact CAM
equals Grad-CAM on a GAP + Linear head and decomposes the logit, IG and DeepLIFT are complete,
LIME is reproducible, and the registry rejects a name it does not know.

Sizes: custom_cnn downsamples 16x and runs at 32 px (deep map 2x2); torchvision ResNets
downsample 32x, so at 32 px their deep map would be 1x1 and every CAM there trivially constant;
they run at 64 px (2x2). Maps are explained for the predicted class, whose logit is the
largest, so random-init gradient CAMs are not all-negative (hence all-zero after the ReLU).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from pytorch_grad_cam import GradCAM, ScoreCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from tasks.cams import (
    EXACT_CAM_ARCHS,
    LAYERS,
    METHODS,
    BatchedScoreCAM,
    Options,
    class_activation_maps,
    deeplift,
    deeplift_ready,
    exact_cam,
    explain_batch,
    integrated_gradients,
    layer_cams,
    lime,
    method_layers,
    strict_float32,
    superpixels,
    to_heatmaps,
)
from tasks.models import ARCHITECTURES, build_model, head_layer, target_layers
from tests.tolerances import assert_maps_match

SIZE = {"custom_cnn": 32, "resnet18": 64}
FAST = {"ig_steps": 8, "lime_samples": 40, "lime_segments": 16}
BATCHABLE_CAMS = ["gradcam", "gradcampp", "xgradcam", "layercam", "hirescam", "eigencam"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """One intra-op thread: for these tiny tensors on the shared 2-core box, two threads only
    add OpenMP barrier spinning (this file: 34-133 s with two threads, by load; 18-21 s with
    one). Restored afterwards, so other test modules keep their setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {arch: build_model(arch, 3).eval() for arch in SIZE}


def _images(arch: str, n: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, SIZE[arch], SIZE[arch], generator=generator)


def _smooth_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Blocky images with real colour regions, so SLIC finds superpixels (noise has none)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, 3, 4, 4, generator=generator)
    return nn.functional.interpolate(coarse, size=(size, size), mode="bilinear")


def _predicted(model: nn.Module, images: torch.Tensor) -> list[int]:
    with torch.no_grad():
        return model(images).argmax(1).tolist()


CONTRACT_CASES = [
    pytest.param(arch, method, layer, id=f"{arch}-{method}-{layer or 'input'}")
    for arch in SIZE
    for method, layer in method_layers(list(METHODS), list(LAYERS), arch=arch)
]


@pytest.mark.parametrize(("arch", "method", "layer"), CONTRACT_CASES)
def test_heatmap_contract(models: dict[str, nn.Module], arch: str, method: str, layer: str) -> None:
    model = models[arch]
    images = _images(arch, 1 if METHODS[method].expensive else 2)
    maps = explain_batch(model, arch, method, images, _predicted(model, images), layer, **FAST)

    assert maps.shape == (len(images), SIZE[arch], SIZE[arch])
    assert maps.dtype == np.float32
    assert np.isfinite(maps).all()
    assert maps.min() >= 0.0 and maps.max() <= 1.0
    for heatmap in maps:
        assert heatmap.max() == pytest.approx(1.0, abs=1e-5)  # normalised per image
        assert heatmap.std() > 1e-3, f"{method} at {layer}: constant map"


# oneDNN picks different convolution kernels for batch 1 and batch 4, and min-max on a 2x2 map
# amplifies their float32 noise to ~2e-5; the reference kernels are batch-invariant on most
# CPUs, and tests/tolerances.py bounds what is left (1.9e-5 seen on an Intel Xeon), so this
# test sees our batching (targets, chunks, per-image normalisation) and nothing else.
@pytest.mark.filterwarnings("ignore:TF32 acceleration")
@pytest.mark.parametrize("method", BATCHABLE_CAMS)
@pytest.mark.parametrize("arch", list(SIZE))
def test_batched_cams_equal_per_image(models: dict[str, nn.Module], arch: str, method: str) -> None:
    model = models[arch]
    images, classes = _images(arch, 4, seed=1), [0, 1, 2, 1]
    with torch.backends.mkldnn.flags(enabled=False):
        for layer in LAYERS:
            # batch_size=3 also makes the batch two chunks (3 + 1)
            batched = explain_batch(model, arch, method, images, classes, layer, batch_size=3)
            single = np.concatenate(
                [
                    explain_batch(model, arch, method, images[i : i + 1], [c], layer)
                    for i, c in enumerate(classes)
                ]
            )
            assert_maps_match(batched, single, layer)
            assert sum(m.std() > 1e-3 for m in batched) >= 2, "mostly blank maps: vacuous"


def test_exact_cam_equals_gradcam_on_gap_linear_head() -> None:
    """Grad-CAM's weights on a GAP + Linear head are w[c, k] / (h * w): same normalised map."""
    torch.manual_seed(0)
    model = build_model("resnet18", 3).eval()
    images = torch.randn(3, 3, 128, 128)  # a 4x4 deep map: a real spatial pattern to compare
    classes = [0, 1, 2]
    cam = exact_cam(model, "resnet18", images, classes)
    gradcam = explain_batch(model, "resnet18", "gradcam", images, classes, "deep")
    assert all(m.std() > 0.05 for m in cam), "degenerate maps would make the test vacuous"
    assert_maps_match(cam, gradcam, "exact CAM vs Grad-CAM")
    assert np.array_equal(cam, explain_batch(model, "resnet18", "cam", images, classes, "deep"))


def test_cam_decomposes_the_logit(models: dict[str, nn.Module]) -> None:
    """Exactness itself: mean over locations of the raw CAM plus the bias is the logit."""
    model = models["resnet18"]
    images, classes = _images("resnet18", 3, seed=2), [2, 0, 1]
    raw = class_activation_maps(model, "resnet18", images, classes)
    with torch.no_grad():
        logits = model(images)[torch.arange(3), classes]
    bias = head_layer(model, "resnet18").bias.detach()[classes]
    torch.testing.assert_close(raw.mean(dim=(1, 2)) + bias, logits, atol=1e-5, rtol=1e-5)


def test_exact_cam_archs() -> None:
    assert set(EXACT_CAM_ARCHS) == {
        "resnet18",
        "resnet34",
        "resnet50",
        "efficientnet_b0",
        "densenet121",
        "densenet201",
    }
    assert set(METHODS["cam"].archs or ()) == set(EXACT_CAM_ARCHS)
    assert set(ARCHITECTURES) - set(EXACT_CAM_ARCHS) == {
        "custom_cnn",
        "mobilenet_v3_large",
        "convnext_tiny",
    }


def test_exact_cam_refuses_an_inexact_head(models: dict[str, nn.Module]) -> None:
    images = _images("custom_cnn", 1)
    with pytest.raises(ValueError, match=r"custom_cnn has a hidden FC 512->128.*resnet18"):
        exact_cam(models["custom_cnn"], "custom_cnn", images, [0])
    with pytest.raises(ValueError, match="custom_cnn"):
        explain_batch(models["custom_cnn"], "custom_cnn", "cam", images, [0], "deep")


@pytest.mark.parametrize("arch", list(SIZE))
def test_integrated_gradients_is_complete(models: dict[str, nn.Module], arch: str) -> None:
    model = models[arch]
    images = _images(arch, 2, seed=3)
    classes = _predicted(model, images)
    attributions, delta = integrated_gradients(model, images, classes, steps=32)
    with torch.no_grad():
        gap = (model(images) - model(torch.zeros_like(images)))[torch.arange(2), classes]
    # completeness: the attributions share out f(x) - f(mean image), up to the path integral
    torch.testing.assert_close(attributions.sum(dim=(1, 2, 3)), gap, atol=2e-3, rtol=0.02)
    assert (delta.abs() <= 0.02 * gap.abs() + 2e-3).all(), (delta, gap)


@pytest.mark.parametrize("arch", list(SIZE))
def test_deeplift_sums_to_delta(models: dict[str, nn.Module], arch: str) -> None:
    """Exact only if every ReLU call is its own non-inplace module: ResNet reuses its ReLUs."""
    model = models[arch]
    images = _images(arch, 2, seed=4)
    attributions, delta = deeplift(model, images, [0, 2])
    with torch.no_grad():
        gap = (model(images) - model(torch.zeros_like(images)))[torch.arange(2), [0, 2]]
    torch.testing.assert_close(attributions.sum(dim=(1, 2, 3)), gap, atol=1e-4, rtol=1e-4)
    assert delta.abs().max() < 1e-4


def test_deeplift_ready_leaves_the_model_alone(models: dict[str, nn.Module]) -> None:
    model = models["resnet18"]
    safe = deeplift_ready(model)
    relus = [m for m in safe.modules() if isinstance(m, nn.ReLU)]
    assert relus and not any(m.inplace for m in relus)
    assert len({id(m) for m in relus}) == 17  # stem + 2 per BasicBlock, each its own module
    assert all(m.inplace for m in model.modules() if isinstance(m, nn.ReLU))
    images = _images("resnet18", 2)
    with torch.no_grad():
        torch.testing.assert_close(safe(images), model(images))


def test_cams_see_the_layer_output_not_a_later_inplace_op() -> None:
    """DenseNet's forward ReLUs ``norm5`` in place; on the CPU pytorch-grad-cam's stored
    activation is that live tensor. Ours must match a model whose ReLU is out-of-place (what
    a GPU run sees), else CPU and GPU maps differ."""
    torch.manual_seed(0)
    model = build_model("densenet121", 3).eval()
    images, classes = torch.randn(2, 3, 64, 64), [0, 2]
    ours = explain_batch(model, "densenet121", "gradcam", images, classes, "deep")
    reference_model = deeplift_ready(model)  # same weights, every ReLU out-of-place
    layer = reference_model.get_submodule("features.norm5")
    with GradCAM(model=reference_model, target_layers=[layer]) as cam:
        reference = cam(input_tensor=images, targets=[ClassifierOutputTarget(c) for c in classes])
    assert reference.std() > 0.05
    assert_maps_match(ours, reference, "densenet norm5")


def test_strict_float32_turns_tf32_off_and_restores_it_after_an_error() -> None:
    """The switches are process-wide: what the bench and the GPU test set must come back."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        with pytest.raises(RuntimeError), strict_float32():
            assert not torch.backends.cuda.matmul.allow_tf32
            assert not torch.backends.cudnn.allow_tf32
            raise RuntimeError("inside")
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("arch", list(SIZE))
def test_methods_run_on_the_gpu(models: dict[str, nn.Module], arch: str) -> None:
    """Same maps on the GPU as on the CPU (TF32 off), for every method at the deep layer."""
    cpu_model = models[arch]
    gpu_model = copy.deepcopy(cpu_model).cuda()
    images = _images(arch, 2)
    classes = _predicted(cpu_model, images)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with strict_float32():
        assert not torch.backends.cudnn.allow_tf32
        for method, layer in method_layers(list(METHODS), ["deep"], arch=arch):
            n = 1 if METHODS[method].expensive else 2
            args = (method, images[:n], classes[:n], layer)
            gpu = explain_batch(gpu_model, arch, args[0], args[1].cuda(), *args[2:], **FAST)
            cpu = explain_batch(cpu_model, arch, *args, **FAST)
            assert gpu.shape == cpu.shape and np.isfinite(gpu).all(), method
            assert gpu.min() >= 0 and gpu.max() <= 1, method
            assert np.abs(gpu - cpu).mean() < 0.05, method
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == tf32


def test_lime_is_deterministic_for_a_seed(models: dict[str, nn.Module]) -> None:
    model = models["custom_cnn"]
    images = _smooth_images(2, 32)
    rng_before = torch.get_rng_state()
    first = lime(model, images, [0, 1], samples=40, seed=7, segments=16)
    again = lime(model, images, [0, 1], samples=40, seed=7, segments=16)
    other = lime(model, images, [0, 1], samples=40, seed=8, segments=16)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert torch.equal(torch.get_rng_state(), rng_before), "LIME must not consume the global RNG"
    # one weight per superpixel, the same over the three channels
    assert torch.equal(first[:, 0], first[:, 2])


def test_superpixels_follow_colour_regions_else_a_grid() -> None:
    labels = superpixels(_smooth_images(1, 64)[0], segments=16)
    assert labels.shape == (64, 64)
    assert 4 <= labels.max() + 1 <= 40
    assert set(np.unique(labels)) == set(range(labels.max() + 1))
    # pixel noise has no regions: SLIC merges it into one segment, so a 4x4 grid is used
    noise = superpixels(
        torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(0)), segments=16
    )
    assert noise.max() + 1 == 16 and np.array_equal(noise[:8, :8], np.zeros((8, 8)))


def test_method_layers() -> None:
    methods = ["gradcam", "cam", "ig", "scorecam", "lime"]
    assert method_layers(methods, ["early", "deep"]) == [
        ("gradcam", "early"),
        ("gradcam", "deep"),
        ("cam", "deep"),
        ("ig", None),
        ("scorecam", "early"),
        ("scorecam", "deep"),
        ("lime", None),
    ]
    assert ("cam", "deep") in method_layers(["cam"], ["early"])  # CAM lives at the deep layer
    assert method_layers(methods, ["deep"], arch="custom_cnn") == [
        ("gradcam", "deep"),
        ("ig", None),
        ("scorecam", "deep"),
        ("lime", None),
    ]
    with pytest.raises(ValueError, match="unknown explanation method 'gradcam\\+\\+'"):
        method_layers(["gradcam++"], ["deep"])
    with pytest.raises(ValueError, match="unknown layer 'last'"):
        method_layers(["gradcam"], ["last"])


def test_explaining_restores_the_model() -> None:
    """Works under no_grad and with frozen weights; leaves mode, grads and flags as found."""
    torch.manual_seed(0)
    model = build_model("custom_cnn", 3).train()
    model.requires_grad_(False)
    images = _images("custom_cnn", 2)
    classes = _predicted(model.eval(), images)
    model.train()
    with torch.no_grad():
        maps = explain_batch(model, "custom_cnn", "gradcam", images, classes, "deep")
    assert all(m.std() > 1e-3 for m in maps)
    assert model.training
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())


def test_bad_inputs_name_the_culprit(models: dict[str, nn.Module]) -> None:
    model, images = models["custom_cnn"], _images("custom_cnn", 2)
    with pytest.raises(ValueError, match=r"out of range \[0, 3\).*\(1, 3\)"):
        explain_batch(model, "custom_cnn", "gradcam", images, [0, 3], "deep")
    with pytest.raises(ValueError, match="1 class indices for 2 images"):
        explain_batch(model, "custom_cnn", "ig", images, [0])
    with pytest.raises(ValueError, match="needs layer in"):
        explain_batch(model, "custom_cnn", "gradcam", images, [0, 1], None)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        explain_batch(model, "custom_cnn", "gradcam", images[0], [0], "deep")
    with pytest.raises(ValueError, match="unknown explanation method"):
        explain_batch(model, "custom_cnn", "gradcam++", images, [0, 1], "deep")
    empty = explain_batch(model, "custom_cnn", "scorecam", images[:0], [], "deep")
    assert empty.shape == (0, 32, 32) and empty.dtype == np.float32


# --------------------------------------------------------------------------------------------
# The registry and the engine's shared passes against the libraries' own classes
# --------------------------------------------------------------------------------------------


def test_registry_entries_are_callables_and_unknown_names_are_errors(
    models: dict[str, nn.Module], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert all(callable(spec.compute) for spec in METHODS.values())
    model, images = models["custom_cnn"], _images("custom_cnn", 2)
    with pytest.raises(ValueError, match=r"unknown explanation method 'smoothgrad'.*lime"):
        explain_batch(model, "custom_cnn", "smoothgrad", images, [0, 1])
    with pytest.raises(ValueError, match="unknown option"):
        explain_batch(model, "custom_cnn", "ig", images, [0, 1], ig_stepz=3)
    # A newly registered attribution runs its own callable: nothing falls through to LIME.
    calls = []

    def constant(model, arch, images, targets, layer, options):  # noqa: ANN001, ANN202
        calls.append(len(images))
        return np.full((len(images), *images.shape[-2:]), 0.5, dtype=np.float32)

    spec = dataclasses.replace(METHODS["lime"], name="constant", compute=constant)
    monkeypatch.setitem(METHODS, "constant", spec)
    maps = explain_batch(model, "custom_cnn", "constant", images, [0, 1])
    assert calls == [2] and np.all(maps == 0.5)


def test_the_backward_runs_from_the_logits_to_the_tapped_layer_only(models) -> None:
    """No gradient below the tapped layer: the stem and layer1 never run backward."""
    model = models["resnet18"]  # layers: early layer2, middle layer3, deep layer4.1
    images = _images("resnet18", 2)
    fired: dict[str, list[str]] = {"deep": [], "early": []}
    for layer, seen in fired.items():
        hooks = [
            getattr(model, name).register_full_backward_hook(lambda *_, n=name, s=seen: s.append(n))
            for name in ("conv1", "layer1", "layer3", "fc")
        ]
        try:
            layer_cams(model, "resnet18", images, _predicted(model, images), [("gradcam", layer)])
        finally:
            for hook in hooks:
                hook.remove()
    assert sorted(set(fired["deep"])) == ["fc"]
    assert sorted(set(fired["early"])) == ["fc", "layer3"]


@pytest.fixture(scope="module")
def shared_pass(models: dict[str, nn.Module]) -> dict[str, tuple]:
    """Every layer-wise CAM at every layer of each architecture from one shared pass."""
    out = {}
    for arch, model in models.items():
        images = _images(arch, 3, seed=5)
        classes = _predicted(model, images)
        pairs = [(m, lay) for m, s in METHODS.items() if s.kind == "cam" for lay in LAYERS]
        # batch_size=5: Score-CAM passes that span two images (no layer has 5k channels)
        maps = layer_cams(model, arch, images, classes, pairs, Options(batch_size=5))
        out[arch] = (images, classes, maps)
    return out


LIBRARY_CASES = [
    pytest.param(arch, method, layer, id=f"{arch}-{method}-{layer}")
    for arch in SIZE
    for method, spec in METHODS.items()
    if spec.kind == "cam"
    for layer in LAYERS
]


@pytest.mark.parametrize(("arch", "method", "layer"), LIBRARY_CASES)
def test_shared_pass_equals_the_library_class(
    models: dict[str, nn.Module], shared_pass: dict[str, tuple], arch: str, method: str, layer: str
) -> None:
    """The engine's one-pass CAMs equal each pytorch-grad-cam class run on its own."""
    model = models[arch]
    images, classes, maps = shared_pass[arch]
    module = target_layers(model, arch)[layer]
    cls = METHODS[method].cam_class
    with cls(model=model, target_layers=[module], reshape_transform=torch.clone) as cam:
        reference = cam(
            input_tensor=images.clone().requires_grad_(True),
            targets=[ClassifierOutputTarget(c) for c in classes],
        )
    assert reference.std() > 1e-3, "a blank reference would make the comparison vacuous"
    assert_maps_match(maps[(method, layer)], reference, f"{method}@{layer}")


@pytest.mark.parametrize(
    "shape",
    [(3, 64, 4, 4), (3, 8, 16, 16), (3, 16, 4, 4), (2, 32, 1, 1), (2, 256, 7, 7)],
    ids=["channels>hw", "hw>channels", "square", "1x1", "resnet-deep-like"],
)
def test_thin_svd_projection_equals_the_library(shape: tuple[int, ...]) -> None:
    """Eigen-CAM's first component from the thin SVD is the library's full-SVD one, bit for bit
    (sign included: a flipped sign would turn the map upside down after the ReLU)."""
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

    from tasks.cams import first_component

    rng = np.random.default_rng(sum(shape))
    scale = rng.random(shape[:2] + (1, 1)).astype(np.float32)
    activations = np.maximum(rng.standard_normal(shape).astype(np.float32), 0) * scale
    activations[0, 0, 0, 0] = np.nan  # the library zeroes NaNs
    expected = get_2d_projection(activations)
    got = first_component(activations)
    assert np.isnan(activations[0, 0, 0, 0])  # the caller's array is left alone
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


def test_batched_scorecam_keeps_the_library_weights(models: dict[str, nn.Module]) -> None:
    """Channel weights themselves (before any normalisation) match the library's."""
    model = models["resnet18"]
    images = _images("resnet18", 2, seed=6)
    classes = _predicted(model, images)
    module = target_layers(model, "resnet18")["middle"]
    with torch.no_grad():
        acts = []
        handle = module.register_forward_hook(lambda _m, _i, out: acts.append(out.clone()))
        model(images)
        handle.remove()
    activations = acts[0].numpy()
    targets = [ClassifierOutputTarget(c) for c in classes]
    ours = BatchedScoreCAM(model, [], batch_size=7).get_cam_weights(
        images, module, targets, activations, None
    )
    theirs = ScoreCAM(model, []).get_cam_weights(images, module, targets, activations, None)
    assert ours.shape == theirs.shape == (2, activations.shape[1])
    np.testing.assert_allclose(ours.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-7)


@pytest.mark.filterwarnings("ignore:Setting forward, backward hooks")
@pytest.mark.parametrize("arch", list(SIZE))
def test_attributions_equal_captum_run_directly(models: dict[str, nn.Module], arch: str) -> None:
    """IG, DeepLIFT and LIME through the registry equal Captum's classes called by hand."""
    from captum._utils.models.linear_model import SkLearnRidge
    from captum.attr import DeepLift, IntegratedGradients, Lime

    model = models[arch]
    images = _smooth_images(2, SIZE[arch], seed=7)
    classes = _predicted(model, images)
    size = images.shape[-2:]
    ig = IntegratedGradients(model).attribute(
        images, baselines=torch.zeros_like(images), target=classes, n_steps=8
    )
    dl = DeepLift(deeplift_ready(model)).attribute(
        images.clone().requires_grad_(True), baselines=torch.zeros_like(images), target=classes
    )
    mask = torch.as_tensor(superpixels(images[0], segments=16))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        li = Lime(model, interpretable_model=SkLearnRidge(alpha=1.0)).attribute(
            images[:1],
            baselines=0.0,
            target=classes[0],
            feature_mask=mask[None, None].expand(1, 3, -1, -1),
            n_samples=40,
            perturbations_per_eval=16,
        )
    expected = {
        "ig": to_heatmaps(ig.abs().sum(dim=1), size),
        "deeplift": to_heatmaps(dl.abs().sum(dim=1), size),
        "lime": to_heatmaps(li[:, 0].clamp(min=0), size),
    }
    opts = Options(ig_steps=8, lime_samples=40, lime_segments=16, seed=3, batch_size=16)
    for method, reference in expected.items():
        n = len(reference)
        ours = explain_batch(model, arch, method, images[:n], classes[:n], options=opts)
        assert reference.std() > 1e-3, method
        assert_maps_match(ours, reference, method)


def test_inference_twin_is_fast_hook_free_and_follows_the_weights() -> None:
    from tasks.forward import inference_twin

    torch.manual_seed(0)
    model = build_model("custom_cnn", 3).eval()
    images = _images("custom_cnn", 4)
    handle = model.block2.register_forward_hook(lambda *_: pytest.fail("hook copied"))
    twin = inference_twin(model)
    handle.remove()
    assert inference_twin(model) is twin  # made once per state
    assert not any(isinstance(m, nn.BatchNorm2d) for m in twin.modules())  # folded
    with torch.no_grad():
        torch.testing.assert_close(twin(images), model(images), atol=1e-5, rtol=1e-5)
        model.classifier[3].weight.mul_(2.0)  # an optimiser step changes the weights in place
        assert inference_twin(model) is not twin
        torch.testing.assert_close(
            inference_twin(model)(images), model(images), atol=1e-5, rtol=1e-5
        )


@pytest.mark.parametrize(
    "pool",
    [
        nn.MaxPool2d(2),
        nn.MaxPool2d(3, stride=2, padding=1),
        nn.MaxPool2d(3, stride=2, ceil_mode=True),
        nn.MaxPool2d(2, dilation=2),
    ],
    ids=["2x2", "padded", "ceil", "dilated"],
)
def test_the_twin_pools_before_the_relu_with_the_same_values(pool: nn.MaxPool2d) -> None:
    """ReLU then max-pool equals max-pool then ReLU, bit for bit, NaN included; the twin runs
    the cheaper order, and leaves a pool that returns indices as it is."""
    from tasks.forward import _pool_before_relu

    net = nn.Sequential(nn.ReLU(), pool)
    x = torch.randn(2, 3, 11, 11, generator=torch.Generator().manual_seed(0))
    x[0, 0, 3, 4] = float("nan")
    expected = net(x.clone())
    _pool_before_relu(net)
    assert [type(m) for m in net] == [nn.MaxPool2d, nn.ReLU]
    torch.testing.assert_close(net(x.clone()), expected, rtol=0, atol=0, equal_nan=True)
    kept = nn.Sequential(nn.ReLU(), nn.MaxPool2d(2, return_indices=True))
    _pool_before_relu(kept)
    assert [type(m) for m in kept] == [nn.ReLU, nn.MaxPool2d]


def test_the_default_models_twin_pools_before_each_relu() -> None:
    from tasks.forward import inference_twin

    twin = inference_twin(build_model("custom_cnn", 3).eval())
    for block in (twin.block1, twin.block2, twin.block3, twin.block4):
        assert [type(m) for m in block] == [nn.Conv2d, nn.Identity, nn.MaxPool2d, nn.ReLU]


def test_batch_size_is_measured_once_per_question() -> None:
    from tasks import forward

    calls = []

    def step(x: torch.Tensor) -> None:
        calls.append(len(x))

    sample = torch.zeros(1, 3, 8, 8)
    size = forward.batch_size(step, sample, ("test", "once"))
    assert size in forward.CPU_CANDIDATES and calls  # timed on the candidates
    count = len(calls)
    assert forward.batch_size(step, sample, ("test", "once")) == size and len(calls) == count
    assert forward.batch_size(step, sample, ("test", "once"), requested=5) == 5


def test_score_cam_and_the_perturbation_scores_share_one_forward_measurement() -> None:
    """Both run no-grad forwards of the same inference twin: one question, timed once (they
    were keyed on the twin and on the model, whose parameter counts differ by the folded
    BatchNorms, so the explain stage timed the same forward pass twice)."""
    from tasks import forward
    from tasks.xai_metrics import Perturbations

    torch.manual_seed(0)
    model = build_model("custom_cnn", 3).eval()
    images = torch.rand(2, 3, 20, 20)  # a shape no other test sizes
    Perturbations(model, images, [0, 1])
    twin = forward.inference_twin(model)
    question = ("forward", *forward.model_key(twin), (3, 20, 20))  # key, then the input shape
    asked = [q for q in forward._TIMES if q[:4] == question]
    assert len(asked) == 1 and set(forward._TIMES[asked[0]]) == set(forward.CPU_CANDIDATES)
    timed = dict(forward._TIMES[asked[0]])
    size = forward.forward_batch(twin, images, work=256)  # Score-CAM's question for the same twin
    assert [q for q in forward._TIMES if q[:4] == question] == asked
    assert forward._TIMES[asked[0]] == timed and size in forward.CPU_CANDIDATES  # not re-timed


def test_each_scoring_precision_times_its_own_batch() -> None:
    """bf16 and float32 passes of one twin have different best batches (2.9x apart at batch
    16, 2.2x at 64 on the default), so a bf16 scorer asks its own question."""
    from tasks import forward
    from tasks.xai_metrics import Perturbations

    torch.manual_seed(0)
    model = build_model("custom_cnn", 3).eval()
    images = torch.rand(2, 3, 18, 18)  # a shape no other test sizes
    Perturbations(model, images, [0, 1], autocast=torch.bfloat16)
    key = ("forward", *forward.model_key(forward.inference_twin(model)))
    assert [q for q in forward._TIMES if q[:5] == (*key, "torch.bfloat16", (3, 18, 18))]
    assert not [q for q in forward._TIMES if q[:4] == (*key, (3, 18, 18))]  # float32: not asked


def test_small_work_is_one_pass_with_nothing_timed_and_the_batch_never_exceeds_it() -> None:
    from tasks import forward

    calls = []

    def step(x: torch.Tensor) -> None:
        calls.append(len(x))

    sample = torch.zeros(1, 3, 8, 8)
    assert forward.batch_size(step, sample, ("test", "small"), work=3) == 3 and not calls
    # Work smaller than the probe would be is not timed: the untimed batch, capped by the work.
    assert forward.batch_size(step, sample, ("test", "capped"), work=20) == 16 and not calls
    assert forward.batch_size(step, sample, ("test", "capped"), work=12) == 8 and not calls
    pays = forward.CPU_PROBE_PAYOFF * 2 * forward.CPU_PROBE_IMAGES * len(forward.CPU_CANDIDATES)
    size = forward.batch_size(step, sample, ("test", "big"), work=pays)
    assert size in forward.CPU_CANDIDATES and calls  # enough work: timed
    assert max(calls) <= forward.CPU_PROBE_IMAGES
    calls.clear()
    small = forward.batch_size(step, sample, ("test", "big"), work=20)  # the timings decide
    assert small in (8, 16) and not calls
    timed = forward._TIMES[next(q for q in forward._TIMES if q[:2] == ("test", "big"))]
    assert small == forward._fastest({b: t for b, t in timed.items() if b <= 20})
