"""Tests of losses.py: a slow reference for L_nbr, hypothesis properties of values, masks and
gradient signs, float64 gradcheck of every loss, empty masks and regions, the preliminary mask,
the monochromatic-light prior L_mono, the two weighted sums, shapes and bad input.

Run: python -m pytest -q tests/test_losses.py
"""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import losses

DOUBLE = torch.float64
seeds = st.integers(min_value=0, max_value=2**31 - 1)
sides = st.integers(min_value=1, max_value=7)


def make_inputs(seed, B=2, C=3, H=5, W=6, dtype=DOUBLE, region_p=0.7):
    """Random images in [0, 1], a soft mask and a binary region."""
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(B, C, H, W, generator=g, dtype=dtype)
    rendered = torch.rand(B, C, H, W, generator=g, dtype=dtype)
    mask = torch.rand(B, 1, H, W, generator=g, dtype=dtype)
    region = (torch.rand(B, 1, H, W, generator=g, dtype=dtype) < region_p).to(dtype)
    return target, rendered, mask, region


def neighbor_reference(target, rendered, mask, region, size, normalize):
    """Supp. Eq. 12 pixel by pixel: obviously correct, slow."""
    B, C, H, W = target.shape
    r = size // 2
    per_image = []
    for b in range(B):
        total = 0.0
        for y in range(H):
            for x in range(W):
                if region[b, 0, y, x] <= 0.5:
                    continue
                best = math.inf
                for yy in range(y - r, y + r + 1):
                    for xx in range(x - r, x + r + 1):
                        if 0 <= yy < H and 0 <= xx < W and region[b, 0, yy, xx] > 0.5:
                            diff = target[b, :, y, x] - rendered[b, :, yy, xx]
                            best = min(best, float((diff * diff).sum()))
                total += float(mask[b, 0, y, x]) * best
        count = float((region[b] > 0.5).sum())
        per_image.append(total / max(count, 1.0) if normalize == "region" else total / (H * W))
    return sum(per_image) / B


def masked_pixel_error(target, rendered, mask, region):
    """sum_x M R ||I_T - I_R||^2 / S_R per image, batch mean (L_nbr's reduction, no search)."""
    inside = (region > 0.5).to(target.dtype)
    err = (mask * inside * (target - rendered).pow(2).sum(1, keepdim=True)).sum((1, 2, 3))
    return (err / inside.sum((1, 2, 3)).clamp_min(1)).mean()


def smooth_features(images):
    """A smooth stand-in for F: (B, 4, 2) features that depend on colour and position."""
    B, C, H, W = images.shape
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(4, C, generator=g, dtype=images.dtype)
    ramp = torch.linspace(-1.0, 1.0, H * W, dtype=images.dtype).reshape(H, W)
    maps = torch.tanh(torch.einsum("oc,bchw->bohw", weight, images)) + 0.5  # (B, 4, H, W)
    return torch.stack([maps.mean(dim=(2, 3)), (maps * ramp).mean(dim=(2, 3))], dim=-1)


# ----------------------------------------------------------------------------------------------
# L_nbr
# ----------------------------------------------------------------------------------------------

@given(seed=seeds, H=sides, W=sides, size=st.sampled_from([1, 3, 5]),
       normalize=st.sampled_from(["region", "image"]), region_p=st.sampled_from([0.0, 0.5, 1.0]))
def test_neighbor_matches_slow_reference(seed, H, W, size, normalize, region_p):
    target, rendered, mask, region = make_inputs(seed, H=H, W=W, region_p=region_p)
    fast = losses.neighbor_loss(target, rendered, mask, region, size=size, normalize=normalize)
    slow = neighbor_reference(target, rendered, mask, region, size, normalize)
    assert fast.shape == ()
    assert fast.item() == pytest.approx(slow, rel=1e-10, abs=1e-12)


@given(seed=seeds, H=sides, W=sides)
def test_neighbor_of_identical_images_is_zero(seed, H, W):
    target, _, mask, region = make_inputs(seed, H=H, W=W)
    assert losses.neighbor_loss(target, target.clone(), mask, region).item() == 0.0


@given(seed=seeds, H=sides, W=sides)
def test_neighbor_at_most_masked_pixel_error(seed, H, W):
    target, rendered, mask, region = make_inputs(seed, H=H, W=W)
    nbr3 = losses.neighbor_loss(target, rendered, mask, region, size=3)
    nbr5 = losses.neighbor_loss(target, rendered, mask, region, size=5)
    pixel = masked_pixel_error(target, rendered, mask, region)
    assert nbr5 <= nbr3 + 1e-12
    assert nbr3 <= pixel + 1e-12
    # N(x) = {x}: Eq. 1 reduces to the masked pixel error (the 'Baseline' ablation)
    assert losses.neighbor_loss(target, rendered, mask, region, size=1).item() == pytest.approx(
        pixel.item(), rel=1e-12, abs=1e-15)


@given(seed=seeds, H=st.integers(3, 8), W=st.integers(3, 8),
       shift=st.sampled_from([(0, 1), (1, 0), (0, -1), (-1, 0), (1, 1), (-1, 1)]))
def test_neighbor_is_zero_for_one_pixel_shift(seed, H, W, shift):
    _, rendered, mask, _ = make_inputs(seed, H=H, W=W)
    # I_T(x) = I_R(x + shift)
    target = torch.roll(rendered, shifts=(-shift[0], -shift[1]), dims=(2, 3))
    border = torch.zeros_like(mask)
    border[:, :, 1:-1, 1:-1] = 1.0
    region = torch.ones_like(mask)
    assert losses.neighbor_loss(target, rendered, mask * border, region, size=3).item() == 0.0


