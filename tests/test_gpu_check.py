"""Tests of bench/gpu_check.py: its CPU dry run end to end (so the GPU check cannot rot before a
GPU is at hand), the agreement rule, and its one-line errors on bad input."""
import os
import re
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "bench"))
import gpu_check  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_dry_run_report_has_every_section_and_number(tmp_path):
    out = tmp_path / "report.md"
    assert gpu_check.main(["--cpu-dry-run", "--out", str(out)]) == 0
    text = out.read_text()
    for heading in ("# GPU check: CPU dry run", "## CUDA tests", "## cpu / cpu agreement",
                    "## Throughput", "## Smoke run: `tiny` preset"):
        assert heading in text
    passed, failed, skipped = map(int, re.search(
        r"`python -m pytest -q -m cuda`: (\d+) passed, (\d+) failed, (\d+) skipped", text).groups())
    assert failed == 0 and passed + skipped >= 3
    # the CPU against itself: every output agrees, with difference 0
    rows = re.findall(r"^\| ([^|]+) \| ([^|]+) \| [^|]+ \| (yes|NO) \|$", text, re.M)
    names = [name for name, _, _ in rows]
    # renderer: face ids, region, image, landmarks, 4 gradients; every loss with its gradient
    # (M_pre has none); encoder and UNet
    assert len(rows) == 8 + 2 * len(gpu_check.LOSSES) - 1 + 2
    assert {"renderer image I_R (pixels of the same face)", "L_R (Eq. 8), gradient",
            "UNet M (width 4, eval)"} <= set(names)
    assert all(float(diff) == 0.0 and agrees == "yes" for _, diff, agrees in rows)
    rates = re.findall(r"\| ([\d,.]+) (images/s|steps/s) \|", text)
    assert [unit for _, unit in rates] == ["images/s", "steps/s", "steps/s"]
    assert all(float(rate.replace(",", "")) > 0 for rate, _ in rates)
    smoke = re.findall(r"^\| (init|em) \| (\w+) \| [\d-]+ \| ([-\d.e]+) \| ([-\d.e]+) \| "
                       r"([\d.]+) \| ([\d.]+) \|$", text, re.M)
    assert {(stage, phase) for stage, phase, *_ in smoke} == {
        ("init", "autoencoder"), ("init", "pretrain"), ("em", "segmenter"), ("em", "autoencoder")}
    assert re.search(r"held-out RMSE \(0-255\) [\d.]+ -> [\d.]+", text)


def test_difference_is_absolute_near_one_and_relative_beyond():
    close, far = torch.tensor([0.5, 1.0]), torch.tensor([0.5, 1.0 + 3 * gpu_check.TOLERANCE])
    assert gpu_check.difference("x", close, close + 0.5 * gpu_check.TOLERANCE)["agrees"]
    row = gpu_check.difference("x", close, far)
    assert not row["agrees"] and row["difference"] == pytest.approx(3e-4, rel=1e-3)
    # a gradient of 1000 may differ by 1000 x 1e-4
    assert gpu_check.difference("g", torch.tensor([1000.0]), torch.tensor([1000.05]))["agrees"]
    assert not gpu_check.difference("nan", close, torch.tensor([0.5, float("nan")]))["agrees"]


def one_line_error(argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(argv)
    message = exit_info.value.code
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message
    return message


def test_unknown_device_is_a_one_line_error():
    assert "unknown device 'tpu0'" in one_line_error(["--device", "tpu0"])
    assert "must be a CUDA device" in one_line_error(["--device", "cpu"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_cuda_without_a_gpu_is_a_one_line_error():
    assert "--cpu-dry-run" in one_line_error(["--device", "cuda"])


@pytest.mark.parametrize("option", ["--render-batch", "--train-batch"])
def test_batch_size_zero_is_a_one_line_error(option):
    assert f"{option} must be >= 1, got 0" in one_line_error(["--cpu-dry-run", option, "0"])


def test_existing_run_dir_is_a_one_line_error(tmp_path):
    assert "exists" in one_line_error(["--cpu-dry-run", "--run-dir", str(tmp_path)])
