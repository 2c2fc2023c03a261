"""`python -m sana_jax.cli ...`, the same as the `sana-jax` console script."""

import sys

from sana_jax.cli import main

sys.exit(main())