def test_neighbor_searches_only_rendered_pixels():
    rendered = torch.zeros(1, 3, 1, 3, dtype=DOUBLE)
    rendered[0, :, 0, 0] = 1.0
    target = torch.ones(1, 3, 1, 3, dtype=DOUBLE)
    mask = torch.tensor([[[[0.0, 1.0, 0.0]]]], dtype=DOUBLE)
    # x = 1 has the matching colour at x' = 0: found when rendered, ignored when not
    region = torch.ones(1, 1, 1, 3, dtype=DOUBLE)
    assert losses.neighbor_loss(target, rendered, mask, region).item() == 0.0
    region[0, 0, 0, 0] = 0.0
    assert losses.neighbor_loss(target, rendered, mask, region).item() == pytest.approx(3.0 / 2)


@given(seed=seeds, normalize=st.sampled_from(["region", "image"]))
def test_neighbor_gradient_in_mask_is_nonnegative(seed, normalize):
    target, rendered, mask, region = make_inputs(seed)
    mask.requires_grad_(True)
    losses.neighbor_loss(target, rendered, mask, region, normalize=normalize).backward()
    assert (mask.grad >= 0).all()
    # pixels outside the rendered region get no gradient
    assert (mask.grad[region == 0] == 0).all()


@given(seed=seeds, H=st.integers(2, 8), W=st.integers(2, 8))
def test_region_normalisation_sets_the_keep_threshold(seed, H, W):
    """d(eta_1 L_nbr + eta_3 L_area)/dM(x) = (eta_1 d(x) - eta_3) / (B S_R) at any crop."""
    target, rendered, mask, region = make_inputs(seed, B=1, H=H, W=W, region_p=1.0)
    mask.requires_grad_(True)
    eta_nbr, eta_area = 15.0, 0.5
    loss = eta_nbr * losses.neighbor_loss(target, rendered, mask, region, size=1) \
        + eta_area * losses.area_loss(mask, region)
    loss.backward()
    residual = (target - rendered).pow(2).sum(1, keepdim=True)
    expected = (eta_nbr * residual - eta_area) / region.sum()
    assert torch.allclose(mask.grad, expected)


# ----------------------------------------------------------------------------------------------
# L_area, L_bin
# ----------------------------------------------------------------------------------------------

@given(seed=seeds, grow=st.floats(0.0, 1.0), region_p=st.sampled_from([0.0, 0.3, 1.0]))
def test_area_in_range_and_nonincreasing_as_mask_grows(seed, grow, region_p):
    _, _, mask, region = make_inputs(seed, region_p=region_p)
    bigger = mask + grow * (1 - mask)
    small, large = losses.area_loss(mask, region), losses.area_loss(bigger, region)
    assert -1.0 <= large <= small <= 0.0
    # a full mask keeps every rendered pixel: -1 per image, 0 for an empty region
    rendered_images = (region.sum((1, 2, 3)) > 0).to(DOUBLE).mean()
    assert losses.area_loss(torch.ones_like(mask), region).item() == -rendered_images.item()
    assert losses.area_loss(torch.zeros_like(mask), region).item() == 0.0


@given(seed=seeds)
def test_area_gradient_in_mask_is_nonpositive(seed):
    _, _, mask, region = make_inputs(seed)
    mask.requires_grad_(True)
    losses.area_loss(mask, region).backward()
    assert (mask.grad <= 0).all()


def test_area_is_per_image_ratio_then_batch_mean():
    mask = torch.zeros(2, 1, 4, 4)
    mask[0, :, 0, :2] = 1.0         # image 0: 2 of 8 rendered pixels kept
    mask[1, :, 0, 0] = 0.5          # image 1: half of its one rendered pixel kept
    region = torch.zeros(2, 1, 4, 4)
    region[0, :, :2] = 1.0
    region[1, :, 0, 0] = 1.0
    assert losses.area_loss(mask, region).item() == pytest.approx(-(2 / 8 + 0.5) / 2)


@given(seed=seeds, form=st.sampled_from(["paper", "official"]), use_region=st.booleans())
def test_binary_largest_at_half_smallest_on_binary_masks(seed, form, use_region):
    _, _, mask, region = make_inputs(seed, region_p=1.0)
    region = region if use_region else None
    half = losses.binary_loss(torch.full_like(mask, 0.5), region, form=form)
    hard = losses.binary_loss((mask > 0.5).to(mask.dtype), region, form=form)
    soft = losses.binary_loss(mask, region, form=form)
    top, bottom = (0.0, -0.25) if form == "paper" else (0.5, 0.0)
    assert half.item() == pytest.approx(top)
    assert hard.item() == pytest.approx(bottom)
    assert bottom <= soft.item() <= top


def test_binary_averages_over_rendered_pixels():
    mask = torch.zeros(1, 1, 2, 2)
    mask[0, 0, 0, 0] = 0.5
    region = torch.zeros(1, 1, 2, 2)
    region[0, 0, 0] = 1.0
    assert losses.binary_loss(mask, region).item() == pytest.approx(-0.125)
    assert losses.binary_loss(mask).item() == pytest.approx(-0.1875)
    assert losses.binary_loss(mask, region, form="official").item() == pytest.approx(0.25)


# ----------------------------------------------------------------------------------------------
# cosine distance, L_dist, L_presv, L_per
# ----------------------------------------------------------------------------------------------

@given(seed=seeds, shape=st.sampled_from([(3, 5), (2, 4, 3, 3), (1, 2, 7)]),
       per_location=st.booleans(), scale=st.floats(0.01, 100.0))
