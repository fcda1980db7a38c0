"""The one config path: params.yaml -> validated, frozen dataclasses -> function arguments.

Stage functions never read params.yaml; the entries call :func:`load_params` and pass the
relevant section on. The whole tree is validated when it is loaded, before any stage does
work, because a typo found by the stage that reads it is found late: in a ``dvc repro``,
``calibrate.method: bar`` would otherwise surface after training has finished.

The sections are pydantic dataclasses: real :mod:`dataclasses` (``dataclasses.replace`` and
``asdict`` work, and ``replace`` re-validates), whose fields carry ``Literal`` enums, strict
types (``"3"`` is not an integer, ``yes`` is not a boolean) and ranges. Checks that span keys
(``split.fractions`` sums to 1, a marker class that the class mix draws, overrides inside
``compare.variants``, ``recipe.small`` and ``tune.space``) run in the loader. Every problem is
collected first, so one :class:`ConfigError` lists each bad key path, its value and what is
allowed; unknown keys come with a did-you-mean.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import tempfile
import types
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from annotated_types import Ge, Gt, Le, Lt, MinLen
from pydantic import (
    AfterValidator,
    AllowInfNan,
    BeforeValidator,
    ConfigDict,
    Strict,
    TypeAdapter,
    ValidationError,
)
from pydantic.dataclasses import dataclass

from tasks.labels import ISIC_CLASSES


class ConfigError(ValueError):
    """A params file, preset or override that does not fit the typed config.

    Attributes:
        problems: one line per bad key (path, value, what is allowed); empty for errors that
            are not about a key (an unreadable file).
    """

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = list(problems or [])


# --------------------------------------------------------------------------------------------
# The allowed names. They live here, not in the modules that implement them, so that loading
# params imports neither torch nor great-expectations; tests/test_config.py checks that each
# list equals its implementation's registry (tasks.models.ARCHITECTURES, tasks.cams.METHODS,
# tasks.validate.RULE_NAMES, ...).
# --------------------------------------------------------------------------------------------

LAYOUTS = ("auto", "isic2019", "isic2018", "ham10000", "ph2", "folder")
ARCHS = (
    "resnet18", "resnet34", "resnet50", "efficientnet_b0", "densenet121", "densenet201",
    "mobilenet_v3_large", "convnext_tiny", "custom_cnn",
)  # fmt: skip
EXPLAIN_METHODS = (
    "gradcam", "gradcampp", "xgradcam", "layercam", "eigencam", "hirescam", "scorecam", "cam",
    "ig", "deeplift", "lime",
)  # fmt: skip
LAYERS = ("early", "middle", "deep")
CALIBRATION_METHODS = ("temperature", "vector", "isotonic")
CLASS_WEIGHTS = ("none", "inverse", "sqrt_inverse", "effective_number")
LOSSES = ("ce", "focal", "logit_adjusted")
COLOR_CONSTANCY = ("none", "shades_of_gray")
TTA_MODES = ("none", "flips", "flips_rot90")
AMP_MODES = ("none", "bf16", "fp16")
SEVERITIES = ("error", "warning", "off")
RECIPE_STEPS = ("pipeline", "compare", "tune")
SPLIT_NAMES = ("train", "val", "test")
VALIDATION_RULES = (
    "label_known", "onehot_single", "image_id_unique", "image_readable", "path_inside_root",
    "min_size", "age_range", "age_numeric", "hash_label_conflict", "class_min_count",
    "mask_readable", "mask_size", "mask_nonempty", "sex_known", "site_known", "min_images",
    "min_classes", "image_unlisted", "metadata_present",
)  # fmt: skip
# PIL refuses images above twice its warning limit (decompression bombs); the same default.
DEFAULT_MAX_PIXELS = 178_956_970

# Strict scalars: YAML's ``"8"`` is text, not an epoch count; ``yes`` is not a boolean here.
# A float field still takes an integer (``lr: 1``), never a boolean.
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict(), AllowInfNan(False)]
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]
Name = Annotated[str, Strict(), MinLen(1)]
PosInt = Annotated[int, Strict(), Gt(0)]
NonNegInt = Annotated[int, Strict(), Ge(0)]
PosFloat = Annotated[float, Strict(), AllowInfNan(False), Gt(0)]
NonNegFloat = Annotated[float, Strict(), AllowInfNan(False), Ge(0)]
Probability = Annotated[float, Strict(), AllowInfNan(False), Ge(0), Le(1)]

_SECTION = ConfigDict(extra="forbid")


def _ordered(pair: tuple[Any, Any]) -> tuple[Any, Any]:
    if pair[0] > pair[1]:
        raise ValueError("the first bound must not exceed the second")
    return pair


def _some_weight(mix: dict[str, float]) -> dict[str, float]:
    if mix and sum(mix.values()) <= 0:
        raise ValueError("the class frequencies sum to 0; give at least one class a weight > 0")
    if not mix:
        raise ValueError("empty; name at least two classes with their frequencies")
    return mix


def _three_fractions(fractions: dict[str, float]) -> dict[str, float]:
    missing = [s for s in SPLIT_NAMES if s not in fractions]
    if missing:
        raise ValueError(f"needs train, val and test; missing {missing}")
    zero = [s for s in SPLIT_NAMES if fractions[s] <= 0]
    if zero:
        raise ValueError(f"{zero} must be > 0 (every split needs images)")
    total = sum(fractions.values())
    if abs(total - 1.0) > 1e-6:
        shown = " + ".join(f"{fractions[s]:g}" for s in SPLIT_NAMES)
        raise ValueError(f"{shown} = {total:g}; the fractions must sum to 1")
    return fractions


def _off(value: Any) -> Any:
    """YAML 1.1 reads an unquoted ``off`` as false; here it means the severity ``off``."""
    return "off" if value is False else value


Severity = Annotated[Literal[SEVERITIES], BeforeValidator(_off)]


def _non_empty(values: list[Any]) -> list[Any]:
    if not values:
        raise ValueError("empty; name at least one")
    return values


def _distinct(values: list[Any]) -> list[Any]:
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise ValueError(f"{repeated} listed twice")
    return values


@dataclass(frozen=True, config=_SECTION)
class DatasetConfig:
    name: Name  # dataset id: names the MLflow experiment and the reports
    layout: Literal[LAYOUTS]  # auto | isic2019 | isic2018 | ham10000 | ph2 | folder
    root: Name  # dataset root folder (relative to the repo or absolute)
    masks: Str | None = None  # optional folder of <image_id>_segmentation.png masks
    label_map: dict[Str, Str | None] = field(default_factory=dict)  # old -> new label; None drops


@dataclass(frozen=True, config=_SECTION)
class MarkerConfig:
    label: Str | None = None  # class whose images get a spurious marker; None = off
    fraction: Probability = 0.0  # share of that class's images that carry the marker
    kind: Literal["ink", "ruler"] = "ink"  # ink (a dark-blue dot) | ruler (a striped bar)


@dataclass(frozen=True, config=_SECTION)
class SynthConfig:
    seed: NonNegInt  # RNG seed: the same params give byte-identical files
    count: PosInt  # number of images
    image_size: Annotated[int, Strict(), Ge(8)]  # side of the square JPEGs in pixels
    class_mix: Annotated[
        dict[Literal[ISIC_CLASSES], NonNegFloat], AfterValidator(_some_weight)
    ]  # class -> relative frequency (normalised)
    difficulty: Probability  # 0 = textbook lesions, 1 = heavy overlap between classes
    images_per_lesion: PosInt  # max images sharing one lesion_id (HAM10000-style repeats)
    marker: MarkerConfig = field(default_factory=MarkerConfig)  # shortcut-learning probe
    workers: PosInt = 1  # processes rendering images (the bytes do not depend on it)


@dataclass(frozen=True, config=_SECTION)
class IngestConfig:
    workers: PosInt  # processes hashing and measuring images (each file is read once)


@dataclass(frozen=True, config=_SECTION)
class ValidateConfig:
    min_side: PosInt  # smallest allowed image side in pixels
    min_per_class: PosInt  # smallest class size that can still be split three ways
    age_range: Annotated[
        tuple[Annotated[int, Strict(), Ge(0)], Annotated[int, Strict(), Ge(0)]],
        AfterValidator(_ordered),
    ]  # allowed age interval (inclusive)
    known_sex: list[Str]  # values outside this list are reported (severity below)
    known_sites: list[Str]  # anatomical sites outside this list are reported
    severity: dict[Str, Severity]  # rule -> error | warning | off
    min_images: PosInt = 10  # fewer images than this cannot be split and trained on
    min_classes: Annotated[int, Strict(), Ge(2)] = 2  # classes after dataset.label_map
    mask_aspect_tolerance: Probability = 0.02  # mask vs image aspect ratio, relative difference
    max_pixels: PosInt = DEFAULT_MAX_PIXELS  # larger images are refused (decompression bombs)


@dataclass(frozen=True, config=_SECTION)
class SplitConfig:
    seed: NonNegInt  # RNG seed for the group assignment
    fractions: Annotated[
        dict[Literal[SPLIT_NAMES], Probability], AfterValidator(_three_fractions)
    ]  # train/val/test shares (sum to 1)
    small_class: Literal["error", "train_only"]  # a class too small for 3 splits: stop | train


@dataclass(frozen=True, config=_SECTION)
class PrepareConfig:
    size: Annotated[int, Strict(), Ge(8)]  # side of the square cached images
    resize: Literal["squash", "center_crop"]  # center_crop: crop the long side, then resize
    workers: PosInt  # decode processes
    color_constancy: Literal[COLOR_CONSTANCY] = "none"  # none | shades_of_gray (p = 6)


@dataclass(frozen=True, config=_SECTION)
class ModelConfig:
    arch: Literal[ARCHS]  # a name from tasks.models.ARCHITECTURES
    pretrained: Literal["none", "imagenet"]  # torchvision weights: local cache, else network
    weights_path: Str | None  # local state_dict file (loaded with weights_only=True)
    dropout: Annotated[float, Strict(), Ge(0), Lt(1)]  # dropout before the classification head
    metadata: Bool = False  # fuse age, sex and anatomical site with the image features
    metadata_prior: Bool = False  # add log p(class | age, sex, site) - log p(class) to the logits
    metadata_prior_c: PosFloat = 1.0  # inverse L2 strength of that logistic regression


@dataclass(frozen=True, config=_SECTION)
class AugmentConfig:
    crop_scale: Annotated[
        tuple[Annotated[float, Strict(), Gt(0), Le(1)], Annotated[float, Strict(), Gt(0), Le(1)]],
        AfterValidator(_ordered),
    ]  # RandomResizedCrop area range; (1, 1) = off
    hflip: Bool  # random horizontal flip (lesions have no left/right)
    vflip: Bool  # random vertical flip
    rotation: Annotated[float, Strict(), Ge(0), Le(180)]  # max rotation in degrees (0 = off)
    color_jitter: Annotated[float, Strict(), Ge(0), Le(1)]  # jitter strength (0 = off)


@dataclass(frozen=True, config=_SECTION)
class DistributedConfig:
    nproc_per_node: PosInt = 1  # processes per machine (one per GPU); > 1 launches torchrun
    nnodes: PosInt = 1  # machines; > 1: each runs the same command, meeting at rdzv_endpoint
    rdzv_endpoint: Name = "localhost:29400"  # host:port of the rendezvous (several nodes only)
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl on CUDA, gloo on the CPU
    sync_batchnorm: Bool = False  # BatchNorm statistics over the global batch (CUDA only)


@dataclass(frozen=True, config=_SECTION)
class TrainConfig:
    epochs: PosInt  # passes over the training split
    batch_size: PosInt  # images per step
    optimizer: Literal["adam", "adamw", "sgd"]  # adam | adamw | sgd
    lr: PosFloat  # peak learning rate
    weight_decay: NonNegFloat  # L2 / decoupled weight decay
    schedule: Literal["cosine", "step", "none"]  # after warm-up
    warmup_epochs: NonNegInt  # linear warm-up epochs
    step_size: PosInt  # step schedule: epochs between decays
    gamma: Annotated[float, Strict(), Gt(0), Le(1)]  # step schedule: decay factor
    label_smoothing: Annotated[float, Strict(), Ge(0), Lt(1)]  # cross-entropy label smoothing
    patience: NonNegInt  # early stopping on val balanced accuracy (0 = off)
    freeze_backbone_epochs: NonNegInt  # train only the head for the first N epochs
    class_weights: Literal[CLASS_WEIGHTS]  # none | inverse | sqrt_inverse | effective_number
    beta: Annotated[float, Strict(), Ge(0), Lt(1)]  # effective_number: beta of Cui et al. 2019
    weighted_sampler: Bool  # sample classes evenly instead of (or besides) reweighting
    loss: Literal[LOSSES]  # ce | focal | logit_adjusted
    focal_gamma: NonNegFloat  # focal loss focusing parameter
    augment: AugmentConfig  # training-time augmentations (torchvision.transforms.v2)
    device: Literal["auto", "cpu", "cuda"]  # auto | cpu | cuda
    amp: Literal[AMP_MODES]  # training autocast: CUDA, and bf16 on bf16-capable CPUs
    channels_last: Bool  # NHWC memory format (faster convolutions on CUDA and on the CPU)
    compile: Bool  # torch.compile the model
    workers: NonNegInt  # DataLoader worker processes
    seed: NonNegInt  # seeds python, numpy and torch
    deterministic: Bool  # deterministic kernels (exactly resumable; slower on GPU)
    logit_tau: NonNegFloat = 1.0  # logit_adjusted: tau of Menon et al. 2021 (1 = balanced softmax)
    drw_epoch: NonNegInt = (
        0  # deferred re-weighting: class weights from this 0-based epoch (0 = off)
    )
    ema_decay: Annotated[float, Strict(), Ge(0), Lt(1)] = 0.0  # EMA of the weights (0 = off)
    mixup_alpha: NonNegFloat = 0.0  # Mixup Beta(alpha, alpha) (0 = off)
    cutmix_alpha: NonNegFloat = 0.0  # CutMix Beta(alpha, alpha) (0 = off)
    mix_prob: Probability = 1.0  # share of batches mixed when Mixup or CutMix is on
    tta: Literal[TTA_MODES] = "none"  # none | flips | flips_rot90: views averaged at evaluation
    mask_loss: NonNegFloat = 0.0  # weight of the auxiliary lesion-mask loss (0 = off)
    mask_layer: Literal["early", "middle", "deep"] = "deep"  # layer the mask head reads
    mask_missing: Literal["error", "skip"] = "error"  # training images without a mask
    distributed: DistributedConfig = field(
        default_factory=DistributedConfig
    )  # data-parallel processes (torchrun); batch_size stays the global batch


@dataclass(frozen=True, config=_SECTION)
class CalibrateConfig:
    method: Literal[CALIBRATION_METHODS]  # temperature | vector | isotonic (on val logits)
    bins: PosInt  # equal-width bins for ECE, MCE and the reliability diagrams
    target_accuracy: Probability  # selective prediction: accuracy the kept cases reach


@dataclass(frozen=True, config=_SECTION)
class ExportConfig:
    opset: Annotated[int, Strict(), Ge(18)]  # ONNX opset (18+: the dynamo exporter's lowest)
    parity_tolerance: NonNegFloat  # max |p_onnx - p_torch| allowed on the test images
    provider: Literal["auto", "cuda", "cpu"]  # onnxruntime execution provider
    bench_batches: Annotated[list[PosInt], AfterValidator(_non_empty)]  # latency batch sizes
    bench_repeats: PosInt  # timed runs per batch size (after warm-up)
    alias: Name  # registry alias set on the exported version


@dataclass(frozen=True, config=_SECTION)
class ExplainConfig:
    methods: Annotated[
        list[Literal[EXPLAIN_METHODS]], AfterValidator(_non_empty)
    ]  # names from tasks.cams.METHODS
    layers: Annotated[
        list[Literal[LAYERS]], AfterValidator(_non_empty)
    ]  # early | middle | deep (CAM methods run at each)
    per_class: NonNegInt  # test images sampled per class
    misclassified_cap: NonNegInt  # plus every misclassified test image, up to this many
    batch_size: NonNegInt  # images per forward pass (0: sized to the device, measured once)
    scorecam_budget: NonNegInt  # images explained with Score-CAM (one forward per channel)
    lime_budget: NonNegInt  # images explained with LIME
    lime_samples: PosInt  # perturbed samples per LIME explanation
    ig_steps: PosInt  # Integrated Gradients path steps
    target: Name  # predicted | true | a class name: the class each map explains
    top_k_percent: Annotated[float, Strict(), Gt(0), Le(100)]  # pixels kept for Jaccard and IoU
    perturbation_steps: PosInt  # steps of the deletion / insertion curves
    score_amp: Literal[AMP_MODES]  # autocast of the faithfulness scores' passes
    bootstrap: PosInt  # bootstrap resamples for the confidence intervals
    seed: NonNegInt  # sampling and LIME seed


@dataclass(frozen=True, config=_SECTION)
class OrchestrationConfig:
    retries: NonNegInt  # Prefect retries of a stage task after a transient failure
    retry_delay_s: NonNegFloat  # seconds between retries
    chunk_size: PosInt  # images per explain-batch chunk (one Prefect task each)
    save_experiment: Bool = True  # `dvc exp save` each pipeline flow run (dvc exp show)


@dataclass(frozen=True, config=_SECTION)
class GateConfig:
    min_gain: Annotated[float, Strict(), Ge(-1), Le(1)]  # balanced-accuracy gain to exceed
    max_ece_increase: Probability  # candidate calibrated ECE may exceed the champion's by this
    confidence: Annotated[float, Strict(), Gt(0), Lt(1)]  # promote only when p < 1 - confidence
    bootstrap: PosInt  # paired bootstrap resamples of the test images
    seed: NonNegInt  # bootstrap RNG seed: the same models and split give the same p-value
    champion_alias: Name  # alias the gate moves on promotion


@dataclass(frozen=True, config=_SECTION)
class TrackingConfig:
    experiment: Str | None  # MLflow experiment (null: the dataset name)
    registered_model: Str | None = None  # registered model name (null: one per dataset+classes)


@dataclass(frozen=True, config=_SECTION)
class CompareConfig:
    variants: dict[Name, list[Str]]  # name -> key=value overrides of one model on the same split
    explain_images: NonNegInt  # test images explained per model (quality and agreement)
    agreement_methods: Annotated[
        list[Literal[EXPLAIN_METHODS]], AfterValidator(_non_empty)
    ]  # methods compared pairwise (SSIM, Pearson, cosine, Jaccard)
    agreement_layer: Literal[LAYERS]  # layer of the CAM methods in the agreement
    seeds: Annotated[list[NonNegInt], AfterValidator(_distinct)] = field(
        default_factory=list
    )  # train each trained variant once per seed (train.seed); [] = once, at train.seed


@dataclass(frozen=True, config=_SECTION)
class TuneConfig:
    trials: PosInt  # Optuna trials
    timeout_s: NonNegFloat  # stop starting new trials after this many seconds (0 = no limit)
    epochs: PosInt  # epochs per trial (a pruned trial stops earlier)
    sampler: Literal["tpe", "random"]  # tpe | random
    pruner: Literal["median", "none"]  # prunes on validation balanced accuracy per epoch
    seed: NonNegInt  # sampler seed
    space: dict[Str, dict[Str, Any]]  # key -> {low, high[, log]} or {choices: [...]}
    preset: Name  # where the best trial's params are written as a preset
    prune_startup_trials: NonNegInt = 3  # complete trials before the median pruner judges
    prune_warmup_epochs: NonNegInt = 2  # epochs a trial always runs before it can be pruned
    storage: Name | None = None  # Optuna storage URL; None: sqlite mlruns/optuna.db


@dataclass(frozen=True, config=_SECTION)
class RecipeConfig:
    name: Str | None  # the recipe's id (set by a recipe preset; null: none applied)
    steps: list[Literal[RECIPE_STEPS]]  # what `dermaflow recipe` runs: pipeline | compare | tune
    small: list[Str] = field(default_factory=list)  # key=value pinned on the embedded default


@dataclass(frozen=True, config=_SECTION)
class CardConfig:
    intended_use: Name  # what the model is for: the card's first section, verbatim
    out_of_scope: list[Name]  # uses the model is not for, one line each
    bootstrap: PosInt  # bootstrap resamples of the test metrics' confidence intervals
    confidence: Annotated[float, Strict(), Gt(0), Lt(1)]  # level of those intervals
    seed: NonNegInt  # bootstrap RNG seed: the same predictions give the same intervals
    external_gap: Probability  # limitation: an external set this far below test
    subgroup_gap: Probability  # limitation: a group this far below its whole split
    min_group_n: PosInt  # smaller groups are shown, never named as a limitation
    coverage_tolerance: Probability  # limitation: conformal coverage below target - this
    max_ece: Probability  # limitation: calibrated test ECE above this
    max_referred: Probability  # limitation: the referral rule refers more test cases than this
    min_recall: Probability  # limitation: a class's test recall below this
    min_ood_auroc: Probability  # limitation: OOD detection AUROC on a set below this
    min_tone_share: Probability  # limitation: a skin-tone category below this share of train
    max_outside_share: Probability  # limitation: attention mostly off the lesion this often


def _ascending(values: list[float]) -> list[float]:
    if any(b <= a for a, b in zip(values, values[1:], strict=False)):
        raise ValueError("the edges must be strictly ascending")
    return values


def _folder_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ValueError("use letters, digits, _ . - only (it names a folder and MLflow metrics)")
    return name


@dataclass(frozen=True, config=_SECTION)
class ExternalSetConfig:
    name: Annotated[Name, AfterValidator(_folder_name)]  # metric prefix and report folder
    root: Name  # the set's root folder (any layout ingest reads)
    layout: Literal[LAYOUTS] = "auto"  # auto | isic2019 | isic2018 | ham10000 | ph2 | folder
    label_map: dict[Str, Str | None] = field(default_factory=dict)  # set label -> model class


@dataclass(frozen=True, config=_SECTION)
class EvaluateConfig:
    external: list[ExternalSetConfig] = field(default_factory=list)  # sets the model never saw
    batch_size: PosInt = 64  # images per forward pass
    bootstrap: PosInt = 1000  # bootstrap resamples of the balanced-accuracy CI
    confidence: Annotated[float, Strict(), Gt(0), Lt(1)] = 0.95  # level of the CIs
    seed: NonNegInt = 0  # bootstrap RNG seed


SUBGROUP_ATTRIBUTES = ("sex", "age_band", "site", "skin_tone")


@dataclass(frozen=True, config=_SECTION)
class SubgroupsConfig:
    attributes: Annotated[list[Literal[SUBGROUP_ATTRIBUTES]], AfterValidator(_non_empty)] = field(
        default_factory=lambda: list(SUBGROUP_ATTRIBUTES)
    )  # attributes to split by
    age_bands: Annotated[list[NonNegFloat], AfterValidator(_ascending)] = field(
        default_factory=lambda: [30.0, 45.0, 60.0, 75.0]
    )  # age band edges in years
    min_group_n: PosInt = 20  # smaller groups are shown, never flagged nor in the largest gap
    max_gap: Probability = 0.1  # flag a group this far below the rest of its split
    bootstrap: PosInt = 200  # bootstrap resamples of each group's CI
    confidence: Annotated[float, Strict(), Gt(0), Lt(1)] = 0.95  # level of the CIs
    seed: NonNegInt = 0  # bootstrap RNG seed


OOD_METHODS = ("mahalanobis", "energy")
CONFORMAL_METHODS = ("aps", "raps")


@dataclass(frozen=True, config=_SECTION)
class OodSetConfig:
    name: Annotated[Name, AfterValidator(_folder_name)]  # key in detection_auroc
    root: Name  # a folder of images from another distribution (skipped when absent)


def _pass_rate(value: float) -> float:
    if not 0.5 <= value < 1.0:
        raise ValueError("must be in [0.5, 1): the share of in-distribution images that passes")
    return value


@dataclass(frozen=True, config=_SECTION)
class OodConfig:
    method: Literal[OOD_METHODS] = "mahalanobis"  # mahalanobis | energy (scores on the logits)
    target_pass_rate: Annotated[Probability, AfterValidator(_pass_rate)] = 0.95  # val share passing
    external: list[OodSetConfig] = field(default_factory=list)  # other-distribution folders
    nonskin_count: PosInt = 32  # generated non-skin images per kind (noise, texture, document)
    seed: NonNegInt = 0  # RNG seed of the generated images


@dataclass(frozen=True, config=_SECTION)
class ConformalConfig:
    method: Literal[CONFORMAL_METHODS] = "aps"  # aps | raps (split-conformal score)
    coverage: Annotated[float, Strict(), Gt(0), Lt(1)] = 0.90  # target coverage of the sets
    class_conditional: bool = False  # one quantile per class (coverage per class)
    raps_lambda: NonNegFloat = 0.01  # raps: penalty per class beyond raps_k_reg
    raps_k_reg: NonNegInt = 1  # raps: set size allowed before the penalty


@dataclass(frozen=True, config=_SECTION)
class Params:
    dataset: DatasetConfig
    synth: SynthConfig
    ingest: IngestConfig
    validate: ValidateConfig
    split: SplitConfig
    prepare: PrepareConfig
    model: ModelConfig
    train: TrainConfig
    calibrate: CalibrateConfig
    export: ExportConfig
    explain: ExplainConfig
    orchestration: OrchestrationConfig
    gate: GateConfig
    tracking: TrackingConfig
    compare: CompareConfig
    tune: TuneConfig
    recipe: RecipeConfig
    card: CardConfig
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    subgroups: SubgroupsConfig = field(default_factory=SubgroupsConfig)
    ood: OodConfig = field(default_factory=OodConfig)
    conformal: ConformalConfig = field(default_factory=ConformalConfig)

    def as_flat_dict(self) -> dict[str, Any]:
        """Dotted key -> value, the form MLflow's log_params and DVC's params take."""
        return flatten(dataclasses.asdict(self))


_PARAMS = TypeAdapter(Params)


# --------------------------------------------------------------------------------------------
# Reading and checking a tree
# --------------------------------------------------------------------------------------------


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> ``{"a.b.c": value}`` (empty mappings stay values)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _unwrap(tp: Any) -> Any:
    """``X | None`` -> ``X`` (Annotated metadata is already stripped by get_type_hints)."""
    if typing.get_origin(tp) in (types.UnionType, typing.Union):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return inner[0] if len(inner) == 1 else tp
    return tp


def _section_class(path: tuple[str, ...]) -> type | None:
    """The config dataclass at a key path (``("train", "augment")``), or None for a value."""
    cls: Any = Params
    for part in path:
        tp = typing.get_type_hints(cls).get(part)
        if tp is None:
            return None
        cls = _unwrap(tp)
        if not dataclasses.is_dataclass(cls):
            return None
    return cls


def _keys_at(path: tuple[str, ...]) -> list[str]:
    cls = _section_class(path)
    return [f.name for f in dataclasses.fields(cls)] if cls else []


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _path(loc: tuple[Any, ...]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text or "params"


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


_TYPE_WORDS = {
    "int_type": "an integer",
    "int_from_float": "an integer",
    "int_parsing": "an integer",
    "float_type": "a number",
    "finite_number": "a finite number",
    "bool_type": "true or false",
    "string_type": "text",
    "dict_type": "a mapping",
    "dataclass_type": "a mapping (a section of keys)",
    "list_type": "a list",
    "tuple_type": "a list",
}
_BOUNDS = {
    "greater_than": ("gt", ">"),
    "greater_than_equal": ("ge", ">="),
    "less_than": ("lt", "<"),
    "less_than_equal": ("le", "<="),
}
_NUMBERISH = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _allowed(ctx: dict[str, Any] | None) -> list[str]:
    return re.findall(r"'([^']*)'", str((ctx or {}).get("expected", "")))


def _problems(errors: list[Any]) -> list[str]:
    """One line per bad key of pydantic's errors; unknown keys and enum lists are grouped."""
    lines: list[str] = []
    unknown: dict[tuple[Any, ...], list[str]] = {}
    unknown_items: dict[tuple[tuple[Any, ...], str], tuple[list[Any], list[str]]] = {}
    for e in errors:
        loc = tuple(e["loc"])
        kind, value, ctx = e["type"], e.get("input"), e.get("ctx")
        where = _path(loc)
        if kind == "unexpected_keyword_argument":
            unknown.setdefault(loc[:-1], []).append(str(loc[-1]))
        elif kind == "literal_error" and loc and (isinstance(loc[-1], int) or loc[-1] == "[key]"):
            container = loc[:-2] if loc[-1] == "[key]" else loc[:-1]
            noun = "keys" if loc[-1] == "[key]" else str(container[-1])
            values, allowed = unknown_items.setdefault((container, noun), ([], _allowed(ctx)))
            values.append(value)
        elif kind == "literal_error":
            allowed = _allowed(ctx)
            lines.append(
                f"unknown {where} {_show(value)}; {where} must be one of: {' | '.join(allowed)}"
                + _did_you_mean(value, allowed)
            )
        elif kind in _TYPE_WORDS:
            hint = ""
            if kind == "float_type" and isinstance(value, str) and _NUMBERISH.match(value):
                hint = f" (YAML reads {value} as text: write it with a dot, e.g. 1.0e-4)"
            elif isinstance(value, str) and kind in ("int_type", "float_type", "bool_type"):
                hint = " (quoted, so YAML reads it as text)"
            lines.append(f"{where}: {_show(value)} is not {_TYPE_WORDS[kind]}{hint}")
        elif kind in _BOUNDS:
            key, sign = _BOUNDS[kind]
            bound = (ctx or {}).get(key)
            if isinstance(bound, float) and bound.is_integer():
                bound = int(bound)
            lines.append(f"{where}: {_show(value)}; must be {sign} {bound}")
        elif kind == "missing" and loc and isinstance(loc[-1], int):
            lines.append(f"{_path(loc[:-1])}: too few values (no value {loc[-1] + 1})")
        elif kind == "missing":
            lines.append(f"{where}: missing (a required key; see the project's params.yaml)")
        elif kind == "value_error":
            reason = str((ctx or {}).get("error", e["msg"]))
            lines.append(f"{where}: {_show(value)}; {reason}")
        else:
            lines.append(f"{where}: {_show(value)}; {e['msg'][:1].lower()}{e['msg'][1:]}")
    for section, keys in unknown.items():
        hints = [
            f"{k} -> {m[0]}"
            for k in keys
            if (m := difflib.get_close_matches(k, _keys_at(section), n=1, cutoff=0.6))
        ]
        mean = f"; did you mean {', '.join(hints)}?" if hints else ""
        allowed = _keys_at(section)
        lines.append(
            f"{_path(section)}: unknown key(s) {sorted(keys)}{mean}"
            + (f" (allowed: {', '.join(allowed)})" if allowed and not hints else "")
        )
    for (container, noun), (values, allowed) in unknown_items.items():
        hints = [
            f"{v} -> {m[0]}"
            for v in values
            if (m := difflib.get_close_matches(str(v), allowed, n=1))
        ]
        mean = f"; did you mean {', '.join(hints)}?" if hints else ""
        lines.append(
            f"{_path(container)} has unknown {noun} {_show(values)}; allowed: "
            f"{' | '.join(allowed)}{mean}"
        )
    return lines


