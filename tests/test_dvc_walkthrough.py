"""The README's real-data and run-comparison commands, typed as a user would, on real DVC.

Each test is a tmp git + DVC repo holding a copy of the project (or a bare one), a few tiny
real image files in class folders, and a local DVC remote. They check what a new user meets
first: that ``dvc add data/raw/<set>`` and ``git add`` of its .dvc file work with the
project's .gitignore, that a clone gets the same data and the same up-to-date pipeline back
with ``dvc pull``, that ``dvc import-url`` / ``dvc update`` refresh a dataset, that
``dvc plots show`` draws one line per class / calibration stage / train-val series and the
PNG figures as images, and that two runs with different params are told apart by
``dvc exp show`` and ``dvc params diff``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.helpers import REPO, TINY, make_project, run

CLASSES = ("melanoma", "naevus", "keratosis")
PER_CLASS = 14


def write_images(root: Path, classes: tuple[str, ...] = CLASSES, per_class: int = PER_CLASS):
    """32x32 PNGs and JPEGs in one folder per class; each class has its own tint.

    Real files (not stand-ins), so ingest, validation and prepare decode them as they would
    a downloaded set; the tint gives the tiny model something to learn.
    """
    rng = np.random.default_rng(len(classes) * 1000 + per_class)
    for k, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 120, (32, 32, 3)).astype(np.uint8)
            pixels[..., k % 3] += 120
            suffix = "png" if i % 2 else "jpg"
            Image.fromarray(pixels).save(folder / f"{name}_{i:02d}.{suffix}")


def git(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``git`` with a fixed identity: the tmp repos must not depend on the user's config."""
    ident = ["-c", "user.email=walkthrough@example.com", "-c", "user.name=walkthrough"]
    return run(["git", *ident, *args], root, check=check)


def is_ignored(root: Path, path: str) -> bool:
    """``git check-ignore`` exits 0 for an ignored path and 1 for one git would add."""
    code = run(["git", "check-ignore", "-q", path], root, check=False).returncode
    assert code in (0, 1), f"git check-ignore {path} exited {code}"
    return code == 0


def ran(output: str) -> list[str]:
    """The stages a ``dvc repro`` ran, from what it prints (the stage command may vary)."""
    return re.findall(r"Running stage '(\w+)'", output)


def project_with_dvc_files(root: Path) -> Path:
    """The project copy of ``make_project`` plus the files a user's checkout has for DVC.

    ``make_project`` copies code, dvc.yaml and params; a clone of the real repo also has the
    root .gitignore and the plot templates in .dvc/plots, which are what is under test here.
    """
    project = make_project(root, TINY)
    shutil.copy(REPO / ".gitignore", project / ".gitignore")
    shutil.copytree(REPO / ".dvc" / "plots", project / ".dvc" / "plots")
    for key, value in (("user.email", "walkthrough@example.com"), ("user.name", "walkthrough")):
        run(["git", "config", key, value], project)  # `dvc exp save` commits through DVC
    git(project, "add", "-A")
    git(project, "commit", "-qm", "project files")
    return project


def exp_runs(project: Path) -> dict[str, dict]:
    """``dvc exp show --json`` as {name: {"params": params.yaml, "metrics": split.json}}."""
    rows = json.loads(run(["dvc", "exp", "show", "--json"], project).stdout)
    found = {}
    for baseline in rows:
        for exp in baseline.get("experiments") or []:
            for rev in exp["revs"]:
                data = rev["data"]
                split = data.get("metrics", {}).get("metrics/split.json", {})
                found[rev["name"]] = {
                    "params": data["params"]["params.yaml"]["data"],
                    "metrics": split.get("data", {}),
                }
    return found


