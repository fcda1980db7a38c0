"""Bad input at every door: one table of malformed inputs, each run through the real CLI.

Every case drives a ``dermaflow`` command in-process (typer's CliRunner on ``flows.cli.app``,
in a scratch project folder) with one malformed input: a bad file, CSV, params value, model
file or option. The contract, asserted for each row:

- exit code 2 (:data:`tasks.stage.EXIT_BAD_INPUT`), never an uncaught exception;
- no ``Traceback`` in the output, and a short message (a line, or one line per bad key);
- the message names the offending thing (file, key, option, rule);
- nothing half-written: no temp leftovers, the case's outs absent, every file that existed
  before unchanged (params.yaml after a refused preset, an ``-o`` folder, ...).

This is the contract from now on: a new door gets its rows in this table.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from flows.cli import app
from flows.explain_batch import find_images  # noqa: F401 - see below

# Prefect configures logging handlers on the stream that is sys.stderr when it is first
# imported. Imported here, that is pytest's stream; imported inside a CliRunner call, it would
# be that call's buffer, closed afterwards, and a later case's log record would print a
# "Logging error" traceback that no user ever sees.
from tasks.stage import EXIT_BAD_INPUT
from tests.datasets import (
    ISIC_MASKS,
    make_folder,
    make_ham,
    make_isic,
    make_ph2,
    write_image,
    write_mask,
)
from tests.helpers import REPO, TINY, write_params

BASE = [*TINY, "dataset.root=ds", "dataset.layout=auto"]
GT = "ISIC_2019_Training_GroundTruth.csv"
META = "ISIC_2019_Training_Metadata.csv"


@dataclass(frozen=True)
class Assets:
    """Built once: a real ONNX model, a real bundle, a real (empty) MLflow store, images."""

    onnx: Path
    bundle: Path
    store: str
    images: Path


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Assets:
    from mlflow.tracking import MlflowClient

    from tasks.export import export_onnx
    from tasks.models import build_model, save_bundle
    from tasks.train import MEAN, STD

    root = tmp_path_factory.mktemp("assets")
    torch.manual_seed(0)
    model = build_model("custom_cnn", 2).eval()
    meta = {
        "arch": "custom_cnn",
        "classes": ["a", "b"],
        "input_size": 32,
        "normalization": {"mean": list(MEAN), "std": list(STD)},
        "data_version": "v1",
    }
    onnx = export_onnx(model, meta, root / "model.onnx", 18, 1.0, run_id="r")
    bundle = save_bundle(root / "model.pt", model, "custom_cnn", ["a", "b"], 32, MEAN, STD)
    store = f"sqlite:///{root / 'mlflow.db'}"
    MlflowClient(store, registry_uri=store).search_experiments()  # creates the schema once
    for i in range(2):
        write_image(root / "images" / f"lesion_{i}.jpg")
    return Assets(onnx, bundle, store, root / "images")


# --------------------------------------------------------------------------------------------
# Setup helpers: each edits the scratch project (the current folder) before the command runs
# --------------------------------------------------------------------------------------------


def edit_params(change: Callable[[dict], None]) -> Callable[[Path, Assets], None]:
    def setup(root: Path, assets: Assets) -> None:
        tree = yaml.safe_load((root / "params.yaml").read_text())
        change(tree)
        (root / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))

    return setup


def put(dotted: str, value) -> Callable[[dict], None]:
    def change(tree: dict) -> None:
        node = tree
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value

    return change


def rename_section(old: str, new: str) -> Callable[[dict], None]:
    return lambda tree: tree.__setitem__(new, tree.pop(old))


def write(relative: str, content: bytes | str) -> Callable[[Path, Assets], None]:
    def setup(root: Path, assets: Assets) -> None:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())

    return setup


def steps(*setups: Callable[[Path, Assets], None]) -> Callable[[Path, Assets], None]:
    def setup(root: Path, assets: Assets) -> None:
        for s in setups:
            s(root, assets)

    return setup


def isic(n: int = 12, **row) -> Callable[[Path, Assets], None]:
    def setup(root: Path, assets: Assets) -> None:
        labels = ["MEL", "NV", "BCC"]
        make_isic(
            root / "ds", [{"image": f"ISIC_{i}", "label": labels[i % 3], **row} for i in range(n)]
        )

    return setup


def folder(counts: dict[str, int]) -> Callable[[Path, Assets], None]:
    return lambda root, assets: make_folder(root / "ds", counts) and None


def ingested(root: Path, assets: Assets) -> None:
    """Run the real ingest stage in-process (the door under test comes after it)."""
    from tasks.config import load_params
    from tasks.ingest import run as ingest

    ingest(load_params(root / "params.yaml"))


def models_dir(run_json: dict | None, bundle: str = "full") -> Callable[[Path, Assets], None]:
    """models/model.pt (whole or cut in half) and a models/run.json (or none)."""

    def setup(root: Path, assets: Assets) -> None:
        (root / "models").mkdir(exist_ok=True)
        data = assets.bundle.read_bytes()
        (root / "models" / "model.pt").write_bytes(data if bundle == "full" else data[:1000])
        if run_json is not None:
            info = dict(run_json)
            if info.get("bundle_sha256") == "match":
                info["bundle_sha256"] = hashlib.sha256(data).hexdigest()
            (root / "models" / "run.json").write_text(json.dumps(info))

    return setup


def onnx_file(kind: str) -> Callable[[Path, Assets], None]:
    def setup(root: Path, assets: Assets) -> None:
        data = assets.onnx.read_bytes()
        content = {
            "junk": b"<html>404 Not Found</html>",
            "empty": b"",
            "half": data[: len(data) // 2],
        }
        if kind == "plain":
            torch.onnx.export(torch.nn.Linear(3, 2), (torch.zeros(1, 3),), str(root / "bad.onnx"),
                              dynamo=False, input_names=["input"])  # fmt: skip
        else:
            (root / "bad.onnx").write_bytes(content[kind])

    return setup


def images_here(root: Path, assets: Assets) -> None:
    shutil.copytree(assets.images, root / "imgs")


def onnx_here(root: Path, assets: Assets) -> None:
    shutil.copy(assets.onnx, root / "m.onnx")


def bundle_here(root: Path, assets: Assets) -> None:
    shutil.copy(assets.bundle, root / "model.pt")


def use_store(root: Path, assets: Assets) -> None:
    import os

    os.environ["MLFLOW_TRACKING_URI"] = assets.store  # reset by conftest after the test


def ext_folder(counts: dict[str, int]) -> Callable[[Path, Assets], None]:
    """A class-per-folder external set at ``ext/`` (the assets' models know classes a, b)."""
    return lambda root, assets: make_folder(root / "ext", counts) and None


def isic2018_bad_cell(root: Path, assets: Assets) -> None:
    """An ISIC 2018 Task 3 set whose third line has ``yes`` where a 0/1 belongs."""
    cols = "MEL,NV,BCC,AKIEC,BKL,DF,VASC"
    rows = [f"ISIC_{i},1.0,0.0,0.0,0.0,0.0,0.0,0.0" for i in range(3)]
    rows[1] = "ISIC_1,0.0,yes,0.0,0.0,0.0,0.0,0.0"
    (root / "ext").mkdir()
    (root / "ext" / "ISIC2018_Task3_Test_GroundTruth.csv").write_text(
        "\n".join([f"image,{cols}", *rows]) + "\n"
    )
    for i in range(3):
        write_image(root / "ext" / "ISIC2018_Task3_Test_Input" / f"ISIC_{i}.jpg")


def isic2018_groupings_without_lesion_id(root: Path, assets: Assets) -> None:
    """An ISIC 2018 set whose LesionGroupings CSV lacks its lesion_id column."""
    isic2018_bad_cell(root, assets)
    gt = root / "ext" / "ISIC2018_Task3_Test_GroundTruth.csv"
    gt.write_text(gt.read_text().replace(",yes,", ",1.0,"))
    (root / "ext" / "ISIC2018_Task3_Test_LesionGroupings.csv").write_text("image,lesion\n")


def ph2_txt(edit: Callable[[str], str]) -> Callable[[Path, Assets], None]:
    """PH2 as distributed at ``ext/`` (4 cases), its PH2_dataset.txt changed by ``edit``."""

    def setup(root: Path, assets: Assets) -> None:
        txt = make_ph2(root / "ext", ["common_nevus", "melanoma"] * 2) / "PH2_dataset.txt"
        txt.write_text(edit(txt.read_text()))

    return setup


# A cache an earlier run left at another size and resize mode than the params name.
STALE_META = json.dumps({"classes": ["a", "b"], "size": 48, "resize": "squash"})


@dataclass(frozen=True)
class Case:
    id: str
    args: list[str]
    says: list[str]
    setup: Callable[[Path, Assets], None] = lambda root, assets: None
    outs: list[str] = field(default_factory=list)


def _lat1(text: str) -> bytes:
    return text.encode("latin-1")


CASES = [
    # ---------------------------------------------------------------- bad params, every stage
    Case("synth-enum", ["synth"], ["unknown train.optimizer 'foo'", "adam | adamw | sgd"],
         edit_params(put("train.optimizer", "foo")), ["data"]),
    Case("ingest-arch", ["ingest"], ["unknown model.arch 'resnet999'", "did you mean 'resnet50'"],
         edit_params(put("model.arch", "resnet999")), ["data/manifest.parquet"]),
    Case("validate-methods", ["validate"], ["explain.methods has unknown methods ['foocam']"],
         edit_params(put("explain.methods", ["gradcam", "foocam"])), ["data/reports"]),
    Case("split-epochs", ["split"], ["train.epochs: -3; must be > 0"],
         edit_params(put("train.epochs", -3)), ["data/splits"]),
    Case("prepare-calibrate", ["prepare"], ["unknown calibrate.method 'bar'"],
         edit_params(put("calibrate.method", "bar")), ["data/prepared"]),
    Case("train-unknown-section", ["train"], ["2 invalid params", "train: missing",
         "unknown key(s) ['trian']; did you mean trian -> train?"],
         edit_params(rename_section("train", "trian")), ["models"]),
    Case("calibrate-fractions", ["calibrate"], ["the fractions must sum to 1"],
         edit_params(put("split.fractions", {"train": 0.7, "val": 0.1, "test": 0.1})),
         ["reports/calibrate"]),
    Case("export-not-yaml", ["export"], ["params.yaml: not valid YAML at line"],
         write("params.yaml", "train:\n  epochs: [1,\n"), ["models/model.onnx"]),
    Case("explain-no-params", ["explain", "-p", "missing.yaml"],
         ["missing.yaml: params file not found"], outs=["reports/explain"]),
    Case("set-unknown-key", ["synth", "--set", "synth.cuont=5"],
         ["unknown key synth.cuont; did you mean 'count'?"], outs=["data"]),
    Case("set-wrong-type", ["train", "--set", "train.epochs=abc"],
         ["train.epochs: 'abc' is not an integer"], outs=["models"]),
    Case("set-not-yaml", ["ingest", "-S", "train.epochs=[1,"], ["the value is not valid YAML"]),
    Case("set-mask-missing", ["train", "--set", "train.mask_missing=maybe"],
         ["unknown train.mask_missing 'maybe'", "error | skip"], outs=["models"]),
    Case("many-bad-keys", ["validate"], ["3 invalid params", "train.lr: 0.0; must be > 0",
         "unknown export.provider 'gpu9'", "gate.confidence: 2.0; must be < 1"],
         steps(edit_params(put("train.lr", 0.0)), edit_params(put("export.provider", "gpu9")),
               edit_params(put("gate.confidence", 2.0)))),
    Case("tune-space", ["tune", "--no-repro"], ["tune.space.train.lrr: not a params key"],
         edit_params(put("tune.space", {"train.lrr": {"low": 0.1, "high": 0.2}})),
         ["mlruns/optuna.db", "reports/tune"]),
    Case("compare-variant", ["compare", "--no-repro", "--set",
         "compare.variants={x: [model.arch=resnet19]}"],
         ["compare.variants.x: 'model.arch=resnet19': unknown model.arch 'resnet19'"],
         outs=["reports/compare"]),
    Case("compare-stale-cache", ["compare", "--no-repro"],
         ["data/prepared/meta.json: the cache was prepared with size 48 but prepare.size is 32"],
         write("data/prepared/meta.json", STALE_META), ["reports/compare"]),
    Case("tune-stale-cache", ["tune", "--no-repro"],
         ["data/prepared/meta.json: the cache was prepared with resize squash but "
          "prepare.resize is center_crop"],
         write("data/prepared/meta.json", STALE_META.replace("48", "32")), ["reports/tune"]),
    Case("run-set", ["run", "--no-refresh", "--set", "train.optimizer=foo"],
         ["unknown train.optimizer 'foo'"], outs=["data", "dvc.lock"]),
    # ---------------------------------------------------------------- presets and recipes
    Case("preset-bad-value", ["preset", "bad.yaml"], ["bad.yaml: train.epochs: -3; must be > 0",
         "params.yaml is unchanged"], write("bad.yaml", "train: {epochs: -3}\n")),
    Case("preset-unknown-key", ["preset", "bad.yaml"],
         ["unknown key trian; did you mean 'train'?"], write("bad.yaml", "trian: {epochs: 3}\n")),
    Case("preset-enum", ["preset", "bad.yaml"], ["unknown calibrate.method 'bar'"],
         write("bad.yaml", "calibrate: {method: bar}\n")),
    Case("preset-not-yaml", ["preset", "bad.yaml"], ["bad.yaml: not valid YAML"],
         write("bad.yaml", "train: {epochs: 3\n")),
    Case("preset-missing", ["preset", "nope.yaml"], ["nope.yaml", "does not exist"]),
    Case("recipe-step", ["recipe", "r.yaml", "--no-refresh"],
         ["recipe.steps has unknown steps ['deploy']"],
         write("r.yaml", "recipe: {name: r, steps: [deploy]}\n"), ["data"]),
    Case("recipe-small", ["recipe", "r.yaml", "--no-refresh"],
         ["recipe.small: 'train.epochs=0': train.epochs: 0; must be > 0"],
         write("r.yaml", "recipe: {name: r, steps: [pipeline], small: [train.epochs=0]}\n"),
         ["data"]),
    Case("recipe-missing", ["recipe", "nope.yaml"], ["nope.yaml: recipe not found"]),
    # ---------------------------------------------------------------- bad CSVs and datasets
    Case("gt-latin1", ["ingest"], [f"ds/{GT}: not UTF-8 text (byte 0xe9 on line 2"],
         steps(isic(), write(f"ds/{GT}", _lat1("image,MEL,NV\nISIC_caf\xe9,1,0\n"))),
         ["data/manifest.parquet"]),
    Case("gt-zero-bytes", ["ingest"], [f"ds/{GT}: empty file (0 bytes"],
         steps(isic(), write(f"ds/{GT}", b"")), ["data/manifest.parquet"]),
    Case("meta-latin1", ["ingest"], [f"ds/{META}: not UTF-8 text"],
         steps(isic(), write(f"ds/{META}", _lat1("image,age_approx,sex\nISIC_0,40,f\xe9\n"))),
         ["data/manifest.parquet"]),
    Case("gt-malformed", ["ingest"], [f"ds/{GT}: not a readable CSV"],
         steps(isic(), write(f"ds/{GT}", 'image,MEL,NV\n"ISIC_0,1,0\n')),
         ["data/manifest.parquet"]),
    Case("gt-no-image-column", ["ingest"], [f"ds/{GT}: missing column(s) ['image']"],
         steps(isic(), write(f"ds/{GT}", "img,MEL,NV\nISIC_0,1,0\n")), ["data/manifest.parquet"]),
    Case("gt-not-onehot-number", ["ingest"], [f"ds/{GT} line 2: column MEL is 'x'"],
         steps(isic(), write(f"ds/{GT}", "image,MEL,NV\nISIC_0,x,0\n")), ["data/manifest.parquet"]),
    Case("isic-without-gt", ["ingest"], [f"ds/{GT}: missing; the root looks like ISIC 2019"],
         steps(isic(), lambda root, a: (root / "ds" / GT).unlink()), ["data/manifest.parquet"]),
    Case("ham-without-metadata", ["ingest"], ["HAM10000_metadata.csv: missing"],
         steps(lambda root, a: make_ham(root / "ds", [{"image_id": "I0", "dx": "nv"}]) and None,
               lambda root, a: (root / "ds" / "HAM10000_metadata.csv").unlink()),
         ["data/manifest.parquet"]),
    Case("root-missing", ["ingest"], ["ds: dataset root does not exist"],
         outs=["data/manifest.parquet"]),
    Case("masks-folder-missing", ["ingest", "--set", "dataset.masks=nomasks"],
         ["nomasks: dataset.masks is not a folder"], isic(), ["data/manifest.parquet"]),
    Case("header-only-csv", ["validate"], ["[error] min_images: 0 image(s) in the manifest",
         "min_classes: 0 class(es)"],
         steps(isic(), write(f"ds/{GT}", "image,MEL,NV,BCC\n"), ingested)),
    Case("one-class", ["validate"], ["[error] min_classes: 1 class(es) after the label map"],
         steps(folder({"naevus": 12}), ingested)),
    Case("age-text", ["validate"], ["age_numeric", "ISIC_2019_Training_Metadata.csv line 2",
         "age 'abc' is not a number"], steps(isic(age="abc"), ingested)),
    Case("mask-blank", ["validate"], ["mask_nonempty", "mask marks no lesion pixel"],
         steps(isic(mask=True), lambda root, a: Image.new("L", (48, 48), 0).save(
             root / "ds" / ISIC_MASKS / "ISIC_0_segmentation.png"), ingested)),
    Case("mask-misaligned", ["validate"], ["mask_size", "mask 64x32 px vs image 48x48 px"],
         steps(isic(mask=True), lambda root, a: write_mask(
             root / "ds" / ISIC_MASKS / "ISIC_1_segmentation.png", (64, 32)) and None, ingested)),
    Case("image-over-max-pixels", ["validate"], ["image_readable",
         "larger than the decompression-bomb limit (48x48 = 2304 pixels > 1000; "
         "validate.max_pixels)"],
         steps(folder({"a": 6, "b": 6}), edit_params(put("validate.max_pixels", 1000)), ingested)),
    Case("manifest-missing", ["validate"], ["data/manifest.parquet: no manifest; run the ingest"],
         outs=["data/reports"]),
    Case("manifest-corrupt", ["validate"], ["data/manifest.parquet: not a readable manifest"],
         write("data/manifest.parquet", b"PAR1 not really"), ["data/reports"]),
    Case("split-after-failed-validation", ["split"], ["says the data failed validation"],
         write("data/reports/validation.json", '{"passed": false}'), ["data/splits"]),
    Case("prepare-without-splits", ["prepare"],
         ["data/splits/train.parquet: not found; run the stage that writes it first"],
         outs=["data/prepared"]),
    Case("train-without-data", ["train"], ["data/prepared: no prepared cache; run `dvc repro"],
         outs=["models", "mlruns"]),
    # ---------------------------------------------------------------- model files, lineage
    Case("calibrate-other-training", ["calibrate"], ["calibrate refuses to run",
         "come from different trainings"],
         models_dir({"run_id": "r1", "bundle_sha256": "0" * 64}),
         ["reports/calibrate", "metrics/calibrate.json"]),
    Case("export-truncated-bundle", ["export"], ["models/model.pt: corrupt or truncated"],
         models_dir({"run_id": "r1", "bundle_sha256": "match"}, bundle="half"),
         ["models/model.onnx", "metrics/export.json"]),
    Case("explain-no-run-file", ["explain"], ["models/run.json: missing; run the train stage"],
         models_dir(None), ["reports/explain"]),
    Case("ood-no-run-file", ["ood"], ["ood refuses to run", "models/run.json: missing"],
         models_dir(None), ["reports/ood", "metrics/ood.json", "models/ood.json"]),
    Case("conformal-no-run-file", ["conformal"], ["conformal refuses to run",
         "models/run.json: missing"], models_dir(None),
         ["reports/conformal", "metrics/conformal.json", "models/conformal.json"]),
    Case("subgroups-no-run-file", ["subgroups"], ["subgroups refuses to run",
         "models/run.json: missing"], models_dir(None),
         ["reports/subgroups", "metrics/subgroups.json"]),
    Case("card-no-run-file", ["card"], ["card refuses to run", "models/run.json: missing"],
         models_dir(None), ["reports/card"]),
    Case("predict-junk-onnx", ["predict", "imgs", "-m", "bad.onnx"],
         ["bad.onnx: not a readable ONNX model, corrupt or truncated"],
         steps(images_here, onnx_file("junk")), ["predictions.csv"]),
    Case("predict-empty-onnx", ["predict", "imgs", "-m", "bad.onnx"],
         ["bad.onnx: empty file (0 bytes), not an ONNX model"],
         steps(images_here, onnx_file("empty")), ["predictions.csv"]),
    Case("predict-truncated-onnx", ["predict", "imgs", "-m", "bad.onnx"],
         ["bad.onnx: not a readable ONNX model"],
         steps(images_here, onnx_file("half")), ["predictions.csv"]),
    Case("predict-plain-onnx", ["predict", "imgs", "-m", "bad.onnx"],
         ["bad.onnx: not a dermaflow ONNX model"],
         steps(images_here, onnx_file("plain")), ["predictions.csv"]),
    Case("predict-unknown-alias", ["predict", "imgs", "-m", "models:/nope@champion"],
         ["models:/nope@champion: not found in the MLflow registry"],
         steps(images_here, use_store), ["predictions.csv"]),
    Case("predict-model-missing", ["predict", "imgs", "-m", "gone.onnx"],
         ["gone.onnx: model file not found"], images_here, ["predictions.csv"]),
    # ---------------------------------------------------------------- bad options and inputs
    Case("predict-batch-0", ["predict", "imgs", "--batch-size", "0"],
         ["--batch-size 0: must be >= 1"], images_here, ["predictions.csv"]),
    Case("predict-provider", ["predict", "imgs", "--provider", "gpu9"],
         ["--provider 'gpu9': unknown execution provider"], images_here, ["predictions.csv"]),
    Case("predict-out-is-folder", ["predict", "imgs", "-o", "outdir"],
         ["outdir: is a folder; the -o/--out CSV needs a file name"],
         steps(images_here, write("outdir/keep.txt", "x"))),
    Case("predict-input-missing", ["predict", "nowhere"], ["nowhere: no such file or folder"],
         outs=["predictions.csv"]),
    Case("predict-only-masks", ["predict", "masks"],
         ["no image files under masks (1 mask(s) skipped)"],
         lambda root, a: write_image(root / "masks" / "x_segmentation.png") and None,
         ["predictions.csv"]),
    Case("predict-metadata-missing", ["predict", "imgs", "--metadata", "meta.csv"],
         ["--metadata meta.csv: no such file"], images_here, ["predictions.csv"]),
    Case("predict-metadata-bad-age", ["predict", "imgs", "--metadata", "meta.csv"],
         ["--metadata meta.csv line 3: age 'abc' is not a number in 0-120"],
         steps(images_here, write("meta.csv", "image_id,age,sex\nx,40,male\ny,abc,male\n")),
         ["predictions.csv"]),
    Case("predict-metadata-twice", ["predict", "imgs", "--metadata", "meta.csv"],
         ["--metadata meta.csv line 3: image id x again (first on line 2)"],
         steps(images_here, write("meta.csv", "image_id,site\nx,back\nx,face\n")),
         ["predictions.csv"]),
    Case("predict-metadata-no-prior", ["predict", "imgs", "-m", "m.onnx", "--metadata", "m.csv"],
         ["--metadata m.csv: m.onnx carries no metadata prior", "leave --metadata out"],
         steps(images_here, onnx_here, write("m.csv", "image_id,age\nx,40\n")),
         ["predictions.csv"]),
    Case("explain-batch-metadata-bad-age",
         ["explain-batch", "imgs", "-m", "model.pt", "--metadata", "m.csv"],
         ["--metadata m.csv line 2: age '200' is not a number in 0-120"],
         steps(images_here, bundle_here, write("m.csv", "image_id,age\nx,200\n")),
         ["reports/explain_batch"]),
    Case("explain-batch-metadata-no-prior",
         ["explain-batch", "imgs", "-m", "model.pt", "--metadata", "m.csv"],
         ["--metadata m.csv: model.pt carries no metadata prior"],
         steps(images_here, bundle_here, write("m.csv", "image_id,age\nx,40\n")),
         ["reports/explain_batch"]),
    Case("explain-batch-truncated-bundle", ["explain-batch", "imgs", "-m", "model.pt"],
         ["model.pt: cannot load the model bundle"],
         steps(images_here, write("model.pt", b"PK\x03\x04 cut")), ["reports/explain_batch"]),
    Case("explain-batch-unknown-alias", ["explain-batch", "imgs", "-m", "models:/nope@champion"],
         ["models:/nope@champion: not found in the registry"],
         steps(images_here, use_store), ["reports/explain_batch"]),
    Case("explain-batch-out-is-file", ["explain-batch", "imgs", "-m", "model.pt", "-o", "out"],
         ["out: is a file; the -o/--out folder must be a folder"],
         steps(images_here, bundle_here, write("out", "keep me"))),
    Case("explain-batch-method", ["explain-batch", "imgs", "-m", "model.pt", "--methods",
         "gradcam,foocam"], ["unknown explanation method 'foocam'"],
         steps(images_here, bundle_here), ["reports/explain_batch"]),
    Case("explain-batch-chunk-0", ["explain-batch", "imgs", "-m", "model.pt", "--chunk-size", "0"],
         ["--chunk-size 0: must be >= 1"], steps(images_here, bundle_here),
         ["reports/explain_batch"]),
    Case("explain-batch-no-images", ["explain-batch", "empty", "-m", "model.pt"],
         ["no image files under empty"],
         steps(bundle_here, lambda root, a: (root / "empty").mkdir()), ["reports/explain_batch"]),
    # ---------------------------------------------------------------- evaluate ROOT --model
    Case("evaluate-root-missing", ["evaluate", "nowhere", "-m", "model.pt"],
         ["nowhere: external set root does not exist"], bundle_here, ["reports/external"]),
    Case("evaluate-isic2018-bad-row", ["evaluate", "ext", "-m", "model.pt"],
         ["ISIC2018_Task3_Test_GroundTruth.csv line 3: column NV is 'yes', not 0 or 1"],
         steps(bundle_here, isic2018_bad_cell), ["reports/external"]),
    Case("evaluate-isic2018-groupings-without-lesion-id", ["evaluate", "ext", "-m", "model.pt"],
         ["ISIC2018_Task3_Test_LesionGroupings.csv: missing column(s) ['lesion_id']"],
         steps(bundle_here, isic2018_groupings_without_lesion_id), ["reports/external"]),
    Case("evaluate-ph2-bad-code", ["evaluate", "ext", "-m", "model.pt"],
         ["PH2_dataset.txt line 3: column Clinical Diagnosis is '3', not 0 (common_nevus)"],
         steps(bundle_here, ph2_txt(lambda t: re.sub(r"\|\|\s+2 \|\|", "|| 3 ||", t, count=1))),
         ["reports/external"]),
    Case("evaluate-ph2-no-header", ["evaluate", "ext", "-m", "model.pt"],
         ["PH2_dataset.txt line 1: a table row before the header"],
         steps(bundle_here, ph2_txt(lambda t: t.replace("|| Name ||", "|| Case ||", 1))),
         ["reports/external"]),
    Case("evaluate-ph2-without-its-table", ["evaluate", "ext", "-m", "model.pt"],
         ["PH2_dataset.txt: missing; the root looks like PH2 (PH2 Dataset images)"],
         steps(bundle_here, ph2_txt(lambda t: t),
               lambda root, a: (root / "ext/PH2_dataset.txt").unlink()),
         ["reports/external"]),
    Case("evaluate-label-map-misses-a-class", ["evaluate", "ext", "-m", "model.pt",
         "--label-map", "naevus=a"], ["dataset.label_map does not map melanoma (6 images)"],
         steps(bundle_here, ext_folder({"melanoma": 6, "naevus": 6})), ["reports/external"]),
    Case("evaluate-class-unknown-to-model", ["evaluate", "ext", "-m", "model.pt"],
         ["the set has classes the model does not know: c (6 images)"],
         steps(bundle_here, ext_folder({"a": 6, "c": 6})), ["reports/external"]),
    Case("evaluate-label-map-syntax", ["evaluate", "ext", "-m", "model.pt", "--label-map",
         "melanoma"], ["--label-map entry 'melanoma': expected SOURCE=TARGET"],
         steps(bundle_here, ext_folder({"a": 6, "b": 6})), ["reports/external"]),
    Case("evaluate-too-few-images", ["evaluate", "ext", "-m", "model.pt"],
         ["[error] min_images"], steps(bundle_here, ext_folder({"a": 3, "b": 3})),
         ["reports/external"]),
    Case("evaluate-layout", ["evaluate", "ext", "-m", "model.pt", "--layout", "isic2020"],
         ["--layout 'isic2020': unknown layout"],
         steps(bundle_here, ext_folder({"a": 6, "b": 6})), ["reports/external"]),
    Case("evaluate-bad-name", ["evaluate", "ext", "-m", "model.pt", "--name", "a/b"],
         ["--name 'a/b': use letters, digits"],
         steps(bundle_here, ext_folder({"a": 6, "b": 6})), ["reports/external"]),
    Case("evaluate-model-missing", ["evaluate", "ext", "-m", "gone.pt"],
         ["gone.pt: model file not found"], ext_folder({"a": 6, "b": 6}), ["reports/external"]),
    Case("evaluate-junk-onnx", ["evaluate", "ext", "-m", "bad.onnx"],
         ["bad.onnx: not a readable ONNX model"],
         steps(ext_folder({"a": 6, "b": 6}), onnx_file("junk")), ["reports/external"]),
    Case("evaluate-out-is-file", ["evaluate", "ext", "-m", "model.pt", "-o", "out"],
         ["out: is a file; the -o/--out folder must be a folder"],
         steps(bundle_here, ext_folder({"a": 6, "b": 6}), write("out", "keep me"))),
]  # fmt: skip
_TEMP = re.compile(r"^\..+\.(tmp|old-\d+)$|\.tmp$")


def _files(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file() and "mlruns" not in p.relative_to(root).parts
    }


def test_the_table_is_big_enough():
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)
    doors = {c.args[0] for c in CASES}
    stages = {"synth", "ingest", "validate", "split", "prepare", "train", "calibrate", "export"}
    trust = {"ood", "conformal", "evaluate", "subgroups", "card"}
    assert stages | trust | {"explain", "predict", "explain-batch", "preset", "recipe"} <= doors


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gets_exit_2_and_one_message(case, assets, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path / "params.yaml", BASE)
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    case.setup(tmp_path, assets)
    before = _files(tmp_path)

    result = CliRunner().invoke(app, case.args)

    output = result.output
    assert result.exit_code == EXIT_BAD_INPUT, output
    assert result.exception is None or isinstance(result.exception, SystemExit), output
    assert "Traceback" not in output
    for text in case.says:
        assert text in output, output
    assert len([line for line in output.splitlines() if line.strip()]) <= 20, output
    for out in case.outs:
        assert not (tmp_path / out).exists(), f"{out} was written"
    after = _files(tmp_path)
    changed = [path for path, digest in before.items() if after.get(path) != digest]
    assert not changed, f"changed or removed: {changed}"
    leftovers = [p for p in tmp_path.rglob("*") if _TEMP.search(p.name)]
    assert not leftovers, f"half-written: {leftovers}"
