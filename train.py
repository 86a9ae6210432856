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

What is here, top to bottom: `Config` and its presets, the phase schedule (`phase_at`,
`init_phase_at`), data (batch order, cutout / cutmix), models and optimisers, one loss function
per phase, checkpoints (atomic, complete), logging and figures, the misfit prior, the stage
loop (`train_stage`) and the CLI (`main`).

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

Deviations from the paper (README repeats them):
- Presets. `paper` is the published schedule (224 x 224, batch 12, Adadelta lr 0.1 x 0.99 every
  5k steps, segmenter lr x 0.06, 300k init steps, 200k EM steps, 25k autoencoder steps of every
  30k). The default `cpu` preset trains smaller networks (width multiplier 16 of 64) on 64 x 64
  images with Adam, for a few thousand steps, and without the perceptual network F: dlib's F
  crops every face to 150 x 150, which costs about 4 s per forward + backward of a batch of 16
  on 2 CPU cores (the segmenter step needs two of them), so `cpu` trains the paper's 'Neighbor'
  ablation (Sec. 4.4). Its segmenter weights are re-balanced, eta_area 0.5 -> 4 and eta_bin
  10 -> 1: with L_nbr and L_area per rendered pixel a pixel is kept when its neighbour
  residual (squared RGB distance) is below eta_area / eta_nbr, 1/30 with the paper's weights,
  which rejects about half of the visible face of an early 64 x 64 fit (median residual 0.03,
  90th percentile 0.2), and eta_bin = 10 pushes every pixel below 0.5 to 0 (a collapse
  measured here too). `cpu` also takes the official code's unsquared L_pixel (the form the
  paper's weights were tuned with) with lambda_3 = 2e-3 (L_lm is in squared pixels): with the
  paper's squared distance the landmark term outweighed the pixel term about thirty-fold and R
  learned little but the landmarks (docs/levers.md), and half of its training faces are
  occluded (`train_occluded`).
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
import csv
import dataclasses
import difflib
import json
import os
import pickle
import sys
import time
import zipfile
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as TF

import bfm
import data
import focus
import losses
import perceptual

STAGES = ("init", "em", "prior")
VARIANTS = ("focus", "mofa", "supervised", "cutout", "cutmix")
SEGMENTER_LOSSES = ("full", "baseline", "neighbor", "perceptual")
# seed offsets of the data sets (training set = cfg.seed)
PRIOR_TRAIN_SEED, PRIOR_EVAL_SEED, PREVIEW_SEED, HELDOUT_SEED = 1_000, 2_000, 3_000, 6_000
HELDOUT_FACES = 32  # clean held-out faces whose RMSE is logged while training
STAGE_SALT = {"init": 11, "em": 23, "prior": 37}  # separates the RNG streams of the stages
LOG_FIELDS = ("stage", "step", "phase", "loss", "L_pixel", "L_per", "L_lm", "L_reg", "L_mono",
              "L_nbr", "L_dist", "L_area", "L_presv", "L_bin", "L_bce", "kept", "rmse_heldout",
              "lr", "s_per_step")


class RunError(RuntimeError):
    """A problem with the run directory or a checkpoint, reported without a traceback."""


