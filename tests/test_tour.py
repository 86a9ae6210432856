"""Every command of TOUR.md runs: in order, in a fresh folder holding a tiny stand-in for the
README main job's runs/cpu, with options appended that shrink the work (argparse keeps the
last value of an option, train.py's `--key value` overrides likewise)."""
import os
import re
import shlex
import subprocess
import sys
import time

import pytest

import config
import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_TRAIN = ["--preset", "tiny"] + [x for k, v in config.PRESETS["tiny"].items()
                                     if k.endswith("_steps") for x in (config.flag(k), str(v))]
SHRINK = {  # script (and subcommand) -> options appended
    "face_models.py": ["toy,resolution=24"],  # the model spec, a positional argument
    "data.py show": ["--size", "32", "--per-subset", "1", "--face-model", "toy,resolution=24"],
    "fit.py": ["--size", "32", "--steps", "3", "--landmark-steps", "2",
               "--face-model", "toy,resolution=24"],
    "train.py": TINY_TRAIN,
    "evaluate.py fitting": ["--count", "2", "--steps", "2", "--landmark-steps", "1"],
    "evaluate.py": ["--count", "2"],
    "photos.py": ["--size", "32", "--steps", "2", "--landmark-steps", "1", "--families", "scarf",
                  "--seeds", "0", "--face-model", "toy,resolution=24"],
}


def tour_commands() -> list:
    """The `python ...` lines of TOUR.md's sh blocks, in order."""
    with open(os.path.join(REPO, "TOUR.md")) as f:
        text = f.read()
    blocks = re.findall(r"```sh\n(.*?)```", text, flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def shrunk(command: str) -> list:
    words = shlex.split(command)
    assert words[0] == "python", f"TOUR.md commands start with python: {command}"
    script = words[1]
    key = next((k for k in (f"{script} {words[2]}" if len(words) > 2 else "", script)
                if k in SHRINK), None)
    assert key is not None, f"tests/test_tour.py does not know how to shrink {command!r}"
    extra = list(SHRINK[key])
    if script == "train.py" and "--run-dir" not in words:
        extra += ["--run-dir", "runs/cpu"]  # with --preset tiny the default would be runs/tiny
    return [sys.executable, os.path.join(REPO, script)] + words[2:] + extra


def test_tour_has_six_to_eight_exercises():
    with open(os.path.join(REPO, "TOUR.md")) as f:
        exercises = re.findall(r"^### \d+\. ", f.read(), flags=re.M)
    assert 6 <= len(exercises) <= 8


def test_every_tour_command_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # restored after the test
    # the README main job at tiny size: runs/cpu with finished init and em stages
    cfg = config.make_config("tiny")
    train.run("init", "runs/cpu", cfg)
    train.run("em", "runs/cpu", None)
    commands = tour_commands()
    assert len(commands) >= 10
    for command in commands:
        tic = time.perf_counter()
        result = subprocess.run(shrunk(command), capture_output=True, text=True, cwd=tmp_path,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        print(f"{time.perf_counter() - tic:5.1f} s  {command}")
        assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    # the outputs the exercises point at exist
    for path in ("out/tour/faces.png", "out/tour/robust-scarf/mask.png",
                 "results/tour-fitting/fitting.md", "runs/cpu/misfit_prior.pt",
                 "results/tour-prior/misfit_prior.png", "results/tour-hands/qualitative.png",
                 "results/tour-baseline/tables.md", "results/tour-oracle/oracle.png"):
        assert os.path.exists(path), path
