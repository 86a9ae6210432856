"""How far do K fitting steps take the encoder's estimate, and at what cost? A probe for
choosing the refined R (`fit.refine`), not part of FOCUS: a finished run's init encoder, refined
by each number of landmark-only and full fitting steps of a grid (robust mode: M_pre
re-estimated from the current fit), on validation faces (seed `config.VALIDATION_SEED`) of the
unoccluded and scarf subsets, one batch each.

    python bench/probe_refine.py --run runs/cpu [--steps 0 10 20 30 60] [--landmark-steps 0 30]

Prints R's image RMSE (0-255) inside the visible face and the seconds per batch of each
setting; the per-image fit from the mean face (100 landmark + 100 full steps) is the last row.
Time it with nothing else running.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import config  # noqa: E402
import evaluate  # noqa: E402
import fit  # noqa: E402
import runs  # noqa: E402


def rmse(out, faces) -> float:
    return evaluate.image_rmse(out.image, faces["image"], faces["visible_face"],
                               out.region).nanmean().item()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a run whose init stage is finished")
    parser.add_argument("--steps", type=int, nargs="+", default=[0, 10, 20, 30, 60])
    parser.add_argument("--landmark-steps", type=int, nargs="+", default=[0, 10, 30])
    parser.add_argument("--count", type=int, default=16, help="faces per subset (one batch)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg, autoencoder, _ = runs.load_models(args.run, stage="init")
    sets = evaluate.test_sets(autoencoder.face_model, cfg.image_size, args.count,
                              seed=config.VALIDATION_SEED, subsets=("unoccluded", "scarf"),
                              aligned=cfg.aligned_faces)
    print(f"{args.run}: init encoder refined, robust mode, {args.count} validation faces per "
          f"subset, {args.threads} thread(s)")
    print("| landmark steps | full steps | RMSE unoccluded | RMSE scarf | s per batch |")
    print("|---:|---:|---:|---:|---:|")
    for landmark_steps in args.landmark_steps:
        for steps in args.steps:
            cells, seconds = [], 0.0
            for faces in sets.values():
                tic = time.perf_counter()
                out = fit.refine(faces["image"], faces["landmarks"], autoencoder, steps=steps,
                                 landmark_steps=landmark_steps, xi=cfg.xi)
                seconds += time.perf_counter() - tic
                cells.append(rmse(out, faces))
            print(f"| {landmark_steps} | {steps} | {cells[0]:.1f} | {cells[1]:.1f} | "
                  f"{seconds / len(sets):.2f} |", flush=True)
    cells, seconds = [], 0.0
    for faces in sets.values():
        tic = time.perf_counter()
        result = fit.fit(faces["image"], faces["landmarks"], autoencoder.face_model,
                         mode="robust", steps=100, landmark_steps=100)
        seconds += time.perf_counter() - tic
        cells.append(rmse(result.rendered, faces))
    print(f"| 100 (from the mean face) | 100 | {cells[0]:.1f} | {cells[1]:.1f} | "
          f"{seconds / len(sets):.2f} |")


if __name__ == "__main__":
    main()
