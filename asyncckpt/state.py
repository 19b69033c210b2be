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

A tensor's key is its key path: one part per container on the way to it, joined with ``/``. Distinct
positions always get distinct key paths (see :func:`key_part`); records of shared storages are named
``~s/<key of the first view>``, a namespace no key path can enter. Loading reads every key from the
skeleton node (``node["key"]``) and never derives it from the path, so any naming a checkpoint used loads.
Tensors that share storage are saved once: identical views become one entry referenced twice, other views of
one storage become views of a single storage record, so that they share again after load. Tensors with a lazy
conjugate or negative bit are saved as their resolved values, in a storage of their own.
"""
from __future__ import annotations

import base64
import collections
import math
import pickle
import sys
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from .errors import KeyCollisionError, PickleNotAllowedError, UnsafeCheckpointError, UnsupportedStateError
from .format import DTYPES, dtype_name
from .io_types import FlatState, StageItem, ViewItem
from .placement import describe_dtensor, is_dtensor

TAG = "__t"
MAX_DEPTH = 256  # containers (dict, OrderedDict, list, tuple, key objects) nested in a state, at save and at load
MAX_INT_DIGITS = 4300  # CPython's default limit for int <-> decimal text; JSON stores ints as decimal text
STORAGE_PREFIX = "~s/"  # shared-storage records: "~s" is never a key-path part
METADATA_PART = "~m"  # an OrderedDict's _metadata attribute
_INT_BOUND = 10 ** MAX_INT_DIGITS
_LONG_DOUBLES = (np.longdouble, np.clongdouble)  # their bytes mean different things on different platforms


def escape(key: str) -> str:
    """A string key as a key-path part: ``~`` -> ``~0``, ``/`` -> ``~1`` (as JSON pointers do); ``""`` -> ``~e``."""
    return key.replace("~", "~0").replace("/", "~1") if key else "~e"


def key_part(key: Any, index: int) -> str:
    """The key-path part of the ``index``-th entry of a dict. Injective within one dict: an escaped string
    never holds ``~`` followed by anything but ``0``/``1``; every other key gets ``~`` and a type letter."""
    kind = type(key)
    if kind is str:
        return escape(key)
    if kind is bool:
        return "~b1" if key else "~b0"
    if kind is int:
        return f"~i{key}"
    if key is None:
        return "~n"
    if kind is float and key == key:  # repr tells every float apart (-0.0, inf); NaN keys need their index
        return f"~f{key!r}"
    return f"~k{index}"  # any other key object (tuple, tensor, dtype, enum, NaN, subclasses): its position


def join(prefix: str, part: str) -> str:
    return f"{prefix}/{part}" if prefix else part


def _readable(trail: Any) -> str:
    """A trail of keys (``(parent_trail, step)`` pairs) as Python subscripts: ``['m'][1]``."""
    steps = []
    while trail is not None:
        trail, step = trail
        steps.append(step.text if isinstance(step, _Step) else f"[{step!r}]")
    return "".join(reversed(steps)) or "<root>"


class _Step:
    """A trail step that is not a subscript (an OrderedDict's ``_metadata``, a dict key object)."""

    def __init__(self, text: str):
        self.text = text


def _device_str(t: torch.Tensor) -> str:
    return str(t.device)


def _where(path: str) -> str:
    return f"key path {path or '<root>'!r}"


def _int_digits() -> int:
    """The most decimal digits an int may have: MAX_INT_DIGITS, or less if this interpreter allows less."""
    limit = sys.get_int_max_str_digits() if hasattr(sys, "get_int_max_str_digits") else 0
    return min(limit, MAX_INT_DIGITS) if limit else MAX_INT_DIGITS


class _Flattener:
    """Walks a state into a skeleton and a list of the tensors met (:class:`_Leaf`); the storage analysis
    (which tensors share bytes, what to stage) is :func:`_analyse`, run only when the tensors' structure
    changed since the cached one (:class:`FlattenCache`)."""

    def __init__(self, allow_pickle: bool, replicated: Callable[[str], bool] | None):
        self.allow_pickle = allow_pickle
        self.replicated = replicated
        self.int_digits = _int_digits()
        self.int_bound = _INT_BOUND if self.int_digits == MAX_INT_DIGITS else 10 ** self.int_digits
        self.leaves: list[_Leaf] = []
        self.arrays: dict[int, tuple[np.ndarray, dict]] = {}  # id -> (the array, kept alive; its node)

    def tensor(self, t: torch.Tensor, path: str, trail: Any, node: dict, replicated: bool = False,
               global_shape: tuple = (), global_offset: tuple = ()) -> dict:
        """Record ``t`` for ``node`` (whose ``key`` the analysis fills in) and return the node."""
        device = t.device
        if t.layout is not torch.strided or t.is_nested or t.dtype not in _SAVABLE or device.type == "meta":
            _refuse(t, path)
        if t.requires_grad:
            t = t.detach()
        src = t
        if t.is_conj() or t.is_neg():  # the bytes hold the unconjugated / unnegated values: save what it reads as
            src = t.resolve_conj().resolve_neg()  # a fresh storage of its own, copied now
        self.leaves.append(_Leaf(path, t, src, device, trail, node, replicated, global_shape, global_offset))
        return node

    def walk(self, obj: Any, path: str, trail: Any, depth: int) -> Any:
        """The skeleton node of ``obj``, ``depth`` containers deep (the root is at depth 1)."""
        kind = type(obj)
        if kind is torch.Tensor or kind is torch.nn.Parameter:  # the common case first (never a DTensor)
            replicated = self.replicated is not None and self.replicated(path)
            return self.tensor(obj, path, trail, {TAG: "tensor", "key": path}, replicated)
        if kind is str or obj is None or kind is bool:
            return obj
        if kind is float and math.isfinite(obj):
            return obj
        if is_dtensor(obj):
            try:
                local, info, offset = describe_dtensor(obj, path)
            except TypeError as exc:
                raise UnsupportedStateError(str(exc)) from None
            node = {TAG: "dtensor", "key": path, **info.to_json()}
            if info.sharded:
                return self.tensor(local, path, trail, node, False, info.global_shape, offset)
            return self.tensor(local, path, trail, node, True)
        if isinstance(obj, torch.Tensor):
            replicated = self.replicated is not None and self.replicated(path)
            return self.tensor(obj, path, trail, {TAG: "tensor", "key": path}, replicated)
        if isinstance(obj, np.generic) and obj.dtype.kind in "biufc":  # before float: np.float64 is a float
            if isinstance(obj, _LONG_DOUBLES):
                raise UnsupportedStateError(f"cannot save the {obj.dtype} scalar at {_where(path)}: its bytes are "
                                            "platform-specific; convert it to float64 / complex128")
            return {TAG: "npscalar", "dtype": obj.dtype.str, "value": base64.b64encode(obj.tobytes()).decode()}
        if isinstance(obj, (bool, str)):
            return obj
        if isinstance(obj, int):
            return self.integer(obj, path)
        if isinstance(obj, float):
            if math.isfinite(obj):
                return obj
            return {TAG: "float", "value": repr(float(obj))}
        if isinstance(obj, (dict, list, tuple)) and depth > MAX_DEPTH:
            raise UnsupportedStateError(f"the state is nested deeper than MAX_DEPTH ({MAX_DEPTH}) containers at "
                                        f"{_where(path)} ({_readable(trail)})")
        if isinstance(obj, dict):
            if type(obj) is collections.OrderedDict:
                out = {TAG: "odict", "items": self.items(obj, path, trail, depth)}
                meta = getattr(obj, "_metadata", None)
                if meta is not None:
                    meta_trail = (trail, _Step("._metadata"))
                    out["metadata"] = self.walk(meta, join(path, METADATA_PART), meta_trail, depth + 1)
                return out
            if type(obj) is not dict:
                return self.opaque(obj, path)
            if TAG not in obj and all(type(k) is str for k in obj):
                out = {}
                for k, v in obj.items():
                    out[k] = self.walk(v, join(path, escape(k)), (trail, k), depth + 1)
                return out
            return {TAG: "dict", "items": self.items(obj, path, trail, depth)}
        if type(obj) is list or type(obj) is tuple:
            items = []
            for i, v in enumerate(obj):
                items.append(self.walk(v, join(path, str(i)), (trail, i), depth + 1))
            return items if type(obj) is list else {TAG: "tuple", "items": items}
        if isinstance(obj, torch.dtype):
            return {TAG: "dtype", "value": dtype_name(obj)}
        if isinstance(obj, torch.device):
            return {TAG: "device", "value": str(obj)}
        if isinstance(obj, torch.Size):
            return {TAG: "size", "value": list(obj)}
        if isinstance(obj, (bytes, bytearray)):
            return {TAG: "bytes", "value": base64.b64encode(bytes(obj)).decode()}
        if type(obj) is np.ndarray:
            return self.ndarray(obj, path, trail)
        return self.opaque(obj, path)

    def items(self, obj: dict, path: str, trail: Any, depth: int) -> list:
        out = []
        for i, (k, v) in enumerate(obj.items()):
            node = self.key(k, i, path, trail, depth)  # first: it refuses ints too long for key_part
            out.append([node, self.walk(v, join(path, key_part(k, i)), (trail, k), depth + 1)])
        return out

    def key(self, k: Any, index: int, path: str, trail: Any, depth: int) -> Any:
        """A dict key as JSON: itself if JSON gives it back as the same type and value, else a node."""
        kind = type(k)
        if kind is str or kind is bool or k is None or (kind is float and math.isfinite(k)):
            return k
        if kind is int:
            return self.integer(k, path)
        kpath = join(path, f"~K{index}")  # the key object itself (it may hold tensors)
        node = self.walk(k, kpath, (trail, _Step(f".keys()[{index}]")), depth + 1)
        if not (isinstance(node, dict) and TAG in node):  # a str/int/float subclass (an enum...) would load as
            return self.opaque(k, kpath)  # its base type: keep its type, or refuse
        return node

    def integer(self, n: int, path: str) -> int:
        if -self.int_bound < n < self.int_bound:
            return n
        raise UnsupportedStateError(f"cannot save the int at {_where(path)}: it has more than "
                                    f"{self.int_digits} decimal digits (JSON stores ints as decimal "
                                    "text and Python refuses to read longer ones); store it as bytes")

    def ndarray(self, a: np.ndarray, path: str, trail: Any) -> Any:
        seen = self.arrays.get(id(a))
        if seen is not None:  # the same array object saved twice: one entry (the node's key is filled later)
            node = {TAG: "ndarray", "key": seen[1]["key"], "shape": list(a.shape)}
            seen[1].setdefault("~aliases", []).append(node)
            return node
        if a.dtype.type in _LONG_DOUBLES:
            raise UnsupportedStateError(f"cannot save the {a.dtype} array at {_where(path)}: its bytes are "
                                        "platform-specific; convert it to float64 / complex128")
        if a.dtype.kind not in "biufc" or a.dtype.byteorder not in "=|<":
            return self.opaque(a, path)
        # a copy of its own: arrays viewing one buffer would otherwise share memory torch does not see as shared
        t = torch.from_numpy(np.array(a, copy=True, order="C"))
        node = self.tensor(t, path, trail, {TAG: "ndarray", "key": path, "shape": list(a.shape)})
        self.arrays[id(a)] = (a, node)
        return node

    def opaque(self, obj: Any, path: str) -> Any:
        name = f"{type(obj).__module__}.{type(obj).__qualname__}"
        if not self.allow_pickle:
            raise PickleNotAllowedError(
                f"cannot save {name} at {_where(path)}: it is not JSON-representable; convert it, or pass "
                "allow_pickle=True at save and load")
        try:
            data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # noqa: BLE001 - pickling runs arbitrary __reduce__ code
            raise UnsupportedStateError(f"cannot save {name} at {_where(path)}: it cannot be pickled "
                                        f"({type(exc).__name__}: {exc})") from None
        return {TAG: "pickle", "value": base64.b64encode(data).decode()}


_SAVABLE = frozenset(DTYPES.values())


def _refuse(t: torch.Tensor, path: str) -> None:
    if t.is_nested:
        raise UnsupportedStateError(f"cannot save the nested tensor at {_where(path)}: nested tensors are not "
                                    "supported; save its components (t.unbind()) instead")
    if t.layout != torch.strided:
        raise UnsupportedStateError(f"cannot save the {t.layout} tensor at {_where(path)}: only dense (strided) "
                                    "tensors are supported; convert to dense first")
    if t.device.type == "meta":
        raise UnsupportedStateError(f"cannot save the meta tensor at {_where(path)}: it has no data; "
                                    "materialize it (to_empty() and initialize) first")
    try:
        dtype_name(t.dtype)
    except TypeError as exc:
        raise UnsupportedStateError(f"cannot save the tensor at {_where(path)}: {exc}") from None
    raise UnsupportedStateError(f"cannot save the {t.dtype} tensor at {_where(path)}")  # pragma: no cover


class _Leaf:
    """A tensor met by the walk: its key path, the tensor, what to stage for it (itself, or the resolved copy
    of a lazily conjugated or negated one), how it was reached and the node that names it."""

    __slots__ = ("path", "t", "src", "device", "trail", "node", "replicated", "global_shape", "global_offset")

    def __init__(self, path, t, src, device, trail, node, replicated, global_shape, global_offset):
        self.path, self.t, self.src, self.device, self.trail, self.node = path, t, src, device, trail, node
        self.replicated, self.global_shape, self.global_offset = replicated, global_shape, global_offset


@dataclass(frozen=True)
class _Plan:
    """The storage analysis of one structure of tensors: the key each leaf's node names, what is staged
    (``("solo", leaf, dtype, shape, device)`` or ``("span", members, lo, hi, base_key, replicated)``) and the
    views of shared spans."""

    fingerprint: tuple
    keys: tuple[str, ...]
    staged: tuple[tuple, ...]
    views: tuple[ViewItem, ...]


class FlattenCache:
    """What the last flatten found, reused by the next one while the state keeps its structure.

    * **Plan**: the storage analysis is reused while the tensors' structure (key paths, dtypes, shapes,
      strides, storage offsets, devices, placements and which tensors share a storage) is the same.
    * **Replay** (:meth:`replay`): the skeleton of the last flatten is the template of the next. A state whose
      containers have the same types and keys (in the same order), whose tensors sit where tensors sat and
      have the plan's structure, is matched against it without building key paths or nodes: unchanged
      subtrees of the skeleton are shared, scalars that changed (a step count, an RNG state) get nodes of
      their own. Anything else (another container type or key, a tensor subclass, a DTensor, an object that
      is pickled, a lazily conjugated tensor...) is a miss of the replay, and the full walk runs. The
      ``replicated`` callable must be the same object as for the last flatten (and depend on the key path
      alone).

    ``hits`` and ``misses`` count how often the plan was reused and rebuilt; ``replays`` how many hits skipped
    the walk. The cache holds no tensor."""

    def __init__(self) -> None:
        self._plan: _Plan | None = None
        self._template: Any = None  # the skeleton of the last flatten (never changed once handed out)
        self._replicated: Callable[[str], bool] | None = None  # what said which of its tensors are replicated
        self.hits = 0
        self.misses = 0
        self.replays = 0

    def plan(self, leaves: list[_Leaf]) -> _Plan:
        fp = _fingerprint(leaves)
        if self._plan is not None and self._plan.fingerprint == fp:
            self.hits += 1
            return self._plan
        self.misses += 1
        self._plan = _analyse(leaves, fp)
        return self._plan

    def remember(self, skeleton: Any, leaves: list[_Leaf], replicated: Callable[[str], bool] | None) -> None:
        """Keep ``skeleton`` (complete: every key filled in) as the template of the next :meth:`replay`; a
        state with DTensors or lazily conjugated / negated tensors is never replayed."""
        replayable = all(not leaf.global_shape and leaf.src is leaf.t and type(leaf.node) is dict
                         and leaf.node[TAG] in ("tensor", "ndarray") for leaf in leaves)
        self._template = skeleton if replayable else None
        self._replicated = replicated

    def replay(self, state: Any, replicated: Callable[[str], bool] | None) -> tuple[Any, list, _Plan] | None:
        """``(skeleton, tensors, plan)`` of ``state`` matched against the last skeleton and plan, or None (a
        miss) if its structure or its tensors' structure differ, or if a value met needs the full walk."""
        plan, template = self._plan, self._template
        if plan is None or template is None or replicated is not self._replicated:
            return None
        matcher = _Replay(plan.fingerprint)
        try:
            skeleton = matcher.match(state, template)
        except _Miss:
            return None
        if len(matcher.tensors) != len(plan.fingerprint):
            return None
        self.hits += 1
        self.replays += 1
        self._template = skeleton
        return skeleton, matcher.tensors, plan


class _Miss(Exception):
    """The state does not match the template: flatten it with the full walk."""


_WHOLE = (frozenset({int}), frozenset({str}))  # sequences matched as a whole, in C


class _Replay:
    """Matches a state against the skeleton of a previous flatten (:meth:`FlattenCache.replay`). Returns for
    every object the node :meth:`_Flattener.walk` would build for it (the template's own node where nothing
    changed) and collects the tensors in the walk's order, each checked against the fingerprint entry of its
    position; raises :class:`_Miss` where it cannot tell."""

    def __init__(self, fingerprint: tuple):
        self.fingerprint = fingerprint
        self.tensors: list[torch.Tensor] = []
        self.storages: dict[tuple, int] = {}
        self.arrays: set[int] = set()
        self.int_bound = 0

    def match(self, obj: Any, node: Any) -> Any:
        kind = type(obj)
        if kind is torch.Tensor or kind is torch.nn.Parameter:
            if type(node) is not dict or node.get(TAG) != "tensor":
                raise _Miss
            return self.tensor(obj, node)
        if kind is str or obj is None or kind is bool:
            return obj
        if kind is float:
            return obj if math.isfinite(obj) else {TAG: "float", "value": repr(obj)}
        if kind is int:
            self.check_ints(obj, obj)
            return obj
        if type(node) is list:
            if kind is not list or len(obj) != len(node):
                raise _Miss
            return self.sequence(obj, node)
        if type(node) is not dict:
            raise _Miss
        tag = node.get(TAG)
        if tag is None:  # a dict with string keys
            if kind is not dict or len(obj) != len(node):
                raise _Miss
            out = node
            for (k, v), (nk, nv) in zip(obj.items(), node.items()):
                if type(k) is not str or k != nk:
                    raise _Miss
                new = self.match(v, nv)
                if new is not nv:
                    if out is node:
                        out = dict(node)
                    out[k] = new
            return out
        if tag == "tuple":
            items = node["items"]
            if kind is not tuple or len(obj) != len(items):
                raise _Miss
            new = self.sequence(obj, items)
            return node if new is items else {TAG: "tuple", "items": new}
        if tag == "dict" or tag == "odict":
            if kind is not (dict if tag == "dict" else collections.OrderedDict):
                raise _Miss
            items = self.pairs(obj, node["items"])
            meta = getattr(obj, "_metadata", None) if tag == "odict" else None
            if (meta is None) != ("metadata" not in node):
                raise _Miss
            new_meta = self.match(meta, node["metadata"]) if meta is not None else None
            if items is node["items"] and new_meta is node.get("metadata"):
                return node
            out = {TAG: tag, "items": items}
            if meta is not None:
                out["metadata"] = new_meta
            return out
        if tag == "ndarray":
            if kind is not np.ndarray or id(obj) in self.arrays:
                raise _Miss  # (one array object twice: the full walk saves it once)
            dt = obj.dtype
            if dt.type in _LONG_DOUBLES or dt.kind not in "biufc" or dt.byteorder not in "=|<":
                raise _Miss
            self.arrays.add(id(obj))
            # a copy of its own, as the walk makes; another shape misses (the node names the shape)
            return self.tensor(torch.from_numpy(np.array(obj, copy=True, order="C")), node)
        raise _Miss

    def check_ints(self, low: int, high: int) -> None:
        if not self.int_bound:
            digits = _int_digits()
            self.int_bound = _INT_BOUND if digits == MAX_INT_DIGITS else 10 ** digits
        if not -self.int_bound < low <= high < self.int_bound:
            raise _Miss  # the full walk names the int at fault

    def sequence(self, obj: Any, nodes: list) -> list:
        kinds = frozenset(map(type, obj))
        if kinds in _WHOLE:  # all ints or all strings (an RNG state, parameter indices): their own nodes
            if int in kinds:
                self.check_ints(min(obj), max(obj))
            new = list(obj)
            return nodes if new == nodes and frozenset(map(type, nodes)) == kinds else new
        out = nodes
        for i, (v, nv) in enumerate(zip(obj, nodes)):
            new = self.match(v, nv)
            if new is not nv:
                if out is nodes:
                    out = list(nodes)
                out[i] = new
        return out

    def pairs(self, obj: dict, items: list) -> list:
        """The ``items`` of a tagged dict node: the keys must be the template's (of the same types)."""
        if len(obj) != len(items):
            raise _Miss
        out = items
        for i, ((k, v), pair) in enumerate(zip(obj.items(), items)):
            nk = pair[0]
            kind = type(k)
            if kind is not type(nk) or not (kind is str or kind is int or kind is bool or k is None
                                            or kind is float) or k != nk or (kind is float and repr(k) != repr(nk)):
                raise _Miss  # a key object (its node is a tagged one), or another key
            new = self.match(v, pair[1])
            if new is not pair[1]:
                if out is items:
                    out = list(items)
                out[i] = [nk, new]
        return out

    def tensor(self, t: torch.Tensor, node: dict) -> dict:
        n = len(self.tensors)
        if n >= len(self.fingerprint) or t.layout is not torch.strided or t.is_nested or t.is_conj() or t.is_neg():
            raise _Miss
        if t.requires_grad:
            t = t.detach()
        entry = self.fingerprint[n]  # the key path and placement are the position's: only the tensor may differ
        if _entry(n, entry[0], t, t.device, False, entry[8], (), (), self.storages) != entry:
            raise _Miss
        self.tensors.append(t)
        return node


def _fingerprint(leaves: list[_Leaf]) -> tuple:
    """Everything the storage analysis depends on, per leaf (:func:`_entry`)."""
    storages: dict[tuple, int] = {}
    out = []
    for n, leaf in enumerate(leaves):
        t = leaf.t
        resolved = leaf.src is not t and (t.is_conj(), t.is_neg())
        out.append(_entry(n, leaf.path, t, leaf.device, resolved, leaf.replicated, leaf.global_shape,
                          leaf.global_offset, storages))
    return tuple(out)


def _entry(n: int, path: str, t: torch.Tensor, device: torch.device, resolved: Any, replicated: bool,
           global_shape: tuple, global_offset: tuple, storages: dict[tuple, int]) -> tuple:
    """The fingerprint entry of the ``n``-th tensor ``t``. Storages are numbered by first use (``storages``),
    so a state whose tensors are new objects with the same structure (RNG states, numpy arrays) fingerprints
    the same. ``resolved``: False, or the lazy conjugate and negative bits of a tensor saved resolved."""
    offset = t.storage_offset()
    if t.numel():
        sid = storages.setdefault((device, t.data_ptr() - offset * t.element_size()), n)
    else:
        sid = -1 - n  # no bytes: never grouped
    return (path, t.dtype, t.shape, t.stride(), offset, device, sid, resolved, replicated, global_shape,
            global_offset)


def _analyse(leaves: list[_Leaf], fp: tuple) -> _Plan:
    """Deduplicate identical views (one entry, referenced twice), group different views of one storage into
    a span staged once, and refuse two tensors under one key path."""
    keys: list[str] = []
    by_identity: dict[tuple, str] = {}
    trails: dict[str, Any] = {}
    groups: dict[Any, list[int]] = {}
    order: list[Any] = []
    for n, (leaf, entry) in enumerate(zip(leaves, fp)):
        path, dtype, shape, stride, offset, device, sid, resolved = entry[:8]
        if sid >= 0:
            ident = (sid, offset, shape, stride, dtype, resolved)
            first = by_identity.get(ident)
            if first is not None:  # the very same view saved twice (tied weights): one entry
                keys.append(first)
                continue
            by_identity[ident] = path
        if path in trails:  # cannot happen with key_part; a last line against saving one tensor for another
            raise KeyCollisionError(f"two tensors of the state would be saved under one key path {path!r}: "
                                    f"{_readable(trails[path])} and {_readable(leaf.trail)}")
        trails[path] = leaf.trail
        keys.append(path)
        gid = sid if sid >= 0 and not leaf.global_shape and not resolved else ("solo", n)
        if gid not in groups:
            groups[gid] = []
            order.append(gid)
        groups[gid].append(n)
    staged: list[tuple] = []
    views: list[ViewItem] = []
    for gid in order:
        members = groups[gid]
        if len(members) == 1:
            src = leaves[members[0]].src
            staged.append(("solo", members[0], src.dtype, tuple(src.shape), _device_str(src)))
            continue
        # several different views of one storage: stage the byte span they cover once
        spans = [(_byte_span(leaves[m].t), m) for m in members]
        rep = all(leaves[m].replicated for m in members)
        lo = min(s[0][0] for s in spans)
        lo -= lo % max(leaves[m].t.element_size() for _, m in spans)  # every view's offset from lo stays aligned
        hi = max(s[0][1] for s in spans)
        base_key = STORAGE_PREFIX + leaves[spans[0][1]].path  # named after its first view: stable across ranks
        staged.append(("span", members, lo, hi, base_key, rep))
        for _, m in spans:
            t = leaves[m].t
            views.append(ViewItem(leaves[m].path, base_key, t.dtype, tuple(t.shape), tuple(t.stride()),
                                  t.storage_offset() * t.element_size() - lo, _device_str(t), rep))
    return _Plan(fp, tuple(keys), tuple(staged), tuple(views))


def flatten(state: Any, *, allow_pickle: bool = False, replicated: Callable[[str], bool] | None = None,
            cache: FlattenCache | None = None, leaves: list | None = None) -> FlatState:
    """Split ``state`` into a JSON skeleton and stage items (tensors, or spans of storages they share).

    ``replicated(key_path)`` says which plain tensors are identical on every rank (DDP state): those are
    written once in total. DTensors carry their own layout. ``cache``: reuse the skeleton and the storage
    analysis of the previous flatten while the structure repeats (the skeleton returned may then share nodes
    with the previous one: a skeleton must not be changed once returned). ``leaves``: a list to which
    ``(key path, tensor)`` of every tensor saved is appended (the tensors whose version counters a lazy
    snapshot watches)."""
    replayed = cache.replay(state, replicated) if cache is not None else None
    if replayed is not None:
        skeleton, tensors, plan = replayed
        srcs = tensors
    else:
        f = _Flattener(allow_pickle, replicated)
        skeleton = f.walk(state, "", None, 1)
        plan = cache.plan(f.leaves) if cache is not None else _analyse(f.leaves, _fingerprint(f.leaves))
        for leaf, key in zip(f.leaves, plan.keys):
            leaf.node["key"] = key
            for alias in leaf.node.pop("~aliases", ()):
                alias["key"] = key
        if cache is not None:
            cache.remember(skeleton, f.leaves, replicated)
        tensors = [leaf.t for leaf in f.leaves]
        srcs = [leaf.src for leaf in f.leaves]
    fp = plan.fingerprint  # per tensor: key path [0], replicated [8], global shape [9] and offset [10]
    items: list[StageItem] = []
    for entry in plan.staged:
        if entry[0] == "solo":
            _, n, dtype, shape, device = entry
            e = fp[n]
            items.append(StageItem(e[0], srcs[n], dtype, shape, device, e[9], e[10], e[8]))
            continue
        _, members, lo, hi, base_key, rep = entry
        first = tensors[members[0]]
        span = torch.empty(0, dtype=torch.uint8, device=first.device)
        span.set_(first.untyped_storage(), lo, (hi - lo,), (1,))
        items.append(StageItem(base_key, span, torch.uint8, (hi - lo,), _device_str(span), replicated=rep))
    if leaves is not None:
        leaves.extend((e[0], t) for e, t in zip(fp, tensors))
    return FlatState(skeleton, items, list(plan.views))


def _byte_span(t: torch.Tensor) -> tuple[int, int]:
    item = t.element_size()
    start = t.storage_offset() * item
    if t.numel() == 0:
        return start, start
    last = sum((s - 1) * st for s, st in zip(t.shape, t.stride()) if s > 0)
    return start, start + (last + 1) * item


# ----------------------------------------------------------------------------------------- unflatten
def _too_deep(where: str, path: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(f"{where}: the skeleton is nested deeper than MAX_DEPTH ({MAX_DEPTH}) containers "
                                 f"at {_where(path)}")


def unflatten(skeleton: Any, tensors: dict[str, torch.Tensor], *, allow_pickle: bool = False, where: str = "",
              check_only: bool = False) -> Any:
    """Rebuild the nested state from a skeleton and loaded tensors. Never executes code unless a pickled
    entry is met *and* ``allow_pickle`` is on. Tensors are looked up by the key their node names; the key path
    built on the way serves error messages only.

    ``check_only``: validate every node the way a load does, without tensors and without unpickling (a pickled
    entry only has to be well-formed base64): what ``verify`` runs so that "verify OK" implies "loads"."""

    def build(node: Any, path: str, depth: int) -> Any:
        if isinstance(node, list):
            if depth > MAX_DEPTH:
                raise _too_deep(where, path)
            out = []
            for i, v in enumerate(node):
                out.append(build(v, join(path, str(i)), depth + 1))
            return out
        if not isinstance(node, dict):
            return node
        kind = node.get(TAG)
        if kind in (None, "dict", "odict", "tuple") and depth > MAX_DEPTH:
            raise _too_deep(where, path)
        if kind is None:
            plain = {}
            for k, v in node.items():
                plain[k] = build(v, join(path, escape(k)), depth + 1)
            return plain
        try:
            if check_only and kind in ("tensor", "dtensor", "ndarray"):
                if not isinstance(node["key"], str) or (kind == "ndarray" and not _is_int_list(node["shape"])):
                    raise ValueError("bad tensor reference")
                return None
            if kind in ("tensor", "dtensor"):
                return tensors[node["key"]]
            if kind == "ndarray":
                t = tensors[node["key"]]
                return t.cpu().numpy().reshape(node["shape"])
            if kind in ("dict", "odict"):
                out = dict() if kind == "dict" else collections.OrderedDict()
                for i, (k, v) in enumerate(node["items"]):
                    key = build(k, join(path, f"~K{i}"), depth + 1) if isinstance(k, (dict, list)) else k
                    out[key] = build(v, join(path, key_part(key, i)), depth + 1)
                if kind == "odict" and "metadata" in node:
                    out._metadata = build(node["metadata"], join(path, METADATA_PART), depth + 1)
                return out
            if kind == "tuple":
                items = []
                for i, v in enumerate(node["items"]):
                    items.append(build(v, join(path, str(i)), depth + 1))
                return tuple(items)
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
                if check_only:
                    base64.b64decode(node["value"], validate=True)
                    return None
                if not allow_pickle:
                    raise UnsafeCheckpointError(
                        f"{where}: {_where(path)} holds a pickled Python object; refusing to "
                        "unpickle it (pickle can run arbitrary code). Pass allow_pickle=True only for checkpoints you trust")
                return pickle.loads(base64.b64decode(node["value"], validate=True))
        except UnsafeCheckpointError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, OverflowError, RuntimeError) as exc:  # e.g. a bad device string
            raise UnsafeCheckpointError(f"{where}: malformed skeleton node at {_where(path)}: {exc!r}") from None
        raise UnsafeCheckpointError(f"{where}: unknown skeleton node type {kind!r} at {_where(path)}")

    try:
        return build(skeleton, "", 1)
    finally:  # build refers to itself: without this cycle's break, it (and ``tensors``) lives until the next GC
        del build


def _is_int_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v)


