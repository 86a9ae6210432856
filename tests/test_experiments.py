"""Tests of experiments.py: the runs the tables need are trained once, the Baseline ablation
starts from the FOCUS run's init, and a rerun trains nothing."""
import os

import pytest
import torch

import experiments
import train


def test_trains_shares_init_and_skips_finished_stages(tmp_path, capsys):
    root = str(tmp_path)
    experiments.main(["--preset", "tiny", "--root", root, "--only", "focus", "baseline",
                      "--skip-eval"])
    first = capsys.readouterr().out
    focus_dir, baseline_dir = os.path.join(root, "tiny"), os.path.join(root, "tiny-baseline")
    for stage in ("init", "em", "prior"):
        assert train.load_checkpoint(train.checkpoint_path(focus_dir, stage))["done"]
    assert train.read_config(baseline_dir).segmenter_losses == "baseline"
    # the ablation's init is the FOCUS run's, and its EM ran from it
    shared = [torch.load(train.checkpoint_path(d, "init"), weights_only=True)["segmenter"]
              for d in (focus_dir, baseline_dir)]
    assert all(torch.equal(shared[0][k], shared[1][k]) for k in shared[0])
    assert train.load_checkpoint(train.checkpoint_path(baseline_dir, "em"))["done"]
    assert "--stage em" in first and "--stage prior" in first

    experiments.main(["--preset", "tiny", "--root", root, "--only", "focus", "baseline",
                      "--skip-eval"])
    assert "train.py" not in capsys.readouterr().out  # nothing left to train


def test_unknown_experiment_is_an_error(capsys):
    with pytest.raises(SystemExit):
        experiments.main(["--only", "nonsense"])
    assert "no experiment 'nonsense'" in capsys.readouterr().err
