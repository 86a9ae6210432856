"""Tests of evaluate.py: every metric against a slow twin or a hand-computed case, rigid
alignment and the skin-colour model by properties, the diagnosis of R with a true-theta and a
zero encoder, the whole evaluation, the export and the diagnosis CLI on a tiny trained run."""
import dataclasses
import json
import math
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import bfm
import config
import data
import diagnose
import evaluate
import face_models
import figures
import focus
import runs
import train


# ---------------------------------------------------------------------------- segmentation

def slow_scores(mask, truth, region):
    """Pixel-by-pixel confusion counts of one image (the obviously correct twin)."""
    tp = fp = fn = tn = 0
    H, W = mask.shape[-2:]
    for y in range(H):
        for x in range(W):
            if region[0, y, x] < 0.5:
                continue
            m, t = mask[0, y, x] >= 0.5, truth[0, y, x] > 0.5
            tp += m and t
            fp += m and not t
            fn += (not m) and t
            tn += (not m) and (not t)
    nan = float("nan")
    return {"ACC": (tp + tn) / (tp + fp + fn + tn) if tp + fp + fn + tn else nan,
            "PPV": tp / (tp + fp) if tp + fp else nan,
            "TPR": tp / (tp + fn) if tp + fn else nan,
            "F1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else nan}


@settings(max_examples=40)
@given(st.integers(0, 2**31 - 1), st.integers(1, 3), st.integers(1, 7), st.integers(1, 7))
def test_segmentation_scores_match_slow_twin(seed, B, H, W):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, 1, H, W, generator=g)
    truth = (torch.rand(B, 1, H, W, generator=g) < 0.6).float()
    region = (torch.rand(B, 1, H, W, generator=g) < 0.7).float()
    region[:, :, 0, 0] = 1  # never empty: ACC is always a number, so something is compared
    scores = evaluate.segmentation_scores(mask, truth, region)
    for b in range(B):
        expected = slow_scores(mask[b], truth[b], region[b])
        assert math.isfinite(expected["ACC"]) and math.isfinite(float(scores["ACC"][b]))
        for name, value in expected.items():
            got = float(scores[name][b])
            assert (math.isnan(got) and math.isnan(value)) or got == pytest.approx(value), name


def test_segmentation_scores_hand_example():
    # region: 4 pixels; truth face at 3 of them; mask keeps 2 faces and the outlier
    region = torch.tensor([[1, 1], [1, 1.0]]).view(1, 1, 2, 2)
    truth = torch.tensor([[1, 1], [1, 0.0]]).view(1, 1, 2, 2)
    mask = torch.tensor([[0.9, 0.6], [0.4, 0.5]]).view(1, 1, 2, 2)  # 0.5 rounds to face
    s = evaluate.segmentation_scores(mask, truth, region)
    # TP 2, FP 1, FN 1, TN 0
    assert float(s["ACC"]) == pytest.approx(0.5)
    assert float(s["PPV"]) == pytest.approx(2 / 3)
    assert float(s["TPR"]) == pytest.approx(2 / 3)
    assert float(s["F1"]) == pytest.approx(2 / 3)
    soft = evaluate.segmentation_scores(mask, truth, region, binarize=False)
    # soft TP = 0.9 + 0.6 + 0.4 = 1.9, FP = 0.5
    assert float(soft["PPV"]) == pytest.approx(1.9 / 2.4)


def test_segmentation_ignores_pixels_outside_the_region():
    truth = torch.ones(1, 1, 4, 4)
    region = torch.zeros(1, 1, 4, 4)
    region[..., :2, :] = 1
    mask = torch.ones(1, 1, 4, 4)
    mask[..., 2:, :] = 0  # wrong, but outside the region
    s = evaluate.segmentation_scores(mask, truth, region)
    assert float(s["F1"]) == 1.0 and float(s["ACC"]) == 1.0


def test_segmentation_rejects_bad_shapes():
    with pytest.raises(ValueError, match="must all be"):
        evaluate.segmentation_scores(torch.ones(1, 1, 3, 3), torch.ones(1, 1, 3, 4),
                                     torch.ones(1, 1, 3, 3))


# ---------------------------------------------------------------------------- image RMSE

