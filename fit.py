"""Analysis-by-synthesis: fit the face model to one image by gradient descent through the renderer.

Before any network, a face is reconstructed by optimising theta directly so that the rendered
image I_R = R(theta) matches the target I_T (paper Sec. 1-2: the optimisation-based methods
that model-based autoencoders amortise). The loss is the autoencoder's L_R of Eq. 8 (pixel
term under a mask M, landmarks Eq. 7, regularisation; the perceptual term Eq. 6 optional),
minimised with Adam after a landmark-only start that finds the pose (it projects the 68
landmark vertices and renders nothing). Three modes differ only in the mask M of the pixel
term (Eq. 5):

- `plain`: M = 1 on every rendered pixel, so occluders drag the fit (MoFA's failure, Fig. 3);
- `robust`: M = M_pre of Eq. 9-10, re-estimated from the current fit every `mask_every`
  steps: per-image EM in the spirit of Egger et al. 2018, which FOCUS learns to amortise
  (optionally strict at first, `xi_start`, keeping at least a share of the face,
  `keep_at_least`, with a white-light prior, `lambda_mono`, and a prior over the light's
  brightness and direction, `lambda_light`; the returned mask at its own `xi_final`). Two
  named settings, `ROBUST_SETTINGS`: "paper" (xi = 0.17, none of the options; `fit`'s
  defaults) and "photo" (chosen on real photos, where "paper" finds almost no scarf);
- `segmenter`: M = S(I_R, I_T) from a trained FOCUS segmenter, re-estimated the same way.

Conventions: images (B, 3, H, W) in [0, 1]; landmarks (B, 68, 2) pixel coordinates (x right,
y down); theta (B, 257) in the layout of `bfm.THETA_SIZES`; the camera of `renderer.py`.
Optimised variables are theta divided by `THETA_STEP`, so that one Adam step moves every part
by a comparable amount (coefficients in std units, angles in radians, translations in mm).

Deviations from the paper: none in substance; the paper trains networks and does not fit
per image. lambda_4 (L_reg) defaults to 0.01 instead of 0.1: the paper's 0.1 trains a network
over many images, and one image fitted with it stays near the mean face (the image error falls
4.7x instead of 7x on tests/test_fit.py's face). The robust mode's EM alternates a threshold
mask with fitting, not Egger et al.'s full likelihood models (face, beard, background); its
light prior L_light is a Gaussian over the lights the synthetic faces are drawn with, not their
prior learnt from real photos. The "photo" setting returns a mask at a more lenient
threshold than it fits with (`decoder_and_e_step`). `coarse_to_fine` fits at a smaller size
first.

Run `python fit.py 3 --mode robust` to fit held-out synthetic sample 3 (robust setting
"paper", as `evaluate.py fitting` fits such faces), or
`python fit.py photo.jpg --landmarks landmarks.csv --mode robust` to fit an image file with its
68 landmarks (a CSV row in the official format; aligned like `data.ImageFolderFaces`; robust
setting "photo"); `--robust paper|photo` chooses the other. Add `--mode segmenter --run
RUN_DIR` to use a trained FOCUS segmenter. Writes into out/fit/;
`python -m pytest -q tests/test_fit.py` tests this module.
"""
import argparse
import os
from typing import Callable, NamedTuple, Optional

import torch

import bfm
import face_models
import figures
import focus
import losses
import renderer
import runs
from config import FIT_SAMPLE_SEED, Config

MODES = ("plain", "robust", "segmenter")
# The robust mode's named settings (`fit.py --robust NAME`): keywords of `fit`.
# - "photo", the default of `fit.py` on an image file and of `photos.py`, measured on two real
#   photos (docs/photos.md): a fitting threshold between the paper's 0.17 and the official
#   code's 0.0166, at least half of the face kept while colour and light are still off,
#   Deep3D's white-light prior and a prior over the light's brightness and direction (no
#   tinted or darkened light explains a scarf), and a returned mask at twice the fitting
#   threshold (fewer false outliers on the clean photos, the same scarves and sunglasses).
# - "paper": the paper's M_pre threshold after Egger et al. (Eq. 10, xi = 0.17), no floor,
#   no light prior: `fit`'s own defaults. On the photos it finds almost none of the scarves.
ROBUST_SETTINGS = {
    "photo": dict(xi=0.04, xi_final=0.08, keep_at_least=0.5, lambda_mono=10.0, lambda_light=0.1),
    "paper": dict(xi=0.17, xi_final=None, keep_at_least=0.0, lambda_mono=0.0, lambda_light=0.0),
}
# lambda_1 and lambda_3 of Eq. 8: the paper's, as `config.Config` holds them
LAMBDA_PIXEL, LAMBDA_LM = Config.lambda_pixel, Config.lambda_lm


