"""Training FOCUS: the unsupervised initialisation, the EM alternation and the misfit prior.

Paper map (Li et al., CVPR 2023; "Supp." is its supplement):

    stage   what                                                         paper
    init    R trained with the preliminary mask M_pre (Eq. 10) in         Sec. 3.3
            L_pixel, then S pre-trained on M_pre as labels (BCE)
    em      alternate: S with L_S (R frozen, eval mode), then R with      Sec. 3.2, Supp. A.2
            L_R (S frozen, M detached); `phase_at(step, cfg)`
    prior   R_syn on plain synthetic faces (no occluders, no make-up)     Sec. 3.4, Eq. 11
            with the unmasked L_pixel, then E_MP = mean_i (P_i - T_i)
            over N held-out samples, saved to misfit_prior.pt

What is here, top to bottom: the phase schedule (`phase_at`, `init_phase_at`), data (batch
order, cutout / cutmix), optimisers, one loss function per phase, the misfit prior, the stage
loop (`train_stage`, `train_loop`) and the CLI (`main`). The settings (`Config`, its presets
and every seed) are in config.py, the run directory (checkpoints, config.json, logs,
`build_models`, `load_models`) in runs.py, and the figures in figures.py.

Conventions: B batch, V vertices, H x W image. Images (B, 3, H, W) in [0, 1], masks
(B, 1, H, W), landmarks (B, 68, 2) pixels. One step = one optimiser step of one network. The
mask M of a phase always means the face mask inside the rendered region, M * S_R; the logged
kept-face fraction is mean_b S_M / S_R (= -L_area).

Variants (config values on the same code path; the paper's baselines and ablations, Sec. 4):
- `variant`: "focus" (default); "mofa" (no mask: every rendered pixel is fitted, no segmenter);
  "supervised" (the ground-truth `visible_face` mask of the data, no segmenter); "cutout" and
  "cutmix" ("supervised" plus the augmentation: a random rectangle is blanked, or pasted from
  another image of the batch, and removed from the ground-truth mask). Without a segmenter the
  init stage trains only R and every EM step is an autoencoder step.
- `segmenter_losses`: "full" (L_S as written), "baseline" (no neighbour and no perceptual
  losses: L_nbr with a 1 x 1 window, i.e. the pixel loss of Eq. 5), "neighbor" (L_nbr only, no
  F), "perceptual" (L_dist and L_presv only, eta_1 = 0). All keep L_area and L_bin.

Run directory `runs/<name>/`: config.json; <stage>.pt checkpoints (models, optimisers,
schedulers, RNG, step = data position; written atomically, one at step 0); misfit_prior.pt;
log.csv (losses keyed by paper names, interval means); log.txt (the printed progress lines and
warnings); figures/ (target | reconstruction | mask | overlay grids, the EM progression,
loss curves, and R's image RMSE on 32 clean held-out faces, logged as `rmse_heldout` at every
log line so that an underfit R shows itself while it trains). A run killed at any moment
continues with `--resume` and ends with the same parameters as an uninterrupted run
(deterministic CPU: same threads, same device).

Deviations from the paper (docs/deviations.md lists them all):
- Presets. `paper` is the published schedule (224 x 224, batch 12, Adadelta lr 0.1 x 0.99 every
  5k steps, segmenter lr x 0.06, 300k init steps, 200k EM steps, 25k autoencoder steps of every
  30k). The default `cpu` preset trains smaller networks (width multiplier 16 of 64) on 64 x 64
  images with Adam, for a few thousand steps, and without the perceptual network F: dlib's F
  crops every face to 150 x 150, which costs about 4 s per forward + backward of a batch of 16
  on 2 CPU cores (the segmenter step needs two of them), so `cpu` trains the paper's 'Neighbor'
  ablation (Sec. 4.4). `cpu` also takes the official code's unsquared L_pixel (the form the
  paper's weights were tuned with) with lambda_3 = 2e-3 (L_lm is in squared pixels): with the
  paper's squared distance the landmark term outweighed the pixel term about thirty-fold and R
  learned little but the landmarks (docs/levers.md), and half of its training faces are
  occluded (`train_occluded`).
- R refined (`refine_steps`, `refine_landmark_steps`; `r_render`): at the `cpu` budget the
  encoder predicts pose and light but the mean identity, expression and albedo, so its
  residual is mostly misfit and S learns nothing from it. The `cpu` preset refines the
  encoder's estimate by 30 landmark + 30 fitting steps (`fit.refine`) wherever S looks at R:
  S's pre-training on M_pre, its L_S phase, and the mask of R's em phase. The encoder itself
  still trains on its own one-pass render with the paper's L_R (plus L_distill towards the
  refined theta when `lambda_distill` > 0, not in the paper). With this R the paper's eta
  (0.5, 10) work; the one-pass R needed them re-balanced (eta_area 4, eta_bin 1). 0 steps is
  the paper's one forward pass (docs/levers.md, fifth round).
- The oracle R (`r_source` "oracle", `oracle_noise`): each training face's own theta, with
  noise on identity, expression and albedo; only S trains (init: its pre-training, em: its
  L_S phases). Not a method: it measures how well R must fit for S to learn outliers.
- An optional white-light prior L_mono (`lambda_mono`, Deep3D's; not in the paper, 0 by
  default) keeps the light from tinting the face with an occluder's colour.
- EM order: segmenter phase first in every cycle (Sec. 3.2 describes S first; the official code
  does the same). Each stage starts fresh optimisers and schedules; a schedule counts the steps
  of its own network.
- The segmenter's pre-training is a plain BCE on probabilities against M_pre, averaged over the
  rendered pixels (the official code applies a second sigmoid to the probabilities: a bug).
- The official code lets the gradient of L_pixel flow through M into the encoder in the
  autoencoder phase; we detach M (`detach_mask=True`; False reproduces the leak).
- Init of the segmenter is a separate, counted part of the init stage (`init_seg_steps`); the
  paper gives no length for it.
- E_MP is computed on the neutral (identity-only) shape, the geometry that is evaluated and
  corrected at test time (Sec. 3.4 leaves open which geometry).

Run: `python train.py --stage all` (cpu preset, embedded toy face model, synthetic data);
`python train.py --help`; test: `python -m pytest -q tests/test_train.py`.
"""
import argparse
import dataclasses
import os
import sys
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as TF

