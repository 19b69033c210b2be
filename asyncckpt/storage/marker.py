"""The ``marker`` strategy: how a save is made atomic on storage that cannot rename a directory (object stores).

* The ranks write their files straight under ``<save_dir>/<tag>/``. The publisher (rank 0) writes the tag's
  ``manifest.json`` last, after every rank's files are complete: the manifest is the tag's **commit marker**.
  A tag without it is not a checkpoint: no reader lists, loads, verifies or inspects it.
* ``latest`` is replaced by one PUT, only after the marker is in place.
* Before writing a tag, the publisher makes it empty: an incomplete tag of that name (a save cut short) is
  removed; a published one is refused, or with ``overwrite`` unpublished first (its marker is deleted, then
  its files), so no reader ever sees old and new files under one marker.
* Cleanup at the next save (once per saver and save directory): every tag-named prefix that has no marker and
  holds only checkpoint file names is what an aborted save left: it is removed.
* ``keep_last`` (and the withdrawal of a tag whose ``latest`` update failed) deletes the marker first, in one
  request, then the files: the tag disappears atomically.

There are no locks on an object store: one job (its rank 0) saves into one save directory at a time, and
retention runs only in that publisher (docs/STORAGE.md).
"""
from __future__ import annotations

import logging

from ..errors import CheckpointError
from ..format import LATEST, MANIFEST, MAX_JSON_BYTES, is_checkpoint_file_name, parse_manifest, validate_tag

log = logging.getLogger("asyncckpt.commit")


def marker_path(store, save_dir: str, tag: str) -> str:
    return store.join(save_dir, tag, MANIFEST)


def _is_tag(name: str) -> bool:
    try:
        validate_tag(name)
    except CheckpointError:
        return False
    return True


def begin(store, save_dir: str, tag: str, overwrite: bool, clean_first: bool) -> None:
    """Make ``<save_dir>/<tag>/`` ready for a new save (see the module's docstring). FileExistsError when the
    tag is published and ``overwrite`` is off."""
    if clean_first:
        clean(store, save_dir, own=tag)
    staging = store.join(save_dir, tag)
    if store.exists(marker_path(store, save_dir, tag)):
        if not overwrite:
            raise FileExistsError(f"tag {tag!r} already exists in {save_dir} (set overwrite: true to replace it)")
        log.warning("overwrite: unpublishing checkpoint %s before writing it again", staging)
        retire(store, save_dir, tag)
    elif store.listdir(staging):
        log.warning("removing incomplete checkpoint %s (an earlier save did not finish)", staging)
        store.remove_tree(staging)


def clean(store, save_dir: str, own: str) -> None:
    """Remove the tags aborted saves left behind: tag-named prefixes without a marker that hold nothing but
    checkpoint files (anything else under ``save_dir`` is left alone)."""
    for name in store.listdir(save_dir):
        if name in (own, LATEST) or not _is_tag(name):
            continue
        prefix = store.join(save_dir, name)
        files = store.file_sizes(prefix)
        if not files or MANIFEST in files or not all(is_checkpoint_file_name(f) for f in files):
            continue
        log.warning("removing incomplete checkpoint %s (an earlier save did not finish)", prefix)
        store.remove_tree(prefix)


def publish(store, save_dir: str, tag: str, manifest: bytes) -> None:
    """Write the commit marker: from now on ``tag`` is a checkpoint."""
    store.write_durable(marker_path(store, save_dir, tag), manifest)


def retire(store, save_dir: str, tag: str) -> None:
    """Unpublish ``tag`` (its marker goes first, in one request), then delete its files."""
    store.remove_file(marker_path(store, save_dir, tag))
    store.remove_tree(store.join(save_dir, tag))


def list_tags(store, save_dir: str) -> tuple[list[str], dict[str, str]]:
    """(published tags oldest first by their marker's time, {name: why refused}) of ``save_dir``."""
    published: list[tuple[float, str]] = []
    refused: dict[str, str] = {}
    for name in store.listdir(save_dir):
        if name.startswith(".") or name == LATEST:
            continue
        path = marker_path(store, save_dir, name)
        if not store.exists(path):
            continue  # no marker: an incomplete save, never a checkpoint
        if not _is_tag(name):
            refused[name] = f"{store.join(save_dir, name)}: {name!r} is not a valid tag name"
            continue
        published.append((store.modified(path), name))
    return [name for _, name in sorted(published)], dict(sorted(refused.items()))


def created(store, save_dir: str, tag: str) -> float:
    """The manifest's ``created_unix`` of a published tag (CheckpointError when it cannot be read)."""
    path = marker_path(store, save_dir, tag)
    try:
        data = store.read_bytes(path, MAX_JSON_BYTES)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc})") from exc
    if data is None:
        raise CheckpointError(f"{path}: missing")
    value = parse_manifest(data, path).get("created_unix")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0
