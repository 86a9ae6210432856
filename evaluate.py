"""Evaluation: the paper's metrics and tables on held-out synthetic faces, figures, export.

Paper map (Li et al., CVPR 2023, Sec. 4 and Supp. B):

    what                                                   function              paper
    ACC, PPV, TPR, F1 of the face mask inside the         segmentation_scores   Tab. 4, 5
      rendered region, positive = face, mask rounded
    RMSE (0-255) of I_R vs I_T inside the visible face     image_rmse            Tab. 1
    shape error (mm) of the neutral shape after rigid      shape_errors          Tab. 2, 3
      alignment; median / mean / std over vertices
    misfit prior P - E_MP; paired t-test of its effect     paired_t_test         Sec. 3.4, Supp. B.3
    Gaussian skin-colour segmenter (Deep3D's masks)        SkinColourModel       Fig. 5, 7, Tab. 4
    mask F1 against one eta at a time                      sweep                 Supp. Fig. 4
    per-image fitting vs one forward pass                  compare_fitting       Sec. 1-2

Test data are synthetic faces (`data.SyntheticFaces`) of five subsets, unoccluded, glasses,
scarf, hand (skin-coloured occluders, Fig. 7) and random, drawn with seed `config.EVAL_SEED`,
which no training stage uses (config.py holds every seed); they stand in for CelebA-HQ, AR and
NoW, which cannot be shipped. Every sample carries its exact visible-face mask and neutral
shape.

Rows (methods) come from run directories (`experiments.py` trains them all): a FOCUS run gives
"FOCUS" (its EM segmenter), "Pretrained" (the segmenter at the end of init), "M_pre (xi)" (the
preliminary mask of the init autoencoder), "Skin detector" (the skin-colour mask on the FOCUS
autoencoder's region), "Whole region" (every rendered pixel is face: the sanity row a
useful mask must beat) and "Residual, oracle xi" (M_pre on the FOCUS autoencoder with the
threshold that scores best on the test faces themselves: how well any colour-residual
threshold could do with this R, a diagnostic); ablation runs give "Baseline", "Neighbor", "Perceptual"; baseline runs
give "MoFA", "Supervised", "cutout", "cutmix". Wherever a run holds a misfit prior
(misfit_prior.pt of the prior stage), every row also gets its "-MP" shape figures.

Deviations: shapes are compared vertex to vertex (the same mesh topology), aligned by a
least-squares rotation and translation over all vertices (NoW aligns a mesh to a scan by
landmarks, then rigid ICP, and measures scan-to-mesh distances); image RMSE is taken inside
the ground-truth visible face and the rendered region (outside the render there is no
reconstruction to compare); the skin-colour model is one Gaussian per class (skin, occluder)
fitted on labelled pixels of synthetic training faces, where Deep3D uses a mixture model
fitted on real skin photos.

Run: `python evaluate.py --run runs/cpu [runs/cpu-mofa ...]` (markdown tables on screen and
in results/tables.md, numbers in results/results.json, figures in results/);
`python evaluate.py export --run runs/cpu --images DIR --out DIR` writes .obj meshes, masks and
reconstructions of a folder of photos; `python evaluate.py fitting --run runs/cpu` compares
per-image fitting (fit.py) with the trained networks; `python evaluate.py sweep --run RUNS`
plots mask F1 against one eta at a time (Supp. Fig. 4, runs from `experiments.py --group sweep`);
the figures are drawn by figures.py, and `python diagnose.py --run runs/cpu` says where R's
image error comes from. Tests: `python -m pytest -q tests/test_evaluate.py`.
"""
import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from typing import Dict, List, NamedTuple, Optional

import numpy as np
import torch

import bfm
import data
import face_models
import figures
import fit
import focus
import losses
import runs
from config import EVAL_SEED, ORACLE_NOISE_SEED, SKIN_SEED, refines
from losses import image_rmse  # the image metric, shared with training's held-out log

SUBSETS = ("unoccluded", "glasses", "scarf", "hand", "random")
OCCLUDED = ("glasses", "scarf", "hand", "random")
METRICS = ("ACC", "PPV", "TPR", "F1")


# ----------------------------------------------------------------------------------------------
# metrics (pure functions of tensors)
# ----------------------------------------------------------------------------------------------

def segmentation_scores(mask: torch.Tensor, truth: torch.Tensor, region: torch.Tensor, *,
                        binarize: bool = True) -> Dict[str, torch.Tensor]:
    """ACC, PPV, TPR and F1 per image of a face mask inside the rendered region (Sec. 4.3).

    Positive class = face. Pixels outside `region` are not counted. With `binarize` the mask
    is rounded first (as the paper's figures and tables); otherwise soft counts are used.

        TP = sum_region M T, FP = sum_region M (1 - T), FN = sum_region (1 - M) T,
        ACC = (TP + TN) / N, PPV = TP / (TP + FP), TPR = TP / (TP + FN),
        F1 = 2 PPV TPR / (PPV + TPR) = 2 TP / (2 TP + FP + FN).

    Args:
        mask: predicted face probability M, (B, 1, H, W) in [0, 1].
        truth: ground-truth visible face T, (B, 1, H, W) in {0, 1}.
        region: rendered region S_R of the reconstruction, (B, 1, H, W) in {0, 1}.
    Returns:
        {"ACC", "PPV", "TPR", "F1"} -> (B,) float64; NaN where a ratio is 0 / 0 (e.g. PPV of
        an image whose mask keeps no pixel).
    """
    if not (mask.shape == truth.shape == region.shape) or mask.dim() != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask, truth and region must all be (B, 1, H, W), got "
                         f"{tuple(mask.shape)}, {tuple(truth.shape)}, {tuple(region.shape)}")
    m = (mask >= 0.5).double() if binarize else mask.double()
    t, r = (truth > 0.5).double(), (region > 0.5).double()

    def total(x):
        return (x * r).sum(dim=(1, 2, 3))  # (B,)

    tp, fp = total(m * t), total(m * (1 - t))
    fn, tn = total((1 - m) * t), total((1 - m) * (1 - t))
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=mask.device)

    def ratio(a, b):
        return torch.where(b > 0, a / b.clamp_min(1e-12), nan)

    return {"ACC": ratio(tp + tn, tp + fp + fn + tn), "PPV": ratio(tp, tp + fp),
            "TPR": ratio(tp, tp + fn), "F1": ratio(2 * tp, 2 * tp + fp + fn)}