import bfm
import data
import face_models
import figures
import fit
import focus
import losses
import perceptual
import runs
from config import (HELDOUT_FACES, HELDOUT_SEED, ORACLE_NOISE_SEED, PRESETS, PREVIEW_SEED,
                    PRIOR_EVAL_SEED, PRIOR_TRAIN_SEED, SEGMENTER_LOSSES, STAGE_SALT, STAGES,
                    VARIANTS, Config, has_segmenter, make_config, parse_overrides, refines)
from runs import RunError


# ----------------------------------------------------------------------------------------------
# the schedule
# ----------------------------------------------------------------------------------------------

def phase_at(step: int, cfg: Config) -> str:
    """Which network the EM stage trains at `step` (Sec. 3.2, Supp. A.2): pure.

    Every round of `em_cycle` steps starts with `em_cycle - em_ae_steps` segmenter steps and
    ends with `em_ae_steps` autoencoder steps (paper: 5k + 25k of every 30k). Variants without
    a segmenter train the autoencoder at every step.

    Returns:
        "segmenter" or "autoencoder".
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if not has_segmenter(cfg):
        return "autoencoder"
    if cfg.r_source == "oracle":  # R is given: only S trains
        return "segmenter"
    in_round = step % cfg.em_cycle
    return "segmenter" if in_round < cfg.em_cycle - cfg.em_ae_steps else "autoencoder"


def init_phase_at(step: int, cfg: Config) -> str:
    """The init stage (Sec. 3.3): `init_ae_steps` of R on M_pre, then S's pre-training."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if cfg.r_source == "oracle":  # R is given: only S trains
        return "pretrain"
    return "autoencoder" if step < cfg.init_ae_steps or not has_segmenter(cfg) else "pretrain"


def stage_steps(stage: str, cfg: Config) -> int:
    """Number of optimiser steps of a stage; with the oracle R only S's steps of it."""
    if cfg.r_source == "oracle":
        if stage == "prior":
            raise RunError("the oracle R has no encoder to train a misfit prior for: run the "
                           "stages init and em")
        rounds, rest = divmod(cfg.em_steps, cfg.em_cycle)
        segmenter_steps = cfg.em_cycle - cfg.em_ae_steps
        return {"init": cfg.init_seg_steps,
                "em": rounds * segmenter_steps + min(rest, segmenter_steps)}[stage]
    if stage == "init":
        return cfg.init_ae_steps + (cfg.init_seg_steps if has_segmenter(cfg) else 0)
    return {"em": cfg.em_steps, "prior": cfg.prior_steps}[stage]


def stage_phase(stage: str, step: int, cfg: Config) -> str:
    if stage == "init":
        return init_phase_at(step, cfg)
    return phase_at(step, cfg) if stage == "em" else "autoencoder"


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------

def make_dataset(cfg: Config, face_model: bfm.MorphableModel, *, seed: int, subset: str = "train",
                 length: Optional[int] = None, **ranges):
    """The training data: synthetic faces (default; `ranges` go to `data.SyntheticFaces`) or an
    image folder (`cfg.data` = DIR)."""
    if cfg.data == "synthetic":
        return data.SyntheticFaces(face_model=face_model, size=cfg.image_size,
                                   length=length or cfg.train_length, seed=seed, subset=subset,
                                   aligned=cfg.aligned_faces, **ranges)
    if not os.path.isdir(cfg.data):
        raise RunError(f"--data must be 'synthetic' or a folder of images with landmarks.csv, "
                       f"got {cfg.data!r} (no such folder)")
    return data.ImageFolderFaces(cfg.data, size=cfg.image_size, augment=True, seed=seed)


def batch_indices(step: int, cfg: Config, length: int, *, salt: int) -> list:
    """Dataset indices of the batch at `step`: epochs of seeded permutations (pure, resumable)."""
    first = step * cfg.batch_size
    indices = []
    for k in range(first, first + cfg.batch_size):
        epoch, position = divmod(k, length)
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + salt * 10_007 + epoch)
        indices.append(int(torch.randperm(length, generator=g)[position]))
    return indices


