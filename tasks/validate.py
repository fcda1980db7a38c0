"""Validate: check a manifest against the dataset rules, every defect in one run.

Ingest describes what it finds and never drops a row; this stage judges. Every rule becomes one
Great Expectations expectation in a single suite that is validated in a single call, so a
dataset with ten different defects is reported with ten failing rules at once, instead of a
fix-one-rerun-find-the-next loop (a GX call costs seconds; a rerun of ingest costs minutes).

Rules are GX's own expectations wherever GX has one: ``label_known`` is
``ExpectColumnValuesToBeInSet`` on ``label`` (with a GX row condition that leaves rows with a
broken one-hot ground truth to ``onehot_single``, and ISIC names enforced on ISIC/HAM rows
only) plus ``ExpectColumnValuesToNotBeNull``; ``min_size`` is ``ExpectColumnValuesToBeBetween``
on ``width`` and on ``height``. A rule may map to several expectations; its offending rows are
the union of theirs. Each expectation carries GX's own ``severity`` (``critical`` for an error
rule, ``warning``), and the report reads a rule's severity back from the GX result.

Three rules stay a derived column in pandas, checked by GX, because no GX 1.x expectation
says them: ``path_inside_root`` must resolve symlinks on the filesystem (GX sees strings);
``hash_label_conflict`` is a functional dependency (one sha256 -> one label), which neither
``ExpectCompoundColumnsToBeUnique`` (it would also flag harmless byte-identical duplicates of
one label) nor the pair expectations (they compare two columns within a row) express; and
``class_min_count`` is a minimum count per value, which GX has only as a table-level
distinct-value check that cannot name the rows of the small class.

The one GX run is a Checkpoint, so GX also keeps the validation result
(``validation_result.json``) and builds its Data Docs (HTML) into ``data/reports/data_docs``,
which the training run logs to MLflow next to ``validation.md``.
Each failing rule names its offending rows (``row 12 (image_id=..., path=..., <csv> line 14)``:
the 0-based manifest row, and the line of the CSV the row came from, which is what a person
opens) and the value that broke it, because "3 rows failed" alone sends a person hunting
through a 25 000-row table.

Some rules judge the whole set rather than a row: at least ``min_images`` images and
``min_classes`` classes (a header-only CSV or a one-class set stops here, not three stages
later in split or train), image files no ground-truth row lists, and a missing metadata CSV
(lesion grouping off, so the split can leak). The last two come from the facts ingest records
with the manifest (``manifest.attrs["ingest"]``).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import great_expectations as gx
import numpy as np
import pandas as pd
from great_expectations.data_context.types.base import ProgressBarsConfig
from great_expectations.expectations.row_conditions import Column
from rich.markup import escape

from tasks import paths
from tasks.config import Params, ValidateConfig
from tasks.ingest import MANIFEST_COLUMNS, ingest_facts, label_vocabulary
from tasks.io import atomic_dir
from tasks.labels import ISIC_CLASSES
from tasks.stage import console, main

E = gx.expectations

# Sources whose labels must come from the ISIC 2019 vocabulary (HAM10000 codes are mapped on
# ingest); a class-per-folder dataset defines its own vocabulary with its folder names.
ISIC_SOURCES = frozenset({"isic2019", "ham10000"})
SEVERITIES = ("error", "warning", "off")
# validate.severity -> GX's FailureSeverity on the expectation ("off": not in the suite).
GX_SEVERITY = {"error": "critical", "warning": "warning"}
DATA_DOCS = paths.REPORTS / "data_docs"  # GX Data Docs + validation_result.json (a DVC out)
MAX_LISTED = 20  # offenders spelled out in a message line before "and N more"
MAX_OFFENDERS = 1000  # offenders kept per rule in the report (the count is always exact)
ROW_KEYS = ["row", "image_id", "path"]  # GX returns these columns for every unexpected row


class ManifestError(ValueError):
    """The manifest cannot be read or lacks columns: it is not the current ingest's output."""