def test_cosine_distance_range_and_identity(seed, shape, per_location, scale):
    if per_location and len(shape) < 3:
        shape = shape + (2,)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=DOUBLE)
    y = torch.randn(shape, generator=g, dtype=DOUBLE)
    d = losses.cosine_distance(x, y, per_location=per_location)
    assert d.shape == (shape[0],)
    assert ((d >= -1e-12) & (d <= 2 + 1e-12)).all()
    assert torch.allclose(d, losses.cosine_distance(y, x, per_location=per_location))
    same = losses.cosine_distance(x, scale * x, per_location=per_location)
    assert torch.allclose(same, torch.zeros_like(same), atol=1e-12)
    opposite = losses.cosine_distance(x, -x, per_location=per_location)
    assert torch.allclose(opposite, torch.full_like(opposite, 2.0))


def test_cosine_distance_per_location_is_mean_over_locations():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 3, 4, generator=g, dtype=DOUBLE)
    y = torch.randn(2, 5, 3, 4, generator=g, dtype=DOUBLE)
    cos = torch.nn.functional.cosine_similarity(x, y, dim=1)
    expected = (1 - cos).mean(dim=(1, 2))
    assert torch.allclose(losses.cosine_distance(x, y, per_location=True), expected)
    flat = 1 - torch.nn.functional.cosine_similarity(x.flatten(1), y.flatten(1), dim=1)
    assert torch.allclose(losses.cosine_distance(x, y), flat)


@given(seed=seeds, per_location=st.booleans())
def test_perceptual_losses_are_batch_means(seed, per_location):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(2, 3, 4, 2, 2, generator=g, dtype=DOUBLE)
    expected = losses.cosine_distance(a, b, per_location=per_location).mean()
    for loss in (losses.dist_loss, losses.preserve_loss, losses.perceptual_loss):
        value = loss(a, b, per_location=per_location)
        assert value.shape == ()
        assert value.item() == pytest.approx(expected.item())


def test_cosine_distance_of_zero_features_is_one_with_finite_gradient():
    x = torch.zeros(2, 8, dtype=DOUBLE, requires_grad=True)
    y = torch.randn(2, 8, dtype=DOUBLE)
    d = losses.cosine_distance(x, y)
    d.sum().backward()
    assert torch.allclose(d, torch.ones(2, dtype=DOUBLE))
    assert torch.isfinite(x.grad).all()


# ----------------------------------------------------------------------------------------------
# L_pixel, L_lm, L_reg
# ----------------------------------------------------------------------------------------------

@given(seed=seeds, form=st.sampled_from(["paper", "official"]))
def test_pixel_ignores_target_where_mask_is_zero(seed, form):
    target, rendered, mask, region = make_inputs(seed)
    mask = mask * region
    changed = torch.where(mask == 0, torch.rand_like(target) * 5 - 2, target)
    assert losses.pixel_loss(target, rendered, mask, form=form) == \
        losses.pixel_loss(changed, rendered, mask, form=form)


def test_pixel_value_is_pooled_mean_over_kept_pixels():
    target = torch.zeros(2, 3, 1, 2)
    rendered = torch.zeros(2, 3, 1, 2)
    rendered[0, :, 0, 0] = 1.0      # squared distance 3, distance sqrt(3)
    rendered[1, 0, 0, 1] = 2.0      # squared distance 4, distance 2
    mask = torch.tensor([[[[1.0, 0.0]]], [[[1.0, 1.0]]]])
    assert losses.pixel_loss(target, rendered, mask).item() == pytest.approx(7 / 3)
    assert losses.pixel_loss(target, rendered, mask, form="official").item() == pytest.approx(
        (math.sqrt(3) + 2) / 3)


def test_landmark_weights_and_value():
    w = losses.landmark_weights()
    assert w.shape == (68,)
    assert set(torch.nonzero(w == 20).flatten().tolist()) == {28, 29, 30, *range(60, 68)}
    assert (w[w != 20] == 1).all()
    lm_t = torch.zeros(2, 68, 2)
    lm_p = torch.zeros(2, 68, 2)
    lm_p[0, 29] = torch.tensor([3.0, 4.0])   # weight 20, squared distance 25
    lm_p[1, 0] = torch.tensor([1.0, 0.0])    # weight 1, squared distance 1
    expected = (20 * 25 / 68 + 1 / 68) / 2
    assert losses.landmark_loss(lm_t, lm_p, w).item() == pytest.approx(expected)
    assert losses.landmark_loss(lm_t, lm_p, w.expand(2, 68)).item() == pytest.approx(expected)


def test_regularization_is_mean_of_squares():
    a = torch.full((2, 80), 1.0)
    b = torch.full((2, 64), 2.0)
    c = torch.zeros(2, 80)
    assert losses.regularization(a, b, c).item() == pytest.approx((80 + 64 * 4) / 224)
    assert losses.regularization(b).item() == pytest.approx(4.0)


# ----------------------------------------------------------------------------------------------
# L_mono
# ----------------------------------------------------------------------------------------------

def light_colour_reference(sh):
    """L_mono coefficient by coefficient in Python floats: obviously correct, slow."""
    B = sh.shape[0]
    total = 0.0
    for b in range(B):
        for k in range(9):
            channels = [float(sh[b, c * 9 + k]) for c in range(3)]  # phi_0k, phi_1k, phi_2k
            mean = sum(channels) / 3
            total += sum((x - mean) ** 2 for x in channels) / 27
    return total / B


def grey_light(seed, B, brightness):
    """(B, 27) light whose three channels are equal: white light of a random direction."""
    g = torch.Generator().manual_seed(seed)
    grey = brightness * torch.randn(B, 1, 9, generator=g, dtype=DOUBLE)  # (B, 1, 9)
    return grey.expand(B, 3, 9).reshape(B, 27)