# ----------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Config:
    """Every setting of a run. The defaults are the paper's settings scaled to a laptop; the
    `cpu` preset (`PRESETS`, the default of `make_config` and of train.py) changes a few of
    them, and the `paper` preset restores the paper's sizes and schedule."""
    # data
    data: str = "synthetic"  # "synthetic" or a folder of images + landmarks.csv (Sec. 4.1)
    face_model: str = "toy"  # bfm.load_face_model spec; paper: BFM 2017 (Sec. 4.1)
    image_size: int = 64  # H = W; paper 224 (Sec. 4.1)
    train_length: int = 20_000  # synthetic training faces (distinct indices)
    train_occluded: float = 0.8  # share of synthetic training faces with an occluder
    aligned_faces: bool = False  # synthetic faces placed as 5-point crops (data.align_pose)
    batch_size: int = 16  # paper 12 (Supp. A.2)
    # networks
    encoder_width: int = 16  # ResNet-50 width multiplier base; paper 64 (Sec. 4.1)
    unet_width: int = 16  # UNet width; paper 64 (Supp. A.2: 34.5M parameters)
    stem_pool: bool = True  # ResNet stem max-pooling (ImageNet stem); False for small images
    zero_init_residual: bool = False  # residual branches start at 0 (focus.ResNet50)
    translation_scale: float = 1.0  # encoder output scale of tx, ty (official code 1)
    depth_scale: float = 0.005  # encoder output scale of tz (official code 0.005)
    perceptual: str = "none"  # F (Sec. 3.2): "dlib", "arcface:PATH", "none"; paper ArcFace
    # optimisation (Supp. A.2)
    optimizer: str = "adam"  # paper "adadelta"
    lr: float = 1e-3  # encoder learning rate; paper 0.1 (Adadelta)
    seg_lr_factor: float = 1.0  # segmenter lr / encoder lr; paper 0.06
    lr_decay: float = 0.99  # multiplicative decay, paper 0.99 ...
    lr_decay_every: int = 5_000  # ... every 5k steps of that network
    lr_schedule: str = "step"  # "step" (paper: the decay above) or "cosine" (to 0 per stage)
    # schedule (Supp. A.2)
    init_ae_steps: int = 3_000  # R with M_pre (Sec. 3.3); paper 300k
    init_seg_steps: int = 600  # S pre-trained on M_pre (Sec. 3.3); not given in the paper
    em_steps: int = 3_000  # EM steps, both networks; paper 200k
    em_cycle: int = 600  # one EM round; paper 30k
    em_ae_steps: int = 500  # autoencoder steps per round (after the segmenter's); paper 25k
    prior_steps: int = 1_500  # R_syn on unoccluded synthetic faces (Sec. 3.4)
    prior_samples: int = 500  # N of Eq. 11
    # preliminary mask (Eq. 10)
    xi: float = 0.17  # paper 0.17; official (3 x 0.043)^2 = 0.0166
    # segmenter loss L_S (Sec. 3.2), see losses.segmenter_loss
    eta_nbr: float = 15.0  # eta_1
    eta_dist: float = 3.0  # eta_2
    eta_area: float = 0.5  # eta_3
    eta_presv: float = 2.5  # eta_4 (official code 0.25)
    eta_bin: float = 10.0  # eta_5
    nbr_size: int = 3  # N(x) window, Supp. A.1 (official 5)
    nbr_normalize: str = "region"  # L_nbr reduction: "region" or "image" (official)
    bin_form: str = "paper"  # L_bin: "paper" or "official"
    per_location: bool = False  # perceptual cosine per feature location (official)
    # autoencoder loss L_R (Eq. 8), see losses.autoencoder_loss
    lambda_pixel: float = 0.5  # lambda_1
    lambda_per: float = 0.25  # lambda_2
    lambda_lm: float = 5e-4  # lambda_3
    lambda_reg: float = 0.1  # lambda_4
    pixel_form: str = "paper"  # L_pixel: "paper" (squared) or "official" (not squared)
    lambda_mono: float = 0.0  # L_mono, white-light prior; not in the paper (Deep3D 10)
    # variants (Sec. 4, 4.4)
    variant: str = "focus"  # focus | mofa | supervised | cutout | cutmix
    segmenter_losses: str = "full"  # full | baseline | neighbor | perceptual
    detach_mask: bool = True  # no gradient through M into R (official code: False)
    # diagnostics
    collapse_low: float = 0.05  # warn when the kept-face fraction falls below ...
    collapse_high: float = 0.995  # ... or rises above this
    log_every: int = 50
    checkpoint_every: int = 200  # a multiple of log_every
    figure_every: int = 600
    preview: int = 6  # faces in the figures
    # run
    seed: int = 0
    device: str = "cpu"
    threads: int = 0  # torch CPU threads; 0 leaves torch's default
    data_cache_mb: int = 2048  # synthetic training samples kept in memory (same batches); 0 off


PRESETS = {
    # tests: a few steps in seconds
    "tiny": dict(face_model="toy,resolution=24", image_size=32, train_length=64, batch_size=2,
                 encoder_width=4, unet_width=4, lr=1e-3, init_ae_steps=4, init_seg_steps=2,
                 em_steps=6, em_cycle=3, em_ae_steps=2, prior_steps=3, prior_samples=4,
                 eta_area=4.0, eta_bin=1.0, log_every=1, checkpoint_every=2, figure_every=3,
                 preview=2, threads=1),
    # the default: meaningful on a 2-core CPU (the dataclass defaults) with re-balanced eta
    # (d* = eta_area / eta_nbr on the squared RGB residual; measured in README), the official
    # unsquared L_pixel and lambda_lm re-balanced for it at 64 x 64 (docs/levers.md), and half
    # of the training faces occluded
    "cpu": dict(eta_area=4.0, eta_bin=1.0, pixel_form="official", lambda_lm=2e-3,
                train_occluded=0.5),
    # the published schedule (Supp. A.2) on the paper's networks and F
    "paper": dict(image_size=224, batch_size=12, encoder_width=64, unet_width=64,
                  perceptual="dlib", optimizer="adadelta", lr=0.1, seg_lr_factor=0.06,
                  init_ae_steps=300_000, init_seg_steps=25_000, em_steps=200_000,
                  em_cycle=30_000, em_ae_steps=25_000, prior_steps=300_000,
                  prior_samples=10_000, train_length=1_000_000, log_every=100,
                  checkpoint_every=5_000, figure_every=10_000),
}


