"""The saver's collectives, rooted at rank 0: gather to the root, broadcast or scatter from it.

The commit coordinator exchanges everything through these, so that what one rank receives per save does not
grow with the world size: the root receives one small record per rank, every other rank a few small
verdicts. There is no all-gather on the save path (it would hand every rank every rank's record, O(N) per
rank and O(N^2) in all, in a ring of N steps). :class:`GlooCollectives` runs them over the saver's dedicated
gloo group; tests pass an in-process fake with the same methods (tests/fake_collectives.py).

Each rank's object travels pickled; the transport cost per call, which the fake counts the same way:

* :meth:`gather`: a gather of 8-byte sizes, a broadcast of the largest (8 bytes), a gather of payloads
  padded to it. A rank other than the root receives 8 bytes; the root N payloads.
* :meth:`broadcast`: the size, then the payload (``broadcast_object_list``): every rank receives it.
* :meth:`scatter`: the largest size, the payloads padded to it, the sizes (``scatter_object_list``): every
  rank receives 16 bytes and one padded payload.
"""
from __future__ import annotations

import pickle
from typing import Any, Protocol

import torch
import torch.distributed as dist

ROOT = 0  # the rank that gathers, decides and broadcasts (the saver's group spans every rank)


class Collectives(Protocol):
    rank: int
    world_size: int

    def gather(self, obj: Any) -> list | None:
        """Every rank's ``obj`` in rank order on the root, None elsewhere."""

    def broadcast(self, obj: Any) -> Any:
        """The root's ``obj`` on every rank (the other ranks pass None)."""

    def scatter(self, objs: list | None) -> Any:
        """``objs[r]`` on rank r (the root passes one object per rank, the others None)."""

    def all_gather(self, obj: Any) -> list:
        """Every rank's ``obj`` on every rank (O(N) per rank: not for the save path)."""

    def close(self) -> None:
        """Give the transport up."""


class GlooCollectives:
    """:class:`Collectives` over a gloo process group spanning the whole job (its rank r is global rank r)."""

    def __init__(self, group: Any, rank: int, world_size: int):
        self.group = group
        self.rank = rank
        self.world_size = world_size

    def gather(self, obj: Any) -> list | None:
        root = self.rank == ROOT
        payload = pickle.dumps(obj)
        size = torch.tensor([len(payload)], dtype=torch.int64)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)] if root else None
        dist.gather(size, sizes, group=self.group, group_dst=ROOT)
        cap = torch.tensor([max(int(s) for s in sizes) if root else 0], dtype=torch.int64)
        dist.broadcast(cap, group=self.group, group_src=ROOT)
        buf = torch.zeros(int(cap), dtype=torch.uint8)
        buf[:len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        bufs = [torch.empty(int(cap), dtype=torch.uint8) for _ in range(self.world_size)] if root else None
        dist.gather(buf, bufs, group=self.group, group_dst=ROOT)
        if not root:
            return None
        return [pickle.loads(b[:int(s)].numpy().tobytes()) for b, s in zip(bufs, sizes)]

    def broadcast(self, obj: Any) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, group=self.group, group_src=ROOT)
        return box[0]

    def scatter(self, objs: list | None) -> Any:
        box: list = [None]
        dist.scatter_object_list(box, objs if self.rank == ROOT else None, group=self.group, group_src=ROOT)
        return box[0]

    def all_gather(self, obj: Any) -> list:
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def close(self) -> None:
        try:
            dist.destroy_process_group(self.group)
        except Exception:  # the default group may already be gone at interpreter exit
            pass


def standalone_gloo_group(store: Any, rank: int, world_size: int, timeout_s: float) -> Any:
    """A gloo process group of ``world_size`` members over ``store`` (rank ``rank``), in a process that has no
    default group: what :class:`GlooCollectives` runs on for processes outside the job's own group (the
    nodes' writer services, asyncckpt/service/link.py). Built as ``init_process_group`` builds its groups, a
    process group with its gloo backend registered for CPU tensors (torch offers no public call for a group
    without a default one)."""
    import datetime

    timeout = datetime.timedelta(seconds=timeout_s)
    backend = dist.ProcessGroupGloo(store, rank, world_size, timeout)
    group = dist.ProcessGroup(store, rank, world_size)
    group._set_default_backend(dist.ProcessGroup.BackendType.GLOO)
    group._register_backend(torch.device("cpu"), dist.ProcessGroup.BackendType.GLOO, backend)
    return group
