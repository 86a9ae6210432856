"""Train every run the result tables need, then assemble the tables (paper Sec. 4, Supp. B).

    run dir            what                                   rows it gives
    runs/cpu           FOCUS: init, em, prior                 Pretrained (end of init), FOCUS
                                                              (= Neighbor: no F at `cpu`),
                                                              FOCUS-MP (its misfit prior)
    runs/cpu-baseline  EM with the Baseline segmenter losses  Baseline
                       (init copied from runs/cpu)
    runs/cpu-mofa      no mask (MoFA)                         MoFA
    runs/cpu-supervised ground-truth masks                    Supervised
    runs/cpu-cutout    ground-truth masks + cutout            cutout
    runs/cpu-cutmix    ground-truth masks + cutmix            cutmix

The init stage does not depend on the segmenter losses, so the Baseline ablation starts its EM
from the FOCUS run's finished init checkpoint (the same file an own init run would write).
The Perceptual ablation needs the perceptual network F, which at `cpu` costs about 4 s per
batch (docs/deviations.md): run it with `python train.py --stage all --perceptual dlib
--segmenter-losses perceptual` where time allows; evaluate.py picks up any run it is given.

Every stage runs as `python train.py ...` in its own process; a stage already finished is
skipped and one interrupted is continued with `--resume`, so rerunning this script after a
crash or Ctrl-C loses at most the steps since the last checkpoint. `--jobs 2` runs two stages at
once with one torch thread each (the default on a 2-core machine).

The oracle R (`--group oracle`, docs/levers.md): S alone on each training face's own theta
with noise 0, 0.25, 0.5 and 1 standard deviations on identity, expression and albedo, with the
paper's eta and with the re-balanced eta the one-pass R needed (runs/cpu-oracle-NOISE-ETA).
Their rows join the tables, and evaluate.py draws results/oracle.png: mask F1 against R's
image RMSE, with the FOCUS run's R marked in one forward pass and refined.

Supp. Fig. 4 (`--group sweep`): EM runs of `SWEEP_EM_STEPS` steps from the FOCUS init that
change one of eta_area, eta_bin (x 0.5 and x 2), plus a reference run of the same
length; `python evaluate.py sweep` plots mask F1 against each eta.

Run: `python experiments.py` (then the tables are in results/); `python experiments.py --group
oracle`; `python experiments.py --group sweep`; `python experiments.py --help`.
"""
import argparse
import os
import subprocess
import sys
import threading
import time
from typing import NamedTuple, Optional, Tuple

import runs
from config import PRESETS, flag


class Experiment(NamedTuple):
    name: str  # run dir under --root
    options: Tuple[str, ...]  # train.py options besides --stage / --preset / --run-dir
    stages: Tuple[str, ...]
    init_from: Optional[str] = None  # copy this run's finished init checkpoint


EXPERIMENTS = (
    Experiment("focus", (), ("init", "em", "prior")),
    Experiment("mofa", ("--variant", "mofa"), ("init", "em")),
    Experiment("baseline", ("--segmenter-losses", "baseline"), ("em",), init_from="focus"),
    Experiment("supervised", ("--variant", "supervised"), ("init", "em")),
    Experiment("cutout", ("--variant", "cutout"), ("init", "em")),
    Experiment("cutmix", ("--variant", "cutmix"), ("init", "em")),
)


# Supp. Fig. 4: one eta at a time around the preset's value, EM only (shorter, from the FOCUS
# init), with a reference run of the same length
# (eta_area / eta_nbr is the residual threshold a kept pixel must stay under; sweeping eta_area
# moves it, so eta_nbr is not swept separately)
SWEEP = {"eta_area": (2.0, 8.0), "eta_bin": (0.5, 2.0)}
SWEEP_EM_STEPS = 1_200
SWEEP_EXPERIMENTS = (
    Experiment("sweep-reference", ("--em-steps", str(SWEEP_EM_STEPS)), ("em",),
               init_from="focus"),
    *(Experiment(f"sweep-{name}-{value:g}", (flag(name), str(value), "--em-steps",
                                            str(SWEEP_EM_STEPS)), ("em",), init_from="focus")
      for name, values in SWEEP.items() for value in values),
)
# the oracle R (docs/levers.md): S alone on each face's own theta with noise, with the paper's
# eta and the one-pass R's re-balanced eta, on the preset's own schedule for S (`cpu`: 200
# pre-training + 450 L_S steps, 3 EM rounds of 150)
ORACLE_NOISE = (0.0, 0.25, 0.5, 1.0)
ORACLE_ETA = {"paper": (0.5, 10.0), "rebalanced": (4.0, 1.0)}
ORACLE_EXPERIMENTS = tuple(
    Experiment(f"oracle-{noise:g}-{eta}", ("--r-source", "oracle", "--oracle-noise", str(noise),
                                          "--eta-area", str(area), "--eta-bin", str(binary)),
               ("init", "em"))
    for eta, (area, binary) in ORACLE_ETA.items() for noise in ORACLE_NOISE)
GROUPS = {"tables": EXPERIMENTS, "sweep": SWEEP_EXPERIMENTS, "oracle": ORACLE_EXPERIMENTS,
          "all": EXPERIMENTS + SWEEP_EXPERIMENTS + ORACLE_EXPERIMENTS}


