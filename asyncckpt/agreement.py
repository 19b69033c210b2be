"""Every rank loads the same checkpoint, or none does.

Each rank looks at its own ``load_dir`` (one shared directory, or a node-local copy per node) and reports
what it sees: the tag (the one asked for, or the one ``latest`` names) and that tag's *save identity*: the
``save_id`` every node's manifest of one save records (rank 0 chose it at prepare), or, for checkpoints
written before save ids existed, the checksum of the manifest file. One all-gather over the saver's gloo group
later, every rank holds the same list and takes the same decision:

* every rank sees the same (tag, identity): load it (or, when no rank has a ``latest``, load nothing);
* ranks disagree about ``latest`` (a publish cut short on some nodes, a replacement node with an empty or an
  older directory): a second all-gather reports, for each tag any rank's ``latest`` names, the identity each
  rank holds; the newest of those tags that every rank holds with one identity is loaded, with a warning;
* anything else (a rank lacks the tag asked for, a damaged ``latest``, no tag in common) raises
  :class:`CheckpointError` on every rank, naming the ranks and what each sees.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, Mapping

from .errors import CheckpointError, CheckpointNotFoundError
from .format import MANIFEST, MAX_JSON_BYTES, checksum, parse_manifest
from .loader import object_store, read_control_file, read_latest, resolve_tag, tag_dir
from .storage import Storage

log = logging.getLogger(__name__)

Gather = Callable[[Any, str], list]  # (this rank's object, what for) -> every rank's object, in rank order
StorageArg = Storage | Mapping | None  # for a URL load_dir: its storage or fsspec options (loader.object_store)


def read_manifest(load_dir: str, tag: str, storage: StorageArg = None) -> tuple[dict, bytes]:
    """The parsed manifest of a published ``tag`` and its bytes; CheckpointError when it is not readable."""
    store = object_store(load_dir, storage)
    path = (store.join(load_dir, tag, MANIFEST) if store is not None else
            os.path.join(tag_dir(load_dir, tag), MANIFEST))
    data = read_control_file(path, MAX_JSON_BYTES, store)
    if data is None:
        raise CheckpointNotFoundError(f"{path}: missing")
    return parse_manifest(data, path), data


def created(doc: dict) -> float:
    value = doc.get("created_unix")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def identity(load_dir: str, tag: str, storage: StorageArg = None) -> tuple[str, float]:
    """(save identity, creation time) of a published ``tag``; CheckpointError when it is not readable."""
    doc, data = read_manifest(load_dir, tag, storage)
    save_id = doc.get("save_id")
    return save_id if isinstance(save_id, str) and save_id else "manifest " + checksum(data), created(doc)


def _look(load_dir: str, tag: str | None, storage: StorageArg) -> tuple[str | None, str, float, str]:
    """(tag, identity, created, error) as this rank sees it; tag None and no error: no ``latest`` here."""
    try:
        if tag is None and read_latest(load_dir, storage=storage) is None:
            return None, "", 0.0, ""
        resolved = resolve_tag(load_dir, tag, storage=storage)
        ident, created = identity(load_dir, resolved, storage)
        return resolved, ident, created, ""
    except CheckpointError as exc:
        return tag, "", 0.0, f"{type(exc).__name__}: {exc}".splitlines()[0][:400]


def _view(seen: tuple) -> str:
    tag, ident, _, error = seen
    if error:
        return error
    if tag is None:
        return "no 'latest' file"
    return f"tag {tag!r} ({ident})"


def describe_views(views: list[str] | dict[int, str]) -> str:
    """One line per distinct view, naming the ranks that hold it (ranges: many ranks stay short)."""
    groups: dict[str, list[int]] = {}
    for rank, v in (views.items() if isinstance(views, dict) else enumerate(views)):
        groups.setdefault(v, []).append(rank)
    return "; ".join(f"{rank_ranges(ranks)}: {v}" for v, ranks in groups.items())


def rank_ranges(ranks: list[int]) -> str:
    parts, start = [], None
    for i, r in enumerate(ranks):
        if start is None:
            start = r
        if i + 1 == len(ranks) or ranks[i + 1] != r + 1:
            parts.append(f"{start}" if start == r else f"{start}-{r}")
            start = None
    return ("rank " if len(ranks) == 1 else "ranks ") + ",".join(parts)


def agree_on_tag(gather: Gather, load_dir: str, tag: str | None, storage: StorageArg = None) -> str | None:
    """The tag every rank loads (None: no rank has a ``latest`` and none was asked for). Called collectively."""
    seen = gather(_look(load_dir, tag, storage), "agreeing on the checkpoint to load")
    keys = {(s[0], s[1]) for s in seen}
    errors = [s for s in seen if s[3]]
    if not errors and len(keys) == 1:
        return seen[0][0]
    views = describe_views([_view(s) for s in seen])
    head = "ranks do not agree on the checkpoint to load" + ("" if tag is None else f" (tag {tag!r})")
    here = f" [this rank reads {load_dir}]"
    if tag is not None or errors:  # a tag asked for, or a damaged latest
        raise CheckpointError(f"{head}: {views}{here}")
    candidates = sorted({s[0] for s in seen if s[0] is not None})
    held = gather({c: _held(load_dir, c, storage) for c in candidates}, "finding a checkpoint every rank holds")
    common = [c for c in candidates if len({h[c][0] for h in held}) == 1 and held[0][c][0]]
    if not common:
        raise CheckpointError(f"{head}, and no tag that any 'latest' names is held by every rank with the same "
                              f"save identity: {views}. Copy the checkpoint to the ranks that lack it, or pass "
                              "tag= explicitly" + here)
    chosen = max(common, key=lambda c: (held[0][c][1], c))
    log.warning("%s: %s; loading %r, the newest checkpoint every rank holds%s", head, views, chosen, here)
    return chosen


def _held(load_dir: str, tag: str, storage: StorageArg) -> tuple[str, float]:
    try:
        return identity(load_dir, resolve_tag(load_dir, tag, storage=storage), storage)
    except CheckpointError:
        return "", 0.0


# ------------------------------------------------------------------------------------------ saves
def spec_mismatches(specs: list[dict], groups: list[str]) -> list[str]:
    """What differs between the ranks' specs of one save (each rank's sequence number, resolved save_dir,
    save_latest, overwrite, keep_last, codec, the caller's manifest fields such as global_steps), one text per
    key naming the ranks and their values. Ranks are compared within their group: ``save_dir`` of
    node-local storage is compared among the ranks of one node only (each node has its own directory); the
    other keys across all ranks."""
    out = []
    keys = sorted({k for s in specs for k in s})
    for key in keys:
        values = [repr(s.get(key)) for s in specs]
        scopes = sorted(set(groups)) if key == "save_dir" else [None]
        for scope in scopes:
            ranks = [r for r in range(len(specs)) if scope is None or groups[r] == scope]
            if len({values[r] for r in ranks}) > 1:
                out.append(f"{key}: {describe_views({r: values[r] for r in ranks})}")
    return out