@dataclass(frozen=True)
class Rule:
    """One data rule: how GX checks it and how an offending row is described to a person.

    ``expect`` builds the expectation(s) from the config and the class vocabulary (None: the
    source's own; on the manifest plus the derived columns of :func:`derive_columns`); a rule
    with several expectations fails the union of their rows. ``show`` turns an offending row
    into the short text after its row reference, e.g. ``truncated`` or
    ``age 150 outside [0, 120]``. ``source`` says which CSV an offending row's line refers
    to: the ground truth (``label``) or the metadata (``meta``: age, sex, site). A table rule
    judges the whole set: ``show`` then gets GX's observed value instead of a row.
    """

    name: str
    description: str
    expect: Callable[[ValidateConfig, list[str] | None], Any]
    show: Callable[[Any, ValidateConfig], str]
    source: str = "label"
    table: bool = False


def _label_expectations(classes: list[str] | None) -> list[Any]:
    """``label_known`` natively: label in the vocabulary, and present, on the rows it judges.

    Rows whose one-hot ground truth is broken belong to ``onehot_single``, so the GX row
    condition keeps rows with ``onehot_sum`` 1 or null (sources without one-hot columns).
    Without a given vocabulary the ISIC names bind ISIC/HAM rows only: a class-per-folder set
    names its own classes. ``ExpectColumnValuesToBeInSet`` skips nulls, hence the second
    expectation for a row with no label at all.
    """
    one = Column("onehot_sum") == 1
    none = Column("onehot_sum").is_null()
    if classes is None:
        isic = Column("source").is_in(sorted(ISIC_SOURCES))
        scope, vocabulary = (isic & one) | (isic & none), list(ISIC_CLASSES)
    else:
        scope, vocabulary = one | none, list(classes)
    return [
        E.ExpectColumnValuesToBeInSet(column="label", value_set=vocabulary, row_condition=scope),
        E.ExpectColumnValuesToNotBeNull(column="label", row_condition=one | none),
    ]


def _image_problem(r: Any, c: ValidateConfig) -> str:
    if r.file_error == "too_large":
        pixels = int(r.width) * int(r.height)
        return (
            f"larger than the decompression-bomb limit ({r.width}x{r.height} = {pixels} pixels "
            f"> {c.max_pixels}; validate.max_pixels)"
        )
    return str(r.file_error)


def _mask_size_problem(r: Any, c: ValidateConfig) -> str:
    mask, image = r.mask_width / r.mask_height, r.width / r.height
    return (
        f"mask {r.mask_width}x{r.mask_height} px vs image {r.width}x{r.height} px: aspect "
        f"{mask:.3f} vs {image:.3f}, more than {c.mask_aspect_tolerance:g} apart "
        f"(validate.mask_aspect_tolerance): {_text(r.mask_path)}"
    )


def _text(value: Any) -> str:
    return "none" if _missing(value) else str(value)


def _missing(value: Any) -> bool:
    return value is None or (not isinstance(value, (list, tuple, dict)) and bool(pd.isna(value)))


