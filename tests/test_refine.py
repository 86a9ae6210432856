"""Tests of the two Rs that fit at CPU scale: the oracle R (`focus.oracle_theta`, each face's
own theta) and the refined R (`fit.refine`, the encoder's estimate plus K fitting steps), their
use in training (`train.r_render`, `r_source`, `refine_steps`, `lambda_distill`) and their
rows in evaluation. Everything runs the `tiny` preset's sizes."""
import dataclasses
import os
import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bfm
import config
import evaluate
import fit
import focus
import losses
import runs
import train

TINY = config.make_config("tiny")
SIZE = 64

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def face_model(tiny_face_model):
    return tiny_face_model


@pytest.fixture(scope="module")
def clean_faces(face_model):
    """Unoccluded synthetic faces without make-up or beard, at 64 x 64."""
    cfg = dataclasses.replace(TINY, image_size=SIZE)
    faces = train.make_dataset(cfg, face_model, seed=11, subset="unoccluded", length=4,
                               unexplainable=0.0)
    return train.load_batch(faces, [0, 1, 2, 3], torch.device("cpu"))


def _autoencoder(face_model, **overrides):
    cfg = dataclasses.replace(TINY, image_size=SIZE, **overrides)
    autoencoder, segmenter = runs.build_models(cfg, face_model)
    return cfg, autoencoder.eval(), segmenter.eval()


# ----------------------------------------------------------------------------- the oracle R

def test_oracle_renders_each_faces_own_theta(face_model, clean_faces):
    """Without noise the oracle's image error is the data's floor: its pixel noise (about 2.6
    of 255), far below the mean face's."""
    cfg, autoencoder, _ = _autoencoder(face_model, r_source="oracle")
    out = train.r_render(clean_faces, autoencoder, None, cfg, stage="em")
    rmse = losses.image_rmse(out.image, clean_faces["image"], clean_faces["region"], out.region)
    assert rmse.max() < 4.0, rmse
    assert torch.equal(bfm.join_theta(out.theta), clean_faces["theta"])
    with torch.no_grad():
        mean_face = autoencoder.decode(bfm.split_theta(torch.zeros_like(clean_faces["theta"])),
                                       height=SIZE, width=SIZE)
    mean_rmse = losses.image_rmse(mean_face.image, clean_faces["image"], clean_faces["region"],
                                  mean_face.region)
    assert mean_rmse.min() > 4 * rmse.max()


@settings(max_examples=15)
@given(noise=st.floats(0.05, 2.0), seed=st.integers(0, 2 ** 31 - 1))
def test_oracle_noise_changes_only_identity_expression_and_albedo(noise, seed):
    theta = torch.randn(3, 257, generator=torch.Generator().manual_seed(seed))
    parts = focus.oracle_theta(theta, noise=noise,
                               generator=torch.Generator().manual_seed(seed + 1))
    exact = bfm.split_theta(theta)
    assert torch.equal(parts.sh, exact.sh) and torch.equal(parts.pose, exact.pose)
    for name in ("id", "exp", "albedo"):
        moved = getattr(parts, name) - getattr(exact, name)  # noise * z
        assert (moved != 0).all()
        assert moved.abs().max() < 8 * noise  # z ~ N(0, 1): far below 8 std here
    again = focus.oracle_theta(theta, noise=noise,
                               generator=torch.Generator().manual_seed(seed + 1))
    assert torch.equal(bfm.join_theta(again), bfm.join_theta(parts))


def test_oracle_noise_raises_the_image_error(face_model, clean_faces):
    errors = []
    for noise in (0.0, 1.0):
        cfg, autoencoder, _ = _autoencoder(face_model, r_source="oracle", oracle_noise=noise)
        out = train.r_render(clean_faces, autoencoder, None, cfg, stage="em")
        errors.append(losses.image_rmse(out.image, clean_faces["image"], clean_faces["region"],
                                        out.region).mean().item())
    assert errors[1] > 2 * errors[0], errors