@given(seed=seeds, B=st.integers(1, 4), brightness=st.floats(0.0, 100.0))
def test_light_colour_is_zero_for_white_light(seed, B, brightness):
    sh = grey_light(seed, B, brightness)
    value = losses.light_colour_loss(sh)
    assert value.shape == ()
    assert value.item() == pytest.approx(0.0, abs=1e-20 * (1 + brightness ** 2))
    # an ambient offset equal in every channel (the renderer's) does not change it either
    offset = torch.zeros(B, 3, 9, dtype=DOUBLE)
    offset[:, :, 0] = 4.4
    assert losses.light_colour_loss(sh + offset.view(B, 27)).item() == pytest.approx(
        0.0, abs=1e-20 * (1 + brightness ** 2) + 1e-28)


@given(seed=seeds, B=st.integers(1, 4), brightness=st.floats(0.0, 10.0))
def test_light_colour_ignores_any_added_white_light(seed, B, brightness):
    g = torch.Generator().manual_seed(seed + 1)
    sh = torch.randn(B, 27, generator=g, dtype=DOUBLE)
    white = grey_light(seed, B, brightness)
    assert losses.light_colour_loss(sh + white).item() == pytest.approx(
        losses.light_colour_loss(sh).item(), rel=1e-9, abs=1e-12)


@given(seed=seeds, B=st.integers(1, 4), tint=st.floats(0.05, 0.5), channel=st.integers(0, 2))
def test_light_colour_is_positive_for_a_tinted_light(seed, B, tint, channel):
    white = grey_light(seed, B, 1.0).view(B, 3, 9)
    gain = torch.ones(1, 3, 1, dtype=DOUBLE)
    gain[0, channel] += tint
    tinted = (white * gain).reshape(B, 27)  # one channel brighter: a coloured light
    assert losses.light_colour_loss(tinted).item() > 0
    # and more tint costs more
    gain[0, channel] += tint
    assert losses.light_colour_loss((white * gain).reshape(B, 27)) > \
        losses.light_colour_loss(tinted)


@given(seed=seeds, B=st.integers(1, 4), scale=st.sampled_from([0.01, 1.0, 30.0]))
def test_light_colour_matches_slow_reference(seed, B, scale):
    g = torch.Generator().manual_seed(seed)
    sh = scale * torch.randn(B, 27, generator=g, dtype=DOUBLE)
    assert losses.light_colour_loss(sh).item() == pytest.approx(light_colour_reference(sh),
                                                                rel=1e-10, abs=1e-15)


def test_light_colour_hand_example_and_layout():
    # phi laid out (3 channels, 9): red phi_0 = 3, everything else 0
    sh = torch.zeros(2, 27)
    sh[0, 0] = 3.0
    # channels (3, 0, 0) of one coefficient: spread (2, -1, -1), 6 / 27 for image 0, 0 for 1
    assert losses.light_colour_loss(sh).item() == pytest.approx(6 / 27 / 2)
    # the layout is (3 channels, 9), not (9, 3): equal first three entries are not grey
    grey_in_wrong_layout = torch.zeros(1, 27)
    grey_in_wrong_layout[0, :3] = 1.0  # phi_00, phi_01, phi_02: three coefficients of red
    assert losses.light_colour_loss(grey_in_wrong_layout).item() > 0
    grey = torch.zeros(1, 27)
    grey[0, [0, 9, 18]] = 1.0  # phi_0 of red, green and blue
    assert losses.light_colour_loss(grey).item() == 0.0
    assert losses.light_colour_loss(sh.double()).dtype == DOUBLE
    assert losses.light_colour_loss(sh).dtype == torch.float32

# ----------------------------------------------------------------------------------------------
# L_light
# ----------------------------------------------------------------------------------------------

@given(seed=seeds, B=st.integers(1, 4))
def test_light_prior_is_zero_at_the_mean_and_counts_standard_deviations(seed, B):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(27, generator=g, dtype=DOUBLE)
    std = 0.1 + torch.rand(27, generator=g, dtype=DOUBLE)
    at_mean = mean.expand(B, 27)
    assert losses.light_prior_loss(at_mean, mean, std).item() == 0.0
    # k standard deviations off in every coefficient: k^2, whatever each std is
    for k in (1.0, 2.5):
        value = losses.light_prior_loss(at_mean + k * std, mean, std)
        assert value.item() == pytest.approx(k ** 2, rel=1e-12)
    # one coefficient 3 std off in one image of B: 9 / 27 / B
    off = at_mean.clone()
    off[0, 5] += 3 * std[5]
    assert losses.light_prior_loss(off, mean, std).item() == pytest.approx(9 / 27 / B, rel=1e-12)


def test_light_prior_gradcheck_and_bad_input():
    g = torch.Generator().manual_seed(2)
    sh, mean = torch.randn(2, 2, 27, generator=g, dtype=DOUBLE)
    std = 0.5 + torch.rand(27, generator=g, dtype=DOUBLE)
    assert torch.autograd.gradcheck(lambda s: losses.light_prior_loss(s, mean[0], std), (leaf(sh),))
    with pytest.raises(ValueError, match="27"):
        losses.light_prior_loss(sh[:, :9], mean[0], std)


# ----------------------------------------------------------------------------------------------
# float64 gradcheck of every loss (random inputs: no min ties, no |M - 0.5| = 0)
# ----------------------------------------------------------------------------------------------

def leaf(x):
    return x.detach().clone().requires_grad_(True)


