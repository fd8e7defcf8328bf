"""What every test leaves as it found it, so that the suite passes in any order: the project's logger
(the command line installs its Progress handler), torch's default dtype and random state."""
import logging

import pytest
import torch


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
