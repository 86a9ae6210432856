"""Every FOCUS loss as a pure function of tensors, the preliminary mask, and the two sums.

Paper map (Li et al., CVPR 2023; "Supp." is its supplement):

    function            symbol    paper                          trains
    neighbor_loss       L_nbr     Eq. 1 = Supp. Eq. 12           segmenter S
    dist_loss           L_dist    Eq. 2                          S
    area_loss           L_area    Eq. 3                          S
    preserve_loss       L_presv   Eq. 4                          S
    binary_loss         L_bin     Sec. 3.2, after Eq. 4          S
    pixel_loss          L_pixel   Eq. 5                          autoencoder R
    perceptual_loss     L_per     Eq. 6                          R
    landmark_loss       L_lm      Eq. 7                          R
    regularization      L_reg     Sec. 3.2, before Eq. 8         R
    light_colour_loss   L_mono    not in the paper (Deep3D)      R
    preliminary_mask    M_pre     Eq. 9-10 (Sec. 3.3)            initialisation
    image_rmse          RMSE      Tab. 1 (a metric, no loss)     evaluation
    segmenter_loss      L_S = eta_1 L_nbr + eta_2 L_dist + eta_3 L_area + eta_4 L_presv
                              + eta_5 L_bin                            (Sec. 3.2)
    autoencoder_loss    L_R = lambda_1 L_pixel + lambda_2 L_per + lambda_3 L_lm
                              + lambda_4 L_reg [+ lambda_mono L_mono]  (Eq. 8)

Conventions: images `(B, C, H, W)` in [0, 1] (C = 3 for RGB); masks `(B, 1, H, W)`. `mask` is
the segmenter's face mask M in [0, 1] (1 = face, 0 = outlier); `region` is the rendered-face
region S_R in {0, 1} from the rasterizer (it carries no gradient). A pixel counts as rendered
where `region > 0.5`. Landmarks are `(B, K, 2)` pixel coordinates. Features are whatever the
face-recognition network F returns, `(B, ...)`; this module never loads a network: the losses
take features, and the two sums take F as a callable.

Every loss returns an unweighted scalar. The loss weights (eta_1..5, lambda_1..4) appear only in
`segmenter_loss` and `autoencoder_loss`, as keyword arguments with the paper's defaults.

Reductions. The paper writes sums; its weights were tuned with means (the official code), so
every term here is a mean, computed per image and then averaged over the batch (L_pixel alone is
pooled over the batch, as in the official code and Deep3D). Each docstring states its reduction.

Balance of the segmenter's pixel terms. L_nbr and L_area are both normalised per rendered pixel
(divided by S_R), so for one rendered pixel x

    d(eta_1 L_nbr + eta_3 L_area) / dM(x) = (eta_1 d(x) - eta_3) / (B S_R),

where d(x) is the neighbour residual: the segmenter keeps x exactly when d(x) < eta_3 / eta_1
(= 1/30 with the paper's weights, an RGB distance of 0.18), whatever the crop or the face's share
of the image. Normalised per image pixel instead (`normalize="image"`, the official reduction)
the threshold becomes eta_3 H W / (eta_1 S_R), which moves with the face's share of the image
(0.12 at S_R / HW = 0.28). L_bin (mean over rendered pixels) adds -2 eta_5 (M(x) - 0.5) / (B S_R):
with eta_5 = 10 a pixel near M = 0 is pushed further down whatever d(x), and one near M = 1 stays
unless d(x) > 0.7, so the segmenter's starting point (pre-trained on M_pre) matters.

Deviations from the paper (each one is also written where it happens):
- Every sum is a mean (see Reductions). L_bin and L_nbr are means over the rendered pixels.
- L_nbr: the neighbourhood N(x) holds only rendered pixels (the rendered image has no model
  colour elsewhere). Official code: 5 x 5 (we default to the paper's 3 x 3, `size`), target
  searched around each rendered pixel, RGB distance not squared, both images multiplied by M,
  mean over all image pixels (`normalize="image"` gives that reduction).
- L_bin: official form 0.5 - mean |M - 0.5| (`form="official"`).
- L_pixel: official form is the RGB distance, not squared (`form="official"`).
- L_dist, L_presv, L_per: cosine distance of flattened features; the official code compares
  ArcFace's first residual stage per location (`per_location=True`).
- L_lm: mean over landmarks of the weighted squared distance (Deep3D); the official FOCUS code
  puts the weight inside the square (20^2 = 400 effective).
- L_reg: mean of squares over identity, expression and albedo coefficients (the official code's
  value exactly); the paper writes ||theta||^2 over all 257, Deep3D weights the parts 1 / 0.8 /
  1.7e-2.
- M_pre: the squared residual is the squared RGB distance; the official threshold is
  (3 x 0.043)^2 = 0.0166 (`xi=XI_OFFICIAL`), the paper's xi = 0.17.
- L_R: the official code adds 0.06 L_area, which carries no gradient to the encoder (M is frozen,
  S_R comes from the rasterizer); it is left out.

Test: python -m pytest -q tests/test_losses.py
"""
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from bfm import LANDMARK_WEIGHTS

