"""Timing shared by the benchmark scripts (each script puts this folder on sys.path, also when imported)."""

import json
import os
import statistics
import subprocess
import sys
import time

PEAK_FLOPS = 989e12  # H100/H200 dense bf16 (DESIGN.md); MFU = analytic FLOPs / time / this


def error_text(err: BaseException) -> str:
    """A failed measurement's record entry: the exception's type and the first line of its message."""
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:300]}"


def jax_versions(jax) -> dict:
    """A JAX record's version entry, with the XLA_FLAGS it compiled under when set: they can change the program
    (a kernel choice, a fusion), so an A/B through them must say so in its records."""
    flags = os.environ.get("XLA_FLAGS")
    return {"jax": jax.__version__, **({"xla_flags": flags} if flags else {})}


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


def run_child(script: str, args: list[str], env: dict | None = None, timeout: float | None = None):
    """Run `python script *args` and yield the JSON objects it prints, one per line, as they come.

    Each framework of a benchmark runs in its own child so that neither holds GPU memory while the other is
    measured (JAX's allocator and torch's caching allocator never give memory back). A child that dies yields
    one {"error": ...} record with the tail of its stderr. JAX children allocate as they go and may grow to 95%
    of the GPU's memory (JAX's default cap is 75%; torch's allocator may take it all), unless the caller's
    environment sets XLA_PYTHON_CLIENT_MEM_FRACTION: the 1.6B training step fits batch 24 in 68.4 GiB of 80.
    """
    child_env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", **(env or {}))
    child_env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    proc = subprocess.Popen([sys.executable, script, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=child_env)
    start = time.monotonic()
    for line in proc.stdout:
        if line.startswith("{"):
            yield json.loads(line)
        if timeout is not None and time.monotonic() - start > timeout:
            proc.kill()
            yield {"error": f"{os.path.basename(script)} {' '.join(args)}: killed after {timeout:.0f} s"}
            return
    stderr = proc.stderr.read()
    if proc.wait() != 0:
        yield {"error": f"{os.path.basename(script)} {' '.join(args)} exited {proc.returncode}: "
                        + " | ".join(stderr.strip().splitlines()[-3:])}


def xla_program_bytes(compiled) -> int | None:
    """XLA's own account of a compiled program's device memory: arguments + outputs + temporaries - aliased
    (donated) buffers. This is what the program holds at its peak; JAX has no per-call peak counter."""
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    return int(stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
               - stats.alias_size_in_bytes)


def parse_overrides(items: list[str]) -> dict:
    """`--set FIELD=VALUE` items -> {field: value} (SanaConfig overrides)."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected FIELD=VALUE")
        # As `sana-jax train --set` parses (sana_jax.train.config), here without importing sana_jax or jax into
        # the parent: true / 2 / 1e-8 as JSON values; anything else (bfloat16, cudnn) stays a string.
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides
