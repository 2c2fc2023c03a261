import os
import sys

# The Triton interpreter must be chosen before any kernel module is imported (CPU machines have no GPU).
os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "fixtures")


@pytest.fixture(scope="session")
def fixtures_dir():
    path = os.path.abspath(FIXTURES)
    if not os.path.isdir(path):
        pytest.fail(f"golden fixtures not found at {path} (expected ../shared/fixtures beside the checkout)")
    return path
