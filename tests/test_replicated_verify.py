"""``verify_replicated: true``: every rank checksums its copy of each replicated tensor in the background,
rank 0 compares them at commit, and a copy that differs fails the save on every rank, naming the tensors and
the ranks (issue 13, item 4). State a rank changes locally (module buffers, saved from rank 0) is not
compared: it is expected to differ."""
from __future__ import annotations

import pytest
import torch

import asyncckpt
from buffer_workers import CFG, bn_model
from dist_helpers import assert_all_ok, forkserver_context, run_ranks

pytestmark = pytest.mark.multirank

PERTURBED = ("0.weight", "2.bias")  # one large and one small parameter: written by different ranks


def perturbed_save(rank: int, world: int, save_dir: str, verify: bool, per_node: int = 0) -> list:
    """Rank 1 holds other values in PERTURBED (and every rank its own running statistics); save "diverged",
    then put the parameters back and save "agreed". Each save's error text (None: published)."""
    if per_node:
        import os

        os.environ.update({"GROUP_RANK": str(rank // per_node), "LOCAL_RANK": str(rank % per_node),
                           "LOCAL_WORLD_SIZE": str(per_node)})
    model = bn_model()
    torch.manual_seed(100 + rank)
    model(torch.randn(16, 4) * (rank + 1))  # the buffers differ per rank, as with DDP
    params = dict(model.named_parameters())
    original = {k: params[k].detach().clone() for k in PERTURBED}
    if rank == 1:
        with torch.no_grad():
            for k in PERTURBED:
                params[k].add_(1e-3)
    cfg = dict(CFG, verify_replicated=verify, use_node_local_storage=bool(per_node))
    target = save_dir if not per_node else f"{save_dir}/node{rank // per_node}"
    out = []
    with asyncckpt.AsyncCheckpointer(model, replicated=True, config=cfg) as saver:
        out.append(saver.save_checkpoint(target, tag="diverged").exception(60))
        with torch.no_grad():
            for k in PERTURBED:
                params[k].copy_(original[k])
        out.append(saver.save_checkpoint(target, tag="agreed").exception(60))
    return [e and f"{type(e).__name__}: {e}" for e in out]


@pytest.mark.parametrize("per_node", [0, 1])
def test_a_replicated_tensor_that_differs_fails_the_save_on_every_rank(tmp_path, per_node):
    out = assert_all_ok(run_ranks(perturbed_save, 2, str(tmp_path), str(tmp_path / "ckpt"), True, per_node,
                                  ctx=forkserver_context()))
    assert out[0] == out[1], out  # the same error on every rank
    text, later = out[0]
    assert text.startswith("CommitError: checkpoint 'diverged' was not published"), text
    for key in PERTURBED:
        assert f"'module/{key}' on rank 1" in text, text
    assert "running_mean" not in text and "running_var" not in text, text  # buffers may differ: not compared
    assert "weight' on" in text and text.count("' on rank 1") == len(PERTURBED), text  # nothing else is named
    assert later is None  # the saver goes on: the next save, with identical copies, is published
    assert not (tmp_path / "ckpt" / "diverged").exists()


def test_without_verify_replicated_nothing_is_compared(tmp_path):
    out = assert_all_ok(run_ranks(perturbed_save, 2, str(tmp_path), str(tmp_path / "ckpt"), False,
                                  ctx=forkserver_context()))
    assert out == [[None, None], [None, None]], out


def test_verify_replicated_is_a_boolean_config_key():
    assert asyncckpt.Config().verify_replicated is False
    assert asyncckpt.Config.from_dict({"verify_replicated": True}).verify_replicated is True
    with pytest.raises(asyncckpt.ConfigError, match="verify_replicated"):
        asyncckpt.Config.from_dict({"verify_replicated": "yes"})