# xi of the official code (Eq. 10): squared RGB distance < (3 sigma)^2 with sigma = 0.043
XI_OFFICIAL = (3 * 0.043) ** 2

Features = Callable[[Tensor], Tensor]

# term order of the returned dicts (the paper's order)
SEGMENTER_TERMS = ("L_nbr", "L_dist", "L_area", "L_presv", "L_bin")
AUTOENCODER_TERMS = ("L_pixel", "L_per", "L_lm", "L_reg", "L_mono", "L_distill")


# ----------------------------------------------------------------------------------------------
# input checks
# ----------------------------------------------------------------------------------------------

def _check_tensor(name: str, x: Tensor, dim: int) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimensions, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")


def _check_images(target: Tensor, rendered: Tensor) -> tuple[int, int, int, int]:
    _check_tensor("target", target, 4)
    _check_tensor("rendered", rendered, 4)
    if target.shape != rendered.shape:
        raise ValueError(f"target {tuple(target.shape)} and rendered {tuple(rendered.shape)} "
                         "must have the same shape (B, C, H, W)")
    return tuple(target.shape)


def _check_mask(name: str, mask: Tensor, B: int, H: int, W: int) -> None:
    _check_tensor(name, mask, 4)
    if tuple(mask.shape) != (B, 1, H, W):
        raise ValueError(f"{name} must have shape (B, 1, H, W) = {(B, 1, H, W)}, "
                         f"got {tuple(mask.shape)}")


def _inside(region: Tensor) -> Tensor:
    # R in {0, 1}: a pixel is rendered where region > 0.5
    return (region > 0.5).to(region.dtype)  # (B, 1, H, W)


def _per_rendered_pixel(values: Tensor, region: Tensor) -> Tensor:
    # sum_x R(x) v(x) / max(S_R, 1): 0 for an empty region
    inside = _inside(region)  # (B, 1, H, W)
    return (inside * values).sum(dim=(1, 2, 3)) / inside.sum(dim=(1, 2, 3)).clamp_min(1.0)  # (B,)


# ----------------------------------------------------------------------------------------------
# losses of the segmentation network S (Sec. 3.2)
# ----------------------------------------------------------------------------------------------

def neighbor_loss(target: Tensor, rendered: Tensor, mask: Tensor, region: Tensor, *,
                  size: int = 3, normalize: str = "region") -> Tensor:
    """Neighbour loss L_nbr, Eq. 1 / Supp. Eq. 12 (unweighted).

        L_nbr = sum_{x in Omega} ( min_{x' in N(x)} ||I_T(x) - I_R(x')|| )^2

    Omega is the predicted face inside the rendered region; a soft mask weights each pixel by
    M(x). N(x) is the `size` x `size` window around x restricted to rendered pixels inside the
    image (x itself is always one when x is rendered). `size=1` gives the masked pixel error of
    Eq. 5 with this reduction (the paper's 'Baseline' ablation, Sec. 4.4). The paper's
    neighbourhood is 3 x 3 (Supp. A.1); the official code uses 5 x 5 (`size=5`) and also searches
    the target around each rendered pixel, takes the RGB distance unsquared, multiplies both
    images by M and averages over every image pixel.

    Reduction: `normalize="region"` (default) divides each image's sum by its number of rendered
    pixels S_R (at least 1), so eta_3 / eta_1 alone sets which residuals the segmenter keeps (see
    the module docstring); `normalize="image"` divides by H W (the official reduction). Then the
    mean over the batch. Zero for an empty mask or an empty region.

    Args:
        target: I_T, (B, C, H, W).
        rendered: I_R, (B, C, H, W).
        mask: M in [0, 1], (B, 1, H, W).
        region: S_R in {0, 1}, (B, 1, H, W).
        size: odd window width (paper 3, official 5).
        normalize: "region" or "image".
    Returns:
        Scalar; d/dM >= 0 everywhere.
    """
    B, C, H, W = _check_images(target, rendered)
    _check_mask("mask", mask, B, H, W)
    _check_mask("region", region, B, H, W)
    if not isinstance(size, int) or size < 1 or size % 2 == 0:
        raise ValueError(f"size must be a positive odd int, got {size!r}")
    if normalize not in ("region", "image"):
        raise ValueError(f"normalize must be 'region' or 'image', got {normalize!r}")
    r = size // 2
    inside = region > 0.5  # (B, 1, H, W)
    rendered_pad = torch.nn.functional.pad(rendered, (r, r, r, r))  # (B, C, H+2r, W+2r)
    # pixels outside the image are not candidates
    inside_pad = torch.nn.functional.pad(inside, (r, r, r, r), value=False)  # (B, 1, H+2r, W+2r)
    no_candidate = torch.full((), float("inf"), dtype=target.dtype, device=target.device)
    best = None
    for dy in range(size):
        for dx in range(size):
            shifted = rendered_pad[:, :, dy:dy + H, dx:dx + W]  # (B, C, H, W)
            # ||I_T(x) - I_R(x')||^2 for x' = x + (dy - r, dx - r)
            dist = (target - shifted).pow(2).sum(dim=1, keepdim=True)  # (B, 1, H, W)
            dist = torch.where(inside_pad[:, :, dy:dy + H, dx:dx + W], dist, no_candidate)
            # min over x' in N(x)
            best = dist if best is None else torch.minimum(best, dist)  # (B, 1, H, W)
    # d(x) on rendered pixels, 0 elsewhere (there best may be +inf: no rendered neighbour)
    residual = torch.where(inside, best, torch.zeros_like(best))  # (B, 1, H, W)
    # sum_x M(x) d(x)
    total = (mask * residual).sum(dim=(1, 2, 3))  # (B,)
    if normalize == "region":
        per_image = total / inside.sum(dim=(1, 2, 3)).clamp_min(1).to(total.dtype)  # (B,)
    else:
        per_image = total / (H * W)  # (B,)
    return per_image.mean()