RULES: tuple[Rule, ...] = (
    Rule(
        "label_known",
        "label in the dataset's class vocabulary (ISIC 2019 names, or the given classes)",
        lambda c, v: _label_expectations(v),
        lambda r, c: f"unknown label {r.label!r}" if not _missing(r.label) else "no label",
    ),
    Rule(
        "onehot_single",
        "ISIC ground truth marks exactly one class per row",
        lambda c, v: E.ExpectColumnValuesToBeBetween(column="onehot_sum", min_value=1, max_value=1),
        lambda r, c: f"{int(r.onehot_sum)} classes marked in the ground truth",
    ),
    Rule(
        "image_id_unique",
        "no image_id appears twice",
        lambda c, v: E.ExpectColumnValuesToBeUnique(column="image_id"),
        lambda r, c: f"image_id also on row(s) {r.same_id_rows}",
    ),
    Rule(
        "image_readable",
        "the image file exists, is non-empty, decodes, is not truncated and has at most "
        "max_pixels pixels",
        lambda c, v: E.ExpectColumnValuesToBeNull(column="file_error"),
        _image_problem,
    ),
    Rule(
        "path_inside_root",
        "the image path, symlinks resolved, stays inside the dataset root",
        lambda c, v: E.ExpectColumnValuesToBeInSet(column="inside_root", value_set=[True]),
        lambda r, c: f"resolves outside the root to {r.resolved_path}",
    ),
    Rule(
        "min_size",
        "width and height are at least min_side pixels",
        lambda c, v: [
            E.ExpectColumnValuesToBeBetween(column=side, min_value=c.min_side)
            for side in ("width", "height")
        ],
        lambda r, c: f"{r.width}x{r.height} px, smaller than {c.min_side} px",
    ),
    Rule(
        "age_range",
        "age inside age_range (missing ages allowed)",
        lambda c, v: E.ExpectColumnValuesToBeBetween(
            column="age", min_value=c.age_range[0], max_value=c.age_range[1]
        ),
        lambda r, c: f"age {r.age:g} outside [{c.age_range[0]}, {c.age_range[1]}]",
        source="meta",
    ),
    Rule(
        "age_numeric",
        "a given age is a number (text is reported, never read as a missing age)",
        lambda c, v: E.ExpectColumnValuesToBeNull(column="age_text"),
        lambda r, c: f"age {r.age_text!r} is not a number",
        source="meta",
    ),
    Rule(
        "hash_label_conflict",
        "identical image bytes never carry different labels",
        lambda c, v: E.ExpectColumnValuesToBeInSet(column="hash_conflict", value_set=[False]),
        lambda r, c: f"label {r.label!r}, same bytes as {r.same_hash_rows}",
    ),
    Rule(
        "class_min_count",
        "every class has at least min_per_class images",
        lambda c, v: E.ExpectColumnValuesToBeBetween(
            column="class_count", min_value=c.min_per_class
        ),
        lambda r, c: f"class {r.label!r} has {int(r.class_count)} image(s) < {c.min_per_class}",
    ),
    Rule(
        "mask_readable",
        "a listed segmentation mask exists and decodes",
        lambda c, v: E.ExpectColumnValuesToBeNull(column="mask_error"),
        lambda r, c: f"mask {r.mask_error}: {_text(r.mask_path)}",
    ),
    Rule(
        "mask_size",
        "a mask has its image's size, or its aspect ratio within mask_aspect_tolerance",
        lambda c, v: E.ExpectColumnValuesToBeInSet(column="mask_size_ok", value_set=[True]),
        _mask_size_problem,
    ),
    Rule(
        "mask_nonempty",
        "a mask marks at least one lesion pixel (an empty mask breaks the localisation metrics)",
        lambda c, v: E.ExpectColumnValuesToBeInSet(column="mask_has_lesion", value_set=[True]),
        lambda r, c: f"mask marks no lesion pixel: {_text(r.mask_path)}",
    ),
    Rule(
        "sex_known",
        "sex in known_sex (missing allowed)",
        lambda c, v: E.ExpectColumnValuesToBeInSet(column="sex", value_set=list(c.known_sex)),
        lambda r, c: f"sex {r.sex!r}",
        source="meta",
    ),
    Rule(
        "site_known",
        "anatomical site in known_sites (missing allowed)",
        lambda c, v: E.ExpectColumnValuesToBeInSet(column="site", value_set=list(c.known_sites)),
        lambda r, c: f"site {r.site!r}",
        source="meta",
    ),
    Rule(
        "min_images",
        "the set has at least min_images images",
        lambda c, v: E.ExpectTableRowCountToBeBetween(min_value=c.min_images),
        lambda observed, c: (
            f"{observed} image(s) in the manifest; at least {c.min_images} are needed to split "
            "and train (validate.min_images)"
        ),
        table=True,
    ),
    Rule(
        "min_classes",
        "at least min_classes classes after dataset.label_map",
        lambda c, v: E.ExpectColumnUniqueValueCountToBeBetween(
            column="label", min_value=c.min_classes
        ),
        lambda observed, c: (
            f"{observed} class(es) after the label map; a classifier needs at least "
            f"{c.min_classes} (validate.min_classes)"
        ),
        table=True,
    ),
)
# Judged from the facts ingest records with the manifest, not by GX: they concern files and
# CSVs that have no manifest row.
SET_RULES = {
    "image_unlisted": "every image file under the root is listed by the ground truth",
    "metadata_present": "the metadata CSV with lesion ids exists (else lesion grouping is off)",
}
RULE_NAMES = tuple(rule.name for rule in RULES) + tuple(SET_RULES)


