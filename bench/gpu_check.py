"""GPU check: whether the CUDA path works, and how fast it is, in one command.

The renderer, the networks and the losses take their device from their inputs (nothing calls
`.cuda()`), and the `paper` preset is meant for a GPU; this script checks that path on one
CUDA device and prints a markdown report (also written to `--out`):

1. CUDA tests: `python -m pytest -q -m cuda`, counted as passed, failed and skipped.
2. CPU / CUDA agreement on the same float32 inputs, each output with its largest difference:
   the renderer forward and backward (face ids, region, image, landmarks, and the gradients
   of a random linear read-out of image and landmarks), every loss of losses.py with its
   gradient, and the encoder and UNet forward passes in evaluation mode. An output agrees
   when its largest difference is at most 1e-4 x max(1, its largest magnitude on the CPU):
   1e-4 on values of order one (images, masks, losses), relative beyond (gradients, pixel
   coordinates).
   Convolutions and matrix products run in full float32 here (cuDNN's TF32 is off during the
   comparison; the timings below keep torch's defaults).
3. Throughput at the `paper` preset's sizes, with the device name, torch and CUDA versions,
   batch size and peak GPU memory: the renderer's forward + backward at 224 x 224 on a
   BFM-sized mesh (the toy face at resolution 188: 35,532 vertices, 70,312 triangles; the
   cropped BFM of Deep3D and the official code has 35,709 vertices), batch 64, in images/s
   (`bench_renderer.bench_mesh`); one EM autoencoder step and one EM segmenter step (widths
   64, 224 x 224, batch 12, F = dlib's ResNet), in steps/s (`bench_train_step.bench_phase`
   on one batch drawn beforehand, so that the CPU's synthetic data does not count).
4. A smoke run: the `paper` preset shortened to 400 steps (`SMOKE_STEPS`; init, then em) on
   synthetic faces, with the loss of each phase and R's held-out RMSE at its first and last
   log line (train.py's log.csv).

Targets: every CUDA test passes, every output agrees, the renderer reaches 20,000 images/s
(the official FOCUS renderer does about 1.5 images/s on a 2-core CPU).

`--cpu-dry-run` runs every part at small sizes (`tiny` preset: 32 x 32, widths 4, batch 2) on
the CPU, the comparison with the CPU itself (so every difference is 0 and the code that
compares is exercised; the CUDA tests are skipped there), so that the script cannot rot before
a GPU is at hand.

    python bench/gpu_check.py                       # the first CUDA device, a few minutes
    python bench/gpu_check.py --device cuda:1 --out gpu.md
    python bench/gpu_check.py --cpu-dry-run         # any machine, about 12 s
Writes bench/results/gpu_check_<cuda|cpu-dry-run>.md unless `--out`; exits with 1 when a
CUDA test fails or an output disagrees. Test: `python -m pytest -q tests/test_gpu_check.py`.
"""
import argparse
import contextlib
import copy
import csv
import dataclasses
import datetime
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable
from xml.etree import ElementTree

import torch
import torch.nn.functional as TF

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_renderer  # noqa: E402
import bench_train_step  # noqa: E402
import config  # noqa: E402
import face_models  # noqa: E402
import focus  # noqa: E402
import losses  # noqa: E402
import renderer  # noqa: E402
import train  # noqa: E402
from bfm import join_theta  # noqa: E402
from timing import device_name, peak_memory_mib, reset_peak_memory  # noqa: E402

TOLERANCE = 1e-4  # agreement: largest difference <= TOLERANCE x max(1, largest |CPU value|)
FACE_ID_TOLERANCE = 1e-3  # share of pixels whose face id (or region) may differ (edge ties)
RENDER_TARGET = 20_000  # images/s, renderer forward + backward, 224 x 224, 35k vertices
SEED = 0  # every random input of the check


@dataclass(frozen=True)
class Sizes:
    """The sizes of one kind of check: the GPU's (paper) or the CPU dry run's (tiny)."""
    preset: str  # config preset of the training steps and the smoke run
    image_size: int  # H = W of every check
    resolution: int  # toy face grid of the renderer checks
    compare_batch: int  # batch of the agreement checks
    width: int  # encoder and UNet width of the agreement check
    render_batch: int  # renderer throughput batch
    repeats: int  # timed repetitions after the warm-up
    smoke: dict  # config overrides that shorten the smoke run