def cosine_distance(x: Tensor, y: Tensor, *, eps: float = 1e-6,
                    per_location: bool = False) -> Tensor:
    """Per-sample cosine distance cos(X, Y) = 1 - X.Y / (|X| |Y|) (Sec. 3.2), in [0, 2].

    `per_location=False` flattens each sample's features into one vector. `per_location=True`
    takes `(B, C, ...)` feature maps, the cosine over channels at every location, and the mean
    over locations (the official code's L_dist and L_presv on ArcFace's first residual stage).
    Norms are clamped below by `eps` (the official code's 1e-6), so a zero feature vector has
    distance 1 and a finite gradient.

    Args:
        x, y: features of the same shape (B, ...), at least (B, C, L) when per_location.
    Returns:
        (B,) distances.
    """
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise TypeError("x and y must be torch.Tensors")
    if x.shape != y.shape:
        raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)} must have the same shape")
    if x.dim() < (3 if per_location else 2):
        raise ValueError(f"features must be (B, ...) with at least {3 if per_location else 2} "
                         f"dimensions, got shape {tuple(x.shape)}")
    if per_location:
        x, y = x.flatten(2), y.flatten(2)  # (B, C, L)
    else:
        x, y = x.flatten(1).unsqueeze(-1), y.flatten(1).unsqueeze(-1)  # (B, N, 1)
    norm_x = torch.linalg.vector_norm(x, dim=1).clamp_min(eps)  # (B, L)
    norm_y = torch.linalg.vector_norm(y, dim=1).clamp_min(eps)  # (B, L)
    # 1 - X.Y / (|X| |Y|)
    distance = 1.0 - (x * y).sum(dim=1) / (norm_x * norm_y)  # (B, L)
    return distance.mean(dim=1)  # (B,)


def dist_loss(feat_target_masked: Tensor, feat_rendered_masked: Tensor, *,
              per_location: bool = False) -> Tensor:
    """Perceptual distance loss L_dist = cos(F(I_T * M), F(I_R * M)), Eq. 2 (unweighted).

    Pass features of both images masked by M * S_R. Reduction: per-sample cosine distance
    (`cosine_distance`), mean over the batch. Official code: per location on ArcFace's first
    residual stage (`per_location=True`).

    Args:
        feat_target_masked: F(I_T * M), (B, ...).
        feat_rendered_masked: F(I_R * M), (B, ...).
    Returns:
        Scalar in [0, 2].
    """
    return cosine_distance(feat_target_masked, feat_rendered_masked,
                           per_location=per_location).mean()


