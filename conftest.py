"""What every test leaves as it found it, so that the suite passes in any order: the project's logger
(the command line installs its Progress handler), torch's default dtype and random state; and one torch
thread a test."""
import logging
import os

# One thread for torch in each test and in the commands it starts (they inherit it), set before torch loads:
# pytest -n 2 runs two tests side by side on two cores, and two threads each made them wait on each other.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def isolated():
    log = logging.getLogger("merge")
    handlers, level, propagate, dtype = list(log.handlers), log.level, log.propagate, torch.get_default_dtype()
    rng = torch.get_rng_state()
    yield
    log.handlers, log.propagate = handlers, propagate
    log.setLevel(level)
    torch.set_default_dtype(dtype)
    torch.set_rng_state(rng)