@pytest.mark.parametrize("size", [1, 3, 5])
@pytest.mark.parametrize("normalize", ["region", "image"])
def test_gradcheck_neighbor(size, normalize):
    target, rendered, mask, region = make_inputs(3, H=4, W=5)
    fn = lambda t, r, m: losses.neighbor_loss(t, r, m, region, size=size, normalize=normalize)
    assert torch.autograd.gradcheck(fn, (leaf(target), leaf(rendered), leaf(mask)))


def test_gradcheck_area_and_binary():
    _, _, mask, region = make_inputs(4, H=4, W=4)
    mask = 0.5 + 0.4 * torch.sign(mask - 0.5) * (0.1 + (mask - 0.5).abs())
    assert torch.autograd.gradcheck(lambda m: losses.area_loss(m, region), (leaf(mask),))
    for form in ("paper", "official"):
        for reg in (None, region):
            fn = lambda m: losses.binary_loss(m, reg, form=form)
            assert torch.autograd.gradcheck(fn, (leaf(mask),))


@pytest.mark.parametrize("per_location", [False, True])
def test_gradcheck_cosine_losses(per_location):
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(2, 2, 3, 2, 2, generator=g, dtype=DOUBLE)
    for loss in (losses.dist_loss, losses.preserve_loss, losses.perceptual_loss):
        fn = lambda x, y: loss(x, y, per_location=per_location)
        assert torch.autograd.gradcheck(fn, (leaf(a), leaf(b)))


@pytest.mark.parametrize("form", ["paper", "official"])
def test_gradcheck_pixel(form):
    target, rendered, mask, _ = make_inputs(6, H=3, W=4)
    fn = lambda t, r, m: losses.pixel_loss(t, r, m, form=form)
    assert torch.autograd.gradcheck(fn, (leaf(target), leaf(rendered), leaf(mask)))


def test_gradcheck_landmark_and_regularization():
    g = torch.Generator().manual_seed(7)
    lm_t, lm_p = torch.rand(2, 2, 68, 2, generator=g, dtype=DOUBLE) * 64
    w = losses.landmark_weights(dtype=DOUBLE)
    assert torch.autograd.gradcheck(lambda p: losses.landmark_loss(lm_t, p, w), (leaf(lm_p),))
    ids, exp = torch.randn(2, 5, generator=g, dtype=DOUBLE), torch.randn(2, 3, generator=g,
                                                                          dtype=DOUBLE)
    assert torch.autograd.gradcheck(losses.regularization, (leaf(ids), leaf(exp)))


def test_gradcheck_light_colour():
    g = torch.Generator().manual_seed(20)
    sh = torch.randn(3, 27, generator=g, dtype=DOUBLE)
    assert torch.autograd.gradcheck(losses.light_colour_loss, (leaf(sh),))
    # the gradient of a white light is zero: nothing pulls its brightness or direction
    white = leaf(grey_light(21, 2, 1.0))
    losses.light_colour_loss(white).backward()
    assert white.grad.abs().max() < 1e-12

def test_gradcheck_assembly():
    target, rendered, mask, region = make_inputs(8, H=3, W=3)
    seg = lambda r, m: losses.segmenter_loss(target, r, m, region, features=smooth_features)[0]
    assert torch.autograd.gradcheck(seg, (leaf(rendered), leaf(mask)))
    g = torch.Generator().manual_seed(9)
    lm_t, lm_p = torch.rand(2, 2, 3, 2, generator=g, dtype=DOUBLE) * 4
    w = torch.tensor([1.0, 20.0, 1.0], dtype=DOUBLE)

    def auto(r, p, c):
        return losses.autoencoder_loss(target, r, mask, region, lm_target=lm_t, lm_pred=p,
                                       lm_weights=w, coefficients=(c,),
                                       features=smooth_features)[0]
    coeffs = torch.randn(2, 6, generator=g, dtype=DOUBLE)
    assert torch.autograd.gradcheck(auto, (leaf(rendered), leaf(lm_p), leaf(coeffs)))


# ----------------------------------------------------------------------------------------------
# empty masks and empty regions: finite values and gradients
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("empty", ["mask", "region", "both"])
def test_no_nan_or_inf_on_empty_mask_or_region(empty):
    target, rendered, mask, region = make_inputs(10)
    if empty in ("mask", "both"):
        mask = torch.zeros_like(mask)
    if empty in ("region", "both"):
        region = torch.zeros_like(region)
    t, r, m = leaf(target), leaf(rendered), leaf(mask)
    g = torch.Generator().manual_seed(11)
    lm = torch.rand(2, 68, 2, generator=g, dtype=DOUBLE)
    identity = lambda images: images  # zero features under an empty mask
    values = {
        "nbr3": losses.neighbor_loss(t, r, m, region),
        "nbr5_image": losses.neighbor_loss(t, r, m, region, size=5, normalize="image"),
        "area": losses.area_loss(m, region),
        "bin": losses.binary_loss(m, region),
        "bin_official": losses.binary_loss(m, region, form="official"),
        "pixel": losses.pixel_loss(t, r, m * region),
        "pixel_official": losses.pixel_loss(t, r, m * region, form="official"),
        "dist": losses.dist_loss(t * m * region, r * m * region),
        "presv": losses.preserve_loss(t * m * region, t),
        "seg": losses.segmenter_loss(t, r, m, region, features=identity)[0],
        "auto": losses.autoencoder_loss(t, r, m, region, lm_target=lm, lm_pred=lm,
                                        lm_weights=losses.landmark_weights(dtype=DOUBLE),
                                        coefficients=(lm[:, :, 0],), features=identity)[0],
    }
    for name, value in values.items():
        assert torch.isfinite(value), name
        grads = torch.autograd.grad(value, (t, r, m), allow_unused=True)
        assert all(gr is None or torch.isfinite(gr).all() for gr in grads), name
    # the defined values on an empty mask or region
    for name in ("nbr3", "nbr5_image", "area", "pixel", "pixel_official"):
        assert values[name].item() == 0.0, name
    if empty != "mask":
        assert values["bin"].item() == 0.0
        assert losses.preliminary_mask(target, rendered, region, xi=10.0).sum() == 0