def area_loss(mask: Tensor, region: Tensor) -> Tensor:
    """Area loss L_area = -S_M / S_R, Eq. 3 (unweighted).

    S_M = sum of M inside the rendered region, S_R = number of rendered pixels. Reduction: the
    per-image ratio (already a mean over rendered pixels), then the mean over the batch. An empty
    region gives 0 (nothing to keep) with zero gradient. -L_area is the kept-face fraction.

    Args:
        mask: M in [0, 1], (B, 1, H, W).
        region: S_R in {0, 1}, (B, 1, H, W).
    Returns:
        Scalar in [-1, 0]; d/dM <= 0 everywhere.
    """
    _check_tensor("mask", mask, 4)
    B, _, H, W = mask.shape
    _check_mask("mask", mask, B, H, W)
    _check_mask("region", region, B, H, W)
    # -S_M / S_R
    return -_per_rendered_pixel(mask, region).mean()


def preserve_loss(feat_target_masked: Tensor, feat_target: Tensor, *,
                  per_location: bool = False) -> Tensor:
    """Preserve loss L_presv = cos(F(I_T * M), F(I_T)), Eq. 4 (unweighted).

    Reduction: per-sample cosine distance, mean over the batch. Official code: per location on
    ArcFace's first residual stage (`per_location=True`).

    Args:
        feat_target_masked: F(I_T * M), (B, ...).
        feat_target: F(I_T), (B, ...).
    Returns:
        Scalar in [0, 2].
    """
    return cosine_distance(feat_target_masked, feat_target, per_location=per_location).mean()


def binary_loss(mask: Tensor, region: Optional[Tensor] = None, *, form: str = "paper") -> Tensor:
    """Binary regulariser L_bin (Sec. 3.2, after Eq. 4; unweighted).

        paper:    L_bin = -mean_x (M(x) - 0.5)^2         in [-0.25, 0]
        official: L_bin = 0.5 - mean_x |M(x) - 0.5|      in [0, 0.5]

    Both are largest at M = 0.5 and smallest on binary masks. The paper sums over x; we take the
    mean over the rendered pixels when `region` is given (0 for an empty region), else over all
    pixels, then the mean over the batch. The official code averages |M S_R - 0.5| over all image
    pixels, which is S_R / HW times the official form here.

    Args:
        mask: M in [0, 1], (B, 1, H, W).
        region: optional S_R in {0, 1}, (B, 1, H, W).
        form: "paper" or "official".
    Returns:
        Scalar.
    """
    _check_tensor("mask", mask, 4)
    B, _, H, W = mask.shape
    _check_mask("mask", mask, B, H, W)
    if form == "paper":
        # -(M - 0.5)^2
        values = -(mask - 0.5).pow(2)  # (B, 1, H, W)
    elif form == "official":
        # 0.5 - |M - 0.5|
        values = 0.5 - (mask - 0.5).abs()  # (B, 1, H, W)
    else:
        raise ValueError(f"form must be 'paper' or 'official', got {form!r}")
    if region is None:
        return values.mean()
    _check_mask("region", region, B, H, W)
    return _per_rendered_pixel(values, region).mean()


# ----------------------------------------------------------------------------------------------
# losses of the face autoencoder R (Sec. 3.2)
# ----------------------------------------------------------------------------------------------

def pixel_loss(target: Tensor, rendered: Tensor, mask: Tensor, *, form: str = "paper") -> Tensor:
    """Masked photometric loss L_pixel = ||(I_T - I_R) * M||^2, Eq. 5 (unweighted).

    Pass the face mask inside the rendered region (M * S_R, M_pre, or S_R alone for a plain
    autoencoder). Reduction: the squared RGB distance, summed over pixels and images weighted by
    M and divided by the total mask weight of the batch (at least one pixel): a mean over kept
    pixels pooled over the batch, so every kept pixel counts the same however the mask splits
    between images (an image with a tiny mask does not get a whole image's weight). Official code
    (and Deep3D): the RGB distance, not squared, same pooling (`form="official"`).

    Args:
        target: I_T, (B, C, H, W).
        rendered: I_R, (B, C, H, W).
        mask: weights in [0, 1], (B, 1, H, W).
        form: "paper" (squared distance) or "official" (distance).
    Returns:
        Scalar; 0 for an empty mask.
    """
    B, C, H, W = _check_images(target, rendered)
    _check_mask("mask", mask, B, H, W)
    if form == "paper":
        # ||I_T(x) - I_R(x)||^2
        residual = (target - rendered).pow(2).sum(dim=1, keepdim=True)  # (B, 1, H, W)
    elif form == "official":
        # ||I_T(x) - I_R(x)||
        residual = torch.linalg.vector_norm(target - rendered, dim=1, keepdim=True)  # (B, 1, H, W)
    else:
        raise ValueError(f"form must be 'paper' or 'official', got {form!r}")
    # sum_{b,x} M r / max(sum_{b,x} M, 1)
    return (mask * residual).sum() / mask.sum().clamp_min(1.0)