# the paper preset shortened to 400 steps: init 200 autoencoder + 40 segmenter steps,
# em 2 rounds of 20 segmenter + 60 autoencoder steps
SMOKE_STEPS = dict(init_ae_steps=200, init_seg_steps=40, em_steps=160, em_cycle=80,
                   em_ae_steps=60, train_length=600, log_every=20, checkpoint_every=400,
                   figure_every=400)
GPU = Sizes(preset="paper", image_size=224, resolution=188, compare_batch=4, width=64,
            render_batch=64, repeats=10, smoke=SMOKE_STEPS)
# the tiny preset's own schedule (init 4 + 2, em 6), figures only at the end of each stage
DRY_RUN = Sizes(preset="tiny", image_size=32, resolution=24, compare_batch=2, width=4,
                render_batch=2, repeats=2, smoke=dict(figure_every=100))


# ----------------------------------------------------------------------------------------------
# 1. the CUDA tests
# ----------------------------------------------------------------------------------------------

def cuda_tests() -> dict:
    """Run `python -m pytest -q -m cuda` in the repository; counts from its JUnit XML."""
    with tempfile.TemporaryDirectory() as tmp:
        xml = os.path.join(tmp, "cuda.xml")
        command = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                   f"--junitxml={xml}"]
        start = time.perf_counter()
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if not os.path.isfile(xml):
            raise RuntimeError(f"pytest wrote no report (exit {result.returncode}): "
                               f"{(result.stdout + result.stderr).strip()[-500:]}")
        suite = ElementTree.parse(xml).getroot().find("testsuite")
    counts = {key: int(suite.get(key)) for key in ("tests", "failures", "errors", "skipped")}
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    return {"passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "failed": counts["failures"] + counts["errors"], "skipped": counts["skipped"],
            "failed_names": failed, "seconds": seconds,
            "command": "python " + " ".join(command[1:6])}


# ----------------------------------------------------------------------------------------------
# 2. CPU / device agreement
# ----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def full_float32():
    """cuDNN convolutions and CUDA matrix products in IEEE float32 (no TF32) inside the block."""
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    saved = conv.fp32_precision, matmul.fp32_precision
    conv.fp32_precision = matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        conv.fp32_precision, matmul.fp32_precision = saved


def difference(name: str, reference: torch.Tensor, other: torch.Tensor) -> dict:
    """One row: the largest |reference - other| against the reference's largest magnitude."""
    ref, oth = reference.detach().cpu().double(), other.detach().cpu().double()
    largest = (ref - oth).abs().max().item() if ref.numel() else 0.0
    scale = ref.abs().max().item() if ref.numel() else 0.0
    return {"output": name, "difference": largest, "scale": scale,
            "agrees": largest <= TOLERANCE * max(1.0, scale)}


def share_differing(name: str, same: torch.Tensor) -> dict:
    """One row: the share of pixels that differ (`same` is True where they do not)."""
    share = 1.0 - same.float().mean().item()
    return {"output": name, "difference": share, "scale": None,
            "agrees": share <= FACE_ID_TOLERANCE}


def render_with_grad(model, inputs: list, device: torch.device, size: int, readout: tuple):
    """`renderer.render` of copies of `inputs` on `device`, and the gradients of
    sum_x w(x) I_R(x) + sum_k v_k lm_R,k (the random read-out (w, v)) with respect to them."""
    leaves = [t.to(device, copy=True).requires_grad_() for t in inputs]
    out = renderer.render(*leaves, model.triangles.to(device), model.landmarks.to(device),
                          height=size, width=size)
    image_weights, landmark_weights = (t.to(device) for t in readout)
    # L = sum_x w(x) I_R(x) + sum_k v_k lm_R,k
    ((out.image * image_weights).sum() + (out.landmarks * landmark_weights).sum()).backward()
    return out, [leaf.grad for leaf in leaves]