def load_batch(dataset, indices: list, device: torch.device) -> dict:
    """The samples at `indices`, stacked, tensors on `device`."""
    if hasattr(dataset, "batch"):
        batch = dataset.batch(indices)
    else:
        batch = torch.utils.data.default_collate([dataset[i] for i in indices])
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def random_boxes(B: int, H: int, W: int, g: torch.Generator, device) -> torch.Tensor:
    """One axis-aligned rectangle per image, sides 20-50 % of the image: (B, 1, H, W) in {0, 1}."""
    sides = 0.2 + 0.3 * torch.rand(B, 2, generator=g)  # (B, 2)
    h = (sides[:, 0] * H).long()  # (B,)
    w = (sides[:, 1] * W).long()  # (B,)
    y0 = (torch.rand(B, generator=g) * (H - h + 1)).long()  # (B,)
    x0 = (torch.rand(B, generator=g) * (W - w + 1)).long()  # (B,)
    ys = torch.arange(H).view(1, H, 1)  # (1, H, 1)
    xs = torch.arange(W).view(1, 1, W)  # (1, 1, W)
    inside = ((ys >= y0.view(B, 1, 1)) & (ys < (y0 + h).view(B, 1, 1))
              & (xs >= x0.view(B, 1, 1)) & (xs < (x0 + w).view(B, 1, 1)))  # (B, H, W)
    return inside.unsqueeze(1).float().to(device)  # (B, 1, H, W)


def augment(batch: dict, cfg: Config, step: int, *, salt: int) -> dict:
    """Cutout (DeVries & Taylor 2017) or CutMix (Yun et al. 2019) for those variants (Sec. 4.1).

    Cutout blanks a random rectangle to 0; CutMix pastes it from the next image of the batch.
    Either way the rectangle leaves the ground-truth face mask `visible_face`. Seeded by step.
    """
    if cfg.variant not in ("cutout", "cutmix"):
        return batch
    images, visible = batch["image"], ground_truth_mask(batch, cfg)
    B, _, H, W = images.shape
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + salt * 10_007 + step + 7)
    box = random_boxes(B, H, W, g, images.device)  # (B, 1, H, W)
    fill = torch.zeros_like(images) if cfg.variant == "cutout" else images.roll(1, dims=0)
    # I' = (1 - box) I + box fill; M_gt' = (1 - box) M_gt
    return {**batch, "image": images * (1 - box) + fill * box,  # (B, 3, H, W)
            "visible_face": visible * (1 - box)}  # (B, 1, H, W)


def ground_truth_mask(batch: dict, cfg: Config) -> torch.Tensor:
    """The data's visible-face mask (B, 1, H, W), which the supervised variants need."""
    if "visible_face" not in batch:
        raise RunError(f"variant {cfg.variant!r} needs ground-truth masks: synthetic data or "
                       f"<name>_visible_skin_mask.png files beside the images")
    return batch["visible_face"]


# ----------------------------------------------------------------------------------------------
# optimisers
# ----------------------------------------------------------------------------------------------

def make_optimizer(parameters, lr: float, cfg: Config, steps: int = 1):
    """Adadelta (paper, Supp. A.2) or Adam, with its schedule over the network's `steps` steps
    of the stage: the paper's step decay (x lr_decay every lr_decay_every steps) or, with
    `lr_schedule` "cosine", lr (1 + cos(pi t / steps)) / 2, which ends a short stage at 0."""
    parameters = list(parameters)
    if cfg.optimizer == "adadelta":
        optimizer = torch.optim.Adadelta(parameters, lr=lr)
    else:
        optimizer = torch.optim.Adam(parameters, lr=lr)
    if cfg.lr_schedule == "cosine":
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))
    else:
        schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_decay_every,
                                                   gamma=cfg.lr_decay)
    return optimizer, schedule


def phase_steps(stage: str, cfg: Config) -> dict:
    """{phase: number of steps of that phase in the stage}."""
    counts = {}
    for step in range(stage_steps(stage, cfg)):
        phase = stage_phase(stage, step, cfg)
        counts[phase] = counts.get(phase, 0) + 1
    return counts


def make_optimizers(stage: str, autoencoder, segmenter, cfg: Config) -> dict:
    """One (optimizer, schedule) per phase of the stage: each network has its own (Sec. 3.2)."""
    steps = phase_steps(stage, cfg)
    out = {"autoencoder": make_optimizer(autoencoder.encoder.parameters(), cfg.lr, cfg,
                                         steps.get("autoencoder", 1))}
    if segmenter is not None and stage in ("init", "em"):
        key = "pretrain" if stage == "init" else "segmenter"
        out[key] = make_optimizer(segmenter.parameters(), cfg.lr * cfg.seg_lr_factor, cfg,
                                  steps.get(key, 1))
    return out


def set_phase(phase: str, autoencoder, segmenter) -> None:
    """Freeze the network the phase does not train (eval mode, no parameter gradients)."""
    train_segmenter = phase in ("segmenter", "pretrain")
    autoencoder.train(not train_segmenter)
    autoencoder.encoder.requires_grad_(not train_segmenter)
    if segmenter is not None:
        segmenter.train(train_segmenter)
        segmenter.requires_grad_(train_segmenter)


def perceptual_features(F, landmarks: torch.Tensor, *, which: str) -> Optional[Callable]:
    """images -> F(images, lm_T).<which>, aligned with the target's landmarks (None without F)."""
    if F is None:
        return None
    return lambda images: getattr(F(images, landmarks), which)


# ----------------------------------------------------------------------------------------------
# one loss per phase
# ----------------------------------------------------------------------------------------------

def kept_fraction(mask: torch.Tensor, region: torch.Tensor) -> float:
    """mean_b S_M / S_R, the share of the rendered face the mask keeps (= -L_area)."""
    return -losses.area_loss(mask.detach(), region).item()