def perceptual_loss(feat_target: Tensor, feat_rendered: Tensor, *,
                    per_location: bool = False) -> Tensor:
    """Perceptual loss L_per = cos(F(I_T), F(I_R)), Eq. 6 (unweighted).

    Reduction: per-sample cosine distance, mean over the batch (the official code compares
    ArcFace embeddings the same way).

    Args:
        feat_target: F(I_T), (B, ...).
        feat_rendered: F(I_R), (B, ...).
    Returns:
        Scalar in [0, 2].
    """
    return cosine_distance(feat_target, feat_rendered, per_location=per_location).mean()


def landmark_weights(*, dtype: torch.dtype = torch.float32,
                     device: Optional[torch.device] = None) -> Tensor:
    """Per-landmark weights of Eq. 7: 20 on the nose ridge and the inner lip, 1 elsewhere.

    Indices are 0-based on the 68-point scheme: nose ridge 28-30, inner lip 60-67 (Deep3D and the
    official code; the paper names the regions, not the indices). The values are
    `bfm.LANDMARK_WEIGHTS`, the one definition, which every face model also carries as its
    `landmark_weights` buffer.

    Returns:
        (68,) weights.
    """
    return torch.tensor(LANDMARK_WEIGHTS, dtype=dtype, device=device)  # (68,)


def landmark_loss(lm_target: Tensor, lm_pred: Tensor, weights: Tensor) -> Tensor:
    """Landmark loss L_lm = ||lm_T - lm_R||^2, Eq. 7, with per-landmark weights (unweighted).

    Reduction (Deep3D): sum_k w_k ||lm_T,k - lm_R,k||^2 / K per image (squared pixels), mean over
    the batch. The official FOCUS code averages (w_k (lm_T,k - lm_R,k))^2 over landmarks and both
    coordinates, i.e. the weight inside the square and half our value at w = 1.

    Args:
        lm_target: lm_T, (B, K, 2) pixel coordinates.
        lm_pred: lm_R, (B, K, 2) pixel coordinates.
        weights: (K,) or (B, K), e.g. `landmark_weights()`.
    Returns:
        Scalar.
    """
    _check_tensor("lm_target", lm_target, 3)
    _check_tensor("lm_pred", lm_pred, 3)
    B, K, two = lm_target.shape
    if two != 2 or lm_pred.shape != lm_target.shape:
        raise ValueError(f"lm_target {tuple(lm_target.shape)} and lm_pred "
                         f"{tuple(lm_pred.shape)} must both be (B, K, 2)")
    if not isinstance(weights, Tensor) or tuple(weights.shape) not in ((K,), (B, K)):
        shape = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
        raise ValueError(f"weights must be a tensor of shape (K,) or (B, K) = {(B, K)}, "
                         f"got {shape}")
    # ||lm_T,k - lm_R,k||^2
    squared = (lm_target - lm_pred).pow(2).sum(dim=-1)  # (B, K)
    # sum_k w_k d_k^2 / K
    return (weights * squared).mean(dim=1).mean()


def regularization(*coefficients: Tensor) -> Tensor:
    """Coefficient regulariser L_reg = ||theta||^2 (Sec. 3.2, before Eq. 8; unweighted).

    Pass the 3DMM coefficients to regularise, each (B, n_i), in standard-deviation units: the
    identity, expression and albedo coefficients (alpha_id, alpha_exp, gamma), as the official code
    does; the paper writes theta, but pose and light have no N(0, 1) prior. Reduction: the mean of
    squares over all given coefficients per image (with 80 + 64 + 80 coefficients this is the
    official code's sum / 224), mean over the batch. Deep3D instead weights identity, expression
    and albedo 1 / 0.8 / 1.7e-2.

    Args:
        *coefficients: one or more (B, n_i) tensors.
    Returns:
        Scalar.
    """
    if not coefficients:
        raise ValueError("regularization needs at least one coefficient tensor")
    for i, part in enumerate(coefficients):
        _check_tensor(f"coefficients[{i}]", part, 2)
    B = coefficients[0].shape[0]
    if any(part.shape[0] != B for part in coefficients):
        raise ValueError("all coefficient tensors must have the same batch size, got "
                         f"{[tuple(part.shape) for part in coefficients]}")
    theta = torch.cat(coefficients, dim=1)  # (B, N)
    # ||theta||^2 / N
    return theta.pow(2).mean(dim=1).mean()


