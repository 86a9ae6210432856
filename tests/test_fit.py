"""Tests of fit.py: per-image analysis-by-synthesis recovers a synthetic face, and the robust
mode's per-image EM masks out an occluder that drags the plain fit; the command line fits a
synthetic sample index or an image file with CSV landmarks, and a trained run's segmenter."""
import pytest
import torch

import bfm
import config
import data
import face_models
import figures
import fit
import losses
import train

SIZE = 96


@pytest.fixture(scope="module")
def scene():
    """A random toy face with known theta, and the same image with a blue occluder."""
    model = face_models.load_face_model("toy")
    g = torch.Generator().manual_seed(3)
    theta = torch.zeros(1, 257)
    t = bfm.split_theta(theta)
    t.id[:] = torch.randn(1, 80, generator=g)
    t.exp[:] = 0.5 * torch.randn(1, 64, generator=g)
    t.albedo[:] = torch.randn(1, 80, generator=g)
    t.sh[:, 1:4] = torch.tensor([0.3, 0.2, -0.3])
    t.pose[:] = torch.tensor([[0.1, 0.3, -0.05, 5.0, -3.0, 20.0]])
    with torch.no_grad():
        out = fit.render_theta(theta, model, height=SIZE, width=SIZE)
    image = out.image * out.region + 0.3 * (1 - out.region)
    occluder = torch.zeros(1, 1, SIZE, SIZE)
    occluder[..., 55:80, 25:70] = 1
    occluded = image * (1 - occluder) + occluder * torch.tensor([0.1, 0.5, 0.9]).view(1, 3, 1, 1)
    return model, theta, out, image, occluder, occluded


def visible_error(result, image, region):
    """Mean squared error of the fitted composite inside the given region."""
    fitted = figures.render_over(image, result.rendered.image, result.rendered.region)
    return float((((fitted - image) ** 2) * region).sum() / (3 * region.sum()))


def test_fit_recovers_pose_and_lowers_the_image_error(scene):
    model, theta, out, image, _, _ = scene
    start = fit.fit(image, out.landmarks, model, steps=0, landmark_steps=0)
    result = fit.fit(image, out.landmarks, model, mode="plain", steps=150, landmark_steps=100)
    angles = bfm.split_theta(result.theta).pose[:, :3]
    assert (angles - bfm.split_theta(theta).pose[:, :3]).abs().max() < 0.06
    before, after = visible_error(start, image, out.region), visible_error(result, image, out.region)
    assert after < before / 5, (before, after)
    assert result.history[-1]["L_R"] < result.history[100]["L_R"]
    assert result.theta.shape == (1, 257) and result.mask.shape == (1, 1, SIZE, SIZE)


def test_init_starts_from_a_given_theta(scene):
    """With no steps, a fit started from theta renders theta (the start is not the mean face)."""
    model, theta, out, image, _, _ = scene
    result = fit.fit(image, out.landmarks, model, steps=0, landmark_steps=0, init=theta)
    assert torch.allclose(result.theta, theta, atol=1e-5)
    assert torch.allclose(result.rendered.image, out.image, atol=1e-5)


def test_coarse_to_fine_fits_at_two_sizes_from_one_theta(scene):
    """theta does not depend on the image size: a landmark fit at half size projects the
    full-size landmarks; the fine stage continues from the coarse theta."""
    model, theta, out, image, _, _ = scene
    coarse = fit.coarse_to_fine(image, out.landmarks, model, coarse_size=SIZE // 2, steps=0,
                                coarse_steps=0, landmark_steps=150)
    assert coarse.rendered.image.shape[-1] == SIZE  # the result is at full size
    error = (coarse.rendered.landmarks - out.landmarks).norm(dim=-1).mean()
    assert error < 1.5, f"landmark error {error:.2f} px at {SIZE} px"
    result = fit.coarse_to_fine(image, out.landmarks, model, coarse_size=SIZE // 2, steps=60,
                                coarse_steps=40, landmark_steps=100)
    again = fit.coarse_to_fine(image, out.landmarks, model, coarse_size=SIZE // 2, steps=60,
                               coarse_steps=40, landmark_steps=100)
    assert torch.equal(result.theta, again.theta)  # deterministic
    stages = [row["stage"] for row in result.history]
    assert stages == ["coarse landmarks"] * 100 + ["coarse plain"] * 40 + ["plain"] * 20
    assert [row["step"] for row in result.history] == list(range(160))
    assert visible_error(result, image, out.region) < visible_error(coarse, image, out.region)
    with pytest.raises(ValueError, match="coarse_size"):
        fit.coarse_to_fine(image, out.landmarks, model, coarse_size=2 * SIZE)