def _get(tree: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(tree, dict):
            return None
        tree = tree.get(key)
    return tree


def _known_path(tree: dict[str, Any], keys: list[str]) -> str | None:
    """None when ``keys`` names a key of ``tree``; else why not (with a did-you-mean)."""
    node: Any = tree
    for i, key in enumerate(keys):
        if not isinstance(node, dict) or key not in node:
            where = ".".join(keys[: i + 1])
            options = list(node) if isinstance(node, dict) else []
            return f"unknown key {where}{_did_you_mean(key, options)}"
        node = node[key]
    return None


def _override_problems(tree: dict[str, Any], overrides: Any, where: str) -> list[str]:
    """Each ``key=value`` of ``where`` must name a key and give it a valid value."""
    if not isinstance(overrides, list):
        return []  # the type check reports it
    problems: list[str] = []
    for text in overrides:
        if not isinstance(text, str):
            continue
        try:
            keys, value = parse_override(text)
        except ConfigError as err:
            problems.append(f"{where}: {err}")
            continue
        if not isinstance(tree.get(keys[0]), dict):
            continue  # a missing section is reported once, not once per override into it
        missing = _known_path(tree, keys)
        if missing:
            problems.append(f"{where}: {text!r}: {missing}")
            continue
        changed = copy.deepcopy(tree)
        node = changed
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
        try:
            _PARAMS.validate_python(changed)
        except ValidationError as err:
            mine = [e for e in err.errors() if tuple(e["loc"][: len(keys)]) == tuple(keys)]
            problems += [f"{where}: {text!r}: {line}" for line in _problems(mine)]
    return problems


def _space_problems(tree: dict[str, Any]) -> list[str]:
    """``tune.space``: model.*/train.* leaf keys, a range or choices, values that load."""
    space = _get(tree, "tune", "space")
    if not isinstance(space, dict):
        return []
    problems: list[str] = []
    for key, spec in space.items():
        where = f"tune.space.{key}"
        keys = str(key).split(".")
        if keys[0] not in ("model", "train"):
            problems.append(f"{where}: trials only train, so only model.* and train.* keys")
            continue
        if key == "train.epochs":
            problems.append(f"{where}: the trial length is tune.epochs; remove it from the space")
            continue
        if not isinstance(tree.get(keys[0]), dict):
            continue  # the missing section is reported on its own
        missing = _known_path(tree, keys)
        if missing:
            problems.append(f"{where}: not a params key ({missing})")
            continue
        if isinstance(_get(tree, *keys), dict):
            problems.append(f"{where}: a section; name one of its keys")
            continue
        if not isinstance(spec, dict) or not ({"low", "high"} <= set(spec) or "choices" in spec):
            problems.append(f"{where}: expected {{low, high[, log]}} or {{choices: [...]}}")
            continue
        values = spec["choices"] if "choices" in spec else [spec["low"], spec["high"]]
        if not isinstance(values, list):
            continue  # tasks.tune.parse_space names the malformed spec
        for value in values:
            text = f"{key}={yaml.safe_dump(value, default_flow_style=True).strip()}"
            text = text.removesuffix("\n...").removesuffix(" ...")
            problems += [
                line.replace(f"tune.space.{key}: {text!r}: ", f"{where}: {value!r} is not valid: ")
                for line in _override_problems(tree, [text], f"tune.space.{key}")
            ]
    return problems


def _cross_checks(tree: dict[str, Any]) -> list[str]:
    """What one field's type cannot say: names in maps, and overrides inside the params."""
    problems: list[str] = []
    severity = _get(tree, "validate", "severity")
    if isinstance(severity, dict):
        unknown = [str(k) for k in severity if k not in VALIDATION_RULES]
        if unknown:
            hints = [
                f"{k} -> {m[0]}"
                for k in unknown
                if (m := difflib.get_close_matches(k, VALIDATION_RULES, n=1))
            ]
            mean = f"; did you mean {', '.join(hints)}?" if hints else ""
            problems.append(
                f"validate.severity has unknown rules {unknown}{mean} (rules: "
                f"{', '.join(VALIDATION_RULES)})"
            )
    label, mix = _get(tree, "synth", "marker", "label"), _get(tree, "synth", "class_mix")
    if isinstance(label, str) and isinstance(mix, dict) and label not in mix:
        problems.append(
            f"synth.marker.label: {label!r} is not a class of synth.class_mix ({', '.join(mix)})"
        )
    train = _get(tree, "train")
    if isinstance(train, dict) and train.get("loss") == "focal":
        mixing = [k for k in ("mixup_alpha", "cutmix_alpha") if train.get(k)]
        if mixing and train.get("mix_prob", 1.0):
            problems.append(
                f"train.loss: focal takes class indices, but {' and '.join(mixing)} make soft "
                "targets; use train.loss ce | logit_adjusted, or set them to 0"
            )
    if isinstance(train, dict) and train.get("mask_loss"):
        clash = [k for k in ("mixup_alpha", "cutmix_alpha") if train.get(k)]
        clash += ["compile"] if train.get("compile") else []
        if clash:
            problems.append(
                f"train.mask_loss: the auxiliary mask loss cannot be combined with "
                f"{' and '.join(clash)} (mixed images have no one mask; hooks and "
                "torch.compile do not mix); set them off, or train.mask_loss to 0"
            )
    model = _get(tree, "model")
    if isinstance(model, dict) and model.get("metadata") is True and model.get("metadata_prior"):
        problems.append(
            "model.metadata_prior: a fusion model (model.metadata: true) already reads age, sex "
            "and site; set one of them to false"
        )
    variants = _get(tree, "compare", "variants")
    if isinstance(variants, dict):
        for name, overrides in variants.items():
            problems += _override_problems(tree, overrides, f"compare.variants.{name}")
    problems += _override_problems(tree, _get(tree, "recipe", "small"), "recipe.small")
    problems += _space_problems(tree)
    return problems


def _message(where: str, problems: list[str]) -> str:
    """One line for one problem; else a count, then one line per bad key."""
    if len(problems) == 1:
        return f"{where}: {problems[0]}"
    head = f"{where}: {len(problems)} invalid params"
    return head + ":\n" + "\n".join(f"  - {p}" for p in problems)


def params_from_dict(tree: Any, where: str = "params") -> Params:
    """Validate a whole params tree into :class:`Params`, or raise one error listing every fault.

    Raises:
        ConfigError: with one line per bad key path (value, what is allowed) in ``problems``.
    """
    if not isinstance(tree, dict):
        raise ConfigError(f"{where}: expected a mapping of sections (dataset, synth, ...)")
    problems: list[str] = []
    params = None
    try:
        params = _PARAMS.validate_python(tree)
    except ValidationError as err:
        problems += _problems(err.errors())
    problems += _cross_checks(tree)
    if problems or params is None:
        raise ConfigError(_message(where, problems), problems)
    return params


def _read_yaml(path: Path, what: str) -> Any:
    """A YAML file's content; every way it can be unreadable is a ConfigError naming it."""
    if not path.exists():
        raise ConfigError(f"{path}: {what} not found")
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, not a {what}")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {err.object[err.start]:#x} at {err.start})"
        ) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{at}: {problem}") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the {what} ({err.strerror})") from None