@pytest.mark.slow
def test_real_data_walkthrough_add_push_clone_and_compare_runs(tmp_path):
    """README "Real data" and "Comparing runs with DVC", in order, on a tiny folder set."""
    project = project_with_dvc_files(tmp_path / "proj")
    dataset = project / "data/raw/lesions"
    write_images(dataset)

    # `dvc add` the set; its .dvc file (and DVC's .gitignore beside it) go into git, the
    # images never do, not even before DVC writes its own ignore entry.
    image = "data/raw/lesions/melanoma/melanoma_00.jpg"
    assert is_ignored(project, image)
    run(["dvc", "add", "data/raw/lesions"], project)
    assert not is_ignored(project, "data/raw/lesions.dvc")
    assert not is_ignored(project, "data/raw/.gitignore")
    assert is_ignored(project, image)
    git(project, "add", "data/raw/lesions.dvc", "data/raw/.gitignore")
    git(project, "commit", "-qm", "lesions data set")

    # A local remote; a clone gets the same files back with `dvc pull`.
    store = tmp_path / "store"
    run(["dvc", "remote", "add", "-d", "store", str(store)], project)
    run(["dvc", "push"], project)
    git(project, "add", ".dvc/config")
    git(project, "commit", "-qm", "DVC remote")
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(project), str(clone)], tmp_path)
    assert not (clone / "data/raw/lesions").exists()
    before = json.loads(run(["dvc", "data", "status", "--json"], clone).stdout)
    assert "data/raw/lesions/" in before["uncommitted"]["deleted"]
    # --allow-missing: stages never run (train, the synthetic set) have nothing to pull yet.
    run(["dvc", "pull", "--allow-missing"], clone)
    pulled = sorted(p.relative_to(clone / "data/raw") for p in clone.rglob("data/raw/lesions/*/*"))
    assert len(pulled) == len(CLASSES) * PER_CLASS
    assert pulled == sorted(p.relative_to(project / "data/raw") for p in dataset.glob("*/*"))
    assert "up to date" in run(["dvc", "status", "data/raw/lesions.dvc"], clone).stdout
    assert json.loads(run(["dvc", "data", "status", "--json"], clone).stdout) == {}

    # The data stages on the set, with configs/folder.yaml copied and pointed at it.
    preset = yaml.safe_load((REPO / "configs/folder.yaml").read_text())
    preset["dataset"].update(name="lesions", root="data/raw/lesions")
    preset["validate"]["min_side"] = preset["prepare"]["size"] = 32  # tiny images
    (project / "configs").mkdir()
    (project / "configs/lesions.yaml").write_text(yaml.safe_dump(preset))
    run(["dermaflow", "preset", "configs/lesions.yaml"], project)
    assert ran(run(["dvc", "repro", "prepare"], project).stdout) == [
        "ingest",
        "validate",
        "split",
        "prepare",
    ]
    for path in ("data/manifest.parquet", "data/reports/validation.json", "data/prepared"):
        assert is_ignored(project, path), path
    for path in ("dvc.lock", "metrics/split.json", "data/.gitignore"):
        assert not is_ignored(project, path), path

    # Two more runs with different params, each saved as a DVC experiment as the flow's
    # `save_experiment` does after `dermaflow run --set ...`. Nothing is committed yet, so the
    # metrics in the experiments prove the untracked outputs went in.
    from flows.pipeline import save_experiment
    from tasks.config import apply_overrides

    head = git(project, "rev-parse", "HEAD").stdout
    for seed in (7, 8):
        apply_overrides(project / "params.yaml", [f"split.seed={seed}"])
        assert ran(run(["dvc", "repro", "prepare"], project).stdout) == ["split", "prepare"]
        assert save_experiment.fn(str(project), f"split seed {seed}") == f"split-seed-{seed}"
    runs = exp_runs(project)
    assert {name: data["params"]["split"]["seed"] for name, data in runs.items()} == {
        "split-seed-7": 7,
        "split-seed-8": 8,
    }
    assert [runs[f"split-seed-{seed}"]["metrics"]["seed"] for seed in (7, 8)] == [7, 8]
    diff = json.loads(
        run(["dvc", "params", "diff", "split-seed-7", "split-seed-8", "--json"], project).stdout
    )
    assert diff["params.yaml"] == {"split.seed": {"old": 7, "new": 8, "diff": 1}}
    metrics = json.loads(
        run(["dvc", "metrics", "diff", "split-seed-7", "split-seed-8", "--json"], project).stdout
    )
    assert metrics["metrics/split.json"]["seed"]["diff"] == 1
    # The experiments live on hidden refs: HEAD and the workspace are as the run left them.
    assert git(project, "rev-parse", "HEAD").stdout == head
    assert "seed: 8" in (project / "params.yaml").read_text()
    assert git(project, "diff", "--cached", "--name-only").stdout == ""

    # Commit as example-get-started does: the README's `git add` leaves nothing else for git
    # (every data file is ignored). A clone that pulls then finds every data stage up to date.
    git(
        project,
        "add",
        "configs/lesions.yaml",
        "params.yaml",
        "dvc.lock",
        "metrics",
        "data/.gitignore",
        "data/reports/.gitignore",
    )
    assert git(project, "status", "--porcelain", "--untracked-files=all").stdout.split("\n") == [
        f"A  {path}"
        for path in (
            "configs/lesions.yaml",
            "data/.gitignore",
            "data/reports/.gitignore",
            "dvc.lock",
            "metrics/ingest.json",
            "metrics/prepare.json",
            "metrics/split.json",
        )
    ] + ["M  params.yaml", ""]
    git(project, "commit", "-qm", "lesions: prepared")
    run(["dvc", "push"], project)
    git(clone, "pull", "-q")
    run(["dvc", "pull", "--allow-missing"], clone)
    again = run(["dvc", "repro", "prepare"], clone)
    assert ran(again.stdout) == [], again.stdout
    assert "up to date" in run(["dvc", "status", "prepare", "--with-deps"], clone).stdout


