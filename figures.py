"""Figures and PNG files: everything that turns tensors into pictures for a reader to look at.

None of this is the paper's method; it is how the runs, fits and data are shown. The training
previews and curves (train.py), the evaluation figures (evaluate.py), the fitting and photo
figures (fit.py, photos.py), the data contact sheet (data.py) and the renderer demo sheet
(`python face_models.py --demo`) all live here, and all write their PNGs through the one
`save_png`.

Conventions: images (3, H, W) or (B, 3, H, W) in [0, 1] (masks (1, H, W)); a PNG stores
round(255 x) of the image clamped to [0, 1]. Plots are matplotlib `Figure` objects (no pyplot
state), imported inside the functions that draw, so that importing this module needs neither
PIL nor matplotlib.

Run `python train.py --stage all --preset tiny` or `python evaluate.py --run RUN_DIR` to write
figures; `python -m pytest -q tests/test_train.py tests/test_evaluate.py` tests them.
"""

import csv
import math
import os
from typing import Optional

import numpy as np
import torch

import renderer


# ----------------------------------------------------------------------------- PNG files

def to_pixels(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) or (1, H, W) in [0, 1] -> (H, W, 3) or (H, W) uint8 array of round(255 x)."""
    array = (image.detach().cpu().clamp(0, 1) * 255).round().byte()
    array = array[0] if array.shape[0] == 1 else array.permute(1, 2, 0)
    return array.numpy()


def save_png(image: torch.Tensor, path: str, *, scale: int = 1) -> None:
    """(3, H, W) or (1, H, W) in [0, 1] -> PNG at `path`, enlarged `scale` times (nearest)."""
    from PIL import Image
    picture = Image.fromarray(to_pixels(image))
    if scale != 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    picture.save(path)


def image_grid(rows: list) -> torch.Tensor:
    """n tensors (B, 3, H, W) -> one (3, B H, n W) image: sample b in row b, one column each."""
    columns = [r.detach().float().cpu().clamp(0, 1) for r in rows]
    return torch.cat([torch.cat(list(c), dim=1) for c in columns], dim=2)  # (3, B H, n W)


def picture_table(path: str, cells: list, row_labels: list, *, cell: float = 1.2,
                  header: float = 0.6, title_room: float = 0.5, left: float = 0.03) -> None:
    """A table of pictures without axes: `cells[r][c]` = (column title, (3, H, W) picture),
    titles over the first row, `row_labels[r]` left of each row. `cell` inches per picture,
    `header` inches added for the titles, of which `title_room` stays above the pictures."""
    from matplotlib.figure import Figure
    rows, columns = len(cells), len(cells[0])
    fig = Figure(figsize=(cell * columns, cell * rows + header))
    axes = fig.subplots(rows, columns, squeeze=False)
    for r, row in enumerate(cells):
        for c, (title, picture) in enumerate(row):
            ax = axes[r][c]
            ax.imshow(picture.permute(1, 2, 0).clamp(0, 1).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=7)
            if c == 0:
                ax.set_ylabel(row_labels[r], fontsize=7)
    fig.subplots_adjust(left=left, right=0.99, top=1 - title_room / (cell * rows + header),
                        bottom=0.01, wspace=0.03, hspace=0.03)
    fig.savefig(path, dpi=100)


# ----------------------------------------------------------------------------- overlays

def render_over(images: torch.Tensor, rendered: torch.Tensor,
                region: torch.Tensor) -> torch.Tensor:
    """The render pasted over the images inside its region: (B, 3, H, W)."""
    return images * (1 - region) + rendered.clamp(0, 1) * region


def outliers_in_red(images: torch.Tensor, mask: torch.Tensor,
                    region: torch.Tensor) -> torch.Tensor:
    """Pixels of the rendered region the (rounded) mask rejects, tinted red: (B, 3, H, W)."""
    outlier = region * (mask < 0.5).to(images.dtype)  # (B, 1, H, W)
    red = torch.tensor([1.0, 0.0, 0.0], dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return images * (1 - 0.6 * outlier) + 0.6 * outlier * red


# ----------------------------------------------------------------------------- training

def save_fit_figure(path: str, images: torch.Tensor, recon) -> None:
    """Fig. 1 style: target | reconstruction over the target | mask | outliers tinted red
    (`recon` a `focus.Reconstruction`); PNG enlarged twice."""
    region = (recon.image.sum(dim=1, keepdim=True) > 0).float()  # (B, 1, H, W)
    overlay = render_over(images, recon.image, region)  # (B, 3, H, W)
    mask = recon.mask.expand(-1, 3, -1, -1)  # (B, 3, H, W)
    red = torch.tensor([1.0, 0.0, 0.0], device=images.device).view(1, 3, 1, 1)
    # pixels of the rendered region the mask rejects, tinted red
    outlier = region * (1 - recon.mask)  # (B, 1, H, W)
    tinted = images * (1 - 0.6 * outlier) + 0.6 * outlier * red  # (B, 3, H, W)
    save_png(image_grid([images, overlay, mask, tinted]), path, scale=2)


def save_em_progress(path: str, images: torch.Tensor, rounds: dict) -> None:
    """Fig. 11 style: target | masks at the start and after each EM round | reconstructions.
    `rounds`: {step: {"mask": (B, 1, H, W), "image": (B, 3, H, W) I_R}} on the CPU."""
    steps = sorted(rounds)
    masks = [rounds[s]["mask"].expand(-1, 3, -1, -1) for s in steps]
    region = [(rounds[s]["image"].sum(1, keepdim=True) > 0).float() for s in steps]
    fits = [images.cpu() * (1 - r) + rounds[s]["image"] * r for s, r in zip(steps, region)]
    save_png(image_grid([images] + masks + fits), path, scale=2)


def save_loss_curves(log_path: str, path: str, *, stages, terms, heldout_faces: int) -> None:
    """Every logged loss term of log.csv (`terms`) against the step, one panel per stage, and
    below it R's held-out RMSE (column rmse_heldout, over `heldout_faces` faces)."""
    from matplotlib.figure import Figure
    with open(log_path, newline="") as f:
        rows = list(csv.DictReader(f))
    stages = [s for s in stages if any(r["stage"] == s for r in rows)]
    if not stages:
        return
    fig = Figure(figsize=(6 * len(stages), 7))
    axes = fig.subplots(2, len(stages), squeeze=False)
    for ax, stage in zip(axes[1], stages):
        points = [(int(r["step"]), float(r["rmse_heldout"])) for r in rows
                  if r["stage"] == stage and r["rmse_heldout"] not in ("", None)]
        if points:
            ax.plot(*zip(*points), lw=1, color="k", label="rmse_heldout")
        ax.set_title(f"R's RMSE on {heldout_faces} clean held-out faces (0-255)", fontsize=9)
        ax.set_xlabel("step")
    for ax, stage in zip(axes[0], stages):
        for name in terms:
            points = [(int(r["step"]), float(r[name])) for r in rows
                      if r["stage"] == stage and r[name] not in ("", None)]
            if points:
                ax.plot(*zip(*points), label=name, lw=1)
        ax.set_title(f"stage {stage}")
        ax.set_xlabel("step")
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


