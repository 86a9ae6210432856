"""How well does the segmenter S learn outliers from a given R? A probe for choosing the
refined R's settings, not part of FOCUS: a fresh S is trained on one R with the training code's
own phases (`train.phase_loss`): first pre-trained on M_pre of R's render (BCE, Sec. 3.3), then
with L_S (Sec. 3.2). R does not train: it is a finished run's init encoder, in one forward pass
or refined by K fitting steps (`fit.refine`, masked by M_pre while S pre-trains and by S's mask
after), or the oracle (each face's own theta, with noise).

    python bench/probe_segmenter.py --run runs/cpu --refine-steps 30 --refine-landmark-steps 30
    python bench/probe_segmenter.py --run runs/cpu --r-source oracle --oracle-noise 0.5

Prints, on validation faces (seed `config.VALIDATION_SEED`, never the test faces), R's image
RMSE (0-255) and the mask F1 of S, of S after its pre-training, of M_pre and of the whole
rendered region, per subset, with the seconds S's training took. Any Config field is an option
(--eta-area 0.5 --eta-bin 10 for the paper's L_S weights).
"""
import argparse
import dataclasses
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import config  # noqa: E402
import evaluate  # noqa: E402
import losses  # noqa: E402
import runs  # noqa: E402
import train  # noqa: E402


def scores(cfg, autoencoder, segmenter, sets: dict, *, stage: str) -> dict:
    """{subset: {"rmse", "S", "M_pre", "Whole region"}} on R's render as `stage` makes it."""
    table = {}
    for subset, faces in sets.items():
        out = train.r_render(faces, autoencoder, segmenter, cfg, stage=stage)
        with torch.no_grad():
            masks = {"S": segmenter.eval()(out.image, faces["image"]) * out.region,
                     "M_pre": losses.preliminary_mask(faces["image"], out.image, out.region,
                                                      xi=cfg.xi),
                     "Whole region": out.region}
        truth = faces["visible_face"]
        row = {name: evaluate.segmentation_scores(mask, truth, out.region)["F1"].nanmean().item()
               for name, mask in masks.items()}
        row["rmse"] = evaluate.image_rmse(out.image, faces["image"], truth,
                                          out.region).nanmean().item()
        table[subset] = row
    return table


def train_segmenter(cfg, autoencoder, segmenter, dataset, *, phase: str, steps: int,
                    first: int) -> None:
    """`steps` optimiser steps of S in `phase` ("pretrain" or "segmenter"), R frozen."""
    optimizer = torch.optim.Adam(segmenter.parameters(), lr=cfg.lr * cfg.seg_lr_factor)
    stage = "init" if phase == "pretrain" else "em"
    for step in range(first, first + steps):
        batch = train.load_batch(dataset, train.batch_indices(step, cfg, len(dataset), salt=5),
                                 torch.device("cpu"))
        train.set_phase(phase, autoencoder, segmenter)
        loss, _ = train.phase_loss(stage, phase, batch, autoencoder, segmenter, None, cfg, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a run whose init stage is finished")
    parser.add_argument("--pretrain-steps", type=int, default=200)
    parser.add_argument("--seg-steps", type=int, default=400)
    parser.add_argument("--count", type=int, default=48, help="validation faces per subset")
    parser.add_argument("--threads", type=int, default=1)
    args, extra = parser.parse_known_args(argv)
    torch.set_num_threads(args.threads)
    cfg, autoencoder, _ = runs.load_models(args.run, stage="init")
    cfg = dataclasses.replace(cfg, **config.parse_overrides(extra))
    config.validate(cfg)
    torch.manual_seed(cfg.seed)
    segmenter = runs.build_models(dataclasses.replace(cfg, variant="focus"),
                                  autoencoder.face_model)[1]
    dataset = train.stage_data("init", cfg, autoencoder.face_model)[0]
    sets = evaluate.test_sets(autoencoder.face_model, cfg.image_size, args.count,
                              seed=config.VALIDATION_SEED, aligned=cfg.aligned_faces)
    tic = time.perf_counter()
    train_segmenter(cfg, autoencoder, segmenter, dataset, phase="pretrain",
                    steps=args.pretrain_steps, first=0)
    pretrained = scores(cfg, autoencoder, segmenter, sets, stage="em")
    train_segmenter(cfg, autoencoder, segmenter, dataset, phase="segmenter",
                    steps=args.seg_steps, first=args.pretrain_steps)
    seconds = time.perf_counter() - tic
    final = scores(cfg, autoencoder, segmenter, sets, stage="em")
    print(f"R: {cfg.r_source}, refine {cfg.refine_landmark_steps} + {cfg.refine_steps} steps, "
          f"oracle noise {cfg.oracle_noise:g}; eta_area {cfg.eta_area:g}, eta_bin "
          f"{cfg.eta_bin:g}; S {args.pretrain_steps} BCE + {args.seg_steps} L_S steps in "
          f"{seconds:.0f} s; {args.count} validation faces per subset")
    print("| subset | R's RMSE | S | Pretrained | M_pre | Whole region |")
    print("|---|---|---|---|---|---|")
    for subset, row in final.items():
        print(f"| {subset} | {row['rmse']:.1f} | {row['S']:.3f} | {pretrained[subset]['S']:.3f} "
              f"| {row['M_pre']:.3f} | {row['Whole region']:.3f} |")


if __name__ == "__main__":
    main()
