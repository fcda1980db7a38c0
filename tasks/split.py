"""Split: train/val/test stratified by label and grouped by lesion, with no leaks.

Two images of the same lesion, or two byte-identical files, in different splits would let a
model be tested on what it trained on. Images are therefore grouped first (connected
components over shared ``lesion_id`` *or* shared ``sha256``), and whole groups are assigned.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd

from tasks import paths
from tasks.config import Params
from tasks.io import atomic_dir, write_json
from tasks.stage import console, main

SPLITS = ("train", "val", "test")


class SplitError(ValueError):
    """The manifest cannot be split as asked (e.g. a class with too few lesions)."""


def leak_groups(manifest: pd.DataFrame) -> np.ndarray:
    """Group id per row: rows sharing a lesion_id or a sha256 end up in one group.

    Hand-written union-find because scikit-learn's group splitters take one group key, and
    here two keys (lesion and file hash) must both hold.
    """
    parent = list(range(len(manifest)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for column in ("lesion_id", "sha256"):
        first: dict[object, int] = {}
        for row, key in enumerate(manifest[column]):
            if key is None or (isinstance(key, float) and np.isnan(key)):
                continue
            if key in first:
                parent[find(row)] = find(first[key])
            else:
                first[key] = row
    roots = np.array([find(i) for i in range(len(manifest))])
    _, group = np.unique(roots, return_inverse=True)
    return group


def assign_splits(
    labels: np.ndarray,
    groups: np.ndarray,
    fractions: dict[str, float],
    seed: int,
    small_class: str = "error",
) -> np.ndarray:
    """Assign every row a split name, stratified by label, whole groups at a time.

    scikit-learn's ``StratifiedGroupKFold`` yields equal folds only, not 70/15/15, so this is
    a greedy allocation: per class, groups in seeded random order (largest first) go to the
    split furthest below its target image count; every split then gets at least one group.

    Args:
        labels: label per row.
        groups: group id per row (see :func:`leak_groups`).
        fractions: train/val/test shares.
        seed: RNG seed; the result is a pure function of the inputs.
        small_class: ``error`` raises for a class with fewer than three groups; ``train_only``
            puts such a class in train (reported in the split report).
    """
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"label": labels, "group": groups})
    group_label = frame.groupby("group")["label"].agg(lambda s: s.value_counts().index[0])
    group_size = frame.groupby("group").size()
    out = np.empty(len(frame), dtype=object)
    group_split: dict[int, str] = {}
    for label in sorted(group_label.unique()):
        members = group_label.index[group_label == label].to_numpy()
        members = members[rng.permutation(len(members))]
        members = sorted(members, key=lambda g: -group_size[g])
        if len(members) < len(SPLITS):
            if small_class == "train_only":
                group_split.update({g: "train" for g in members})
                continue
            raise SplitError(
                f"class {label!r} has {len(members)} lesion group(s) "
                f"({int(group_size[members].sum())} images); each of train/val/test needs one. "
                "Add data, merge the class, or set split.small_class: train_only"
            )
        total = group_size[members].sum()
        filled = dict.fromkeys(SPLITS, 0)
        chosen: dict[str, list[int]] = {s: [] for s in SPLITS}
        for g in members:
            deficit = {s: fractions[s] * total - filled[s] for s in SPLITS}
            target = max(SPLITS, key=lambda s: (deficit[s], -SPLITS.index(s)))
            chosen[target].append(g)
            filled[target] += group_size[g]
        for empty in [s for s in SPLITS if not chosen[s]]:
            donor = max(SPLITS, key=lambda s: len(chosen[s]))
            smallest = min(chosen[donor], key=lambda g: group_size[g])
            chosen[donor].remove(smallest)
            chosen[empty].append(smallest)
        for s in SPLITS:
            group_split.update({g: s for g in chosen[s]})
    for row, g in enumerate(frame["group"]):
        out[row] = group_split[g]
    return out


def split_manifest(
    manifest: pd.DataFrame, fractions: dict[str, float], seed: int, small_class: str = "error"
) -> tuple[pd.DataFrame, dict]:
    """Add ``split`` and ``group`` columns to the usable rows and build the split report."""
    usable = manifest[manifest["label"].notna() & manifest["file_error"].isna()]
    if len(usable) < len(manifest):
        raise SplitError(
            f"{len(manifest) - len(usable)} manifest row(s) have no label or an unreadable file; "
            "run validate first (it names them)"
        )
    frame = manifest.copy()
    frame["group"] = leak_groups(frame)
    frame["split"] = assign_splits(
        frame["label"].to_numpy(), frame["group"].to_numpy(), fractions, seed, small_class
    )
    return frame, split_report(frame, fractions, seed)


def split_report(frame: pd.DataFrame, fractions: dict[str, float], seed: int) -> dict:
    """Counts per class per split and the explicit leakage check (both must be zero)."""
    counts = pd.crosstab(frame["label"], frame["split"]).reindex(columns=SPLITS, fill_value=0)

    def shared(column: str) -> int:
        sets = [set(frame.loc[frame["split"] == s, column].dropna()) for s in SPLITS]
        return len((sets[0] & sets[1]) | (sets[0] & sets[2]) | (sets[1] & sets[2]))

    sizes = frame["split"].value_counts()
    return {
        "seed": seed,
        "target_fractions": fractions,
        "images": {s: int(sizes.get(s, 0)) for s in SPLITS},
        "fractions": {s: round(float(sizes.get(s, 0)) / len(frame), 4) for s in SPLITS},
        "per_class": {
            str(label): {s: int(counts.loc[label, s]) for s in SPLITS} for label in counts.index
        },
        "train_only_classes": sorted(
            str(label) for label in counts.index if counts.loc[label, ["val", "test"]].sum() == 0
        ),
        "leakage": {
            "shared_lesions": shared("lesion_id"),
            "shared_hashes": shared("sha256"),
        },
    }


def write_splits(frame: pd.DataFrame, out_dir: str | Path) -> None:
    """One parquet per split (the manifest rows plus ``group``), swapped in atomically."""
    with atomic_dir(out_dir) as tmp:
        for s in SPLITS:
            part = frame[frame["split"] == s].drop(columns=["split"]).reset_index(drop=True)
            part.to_parquet(tmp / f"{s}.parquet", index=False)


def read_split(split_dir: str | Path, split: str) -> pd.DataFrame:
    return pd.read_parquet(Path(split_dir) / f"{split}.parquet")


def data_version(repo: str | Path = ".") -> str:
    """A short content hash of the data a model is trained on: the manifest and split files.

    Every model bundle, MLflow run and ONNX file carries it, so a model can be matched to the
    exact images and split it saw (and a checkpoint is only resumed on the same data).
    """
    root = Path(repo)
    files = [root / paths.MANIFEST, *sorted((root / paths.SPLITS).glob("*.parquet"))]
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.read_bytes())
    return digest.hexdigest()[:12]


def run(p: Params) -> dict:
    """The ``split`` stage: refuse data that failed validation, then split and write."""
    verdict = json.loads(paths.VALIDATION_JSON.read_text())
    if not verdict.get("passed"):
        raise SplitError(f"{paths.VALIDATION_JSON} says the data failed validation")
    manifest = pd.read_parquet(paths.MANIFEST)
    frame, report = split_manifest(manifest, p.split.fractions, p.split.seed, p.split.small_class)
    write_splits(frame, paths.SPLITS)
    write_json(paths.METRICS / "split.json", report)
    leaks = report["leakage"]
    console.print(
        f"split: {report['images']} | shared lesions {leaks['shared_lesions']}, "
        f"shared hashes {leaks['shared_hashes']}"
    )
    return report


if __name__ == "__main__":
    raise SystemExit(main("split"))
