"""The run directory: config.json, checkpoints, log.csv and log.txt, and the networks rebuilt
from them.

A run lives in `runs/<name>/` (train.py's module docstring lists its files). Everything that
reads or writes that folder is here, so that train.py keeps only the stages: the checkpoints
(`save_checkpoint` writes models, optimisers, schedules, RNG state and the data position
atomically; `load_checkpoint` and `restore` read them back), config.json (`prepare_run_dir`,
`read_config`), the logs (`say`, `append_log`, `truncate_log`), `copy_init` for EM ablations
that share one init stage, and `build_models` / `load_models`, which build R and S (Sec. 3.1,
Fig. 2a) from a Config and load a finished stage's weights for evaluation and fitting.

Errors a user can fix (a missing, corrupt or unfinished checkpoint, a config that differs)
are `RunError`s with a message saying what to do; the command-line tools print them without
a traceback.

`python -m pytest -q tests/test_train.py` tests this module.
"""
import csv
import dataclasses
import json
import os
import pickle
import zipfile
from typing import Optional

import torch

import bfm
import face_models
import focus
from config import Config, has_segmenter

LOG_FIELDS = ("stage", "step", "phase", "loss", "L_pixel", "L_per", "L_lm", "L_reg", "L_mono",
              "L_distill", "L_nbr", "L_dist", "L_area", "L_presv", "L_bin", "L_bce", "kept",
              "rmse_heldout", "lr", "s_per_step")


class RunError(RuntimeError):
    """A problem with the run directory or a checkpoint, reported without a traceback."""


# ----------------------------------------------------------------------------------------------
# config.json
# ----------------------------------------------------------------------------------------------

def read_config(run_dir: str) -> Config:
    """The Config stored in run_dir/config.json; RunError when missing or of another version."""
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
    """Write `text` to a temporary file in the same folder, then rename it to `path`."""
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


# ----------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------

def checkpoint_path(run_dir: str, stage: str) -> str:
    """run_dir/<stage>.pt."""
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


# ----------------------------------------------------------------------------------------------
# the networks of a run
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
    # channels-last weights: the same networks, laid out so that the CPU's convolutions run
    # faster (about 1.2x at 64 x 64, batch 16: bench/bench_networks.py --memory-format);
    # checkpoints load either way
    encoder.to(memory_format=torch.channels_last)
    if segmenter is not None:
        segmenter.to(device, memory_format=torch.channels_last)
    return autoencoder.to(device), segmenter


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
    autoencoder, segmenter = build_models(cfg, face_models.load_face_model(cfg.face_model))
    segmenter = segmenter if stage != "prior" else None  # R_syn has no segmenter
    restore(state, autoencoder, segmenter)
    return cfg, autoencoder.eval(), segmenter.eval() if segmenter is not None else None


# ----------------------------------------------------------------------------------------------
# log.txt and log.csv
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
