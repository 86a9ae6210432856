"""How much of theta can the `cpu` encoder learn in a given number of steps when it is *told*
theta? A diagnosis, not part of FOCUS: the encoder trains on the synthetic training faces of a
preset with the squared error of its theta against the true theta (each number divided by its
spread in the training data), no renderer involved. If it cannot regress a group even so, the
self-supervised loss is not what holds R back on that group: the encoder and the step budget
are.

    python bench/probe_encoder.py --steps 1500 [--zero-init-residual] [--threads 1]

Prints, on validation faces (unoccluded, seed `config.VALIDATION_SEED`), each theta group's
error as a share of its spread (1 = no better than predicting the mean; identity, expression
and albedo are standard-normal, so 1 is also predicting 0), and R's image RMSE (0-255) on the
clean held-out faces that training logs.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bfm  # noqa: E402
import config  # noqa: E402
import face_models  # noqa: E402
import focus  # noqa: E402
import runs  # noqa: E402
import train  # noqa: E402


def group_errors(encoder, images: torch.Tensor, theta: torch.Tensor, spread: torch.Tensor) -> dict:
    """Mean over each group of (error / spread)^2: 1 = predicting the training mean."""
    with torch.no_grad(), focus.eval_mode(encoder):
        predicted = torch.cat(list(encoder(images)), dim=1)  # (B, 257)
    relative = ((predicted - theta) / spread).pow(2).mean(dim=0)  # (257,)
    return {name: value.mean().item()
            for name, value in zip(bfm.Theta._fields, bfm.split_theta(relative[None]))}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--zero-init-residual", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--count", type=int, default=128, help="validation faces")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = config.make_config(args.preset, zero_init_residual=args.zero_init_residual)
    face_model = face_models.load_face_model(cfg.face_model)
    autoencoder, _ = runs.build_models(cfg, face_model)
    device = torch.device(cfg.device)
    dataset, salt = train.stage_data("init", cfg, face_model)
    spread = train.load_batch(dataset, list(range(512)), device)["theta"].std(dim=0)
    spread = spread.clamp_min(1e-6)  # (257,)
    validation = train.make_dataset(cfg, face_model, seed=config.VALIDATION_SEED,
                                    subset="unoccluded", length=args.count)
    faces = train.load_batch(validation, list(range(args.count)), device)
    heldout = train.heldout_faces(cfg, face_model, device)
    optimizer = torch.optim.Adam(autoencoder.encoder.parameters(), lr=cfg.lr)
    start = time.time()
    for step in range(1, args.steps + 1):
        batch = train.load_batch(dataset, train.batch_indices(step - 1, cfg, len(dataset),
                                                              salt=salt), device)
        predicted = torch.cat(list(autoencoder.encoder(batch["image"])), dim=1)
        loss = ((predicted - batch["theta"]) / spread).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % max(1, args.steps // 6) == 0 or step == args.steps:
            errors = group_errors(autoencoder.encoder, faces["image"], faces["theta"], spread)
            print(f"step {step:5d}  " + "  ".join(f"{k} {v:.2f}" for k, v in errors.items())
                  + f"  held-out RMSE {train.heldout_rmse(autoencoder, heldout):.1f}"
                  + f"  ({(time.time() - start) / step:.2f} s/step)", flush=True)


if __name__ == "__main__":
    main()