@dataclass
class RuleResult:
    """Outcome of one rule; ``offenders`` holds {row, csv, image_id, path, value} per row."""

    rule: str
    severity: str
    success: bool
    description: str
    unexpected_count: int
    offenders: list[dict[str, Any]] = field(default_factory=list)
    message: str = ""


@dataclass
class ValidationReport:
    """All rule outcomes of one validation run, plus what a reader needs around them."""

    results: list[RuleResult]
    n_rows: int
    class_counts: dict[str, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # rules with severity off
    gx_seconds: float = 0.0  # wall time of the one GX validate call
    layout: str | None = None  # the adapter ingest used, and why (auto-detection says)
    layout_reason: str | None = None

    @property
    def passed(self) -> bool:
        """True when no error-severity rule failed (warnings never stop the pipeline)."""
        return not self.errors()

    def errors(self) -> list[RuleResult]:
        return [r for r in self.results if not r.success and r.severity == "error"]

    def warnings(self) -> list[RuleResult]:
        return [r for r in self.results if not r.success and r.severity == "warning"]

    def result(self, rule: str) -> RuleResult:
        """The result of ``rule``; KeyError if it did not run (unknown or severity off)."""
        for r in self.results:
            if r.rule == rule:
                return r
        raise KeyError(f"rule {rule!r} did not run (skipped: {self.skipped})")

    def summary(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        return f"validation {verdict}: {self._counts()}"

    def _counts(self) -> str:
        return (
            f"{len(self.errors())} error rule(s) and {len(self.warnings())} warning rule(s) "
            f"failed over {self.n_rows} rows"
        )

    def message(self) -> str:
        """Summary line, then one line per failing rule (errors first)."""
        return "\n".join([self.summary()] + [r.message for r in self.errors() + self.warnings()])

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "n_rows": self.n_rows,
            "errors": [r.rule for r in self.errors()],
            "warnings": [r.rule for r in self.warnings()],
            "skipped": list(self.skipped),
            "class_counts": dict(self.class_counts),
            "gx_seconds": round(self.gx_seconds, 3),
            "layout": self.layout,
            "layout_reason": self.layout_reason,
            "rules": [dataclasses.asdict(r) for r in self.results],
        }

    def to_markdown(self, max_rows: int = 50) -> str:
        """A report a person reads first: verdict, rule table, offenders, class counts."""
        lines = [
            "# Data validation report",
            "",
            f"**{'PASSED' if self.passed else 'FAILED'}**: {self._counts()}.",
            "",
        ]
        if self.layout:
            lines += [f"Layout: **{self.layout}** ({_md(self.layout_reason)}).", ""]
        lines += [
            "| rule | severity | passed | unexpected | checks |",
            "|---|---|---|---|---|",
        ]
        for r in self.results:
            mark = "yes" if r.success else "**no**"
            lines.append(
                f"| {r.rule} | {r.severity} | {mark} | {r.unexpected_count} | "
                f"{_md(r.description)} |"
            )
        lines += [f"| {name} | off | not run | – | |" for name in self.skipped]
        for r in self.errors() + self.warnings():
            lines += ["", f"## [{r.severity}] {r.rule}: {r.unexpected_count} of {self.n_rows} rows"]
            lines += ["", _md(r.description), ""]
            if not r.offenders:
                lines.append(_md(r.message))
                continue
            lines += [
                "| row | csv line | image_id | path | value |",
                "|---|---|---|---|---|",
            ]
            for o in r.offenders[:max_rows]:
                lines.append(
                    f"| {_md(o['row'])} | {_md(o.get('csv'))} | {_md(o['image_id'])} | "
                    f"{_md(o['path'])} | {_md(o['value'])} |"
                )
            if r.unexpected_count > max_rows:
                lines.append(f"\n… and {r.unexpected_count - max_rows} more (see the JSON report)")
        total = sum(self.class_counts.values()) or 1
        lines += ["", "## Class counts", "", "| class | images | share |", "|---|---|---|"]
        for label, count in self.class_counts.items():
            lines.append(f"| {_md(label)} | {count} | {count / total:.1%} |")
        return "\n".join(lines) + "\n"


class ValidationError(Exception):
    """The manifest broke at least one error-severity rule; ``str()`` names rule, row and file."""

    def __init__(self, report: ValidationReport) -> None:
        super().__init__(report.message())
        self.report = report


def raise_for_errors(report: ValidationReport) -> ValidationReport:
    """Raise :class:`ValidationError` if an error rule failed; otherwise return the report."""
    if not report.passed:
        raise ValidationError(report)
    return report


def _md(value: Any) -> str:
    return _text(value).replace("|", "\\|").replace("\n", " ")


def _inside_root(paths: pd.Series, root: Path) -> tuple[list[bool], list[str]]:
    base = root.resolve()
    inside, resolved = [], []
    for rel in paths:
        if _missing(rel):
            inside.append(False)
            resolved.append("no path")
            continue
        target = (root / str(rel)).resolve()
        inside.append(target.is_relative_to(base))
        resolved.append(str(target))
    return inside, resolved


def _rows_sharing(frame: pd.DataFrame, key: str, mask: pd.Series) -> dict[int, list[int]]:
    """For each row in ``mask``, the other masked rows with the same ``key`` value."""
    groups = frame.loc[mask].groupby(key, sort=False).groups
    return {
        int(row): [int(o) for o in rows if o != row]
        for rows in groups.values()
        if len(rows) > 1
        for row in rows
    }


def _where(judged: pd.Series, ok: pd.Series) -> pd.Series:
    """A nullable boolean: ``ok`` where the row is judged, NA where another rule owns it."""
    out = pd.array(ok.fillna(False).to_numpy(dtype=bool), dtype="boolean")
    out[~judged.to_numpy(dtype=bool)] = pd.NA
    return pd.Series(out, index=judged.index)


def derive_columns(
    manifest: pd.DataFrame,
    root: Path,
    tolerance: float = 0.02,
) -> pd.DataFrame:
    """The manifest (re-indexed 0..n-1) plus the columns that rules need beyond one field.

    Added: ``row`` (GX names offending rows by it), ``inside_root`` / ``resolved_path``,
    ``hash_conflict`` / ``same_hash_rows``, ``mask_size_ok`` (sizes equal, or aspect ratios
    within ``tolerance``), ``mask_has_lesion``, ``class_count`` and ``same_id_rows``: the rules
    no GX expectation says (module docstring). A column is NA where another rule owns the
    defect (no mask size for an undecodable image), so one defect fails one rule.
    """
    missing = [c for c in MANIFEST_COLUMNS if c not in manifest.columns]
    if missing:
        raise ManifestError(f"manifest lacks column(s) {missing}; rebuild it with the ingest stage")
    frame = manifest.reset_index(drop=True).copy()
    frame.insert(0, "row", np.arange(len(frame), dtype=np.int64))
    frame["inside_root"], frame["resolved_path"] = _inside_root(frame["path"], root)

    width = pd.to_numeric(frame["width"], errors="coerce").astype(float)
    height = pd.to_numeric(frame["height"], errors="coerce").astype(float)

    # An empty file hashes like every other empty file; image_readable owns that defect.
    hashed = frame["sha256"].notna() & frame["label"].notna() & (frame["file_error"] != "empty")
    labels_per_hash = frame.loc[hashed].groupby("sha256")["label"].nunique()
    conflicting = set(labels_per_hash.index[labels_per_hash > 1])
    frame["hash_conflict"] = hashed & frame["sha256"].isin(conflicting)
    twins = _rows_sharing(frame, "sha256", frame["hash_conflict"])
    frame["same_hash_rows"] = [
        ", ".join(f"row {o} (label {frame.at[o, 'label']!r})" for o in twins.get(i, []))
        for i in range(len(frame))
    ]

    mask_w = pd.to_numeric(frame["mask_width"], errors="coerce").astype(float)
    mask_h = pd.to_numeric(frame["mask_height"], errors="coerce").astype(float)
    judged = (
        frame["mask_path"].notna() & frame["mask_error"].isna() & frame["file_error"].isna()
    ) & (mask_w * mask_h * width * height > 0).fillna(False)
    same = (mask_w == width) & (mask_h == height)
    aspect_gap = ((mask_w / mask_h) / (width / height) - 1.0).abs()
    fits = same | (aspect_gap <= tolerance + 1e-12)
    frame["mask_size_ok"] = _where(judged, fits)
    has_mask = frame["mask_path"].notna() & frame["mask_error"].isna()
    foreground = pd.to_numeric(frame["mask_foreground"], errors="coerce").astype(float)
    frame["mask_has_lesion"] = _where(has_mask & foreground.notna(), foreground > 0)

    frame["class_count"] = frame["label"].map(frame["label"].value_counts()).astype(float)
    dups = _rows_sharing(frame, "image_id", frame["image_id"].notna())
    frame["same_id_rows"] = [", ".join(map(str, dups.get(i, []))) for i in range(len(frame))]
    return frame


def _severities(cfg: ValidateConfig) -> dict[str, str]:
    """Severity per rule; a rule absent from the config is an error (fail safe)."""
    unknown = sorted(set(cfg.severity) - set(RULE_NAMES))
    if unknown:
        raise ValueError(f"validate.severity: unknown rule(s) {unknown}; known: {RULE_NAMES}")
    out = {name: cfg.severity.get(name, "error") for name in RULE_NAMES}
    bad = {k: v for k, v in out.items() if v not in SEVERITIES}
    if bad:
        raise ValueError(f"validate.severity: {bad} must be one of {SEVERITIES}")
    return out


def _run_suite(
    frame: pd.DataFrame, expectations: list[Any], docs_dir: Path | None = None
) -> tuple[dict[str, list[Any]], float]:
    """Validate all expectations on ``frame`` in one GX Checkpoint run.

    With ``docs_dir``, GX's Data Docs site (HTML: the suite, the validation result with its
    unexpected rows) is built there, beside GX's validation result as JSON.

    Returns:
        The expectation results keyed by their rule (``meta["rule"]``), and the wall time.
    """
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch_definition = (
        context.data_sources.add_pandas("dermaflow")
        .add_dataframe_asset("manifest")
        .add_batch_definition_whole_dataframe("manifest")
    )
    suite = context.suites.add(gx.ExpectationSuite(name="manifest", expectations=expectations))
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name="manifest", data=batch_definition, suite=suite)
    )
    actions = []
    if docs_dir is not None:
        context.add_data_docs_site(
            site_name="dermaflow",
            site_config={
                "class_name": "SiteBuilder",
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(docs_dir.resolve()),  # GX wants it absolute
                },
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            },
        )
        actions.append(gx.checkpoint.UpdateDataDocsAction(name="data_docs"))
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(
            name="validate",
            validation_definitions=[definition],
            actions=actions,
            result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ROW_KEYS},
        )
    )
    started = time.perf_counter()
    outcome = checkpoint.run(batch_parameters={"dataframe": frame})
    elapsed = time.perf_counter() - started
    (result,) = outcome.run_results.values()
    if docs_dir is not None:
        (docs_dir / "validation_result.json").write_text(
            json.dumps(result.to_json_dict(), indent=1, default=str)
        )
    by_rule: dict[str, list[Any]] = {}
    for r in result.results:
        by_rule.setdefault(r.expectation_config.meta["rule"], []).append(r)
    return by_rule, elapsed