# ----------------------------------------------------------------------------- evaluation

def figure_qualitative(path: str, columns: list, row_labels: list) -> None:
    """Fig. 5 / 7: one row per face; `columns` = [(title, (N, 3, H, W) pictures)]: the target,
    then per method its reconstruction over the target and, with a mask, the outliers in red."""
    cells = [[(title, pictures[r]) for title, pictures in columns]
             for r in range(len(row_labels))]
    picture_table(path, cells, row_labels)


def figure_misfit_prior(path: str, prior: torch.Tensor, face_model) -> None:
    """Fig. 4: E_MP's x, y, z components (mm) on the mean face, frontal view."""
    from matplotlib.figure import Figure
    mean = face_model.mean_shape.detach().cpu().numpy()  # (V, 3)
    triangles = face_model.triangles.cpu().numpy()
    values = prior.cpu().numpy()  # (V, 3)
    limit = float(np.abs(values).max()) or 1.0
    fig = Figure(figsize=(10, 3.8))
    axes = fig.subplots(1, 3)
    for k, ax in enumerate(axes):
        art = ax.tripcolor(mean[:, 0], mean[:, 1], triangles, values[:, k], shading="gouraud",
                           cmap="coolwarm", vmin=-limit, vmax=limit)
        ax.set_aspect("equal")
        ax.set_axis_off()
        ax.set_title(f"E_MP {'xyz'[k]} (mm)")
    fig.colorbar(art, ax=list(axes), shrink=0.8)
    fig.savefig(path, dpi=90)