def theta_step(dtype=torch.float32, device=None) -> torch.Tensor:
    """(257,) scale of each theta number per unit of the optimised variable.

    1 for coefficients (std units), light and angles (radians); 10 for translations (mm).
    """
    step = torch.ones(sum(bfm.THETA_SIZES.values()), dtype=dtype, device=device)
    step[-3:] = 10.0
    return step


class FitResult(NamedTuple):
    theta: torch.Tensor  # (B, 257) the fitted parameters
    rendered: focus.AutoencoderOutput  # the final render (image, region, landmarks, ...)
    mask: torch.Tensor  # (B, 1, H, W) the final render's mask (`final_mask`) or the last used
    history: list  # one dict per step: step, stage, L_R and its unweighted terms, kept
    snapshots: list  # (step, (B, 3, H, W) render composited over the target) for a strip


def robust_settings(name: str, **explicit) -> dict:
    """The keywords of `fit` for the named robust setting `ROBUST_SETTINGS[name]`, with each
    value of `explicit` that is not None in its place (options given on a command line)."""
    if name not in ROBUST_SETTINGS:
        raise ValueError(f"robust setting must be one of {sorted(ROBUST_SETTINGS)}, got {name!r}")
    return {**ROBUST_SETTINGS[name], **{k: v for k, v in explicit.items() if v is not None}}


def render_theta(theta: torch.Tensor, model: bfm.MorphableModel, *, height: int, width: int,
                 adjacency: Optional[renderer.Adjacency] = None) -> focus.AutoencoderOutput:
    """I_R = R(theta) for theta (B, 257): R's own decoder, `focus.decode`."""
    return focus.decode(bfm.split_theta(theta), model, height=height, width=width,
                        adjacency=adjacency)


def fit(image: torch.Tensor, landmarks: torch.Tensor, model: bfm.MorphableModel, *,
        mode: str = "plain", steps: int = 300, landmark_steps: int = 100, lr: float = 0.03,
        mask_every: int = 10, xi: float = 0.17, xi_start: Optional[float] = None,
        xi_final: Optional[float] = None, keep_at_least: float = 0.0, lambda_reg: float = 0.01,
        lambda_mono: float = 0.0,
        lambda_light: float = 0.0, segmenter: Optional[torch.nn.Module] = None,
        features: Optional[Callable] = None, init: Optional[torch.Tensor] = None,
        snapshot_every: int = 0, callback: Optional[Callable[[dict], None]] = None,
        final_mask: bool = True) -> FitResult:
    """Fit theta to images by gradient descent on L_R (Eq. 8) through the renderer.

    Args:
        image, landmarks, model: I_T (B, 3, H, W) in [0, 1], lm_T (B, 68, 2) pixel
            coordinates, and the face model.
        mode: "plain", "robust" or "segmenter" (module docstring).
        steps: Adam steps on the full loss, after `landmark_steps` steps on landmarks and
            regularisation only (pose, identity and expression from the 68 points).
        lr, mask_every: Adam's learning rate on theta / `theta_step`; re-estimate the mask
            every this many steps (robust, segmenter).
        xi, xi_start, xi_final, keep_at_least: the robust mask's threshold (Eq. 10), its
            stricter first value (`relaxed_xi`), that of the mask returned (None: xi), and the
            least share of the face the masks keep while fitting (`decoder_and_e_step`).
        lambda_reg: weight of L_reg (lambda_4; 0.01, not the paper's 0.1: module docstring).
        lambda_mono, lambda_light: weights of the white-light prior L_mono (Deep3D's: no tinted
            light explains a coloured occluder) and of the light prior L_light (`light_prior`:
            no light darkens the face under a dark occluder).
        segmenter: a trained UNet, forward(rendered, target) -> (B, 1, H, W); segmenter mode.
        features: F as a callable images -> features (adds L_per), or None.
        init: theta (B, 257) to start from (`coarse_to_fine`); None: the mean face, facing us.
        snapshot_every, callback: keep a render every this many steps (0: none); f(history row).
        final_mask: estimate the mask of the final render (robust, segmenter); False returns
            the last mask of the pixel term and saves an E-step (`refine` needs the render only).
    """
    _check_fit(image, landmarks, mode=mode, segmenter=segmenter, steps=steps,
               landmark_steps=landmark_steps, mask_every=mask_every, xi=xi, xi_start=xi_start,
               xi_final=xi_final, keep_at_least=keep_at_least, lambda_mono=lambda_mono,
               lambda_light=lambda_light)
    model = model.to(device=image.device)
    draw, e_step = decoder_and_e_step(image, model, mode=mode, steps=steps, xi=xi,
                                      xi_start=xi_start, xi_final=xi_final,
                                      keep_at_least=keep_at_least, segmenter=segmenter)
    step_scale = theta_step(image.dtype, image.device)  # (257,)
    start = torch.zeros(image.shape[0], step_scale.numel()) if init is None else init
    free = (start.to(image) / step_scale).detach().requires_grad_(True)  # (B, 257)
    optimizer = torch.optim.Adam([free], lr=lr)
    weights = dict(lm_weights=losses.landmark_weights(dtype=image.dtype, device=image.device),
                   lambda_reg=lambda_reg, lambda_mono=lambda_mono,
                   light=light_prior(lambda_light, image.dtype, image.device))
    mask, history, snapshots = torch.ones_like(image[:, :1]), [], []
    for step in range(landmark_steps + steps):
        theta = free * step_scale  # (B, 257)
        total, terms, out, mask = fit_step(
            step - landmark_steps, theta, mask, optimizer, image=image, landmarks=landmarks,
            model=model, mode=mode, mask_every=mask_every, draw=draw, e_step=e_step,
            features=features, weights=weights)
        stage = "landmarks" if out is None else mode
        history.append(history_row(step, stage, total, terms, mask, out))
        if callback is not None:
            callback(history[-1])
        if snapshot_every and step % snapshot_every == 0:
            snapshots.append((step, snapshot(image, draw, theta, out)))
    theta = (free * step_scale).detach()
    with torch.no_grad():  # the final render and mask
        out = draw(theta)
        mask = e_step(None, out) if mode != "plain" and final_mask else mask
    return FitResult(theta, out, mask * out.region, history, snapshots)


