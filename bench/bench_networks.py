"""Network speed: forward + backward per image of the encoder and the UNet, with parameter counts.

Times `focus.Encoder` (ResNet-50 trunk, 257 outputs), `focus.UNet` (the segmenter S), the
perceptual network F (dlib's ResNet with the aligned crop, gradients to the images) and one
whole evaluation of L_S and of L_R (networks + F + `losses.py`, forward and backward) in
training mode (batch-norm statistics, dropout) at 224 x 224, at the paper's width (64) and at
the `cpu` preset's width (16), for one batch size (the paper trains with batch 12; a slow CPU
may need `--batch 2`), with the weights channels-last as `runs.build_models` lays them out
(`--memory-format contiguous` for the default layout). Reports forward (with autograd),
backward and total ms per image (fastest of `--repeats` steps after `--warmup` steps), images/s
and peak memory (CUDA only).

    python bench/bench_networks.py --batch 2                 # CPU
    python bench/bench_networks.py --device cuda --batch 12
    python bench/bench_networks.py --size 64 --batch 16 --widths 16 --memory-format contiguous
Prints a markdown table and writes JSON to bench/results/networks_<device>.json.
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import face_models  # noqa: E402
import focus  # noqa: E402
import losses  # noqa: E402
import perceptual  # noqa: E402
import renderer  # noqa: E402
from bfm import join_theta  # noqa: E402
from timing import device_name, peak_memory_mib, reset_peak_memory, synchronize  # noqa: E402


def timed_step(net, forward, loss, device, repeats, warmup):
    """Fastest forward, backward and total wall times (s) of one training step.

    The minimum over repeats, not the mean: on a shared machine other load only ever adds time.
    """
    times = []
    for step in range(warmup + repeats):
        net.zero_grad(set_to_none=True)
        synchronize(device)
        start = time.perf_counter()
        out = forward()
        synchronize(device)
        middle = time.perf_counter()
        loss(out).backward()
        synchronize(device)
        if step >= warmup:
            times.append((middle - start, time.perf_counter() - middle))
    forward_s, backward_s = np.min(np.array(times), axis=0)
    total_s = min(f + b for f, b in times)
    return float(forward_s), float(backward_s), total_s


def encoder_step(width, batch, size, device):
    """(module, forward, loss) for the encoder on random images."""
    net = focus.Encoder(width=width).to(device)
    images = torch.rand(batch, 3, size, size, device=device)
    return net, lambda: join_theta(net(images)), lambda out: out.square().sum()


def unet_step(width, batch, size, device):
    """(module, forward, loss) for the UNet on random rendered / target pairs."""
    net = focus.UNet(width=width).to(device)
    rendered, target = torch.rand(2, batch, 3, size, size, device=device)
    return net, lambda: net(rendered, target), lambda out: out.sum()


def mean_face_landmarks(batch, size, device):
    """(B, 68, 2) landmarks of the toy mean face rendered at theta = 0."""
    model = face_models.load_face_model("toy")
    out = renderer.render(model.mean_shape[None], model.mean_albedo[None], torch.zeros(1, 27),
                          torch.zeros(1, 6), model.triangles, model.landmarks,
                          height=size, width=size)
    return out.landmarks.expand(batch, -1, -1).to(device)


def perceptual_step(width, batch, size, device):
    """(module, forward, loss) for F (dlib ResNet, aligned crop) with gradients to the images."""
    features = perceptual.load_perceptual("dlib", device=device)
    images = torch.rand(batch, 3, size, size, device=device, requires_grad=True)
    landmarks = mean_face_landmarks(batch, size, device)
    forward = lambda: features(images, landmarks)
    return features, forward, lambda out: out.early.square().mean() + out.embedding.square().mean()


def segmenter_loss_step(width, batch, size, device):
    """(module, forward, loss) for one L_S evaluation: S(I_R, I_T), then Eq. 1-4 and L_bin
    with F on the masked images (the segmenter phase of Sec. 3.2)."""
    net = focus.UNet(width=width).to(device)
    features = perceptual.load_perceptual("dlib", device=device)
    rendered, target = torch.rand(2, batch, 3, size, size, device=device)
    region = torch.zeros(batch, 1, size, size, device=device)
    region[..., size // 8:-size // 8, size // 6:-size // 6] = 1
    landmarks = mean_face_landmarks(batch, size, device)

    def forward():
        mask = net(rendered, target)
        return losses.segmenter_loss(target, rendered, mask, region,
                                     features=lambda x: features(x, landmarks).early)[0]
    return net, forward, lambda total: total


def autoencoder_loss_step(width, batch, size, device):
    """(module, forward, loss) for one L_R evaluation: R(I_T) (encoder, toy face model,
    renderer), then Eq. 5-8 with F's embedding (the autoencoder phase of Sec. 3.2)."""
    net = focus.FaceAutoencoder(focus.Encoder(width=width), face_models.load_face_model("toy")).to(device)
    features = perceptual.load_perceptual("dlib", device=device)
    target = torch.rand(batch, 3, size, size, device=device)
    mask = torch.ones(batch, 1, size, size, device=device)
    lm_target = mean_face_landmarks(batch, size, device)
    weights = losses.landmark_weights(dtype=target.dtype, device=device)

    def forward():
        out = net(target)
        return losses.autoencoder_loss(
            target, out.image, mask, out.region, lm_target=lm_target, lm_pred=out.landmarks,
            lm_weights=weights, coefficients=(out.theta.id, out.theta.exp, out.theta.albedo),
            features=lambda x: features(x, lm_target).embedding)[0]
    return net, forward, lambda total: total


