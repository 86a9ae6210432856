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
    where R's image error comes from (theta groups         diagnose              (diagnostic)
      swapped for the truth, group errors, mean face)

Test data are synthetic faces (`data.SyntheticFaces`) of five subsets, unoccluded, glasses,
scarf, hand (skin-coloured occluders, Fig. 7) and random, drawn with seed `EVAL_SEED`, which no
training stage uses; they stand in for CelebA-HQ, AR and NoW, which cannot be shipped. Every
sample carries its exact visible-face mask and neutral shape.

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
`python evaluate.py diagnose --run runs/cpu` says where R's image error comes from.
Tests: `python -m pytest -q tests/test_evaluate.py`.
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
import focus
import losses
import train
from losses import image_rmse  # the image metric, shared with training's held-out log

SUBSETS = ("unoccluded", "glasses", "scarf", "hand", "random")
OCCLUDED = ("glasses", "scarf", "hand", "random")
EVAL_SEED = 5_000  # training uses cfg.seed (0), the prior 1,000 and 2,000, previews 3,000
SKIN_SEED = 4_000  # the faces the skin-colour model is fitted on
VALIDATION_SEED = 7_000  # faces to choose settings on (docs/levers.md); never EVAL_SEED's
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


ROW_ORDER = ("MoFA", "Supervised", "cutout", "cutmix", "Skin detector", "Whole region",
             "Residual, oracle xi", "M_pre", "Pretrained", "Baseline", "Neighbor", "Perceptual",
             "FOCUS")
VARIANT_LABELS = {"mofa": "MoFA", "supervised": "Supervised", "cutout": "cutout",
                  "cutmix": "cutmix"}
ABLATION_LABELS = {"baseline": "Baseline", "neighbor": "Neighbor", "perceptual": "Perceptual"}


def methods_of_run(run_dir: str) -> List[Method]:
    """The rows one run provides (module docstring), given which stages it finished."""
    cfg = train.read_config(run_dir)
    finished = {stage for stage in ("init", "em")
                if os.path.exists(train.checkpoint_path(run_dir, stage))
                and train.load_checkpoint(train.checkpoint_path(run_dir, stage))["done"]}
    if "em" not in finished:
        raise train.RunError(f"{run_dir}: stage em is not finished (run or --resume it first)")
    if cfg.variant != "focus":
        return [Method(VARIANT_LABELS[cfg.variant], run_dir, "em", None)]
    if cfg.segmenter_losses != "full":
        return [Method(ABLATION_LABELS[cfg.segmenter_losses], run_dir, "em", "segmenter")]
    rows = [Method("FOCUS", run_dir, "em", "segmenter"),
            Method("Skin detector", run_dir, "em", "skin"),
            Method("Whole region", run_dir, "em", "whole"),
            Method("Residual, oracle xi", run_dir, "em", "oracle")]
    if "init" in finished:
        rows += [Method("Pretrained", run_dir, "init", "segmenter"),
                 Method("M_pre", run_dir, "init", "preliminary")]
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

def oracle_xi(autoencoder, sets: Dict[str, dict], *, device: str = "cpu",
              grid=tuple(np.geomspace(0.002, 2.0, 31))) -> float:
    """The threshold xi of M_pre (Eq. 10) with the best mean F1 over all test faces, for R's
    reconstructions: the ceiling of any mask that thresholds this R's colour residual. It is
    chosen on the test faces themselves (an oracle), so it is a diagnostic, not a method."""
    scores = {xi: [] for xi in grid}
    with torch.no_grad(), focus.eval_mode(autoencoder):
        for faces in sets.values():
            for first in range(0, faces["image"].shape[0], 32):
                images = faces["image"][first:first + 32].to(device)
                truth = faces["visible_face"][first:first + 32].to(device)
                out = autoencoder(images)
                for xi in grid:
                    mask = losses.preliminary_mask(images, out.image, out.region, xi=xi)
                    scores[xi].append(segmentation_scores(mask, truth, out.region)["F1"].cpu())
    mean_f1 = {xi: float(np.nanmean(torch.cat(v).numpy())) for xi, v in scores.items()}
    return max(mean_f1, key=mean_f1.get)


