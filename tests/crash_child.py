"""The process that tests/test_crash.py kills: it trains a tiny model and saves asynchronously in a loop.

Run by a forkserver (torch and asyncckpt preloaded, so a new child starts in milliseconds) with a
``multiprocessing`` connection to the parent. The child announces every phase boundary of the save pipeline
on that connection *before* calling through (staging, creating the partial directory, cleaning leftovers,
encoding and writing chunks, fsync, the rank index, the manifest, renames, the ``latest`` replace, retention).
Given a target (phase, n) it stops at the n-th announcement of that phase and waits there, so the parent
SIGKILLs it exactly between two steps; without one the parent kills it at a random time.

Side files in the save directory's parent, for the parent's checks:

* ``planned.jsonl``: ``{"tag", "digest"}`` of the state about to be saved, written *before* the save starts
  (the tag may be published before the child learns it, so the parent must already know its digest).
* ``resolved.jsonl``: ``{"tag", "digest"}`` once its future resolved: a checkpoint the trainer was told is
  durable, which therefore must never be lost.

In ``writer.mode: service`` the save's steps after staging run in the node's writer service, so the child
gives each run a service of its own (``ASYNCCKPT_SERVICE_ID``) started with this module's
:func:`service_hooks` (``ASYNCCKPT_SERVICE_HOOKS``): the service connects to the parent's listener
(``ASYNCCKPT_CRASH_ANNOUNCE``), says its pid, and announces its steps as the child does; the parent kills
whichever process stopped at the target. The child announces ``handed`` once a save was handed over (its call
returned) and ``failed`` when a save's future failed (the service died), and then makes no further save.

The same module holds the bodies of the multi-rank and disk-full children. The model, its training step and
the digest come from tests/trainer.py; storage steps are hooked through the storage seam
(asyncckpt.storage.faults), the rest with tests/patching.patch_existing, so a hook point asyncckpt no longer has
fails the child loudly instead of testing nothing.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import threading
import traceback
import uuid
from collections import deque
from multiprocessing.connection import Client

import torch

import asyncckpt
import asyncckpt.codec
import asyncckpt.staging
from asyncckpt.storage import add_wrapper
from asyncckpt.storage.faults import Faults
from patching import patch_existing
from trainer import digest, mlp, train_step

# The first optimizer pulls in torch's lazily imported compile machinery (about a second): do it once here,
# in the forkserver that preloads this module, rather than in every child.
torch.optim.Adam([torch.zeros(1, requires_grad=True)])

SIDE_PLANNED = "planned.jsonl"
SIDE_RESOLVED = "resolved.jsonl"
PHASE_GROUPS = {  # fine-grained marker → the phase of the issue it belongs to
    "startup": "startup", "stage": "staging", "prepare": "commit (prepare)", "cleanup": "cleanup of leftovers",
    "encode": "writing", "write": "writing", "index": "writing", "fsync": "fsync", "fsync_dir": "fsync",
    "manifest": "commit (manifest)", "rename": "rename", "replace_old": "rename", "exchange": "rename",
    "latest": "latest replace",
    "latest_replace": "latest replace", "retention_rename": "retention", "retention_remove": "retention",
    "resolved": "after resolve", "done": "idle",
}
TRAINER_PHASES = ("startup", "stage", "handed", "failed", "resolved", "done")  # service mode: the rest are the service's
ANNOUNCE_ENV, AUTH_ENV, TARGET_ENV, NO_EXCHANGE_ENV, LOG_ENV = (
    "ASYNCCKPT_CRASH_ANNOUNCE", "ASYNCCKPT_CRASH_AUTHKEY", "ASYNCCKPT_CRASH_TARGET", "ASYNCCKPT_CRASH_NO_EXCHANGE",
    "ASYNCCKPT_CRASH_LOG")


def service_mode() -> bool:
    return asyncckpt.Config().writer.mode == "service"


# ------------------------------------------------------------------------------------------ side files
def append_line(path: str, doc: dict) -> None:
    """One os.write per line on an O_APPEND file: a SIGKILL leaves whole lines only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, (json.dumps(doc) + "\n").encode())
    finally:
        os.close(fd)


def read_lines(path: str) -> list[dict]:
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


