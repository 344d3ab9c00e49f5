"""Context parallelism (modules/nets/context.py) on CPU with 2 gloo processes, fp32: the split
network equals the whole one (outputs, tapped features, parameter and input gradients, plain and
under FSDP2 over the data x context mesh, with and without frame padding), and a short control
`fit` with context_parallel_size 2 gives the one-process losses and weights."""

import json

import pytest
import torch

from tests.test_training import params, run
from trainers.strategy import FSDP2Strategy


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One 2-process launch for both tests (process start-up is most of their time): the network
    comparison (tests.helpers.cp_worker) in the process group, then a 2-step control `fit` with
    context_parallel_size 2 in it."""
    tmp = tmp_path_factory.mktemp("cp")
    ranks = run(tmp / "cp", nproc=2, steps=2, global_batch=2, cp=2, clip=0.05, cp_check=tmp / "check.json")
    return tmp, ranks


def test_split_network_equals_whole(two_ranks):
    results = json.loads((two_ranks[0] / "check.json").read_text())
    assert "must divide the number of attention heads (3)" in results["heads_error"]
    results = results["cases"]
    # plain_F / fsdp_F: F latent frames on 2 ranks (3: padded with a masked frame)
    assert set(results) == {"plain_4", "plain_3", "fsdp_4", "fsdp_3"}
    for case, diffs in results.items():
        assert diffs["out"] < 1e-5, (case, diffs)
        assert diffs["features"] < 1e-5, (case, diffs)
        assert diffs["grads"] < 1e-5, (case, diffs)  # relative to each tensor's largest entry
        assert diffs["input_grad"] < 1e-5, (case, diffs)


def test_fit_with_context_parallel_equals_one_process(two_ranks, tmp_path):
    # 3 latent frames over 2 ranks: the padded split; a clip threshold the gradient norm exceeds
    two = two_ranks[1]
    one = run(tmp_path / "one", nproc=1, steps=2, global_batch=2, clip=0.05)
    assert two[0]["losses"] == two[1]["losses"]
    assert two[0]["digest"] == two[1]["digest"]  # one set of weights on every rank
    for a, b in zip(two[0]["losses"], one[0]["losses"], strict=True):
        assert abs(a - b) < 1e-5
    p2, p1 = params(two_ranks[0] / "cp"), params(tmp_path / "one")
    for k in p1:
        torch.testing.assert_close(p2[k], p1[k], atol=1e-5, rtol=1e-5)


def test_context_parallel_size_is_checked():
    with pytest.raises(ValueError, match="context_parallel_size"):
        FSDP2Strategy(context_parallel_size=0)
