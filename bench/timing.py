"""Timing helpers shared by the benchmarks in bench/."""
import time

import numpy as np
import torch


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work, so wall-clock times cover it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median wall time of fn() in seconds over `repeats` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return float(np.median(times))