def rigid_align(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The rotation + translation of `source` that best fits `target` (least squares, Kabsch).

    Args:
        source, target: (B, V, 3) corresponding points.
    Returns:
        (B, V, 3) source R^T + t, with R a proper rotation (det +1).
    """
    if source.shape != target.shape or source.dim() != 3 or source.shape[-1] != 3:
        raise ValueError(f"source and target must be (B, V, 3) and equal, got "
                         f"{tuple(source.shape)} and {tuple(target.shape)}")
    src, tgt = source.double(), target.double()
    mu_s, mu_t = src.mean(dim=1, keepdim=True), tgt.mean(dim=1, keepdim=True)  # (B, 1, 3)
    # covariance H = sum_v (s_v - mu_s)(t_v - mu_t)^T, (B, 3, 3)
    H = (src - mu_s).transpose(1, 2) @ (tgt - mu_t)
    U, _, Vh = torch.linalg.svd(H)
    # reflection guard: flip the last axis where det(V U^T) < 0
    d = torch.sign(torch.linalg.det(Vh.transpose(1, 2) @ U.transpose(1, 2)))  # (B,)
    D = torch.diag_embed(torch.stack([torch.ones_like(d), torch.ones_like(d), d], dim=1))
    R = Vh.transpose(1, 2) @ D @ U.transpose(1, 2)  # (B, 3, 3), target ~ R source
    return ((src - mu_s) @ R.transpose(1, 2) + mu_t).to(source.dtype)


def shape_errors(predicted: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """Per-vertex distance (mm) of the predicted neutral shape after rigid alignment to the true
    one (Tab. 2, 3): (B, V, 3), (B, V, 3) -> (B, V)."""
    return (rigid_align(predicted, true) - true).norm(dim=-1)


def paired_t_test(before: np.ndarray, after: np.ndarray) -> dict:
    """Two-sided paired t-test of per-image errors without and with the misfit prior (Supp. B.3).

    Returns:
        {"n", "mean_before", "mean_after", "mean_difference" (after - before), "t", "p"}.
    """
    from scipy import stats
    before, after = np.asarray(before, dtype=float), np.asarray(after, dtype=float)
    if before.shape != after.shape or before.ndim != 1 or before.size < 2:
        raise ValueError("paired_t_test needs two 1-D arrays of equal length >= 2")
    result = stats.ttest_rel(after, before)
    return {"n": int(before.size), "mean_before": float(before.mean()),
            "mean_after": float(after.mean()), "mean_difference": float((after - before).mean()),
            "t": float(result.statistic), "p": float(result.pvalue)}


def summary(values) -> dict:
    """mean, std, median and count of the finite values (NaN skipped, counted in n_nan)."""
    values = np.asarray(values, dtype=float).ravel()
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "median": float("nan"), "n": 0,
                "n_nan": int(values.size)}
    return {"mean": float(finite.mean()), "std": float(finite.std()),
            "median": float(np.median(finite)), "n": int(finite.size),
            "n_nan": int(values.size - finite.size)}


# ----------------------------------------------------------------------------------------------
# the skin-colour baseline (Deep3D's masks, paper Sec. 4.2 and Fig. 7)
# ----------------------------------------------------------------------------------------------

class SkinColourModel:
    """Skin vs. not skin from the colour of one pixel: one Gaussian per class in RGB and a
    Bayes decision, "skin colour follows a simple multivariate Gaussian" (Sec. 4.2).

        p(skin | c) = pi_s N(c; mu_s, C_s) / (pi_s N(c; mu_s, C_s) + pi_o N(c; mu_o, C_o))

    `fit` estimates means, covariances and the prior pi_s from labelled pixels. The model sees
    one pixel at a time, so skin-coloured occluders (hands) are skin to it: the failure the
    paper's Fig. 7 shows.
    """

    def __init__(self, mean: torch.Tensor, covariance: torch.Tensor, prior: torch.Tensor):
        self.mean, self.covariance, self.prior = mean, covariance, prior  # (2, 3), (2, 3, 3), (2,)

    @classmethod
    def fit(cls, images: torch.Tensor, skin: torch.Tensor, other: torch.Tensor, *,
            ridge: float = 1e-4) -> "SkinColourModel":
        """Fit on the pixels of `images` (B, 3, H, W) labelled `skin` / `other` (B, 1, H, W)."""
        colours = images.permute(0, 2, 3, 1).reshape(-1, 3).double()  # (B H W, 3)
        means, covariances, counts = [], [], []
        for label in (skin, other):
            chosen = colours[label.reshape(-1) > 0.5]  # (n, 3)
            if chosen.shape[0] < 4:
                raise ValueError("SkinColourModel.fit needs at least 4 pixels of each class")
            means.append(chosen.mean(dim=0))
            covariances.append(torch.cov(chosen.T) + ridge * torch.eye(3, dtype=torch.float64))
            counts.append(chosen.shape[0])
        counts = torch.tensor(counts, dtype=torch.float64)
        return cls(torch.stack(means), torch.stack(covariances), counts / counts.sum())

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """p(skin | colour) per pixel: (B, 3, H, W) -> (B, 1, H, W)."""
        B, _, H, W = images.shape
        colours = images.permute(0, 2, 3, 1).reshape(-1, 1, 3).double()  # (N, 1, 3)
        mean, covariance = self.mean.to(images.device), self.covariance.to(images.device)
        diff = colours - mean  # (N, 2, 3)
        # log pi_k + log N(c; mu_k, C_k) up to the shared constant
        mahalanobis = (diff.unsqueeze(-2) @ torch.linalg.inv(covariance)
                       @ diff.unsqueeze(-1)).squeeze(-1).squeeze(-1)  # (N, 2)
        log_p = (self.prior.to(images.device).log() - 0.5 * torch.logdet(covariance)
                 - 0.5 * mahalanobis)  # (N, 2)
        p_skin = torch.softmax(log_p, dim=1)[:, 0]  # (N,)
        return p_skin.view(B, H, W).unsqueeze(1).to(images.dtype)


def fit_skin_model(face_model, size: int, *, count: int = 64) -> SkinColourModel:
    """The skin-colour model of synthetic training-distribution faces: skin = the visible face,
    other = the occluders inside the face region (what the model must tell apart there)."""
    faces = data.SyntheticFaces(face_model=face_model, size=size, length=count, seed=SKIN_SEED,
                                subset="train", occluded=1.0)
    batch = faces.batch(list(range(count)))
    other = batch["region"] * batch["occlusion"]  # (B, 1, H, W)
    return SkinColourModel.fit(batch["image"], batch["visible_face"], other)


# ----------------------------------------------------------------------------------------------
# methods (the rows of the tables) and test sets
# ----------------------------------------------------------------------------------------------

class Method(NamedTuple):
    label: str  # the row name
    run_dir: str
    stage: str  # checkpoint: "init" or "em"
    mask: Optional[str]  # "segmenter", "preliminary", "skin", "whole", "oracle" or None
    r: str = "one pass"  # R: "one pass" (the encoder, the paper), "refined" or "oracle R"


ROW_ORDER = ("MoFA", "Supervised", "cutout", "cutmix", "Skin detector", "Whole region",
             "Residual, oracle xi", "M_pre", "Pretrained", "Baseline", "Neighbor", "Perceptual",
             "FOCUS")
VARIANT_LABELS = {"mofa": "MoFA", "supervised": "Supervised", "cutout": "cutout",
                  "cutmix": "cutmix"}
ABLATION_LABELS = {"baseline": "Baseline", "neighbor": "Neighbor", "perceptual": "Perceptual"}
# the rows a FOCUS run gives: (label, checkpoint, mask)
FOCUS_ROWS = (("FOCUS", "em", "segmenter"), ("Skin detector", "em", "skin"),
              ("Whole region", "em", "whole"), ("Residual, oracle xi", "em", "oracle"),
              ("Pretrained", "init", "segmenter"), ("M_pre", "init", "preliminary"))
ONE_PASS_TOO = ("FOCUS", "Whole region", "Pretrained", "M_pre")  # shown both ways, refined


def row_base(label: str) -> str:
    """The row a label is a form of: "FOCUS, one pass" -> "FOCUS" (`ROW_ORDER`'s names)."""
    return label if label in ROW_ORDER else label.split(",")[0]


def methods_of_run(run_dir: str) -> List[Method]:
    """The rows one run provides (module docstring), given which stages it finished.

    A run that refines R (`refine_steps` > 0) gives its rows with the refined R under the plain
    labels, and the main ones again with the encoder's one forward pass (", one pass"); an
    oracle run gives its rows with the oracle's render: S as ", oracle R (noise s, eta a/b)",
    and the rows that do not depend on L_S's eta (the whole region, M_pre, S pre-trained on
    M_pre) as ", oracle R (noise s)"; `check_runs` keeps those once per noise.
    """
    cfg = runs.read_config(run_dir)
    finished = {stage for stage in ("init", "em")
                if os.path.exists(runs.checkpoint_path(run_dir, stage))
                and runs.load_checkpoint(runs.checkpoint_path(run_dir, stage))["done"]}
    if "em" not in finished:
        raise runs.RunError(f"{run_dir}: stage em is not finished (run or --resume it first)")
    if cfg.r_source == "oracle":
        noise = f", oracle R (noise {cfg.oracle_noise:g}"
        eta = f", eta {cfg.eta_area:g}/{cfg.eta_bin:g})"
        return [Method(label + noise + (eta if label == "FOCUS" else ")"), run_dir, stage, mask,
                       "oracle R")
                for label, stage, mask in FOCUS_ROWS
                if stage in finished and mask in ("segmenter", "preliminary", "whole")]
    refined = refines(cfg)
    if cfg.variant != "focus" or cfg.segmenter_losses != "full":
        label = (VARIANT_LABELS.get(cfg.variant) if cfg.variant != "focus"
                 else ABLATION_LABELS[cfg.segmenter_losses])
        mask = None if cfg.variant != "focus" else "segmenter"
        rows = [Method(label, run_dir, "em", mask, "refined" if refined else "one pass")]
        return rows + ([Method(f"{label}, one pass", run_dir, "em", mask)] if refined else [])
    rows = [Method(label, run_dir, stage, mask, "refined" if refined else "one pass")
            for label, stage, mask in FOCUS_ROWS if stage in finished]
    if refined:
        rows += [Method(f"{m.label}, one pass", run_dir, m.stage, m.mask) for m in rows
                 if m.label in ONE_PASS_TOO]
    return rows


def find_prior(run_dirs: List[str]) -> Optional[str]:
    """The first run's misfit_prior.pt (the prior stage's E_MP), or None."""
    for run_dir in run_dirs:
        path = os.path.join(run_dir, "misfit_prior.pt")
        if os.path.exists(path):
            return path
    return None


def test_sets(face_model, size: int, count: int, *, seed: int = EVAL_SEED,
              subsets=SUBSETS, aligned: bool = False) -> Dict[str, dict]:
    """Held-out synthetic faces per subset: the tensors evaluation needs, on the CPU
    (`aligned`: placed as the run's training faces, `data.Ranges.aligned`)."""
    keep = ("image", "landmarks", "theta", "neutral", "visible_face", "region", "occlusion")
    sets = {}
    for subset in subsets:
        faces = data.SyntheticFaces(face_model=face_model, size=size, length=count, seed=seed,
                                    subset=subset, aligned=aligned)
        batches = [faces.batch(list(range(i, min(i + 32, count)))) for i in range(0, count, 32)]
        sets[subset] = {k: torch.cat([b[k] for b in batches]) for k in keep}
    return sets


# ----------------------------------------------------------------------------------------------
# evaluating one method
# ----------------------------------------------------------------------------------------------

def oracle_xi(method: Method, sets: Dict[str, dict], models, *, device: str = "cpu",
              grid=tuple(np.geomspace(0.002, 2.0, 31)), renders: Optional[dict] = None) -> float:
    """The threshold xi of M_pre (Eq. 10) with the best mean F1 over all test faces, for the
    method's R (`r_output`): the ceiling of any mask that thresholds this R's colour residual.
    It is chosen on the test faces themselves (an oracle), so it is a diagnostic, not a
    method."""
    scores = {xi: [] for xi in grid}
    for subset, faces in sets.items():
        for first in range(0, faces["image"].shape[0], 32):
            part = {k: v[first:first + 32].to(device) for k, v in faces.items()}
            out, _ = cached_r_output(method, part, models, renders, (subset, first))
            for xi in grid:
                mask = losses.preliminary_mask(part["image"], out.image, out.region, xi=xi)
                scores[xi].append(segmentation_scores(mask, part["visible_face"],
                                                      out.region)["F1"].cpu())
    mean_f1 = {xi: float(np.nanmean(torch.cat(v).numpy())) for xi, v in scores.items()}
    return max(mean_f1, key=mean_f1.get)


def r_output(method: Method, faces: dict, autoencoder, segmenter, cfg) -> focus.AutoencoderOutput:
    """The method's R on a batch of test faces ("image", "landmarks", "theta"), no gradient:
    the encoder's one forward pass; or refined by the run's `refine_steps` fitting steps
    (`fit.refine`), masked by the method's segmenter, by M_pre for the init's M_pre row, or
    plainly without a segmenter; or the oracle's render of each face's own theta."""
    images = faces["image"]
    if method.r == "oracle R":
        return focus.oracle_render(autoencoder, faces["theta"], noise=cfg.oracle_noise,
                                   seed=ORACLE_NOISE_SEED, height=images.shape[-2],
                                   width=images.shape[-1])
    if method.r == "one pass":
        with torch.no_grad(), focus.eval_mode(autoencoder):
            return autoencoder(images)
    mode = refine_mode(method, segmenter)
    return fit.refine(images, faces["landmarks"], autoencoder, steps=cfg.refine_steps,
                      landmark_steps=cfg.refine_landmark_steps, mode=mode,
                      segmenter=segmenter if mode == "segmenter" else None, xi=cfg.xi)


def refine_mode(method: Method, segmenter) -> str:
    """The mask `fit.refine` fits a refined R with: plain without a segmenter, M_pre (robust)
    for the init's M_pre row, else the method's segmenter."""
    if segmenter is None:
        return "plain"
    return "robust" if method.mask == "preliminary" else "segmenter"


def cached_r_output(method: Method, faces: dict, models, renders: Optional[dict],
                    where: tuple) -> tuple:
    """(`r_output`, seconds it took) of a batch, kept in `renders` (None: not kept) under the
    R it is (run, checkpoint, kind of R, refinement's mask) and `where` (subset, first index):
    the rows that share an R refine it once."""
    cfg, autoencoder, segmenter = models
    key = (method.run_dir, method.stage, method.r, refine_mode(method, segmenter), *where)
    if renders is not None and key in renders:
        return renders[key]
    tic = time.perf_counter()
    out = r_output(method, faces, autoencoder, segmenter, cfg)
    result = (out, time.perf_counter() - tic)
    if renders is not None:
        renders[key] = result
    return result


def predict(method: Method, faces: dict, autoencoder, segmenter, cfg,
            skin_model: Optional[SkinColourModel], xi: Optional[float] = None,
            out: Optional[focus.AutoencoderOutput] = None) -> dict:
    """The method's reconstruction of a batch of test faces (`r_output`, or `out` when given)
    and its face mask (None without one); `xi` replaces cfg.xi for the "oracle" mask."""
    images = faces["image"]
    out = r_output(method, faces, autoencoder, segmenter, cfg) if out is None else out
    with torch.no_grad(), focus.eval_mode(autoencoder, segmenter):
        mask = None
        if method.mask == "segmenter":
            mask = segmenter(out.image, images) * out.region
        elif method.mask in ("preliminary", "oracle"):
            xi = cfg.xi if method.mask == "preliminary" else xi
            mask = losses.preliminary_mask(images, out.image, out.region, xi=xi)
        elif method.mask == "skin":
            mask = skin_model(images) * out.region
        elif method.mask == "whole":
            mask = out.region
        neutral = autoencoder.face_model.vertices(out.theta.id, torch.zeros_like(out.theta.exp))
    return {"image": out.image, "region": out.region, "mask": mask, "neutral": neutral}


def metric_rows(pred: dict, faces: dict, *, prior: Optional[torch.Tensor] = None) -> dict:
    """Per-image metrics of one batch of reconstructions against the ground truth.

    Args:
        pred: "image" (B, 3, H, W), "region" (B, 1, H, W), "neutral" (B, V, 3) and "mask"
            (B, 1, H, W) or None, as `predict` returns them.
        faces: the batch's "image", "visible_face" and "neutral", as `test_sets` holds them.
        prior: E_MP (V, 3), adds the "-MP" shape errors.
    Returns:
        {"rmse": (B,), "shape": (B,) mean vertex error, "shape_vertices": (B, V) float32,
        ["shape_mp", "shape_mp_vertices"], [ACC, PPV, TPR, F1 (B,) with a mask]}.
    """
    rows = {"rmse": image_rmse(pred["image"], faces["image"], faces["visible_face"],
                               pred["region"])}
    errors = shape_errors(pred["neutral"], faces["neutral"])  # (B, V)
    rows.update(shape=errors.mean(dim=1), shape_vertices=errors.float())
    if prior is not None:
        corrected = focus.apply_misfit_prior(pred["neutral"], prior)
        errors_mp = shape_errors(corrected, faces["neutral"])
        rows.update(shape_mp=errors_mp.mean(dim=1), shape_mp_vertices=errors_mp.float())
    if pred["mask"] is not None:
        rows.update(segmentation_scores(pred["mask"], faces["visible_face"], pred["region"]))
    return rows


def evaluate_method(method: Method, sets: Dict[str, dict], *, prior: Optional[torch.Tensor],
                    skin_model: Optional[SkinColourModel], device: str = "cpu",
                    batch_size: int = 32, models=None, renders: Optional[dict] = None) -> dict:
    """Per-image metrics of one method on every subset (R's renders kept in `renders` for the
    next row of the same R, `cached_r_output`).

    Returns:
        {subset: {"rmse": (n,), "shape": (n,) mean vertex error per image, "shape_vertices":
        (n, V) float32, ["shape_mp", "shape_mp_vertices"] with the prior, [ACC, PPV, TPR, F1]
        with a mask}} as numpy arrays, plus "seconds_per_image" (R forward and mask).
    """
    cfg, autoencoder, segmenter = models or runs.load_models(method.run_dir, stage=method.stage,
                                                              device=device)
    results, seconds, images_seen = {}, 0.0, 0
    models = (cfg, autoencoder, segmenter)
    xi = (oracle_xi(method, sets, models, device=device, renders=renders)
          if method.mask == "oracle" else None)
    warm = {k: v[:2].to(device) for k, v in next(iter(sets.values())).items()}
    predict(method, warm, autoencoder, segmenter, cfg, skin_model, xi)  # builds cached mesh data
    for subset, faces in sets.items():
        per = {}
        for first in range(0, faces["image"].shape[0], batch_size):
            part = {k: v[first:first + batch_size].to(device) for k, v in faces.items()}
            out, r_seconds = cached_r_output(method, part, models, renders, (subset, first))
            tic = time.perf_counter()
            pred = predict(method, part, autoencoder, segmenter, cfg, skin_model, xi, out=out)
            seconds += r_seconds + time.perf_counter() - tic
            images_seen += part["image"].shape[0]
            rows = metric_rows(pred, part, prior=prior)
            for name, value in rows.items():
                per.setdefault(name, []).append(value.cpu())
        results[subset] = {name: torch.cat(values).numpy() for name, values in per.items()}
    results["seconds_per_image"] = seconds / max(images_seen, 1)
    if xi is not None:
        results["xi"] = xi
    return results


def pooled(results: dict, subsets, name: str) -> np.ndarray:
    """One metric's per-image (or per-vertex) values over several subsets."""
    return np.concatenate([results[s][name].ravel() for s in subsets if name in results[s]])


def summarize(results: dict) -> dict:
    """JSON-ready summaries per subset and for the pooled "occluded" and "overall" sets."""
    groups = {**{s: (s,) for s in SUBSETS if s in results},
              "occluded": tuple(s for s in OCCLUDED if s in results),
              "overall": tuple(s for s in SUBSETS if s in results)}
    out = {k: results[k] for k in ("seconds_per_image", "xi") if k in results}
    for group, subsets in groups.items():
        if not subsets:
            continue
        names = [n for n in results[subsets[0]] if not n.endswith("_vertices")]
        entry = {name: summary(pooled(results, subsets, name)) for name in names}
        for name in ("shape", "shape_mp"):
            if f"{name}_vertices" in results[subsets[0]]:
                # NoW's median / mean / std run over all vertices of all faces
                entry[f"{name}_vertex"] = summary(pooled(results, subsets, f"{name}_vertices"))
        out[group] = entry
    return out


# ----------------------------------------------------------------------------------------------
# tables
# ----------------------------------------------------------------------------------------------

# rows that reuse another row's R with another mask
MASK_ONLY = ("Skin detector", "Whole region", "M_pre", "Residual, oracle xi")


def is_oracle(label: str) -> bool:
    """A row on the oracle's render: a measure of how well R must fit, not a method."""
    return ", oracle R (" in label


def _own_reconstruction(rows: Dict[str, dict]) -> Dict[str, dict]:
    """The rows with their own R, by R's name: RMSE and shape of a mask-only row repeat its R's
    row, and the oracle R of one noise level is one R whatever S does ("Oracle R (noise s)")."""
    own = {}
    for label, s in rows.items():
        if row_base(label) in MASK_ONLY or is_oracle(label) and row_base(label) != "Pretrained":
            continue
        own["Oracle R" + label.split(", oracle R")[1] if is_oracle(label) else label] = s
    return own


def _f(x: float, digits: int = 2) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _pm(entry: dict, digits: int = 2) -> str:
    return f"{_f(entry['mean'], digits)} ± {_f(entry['std'], digits)}"


def table_rmse(rows: Dict[str, dict]) -> str:
    """Tab. 1: image RMSE (0-255) per method and test set, mean ± std over images."""
    groups = [g for g in ("unoccluded", "occluded", "overall") + OCCLUDED
              if any(g in s for s in rows.values())]
    lines = ["| method | " + " | ".join(groups) + " |", "|---" * (len(groups) + 1) + "|"]
    for label, s in _own_reconstruction(rows).items():
        lines.append(f"| {label} | " + " | ".join(_pm(s[g]["rmse"]) if g in s else "-"
                                                 for g in groups) + " |")
    return "\n".join(lines)


def table_shape(rows: Dict[str, dict]) -> str:
    """Tab. 3 (and Supp. Tab. 2): neutral-shape error in mm, median / mean / std over vertices,
    unoccluded vs occluded faces; "-MP" rows with the misfit prior."""
    head = ("| method | unoccluded median | mean | std | occluded median | mean | std |\n"
            "|---|---|---|---|---|---|---|")
    lines = [head]
    for label, s in _own_reconstruction(rows).items():
        for key, suffix in (("shape_vertex", ""), ("shape_mp_vertex", "-MP")):
            if key not in s.get("overall", {}):
                continue
            cells = [_f(s[g][key][stat]) for g in ("unoccluded", "occluded") if g in s
                     for stat in ("median", "mean", "std")]
            lines.append(f"| {label}{suffix} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table_segmentation(rows: Dict[str, dict], groups) -> str:
    """Tab. 4: ACC, PPV, TPR, F1 (± std over images) per subset, for the methods with a mask."""
    head = "| method | " + " | ".join(f"{g} {m}" for g in groups for m in METRICS) + " |"
    lines = [head, "|---" * (1 + len(groups) * len(METRICS)) + "|"]
    for label, s in rows.items():
        if "F1" not in s.get("overall", {}):
            continue
        cells = [(_pm(s[g][m]) if m == "F1" else _f(s[g][m]["mean"])) if g in s else "-"
                 for g in groups for m in METRICS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table_ablation(rows: Dict[str, dict]) -> str:
    """Tab. 5: F1 per subset and the shape error over all faces, for the FOCUS family."""
    order = ("Whole region", "Residual, oracle xi", "M_pre", "Pretrained", "Baseline",
             "Neighbor", "Perceptual", "FOCUS")
    family = sorted((l for l in rows if row_base(l) in order),
                    key=lambda l: order.index(row_base(l)))
    groups = [g for g in SUBSETS if any(g in rows[l] for l in family)]
    head = ("| method | " + " | ".join(f"{g} F1" for g in groups)
            + " | shape median | mean | std |")
    lines = [head, "|---" * (len(groups) + 4) + "|"]
    for label in family:
        s = rows[label]
        f1 = [_pm(s[g]["F1"]) if g in s and "F1" in s[g] else "-" for g in groups]
        shape = [_f(s["overall"]["shape_vertex"][k]) if row_base(label) not in MASK_ONLY else "-"
                 for k in ("median", "mean", "std")]
        lines.append(f"| {label} | " + " | ".join(f1 + shape) + " |")
        if label == "FOCUS" and "shape_mp_vertex" in s["overall"]:
            mp = [_f(s["overall"]["shape_mp_vertex"][k]) for k in ("median", "mean", "std")]
            lines.append("| FOCUS-MP | " + " | ".join(["-"] * len(groups) + mp) + " |")
    return "\n".join(lines)


def tables_markdown(rows: Dict[str, dict], tests: Dict[str, dict], info: dict) -> str:
    """All tables as one markdown document."""
    parts = [f"Held-out synthetic faces: {info['count']} per subset ({', '.join(info['subsets'])}),"
             f" {info['size']} x {info['size']}, seed {EVAL_SEED}; face model "
             f"{info['face_model']!r}. Masks rounded at 0.5; metrics inside the rendered region, "
             f"face = positive." + (" FOCUS here trains without the perceptual network F "
                                    "(perceptual = 'none'): it is the Neighbor ablation."
                                    if info.get("without_f") else ""),
             *([f"Residual, oracle xi: xi = {rows['Residual, oracle xi']['xi']:.3g} "
                f"(M_pre uses {info['xi']:g})."] if "Residual, oracle xi" in rows else []),
             *([f"R: rows without a suffix refine the encoder's estimate by "
                f"{info['refine_steps']} fitting steps (`fit.refine`, a CPU-scale deviation "
                f"from the paper); rows ending ', one pass' use the encoder's one forward pass, "
                f"as the paper does."] if info.get("refine_steps") else []),
             *(["Rows with 'oracle R (noise s)' render each test face's own theta with s "
                "standard deviations of noise on identity, expression and albedo (not a "
                "method: how well R must fit for S to learn); 'eta a/b' is the eta_area / "
                "eta_bin S trained with. The misfit-prior and timing tables leave them out."]
               if any(is_oracle(label) for label in rows) else []),
             "### Image fit: RMSE (0-255) inside the visible face (paper Tab. 1)",
             table_rmse(rows),
             "### Shape: neutral-shape error (mm) after rigid alignment (paper Tab. 3, Supp. "
             "Tab. 2)", table_shape(rows),
             "### Segmentation (paper Tab. 4)",
             table_segmentation(rows, [g for g in ("unoccluded", "glasses", "scarf")
                                       if g in info["subsets"]]),
             table_segmentation(rows, [g for g in ("hand", "random", "occluded")
                                       if g in info["subsets"] or g == "occluded"]),
             "### Ablation (paper Tab. 5)", table_ablation(rows)]
    if "rmse_mofa_focus" in info:
        t = info["rmse_mofa_focus"]
        parts.append(f"Occluded faces, paired t-test of the image RMSE, MoFA against FOCUS on "
                     f"the same {t['n']} faces: {t['mean_before']:.2f} -> {t['mean_after']:.2f},"
                     f" t = {t['t']:.2f}, p = {t['p']:.2g}.")
    if tests:
        lines = ["### Misfit prior: paired t-test of the per-face mean vertex error "
                 "(Supp. B.3)", "| method | faces | mean without | mean with | t | p |",
                 "|---|---|---|---|---|---|"]
        for label, t in tests.items():
            lines.append(f"| {label} | {t['n']} | {t['mean_before']:.3f} | "
                         f"{t['mean_after']:.3f} | {t['t']:.2f} | {t['p']:.2g} |")
        parts.append("\n".join(lines))
    speed = ["### Time per image (R forward + mask, batch 32, evaluation device)",
             "| method | ms per image |", "|---|---|"]
    speed += [f"| {label} | {1000 * s['seconds_per_image']:.1f} |" for label, s in rows.items()
              if not is_oracle(label)]
    parts.append("\n".join(speed))
    return "\n\n".join(parts) + "\n"


# ----------------------------------------------------------------------------------------------
# figures (drawn by figures.py)
# ----------------------------------------------------------------------------------------------

def qualitative_columns(methods: List[Method], sets: Dict[str, dict], *, skin_model, models,
                        per_subset: int = 2, device: str = "cpu") -> tuple:
    """The pictures of Fig. 5 / 7 (`figures.figure_qualitative`): (columns, row labels), one
    row per face (`per_subset` per subset), columns [(title, (N, 3, H, W))]: the target, then
    per method its reconstruction over the target and, with a mask, the outliers in red.
    `models(method)` gives the method's (cfg, R, S)."""
    subsets = [s for s in SUBSETS if s in sets]
    faces = {k: torch.cat([sets[s][k][:per_subset] for s in subsets]).to(device)
             for k in ("image", "landmarks", "theta")}
    images = faces["image"].cpu()  # (N, 3, H, W)
    columns = [("target", images)]
    for method in methods:
        cfg, autoencoder, segmenter = models(method)
        pred = {k: v.cpu() if v is not None else None for k, v in predict(
            method, faces, autoencoder, segmenter, cfg, skin_model).items()}
        if method.mask in (None, "segmenter") and method.label != "Pretrained":
            columns.append((f"{method.label}\nreconstruction",
                            figures.render_over(images, pred["image"], pred["region"])))
        if pred["mask"] is not None:
            columns.append((f"{method.label}\noutliers (red)",
                            figures.outliers_in_red(images, pred["mask"], pred["region"])))
    return columns, [subsets[r // per_subset] for r in range(images.shape[0])]


# ----------------------------------------------------------------------------------------------
# the whole evaluation
# ----------------------------------------------------------------------------------------------

def check_runs(run_dirs: List[str]) -> tuple:
    """(the rows the runs give, sorted as the tables show them, {run dir: Config}); RunError
    when two runs give the same row or the runs differ in face model, image size or alignment.
    Oracle runs of one noise level share the rows that do not depend on eta: the first gives
    them."""
    methods = sorted((m for r in run_dirs for m in methods_of_run(r)),
                     key=lambda m: ROW_ORDER.index(row_base(m.label)))
    seen, kept = set(), []
    for m in methods:
        if m.r == "oracle R" and row_base(m.label) != "FOCUS" and m.label in seen:
            continue  # given by an oracle run of the same noise
        seen.add(m.label)
        kept.append(m)
    methods = kept
    if len({m.label for m in methods}) != len(methods):
        raise runs.RunError("two runs give the same row; pass each variant once")
    cfgs = {r: runs.read_config(r) for r in run_dirs}
    reference = cfgs[run_dirs[0]]
    for r, cfg in cfgs.items():
        mine, theirs = ((c.face_model, c.image_size, c.aligned_faces) for c in (cfg, reference))
        if mine != theirs:
            raise runs.RunError(f"{r} uses face model, size, aligned faces {mine}, {run_dirs[0]}"
                                f" {theirs}: evaluate them separately")
    return methods, cfgs


def model_cache(device: str):
    """models(method) -> the (cfg, R, S) of its checkpoint, loaded once: rows share them."""
    loaded = {}  # (run dir, stage) -> (cfg, R, S)

    def models(method: Method):
        key = (method.run_dir, method.stage)
        if key not in loaded:
            loaded[key] = runs.load_models(method.run_dir, stage=method.stage, device=device)
        return loaded[key]
    return models


def evaluate_runs(run_dirs: List[str], *, out: str = "results", count: int = 100,
                  subsets=SUBSETS, device: str = "cpu", with_figures: bool = True) -> dict:
    """Evaluate every row the runs provide; write tables.md, results.json and figures to `out`."""
    methods, cfgs = check_runs(run_dirs)
    reference = cfgs[run_dirs[0]]
    face_model = face_models.load_face_model(reference.face_model)
    prior_path = find_prior(run_dirs)
    prior = torch.load(prior_path, weights_only=True)["E_MP"] if prior_path else None
    os.makedirs(out, exist_ok=True)
    tic = time.perf_counter()
    print(f"test sets: {count} faces x {len(subsets)} subsets at {reference.image_size} px ...",
          flush=True)
    sets = test_sets(face_model, reference.image_size, count, subsets=subsets,
                     aligned=reference.aligned_faces)
    skin_model = (fit_skin_model(face_model, reference.image_size)
                  if any(m.mask == "skin" for m in methods) else None)
    models = model_cache(device)
    rows, tests, occluded_rmse, renders = {}, {}, {}, {}
    for method in methods:
        print(f"  {method.label:<14} {method.run_dir} ({method.stage}, R {method.r})", flush=True)
        raw = evaluate_method(method, sets, prior=prior, skin_model=skin_model, device=device,
                              models=models(method), renders=renders)
        rows[method.label] = summarize(raw)
        if method.label in ("MoFA", "FOCUS"):
            occluded_rmse[method.label] = pooled(raw, [s for s in OCCLUDED if s in raw], "rmse")
        if prior is not None and method.mask in (None, "segmenter") and method.label != \
                "Pretrained" and method.r != "oracle R":
            tests[method.label] = paired_t_test(pooled(raw, subsets, "shape"),
                                                pooled(raw, subsets, "shape_mp"))
    info = {"count": count, "subsets": list(subsets), "size": reference.image_size,
            "xi": reference.xi,
            "face_model": reference.face_model, "seed": EVAL_SEED, "runs": run_dirs,
            "misfit_prior": prior_path, "seconds": round(time.perf_counter() - tic, 1),
            "without_f": any(c.perceptual == "none" and c.variant == "focus"
                             and c.segmenter_losses == "full" for c in cfgs.values()),
            "refine_steps": max(c.refine_steps for c in cfgs.values())}
    if len(occluded_rmse) == 2 and len(occluded_rmse["FOCUS"]):
        info["rmse_mofa_focus"] = paired_t_test(occluded_rmse["MoFA"], occluded_rmse["FOCUS"])
    markdown = write_results(out, rows, tests, info)
    if with_figures:
        write_figures(out, methods, rows, sets, prior=prior, face_model=face_model, cfgs=cfgs,
                      skin_model=skin_model, models=models, device=device)
    print(markdown)
    print(f"wrote {out}/tables.md, {out}/results.json and figures "
          f"({time.perf_counter() - tic:.0f} s)")
    return {"info": info, "rows": rows, "tests": tests}


def write_results(out: str, rows: dict, tests: dict, info: dict) -> str:
    """tables.md and results.json in `out`; returns the markdown."""
    markdown = tables_markdown(rows, tests, info)
    with open(os.path.join(out, "tables.md"), "w") as f:
        f.write(markdown)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"info": info, "rows": rows, "misfit_prior_t_test": tests}, f, indent=1)
    return markdown


def write_figures(out: str, methods: List[Method], rows: dict, sets: Dict[str, dict], *,
                  prior, face_model, cfgs: dict, skin_model, models, device: str) -> None:
    """per_subset.png, qualitative.png, misfit_prior.png (with a prior) and the FOCUS run's
    em_progress.png in `out`."""
    subsets = [s for s in SUBSETS if any(s in r for r in rows.values())]
    methods_only = {label: s for label, s in rows.items() if not is_oracle(label)}
    figures.figure_per_subset(os.path.join(out, "per_subset.png"), methods_only, subsets,
                              _own_reconstruction(methods_only))
    shown = [m for m in methods if m.label in ("MoFA", "Supervised", "Skin detector",
                                               "Pretrained", "FOCUS")]
    columns, row_labels = qualitative_columns(shown, sets, skin_model=skin_model, models=models,
                                              device=device)
    figures.figure_qualitative(os.path.join(out, "qualitative.png"), columns, row_labels)
    if prior is not None:
        figures.figure_misfit_prior(os.path.join(out, "misfit_prior.png"), prior, face_model)
    if any(m.r == "oracle R" for m in methods):
        figures.figure_oracle(os.path.join(out, "oracle.png"), *oracle_points(methods, rows, cfgs),
                              lines={"per-image fit": fit_rmse(sets, face_model, device=device)})
    source = progress_source(cfgs)
    if source is not None:
        shutil.copyfile(os.path.join(source, "figures", "em_progress.png"),
                        os.path.join(out, "em_progress.png"))


def progress_source(cfgs: dict) -> Optional[str]:
    """The run whose EM progression (Fig. 11) the results show: the first FOCUS run with the
    full L_S and an R of its own (not the oracle), that has drawn one; None if none has."""
    for run_dir, cfg in cfgs.items():
        if (cfg.variant == "focus" and cfg.segmenter_losses == "full"
                and cfg.r_source != "oracle"
                and os.path.exists(os.path.join(run_dir, "figures", "em_progress.png"))):
            return run_dir
    return None


def oracle_points(methods: List[Method], rows: dict, cfgs: dict) -> tuple:
    """(curves, marks) of `figures.figure_oracle`: each oracle row's F1 against its R's RMSE
    on unoccluded faces (and its noise), one curve per mask (S per eta), and the trained R's
    FOCUS rows."""
    def point(label):
        s = rows[label]
        return s["unoccluded"]["rmse"]["mean"], {g: s[g]["F1"]["mean"] for g in s
                                                 if isinstance(s[g], dict) and "F1" in s[g]}
    curves = {}
    for m in methods:
        if m.r != "oracle R" or row_base(m.label) not in ("FOCUS", "M_pre", "Whole region"):
            continue
        cfg = cfgs[m.run_dir]
        name = ("S, eta %g/%g" % (cfg.eta_area, cfg.eta_bin) if m.mask == "segmenter"
                else row_base(m.label))
        rmse, f1 = point(m.label)  # `check_runs` gave M_pre and the whole region once per noise
        curves.setdefault(name, []).append((rmse, f1, cfg.oracle_noise))
    marks = {f"S, the trained R ({m.r})": point(m.label) for m in methods
             if row_base(m.label) == "FOCUS" and m.r != "oracle R"}
    return curves, marks


def fit_rmse(sets: Dict[str, dict], face_model, *, device: str = "cpu") -> float:
    """The mean image RMSE of a per-image robust fit (`fit.fit`, 100 landmark + 100 full steps
    from the mean face) on the unoccluded test faces: how well R can fit them at all."""
    faces, errors = sets["unoccluded"], []
    for first in range(0, faces["image"].shape[0], 32):
        part = {k: v[first:first + 32].to(device) for k, v in faces.items()}
        result = fit.fit(part["image"], part["landmarks"], face_model.to(device),
                         mode="robust", steps=100, landmark_steps=100)
        errors.append(image_rmse(result.rendered.image, part["image"], part["visible_face"],
                                 result.rendered.region))
    return torch.cat(errors).nanmean().item()


# ----------------------------------------------------------------------------------------------
# one eta at a time (Supp. Fig. 4)
# ----------------------------------------------------------------------------------------------

SWEPT = ("eta_nbr", "eta_dist", "eta_area", "eta_presv", "eta_bin")


def swept_setting(cfg, reference) -> Optional[tuple]:
    """(name, value) of the one segmenter weight in which `cfg` differs from `reference`; None
    when it differs in none. Raises RunError when it differs in more, or in anything else."""
    differ = [f.name for f in dataclasses.fields(cfg)
              if getattr(cfg, f.name) != getattr(reference, f.name)]
    if not differ:
        return None
    if len(differ) > 1 or differ[0] not in SWEPT:
        raise runs.RunError(f"a sweep run must differ from the reference in one of {SWEPT} "
                             f"only, got {differ}")
    return differ[0], getattr(cfg, differ[0])


def sweep(run_dirs: List[str], *, out: str = "results", count: int = 50, device: str = "cpu",
          subsets=SUBSETS) -> List[dict]:
    """Mask F1 of the FOCUS segmenter of runs that vary one eta each around a reference run
    (the run that differs from no other in its settings, e.g. experiments.py's sweep-reference).

    Writes sweep.md, sweep.json and sweep.png (F1 against each eta, Supp. Fig. 4) to `out`.
    """
    cfgs = {r: runs.read_config(r) for r in run_dirs}
    references = [r for r in run_dirs if all(
        len([f for f in dataclasses.fields(c) if getattr(c, f.name) != getattr(cfgs[r], f.name)])
        <= 1 for c in cfgs.values())]
    if not references:
        raise runs.RunError("no reference run: every sweep run must differ from one run (the "
                             "reference) in a single eta")
    reference = cfgs[references[0]]
    model = face_models.load_face_model(reference.face_model)
    sets = test_sets(model, reference.image_size, count, subsets=subsets,
                     aligned=reference.aligned_faces)
    points = []
    for run_dir in run_dirs:
        setting = swept_setting(cfgs[run_dir], reference)
        result = summarize(evaluate_method(Method("FOCUS", run_dir, "em", "segmenter"), sets,
                                           prior=None, skin_model=None, device=device))
        for name in ([setting[0]] if setting else SWEPT):
            value = setting[1] if setting else getattr(reference, name)
            points.append({"eta": name, "value": value, "run": run_dir, "reference": not setting,
                           **{g: result[g]["F1"]["mean"] for g in ("unoccluded", "occluded")
                              if g in result}})
        print(f"  {run_dir}: {setting or 'reference'}", flush=True)
    points = [p for p in points if any(q["eta"] == p["eta"] and not q["reference"]
                                       for q in points)]
    points.sort(key=lambda p: (p["eta"], p["value"]))
    lines = ["| eta | value | occluded F1 | unoccluded F1 |", "|---|---|---|---|"]
    lines += [f"| {p['eta']} | {p['value']:g}{' (reference)' if p['reference'] else ''} | "
              f"{_f(p.get('occluded'), 3)} | {_f(p.get('unoccluded'), 3)} |" for p in points]
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "sweep.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out, "sweep.json"), "w") as f:
        json.dump(points, f, indent=1)
    figures.figure_sweep(os.path.join(out, "sweep.png"), points)
    print("\n".join(lines) + f"\nwrote {out}/sweep.md, sweep.json and sweep.png")
    return points


# ----------------------------------------------------------------------------------------------
# per-image fitting vs the trained encoder (fit.py; paper Sec. 1-2: optimisation vs amortisation)
# ----------------------------------------------------------------------------------------------

def compare_fitting(run_dir: str, *, count: int = 8, subsets=SUBSETS, steps: int = 300,
                    landmark_steps: int = 100, device: str = "cpu") -> Dict[str, dict]:
    """Mask F1, image RMSE, shape error and time per image of four ways to reconstruct the same
    held-out faces: `fit.fit` in modes plain, robust (per-image EM with M_pre) and segmenter
    (the run's trained S), and the run's FOCUS networks in one forward pass.

    The fits run on all faces of a subset at once (a batch); time per image = wall-clock time
    of the batch / its size, on `device`.
    Returns:
        {row label: summarize()-style dict over "occluded" / "unoccluded" / "overall"}.
    """
    cfg, autoencoder, segmenter = runs.load_models(run_dir, stage="em", device=device)
    model = autoencoder.face_model
    sets = test_sets(model, cfg.image_size, count, subsets=subsets, aligned=cfg.aligned_faces)
    focus_method = Method("FOCUS", run_dir, "em", "segmenter")
    raw = {"FOCUS (one forward pass)": evaluate_method(
        focus_method, sets, prior=None, skin_model=None, device=device,
        models=(cfg, autoencoder, segmenter))}
    for mode in fit.MODES:
        label = {"plain": "fit, plain (every pixel)", "robust": "fit, robust (per-image EM)",
                 "segmenter": "fit, FOCUS segmenter masks"}[mode]
        results, seconds = {}, 0.0
        for subset, faces in sets.items():
            images = faces["image"].to(device)
            tic = time.perf_counter()
            result = fit.fit(images, faces["landmarks"].to(device), model, mode=mode,
                                 steps=steps, landmark_steps=landmark_steps,
                                 segmenter=segmenter if mode == "segmenter" else None)
            seconds += time.perf_counter() - tic
            t = bfm.split_theta(result.theta)
            with torch.no_grad():
                neutral = model.vertices(t.id, torch.zeros_like(t.exp))
            pred = {"image": result.rendered.image, "region": result.rendered.region,
                    "neutral": neutral, "mask": result.mask}
            rows = metric_rows(pred, {k: v.to(device) for k, v in faces.items()})
            results[subset] = {k: v.detach().cpu().numpy() for k, v in rows.items()}
        results["seconds_per_image"] = seconds / (count * len(sets))
        raw[label] = results
        print(f"  {label}: {results['seconds_per_image']:.2f} s per image", flush=True)
    return {label: summarize(results) for label, results in raw.items()}


def table_fitting(rows: Dict[str, dict]) -> str:
    """Mask F1, RMSE and shape error on occluded and unoccluded faces, and time per image."""
    groups = [g for g in ("unoccluded", "occluded") if g in next(iter(rows.values()))]
    head = ("| method | " + " | ".join(f"{g} F1 | {g} RMSE | {g} shape mean (mm)" for g in groups)
            + " | s per image |")
    lines = [head, "|---" * (2 + 3 * len(groups)) + "|"]
    for label, s in rows.items():
        cells = [c for g in groups for c in (_pm(s[g]["F1"]), _pm(s[g]["rmse"], 1),
                                             _f(s[g]["shape_vertex"]["mean"]))]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {s['seconds_per_image']:.3f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# export for a folder of images
# ----------------------------------------------------------------------------------------------

def export(run_dir: str, images: str, out: str, *, csv_path: Optional[str] = None,
           device: str = "cpu") -> int:
    """Reconstruct every image of a folder (landmark CSV in the official format) with a trained
    run: <name>.obj (neutral-pose mesh with albedo colours), <name>_mask.png (rounded face
    mask), <name>_recon.png (the reconstruction over the aligned image). Returns the count."""
    cfg, autoencoder, segmenter = runs.load_models(run_dir, stage="em", device=device)
    faces = data.ImageFolderFaces(images, csv_path, size=cfg.image_size)
    os.makedirs(out, exist_ok=True)
    model = autoencoder.face_model
    for index in range(len(faces)):
        sample = faces[index]
        image = sample["image"][None].to(device)  # (1, 3, H, W)
        with torch.no_grad(), focus.eval_mode(autoencoder, segmenter):
            result = autoencoder(image)
            mask = result.region
            if segmenter is not None:
                mask = segmenter(result.image, image) * result.region
        name = os.path.splitext(os.path.basename(sample["path"]))[0]
        bfm.save_obj(os.path.join(out, f"{name}.obj"), result.vertices[0].cpu(),
                     model.triangles.cpu(), result.albedo[0].clamp(0, 1).cpu())
        pictures = {"mask": (mask[0] >= 0.5).float().expand(3, -1, -1),
                    "recon": figures.render_over(image, result.image, result.region)[0]}
        for kind, picture in pictures.items():
            figures.save_png(picture, os.path.join(out, f"{name}_{kind}.png"))
        print(f"{index + 1}/{len(faces)} {name}", flush=True)
    return len(faces)


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------

def export_main(argv: list) -> None:
    """`python evaluate.py export ...`: the command line of `export`."""
    parser = argparse.ArgumentParser(
        prog="evaluate.py export", description="Reconstruct a folder of aligned-by-landmark "
        "photos with a trained run: .obj meshes, masks and reconstructions.")
    parser.add_argument("--run", required=True, help="run dir with a finished em stage")
    parser.add_argument("--images", required=True, help="folder of images")
    parser.add_argument("--csv", help="landmark CSV (default IMAGES/landmarks.csv)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    try:
        count = export(args.run, args.images, args.out, csv_path=args.csv, device=args.device)
    except (runs.RunError, data.BadInput) as error:
        sys.exit(f"error: {error}")
    print(f"wrote {count} reconstructions to {args.out}")


def sweep_main(argv: list) -> None:
    """`python evaluate.py sweep ...`: the command line of `sweep`."""
    parser = argparse.ArgumentParser(
        prog="evaluate.py sweep", description="Mask F1 of runs that each change one eta "
        "of a reference run (Supp. Fig. 4): experiments.py --group sweep trains them.")
    parser.add_argument("--run", "--runs", dest="runs", nargs="+", required=True)
    parser.add_argument("--count", type=int, default=50, help="faces per subset (default 50)")
    parser.add_argument("--subsets", nargs="+", default=list(SUBSETS), choices=SUBSETS)
    parser.add_argument("--out", default="results")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    try:
        sweep(args.runs, out=args.out, count=args.count, device=args.device,
              subsets=tuple(args.subsets))
    except runs.RunError as error:
        sys.exit(f"error: {error}")


def fitting_main(argv: list) -> None:
    """`python evaluate.py fitting ...`: the command line of `compare_fitting`."""
    parser = argparse.ArgumentParser(
        prog="evaluate.py fitting", description="Per-image fitting (fit.py: plain, robust, "
        "segmenter masks) vs the trained FOCUS networks on the same held-out faces.")
    parser.add_argument("--run", required=True, help="a FOCUS run dir with a finished em")
    parser.add_argument("--count", type=int, default=8, help="faces per subset (default 8)")
    parser.add_argument("--subsets", nargs="+", default=list(SUBSETS), choices=SUBSETS)
    parser.add_argument("--steps", type=int, default=300, help="fit steps after the "
                        "landmark-only start (default 300)")
    parser.add_argument("--landmark-steps", type=int, default=100)
    parser.add_argument("--out", default="results")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    try:
        if runs.read_config(args.run).variant != "focus":
            sys.exit(f"error: {args.run} has no segmenter (variant "
                     f"{runs.read_config(args.run).variant!r}): give a FOCUS run")
        rows = compare_fitting(args.run, count=args.count, subsets=tuple(args.subsets),
                               steps=args.steps, landmark_steps=args.landmark_steps,
                               device=args.device)
    except runs.RunError as error:
        sys.exit(f"error: {error}")
    markdown = table_fitting(rows) + "\n"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "fitting.md"), "w") as f:
        f.write(markdown)
    with open(os.path.join(args.out, "fitting.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print(markdown + f"wrote {args.out}/fitting.md and fitting.json")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Evaluate trained runs on held-out synthetic faces: the paper's Tab. 1, 3, "
                    "4, 5 as markdown and JSON, and figures. `evaluate.py export --help` for "
                    "reconstructing a folder of photos; `evaluate.py fitting --help` and "
                    "`evaluate.py sweep --help` for the other comparisons.")
    parser.add_argument("--run", "--runs", dest="runs", nargs="+", required=True,
                        help="run dirs (e.g. runs/cpu runs/cpu-mofa); rows follow each run's "
                             "variant")
    parser.add_argument("--count", type=int, default=100, help="faces per subset (default 100)")
    parser.add_argument("--subsets", nargs="+", default=list(SUBSETS), choices=SUBSETS)
    parser.add_argument("--out", default="results", help="output folder (default results)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-figures", action="store_true")
    return parser


def main(argv: Optional[list] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"export": export_main, "sweep": sweep_main, "fitting": fitting_main}
    if argv[:1] and argv[0] in commands:
        return commands[argv[0]](argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.count < 2:
        parser.error("--count must be >= 2")
    for run in args.runs:
        if not os.path.isdir(run):
            parser.error(f"{run}: no such run directory (train one with `python train.py "
                         f"--stage init` then `--stage em`, or `python experiments.py`)")
    try:
        evaluate_runs(args.runs, out=args.out, count=args.count, subsets=tuple(args.subsets),
                      device=args.device, with_figures=not args.no_figures)
    except runs.RunError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
