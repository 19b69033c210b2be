"""Save coordination at scale (issue 13, items 11 and 12): the real CommitCoordinator protocol, run for 1,024
and 4,096 simulated ranks (threads, tests/fake_collectives.py, a small save into a temporary directory). A rank
other than rank 0 receives the same few hundred bytes and makes the same collective calls per save whatever
the world size; only rank 0, which decides, receives O(ranks). docs/SCALE.md has the model and the figures."""
from __future__ import annotations

import os
from dataclasses import dataclass

import pytest

import asyncckpt.placement as placement
from asyncckpt.commit import CommitCoordinator, DistContext
from asyncckpt.errors import CommitError
import asyncckpt.format as fmt
from asyncckpt.owners import ROW, parse_rank_row
from asyncckpt.io_types import RankOutcome
from fake_collectives import FakeJob, Meter

SIZES = (1024, 4096)
PER_NODE = 8  # node-local storage: ranks per simulated node


@dataclass
class Figures:
    world: int
    root: Meter  # rank 0, per save
    other: Meter  # the most any other rank received, per save
    publisher: Meter  # the most any other publisher received (node-local storage), per save


def _outcome(rank: int, ctx: DistContext, partial: str, ok: bool = True) -> RankOutcome:
    """What rank ``rank``'s writer reports, after writing its (empty) sealed index into ``partial`` as the writer
    would: the publisher reads every index of its ranks to build the owner table."""
    sealed = fmt.seal({"format_version": fmt.FORMAT_VERSION, "rank": rank, "files": {}, "tensors": {},
                       "skeleton": {"step": 0}})
    name = fmt.rank_index_name(rank)
    if ok:
        with open(os.path.join(partial, name), "wb") as f:
            f.write(sealed)
    return RankOutcome(rank, ok, error="" if ok else "OSError: [Errno 28] No space left on device",
                       index_name=name, index_xxh3=fmt.checksum(sealed), bytes_written=len(sealed),
                       node=ctx.node, replicated_fp="fedcba9876543210")


def _simulate(root_dir: str, world: int, node_local: bool = False, saves: int = 1, fail: int = -1) -> tuple[list, FakeJob]:
    """Every simulated rank joins (PER_NODE ranks per node), then makes ``saves`` saves, with node-local storage
    when ``node_local``; each rank's (meter of its last save, whether it publishes, path or error of each save).
    Rank ``fail`` reports a failed write in the last save."""
    job = FakeJob(world)

    def rank_main(rank: int):
        ctx = DistContext.join(job.comm(rank), (f"node{rank // PER_NODE}", rank % PER_NODE, PER_NODE))
        coord = CommitCoordinator(ctx, node_local=node_local, fsync=False, timeout_s=job.timeout_s)
        save_dir = os.path.join(root_dir, f"node{ctx.node_index}" if node_local else "shared")
        results = []
        for k in range(saves):
            before = Meter(**vars(job.meters[rank]))
            spec = {"sequence": k, "save_dir": save_dir, "save_latest": True, "overwrite": False, "keep_last": 0,
                    "codec": "zstd(level=1)", "manifest global_steps": k}
            try:
                prepared = coord.prepare(save_dir, f"step{k}", "", spec)
                partial = os.path.join(save_dir, fmt.partial_dir_name(prepared.tag))
                outcome = _outcome(rank, ctx, partial, ok=not (rank == fail and k == saves - 1))
                info = coord.commit(save_dir, prepared.tag, outcome,
                                    True, {"global_steps": k}, prepared.save_id)
                results.append(info.path)
            except CommitError as exc:
                results.append(exc)
            after = job.meters[rank]
            delta = Meter(after.bytes - before.bytes, after.calls - before.calls, after.ops - before.ops)
        coord.close()
        return delta, coord.is_publisher, results

    out = job.run(rank_main)
    for r, o in enumerate(out):
        if isinstance(o, BaseException):
            raise AssertionError(f"simulated rank {r} failed") from o
    return out, job


def _figures(world: int, out: list) -> Figures:
    def most(meters: list[Meter]) -> Meter:
        return max(meters, key=lambda m: (m.bytes, m.calls), default=Meter())

    return Figures(world, out[0][0], most([d for d, pub, _ in out[1:] if not pub]),
                   most([d for d, pub, _ in out[1:] if pub]))


def _report(label: str, figures: list[Figures]) -> None:
    for f in figures:
        print(f"{label} N={f.world}: rank 0 {f.root.bytes} B in {f.root.calls} calls ({f.root.ops} ops); other ranks "
              f"at most {f.other.bytes} B in {f.other.calls} calls ({f.other.ops} ops); other publishers at most "
              f"{f.publisher.bytes} B in {f.publisher.calls} calls")


def _assert_o1(small: Figures, large: Figures) -> None:
    assert large.other.bytes <= 1.5 * small.other.bytes, (small, large)
    assert large.other.calls == small.other.calls and large.other.ops == small.other.ops, (small, large)
    if small.publisher.calls:
        assert large.publisher.bytes <= 1.5 * small.publisher.bytes, (small, large)
        assert large.publisher.calls == small.publisher.calls, (small, large)
    assert large.root.bytes >= 3 * small.root.bytes  # rank 0 decides: it receives O(N), and only it does


