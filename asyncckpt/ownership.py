"""Who owns a partial directory, and what earlier saves provably abandoned.

Several savers may share one save_dir (a main and an EMA saver, asyncckpt.save next to an AsyncCheckpointer,
a job restarted while the old one still finishes a save). Whoever creates or removes ``.<name>.partial``
first takes the flock of ``.<name>.partial.lock`` (next to it, so a published tag never holds anything
extra) and keeps it until done; the file holds an owner record: pid, host, boot id, pid namespace, nonce.
A partial directory is removed only when its owner is provably gone: its lock can be taken (the kernel drops
an flock when its process dies), or the record names a process of this host and boot that no longer exists
(a child it forked may have inherited the lock). Anything else is left alone and logged.

This is the ``rename`` strategy's bookkeeping (POSIX storage: flock exists there); every change it makes to
``save_dir`` (listing, renaming, removing a tree) goes through the save's storage object. Object stores have
no locks: see :mod:`asyncckpt.storage.marker`.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
import uuid
from typing import Any

from .durable import LockFile
from .format import LATEST, PARTIAL_SUFFIX
from .storage import Storage

log = logging.getLogger("asyncckpt.commit")  # one logger for everything a save does to save_dir

REPLACED_SUFFIX = ".replaced" + PARTIAL_SUFFIX  # an overwritten tag on its way out (without RENAME_EXCHANGE)
DELETING_SUFFIX = ".deleting" + PARTIAL_SUFFIX  # a tag keep_last is removing
LOCK_SUFFIX = ".lock"  # ".<name>.partial.lock": the owner of ".<name>.partial" holds an flock on it


def this_host() -> dict[str, Any]:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    try:
        pidns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        pidns = 0
    return {"host": socket.gethostname(), "boot_id": boot, "pidns": pidns}


def _owner_record(kind: str) -> bytes:
    return json.dumps({"pid": os.getpid(), **this_host(), "nonce": uuid.uuid4().hex, "kind": kind}).encode()


def _read_record(path: str) -> dict:
    try:
        doc = json.loads(LockFile.record(path) or b"")
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _owner_gone(rec: dict) -> bool:
    """The owner was a process of this host that is gone: its boot is over, or its pid no longer exists."""
    here = this_host()
    if not rec or rec.get("host") != here["host"]:
        return False
    if here["boot_id"] and rec.get("boot_id") and rec.get("boot_id") != here["boot_id"]:
        return True
    pid = rec.get("pid")
    if type(pid) is not int or pid <= 0 or pid == os.getpid() or rec.get("pidns") != here["pidns"]:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: it exists
        pass
    return False


def _owner_text(rec: dict) -> str:
    if not rec.get("pid"):
        return "an unknown owner"
    return f"pid {rec['pid']} on host {rec.get('host', '?')}"


def _take_abandoned(path: str, create: bool) -> tuple[LockFile | None, dict]:
    """The lock at ``path`` (and its owner record) when nobody works under it any more; (None, record) when
    its owner may still be alive. With ``create``, a missing lock file is created (and taken)."""
    lock = LockFile.take(path, create=create)
    rec = _read_record(path)
    if lock is not None:
        if lock.locked or create or _owner_gone(rec):  # no flock on this file system: only the record tells
            return lock, rec
        lock.release(unlink=False)
        return None, rec
    if not _owner_gone(rec):
        return None, rec
    # held by a process that inherited the dead owner's descriptor: take the name over, unless another
    # cleaner did so since we read the record
    if _read_record(path).get("nonce") != rec.get("nonce"):
        return None, rec
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    return LockFile.take(path, create=True), rec


def claim(st: Storage, save_dir: str, name: str, kind: str, fsync: bool = True) -> LockFile:
    """Become the owner of ``save_dir/name`` (a partial directory); OSError(EBUSY) when a live saver is. With
    ``fsync``, the lock file's name is made durable before the caller creates ``name``: after a power loss, a
    partial directory always has its lock file, so the next save's cleanup can remove it."""
    path = os.path.join(save_dir, name + LOCK_SUFFIX)
    lock, rec = _take_abandoned(path, create=True)
    if lock is None:
        raise OSError(errno.EBUSY, f"{st.join(save_dir, name)} is being written by another saver "
                                   f"({_owner_text(rec)}); use another tag")
    try:
        lock.write(_owner_record(kind))
        if fsync:
            st.fsync_dir(save_dir)
    except BaseException:
        lock.release(unlink=True)
        raise
    return lock


def clean(st: Storage, save_dir: str, own: str) -> None:
    """Remove what earlier saves provably abandoned in ``save_dir``: partial directories and their locks, and
    temporary files of a ``latest`` replace; put back a tag whose overwrite was cut short. ``own`` is the
    partial directory this saver is about to create."""
    names = set(st.listdir(save_dir))
    for name in sorted(names):
        path = os.path.join(save_dir, name)
        if name.startswith(f".{LATEST}.") and name.endswith(".tmp"):  # a replace of latest cut short
            lock = LockFile.take(path, create=False)
            if lock is None:
                continue  # being written right now
            if not lock.locked and time.time() - _mtime(path) < _TMP_GRACE_S:
                lock.release(unlink=False)
                continue
            log.warning("removing leftover temporary file %s (an earlier save did not finish)", path)
            lock.release(unlink=True)
        elif name.startswith(".") and name.endswith(PARTIAL_SUFFIX) and name != own:
            _clean_partial(st, save_dir, name)
        elif (name.startswith(".") and name.endswith(PARTIAL_SUFFIX + LOCK_SUFFIX) and name != own + LOCK_SUFFIX
              and name[:-len(LOCK_SUFFIX)] not in names):  # a lock whose directory was never made or is gone
            lock = LockFile.take(path, create=False)
            if lock is not None:
                lock.release(unlink=lock.locked and not st.exists(path[:-len(LOCK_SUFFIX)]))


def _clean_partial(st: Storage, save_dir: str, name: str) -> None:
    path = os.path.join(save_dir, name)
    lock, rec = _take_abandoned(path + LOCK_SUFFIX, create=False)
    if lock is None:
        if not st.exists(path):
            return  # published or removed by its owner meanwhile
        if st.exists(path + LOCK_SUFFIX):
            log.info("leaving partial checkpoint %s alone: %s is still writing it", path, _owner_text(rec))
        else:
            log.warning("leaving partial checkpoint %s alone: it has no owner record %s (written by an older "
                        "asyncckpt, or copied); remove it once no save is writing there",
                        path, os.path.basename(path + LOCK_SUFFIX))
        return
    try:
        replaced = name[1:-len(REPLACED_SUFFIX)] if name.endswith(REPLACED_SUFFIX) else ""
        if replaced and rec.get("kind") != "save" and not st.exists(os.path.join(save_dir, replaced)):
            log.warning("restoring checkpoint %s from %s (an overwrite did not finish)",
                        os.path.join(save_dir, replaced), path)  # the old copy, complete: the new one never was
            st.rename(path, os.path.join(save_dir, replaced))
        elif st.exists(path):
            log.warning("removing leftover partial checkpoint %s (an earlier save did not finish)", path)
            st.remove_tree(path)
    finally:
        lock.release(unlink=not st.exists(path))


_TMP_GRACE_S = 600.0  # without flock, a temporary file of a latest replace this old is certainly abandoned


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return 0.0