def predict(method: Method, images: torch.Tensor, autoencoder, segmenter, cfg,
            skin_model: Optional[SkinColourModel], xi: Optional[float] = None) -> dict:
    """R's reconstruction of `images` and the method's face mask (None without one); `xi`
    replaces cfg.xi for the "oracle" mask."""
    with torch.no_grad(), focus.eval_mode(autoencoder, segmenter):
        out = autoencoder(images)
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
        corrected = train.apply_misfit_prior(pred["neutral"], prior)
        errors_mp = shape_errors(corrected, faces["neutral"])
        rows.update(shape_mp=errors_mp.mean(dim=1), shape_mp_vertices=errors_mp.float())
    if pred["mask"] is not None:
        rows.update(segmentation_scores(pred["mask"], faces["visible_face"], pred["region"]))
    return rows


def evaluate_method(method: Method, sets: Dict[str, dict], *, prior: Optional[torch.Tensor],
                    skin_model: Optional[SkinColourModel], device: str = "cpu",
                    batch_size: int = 32, models=None) -> dict:
    """Per-image metrics of one method on every subset.

    Returns:
        {subset: {"rmse": (n,), "shape": (n,) mean vertex error per image, "shape_vertices":
        (n, V) float32, ["shape_mp", "shape_mp_vertices"] with the prior, [ACC, PPV, TPR, F1]
        with a mask}} as numpy arrays, plus "seconds_per_image" (R forward and mask).
    """
    cfg, autoencoder, segmenter = models or train.load_models(method.run_dir, stage=method.stage,
                                                              device=device)
    results, seconds, images_seen = {}, 0.0, 0
    xi = oracle_xi(autoencoder, sets, device=device) if method.mask == "oracle" else None
    warm = next(iter(sets.values()))["image"][:2].to(device)
    predict(method, warm, autoencoder, segmenter, cfg, skin_model, xi)  # builds cached mesh data
    for subset, faces in sets.items():
        per = {}
        for first in range(0, faces["image"].shape[0], batch_size):
            part = {k: v[first:first + batch_size].to(device) for k, v in faces.items()}
            tic = time.perf_counter()
            pred = predict(method, part["image"], autoencoder, segmenter, cfg, skin_model, xi)
            seconds += time.perf_counter() - tic
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


def _own_reconstruction(rows: Dict[str, dict]) -> Dict[str, dict]:
    """The rows with their own R: RMSE and shape of a mask-only row repeat its R's row."""
    return {label: s for label, s in rows.items() if label not in MASK_ONLY}


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
    family = [l for l in ("Whole region", "Residual, oracle xi", "M_pre", "Pretrained",
                          "Baseline", "Neighbor", "Perceptual", "FOCUS") if l in rows]
    groups = [g for g in SUBSETS if any(g in rows[l] for l in family)]
    head = ("| method | " + " | ".join(f"{g} F1" for g in groups)
            + " | shape median | mean | std |")
    lines = [head, "|---" * (len(groups) + 4) + "|"]
    for label in family:
        s = rows[label]
        f1 = [_pm(s[g]["F1"]) if g in s and "F1" in s[g] else "-" for g in groups]
        shape = [_f(s["overall"]["shape_vertex"][k]) if label not in MASK_ONLY else "-"
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
                                    f"(perceptual = 'none'): it is the Neighbor ablation."
                                    if info.get("without_f") else ""),
             *([f"Residual, oracle xi: xi = {rows['Residual, oracle xi']['xi']:.3g} "
                f"(M_pre uses {info['xi']:g})."] if "Residual, oracle xi" in rows else []),
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
    speed += [f"| {label} | {1000 * s['seconds_per_image']:.1f} |" for label, s in rows.items()]
    parts.append("\n".join(speed))
    return "\n\n".join(parts) + "\n"


# ----------------------------------------------------------------------------------------------
# figures
# ----------------------------------------------------------------------------------------------

def render_over(images: torch.Tensor, rendered: torch.Tensor,
                region: torch.Tensor) -> torch.Tensor:
    """The render pasted over the images inside its region: (B, 3, H, W)."""
    return images * (1 - region) + rendered.clamp(0, 1) * region


def outliers_in_red(images: torch.Tensor, mask: torch.Tensor,
                    region: torch.Tensor) -> torch.Tensor:
    """Pixels of the rendered region the (rounded) mask rejects, tinted red: (B, 3, H, W)."""
    outlier = region * (mask < 0.5).to(images.dtype)  # (B, 1, H, W)
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    return images * (1 - 0.6 * outlier) + 0.6 * outlier * red


