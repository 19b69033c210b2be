"""Where a node's writer service lives: a private runtime directory on shared memory, and the names in it.

The directory is ``$ASYNCCKPT_RUNTIME_DIR`` or ``/dev/shm/asyncckpt-<uid>`` (mode 0700, owned by this user).
A job's service is keyed by the job's identity and the node, so two jobs on one node get two services (and
nodes simulated on one machine one each): ``$ASYNCCKPT_SERVICE_ID``, else ``$TORCHELASTIC_RUN_ID``, else
``MASTER_ADDR:MASTER_PORT`` of a distributed job, else the job's own nonce (agreed by its ranks), else this
process."""
from __future__ import annotations

import hashlib
import logging
import os
import stat

from ..errors import CheckpointError

log = logging.getLogger(__name__)

RUNTIME_ENV = "ASYNCCKPT_RUNTIME_DIR"
ID_ENV = "ASYNCCKPT_SERVICE_ID"
BUFFER_PREFIX = "buf-"


def runtime_dir() -> str:
    """The runtime directory, created if needed; refused when another user could reach into it."""
    path = os.environ.get(RUNTIME_ENV) or f"/dev/shm/asyncckpt-{os.getuid()}"
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.lstat(path)
    except OSError as exc:
        raise CheckpointError(f"writer service: cannot create its runtime directory {path}: {exc}") from exc
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise CheckpointError(f"writer service: runtime directory {path} must be a directory owned by this user "
                              f"with mode 0700 (set {RUNTIME_ENV} to use another one)")
    return path


def job_id(distributed: bool, job_nonce: str) -> str:
    """The identity of this job on this node (see the module docstring)."""
    env = os.environ
    if env.get(ID_ENV):
        return "id:" + env[ID_ENV]
    if env.get("TORCHELASTIC_RUN_ID"):
        return "elastic:" + env["TORCHELASTIC_RUN_ID"]
    if distributed and env.get("MASTER_ADDR") and env.get("MASTER_PORT"):
        return f"master:{env['MASTER_ADDR']}:{env['MASTER_PORT']}"
    if distributed and job_nonce:
        return "job:" + job_nonce
    return f"pid:{os.getpid()}"


def service_key(job: str, node: str) -> str:
    """The name of job ``job``'s service on node ``node`` (one per node: several "nodes" simulated on one machine
    with torchrun's variables get one service each, as real nodes would)."""
    return hashlib.sha256(f"{job}\0{node}".encode()).hexdigest()[:16]


def socket_path(directory: str, key: str) -> str:
    return os.path.join(directory, f"svc-{key}.sock")


def lock_path(directory: str, key: str) -> str:
    return os.path.join(directory, f"svc-{key}.lock")


def log_path(directory: str, key: str) -> str:
    return os.path.join(directory, f"svc-{key}.log")


def buffer_path(directory: str, name: str) -> str:
    return os.path.join(directory, f"{BUFFER_PREFIX}{os.getpid()}-{name}")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")


def clean_leftovers(directory: str) -> list[str]:
    """Remove shared-memory buffers whose owner process is gone (a rank killed between creating a buffer and
    unlinking it, see :mod:`.shm`). Returns the removed names."""
    removed = []
    for name in os.listdir(directory):
        if not name.startswith(BUFFER_PREFIX):
            continue
        owner = name[len(BUFFER_PREFIX):].split("-", 1)[0]
        if owner.isdigit() and not pid_alive(int(owner)):
            try:
                os.unlink(os.path.join(directory, name))
                removed.append(name)
            except FileNotFoundError:
                pass
    if removed:
        log.info("removed %d leftover shared-memory buffer(s) of dead processes from %s", len(removed), directory)
    return removed