def make_config(preset: str = "cpu", **overrides) -> Config:
    """The `preset`'s Config with `overrides` (field names) applied, validated."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: choose one of {sorted(PRESETS)}")
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(Config)})
    if unknown:
        raise ValueError(f"unknown config keys {unknown}")
    cfg = Config(**{**PRESETS[preset], **overrides})
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Raise ValueError naming the first setting that cannot work."""
    choices = {"variant": VARIANTS, "segmenter_losses": SEGMENTER_LOSSES,
               "optimizer": ("adam", "adadelta"), "nbr_normalize": ("region", "image"),
               "bin_form": ("paper", "official"), "pixel_form": ("paper", "official"),
               "lr_schedule": ("step", "cosine")}
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {getattr(cfg, name)!r}")
    if cfg.image_size < 32 or cfg.image_size % 16:
        raise ValueError(f"image_size must be a multiple of 16 and >= 32 (encoder stride 32, "
                         f"four UNet poolings), got {cfg.image_size}")
    positive = ("train_length", "batch_size", "encoder_width", "unet_width", "init_ae_steps",
                "em_cycle", "prior_samples", "log_every", "checkpoint_every", "figure_every",
                "lr_decay_every", "preview")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    for name in ("init_seg_steps", "em_steps", "prior_steps", "threads", "data_cache_mb"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(cfg, name)}")
    if not 0 < cfg.em_ae_steps < cfg.em_cycle:
        raise ValueError(f"em_ae_steps must be in (0, em_cycle = {cfg.em_cycle}), "
                         f"got {cfg.em_ae_steps}")
    if cfg.checkpoint_every % cfg.log_every:
        raise ValueError(f"checkpoint_every ({cfg.checkpoint_every}) must be a multiple of "
                         f"log_every ({cfg.log_every})")
    if cfg.lr <= 0 or cfg.seg_lr_factor <= 0 or not 0 < cfg.lr_decay <= 1:
        raise ValueError("lr and seg_lr_factor must be > 0 and lr_decay in (0, 1]")
    if not 0 <= cfg.train_occluded <= 1:
        raise ValueError(f"train_occluded is a share in [0, 1], got {cfg.train_occluded}")
    if min(cfg.translation_scale, cfg.depth_scale) <= 0 or cfg.lambda_mono < 0:
        raise ValueError(f"translation_scale and depth_scale must be > 0 and lambda_mono "
                         f">= 0, got {cfg.translation_scale}, {cfg.depth_scale} and "
                         f"{cfg.lambda_mono}")
    if cfg.segmenter_losses == "perceptual" and cfg.perceptual == "none":
        raise ValueError("segmenter_losses='perceptual' needs a perceptual network F "
                         "(--perceptual dlib or arcface:PATH)")


def has_segmenter(cfg: Config) -> bool:
    """FOCUS trains the segmenter S; the baselines (MoFA, supervised, cutout, cutmix) do not."""
    return cfg.variant == "focus"


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
    in_round = step % cfg.em_cycle
    return "segmenter" if in_round < cfg.em_cycle - cfg.em_ae_steps else "autoencoder"