def _exception_message(info: dict[str, Any]) -> str | None:
    """GX nests exception info per metric; return the first message raised, if any."""
    if info.get("raised_exception"):
        return str(info.get("exception_message"))
    for value in info.values():
        if isinstance(value, dict) and value.get("raised_exception"):
            return str(value.get("exception_message"))
    return None


def _csv_ref(row: Any, rule: Rule, facts: dict[str, Any]) -> str | None:
    """``<file> line <n>`` for the CSV an offending row came from (None for folder sets)."""
    column, name = (
        ("meta_line", facts.get("meta_csv"))
        if rule.source == "meta"
        else (
            "csv_line",
            facts.get("label_csv"),
        )
    )
    line = getattr(row, column, None)
    if _missing(line):
        line, name = getattr(row, "csv_line", None), facts.get("label_csv")
    if _missing(line):
        return None
    return f"{name or 'CSV'} line {int(line)}"


def _offender_text(o: dict[str, Any]) -> str:
    where = f"image_id={o['image_id']}, path={o['path']}"
    if o.get("csv"):
        where += f", {o['csv']}"
    return f"row {o['row']} ({where}): {o['value']}"


def _severity(gx_result: Any) -> str:
    """The rule's severity as GX holds it on the expectation, in the config's words."""
    gx_severity = str(getattr(gx_result.expectation_config.severity, "value", "critical"))
    return {gx: ours for ours, gx in GX_SEVERITY.items()}.get(gx_severity, "error")


