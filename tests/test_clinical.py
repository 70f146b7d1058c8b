"""Clinical similarity: the label-aware loss, the clinical part of the embedding, the query
weights that pick a similarity, camera augmentation, and the diagnosis suggestion."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from encoder import EmbedderConfig, create_embedder, embed_cf_array, load_embedder
from encoder.augment import AugmentConfig, augment_cf
from encoder.checkpoint import atomic_save_safetensors
from encoder.embedder import similarity_weights
from encoder.errors import CheckpointError, ConfigError
from encoder.losses import label_affinity, label_contrastive_loss
from encoder.testing import toy_paired_videos
from encoder.train import CaseLabels, embed_training_loop
from retrieval.evaluation.suggestion import reliability_png, suggestion_metrics
from retrieval.models.suggestion import (
    SuggestionModel,
    fit_for_archive,
    fit_suggestion,
    neighbours,
    suggest,
    vote,
)

pytestmark = pytest.mark.usefixtures("deterministic_torch")

S = 32
SMALL = EmbedderConfig(
    image_size=S, dim=16, grid=2, attn_hidden=8, time_freqs=4, clinical_dim=8, clinical_hidden=16
)


@pytest.fixture(scope="module")
def run_dir(micro_run_dir):
    return micro_run_dir  # 32 px


# ---------------------------------------------------------------- the loss


def test_label_affinity() -> None:
    a = label_affinity(
        ["PDR", "PDR", "CSC", None, None], [("nv", "leak"), ("nv",), ("leak",), ("nv",), None]
    )
    assert a.shape == (5, 5) and torch.all(a.diagonal() == 1)
    assert a[0, 1] == pytest.approx(0.7 + 0.3 * 0.5)  # same diagnosis, Jaccard 1/2
    assert a[0, 2] == 0  # different diagnoses: shared leakage does not pull them together
    assert a[0, 3] == pytest.approx(0.5) == a[3, 0]  # diagnosis unknown: the Jaccard alone
    assert a[0, 4] == 0 and a[4, 3] == 0  # nothing known about case 4
    b = label_affinity(["normal", "normal"], [(), ()])
    assert b[0, 1] == pytest.approx(1.0)  # two lesion-free eyes with the same diagnosis
    with pytest.raises(ValueError, match="lesion lists"):
        label_affinity(["a"], [])


def test_a_space_clustered_by_diagnosis_is_the_label_loss_optimum() -> None:
    """With lesions shared across diagnoses (as most retinal diseases share them), a
    space where each diagnosis is one point scores below chance, at the targets' entropy."""
    diagnoses = ["NPDR", "PDR", "BRVO", "CRVO", "normal", "NPDR", "PDR", "BRVO"]
    lesions = [
        ("haem", "ma"),
        ("haem", "nv"),
        ("haem",),
        ("haem", "leak"),
        (),
        ("ma",),
        ("nv",),
        ("haem",),
    ]
    a = label_affinity(diagnoses, lesions)
    names = sorted(set(diagnoses))
    z = F.one_hot(torch.tensor([names.index(d) for d in diagnoses]), len(names)).float()
    loss = float(label_contrastive_loss(z, a, temperature=0.05))
    chance = float(label_contrastive_loss(torch.ones(8, 4) / 2, a))
    assert loss < chance - 0.5


def test_label_loss_ranks_same_diagnosis_above_different_diagnosis() -> None:
    """Free unit vectors of six cases (3 diagnoses, two each; two views per case) trained by
    each loss: the label loss puts every same-diagnosis pair above every other pair; the
    CLIP loss, which treats other cases as negatives, does not."""
    diagnoses = ["A", "A", "B", "B", "C", "C"]
    affinity = label_affinity(diagnoses * 2, [None] * 12)

    def train(loss_name: str) -> torch.Tensor:
        torch.manual_seed(0)
        z = torch.nn.Parameter(torch.randn(12, 8))
        opt = torch.optim.Adam([z], lr=0.05)
        for _ in range(200):
            u = F.normalize(z, dim=-1)
            if loss_name == "label":
                loss = label_contrastive_loss(u, affinity)
            else:
                loss = ClipLoss()(u[:6], u[6:], torch.tensor(10.0))
            opt.zero_grad()
            loss.backward()
            opt.step()
        u = F.normalize(z.detach(), dim=-1)[:6]  # the first view of each case
        return u @ u.T

    same = np.equal.outer(diagnoses, diagnoses) & ~np.eye(6, dtype=bool)
    other = ~np.equal.outer(diagnoses, diagnoses)
    sim = train("label").numpy()
    assert sim[same].min() > sim[other].max()
    sim = train("clip").numpy()
    assert sim[same].min() < sim[other].max()  # the false-negative problem