def test_image_rmse_of_a_constant_difference():
    target = torch.full((2, 3, 5, 5), 0.5)
    rendered = target + 0.1
    visible = torch.zeros(2, 1, 5, 5)
    visible[:, :, 1:4, 1:4] = 1
    rendered[:, :, 0, 0] = 1.0  # outside the visible face: not counted
    rmse = evaluate.image_rmse(rendered, target, visible, torch.ones(2, 1, 5, 5))
    assert torch.allclose(rmse, torch.full((2,), 25.5, dtype=torch.float64))
    empty = evaluate.image_rmse(rendered, target, torch.zeros(2, 1, 5, 5), torch.ones(2, 1, 5, 5))
    assert torch.isnan(empty).all()


# ---------------------------------------------------------------------------- shapes

def random_rotation(g):
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    return q if torch.linalg.det(q) > 0 else -q


@settings(max_examples=30)
@given(st.integers(0, 2**31 - 1))
def test_rigid_align_undoes_a_rigid_motion(seed):
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(2, 50, 3, generator=g, dtype=torch.float64) * 30
    R = random_rotation(g)
    t = torch.randn(1, 1, 3, generator=g, dtype=torch.float64) * 100
    moved = target @ R.T + t
    assert torch.allclose(evaluate.rigid_align(moved, target), target, atol=1e-8)
    # hence the shape error is invariant to the pose of the prediction
    noisy = target + torch.randn(2, 50, 3, generator=g, dtype=torch.float64)
    assert torch.allclose(evaluate.shape_errors(noisy @ R.T + t, target),
                          evaluate.shape_errors(noisy, target), atol=1e-8)


def test_rigid_align_does_not_mirror():
    g = torch.Generator().manual_seed(0)
    target = torch.randn(1, 40, 3, generator=g, dtype=torch.float64)
    mirrored = target * torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64)
    aligned = evaluate.rigid_align(mirrored, target)
    # a reflection would fit exactly; a proper rotation cannot
    assert (aligned - target).norm(dim=-1).mean() > 0.1
    # the aligned cloud is a rigid copy: pairwise distances are preserved
    assert torch.allclose(torch.cdist(aligned[0], aligned[0]),
                          torch.cdist(mirrored[0], mirrored[0]), atol=1e-6)


def test_shape_errors_of_a_known_offset():
    true = torch.randn(1, 30, 3, dtype=torch.float64)
    # a scaled copy cannot be aligned away by a rigid motion
    errors = evaluate.shape_errors(true * 2, true)
    assert errors.shape == (1, 30) and errors.mean() > 0.1
    assert torch.allclose(evaluate.shape_errors(true, true), torch.zeros(1, 30,
                                                                         dtype=torch.float64))


def test_paired_t_test_matches_the_formula():
    rng = np.random.default_rng(0)
    before = rng.normal(2.0, 0.3, 40)
    after = before - 0.1 + rng.normal(0, 0.05, 40)
    result = evaluate.paired_t_test(before, after)
    d = after - before
    t = d.mean() / (d.std(ddof=1) / math.sqrt(d.size))
    assert result["t"] == pytest.approx(t)
    assert result["mean_difference"] == pytest.approx(d.mean()) and result["p"] < 1e-6
    with pytest.raises(ValueError):
        evaluate.paired_t_test([1.0], [2.0])


def test_summary_skips_nan():
    s = evaluate.summary([1.0, float("nan"), 3.0])
    assert s == {"mean": 2.0, "std": 1.0, "median": 2.0, "n": 2, "n_nan": 1}


# ---------------------------------------------------------------------------- skin colour

def test_skin_model_separates_two_colour_clouds():
    g = torch.Generator().manual_seed(1)
    B, H, W = 2, 16, 16
    skin = (torch.rand(B, 1, H, W, generator=g) < 0.5).float()
    skin_colour = torch.tensor([0.8, 0.6, 0.5]).view(1, 3, 1, 1)
    other_colour = torch.tensor([0.2, 0.3, 0.7]).view(1, 3, 1, 1)
    images = (skin * skin_colour + (1 - skin) * other_colour
              + 0.05 * torch.randn(B, 3, H, W, generator=g))
    model = evaluate.SkinColourModel.fit(images, skin, 1 - skin)
    p = model(images)
    assert p.shape == (B, 1, H, W) and ((p >= 0) & (p <= 1)).all()
    assert ((p >= 0.5).float() == skin).float().mean() > 0.99
    # a pixel of skin colour is skin whatever it belongs to: the Fig. 7 failure
    assert model(skin_colour.expand(1, 3, 2, 2)).min() > 0.99
    with pytest.raises(ValueError, match="at least 4"):
        evaluate.SkinColourModel.fit(images, torch.zeros_like(skin), 1 - skin)