def read_params_tree(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> dict:
    """The raw params tree (plus ``key=value`` overrides), not yet validated."""
    path = Path(path)
    tree = _read_yaml(path, "params file")
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(tree).__name__}")
    for text in overrides or []:
        apply_override(tree, text)
    return tree


def load_params(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> Params:
    """Read params.yaml (plus ``key=value`` overrides) into the validated, typed config."""
    return params_from_dict(read_params_tree(path, overrides), where=str(path))


@contextmanager
def frozen_params(path: str | Path) -> Iterator[Path]:
    """A private copy of the params file, for a job that runs for hours (compare, tune).

    Everything inside the block reads the copy, taken with one read of the file: an edit of
    params.yaml meanwhile (a new variant, a typo saved for a moment) neither changes the later
    models or trials nor fails them, and the first model and the last one train on the same
    params. A :class:`ConfigError` raised inside names the user's file, not the copy.

    Raises:
        ConfigError: the file cannot be read (as :func:`load_params` words it).
    """
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="dermaflow-params-") as tmp:
        copy_path = Path(tmp) / (path.name or "params.yaml")
        try:
            copy_path.write_bytes(path.read_bytes())
        except OSError:
            _read_yaml(path, "params file")  # raises the ConfigError that names the problem
            raise
        try:
            yield copy_path
        except ConfigError as err:
            raise ConfigError(str(err).replace(str(copy_path), str(path))) from None


