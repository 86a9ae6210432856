"""Data throughput: synthetic samples per second at 224 x 224, and aligned real images.

Times `SyntheticFaces.batch` (one renderer call per batch, then per-sample drawing of the
background, face parts and occluders) for the mixed "train" distribution and each
evaluation subset, the renderer's share of it, single `__getitem__` calls, a DataLoader with
worker processes, and `ImageFolderFaces.__getitem__` with augmentation on a 1024 x 1024 PNG.

    python bench/bench_data.py                      # CPU, batch 32
    python bench/bench_data.py --device cuda --batch 64
Prints a markdown table and writes JSON to bench/results/data_<device>.json.
"""
import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bfm  # noqa: E402
import face_models  # noqa: E402
import data  # noqa: E402
import figures  # noqa: E402
import renderer  # noqa: E402
from timing import timed  # noqa: E402


def render_only(dataset, indices, device):
    """The renderer call of `dataset.batch(indices)` alone (same theta, same meshes)."""
    model, adjacency = dataset._on(device)
    streams = [data._streams(dataset.seed, dataset.subset, i, 5) for i in indices]
    theta = torch.stack([data.sample_theta(s[0], dataset.ranges) for s in streams]).to(device)
    parts = bfm.split_theta(theta)

    def run():
        with torch.no_grad():
            vertices = model.vertices(parts.id, parts.exp)
            albedo = model.albedo(parts.albedo)
            renderer.render(vertices, albedo, parts.sh, parts.pose, model.triangles, model.landmarks,
                            height=dataset.height, width=dataset.width, adjacency=adjacency)
    return run


def bench_synthetic(model, subset, batch, device, repeats, size):
    dataset = data.SyntheticFaces(face_model=model, size=size, length=10 * batch, subset=subset)
    start = [0]

    def one_batch():
        indices = list(range(start[0], start[0] + batch))
        start[0] = (start[0] + batch) % (9 * batch)
        dataset.batch(indices, device=device)

    total = timed(one_batch, device, repeats)
    render = timed(render_only(dataset, list(range(batch)), device), device, repeats)
    return {"subset": subset, "batch": batch, "size": size, "ms_per_sample": 1000 * total / batch,
            "render_ms_per_sample": 1000 * render / batch, "samples_per_s": batch / total}


def bench_getitem(model, device, repeats, size):
    dataset = data.SyntheticFaces(face_model=model, size=size, length=1000)
    counter = iter(range(1000))
    seconds = timed(lambda: dataset[next(counter)], device, repeats)
    return 1.0 / seconds


def bench_loader(model, batch, workers, size, batches=4):
    """Samples/s of a plain DataLoader with worker processes (each batch is one `batch`
    call through `SyntheticFaces.__getitems__`)."""
    dataset = data.SyntheticFaces(face_model=model, size=size, length=batch * (batches + 2))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=workers)
    iterator = iter(loader)
    next(iterator)  # worker start-up
    start = time.perf_counter()
    count = 0
    for _ in range(batches):
        count += len(next(iterator)["index"])
    return count / (time.perf_counter() - start)


def bench_folder(repeats):
    """ImageFolderFaces.__getitem__ with augmentation on a 1024 x 1024 face photo."""
    face = data.SyntheticFaces(size=224, length=1, subset="unoccluded", landmark_noise=0.0)[0]
    to_photo = np.array([[4.0, 0.0, 60.0], [0.0, 4.0, 40.0]])
    with tempfile.TemporaryDirectory() as folder:
        photo = data.warp_image(face["image"], to_photo, size=1024)
        figures.save_png(photo, os.path.join(folder, "face.png"))
        lm = data.apply_affine(to_photo, face["landmarks"].numpy())
        with open(os.path.join(folder, "landmarks.csv"), "w") as f:
            f.write("face.png," + ",".join(f"{x:.2f}" for x in lm.reshape(-1)) + "\n")
        dataset = data.ImageFolderFaces(folder, augment=True)
        seconds = timed(lambda: dataset[0], torch.device("cpu"), repeats)
    return 1.0 / seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--face-model", default="toy")
    parser.add_argument("--workers", type=int, default=2,
                        help="DataLoader workers for the loader row (0: skip)")
    args = parser.parse_args()
    device = torch.device(args.device)
    model = face_models.load_face_model(args.face_model)
    rows = [bench_synthetic(model, subset, args.batch, device, args.repeats, args.size)
            for subset in data.SUBSETS]
    print("| subset | batch | ms / sample | of which render | samples / s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['subset']} | {r['batch']} | {r['ms_per_sample']:.1f} | {r['render_ms_per_sample']:.1f} "
              f"| {r['samples_per_s']:.0f} |")
    result = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
              "device": str(device), "torch": torch.__version__, "face_model": model.name, "rows": rows,
              "getitem_samples_per_s": bench_getitem(model, device, args.repeats, args.size)}
    print(f"single __getitem__ (train): {result['getitem_samples_per_s']:.0f} samples/s")
    if args.workers and device.type == "cpu":
        result["loader_workers"] = args.workers
        result["loader_samples_per_s"] = bench_loader(model, args.batch, args.workers, args.size)
        print(f"DataLoader, batch {args.batch}, {args.workers} workers: "
              f"{result['loader_samples_per_s']:.0f} samples/s")
    result["folder_augmented_images_per_s"] = bench_folder(args.repeats)
    print(f"ImageFolderFaces, 1024 x 1024 PNG, aligned + augmented: "
          f"{result['folder_augmented_images_per_s']:.0f} images/s")
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    path = os.path.join(ROOT, "bench", "results", f"data_{device.type}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
