"""Where R's image error comes from: the ground truth swapped in, one theta group at a time.

A diagnostic, not a result of the paper: it explains the numbers of evaluate.py's Tab. 1 and
the choices in docs/levers.md. On held-out synthetic faces, whose true theta is known, R's
render is redone with each theta group (pose, light, albedo, identity, expression) replaced by
the truth (`swap_groups`), and with every group but one replaced (`diagnose`); the image RMSE
of each render says how much of R's error that group carries. Also: the error of each group
(`theta_errors`), the landmark error, the mean-face shape floor, the F1 of M_pre and of the
whole rendered region on R's render, the spread of the predicted pose against the truth's
(`pose_spread`), and whether the training loss itself is lowest at the truth
(`loss_towards_truth`).

Conventions: the metrics of evaluate.py (image RMSE 0-255 inside the visible face and the
rendered region, shape error in mm after rigid alignment); theta as `bfm.Theta`.

Run `python diagnose.py --run runs/cpu` (results/diagnosis.md and diagnosis.json); add
`--validation` for the validation faces (`config.VALIDATION_SEED`) when choosing settings.
Tests: `python -m pytest -q tests/test_evaluate.py`.
"""
import argparse
import json
import os
import sys
from typing import Dict, Optional

import numpy as np
import torch

import bfm
import focus
import losses
import runs
from config import EVAL_SEED, STAGES, VALIDATION_SEED
from evaluate import SUBSETS, image_rmse, segmentation_scores, shape_errors, test_sets

# theta groups as the diagnosis names them, with their `bfm.Theta` fields
GROUPS = {"pose": "pose", "light": "sh", "albedo": "albedo", "identity": "id",
          "expression": "exp"}


def swap_groups(predicted: bfm.Theta, true: bfm.Theta, groups) -> bfm.Theta:
    """`predicted` with the named `GROUPS` replaced by their ground truth."""
    return predicted._replace(**{GROUPS[g]: getattr(true, GROUPS[g]) for g in groups})


def theta_errors(predicted: bfm.Theta, true: bfm.Theta) -> Dict[str, torch.Tensor]:
    """Per-image error of each theta group, (B,) each: identity, expression and albedo as the
    RMS coefficient difference (std units; "*_size" the RMS of the truth, the error of
    predicting 0), light as the RMS difference of the 27 SH coefficients, the Euler angles as
    the mean absolute difference in degrees, the translations x, y and depth z in mm; and how
    far R goes to explain outliers: the tint of its light ("light_tint", L_mono per image, and
    "light_tint_true" of the data's light) and the RMS of its albedo coefficients
    ("albedo_predicted", 1 under the prior)."""
    rms = lambda x: x.pow(2).mean(dim=1).sqrt()  # (B, n) -> (B,)
    out = {}
    for name in ("identity", "expression", "albedo"):
        field = GROUPS[name]
        out[name] = rms(getattr(predicted, field) - getattr(true, field))
        out[name + "_size"] = rms(getattr(true, field))
    out["light"] = rms(predicted.sh - true.sh)
    out["light_size"] = rms(true.sh)
    # can the model explain outliers? tinted light and albedo beyond its prior
    out["light_tint"] = torch.stack([losses.light_colour_loss(s[None]) for s in predicted.sh])
    out["light_tint_true"] = torch.stack([losses.light_colour_loss(s[None]) for s in true.sh])
    out["albedo_predicted"] = rms(predicted.albedo)
    difference = predicted.pose - true.pose  # (B, 6)
    out["angles_deg"] = torch.rad2deg(difference[:, :3]).abs().mean(dim=1)
    out["shift_mm"] = difference[:, 3:5].abs().mean(dim=1)
    out["depth_mm"] = difference[:, 5].abs()
    return out


