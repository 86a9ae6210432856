"""Real photos: per-image fitting and FOCUS on real faces with occluders pasted on them.

Paper map: Sec. 4 evaluates on real photos (CelebA-HQ, AR) with occluders of known extent
(Tab. 4, Fig. 5 / 7); robust per-image fitting is the analysis-by-synthesis baseline of Sec. 1-2
(Egger et al. 2018) that FOCUS amortises. Images (1, 3, S, S) in [0, 1], masks (1, 1, S, S),
landmarks (1, 68, 2) pixels.

The synthetic data shows the mechanism with exact ground truth; this module asks whether it
carries over to a real face. Two public-domain photos ship with the project's dependencies:
Grace Hopper (matplotlib's sample data) and the astronaut Eileen Collins (scikit-image's
`data.astronaut`, optional). Each is aligned like the training crops (`data.alignment_matrix`,
Deep3D's 5-point crop) from dlib's 68 landmarks, found once with `data.detect_landmarks` and
stored below, so nothing here needs dlib.

The ground truth of a real photo is unknown, but that of a pasted occluder is exact: the
clean photo is fitted first (plain mode), an occluder of one of the synthetic data's families
is pasted where that fit puts the face (`occluders.paste_occluder`), and every fitting mode
then runs on the occluded photo. Measured per case:
- the outlier IoU: the pixels of the fitted face region that the mode's mask calls outliers,
  against the occluder's pixels inside that region (1 = the mask finds exactly the occluder),
  leaving out what the same mode calls outliers on the clean photo (a hat, glasses);
- the outlier share: the part of the fitted face region that the mask calls outliers. On the
  clean photo these are false outliers as far as the occluders go: what the face model cannot
  explain (real eyes, teeth, hair, a hat), and misfit;
- the skin ratio: the fit's RMSE on the skin that stays visible (what the same mode keeps
  as face on the clean photo, minus the occluder) over the RMSE of that clean-photo fit on
  the same pixels (1 = the occluder did not pull the fit).

    python photos.py                      # both photos (the astronaut with scikit-image)
    python photos.py --run runs/cpu       # adds the FOCUS columns from a trained run

Writes results/photos/photos.md (every case, then per mode the clean photos' outlier share
and each occluder family's IoU), photos.json, photos.png and photos_summary.png (the
astronaut, or the last photo, with one draw of each occluder).
"""
import argparse
import json
import os
import time
from typing import Dict, List, NamedTuple, Optional

import numpy as np
import scipy.stats
import torch

import bfm
import data
import face_models
import figures
import fit
import occluders
import runs
from config import PHOTO_OCCLUDER_SEEDS

# dlib's 68 landmarks (x, y in photo pixels), found once with `data.detect_landmarks`
LANDMARKS = {
    "hopper": [178, 203, 181, 226, 186, 248, 192, 270, 199, 291, 209, 310, 226, 323, 245, 331,
               269, 333, 293, 329, 312, 319, 329, 304, 340, 284, 347, 262, 351, 241, 353, 218,
               355, 195, 189, 188, 196, 172, 211, 165, 228, 165, 243, 171, 284, 168, 298, 161,
               315, 161, 331, 167, 340, 181, 265, 188, 265, 205, 266, 221, 267, 238, 247, 246,
               257, 249, 268, 252, 278, 249, 287, 246, 210, 195, 218, 187, 228, 187, 238, 194,
               229, 195, 219, 196, 291, 192, 300, 184, 310, 184, 319, 190, 311, 192, 301, 193,
               233, 281, 245, 274, 258, 272, 267, 274, 277, 271, 288, 273, 300, 277, 289, 284,
               278, 287, 269, 289, 259, 288, 246, 285, 238, 279, 258, 278, 268, 279, 277, 278,
               296, 278, 277, 278, 268, 279, 258, 279],
    "astronaut": [179, 104, 180, 116, 181, 127, 182, 139, 185, 150, 191, 160, 200, 168, 209, 176,
                  220, 178, 232, 177, 243, 171, 253, 163, 260, 154, 265, 143, 268, 131, 270, 120,
                  272, 108, 186, 94, 192, 88, 200, 87, 208, 89, 216, 92, 236, 93, 244, 91, 252,
                  91, 260, 92, 265, 99, 226, 102, 225, 111, 225, 119, 225, 127, 214, 131, 219,
                  133, 224, 134, 229, 133, 234, 132, 195, 101, 200, 98, 207, 98, 212, 104, 206,
                  104, 199, 104, 237, 106, 243, 100, 250, 100, 255, 105, 250, 107, 244, 107,
                  201, 139, 209, 139, 218, 139, 224, 141, 230, 140, 238, 140, 246, 141, 238,
                  151, 229, 155, 222, 156, 216, 155, 208, 150, 204, 141, 218, 143, 223, 144,
                  230, 143, 243, 142, 229, 150, 223, 151, 217, 150],
}
FAMILIES = ("scarf", "sunglasses", "hand")  # occluders pasted on every photo
SEEDS = PHOTO_OCCLUDER_SEEDS  # draws of each occluder
# robust fitting on these photos: `fit.py`'s "photo" setting, chosen on them (docs/photos.md);
# the plain fit keeps the paper's loss
ROBUST = fit.ROBUST_SETTINGS["photo"]