def test_label_loss_hand_made_batch() -> None:
    """A batch where the same-diagnosis pair is closer scores a lower loss."""
    affinity = label_affinity(["X", "X", "Y"], [None] * 3)
    good = F.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]]), dim=-1)
    bad = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1]]), dim=-1)
    assert label_contrastive_loss(good, affinity) < label_contrastive_loss(bad, affinity)
    nothing = label_affinity([None, None], [None, None]).fill_diagonal_(0)
    assert float(label_contrastive_loss(good[:2], nothing)) == 0.0


# ---------------------------------------------------------------- the embedding


def test_similarity_weights_pick_each_part(run_dir) -> None:
    e = create_embedder(SMALL, run_dir=run_dir)
    data = toy_paired_videos(6, S, 4, seed=0)
    z = embed_cf_array(e, data.cf)  # (6, 24): 16 pair + 8 clinical
    assert z.shape == (6, 24)
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-5)
    pair = z[:, :16] / np.linalg.norm(z[:, :16], axis=1, keepdims=True)
    clinical = z[:, 16:] / np.linalg.norm(z[:, 16:], axis=1, keepdims=True)
    w = e.config.clinical_weight
    for kind, expected in (
        ("pair", pair @ pair.T),
        ("clinical", clinical @ clinical.T),
        ("combined", (1 - w) * pair @ pair.T + w * clinical @ clinical.T),
    ):
        got = (z * similarity_weights(e.config, kind)) @ z.T
        np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=kind)
    with pytest.raises(Exception, match="similarity must be one of"):
        similarity_weights(e.config, "eye")
    no_clinical = EmbedderConfig(clinical_dim=0)
    with pytest.raises(Exception, match="no clinical part"):
        similarity_weights(no_clinical, "clinical")


def test_the_clinical_part_is_the_same_for_a_picture_and_its_mirror_image(run_dir) -> None:
    from encoder.embedder import embed_ffa_array

    e = create_embedder(SMALL, run_dir=run_dir)
    data = toy_paired_videos(4, S, 4, seed=1)
    mirror = np.ascontiguousarray(data.cf[:, :, ::-1])
    z, zm = embed_cf_array(e, data.cf), embed_cf_array(e, mirror)
    np.testing.assert_allclose(z[:, 16:], zm[:, 16:], atol=1e-5)  # the same disease ...
    assert np.abs(z[:, :16] - zm[:, :16]).max() > 1e-3  # ... not the same eye
    videos = np.ascontiguousarray(data.ffa[..., ::-1])
    v = embed_ffa_array(e, data.ffa, data.times_s)
    vm = embed_ffa_array(e, videos, data.times_s)
    np.testing.assert_allclose(v[:, 16:], vm[:, 16:], atol=1e-5)
    assert np.abs(v[:, :16] - vm[:, :16]).max() > 1e-3


def test_the_embedder_id_names_how_vectors_are_made(tmp_path, run_dir, monkeypatch) -> None:
    from encoder import embedder as module
    from encoder.embedder import embedder_id, save_embedder

    folder = save_embedder(tmp_path / "e", create_embedder(SMALL, run_dir=run_dir))
    before = embedder_id(folder)
    monkeypatch.setattr(module, "VECTOR_RECIPE", "clinical part: the picture alone")
    assert embedder_id(folder) != before  # an index built the old way is refused