def diagnose(autoencoder, faces: dict, *, xi: float = 0.17, batch_size: int = 32) -> dict:
    """Where R's image error on `faces` comes from, measured by swapping in the ground truth.

    Rows of image RMSE (0-255, inside the visible face and the rendered region of that
    render): "predicted" (R as trained), "true" (the ground-truth theta: the floor set by the
    data's noise and unexplainable parts), "<group> true" (one group replaced by the truth)
    and "only <group> predicted" (every other group true). Also the theta errors of
    `theta_errors`, the landmark error (px, against the noise-free projection of the true
    theta), the neutral shape error (mm) of R and of the mean face (identity 0), the floor
    any encoder must beat, and the F1 of two masks on R's render: M_pre (Eq. 10, threshold
    `xi`) and the whole rendered region.

    Args:
        autoencoder: R (`focus.FaceAutoencoder`), evaluated in eval mode without gradients.
        faces: "image" (N, 3, H, W), "theta" (N, 257), "visible_face" (N, 1, H, W) and
            "neutral" (N, V, 3), as `test_sets` holds them.
    Returns:
        {"rmse": {row: (N,)}, "errors": {name: (N,)}, "landmarks_px": (N,),
        "shape": {"R": (N,), "Mean face": (N,)}, "f1": {"M_pre": (N,), "Whole region": (N,)}}
        as numpy arrays.
    """
    device, parts = autoencoder.face_model.mean_shape.device, []
    with torch.no_grad(), focus.eval_mode(autoencoder):
        for first in range(0, faces["image"].shape[0], batch_size):
            batch = {k: faces[k][first:first + batch_size].to(device)
                     for k in ("image", "theta", "visible_face", "neutral")}
            parts.append(_diagnose_batch(autoencoder, batch, xi=xi))
    cat = lambda values: torch.cat(values).cpu().numpy()
    result = {group: {name: cat([p[group][name] for p in parts]) for name in parts[0][group]}
              for group in ("rmse", "errors", "shape", "f1")}
    result["landmarks_px"] = cat([p["landmarks_px"] for p in parts])
    result["pose"] = {name: cat([p["pose"][name] for p in parts]) for name in ("R", "true")}
    return result


SHRINK_SCALES = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25)


def loss_towards_truth(autoencoder, faces: dict, cfg, *, scales=SHRINK_SCALES,
                       batch_size: int = 32) -> Dict[float, float]:
    """Is the truth the minimum of the training loss? L_R (Eq. 8, with `cfg`'s weights and
    pixel form, every rendered pixel kept, no F) at the true theta with its identity,
    expression and albedo coefficients scaled by s, for each s in `scales`. A minimum below
    s = 1 means the loss itself pulls R towards the mean face, whatever the training does.

    Args:
        autoencoder: gives the face model and decoder.
        faces: "image", "theta", "landmarks" as `test_sets` holds them.
        cfg: a `config.Config` (lambda_pixel, lambda_lm, lambda_reg, pixel_form).
    Returns:
        {s: L_R over the faces} (the batches' L_R, weighted by their number of faces).
    """
    device, model = autoencoder.face_model.mean_shape.device, autoencoder.face_model
    totals, count = {s: 0.0 for s in scales}, 0
    with torch.no_grad():
        for first in range(0, faces["image"].shape[0], batch_size):
            images, lm_target, theta = (faces[k][first:first + batch_size].to(device)
                                        for k in ("image", "landmarks", "theta"))
            true, H, W = bfm.split_theta(theta), images.shape[-2], images.shape[-1]
            for s in scales:
                scaled = true._replace(id=s * true.id, exp=s * true.exp, albedo=s * true.albedo)
                out = autoencoder.decode(scaled, height=H, width=W)
                loss, _ = losses.autoencoder_loss(
                    images, out.image, torch.ones_like(out.region), out.region,
                    lm_target=lm_target, lm_pred=out.landmarks, lm_weights=model.landmark_weights,
                    coefficients=(scaled.id, scaled.exp, scaled.albedo),
                    pixel_form=cfg.pixel_form, lambda_pixel=cfg.lambda_pixel,
                    lambda_lm=cfg.lambda_lm, lambda_reg=cfg.lambda_reg)
                totals[s] += loss.item() * images.shape[0]
            count += images.shape[0]
    return {s: total / count for s, total in totals.items()}


POSE_NAMES = ("pitch", "yaw", "roll", "tx", "ty", "tz")