# ---------------------------------------------------------------------------- diagnosis

def random_theta(seed, B=3):
    return bfm.split_theta(torch.randn(B, 257, generator=torch.Generator().manual_seed(seed)))


@given(seed=st.integers(0, 2**31 - 1),
       groups=st.lists(st.sampled_from(list(diagnose.GROUPS)), unique=True, max_size=5))
def test_swap_groups_replaces_exactly_the_named_fields(seed, groups):
    predicted, true = random_theta(seed), random_theta(seed + 1)
    swapped = diagnose.swap_groups(predicted, true, groups)
    fields = {diagnose.GROUPS[g] for g in groups}
    assert set(diagnose.GROUPS.values()) == set(bfm.Theta._fields)
    for field in bfm.Theta._fields:
        source = true if field in fields else predicted
        assert getattr(swapped, field) is getattr(source, field), field


def test_swap_groups_rejects_unknown_groups():
    with pytest.raises(KeyError):
        diagnose.swap_groups(random_theta(0), random_theta(1), ["shape"])


def test_theta_errors_of_a_known_offset():
    true = random_theta(2, B=2)
    pose = true.pose + torch.tensor([0.01, -0.02, 0.03, 1.0, -3.0, 5.0])
    predicted = true._replace(id=true.id + 0.5, exp=true.exp - 0.25, albedo=true.albedo,
                              sh=true.sh + torch.arange(27.0) % 2, pose=pose)
    errors = diagnose.theta_errors(predicted, true)
    expected = {"identity": 0.5, "expression": 0.25, "albedo": 0.0,
                "light": math.sqrt(13 / 27),  # 13 of the 27 coefficients off by 1
                "angles_deg": math.degrees(0.02), "shift_mm": 2.0, "depth_mm": 5.0}
    for name, value in expected.items():
        assert errors[name].shape == (2,), name
        assert torch.allclose(errors[name], torch.full((2,), value), atol=1e-4), name
    for name, field in (("identity", "id"), ("expression", "exp"), ("albedo", "albedo"),
                        ("light", "sh")):
        size = getattr(true, field).pow(2).mean(dim=1).sqrt()
        assert torch.allclose(errors[name + "_size"], size), name


class TrueThetaEncoder(torch.nn.Module):
    """An encoder that knows the answer: the ground-truth theta of each image it is shown."""

    def __init__(self, faces):
        super().__init__()
        self.images, self.theta = faces["image"], faces["theta"]

    def forward(self, images):
        rows = [int((self.images == image).flatten(1).all(1).nonzero()) for image in images]
        return bfm.split_theta(self.theta[rows])


@pytest.fixture(scope="module")
def small_faces():
    model = face_models.load_face_model("toy,resolution=24")
    return model, evaluate.test_sets(model, 32, 3, subsets=("unoccluded", "scarf"))


def test_test_sets_keep_the_true_theta(small_faces):
    model, sets = small_faces
    faces = data.SyntheticFaces(face_model=model, size=32, length=3, seed=config.EVAL_SEED,
                                subset="scarf")
    assert torch.equal(sets["scarf"]["theta"], faces.batch([0, 1, 2])["theta"])
    assert sets["unoccluded"]["theta"].shape == (3, 257)


def test_diagnose_with_the_true_theta_has_nothing_to_blame(small_faces):
    model, sets = small_faces
    for faces in sets.values():
        autoencoder = focus.FaceAutoencoder(TrueThetaEncoder(faces), model)
        result = diagnose.diagnose(autoencoder, faces, batch_size=2)  # two batches
        rows = result["rmse"]
        assert list(rows) == (["predicted", "true"] + [f"{g} true" for g in diagnose.GROUPS]
                              + [f"only {g} predicted" for g in diagnose.GROUPS])
        assert rows["true"].shape == (3,) and np.isfinite(rows["true"]).all()
        for row, values in rows.items():
            assert np.array_equal(values, rows["true"]), row
        errors = result["errors"]
        for name, values in errors.items():
            if not name.endswith(("_size", "_true")) and name not in ("light_tint",
                                                                       "albedo_predicted"):
                assert (values == 0).all(), name
        # the outlier-explanation numbers describe the prediction, here the truth itself
        np.testing.assert_array_equal(errors["light_tint"], errors["light_tint_true"])
        np.testing.assert_allclose(errors["albedo_predicted"], errors["albedo_size"], rtol=1e-6)
        assert (result["errors"]["identity_size"] > 0).all()
        assert (result["landmarks_px"] == 0).all()
        assert result["shape"]["R"].max() < 1e-3
        assert (result["shape"]["Mean face"] > 0.1).all()


