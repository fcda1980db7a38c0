"""Tests for the synthetic default dataset (tasks.synth).

They pin the contracts the rest of the pipeline leans on: the exact ISIC 2019 layout, byte-level
determinism, the class mix, lesion groups, masks that cover the lesion, class evidence only
inside the mask, and markers only outside it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import ndimage

from tasks.config import MarkerConfig, SynthConfig
from tasks.labels import ISIC_CLASSES
from tasks.synth import (
    GROUND_TRUTH,
    IMAGES_DIR,
    LOOKS,
    METADATA,
    SITES,
    generate,
    render_lesion_image,
)

MIX = {"NV": 0.508, "MEL": 0.179, "BCC": 0.131, "BKL": 0.104, "AK": 0.034, "SCC": 0.025,
       "VASC": 0.010, "DF": 0.009}  # fmt: skip
CLASSES = list(LOOKS)


def make_cfg(**overrides) -> SynthConfig:
    fields = dict(seed=7, count=40, image_size=32, class_mix=MIX, difficulty=0.5,
                  images_per_lesion=3)  # fmt: skip
    fields.update(overrides)
    return SynthConfig(**fields)


def digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def load(root: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    truth = pd.read_csv(root / GROUND_TRUTH)
    meta = pd.read_csv(root / METADATA, keep_default_na=False, dtype=str)
    return truth, meta


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict]:
    """400 images at 32 px: enough for class shares and lesion groups, quick to make."""
    root = tmp_path_factory.mktemp("synth") / "raw"
    return root, generate(make_cfg(count=400), root, progress=False)


def test_layout_matches_isic_2019(dataset):
    root, summary = dataset
    truth, meta = load(root)
    assert list(truth.columns) == ["image", *ISIC_CLASSES]
    onehot = truth[list(ISIC_CLASSES)].to_numpy()
    assert set(np.unique(onehot)) <= {0.0, 1.0}
    assert (onehot.sum(axis=1) == 1.0).all()
    lines = (root / GROUND_TRUTH).read_text().splitlines()
    assert lines[0] == "image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK"
    assert {cell for line in lines[1:] for cell in line.split(",")[1:]} == {"1.0", "0.0"}
    assert truth.image.is_unique and truth.image.str.fullmatch(r"ISIC_\d{7}").all()
    assert list(meta.columns) == ["image", "age_approx", "anatom_site_general", "lesion_id", "sex"]
    assert list(meta.image) == list(truth.image)
    files = {p.name for p in (root / IMAGES_DIR).iterdir()}
    expected = {f"{i}.jpg" for i in truth.image} | {f"{i}_segmentation.png" for i in truth.image}
    assert files == expected
    assert sorted(p.name for p in root.iterdir()) == sorted([IMAGES_DIR, GROUND_TRUTH, METADATA])
    with Image.open(root / IMAGES_DIR / f"{truth.image[0]}.jpg") as im:
        assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (32, 32))
    with Image.open(root / IMAGES_DIR / f"{truth.image[0]}_segmentation.png") as im:
        assert (im.format, im.mode, im.size) == ("PNG", "L", (32, 32))
        assert set(np.unique(np.asarray(im))) <= {0, 255}
    assert summary["count"] == len(truth) == 400
    assert sum(summary["per_class"].values()) == 400
    assert summary["lesions"] == meta.lesion_id.nunique()
    assert summary["marked"] == 0


def test_metadata_values_are_plausible(dataset):
    root, _ = dataset
    truth, meta = load(root)
    ages = meta.age_approx[meta.age_approx != ""].astype(float)
    assert ((ages % 5 == 0) & (ages >= 5) & (ages <= 85)).all()
    assert set(meta.anatom_site_general) <= set(SITES) | {""}
    assert set(meta.sex) <= {"male", "female", ""}
    assert (meta == "").to_numpy().any(), "a few missing values, as in the real file"
    assert meta.lesion_id.str.fullmatch(r"HAM_\d{7}").all()
    label = truth[list(ISIC_CLASSES)].idxmax(axis=1)
    mean_age = ages.groupby(label[ages.index]).mean()
    assert mean_age["NV"] + 15 < min(mean_age["BCC"], mean_age["MEL"])
    head = meta.anatom_site_general == "head/neck"
    assert head[label == "BCC"].mean() > 2 * head[label == "NV"].mean()


def test_same_config_gives_identical_bytes(tmp_path):
    cfg = make_cfg(count=30, marker=MarkerConfig(label="MEL", fraction=0.5, kind="ink"))
    generate(cfg, tmp_path / "a", progress=False)
    generate(cfg, tmp_path / "b", progress=False)
    a, b = digests(tmp_path / "a"), digests(tmp_path / "b")
    assert len(a) == 2 * 30 + 2
    assert a == b


def test_parallel_rendering_writes_the_same_bytes(tmp_path):
    """Each view draws from its own keyed streams: two processes write what one writes."""
    cfg = make_cfg(count=60, marker=MarkerConfig(label="NV", fraction=0.5, kind="ruler"))
    generate(cfg, tmp_path / "one", progress=False, workers=1)
    summary = generate(cfg, tmp_path / "two", progress=False, workers=2)
    one, two = digests(tmp_path / "one"), digests(tmp_path / "two")
    assert summary["count"] == 60 and len(one) == 2 * 60 + 2
    assert one == two


def test_views_of_a_lesion_share_one_painting_and_keep_their_bytes():
    """Views are rendered lesion by lesion, the lesion painted once for all of them; each
    view equals the one rendered on its own (painting included), and no chunk splits a
    lesion."""
    from tasks import synth

    canvas = synth._lesion("MEL", 3, 7, 32, 0.5)
    for view in range(3):
        alone = synth._render("MEL", 3, 7, view, 32, 0.5, "ink")
        shared = synth._render("MEL", 3, 7, view, 32, 0.5, "ink", canvas)
        assert all(np.array_equal(a, b) for a, b in zip(alone, shared, strict=True))
    jobs = [(f"ISIC_{i}", "NV", lesion, view, None) for i, (lesion, view) in enumerate(
        [(0, 0), (1, 0), (0, 1), (2, 0), (1, 1), (0, 2), (3, 0)]
    )]  # fmt: skip
    chunks = synth._lesion_chunks(jobs, per_chunk=2)
    lesions = [[lesion for _, lesion, _ in chunk] for chunk in chunks]
    assert lesions == [[0], [1], [2, 3]]  # first appearance order, >= 2 views a chunk
    views = [v for chunk in chunks for _, _, lesion_views in chunk for v in lesion_views]
    assert [image_id for image_id, _, _ in views] == [f"ISIC_{i}" for i in (0, 2, 5, 1, 4, 3, 6)]


def test_other_seed_gives_other_images(tmp_path):
    generate(make_cfg(count=30), tmp_path / "a", progress=False)
    generate(make_cfg(count=30, seed=8), tmp_path / "b", progress=False)
    a, b = digests(tmp_path / "a"), digests(tmp_path / "b")
    jpgs = [k for k in a if k.endswith(".jpg")]
    assert sum(a[k] != b[k] for k in jpgs) == len(jpgs)


def test_regenerate_replaces_the_old_root(tmp_path):
    root = tmp_path / "raw"
    generate(make_cfg(count=20), root, progress=False)
    (root / "stale.txt").write_text("left over")
    generate(make_cfg(count=12), root, progress=False)
    assert not (root / "stale.txt").exists()
    assert len(pd.read_csv(root / GROUND_TRUTH)) == 12


def test_class_frequencies_follow_the_mix(dataset):
    root, summary = dataset
    truth, meta = load(root)
    counts = truth[list(ISIC_CLASSES)].sum()
    total = sum(MIX.values())
    for label in ISIC_CLASSES:
        expected = 400 * MIX.get(label, 0) / total
        assert abs(counts[label] - max(expected, 3 if label in MIX else 0)) <= 1.5, label
        assert summary["per_class"].get(label, 0) == counts[label]
    label = truth[list(ISIC_CLASSES)].idxmax(axis=1)
    lesions_per_class = meta.lesion_id.groupby(label).nunique()
    assert (lesions_per_class[list(MIX)] >= 3).all()


def test_images_of_one_lesion_share_label_and_metadata(dataset):
    root, _ = dataset
    truth, meta = load(root)
    meta["label"] = truth[list(ISIC_CLASSES)].idxmax(axis=1)
    sizes = meta.groupby("lesion_id").size()
    assert sizes.max() == 3 and (sizes > 1).sum() >= 20 and (sizes == 1).sum() >= 20
    shared = meta.groupby("lesion_id")[["label", "age_approx", "anatom_site_general", "sex"]]
    assert (shared.nunique() == 1).all().all()
    group = sizes[sizes > 1].index[0]
    ids = meta.image[meta.lesion_id == group].tolist()
    pics = [np.asarray(Image.open(root / IMAGES_DIR / f"{i}.jpg"), float) for i in ids]
    assert np.abs(pics[0] - pics[1]).mean() > 1.0, "repeat views are re-rendered, not copies"


@pytest.mark.parametrize("label", CLASSES)
def test_mask_covers_a_visible_lesion(label):
    contrast, darker = [], []
    for i in range(6):
        img, mask = render_lesion_image(label, np.random.default_rng(i), 64, 0.0)
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
        assert mask.shape == (64, 64) and set(np.unique(mask)) == {0, 255}
        inside = mask > 0
        assert 0.02 < inside.mean() < 0.6
        assert not inside[0].all() and not inside[:, 0].all()
        ring = ndimage.binary_dilation(inside, iterations=6) & ~ndimage.binary_dilation(
            inside, iterations=2
        )
        f = img.astype(float)
        contrast.append(np.linalg.norm(f[inside].mean(0) - f[ring].mean(0)))
        darker.append(f[ring].mean() - f[inside].mean())
    assert np.mean(contrast) > 12
    if label in ("MEL", "NV", "VASC", "DF"):
        assert min(darker) > 10


@pytest.mark.parametrize("other", [c for c in CLASSES if c != "MEL"])
def test_background_does_not_depend_on_the_label(other):
    """Same generator state, different label: every pixel outside both masks is the same."""
    a, mask_a = render_lesion_image("MEL", np.random.default_rng(3), 48, 0.5)
    b, mask_b = render_lesion_image(other, np.random.default_rng(3), 48, 0.5)
    outside = (mask_a == 0) & (mask_b == 0)
    assert outside.mean() > 0.3
    assert np.array_equal(a[outside], b[outside])
    assert not np.array_equal(a[mask_a > 0], b[mask_a > 0])


def test_background_statistics_match_between_classes():
    """Mean skin colour in a fixed ring, away from the lesion, is the same for MEL and NV.

    The ring (0.3-0.45 of the side from the centre) keeps lesion size from biasing the
    statistic through the vignette: a larger lesion would otherwise leave only darker,
    peripheral skin to average.
    """
    yy, xx = np.mgrid[:48, :48]
    radius = np.hypot(yy - 23.5, xx - 23.5) / 48
    zone = (radius > 0.3) & (radius < 0.45)

    def means(label: str) -> tuple[np.ndarray, np.ndarray]:
        inside, outside = [], []
        for i in range(40):
            img, mask = render_lesion_image(label, np.random.default_rng([11, i]), 48, 0.5)
            lesion = mask > 0
            inside.append(img[lesion].mean(0))
            outside.append(img[zone & ~ndimage.binary_dilation(lesion, iterations=3)].mean(0))
        return np.mean(inside, 0), np.mean(outside, 0)

    mel_in, mel_out = means("MEL")
    nv_in, nv_out = means("NV")
    gap_in, gap_out = np.linalg.norm(mel_in - nv_in), np.linalg.norm(mel_out - nv_out)
    assert gap_in > 20
    assert gap_out < 0.1 * gap_in and gap_out < 4


@pytest.mark.parametrize("kind", ["ink", "ruler"])
def test_marker_is_drawn_outside_the_mask(kind):
    for i in range(8):
        plain, mask = render_lesion_image("MEL", np.random.default_rng(i), 64, 0.5)
        marked, mask2 = render_lesion_image("MEL", np.random.default_rng(i), 64, 0.5, kind)
        assert np.array_equal(mask, mask2)
        changed = np.abs(marked.astype(int) - plain.astype(int)).max(axis=2) > 0
        assert changed.sum() >= 10
        assert not (changed & (mask > 0)).any()
        if kind == "ink":
            core = np.abs(marked.astype(int) - plain.astype(int)).max(axis=2) > 40
            ink = marked[core].astype(int)
            assert core.sum() >= 4 and (ink[:, 2] - ink[:, 0]).mean() > 20, "a dark-blue dot"


def test_marker_goes_on_the_chosen_class_only(tmp_path):
    plain = tmp_path / "plain"
    generate(make_cfg(count=120, image_size=48), plain, progress=False)
    truth = pd.read_csv(plain / GROUND_TRUTH)
    is_mel = truth.MEL.to_numpy() == 1.0
    for fraction in (1.0, 0.5):
        root = tmp_path / f"ink{fraction}"
        marker = MarkerConfig(label="MEL", fraction=fraction, kind="ink")
        summary = generate(make_cfg(count=120, image_size=48, marker=marker), root, progress=False)
        assert summary["marked"] == round(fraction * is_mel.sum())
        a, b = digests(plain), digests(root)
        jpg_changed = np.array([a[f"{IMAGES_DIR}/{i}.jpg"] != b[f"{IMAGES_DIR}/{i}.jpg"]
                                for i in truth.image])  # fmt: skip
        assert not jpg_changed[~is_mel].any(), "other classes get no marker"
        assert jpg_changed.sum() == summary["marked"]
        assert all(a[k] == b[k] for k in a if k.endswith(".png")), "masks ignore the marker"


def test_bad_config_names_the_key(tmp_path):
    with pytest.raises(ValueError, match="class_mix"):
        generate(make_cfg(class_mix={"XYZ": 1.0}), tmp_path / "x", progress=False)
    with pytest.raises(ValueError, match="kind"):  # the typed config refuses it on creation
        generate(make_cfg(marker=MarkerConfig(label="MEL", kind="sticker")), tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_unk_is_a_mixture_that_still_renders(tmp_path):
    summary = generate(make_cfg(count=12, class_mix={"NV": 0.5, "UNK": 0.5}), tmp_path / "u", False)
    assert summary["per_class"] == {"NV": 6, "UNK": 6}
    img, mask = render_lesion_image("UNK", np.random.default_rng(0), 32, 0.5)
    assert img.shape == (32, 32, 3) and 0 < (mask > 0).mean() < 0.6
