"""Timing shared by the benchmark scripts (each script puts this folder on sys.path, also when imported)."""

import statistics
import time


def median_ms(fn, sync, warmup: int, iters: int) -> float:
    """Median wall time of `sync(fn())` in ms over `iters` calls, after `warmup` untimed calls."""
    for _ in range(warmup):
        sync(fn())
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        sync(fn())
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)