def pose_spread(pose: dict) -> Dict[str, dict]:
    """Per pose number: the spread (std) of the truth and of R's predictions, and their
    correlation. A predicted spread well below the truth's with a high correlation is an
    output that points the right way but is shrunk (it has not yet grown to its range).

    Args:
        pose: {"R": (N, 6), "true": (N, 6)} numpy arrays, angles in radians, shifts in mm.
    """
    out = {}
    for k, name in enumerate(POSE_NAMES):
        r, t = pose["R"][:, k], pose["true"][:, k]
        both = r.std() > 0 and t.std() > 0
        out[name] = {"true_std": float(t.std()), "R_std": float(r.std()),
                     "correlation": float(np.corrcoef(r, t)[0, 1]) if both else float("nan")}
    return out


def _diagnose_batch(autoencoder, batch: dict, *, xi: float) -> dict:
    """`diagnose` on one batch, as tensors (B,)."""
    images, model = batch["image"], autoencoder.face_model
    H, W = images.shape[-2:]
    predicted, true = autoencoder.encoder(images), bfm.split_theta(batch["theta"])
    variants = {"predicted": predicted, "true": true}
    variants.update({f"{g} true": swap_groups(predicted, true, [g]) for g in GROUPS})
    variants.update({f"only {g} predicted": swap_groups(
        predicted, true, [o for o in GROUPS if o != g]) for g in GROUPS})
    outputs = {row: autoencoder.decode(theta, height=H, width=W)
               for row, theta in variants.items()}
    rmse = {row: image_rmse(out.image, images, batch["visible_face"], out.region)
            for row, out in outputs.items()}
    zero_exp = torch.zeros_like(predicted.exp)
    neutral = model.vertices(predicted.id, zero_exp)  # (B, V, 3)
    mean = model.vertices(torch.zeros_like(predicted.id), zero_exp)  # (B, V, 3)
    shape = {"R": shape_errors(neutral, batch["neutral"]).mean(dim=1),
             "Mean face": shape_errors(mean, batch["neutral"]).mean(dim=1)}
    out = outputs["predicted"]
    masks = {"M_pre": losses.preliminary_mask(images, out.image, out.region, xi=xi),
             "Whole region": out.region}
    f1 = {name: segmentation_scores(mask, batch["visible_face"], out.region)["F1"]
          for name, mask in masks.items()}
    # mean distance of the 68 landmarks from their noise-free projection, px
    landmarks = (out.landmarks - outputs["true"].landmarks).norm(dim=-1).mean(dim=1)  # (B,)
    return {"rmse": rmse, "errors": theta_errors(predicted, true), "shape": shape, "f1": f1,
            "landmarks_px": landmarks, "pose": {"R": predicted.pose, "true": true.pose}}


def diagnosis_markdown(result: dict, title: str) -> str:
    """`diagnose`'s result as markdown tables (means over the faces)."""
    m = lambda x: float(np.nanmean(x))
    lines = [f"### {title}", "", "| render | RMSE (0-255) |", "|---|---:|"]
    lines += [f"| {row} | {m(v):.1f} |" for row, v in result["rmse"].items()]
    e = result["errors"]
    lines += ["", "| theta group | error | predicting 0 |", "|---|---:|---:|"]
    for name in ("identity", "expression", "albedo", "light"):
        lines.append(f"| {name} (RMS) | {m(e[name]):.3f} | {m(e[name + '_size']):.3f} |")
    lines += [f"| light tint L_mono (true: {m(e['light_tint_true']):.4f}) | "
              f"{m(e['light_tint']):.4f} | |",
              f"| albedo coefficients (RMS, prior 1) | {m(e['albedo_predicted']):.3f} | |",
              f"| angles (deg) | {m(e['angles_deg']):.2f} | |",
              f"| shift x, y (mm) | {m(e['shift_mm']):.2f} | |",
              f"| depth (mm) | {m(e['depth_mm']):.2f} | |",
              f"| landmarks (px) | {m(result['landmarks_px']):.2f} | |",
              "", "| neutral shape | mean error (mm) |", "|---|---:|"]
    lines += [f"| {row} | {m(v):.3f} |" for row, v in result["shape"].items()]
    lines += ["", "| mask on R's render | F1 |", "|---|---:|"]
    lines += [f"| {row} | {m(v):.3f} |" for row, v in result["f1"].items()]
    lines += ["", "| pose (rad, mm) | spread of the truth | spread of R | correlation |",
              "|---|---:|---:|---:|"]
    lines += [f"| {name} | {v['true_std']:.3f} | {v['R_std']:.3f} | {v['correlation']:.2f} |"
              for name, v in pose_spread(result["pose"]).items()]
    return "\n".join(lines) + "\n"