# --------------------------------------------------------------------------------------------
# Overrides and presets
# --------------------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value), the value parsed as YAML."""
    if not isinstance(text, str) or "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    keys = key.strip().split(".")
    if not all(keys):
        raise ConfigError(f"override {text!r}: {key.strip()!r} is not a dotted key")
    try:
        return keys, yaml.safe_load(raw)
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({problem})") from None


def apply_override(tree: dict[str, Any], text: str) -> None:
    """Set one ``key=value`` in a raw tree; the key must exist (did-you-mean otherwise)."""
    keys, value = parse_override(text)
    node = tree
    for i, k in enumerate(keys[:-1]):
        if not isinstance(node.get(k), dict):
            where = ".".join(keys[: i + 1])
            options = [n for n, v in node.items() if isinstance(v, dict)]
            raise ConfigError(
                f"override {text!r}: {where} is not a section of params{_did_you_mean(k, options)}"
            )
        node = node[k]
    if keys[-1] not in node:
        raise ConfigError(
            f"override {text!r}: unknown key {'.'.join(keys)}{_did_you_mean(keys[-1], list(node))}"
        )
    node[keys[-1]] = value


# Maps that are one value, not a config section: a preset replaces them whole (a recipe's
# three variants must not be merged with the default's two).
WHOLE_VALUES = frozenset({"synth.class_mix", "dataset.label_map", "compare.variants", "tune.space"})