def light_colour_loss(sh: Tensor) -> Tensor:
    """Monochromatic-light prior L_mono (not in the paper; Deep3D's "gamma loss", unweighted).

        L_mono = mean_{c, k} (phi_ck - mean_c' phi_c'k)^2

    The per-channel SH light can tint the whole face with any colour, and so explain a scarf
    or a coloured occluder that the face model should leave to the mask. This term pulls the
    three channels of each of the 9 coefficients together: zero exactly for white (grey) light,
    whatever its direction and brightness, and it leaves skin colour to the albedo model.
    Reduction: mean over the 3 x 9 coefficients per image, mean over the batch (Deep3D's).

    Args:
        sh: (B, 27) phi, 9 coefficients per RGB channel (the ambient offset, equal in every
            channel, does not change the value).
    Returns:
        Scalar.
    """
    _check_tensor("sh", sh, 2)
    B, n = sh.shape
    if n != 27:
        raise ValueError(f"sh must be (B, 27), got {tuple(sh.shape)}")
    phi = sh.view(B, 3, 9)  # (B, 3, 9)
    # phi_ck - mean_c' phi_c'k
    spread = phi - phi.mean(dim=1, keepdim=True)  # (B, 3, 9)
    return spread.pow(2).mean(dim=(1, 2)).mean()


# ----------------------------------------------------------------------------------------------
# preliminary mask for the unsupervised initialisation (Sec. 3.3)
# ----------------------------------------------------------------------------------------------

def preliminary_mask(target: Tensor, rendered: Tensor, region: Tensor, *,
                     xi: float = 0.17) -> Tensor:
    """Preliminary face mask M_pre, Eq. 9-10 (no gradient).

        M_pre(x) = 1 if ||I_T(x) - I_R(x)||^2 < xi and x is rendered, else 0.

    The residual is the squared RGB distance: Eq. 9 is a Gaussian log-likelihood of the colour,
    and the official code sums the squared channel differences. The paper's xi is 0.17; the
    official code thresholds the RGB distance at 3 x 0.043, i.e. `xi=XI_OFFICIAL` (0.0166).

    Args:
        target: I_T, (B, C, H, W).
        rendered: I_R, (B, C, H, W).
        region: S_R in {0, 1}, (B, 1, H, W).
        xi: threshold on the squared RGB distance.
    Returns:
        (B, 1, H, W) mask in {0, 1}, dtype of target, no gradient.
    """
    B, C, H, W = _check_images(target, rendered)
    _check_mask("region", region, B, H, W)
    with torch.no_grad():
        # (I_T(x) - I_R(x))^2
        residual = (target - rendered).pow(2).sum(dim=1, keepdim=True)  # (B, 1, H, W)
        keep = (residual < xi) & (region > 0.5)  # (B, 1, H, W)
        return keep.to(target.dtype)


# ----------------------------------------------------------------------------------------------
# the image metric (Tab. 1), shared by training's held-out log and evaluation
# ----------------------------------------------------------------------------------------------

def image_rmse(rendered: torch.Tensor, target: torch.Tensor, visible: torch.Tensor,
               region: torch.Tensor) -> torch.Tensor:
    """RMSE on the 0-255 scale between I_R and I_T inside the visible face (Tab. 1), per image.

        RMSE = 255 sqrt( sum_{x in A} sum_c (I_R - I_T)^2 / (3 |A|) ),  A = visible face & S_R

    Args:
        rendered, target: (B, 3, H, W) in [0, 1]. visible, region: (B, 1, H, W) in {0, 1}.
    Returns:
        (B,) float64, NaN where A is empty.
    """
    if rendered.shape != target.shape or visible.shape != region.shape:
        raise ValueError("rendered / target and visible / region must have equal shapes")
    area = ((visible > 0.5) & (region > 0.5)).double()  # (B, 1, H, W)
    squared = (rendered.double() - target.double()).pow(2) * area  # (B, 3, H, W)
    count = 3 * area.sum(dim=(1, 2, 3))  # (B,)
    mse = torch.where(count > 0, squared.sum(dim=(1, 2, 3)) / count.clamp_min(1),
                      torch.tensor(float("nan"), dtype=torch.float64, device=rendered.device))
    return 255.0 * mse.sqrt()


# ----------------------------------------------------------------------------------------------
# the two weighted sums
# ----------------------------------------------------------------------------------------------

