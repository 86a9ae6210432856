"""The configuration of a run: `Config`, its presets, its `--key value` parser, and every seed.

`Config` is one frozen dataclass whose fields carry the paper's symbols and sources (Supp. A.2
for the schedule, Sec. 3.2 for the segmenter loss L_S, Eq. 8 for the autoencoder loss L_R);
`make_config(preset, **overrides)` builds a validated one from a named preset (`tiny` for
tests, `cpu` for a laptop, `paper` for the published schedule) and `parse_overrides` reads the
`--key value` options of train.py into typed overrides. The variants and ablations of Sec. 4
are values of its fields (`VARIANTS`, `SEGMENTER_LOSSES`).

Seeds: every seed constant of the project is here, so that no two data sets share one by
accident. The training set is drawn with `cfg.seed`; the other data sets add an offset to it
(the prior stage, the preview faces, the held-out faces logged while training) or use a fixed
seed of their own (evaluation, validation, the skin-colour model, fit.py's sample).

Run `python train.py --help` to see every field as an option;
`python -m pytest -q tests/test_train.py` tests this module.
"""
import dataclasses
import difflib
from dataclasses import dataclass

STAGES = ("init", "em", "prior")
R_SOURCES = ("encoder", "oracle")
VARIANTS = ("focus", "mofa", "supervised", "cutout", "cutmix")
SEGMENTER_LOSSES = ("full", "baseline", "neighbor", "perceptual")

# ----------------------------------------------------------------------------------------------
# seeds: the one place they are set
# ----------------------------------------------------------------------------------------------

# seed offsets of training's data sets (training set = cfg.seed)
PRIOR_TRAIN_SEED, PRIOR_EVAL_SEED, PREVIEW_SEED, HELDOUT_SEED = 1_000, 2_000, 3_000, 6_000
STAGE_SALT = {"init": 11, "em": 23, "prior": 37}  # separates the RNG streams of the stages
HELDOUT_FACES = 32  # clean held-out faces whose RMSE is logged while training
# evaluation's faces (absolute seeds, whatever cfg.seed is)
EVAL_SEED = 5_000  # the test faces; training uses cfg.seed (0), the prior 1,000 and 2,000,
#                    previews 3,000, held-out faces 6,000
SKIN_SEED = 4_000  # the faces the skin-colour model is fitted on
VALIDATION_SEED = 7_000  # faces to choose settings on (docs/levers.md); never EVAL_SEED's
FIT_SAMPLE_SEED = 1  # fit.py's held-out synthetic samples (`python fit.py INDEX`)
PHOTO_OCCLUDER_SEEDS = (0, 1, 2, 3)  # photos.py: draws of each occluder pasted on a photo
LIGHT_PRIOR_SEED = 8_000  # the lights `data.light_statistics` draws for fit.py's light prior
ORACLE_NOISE_SEED = 9_000  # the oracle R's noise (training adds the step, evaluation not)