@torch.no_grad()
def snapshot(image: torch.Tensor, draw, theta: torch.Tensor, out) -> torch.Tensor:
    """(B, 3, H, W) the render `out` (None: draw(theta)) over the image, for a progress strip."""
    shown = draw(theta) if out is None else out
    return figures.render_over(image, shown.image, shown.region).detach()


def coarse_to_fine(image: torch.Tensor, landmarks: torch.Tensor, model: bfm.MorphableModel, *,
                   coarse_size: int, steps: int = 300, coarse_steps: int = 200,
                   landmark_steps: int = 100, **options) -> FitResult:
    """`fit` first at coarse_size x coarse_size (the landmark stage and `coarse_steps` of the
    full loss, on the area-averaged image), then the remaining `steps - coarse_steps` at the
    image's own size from that theta. theta does not depend on the image size (the camera's
    focal length scales with it), so the coarse fit is a start for the fine one.

    Returns the fine fit, with the coarse fit's history (stage names prefixed "coarse ")
    before its own and its snapshots only. `options` go to both `fit` calls.
    """
    if not 0 <= coarse_steps <= steps:
        raise ValueError(f"coarse_steps must be in [0, steps={steps}], got {coarse_steps}")
    size = image.shape[-1]
    if image.shape[-2] != size or not 16 <= coarse_size <= size:
        raise ValueError(f"coarse_to_fine needs a square image and 16 <= coarse_size <= its "
                         f"size, got {tuple(image.shape[-2:])} and {coarse_size}")
    ratio = coarse_size / size
    small = torch.nn.functional.interpolate(image, size=(coarse_size, coarse_size), mode="area")
    small_landmarks = (landmarks + 0.5) * ratio - 0.5  # pixel centres at integers
    snapshot_every = options.pop("snapshot_every", 0)
    coarse = fit(small, small_landmarks, model, steps=coarse_steps, landmark_steps=landmark_steps,
                 **options)
    fine = fit(image, landmarks, model, steps=steps - coarse_steps, landmark_steps=0,
               init=coarse.theta, snapshot_every=snapshot_every, **options)
    offset = len(coarse.history)
    history = ([{**row, "stage": f"coarse {row['stage']}"} for row in coarse.history]
               + [{**row, "step": row["step"] + offset} for row in fine.history])
    return fine._replace(history=history)