def skeleton_tensor_refs(skeleton: Any, where: str = "") -> dict[str, dict]:
    """Every tensor node a skeleton references, by key (used to load only what a rank needs). Walks the
    containers :func:`unflatten` builds, counting depth the same way; other nodes hold no tensors."""
    out: dict[str, dict] = {}

    def visit(node: Any, depth: int) -> None:
        if isinstance(node, list):
            children = node
        elif isinstance(node, dict):
            kind = node.get(TAG)
            if kind in ("tensor", "ndarray", "dtensor"):
                if isinstance(node.get("key"), str):
                    out[node["key"]] = node
                return
            if kind is None:
                children = list(node.values())
            elif kind in ("dict", "odict") and isinstance(node.get("items"), list):
                children = [x for pair in node["items"] if isinstance(pair, list) for x in pair]
                if "metadata" in node:
                    children.append(node["metadata"])
            elif kind == "tuple" and isinstance(node.get("items"), list):
                children = node["items"]
            else:
                return  # a scalar node, or a malformed one unflatten refuses
        else:
            return
        if depth > MAX_DEPTH:
            raise UnsafeCheckpointError(f"{where or 'rank index'}: the skeleton is nested deeper than "
                                        f"MAX_DEPTH ({MAX_DEPTH}) containers")
        for child in children:
            visit(child, depth + 1)

    visit(skeleton, 1)
    return out