# ----------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Config:
    """Every setting of a run. The field defaults are not a preset: they keep the paper's loss
    weights and thresholds on a laptop's networks, images and schedule. The `cpu` preset
    (`PRESETS`, the default of `make_config` and of train.py) refines R by fitting steps,
    shortens the schedule of the refined steps and changes three more (pixel_form, lambda_lm,
    train_occluded), `tiny` shrinks everything for tests, and
    `paper` restores the paper's sizes and schedule."""
    # data
    data: str = "synthetic"  # "synthetic" or a folder of images + landmarks.csv (Sec. 4.1)
    face_model: str = "toy"  # face_models.load_face_model spec; paper: BFM 2017 (Sec. 4.1)
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
    # R's render for S and for the mask: the encoder (paper: one forward pass), refined by
    # `refine_steps` fitting steps at CPU scale (fit.refine), or the oracle (focus.oracle_theta)
    r_source: str = "encoder"  # "encoder" (R = E + renderer) or "oracle" (true theta)
    refine_steps: int = 0  # K: fitting steps from E(I_T) (0: the paper's one forward pass)
    refine_landmark_steps: int = 0  # landmark-only steps before them (fit.fit's first stage)
    oracle_noise: float = 0.0  # oracle: std of noise on identity, expression, albedo
    lambda_distill: float = 0.0  # E(I_T) -> refined theta, squared, std units; not in the paper
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
    # the default: meaningful on a 2-core CPU (the dataclass defaults, so the paper's eta) with
    # R refined by 30 landmark + 30 fitting steps wherever S looks at it (fit.refine: the
    # encoder alone does not fit at this budget), a shorter schedule for the refined steps, the
    # official unsquared L_pixel and lambda_lm re-balanced for it at 64 x 64, and half of the
    # training faces occluded (docs/levers.md)
    "cpu": dict(refine_steps=30, refine_landmark_steps=30, init_seg_steps=200, em_steps=900,
                em_cycle=300, em_ae_steps=150, pixel_form="official", lambda_lm=2e-3,
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
               "lr_schedule": ("step", "cosine"), "r_source": R_SOURCES}
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
    for name in ("init_seg_steps", "em_steps", "prior_steps", "threads", "data_cache_mb",
                 "refine_steps", "refine_landmark_steps", "oracle_noise", "lambda_distill"):
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
    if cfg.r_source == "oracle" and (cfg.variant != "focus" or cfg.data != "synthetic"):
        raise ValueError("r_source 'oracle' renders each face's true theta: it needs synthetic "
                         "data and the focus variant (it trains S only)")
    if cfg.segmenter_losses == "perceptual" and cfg.perceptual == "none":
        raise ValueError("segmenter_losses='perceptual' needs a perceptual network F "
                         "(--perceptual dlib or arcface:PATH)")


def refines(cfg: Config) -> bool:
    """R is the encoder's estimate refined by fitting steps (`fit.refine`), not its one pass."""
    return cfg.refine_steps > 0 or cfg.refine_landmark_steps > 0


def has_segmenter(cfg: Config) -> bool:
    """FOCUS trains the segmenter S; the baselines (MoFA, supervised, cutout, cutmix) do not."""
    return cfg.variant == "focus"


# ----------------------------------------------------------------------------------------------
# --key value options
# ----------------------------------------------------------------------------------------------

def parse_value(field: dataclasses.Field, text: str):
    """The text of option `field` as the field's type (int, float, str or bool)."""
    kind = field.type if isinstance(field.type, type) else {"int": int, "float": float,
                                                            "str": str, "bool": bool}[field.type]
    if kind is bool:
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise ValueError(f"{flag(field.name)} takes true or false, got {text!r}")
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"{flag(field.name)} takes {kind.__name__} values, got {text!r}") \
            from None


def flag(name: str) -> str:
    """The command-line option of a Config field: `eta_area` -> `--eta-area`."""
    return "--" + name.replace("_", "-")


def parse_overrides(tokens: list) -> dict:
    """`--key value` pairs -> typed Config overrides (dashes or underscores; unknown: error)."""
    fields = {f.name: f for f in dataclasses.fields(Config)}
    overrides = {}
    if len(tokens) % 2:
        raise ValueError(f"options come in --key value pairs, got {' '.join(tokens)!r}")
    for option, text in zip(tokens[::2], tokens[1::2]):
        name = option[2:].replace("-", "_") if option.startswith("--") else None
        if name not in fields:
            close = difflib.get_close_matches(name or option, fields, n=3)
            hint = f" (did you mean {', '.join(flag(c) for c in close)}?)" if close else ""
            raise ValueError(f"unknown option {option!r}{hint}; the options are the Config "
                             f"fields: {', '.join(flag(f) for f in sorted(fields))}")
        overrides[name] = parse_value(fields[name], text)
    return overrides