def figure_qualitative(path: str, methods: List[Method], sets: Dict[str, dict], *,
                       skin_model, models, per_subset: int = 2, device: str = "cpu") -> None:
    """Fig. 5 / 7: one row per face (two per subset), columns: target, then per method its
    reconstruction over the target and, for methods with a mask, the outliers in red.
    `models(method)` gives the method's (cfg, R, S)."""
    from matplotlib.figure import Figure
    subsets = [s for s in SUBSETS if s in sets]
    images = torch.cat([sets[s]["image"][:per_subset] for s in subsets])  # (N, 3, H, W)
    columns = [("target", images)]
    for method in methods:
        cfg, autoencoder, segmenter = models(method)
        pred = {k: v.cpu() if v is not None else None for k, v in predict(
            method, images.to(device), autoencoder, segmenter, cfg, skin_model).items()}
        if method.mask in (None, "segmenter") and method.label != "Pretrained":
            columns.append((f"{method.label}\nreconstruction",
                            render_over(images, pred["image"], pred["region"])))
        if pred["mask"] is not None:
            columns.append((f"{method.label}\noutliers (red)",
                            outliers_in_red(images, pred["mask"], pred["region"])))
    rows = images.shape[0]
    fig = Figure(figsize=(1.2 * len(columns), 1.2 * rows + 0.6))
    axes = fig.subplots(rows, len(columns), squeeze=False)
    for c, (title, pictures) in enumerate(columns):
        for r in range(rows):
            ax = axes[r][c]
            ax.imshow(pictures[r].permute(1, 2, 0).clamp(0, 1).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=7)
            if c == 0:
                ax.set_ylabel(subsets[r // per_subset], fontsize=7)
    fig.subplots_adjust(left=0.03, right=0.99, top=1 - 0.5 / (1.2 * rows + 0.6), bottom=0.01,
                        wspace=0.03, hspace=0.03)
    fig.savefig(path, dpi=100)


def figure_misfit_prior(path: str, prior: torch.Tensor, face_model) -> None:
    """Fig. 4: E_MP's x, y, z components (mm) on the mean face, frontal view."""
    from matplotlib.figure import Figure
    mean = face_model.mean_shape.detach().cpu().numpy()  # (V, 3)
    triangles = face_model.triangles.cpu().numpy()
    values = prior.cpu().numpy()  # (V, 3)
    limit = float(np.abs(values).max()) or 1.0
    fig = Figure(figsize=(10, 3.8))
    axes = fig.subplots(1, 3)
    for k, ax in enumerate(axes):
        art = ax.tripcolor(mean[:, 0], mean[:, 1], triangles, values[:, k], shading="gouraud",
                           cmap="coolwarm", vmin=-limit, vmax=limit)
        ax.set_aspect("equal")
        ax.set_axis_off()
        ax.set_title(f"E_MP {'xyz'[k]} (mm)")
    fig.colorbar(art, ax=list(axes), shrink=0.8)
    fig.savefig(path, dpi=90)


def figure_per_subset(path: str, rows: Dict[str, dict]) -> None:
    """Per-subset bars: mask F1 (methods with a mask) and mean shape error (all methods)."""
    from matplotlib.figure import Figure
    subsets = [s for s in SUBSETS if any(s in r for r in rows.values())]
    fig = Figure(figsize=(12, 4))
    axes = fig.subplots(1, 2)
    for ax, (metric, title) in zip(axes, (("F1", "mask F1 (higher is better)"),
                                          ("shape", "shape error, mean mm (lower is better)"))):
        shown = rows if metric == "F1" else _own_reconstruction(rows)
        labels = [l for l, r in shown.items() if metric in r.get("overall", {})]
        width = 0.8 / max(len(labels), 1)
        for i, label in enumerate(labels):
            means = [rows[label][s][metric]["mean"] for s in subsets]
            stds = [rows[label][s][metric]["std"] for s in subsets]
            x = np.arange(len(subsets)) + (i - (len(labels) - 1) / 2) * width
            ax.bar(x, means, width, yerr=stds, label=label, capsize=2)
        ax.set_xticks(np.arange(len(subsets)), subsets)
        ax.set_title(title)
        if metric == "F1":
            ax.set_ylim(0.5, 1.0)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


# ----------------------------------------------------------------------------------------------
# the whole evaluation
# ----------------------------------------------------------------------------------------------

def evaluate_runs(run_dirs: List[str], *, out: str = "results", count: int = 100,
                  subsets=SUBSETS, device: str = "cpu", figures: bool = True) -> dict:
    """Evaluate every row the runs provide; write tables.md, results.json and figures to `out`."""
    methods = sorted((m for r in run_dirs for m in methods_of_run(r)),
                     key=lambda m: ROW_ORDER.index(m.label))
    if len({m.label for m in methods}) != len(methods):
        raise train.RunError("two runs give the same row; pass each variant once")
    cfgs = {r: train.read_config(r) for r in run_dirs}
    reference = cfgs[run_dirs[0]]
    for r, cfg in cfgs.items():
        mine, theirs = ((c.face_model, c.image_size, c.aligned_faces) for c in (cfg, reference))
        if mine != theirs:
            raise train.RunError(f"{r} uses face model, size, aligned faces {mine}, {run_dirs[0]}"
                                 f" {theirs}: evaluate them separately")
    face_model = bfm.load_face_model(reference.face_model)
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
    loaded = {}  # (run dir, stage) -> (cfg, R, S): several rows share a checkpoint

    def models(method: Method):
        key = (method.run_dir, method.stage)
        if key not in loaded:
            loaded[key] = train.load_models(method.run_dir, stage=method.stage, device=device)
        return loaded[key]

    rows, tests, raw = {}, {}, {}
    for method in methods:
        print(f"  {method.label:<14} {method.run_dir} ({method.stage})", flush=True)
        raw[method.label] = evaluate_method(method, sets, prior=prior, skin_model=skin_model,
                                            device=device, models=models(method))
        rows[method.label] = summarize(raw[method.label])
        if prior is not None and method.mask in (None, "segmenter") and method.label != \
                "Pretrained":
            tests[method.label] = paired_t_test(pooled(raw[method.label], subsets, "shape"),
                                                pooled(raw[method.label], subsets, "shape_mp"))
    info = {"count": count, "subsets": list(subsets), "size": reference.image_size,
            "xi": reference.xi,
            "face_model": reference.face_model, "seed": EVAL_SEED, "runs": run_dirs,
            "misfit_prior": prior_path, "seconds": round(time.perf_counter() - tic, 1),
            "without_f": any(c.perceptual == "none" and c.variant == "focus"
                             and c.segmenter_losses == "full" for c in cfgs.values())}
    markdown = tables_markdown(rows, tests, info)
    with open(os.path.join(out, "tables.md"), "w") as f:
        f.write(markdown)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"info": info, "rows": rows, "misfit_prior_t_test": tests}, f, indent=1)
    if figures:
        figure_per_subset(os.path.join(out, "per_subset.png"), rows)
        shown = [m for m in methods if m.label in ("MoFA", "Supervised", "Skin detector",
                                                   "Pretrained", "FOCUS")]
        figure_qualitative(os.path.join(out, "qualitative.png"), shown, sets,
                           skin_model=skin_model, models=models, device=device)
        if prior is not None:
            figure_misfit_prior(os.path.join(out, "misfit_prior.png"), prior, face_model)
        for r in run_dirs:
            progress = os.path.join(r, "figures", "em_progress.png")
            if os.path.exists(progress) and cfgs[r].variant == "focus" \
                    and cfgs[r].segmenter_losses == "full":
                shutil.copyfile(progress, os.path.join(out, "em_progress.png"))
    print(markdown)
    print(f"wrote {out}/tables.md, {out}/results.json and figures "
          f"({time.perf_counter() - tic:.0f} s)")
    return {"info": info, "rows": rows, "tests": tests}


