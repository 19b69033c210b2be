"""Flatten nested training state into a JSON skeleton plus tensors, and back.

The skeleton is plain JSON. Containers and values JSON cannot express are tagged objects with a
``"__t"`` field::

    {"__t": "tensor", "key": "module/fc.weight"}      a tensor (stored in data files under that key)
    {"__t": "ndarray", "key": ...}                    a numpy array (stored as a tensor)
    {"__t": "dtensor", "key": ..., "global_shape": [..], "placements": [["S", 0]]}   a DTensor
    {"__t": "dict", "items": [[k, v], ...]}           a dict whose keys are not all strings
    {"__t": "odict", "items": [...], "metadata": ..}  an OrderedDict (module state dicts keep _metadata)
    {"__t": "tuple", "items": [...]}                  a tuple
    {"__t": "float", "value": "nan"}                  nan / inf / -inf
    {"__t": "dtype"|"device"|"size"|"bytes"|"npscalar"|"pickle", ...}

Key paths join container keys with ``/`` (escaped as ``~1``; ``~`` as ``~0``), as JSON pointers do.
Tensors that share storage are saved once: identical views become one entry referenced twice, other views of
one storage become views of a single storage record, so that they share again after load.
"""
from __future__ import annotations

import base64
import collections
import math
import pickle
from typing import Any, Callable

import numpy as np
import torch

from .errors import PickleNotAllowedError, UnsafeCheckpointError
from .format import DTYPES, dtype_name
from .io_types import FlatState, StageItem, ViewItem
from .placement import describe_dtensor, is_dtensor

TAG = "__t"


def escape(key: Any) -> str:
    return str(key).replace("~", "~0").replace("/", "~1")


def join(prefix: str, key: Any) -> str:
    return f"{prefix}/{escape(key)}" if prefix else escape(key)


def _device_str(t: torch.Tensor) -> str:
    return str(t.device)


class _Flattener:
    def __init__(self, allow_pickle: bool, replicated: Callable[[str], bool] | None):
        self.allow_pickle = allow_pickle
        self.replicated = replicated
        self.tensors: list[tuple[str, torch.Tensor, bool, tuple, tuple, int | None]] = []
        self.by_identity: dict[tuple, str] = {}

    def tensor(self, t: torch.Tensor, path: str, replicated: bool = False, global_shape: tuple = (),
               global_offset: tuple = ()) -> str:
        if t.is_sparse or t.layout != torch.strided:
            raise TypeError(f"{path}: {t.layout} tensors are not supported; convert to dense first")
        dtype_name(t.dtype)  # raises a clear error for unsupported dtypes
        storage = t.untyped_storage()
        ptr = storage.data_ptr() if storage.nbytes() and t.numel() else None
        if ptr is not None:
            ident = (t.device, ptr, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
            if ident in self.by_identity:
                return self.by_identity[ident]  # the very same view saved twice (tied weights): one entry
            self.by_identity[ident] = path
        self.tensors.append((path, t.detach(), replicated, global_shape, global_offset, ptr))
        return path

    def walk(self, obj: Any, path: str) -> Any:
        if is_dtensor(obj):
            local, info, offset = describe_dtensor(obj, path)
            if info.sharded:
                key = self.tensor(local, path, False, info.global_shape, offset)
            else:
                key = self.tensor(local, path, True)
            return {TAG: "dtensor", "key": key, **info.to_json()}
        if isinstance(obj, torch.Tensor):
            replicated = self.replicated is not None and self.replicated(path)
            return {TAG: "tensor", "key": self.tensor(obj, path, replicated)}
        if obj is None or isinstance(obj, (bool, str)):
            return obj
        if isinstance(obj, int):
            return obj
        if isinstance(obj, float):
            if math.isfinite(obj):
                return obj
            return {TAG: "float", "value": repr(obj)}
        if isinstance(obj, dict):
            if isinstance(obj, collections.OrderedDict) or type(obj) is not dict:
                if type(obj) not in (dict, collections.OrderedDict):
                    return self.opaque(obj, path)
                meta = getattr(obj, "_metadata", None)
                out = {TAG: "odict", "items": [[self.key(k, path), self.walk(v, join(path, k))] for k, v in obj.items()]}
                if meta is not None:
                    out["metadata"] = self.walk(meta, join(path, "_metadata"))
                return out
            if all(isinstance(k, str) for k in obj) and TAG not in obj:
                return {k: self.walk(v, join(path, k)) for k, v in obj.items()}
            return {TAG: "dict", "items": [[self.key(k, path), self.walk(v, join(path, k))] for k, v in obj.items()]}
        if isinstance(obj, list) and type(obj) is list:
            return [self.walk(v, join(path, i)) for i, v in enumerate(obj)]
        if type(obj) is tuple:
            return {TAG: "tuple", "items": [self.walk(v, join(path, i)) for i, v in enumerate(obj)]}
        if isinstance(obj, torch.dtype):
            return {TAG: "dtype", "value": dtype_name(obj)}
        if isinstance(obj, torch.device):
            return {TAG: "device", "value": str(obj)}
        if isinstance(obj, torch.Size):
            return {TAG: "size", "value": list(obj)}
        if isinstance(obj, (bytes, bytearray)):
            return {TAG: "bytes", "value": base64.b64encode(bytes(obj)).decode()}
        if isinstance(obj, np.ndarray) and obj.dtype.kind in "biufc" and obj.dtype.byteorder in "=|<":
            t = torch.from_numpy(np.ascontiguousarray(obj))
            return {TAG: "ndarray", "key": self.tensor(t, path), "shape": list(obj.shape)}
        if isinstance(obj, np.generic) and obj.dtype.kind in "biufc":
            return {TAG: "npscalar", "dtype": obj.dtype.str, "value": base64.b64encode(obj.tobytes()).decode()}
        return self.opaque(obj, path)

    def key(self, k: Any, path: str) -> Any:
        if isinstance(k, (str, int, bool)) or k is None:
            return k
        if isinstance(k, float) and math.isfinite(k):
            return k
        return self.walk(k, join(path, repr(k)))

    def opaque(self, obj: Any, path: str) -> Any:
        if not self.allow_pickle:
            raise PickleNotAllowedError(
                f"cannot save {type(obj).__module__}.{type(obj).__qualname__} at key path {path or '<root>'!r}: "
                "it is not JSON-representable; convert it, or pass allow_pickle=True at save and load")
        return {TAG: "pickle", "value": base64.b64encode(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)).decode()}