def test_diagnose_of_a_fresh_encoder_predicts_the_mean_face(small_faces):
    model, sets = small_faces
    torch.manual_seed(0)
    autoencoder = focus.FaceAutoencoder(focus.Encoder(width=4), model)  # theta = 0
    faces = sets["unoccluded"]
    result = diagnose.diagnose(autoencoder, faces)
    rmse, errors = result["rmse"], result["errors"]
    assert rmse["predicted"].mean() > rmse["true"].mean() + 5
    # predicting 0: each group's error is the size of its truth
    for name in ("identity", "expression", "albedo", "light"):
        np.testing.assert_allclose(errors[name], errors[name + "_size"], rtol=1e-6)
    true = bfm.split_theta(faces["theta"])
    np.testing.assert_allclose(errors["depth_mm"], true.pose[:, 5].abs().numpy(), rtol=1e-6)
    np.testing.assert_allclose(result["shape"]["R"], result["shape"]["Mean face"], rtol=1e-6)
    assert (result["landmarks_px"] > 0).all()
    # the rows by hand: "light true" is theta 0 with the true light, "only light predicted"
    # the true theta with light 0
    zero = bfm.split_theta(torch.zeros_like(faces["theta"]))
    light_true = zero._replace(sh=true.sh)
    only_light = true._replace(sh=zero.sh)
    with torch.no_grad():
        for row, theta in (("light true", light_true), ("only light predicted", only_light)):
            out = autoencoder.eval().decode(theta, height=32, width=32)
            expected = evaluate.image_rmse(out.image, faces["image"], faces["visible_face"],
                                           out.region).numpy()
            np.testing.assert_allclose(rmse[row], expected, rtol=1e-5, err_msg=row)
    assert not np.allclose(rmse["light true"], rmse["only light predicted"])
    # the masks on R's render: the whole region's F1 by hand; M_pre keeps only part of it
    with torch.no_grad():
        out = autoencoder.eval().decode(zero, height=32, width=32)
    whole = evaluate.segmentation_scores(out.region, faces["visible_face"], out.region)["F1"]
    np.testing.assert_allclose(result["f1"]["Whole region"], whole.numpy(), rtol=1e-6)
    strict = diagnose.diagnose(autoencoder, faces, xi=1e-6)["f1"]["M_pre"]
    assert np.nanmean(strict) < np.nanmean(result["f1"]["Whole region"])
    # theta = 0 is white light with albedo at the mean: no tint, no albedo beyond the prior
    np.testing.assert_allclose(errors["light_tint"], 0.0, atol=1e-12)
    np.testing.assert_allclose(errors["albedo_predicted"], 0.0, atol=1e-12)
    assert (errors["light_tint_true"] > 0).all()  # the data's light has a colour tint
    autoencoder.train()
    result = diagnose.diagnose(autoencoder, faces)
    assert autoencoder.training  # the mode is restored
    markdown = diagnose.diagnosis_markdown(result, "unoccluded")
    assert markdown.startswith("### unoccluded") and "| only pose predicted |" in markdown
    assert "| identity (RMS) |" in markdown and "| Mean face |" in markdown
    assert "| Whole region |" in markdown and "| light tint L_mono" in markdown
    assert "| yaw |" in markdown and result["pose"]["R"].shape == (faces["image"].shape[0], 6)