# ------------------------------------------------------------------------------------------------ markers
class Announcer:
    """Sends ("m", phase, detail) to the parent before each hooked call. At the ``target`` (phase, n) — the
    n-th announcement of that phase — it sends ("stop", phase, detail) instead and waits there for the
    SIGKILL, so the parent kills it exactly between two steps without a round trip at every other step."""

    def __init__(self, conn, target: tuple[str, int] | None):
        self.conn = conn
        self.target = tuple(target) if target else None
        self.counts: dict[str, int] = {}
        self.lock = threading.Lock()

    def __call__(self, phase: str, detail: str = "") -> None:
        with self.lock:
            n = self.counts[phase] = self.counts.get(phase, 0) + 1
            if (phase, n) != self.target:
                self.conn.send(("m", phase, detail))
                return
            self.conn.send(("stop", phase, detail))
            try:
                if self.conn.recv() == "go":  # service mode: a second service reached the target; it goes on
                    return
            except EOFError:
                pass
            os._exit(3)  # otherwise never answered: the parent kills us here


def install_hooks(announce: Announcer, faults: Faults | None, stage_only: bool = False) -> None:
    """Make each step of the save pipeline announce itself before it runs: the storage operations through the
    storage seam (``faults``), staging, encoding and the ``os`` calls underneath through patch_existing.
    ``stage_only``: staging alone (a training process in service mode; the service announces the rest)."""
    real = {"stage": asyncckpt.staging.Slot.stage, "encode": asyncckpt.codec.ChunkCodec.encode, "fsync": os.fsync,
            "rename": os.rename, "replace": os.replace, "makedirs": os.makedirs}

    def stage(self, items, *args, **kwargs):
        announce("stage")
        return real["stage"](self, items, *args, **kwargs)

    def encode(self, raw, itemsize):
        announce("encode")
        return real["encode"](self, raw, itemsize)

    def fsync(fd):
        announce("fsync")
        return real["fsync"](fd)

    def rename(src, dst, *a, **kw):
        name = os.path.basename(os.fspath(dst))
        announce("retention_rename" if ".deleting" in name else "replace_old" if ".replaced" in name else "rename", name)
        return real["rename"](src, dst, *a, **kw)

    def replace(src, dst, *a, **kw):
        announce("latest_replace", os.path.basename(os.fspath(dst)))
        return real["replace"](src, dst, *a, **kw)

    def makedirs(path, *a, **kw):
        if os.fspath(path).endswith(".partial"):
            announce("prepare", os.path.basename(os.fspath(path)))
        return real["makedirs"](path, *a, **kw)

    def durable_write(op, path):
        name = os.path.basename(path)
        announce("manifest" if name == "manifest.json" else "index", name)

    def remove_tree(op, path):
        name = os.path.basename(path)
        announce("retention_remove" if ".deleting" in name else "cleanup", name)

    if stage_only:
        patch_existing(None, asyncckpt.staging.Slot, "stage", stage)
        return
    faults.on("write", lambda op, path: announce("write"), ".bin")
    faults.on("write_durable", durable_write)
    faults.on("fsync_dir", lambda op, path: announce("fsync_dir", os.path.basename(path)))
    faults.on("replace_atomic", lambda op, path: announce("latest"))
    faults.on("remove_tree", remove_tree)
    faults.on("exchange", lambda op, path: announce("exchange", os.path.basename(path)))
    for target, name, new in [
        (asyncckpt.staging.Slot, "stage", stage), (asyncckpt.codec.ChunkCodec, "encode", encode),
        (os, "fsync", fsync), (os, "rename", rename), (os, "replace", replace), (os, "makedirs", makedirs),
    ]:
        patch_existing(None, target, name, new)


# --------------------------------------------------------------------------------------------- the child
def saver_config(cfg: dict) -> dict:
    return {"max_inflight": cfg.get("max_inflight", 1), "keep_last": cfg.get("keep_last", 0),
            "overwrite": cfg.get("overwrite", False), "commit_timeout_s": 30,
            "snapshot": "eager",  # the phases announced include the copy before the call returns ("stage")
            "writer": {"threads_per_node": 2, "nice": 0},
            "codec": {"chunk_mib": 1 / 64, "compression": cfg.get("compression", True)}}


