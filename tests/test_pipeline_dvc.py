"""The data stages under real DVC in a tmp git repo: run, skip unchanged, re-run selectively."""

from __future__ import annotations

import json
import re

import pytest

from tests.helpers import TINY, make_project, run

DATA_STAGES = ["synth", "ingest", "validate", "split", "prepare"]


def ran(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


@pytest.mark.slow
def test_dvc_repro_runs_skips_and_reruns_only_what_changed(tmp_path):
    project = make_project(tmp_path / "proj", TINY)
    first = run(["dvc", "repro", "prepare"], project)
    assert ran(first.stdout) == DATA_STAGES
    split = json.loads((project / "metrics/split.json").read_text())
    assert split["leakage"] == {"shared_lesions": 0, "shared_hashes": 0}
    assert sum(split["images"].values()) == 150
    prepared = json.loads((project / "data/prepared/meta.json").read_text())
    assert prepared["classes"] == ["MEL", "NV", "BCC"] and prepared["size"] == 32
    assert (project / "data/reports/contact_sheet.png").stat().st_size > 10_000

    second = run(["dvc", "repro", "prepare"], project)
    assert ran(second.stdout) == []
    status = run(["dvc", "status", "prepare"], project)
    assert "up to date" in status.stdout

    text = (project / "params.yaml").read_text().replace("seed: 42", "seed: 43")
    (project / "params.yaml").write_text(text)
    third = run(["dvc", "repro", "prepare"], project)
    assert ran(third.stdout) == ["split", "prepare"]
    reseeded = json.loads((project / "metrics/split.json").read_text())
    assert reseeded["seed"] == 43 and reseeded["leakage"]["shared_lesions"] == 0
