"""Run on every rank by tests/test_error_rule.py (importable by the spawned ranks): one storage fault per
save, injected on one rank through a faulty storage wrapper (asyncckpt.storage.faults), and the error every
rank raises for it."""
from __future__ import annotations

import errno
import os

import torch

import asyncckpt
from storage_faults import injected
from trainer import mlp, train

CFG = {"commit_timeout_s": 30, "writer": {"threads_per_node": 2, "fsync": False}, "codec": {"chunk_mib": 1 / 64}}

# fault -> (storage operation, path substring, the rank at fault: "last" is the last rank, 0 the publisher)
FAULTS = {
    "data file write": ("write", ".bin", "last"),
    "rank index write": ("write_durable", ".json", "last"),
    "partial directory": ("makedirs", ".partial", 0),
    "manifest write": ("write_durable", "manifest.json", 0),
    "latest replace": ("replace_atomic", "latest", 0),
}


def at_fault(world: int, which) -> int:
    return world - 1 if which == "last" else which


def one_fault_per_save(rank: int, world: int, save_dir: str) -> dict:
    """Save "good", then one save per fault of FAULTS (the fault on its rank only); per fault, what this rank
    raised: class names, errno of the cause, failures, text; and whether ``latest`` still names "good"."""
    model = mlp(0, (16, 32, 8))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    out: dict = {}
    with asyncckpt.AsyncCheckpointer(model, opt, config=CFG) as saver:
        train(model, opt, 1, seed=0)
        saver.save_checkpoint(save_dir, tag="good").result(60)
        for n, (name, (op, match, which)) in enumerate(FAULTS.items()):
            tag = f"bad{n}"
            with injected() as faults:
                if rank == at_fault(world, which):
                    faults.fail(op, match, OSError(errno.ENOSPC, f"No space left on device (injected: {name})"))
                err = saver.save_checkpoint(save_dir, tag=tag).exception(60)
            out[name] = {
                "tag": tag, "mro": [c.__name__ for c in type(err).__mro__] if err else None, "text": str(err),
                "cause_errno": getattr(err.__cause__, "errno", None) if err else None,
                "failures": getattr(err, "failures", None),
                "latest": open(os.path.join(save_dir, "latest")).read().strip(),
                "published": os.path.exists(os.path.join(save_dir, tag)),
            }
    return out