def test_neighbor_with_rendered_pixels_without_rendered_neighbours_elsewhere():
    """A lone rendered pixel: every other pixel has no candidate (inf internally)."""
    target, rendered, mask, _ = make_inputs(12, H=5, W=5)
    region = torch.zeros_like(mask)
    region[:, :, 2, 2] = 1.0
    t, r, m = leaf(target), leaf(rendered), leaf(mask)
    value = losses.neighbor_loss(t, r, m, region, size=3)
    for grad in torch.autograd.grad(value, (t, r, m)):
        assert torch.isfinite(grad).all()
    lone = (mask[:, 0, 2, 2] * (target - rendered)[:, :, 2, 2].pow(2).sum(1)).mean()
    assert value.item() == pytest.approx(lone.item())


# ----------------------------------------------------------------------------------------------
# M_pre
# ----------------------------------------------------------------------------------------------

@given(seed=seeds, xi=st.sampled_from([0.17, losses.XI_OFFICIAL, 0.5]))
def test_preliminary_mask_is_one_exactly_under_xi_inside_region(seed, xi):
    target, rendered, _, region = make_inputs(seed)
    target.requires_grad_(True)
    pre = losses.preliminary_mask(target, rendered, region, xi=xi)
    residual = (target - rendered).pow(2).sum(1, keepdim=True)
    expected = ((residual < xi) & (region > 0.5)).to(DOUBLE)
    assert pre.shape == region.shape and pre.dtype == DOUBLE
    assert not pre.requires_grad
    assert torch.equal(pre, expected)


def test_preliminary_mask_threshold_is_strict_and_official_value():
    assert losses.XI_OFFICIAL == pytest.approx(0.016641)
    target = torch.zeros(1, 3, 1, 2)
    rendered = torch.zeros(1, 3, 1, 2)
    rendered[0, 0, 0, 1] = 0.5          # squared distance 0.25 = xi: not kept
    pre = losses.preliminary_mask(target, rendered, torch.ones(1, 1, 1, 2), xi=0.25)
    assert pre.flatten().tolist() == [1.0, 0.0]


# ----------------------------------------------------------------------------------------------
# the two weighted sums
# ----------------------------------------------------------------------------------------------

SEG_WEIGHTS = {"eta_nbr": "L_nbr", "eta_dist": "L_dist", "eta_area": "L_area",
               "eta_presv": "L_presv", "eta_bin": "L_bin"}
AUTO_WEIGHTS = {"lambda_pixel": "L_pixel", "lambda_per": "L_per", "lambda_lm": "L_lm",
                "lambda_reg": "L_reg"}
weight_values = st.floats(0.0, 20.0)


@given(seed=seeds, w=st.tuples(*[weight_values] * 5), use_features=st.booleans())
def test_segmenter_loss_is_weighted_sum(seed, w, use_features):
    target, rendered, mask, region = make_inputs(seed)
    weights = dict(zip(SEG_WEIGHTS, w))
    features = smooth_features if use_features else None
    total, terms = losses.segmenter_loss(target, rendered, mask, region, features=features,
                                         **weights)
    expected_keys = [k for k in losses.SEGMENTER_TERMS if use_features or k not in
                     ("L_dist", "L_presv")]
    assert list(terms) == expected_keys
    assert all(v.shape == () for v in terms.values())
    expected = sum(weights[k] * terms[SEG_WEIGHTS[k]] for k in weights if SEG_WEIGHTS[k] in terms)
    assert total.item() == pytest.approx(expected.item(), rel=1e-12, abs=1e-12)
    assert terms["L_nbr"] == losses.neighbor_loss(target, rendered, mask, region)
    assert terms["L_area"] == losses.area_loss(mask, region)
    assert terms["L_bin"] == losses.binary_loss(mask, region)
    if use_features:
        kept = mask * region
        assert terms["L_dist"] == losses.dist_loss(smooth_features(target * kept),
                                                   smooth_features(rendered * kept))
        assert terms["L_presv"] == losses.preserve_loss(smooth_features(target * kept),
                                                        smooth_features(target))


def test_segmenter_defaults_are_the_papers():
    target, rendered, mask, region = make_inputs(13)
    total, t = losses.segmenter_loss(target, rendered, mask, region, features=smooth_features)
    expected = 15 * t["L_nbr"] + 3 * t["L_dist"] + 0.5 * t["L_area"] + 2.5 * t["L_presv"] \
        + 10 * t["L_bin"]
    assert total.item() == pytest.approx(expected.item())


@pytest.mark.parametrize("name", list(SEG_WEIGHTS))
def test_segmenter_zero_weight_removes_term(name):
    target, rendered, mask, region = make_inputs(14)
    m_full, m_zero = leaf(mask), leaf(mask)
    full, terms = losses.segmenter_loss(target, rendered, m_full, region,
                                        features=smooth_features)
    zero, _ = losses.segmenter_loss(target, rendered, m_zero, region, features=smooth_features,
                                    **{name: 0.0})
    default = {"eta_nbr": 15.0, "eta_dist": 3.0, "eta_area": 0.5, "eta_presv": 2.5,
               "eta_bin": 10.0}[name]
    assert zero.item() == pytest.approx((full - default * terms[SEG_WEIGHTS[name]]).item())
    term_alone = torch.autograd.grad(terms[SEG_WEIGHTS[name]], m_full, retain_graph=True)[0]
    full.backward()
    zero.backward()
    assert torch.allclose(m_zero.grad, m_full.grad - default * term_alone)