def diagnose_run(run_dir: str, *, stage: str = "em", count: int = 64, out: str = "results",
                 subsets=("unoccluded", "random"), device: str = "cpu",
                 seed: int = EVAL_SEED) -> str:
    """`diagnose` R of a run's finished `stage` on held-out faces of `subsets` drawn with
    `seed` (the test faces by default; `VALIDATION_SEED` to choose settings); writes
    diagnosis.md and diagnosis.json to `out` and returns the markdown."""
    cfg, autoencoder, _ = runs.load_models(run_dir, stage=stage, device=device)
    face_model = autoencoder.face_model
    sets = test_sets(face_model, cfg.image_size, count, subsets=subsets, seed=seed,
                     aligned=cfg.aligned_faces)
    parts, numbers = [f"## Diagnosis of R: {run_dir} ({stage}), {count} faces per subset, "
                      f"seed {seed}", ""], {}
    for subset, faces in sets.items():
        result = diagnose(autoencoder, faces, xi=cfg.xi)
        shrink = loss_towards_truth(autoencoder, faces, cfg)
        parts.append(diagnosis_markdown(result, subset))
        parts += ["| L_R at the true theta, coefficients x s | "
                  + " | ".join(f"s = {k:g}" for k in shrink) + " |",
                  "|---" + "|---:" * len(shrink) + "|",
                  "| | " + " | ".join(f"{v:.4f}" for v in shrink.values()) + " |", ""]
        numbers[subset] = {"rmse": {k: float(np.nanmean(v)) for k, v in result["rmse"].items()},
                           "errors": {k: float(np.nanmean(v)) for k, v in result["errors"].items()},
                           "landmarks_px": float(np.nanmean(result["landmarks_px"])),
                           "shape": {k: float(np.nanmean(v)) for k, v in result["shape"].items()},
                           "f1": {k: float(np.nanmean(v)) for k, v in result["f1"].items()},
                           "pose": pose_spread(result["pose"]),
                           "loss_towards_truth": {str(k): v for k, v in shrink.items()}}
    markdown = "\n".join(parts)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "diagnosis.md"), "w") as f:
        f.write(markdown)
    with open(os.path.join(out, "diagnosis.json"), "w") as f:
        json.dump({"run": run_dir, "stage": stage, "count": count, "seed": seed,
                   "subsets": numbers}, f, indent=1)
    return markdown


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------

def main(argv: Optional[list] = None) -> None:
    """`python diagnose.py ...`: the command line of `diagnose_run`."""
    parser = argparse.ArgumentParser(
        description="Where R's image error comes from: RMSE "
        "with each theta group replaced by the ground truth, the error of each group, the "
        "landmark error and the mean-face shape floor, on held-out synthetic faces.")
    parser.add_argument("--run", required=True, help="run dir")
    parser.add_argument("--stage", default="em", choices=STAGES,
                        help="the checkpoint to diagnose (default em)")
    parser.add_argument("--count", type=int, default=64, help="faces per subset (default 64)")
    parser.add_argument("--subsets", nargs="+", default=["unoccluded", "random"],
                        choices=SUBSETS)
    parser.add_argument("--out", default="results")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--validation", action="store_true",
                        help=f"faces of the validation seed {VALIDATION_SEED} (to choose "
                             f"settings on) instead of the test seed {EVAL_SEED}")
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error("--count must be >= 1")
    try:
        print(diagnose_run(args.run, stage=args.stage, count=args.count, out=args.out,
                           subsets=tuple(args.subsets), device=args.device,
                           seed=VALIDATION_SEED if args.validation else EVAL_SEED))
    except runs.RunError as error:
        sys.exit(f"error: {error}")
    print(f"wrote {args.out}/diagnosis.md and diagnosis.json")


if __name__ == "__main__":
    main()