def renderer_agreement(reference: torch.device, device: torch.device, sizes: Sizes) -> list:
    """Rows for the renderer: face ids, region, image, landmarks, and the four gradients.

    The image and the read-out compare only pixels whose face id is the same on both devices,
    so that a pixel on a triangle edge that flips between neighbours is counted once (in the
    face-id row) and not as an image or gradient difference.
    """
    model = face_models.load_face_model("toy", resolution=sizes.resolution)
    B, S = sizes.compare_batch, sizes.image_size
    inputs = bench_renderer.random_inputs(model, B, torch.device("cpu"), seed=SEED)
    with torch.no_grad():
        ids = [renderer.render(*(t.to(d) for t in inputs), model.triangles.to(d),
                               model.landmarks.to(d), height=S, width=S).face_id.cpu()
               for d in (reference, device)]
    same = ids[0] == ids[1]  # (B, H, W)
    g = torch.Generator().manual_seed(SEED)
    readout = (torch.rand(B, 3, S, S, generator=g) * same[:, None],
               torch.rand(B, model.landmarks.numel(), 2, generator=g))
    (ref, ref_grads), (dev, dev_grads) = (render_with_grad(model, inputs, d, S, readout)
                                          for d in (reference, device))
    kept = same[:, None].to(ref.image.device)  # (B, 1, H, W)
    rows = [share_differing("renderer face ids (share of pixels)", same),
            share_differing("renderer region S_R (share of pixels)",
                            ref.region.cpu() == dev.region.cpu()),
            difference("renderer image I_R (pixels of the same face)", ref.image * kept,
                       dev.image.to(ref.image.device) * kept),
            difference("renderer landmarks lm_R (px)", ref.landmarks, dev.landmarks)]
    for name, a, b in zip(("vertices", "albedo", "sh", "pose"), ref_grads, dev_grads):
        rows.append(difference(f"renderer gradient, {name}", a, b))
    return rows