# ----------------------------------------------------------------------------------------------
# where R's image error comes from
# ----------------------------------------------------------------------------------------------

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
        cfg: a `train.Config` (lambda_pixel, lambda_lm, lambda_reg, pixel_form).
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
    cfg, autoencoder, _ = train.load_models(run_dir, stage=stage, device=device)
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
        raise train.RunError(f"a sweep run must differ from the reference in one of {SWEPT} "
                             f"only, got {differ}")
    return differ[0], getattr(cfg, differ[0])


def sweep(run_dirs: List[str], *, out: str = "results", count: int = 50, device: str = "cpu",
          subsets=SUBSETS) -> List[dict]:
    """Mask F1 of the FOCUS segmenter of runs that vary one eta each around a reference run
    (the run that differs from no other in its settings, e.g. experiments.py's sweep-reference).

    Writes sweep.md, sweep.json and sweep.png (F1 against each eta, Supp. Fig. 4) to `out`.
    """
    cfgs = {r: train.read_config(r) for r in run_dirs}
    references = [r for r in run_dirs if all(
        len([f for f in dataclasses.fields(c) if getattr(c, f.name) != getattr(cfgs[r], f.name)])
        <= 1 for c in cfgs.values())]
    if not references:
        raise train.RunError("no reference run: every sweep run must differ from one run (the "
                             "reference) in a single eta")
    reference = cfgs[references[0]]
    model = bfm.load_face_model(reference.face_model)
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
    figure_sweep(os.path.join(out, "sweep.png"), points)
    print("\n".join(lines) + f"\nwrote {out}/sweep.md, sweep.json and sweep.png")
    return points