def test_loss_towards_truth_finds_where_the_regulariser_moves_the_minimum():
    model = face_models.load_face_model("toy,resolution=24")
    faces = data.SyntheticFaces(face_model=model, size=32, length=4, seed=1, subset="unoccluded",
                                unexplainable=0.0, landmark_noise=0.0, image_noise=0.0)
    faces = faces.batch([0, 1, 2, 3])
    autoencoder = focus.FaceAutoencoder(focus.Encoder(width=4), model)
    scales = (0.0, 0.5, 1.0, 1.5)
    cfg = config.make_config("tiny")
    # without the regulariser the truth (s = 1) renders the image: the smallest loss
    free = diagnose.loss_towards_truth(autoencoder, faces, dataclasses.replace(cfg, lambda_reg=0.0),
                                       scales=scales, batch_size=3)
    assert min(free, key=free.get) == 1.0 and free[1.0] < 0.01
    # a strong regulariser moves the minimum to the mean face
    strong = diagnose.loss_towards_truth(autoencoder, faces,
                                         dataclasses.replace(cfg, lambda_reg=100.0), scales=scales,
                                         batch_size=3)
    assert min(strong, key=strong.get) == 0.0
    # L_R is linear in lambda_reg: the difference is lambda_reg times the mean square of s theta
    theta = bfm.split_theta(faces["theta"])
    coefficients = torch.cat([theta.id, theta.exp, theta.albedo], dim=1)
    for s in scales:
        expected = 100.0 * (s * coefficients).pow(2).mean().item()
        assert strong[s] - free[s] == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_pose_spread_tells_a_shrunk_output_from_a_right_one():
    rng = np.random.default_rng(0)
    true = rng.normal(size=(200, 6))
    spread = diagnose.pose_spread({"R": 0.2 * true, "true": true})  # right way, too small
    for name in diagnose.POSE_NAMES:
        assert spread[name]["correlation"] == pytest.approx(1.0)
        assert spread[name]["R_std"] == pytest.approx(0.2 * spread[name]["true_std"])
    noise = diagnose.pose_spread({"R": rng.normal(size=(200, 6)), "true": true})
    assert all(abs(v["correlation"]) < 0.3 for v in noise.values())
    constant = diagnose.pose_spread({"R": np.zeros((200, 6)), "true": true})
    assert all(v["R_std"] == 0 and np.isnan(v["correlation"]) for v in constant.values())