def flatten(state: Any, *, allow_pickle: bool = False, replicated: Callable[[str], bool] | None = None) -> FlatState:
    """Split ``state`` into a JSON skeleton and stage items (tensors, or spans of storages they share).

    ``replicated(key_path)`` says which plain tensors are identical on every rank (DDP state): those are
    written once in total. DTensors carry their own layout."""
    f = _Flattener(allow_pickle, replicated)
    skeleton = f.walk(state, "")
    items, views = _group_storages(f.tensors)
    return FlatState(skeleton, items, views)


def _group_storages(tensors: list[tuple]) -> tuple[list[StageItem], list[ViewItem]]:
    groups: dict[tuple, list[tuple]] = {}
    order: list[tuple] = []
    for entry in tensors:
        key, t, _, gshape, _, ptr = entry
        gid = (t.device, ptr) if ptr is not None and not gshape else ("solo", key)
        if gid not in groups:
            groups[gid] = []
            order.append(gid)
        groups[gid].append(entry)
    items: list[StageItem] = []
    views: list[ViewItem] = []
    for gid in order:
        members = groups[gid]
        if len(members) == 1:
            key, t, rep, gshape, goff, _ = members[0]
            items.append(StageItem(key, t, t.dtype, tuple(t.shape), _device_str(t), gshape, goff, rep))
            continue
        # several different views of one storage: stage the byte span they cover once
        spans = [(_byte_span(t), key, t) for key, t, *_ in members]
        rep = all(m[2] for m in members)
        lo = min(s[0][0] for s in spans)
        lo -= lo % max(t.element_size() for _, _, t in spans)  # every view's offset from lo stays dtype-aligned
        hi = max(s[0][1] for s in spans)
        base_key = f"#storage/{spans[0][1]}"  # named after its first view: stable across ranks
        storage = members[0][1].untyped_storage()
        span = torch.empty(0, dtype=torch.uint8, device=members[0][1].device).set_(storage, lo, (hi - lo,), (1,))
        items.append(StageItem(base_key, span, torch.uint8, (hi - lo,), _device_str(span), replicated=rep))
        for (start, _), key, t in spans:
            views.append(ViewItem(key, base_key, t.dtype, tuple(t.shape), tuple(t.stride()),
                                  t.storage_offset() * t.element_size() - lo, _device_str(t), rep))
    return items, views


