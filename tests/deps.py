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
