"""Renderer speed: forward + backward per image at 224 x 224, with a ResNet-50 yardstick.

For each mesh (the toy face at about 35k and 70k triangles, and any real face model in our
`.npz` schema given with `--npz`, e.g. a converted ICT-FaceKit face) and each batch size, times the stages of `render`:
rasterize (no grad), barycentrics + interpolation + shading (the differentiable part),
backward, and the whole forward + backward; reports ms per image, images/s and peak memory
(CUDA only). A full-width ResNet-50 forward + backward per image is timed in the same run as
the machine's yardstick, so ratios are comparable across machines.

    python bench/bench_renderer.py                  # CPU, batches 1 8 32
    python bench/bench_renderer.py --device cuda --batch 1 8 32 64
Prints a markdown table and writes JSON to bench/results/renderer_<device>.json.
"""
import argparse
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import face_models  # noqa: E402
import renderer  # noqa: E402
from timing import device_name, peak_memory_mib, reset_peak_memory, timed  # noqa: E402



def random_inputs(model, batch, device, seed=0):
    """Random identity/expression/albedo, light and pose: a realistic mix of views."""
    g = torch.Generator().manual_seed(seed)
    id_, exp, alb = (torch.randn(batch, 80, generator=g), torch.randn(batch, 64, generator=g),
                     torch.randn(batch, 80, generator=g))
    sh = 0.3 * torch.randn(batch, 27, generator=g)
    pose = torch.cat([0.3 * torch.randn(batch, 3, generator=g), 5 * torch.randn(batch, 3, generator=g)], 1)
    with torch.no_grad():
        verts = model.vertices(id_, exp)
        albedo = model.albedo(alb)
    return [t.to(device) for t in (verts, albedo, sh, pose)]


def bench_mesh(name, model, batch, device, repeats, size=224):
    model = model.to(device)
    tris, lms = model.triangles, model.landmarks
    adjacency = renderer.vertex_adjacency(tris, model.num_vertices)
    verts, albedo, sh, pose = random_inputs(model, batch, device)
    leaves = [t.clone().requires_grad_() for t in (verts, albedo, sh, pose)]

    def full():
        out = renderer.render(*leaves, tris, lms, height=size, width=size, adjacency=adjacency)
        out.image.sum().backward()

    world = renderer.rigid_transform(verts, pose)
    verts_pix = renderer.project(renderer.world_to_camera(world), height=size, width=size)
    face_id = renderer.rasterize(verts_pix, tris, size, size)

    def raster():
        renderer.rasterize(verts_pix, tris, size, size)

    def forward():
        return renderer.render(*leaves, tris, lms, height=size, width=size, adjacency=adjacency)

    reset_peak_memory(device)
    t_full = timed(full, device, repeats)
    peak = peak_memory_mib(device)
    t_raster = timed(raster, device, repeats)
    t_forward = timed(forward, device, repeats)
    coverage = float((face_id >= 0).float().mean())
    return {
        "mesh": name, "vertices": model.num_vertices, "triangles": model.num_faces,
        "batch": batch, "size": size, "coverage": coverage,
        "raster_ms": 1e3 * t_raster / batch,
        "interp_shade_ms": 1e3 * (t_forward - t_raster) / batch,
        "backward_ms": 1e3 * (t_full - t_forward) / batch,
        "total_ms": 1e3 * t_full / batch,
        "images_per_s": batch / t_full,
        "peak_mib": peak,
    }


def bench_resnet(device, batch, repeats, size=224):
    import focus
    net = focus.ResNet50().to(device)
    images = torch.rand(batch, 3, size, size, device=device)

    def step():
        net.zero_grad(set_to_none=True)
        net(images).sum().backward()

    return 1e3 * timed(step, device, repeats) / batch


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--resnet-batch", type=int, default=4)
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    parser.add_argument("--npz", help="also time this face model (bfm's .npz schema)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    meshes = [("toy 35k", face_models.load_face_model("toy", resolution=133)),
              ("toy 70k", face_models.load_face_model("toy", resolution=188))]
    if args.npz:
        meshes.append((os.path.basename(args.npz), face_models.load_face_model(f"npz:{args.npz}")))
    rows = [bench_mesh(name, model, batch, device, args.repeats)
            for name, model in meshes for batch in args.batch]
    resnet_ms = bench_resnet(device, args.resnet_batch, max(2, args.repeats // 2))

    machine = device_name(device)
    print(f"renderer forward + backward at 224 x 224 on {machine} (torch {torch.__version__})")
    print("| mesh | triangles | batch | raster ms | interp+shade ms | backward ms | total ms/img | img/s | x ResNet-50 | peak MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mesh']} | {r['triangles']} | {r['batch']} | {r['raster_ms']:.2f} | "
              f"{r['interp_shade_ms']:.2f} | {r['backward_ms']:.2f} | {r['total_ms']:.2f} | "
              f"{r['images_per_s']:.0f} | {r['total_ms'] / resnet_ms:.3f} | {r['peak_mib']:.0f} |")
    print(f"ResNet-50 forward + backward (batch {args.resnet_batch}): {resnet_ms:.1f} ms per image")

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"renderer_{device.type}.json")
    with open(path, "w") as f:
        json.dump({"machine": machine, "torch": torch.__version__, "resnet50_ms_per_image": resnet_ms,
                   "rows": rows}, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
