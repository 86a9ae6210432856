"""Per-image fitting speed: one real photo (Grace Hopper, matplotlib's sample data), aligned to
SIZE x SIZE, fitted with `fit.fit` (100 landmark steps + 300 steps) in the plain mode and in
the robust mode with `photos.ROBUST`, each also coarse-to-fine (`fit.coarse_to_fine`: 200 of
the 300 steps at half the size), and the landmark stage alone (it projects the 68 landmark
vertices and renders nothing).

    python bench/bench_fit.py                 # 224 x 224, CPU, torch's default threads
    python bench/bench_fit.py --size 112 --repeats 3
Prints a markdown table and writes JSON to bench/results/fit_<device>.json.
"""
import argparse
import json
import os
import platform
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import face_models  # noqa: E402
import photos  # noqa: E402
from timing import timed  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    image, landmarks = photos.aligned_photo("hopper", args.size)
    image, landmarks = image.to(device), landmarks.to(device)
    model = face_models.load_face_model("toy").to(device)
    cases = {
        "landmark stage only (100 steps)": dict(mode="plain", steps=0),
        "plain (100 + 300 steps)": dict(mode="plain"),
        "robust, photos.ROBUST (100 + 300 steps)": dict(mode="robust", **photos.ROBUST),
        f"plain, coarse-to-fine ({args.size // 2} px for 200 of the 300 steps)":
            dict(mode="plain", coarse_size=args.size // 2),
        f"robust, photos.ROBUST, coarse-to-fine ({args.size // 2} px for 200 of the 300 steps)":
            dict(mode="robust", coarse_size=args.size // 2, **photos.ROBUST),
    }
    seconds = {name: timed(lambda: photos.fit_photo(image, landmarks, model, **options), device,
                           args.repeats) for name, options in cases.items()}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(f"\nfit.fit on one {args.size} x {args.size} photo, device {device} "
          f"({name or platform.machine()}), {torch.get_num_threads()} threads, median of "
          f"{args.repeats}\n")
    print("| fit | seconds per image |\n|---|---:|")
    for case, value in seconds.items():
        print(f"| {case} | {value:.2f} |")
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    path = os.path.join(ROOT, "bench", "results", f"fit_{device.type}.json")
    with open(path, "w") as f:
        json.dump({"size": args.size, "device": str(device), "device_name": name,
                   "threads": torch.get_num_threads(), "repeats": args.repeats,
                   "seconds": seconds}, f, indent=1)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
