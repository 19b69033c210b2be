"""Power-loss crash consistency: replay the operation log of a save (asyncckpt.storage.recording) on a model
of a POSIX file system, enumerate the states a power loss may leave at every point of it, materialize each
state in a directory and check that asyncckpt keeps its promises there.

Persistence model (weaker than ext4's, so every state ext4 can leave is among those checked):

* The file system is a graph of inodes; a directory holds entries ``name → inode``. The state before the save
  is durable (it was written and synced by earlier, finished saves).
* **File data.** A file's content is durable as of its last ``fsync``. Data written since may be lost in
  part or whole; the checker tries, for each file with unsynced data: all of it present, none of it (the
  file at its synced content: empty for a new file), a torn prefix (the synced content plus the first half
  of the unsynced bytes) and the full length with the unsynced bytes read back as zeros (the size persisted,
  the data blocks not: ext4 ``data=writeback``, delayed allocation). Files written beside the storage seam
  (ownership's lock files) get the first two only: their one reader (``ownership._read_record``) takes a
  torn or zeroed owner record exactly as an empty one (no record), so those would add no other state.
* **Names.** Every change of a directory entry — ``create``, ``mkdir``, ``rename``, ``exchange``,
  ``unlink``, ``rmdir`` — is durable once every directory it changed was ``fsync``'ed after it; until then
  it may or may not have persisted, **independently of every other pending change** (no ordering is
  assumed, not even per directory: ext4's journal keeps them in order, this model does not). A rename or
  an exchange is atomic: both of its entries persist together or neither does. ``fsync`` of a file does not
  persist its name; ``fsync`` of a directory persists its entries, not its own name in its parent.
* Entries name inodes, so a pending change applies to the inode it named when it was made (a ``rename``
  persisted without the ``mkdir`` before it still links the directory, with its durable entries).

Bounds. At each prefix of the log, with n pending entry changes: every subset when n <= 6 (64 subsets);
beyond, the empty and the full subset, every subset that leaves out exactly one change or keeps exactly one,
and random subsets (fixed seed) up to 64 in all — the changes a save makes to one directory between two of its
fsyncs are few (one partial directory, one lock file, one rename), so large n only comes from removing a tree,
whose entries are all alike. For each subset, with u files holding unsynced data reachable in the state:
every combination of their variants when there are at most 16, else every variant of every file at least once
and random combinations (fixed seed) up to 16.

Every state is built as a tree (``{name: bytes | tree}``); equal trees are checked once (the counts report both
the states enumerated and the distinct ones).
"""
from __future__ import annotations

import hashlib
import itertools
import os
import random
import shutil
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

from asyncckpt.storage.recording import (CREATE, EXCHANGE, FSYNC, FSYNC_DIR, MKDIR, RENAME, RMDIR, UNLINK, WRITE,
                                         Op)

EXHAUSTIVE_CHANGES = 6
MAX_SUBSETS = 64
MAX_DATA_COMBOS = 16
SEED = 20261126

Tree = dict  # name -> bytes (a regular file) | Tree (a directory)


class ModelError(AssertionError):
    """The log does not replay on the model (a recorder or model bug, not a durability one)."""


def snapshot(root: str) -> Tree:
    """The directory tree at ``root`` (regular files and directories; anything else is refused)."""
    out: Tree = {}
    for e in os.scandir(root):
        if e.is_dir(follow_symlinks=False):
            out[e.name] = snapshot(e.path)
        elif e.is_file(follow_symlinks=False):
            with open(e.path, "rb") as f:
                out[e.name] = f.read()
        else:
            raise ModelError(f"{e.path}: neither a regular file nor a directory")
    return out


def materialize(tree: Tree, path: str) -> None:
    os.makedirs(path)
    for name, v in tree.items():
        if isinstance(v, dict):
            materialize(v, os.path.join(path, name))
        else:
            with open(os.path.join(path, name), "wb") as f:
                f.write(v)


def tree_key(tree: Tree) -> str:
    h = hashlib.sha256()

    def feed(t: Tree) -> None:
        for name in sorted(t):
            v = t[name]
            h.update(name.encode() + b"\0")
            if isinstance(v, dict):
                h.update(b"D{")
                feed(v)
                h.update(b"}")
            else:
                h.update(b"F%d:" % len(v) + hashlib.sha256(v).digest())

    feed(tree)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------ model
@dataclass
class _Inode:
    kind: str  # "f" or "d"
    data: bytearray = field(default_factory=bytearray)  # a file's content now
    synced: bytes = b""  # a file's content as of its last fsync
    entries: dict = field(default_factory=dict)  # a directory's entries now: name -> inode number
    beside: bool = False  # a file created beside the storage seam (a lock file)


