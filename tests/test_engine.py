"""The explanation engine: one call from (model, images, targets, methods, layers) to maps and
scores, on a tiny random-init CNN (the numbers mean nothing; the scheduling is tested)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from rich.progress import Progress

from tasks import engine
from tasks.cams import explain_batch
from tasks.models import build_model
from tests.tolerances import assert_maps_match

SIZE = 32
FAST = engine.Options(ig_steps=4, lime_samples=20, lime_segments=9)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def case() -> tuple[torch.nn.Module, torch.Tensor, list[int], np.ndarray]:
    torch.manual_seed(0)
    model = build_model("custom_cnn", 3).eval()
    images = torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        targets = model(images).argmax(1).tolist()
    masks = np.zeros((4, SIZE, SIZE), dtype=np.uint8)
    masks[:3, 8:24, 8:24] = 1  # the last image has no mask
    return model, images, targets, masks


class Recorder(Progress):
    """A silent progress display that remembers its tasks and advances."""

    def __init__(self) -> None:
        super().__init__(disable=True)
        self.events: list[tuple] = []

    def add_task(self, description: str, total: float | None = None, **kw) -> int:  # noqa: ANN003
        task = super().add_task(description, total=total, **kw)
        self.events.append(("task", description, total))
        return task

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.events.append(("advance", task_id))
        super().advance(task_id, advance)


@pytest.fixture(scope="module")
def result(case) -> tuple[engine.Explanations, Recorder]:
    model, images, targets, masks = case
    pairs = engine.plan(["gradcam", "scorecam", "ig", "lime"], ["middle", "deep"], "custom_cnn")
    with Recorder() as progress:
        out = engine.explain(
            model,
            "custom_cnn",
            images,
            targets,
            pairs,
            options=FAST,
            budgets={"scorecam": 2, "lime": 0},
            scores=list(engine.SCORES),
            masks=masks,
            reference=("gradcam", "deep"),
            perturbation_steps=4,
            progress=progress,
        )
        return out, progress


def test_plan_budgets_and_maps(case, result) -> None:
    model, images, targets, _ = case
    out, _ = result
    assert set(out.maps) == {
        ("gradcam", "middle"),
        ("gradcam", "deep"),
        ("scorecam", "middle"),
        ("scorecam", "deep"),
        ("ig", None),
    }  # LIME's budget of 0 switches it off
    assert out.maps[("scorecam", "deep")].shape == (2, SIZE, SIZE)  # its budget: 2 images
    assert out.maps[("gradcam", "deep")].shape == (4, SIZE, SIZE)
    alone = explain_batch(model, "custom_cnn", "gradcam", images, targets, "middle")
    assert_maps_match(out.maps[("gradcam", "middle")], alone, "shared pass vs one method")


def test_table_has_a_row_per_image_and_map_with_every_score(result) -> None:
    out, _ = result
    table = out.table
    assert len(table) == 4 + 4 + 2 + 2 + 4
    for column in ("deletion_auc", "insertion_auc", "average_drop", "road", "flat"):
        assert table[column].notna().all(), column
    assert table["layer"].isin(["middle", "deep", "input"]).all()
    no_mask = table[table["index"] == 3]
    assert no_mask["pointing_game"].isna().all() and no_mask["iou"].isna().all()
    masked = table[table["index"] < 3]
    assert masked["energy_pointing_game"].between(0, 1).all()
    reference = table[(table["method"] == "gradcam") & (table["layer"] == "deep")]
    assert reference["agree_ssim"].isna().all()  # the reference is not compared with itself
    others = table[table["method"] != "gradcam"]
    assert others["agree_pearson"].notna().all()


def test_progress_covers_maps_then_scoring(result) -> None:
    _, progress = result
    kinds = [e[0] for e in progress.events]
    assert progress.events[0] == ("task", "explaining", 5)
    assert progress.events[6] == ("task", "scoring", 5)  # scoring no longer runs silently
    assert kinds == ["task"] + ["advance"] * 5 + ["task"] + ["advance"] * 5
    assert progress.task_ids == []  # both removed when done


def test_bad_requests_name_the_problem(case) -> None:
    model, images, targets, _ = case
    pairs = [("gradcam", "deep")]
    with pytest.raises(ValueError, match="unknown score"):
        engine.explain(model, "custom_cnn", images, targets, pairs, scores=["rise"])
    with pytest.raises(ValueError, match="need lesion masks"):
        engine.explain(model, "custom_cnn", images, targets, pairs, scores=["localisation"])
    with pytest.raises(ValueError, match="need a reference"):
        engine.explain(model, "custom_cnn", images, targets, pairs, scores=["agreement"])
    with pytest.raises(ValueError, match="unknown explanation method"):
        engine.plan(["gradcam", "blur"], ["deep"], "custom_cnn")


def test_work_accounts_for_every_perturbed_copy(result) -> None:
    """The engine's account of its scoring work (what the bench's explain bound reads): 16
    map-images, each with 2 x (4 - 1) inner deletion / insertion copies, 8 ROAD copies and 1
    Average Drop copy, plus the 4 clean images and their 4 baselines scored once. A deletion /
    insertion copy that an earlier map already made is reused, not forwarded again."""
    out, _ = result
    work = out.work
    assert work["scored_images"] + work["reused_images"] == 16 * (2 * 3 + 8 + 1) + 2 * 4
    assert work["reused_images"] % 2 == 0  # a deletion copy and its insertion copy together
    assert 0 < work["forward_s"] <= work["scores_s"] and work["maps_s"] > 0
    assert 0 < work["imputation_s"] <= work["scores_s"]


#: How far a faithfulness score may move when its passes run in bfloat16: 8 mantissa bits are
#: 2**-8 relative per rounding, compounded over the CNN's four blocks and the softmax, on scores
#: that are (differences of) probabilities in [0, 1]; the measured moves are far smaller.
BF16_SCORE_TOLERANCE = 0.05


@pytest.mark.parametrize("native", [True, False], ids=["bf16-cpu", "other-cpu"])
def test_score_amp_autocasts_the_scores_only_where_the_cpu_has_bf16(case, monkeypatch, native):
    """``score_amp=bf16`` runs the faithfulness passes in bf16 where the CPU has bf16
    instructions (forced here; a CPU without them emulates, only slower) and float32 elsewhere,
    where the table is the float32 one bit for bit. The maps are float32 either way."""
    import tasks.forward

    model, images, targets, _ = case
    monkeypatch.setattr(tasks.forward, "cpu_has_native_bf16", lambda: native)
    pair = ("gradcam", "deep")
    scores = ["deletion_insertion", "average_drop", "road"]

    def run(amp: str) -> engine.Explanations:
        opts = replace(FAST, score_amp=amp)
        return engine.explain(
            model, "custom_cnn", images, targets, [pair], options=opts, scores=scores,
            perturbation_steps=4,
        )  # fmt: skip

    fp32, amp = run("none"), run("bf16")
    assert fp32.score_precision == "float32"
    assert amp.score_precision == ("bf16 autocast" if native else "float32")
    assert_maps_match(amp.maps[pair], fp32.maps[pair], "maps under score_amp")
    columns = ["deletion_auc", "insertion_auc", "average_drop", "road"]
    if not native:
        pd.testing.assert_frame_equal(amp.table, fp32.table)
        return
    moved = (amp.table[columns] - fp32.table[columns]).abs().to_numpy()
    assert moved.max() > 0  # the passes did run in bf16
    assert moved.max() <= BF16_SCORE_TOLERANCE


def test_an_unknown_score_amp_is_refused() -> None:
    with pytest.raises(ValueError, match="score_amp must be one of"):
        engine.Options(score_amp="int8")
