"""Which node each rank runs on, and whether "node-local" storage really is local to each node.

A rank's node is taken from what torchrun (and torch elastic) exports: ``GROUP_RANK`` (the node's index),
``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE``. Without them, the node is the host name *and* the kernel's boot id,
which tells apart containers on different machines that report the same host name. The gathered identities
must be consistent (each node holds exactly LOCAL_WORLD_SIZE ranks, numbered 0..LOCAL_WORLD_SIZE-1), or the
saver refuses to start: budgets and node-local publishing are per node, and a wrong grouping would silently
divide them wrongly. Tests simulate several nodes on one machine by setting these three variables per rank.

With ``use_node_local_storage`` each node's publisher writes a probe file ``.asyncckpt-node.<job>.<node>``
into its save directory before the first save's first collective and looks for the other nodes' probes after
it: a probe of another node means the directory is shared, and the save fails on every rank with that said,
instead of several publishers racing on one directory.
"""
from __future__ import annotations

import os
import socket

from .errors import ConfigError

PROBE_PREFIX = ".asyncckpt-node."
_TORCHRUN = ("GROUP_RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def this_node() -> tuple[str, int, int] | tuple[str, None, None]:
    """(node name, local rank, local world size) from torchrun's variables, else (host/boot id, None, None)."""
    values = [os.environ.get(k, "") for k in _TORCHRUN]
    if all(v.isdigit() for v in values):
        return f"node{int(values[0])}", int(values[1]), int(values[2])
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}", None, None


def check_nodes(keys: list[tuple]) -> list[str]:
    """Every rank's node name from the gathered :func:`this_node` keys; ConfigError (the same on every rank)
    when they are inconsistent."""
    names = [k[0] for k in keys]
    torchrun = [k[1] is not None for k in keys]
    if any(torchrun) and not all(torchrun):
        missing = [r for r, t in enumerate(torchrun) if not t]
        raise ConfigError(f"ranks {missing[:20]} lack {'/'.join(_TORCHRUN)} while the others have them: launch every "
                          "rank the same way (torchrun sets them)")
    if any(torchrun):
        members: dict[str, list[int]] = {}
        for r, node in enumerate(names):  # one pass: rank 0 checks thousands of ranks
            members.setdefault(node, []).append(r)
        for node, ranks in members.items():
            local = sorted(keys[r][1] for r in ranks)
            sizes = {keys[r][2] for r in ranks}
            if sizes != {len(ranks)} or local != list(range(len(ranks))):
                raise ConfigError(f"{node} (GROUP_RANK) holds ranks {ranks[:20]} with LOCAL_RANK {local[:20]} and "
                                  f"LOCAL_WORLD_SIZE {sorted(sizes)}: each node must hold LOCAL_WORLD_SIZE ranks "
                                  "numbered 0..LOCAL_WORLD_SIZE-1")
    return names


def probe_name(job: str, node_index: int) -> str:
    return f"{PROBE_PREFIX}{job}.{node_index}"


def write_probe(save_dir: str, job: str, node_index: int) -> str:
    os.makedirs(save_dir, exist_ok=True)
    path = os.path.join(save_dir, probe_name(job, node_index))
    with open(path, "w") as f:
        f.write(f"{socket.gethostname()} {os.getpid()}\n")
    return path


def other_nodes_here(save_dir: str, job: str, node_index: int) -> list[int]:
    """The nodes of this job whose probe is visible in ``save_dir`` besides this node's own."""
    prefix = f"{PROBE_PREFIX}{job}."
    try:
        names = os.listdir(save_dir)
    except OSError:
        return []
    return sorted(int(n[len(prefix):]) for n in names
                  if n.startswith(prefix) and n[len(prefix):].isdigit() and int(n[len(prefix):]) != node_index)


def remove_probe(path: str) -> None:
    if path:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