# (name, builder, uses the width): each builder returns (module, forward, loss)
NETWORKS = [("encoder", encoder_step, True), ("unet", unet_step, True),
            ("F (dlib)", perceptual_step, False), ("L_S (S + F + losses)", segmenter_loss_step, True),
            ("L_R (R + F + losses)", autoencoder_loss_step, True)]


def bench(name, builder, width, batch, size, device, repeats, warmup, memory_format):
    net, forward, loss = builder(width, batch, size, device)
    net.to(memory_format=memory_format).train()
    params = sum(p.numel() for p in net.parameters())
    reset_peak_memory(device)
    t_forward, t_backward, t_total = timed_step(net, forward, loss, device, repeats, warmup)
    peak = peak_memory_mib(device)
    return {
        "network": name, "width": width, "parameters": params, "batch": batch, "size": size,
        "forward_ms": 1e3 * t_forward / batch,
        "backward_ms": 1e3 * t_backward / batch,
        "total_ms": 1e3 * t_total / batch,
        "images_per_s": batch / t_total,
        "peak_mib": peak,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 16])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--memory-format", choices=["channels_last", "contiguous"],
                        default="channels_last", help="the layout of the weights")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    args = parser.parse_args(argv)
    if args.batch < 1 or args.size % 16 or args.size < 32 or args.repeats < 1:
        parser.error("--batch and --repeats must be >= 1 and --size a multiple of 16, at least 32")
    device = torch.device(args.device)
    torch.manual_seed(0)

    layout = {"channels_last": torch.channels_last,
              "contiguous": torch.contiguous_format}[args.memory_format]
    rows = [bench(name, builder, width, args.batch, args.size, device, args.repeats, args.warmup,
                  layout)
            for k, width in enumerate(args.widths) for name, builder, widened in NETWORKS
            if widened or k == 0]

    machine = device_name(device)
    print(f"networks forward + backward at {args.size} x {args.size}, batch {args.batch}, "
          f"training mode, {args.memory_format} weights, on {machine} (torch {torch.__version__})")
    print("| network | width | parameters | forward ms/img | backward ms/img | total ms/img "
          "| img/s | peak MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['network']} | {r['width']} | {r['parameters']:,} | {r['forward_ms']:.1f} | "
              f"{r['backward_ms']:.1f} | {r['total_ms']:.1f} | {r['images_per_s']:.1f} | "
              f"{r['peak_mib']:.0f} |")

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"networks_{device.type}.json")
    with open(path, "w") as f:
        json.dump({"machine": machine, "torch": torch.__version__,
                   "memory_format": args.memory_format, "rows": rows}, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