def figure_per_subset(path: str, rows: dict, subsets: list, shape_rows: dict) -> None:
    """Per-subset bars: mask F1 of `rows` (methods with a mask) and mean shape error of
    `shape_rows` (the rows with a reconstruction of their own); rows as `evaluate.summarize`."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(12, 4))
    axes = fig.subplots(1, 2)
    for ax, (metric, title) in zip(axes, (("F1", "mask F1 (higher is better)"),
                                          ("shape", "shape error, mean mm (lower is better)"))):
        shown = rows if metric == "F1" else shape_rows
        labels = [l for l, r in shown.items() if metric in r.get("overall", {})]
        width = 0.8 / max(len(labels), 1)
        for i, label in enumerate(labels):
            means = [shown[label][s][metric]["mean"] for s in subsets]
            stds = [shown[label][s][metric]["std"] for s in subsets]
            x = np.arange(len(subsets)) + (i - (len(labels) - 1) / 2) * width
            ax.bar(x, means, width, yerr=stds, label=label, capsize=2)
        ax.set_xticks(np.arange(len(subsets)), subsets)
        ax.set_title(title)
        if metric == "F1":
            ax.set_ylim(0.5, 1.0)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def figure_sweep(path: str, points: list) -> None:
    """Supp. Fig. 4: mask F1 against each swept eta (log axis), reference marked."""
    from matplotlib.figure import Figure
    names = list(dict.fromkeys(p["eta"] for p in points))
    fig = Figure(figsize=(4 * max(len(names), 1), 3.2))
    axes = fig.subplots(1, max(len(names), 1), squeeze=False)[0]
    for ax, name in zip(axes, names):
        chosen = [p for p in points if p["eta"] == name]
        for group, style in (("occluded", "o-"), ("unoccluded", "s--")):
            ax.plot([p["value"] for p in chosen], [p.get(group, float("nan")) for p in chosen],
                    style, label=group)
        for p in chosen:
            if p["reference"]:
                ax.axvline(p["value"], color="grey", lw=0.8)
        ax.set_xscale("log")
        values = sorted({p["value"] for p in chosen})
        ax.set_xticks(values, [f"{v:g}" for v in values])
        ax.minorticks_off()
        ax.set_xlabel(name)
        ax.set_ylabel("mask F1")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def figure_oracle(path: str, curves: dict, marks: dict, *, lines: Optional[dict] = None,
                  subsets=("scarf", "random")) -> None:
    """How well R must fit for S to learn: mask F1 against R's image RMSE on unoccluded faces.

    Args:
        curves: {line label: [(rmse, {subset: F1}, noise), ...]} over the oracle's noise
            levels; the S curves are annotated with the noise.
        marks: {point label: (rmse, {subset: F1})}, e.g. the trained R in one pass and refined.
        lines: {label: rmse} drawn as vertical lines (e.g. a per-image fit's RMSE).
    """
    from matplotlib.figure import Figure
    fig = Figure(figsize=(4.2 * len(subsets), 3.4))
    axes = fig.subplots(1, len(subsets), squeeze=False)[0]
    for ax, subset in zip(axes, subsets):
        for label, points in curves.items():
            points = sorted(points, key=lambda p: p[0])
            ax.plot([p[0] for p in points], [p[1].get(subset, float("nan")) for p in points],
                    "o-" if label.startswith("S") else "s--", label=label, ms=4)
            if label.startswith("S"):
                for rmse, f1, noise in points:
                    ax.annotate(f"{noise:g}", (rmse, f1.get(subset, float("nan"))), fontsize=6,
                                textcoords="offset points", xytext=(3, 3))
        for (label, (rmse, f1)), marker in zip(marks.items(), "*Pv^"):
            ax.plot([rmse], [f1.get(subset, float("nan"))], marker, ms=11, label=label)
        for (label, rmse), colour in zip((lines or {}).items(), ("grey", "black")):
            ax.axvline(rmse, color=colour, lw=0.8, ls=":", label=f"{label} (RMSE {rmse:.1f})")
        ax.set_xlabel("R's RMSE, unoccluded faces (labels: oracle noise)")
        ax.set_ylabel(f"mask F1, {subset}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


# ----------------------------------------------------------------------------- fitting and photos

def progress_strip(snapshots, target: torch.Tensor) -> torch.Tensor:
    """Target followed by the snapshots of sample 0, side by side: (3, H, (1 + n) W)."""
    return torch.cat([target[0]] + [image[0] for _, image in snapshots], dim=2)


PHOTO_MODE_TITLES = {"plain": "plain fit", "robust": "robust fit",
                     "segmenter": "fit with\nFOCUS masks", "focus": "FOCUS\n(one forward pass)"}


def figure_photos(path: str, shown: list, modes) -> None:
    """One row per case of photos.py: the photo, then per mode its render over the photo and
    its outliers in red. `shown`: [(photo, case, {"image": (1, 3, S, S), mode: (render over
    the image, mask, region, image)})]."""
    cells = []
    for photo, name, pictures in shown:
        row = [("photo", pictures["image"][0])]
        for mode in modes:
            render, mask, region, image = pictures[mode]
            row += [(PHOTO_MODE_TITLES[mode], render[0]),
                    ("outliers", outliers_in_red(image, mask, region)[0])]
        cells.append(row)
    picture_table(path, cells, [f"{photo}\n{name}" for photo, name, _ in shown], cell=1.3,
                  header=0.5, title_room=0.45, left=0.05)


# ----------------------------------------------------------------------------- data contact sheet

def mask_overlay(image: torch.Tensor, *, occlusion=None, visible_face=None) -> torch.Tensor:
    """Image (3, H, W) with occluders tinted red and the visible face tinted green."""
    out = image.clone()
    if visible_face is not None:
        green = torch.tensor([0.1, 0.9, 0.2])[:, None, None]
        out = torch.where(visible_face > 0.5, 0.55 * out + 0.45 * green, out)
    if occlusion is not None:
        red = torch.tensor([0.95, 0.1, 0.1])[:, None, None]
        out = torch.where(occlusion > 0.5, 0.45 * out + 0.55 * red, out)
    return out


def contact_sheet(samples: list, *, columns: int, tile: int = 160, labels: bool = True):
    """A PIL image of data samples (dicts of data.py): per sample, the image with its
    landmarks, then the mask overlay (`mask_overlay`), labelled with its occluders and face
    parts (or, for a photo, its file name)."""
    from PIL import Image, ImageDraw

    rows = math.ceil(len(samples) / columns)
    sheet = Image.new("RGB", (2 * columns * tile, rows * tile), (255, 255, 255))
    for k, sample in enumerate(samples):
        image = sample["image"]
        H, W = image.shape[1:]
        masks = mask_overlay(image, occlusion=sample.get("occlusion"), visible_face=sample.get("visible_face"))
        for j, view in enumerate([image, masks]):
            pil = Image.fromarray(to_pixels(view)).resize((tile, tile), Image.BILINEAR)
            draw = ImageDraw.Draw(pil)
            if j == 0:
                for x, y in (sample["landmarks"].numpy() * np.array([tile / W, tile / H])).tolist():
                    draw.ellipse([x - 1.2, y - 1.2, x + 1.2, y + 1.2], fill=(255, 255, 0))
            if labels and j == 1:
                if "occluders" in sample:
                    text = sample["occluders"] or "no occluder"
                    text += f" | {sample['parts']}" if sample["parts"] else ""
                else:
                    text = os.path.basename(sample.get("path", ""))
                draw.text((3, 2), text, fill=(255, 255, 255))
            sheet.paste(pil, ((2 * (k % columns) + j) * tile, (k // columns) * tile))
    return sheet


# ----------------------------------------------------------------------------- renderer demo

def renderer_demo(model, *, rows: int = 3, cols: int = 4, size: int = 192,
                  seed: int = 0) -> torch.Tensor:
    """A sheet of random faces of `model` (a bfm.MorphableModel) under varied pose, expression
    and light, each with its 68 landmarks drawn in green, on a dark random background.

    Returns:
        (3, rows * size, cols * size) in [0, 1] (k / 255 exactly, ready for `save_png`).
    """
    from PIL import Image, ImageDraw

    B = rows * cols
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        vertices = model.vertices(torch.randn(B, 80, generator=g), torch.randn(B, 64, generator=g))
        albedo = model.albedo(torch.randn(B, 80, generator=g))
        # light: ambient plus a random first-order (directional) part per face, white-ish
        sh = torch.zeros(B, 3, 9)
        sh[:, :, 1:4] = 0.6 * torch.randn(B, 1, 3, generator=g)
        sh[:, :, 0] = -0.5 + 0.3 * torch.randn(B, 1, generator=g)
        pose = torch.zeros(B, 6)
        pose[:, 0] = 0.25 * torch.randn(B, generator=g)  # pitch
        pose[:, 1] = torch.linspace(-0.9, 0.9, B)  # yaw: from one profile-ish view to the other
        pose[:, 2] = 0.1 * torch.randn(B, generator=g)  # roll
        out = renderer.render(vertices, albedo, sh.view(B, 27), pose, model.triangles,
                              model.landmarks, height=size, width=size)
    background = 0.15 + 0.1 * torch.rand(B, 3, 1, 1, generator=g)
    images = out.image.clamp(0, 1) + background * (1 - out.region)  # (B, 3, H, W)
    sheet = Image.new("RGB", (cols * size, rows * size))
    for k in range(B):
        tile = Image.fromarray(to_pixels(images[k]))
        draw = ImageDraw.Draw(tile)
        for x, y in out.landmarks[k].tolist():
            draw.ellipse([x - 1.5, y - 1.5, x + 1.5, y + 1.5], fill=(60, 255, 60))
        sheet.paste(tile, ((k % cols) * size, (k // cols) * size))
    return torch.from_numpy(np.array(sheet)).permute(2, 0, 1).float() / 255  # (3, H, W)
