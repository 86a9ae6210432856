"""Analysis-by-synthesis: fit the face model to one image by gradient descent through the renderer.

Before any network, a face is reconstructed by optimising theta directly so that the rendered
image I_R = R(theta) matches the target I_T (paper Sec. 1-2: the optimisation-based methods
that model-based autoencoders amortise). The loss is the autoencoder's L_R of Eq. 8 (pixel
term under a mask M, landmarks Eq. 7, regularisation; the perceptual term Eq. 6 optional),
minimised with Adam after a landmark-only start that finds the pose. Three modes differ only
in the mask M of the pixel term (Eq. 5):

- `plain`: M = 1 on every rendered pixel, so occluders drag the fit (MoFA's failure, Fig. 3);
- `robust`: M = M_pre of Eq. 9-10, re-estimated from the current fit every `mask_every`
  steps: per-image EM in the spirit of Egger et al. 2018, which FOCUS learns to amortise;
- `segmenter`: M = S(I_R, I_T) from a trained FOCUS segmenter, re-estimated the same way.

Conventions: images (B, 3, H, W) in [0, 1]; landmarks (B, 68, 2) pixel coordinates (x right,
y down); theta (B, 257) in the layout of `bfm.THETA_SIZES`; the camera of `renderer.py`.
Optimised variables are theta divided by `THETA_STEP`, so that one Adam step moves every part
by a comparable amount (coefficients in std units, angles in radians, translations in mm).

Deviations from the paper: none in substance; the paper trains networks and does not fit
per image. lambda_4 (L_reg) defaults to 0.01 instead of 0.1 (see `fit`). The robust mode's EM alternates a threshold mask with fitting, not Egger et al.'s full likelihood
models (face, beard, background).

Run `python fit.py 3 --mode robust` to fit held-out synthetic sample 3 (writes into
out/fit/); `python -m pytest -q tests/test_fit.py` tests this module.
"""
import argparse
import os
from typing import Callable, NamedTuple, Optional

import torch

import bfm
import losses
import renderer

MODES = ("plain", "robust", "segmenter")


def theta_step(dtype=torch.float32, device=None) -> torch.Tensor:
    """(257,) scale of each theta number per unit of the optimised variable.

    1 for coefficients (std units), light and angles (radians); 10 for translations (mm).
    """
    step = torch.ones(sum(bfm.THETA_SIZES.values()), dtype=dtype, device=device)
    step[-3:] = 10.0
    return step


class FitResult(NamedTuple):
    theta: torch.Tensor  # (B, 257) the fitted parameters
    rendered: renderer.Rendered  # the final render
    mask: torch.Tensor  # (B, 1, H, W) the last mask used in the pixel term
    history: list  # one dict per step: step, stage, L_R and its unweighted terms, kept
    snapshots: list  # (step, (B, 3, H, W) render composited over the target) for a strip


def render_theta(theta: torch.Tensor, model: bfm.MorphableModel, *, height: int, width: int,
                 adjacency: Optional[renderer.Adjacency] = None) -> renderer.Rendered:
    """I_R = R(theta): decode theta with the face model and render it."""
    t = bfm.split_theta(theta)
    vertices = model.vertices(t.id, t.exp)  # (B, V, 3)
    albedo = model.albedo(t.albedo)  # (B, V, 3)
    return renderer.render(vertices, albedo, t.sh, t.pose, model.triangles, model.landmarks,
                           height=height, width=width, adjacency=adjacency)