def test_training_with_labels_trains_the_clinical_part(tmp_path, run_dir) -> None:
    data = toy_paired_videos(8, S, 4, seed=0)
    labels = CaseLabels(diagnoses=("A", "B") * 4, lesions=((), ("x",)) * 4)
    kw = dict(
        run_dir=run_dir,
        data=data,
        dim=16,
        config=SMALL,
        iters=3,
        batch_size=4,
        progress=False,
        stats_every=1,
    )
    embed_training_loop(out_dir=tmp_path / "l", labels=labels, **kw)
    opts = json.loads((tmp_path / "l" / "training_options.json").read_text())
    assert opts["labels"]["used"] and opts["labels"]["labelled_cases"] == 8
    rows = [json.loads(x) for x in (tmp_path / "l" / "stats.jsonl").read_text().splitlines()]
    assert all(r["Loss/label"] > 0 for r in rows)
    e, cfg = load_embedder(tmp_path / "l")
    assert cfg["embedder"]["clinical_dim"] == 8 and e.config.out_dim == 24
    fresh = create_embedder(SMALL, run_dir=run_dir)
    assert not torch.equal(e.cf_clinical.detect[0].weight, fresh.cf_clinical.detect[0].weight)


def test_unlabelled_cohort_trains_the_pair_part_and_says_so(tmp_path, run_dir, caplog) -> None:
    data = toy_paired_videos(8, S, 4, seed=0)
    none = CaseLabels(diagnoses=(None,) * 8, lesions=(None,) * 8)
    kw = dict(dim=16, config=SMALL, iters=2, batch_size=4, progress=False)
    with caplog.at_level(logging.INFO, logger="encoder.train.embed"):
        embed_training_loop(run_dir=run_dir, out_dir=tmp_path / "u", data=data, labels=none, **kw)
    opts = json.loads((tmp_path / "u" / "training_options.json").read_text())
    assert not opts["labels"]["used"]
    assert "no diagnosis or lesion labels" in opts["labels"]["objective"]
    assert opts["embedder"]["clinical_dim"] == 0
    assert "no diagnosis or lesion labels" in (tmp_path / "u" / "log.txt").read_text()
    e, _ = load_embedder(tmp_path / "u")
    assert e.config.out_dim == 16 and not hasattr(e, "cf_clinical")


def test_version_2_embedder_folder_loads_without_a_clinical_part(tmp_path, run_dir) -> None:
    from encoder import save_embedder

    e = create_embedder(SMALL, run_dir=run_dir, clinical_dim=0)
    folder = save_embedder(tmp_path / "v2", e)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["format_version"] = 2
    del cfg["embedder"]["clinical_dim"]  # written before the clinical heads
    (folder / "config.json").write_text(json.dumps(cfg))
    meta = {"config": json.dumps(cfg)}  # the weights carry the same config
    atomic_save_safetensors(folder / "embedder.safetensors", e.state_dict(), meta)
    loaded, loaded_cfg = load_embedder(folder)
    assert loaded.config.clinical_dim == 0 and loaded_cfg["format_version"] == 2