def _unexpected_rows(gx_results: list[Any]) -> tuple[list[int], int]:
    """The offending rows of a rule (the union over its expectations, in row order) and their
    exact count (GX's own when the rule has one expectation: its lists are capped)."""
    rows = sorted(
        {int(e["row"]) for r in gx_results for e in r.result.get("unexpected_index_list") or []}
    )
    if len(gx_results) == 1:
        only = gx_results[0].result
        return rows, int(only.get("unexpected_count") or len(rows))
    return rows, len(rows)


def _rule_result(
    rule: Rule,
    gx_results: list[Any],
    frame: pd.DataFrame,
    cfg: ValidateConfig,
    facts: dict[str, Any] | None = None,
) -> RuleResult:
    n = len(frame)
    facts = facts or {}
    severity = _severity(gx_results[0])
    for gx_result in gx_results:
        crashed = _exception_message(gx_result.exception_info or {})
        if crashed is not None:
            message = f"[{severity}] {rule.name}: the check itself failed: {crashed}"
            return RuleResult(rule.name, severity, False, rule.description, 0, [], message)
    success = all(bool(r.success) for r in gx_results)
    if rule.table:
        observed = gx_results[0].result.get("observed_value")
        text = rule.show(observed, cfg)
        message = f"[{severity}] {rule.name}: " + ("ok" if success else text)
        return RuleResult(
            rule.name, severity, success, rule.description, 0 if success else 1, [], message
        )
    unexpected, count = _unexpected_rows(gx_results)
    offenders = []
    for index in unexpected[:MAX_OFFENDERS]:
        row = frame.loc[index]
        offenders.append(
            {
                "row": index,
                "csv": _csv_ref(row, rule, facts),
                "image_id": _text(row.image_id),
                "path": _text(row.path),
                "value": rule.show(row, cfg),
            }
        )
    if success:
        message = f"[{severity}] {rule.name}: ok ({n} rows)"
    else:
        listed = "; ".join(_offender_text(o) for o in offenders[:MAX_LISTED])
        more = f"; and {count - MAX_LISTED} more" if count > MAX_LISTED else ""
        message = f"[{severity}] {rule.name}: {count} of {n} rows — {listed}{more}"
    return RuleResult(rule.name, severity, success, rule.description, count, offenders, message)


