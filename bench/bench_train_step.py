"""Training-step speed: time per step of each training phase, with a breakdown.

Times the three phases of `train.py` (init autoencoder step with M_pre, EM segmenter step,
EM autoencoder step) at a preset's sizes (`cpu`: 64 x 64, batch 16, width 16, no F;
`paper`: 224 x 224, batch 12, width 64, dlib F), split into data (synthetic batch),
encoder (forward), render (face model + renderer forward), segmenter (forward), losses
(the loss functions without F), F (forward of the perceptual network, all its calls),
backward, optimizer. The step is the same
computation as `train.phase_loss` with the parts timed one by one (CUDA is synchronised
around each part). Reports the median of `--repeats` steps after `--warmup` steps.

    python bench/bench_train_step.py --preset cpu
    python bench/bench_train_step.py --preset paper --repeats 2 --warmup 1     # slow on a CPU
    python bench/bench_train_step.py --preset paper --device cuda
Prints a markdown table and writes JSON to bench/results/train_step_<preset>_<device>.json.
"""
import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import config  # noqa: E402
import face_models  # noqa: E402
import losses  # noqa: E402
import perceptual  # noqa: E402
import runs  # noqa: E402
import train  # noqa: E402

PARTS = ("data", "encoder", "render", "segmenter", "losses", "F", "backward", "optimizer")


class Timer:
    """Accumulates wall time per named part; synchronises CUDA around each part."""

    def __init__(self, device: torch.device):
        self.device, self.times, self.last = device, dict.fromkeys(PARTS, 0.0), None

    def start(self):
        self._sync()
        self.last = time.perf_counter()

    def lap(self, part: str):
        self._sync()
        now = time.perf_counter()
        self.times[part] += now - self.last
        self.last = now

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def autoencoder_step(phase, batch_fn, nets, cfg, F, timer):
    """One autoencoder step (init: M_pre; em: S's mask), timed by part."""
    autoencoder, segmenter, optimizer = nets
    train.set_phase("autoencoder", autoencoder, segmenter)
    timer.start()
    batch = batch_fn()
    images, lm = batch["image"], batch["landmarks"]
    timer.lap("data")
    theta = autoencoder.encoder(images)
    timer.lap("encoder")
    out = autoencoder.decode(theta, height=cfg.image_size, width=cfg.image_size)
    timer.lap("render")
    if phase == "init":
        mask = losses.preliminary_mask(images, out.image.detach(), out.region, xi=cfg.xi)
    else:
        with torch.no_grad():
            mask = segmenter(out.image.detach(), images)  # (B, 1, H, W)
    timer.lap("segmenter")
    loss, _ = losses.autoencoder_loss(
        images, out.image, mask, out.region, lm_target=lm, lm_pred=out.landmarks,
        lm_weights=autoencoder.face_model.landmark_weights,
        coefficients=(theta.id, theta.exp, theta.albedo), lambda_lm=cfg.lambda_lm)
    timer.lap("losses")
    if F is not None:
        with torch.no_grad():
            target_embedding = F(images, lm).embedding
        # L_per = cos(F(I_T), F(I_R)), Eq. 6
        loss = loss + cfg.lambda_per * losses.perceptual_loss(target_embedding,
                                                              F(out.image, lm).embedding)
    timer.lap("F")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    timer.lap("backward")
    optimizer.step()
    timer.lap("optimizer")


def segmenter_step(batch_fn, nets, cfg, F, timer):
    """One EM segmenter step (R frozen), timed by part."""
    autoencoder, segmenter, optimizer = nets
    train.set_phase("segmenter", autoencoder, segmenter)
    timer.start()
    batch = batch_fn()
    images, lm = batch["image"], batch["landmarks"]
    timer.lap("data")
    with torch.no_grad():
        theta = autoencoder.encoder(images)
        timer.lap("encoder")
        out = autoencoder.decode(theta, height=cfg.image_size, width=cfg.image_size)
    timer.lap("render")
    mask = segmenter(out.image, images)  # (B, 1, H, W)
    timer.lap("segmenter")
    loss, _ = losses.segmenter_loss(images, out.image, mask, out.region, eta_nbr=cfg.eta_nbr,
                                    eta_area=cfg.eta_area, eta_bin=cfg.eta_bin)
    timer.lap("losses")
    if F is not None:
        kept = mask * out.region  # (B, 1, H, W)
        with torch.no_grad():
            feat_target = F(images, lm).early
        feat_target_masked = F(images * kept, lm).early
        feat_rendered_masked = F(out.image * kept, lm).early
        loss = loss + cfg.eta_dist * losses.dist_loss(feat_target_masked, feat_rendered_masked) \
            + cfg.eta_presv * losses.preserve_loss(feat_target_masked, feat_target)
    timer.lap("F")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    timer.lap("backward")
    optimizer.step()
    timer.lap("optimizer")


