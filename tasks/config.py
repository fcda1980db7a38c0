"""The one config path: params.yaml -> typed, frozen dataclasses -> function arguments.

Stage functions never read params.yaml; the CLI entries call :func:`load_params` and pass the
relevant section on. Unknown or missing keys are errors that name the key, so a typo in
params.yaml or a preset cannot silently fall back to a default.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tasks.labels import ISIC_CLASSES


class ConfigError(ValueError):
    """A params file or override that does not fit the typed config."""


@dataclass(frozen=True)
class DatasetConfig:
    name: str  # dataset id: names the MLflow experiment and the reports
    layout: str  # auto | isic2019 | ham10000 | folder
    root: str  # dataset root folder (relative to the repo or absolute)
    masks: str | None = None  # optional folder of <image_id>_segmentation.png masks
    label_map: dict[str, str | None] = field(default_factory=dict)  # old -> new label; None drops


@dataclass(frozen=True)
class MarkerConfig:
    label: str | None = None  # class whose images get a spurious marker; None = off
    fraction: float = 0.0  # share of that class's images that carry the marker
    kind: str = "ink"  # ink (a dark-blue dot) | ruler (a striped bar at an edge)


@dataclass(frozen=True)
class SynthConfig:
    seed: int  # RNG seed: the same params give byte-identical files
    count: int  # number of images
    image_size: int  # side of the square JPEGs in pixels
    class_mix: dict[str, float]  # class -> relative frequency (normalised)
    difficulty: float  # 0 = textbook lesions, 1 = heavy overlap between classes
    images_per_lesion: int  # max images sharing one lesion_id (HAM10000-style repeats)
    marker: MarkerConfig = field(default_factory=MarkerConfig)  # shortcut-learning probe


@dataclass(frozen=True)
class IngestConfig:
    workers: int  # processes hashing and measuring images (each file is read once)


@dataclass(frozen=True)
class ValidateConfig:
    min_side: int  # smallest allowed image side in pixels
    min_per_class: int  # smallest class size that can still be split three ways
    age_range: tuple[int, int]  # allowed age interval (inclusive)
    known_sex: list[str]  # values outside this list are reported (severity below)
    known_sites: list[str]  # anatomical sites outside this list are reported
    severity: dict[str, str]  # rule -> error | warning | off


@dataclass(frozen=True)
class SplitConfig:
    seed: int  # RNG seed for the group assignment
    fractions: dict[str, float]  # train/val/test shares (sum to 1)
    small_class: str  # error | train_only: what to do with a class too small for 3 splits


@dataclass(frozen=True)
class PrepareConfig:
    size: int  # side of the square cached images
    resize: str  # squash | center_crop (crop the long side first, then resize)
    workers: int  # decode processes


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # a name from tasks.models.ARCHITECTURES
    pretrained: str  # none | imagenet (torchvision weights: local cache, else network)
    weights_path: str | None  # local state_dict file (loaded with weights_only=True)
    dropout: float  # dropout before the classification head
    metadata: bool = False  # fuse age, sex and anatomical site with the image features


@dataclass(frozen=True)
class AugmentConfig:
    crop_scale: tuple[float, float]  # RandomResizedCrop area range; (1, 1) = off
    hflip: bool  # random horizontal flip (lesions have no left/right)
    vflip: bool  # random vertical flip
    rotation: float  # max rotation in degrees (0 = off)
    color_jitter: float  # brightness/contrast/saturation jitter strength (0 = off)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int  # passes over the training split
    batch_size: int  # images per step
    optimizer: str  # adam | adamw | sgd
    lr: float  # peak learning rate
    weight_decay: float  # L2 / decoupled weight decay
    schedule: str  # cosine | step | none (after warm-up)
    warmup_epochs: int  # linear warm-up epochs
    step_size: int  # step schedule: epochs between decays
    gamma: float  # step schedule: decay factor
    label_smoothing: float  # cross-entropy label smoothing
    patience: int  # early stopping on val balanced accuracy (0 = off)
    freeze_backbone_epochs: int  # train only the head for the first N epochs
    class_weights: str  # none | inverse | sqrt_inverse | effective_number
    beta: float  # effective_number: beta of Cui et al. 2019
    weighted_sampler: bool  # sample classes evenly instead of (or besides) reweighting
    loss: str  # ce | focal
    focal_gamma: float  # focal loss focusing parameter
    augment: AugmentConfig  # training-time augmentations (torchvision.transforms.v2)
    device: str  # auto | cpu | cuda
    amp: str  # none | bf16 | fp16 (autocast on CUDA only)
    channels_last: bool  # NHWC memory format on CUDA
    compile: bool  # torch.compile the model
    workers: int  # DataLoader worker processes
    seed: int  # seeds python, numpy and torch
    deterministic: bool  # deterministic kernels (exactly resumable; slower on GPU)


@dataclass(frozen=True)
class CalibrateConfig:
    method: str  # temperature | vector | isotonic (fitted on the validation logits)
    bins: int  # equal-width bins for ECE, MCE and the reliability diagrams
    target_accuracy: float  # selective prediction: accuracy the kept (not referred) cases reach


@dataclass(frozen=True)
class ExportConfig:
    opset: int  # ONNX opset version
    parity_tolerance: float  # max |p_onnx - p_torch| allowed on the test images
    provider: str  # auto | cuda | cpu (onnxruntime execution provider)
    bench_batches: list[int]  # batch sizes for the latency / throughput comparison
    bench_repeats: int  # timed runs per batch size (after warm-up)
    alias: str  # registry alias set on the exported version


@dataclass(frozen=True)
class ExplainConfig:
    methods: list[str]  # names from tasks.cams.METHODS
    layers: list[str]  # early | middle | deep (CAM methods run at each)
    per_class: int  # test images sampled per class
    misclassified_cap: int  # plus every misclassified test image, up to this many
    batch_size: int  # images per batched CAM call
    scorecam_budget: int  # images explained with Score-CAM (one forward per channel)
    lime_budget: int  # images explained with LIME
    lime_samples: int  # perturbed samples per LIME explanation
    ig_steps: int  # Integrated Gradients path steps
    target: str  # predicted | true | a class name: the class each map explains
    top_k_percent: float  # share of pixels kept for Jaccard agreement and IoU
    perturbation_steps: int  # steps of the deletion / insertion curves
    bootstrap: int  # bootstrap resamples for the confidence intervals
    seed: int  # sampling and LIME seed


@dataclass(frozen=True)
class OrchestrationConfig:
    retries: int  # Prefect retries of a stage task after a transient failure
    retry_delay_s: float  # seconds between retries
    chunk_size: int  # images per explain-batch chunk (one Prefect task each)


@dataclass(frozen=True)
class GateConfig:
    metric: str  # test metric the candidate must not lose on (higher is better)
    min_gain: float  # candidate - champion on that metric must be >= this
    max_ece_increase: float  # candidate ECE (after calibration) may exceed champion's by this
    champion_alias: str  # alias the gate moves on promotion


@dataclass(frozen=True)
class TrackingConfig:
    experiment: str | None  # MLflow experiment (null: the dataset name)
    registered_model: str  # registered model name; each training adds a version


@dataclass(frozen=True)
class CompareConfig:
    variants: dict[str, list[str]]  # name -> key=value overrides of one model on the same split
    explain_images: int  # test images explained per model (quality and agreement)
    agreement_methods: list[str]  # methods compared pairwise (SSIM, Pearson, cosine, Jaccard)
    agreement_layer: str  # layer of the CAM methods in the agreement: early | middle | deep


@dataclass(frozen=True)
class TuneConfig:
    trials: int  # Optuna trials
    timeout_s: float  # stop starting new trials after this many seconds (0 = no limit)
    epochs: int  # epochs per trial (a pruned trial stops earlier)
    sampler: str  # tpe | random
    pruner: str  # median | none (prunes on validation balanced accuracy per epoch)
    seed: int  # sampler seed
    space: dict[str, dict[str, Any]]  # key -> {low, high[, log]} or {choices: [...]}
    preset: str  # where the best trial's params are written as a preset


@dataclass(frozen=True)
class RecipeConfig:
    name: str | None  # the recipe's id (set by a recipe preset; null: none applied)
    steps: list[str]  # what `dermaflow recipe` runs, in order: pipeline | compare | tune
    small: list[str] = field(default_factory=list)  # key=value pinned when on the embedded default


@dataclass(frozen=True)
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
    extra: dict[str, Any] = field(default_factory=dict)  # sections owned by later stages

    def as_flat_dict(self) -> dict[str, Any]:
        """Dotted key -> value, the form MLflow's log_params and DVC's params take."""
        return flatten(dataclasses.asdict(self))


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _build(cls: type, data: Any, where: str) -> Any:
    """Build dataclass ``cls`` from a mapping, recursing into nested dataclasses."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{where}.{f.name}: missing")
            continue
        kwargs[f.name] = _coerce(hints[f.name], data[f.name], f"{where}.{f.name}")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where)
    if origin is tuple:
        return tuple(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value), the value parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw)