def _ranks_listed(tag_dir) -> list[int]:
    """The ranks the published copy's rank table lists."""
    with open(os.path.join(tag_dir, fmt.RANK_TABLE), "rb") as f:
        rows = f.read()
    return [parse_rank_row(rows[i: i + ROW], fmt.RANK_TABLE)[0] for i in range(0, len(rows), ROW)]


def test_shared_storage_costs_each_rank_the_same_at_1024_and_4096_ranks(tmp_path):
    figures = []
    for world in SIZES:
        out, _ = _simulate(str(tmp_path / str(world)), world)
        for r, (_, _, results) in enumerate(out):
            assert results == [str(tmp_path / str(world) / "shared" / "step0")], (r, results)
        assert _ranks_listed(tmp_path / str(world) / "shared" / "step0") == list(range(world))
        figures.append(_figures(world, out))
    _report("shared storage", figures)
    _assert_o1(*figures)


def test_node_local_storage_costs_each_rank_the_same_at_1024_and_4096_ranks(tmp_path):
    figures = []
    for world in SIZES:
        out, _ = _simulate(str(tmp_path / str(world)), world, True)
        for r, (_, _, results) in enumerate(out):
            assert results == [str(tmp_path / str(world) / f"node{r // PER_NODE}" / "step0")], (r, results)
        assert _ranks_listed(tmp_path / str(world) / f"node{world // PER_NODE - 1}" / "step0") == \
            list(range(world - PER_NODE, world))
        with open(tmp_path / str(world) / f"node{world // PER_NODE - 1}" / "latest") as f:
            assert f.read() == "step0\n"
        figures.append(_figures(world, out))
    _report("node-local storage", figures)
    _assert_o1(*figures)


@pytest.mark.parametrize("node_local", [False, True])
def test_a_failed_rank_fails_the_save_on_every_simulated_rank(tmp_path, node_local):
    out, _ = _simulate(str(tmp_path), 256, node_local, saves=2, fail=77)
    texts = {str(results[-1]) for _, _, results in out}
    assert len(texts) == 1, texts  # every rank raises the same error, naming the rank
    (text,) = texts
    assert "was not published" in text and "rank 77: OSError: [Errno 28]" in text, text
    assert all(results[-1].failures == {77: "OSError: [Errno 28] No space left on device"} for _, _, results in out)
    for d in os.listdir(tmp_path):
        assert not any(n.startswith(".step1") and not n.endswith(".lock") for n in os.listdir(tmp_path / d)), d


def test_the_replicated_split_is_computed_once_per_layout(monkeypatch):
    calls = []
    real = placement.assign_replicated
    monkeypatch.setattr(placement, "assign_replicated", lambda *a: calls.append(a) or real(*a))
    split = placement.ReplicatedSplit()
    sizes = [100, 40, 40, 30, 8]
    first = split.owned("layout-a", sizes, 3, {4}, 1)
    for _ in range(5):  # every later save with this layout reuses it
        assert split.owned("layout-a", sizes, 3, {4}, 1) == first
    assert len(calls) == 1
    assert first == {i for i, r in enumerate(real(sizes, 3, {4})) if r == 1}
    split.owned("layout-b", sizes + [7], 3, {4}, 1)  # another layout: computed anew
    assert len(calls) == 2


@pytest.mark.parametrize("world", [1, 2, 3, 7, 64])
def test_the_replicated_split_is_the_same_balanced_assignment_as_before(world):
    """The heap gives exactly the answer of the linear scan it replaced (lowest load, then lowest rank)."""
    import random

    rng = random.Random(world)
    for _ in range(20):
        sizes = [rng.choice([1, 8, 8, 64, 1000, rng.randrange(1, 5000)]) for _ in range(rng.randrange(0, 60))]
        pinned = {i for i in range(len(sizes)) if rng.random() < 0.2}
        owner, load = [0] * len(sizes), [0] * world
        for i in pinned:
            load[0] += sizes[i]
        for i in sorted((i for i in range(len(sizes)) if i not in pinned), key=lambda i: (-sizes[i], i)):
            r = min(range(world), key=lambda r: (load[r], r))
            owner[i] = r
            load[r] += sizes[i]
        assert placement.assign_replicated(sizes, world, pinned) == owner


def test_an_error_while_rank_0_decides_fails_the_save_on_every_rank_instead_of_hanging(tmp_path, monkeypatch):
    import asyncckpt.commit as commit

    def broken(specs, groups):
        raise RuntimeError("injected")

    monkeypatch.setattr(commit, "spec_mismatches", broken)
    out, _ = _simulate(str(tmp_path), 16)
    for _, _, (result,) in out:
        assert isinstance(result, CommitError), result
        assert "coordination failed on rank 0 (tag validation): RuntimeError: injected" in str(result), result
