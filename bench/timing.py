"""Timing helpers shared by the benchmarks in bench/: synchronised wall times, the device's
name and its peak memory."""
import platform
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


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's with torch's thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak of `peak_memory_mib` (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device: torch.device) -> float:
    """Peak GPU memory allocated by torch since `reset_peak_memory`, MiB (NaN on CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return float("nan")