def test_oracle_run_trains_the_segmenter_only(tmp_path, face_model):
    cfg = dataclasses.replace(TINY, r_source="oracle", oracle_noise=0.25)
    assert train.stage_steps("init", cfg) == cfg.init_seg_steps
    # em: the segmenter steps of the schedule (1 of every 3 steps at tiny, 6 steps)
    assert train.stage_steps("em", cfg) == 2
    assert {train.stage_phase("em", s, cfg) for s in range(2)} == {"segmenter"}
    run_dir = str(tmp_path / "oracle")
    runs.prepare_run_dir(run_dir, cfg)
    before = train.train_stage("init", run_dir, cfg, face_model=face_model)
    after = train.train_stage("em", run_dir, cfg, face_model=face_model)
    for name, value in before["encoder"].items():  # R's encoder never trains
        assert torch.equal(value, after["encoder"][name]), name
    assert any(not torch.equal(value, after["segmenter"][name])
               for name, value in before["segmenter"].items())
    with pytest.raises(runs.RunError, match="oracle"):
        train.stage_steps("prior", cfg)
    rows = evaluate.methods_of_run(run_dir)
    assert [m.label for m in rows] == ["FOCUS, oracle R (noise 0.25, eta 4/1)"] + [
        f"{name}, oracle R (noise 0.25)" for name in ("Whole region", "Pretrained", "M_pre")]
    assert {m.r for m in rows} == {"oracle R"}
    # a second run of the same noise with other eta adds its S row only
    other = str(tmp_path / "oracle-paper-eta")
    shutil.copytree(run_dir, other)
    os.remove(os.path.join(other, "config.json"))
    runs.prepare_run_dir(other, dataclasses.replace(cfg, eta_area=0.5, eta_bin=10.0))
    methods, _ = evaluate.check_runs([run_dir, other])
    assert sorted(m.label for m in methods) == sorted(
        [m.label for m in rows] + ["FOCUS, oracle R (noise 0.25, eta 0.5/10)"])
    # the results' EM progression figure is the trained R's run, never an oracle run's
    assert os.path.exists(os.path.join(run_dir, "figures", "em_progress.png"))
    assert evaluate.progress_source({run_dir: cfg, other: cfg}) is None
    trained = str(tmp_path / "trained")
    os.makedirs(os.path.join(trained, "figures"))
    shutil.copyfile(os.path.join(run_dir, "figures", "em_progress.png"),
                    os.path.join(trained, "figures", "em_progress.png"))
    cfgs = {run_dir: cfg, trained: dataclasses.replace(cfg, r_source="encoder"), other: cfg}
    assert evaluate.progress_source(cfgs) == trained


# ----------------------------------------------------------------------------- the refined R

def test_refinement_with_no_steps_is_the_one_forward_pass(face_model, clean_faces):
    cfg, autoencoder, _ = _autoencoder(face_model)
    torch.manual_seed(0)
    for p in autoencoder.encoder.resnet.fc.parameters():  # a non-zero estimate
        p.data.normal_(0, 0.01)
    refined = fit.refine(clean_faces["image"], clean_faces["landmarks"], autoencoder, steps=0)
    with torch.no_grad():
        one_pass = autoencoder(clean_faces["image"])
    for a, b in zip(refined, one_pass):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)
    assert torch.equal(bfm.join_theta(refined.theta), bfm.join_theta(one_pass.theta))
    assert torch.equal(train.r_render(clean_faces, autoencoder, None, cfg, stage="init").image,
                       one_pass.image)


def _fit_loss(faces, out):
    """L_R (Eq. 8, fit.py's weights) of a render under every rendered pixel."""
    parts = out.theta
    total, _ = losses.autoencoder_loss(
        faces["image"], out.image, torch.ones_like(out.region), out.region,
        lm_target=faces["landmarks"], lm_pred=out.landmarks,
        lm_weights=losses.landmark_weights(), coefficients=(parts.id, parts.exp, parts.albedo),
        lambda_pixel=fit.LAMBDA_PIXEL, lambda_lm=fit.LAMBDA_LM, lambda_reg=0.01)
    return total.item()


@pytest.mark.parametrize("mode", ["plain", "robust"])
def test_refinement_lowers_the_loss_and_the_image_error(face_model, clean_faces, mode):
    _, autoencoder, _ = _autoencoder(face_model)
    one_pass = fit.refine(clean_faces["image"], clean_faces["landmarks"], autoencoder, steps=0)
    refined = fit.refine(clean_faces["image"], clean_faces["landmarks"], autoencoder, steps=30,
                         landmark_steps=10, mode=mode)
    assert _fit_loss(clean_faces, refined) < 0.5 * _fit_loss(clean_faces, one_pass)
    rmse = [losses.image_rmse(o.image, clean_faces["image"], clean_faces["region"],
                              o.region).mean().item() for o in (one_pass, refined)]
    assert rmse[1] < 0.7 * rmse[0], rmse
    assert not refined.image.requires_grad
    assert all(p.grad is None for p in autoencoder.parameters())  # no gradient into E


