"""The writer service's protocol version: a rank and a service (or two nodes' services) of different asyncckpt
versions refuse each other with an error naming both versions, instead of misreading each other's messages;
the service goes on serving the ranks that speak its protocol."""
from __future__ import annotations

import os
import socket
import threading
import time

import pytest
import torch
import torch.distributed as dist

from asyncckpt import CommitError, Config
from asyncckpt.service import client, paths
from asyncckpt.service.link import check_protocols
from asyncckpt.service.protocol import PROTOCOL, Channel
from asyncckpt.state import flatten
from test_service import engines, runtime  # noqa: F401 - fixtures

pytestmark = pytest.mark.timeout(120)

OTHER_VERSIONS = [None, 0, PROTOCOL + 1, str(PROTOCOL), [PROTOCOL]]  # absent (before versions), older, newer, mistyped


def _hello(runtime: str, key: str, message: dict) -> dict:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(paths.socket_path(runtime, key))
    channel = Channel(sock)
    try:
        channel.send(message)
        reply = channel.recv()
    finally:
        channel.close()
    assert reply is not None, "the service closed the connection without answering"
    return reply[0]


@pytest.mark.parametrize("version", OTHER_VERSIONS)
def test_service_refuses_a_rank_of_another_protocol_and_goes_on(runtime, engines, tmp_path, version):  # noqa: F811
    engine = engines()
    state = {"w": torch.arange(10.0)}
    engine.save(lambda: flatten(state), str(tmp_path), "t0").result(timeout=60)
    message = {"op": "hello", "group": "other/1", "rank": 5, "pid": 4242}
    if version is not None:
        message["protocol"] = version
    reply = _hello(runtime, engine.service.key, message)
    assert reply["op"] == "refused", reply
    shown = "0 (unversioned)" if version is None else str(version)
    assert f"rank 5 (pid 4242) speaks writer-service protocol {shown}" in reply["error"], reply["error"]
    assert f"speaks protocol {PROTOCOL}" in reply["error"], reply["error"]
    # the service still serves its own ranks
    engine.save(lambda: flatten(state), str(tmp_path), "t1").result(timeout=60)
    assert open(tmp_path / "latest").read().strip() == "t1"


@pytest.mark.parametrize("version", OTHER_VERSIONS)
def test_rank_refuses_a_service_of_another_protocol(tmp_path, version):
    """A service of another version that welcomes the rank anyway (an older one does not check): the rank
    refuses it with CommitError naming both versions, and closes the connection."""
    directory, key = str(tmp_path), "job"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(paths.socket_path(directory, key))
    listener.listen(1)
    listener.settimeout(30)
    closed = threading.Event()

    def serve():
        sock, _ = listener.accept()
        channel = Channel(sock)
        channel.recv()
        welcome = {"op": "welcome", "pid": 777}
        if version is not None:
            welcome["protocol"] = version
        channel.send(welcome)
        sock.settimeout(30)
        if sock.recv(1) == b"":
            closed.set()
        channel.close()

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    hello = {"op": "hello", "protocol": PROTOCOL, "rank": 3}
    with pytest.raises(CommitError) as err:
        client._hello(directory, key, hello, Config(), time.monotonic() + 30)
    text = str(err.value)
    assert "refused rank 3" in text and "writer service (pid 777) speaks writer-service protocol" in text, text
    assert f"rank 3 speaks protocol {PROTOCOL}" in text, text
    server.join(30)
    assert closed.is_set(), "the rank kept the connection to a service it refused"
    listener.close()


def test_nodes_services_check_each_others_protocol():
    store = dist.HashStore()
    for node in range(3):
        store.set(f"protocol/{node}", str(PROTOCOL))
    check_protocols(store, 3, 0)  # all alike: no error
    store.set("protocol/1", str(PROTOCOL + 1))
    with pytest.raises(RuntimeError, match=f"node 1's writer service speaks writer-service protocol {PROTOCOL + 1}, "
                                           f"node 2's speaks protocol {PROTOCOL}"):
        check_protocols(store, 3, 2)
    older = dist.HashStore()
    older.set("protocol/0", str(PROTOCOL))  # node 1 runs a version from before protocol versions
    with pytest.raises(RuntimeError, match=r"node 1's writer service speaks writer-service protocol 0 \(unversioned\)"):
        check_protocols(older, 2, 0)
