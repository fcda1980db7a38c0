"""`dvc repro` is the contract: a code change re-runs exactly the stages that run that code.

Two checks. The first computes, from the code, every project module each stage imports and
compares it with the stage's deps in dvc.yaml. The second edits a helper in a tmp copy of the
project and asks real DVC which stages changed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.deps import module_closure
from tests.helpers import REPO, TINY, make_project, run

DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
PROJECT_DIRS = ("tasks/", "flows/", "bench/")


def _code_deps(stage: dict) -> set[str]:
    return {d for d in stage["deps"] if d.startswith(PROJECT_DIRS) and d.endswith(".py")}


def _closures(root: Path) -> dict[str, set[str]]:
    return {name: module_closure(root, f"tasks/{name}.py") for name in DVC}


@pytest.mark.parametrize("name", list(DVC))
def test_stage_runs_its_own_module_and_lists_every_module_it_imports(name):
    stage = DVC[name]
    # The command enters through the stage's own module, never the whole CLI.
    assert stage["cmd"] == f"python -m tasks.{name}"
    closure = module_closure(REPO, f"tasks/{name}.py")
    listed = _code_deps(stage)
    assert not closure - listed, f"{name}: dvc.yaml misses {sorted(closure - listed)}"
    assert not listed - closure, f"{name}: dvc.yaml lists unused {sorted(listed - closure)}"
    # The closure goes through function-level imports and helpers of helpers.
    assert {"tasks/stage.py", "tasks/config.py", "tasks/__init__.py"} <= closure


def test_closure_sees_nested_and_local_imports(tmp_path):
    pkg = tmp_path / "tasks"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from tasks.b import g\n    return g()\n")
    (pkg / "b.py").write_text("from tasks import c\n\ndef g():\n    return c.h()\n")
    (pkg / "c.py").write_text("import json\n\ndef h():\n    return json.dumps(1)\n")
    (pkg / "unused.py").write_text("")
    found = module_closure(tmp_path, "tasks/a.py")
    assert found == {"tasks/__init__.py", "tasks/a.py", "tasks/b.py", "tasks/c.py"}


def _fake_outputs(root: Path) -> None:
    """Stand-in files for every stage's outs, so `dvc commit` records a lock without running."""
    from dvc.repo import Repo

    with Repo(str(root)) as dvc:
        for stage in dvc.index.stages:
            for out in stage.outs:
                path = Path(out.fs_path)
                if path.suffix:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(f"{stage.name}\n")
                else:
                    path.mkdir(parents=True, exist_ok=True)
                    (path / "part").write_text(f"{stage.name}\n")


def _changed(root: Path) -> set[str]:
    status = json.loads(run(["dvc", "status", "--json"], root).stdout or "{}")
    return set(status)


@pytest.fixture(scope="module")
def locked_project(tmp_path_factory) -> Path:
    """A tmp copy of the project whose dvc.lock says every stage is up to date."""
    root = make_project(tmp_path_factory.mktemp("deps") / "proj", TINY)
    _fake_outputs(root)
    run(["dvc", "commit", "--force", "--quiet"], root)
    return root


@pytest.mark.parametrize(
    ("helper", "expected"),
    [
        ("tasks/fusion.py", {"train", "ood", "export", "evaluate", "subgroups", "explain"}),
        ("tasks/report.py", {"validate", "evaluate", "subgroups"}),
        ("tasks/config.py", set(DVC)),
        ("tasks/cams.py", {"explain"}),
    ],
)
def test_editing_a_helper_flags_exactly_the_stages_that_import_it(locked_project, helper, expected):
    root = locked_project
    assert _changed(root) == set(), "a fresh lock must leave every stage up to date"
    original = (root / helper).read_text()
    (root / helper).write_text(original + "\n# an edit\n")
    try:
        changed = _changed(root)
    finally:
        (root / helper).write_text(original)
    assert changed == expected
    # The same answer from the code: the stages whose closure holds the helper.
    assert changed == {name for name, files in _closures(root).items() if helper in files}