def test_segmenter_ablations_are_values():
    target, rendered, mask, region = make_inputs(15)
    # 'Baseline': Eq. 5 in place of L_nbr
    _, terms = losses.segmenter_loss(target, rendered, mask, region, nbr_size=1)
    assert terms["L_nbr"].item() == pytest.approx(
        masked_pixel_error(target, rendered, mask, region).item())
    # official-style options pass through
    _, terms = losses.segmenter_loss(target, rendered, mask, region, nbr_size=5,
                                     nbr_normalize="image", bin_form="official")
    assert terms["L_nbr"] == losses.neighbor_loss(target, rendered, mask, region, size=5,
                                                  normalize="image")
    assert terms["L_bin"] == losses.binary_loss(mask, region, form="official")
    _, terms = losses.segmenter_loss(target, rendered, mask, region, features=smooth_features,
                                     per_location=True)
    kept = mask * region
    assert terms["L_dist"] == losses.dist_loss(smooth_features(target * kept),
                                               smooth_features(rendered * kept),
                                               per_location=True)


def auto_inputs(seed):
    target, rendered, mask, region = make_inputs(seed)
    g = torch.Generator().manual_seed(seed)
    lm_t, lm_p = torch.rand(2, 2, 68, 2, generator=g, dtype=DOUBLE) * 6
    coefficients = (torch.randn(2, 80, generator=g, dtype=DOUBLE),
                    torch.randn(2, 64, generator=g, dtype=DOUBLE))
    return target, rendered, mask, region, dict(
        lm_target=lm_t, lm_pred=lm_p, lm_weights=losses.landmark_weights(dtype=DOUBLE),
        coefficients=coefficients)


@given(seed=seeds, w=st.tuples(*[weight_values] * 4), use_features=st.booleans())
def test_autoencoder_loss_is_weighted_sum(seed, w, use_features):
    target, rendered, mask, region, kw = auto_inputs(seed)
    weights = dict(zip(AUTO_WEIGHTS, w))
    features = smooth_features if use_features else None
    total, terms = losses.autoencoder_loss(target, rendered, mask, region, features=features,
                                           **kw, **weights)
    # without sh there is no L_mono
    expected_keys = [k for k in losses.AUTOENCODER_TERMS if (use_features or k != "L_per")
                     and k not in ("L_mono", "L_distill")]
    assert list(terms) == expected_keys
    expected = sum(weights[k] * terms[AUTO_WEIGHTS[k]] for k in weights
                   if AUTO_WEIGHTS[k] in terms)
    assert total.item() == pytest.approx(expected.item(), rel=1e-12, abs=1e-12)
    assert terms["L_pixel"] == losses.pixel_loss(target, rendered, mask * region)
    assert terms["L_lm"] == losses.landmark_loss(kw["lm_target"], kw["lm_pred"],
                                                 kw["lm_weights"])
    assert terms["L_reg"] == losses.regularization(*kw["coefficients"])
    if use_features:
        assert terms["L_per"] == losses.perceptual_loss(smooth_features(target),
                                                        smooth_features(rendered))


@given(seed=seeds, lambda_mono=weight_values, use_features=st.booleans())
def test_autoencoder_loss_adds_weighted_mono_only_with_sh(seed, lambda_mono, use_features):
    target, rendered, mask, region, kw = auto_inputs(seed)
    features = smooth_features if use_features else None
    g = torch.Generator().manual_seed(seed)
    sh = leaf(torch.randn(2, 27, generator=g, dtype=DOUBLE))
    without, plain = losses.autoencoder_loss(target, rendered, mask, region, features=features,
                                             **kw, lambda_mono=lambda_mono)
    total, terms = losses.autoencoder_loss(target, rendered, mask, region, features=features,
                                           **kw, sh=sh, lambda_mono=lambda_mono)
    assert "L_mono" not in plain
    assert list(terms) == [k for k in losses.AUTOENCODER_TERMS if (use_features or k != "L_per")
                           and k != "L_distill"]
    assert terms["L_mono"] == losses.light_colour_loss(sh)
    assert all(terms[k] == v for k, v in plain.items())
    assert total.item() == pytest.approx((without + lambda_mono * terms["L_mono"]).item(),
                                         rel=1e-12, abs=1e-12)
    # sh reaches the loss through L_mono alone
    (grad,) = torch.autograd.grad(total, sh)
    (alone,) = torch.autograd.grad(lambda_mono * losses.light_colour_loss(sh), sh)
    assert torch.allclose(grad, alone)


def test_autoencoder_mono_weight_defaults_to_zero():
    target, rendered, mask, region, kw = auto_inputs(22)
    sh = torch.randn(2, 27, generator=torch.Generator().manual_seed(22), dtype=DOUBLE)
    without, _ = losses.autoencoder_loss(target, rendered, mask, region, **kw)
    total, terms = losses.autoencoder_loss(target, rendered, mask, region, **kw, sh=sh)
    assert terms["L_mono"] > 0  # logged ...
    assert total.item() == without.item()  # ... but not in L_R (not in the paper)

@pytest.mark.parametrize("name", list(AUTO_WEIGHTS))
def test_autoencoder_zero_weight_removes_term(name):
    target, rendered, mask, region, kw = auto_inputs(16)
    full, terms = losses.autoencoder_loss(target, rendered, mask, region,
                                          features=smooth_features, **kw)
    zero, _ = losses.autoencoder_loss(target, rendered, mask, region, features=smooth_features,
                                      **kw, **{name: 0.0})
    default = {"lambda_pixel": 0.5, "lambda_per": 0.25, "lambda_lm": 5e-4,
               "lambda_reg": 0.1}[name]
    assert zero.item() == pytest.approx((full - default * terms[AUTO_WEIGHTS[name]]).item())