def apply_override(tree: dict[str, Any], text: str) -> None:
    keys, value = parse_override(text)
    node = tree
    for k in keys[:-1]:
        if not isinstance(node.get(k), dict):
            raise ConfigError(f"override {text!r}: {k!r} is not a section of params")
        node = node[k]
    if keys[-1] not in node:
        raise ConfigError(f"override {text!r}: unknown key {'.'.join(keys)}")
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


_TYPED = {f.name for f in dataclasses.fields(Params)} - {"extra"}


def params_from_dict(tree: dict[str, Any], where: str = "params") -> Params:
    typed = {k: v for k, v in tree.items() if k in _TYPED}
    extra = {k: v for k, v in tree.items() if k not in _TYPED}
    params = _build(Params, {**typed, "extra": extra}, where)
    _check(params, where)
    return params


def read_params_tree(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: params file not found")
    tree = yaml.safe_load(path.read_text()) or {}
    for text in overrides or []:
        apply_override(tree, text)
    return tree


def load_params(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> Params:
    """Read params.yaml (plus ``key=value`` overrides) into the typed config."""
    return params_from_dict(read_params_tree(path, overrides), where=str(path))


def _check(p: Params, where: str) -> None:
    if p.dataset.layout not in {"auto", "isic2019", "ham10000", "folder"}:
        raise ConfigError(f"{where}: dataset.layout must be auto|isic2019|ham10000|folder")
    bad = set(p.synth.class_mix) - set(ISIC_CLASSES)
    if bad:
        raise ConfigError(f"{where}: synth.class_mix has unknown classes {sorted(bad)}")
    if abs(sum(p.split.fractions.values()) - 1.0) > 1e-6 or set(p.split.fractions) != {
        "train",
        "val",
        "test",
    }:
        raise ConfigError(f"{where}: split.fractions needs train/val/test summing to 1")
    if p.split.small_class not in {"error", "train_only"}:
        raise ConfigError(f"{where}: split.small_class must be error|train_only")
    if p.train.class_weights not in {"none", "inverse", "sqrt_inverse", "effective_number"}:
        raise ConfigError(
            f"{where}: train.class_weights must be none|inverse|sqrt_inverse|effective_number"
        )
    if p.model.pretrained not in {"none", "imagenet"}:
        raise ConfigError(f"{where}: model.pretrained must be none|imagenet")
    if p.prepare.resize not in {"squash", "center_crop"}:
        raise ConfigError(f"{where}: prepare.resize must be squash|center_crop")
    if p.tune.sampler not in {"tpe", "random"} or p.tune.pruner not in {"median", "none"}:
        raise ConfigError(f"{where}: tune.sampler must be tpe|random, tune.pruner median|none")
    for key, spec in p.tune.space.items():
        if not ({"low", "high"} <= set(spec) or "choices" in spec):
            raise ConfigError(f"{where}: tune.space.{key} needs low/high or choices")
    bad = set(p.recipe.steps) - {"pipeline", "compare", "tune"}
    if bad:
        raise ConfigError(f"{where}: recipe.steps has unknown steps {sorted(bad)}")
    for rule, sev in p.validate.severity.items():
        if sev not in {"error", "warning", "off"}:
            raise ConfigError(f"{where}: validate.severity.{rule} must be error|warning|off")


def apply_preset(params_path: str | Path, preset_path: str | Path) -> list[str]:
    """Merge a partial preset into params.yaml in place, keeping its comments.

    DVC tracks params.yaml itself, so a preset has to land there (not in a side file) for
    ``dvc repro`` to see the change.

    Returns:
        The dotted keys that changed.
    """
    patch = yaml.safe_load(Path(preset_path).read_text()) or {}
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

    ruamel's round-trip mode keeps the one-line comments. The merged file is validated
    before it replaces the original, so a bad key or value never lands.
    """
    from ruamel.yaml import YAML

    yaml_rt = YAML()
    yaml_rt.preserve_quotes = True
    yaml_rt.representer.add_representer(
        type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    yaml_rt.representer.add_representer(float, _represent_float)
    params_path = Path(params_path)
    tree = yaml_rt.load(params_path.read_text())
    changed: list[str] = []

    def merge(node: Any, update: dict[str, Any], prefix: str) -> None:
        for key, value in update.items():
            name = f"{prefix}{key}"
            if key not in node:
                raise ConfigError(f"{where}: unknown key {name}")
            whole = name in WHOLE_VALUES
            if isinstance(value, dict) and isinstance(node[key], dict) and value and not whole:
                merge(node[key], value, name + ".")
            elif node[key] != value:
                node[key] = value
                changed.append(name)

    merge(tree, patch, "")
    params_from_dict(yaml.safe_load(_dump(yaml_rt, tree)), where=where)
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
