"""The engine owns the event loop its saves run on (asyncckpt.threads.EventLoopThread); the writer pool only
encodes and writes: its ``write_rank`` coroutine runs on whatever loop awaits it and starts no loop of its own."""
from __future__ import annotations

import asyncio
import os
import threading

import pytest
import torch

import asyncckpt
from asyncckpt.codec import ChunkCodec
from asyncckpt.config import CodecConfig
from asyncckpt.format import parse_rank_index, rank_index_name
from asyncckpt.staging import Slot
from asyncckpt.state import flatten
from asyncckpt.threads import EventLoopThread
from asyncckpt.writer import WriterPool

pytestmark = pytest.mark.timeout(60)


def _io_threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.endswith("-io")}


def test_the_writer_only_writes_on_its_callers_loop(tmp_path):
    before = _io_threads()
    writer = WriterPool(ChunkCodec.from_config(CodecConfig(chunk_mib=1 / 64)), threads=2,
                        chunk_bytes=CodecConfig(chunk_mib=1 / 64).chunk_bytes, fsync=False, nice=0, name="t-writer")
    try:
        assert _io_threads() == before  # no event loop thread of its own
        state = {"w": torch.arange(10_000, dtype=torch.float32), "step": 3}
        flat = flatten(state)
        slot = Slot(0, False)
        slot.stage(flat.items)()
        files = asyncio.run(writer.write_rank(directory=str(tmp_path), rank=0, flat=flat, slot=slot,
                                              skeleton=flat.skeleton))  # a loop the test owns
        with open(os.path.join(tmp_path, files.index_name), "rb") as f:
            _, records = parse_rank_index(f.read(), files.index_name)
        assert files.index_name == rank_index_name(0) and "w" in records
    finally:
        writer.close()


def test_the_engine_runs_its_saves_on_its_own_loop(tmp_path, fast_config):
    with asyncckpt.AsyncCheckpointer(torch.nn.Linear(3, 3), config=fast_config()) as saver:
        engine = saver.engine
        assert isinstance(engine.loop, EventLoopThread) and not hasattr(engine.writer, "submit")
        seen = engine.loop.submit(_loop_thread()).result(30)
        assert seen.endswith("-io") and seen != threading.current_thread().name
        assert saver.save_checkpoint(str(tmp_path), tag="t").result(30).tag == "t"


async def _loop_thread() -> str:
    return threading.current_thread().name
