"""The service's wire format on its Unix socket: each message is an 8-byte big-endian length and a pickle
of plain data (dicts, lists, strings, numbers, torch dtypes), optionally with file descriptors attached to
the header (SCM_RIGHTS). Both ends are processes of the same user (the socket's directory is private and
the server checks the peer's uid), so pickle carries nothing a peer could not already do."""
from __future__ import annotations

import os
import pickle
import socket
import struct
import threading
from typing import Any

_HEADER = struct.Struct("!Q")
MAX_FDS = 4
# The version of what travels between a rank and its node's service, and between the nodes' services: the
# hello, the descriptors, the replies and the commit rounds. Any change to them bumps it. A rank whose hello
# carries another version is refused, and the nodes' services compare theirs when they form their group, so
# a job running two asyncckpt versions (a half-updated install) fails with an error naming both, instead of
# misreading a descriptor.
PROTOCOL = 1


def version_mismatch(who: str, theirs: Any, whose: str) -> str | None:
    """The error text when ``theirs`` (the protocol version ``who`` speaks; None: a peer from before versions)
    is not this one's, else None. ``whose``: this side, as the text names it."""
    if theirs == PROTOCOL:
        return None
    from .. import __version__

    return (f"{who} speaks writer-service protocol {theirs if theirs is not None else '0 (unversioned)'}, "
            f"{whose} speaks protocol {PROTOCOL} (asyncckpt {__version__}): every process of a job must run the "
            "same asyncckpt; finish or stop the job's processes of the other version")


class Channel:
    """One end of a connection: ``send`` is thread-safe, ``recv`` is called by one reader thread."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._send_lock = threading.Lock()

    def send(self, message: dict, fds: tuple[int, ...] = ()) -> None:
        body = pickle.dumps(message, protocol=5)
        header = _HEADER.pack(len(body))
        with self._send_lock:
            if fds:
                sent = socket.send_fds(self.sock, [header], list(fds))
                self.sock.sendall(header[sent:] + body)
            else:
                self.sock.sendall(header + body)

    def recv(self) -> tuple[dict, list[int]] | None:
        """The next message and the descriptors that came with it; None at end of stream."""
        head, fds, _, _ = socket.recv_fds(self.sock, _HEADER.size, MAX_FDS)
        if not head:
            return None
        try:
            head += self._exact(_HEADER.size - len(head))
            body = self._exact(_HEADER.unpack(head)[0])
            return pickle.loads(body), fds
        except BaseException:
            for fd in fds:
                _close(fd)
            raise

    def _exact(self, n: int) -> bytes:
        parts, left = [], n
        while left:
            part = self.sock.recv(min(left, 1 << 20))
            if not part:
                raise EOFError("connection closed in the middle of a message")
            parts.append(part)
            left -= len(part)
        return b"".join(parts)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def error_reply(exc: BaseException) -> dict[str, Any]:
    """How an exception of the service travels to a rank (rebuilt there by ``client``), with the OS error it
    chains, if any (errno, strerror, filename: a WriteError's cause, as in thread mode)."""
    cause = exc.__cause__
    return {"type": type(exc).__name__, "message": str(exc), "failures": dict(getattr(exc, "failures", None) or {}),
            "cause": [cause.errno, cause.strerror or str(cause), cause.filename] if isinstance(cause, OSError) else None}