# ---------------------------------------------------------------------------- a tiny run

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished tiny FOCUS run (init, em, prior) and a finished tiny MoFA run."""
    root = tmp_path_factory.mktemp("runs")
    focus_dir, mofa_dir = str(root / "tiny"), str(root / "tiny-mofa")
    train.run("all", focus_dir, config.make_config("tiny"))
    train.run("init", mofa_dir, config.make_config("tiny", variant="mofa"))
    train.run("em", mofa_dir, None)
    return focus_dir, mofa_dir


def test_methods_of_runs(tiny_run):
    focus_dir, mofa_dir = tiny_run
    labels = [m.label for m in evaluate.methods_of_run(focus_dir)]
    assert labels == ["FOCUS", "Skin detector", "Whole region", "Residual, oracle xi",
                      "Pretrained", "M_pre"]
    assert [m.label for m in evaluate.methods_of_run(mofa_dir)] == ["MoFA"]
    assert evaluate.find_prior([mofa_dir, focus_dir]).endswith("misfit_prior.pt")


def test_evaluate_runs_writes_tables_json_and_figures(tiny_run, tmp_path):
    focus_dir, mofa_dir = tiny_run
    out = str(tmp_path / "results")
    evaluate.main(["--run", focus_dir, mofa_dir, "--count", "2", "--subsets", "unoccluded",
                   "scarf", "--out", out])
    for name in ("tables.md", "results.json", "per_subset.png", "qualitative.png",
                 "misfit_prior.png", "em_progress.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    with open(os.path.join(out, "results.json")) as f:
        result = json.load(f)
    rows = result["rows"]
    assert list(rows) == ["MoFA", "Skin detector", "Whole region", "Residual, oracle xi", "M_pre",
                          "Pretrained", "FOCUS"]
    assert rows["Residual, oracle xi"]["xi"] > 0
    # the whole-region mask keeps every rendered pixel: recall 1 wherever there is face
    assert rows["Whole region"]["overall"]["TPR"]["mean"] == pytest.approx(1.0)
    assert "F1" not in rows["MoFA"]["overall"] and "shape_mp_vertex" in rows["MoFA"]["overall"]
    assert rows["FOCUS"]["overall"]["shape_vertex"]["n"] == 4 * face_models.load_face_model(
        "toy,resolution=24").num_vertices
    assert set(result["misfit_prior_t_test"]) == {"MoFA", "FOCUS"}
    with open(os.path.join(out, "tables.md")) as f:
        tables = f.read()
    assert "| FOCUS-MP |" in tables and "Tab. 4" in tables


def test_evaluation_reproduces(tiny_run, tmp_path):
    focus_dir, _ = tiny_run
    results = []
    for name in ("a", "b"):
        evaluate.main(["--run", focus_dir, "--count", "2", "--subsets", "hand", "--out",
                       str(tmp_path / name), "--no-figures"])
        with open(tmp_path / name / "results.json") as f:
            rows = json.load(f)["rows"]
        results.append({label: {k: v for k, v in row["hand"].items()} for label, row in rows.items()})
    assert results[0] == results[1]


def test_evaluate_rejects_unfinished_and_missing_runs(tiny_run, tmp_path, capsys):
    with pytest.raises(SystemExit):
        evaluate.main(["--run", str(tmp_path / "nothing")])
    assert "no such run directory" in capsys.readouterr().err
    half = str(tmp_path / "half")
    train.run("init", half, config.make_config("tiny"))
    with pytest.raises(SystemExit, match="stage em is not finished"):
        evaluate.main(["--run", half, "--count", "2"])


def test_export_writes_meshes_masks_and_reconstructions(tiny_run, tmp_path):
    focus_dir, _ = tiny_run
    folder = tmp_path / "photos"
    folder.mkdir()
    faces = data.SyntheticFaces(face_model="toy,resolution=24", size=96, length=2, seed=9)
    lines = []
    for i in range(2):
        sample = faces[i]
        figures.save_png(sample["image"], str(folder / f"face{i}.png"))
        lines.append(",".join([f"face{i}.png"] + [f"{v:.2f}" for v in
                                                   sample["landmarks"].reshape(-1).tolist()]))
    (folder / "landmarks.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "export"
    evaluate.main(["export", "--run", focus_dir, "--images", str(folder), "--out", str(out)])
    model = face_models.load_face_model("toy,resolution=24")
    for i in range(2):
        assert (out / f"face{i}_mask.png").exists() and (out / f"face{i}_recon.png").exists()
        obj = (out / f"face{i}.obj").read_text().splitlines()
        vertices = [l for l in obj if l.startswith("v ")]
        assert len(vertices) == model.num_vertices and len(vertices[0].split()) == 7  # xyz rgb
    with pytest.raises(SystemExit, match="not found"):
        evaluate.main(["export", "--run", focus_dir, "--images", str(tmp_path / "none"),
                       "--out", str(out)])


def test_fitting_comparison_rows(tiny_run, tmp_path, capsys):
    focus_dir, mofa_dir = tiny_run
    out = tmp_path / "fitting"
    evaluate.main(["fitting", "--run", focus_dir, "--count", "2", "--subsets", "unoccluded",
                   "scarf", "--steps", "3", "--landmark-steps", "2", "--out", str(out)])
    with open(out / "fitting.json") as f:
        rows = json.load(f)
    assert list(rows) == ["FOCUS (one forward pass)", "fit, plain (every pixel)",
                          "fit, robust (per-image EM)", "fit, FOCUS segmenter masks"]
    # plain fitting keeps every rendered pixel: recall 1
    assert rows["fit, plain (every pixel)"]["overall"]["TPR"]["mean"] == pytest.approx(1.0)
    assert all(r["seconds_per_image"] > 0 for r in rows.values())
    assert "| fit, robust (per-image EM) |" in (out / "fitting.md").read_text()
    with pytest.raises(SystemExit, match="no segmenter"):
        evaluate.main(["fitting", "--run", mofa_dir])


def test_sweep_plots_one_eta_at_a_time(tiny_run, tmp_path):
    focus_dir, _ = tiny_run
    dirs = {}
    for name, overrides in (("ref", {}), ("area", {"eta_area": 2.0}), ("bin", {"eta_bin": 3.0}),
                            ("window", {"nbr_size": 5})):
        dirs[name] = str(tmp_path / name)
        train.run("em", dirs[name], config.make_config("tiny", **overrides), init_from=focus_dir)
    out = tmp_path / "sweep"
    evaluate.main(["sweep", "--run", dirs["ref"], dirs["area"], dirs["bin"], "--count", "2",
                   "--subsets", "scarf", "--out", str(out)])
    points = json.loads((out / "sweep.json").read_text())
    assert [(p["eta"], p["value"], p["reference"]) for p in points] == [
        ("eta_area", 2.0, False), ("eta_area", 4.0, True), ("eta_bin", 1.0, True),
        ("eta_bin", 3.0, False)]
    assert all(0 <= p["occluded"] <= 1 for p in points if p["occluded"] == p["occluded"])
    assert (out / "sweep.png").stat().st_size > 0
    with pytest.raises(SystemExit, match="one of"):
        evaluate.main(["sweep", "--run", dirs["ref"], dirs["area"], dirs["window"], "--count", "2",
                       "--subsets", "scarf", "--out", str(out)])


def test_oracle_xi_is_the_best_threshold_of_its_grid(tiny_run):
    focus_dir, _ = tiny_run
    cfg, autoencoder, _ = runs.load_models(focus_dir)
    sets = evaluate.test_sets(autoencoder.face_model, cfg.image_size, 3, subsets=("scarf", "hand"))
    grid = (0.01, 0.1, 1.0)
    method = evaluate.Method("Residual, oracle xi", focus_dir, "em", "oracle")
    best = evaluate.oracle_xi(method, sets, (cfg, autoencoder, None), grid=grid)
    mean_f1 = {}
    for xi in grid:  # the same score, one threshold at a time
        values = []
        for faces in sets.values():
            with torch.no_grad():
                out = autoencoder(faces["image"])
            mask = evaluate.losses.preliminary_mask(faces["image"], out.image, out.region, xi=xi)
            values.append(evaluate.segmentation_scores(mask, faces["visible_face"],
                                                       out.region)["F1"])
        mean_f1[xi] = float(np.nanmean(torch.cat(values).numpy()))
    assert best in grid and mean_f1[best] == max(mean_f1.values())


def test_diagnose_cli_writes_markdown_and_json(tiny_run, tmp_path, capsys):
    focus_dir, _ = tiny_run
    out = tmp_path / "diagnosis"
    diagnose.main(["--run", focus_dir, "--stage", "init", "--count", "2",
                   "--out", str(out)])
    printed = capsys.readouterr().out
    assert "wrote" in printed and "diagnosis.md" in printed
    markdown = (out / "diagnosis.md").read_text()
    assert markdown.startswith(f"## Diagnosis of R: {focus_dir} (init), 2 faces per subset, "
                               f"seed {config.EVAL_SEED}")
    assert "### unoccluded" in markdown and "### random" in markdown
    result = json.loads((out / "diagnosis.json").read_text())
    assert result["run"] == focus_dir and result["stage"] == "init" and result["count"] == 2
    assert list(result["subsets"]) == ["unoccluded", "random"]
    numbers = result["subsets"]["random"]
    assert set(numbers) == {"rmse", "errors", "landmarks_px", "shape", "f1", "pose",
                            "loss_towards_truth"}
    assert set(numbers["pose"]) == set(diagnose.POSE_NAMES)
    # --validation: other faces, named in the header and the JSON
    diagnose.main(["--run", focus_dir, "--stage", "init", "--count", "2",
                   "--out", str(out), "--validation"])
    validation = json.loads((out / "diagnosis.json").read_text())
    assert validation["seed"] == config.VALIDATION_SEED != result["seed"]
    assert validation["subsets"]["random"]["rmse"] != numbers["rmse"]
    assert f"seed {config.VALIDATION_SEED}" in (out / "diagnosis.md").read_text()
    assert all(math.isfinite(v) for v in numbers["rmse"].values())
    assert set(numbers["rmse"]) == {"predicted", "true", *(f"{g} true" for g in diagnose.GROUPS),
                                    *(f"only {g} predicted" for g in diagnose.GROUPS)}
    diagnose.main(["--run", focus_dir, "--stage", "prior", "--count", "1",
                   "--subsets", "hand", "--out", str(out)])
    assert list(json.loads((out / "diagnosis.json").read_text())["subsets"]) == ["hand"]


def test_diagnose_cli_errors(tiny_run, tmp_path, capsys):
    with pytest.raises(SystemExit, match="no config.json"):
        diagnose.main(["--run", str(tmp_path / "nothing"), "--out",
                       str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    half = str(tmp_path / "half")
    train.run("init", half, config.make_config("tiny"))
    with pytest.raises(SystemExit, match="not finished|no checkpoint"):
        diagnose.main(["--run", half, "--stage", "em", "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit) as exit_info:
        diagnose.main(["--run", tiny_run[0], "--count", "0"])
    assert exit_info.value.code == 2 and "--count must be >= 1" in capsys.readouterr().err