def r_render(batch: dict, autoencoder, segmenter, cfg: Config, *, stage: str,
             step: int = 0) -> focus.AutoencoderOutput:
    """R's render of a batch, without gradient: what S sees in its phases and what the mask of
    R's own phase is computed from.

    - `r_source` "oracle": each face's own theta, with `oracle_noise` (`focus.oracle_theta`);
      not in the paper, it shows how well R must fit for S to learn (docs/levers.md).
    - `refine_steps` K > 0: the encoder's estimate refined by K fitting steps of L_R
      (`fit.refine`), the pixel term masked as the stage masks it: M_pre in init, S's mask in
      em. A CPU-scale deviation from the paper's one forward pass, in the spirit of
      analysis-by-synthesis: the encoder alone does not fit at this budget. S's phases (its
      pre-training on M_pre, its L_S) and the mask of R's em phase use it.
    - otherwise the encoder's one forward pass (the paper).
    """
    images = batch["image"]
    if cfg.r_source == "oracle":
        return focus.oracle_render(autoencoder, batch["theta"], noise=cfg.oracle_noise,
                                   seed=cfg.seed * 1_000_003 + ORACLE_NOISE_SEED + step,
                                   height=images.shape[-2], width=images.shape[-1])
    with_s = stage == "em" and segmenter is not None
    return fit.refine(images, batch["landmarks"], autoencoder, steps=cfg.refine_steps,
                      landmark_steps=cfg.refine_landmark_steps,
                      mode="segmenter" if with_s else "robust",
                      segmenter=segmenter if with_s else None, xi=cfg.xi)


def uses_r_render(cfg: Config, stage: str = "em") -> bool:
    """Whether R's own phase in `stage` takes its mask from `r_render` (a refined R): in em,
    where the mask is S's, which S learnt on refined renders. The init stage's M_pre and the
    baselines (no segmenter) take the encoder's own render, as the paper does; so the init's
    thousands of autoencoder steps stay one forward pass each."""
    return stage == "em" and cfg.variant == "focus" and refines(cfg)


def face_mask(stage: str, batch: dict, out, segmenter, cfg: Config, *,
              reference: Optional[focus.AutoencoderOutput] = None) -> torch.Tensor:
    """The mask of L_pixel in an autoencoder phase, (B, 1, H, W).

    init: M_pre (Eq. 10); em: S(I_R, I_T), detached unless `detach_mask` is False; prior and
    mofa: every rendered pixel; supervised, cutout, cutmix: the ground-truth visible face.
    I_R is `reference`, R's render from `r_render` (a refined R), or None: the encoder's own
    render `out`.
    """
    images = batch["image"]
    if stage == "prior" or cfg.variant == "mofa":
        return torch.ones_like(out.region)  # (B, 1, H, W)
    if cfg.variant != "focus":
        return ground_truth_mask(batch, cfg)  # (B, 1, H, W)
    shown = out if reference is None else reference
    if stage == "init":
        return losses.preliminary_mask(images, shown.image.detach(), shown.region, xi=cfg.xi)
    if cfg.detach_mask or reference is not None:
        with torch.no_grad():
            return segmenter(shown.image.detach(), images)  # (B, 1, H, W)
    return segmenter(out.image, images)  # (B, 1, H, W), gradient leaks into R (official code)


def autoencoder_phase_loss(stage: str, batch: dict, autoencoder, segmenter, F, cfg: Config,
                           step: int = 0):
    """L_R (Eq. 8) of R on one batch, with the stage's mask in L_pixel (and L_distill towards
    the refined theta when `lambda_distill` > 0).

    Returns:
        (L_R scalar, dict of floats: the unweighted terms and "kept").
    """
    images, lm_target = batch["image"], batch["landmarks"]
    reference = None
    if uses_r_render(cfg, stage):
        reference = r_render(batch, autoencoder, segmenter, cfg, stage=stage, step=step)
    out = autoencoder(images)
    mask = face_mask(stage, batch, out, segmenter, cfg, reference=reference)  # (B, 1, H, W)
    distill = None
    if reference is not None and cfg.lambda_distill > 0:
        distill = (bfm.join_theta(out.theta), bfm.join_theta(reference.theta),
                   fit.theta_step(images.dtype, images.device))
    loss, terms = losses.autoencoder_loss(
        images, out.image, mask, out.region, lm_target=lm_target, lm_pred=out.landmarks,
        lm_weights=autoencoder.face_model.landmark_weights,
        coefficients=(out.theta.id, out.theta.exp, out.theta.albedo),
        features=perceptual_features(F, lm_target, which="embedding"),
        pixel_form=cfg.pixel_form, per_location=cfg.per_location,
        lambda_pixel=cfg.lambda_pixel, lambda_per=cfg.lambda_per, lambda_lm=cfg.lambda_lm,
        lambda_reg=cfg.lambda_reg, sh=out.theta.sh if cfg.lambda_mono > 0 else None,
        lambda_mono=cfg.lambda_mono, distill=distill, lambda_distill=cfg.lambda_distill)
    logs = {name: value.item() for name, value in terms.items()}
    logs["kept"] = kept_fraction(mask, out.region)
    return loss, logs