def _set_rule(name: str, severity: str, facts: dict[str, Any]) -> RuleResult:
    """``image_unlisted`` / ``metadata_present`` from ingest's facts (pass without facts)."""
    description = SET_RULES[name]
    if name == "image_unlisted":
        unlisted = facts.get("unlisted_images") or {}
        count, files = int(unlisted.get("count", 0)), list(unlisted.get("paths", []))
        where = facts.get("label_csv") or "a class folder"
        offenders = [
            {"row": None, "csv": None, "image_id": Path(f).stem, "path": f,
             "value": f"no row in {where}; not in the manifest"}
            for f in files[:MAX_OFFENDERS]
        ]  # fmt: skip
        if not count:
            return RuleResult(name, severity, True, description, 0, [], f"[{severity}] {name}: ok")
        shown = ", ".join(files[:MAX_LISTED])
        more = f"; and {count - MAX_LISTED} more" if count > MAX_LISTED else ""
        message = (
            f"[{severity}] {name}: {count} image file(s) under the root have no row in {where} "
            f"and were left out of the manifest — {shown}{more}"
        )
        return RuleResult(name, severity, False, description, count, offenders, message)
    metadata = facts.get("metadata") or {}
    if not metadata or metadata.get("lesion_ids", True):
        return RuleResult(name, severity, True, description, 0, [], f"[{severity}] {name}: ok")
    note = metadata.get("note") or f"{metadata.get('file')} has no lesion ids"
    lost = "" if metadata.get("present") else "; age, sex and site are unknown too"
    message = (
        f"[{severity}] {name}: {note}: lesion grouping is off, so images of one lesion can "
        f"land in different splits (only byte-identical files stay together){lost}"
    )
    return RuleResult(name, severity, False, description, 1, [], message)