def test_robust_mode_masks_the_occluder_out(scene):
    model, _, out, image, occluder, occluded = scene
    robust = fit.fit(occluded, out.landmarks, model, mode="robust", steps=150, landmark_steps=100)
    plain = fit.fit(occluded, out.landmarks, model, mode="plain", steps=150, landmark_steps=100)
    true_outlier = occluder * out.region
    found = (1 - robust.mask) * out.region
    iou = (found * true_outlier).sum() / ((found + true_outlier) > 0).float().sum()
    assert iou > 0.7, f"IoU {iou:.2f}"
    assert (plain.mask == plain.rendered.region).all()  # plain fits every rendered pixel
    # the occluder drags the plain fit: on the visible face the robust fit is closer
    visible = out.region * (1 - occluder)
    assert visible_error(robust, image, visible) < visible_error(plain, image, visible)


def test_robust_mode_returns_m_pre_at_xi_final_without_the_floor(scene):
    """The fitting masks keep at least half the face at a strict xi; the returned mask is
    M_pre (Eq. 10) of the final render at xi_final."""
    model, _, out, _, _, occluded = scene
    result = fit.fit(occluded, out.landmarks, model, mode="robust", steps=20, landmark_steps=10,
                     xi=0.001, xi_final=0.05, keep_at_least=0.5)
    assert result.history[-1]["kept"] > 0.4  # at xi alone almost nothing: the floor's half
    expected = losses.preliminary_mask(occluded, result.rendered.image, result.rendered.region,
                                       xi=0.05)
    assert torch.equal(result.mask, expected)
    with pytest.raises(ValueError, match="xi_final"):
        fit.fit(occluded, out.landmarks, model, mode="robust", xi_final=0.0)


def test_segmenter_mode_uses_the_segmenter(scene):
    model, _, out, _, occluder, occluded = scene

    class Oracle(torch.nn.Module):
        def forward(self, rendered, target):
            return (1 - occluder).expand(rendered.shape[0], -1, -1, -1)

    result = fit.fit(occluded, out.landmarks, model, mode="segmenter", segmenter=Oracle(),
                     steps=5, landmark_steps=5)
    assert torch.equal(result.mask, (1 - occluder) * result.rendered.region)


def test_fit_rejects_bad_input(scene):
    model, _, out, image, _, _ = scene
    with pytest.raises(ValueError, match="mode"):
        fit.fit(image, out.landmarks, model, mode="nope")
    with pytest.raises(ValueError, match="segmenter"):
        fit.fit(image, out.landmarks, model, mode="segmenter")
    with pytest.raises(ValueError, match="landmarks"):
        fit.fit(image, out.landmarks[:, :5], model)
    with pytest.raises(ValueError, match="image"):
        fit.fit(image[0], out.landmarks, model)


# ----------------------------------------------------------------------------- command line

CLI_MODEL = "toy,resolution=48"
CLI_FAST = ["--steps", "3", "--landmark-steps", "5", "--face-model", CLI_MODEL]
OUTPUTS = ("fit.obj", "render.png", "mask.png", "progress.png")


@pytest.fixture(scope="module")
def face_file(tmp_path_factory):
    """A synthetic face saved as face.png (96 x 96) with its 68 landmarks in landmarks.csv
    beside it (official format). Returns (image path, landmarks (68, 2) in the photo, the
    face model)."""
    folder = tmp_path_factory.mktemp("photos")
    model = face_models.load_face_model(CLI_MODEL)
    sample = data.SyntheticFaces(face_model=model, size=96, subset="unoccluded", seed=5,
                                 length=1)[0]
    figures.save_png(sample["image"], str(folder / "face.png"))
    landmarks = sample["landmarks"].double().numpy()  # (68, 2)
    (folder / "landmarks.csv").write_text(
        "other.png," + ",".join(["40"] * 136) + "\n"
        + "face.png," + ",".join(f"{v:.4f}" for v in landmarks.flatten()) + "\n")
    return str(folder / "face.png"), landmarks, model