@pytest.mark.slow
def test_dvc_plots_show_draws_every_series_and_the_figures(tmp_path):
    """What ``dvc plots show`` draws from the files train and calibrate write.

    The files come from the stages' own writers (``train.save_outputs``,
    ``calibrate.write_outputs``) after a real 2-epoch training on a tiny prepared set, in
    process: the same files as ``dvc repro calibrate`` leaves, without its minute of MLflow
    logging and start-up.
    """
    from tasks import paths
    from tasks.calibrate import calibrate, write_outputs
    from tasks.train import save_outputs, train
    from tests.helpers import prepare_tiny

    project = project_with_dvc_files(tmp_path / "proj")
    work = tmp_path / "work"
    work.mkdir()
    p = prepare_tiny(work)
    result = train(p.model, p.train, work / "prepared", work / "ckpt.pt", show_progress=False)
    save_outputs(
        result, p.model.arch, "v0", project / paths.BUNDLE, project / paths.PREDICTIONS,
        project / paths.TRAIN_REPORTS, work / "prepared", [],
    )  # fmt: skip
    cal = calibrate(
        result.val_logits, result.val_labels, result.test_logits, result.test_labels,
        "temperature", 10, 0.9,
    )  # fmt: skip
    write_outputs(cal, project / paths.CALIBRATION)

    plots = json.loads(run(["dvc", "plots", "show", "--json"], project).stdout)["data"]
    figures = [
        "train/confusion_matrix.png",
        "train/confusion_matrix_normalized.png",
        "train/roc_curves.png",
        "train/training_curves.png",
        "calibrate/reliability.png",
        "calibrate/confidence_histogram.png",
        "calibrate/risk_coverage.png",
    ]
    images = {k for k, v in plots.items() if v and v[0]["type"] == "image"}
    assert images == {f"reports/{name}" for name in figures}

    def series(plot_id: str, field: str) -> set[str]:
        """The lines a vega plot draws: the values of the field its colour encodes."""
        (plot,) = plots[plot_id]
        content = plot["content"]
        assert content["encoding"]["color"]["field"] == field, content["encoding"]
        return {row[field] for row in content["data"]["values"]}

    # One ROC curve per class of the tiny set (NV, MEL, BCC), not one line through all.
    assert series("reports/train/roc.json", "class") == {"NV", "MEL", "BCC"}
    for path in ("reports/calibrate/reliability.json", "reports/calibrate/risk_coverage.json"):
        assert series(path, "stage") == {"before", "after"}, path
    # The loss: DVC's multi-field syntax gives each field its own line (dashed by `field`).
    (loss,) = plots["train_loss"]
    assert loss["content"]["encoding"]["strokeDash"]["field"] == "field"
    rows = loss["content"]["data"]["values"]
    assert {r["field"] for r in rows} == {"train_loss", "val_loss"}
    assert len(rows) == 2 * len(result.history) == 2 * p.train.epochs
    (val,) = plots["val_metrics"]
    assert {r["field"] for r in val["content"]["data"]["values"]} == {
        "val_accuracy",
        "val_balanced_accuracy",
        "val_macro_f1",
    }