def service_hooks() -> None:
    """Run in a writer service started by a service-mode child (``ASYNCCKPT_SERVICE_HOOKS``): connect to the
    parent, say this service's pid, and announce the steps the service runs (stopping at the target). Its
    warnings also go straight to the child's log (they are forwarded to the child too, but a child killed at
    once may not have written them yet)."""
    handler = logging.FileHandler(os.environ[LOG_ENV])
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    conn = Client(os.environ[ANNOUNCE_ENV], authkey=bytes.fromhex(os.environ[AUTH_ENV]))
    conn.send(("pid", str(os.getpid()), ""))
    target = json.loads(os.environ.get(TARGET_ENV) or "null")
    _instrument(Announcer(conn, target), bool(os.environ.get(NO_EXCHANGE_ENV)), stage_only=False)


def _instrument(announce: Announcer, no_exchange: bool, stage_only: bool) -> None:
    faults = None
    if not stage_only:
        faults = Faults()
        add_wrapper(faults.wrap)  # for the rest of this process's life: it exits, never returns
        if no_exchange:  # a file system without RENAME_EXCHANGE: overwrite falls back to two renames
            faults.answer("exchange", False)
    install_hooks(announce, faults, stage_only)


def _use_own_service(cfg: dict) -> None:
    """Service mode: this run's saves go to a service of its own, started with :func:`service_hooks`."""
    os.environ.update({
        "ASYNCCKPT_SERVICE_ID": f"crash-{cfg['cycle']}-{uuid.uuid4().hex[:8]}",
        "ASYNCCKPT_SERVICE_HOOKS": f"{__name__}:service_hooks",
        "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.abspath(__file__)), os.environ.get("PYTHONPATH", "")]),
        ANNOUNCE_ENV: cfg["announce"], AUTH_ENV: cfg["authkey"], TARGET_ENV: json.dumps(cfg.get("target")),
        NO_EXCHANGE_ENV: "1" if cfg.get("no_exchange") else "", LOG_ENV: cfg["log"]})


def child_main(conn, cfg: dict) -> None:
    """Resume from ``latest`` if there is one, then train and save ``cfg["saves"]`` times; announce phases."""
    try:
        torch.set_num_threads(1)
        logging.basicConfig(filename=cfg["log"], level=logging.INFO, force=True,
                            format="%(levelname)s %(name)s: %(message)s")
        announce = Announcer(conn, cfg.get("target"))
        service = cfg.get("announce") is not None
        if service:
            _use_own_service(cfg)
        _instrument(announce, cfg.get("no_exchange", False), stage_only=service)
        announce("startup")
        save_dir, side = cfg["save_dir"], cfg["side_dir"]
        model = mlp(cfg["cycle"])
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        gen = torch.Generator().manual_seed(cfg["cycle"])
        saver = asyncckpt.AsyncCheckpointer(model, opt, config=saver_config(cfg))
        if os.path.exists(os.path.join(save_dir, "latest")):
            train_step(model, opt, gen)  # the optimizer has state, as after a real restart's first step
            saver.load_checkpoint(save_dir)
        pending: deque = deque()

        failed = []

        def resolve(block: bool) -> None:
            while pending and (block or pending[0][2].done()):
                tag, expected, fut = pending.popleft()
                try:
                    fut.result(timeout=60)
                except asyncckpt.CommitError:
                    if not service:
                        raise
                    failed.append(tag)  # the service died: the parent kills this process once it learnt it
                    announce("failed", tag)
                    continue
                announce("resolved", tag)
                append_line(os.path.join(side, SIDE_RESOLVED), {"tag": tag, "digest": expected})

        for i in range(cfg["saves"]):
            if failed:
                break
            train_step(model, opt, gen)
            tag = cfg.get("tag") or f"c{cfg['cycle']:04d}-s{i}"
            client = {"cycle": cfg["cycle"], "i": i}
            expected = digest(saver.state_dict(client))
            append_line(os.path.join(side, SIDE_PLANNED), {"tag": tag, "digest": expected})
            pending.append((tag, expected, saver.save_checkpoint(save_dir, tag=tag, client_state=client)))
            if service:
                announce("handed", tag)  # on CPU the call returns once the save was handed over
            resolve(block=False)
        resolve(block=True)
        try:
            saver.close(timeout=60)
        except asyncckpt.CheckpointError:
            if not failed:
                raise
        announce("done")
        conn.recv()  # the parent kills us here, or tells us to exit
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test
        try:
            conn.send(("error", traceback.format_exc(), ""))
        finally:
            os._exit(2)
    os._exit(0)


