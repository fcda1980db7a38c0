"""The data stages under real DVC in a tmp git repo: run, skip unchanged, re-run selectively."""

from __future__ import annotations

import json
import re
import sys

import pytest

from tests.helpers import REPO, TINY, make_project, run

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

    # prepare.size alone, to 40 and back: each size is a stage run of its own. DVC's run cache
    # hashes a params section without keys named `size`; without prepare.size listed on its own
    # in dvc.yaml, 40 restored the 32 px cache and dvc.lock called it 40.
    def resize(size: int) -> str:
        params = project / "params.yaml"
        text = re.sub(r"(?m)^  size: \d+$", f"  size: {size}", params.read_text(), count=1)
        params.write_text(text)
        return run(["dvc", "repro", "prepare"], project).stdout

    assert ran(resize(40)) == ["prepare"]
    assert json.loads((project / "data/prepared/meta.json").read_text())["size"] == 40
    back = resize(32)  # the seed-43 run at 32 px is in the run cache: restored, not re-run
    assert ran(back) == [] and "Stage 'prepare' is cached" in back
    assert json.loads((project / "data/prepared/meta.json").read_text())["size"] == 32


def test_a_git_ignored_dvc_lock_stops_the_flow_before_any_stage_with_the_fix(tmp_path):
    """DVC refuses to read a git-ignored dvc.lock; the flow says so in one line, and how."""
    from flows.stages import StageFailed, pipeline_stages

    root = make_project(tmp_path / "p", TINY)
    assert pipeline_stages(root)[: len(DATA_STAGES)] == DATA_STAGES  # readable as it comes
    (root / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    (root / ".gitignore").write_text("dvc.lock\n")
    with pytest.raises(StageFailed) as failed:
        pipeline_stages(root)
    assert failed.value.stage == "dvc.yaml"
    message = str(failed.value)
    assert "dvc.lock' is git-ignored" in message and "git check-ignore -v dvc.lock" in message
    assert "\n" not in message


def test_dvc_reads_its_files_with_the_c_parser():
    """DVC parses dvc.yaml and dvc.lock with ruamel's safe loader on every stage the flow checks
    or runs; with ruamel.yaml.clib (a dependency) that loader is the C one, 4x faster on the
    default's dvc.lock than ruamel's pure-Python parser, which ruamel.yaml >= 0.19 falls back
    to silently when the extension is missing."""
    from dvc.utils.serialize._yaml import parse_yaml
    from ruamel.yaml import YAML

    assert YAML(typ="safe").Parser.__name__ == "CParser"
    stages = parse_yaml((REPO / "dvc.yaml").read_text(), "dvc.yaml")["stages"]
    assert {"synth", "train", "explain", "card"} <= set(stages)


def test_a_stage_runs_after_the_streams_dvc_was_imported_with_are_closed(tmp_path, capsys):
    """``import dvc`` binds its console handlers to the streams of that moment; once those are
    closed (a capture that ended), DVC's "Running stage" line used to fail the stage before its
    command ran. The flows re-point the handlers each time they open the DVC repo."""
    import io
    import subprocess

    from dvc.repo import Repo

    from flows.stages import dvc_console_handlers, reproduce

    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    Repo.init(str(tmp_path)).close()
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  hello:\n    cmd: python -c \"open('out.txt', 'w').write('hi')\"\n"
        "    outs: [out.txt]\n"
    )
    handlers = dvc_console_handlers()
    assert handlers
    gone = io.TextIOWrapper(io.BytesIO())  # like a capture's file: closed, it refuses flush()
    gone.close()
    before = [h.stream for h in handlers]
    try:
        for handler in handlers:
            handler.setStream(gone)
        assert reproduce(tmp_path, "hello") == ["hello"]
        assert (tmp_path / "out.txt").read_text() == "hi"
        assert "Running stage 'hello'" in capsys.readouterr().out
        assert {h.stream for h in handlers} <= {sys.stdout, sys.stderr}
    finally:  # the next test finds DVC's handlers as this one did
        for handler, stream in zip(handlers, before, strict=True):
            handler.stream = stream