@pytest.mark.slow
def test_import_url_of_a_local_folder_and_update(tmp_path):
    """README's import route: ``dvc import-url`` a folder, then ``dvc update`` sees new files."""
    incoming = tmp_path / "incoming"
    write_images(incoming, CLASSES[:2], 3)
    repo = tmp_path / "repo"
    repo.mkdir()
    run(["git", "init", "-q"], repo)
    run(["dvc", "init", "-q"], repo)
    shutil.copy(REPO / ".gitignore", repo / ".gitignore")

    (repo / "data/raw").mkdir(parents=True)  # DVC wants the folder the .dvc file goes in
    run(["dvc", "import-url", str(incoming), "data/raw/incoming"], repo)
    assert len(list((repo / "data/raw/incoming").glob("*/*"))) == 6
    assert not is_ignored(repo, "data/raw/incoming.dvc")
    git(repo, "add", ".gitignore", "data/raw/incoming.dvc", "data/raw/.gitignore")
    git(repo, "commit", "-qm", "import")

    write_images(incoming, ("bcc",), 2)
    run(["dvc", "update", "data/raw/incoming.dvc"], repo)
    assert len(list((repo / "data/raw/incoming").glob("*/*"))) == 8
    assert (repo / "data/raw/incoming/bcc/bcc_01.png").is_file()
    assert "up to date" in run(["dvc", "status", "data/raw/incoming.dvc"], repo).stdout


def test_gitignore_keeps_data_out_and_dvc_pointers_in(tmp_path):
    """The root .gitignore alone, rule by rule (no DVC): what a user may and may not commit."""
    run(["git", "init", "-q"], tmp_path)
    shutil.copy(REPO / ".gitignore", tmp_path / ".gitignore")
    ignored = [
        "data/raw/ham10000/HAM10000_images_part_1/ISIC_0024306.jpg",
        "data/raw/ham10000/HAM10000_metadata.csv",
        "data/manifest.parquet",
        "data/splits/train.parquet",
        "data/prepared/images.npy",
        "data/reports/validation.json",
        "mlruns/mlflow.db",
        "models/checkpoint.pt",
        "reports/compare/report.html",
        "dvc_plots/index.html",
    ]
    committed = [
        "data/raw/ham10000.dvc",
        "data/raw/.gitignore",
        "data/.gitignore",
        "data/reports/.gitignore",
        "data/.gitkeep",
        "dvc.lock",
        "dvc.yaml",
        "params.yaml",
        "metrics/train.json",
        "reports/train/roc.json",
        "models/run.json",
        ".dvc/plots/by_class.json",
    ]
    for path in ignored + committed:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("x")
    assert [p for p in ignored if not is_ignored(tmp_path, p)] == []
    assert [p for p in committed if is_ignored(tmp_path, p)] == []