def test_target_features_carry_no_gradient():
    target, rendered, mask, region = make_inputs(17)
    t = leaf(target)
    total, _ = losses.segmenter_loss(t, rendered, mask, region, features=smooth_features,
                                     eta_nbr=0.0, eta_area=0.0, eta_bin=0.0, eta_dist=0.0)
    # L_presv = cos(F(I_T * M), F(I_T)): only the masked branch reaches I_T
    (grad,) = torch.autograd.grad(total, t)
    masked_only = torch.autograd.grad(
        2.5 * losses.preserve_loss(smooth_features(t * mask * region),
                                   smooth_features(target)), t)[0]
    assert torch.allclose(grad, masked_only)


# ----------------------------------------------------------------------------------------------
# shapes and bad input
# ----------------------------------------------------------------------------------------------

def test_float32_shapes_and_dtypes():
    target, rendered, mask, region = make_inputs(18, dtype=torch.float32, H=6, W=7)
    for value in (losses.neighbor_loss(target, rendered, mask, region),
                  losses.area_loss(mask, region), losses.binary_loss(mask),
                  losses.pixel_loss(target, rendered, mask)):
        assert value.shape == () and value.dtype == torch.float32
    assert losses.preliminary_mask(target, rendered, region).shape == (2, 1, 6, 7)


def test_bad_input_raises_clear_errors():
    target, rendered, mask, region = make_inputs(19)
    with pytest.raises(ValueError, match="same shape"):
        losses.neighbor_loss(target, rendered[:, :, :-1], mask, region)
    with pytest.raises(ValueError, match="mask must have shape"):
        losses.neighbor_loss(target, rendered, mask[:, :, :-1], region)
    with pytest.raises(ValueError, match="region must have shape"):
        losses.area_loss(mask, region.expand(2, 3, -1, -1))
    with pytest.raises(ValueError, match="odd"):
        losses.neighbor_loss(target, rendered, mask, region, size=4)
    with pytest.raises(ValueError, match="normalize"):
        losses.neighbor_loss(target, rendered, mask, region, normalize="sum")
    with pytest.raises(ValueError, match="4 dimensions"):
        losses.pixel_loss(target[0], rendered[0], mask[0])
    with pytest.raises(ValueError, match="floating-point"):
        losses.binary_loss(mask.long())
    with pytest.raises(ValueError, match="form"):
        losses.binary_loss(mask, form="sum")
    with pytest.raises(ValueError, match="form"):
        losses.pixel_loss(target, rendered, mask, form="l1")
    with pytest.raises(TypeError, match="torch.Tensor"):
        losses.area_loss(mask.numpy(), region)
    with pytest.raises(ValueError, match="same shape"):
        losses.cosine_distance(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="at least 3"):
        losses.cosine_distance(torch.zeros(2, 3), torch.zeros(2, 3), per_location=True)
    with pytest.raises(ValueError, match=r"\(B, K, 2\)"):
        losses.landmark_loss(torch.zeros(2, 68, 3), torch.zeros(2, 68, 3), torch.ones(68))
    with pytest.raises(ValueError, match="weights"):
        losses.landmark_loss(torch.zeros(2, 68, 2), torch.zeros(2, 68, 2), torch.ones(5))
    with pytest.raises(ValueError, match="batch size"):
        losses.regularization(torch.zeros(2, 3), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="at least one"):
        losses.regularization()
    with pytest.raises(ValueError, match="region must have shape"):
        losses.preliminary_mask(target, rendered, region[:1])
    with pytest.raises(ValueError, match=r"sh must be \(B, 27\)"):
        losses.light_colour_loss(torch.zeros(2, 9))
    with pytest.raises(ValueError, match=r"sh must be \(B, 27\)"):
        losses.light_colour_loss(torch.zeros(2, 28))
    with pytest.raises(ValueError, match="2 dimensions"):
        losses.light_colour_loss(torch.zeros(27))
    with pytest.raises(ValueError, match="2 dimensions"):
        losses.light_colour_loss(torch.zeros(2, 3, 9))
    with pytest.raises(ValueError, match="floating-point"):
        losses.light_colour_loss(torch.zeros(2, 27, dtype=torch.long))
    with pytest.raises(TypeError, match="torch.Tensor"):
        losses.light_colour_loss(torch.zeros(2, 27).numpy())


@given(seed=seeds, lambda_distill=weight_values)
def test_autoencoder_loss_adds_weighted_distillation_only_when_given(seed, lambda_distill):
    target, rendered, mask, region, kw = auto_inputs(seed)
    g = torch.Generator().manual_seed(seed)
    theta = leaf(torch.randn(2, 257, generator=g, dtype=DOUBLE))
    refined = torch.randn(2, 257, generator=g, dtype=DOUBLE)
    scale = torch.ones(257, dtype=DOUBLE)
    without, plain = losses.autoencoder_loss(target, rendered, mask, region, **kw)
    total, terms = losses.autoencoder_loss(target, rendered, mask, region, **kw,
                                           distill=(theta, refined, scale),
                                           lambda_distill=lambda_distill)
    assert "L_distill" not in plain and list(terms)[-1] == "L_distill"
    assert terms["L_distill"] == losses.distillation_loss(theta, refined, scale)
    assert total.item() == pytest.approx((without + lambda_distill * terms["L_distill"]).item(),
                                         rel=1e-12, abs=1e-12)