def validate_manifest(
    manifest: pd.DataFrame,
    root: str | Path,
    cfg: ValidateConfig,
    classes: list[str] | None = None,
    facts: dict[str, Any] | None = None,
    docs_dir: str | Path | None = None,
) -> ValidationReport:
    """Check every rule on the manifest in one GX run and return the full report.

    Args:
        manifest: the ingest manifest (``tasks.ingest.MANIFEST_COLUMNS``).
        root: the dataset root the manifest's paths are relative to; needed to resolve them.
        cfg: thresholds and the severity (error | warning | off) of each rule.
        classes: the class vocabulary to enforce. By default ISIC/HAM rows must use the ISIC
            2019 names and a folder dataset's folder names are its vocabulary.
        facts: ingest's dataset-level facts; by default those recorded with the manifest
            (``manifest.attrs["ingest"]``).
        docs_dir: an existing, empty folder for GX's Data Docs and validation result (JSON);
            None: neither is written.

    Returns:
        The report; it never raises on bad data, so a caller can write the report first and
        then call :func:`raise_for_errors`.

    Raises:
        ManifestError: the manifest lacks columns (an older ingest's output).
        ValueError: an unknown rule in ``cfg.severity``.
    """
    root = Path(root)
    facts = ingest_facts(manifest) if facts is None else facts
    severity = _severities(cfg)
    frame = derive_columns(manifest, root, cfg.mask_aspect_tolerance)
    active = [rule for rule in RULES if severity[rule.name] != "off"]
    expectations = []
    for rule in active:
        made = rule.expect(cfg, classes)
        for expectation in made if isinstance(made, list) else [made]:
            expectation.meta = {"rule": rule.name}
            expectation.severity = GX_SEVERITY[severity[rule.name]]
            expectations.append(expectation)
    docs = None if docs_dir is None else Path(docs_dir)
    by_rule, elapsed = _run_suite(frame, expectations, docs) if active else ({}, 0.0)
    counts = frame["label"].fillna("(no label)").value_counts()
    results = [_rule_result(rule, by_rule[rule.name], frame, cfg, facts) for rule in active]
    results += [
        _set_rule(name, severity[name], facts) for name in SET_RULES if severity[name] != "off"
    ]
    return ValidationReport(
        results=results,
        n_rows=len(frame),
        class_counts={str(k): int(v) for k, v in counts.items()},
        skipped=[name for name in RULE_NAMES if severity[name] == "off"],
        gx_seconds=elapsed,
        layout=facts.get("layout"),
        layout_reason=facts.get("layout_reason"),
    )


def read_manifest(path: str | Path = paths.MANIFEST) -> pd.DataFrame:
    """The manifest file, or a :class:`ManifestError` naming it (never a parquet traceback)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest; run the ingest stage first")
    try:
        return pd.read_parquet(path)
    except Exception as err:  # noqa: BLE001 - pyarrow raises many types for a broken file
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ManifestError(f"{path}: not a readable manifest ({reason}); re-run ingest") from None


def run(p: Params) -> dict[str, Any]:
    """The ``validate`` stage: check the manifest, write the reports, stop on any error."""
    from tasks.report import contact_sheet, write_reports  # it imports this module

    manifest = read_manifest(paths.MANIFEST)
    classes = label_vocabulary(p.dataset.label_map)  # None: the source's own vocabulary
    with atomic_dir(DATA_DOCS) as docs:
        report = validate_manifest(manifest, Path(p.dataset.root), p.validate, classes, None, docs)
    write_reports(report, paths.VALIDATION_JSON, paths.VALIDATION_MD)
    contact_sheet(manifest, Path(p.dataset.root), paths.CONTACT_SHEET)
    for warning in report.warnings():
        console.print(f"[yellow]{escape(warning.message)}[/]", highlight=False)
    raise_for_errors(report)
    console.print(
        f"validate: {report.n_rows} rows passed; report {paths.VALIDATION_MD}, "
        f"Data Docs {DATA_DOCS / 'index.html'}"
    )
    return {"rows": report.n_rows, "warnings": len(report.warnings())}


if __name__ == "__main__":
    raise SystemExit(main("validate"))