@dataclass
class Change:
    """One entry change of the log: ``(directory inode, name, inode or None)`` pairs applied together."""

    index: int  # its op's position in the log
    op: Op
    writes: tuple
    pending: set  # directories whose fsync it still waits for


class Model:
    """The file system under ``root`` as the log changes it: what is there now, and what is durable."""

    def __init__(self, root: str, before: Tree):
        self.root = os.path.abspath(root)
        self.inodes: dict[int, _Inode] = {}
        self.durable: dict[int, dict] = {}  # each directory's durable entries before the log
        self.changes: list[Change] = []
        self.root_ino = self._load(before)

    def _new(self, kind: str) -> int:
        ino = len(self.inodes)
        self.inodes[ino] = _Inode(kind)
        self.durable[ino] = {}
        return ino

    def _load(self, tree: Tree) -> int:
        ino = self._new("d")
        for name, v in tree.items():
            if isinstance(v, dict):
                child = self._load(v)
            else:
                child = self._new("f")
                self.inodes[child].data = bytearray(v)
                self.inodes[child].synced = bytes(v)
            self.inodes[ino].entries[name] = child
        self.durable[ino] = dict(self.inodes[ino].entries)
        return ino

    def _lookup(self, path: str) -> tuple[int, str, int | None]:
        """(parent directory inode, name, inode or None) of ``path`` now."""
        rel = os.path.relpath(os.path.abspath(path), self.root)
        if rel.startswith("..") or rel == ".":
            raise ModelError(f"{path}: outside the recorded directory {self.root}")
        parts = rel.split(os.sep)
        d = self.root_ino
        for part in parts[:-1]:
            d = self.inodes[d].entries.get(part)
            if d is None or self.inodes[d].kind != "d":
                raise ModelError(f"{path}: {part} is not a directory in the model")
        return d, parts[-1], self.inodes[d].entries.get(parts[-1])

    def _existing(self, path: str) -> int:
        ino = self._lookup(path)[2] if os.path.abspath(path) != self.root else self.root_ino
        if ino is None:
            raise ModelError(f"{path}: does not exist in the model")
        return ino

    def _change(self, index: int, op: Op, *writes: tuple) -> None:
        for d, name, ino in writes:
            if ino is None:
                self.inodes[d].entries.pop(name, None)
            else:
                self.inodes[d].entries[name] = ino
        self.changes.append(Change(index, op, writes, {w[0] for w in writes}))

    def apply(self, index: int, op: Op) -> None:
        if op.kind in (CREATE, MKDIR):
            d, name, ino = self._lookup(op.path)
            if ino is not None:
                if op.kind == MKDIR or self.inodes[ino].kind != "f":
                    raise ModelError(f"{op}: exists in the model")
                self.inodes[ino].data = bytearray()  # O_TRUNC
                return
            new = self._new("f" if op.kind == CREATE else "d")
            self.inodes[new].beside = op.external
            self._change(index, op, (d, name, new))
        elif op.kind == WRITE:
            node = self.inodes[self._existing(op.path)]
            end = op.offset + len(op.data)
            if len(node.data) < end:
                node.data.extend(bytes(end - len(node.data)))
            node.data[op.offset:end] = op.data
        elif op.kind == FSYNC:
            node = self.inodes[self._existing(op.path)]
            node.synced = bytes(node.data)
        elif op.kind == FSYNC_DIR:
            d = self._existing(op.path)
            for c in self.changes:
                c.pending.discard(d)
        elif op.kind in (UNLINK, RMDIR):
            d, name, ino = self._lookup(op.path)
            if ino is None:
                raise ModelError(f"{op}: does not exist in the model")
            self._change(index, op, (d, name, None))
        elif op.kind == RENAME:
            sd, sn, ino = self._lookup(op.path)
            dd, dn, _ = self._lookup(op.dst)
            if ino is None:
                raise ModelError(f"{op}: its source does not exist in the model")
            self._change(index, op, (sd, sn, None), (dd, dn, ino))
        elif op.kind == EXCHANGE:
            da, na, a = self._lookup(op.path)
            db, nb, b = self._lookup(op.dst)
            if a is None or b is None:
                raise ModelError(f"{op}: one side does not exist in the model")
            self._change(index, op, (da, na, b), (db, nb, a))
        else:
            raise ModelError(f"unknown operation {op.kind!r}")

    # ------------------------------------------------------------------------------------------ states
    def now(self) -> Tree:
        """What the directory holds now (no crash)."""
        def build(d: int) -> Tree:
            return {name: build(i) if self.inodes[i].kind == "d" else bytes(self.inodes[i].data)
                    for name, i in self.inodes[d].entries.items()}

        return build(self.root_ino)

    def pending(self) -> list[Change]:
        return [c for c in self.changes if c.pending]

    def namespace(self, kept: set[int]) -> dict[int, dict]:
        """Every directory's entries after a crash in which, of the pending changes, those with an index in
        ``kept`` persisted (in log order)."""
        dirs = {d: dict(e) for d, e in self.durable.items() if self.inodes[d].kind == "d"}
        for c in self.changes:
            if not c.pending or c.index in kept:
                for d, name, ino in c.writes:
                    if ino is None:
                        dirs[d].pop(name, None)
                    else:
                        dirs[d][name] = ino
        return dirs

    def reachable_files(self, dirs: dict[int, dict]) -> list[tuple[str, int]]:
        out, seen = [], set()

        def walk(d: int, prefix: str) -> None:
            if d in seen:
                return
            seen.add(d)
            for name, ino in sorted(dirs[d].items()):
                if self.inodes[ino].kind == "d":
                    walk(ino, prefix + name + "/")
                else:
                    out.append((prefix + name, ino))

        walk(self.root_ino, "")
        return out

    def build(self, dirs: dict[int, dict], content: dict[int, bytes]) -> Tree:
        seen: set[int] = set()

        def build(d: int) -> Tree:
            seen.add(d)
            return {name: (build(i) if i not in seen else {}) if self.inodes[i].kind == "d" else content[i]
                    for name, i in dirs[d].items()}

        return build(self.root_ino)

    def variants(self, ino: int) -> list[tuple[str, bytes]]:
        """The contents a crash may leave in file ``ino`` (one, when all of it is synced)."""
        node = self.inodes[ino]
        data, synced = bytes(node.data), node.synced
        if data == synced:
            return [("synced", data)]
        base = synced if data.startswith(synced) else b""
        torn = data[:len(base) + (len(data) - len(base)) // 2]
        zeros = base + bytes(len(data) - len(base))
        out: dict[bytes, str] = {}
        cuts = (("torn", torn), ("zero tail", zeros)) if not node.beside else ()
        for name, v in (("all written", data), ("as synced", synced), *cuts):
            out.setdefault(v, name)
        return [(name, v) for v, name in out.items()]


@dataclass
class State:
    prefix: int  # the crash came after this many operations of the log
    lost: tuple  # the pending entry changes that did not persist
    data: tuple  # (path, variant) of every file whose unsynced data was cut
    tree: Tree

    def describe(self, log: list[Op]) -> str:
        last = f"after op {self.prefix}: {log[self.prefix - 1]}" if self.prefix else "before the first op"
        lost = "; ".join(str(c.op) for c in self.lost) or "none"
        data = ", ".join(f"{p}: {v}" for p, v in self.data) or "none"
        return f"crash {last}; entry changes not persisted: {lost}; unsynced file data: {data}"


def _subsets(n: int, rng: random.Random) -> list[tuple[bool, ...]]:
    if n <= EXHAUSTIVE_CHANGES:
        return list(itertools.product((False, True), repeat=n))
    picks = {tuple([False] * n), tuple([True] * n)}
    for i in range(n):
        picks.add(tuple(j == i for j in range(n)))
        picks.add(tuple(j != i for j in range(n)))
    while len(picks) < max(MAX_SUBSETS, 2 * n + 2):
        picks.add(tuple(rng.random() < 0.5 for _ in range(n)))
    return sorted(picks)


def _combos(sizes: list[int], rng: random.Random) -> list[tuple[int, ...]]:
    total = 1
    for s in sizes:
        total *= s
    if total <= MAX_DATA_COMBOS:
        return list(itertools.product(*[range(s) for s in sizes]))
    picks = {tuple(k % s for s in sizes) for k in range(max(sizes))}
    while len(picks) < MAX_DATA_COMBOS:
        picks.add(tuple(rng.randrange(s) for s in sizes))
    return sorted(picks)


def coalesce(log: list[Op]) -> list[Op]:
    """``log`` with every run of consecutive writes that extend one file merged into one write: a crash inside
    the run leaves the file with a prefix of the run's bytes unsynced, the kind of state the data variants
    (as synced, torn, zero tail, all written) already check at the end of the run."""
    out: list[Op] = []
    for op in log:
        last = out[-1] if out else None
        if (op.kind == WRITE and last is not None and last.kind == WRITE and last.path == op.path
                and op.offset == last.offset + len(last.data)):
            out[-1] = replace(last, data=last.data + op.data)
        else:
            out.append(op)
    return out


def crash_states(root: str, before: Tree, log: list[Op], after: Tree | None = None) -> Iterator[State]:
    """Every state (within the bounds above) a power loss may leave at every prefix of ``log`` (coalesced:
    :func:`coalesce`). With ``after`` (the directory as the save left it), the replayed model must end equal
    to it."""
    log = coalesce(log)
    model = Model(root, before)
    for prefix in range(len(log) + 1):
        if prefix:
            model.apply(prefix - 1, log[prefix - 1])
        rng = random.Random(SEED * 1_000_003 + prefix)
        pending = model.pending()
        for mask in _subsets(len(pending), rng):
            kept = {c.index for c, keep in zip(pending, mask) if keep}
            dirs = model.namespace(kept)
            files = model.reachable_files(dirs)
            content = {ino: bytes(model.inodes[ino].data) for _, ino in files}
            cut = [(path, ino, model.variants(ino)) for path, ino in files]
            cut = [x for x in cut if len(x[2]) > 1]
            lost = tuple(c for c, keep in zip(pending, mask) if not keep)
            for combo in _combos([len(v) for _, _, v in cut], rng):
                for (path, ino, variants), k in zip(cut, combo):
                    content[ino] = variants[k][1]
                yield State(prefix, lost, tuple((p, v[k][0]) for (p, _, v), k in zip(cut, combo)),
                            model.build(dirs, content))
    if after is not None and model.now() != after:
        raise ModelError(f"the replayed log does not end in the directory the save left: model {_names(model.now())}"
                         f", directory {_names(after)}")


def _names(tree: Tree, prefix: str = "") -> list[str]:
    out = []
    for name, v in sorted(tree.items()):
        out.append(prefix + name + ("/" if isinstance(v, dict) else f" ({len(v)} B)"))
        if isinstance(v, dict):
            out += _names(v, prefix + name + "/")
    return out


# ------------------------------------------------------------------------------------------------ checker
@dataclass
class Failure:
    state: str
    problem: str


@dataclass
class Report:
    """What :func:`check` found: ``problems`` holds, for every state enumerated, the problems found there."""

    prefixes: int = 0
    distinct: int = 0
    problems: list = field(default_factory=list)
    failures: list = field(default_factory=list)  # Failure, one per problem of each distinct failing state

    @property
    def states(self) -> int:
        return len(self.problems)

    def held(self, kinds: tuple[str, ...] | None = None) -> int:
        """The states in which no problem (of ``kinds``, a problem's text before its first colon) was found."""
        return sum(not [p for p in found if kinds is None or p.split(":", 1)[0] in kinds] for found in self.problems)

    def select(self, kinds: tuple[str, ...]) -> list[Failure]:
        return [f for f in self.failures if f.problem.split(":", 1)[0] in kinds]


def check(root: str, before: Tree, log: list[Op], after: Tree, work: str,
          promises: Callable[[str], list[str]], *, stop_at: tuple[str, ...] = ()) -> Report:
    """Materialize every crash state of ``log`` under ``work`` and run ``promises(directory)`` on each distinct
    one: it returns the problems found there (empty when every promise held), each ``"<kind>: <text>"``.
    ``stop_at``: stop after the first state with a problem of one of these kinds."""
    root = os.path.abspath(root)
    log = coalesce(log)
    report = Report(prefixes=len(log) + 1)
    seen: dict[str, list[str]] = {}
    for state in crash_states(root, before, log, after):
        if report.select(stop_at):
            break
        key = tree_key(state.tree)
        if key not in seen:
            path = os.path.join(work, f"s{len(seen)}", os.path.basename(root))
            materialize(state.tree, path)
            try:
                seen[key] = promises(path)
            finally:
                shutil.rmtree(os.path.dirname(path), ignore_errors=True)
            report.distinct += 1
            for problem in seen[key]:
                report.failures.append(Failure(state.describe(log).replace(root + os.sep, ""), problem))
        report.problems.append(seen[key])
    return report


def log_text(log: list[Op], root: str) -> str:
    """The log, one numbered operation a line, paths relative to ``root``."""
    return "\n".join(f"{i + 1:3d}. {op}".replace(root + os.sep, "") for i, op in enumerate(log))


def summary(report: Report, failures: list[Failure], limit: int = 5) -> str:
    lines = [f"{len(failures)} problem(s) in {report.distinct} distinct crash states ({report.states} enumerated, "
             f"{report.prefixes} prefixes)"]
    for f in failures[:limit]:
        lines.append(f"- {f.state}\n  {f.problem}")
    return "\n".join(lines)