def figure_sweep(path: str, points: List[dict]) -> None:
    """Supp. Fig. 4: mask F1 against each swept eta (log axis), reference marked."""
    from matplotlib.figure import Figure
    names = list(dict.fromkeys(p["eta"] for p in points))
    fig = Figure(figsize=(4 * max(len(names), 1), 3.2))
    axes = fig.subplots(1, max(len(names), 1), squeeze=False)[0]
    for ax, name in zip(axes, names):
        chosen = [p for p in points if p["eta"] == name]
        for group, style in (("occluded", "o-"), ("unoccluded", "s--")):
            ax.plot([p["value"] for p in chosen], [p.get(group, float("nan")) for p in chosen],
                    style, label=group)
        for p in chosen:
            if p["reference"]:
                ax.axvline(p["value"], color="grey", lw=0.8)
        ax.set_xscale("log")
        values = sorted({p["value"] for p in chosen})
        ax.set_xticks(values, [f"{v:g}" for v in values])
        ax.minorticks_off()
        ax.set_xlabel(name)
        ax.set_ylabel("mask F1")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


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
    import fit as fitting
    cfg, autoencoder, segmenter = train.load_models(run_dir, stage="em", device=device)
    model = autoencoder.face_model
    sets = test_sets(model, cfg.image_size, count, subsets=subsets, aligned=cfg.aligned_faces)
    focus_method = Method("FOCUS", run_dir, "em", "segmenter")
    raw = {"FOCUS (one forward pass)": evaluate_method(
        focus_method, sets, prior=None, skin_model=None, device=device,
        models=(cfg, autoencoder, segmenter))}
    for mode in fitting.MODES:
        label = {"plain": "fit, plain (every pixel)", "robust": "fit, robust (per-image EM)",
                 "segmenter": "fit, FOCUS segmenter masks"}[mode]
        results, seconds = {}, 0.0
        for subset, faces in sets.items():
            images = faces["image"].to(device)
            tic = time.perf_counter()
            result = fitting.fit(images, faces["landmarks"].to(device), model, mode=mode,
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
    from PIL import Image
    cfg, autoencoder, segmenter = train.load_models(run_dir, stage="em", device=device)
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
                    "recon": render_over(image, result.image, result.region)[0]}
        for kind, picture in pictures.items():
            array = (picture.permute(1, 2, 0).clamp(0, 1).cpu().numpy() * 255).round()
            Image.fromarray(array.astype(np.uint8)).save(os.path.join(out, f"{name}_{kind}.png"))
        print(f"{index + 1}/{len(faces)} {name}", flush=True)
    return len(faces)


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------