def init_phase_at(step: int, cfg: Config) -> str:
    """The init stage (Sec. 3.3): `init_ae_steps` of R on M_pre, then S's pre-training."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return "autoencoder" if step < cfg.init_ae_steps or not has_segmenter(cfg) else "pretrain"


def stage_steps(stage: str, cfg: Config) -> int:
    """Number of optimiser steps of a stage."""
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
# models and optimisers
# ----------------------------------------------------------------------------------------------

def build_models(cfg: Config, face_model: bfm.MorphableModel):
    """R (encoder + face model + renderer) and S (None without a segmenter), seeded, on device."""
    torch.manual_seed(cfg.seed)
    encoder = focus.Encoder(width=cfg.encoder_width, translation_scale=cfg.translation_scale,
                            depth_scale=cfg.depth_scale, stem_pool=cfg.stem_pool,
                            zero_init_residual=cfg.zero_init_residual)
    autoencoder = focus.FaceAutoencoder(encoder, face_model)
    segmenter = focus.UNet(width=cfg.unet_width) if has_segmenter(cfg) else None
    device = torch.device(cfg.device)
    return autoencoder.to(device), segmenter.to(device) if segmenter is not None else None


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


def face_mask(stage: str, batch: dict, out, segmenter, cfg: Config) -> torch.Tensor:
    """The mask of L_pixel in an autoencoder phase, (B, 1, H, W).

    init: M_pre (Eq. 10); em: S(I_R, I_T), detached unless `detach_mask` is False; prior and
    mofa: every rendered pixel; supervised, cutout, cutmix: the ground-truth visible face.
    """
    images = batch["image"]
    if stage == "prior" or cfg.variant == "mofa":
        return torch.ones_like(out.region)  # (B, 1, H, W)
    if cfg.variant != "focus":
        return ground_truth_mask(batch, cfg)  # (B, 1, H, W)
    if stage == "init":
        return losses.preliminary_mask(images, out.image.detach(), out.region, xi=cfg.xi)
    if cfg.detach_mask:
        with torch.no_grad():
            return segmenter(out.image.detach(), images)  # (B, 1, H, W)
    return segmenter(out.image, images)  # (B, 1, H, W), gradient leaks into R (official code)


def autoencoder_phase_loss(stage: str, batch: dict, autoencoder, segmenter, F, cfg: Config):
    """L_R (Eq. 8) of R on one batch, with the stage's mask in L_pixel.

    Returns:
        (L_R scalar, dict of floats: the unweighted terms and "kept").
    """
    images, lm_target = batch["image"], batch["landmarks"]
    out = autoencoder(images)
    mask = face_mask(stage, batch, out, segmenter, cfg)  # (B, 1, H, W)
    loss, terms = losses.autoencoder_loss(
        images, out.image, mask, out.region, lm_target=lm_target, lm_pred=out.landmarks,
        lm_weights=autoencoder.face_model.landmark_weights,
        coefficients=(out.theta.id, out.theta.exp, out.theta.albedo),
        features=perceptual_features(F, lm_target, which="embedding"),
        pixel_form=cfg.pixel_form, per_location=cfg.per_location,
        lambda_pixel=cfg.lambda_pixel, lambda_per=cfg.lambda_per, lambda_lm=cfg.lambda_lm,
        lambda_reg=cfg.lambda_reg, sh=out.theta.sh if cfg.lambda_mono > 0 else None,
        lambda_mono=cfg.lambda_mono)
    logs = {name: value.item() for name, value in terms.items()}
    logs["kept"] = kept_fraction(mask, out.region)
    return loss, logs


def pretrain_segmenter_loss(batch: dict, autoencoder, segmenter, cfg: Config):
    """BCE(S(I_R, I_T), M_pre) over the rendered pixels: S learns the preliminary masks (Sec. 3.3).

    R is frozen. The official code applies a sigmoid to S's probabilities before its BCE (a
    double sigmoid); this is the plain BCE on probabilities.
    """
    images = batch["image"]
    with torch.no_grad():
        out = autoencoder(images)
        labels = losses.preliminary_mask(images, out.image, out.region, xi=cfg.xi)  # (B, 1, H, W)
    mask = segmenter(out.image, images)  # (B, 1, H, W)
    # -[y log M + (1 - y) log(1 - M)] per pixel
    bce = TF.binary_cross_entropy(mask, labels, reduction="none")  # (B, 1, H, W)
    # mean over rendered pixels of the batch
    loss = (bce * out.region).sum() / out.region.sum().clamp_min(1.0)
    return loss, {"L_bce": loss.item(), "kept": kept_fraction(mask, out.region)}


def segmenter_phase_loss(batch: dict, autoencoder, segmenter, F, cfg: Config):
    """L_S (Sec. 3.2) of S on one batch, R frozen in eval mode, with the ablation switches."""
    images, lm_target = batch["image"], batch["landmarks"]
    with torch.no_grad():
        out = autoencoder(images)
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


def phase_loss(stage: str, phase: str, batch: dict, autoencoder, segmenter, F, cfg: Config):
    """Dispatch to the loss of this stage's phase: (loss, logs)."""
    if phase == "pretrain":
        return pretrain_segmenter_loss(batch, autoencoder, segmenter, cfg)
    if phase == "segmenter":
        return segmenter_phase_loss(batch, autoencoder, segmenter, F, cfg)
    return autoencoder_phase_loss(stage, batch, autoencoder, segmenter, F, cfg)


# ----------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------

def checkpoint_path(run_dir: str, stage: str) -> str:
    return os.path.join(run_dir, f"{stage}.pt")


