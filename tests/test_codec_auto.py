"""``codec.compression: auto``: a byte plane is compressed only while that shortens the save at the write and
encode rates measured so far (and saves ``min_saving``), decided per plane and recorded in the index as raw and
zstd planes always were. Rates are injected (a frozen clock, so the codec's own timings add bytes but no
seconds, and preset measurements), never taken from the wall clock."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import asyncckpt
from asyncckpt import api
from asyncckpt.codec import ChunkCodec, Throughput
from asyncckpt.format import ChunkRecord

LOTS = 1 << 40  # preset measurements this large are not moved by what a test's own saves add
FAST, SLOW = 20e9, 20e6  # bytes per second


def rates(write: float | None, encode: float | None, threads: int = 2) -> Throughput:
    """A Throughput whose disk writes ``write`` and whose encoder thread compresses ``encode`` bytes/s."""
    tp = Throughput(threads, clock=lambda: 0.0)
    if write is not None:
        tp.wrote(LOTS, LOTS / write)
    if encode is not None:
        tp.encoded(LOTS, LOTS / encode)
    return tp


def floats(nbytes: int, dtype=np.float32, seed: int = 0, *, quantized: bool = False) -> np.ndarray:
    """Gaussian floats (compressible sign/exponent plane, noise mantissa) as a uint8 chunk; ``quantized``:
    multiples of 1/64 (short mantissas: compressible unshuffled too)."""
    n = nbytes // np.dtype(dtype).itemsize
    x = np.random.default_rng(seed).standard_normal(n)
    return (np.round(x * 64) / 64 if quantized else x).astype(dtype).view(np.uint8)


def noise(nbytes: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


def decoded(enc, nbytes: int) -> np.ndarray:
    rec = ChunkRecord(0, enc.length, enc.raw, enc.codec, enc.xxh3, enc.planes, enc.sxxh3)
    stored = b"".join(bytes(memoryview(p).cast("B")) for p in enc.pieces)
    out = np.empty(nbytes, dtype=np.uint8)
    ChunkCodec.decode(rec, memoryview(stored), out, verify=True, where="test")
    return out


# every element size the shuffle sees, small planes (no sample probe) and large ones (sampled first), and
# unshuffled chunks (one zstd frame at `level`)
CASES = [pytest.param(dtype, size, shuffle, id=f"{np.dtype(dtype).name}-{size >> 10}KiB-{'shuffle' if shuffle else 'plain'}")
         for dtype in (np.float16, np.float32, np.float64) for size in (16 << 10, 4 << 20) for shuffle in (True, False)]


@pytest.mark.parametrize("dtype,size,shuffle", CASES)
def test_slow_disk_and_fast_codec_compress(dtype, size, shuffle):
    codec = ChunkCodec("auto", shuffle=shuffle, throughput=rates(write=SLOW, encode=FAST))
    raw = floats(size, dtype, quantized=True)
    enc = codec.encode(raw, np.dtype(dtype).itemsize)
    if shuffle:
        assert enc.codec == "shuffle" and "zstd" in {c for c, _ in enc.planes}
    else:
        assert enc.codec == "zstd"
    assert enc.length < raw.nbytes
    assert np.array_equal(decoded(enc, raw.nbytes), raw)


@pytest.mark.parametrize("dtype,size,shuffle", CASES)
def test_fast_disk_and_slow_codec_store_raw(dtype, size, shuffle):
    codec = ChunkCodec("auto", shuffle=shuffle, throughput=rates(write=FAST, encode=SLOW))
    raw = floats(size, dtype, quantized=True)
    assert ChunkCodec(True, shuffle=shuffle).encode(raw, np.dtype(dtype).itemsize).codec != "raw"  # it would pay in bytes
    enc = codec.encode(raw, np.dtype(dtype).itemsize)
    assert (enc.codec, enc.length, enc.planes) == ("raw", raw.nbytes, ())
    assert len(enc.pieces) == 1 and enc.pieces[0] is raw  # not even shuffled: the chunk is written as it is
    assert np.array_equal(decoded(enc, raw.nbytes), raw)


@pytest.mark.parametrize("size", [16 << 10, 4 << 20])
@pytest.mark.parametrize("itemsize", [1, 2, 4, 8])
def test_incompressible_data_is_raw_even_on_a_slow_disk(size, itemsize):
    codec = ChunkCodec("auto", throughput=rates(write=SLOW, encode=FAST))
    raw = noise(size)
    enc = codec.encode(raw, itemsize)
    assert enc.codec == "raw" and enc.length == raw.nbytes
    assert np.array_equal(decoded(enc, raw.nbytes), raw)


def two_planes(nbytes: int, seed: int) -> np.ndarray:
    """2-byte elements whose low byte takes 4 values (a plane that saves ~70%) and whose high byte takes 64
    (one that saves ~20%)."""
    rng = np.random.default_rng(seed)
    n = nbytes // 2
    return np.stack([rng.integers(0, 4, n, dtype=np.uint8), rng.integers(0, 64, n, dtype=np.uint8)], 1).reshape(-1)


def test_in_between_the_planes_that_save_most_go_first_and_the_encoders_keep_pace_with_the_disk():
    """Encoding a plane (2 threads) takes 0.8 x the disk time of writing it raw: the plane that saves most is
    compressed in every chunk, the other one only with the encoders' slack (some chunks, not all), and the
    encoders' time never exceeds the disk's by more than one plane."""
    plane = 2 << 20
    write = SLOW
    encode = write / (0.8 * 2)
    codec = ChunkCodec("auto", throughput=rates(write=write, encode=encode))
    on = ChunkCodec(True).encode(two_planes(2 * plane, 0), 2)
    assert [c for c, _ in on.planes] == ["zstd", "zstd"] and on.planes[0][1] < 0.4 * plane < 0.75 * plane < on.planes[1][1]
    disk_s = encode_s = 0.0
    second = []
    for seed in range(10):
        raw = two_planes(2 * plane, seed)
        enc = codec.encode(raw, 2)
        assert enc.codec == "shuffle" and enc.planes[0][0] == "zstd", (seed, enc.planes)
        assert np.array_equal(decoded(enc, raw.nbytes), raw)
        second.append(enc.planes[1][0] == "zstd")
        disk_s += enc.length / write
        encode_s += sum(c == "zstd" for c, _ in enc.planes) * plane / (encode * 2)
        assert encode_s <= disk_s + plane / (encode * 2)
    assert any(second) and not all(second), second


def test_unknown_rates_compress():
    """Before the writer reported enough (or the codec measured enough), auto behaves as compression on."""
    raw = floats(4 << 20)
    for tp in (rates(None, None), rates(FAST, None), rates(None, SLOW), Throughput(2, clock=lambda: 0.0)):
        assert ChunkCodec("auto", throughput=tp).encode(raw, 4).codec == "shuffle"


@pytest.mark.parametrize("compression,expected", [(True, "shuffle"), (False, "raw")])
def test_explicit_on_and_off_ignore_the_rates(compression, expected):
    raw = floats(4 << 20)
    for tp in (rates(FAST, SLOW), rates(SLOW, FAST)):
        enc = ChunkCodec(compression, throughput=tp).encode(raw, 4)
        assert enc.codec == expected
        assert np.array_equal(decoded(enc, raw.nbytes), raw)


def test_the_rates_follow_what_was_measured():
    tp = Throughput(4, clock=lambda: 0.0, halflife_bytes=100, min_write_bytes=10, min_encode_bytes=10)
    assert tp.write_rate is None and tp.encode_rate is None
    tp.wrote(5, 1.0)
    assert tp.write_rate is None  # fewer bytes than min_write_bytes
    tp.wrote(6, 0.0)
    fade = 0.5 ** (6 / 100)  # 6 newer bytes of a half-life of 100
    assert tp.write_rate == pytest.approx((5 * fade + 6) / (1.0 * fade), rel=1e-9)
    tp.wrote(0, 9.0)  # an fsync: its time is charged to the bytes written before it
    assert tp.write_rate < 1.1
    tp.wrote(10_000, 10.0)  # a hundred half-lives later the old measurements are gone
    assert tp.write_rate == pytest.approx(1000, rel=1e-6)
    tp.encoded(100, 0.1)
    assert tp.encode_rate == pytest.approx(1000)


def test_a_plane_is_compressed_while_the_encoders_keep_pace_with_the_disk():
    """Disk and encoders both take 1000 bytes/s, 4 encoder threads: a plane of 100 bytes takes 0.025 s to
    encode and 0.1 s to write raw. The slower side of the pipeline decides."""
    tp = Throughput(4, clock=lambda: 0.0, halflife_bytes=1e15, min_write_bytes=1, min_encode_bytes=1)
    tp.wrote(1000, 1.0)
    tp.encoded(1000, 1.0)
    assert tp.choose(100, 10)  # 0.025 s of encoding instead of 0.1 s of disk
    tp.stored(100, 90)  # the disk has 0.09 s of work
    # each plane adds 0.025 s of encoding; the disk would have 0.09 + 0.09 s (0.09 + 0.1 s if raw): from the
    # 7th on, the encoders would be the slower side, later than storing it raw
    assert [tp.choose(100, 10) for _ in range(8)] == [True] * 6 + [False] * 2
    tp.stored(100, 100)  # raw: 0.1 s more of disk, and room for more encoding
    assert [tp.choose(100, 10) for _ in range(5)] == [True] * 4 + [False]
    assert not tp.choose(100, 100)  # even a plane that would vanish: the encoders are the slower side now


def test_writing_times_a_block_with_the_clock():
    ticks = iter([1.0, 3.0])
    tp = Throughput(clock=lambda: next(ticks), min_write_bytes=1)
    with tp.writing(100):
        pass
    assert tp.write_rate == pytest.approx(50.0)


# ------------------------------------------------------------------------------------ through the writer
def _state() -> dict:
    gen = torch.Generator().manual_seed(0)
    return {"w": torch.randn(1 << 20, generator=gen), "m": torch.randn(256, 1024, generator=gen).double(),
            "h": torch.randn(300_000, generator=gen).half(), "noise": torch.randint(0, 256, (1 << 20,), dtype=torch.uint8, generator=gen)}


def _codecs(save_dir: str, tag: str) -> dict[str, set[str]]:
    reader = asyncckpt.CheckpointReader(save_dir, tag)
    return {k: {c.codec for c in r[0][1].chunks} for k, r in reader.records.items()}


@pytest.mark.thread_only("reads the in-process writer's throughput estimator (engine.writer.codec)")
@pytest.mark.parametrize("write,encode,compressed", [(SLOW, FAST, True), (FAST, SLOW, False)])
def test_a_save_records_each_decision_in_the_index_and_loads_bit_exact(tmp_path, write, encode, compressed):
    cfg = asyncckpt.Config.from_dict({"codec": {"chunk_mib": 1},  # an engine of its own for each case:
                                      "writer": {"threads_per_node": 2, "nice": 0, "inflight_chunks": 3 + compressed}})
    engine = api._engine(cfg)
    tp = engine.writer.codec.throughput
    assert tp.threads == 2  # the writer pool tells the estimator how many encoders share the work
    tp.clock = lambda: 0.0
    tp.wrote(LOTS, LOTS / write)
    tp.encoded(LOTS, LOTS / encode)
    state = _state()
    save_dir = str(tmp_path / "ck")
    asyncckpt.save(state, save_dir, "t", config=cfg).result(timeout=60)
    codecs = _codecs(save_dir, "t")
    assert codecs["noise"] == {"raw"}
    for key in ("w", "m", "h"):
        assert codecs[key] == ({"shuffle"} if compressed else {"raw"}), key
    out = asyncckpt.load(save_dir, "t")
    for key, value in state.items():
        assert torch.equal(out[key].view(torch.uint8), value.view(torch.uint8)), key


@pytest.mark.thread_only("reads the in-process writer's throughput estimator (engine.writer.codec)")
def test_the_writer_reports_every_byte_it_writes(tmp_path):
    cfg = asyncckpt.Config.from_dict({"codec": {"chunk_mib": 1, "compression": False},
                                      "writer": {"threads_per_node": 1, "nice": 0}})
    tp = api._engine(cfg).writer.codec.throughput
    tp.min_write_bytes = 1
    before = tp._write.bytes
    asyncckpt.save({"x": torch.zeros(3 << 20, dtype=torch.uint8)}, str(tmp_path / "ck"), "t", config=cfg).result(60)
    assert tp._write.bytes - before == pytest.approx(3 << 20, rel=0.01)  # faded a little by its own bytes
    assert tp.write_rate is not None


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("text,value", [("auto", "auto"), ("true", True), ("false", False), ("on", True),
                                        ("off", False), ('"auto"', "auto")])
def test_compression_values_from_yaml(tmp_path, text, value):
    path = tmp_path / "c.yaml"
    path.write_text(f"codec:\n  compression: {text}\n")
    cfg = asyncckpt.Config.from_yaml(path)
    assert cfg.codec.compression is value if isinstance(value, bool) else cfg.codec.compression == value
    assert ChunkCodec.from_config(cfg.codec).compression == value


def test_compression_defaults_to_auto():
    assert asyncckpt.Config().codec.compression == "auto" and ChunkCodec().compression == "auto"


@pytest.mark.parametrize("value", ["on", "off", "Auto", "AUTO", "true", "", 0, 1, 1.0, None, [], {"auto": 1}])
def test_other_compression_values_are_refused(value):
    with pytest.raises(asyncckpt.ConfigError, match=r"codec\.compression.*true \| false \| auto"):
        asyncckpt.Config.from_dict({"codec": {"compression": value}})
    with pytest.raises(asyncckpt.ConfigError, match=r"codec\.compression"):
        asyncckpt.CodecConfig(compression=value)


@pytest.mark.parametrize("text", ["sometimes", "1", "0", "null", "[]", "'on'", "Auto", "yes_please"])
def test_other_compression_values_in_a_file_name_the_file_and_key(tmp_path, text):
    path = tmp_path / "bad.yaml"
    path.write_text(f"codec:\n  compression: {text}\n")
    with pytest.raises(asyncckpt.ConfigError) as ei:
        asyncckpt.Config.from_yaml(path)
    assert str(path) in str(ei.value) and "config key 'codec.compression': expected true | false | auto" in str(ei.value)
