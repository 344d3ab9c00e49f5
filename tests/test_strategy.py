"""FSDP2Strategy's own arguments (its launches are covered by test_training, test_launch and
test_context_parallel)."""

from datetime import timedelta

import pytest

from trainers.strategy import FSDP2Strategy


def test_collective_timeout_reaches_the_process_group():
    assert FSDP2Strategy(collective_timeout_s=90)._timeout == timedelta(seconds=90)
    assert FSDP2Strategy()._timeout == timedelta(minutes=30)  # torch's default when unset


def test_context_parallel_size_below_one_is_refused():
    with pytest.raises(ValueError, match="context_parallel_size must be >= 1"):
        FSDP2Strategy(context_parallel_size=0)