# ------------------------------------------------------------------------------- multi-rank kill (spawned)
def two_rank_kill(rank: int, world: int, save_dir: str, victim: int, where: str, timeout_s: float) -> dict:
    """Both ranks save "before"; then rank ``victim`` SIGKILLs itself mid-save at ``where`` ("write": while
    writing its data file, "manifest": the publisher, while writing the manifest) or hangs ("hang": its
    writer blocks forever, its connections stay open). The survivor reports how long its future took to fail and what ``latest`` holds."""
    import time

    model = mlp(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    cfg = saver_config({})
    cfg["commit_timeout_s"] = timeout_s
    gen = torch.Generator().manual_seed(rank)
    with asyncckpt.AsyncCheckpointer(model, opt, config=cfg) as saver:
        train_step(model, opt, gen)
        saver.save_checkpoint(save_dir, tag="before").result(60)
        before = digest(saver.state_dict())
        if rank == victim:
            def die(*a, **kw):
                os.kill(os.getpid(), signal.SIGKILL)

            faults = Faults()
            add_wrapper(faults.wrap)  # for the rest of this process's life
            if where in ("write", "hang"):
                # its data file is open; no chunk of it will ever be written (small tensors are packed, so this
                # rank's share of the model may be a single chunk)
                if where == "hang":
                    faults.on("write", lambda op, path: threading.Event().wait(), ".bin")  # alive but silent
                else:
                    faults.on("write", die, ".bin")
            else:
                faults.on("write_durable", die, "manifest.json")
        train_step(model, opt, gen)
        t0 = time.monotonic()
        fut = saver.save_checkpoint(save_dir, tag="after")
        err = fut.exception(timeout_s + 30)
        elapsed = time.monotonic() - t0
        latest = open(os.path.join(save_dir, "latest")).read().strip()
        try:
            saver.close(timeout=10)
        except asyncckpt.CheckpointError:
            pass
    return {"error": type(err).__name__ if err else None, "is_commit_error": isinstance(err, asyncckpt.CommitError),
            "message": str(err), "elapsed": elapsed, "latest": latest, "before_digest": before}


# ------------------------------------------------------------------------------ disk full (forkserver child)
def disk_full_child(conn, save_dir: str, limit: int, log: str) -> None:
    """RLIMIT_FSIZE as a full disk: the save fails with a clear error, the previous checkpoint stays loadable,
    training goes on, and once the limit is raised again the next save succeeds."""
    import resource

    out: dict = {}
    try:
        torch.set_num_threads(1)
        logging.basicConfig(filename=log, level=logging.INFO, force=True)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of killing us
        model = mlp(1)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        gen = torch.Generator().manual_seed(1)
        cfg = saver_config({"compression": False})
        with asyncckpt.AsyncCheckpointer(model, opt, config=cfg) as saver:
            train_step(model, opt, gen)
            saver.save_checkpoint(save_dir, tag="before").result(60)
            before = digest(saver.state_dict())
            soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
            train_step(model, opt, gen)
            try:
                saver.save_checkpoint(save_dir, tag="full").result(60)
                out["full_error"] = None
            except asyncckpt.CheckpointError as exc:
                out["full_error"] = f"{type(exc).__name__}: {exc}"
                out["full_is_write_error"] = isinstance(exc, asyncckpt.WriteError)
            out["listing_after_failure"] = sorted(os.listdir(save_dir))
            out["latest_after_failure"] = open(os.path.join(save_dir, "latest")).read().strip()
            fresh = mlp(5)
            fresh_opt = torch.optim.Adam(fresh.parameters(), lr=1e-2)
            train_step(fresh, fresh_opt, torch.Generator().manual_seed(5))
            with asyncckpt.AsyncCheckpointer(fresh, fresh_opt, config=cfg) as loader:
                loader.load_checkpoint(save_dir)
                out["previous_loads_exactly"] = digest(loader.state_dict()) == before
            for _ in range(3):  # training goes on
                train_step(model, opt, gen)
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # space frees up
            after = digest(saver.state_dict())
            res = saver.save_checkpoint(save_dir, tag="after").result(60)
            out["after_path"] = res.path
            out["after_loads_exactly"] = digest(asyncckpt.load(save_dir)) == after
    except BaseException:  # noqa: BLE001
        out["crash"] = traceback.format_exc()
    conn.send(out)
    os._exit(0)