def run_dir_of(root: str, preset: str, experiment: Experiment) -> str:
    """runs/cpu, runs/cpu-mofa, ...: the directory train.py would choose by default."""
    suffix = "" if experiment.name == "focus" else f"-{experiment.name}"
    return os.path.join(root, preset + suffix)


def stage_done(run_dir: str, stage: str) -> Optional[bool]:
    """True finished, False started, None never started."""
    path = runs.checkpoint_path(run_dir, stage)
    if not os.path.exists(path):
        return None
    return bool(runs.load_checkpoint(path)["done"])


def by_name(name: str) -> Experiment:
    for experiment in GROUPS["all"]:
        if experiment.name == name:
            return experiment
    raise ValueError(f"no experiment {name!r}: choose from "
                     f"{[e.name for e in GROUPS['all']]}")


def ready(root: str, preset: str, experiment: Experiment) -> bool:
    """Can the experiment start now (its init source, if any, finished)?"""
    if experiment.init_from is None:
        return True
    return stage_done(run_dir_of(root, preset, by_name(experiment.init_from)), "init") is True


def run_experiment(root: str, preset: str, experiment: Experiment, threads: int,
                   lock: threading.Lock) -> float:
    """Every unfinished stage of `experiment`, each a train.py process; returns seconds spent."""
    run_dir = run_dir_of(root, preset, experiment)
    init_from = (["--init-from", run_dir_of(root, preset, by_name(experiment.init_from))]
                 if experiment.init_from is not None else [])
    tic = time.perf_counter()
    for stage in experiment.stages:
        state = stage_done(run_dir, stage)
        if state:
            continue
        command = [sys.executable, "train.py", "--stage", stage, "--preset", preset,
                   "--run-dir", run_dir, *experiment.options] + (["--resume"] if state is False
                                                                   else init_from)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        with lock:
            print(f"[{experiment.name}] {' '.join(command[1:])}", flush=True)
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, env=env, cwd=os.path.dirname(os.path.abspath(__file__)))
        for line in process.stdout:
            with lock:
                print(f"[{experiment.name}] {line}", end="", flush=True)
        if process.wait():
            raise RuntimeError(f"{experiment.name}: stage {stage} failed (exit "
                               f"{process.returncode}); rerun this script to continue it")
    return time.perf_counter() - tic


def train_all(root: str, preset: str, experiments: list, jobs: int, threads: int) -> dict:
    """Run the experiments on `jobs` workers, each taking the next one that is ready."""
    pending, seconds, errors = list(experiments), {}, []
    lock, wake = threading.Lock(), threading.Condition()

    def worker():
        while True:
            with wake:
                while True:
                    if errors or not pending:
                        return
                    job = next((e for e in pending if ready(root, preset, e)), None)
                    if job is not None:
                        pending.remove(job)
                        break
                    wake.wait(timeout=10)
            try:
                seconds[job.name] = run_experiment(root, preset, job, threads, lock)
            except Exception as error:  # reported after the other worker stops
                errors.append(error)
            with wake:
                wake.notify_all()

    workers = [threading.Thread(target=worker) for _ in range(jobs)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if errors:
        raise errors[0]
    return seconds


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    parser.add_argument("--root", default="runs", help="folder of the run dirs (default runs)")
    parser.add_argument("--group", choices=sorted(GROUPS), default="tables",
                        help="tables (default): the runs of the result tables; sweep: EM runs "
                             "varying one eta at a time (Supp. Fig. 4); oracle: S on the oracle "
                             "R at four noise levels and two eta; all: every group")
    parser.add_argument("--only", nargs="+", help="experiment names (instead of --group)")
    parser.add_argument("--jobs", type=int, default=2, help="stages run at once (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per job")
    parser.add_argument("--out", default="results", help="where the tables go (default results)")
    parser.add_argument("--eval-count", type=int, default=None,
                        help="held-out faces per subset (default: evaluate.py's)")
    parser.add_argument("--skip-eval", action="store_true", help="train only")
    args = parser.parse_args(argv)
    try:
        experiments = ([by_name(n) for n in args.only] if args.only
                       else list(GROUPS[args.group]))
    except ValueError as error:
        parser.error(str(error))
    if args.jobs < 1 or args.threads < 1:
        parser.error("--jobs and --threads must be >= 1")
    tic = time.perf_counter()
    try:
        seconds = train_all(args.root, args.preset, experiments, args.jobs, args.threads)
    except (RuntimeError, runs.RunError) as error:
        sys.exit(f"error: {error}")
    for name, s in seconds.items():
        print(f"{name}: {s / 60:.1f} min of training")
    print(f"training: {(time.perf_counter() - tic) / 60:.1f} min wall-clock with {args.jobs} jobs")
    if args.skip_eval:
        return
    import evaluate
    count = ["--count", str(args.eval_count)] if args.eval_count else []
    # the tables take the oracle runs too (their rows and the figure oracle.png)
    for group, command in (("tables", []), ("sweep", ["sweep"])):
        members = GROUPS[group] + (ORACLE_EXPERIMENTS if group == "tables" else ())
        dirs = [run_dir_of(args.root, args.preset, e) for e in members
                if stage_done(run_dir_of(args.root, args.preset, e), "em")]
        if dirs and any(e in experiments for e in members):
            evaluate.main(command + ["--runs", *dirs, "--out", args.out] + count)
    print(f"all: {(time.perf_counter() - tic) / 60:.1f} min")


if __name__ == "__main__":
    main()