def fit(image: torch.Tensor, landmarks: torch.Tensor, model: bfm.MorphableModel, *,
        mode: str = "plain", steps: int = 300, landmark_steps: int = 100, lr: float = 0.03,
        mask_every: int = 10, xi: float = 0.17, lambda_reg: float = 0.01,
        segmenter: Optional[torch.nn.Module] = None,
        features: Optional[Callable] = None, snapshot_every: int = 0,
        callback: Optional[Callable[[dict], None]] = None) -> FitResult:
    """Fit theta to images by gradient descent on L_R (Eq. 8) through the renderer.

    Args:
        image: I_T, (B, 3, H, W) in [0, 1].
        landmarks: lm_T, (B, 68, 2) pixel coordinates.
        model: the face model.
        mode: "plain", "robust" or "segmenter" (module docstring).
        steps: Adam steps on the full loss, after `landmark_steps` steps on landmarks and
            regularisation only (pose, identity and expression from the 68 points).
        lr: Adam learning rate on theta / `theta_step`.
        mask_every: re-estimate the mask every this many steps (robust, segmenter).
        xi: threshold of M_pre (Eq. 10), robust mode.
        lambda_reg: weight of L_reg (lambda_4 of Eq. 8). The paper's 0.1 trains a network
            over many images; one image fitted with it stays near the mean face (the image
            error falls 4.7x instead of 7x on tests/test_fit.py's face), so 0.01 here.
        segmenter: a trained UNet, forward(rendered, target) -> (B, 1, H, W); segmenter mode.
        features: F as a callable images -> features (adds L_per), or None.
        snapshot_every: keep a render every this many steps for a progress strip (0: none).
        callback: called with each step's history row (e.g. to print progress).
    Returns:
        FitResult.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "segmenter" and segmenter is None:
        raise ValueError("mode 'segmenter' needs a trained segmenter (segmenter=...)")
    if image.dim() != 4 or image.shape[1] != 3:
        raise ValueError(f"image must be (B, 3, H, W), got {tuple(image.shape)}")
    B, _, H, W = image.shape
    if landmarks.shape != (B, 68, 2):
        raise ValueError(f"landmarks must be ({B}, 68, 2), got {tuple(landmarks.shape)}")
    if steps < 0 or landmark_steps < 0 or mask_every < 1:
        raise ValueError("steps and landmark_steps must be >= 0, mask_every >= 1")
    model = model.to(device=image.device)
    adjacency = renderer.vertex_adjacency(model.triangles, model.num_vertices)
    step_scale = theta_step(image.dtype, image.device)  # (257,)
    free = torch.zeros(B, step_scale.numel(), dtype=image.dtype, device=image.device,
                       requires_grad=True)
    optimizer = torch.optim.Adam([free], lr=lr)
    lm_weights = losses.landmark_weights(dtype=image.dtype, device=image.device)
    mask = torch.ones(B, 1, H, W, dtype=image.dtype, device=image.device)
    history, snapshots = [], []

    for step in range(landmark_steps + steps):
        stage = "landmarks" if step < landmark_steps else mode
        theta = free * step_scale  # (B, 257)
        out = render_theta(theta, model, height=H, width=W, adjacency=adjacency)
        if stage != "landmarks" and mode != "plain" and (step - landmark_steps) % mask_every == 0:
            mask = estimate_mask(image, out, mode=mode, xi=xi, segmenter=segmenter)
        parts = bfm.split_theta(theta)
        total, terms = losses.autoencoder_loss(
            image, out.image, mask, out.region, lm_target=landmarks, lm_pred=out.landmarks,
            lm_weights=lm_weights, coefficients=(parts.id, parts.exp, parts.albedo),
            features=None if stage == "landmarks" else features,
            lambda_pixel=0.0 if stage == "landmarks" else 0.5, lambda_reg=lambda_reg)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()

        row = {"step": step, "stage": stage, "L_R": float(total.detach()),
               **{k: float(v.detach()) for k, v in terms.items()},
               "kept": float((mask * out.region).sum() / out.region.sum().clamp(min=1))}
        history.append(row)
        if callback is not None:
            callback(row)
        if snapshot_every and step % snapshot_every == 0:
            snapshots.append((step, composite(out, image).detach()))

    with torch.no_grad():
        theta = free * step_scale
        out = render_theta(theta, model, height=H, width=W, adjacency=adjacency)
        if mode != "plain":
            mask = estimate_mask(image, out, mode=mode, xi=xi, segmenter=segmenter)
    return FitResult(theta.detach(), out, mask * out.region, history, snapshots)


@torch.no_grad()
def estimate_mask(image: torch.Tensor, out: renderer.Rendered, *, mode: str, xi: float,
                  segmenter: Optional[torch.nn.Module]) -> torch.Tensor:
    """The E-step: the face mask M (B, 1, H, W) for the current fit (no gradient)."""
    if mode == "robust":
        return losses.preliminary_mask(image, out.image, out.region, xi=xi)
    return segmenter(out.image, image) * out.region


def composite(out: renderer.Rendered, image: torch.Tensor) -> torch.Tensor:
    """The render pasted over the target: (B, 3, H, W)."""
    return out.image.clamp(0, 1) * out.region + image * (1 - out.region)


# ----------------------------------------------------------------------------- command line

def _save_png(path: str, image: torch.Tensor) -> None:
    """(3, H, W) or (1, H, W) in [0, 1] to a PNG."""
    from PIL import Image
    array = (image.clamp(0, 1) * 255).round().byte()
    array = array[0] if array.shape[0] == 1 else array.permute(1, 2, 0)
    Image.fromarray(array.cpu().numpy()).save(path)


def _progress_strip(snapshots, target: torch.Tensor) -> torch.Tensor:
    """Target followed by the snapshots of sample 0, side by side: (3, H, (1 + n) W)."""
    return torch.cat([target[0]] + [image[0] for _, image in snapshots], dim=2)


def main(argv=None) -> FitResult:
    parser = argparse.ArgumentParser(description="Fit the face model to one image.")
    parser.add_argument("sample", help="an index into the held-out synthetic test set")
    parser.add_argument("--subset", default="random", help="synthetic subset (data.SUBSETS)")
    parser.add_argument("--mode", choices=MODES, default="robust")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--landmark-steps", type=int, default=100)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--face-model", default="toy")
    parser.add_argument("--out", default=os.path.join("out", "fit"))
    args = parser.parse_args(argv)
    import data  # the command line reads samples; `fit` itself takes tensors

    if not args.sample.isdigit():
        parser.error(f"sample must be a synthetic sample index, got {args.sample!r}")
    model = bfm.load_face_model(args.face_model)
    dataset = data.SyntheticFaces(face_model=model, size=args.size, subset=args.subset,
                                  seed=1, length=int(args.sample) + 1)
    sample = torch.utils.data.default_collate([dataset[int(args.sample)]])
    result = fit(sample["image"], sample["landmarks"], model, mode=args.mode, steps=args.steps,
                 landmark_steps=args.landmark_steps,
                 snapshot_every=max(1, (args.steps + args.landmark_steps) // 8),
                 callback=lambda row: print(
                     f"step {row['step']:4d} {row['stage']:9s} L_R {row['L_R']:.4f} "
                     f"kept {row['kept']:.2f}") if row["step"] % 50 == 0 else None)
    os.makedirs(args.out, exist_ok=True)
    t = bfm.split_theta(result.theta)
    with torch.no_grad():
        vertices = model.vertices(t.id, t.exp)[0]
        colors = model.albedo(t.albedo)[0].clamp(0, 1)
    bfm.save_obj(os.path.join(args.out, "fit.obj"), vertices, model.triangles, colors)
    _save_png(os.path.join(args.out, "render.png"), composite(result.rendered, sample["image"])[0])
    _save_png(os.path.join(args.out, "mask.png"), result.mask[0])
    _save_png(os.path.join(args.out, "progress.png"), _progress_strip(result.snapshots, sample["image"]))
    print(f"wrote fit.obj, render.png, mask.png, progress.png to {args.out}")
    return result


if __name__ == "__main__":
    main()
