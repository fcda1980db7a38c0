"""The project modules a stage runs: the import closure of ``tasks/<stage>.py``, from the code.

dvc.yaml must list every one of them as a dep of the stage (``tests/test_dvc_deps.py``), so that
editing any module a stage runs makes ``dvc status`` flag that stage and no other.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGES = ("tasks", "flows", "bench")


def _module_file(root: Path, dotted: str) -> Path | None:
    """``tasks.x`` -> ``tasks/x.py`` (or a package's ``__init__.py``); None if not a file here."""
    base = root.joinpath(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """Project modules imported anywhere in a file, including inside functions."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # ``from tasks import paths`` imports the submodule tasks.paths as well.
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        found.update(n for n in names if n.split(".")[0] in PACKAGES)
    return found


def module_closure(root: Path, entry: str) -> set[str]:
    """Repo-relative paths of every project file that ``entry`` (a repo-relative .py) runs."""
    seen: set[Path] = set()
    todo = [root / entry]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for dotted in imported_modules(path):
            parts = dotted.split(".")
            # Importing a.b.c runs a/__init__.py and a/b/__init__.py too.
            for i in range(1, len(parts) + 1):
                found = _module_file(root, ".".join(parts[:i]))
                if found is not None and found not in seen:
                    todo.append(found)
    return {p.relative_to(root).as_posix() for p in seen}


def rewrite_dvc_yaml(root: Path) -> list[str]:
    """Rewrite each stage's ``- tasks|flows|bench/*.py`` dep lines in dvc.yaml to its closure.

    Edits the text line by line (not a YAML round trip) so the file's comments and layout stay.
    Returns the names of the stages whose list changed.
    """
    import yaml

    path = root / "dvc.yaml"
    stages = yaml.safe_load(path.read_text())["stages"]
    lines = path.read_text().splitlines(keepends=True)
    out: list[str] = []
    changed: list[str] = []
    stage = None
    in_deps = False
    for line in lines:
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if indent == 2 and stripped.endswith(":") and stripped[:-1] in stages:
            stage, in_deps = stripped[:-1], False
        elif stage and indent == 4:
            if in_deps and stripped != "deps:":
                in_deps = False
            if stripped == "deps:":
                in_deps = True
                out.append(line)
                closure = sorted(module_closure(root, f"tasks/{stage}.py"))
                old = [
                    d for d in stages[stage]["deps"] if d.startswith(PACKAGES) and d.endswith(".py")
                ]
                if sorted(old) != closure:
                    changed.append(stage)
                out.extend(f"      - {d}\n" for d in closure)
                continue
        if (
            in_deps
            and stripped.startswith("- ")
            and stripped[2:].startswith(PACKAGES)
            and stripped.endswith(".py")
        ):
            continue  # replaced by the closure written after `deps:`
        out.append(line)
    path.write_text("".join(out))
    return changed


if __name__ == "__main__":  # python -m tests.deps: bring dvc.yaml's code deps up to date
    root = Path(__file__).resolve().parents[1]
    print("updated:", ", ".join(rewrite_dvc_yaml(root)) or "nothing")