def _byte_span(t: torch.Tensor) -> tuple[int, int]:
    item = t.element_size()
    start = t.storage_offset() * item
    if t.numel() == 0:
        return start, start
    last = sum((s - 1) * st for s, st in zip(t.shape, t.stride()) if s > 0)
    return start, start + (last + 1) * item


# ----------------------------------------------------------------------------------------- unflatten
def unflatten(skeleton: Any, tensors: dict[str, torch.Tensor], *, allow_pickle: bool = False, where: str = "") -> Any:
    """Rebuild the nested state from a skeleton and loaded tensors. Never executes code unless a pickled
    entry is met *and* ``allow_pickle`` is on."""

    def build(node: Any, path: str) -> Any:
        if isinstance(node, list):
            return [build(v, join(path, i)) for i, v in enumerate(node)]
        if not isinstance(node, dict):
            return node
        kind = node.get(TAG)
        if kind is None:
            return {k: build(v, join(path, k)) for k, v in node.items()}
        try:
            if kind in ("tensor", "dtensor"):
                return tensors[node["key"]]
            if kind == "ndarray":
                t = tensors[node["key"]]
                return t.cpu().numpy().reshape(node["shape"])
            if kind in ("dict", "odict"):
                cls = dict if kind == "dict" else collections.OrderedDict
                out = cls((build_key(k, path), build(v, join(path, k))) for k, v in node["items"])
                if kind == "odict" and "metadata" in node:
                    out._metadata = build(node["metadata"], join(path, "_metadata"))
                return out
            if kind == "tuple":
                return tuple(build(v, join(path, i)) for i, v in enumerate(node["items"]))
            if kind == "float":
                value = node["value"]
                if value not in ("nan", "inf", "-inf"):
                    raise ValueError(value)
                return float(value)
            if kind == "dtype":
                return DTYPES[node["value"]]
            if kind == "device":
                return torch.device(node["value"])
            if kind == "size":
                return torch.Size(int(x) for x in node["value"])
            if kind == "bytes":
                return base64.b64decode(node["value"], validate=True)
            if kind == "npscalar":
                dt = np.dtype(node["dtype"])
                if dt.kind not in "biufc":
                    raise ValueError(dt)
                return np.frombuffer(base64.b64decode(node["value"], validate=True), dtype=dt)[0]
            if kind == "pickle":
                if not allow_pickle:
                    raise UnsafeCheckpointError(
                        f"{where}: key path {path or '<root>'!r} holds a pickled Python object; refusing to "
                        "unpickle it (pickle can run arbitrary code). Pass allow_pickle=True only for checkpoints you trust")
                return pickle.loads(base64.b64decode(node["value"], validate=True))
        except UnsafeCheckpointError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, OverflowError, RuntimeError) as exc:  # e.g. a bad device string
            raise UnsafeCheckpointError(f"{where}: malformed skeleton node at key path {path or '<root>'!r}: {exc!r}") from None
        raise UnsafeCheckpointError(f"{where}: unknown skeleton node type {kind!r} at key path {path or '<root>'!r}")

    def build_key(k: Any, path: str) -> Any:
        if isinstance(k, (dict, list)):
            return build(k, path)
        return k

    try:
        return build(skeleton, "")
    except RecursionError:  # a forged skeleton nested deeper than Python's stack
        raise UnsafeCheckpointError(f"{where}: the skeleton is nested too deeply") from None


def skeleton_tensor_refs(skeleton: Any) -> dict[str, dict]:
    """Every tensor node a skeleton references, by key (used to load only what a rank needs)."""
    out: dict[str, dict] = {}

    def visit(node: Any) -> None:
        if isinstance(node, list):
            for v in node:
                visit(v)
        elif isinstance(node, dict):
            if node.get(TAG) in ("tensor", "ndarray", "dtensor") and isinstance(node.get("key"), str):
                out[node["key"]] = node
            else:
                for v in node.values():
                    visit(v)

    try:
        visit(skeleton)
    except RecursionError:  # a forged skeleton nested deeper than Python's stack
        raise UnsafeCheckpointError("the skeleton is nested too deeply") from None
    return out