class PhotoError(RuntimeError):
    """A photo that cannot be loaded here (a missing optional package), with what to install."""


def load_photo(name: str) -> torch.Tensor:
    """The photo `name` of `LANDMARKS` as (3, H, W) in [0, 1]."""
    if name == "hopper":
        from matplotlib import cbook
        try:
            path = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
        except (FileNotFoundError, ValueError):
            raise PhotoError("matplotlib's sample photo grace_hopper.jpg is not installed "
                             "(pip install matplotlib)") from None
        return data.load_image(str(path))
    if name == "astronaut":
        try:
            from skimage import data as skdata
        except ImportError:
            raise PhotoError("the astronaut photo needs scikit-image: pip install scikit-image") \
                from None
        return torch.from_numpy(skdata.astronaut().copy()).permute(2, 0, 1).float() / 255
    raise ValueError(f"unknown photo {name!r}: choose one of {sorted(LANDMARKS)}")


def aligned_photo(name: str, size: int):
    """The photo aligned to size x size like the training crops: image (1, 3, S, S) and its
    landmarks (1, 68, 2) in crop pixels."""
    photo = load_photo(name)
    landmarks = np.asarray(LANDMARKS[name], dtype=np.float64).reshape(68, 2)
    matrix = data.alignment_matrix(landmarks, size=size)
    image = data.warp_image(photo, matrix, size=size).clamp(0, 1)  # (3, S, S)
    points = torch.from_numpy(data.apply_affine(matrix, landmarks)).float()  # (68, 2)
    return image[None], points[None]


def outlier_iou(mask: torch.Tensor, region: torch.Tensor, occluder: torch.Tensor,
                exclude: Optional[torch.Tensor] = None) -> float:
    """IoU of the mask's outliers (region & mask < 0.5) with the occluder inside the region,
    leaving out the pixels `exclude` (e.g. what the same mode calls outliers on the clean
    photo: a hat or glasses are outliers of the photo, not of the pasted occluder).

    Args:
        mask, region, occluder, exclude: (1, 1, H, W); mask in [0, 1], the others in {0, 1}.
    """
    inside = region > 0.5
    if exclude is not None:
        inside = inside & (exclude < 0.5)
    outliers, truth = inside & (mask < 0.5), inside & (occluder > 0.5)
    union = (outliers | truth).sum().item()
    return (outliers & truth).sum().item() / union if union else float("nan")


def outlier_share(mask: torch.Tensor, region: torch.Tensor) -> float:
    """The share of the fitted face region (region > 0.5) that the mask calls outliers
    (mask < 0.5); on a clean photo, what the mode cannot explain (eyes, teeth, hair, a hat).

    Args:
        mask, region: (1, 1, H, W); mask in [0, 1], region in {0, 1}.
    """
    inside = region > 0.5
    count = inside.sum().item()
    return (inside & (mask < 0.5)).sum().item() / count if count else float("nan")


def skin_rmse(rendered: torch.Tensor, image: torch.Tensor, skin: torch.Tensor) -> float:
    """RMSE (0-255) between a render and the photo on the `skin` pixels (1, 1, H, W)."""
    count = 3 * skin.sum().item()
    if not count:
        return float("nan")
    return 255.0 * (((rendered - image) ** 2 * skin).sum().item() / count) ** 0.5


def residual_auc(rendered: torch.Tensor, image: torch.Tensor, occluder: torch.Tensor,
                 skin: torch.Tensor) -> float:
    """How well any threshold on the colour residual |I_T - I_R|^2 can tell the occluder from
    the skin: the chance that a random `occluder` pixel has a larger residual than a random
    `skin` pixel (ties count half; the area under the ROC curve, via Mann-Whitney ranks).
    1: some threshold separates them; 0.5 or below: none can, whatever the mask's rule.

    Args:
        rendered, image: (1, 3, H, W). occluder, skin: (1, 1, H, W) in {0, 1}.
    """
    residual = (image - rendered).pow(2).sum(dim=1, keepdim=True)  # (1, 1, H, W)
    positive, negative = residual[occluder > 0.5], residual[skin > 0.5]
    if not len(positive) or not len(negative):
        return float("nan")
    ranks = scipy.stats.rankdata(torch.cat([positive, negative]).double().numpy())
    above = ranks[:len(positive)].sum() - len(positive) * (len(positive) + 1) / 2
    return float(above / (len(positive) * len(negative)))