def refine(images: torch.Tensor, landmarks: torch.Tensor, autoencoder: focus.FaceAutoencoder, *,
           steps: int, landmark_steps: int = 0, mode: str = "robust",
           segmenter: Optional[torch.nn.Module] = None, xi: float = 0.17,
           lambda_reg: float = 0.01, lr: float = 0.03) -> focus.AutoencoderOutput:
    """R refined by analysis-by-synthesis: the encoder's estimate E(I_T), then `fit` for
    `landmark_steps` + `steps` steps of L_R from it, with the pixel term masked as `mode` says
    ("robust": M_pre re-estimated from the current fit; "segmenter": S(I_R, I_T); "plain").

    A CPU-scale deviation from the paper, which uses R's one forward pass: an encoder trained
    for minutes predicts pose and light but not identity, expression and albedo, and a few
    fitting steps from its estimate reach the image error of a per-image fit (docs/levers.md,
    fifth round). With no steps this is the one forward pass, bit for bit. The networks run in
    evaluation mode and get no gradient.

    Returns:
        The render of the refined theta (`focus.AutoencoderOutput`), without gradient.
    """
    if steps < 0 or landmark_steps < 0:
        raise ValueError(f"refinement steps must be >= 0, got steps={steps}, "
                         f"landmark_steps={landmark_steps}")
    with torch.no_grad(), focus.eval_mode(autoencoder, segmenter):
        if steps == 0 and landmark_steps == 0:
            return autoencoder(images)
        start = bfm.join_theta(autoencoder.encoder(images))  # (B, 257)
    with torch.enable_grad(), focus.eval_mode(autoencoder, segmenter):
        fitted = fit(images, landmarks, autoencoder.face_model, mode=mode, steps=steps,
                     landmark_steps=landmark_steps, segmenter=segmenter, xi=xi, init=start,
                     lambda_reg=lambda_reg, lr=lr, final_mask=False)
    return fitted.rendered


def decoder_and_e_step(image: torch.Tensor, model: bfm.MorphableModel, *, mode: str, steps: int,
                       xi: float, xi_start: Optional[float], xi_final: Optional[float],
                       keep_at_least: float, segmenter: Optional[torch.nn.Module]):
    """`fit`'s two functions of the current fit: draw(theta) -> the render at the image's size
    (`render_theta`), and e_step(k, render) -> the mask M at full-loss step k (`estimate_mask`
    at `relaxed_xi`, keeping at least `keep_at_least`).

    k None: the mask `fit` returns, at `xi_final` (None: xi) and without the floor. The
    fitting mask is strict so that no occluder pulls the fit; the returned mask calls a pixel
    an outlier only where the converged fit misses it by more than `xi_final`, and the floor
    is for the first steps, while colour and light are still off (docs/photos.md)."""
    H, W = image.shape[-2:]
    adjacency = renderer.vertex_adjacency(model.triangles, model.num_vertices)
    draw = lambda theta: render_theta(theta, model, height=H, width=W, adjacency=adjacency)
    final_xi = xi if xi_final is None else xi_final

    def e_step(k: Optional[int], out) -> torch.Tensor:
        if k is None:  # the returned mask
            return estimate_mask(image, out, mode=mode, segmenter=segmenter, xi=final_xi)
        return estimate_mask(image, out, mode=mode, segmenter=segmenter,
                             keep_at_least=keep_at_least,
                             xi=relaxed_xi(k, steps, xi=xi, xi_start=xi_start))
    return draw, e_step


def fit_step(k: int, theta: torch.Tensor, mask: torch.Tensor, optimizer, *, image, landmarks,
             model: bfm.MorphableModel, mode: str, mask_every: int, draw, e_step, features,
             weights: dict):
    """One Adam step of `fit` at full-loss step k (k < 0: the landmark stage, which renders
    nothing): the E-step every `mask_every` steps (robust, segmenter), L_R, backward, step.

    Returns:
        (L_R, its unweighted terms, the render or None, the mask M now in use).
    """
    if k < 0:  # the pixel term is off: render nothing
        H, W = image.shape[-2:]
        out = None
        total, terms = landmark_stage_loss(bfm.split_theta(theta), model, landmarks,
                                           height=H, width=W, **weights)
    else:
        out = draw(theta)
        if mode != "plain" and k % mask_every == 0:
            mask = e_step(k, out)
        total, terms = full_loss(image, landmarks, theta, out, mask, features, **weights)
    optimizer.zero_grad()
    total.backward()
    optimizer.step()
    return total, terms, out, mask