def atomic_save(obj, path: str) -> None:
    """torch.save to a temporary file in the same folder, flush to disk, then rename."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(run_dir: str, stage: str, step: int, cfg: Config, autoencoder, segmenter,
                    optimizers: dict, *, done: bool = False) -> None:
    """Everything a resumed run needs: models, optimisers, schedules, RNG, data position."""
    state = {
        "stage": stage, "step": step, "done": done, "config": dataclasses.asdict(cfg),
        "data_position": step * cfg.batch_size,  # samples consumed (batch order is by step)
        "encoder": autoencoder.encoder.state_dict(),
        "segmenter": segmenter.state_dict() if segmenter is not None else None,
        "optimizers": {k: opt.state_dict() for k, (opt, _) in optimizers.items()},
        "schedules": {k: sched.state_dict() for k, (_, sched) in optimizers.items()},
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    atomic_save(state, checkpoint_path(run_dir, stage))


def load_checkpoint(path: str) -> dict:
    """Read a checkpoint written by `save_checkpoint`; a missing or corrupt file is a RunError."""
    if not os.path.isfile(path):
        raise RunError(f"no checkpoint at {path}: run the stage without --resume first "
                       f"(or check --run-dir)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError,
            zipfile.BadZipFile) as error:
        raise RunError(f"checkpoint {path} is corrupt ({type(error).__name__}: {error}); "
                       f"delete it to restart that stage from scratch") from error
    required = {"stage", "step", "done", "config", "encoder", "segmenter", "optimizers",
                "schedules", "rng_cpu"}
    if not isinstance(state, dict) or not required <= set(state):
        raise RunError(f"checkpoint {path} is incomplete (keys {sorted(state)[:10]}); "
                       f"delete it to restart that stage from scratch")
    return state


def restore(state: dict, autoencoder, segmenter, optimizers: Optional[dict] = None) -> None:
    """Load models (and optimisers and schedules when given) from a checkpoint."""
    autoencoder.encoder.load_state_dict(state["encoder"])
    if segmenter is not None:
        if state["segmenter"] is None:
            raise RunError("the checkpoint has no segmenter but the config trains one")
        segmenter.load_state_dict(state["segmenter"])
    if optimizers is None:
        return
    for key, (optimizer, schedule) in optimizers.items():
        optimizer.load_state_dict(state["optimizers"][key])
        schedule.load_state_dict(state["schedules"][key])


def set_rng(state: dict) -> None:
    """The global RNG (dropout) as a checkpoint saved it."""
    torch.set_rng_state(state["rng_cpu"])
    if torch.cuda.is_available() and state.get("rng_cuda"):
        torch.cuda.set_rng_state_all(state["rng_cuda"])


def load_models(run_dir: str, *, stage: str = "em", device: str = "cpu"):
    """The trained networks of a run, for evaluation: (cfg, autoencoder R, segmenter S or None).

    `stage` names the checkpoint ("init", "em" or "prior" for R_syn); it must be finished.
    """
    cfg = read_config(run_dir)
    state = load_checkpoint(checkpoint_path(run_dir, stage))
    if not state["done"]:
        raise RunError(f"stage {stage!r} of {run_dir} is not finished (step {state['step']}): "
                       f"continue it with --resume")
    cfg = dataclasses.replace(cfg, device=device)
    autoencoder, segmenter = build_models(cfg, bfm.load_face_model(cfg.face_model))
    segmenter = segmenter if stage != "prior" else None  # R_syn has no segmenter
    restore(state, autoencoder, segmenter)
    return cfg, autoencoder.eval(), segmenter.eval() if segmenter is not None else None


# ----------------------------------------------------------------------------------------------
# logging and figures
# ----------------------------------------------------------------------------------------------

def say(run_dir: str, text: str) -> None:
    """Print a line and append it to run_dir/log.txt."""
    print(text, flush=True)
    with open(os.path.join(run_dir, "log.txt"), "a") as f:
        f.write(text + "\n")


def append_log(run_dir: str, row: dict) -> None:
    """One row of log.csv (fixed columns `LOG_FIELDS`; a term a phase lacks stays empty)."""
    path = os.path.join(run_dir, "log.csv")
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LOG_FIELDS)
        if new:
            writer.writeheader()
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def truncate_log(run_dir: str, stage: str, step: int) -> None:
    """Drop log rows of `stage` written after the checkpoint at `step` (they will be redone)."""
    path = os.path.join(run_dir, "log.csv")
    if not os.path.exists(path):
        return
    with open(path, newline="") as f:
        # a row cut short by a kill has missing fields: drop it too
        rows = [r for r in csv.DictReader(f) if None not in r.values()
                and not (r["stage"] == stage and int(r["step"]) > step)]
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LOG_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def progress_line(stage: str, step: int, total: int, phase: str, logs: dict,
                  seconds_per_step: float) -> str:
    """`em  1200/2400 segmenter  L_nbr 0.0123 ... kept 0.84 | 2.9 steps/s, ETA 7m10s`."""
    terms = " ".join(f"{k} {v:.4g}" for k, v in logs.items())
    eta = int(seconds_per_step * (total - step))
    rate = 1.0 / seconds_per_step if seconds_per_step > 0 else float("inf")
    return (f"{stage:<5} {step:>7}/{total} {phase:<11} {terms} | {rate:.2f} steps/s, "
            f"ETA {eta // 60}m{eta % 60:02d}s")


def image_grid(rows: list) -> torch.Tensor:
    """n tensors (B, 3, H, W) -> one (3, B H, n W) image: sample b in row b, one column each."""
    columns = [r.detach().float().cpu().clamp(0, 1) for r in rows]
    return torch.cat([torch.cat(list(c), dim=1) for c in columns], dim=2)  # (3, B H, n W)


def save_png(image: torch.Tensor, path: str, *, scale: int = 2) -> None:
    """(3, H, W) in [0, 1] -> PNG, enlarged `scale` times (nearest)."""
    from PIL import Image
    array = (image.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    picture = Image.fromarray(array)
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    picture.save(path)


def preview_outputs(preview: dict, autoencoder, segmenter, cfg: Config, stage: str):
    """Reconstruction and mask of the preview faces (eval mode, no gradient)."""
    recon = focus.reconstruct(preview["image"], autoencoder,
                              segmenter if stage == "em" else None)
    if stage == "init" and cfg.variant == "focus":
        mask = losses.preliminary_mask(preview["image"], recon.image, recon.mask, xi=cfg.xi)
        recon = recon._replace(mask=mask)
    return recon


def save_fit_figure(path: str, images: torch.Tensor, recon) -> None:
    """Fig. 1 style: target | reconstruction over the target | mask | outliers tinted red."""
    region = (recon.image.sum(dim=1, keepdim=True) > 0).float()  # (B, 1, H, W)
    overlay = images * (1 - region) + recon.image * region  # (B, 3, H, W)
    mask = recon.mask.expand(-1, 3, -1, -1)  # (B, 3, H, W)
    red = torch.tensor([1.0, 0.0, 0.0], device=images.device).view(1, 3, 1, 1)
    # pixels of the rendered region the mask rejects, tinted red
    outlier = region * (1 - recon.mask)  # (B, 1, H, W)
    tinted = images * (1 - 0.6 * outlier) + 0.6 * outlier * red  # (B, 3, H, W)
    save_png(image_grid([images, overlay, mask, tinted]), path)


def save_em_progress(run_dir: str, images: torch.Tensor, recon, step: int) -> None:
    """Fig. 11 style: target | masks at the start and after each EM round | reconstructions."""
    path = os.path.join(run_dir, "figures", "em_progress.pt")
    rounds = torch.load(path, weights_only=True) if os.path.exists(path) else {}
    rounds[step] = {"mask": recon.mask.cpu(), "image": recon.image.cpu()}
    atomic_save(rounds, path)
    steps = sorted(rounds)
    masks = [rounds[s]["mask"].expand(-1, 3, -1, -1) for s in steps]
    region = [(rounds[s]["image"].sum(1, keepdim=True) > 0).float() for s in steps]
    fits = [images.cpu() * (1 - r) + rounds[s]["image"] * r for s, r in zip(steps, region)]
    save_png(image_grid([images] + masks + fits), os.path.join(run_dir, "figures",
                                                              "em_progress.png"))


def save_loss_curves(run_dir: str) -> None:
    """figures/losses.png: every logged term against the step, one panel per stage, and
    below it R's held-out RMSE."""
    from matplotlib.figure import Figure
    with open(os.path.join(run_dir, "log.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    stages = [s for s in STAGES if any(r["stage"] == s for r in rows)]
    if not stages:
        return
    fig = Figure(figsize=(6 * len(stages), 7))
    axes = fig.subplots(2, len(stages), squeeze=False)
    for ax, stage in zip(axes[1], stages):
        points = [(int(r["step"]), float(r["rmse_heldout"])) for r in rows
                  if r["stage"] == stage and r["rmse_heldout"] not in ("", None)]
        if points:
            ax.plot(*zip(*points), lw=1, color="k", label="rmse_heldout")
        ax.set_title(f"R's RMSE on {HELDOUT_FACES} clean held-out faces (0-255)", fontsize=9)
        ax.set_xlabel("step")
    for ax, stage in zip(axes[0], stages):
        for name in LOG_FIELDS[LOG_FIELDS.index("L_pixel"):LOG_FIELDS.index("rmse_heldout")]:
            points = [(int(r["step"]), float(r[name])) for r in rows
                      if r["stage"] == stage and r[name] not in ("", None)]
            if points:
                ax.plot(*zip(*points), label=name, lw=1)
        ax.set_title(f"stage {stage}")
        ax.set_xlabel("step")
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(run_dir, "figures", "losses.png"), dpi=80)


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


def apply_misfit_prior(vertices: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """P_mf = P - E_MP (Sec. 3.4): (B, V, 3) predicted shapes, (V, 3) prior -> (B, V, 3)."""
    if vertices.dim() != 3 or vertices.shape[1:] != prior.shape:
        raise ValueError(f"vertices (B, V, 3) and prior (V, 3) must agree, got "
                         f"{tuple(vertices.shape)} and {tuple(prior.shape)}")
    return vertices - prior.to(vertices)


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
    path = checkpoint_path(run_dir, stage)
    if resume:
        state = load_checkpoint(path)
        restore(state, autoencoder, segmenter, optimizers)
        truncate_log(run_dir, stage, state["step"])
        return optimizers, state
    if os.path.exists(path):
        if load_checkpoint(path)["done"]:
            raise RunError(f"stage {stage} of {run_dir} is already finished ({path}); "
                           f"choose another --run-dir to train it again")
        raise RunError(f"{path} exists: pass --resume to continue it, or choose another --run-dir")
    if stage == "em":
        previous = load_checkpoint(checkpoint_path(run_dir, "init"))
        if not previous["done"]:
            raise RunError(f"stage init of {run_dir} is not finished: continue it with "
                           f"--stage init --resume")
        restore(previous, autoencoder, segmenter)
    torch.manual_seed(cfg.seed * 1_000_003 + STAGE_SALT[stage])
    save_checkpoint(run_dir, stage, 0, cfg, autoencoder, segmenter, optimizers)
    return optimizers, load_checkpoint(path)


def train_stage(stage: str, run_dir: str, cfg: Config, *, resume: bool = False,
                face_model: Optional[bfm.MorphableModel] = None) -> dict:
    """Run (or continue) one stage to its end; returns {"encoder", "segmenter"} state dicts."""
    face_model = face_model if face_model is not None else bfm.load_face_model(cfg.face_model)
    autoencoder, segmenter = build_models(cfg, face_model)
    if stage == "prior":
        segmenter = None  # R_syn is a fresh autoencoder, trained alone
    optimizers, state = start_stage(stage, run_dir, cfg, autoencoder, segmenter, resume=resume)
    total = stage_steps(stage, cfg)
    if not state["done"]:
        train_loop(stage, run_dir, cfg, autoencoder, segmenter, optimizers, state, total)
        if stage == "prior":
            finish_prior(run_dir, cfg, autoencoder, face_model)
        save_checkpoint(run_dir, stage, total, cfg, autoencoder, segmenter, optimizers, done=True)
        say(run_dir, f"{stage}: done, {total} steps, checkpoint {checkpoint_path(run_dir, stage)}")
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
    set_rng(state)
    interval, tic = {}, time.perf_counter()
    for step in range(state["step"], total):
        phase = stage_phase(stage, step, cfg)
        if hasattr(dataset, "set_epoch"):
            # the folder's augmentation draws follow the data position (resumable)
            dataset.set_epoch(step * cfg.batch_size // len(dataset))
        batch = augment(load_batch(dataset, batch_indices(step, cfg, len(dataset), salt=salt),
                                   device), cfg, step, salt=salt)
        set_phase(phase, autoencoder, segmenter)
        loss, logs = phase_loss(stage, phase, batch, autoencoder, segmenter, F, cfg)
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
                         rmse=heldout_rmse(autoencoder, heldout))
            interval, tic = {}, time.perf_counter()
        if done % cfg.figure_every == 0 or done == total:
            draw_figures(run_dir, stage, done, preview, autoencoder, segmenter, cfg)
        if stage == "em" and segmenter is not None and done % cfg.em_cycle == 0:
            save_em_progress(run_dir, preview["image"],
                             preview_outputs(preview, autoencoder, segmenter, cfg, stage), done)
        if done % cfg.checkpoint_every == 0 and done < total:
            save_checkpoint(run_dir, stage, done, cfg, autoencoder, segmenter, optimizers)


def heldout_faces(cfg: Config, face_model, device) -> Optional[dict]:
    """`HELDOUT_FACES` clean synthetic faces (no occluder, no unexplainable part) of a seed no
    stage trains on; None for image-folder data (no ground truth)."""
    if cfg.data != "synthetic":
        return None
    faces = make_dataset(cfg, face_model, seed=cfg.seed + HELDOUT_SEED, subset="unoccluded",
                         length=HELDOUT_FACES, unexplainable=0.0)
    return load_batch(faces, list(range(HELDOUT_FACES)), device)


def heldout_rmse(autoencoder, faces: Optional[dict]) -> Optional[float]:
    """R's mean image RMSE (0-255, Tab. 1) on the held-out faces, in eval mode: an underfit R
    shows itself while it trains (the floor is the pixel noise, about 2.6)."""
    if faces is None:
        return None
    with torch.no_grad(), focus.eval_mode(autoencoder):
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
        append_log(run_dir, {"stage": stage, "step": step, "phase": phase, **means, "lr": lr,
                             "s_per_step": seconds})
        terms = {k: v for k, v in means.items()}
        say(run_dir, progress_line(stage, step, total, phase, terms, seconds))
        learned_mask = phase in ("segmenter", "pretrain") or (stage == "em"
                                                               and cfg.variant == "focus")
        if learned_mask and not cfg.collapse_low <= means["kept"] <= cfg.collapse_high:
            say(run_dir, f"WARNING: mask collapse at {stage} step {step} ({phase}): the mask "
                         f"keeps {means['kept']:.3f} of the rendered face (nearly all "
                         f"{'outlier' if means['kept'] < cfg.collapse_low else 'face'}); "
                         f"rebalance eta_area / eta_nbr / eta_bin (see losses.py)")


def draw_figures(run_dir: str, stage: str, step: int, preview: dict, autoencoder, segmenter,
                 cfg: Config) -> None:
    """figures/<stage>_<step>.png (target | reconstruction | mask | overlay) and the loss curves."""
    recon = preview_outputs(preview, autoencoder, segmenter, cfg, stage)
    save_fit_figure(os.path.join(run_dir, "figures", f"{stage}_{step:07d}.png"),
                    preview["image"], recon)
    save_loss_curves(run_dir)


def finish_prior(run_dir: str, cfg: Config, autoencoder, face_model) -> None:
    """E_MP of the trained R_syn over `prior_samples` held-out faces -> misfit_prior.pt."""
    samples = prior_faces(cfg, face_model, seed=cfg.seed + PRIOR_EVAL_SEED,
                          length=cfg.prior_samples)
    prior = misfit_prior(autoencoder, samples, cfg)
    atomic_save({"E_MP": prior, "num_samples": cfg.prior_samples,
                 "face_model": cfg.face_model}, os.path.join(run_dir, "misfit_prior.pt"))
    norms = prior.norm(dim=1)  # (V,)
    say(run_dir, f"prior: E_MP over {cfg.prior_samples} faces, per-vertex |E_MP| mean "
                 f"{norms.mean():.3f} mm, max {norms.max():.3f} mm")


# ----------------------------------------------------------------------------------------------
# run directory and CLI
# ----------------------------------------------------------------------------------------------

def read_config(run_dir: str) -> Config:
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise RunError(f"no config.json in {run_dir}: start the run with --stage init")
    with open(path) as f:
        stored = json.load(f)
    known = {f.name for f in dataclasses.fields(Config)}
    if set(stored) != known:
        raise RunError(f"{path} does not match this version's Config (differs in "
                       f"{sorted(set(stored) ^ known)})")
    return Config(**stored)


def prepare_run_dir(run_dir: str, cfg: Optional[Config]) -> Config:
    """Create the run directory and its config.json, or check the existing one.

    `cfg` None means: take the configuration from config.json (a later stage or --resume).
    """
    path = os.path.join(run_dir, "config.json")
    if os.path.exists(path):
        stored = read_config(run_dir)
        if cfg is not None and cfg != stored:
            changed = [f.name for f in dataclasses.fields(Config)
                       if getattr(cfg, f.name) != getattr(stored, f.name)]
            raise RunError(f"{run_dir} was started with another config (differs in {changed}): "
                           f"drop those options or choose another --run-dir")
        return stored
    if cfg is None:
        raise RunError(f"no config.json in {run_dir}: nothing to resume")
    os.makedirs(os.path.join(run_dir, "figures"), exist_ok=True)
    atomic_save_text(json.dumps(dataclasses.asdict(cfg), indent=1), path)
    return cfg


def atomic_save_text(text: str, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# settings that only the em and prior stages read: runs that differ in nothing else share init
AFTER_INIT = ("em_steps", "em_cycle", "em_ae_steps", "prior_steps", "prior_samples", "eta_nbr",
              "eta_dist", "eta_area", "eta_presv", "eta_bin", "nbr_size", "nbr_normalize",
              "bin_form", "segmenter_losses", "detach_mask", "collapse_low", "collapse_high",
              "log_every", "checkpoint_every", "figure_every", "preview", "device", "threads")


def copy_init(source_dir: str, run_dir: str, cfg: Config) -> None:
    """Start `run_dir` from the finished init stage of `source_dir` (`--init-from`).

    The init stage (Sec. 3.3) reads no EM or segmenter-loss setting, so ablations of the EM
    stage (Sec. 4.4) can share one init: the copy is the file their own init would write.
    Raises RunError when the source is unfinished or was configured differently before EM.
    """
    source = load_checkpoint(checkpoint_path(source_dir, "init"))
    if not source["done"]:
        raise RunError(f"--init-from {source_dir}: its init stage is not finished")
    differ = sorted(name for name, value in dataclasses.asdict(cfg).items()
                    if name not in AFTER_INIT and source["config"].get(name) != value)
    if differ:
        raise RunError(f"--init-from {source_dir}: its init was trained with other settings "
                       f"({', '.join(differ)}); only {', '.join(AFTER_INIT[:6])}, ... may differ")
    target = checkpoint_path(run_dir, "init")
    if not os.path.exists(target):
        atomic_save(source, target)
        say(run_dir, f"init: copied the finished init stage of {source_dir}")


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
    cfg = prepare_run_dir(run_dir, cfg)
    if init_from is not None:
        copy_init(init_from, run_dir, cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    face_model = bfm.load_face_model(cfg.face_model).to(torch.device(cfg.device))
    stages = STAGES if stage == "all" else (stage,)
    for name in (s for s in stages if not (init_from is not None and s == "init")):
        path = checkpoint_path(run_dir, name)
        if stage == "all" and resume and not os.path.exists(path):
            # a stage that never started begins normally (its predecessor is finished)
            train_stage(name, run_dir, cfg, resume=False, face_model=face_model)
        else:
            train_stage(name, run_dir, cfg, resume=resume, face_model=face_model)
    return cfg


def _parse_value(field: dataclasses.Field, text: str):
    kind = field.type if isinstance(field.type, type) else {"int": int, "float": float,
                                                            "str": str, "bool": bool}[field.type]
    if kind is bool:
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise ValueError(f"{_flag(field.name)} takes true or false, got {text!r}")
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"{_flag(field.name)} takes {kind.__name__} values, got {text!r}") \
            from None


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def parse_overrides(tokens: list) -> dict:
    """`--key value` pairs -> typed Config overrides (dashes or underscores; unknown: error)."""
    fields = {f.name: f for f in dataclasses.fields(Config)}
    overrides = {}
    if len(tokens) % 2:
        raise ValueError(f"options come in --key value pairs, got {' '.join(tokens)!r}")
    for flag, text in zip(tokens[::2], tokens[1::2]):
        name = flag[2:].replace("-", "_") if flag.startswith("--") else None
        if name not in fields:
            close = difflib.get_close_matches(name or flag, fields, n=3)
            hint = f" (did you mean {', '.join(_flag(c) for c in close)}?)" if close else ""
            raise ValueError(f"unknown option {flag!r}{hint}; the options are the Config "
                             f"fields: {', '.join(_flag(f) for f in sorted(fields))}")
        overrides[name] = _parse_value(fields[name], text)
    return overrides


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
    parser.add_argument("--face-model", help="bfm.load_face_model spec (default 'toy')")
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