class Case(NamedTuple):
    photo: str
    family: str  # "" for the clean photo
    seed: int
    image: torch.Tensor  # (1, 3, S, S)
    occluder: torch.Tensor  # (1, 1, S, S)


def make_cases(photo: str, image: torch.Tensor, landmarks: torch.Tensor, clean: fit.FitResult,
               model: bfm.MorphableModel, families=FAMILIES, seeds=SEEDS) -> List[Case]:
    """The clean photo and one case per (family, seed), occluders placed by the clean fit."""
    t = bfm.split_theta(clean.theta)
    with torch.no_grad():
        vertices = model.vertices(t.id, t.exp)[0]  # (V, 3)
    cases = [Case(photo, "", 0, image, torch.zeros_like(image[:, :1]))]
    for family in families:
        for seed in seeds:
            occluded, mask = occluders.paste_occluder(image[0], landmarks[0], clean.rendered.region[0],
                                                      vertices, model.landmarks, t.pose[0], family,
                                                      seed=seed)
            cases.append(Case(photo, family, seed, occluded[None], mask[None]))
    return cases


def score(result, case: Case, clean, clean_image: torch.Tensor) -> Dict[str, float]:
    """How the occluder changed a mode's fit, against the same mode on the clean photo
    (`clean`): the outlier IoU (`outlier_iou`, leaving out what `clean` calls outliers: a hat,
    glasses), and the ratio of the RMSE on the skin that stays visible (what `clean` keeps as
    face, minus the occluder) to that of `clean` on the same pixels; and `residual_auc` of
    the fit between the occluder and that skin, both inside the fit's region (how far a
    threshold on the colour residual could find this occluder at all).

    `result` and `clean` have .rendered (image, region) and .mask, as a `fit.FitResult`."""
    kept = clean.rendered.region * (clean.mask >= 0.5)  # (1, 1, S, S)
    skin = kept * (1 - case.occluder)  # (1, 1, S, S)
    rmse = skin_rmse(result.rendered.image, clean_image, skin)
    reference = skin_rmse(clean.rendered.image, clean_image, skin)
    photo_outliers = clean.rendered.region * (clean.mask < 0.5)
    occluder = case.occluder * kept * result.rendered.region  # the occluder where it is scored
    return {"iou": outlier_iou(result.mask, result.rendered.region, case.occluder,
                               photo_outliers),
            "outliers": outlier_share(result.mask, result.rendered.region),
            "skin_rmse": rmse, "skin_ratio": rmse / reference,
            "residual_auc": residual_auc(result.rendered.image, case.image, occluder,
                                         skin * result.rendered.region)}


def shrink(case: Case, size: int) -> Case:
    """The case at size x size (area average; the occluder where it covers half a pixel)."""
    resize = lambda x: torch.nn.functional.interpolate(x, size=(size, size), mode="area")
    return case._replace(image=resize(case.image), occluder=(resize(case.occluder) >= 0.5).float())


def fit_photo(image: torch.Tensor, landmarks: torch.Tensor, model, *, coarse_size: int = 0,
              coarse_steps: int = 200, **options) -> fit.FitResult:
    """`fit.fit`, or `fit.coarse_to_fine` when 0 < coarse_size < the image's size."""
    if 0 < coarse_size < image.shape[-1]:
        return fit.coarse_to_fine(image, landmarks, model, coarse_size=coarse_size,
                                  coarse_steps=coarse_steps, **options)
    return fit.fit(image, landmarks, model, **options)


class Network(NamedTuple):
    """FOCUS's trained networks applied in one forward pass, with a `fit.FitResult`'s fields."""
    rendered: object
    mask: torch.Tensor


def focus_forward(autoencoder, segmenter, image: torch.Tensor) -> Network:
    """R and S of a trained run on one image: the reconstruction and M = S(I_R, I_T)."""
    with torch.no_grad():
        out = autoencoder(image)
        mask = segmenter(out.image, image) * out.region
    return Network(out, mask)