def pretrain_segmenter_loss(batch: dict, autoencoder, segmenter, cfg: Config, step: int = 0):
    """BCE(S(I_R, I_T), M_pre) over the rendered pixels: S learns the preliminary masks (Sec. 3.3).

    R is frozen (its render from `r_render`). The official code applies a sigmoid to S's
    probabilities before its BCE (a double sigmoid); this is the plain BCE on probabilities.
    """
    images = batch["image"]
    out = r_render(batch, autoencoder, segmenter, cfg, stage="init", step=step)
    labels = losses.preliminary_mask(images, out.image, out.region, xi=cfg.xi)  # (B, 1, H, W)
    mask = segmenter(out.image, images)  # (B, 1, H, W)
    # -[y log M + (1 - y) log(1 - M)] per pixel
    bce = TF.binary_cross_entropy(mask, labels, reduction="none")  # (B, 1, H, W)
    # mean over rendered pixels of the batch
    loss = (bce * out.region).sum() / out.region.sum().clamp_min(1.0)
    return loss, {"L_bce": loss.item(), "kept": kept_fraction(mask, out.region)}


def segmenter_phase_loss(batch: dict, autoencoder, segmenter, F, cfg: Config, step: int = 0):
    """L_S (Sec. 3.2) of S on one batch, R frozen in eval mode (its render from `r_render`),
    with the ablation switches."""
    images, lm_target = batch["image"], batch["landmarks"]
    out = r_render(batch, autoencoder, segmenter, cfg, stage="em", step=step)
    mask = segmenter(out.image, images)  # (B, 1, H, W)
    uses_f = cfg.segmenter_losses in ("full", "perceptual")
    loss, terms = losses.segmenter_loss(
        images, out.image, mask, out.region,
        features=perceptual_features(F, lm_target, which="early") if uses_f else None,
        nbr_size=1 if cfg.segmenter_losses == "baseline" else cfg.nbr_size,
        nbr_normalize=cfg.nbr_normalize, bin_form=cfg.bin_form, per_location=cfg.per_location,
        eta_nbr=0.0 if cfg.segmenter_losses == "perceptual" else cfg.eta_nbr,
        eta_dist=cfg.eta_dist, eta_area=cfg.eta_area, eta_presv=cfg.eta_presv,
        eta_bin=cfg.eta_bin)
    logs = {name: value.item() for name, value in terms.items()}
    logs["kept"] = kept_fraction(mask, out.region)
    return loss, logs


def phase_loss(stage: str, phase: str, batch: dict, autoencoder, segmenter, F, cfg: Config,
               step: int = 0):
    """Dispatch to the loss of this stage's phase at `step`: (loss, logs)."""
    if phase == "pretrain":
        return pretrain_segmenter_loss(batch, autoencoder, segmenter, cfg, step)
    if phase == "segmenter":
        return segmenter_phase_loss(batch, autoencoder, segmenter, F, cfg, step)
    return autoencoder_phase_loss(stage, batch, autoencoder, segmenter, F, cfg, step)


# ----------------------------------------------------------------------------------------------
# the misfit prior (Sec. 3.4)
# ----------------------------------------------------------------------------------------------

def misfit_prior(autoencoder, dataset, cfg: Config) -> torch.Tensor:
    """E_MP = 1/N sum_i (P_i - T_i), Eq. 11, over the neutral shapes of N synthetic faces.

    Returns:
        (V, 3) mean per-vertex offset, mm, model space.
    """
    device = torch.device(cfg.device)
    total, count = None, 0
    with torch.no_grad(), focus.eval_mode(autoencoder):
        for first in range(0, len(dataset), cfg.batch_size):
            batch = load_batch(dataset, list(range(first, min(first + cfg.batch_size,
                                                               len(dataset)))), device)
            theta = autoencoder.encoder(batch["image"])
            # P_i: predicted identity-only shape
            neutral = autoencoder.face_model.vertices(theta.id, torch.zeros_like(theta.exp))
            # sum_i (P_i - T_i)
            offset = (neutral - batch["neutral"]).sum(dim=0)  # (V, 3)
            total = offset if total is None else total + offset
            count += neutral.shape[0]
    return (total / count).cpu()  # (V, 3)


# ----------------------------------------------------------------------------------------------
# logging and figures
# ----------------------------------------------------------------------------------------------

def progress_line(stage: str, step: int, total: int, phase: str, logs: dict,
                  seconds_per_step: float) -> str:
    """`em  1200/2400 segmenter  L_nbr 0.0123 ... kept 0.84 | 2.9 steps/s, ETA 7m10s`."""
    terms = " ".join(f"{k} {v:.4g}" for k, v in logs.items())
    eta = int(seconds_per_step * (total - step))
    rate = 1.0 / seconds_per_step if seconds_per_step > 0 else float("inf")
    return (f"{stage:<5} {step:>7}/{total} {phase:<11} {terms} | {rate:.2f} steps/s, "
            f"ETA {eta // 60}m{eta % 60:02d}s")


def preview_outputs(preview: dict, autoencoder, segmenter, cfg: Config, stage: str):
    """Reconstruction and mask of the preview faces (eval mode, no gradient), on R's render as
    S sees it (`r_render`: refined or oracle) where the run uses one."""
    if stage != "prior" and (cfg.r_source == "oracle" or uses_r_render(cfg)):
        out = r_render(preview, autoencoder, segmenter, cfg, stage=stage)
        mask = out.region  # (B, 1, H, W)
        if stage == "em":
            with torch.no_grad(), focus.eval_mode(segmenter):
                mask = out.region * segmenter(out.image, preview["image"])  # (B, 1, H, W)
        recon = focus.Reconstruction(out.vertices, out.image, mask)
    else:
        recon = focus.reconstruct(preview["image"], autoencoder,
                                  segmenter if stage == "em" else None)
    if stage == "init" and cfg.variant == "focus":
        mask = losses.preliminary_mask(preview["image"], recon.image, recon.mask, xi=cfg.xi)
        recon = recon._replace(mask=mask)
    return recon


