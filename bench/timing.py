"""What the benchmarks share: the fastest of interleaved timed calls, and a probe of the memory bandwidth."""

import time
from collections.abc import Callable

import torch


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that a wall-clock time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(fns: dict[str, Callable[[], object]], iters: int, device: torch.device,
                 warmup: int = 1) -> dict[str, float]:  # fmt: skip
    """Fastest wall time per call of each `fn()` over `iters` calls after `warmup` untimed rounds, calls interleaved
    round-robin so that load from other processes (which only ever adds time) hits every candidate alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + iters):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}


def read_probe(device: torch.device, gib: float = 1.0) -> tuple[Callable[[], object], int]:
    """A call that reads `gib` GiB of memory once (a sum over a float32 tensor far larger than any cache) and the
    bytes it reads. Timed beside the runs (`best_seconds`), bytes / its fastest time is the memory bandwidth at the
    same thread count and under the same load from other processes: the roofline of weight streaming."""
    x = torch.ones(int(gib * 2**30) // 4, device=device)
    return x.sum, x.numel() * 4
