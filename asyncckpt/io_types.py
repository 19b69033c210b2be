"""The vocabulary of asyncckpt in one small module: what flows from the training thread to the writer pool
and back. Reading this file tells the architecture."""
from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass
class StageItem:
    """One thing to copy into a host buffer: a whole tensor, or the byte span of a storage several saved
    tensors share. ``src`` is read on the training thread only, during staging."""

    key: str
    src: torch.Tensor  # the live tensor (or a uint8 view of a shared storage span)
    dtype: torch.dtype
    shape: tuple[int, ...]
    device: str
    global_shape: tuple[int, ...] = ()  # a shard of a sharded tensor: the full shape...
    global_offset: tuple[int, ...] = ()  # ...and where this shard starts in it
    replicated: bool = False  # identical on every rank: written once in total, by the rank it is assigned to

    @property
    def nbytes(self) -> int:
        return self.src.numel() * self.src.element_size()


@dataclass
class ViewItem:
    """A saved tensor that is a view into a shared storage staged as a :class:`StageItem`."""

    key: str
    base: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    byte_offset: int
    device: str
    replicated: bool = False


@dataclass
class FlatState:
    """A nested state split into a JSON skeleton (tensors replaced by references) and the tensors."""

    skeleton: Any
    items: list[StageItem]
    views: list[ViewItem] = field(default_factory=list)
    # keys of replicated tensors (and storages) that another rank writes, recorded where replicated state is
    # split across ranks; the writer refuses a rank index that misses any other key the skeleton references.
    elsewhere: frozenset[str] = frozenset()

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self.items)


@dataclass
class SaveResult:
    """What a save's future resolves to. ``phases`` holds seconds per phase (stage, write, gather,
    publish); ``bytes_written`` is what this rank wrote; ``raw_bytes`` the tensor bytes it staged."""

    tag: str
    path: str | None
    skipped: bool = False
    stall_s: float = 0.0  # what the caller waited: set once ``save`` is about to return (see ``returned``)
    time_to_durable_s: float = 0.0
    raw_bytes: int = 0
    staging_peak_bytes: int = 0  # host staging memory this save held at most (its slot's buffer, or its ring)
    bytes_written: int = 0
    total_bytes_written: int = 0  # all ranks
    phases: dict[str, float] = field(default_factory=dict)
    rank: int = 0
    world_size: int = 1

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class RankOutcome:
    """What one rank reports to the commit coordinator once its files are durable (or failed)."""

    rank: int
    ok: bool
    error: str = ""
    index_name: str = ""
    index_xxh3: str = ""
    bytes_written: int = 0
    node: str = ""
    replicated_fp: str = ""  # digest of the replicated tensors' keys and sizes (must agree across ranks)


@dataclass
class SaveJob:
    """Everything the background needs for one save. Owned by the background once submitted."""

    save_dir: str
    tag: str
    save_latest: bool
    flat: FlatState
    slot: Any  # staging.Slot; None for a placeholder
    ready: Callable[[], None]  # blocks until staged bytes are valid (CUDA event), no-op on CPU
    meta: dict[str, Any]
    t_start: float
    stall_s: float = 0.0
    replicated_fp: str = ""
    reason: str = ""  # a placeholder for a save this rank could not make: "busy" (skip) or the error
    returned: threading.Event = field(default_factory=threading.Event)  # set when ``stall_s`` is final
    seq: int = 0  # this saver's sequence number of the save (compared across ranks at prepare)
    staging_bytes: int = 0  # host staging memory the save holds (SaveResult.staging_peak_bytes)
