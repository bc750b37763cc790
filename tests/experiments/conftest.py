"""Fixtures shared by the experiment scripts' tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def quiet_one_thread():
    """No wandb runs, and one torch thread: a tiny model on a busy 2-core machine only pays sync cost for more.
    Use it per module: ``pytestmark = pytest.mark.usefixtures("quiet_one_thread")``."""
    before = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "disabled")
        torch.set_num_threads(1)
        yield
    torch.set_num_threads(before)