def loss_inputs(B: int, S: int) -> dict:
    """Random CPU inputs of every loss: images, mask, region, features, landmarks, theta."""
    g = torch.Generator().manual_seed(SEED)
    region = torch.zeros(B, 1, S, S)
    region[..., S // 8:-S // 8, S // 6:-S // 6] = 1
    return {"target": torch.rand(B, 3, S, S, generator=g),
            "rendered": torch.rand(B, 3, S, S, generator=g),
            "mask": torch.rand(B, 1, S, S, generator=g), "region": region,
            "feat_a": torch.randn(B, 8, 7, 7, generator=g),
            "feat_b": torch.randn(B, 8, 7, 7, generator=g),
            "emb_a": torch.randn(B, 128, generator=g), "emb_b": torch.randn(B, 128, generator=g),
            "lm_target": S * torch.rand(B, 68, 2, generator=g),
            "lm_pred": S * torch.rand(B, 68, 2, generator=g),
            "lm_weights": losses.landmark_weights(),
            "id": torch.randn(B, 80, generator=g), "exp": torch.randn(B, 64, generator=g),
            "albedo": torch.randn(B, 80, generator=g),
            "sh": 0.3 * torch.randn(B, 27, generator=g),
            "sh_mean": 0.1 * torch.randn(27, generator=g),
            "sh_std": 0.5 + torch.rand(27, generator=g),
            "theta": torch.randn(B, 257, generator=g),
            "theta_refined": torch.randn(B, 257, generator=g),
            "theta_step": 1.0 + 9.0 * torch.rand(257, generator=g)}


def pooled(images: torch.Tensor) -> torch.Tensor:
    """A stand-in for F in the two sums: 4 x 4 average pooling, (B, 3, H/4, W/4)."""
    return TF.avg_pool2d(images, 4)


# every loss of losses.py (and M_pre and the RMSE metric) on the inputs x of `loss_inputs`
LOSSES: dict[str, Callable[[dict], torch.Tensor]] = {
    "L_nbr (Eq. 1)": lambda x: losses.neighbor_loss(x["target"], x["rendered"], x["mask"],
                                                    x["region"]),
    "L_nbr official (5 x 5, per image)": lambda x: losses.neighbor_loss(
        x["target"], x["rendered"], x["mask"], x["region"], size=5, normalize="image"),
    "L_dist (Eq. 2)": lambda x: losses.dist_loss(x["feat_a"], x["feat_b"]),
    "L_dist per location": lambda x: losses.dist_loss(x["feat_a"], x["feat_b"],
                                                      per_location=True),
    "L_area (Eq. 3)": lambda x: losses.area_loss(x["mask"], x["region"]),
    "L_presv (Eq. 4)": lambda x: losses.preserve_loss(x["feat_a"], x["feat_b"]),
    "L_bin": lambda x: losses.binary_loss(x["mask"], x["region"]),
    "L_bin official": lambda x: losses.binary_loss(x["mask"], x["region"], form="official"),
    "L_pixel (Eq. 5)": lambda x: losses.pixel_loss(x["target"], x["rendered"], x["mask"]),
    "L_pixel official": lambda x: losses.pixel_loss(x["target"], x["rendered"], x["mask"],
                                                    form="official"),
    "L_per (Eq. 6)": lambda x: losses.perceptual_loss(x["emb_a"], x["emb_b"]),
    "L_lm (Eq. 7)": lambda x: losses.landmark_loss(x["lm_target"], x["lm_pred"],
                                                   x["lm_weights"]),
    "L_reg": lambda x: losses.regularization(x["id"], x["exp"], x["albedo"]),
    "L_mono": lambda x: losses.light_colour_loss(x["sh"]),
    "L_light": lambda x: losses.light_prior_loss(x["sh"], x["sh_mean"], x["sh_std"]),
    "L_distill": lambda x: losses.distillation_loss(x["theta"], x["theta_refined"],
                                                    x["theta_step"]),
    "L_S (Sec. 3.2)": lambda x: losses.segmenter_loss(
        x["target"], x["rendered"], x["mask"], x["region"], features=pooled)[0],
    "L_R (Eq. 8)": lambda x: losses.autoencoder_loss(
        x["target"], x["rendered"], x["mask"], x["region"], lm_target=x["lm_target"],
        lm_pred=x["lm_pred"], lm_weights=x["lm_weights"],
        coefficients=(x["id"], x["exp"], x["albedo"]), features=pooled, sh=x["sh"],
        lambda_mono=10.0)[0],
    "M_pre (Eq. 10)": lambda x: losses.preliminary_mask(x["target"], x["rendered"],
                                                        x["region"]),
    "RMSE (Tab. 1)": lambda x: losses.image_rmse(x["rendered"], x["target"], x["region"],
                                                 x["region"]),
}


def evaluate_loss(function: Callable, inputs: dict, device: torch.device) -> tuple:
    """function(copies of inputs on device) and the gradients of its sum w.r.t. the inputs."""
    leaves = {k: v.to(device, copy=True).requires_grad_() for k, v in inputs.items()}
    value = function(leaves)
    if not value.requires_grad:
        return value, None
    value.sum().backward()
    # every gradient, flattened into one vector
    return value, torch.cat([leaf.grad.flatten().cpu() for leaf in leaves.values()
                             if leaf.grad is not None])


def loss_agreement(reference: torch.device, device: torch.device, sizes: Sizes) -> list:
    """Rows for every entry of `LOSSES`: its value, and its gradient where it has one."""
    inputs = loss_inputs(sizes.compare_batch, sizes.image_size)
    rows = []
    for name, function in LOSSES.items():
        (ref, ref_grad), (dev, dev_grad) = (evaluate_loss(function, inputs, d)
                                            for d in (reference, device))
        rows.append(difference(name, ref, dev))
        if ref_grad is not None:
            rows.append(difference(f"{name}, gradient", ref_grad, dev_grad))
    return rows


def network_agreement(reference: torch.device, device: torch.device, sizes: Sizes) -> list:
    """Rows for the encoder's theta and the UNet's mask, in evaluation mode.

    The encoder's last layer starts at zero (theta = 0 whatever the image); here it gets
    random weights, so that theta depends on the whole trunk.
    """
    torch.manual_seed(SEED)
    encoder, unet = focus.Encoder(width=sizes.width), focus.UNet(width=sizes.width)
    fc = encoder.resnet.fc
    with torch.no_grad():
        fc.weight.copy_(torch.randn(fc.weight.shape) / fc.in_features ** 0.5)
    B, S = sizes.compare_batch, sizes.image_size
    g = torch.Generator().manual_seed(SEED)
    images, rendered = torch.rand(2, B, 3, S, S, generator=g)
    theta, mask = [], []
    for d in (reference, device):
        with torch.no_grad():
            theta.append(join_theta(copy.deepcopy(encoder).to(d).eval()(images.to(d))))
            mask.append(copy.deepcopy(unet).to(d).eval()(rendered.to(d), images.to(d)))
    return [difference(f"encoder theta (width {sizes.width}, eval)", *theta),
            difference(f"UNet M (width {sizes.width}, eval)", *mask)]


def agreement(reference: torch.device, device: torch.device, sizes: Sizes) -> list:
    """Every agreement row: renderer, losses, networks (in full float32)."""
    with full_float32():
        return (renderer_agreement(reference, device, sizes)
                + loss_agreement(reference, device, sizes)
                + network_agreement(reference, device, sizes))


# ----------------------------------------------------------------------------------------------
# 3. throughput
# ----------------------------------------------------------------------------------------------

def renderer_throughput(device: torch.device, sizes: Sizes, batch: int) -> dict:
    """Renderer forward + backward at the check's size on the toy face, images/s."""
    model = face_models.load_face_model("toy", resolution=sizes.resolution)
    row = bench_renderer.bench_mesh(model.name, model, batch, device, sizes.repeats,
                                    size=sizes.image_size)
    return {"what": f"renderer forward + backward ({row['vertices']:,} vertices, "
                    f"{row['triangles']:,} triangles)",
            "batch": batch, "size": sizes.image_size, "rate": row["images_per_s"],
            "unit": "images/s", "peak_mib": row["peak_mib"]}


def step_throughput(device: torch.device, sizes: Sizes, batch: int) -> list:
    """One EM autoencoder step and one EM segmenter step at the preset's sizes, steps/s."""
    cfg = config.make_config(sizes.preset, device=str(device), batch_size=batch)
    nets, batch_fn, F = bench_train_step.setup(cfg)
    fixed = batch_fn()
    rows = []
    for phase in ("em autoencoder", "em segmenter"):
        reset_peak_memory(device)
        parts = bench_train_step.bench_phase(phase, cfg, nets, lambda: fixed, F, device,
                                             sizes.repeats, warmup=2)
        rows.append({"what": f"{phase} step (widths {cfg.encoder_width}/{cfg.unet_width}, "
                             f"F {cfg.perceptual})",
                     "batch": batch, "size": cfg.image_size, "rate": 1.0 / sum(parts.values()),
                     "unit": "steps/s", "peak_mib": peak_memory_mib(device)})
    return rows


# ----------------------------------------------------------------------------------------------
# 4. the smoke run
# ----------------------------------------------------------------------------------------------

def smoke_run(device: torch.device, sizes: Sizes, run_dir: str) -> dict:
    """train.py's init and em stages of the shortened preset in run_dir; its log, summarised."""
    cfg = config.make_config(sizes.preset, device=str(device), **sizes.smoke)
    start = time.perf_counter()
    for stage in ("init", "em"):
        train.run(stage, run_dir, cfg)
    with open(os.path.join(run_dir, "log.csv")) as f:
        log = list(csv.DictReader(f))
    phases = {}
    for row in log:
        phases.setdefault((row["stage"], row["phase"]), []).append(row)
    summary = [{"stage": stage, "phase": phase, "steps": f"{rows[0]['step']}-{rows[-1]['step']}",
                "loss": (float(rows[0]["loss"]), float(rows[-1]["loss"])),
                "rmse": (float(rows[0]["rmse_heldout"]), float(rows[-1]["rmse_heldout"]))}
               for (stage, phase), rows in phases.items()]
    return {"preset": sizes.preset, "steps": train.stage_steps("init", cfg)
            + train.stage_steps("em", cfg), "phases": summary,
            "rmse": (float(log[0]["rmse_heldout"]), float(log[-1]["rmse_heldout"])),
            "seconds": time.perf_counter() - start}


# ----------------------------------------------------------------------------------------------
# the report
# ----------------------------------------------------------------------------------------------

def versions(device: torch.device) -> str:
    """`NVIDIA H200 | 2.13.0 | 12.8`: device name, torch and CUDA versions (table cells)."""
    return f"{device_name(device)} | {torch.__version__} | {torch.version.cuda or 'none'}"


def header(results: dict) -> list:
    """Title, date, device and versions, and the verdict."""
    tests, rows = results["tests"], results["agreement"]
    agree = sum(r["agrees"] for r in rows)
    return [f"# GPU check: {results['title']}", "",
            f"{results['date']}, {results['device_name']}, torch {torch.__version__}, "
            f"CUDA {torch.version.cuda or 'none (CPU build)'}; "
            f"compared: {results['device']} against {results['reference']}; "
            f"{results['seconds']:.0f} s in all.", "",
            f"**{'PASS' if results['passed'] else 'FAIL'}**: CUDA tests {tests['passed']} "
            f"passed, {tests['failed']} failed, {tests['skipped']} skipped; "
            f"{agree} of {len(rows)} outputs agree."]


def tests_section(tests: dict) -> list:
    """The CUDA tests' counts, and each failed test by name."""
    return (["## CUDA tests", "",
             f"`{tests['command']}`: {tests['passed']} passed, {tests['failed']} failed, "
             f"{tests['skipped']} skipped ({tests['seconds']:.0f} s)."]
            + [f"- failed: {name}" for name in tests["failed_names"]])


def agreement_section(results: dict) -> list:
    """The agreement rule and one table row per output."""
    reference, sizes = results["reference"], results["sizes"]
    lines = [f"## {reference} / {results['device']} agreement", "",
             f"float32, batch {sizes.compare_batch}, {sizes.image_size} x {sizes.image_size}; "
             f"an output agrees when its largest difference is at most {TOLERANCE:g} x max(1, "
             f"largest |{reference} value|); face ids and region: at most "
             f"{FACE_ID_TOLERANCE:g} of the pixels differ.", "",
             "| output | largest difference | largest value | agrees |", "|---|---|---|---|"]
    return lines + [f"| {r['output']} | {r['difference']:.3g} | "
                    f"{'-' if r['scale'] is None else format(r['scale'], '.3g')} | "
                    f"{'yes' if r['agrees'] else 'NO'} |" for r in results["agreement"]]


def throughput_section(results: dict) -> list:
    """One table row per measurement, and the renderer against its target."""
    lines = ["## Throughput", "",
             "| measurement | device | torch | CUDA | batch | size | rate | peak GPU MiB |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['what']} | {versions(results['device'])} | {r['batch']} | "
              f"{r['size']} x {r['size']} | {r['rate']:,.1f} {r['unit']} | "
              f"{'-' if math.isnan(r['peak_mib']) else format(r['peak_mib'], ',.0f')} |"
              for r in results["throughput"]]
    rate = results["throughput"][0]["rate"]
    verdict = ("not measured: other sizes" if results["sizes"] != GPU
               else f"{'met' if rate >= RENDER_TARGET else 'NOT met'}: {rate:,.0f}")
    return lines + ["", f"Renderer target: {RENDER_TARGET:,} images/s at 224 x 224 on 35k "
                        f"vertices, batch 64 ({verdict})."]


def smoke_section(smoke: dict) -> list:
    """Loss and held-out RMSE of each phase at its first and last log line."""
    lines = [f"## Smoke run: `{smoke['preset']}` preset, init then em, {smoke['steps']} "
             f"steps, synthetic faces ({smoke['seconds']:.0f} s)", "",
             "| stage | phase | steps logged | loss first | loss last | held-out RMSE first "
             "| held-out RMSE last |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {p['stage']} | {p['phase']} | {p['steps']} | {p['loss'][0]:.4g} | "
              f"{p['loss'][1]:.4g} | {p['rmse'][0]:.2f} | {p['rmse'][1]:.2f} |"
              for p in smoke["phases"]]
    down = [f"{p['stage']} {p['phase']}" for p in smoke["phases"] if p["loss"][1] < p["loss"][0]]
    first, last = smoke["rmse"]
    return lines + ["", f"Loss went down in {len(down)} of {len(smoke['phases'])} phases "
                        f"({', '.join(down) or 'none'}); held-out RMSE (0-255) {first:.2f} -> "
                        f"{last:.2f} ({'down' if last < first else 'not down'})."]


def report(results: dict) -> str:
    """The markdown report of `run_checks`' results."""
    sections = (header(results), tests_section(results["tests"]), agreement_section(results),
                throughput_section(results), smoke_section(results["smoke"]))
    return "\n\n".join("\n".join(lines) for lines in sections) + "\n"


def run_checks(device: torch.device, sizes: Sizes, *, train_batch: int, run_dir: str,
               title: str) -> dict:
    """The four parts of the check, in order; the results `report` formats."""
    start = time.perf_counter()
    reference = torch.device("cpu")
    results = {"title": title, "device": device, "reference": reference, "sizes": sizes,
               "date": datetime.date.today().isoformat(), "device_name": device_name(device)}
    results["tests"] = cuda_tests()
    results["agreement"] = agreement(reference, device, sizes)
    results["throughput"] = ([renderer_throughput(device, sizes, sizes.render_batch)]
                             + step_throughput(device, sizes, train_batch))
    results["smoke"] = smoke_run(device, sizes, run_dir)
    results["passed"] = (results["tests"]["failed"] == 0
                         and all(r["agrees"] for r in results["agreement"]))
    results["seconds"] = time.perf_counter() - start
    return results


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------

def cuda_device(text: str) -> torch.device:
    """The CUDA device named by `text`; ValueError (one line) when it is not one here."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f"unknown device {text!r}: use cuda or cuda:N "
                         f"(or --cpu-dry-run to check the script on the CPU)") from None
    if device.type != "cuda":
        raise ValueError(f"--device must be a CUDA device (cuda, cuda:N), got {text!r}; "
                         f"--cpu-dry-run checks the script on the CPU")
    if not torch.cuda.is_available():
        raise ValueError(f"no CUDA device here (torch {torch.__version__}, CUDA "
                         f"{torch.version.cuda or 'none: a CPU build'}); --cpu-dry-run checks "
                         f"the script on the CPU")
    if (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"{text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--device", default="cuda", help="the CUDA device to check (cuda:N)")
    where.add_argument("--cpu-dry-run", action="store_true",
                       help="small sizes on the CPU, compared with the CPU (tests the script)")
    parser.add_argument("--render-batch", type=int,
                        help=f"renderer throughput batch (default {GPU.render_batch}; dry run "
                             f"{DRY_RUN.render_batch})")
    parser.add_argument("--train-batch", type=int,
                        help="training step batch (default: the preset's, paper 12, tiny 2)")
    parser.add_argument("--out", help="report file (default "
                                      "bench/results/gpu_check_<cuda|cpu-dry-run>.md)")
    parser.add_argument("--run-dir", help="keep the smoke run here (a new folder; default: a "
                                          "temporary folder, removed)")
    return parser


def settings(args: argparse.Namespace) -> tuple:
    """(device, sizes, train batch) of the arguments; ValueError (one line) on bad input."""
    sizes = DRY_RUN if args.cpu_dry_run else GPU
    device = torch.device("cpu") if args.cpu_dry_run else cuda_device(args.device)
    if args.render_batch is not None:
        sizes = dataclasses.replace(sizes, render_batch=args.render_batch)
    train_batch = (args.train_batch if args.train_batch is not None
                   else config.PRESETS[sizes.preset].get("batch_size", config.Config.batch_size))
    for option, value in (("--render-batch", sizes.render_batch), ("--train-batch", train_batch)):
        if value < 1:
            raise ValueError(f"{option} must be >= 1, got {value}")
    if args.run_dir and os.path.exists(args.run_dir):
        raise ValueError(f"--run-dir {args.run_dir} exists: choose a new folder")
    return device, sizes, train_batch


def main(argv=None) -> int:
    """Run the check; print the report and write it to --out. Returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        device, sizes, train_batch = settings(args)
    except ValueError as error:
        sys.exit(f"error: {error}")
    kind = "cpu-dry-run" if args.cpu_dry_run else "cuda"
    title = "CPU dry run (small sizes, cpu against cpu)" if args.cpu_dry_run else str(device)
    with tempfile.TemporaryDirectory() as tmp:
        results = run_checks(device, sizes, train_batch=train_batch, title=title,
                             run_dir=args.run_dir or os.path.join(tmp, "smoke"))
    text = report(results)
    out = args.out or os.path.join(ROOT, "bench", "results", f"gpu_check_{kind}.md")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write(text)
    print("\n" + text + f"\nwrote {out}")
    return 0 if results["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