def _check_fit(image, landmarks, *, mode, segmenter, steps, landmark_steps, mask_every, xi,
               xi_start, xi_final, keep_at_least, lambda_mono, lambda_light) -> None:
    """Raise ValueError naming the first argument of `fit` that cannot work."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "segmenter" and segmenter is None:
        raise ValueError("mode 'segmenter' needs a trained segmenter (segmenter=...)")
    if image.dim() != 4 or image.shape[1] != 3:
        raise ValueError(f"image must be (B, 3, H, W), got {tuple(image.shape)}")
    if landmarks.shape != (image.shape[0], 68, 2):
        raise ValueError(f"landmarks must be ({image.shape[0]}, 68, 2), got "
                         f"{tuple(landmarks.shape)}")
    if steps < 0 or landmark_steps < 0 or mask_every < 1:
        raise ValueError("steps and landmark_steps must be >= 0, mask_every >= 1")
    thresholds = [x for x in (xi, xi_start, xi_final) if x is not None]
    if lambda_mono < 0 or lambda_light < 0 or min(thresholds) <= 0:
        raise ValueError("lambda_mono and lambda_light must be >= 0, xi, xi_start and xi_final "
                         "> 0")
    if not 0 <= keep_at_least < 1:
        raise ValueError(f"keep_at_least is a share in [0, 1), got {keep_at_least}")


def full_loss(image, landmarks, theta, out: focus.AutoencoderOutput, mask, features, *, lm_weights,
              lambda_reg: float, lambda_mono: float, light=None):
    """L_R (Eq. 8) of a render under the mask M: (scalar, dict of the unweighted terms)."""
    parts = bfm.split_theta(theta)
    total, terms = losses.autoencoder_loss(
        image, out.image, mask, out.region, lm_target=landmarks, lm_pred=out.landmarks,
        lm_weights=lm_weights, coefficients=(parts.id, parts.exp, parts.albedo),
        features=features, lambda_pixel=LAMBDA_PIXEL, lambda_lm=LAMBDA_LM,
        lambda_reg=lambda_reg, sh=parts.sh if lambda_mono > 0 else None, lambda_mono=lambda_mono)
    return add_light_prior(total, terms, parts.sh, light)


def history_row(step: int, stage: str, total, terms: dict, mask, out) -> dict:
    """One step of `FitResult.history`: L_R, its unweighted terms and the kept share."""
    kept = 1.0 if out is None else float((mask * out.region).sum() / out.region.sum().clamp(min=1))
    return {"step": step, "stage": stage, "L_R": float(total.detach()),
            **{k: float(v.detach()) for k, v in terms.items()}, "kept": kept}


def landmark_stage_loss(parts: bfm.Theta, model: bfm.MorphableModel, landmarks: torch.Tensor, *,
                        height: int, width: int, lm_weights: torch.Tensor, lambda_reg: float,
                        lambda_mono: float, light=None):
    """L_R without its pixel term: lambda_3 L_lm + lambda_4 L_reg (+ L_mono, L_light), from the 68
    landmark vertices alone, projected as `renderer.render` projects them (nothing rendered).

    Returns:
        (scalar loss, dict of the unweighted terms).
    """
    vertices = model.vertices(parts.id, parts.exp, indices=model.landmarks)  # (B, 68, 3)
    points = renderer.project(renderer.camera_transform(vertices, parts.pose), height=height,
                              width=width)  # (B, 68, 3)
    terms = {"L_lm": losses.landmark_loss(landmarks, points[..., :2], lm_weights),
             "L_reg": losses.regularization(parts.id, parts.exp, parts.albedo)}
    total = LAMBDA_LM * terms["L_lm"] + lambda_reg * terms["L_reg"]
    if lambda_mono > 0:
        terms["L_mono"] = losses.light_colour_loss(parts.sh)
        total = total + lambda_mono * terms["L_mono"]
    return add_light_prior(total, terms, parts.sh, light)


def light_prior(lambda_light: float, dtype=torch.float32, device=None):
    """(lambda_light, mean (27,), std (27,)) of the light prior L_light, or None when the
    weight is 0: the lights the synthetic faces are drawn with (`data.light_statistics`)."""
    if lambda_light == 0:
        return None
    import data

    mean, std = data.light_statistics()
    return lambda_light, mean.to(dtype=dtype, device=device), std.to(dtype=dtype, device=device)


def add_light_prior(total, terms: dict, sh: torch.Tensor, light):
    """total + lambda_light L_light (`losses.light_prior_loss`), with "L_light" in terms;
    `light` is `light_prior`'s (weight, mean, std), or None: unchanged."""
    if light is None:
        return total, terms
    weight, mean, std = light
    terms["L_light"] = losses.light_prior_loss(sh, mean, std)
    return total + weight * terms["L_light"], terms