def test_an_interrupted_save_loads_the_config_saved_with_the_weights(
    tmp_path, run_dir, caplog
) -> None:
    """A save killed between the weights and config.json leaves a config.json that does
    not describe the weights (another model, or none yet): the weights' own config wins."""
    from encoder import save_embedder

    old = save_embedder(tmp_path / "e", create_embedder(SMALL, run_dir=run_dir, clinical_dim=0))
    new = create_embedder(SMALL, run_dir=run_dir, clinical_dim=8)
    text = json.dumps(json.loads((old / "config.json").read_text()) | {"iteration": 9})
    meta = {"config": text.replace('"clinical_dim": 0', '"clinical_dim": 8')}
    atomic_save_safetensors(old / "embedder.safetensors", new.state_dict(), meta)
    with caplog.at_level(logging.WARNING, logger="encoder.embedder"):
        loaded, cfg = load_embedder(old)  # config.json still says clinical_dim 0
    assert loaded.config.clinical_dim == 8 and cfg["iteration"] == 9
    assert "a save was interrupted" in caplog.text
    (old / "config.json").unlink()  # the very first save, killed between the two files
    assert load_embedder(old)[0].config.clinical_dim == 8
    (old / "embedder.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_embedder(old)


_ONLY_CAMERA = dict(
    rotate_deg=0,
    shift=0,
    scale=0,
    brightness=0,
    contrast=0,
    gamma=0,
    colour=0,
    blur_prob=0,
    aperture_prob=0,
    downscale_prob=0,
    frame_cut_prob=0,
    jpeg_prob=0,
)


def test_camera_augmentation() -> None:
    x = torch.ones(2, 3, 32, 32) * 0.5
    cfg = AugmentConfig(**_ONLY_CAMERA | {"aperture_prob": 1.0, "aperture_min": 0.5})
    y = augment_cf(x, torch.Generator().manual_seed(0), cfg)
    assert torch.all(y[:, :, 0, 0] == -1) and torch.all(y[:, :, 16, 16] > 0)  # corner stopped
    checker = (torch.arange(32)[:, None] + torch.arange(32)[None]) % 2 * 2.0 - 1  # (32, 32)
    x = checker.expand(2, 3, 32, 32).clone()
    cfg = AugmentConfig(**_ONLY_CAMERA | {"downscale_prob": 1.0, "downscale_min": 0.5})
    y = augment_cf(x, torch.Generator().manual_seed(0), cfg)
    assert y.std() < 0.5 * x.std()  # the finest detail is lost at a lower resolution


def test_a_narrower_field_of_view_is_zoomed_in_as_the_query_path_crops_it() -> None:
    ramp = torch.linspace(-0.5, 0.5, 64).expand(1, 3, 64, 64).clone()
    cfg = AugmentConfig(**_ONLY_CAMERA | {"aperture_prob": 1.0, "aperture_min": 0.5})
    y = augment_cf(ramp, torch.Generator().manual_seed(3), cfg)
    slope = (y[0, 0, 32, 40] - y[0, 0, 32, 24]) / (ramp[0, 0, 32, 40] - ramp[0, 0, 32, 24])
    assert 0.5 - 1e-4 <= slope < 0.99  # magnified by 1 / radius, radius in [0.5, 1)
    assert torch.all(y[0, :, 0, 0] == -1)  # black outside the standard circle


def test_a_cut_frame_has_black_bands_and_jpeg_keeps_the_black_surround() -> None:
    x = torch.full((4, 3, 32, 32), 0.3)
    x[:, :, :, :2] = -1.0  # a black surround
    cut = AugmentConfig(**_ONLY_CAMERA | {"frame_cut_prob": 1.0, "frame_cut_min": 0.5})
    y = augment_cf(x, torch.Generator().manual_seed(0), cut)
    assert torch.all(y[:, :, 0] == -1)  # the top row is cut
    torch.testing.assert_close(y[:, :, 16, 8:], x[:, :, 16, 8:])  # the middle kept
    checker = ((torch.arange(32)[:, None] // 2 + torch.arange(32)[None] // 2) % 2) * 1.2 - 0.6
    x[:, :, :, 2:] = checker[:, 2:]
    jpeg = AugmentConfig(**_ONLY_CAMERA | {"jpeg_prob": 1.0, "jpeg_quality_min": 15})
    y = augment_cf(x, torch.Generator().manual_seed(0), jpeg)
    assert torch.all(y[:, :, :, :2] == -1)  # the surround stays black
    assert (y - x).abs()[:, :, :, 2:].mean() > 0.01  # compression changed the picture
    with pytest.raises(ConfigError, match="jpeg_quality_min"):
        AugmentConfig(jpeg_quality_min=0)


def test_jpeg_augmentation_drops_colour_detail_as_cameras_store_it() -> None:
    """A camera's JPEG keeps chroma at half resolution (4:2:0): a fine colour checker
    of constant luma is smoothed away, a grey checker is kept. Query photos' JPEG
    damage is in their chroma, so the augmentation must be too."""
    check = ((torch.arange(32)[:, None] + torch.arange(32)[None]) % 2).float() * 0.3 - 0.15
    luma = torch.full((32, 32), 0.5)
    colour = torch.stack([luma + 1.402 * check, luma - 0.714 * check, luma])  # Cr only
    grey = torch.stack([luma + check] * 3)
    cfg = AugmentConfig(**_ONLY_CAMERA | {"jpeg_prob": 1.0, "jpeg_quality_min": 95})

    def contrast_kept(u: torch.Tensor) -> float:
        x = (u * 2 - 1)[None]  # model space
        y = augment_cf(x, torch.Generator().manual_seed(0), cfg)
        return float((y - y.mean()).std() / (x - x.mean()).std())

    assert contrast_kept(colour) < 0.5
    assert contrast_kept(grey) > 0.9


# ---------------------------------------------------------------- the suggestion


def test_vote_probabilities_sum_to_one_and_abstain() -> None:
    classes = ("A", "B", "C")
    p = vote(np.array([[0.9, 0.8, 0.1]]), np.array([["A", "B", "A"]]), classes, 0.1, 0.1)
    np.testing.assert_allclose(p.sum(1), 1.0)
    assert p[0].argmax() == 0 and p[0, 2] > 0  # smoothing: never certainty, never 0
    model = SuggestionModel(classes=classes, k=3, temperature=0.1, smoothing=0.1, abstain_below=0.5)
    s = suggest(model, [0.9, 0.8, 0.1], ["A", "B", "A"], ["c1", "c2", "c3"])
    assert s.diagnosis == "A" and s.supporting_case_ids == ("c1", "c3") and not s.abstained
    assert sum(s.probabilities.values()) == pytest.approx(1.0)
    strict = SuggestionModel(
        classes=classes, k=3, temperature=0.1, smoothing=0.1, abstain_below=0.99
    )
    assert suggest(strict, [0.9, 0.8, 0.1], ["A", "B", "A"], ["c1", "c2", "c3"]).abstained
    with pytest.raises(ValueError, match="abstain_below"):
        SuggestionModel(classes=classes, abstain_below=1.5)


def _archive(n: int = 120, seed: int = 0):
    """Vectors clustered by diagnosis (plus noise), with a split column."""
    rng = np.random.default_rng(seed)
    classes = np.array(["A", "B", "C", "D"])
    diag = classes[rng.integers(0, 4, n)]
    centres = rng.standard_normal((4, 8))
    x = centres[np.searchsorted(classes, diag)] + rng.standard_normal((n, 8)) * 0.8
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    splits = np.array(["train"] * 60 + ["val"] * 30 + ["test"] * 30)
    return x.astype(np.float32), splits, diag


def test_calibration_never_reads_test_labels() -> None:
    x, splits, diag = _archive()
    model = fit_for_archive(x, np.ones(8, np.float32), splits, diag)
    shuffled = diag.copy()
    test = splits == "test"
    shuffled[test] = np.array(["Z"] * test.sum())  # test labels changed, even to a new class
    again = fit_for_archive(x, np.ones(8, np.float32), splits, shuffled)
    assert model == again and model.calibrated and "Z" not in model.classes
    assert model.fitted_on["split"] == "val" and model.fitted_on["queries"] == 30


def test_calibration_lowers_the_validation_nll_and_metrics() -> None:
    x, splits, diag = _archive()
    train, val = splits == "train", splits == "val"
    scores, labels = neighbours(x[val], x[train], diag[train], 10)
    classes = sorted(set(diag[train | val]))
    model = fit_suggestion(scores, labels, diag[val], classes, k=10)

    def nll(t: float, a: float) -> float:
        p = vote(scores, labels, classes, t, a)
        return float(-np.log(p[np.arange(len(p)), [classes.index(d) for d in diag[val]]]).mean())

    assert nll(model.temperature, model.smoothing) <= nll(0.01, 0.01) + 1e-9
    assert nll(model.temperature, model.smoothing) <= nll(1.0, 1.0) + 1e-9
    p = vote(scores, labels, classes, model.temperature, model.smoothing)
    m = suggestion_metrics(p, diag[val], classes, 0.5)
    assert 0 <= m["ece"] <= 1 and 0 <= m["accuracy"] <= 1 and m["queries"] == 30
    assert sum(b["count"] for b in m["reliability"]) == 30
    assert reliability_png(m)[:8] == b"\x89PNG\r\n\x1a\n"


def test_ece_of_a_hand_example() -> None:
    # two queries at confidence 0.9 (one right), two at 0.6 (both right)
    p = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    m = suggestion_metrics(p, ["A", "B", "A", "A"], ["A", "B"], abstain_below=0.7)
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["ece"] == pytest.approx(0.5 * abs(0.5 - 0.9) + 0.5 * abs(1.0 - 0.6))
    assert m["coverage"] == pytest.approx(0.5) and m["accuracy_answered"] == pytest.approx(0.5)