def deep_merge(base: dict[str, Any], patch: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A preset is a partial params tree; its leaves (and ``WHOLE_VALUES``) replace the base's."""
    out = copy.deepcopy(base)
    for key, value in patch.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(out.get(key), dict) and name not in WHOLE_VALUES:
            out[key] = deep_merge(out[key], value, name + ".")
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_preset(params_path: str | Path, preset_path: str | Path) -> list[str]:
    """Merge a partial preset into params.yaml in place, keeping its comments.

    DVC tracks params.yaml itself, so a preset has to land there (not in a side file) for
    ``dvc repro`` to see the change. An invalid preset changes nothing.

    Returns:
        The dotted keys that changed.
    """
    preset_path = Path(preset_path)
    patch = _read_yaml(preset_path, "preset") or {}
    if not isinstance(patch, dict):
        raise ConfigError(f"{preset_path}: a preset is a partial params mapping, not a list/value")
    return update_params(params_path, patch, where=str(preset_path))


def apply_overrides(params_path: str | Path, overrides: list[str]) -> list[str]:
    """Write ``key=value`` overrides into params.yaml, as ``dvc exp run -S`` records them."""
    patch: dict[str, Any] = {}
    for text in overrides:
        keys, value = parse_override(text)
        node = patch
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return update_params(params_path, patch, where="override")


def update_params(params_path: str | Path, patch: dict[str, Any], where: str) -> list[str]:
    """Apply a partial params tree to params.yaml in place; comments are kept.

    ruamel's round-trip mode keeps the one-line comments. The merged file is validated as a
    whole before it replaces the original, so a bad key or value never lands; the error lists
    every unknown key of the patch and every invalid value of the result at once.
    """
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    yaml_rt = YAML()
    yaml_rt.preserve_quotes = True
    yaml_rt.representer.add_representer(
        type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    yaml_rt.representer.add_representer(float, _represent_float)
    params_path = Path(params_path)
    read_params_tree(params_path)  # unreadable or not YAML: a ConfigError naming the file
    try:
        tree = yaml_rt.load(params_path.read_text(encoding="utf-8"))
    except YAMLError as err:
        raise ConfigError(f"{params_path}: not valid YAML ({err})") from None
    changed: list[str] = []
    unknown: list[str] = []

    def merge(node: Any, update: dict[str, Any], prefix: str) -> None:
        for key, value in update.items():
            name = f"{prefix}{key}"
            if not isinstance(node, dict) or key not in node:
                options = list(node) if isinstance(node, dict) else []
                unknown.append(f"unknown key {name}{_did_you_mean(key, options)}")
                continue
            whole = name in WHOLE_VALUES
            if isinstance(value, dict) and isinstance(node[key], dict) and value and not whole:
                merge(node[key], value, name + ".")
            elif node[key] != value:
                node[key] = value
                changed.append(name)

    merge(tree, patch, "")
    try:
        params_from_dict(yaml.safe_load(_dump(yaml_rt, tree)), where=where)
    except ConfigError as err:
        problems = unknown + err.problems
        raise ConfigError(
            _message(f"{where}", problems) + f"\n{params_path} is unchanged", problems
        ) from None
    if unknown:
        raise ConfigError(_message(where, unknown) + f"\n{params_path} is unchanged", unknown)
    from tasks.io import write_text

    write_text(params_path, _dump(yaml_rt, tree))
    return changed


def _represent_float(representer: Any, value: float) -> Any:
    """Floats PyYAML reads back as floats: ``1e-05`` (no dot) would load as a string."""
    text = repr(value)
    if value != value or value in (float("inf"), float("-inf")):
        text = {"nan": ".nan", "inf": ".inf", "-inf": "-.inf"}[text]
    elif "e" in text and "." not in text.split("e")[0]:
        mantissa, exponent = text.split("e")
        text = f"{mantissa}.0e{exponent}"
    return representer.represent_scalar("tag:yaml.org,2002:float", text)


def _dump(yaml_rt: Any, tree: Any) -> str:
    import io

    buf = io.StringIO()
    yaml_rt.dump(tree, buf)
    return buf.getvalue()