def save_em_progress(run_dir: str, images: torch.Tensor, recon, step: int) -> None:
    """Add the preview's masks and reconstructions at `step` to figures/em_progress.pt (every
    EM round so far) and redraw figures/em_progress.png from it."""
    path = os.path.join(run_dir, "figures", "em_progress.pt")
    rounds = torch.load(path, weights_only=True) if os.path.exists(path) else {}
    rounds[step] = {"mask": recon.mask.cpu(), "image": recon.image.cpu()}
    runs.atomic_save(rounds, path)
    figures.save_em_progress(os.path.join(run_dir, "figures", "em_progress.png"), images, rounds)


def heldout_faces(cfg: Config, face_model, device) -> Optional[dict]:
    """`HELDOUT_FACES` clean synthetic faces (no occluder, no unexplainable part) of a seed no
    stage trains on; None for image-folder data (no ground truth)."""
    if cfg.data != "synthetic":
        return None
    faces = make_dataset(cfg, face_model, seed=cfg.seed + HELDOUT_SEED, subset="unoccluded",
                         length=HELDOUT_FACES, unexplainable=0.0)
    return load_batch(faces, list(range(HELDOUT_FACES)), device)


def heldout_rmse(autoencoder, faces: Optional[dict],
                 cfg: Optional[Config] = None) -> Optional[float]:
    """R's mean image RMSE (0-255, Tab. 1) on the held-out faces, in eval mode: an underfit R
    shows itself while it trains (the floor is the pixel noise, about 2.6). The encoder's one
    forward pass, or the oracle's render for an oracle run (`cfg.r_source`)."""
    if faces is None:
        return None
    with torch.no_grad(), focus.eval_mode(autoencoder):
        if cfg is not None and cfg.r_source == "oracle":
            out = r_render(faces, autoencoder, None, cfg, stage="em")
        else:
            out = autoencoder(faces["image"])
    return losses.image_rmse(out.image, faces["image"], faces["region"], out.region).mean().item()


def log_interval(run_dir: str, stage: str, step: int, total: int, interval: dict,
                 optimizers: dict, seconds: float, cfg: Config,
                 rmse: Optional[float] = None) -> None:
    """Per phase of the interval: a log.csv row (means and R's held-out RMSE), the progress
    line, collapse warnings."""
    for phase in dict.fromkeys(p for p, _ in interval):
        means = {name: sum(v) / len(v) for (p, name), v in interval.items() if p == phase}
        if rmse is not None:
            means["rmse_heldout"] = rmse
        lr = optimizers[phase][0].param_groups[0]["lr"]
        runs.append_log(run_dir, {"stage": stage, "step": step, "phase": phase, **means,
                                  "lr": lr, "s_per_step": seconds})
        runs.say(run_dir, progress_line(stage, step, total, phase, means, seconds))
        learned_mask = phase in ("segmenter", "pretrain") or (stage == "em"
                                                               and cfg.variant == "focus")
        if learned_mask and not cfg.collapse_low <= means["kept"] <= cfg.collapse_high:
            runs.say(run_dir, f"WARNING: mask collapse at {stage} step {step} ({phase}): the "
                              f"mask keeps {means['kept']:.3f} of the rendered face (nearly all "
                              f"{'outlier' if means['kept'] < cfg.collapse_low else 'face'}); "
                              f"rebalance eta_area / eta_nbr / eta_bin (see losses.py)")


def draw_figures(run_dir: str, stage: str, step: int, preview: dict, autoencoder, segmenter,
                 cfg: Config) -> None:
    """figures/<stage>_<step>.png (target | reconstruction | mask | overlay) and the loss curves."""
    recon = preview_outputs(preview, autoencoder, segmenter, cfg, stage)
    figures.save_fit_figure(os.path.join(run_dir, "figures", f"{stage}_{step:07d}.png"),
                            preview["image"], recon)
    fields = runs.LOG_FIELDS
    terms = fields[fields.index("L_pixel"):fields.index("rmse_heldout")]  # the loss terms
    figures.save_loss_curves(os.path.join(run_dir, "log.csv"),
                             os.path.join(run_dir, "figures", "losses.png"), stages=STAGES,
                             terms=terms, heldout_faces=HELDOUT_FACES)


def finish_prior(run_dir: str, cfg: Config, autoencoder, face_model) -> None:
    """E_MP of the trained R_syn over `prior_samples` held-out faces -> misfit_prior.pt."""
    samples = prior_faces(cfg, face_model, seed=cfg.seed + PRIOR_EVAL_SEED,
                          length=cfg.prior_samples)
    prior = misfit_prior(autoencoder, samples, cfg)
    runs.atomic_save({"E_MP": prior, "num_samples": cfg.prior_samples,
                      "face_model": cfg.face_model}, os.path.join(run_dir, "misfit_prior.pt"))
    norms = prior.norm(dim=1)  # (V,)
    runs.say(run_dir, f"prior: E_MP over {cfg.prior_samples} faces, per-vertex |E_MP| mean "
                      f"{norms.mean():.3f} mm, max {norms.max():.3f} mm")