def segmenter_loss(target: Tensor, rendered: Tensor, mask: Tensor, region: Tensor, *,
                   features: Optional[Features] = None,
                   nbr_size: int = 3,
                   nbr_normalize: str = "region",
                   bin_form: str = "paper",
                   per_location: bool = False,
                   eta_nbr: float = 15.0,  # eta_1, Sec. 3.2
                   eta_dist: float = 3.0,  # eta_2, Sec. 3.2
                   eta_area: float = 0.5,  # eta_3, Sec. 3.2
                   eta_presv: float = 2.5,  # eta_4, Sec. 3.2 (official code: 0.25)
                   eta_bin: float = 10.0,  # eta_5, Sec. 3.2
                   ) -> tuple[Tensor, dict[str, Tensor]]:
    """Segmenter loss L_S = eta_1 L_nbr + eta_2 L_dist + eta_3 L_area + eta_4 L_presv + eta_5 L_bin.

    Sec. 3.2 and Supp. B.4, eta = (15, 3, 0.5, 2.5, 10). The kept mask is M * S_R (the official
    code's mask); L_bin is the mean over rendered pixels. `features` is F, a callable images ->
    features (close over landmarks if F aligns with them); F(I_T) is computed without gradient
    (the target is data). -L_area is the kept-face fraction worth logging. Ablations (Sec. 4.4)
    are values: 'Neighbor' is `features=None`; 'Perceptual' is `eta_nbr=0`;
    'Baseline' (Eq. 5 instead of L_nbr) is `features=None, nbr_size=1`.

    Args:
        target: I_T, (B, C, H, W).
        rendered: I_R, (B, C, H, W).
        mask: M = S(I_R, I_T) in [0, 1], (B, 1, H, W).
        region: S_R in {0, 1}, (B, 1, H, W).
        features: F, or None to leave out L_dist and L_presv.
        nbr_size, nbr_normalize: `neighbor_loss`'s size and normalize.
        bin_form: `binary_loss`'s form.
        per_location: passed to the perceptual terms.
    Returns:
        (L_S scalar, dict of unweighted scalar terms in `SEGMENTER_TERMS` order; "L_dist" and
        "L_presv" only when features are given).
    """
    B, C, H, W = _check_images(target, rendered)
    _check_mask("mask", mask, B, H, W)
    _check_mask("region", region, B, H, W)
    terms = {
        "L_nbr": neighbor_loss(target, rendered, mask, region, size=nbr_size,
                               normalize=nbr_normalize),
        "L_area": area_loss(mask, region),
        "L_bin": binary_loss(mask, region, form=bin_form),
    }
    weights = {"L_nbr": eta_nbr, "L_area": eta_area, "L_bin": eta_bin}
    if features is not None:
        kept = mask * _inside(region)  # (B, 1, H, W)
        with torch.no_grad():
            feat_target = features(target)
        feat_target_masked = features(target * kept)
        feat_rendered_masked = features(rendered * kept)
        terms["L_dist"] = dist_loss(feat_target_masked, feat_rendered_masked,
                                    per_location=per_location)
        terms["L_presv"] = preserve_loss(feat_target_masked, feat_target,
                                         per_location=per_location)
        weights.update(L_dist=eta_dist, L_presv=eta_presv)
    terms = {name: terms[name] for name in SEGMENTER_TERMS if name in terms}
    total = sum(weights[name] * value for name, value in terms.items())
    return total, terms


