"""Seeds derived from integers: the one rule every seeded draw of a run follows. Pure numpy, so
pure modules (the network schedule, its graphs) can seed without importing torch."""

from __future__ import annotations

import numpy as np


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes and Python versions."""
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0]
               >> np.uint64(1))