def test_refinement_uses_the_segmenter_in_em(face_model, clean_faces, monkeypatch):
    """In em the fit's pixel term is masked by S (segmenter mode); in init by M_pre (robust)."""
    cfg, autoencoder, segmenter = _autoencoder(face_model, refine_steps=2)
    seen = []
    original = fit.fit
    monkeypatch.setattr(fit, "fit", lambda *a, **k: seen.append(
        (k["mode"], k["segmenter"])) or original(*a, **k))
    train.r_render(clean_faces, autoencoder, segmenter, cfg, stage="init")
    train.r_render(clean_faces, autoencoder, segmenter, cfg, stage="em")
    assert seen == [("robust", None), ("segmenter", segmenter)]
    assert segmenter.training is False and autoencoder.training is False


def test_refined_run_trains_and_gives_its_rows(tmp_path, face_model):
    cfg = dataclasses.replace(TINY, refine_steps=2, refine_landmark_steps=1, lambda_distill=1.0)
    run_dir = str(tmp_path / "refined")
    runs.prepare_run_dir(run_dir, cfg)
    for stage in ("init", "em"):
        train.train_stage(stage, run_dir, cfg, face_model=face_model)
    with open(f"{run_dir}/log.csv") as f:
        header, *lines = f.read().splitlines()
    distill = header.split(",").index("L_distill")
    assert any(line.split(",")[distill] for line in lines)  # the autoencoder phases log it
    labels = [m.label for m in evaluate.methods_of_run(run_dir)]
    assert labels[:6] == ["FOCUS", "Skin detector", "Whole region", "Residual, oracle xi",
                          "Pretrained", "M_pre"]
    assert labels[6:] == ["FOCUS, one pass", "Whole region, one pass", "Pretrained, one pass",
                          "M_pre, one pass"]


# ----------------------------------------------------------------------------- distillation

def test_distillation_loss_is_zero_at_the_target_and_has_its_gradient():
    scale = fit.theta_step(torch.float64)
    theta = torch.randn(2, 257, dtype=torch.float64, requires_grad=True)
    target = torch.randn(2, 257, dtype=torch.float64)
    assert losses.distillation_loss(target, target, scale).item() == 0.0
    torch.autograd.gradcheck(lambda t: losses.distillation_loss(t, target, scale), (theta,))
    # one translation 10 mm off (one unit of its scale) costs 1 / 257 per image
    shifted = target.clone()
    shifted[:, -1] += 10.0
    assert losses.distillation_loss(shifted, target, scale).item() == pytest.approx(1 / 257)
    with pytest.raises(ValueError, match="scale"):
        losses.distillation_loss(theta, target, scale[:10])


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("overrides, message", [
    (dict(refine_steps=-1), "refine_steps must be >= 0"),
    (dict(refine_landmark_steps=-2), "refine_landmark_steps must be >= 0"),
    (dict(oracle_noise=-0.5), "oracle_noise must be >= 0"),
    (dict(lambda_distill=-1.0), "lambda_distill must be >= 0"),
    (dict(r_source="truth"), "r_source must be one of"),
    (dict(r_source="oracle", variant="mofa"), "oracle"),
])
def test_bad_values_are_refused_with_a_clear_message(overrides, message):
    with pytest.raises(ValueError, match=message):
        config.make_config("tiny", **overrides)


def test_refine_and_oracle_refuse_negative_values(face_model, clean_faces):
    _, autoencoder, _ = _autoencoder(face_model)
    with pytest.raises(ValueError, match="refinement steps must be >= 0"):
        fit.refine(clean_faces["image"], clean_faces["landmarks"], autoencoder, steps=-1)
    with pytest.raises(ValueError, match="oracle noise must be >= 0"):
        focus.oracle_theta(clean_faces["theta"], noise=-1.0)


def test_cli_refuses_a_negative_refinement(capsys):
    with pytest.raises(SystemExit):
        train.main(["--stage", "init", "--refine-steps", "-3"])
    assert "refine_steps must be >= 0" in capsys.readouterr().err