def light_prior_loss(sh: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Illumination prior L_light (not in the paper; in the spirit of Egger et al. 2018's
    statistical prior over lights): a Gaussian over the SH coefficients,

        L_light = mean_{c, k} ((phi_ck - mu_ck) / sigma_ck)^2

    With the light's colour held white by L_mono, its brightness and direction are still free,
    and a fit can darken part of the face (strong light from behind, large second-order terms)
    to explain a dark occluder. This term keeps the light among the lights the face data is
    drawn from (`data.light_statistics`). Reduction: mean over the 27 coefficients, mean over
    the batch, so that 1 is one standard deviation per coefficient.

    Args:
        sh: (B, 27) phi, 9 coefficients per RGB channel.
        mean, std: (27,) the prior's mean and standard deviation (std > 0).
    Returns:
        Scalar.
    """
    _check_tensor("sh", sh, 2)
    if sh.shape[1] != 27 or mean.shape != (27,) or std.shape != (27,):
        raise ValueError(f"sh must be (B, 27) and mean, std (27,), got {tuple(sh.shape)}, "
                         f"{tuple(mean.shape)}, {tuple(std.shape)}")
    return ((sh - mean) / std).pow(2).mean(dim=1).mean()


def distillation_loss(theta: Tensor, target: Tensor, scale: Tensor) -> Tensor:
    """Distillation L_distill (not in the paper): the encoder's theta towards the theta that
    fitting refined from it (`fit.refine`), so that the encoder learns what the refinement
    found and later refinements start closer,

        L_distill = mean_j ((theta_j - theta*_j) / s_j)^2

    with s the size of one unit of each number (`fit.theta_step`: 1 for coefficients in std
    units, angles and light, 10 mm for translations). theta* carries no gradient. Reduction:
    mean over the 257 numbers, mean over the batch.

    Args:
        theta: (B, 257) the encoder's estimate.
        target: (B, 257) the refined theta.
        scale: (257,) s, > 0.
    Returns:
        Scalar.
    """
    _check_tensor("theta", theta, 2)
    if target.shape != theta.shape or scale.shape != theta.shape[1:]:
        raise ValueError(f"theta and target must be (B, n) alike and scale (n,), got "
                         f"{tuple(theta.shape)}, {tuple(target.shape)}, {tuple(scale.shape)}")
    return ((theta - target.detach()) / scale).pow(2).mean(dim=1).mean()


def autoencoder_loss(target: Tensor, rendered: Tensor, mask: Tensor, region: Tensor, *,
                     lm_target: Tensor, lm_pred: Tensor, lm_weights: Tensor,
                     coefficients: Sequence[Tensor],
                     features: Optional[Features] = None,
                     pixel_form: str = "paper",
                     per_location: bool = False,
                     lambda_pixel: float = 0.5,  # lambda_1, Eq. 8
                     lambda_per: float = 0.25,  # lambda_2, Eq. 8
                     lambda_lm: float = 5e-4,  # lambda_3, Eq. 8
                     lambda_reg: float = 0.1,  # lambda_4, Eq. 8
                     sh: Optional[Tensor] = None,
                     lambda_mono: float = 0.0,  # not in the paper (Deep3D: 10)
                     distill: Optional[tuple[Tensor, Tensor, Tensor]] = None,
                     lambda_distill: float = 0.0,  # not in the paper
                     ) -> tuple[Tensor, dict[str, Tensor]]:
    """Autoencoder loss L_R = lambda_1 L_pixel + lambda_2 L_per + lambda_3 L_lm + lambda_4 L_reg.

    Eq. 8 with lambda = (0.5, 0.25, 5e-4, 0.1).

    L_pixel uses the mask M * S_R: pass the segmenter's M in EM, M_pre at initialisation (Sec.
    3.3), or ones for a plain autoencoder (MoFA). F(I_T) is computed without gradient. The
    official code adds 0.06 L_area, which has no gradient here, and is left out.

    Args:
        target: I_T, (B, C, H, W).
        rendered: I_R, (B, C, H, W).
        mask: face mask in [0, 1], (B, 1, H, W).
        region: S_R in {0, 1}, (B, 1, H, W).
        lm_target, lm_pred: (B, K, 2) pixel coordinates.
        lm_weights: (K,) or (B, K), e.g. `landmark_weights()`.
        coefficients: the 3DMM coefficients to regularise, each (B, n_i).
        sh: (B, 27) light phi for `light_colour_loss`, or None to leave out L_mono.
        distill: (theta, refined theta, scale) for `distillation_loss`, or None to leave out
            L_distill.
        features: F, or None to leave out L_per.
        pixel_form: `pixel_loss`'s form.
        per_location: passed to L_per.
    Returns:
        (L_R scalar, dict of unweighted scalar terms in `AUTOENCODER_TERMS` order; "L_per" only
        when features are given, "L_mono" only when sh is given, "L_distill" with distill).
    """
    B, C, H, W = _check_images(target, rendered)
    _check_mask("mask", mask, B, H, W)
    _check_mask("region", region, B, H, W)
    kept = mask * _inside(region)  # (B, 1, H, W)
    weighted = {  # name: (unweighted term, its weight)
        "L_pixel": (pixel_loss(target, rendered, kept, form=pixel_form), lambda_pixel),
        "L_lm": (landmark_loss(lm_target, lm_pred, lm_weights), lambda_lm),
        "L_reg": (regularization(*coefficients), lambda_reg),
    }
    if sh is not None:
        weighted["L_mono"] = (light_colour_loss(sh), lambda_mono)
    if distill is not None:
        weighted["L_distill"] = (distillation_loss(*distill), lambda_distill)
    if features is not None:
        with torch.no_grad():
            feat_target = features(target)
        weighted["L_per"] = (perceptual_loss(feat_target, features(rendered),
                                             per_location=per_location), lambda_per)
    terms = {name: weighted[name][0] for name in AUTOENCODER_TERMS if name in weighted}
    total = sum(weighted[name][1] * value for name, value in terms.items())
    return total, terms