def run(photos=("hopper", "astronaut"), *, size: int = 224, modes=("plain", "robust"),
        options: Optional[dict] = None, robust: Optional[dict] = None, families=FAMILIES,
        seeds=SEEDS, face_model: str = "toy", run_dir: Optional[str] = None) -> dict:
    """Fit every case of every photo in every mode; with `run_dir`, also the modes "segmenter"
    (fitting with the run's S) and "focus" (its R and S in one pass), at the run's image size.
    `options` go to every `fit.fit`, `robust` (default `ROBUST`) to the robust mode's only.
    Returns {"scores": {photo: {case: {mode: scores}}}, "_figure": [(photo, case, pictures)]}."""
    model = face_models.load_face_model(face_model)
    options, networks = dict(options or {}), None
    robust = dict(ROBUST if robust is None else robust)
    if run_dir is not None:
        cfg, autoencoder, segmenter = runs.load_models(run_dir, stage="em")
        if segmenter is None:
            raise PhotoError(f"{run_dir}: variant {cfg.variant!r} trains no segmenter")
        networks = (cfg, autoencoder, segmenter, face_models.load_face_model(cfg.face_model))
    results, figure = {}, []
    for photo in photos:
        image, landmarks = aligned_photo(photo, size)
        tic = time.perf_counter()
        clean = fit_photo(image, landmarks, model, mode="plain", **options)
        print(f"{photo}: clean plain fit {time.perf_counter() - tic:.1f} s", flush=True)
        if networks is not None:
            cfg, autoencoder, segmenter, run_model = networks
            small_image, small_landmarks = aligned_photo(photo, cfg.image_size)
        references = {}  # mode -> its result on the clean photo
        for case in make_cases(photo, image, landmarks, clean, model, families, seeds):
            name = f"{case.family or 'clean'}-{case.seed}"
            row, shown = {}, {"image": case.image, "occluder": case.occluder}
            for mode in modes + (("segmenter", "focus") if networks else ()):
                tic = time.perf_counter()
                here, reference_image, here_landmarks = case, image, landmarks
                if mode in ("segmenter", "focus"):
                    here = shrink(case, cfg.image_size)
                    reference_image, here_landmarks = small_image, small_landmarks
                if mode == "focus":
                    result = focus_forward(autoencoder, segmenter, here.image)
                elif mode == "plain" and not case.family:
                    result = clean
                else:
                    networked = mode == "segmenter"
                    result = fit_photo(here.image, here_landmarks,
                                       run_model if networked else model, mode=mode,
                                       segmenter=segmenter if networked else None,
                                       **options, **(robust if mode == "robust" else {}))
                seconds = time.perf_counter() - tic
                references.setdefault(mode, result)  # the clean photo comes first
                row[mode] = {**score(result, here, references[mode], reference_image),
                             "seconds": seconds}
                shown[mode] = (figures.render_over(here.image, result.rendered.image,
                                                   result.rendered.region),
                               result.mask, result.rendered.region, here.image)
                print(f"{photo} {name:12s} {mode:9s} IoU {row[mode]['iou']:.2f} skin ratio "
                      f"{row[mode]['skin_ratio']:.2f} residual AUC "
                      f"{row[mode]['residual_auc']:.2f} ({row[mode]['seconds']:.1f} s)", flush=True)
            results.setdefault(photo, {})[name] = row
            figure.append((photo, name, shown))
    return {"scores": results, "_figure": figure}


def markdown(scores: dict, modes) -> str:
    """Per photo and case, each mode's outlier IoU, outlier share (`outlier_share`; on the clean
    photo, its false outliers), skin ratio and residual AUC, as a markdown table."""
    columns = ("IoU", "outliers", "skin ratio", "residual AUC")
    keys = ("iou", "outliers", "skin_ratio", "residual_auc")
    lines = ["| photo | case | " + " | ".join(f"{m}: {c}" for m in modes for c in columns)
             + " |", "|---|---" + "|---:" * (len(columns) * len(modes)) + "|"]
    for photo, cases in scores.items():
        for name, row in cases.items():
            lines.append(f"| {photo} | {name} | " + " | ".join(
                f"{row[m][k]:.2f}" for m in modes for k in keys) + " |")
    return "\n".join(lines) + "\n"