def bench_phase(phase, cfg, nets, batch_fn, F, device, repeats, warmup):
    """Median seconds per part over `repeats` steps (after `warmup`)."""
    runs = []
    for k in range(warmup + repeats):
        timer = Timer(device)
        if phase == "em segmenter":
            segmenter_step(batch_fn, nets[1], cfg, F, timer)
        else:
            autoencoder_step(phase.split()[0], batch_fn, nets[0], cfg, F, timer)
        if k >= warmup:
            runs.append(timer.times)
    return {part: statistics.median(r[part] for r in runs) for part in PARTS}


def setup(cfg):
    """(nets, batch_fn, F) of `bench_phase` at `cfg`: R and S with their optimisers, a source
    of training batches on cfg.device, and F (None without one)."""
    device = torch.device(cfg.device)
    face_model = face_models.load_face_model(cfg.face_model).to(device)
    autoencoder, segmenter = runs.build_models(cfg, face_model)
    F = perceptual.load_perceptual(cfg.perceptual, device=device)
    # the dataset renders with its own CPU copy of the face model (data.SyntheticFaces)
    dataset = train.make_dataset(cfg, face_model, seed=cfg.seed)
    step = iter(range(10 ** 9))

    def batch_fn():
        indices = train.batch_indices(next(step), cfg, len(dataset), salt=1)
        return train.load_batch(dataset, indices, device)

    ae_opt, _ = train.make_optimizer(autoencoder.encoder.parameters(), cfg.lr, cfg)
    seg_opt, _ = train.make_optimizer(segmenter.parameters(), cfg.lr * cfg.seg_lr_factor, cfg)
    nets = ((autoencoder, segmenter, ae_opt),
            (autoencoder, segmenter, seg_opt))
    return nets, batch_fn, F


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu", choices=sorted(config.PRESETS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--perceptual", help="override the preset's F (e.g. none, dlib)")
    parser.add_argument("--batch", type=int, help="override the preset's batch size")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {"device": args.device}
    if args.perceptual:
        overrides["perceptual"] = args.perceptual
    if args.batch:
        overrides["batch_size"] = args.batch
    cfg = config.make_config(args.preset, **overrides)
    device = torch.device(cfg.device)
    nets, batch_fn, F = setup(cfg)
    results = {}
    for phase in ("init autoencoder", "em segmenter", "em autoencoder"):
        results[phase] = bench_phase(phase, cfg, nets, batch_fn, F, device, args.repeats,
                                     args.warmup)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(f"\n{args.preset} preset: {cfg.image_size} x {cfg.image_size}, batch {cfg.batch_size}, "
          f"widths {cfg.encoder_width}/{cfg.unet_width}, F {cfg.perceptual}; device {device} "
          f"({name or platform.machine()}), {torch.get_num_threads()} threads; ms per step "
          f"(median of {args.repeats})\n")
    print("| phase | " + " | ".join(PARTS) + " | total | images/s |")
    print("|---" * (len(PARTS) + 3) + "|")
    for phase, parts in results.items():
        total = sum(parts.values())
        print(f"| {phase} | " + " | ".join(f"{1e3 * parts[p]:.1f}" for p in PARTS)
              + f" | {1e3 * total:.1f} | {cfg.batch_size / total:.1f} |")
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    path = os.path.join(ROOT, "bench", "results", f"train_step_{args.preset}_{device.type}.json")
    with open(path, "w") as f:
        json.dump({"preset": args.preset, "config": dataclasses.asdict(cfg), "device": str(device),
                   "device_name": name, "threads": torch.get_num_threads(),
                   "repeats": args.repeats, "seconds": results}, f, indent=1)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