def test_cli_fits_an_image_file_with_csv_landmarks(face_file, tmp_path):
    path, landmarks, model = face_file
    out = tmp_path / "out"
    result = fit.main([path, "--size", "64", "--out", str(out)] + CLI_FAST)
    assert all((out / name).is_file() for name in OUTPUTS)
    assert result.theta.shape == (1, 257) and result.mask.shape == (1, 1, 64, 64)
    assert result.rendered.image.shape == (1, 3, 64, 64)
    # the CSV's landmarks aligned to the 64 x 64 crop as ImageFolderFaces aligns them
    matrix = data.alignment_matrix(landmarks, size=64)
    target = torch.from_numpy(data.apply_affine(matrix, landmarks)).float()  # (68, 2)
    with torch.no_grad():
        mean = fit.render_theta(torch.zeros(1, 257), model, height=64, width=64).landmarks[0]
    fitted = result.rendered.landmarks[0]
    assert (fitted - target).norm(dim=-1).mean() < 0.8 * (mean - target).norm(dim=-1).mean()


def test_cli_still_fits_a_synthetic_sample_index(tmp_path):
    result = fit.main(["0", "--size", "32", "--out", str(tmp_path)] + CLI_FAST)
    assert all((tmp_path / name).is_file() for name in OUTPUTS)
    assert result.mask.shape == (1, 1, 32, 32)


def test_cli_robust_setting_by_name_with_options_in_its_place(face_file, tmp_path, monkeypatch):
    """An image file gets the "photo" setting, a sample index "paper"; an option given
    replaces its value; the other modes get `fit`'s own defaults."""
    calls, real_fit = [], fit.fit
    monkeypatch.setattr(fit, "fit", lambda *a, **k: calls.append(k) or real_fit(*a, **k))
    path, out = face_file[0], ["--size", "32", "--out", str(tmp_path)] + CLI_FAST
    fit.main([path] + out)
    fit.main(["0"] + out)
    fit.main([path, "--robust", "paper", "--xi", "0.05", "--lambda-light", "1"] + out)
    fit.main([path, "--mode", "plain"] + out)
    names = list(fit.ROBUST_SETTINGS["photo"])
    chosen = [{name: call[name] for name in names} for call in calls]
    assert chosen[0] == fit.ROBUST_SETTINGS["photo"]
    assert chosen[1] == fit.ROBUST_SETTINGS["paper"]
    assert chosen[2] == {**fit.ROBUST_SETTINGS["paper"], "xi": 0.05, "lambda_light": 1.0}
    assert chosen[3] == fit.ROBUST_SETTINGS["paper"]


@pytest.mark.parametrize("case, expected", [
    ("missing file", "nothere.png: no such file"),
    ("robust setting for plain", "--robust names the settings of --mode robust"),
    ("bad keep", "--keep-at-least is a share in [0, 1)"),
    ("no csv row", "no row for face.png"),
    ("no csv", "python data.py prepare PHOTOS OUT"),
    ("segmenter without run", "--mode segmenter needs a trained segmenter"),
    ("bad run", "no config.json"),
])
def test_cli_rejects_bad_input(face_file, tmp_path, capsys, case, expected):
    path = face_file[0]
    (tmp_path / "other.csv").write_text("other.png," + ",".join(["40"] * 136) + "\n")
    argv = {"missing file": [str(tmp_path / "nothere.png")],
            "no csv row": [path, "--landmarks", str(tmp_path / "other.csv")],
            "no csv": [path, "--landmarks", str(tmp_path / "none.csv")],
            "segmenter without run": [path, "--mode", "segmenter"],
            "robust setting for plain": [path, "--mode", "plain", "--robust", "photo"],
            "bad keep": [path, "--keep-at-least", "1"],
            "bad run": [path, "--mode", "segmenter", "--run", str(tmp_path)]}[case]
    with pytest.raises(SystemExit):
        fit.main(argv + ["--size", "32", "--out", str(tmp_path / "out")] + CLI_FAST)
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_segmenter_mode_uses_a_trained_run(face_file, tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    cfg = train.run("all", run_dir, config.make_config("tiny"))  # seconds: image size 32
    path = face_file[0]
    capsys.readouterr()
    result = fit.main([path, "--mode", "segmenter", "--run", run_dir,
                       "--out", str(tmp_path / "out"), "--steps", "3", "--landmark-steps", "2"])
    assert f"run's image size {cfg.image_size} (not --size 224)" in capsys.readouterr().out
    assert result.mask.shape == (1, 1, cfg.image_size, cfg.image_size)
    assert all((tmp_path / "out" / name).is_file() for name in OUTPUTS)
