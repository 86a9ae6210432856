"""Tests of experiments.py: the runs the tables need are trained once, the Baseline ablation
starts from the FOCUS run's init, and a rerun trains nothing."""
import os

import pytest
import torch

import config
import experiments
import runs
import train


def test_trains_shares_init_and_skips_finished_stages(tmp_path, capsys):
    root = str(tmp_path)
    experiments.main(["--preset", "tiny", "--root", root, "--only", "focus", "baseline",
                      "--skip-eval"])
    first = capsys.readouterr().out
    focus_dir, baseline_dir = os.path.join(root, "tiny"), os.path.join(root, "tiny-baseline")
    for stage in ("init", "em", "prior"):
        assert runs.load_checkpoint(runs.checkpoint_path(focus_dir, stage))["done"]
    assert runs.read_config(baseline_dir).segmenter_losses == "baseline"
    # the ablation's init is the FOCUS run's, and its EM ran from it
    shared = [torch.load(runs.checkpoint_path(d, "init"), weights_only=True)["segmenter"]
              for d in (focus_dir, baseline_dir)]
    assert all(torch.equal(shared[0][k], shared[1][k]) for k in shared[0])
    assert runs.load_checkpoint(runs.checkpoint_path(baseline_dir, "em"))["done"]
    assert "--stage em" in first and "--stage prior" in first

    experiments.main(["--preset", "tiny", "--root", root, "--only", "focus", "baseline",
                      "--skip-eval"])
    assert "train.py" not in capsys.readouterr().out  # nothing left to train


def test_unknown_experiment_is_an_error(capsys):
    with pytest.raises(SystemExit):
        experiments.main(["--only", "nonsense"])
    assert "no experiment 'nonsense'" in capsys.readouterr().err


def test_init_from_refuses_a_differently_trained_init(tmp_path):
    source = str(tmp_path / "source")
    train.run("init", source, config.make_config("tiny"))
    with pytest.raises(runs.RunError, match="lr"):
        train.run("em", str(tmp_path / "other"), config.make_config("tiny", lr=0.5),
                  init_from=source)
    with pytest.raises(runs.RunError, match="--stage em or all"):
        train.run("prior", str(tmp_path / "third"), config.make_config("tiny"), init_from=source)
    # EM settings may differ: the copy starts EM and the init stage is not retrained
    cfg = config.make_config("tiny", eta_area=2.0, segmenter_losses="baseline")
    train.run("all", str(tmp_path / "ablation"), cfg, init_from=source)
    log = (tmp_path / "ablation" / "log.csv").read_text()
    assert "\ninit," not in log and "\nem," in log and "\nprior," in log


def test_rerunning_a_finished_stage_says_so(tmp_path):
    run_dir = str(tmp_path / "run")
    train.run("init", run_dir, config.make_config("tiny"))
    with pytest.raises(runs.RunError, match="already finished"):
        train.run("init", run_dir, None)


def test_oracle_group_covers_every_noise_and_eta_with_valid_options():
    group = experiments.GROUPS["oracle"]
    assert len({e.name for e in group}) == len(experiments.ORACLE_NOISE) * len(
        experiments.ORACLE_ETA) == len(group)
    for experiment in group:
        cfg = config.make_config("cpu", **config.parse_overrides(list(experiment.options)))
        assert cfg.r_source == "oracle" and experiment.stages == ("init", "em")
        assert (cfg.eta_area, cfg.eta_bin) in experiments.ORACLE_ETA.values()
        # S's schedule is the preset's: what the default run's S gets
        preset = config.make_config("cpu")
        assert train.stage_steps("init", cfg) == preset.init_seg_steps
        rounds = preset.em_steps // preset.em_cycle
        assert train.stage_steps("em", cfg) == rounds * (preset.em_cycle - preset.em_ae_steps)