# ----------------------------------------------------------------------------------------------
# the stage loop
# ----------------------------------------------------------------------------------------------

def stage_data(stage: str, cfg: Config, face_model):
    """(training set, RNG salt) of a stage: R_syn trains on plain synthetic faces (Sec. 3.4)."""
    if stage == "prior":
        dataset = prior_faces(cfg, face_model, seed=cfg.seed + PRIOR_TRAIN_SEED)
    else:
        dataset = make_dataset(cfg, face_model, seed=cfg.seed, occluded=cfg.train_occluded)
    if isinstance(dataset, data.SyntheticFaces) and cfg.data_cache_mb > 0:
        dataset = data.CachedFaces(dataset, max_mb=cfg.data_cache_mb)
    return dataset, STAGE_SALT[stage]


def prior_faces(cfg: Config, face_model, *, seed: int, length: Optional[int] = None):
    """Faces of the linear model alone, "without any enhancement" (Sec. 3.4): no occluders and
    no unexplainable parts (make-up, beard), whatever `cfg.data` is."""
    return make_dataset(dataclasses.replace(cfg, data="synthetic"), face_model, seed=seed,
                        subset="unoccluded", length=length, unexplainable=0.0)


def start_stage(stage: str, run_dir: str, cfg: Config, autoencoder, segmenter, *, resume: bool):
    """Optimisers, first step, done flag and RNG state: from the stage's checkpoint, or fresh.

    A fresh stage writes its checkpoint at step 0, so every started stage can be resumed.
    """
    optimizers = make_optimizers(stage, autoencoder, segmenter, cfg)
    path = runs.checkpoint_path(run_dir, stage)
    if resume:
        state = runs.load_checkpoint(path)
        runs.restore(state, autoencoder, segmenter, optimizers)
        runs.truncate_log(run_dir, stage, state["step"])
        return optimizers, state
    if os.path.exists(path):
        if runs.load_checkpoint(path)["done"]:
            raise RunError(f"stage {stage} of {run_dir} is already finished ({path}); "
                           f"choose another --run-dir to train it again")
        raise RunError(f"{path} exists: pass --resume to continue it, or choose another --run-dir")
    if stage == "em":
        previous = runs.load_checkpoint(runs.checkpoint_path(run_dir, "init"))
        if not previous["done"]:
            raise RunError(f"stage init of {run_dir} is not finished: continue it with "
                           f"--stage init --resume")
        runs.restore(previous, autoencoder, segmenter)
    torch.manual_seed(cfg.seed * 1_000_003 + STAGE_SALT[stage])
    runs.save_checkpoint(run_dir, stage, 0, cfg, autoencoder, segmenter, optimizers)
    return optimizers, runs.load_checkpoint(path)


def train_stage(stage: str, run_dir: str, cfg: Config, *, resume: bool = False,
                face_model: Optional[bfm.MorphableModel] = None) -> dict:
    """Run (or continue) one stage to its end; returns {"encoder", "segmenter"} state dicts."""
    if face_model is None:
        face_model = face_models.load_face_model(cfg.face_model)
    autoencoder, segmenter = runs.build_models(cfg, face_model)
    if stage == "prior":
        segmenter = None  # R_syn is a fresh autoencoder, trained alone
    optimizers, state = start_stage(stage, run_dir, cfg, autoencoder, segmenter, resume=resume)
    total = stage_steps(stage, cfg)
    if not state["done"]:
        train_loop(stage, run_dir, cfg, autoencoder, segmenter, optimizers, state, total)
        if stage == "prior":
            finish_prior(run_dir, cfg, autoencoder, face_model)
        runs.save_checkpoint(run_dir, stage, total, cfg, autoencoder, segmenter, optimizers,
                             done=True)
        runs.say(run_dir, f"{stage}: done, {total} steps, checkpoint "
                          f"{runs.checkpoint_path(run_dir, stage)}")
    return {"encoder": autoencoder.encoder.state_dict(),
            "segmenter": segmenter.state_dict() if segmenter is not None else None}


