import atexit
import os
import shutil
import sys
import tempfile

# The Triton interpreter must be chosen before any kernel module is imported (CPU machines have no GPU).
os.environ.setdefault("TRITON_INTERPRET", "1")

# XLA's CPU compiles are most of the suite's time, and many are repeats: every `train()` call jits a new train step
# (kill + resume, 1 device vs a resume onto 8), and every process (xdist worker, subprocess) compiles its own copy of
# the same eager ops and programs. A compilation cache for this session only hands back the executable XLA would
# build again, so nothing compared changes. JAX reads these variables when it is imported; subprocesses and xdist
# workers inherit them. Every compile is kept (minimum time 0): loading one of the ~0.07 s eager-op compiles takes
# milliseconds (a parity test: 36 s -> 10 s when another process ran it first). The process that made the folder
# removes it at exit; a cache the caller set is used as it is.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="sana-jax-test-xla-cache-")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "fixtures")


@pytest.fixture(scope="session")
def fixtures_dir():
    path = os.path.abspath(FIXTURES)
    if not os.path.isdir(path):
        pytest.fail(f"golden fixtures not found at {path} (expected ../shared/fixtures beside the checkout)")
    return path