def relaxed_xi(step: int, steps: int, *, xi: float, xi_start: Optional[float]) -> float:
    """The M_pre threshold at robust step `step` of `steps`: `xi_start`, rising linearly to
    `xi` at half the steps, then `xi` (always `xi` when `xi_start` is None). A strict first
    mask keeps only the pixels the landmark fit already explains, so that an occluder cannot
    pull the colour and light before the mask finds it."""
    if xi_start is None:
        return xi
    progress = min(1.0, step / max(1.0, steps / 2))
    return xi_start + (xi - xi_start) * progress


@torch.no_grad()
def estimate_mask(image: torch.Tensor, out: focus.AutoencoderOutput, *, mode: str, xi: float,
                  segmenter: Optional[torch.nn.Module], keep_at_least: float = 0.0) -> torch.Tensor:
    """The E-step: the face mask M (B, 1, H, W) for the current fit (no gradient).

    Robust mode: M_pre (Eq. 10, threshold xi); with `keep_at_least` > 0 the mask keeps at
    least that share of the rendered region, its best-fitting pixels, whatever xi says. While
    colour and light are still far off no pixel is within a strict xi, and M_pre alone would
    leave the pixel term nothing to learn them from. Segmenter mode: S(I_R, I_T) in the region.
    """
    if mode != "robust":
        return segmenter(out.image, image) * out.region
    if keep_at_least == 0:
        return losses.preliminary_mask(image, out.image, out.region, xi=xi)
    # the threshold per image: xi, or the keep_at_least quantile of the residual if larger
    residual = (image - out.image).pow(2).sum(dim=1, keepdim=True)  # (B, 1, H, W)
    inside = out.region > 0.5  # (B, 1, H, W)
    thresholds = [max(xi, float(torch.quantile(r[i], keep_at_least))) if i.any() else xi
                  for r, i in zip(residual, inside)]
    threshold = torch.tensor(thresholds, dtype=residual.dtype, device=residual.device)
    keep = (residual <= threshold.view(-1, 1, 1, 1)) & inside  # (B, 1, H, W)
    return keep.to(image.dtype)


# ----------------------------------------------------------------------------- command line

LANDMARK_HINT = ("68 landmarks per image, one CSV row `filename, x1, y1, ..., x68, y68`; "
                 "`python data.py prepare PHOTOS OUT` detects them with the optional dlib")


def _synthetic_sample(index: int, model: bfm.MorphableModel, *, size: int, subset: str):
    """Held-out synthetic sample `index` (seed `config.FIT_SAMPLE_SEED`): image (1, 3, S, S),
    landmarks (1, 68, 2)."""
    import data

    dataset = data.SyntheticFaces(face_model=model, size=size, subset=subset,
                                  seed=FIT_SAMPLE_SEED, length=index + 1)
    sample = torch.utils.data.default_collate([dataset[index]])
    return sample["image"], sample["landmarks"]


def _landmark_row(path: str, csv_path: str):
    """The `data.CsvRow` of image `path` in a landmark CSV: the row whose filename has the
    image's basename (among several, the one naming this file relative to the CSV's folder).
    Raises data.BadInput naming the files when there is no CSV or no single such row."""
    import data

    if not os.path.isfile(csv_path):
        raise data.BadInput(f"{csv_path}: landmark CSV not found for {path}; pass --landmarks CSV "
                            f"({LANDMARK_HINT})")
    rows, _ = data.read_landmark_csv(csv_path)
    name = os.path.basename(path)
    matches = [row for row in rows if os.path.basename(row.filename) == name]
    if len(matches) > 1:
        folder, target = os.path.dirname(csv_path), os.path.abspath(path)
        matches = [row for row in matches
                   if os.path.abspath(os.path.join(folder, row.filename)) == target] or matches
    if not matches:
        raise data.BadInput(f"{csv_path}: no row for {name} (image {path}); add one "
                            f"({LANDMARK_HINT})")
    if len(matches) > 1:
        lines = ", ".join(str(row.line) for row in matches)
        raise data.BadInput(f"{csv_path}: several rows (lines {lines}) name {name}; keep one")
    return matches[0]


def _image_file_sample(path: str, csv_path: str, *, size: int):
    """An image file and its CSV landmarks, aligned to S x S as `data.ImageFolderFaces` aligns
    (Deep3D's 5-point crop): image (1, 3, S, S), landmarks (1, 68, 2) in crop pixels.
    Raises data.BadInput naming the file when the image, the CSV or its row cannot be used."""
    import data

    image = data.load_image(path)  # (3, h, w)
    row = _landmark_row(path, csv_path)
    data.check_landmarks(row.landmarks, image.shape[1], image.shape[2],
                         f"{path} ({csv_path}:{row.line})")
    matrix = data.alignment_matrix(row.landmarks, size=size)  # photo -> crop
    landmarks = torch.from_numpy(data.apply_affine(matrix, row.landmarks)).float()  # (68, 2)
    aligned = data.warp_image(image, matrix, size=size).clamp(0, 1)  # (3, S, S)
    return aligned[None], landmarks[None]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Fit the face model to one image: a held-out synthetic sample, or an image file "
                    "with its 68 landmarks, aligned to SIZE x SIZE like data.ImageFolderFaces.")
    parser.add_argument("input", metavar="INPUT",
                        help="all digits: an index into the held-out synthetic test set; "
                             "otherwise the path of an image file (see --landmarks)")
    parser.add_argument("--landmarks", metavar="CSV",
                        help="for an image file: its landmark CSV in the official format (filename, "
                             "x1, y1, ..., x68, y68), the row with the image's basename; default: "
                             "landmarks.csv beside the image")
    parser.add_argument("--subset", default="random",
                        help="for a sample index: the synthetic subset (data.SUBSETS)")
    parser.add_argument("--mode", choices=MODES, default="robust")
    parser.add_argument("--run", metavar="RUN_DIR",
                        help="needed by --mode segmenter: a train.py run whose finished 'em' stage "
                             "gives the segmenter; its image_size and face_model replace --size "
                             "and --face-model")
    named = "; ".join(f"{name}: " + ", ".join(f"{k} {v}" for k, v in values.items())
                      for name, values in ROBUST_SETTINGS.items())
    parser.add_argument("--robust", choices=sorted(ROBUST_SETTINGS),
                        help=f"--mode robust: the named settings that the options below override "
                             f"({named}). 'photo', the default for an image file, was chosen on "
                             f"real photos (docs/photos.md), where 'paper' finds almost no scarf. "
                             f"'paper', the default for a sample index (as evaluate.py fitting "
                             f"fits synthetic faces): the paper's threshold after Egger et al. "
                             f"(Eq. 10), no floor, no light prior")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--landmark-steps", type=int, default=100)
    parser.add_argument("--xi", type=float,
                        help="robust mode: the M_pre threshold while fitting (Eq. 10; paper 0.17, "
                             "official code 0.0166); default: the --robust setting's")
    parser.add_argument("--xi-final", type=float,
                        help="robust mode: the threshold of the mask the fit returns; default: "
                             "the --robust setting's ('paper': --xi)")
    parser.add_argument("--mask-every", type=int, default=10,
                        help="re-estimate the mask every this many steps (robust, segmenter)")
    parser.add_argument("--lambda-reg", type=float, default=0.01,
                        help="weight of L_reg (lambda_4; the paper trains networks with 0.1)")
    parser.add_argument("--lambda-mono", type=float,
                        help="weight of the white-light prior L_mono (Deep3D's; 0: off); "
                             "default: the --robust setting's in robust mode, else 0")
    parser.add_argument("--lambda-light", type=float,
                        help="weight of the light prior L_light (the synthetic faces' lights; "
                             "0: off); default: the --robust setting's in robust mode, else 0")
    parser.add_argument("--keep-at-least", type=float,
                        help="robust mode: while fitting, keep at least this share of the face "
                             "region (its best-fitting pixels) whatever --xi says; default: the "
                             "--robust setting's")
    parser.add_argument("--xi-start", type=float,
                        help="robust mode: a stricter first M_pre threshold, relaxed to --xi "
                             "over the first half of the steps")
    parser.add_argument("--size", type=int, default=224, help="the fitting size (SIZE x SIZE)")
    parser.add_argument("--face-model", default="toy", help="a face_models.load_face_model spec")
    parser.add_argument("--out", default=os.path.join("out", "fit"))
    return parser