def summary_markdown(scores: dict, modes) -> str:
    """Per mode: the share of each clean photo's face it calls outliers, and per occluder
    family the range of the outlier IoU over every photo and draw, how many cases reach 0.6,
    and the mean, as a markdown table."""
    families = list(dict.fromkeys(name.rsplit("-", 1)[0] for cases in scores.values()
                                  for name in cases if not name.startswith("clean")))
    lines = ["| mode | clean outliers (" + ", ".join(scores) + ") | "
             + " | ".join(f"{f} IoU" for f in families) + " |",
             "|---|---" + "|---" * len(families) + "|"]
    for m in modes:
        clean = ", ".join(f"{cases['clean-0'][m]['outliers']:.2f}" for cases in scores.values())
        cells = []
        for family in families:
            ious = np.array([row[m]["iou"] for cases in scores.values()
                             for name, row in cases.items() if name.startswith(family + "-")])
            cells.append(f"{ious.min():.2f}-{ious.max():.2f}, {(ious >= 0.6).sum()} of "
                         f"{len(ious)} >= 0.6 (mean {ious.mean():.2f})")
        lines.append(f"| {m} | {clean} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", nargs="+", default=["hopper", "astronaut"],
                        choices=sorted(LANDMARKS))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--modes", nargs="+", default=["plain", "robust"], choices=fit.MODES)
    parser.add_argument("--run", metavar="RUN_DIR",
                        help="a trained train.py run: adds fitting with its segmenter and its "
                             "networks' forward pass, at the run's image size")
    parser.add_argument("--steps", type=int, default=300, help="fitting steps after the landmarks")
    parser.add_argument("--landmark-steps", type=int, default=100, help="landmark-only steps first")
    parser.add_argument("--coarse-size", type=int, default=0,
                        help="fit at this size first, then at --size (fit.coarse_to_fine; 0: off)")
    parser.add_argument("--coarse-steps", type=int, default=200,
                        help="with --coarse-size: the steps at that size, out of --steps")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=occluders.OCCLUDERS,
                        help="occluder families to paste")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS),
                        help="draws of each occluder")
    parser.add_argument("--face-model", default="toy", help="face_models.load_face_model spec of the fits")
    parser.add_argument("--robust", choices=sorted(fit.ROBUST_SETTINGS), default="photo",
                        help="robust mode: the named settings of fit.ROBUST_SETTINGS that the "
                             "options below override ('photo' = ROBUST; 'paper': xi 0.17, no "
                             "floor, no light prior)")
    parser.add_argument("--xi", type=float,
                        help="robust mode: M_pre threshold while fitting (paper 0.17, official "
                             "code 0.0166)")
    parser.add_argument("--xi-start", type=float, help="robust mode: a stricter first threshold")
    parser.add_argument("--xi-final", type=float,
                        help="robust mode: the threshold of the mask the fit returns")
    parser.add_argument("--lambda-mono", type=float,
                        help="robust mode: weight of the white-light prior L_mono (0: off)")
    parser.add_argument("--lambda-light", type=float,
                        help="robust mode: weight of the light prior L_light (0: off)")
    parser.add_argument("--keep-at-least", type=float,
                        help="robust mode: keep at least this share of the face region while "
                             "fitting (0: M_pre)")
    parser.add_argument("--out", default=os.path.join("results", "photos"))
    args = parser.parse_args(argv)
    robust = fit.robust_settings(args.robust, xi=args.xi, xi_start=args.xi_start,
                                 xi_final=args.xi_final, lambda_mono=args.lambda_mono,
                                 lambda_light=args.lambda_light, keep_at_least=args.keep_at_least)
    try:
        result = run(tuple(args.photos), size=args.size, modes=tuple(args.modes),
                     options=dict(steps=args.steps, landmark_steps=args.landmark_steps,
                                  coarse_size=args.coarse_size, coarse_steps=args.coarse_steps),
                     robust=robust, families=tuple(args.families), seeds=tuple(args.seeds),
                     face_model=args.face_model, run_dir=args.run)
    except PhotoError as error:
        raise SystemExit(f"error: {error}")
    modes = list(args.modes) + (["segmenter", "focus"] if args.run else [])
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "photos.json"), "w") as f:
        json.dump(result["scores"], f, indent=1)
    table = markdown(result["scores"], modes) + "\n" + summary_markdown(result["scores"], modes)
    with open(os.path.join(args.out, "photos.md"), "w") as f:
        f.write(table)
    figures.figure_photos(os.path.join(args.out, "photos.png"), result["_figure"], modes)
    figures.figure_photos(os.path.join(args.out, "photos_summary.png"),
                          summary_rows(result["_figure"], args.seeds[0]), modes)
    print(table)
    print(f"wrote photos.md, photos.json, photos.png and photos_summary.png to {args.out}")


def summary_rows(shown: list, seed: int) -> list:
    """The rows of a short figure: the last photo (the astronaut when it ran), clean and with
    the first draw of each occluder family."""
    last = shown[-1][0]
    return [row for row in shown if row[0] == last
            and (row[1].startswith("clean") or row[1].endswith(f"-{seed}"))]


if __name__ == "__main__":
    main()