def train_loop(stage: str, run_dir: str, cfg: Config, autoencoder, segmenter, optimizers: dict,
               state: dict, total: int) -> None:
    """Steps state["step"] .. total-1 of a stage: the visible loop, diagnostics, checkpoints.

    The RNG is set from `state` just before the first step, so setting up data, F and the
    preview faces cannot shift a resumed run's random stream.
    """
    device = torch.device(cfg.device)
    face_model = autoencoder.face_model
    dataset, salt = stage_data(stage, cfg, face_model)
    F = perceptual.load_perceptual(cfg.perceptual, device=device)
    preview = load_batch(make_dataset(cfg, face_model, seed=cfg.seed + PREVIEW_SEED,
                                      length=cfg.preview) if cfg.data == "synthetic" else dataset,
                         list(range(cfg.preview)), device)
    heldout = heldout_faces(cfg, face_model, device)
    if stage == "em" and segmenter is not None and state["step"] == 0:
        # the initialised model: the first column of the EM progression (Fig. 11 b, g)
        save_em_progress(run_dir, preview["image"],
                         preview_outputs(preview, autoencoder, segmenter, cfg, stage), 0)
    runs.set_rng(state)
    interval, tic = {}, time.perf_counter()
    for step in range(state["step"], total):
        phase = stage_phase(stage, step, cfg)
        if hasattr(dataset, "set_epoch"):
            # the folder's augmentation draws follow the data position (resumable)
            dataset.set_epoch(step * cfg.batch_size // len(dataset))
        batch = augment(load_batch(dataset, batch_indices(step, cfg, len(dataset), salt=salt),
                                   device), cfg, step, salt=salt)
        set_phase(phase, autoencoder, segmenter)
        loss, logs = phase_loss(stage, phase, batch, autoencoder, segmenter, F, cfg, step)
        optimizer, schedule = optimizers[phase]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()

        # ---- diagnostics and checkpointing (after step + 1 steps)
        done = step + 1
        for name, value in {"loss": loss.item(), **logs}.items():
            interval.setdefault((phase, name), []).append(value)
        if done % cfg.log_every == 0 or done == total:
            seconds = (time.perf_counter() - tic) / cfg.log_every
            log_interval(run_dir, stage, done, total, interval, optimizers, seconds, cfg,
                         rmse=heldout_rmse(autoencoder, heldout, cfg))
            interval, tic = {}, time.perf_counter()
        if done % cfg.figure_every == 0 or done == total:
            draw_figures(run_dir, stage, done, preview, autoencoder, segmenter, cfg)
        if stage == "em" and segmenter is not None and done % cfg.em_cycle == 0:
            save_em_progress(run_dir, preview["image"],
                             preview_outputs(preview, autoencoder, segmenter, cfg, stage), done)
        if done % cfg.checkpoint_every == 0 and done < total:
            runs.save_checkpoint(run_dir, stage, done, cfg, autoencoder, segmenter, optimizers)


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------

def run(stage: str, run_dir: str, cfg: Optional[Config], *, resume: bool = False,
        init_from: Optional[str] = None) -> Config:
    """Run `stage` ("init", "em", "prior" or "all") in `run_dir`; returns the run's Config.

    `init_from`: another run dir whose finished init stage this run starts from (`copy_init`);
    the init stage is then not trained here.
    """
    if stage not in STAGES + ("all",):
        raise ValueError(f"stage must be one of {STAGES + ('all',)}, got {stage!r}")
    if init_from is not None and stage not in ("em", "all"):
        raise RunError(f"--init-from starts the em stage: use it with --stage em or all")
    cfg = runs.prepare_run_dir(run_dir, cfg)
    if init_from is not None:
        runs.copy_init(init_from, run_dir, cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    face_model = face_models.load_face_model(cfg.face_model).to(torch.device(cfg.device))
    # "all": every stage that applies (the oracle R has no encoder for a misfit prior)
    stages = (tuple(s for s in STAGES if s != "prior" or cfg.r_source != "oracle")
              if stage == "all" else (stage,))
    for name in (s for s in stages if not (init_from is not None and s == "init")):
        path = runs.checkpoint_path(run_dir, name)
        if stage == "all" and resume and not os.path.exists(path):
            # a stage that never started begins normally (its predecessor is finished)
            train_stage(name, run_dir, cfg, resume=False, face_model=face_model)
        else:
            train_stage(name, run_dir, cfg, resume=resume, face_model=face_model)
    return cfg


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train FOCUS: --stage init (Sec. 3.3), em (Sec. 3.2), prior (Sec. 3.4) or "
                    "all. Any Config field is also an option: --eta-area 4.0, --em-steps 600.",
        epilog=f"presets: {', '.join(PRESETS)}; variants: {', '.join(VARIANTS)}; "
               f"segmenter losses: {', '.join(SEGMENTER_LOSSES)}")
    parser.add_argument("--stage", required=True, choices=STAGES + ("all",))
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help="default cpu for a new run; a run dir keeps its config.json")
    parser.add_argument("--data", help="'synthetic' (default) or a folder with landmarks.csv")
    parser.add_argument("--face-model", help="face_models.load_face_model spec (default 'toy')")
    parser.add_argument("--perceptual", help="F: 'dlib', 'arcface:PATH' or 'none'")
    parser.add_argument("--run-dir", help="default runs/<preset>[-<variant>][-<losses>]")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the run dir's last checkpoint (an error if none)")
    parser.add_argument("--init-from", metavar="RUN_DIR",
                        help="start the em stage from another run's finished init stage (EM "
                             "ablations share one init)")
    parser.add_argument("--device", help="cpu (default), cuda, cuda:1, ...")
    parser.add_argument("--seed", type=int)
    return parser


def config_from_args(args: argparse.Namespace, extra: list) -> tuple:
    """(Config or None, run_dir); None when the run dir's config.json is to be used."""
    overrides = parse_overrides(extra)
    named = {"data": args.data, "face_model": args.face_model, "perceptual": args.perceptual,
             "device": args.device, "seed": args.seed}
    overrides.update({k: v for k, v in named.items() if v is not None})
    preset = args.preset or "cpu"
    run_dir = args.run_dir or os.path.join("runs", "-".join(
        [preset] + [overrides[k] for k in ("variant", "segmenter_losses")
                    if overrides.get(k, "focus") not in ("focus", "full")]))
    stored = os.path.exists(os.path.join(run_dir, "config.json"))
    if stored and args.preset is None and not overrides:
        return None, run_dir
    return make_config(preset, **overrides), run_dir


def main(argv: Optional[list] = None) -> None:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        cfg, run_dir = config_from_args(args, extra)
    except ValueError as error:
        parser.error(str(error))
    try:
        run(args.stage, run_dir, cfg, resume=args.resume, init_from=args.init_from)
    except RunError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