def main(argv=None) -> FitResult:
    parser = build_parser()
    args = parser.parse_args(argv)
    import data  # the command line reads samples; `fit` itself takes tensors

    sample_index = args.input.isdigit()
    if sample_index and args.landmarks is not None:
        parser.error("--landmarks is for an image file, not a synthetic sample index")
    segmenter = None
    if args.mode == "segmenter":
        if args.run is None:
            parser.error("--mode segmenter needs a trained segmenter: pass --run RUN_DIR "
                         "(a train.py run)")
        try:
            cfg, _, segmenter = runs.load_models(args.run, stage="em")
        except runs.RunError as error:
            parser.error(str(error))
        if segmenter is None:
            parser.error(f"{args.run}: variant {cfg.variant!r} trains no segmenter")
        if args.size != cfg.image_size:
            print(f"fitting at the run's image size {cfg.image_size} (not --size {args.size})")
        if args.face_model != cfg.face_model:
            print(f"using the run's face model {cfg.face_model!r} "
                  f"(not --face-model {args.face_model!r})")
        args.size, args.face_model = cfg.image_size, cfg.face_model
    elif args.run is not None:
        parser.error(f"--run gives the segmenter of --mode segmenter; drop it for "
                     f"--mode {args.mode}")

    if sample_index:
        model = face_models.load_face_model(args.face_model)
        image, landmarks = _synthetic_sample(int(args.input), model, size=args.size,
                                             subset=args.subset)
    else:
        csv_path = args.landmarks or os.path.join(os.path.dirname(args.input), "landmarks.csv")
        try:
            image, landmarks = _image_file_sample(args.input, csv_path, size=args.size)
        except data.BadInput as error:
            parser.error(str(error))
        model = face_models.load_face_model(args.face_model)  # after the file checks: slow
    if args.steps < 0 or args.landmark_steps < 0 or args.mask_every < 1 or args.size < 16:
        parser.error("--steps and --landmark-steps must be >= 0, --mask-every >= 1, --size >= 16")
    settings = mask_and_light_settings(args, parser, sample_index=sample_index)
    result = fit(image, landmarks, model, mode=args.mode, steps=args.steps,
                 landmark_steps=args.landmark_steps, segmenter=segmenter,
                 mask_every=args.mask_every, lambda_reg=args.lambda_reg, **settings,
                 snapshot_every=max(1, (args.steps + args.landmark_steps) // 8),
                 callback=lambda row: print(
                     f"step {row['step']:4d} {row['stage']:9s} L_R {row['L_R']:.4f} "
                     f"kept {row['kept']:.2f}") if row["step"] % 50 == 0 else None)
    write_outputs(args.out, result, image, model)
    return result


def mask_and_light_settings(args, parser, *, sample_index: bool) -> dict:
    """`fit`'s keywords of the robust mask and the light priors from the command line: the
    named `--robust` setting in robust mode ("photo" for an image file, "paper" for a sample
    index), `fit`'s own defaults in the other modes, each option given in its place."""
    if args.robust is not None and args.mode != "robust":
        parser.error(f"--robust names the settings of --mode robust; drop it for "
                     f"--mode {args.mode}")
    name = args.robust or ("paper" if sample_index else "photo")
    settings = robust_settings(
        name if args.mode == "robust" else "paper", xi=args.xi, xi_start=args.xi_start,
        xi_final=args.xi_final, keep_at_least=args.keep_at_least,
        lambda_mono=args.lambda_mono, lambda_light=args.lambda_light)
    thresholds = [settings.get(k) for k in ("xi", "xi_start", "xi_final")]
    thresholds = [x for x in thresholds if x is not None]
    if min(settings["lambda_mono"], settings["lambda_light"]) < 0 or min(thresholds) <= 0:
        parser.error("--lambda-mono and --lambda-light must be >= 0, --xi, --xi-start and "
                     "--xi-final > 0")
    if not 0 <= settings["keep_at_least"] < 1:
        parser.error(f"--keep-at-least is a share in [0, 1), got {settings['keep_at_least']}")
    if args.mode == "robust":
        print(f"robust setting {name!r}: " + ", ".join(f"{k} {v}" for k, v in settings.items()))
    return settings


def write_outputs(out: str, result: FitResult, image: torch.Tensor, model) -> None:
    """The first image's mesh (fit.obj), render over the image, mask and progress strip."""
    os.makedirs(out, exist_ok=True)
    t = bfm.split_theta(result.theta)
    with torch.no_grad():
        vertices = model.vertices(t.id, t.exp)[0]
        colors = model.albedo(t.albedo)[0].clamp(0, 1)
    bfm.save_obj(os.path.join(out, "fit.obj"), vertices, model.triangles, colors)
    over = figures.render_over(image, result.rendered.image, result.rendered.region)
    figures.save_png(over[0], os.path.join(out, "render.png"))
    figures.save_png(result.mask[0], os.path.join(out, "mask.png"))
    figures.save_png(figures.progress_strip(result.snapshots, image),
                     os.path.join(out, "progress.png"))
    print(f"wrote fit.obj, render.png, mask.png, progress.png to {out}")


if __name__ == "__main__":
    main()
