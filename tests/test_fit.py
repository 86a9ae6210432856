"""Tests of fit.py: per-image analysis-by-synthesis recovers a synthetic face, and the robust
mode's per-image EM masks out an occluder that drags the plain fit."""
import pytest
import torch

import bfm
import fit

SIZE = 96


@pytest.fixture(scope="module")
def scene():
    """A random toy face with known theta, and the same image with a blue occluder."""
    model = bfm.load_face_model("toy")
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
    fitted = fit.composite(result.rendered, image)
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