def diagnose_main(argv: list) -> None:
    """`python evaluate.py diagnose ...`: the CLI of `diagnose_run`."""
    parser = argparse.ArgumentParser(
        prog="evaluate.py diagnose", description="Where R's image error comes from: RMSE "
        "with each theta group replaced by the ground truth, the error of each group, the "
        "landmark error and the mean-face shape floor, on held-out synthetic faces.")
    parser.add_argument("--run", required=True, help="run dir")
    parser.add_argument("--stage", default="em", choices=train.STAGES,
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
    except train.RunError as error:
        sys.exit(f"error: {error}")
    print(f"wrote {args.out}/diagnosis.md and diagnosis.json")


def main(argv: Optional[list] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["export"]:
        parser = argparse.ArgumentParser(
            prog="evaluate.py export", description="Reconstruct a folder of aligned-by-landmark "
            "photos with a trained run: .obj meshes, masks and reconstructions.")
        parser.add_argument("--run", required=True, help="run dir with a finished em stage")
        parser.add_argument("--images", required=True, help="folder of images")
        parser.add_argument("--csv", help="landmark CSV (default IMAGES/landmarks.csv)")
        parser.add_argument("--out", required=True)
        parser.add_argument("--device", default="cpu")
        args = parser.parse_args(argv[1:])
        try:
            count = export(args.run, args.images, args.out, csv_path=args.csv,
                           device=args.device)
        except (train.RunError, data.BadInput) as error:
            sys.exit(f"error: {error}")
        print(f"wrote {count} reconstructions to {args.out}")
        return
    if argv[:1] == ["sweep"]:
        parser = argparse.ArgumentParser(
            prog="evaluate.py sweep", description="Mask F1 of runs that each change one eta "
            "of a reference run (Supp. Fig. 4): experiments.py --group sweep trains them.")
        parser.add_argument("--run", "--runs", dest="runs", nargs="+", required=True)
        parser.add_argument("--count", type=int, default=50, help="faces per subset (default 50)")
        parser.add_argument("--subsets", nargs="+", default=list(SUBSETS), choices=SUBSETS)
        parser.add_argument("--out", default="results")
        parser.add_argument("--device", default="cpu")
        args = parser.parse_args(argv[1:])
        try:
            sweep(args.runs, out=args.out, count=args.count, device=args.device,
                  subsets=tuple(args.subsets))
        except train.RunError as error:
            sys.exit(f"error: {error}")
        return
    if argv[:1] == ["diagnose"]:
        return diagnose_main(argv[1:])
    if argv[:1] == ["fitting"]:
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
        args = parser.parse_args(argv[1:])
        try:
            if train.read_config(args.run).variant != "focus":
                sys.exit(f"error: {args.run} has no segmenter (variant "
                         f"{train.read_config(args.run).variant!r}): give a FOCUS run")
            rows = compare_fitting(args.run, count=args.count, subsets=tuple(args.subsets),
                                   steps=args.steps, landmark_steps=args.landmark_steps,
                                   device=args.device)
        except train.RunError as error:
            sys.exit(f"error: {error}")
        markdown = table_fitting(rows) + "\n"
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "fitting.md"), "w") as f:
            f.write(markdown)
        with open(os.path.join(args.out, "fitting.json"), "w") as f:
            json.dump(rows, f, indent=1)
        print(markdown + f"wrote {args.out}/fitting.md and fitting.json")
        return
    parser = argparse.ArgumentParser(
        description="Evaluate trained runs on held-out synthetic faces: the paper's Tab. 1, 3, "
                    "4, 5 as markdown and JSON, and figures. `evaluate.py export --help` for "
                    "reconstructing a folder of photos.")
    parser.add_argument("--run", "--runs", dest="runs", nargs="+", required=True,
                        help="run dirs (e.g. runs/cpu runs/cpu-mofa); rows follow each run's "
                             "variant")
    parser.add_argument("--count", type=int, default=100, help="faces per subset (default 100)")
    parser.add_argument("--subsets", nargs="+", default=list(SUBSETS), choices=SUBSETS)
    parser.add_argument("--out", default="results", help="output folder (default results)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-figures", action="store_true")
    args = parser.parse_args(argv)
    if args.count < 2:
        parser.error("--count must be >= 2")
    for run in args.runs:
        if not os.path.isdir(run):
            parser.error(f"{run}: no such run directory (train one with `python train.py "
                         f"--stage init` then `--stage em`, or `python experiments.py`)")
    try:
        evaluate_runs(args.runs, out=args.out, count=args.count, subsets=tuple(args.subsets),
                      device=args.device, figures=not args.no_figures)
    except train.RunError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
