"""``asyncckpt.Config``: one frozen dataclass tree that YAML maps onto 1:1. Every error names the dotted key
(or the file) at fault and is a ``ConfigError`` (also a ``ValueError``)."""
from __future__ import annotations

import dataclasses
import math
import os
import re
import typing

import pytest
import torch
import yaml

import asyncckpt
from asyncckpt import CodecConfig, Config, ConfigError, WriterConfig
from asyncckpt.config import StorageConfig

pytestmark = pytest.mark.timeout(30)

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "ckpt.yaml")


def test_defaults_and_structure():
    c = Config()
    assert c.max_inflight == 1 and c.on_busy == "wait" and c.overwrite is False and c.allow_pickle is False
    assert isinstance(c.codec, CodecConfig) and isinstance(c.writer, WriterConfig)
    assert Config.from_dict({}) == Config.from_dict(None) == c
    assert hash(c) == hash(Config())  # frozen and hashable (engines are cached per config)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.max_inflight = 2  # type: ignore[misc]


def test_from_dict_round_trips_every_key():
    data = {"max_inflight": 3, "on_busy": "skip", "busy_wait_s": 5, "overwrite": True, "allow_pickle": True, "verify_on_load": False,
            "pin_memory": "never", "keep_last": 2, "save_rng_state": False, "commit_timeout_s": 12, "tag_validation": "warn",
            "use_node_local_storage": True, "save_deadline_s": 30, "verify_replicated": True, "snapshot": "lazy",
            "snapshot_device": "always", "snapshot_device_headroom_mib": 512,
            "codec": {"compression": False, "level": -3, "shuffle": False, "chunk_mib": 1, "min_saving": 0.5,
                      "fast_planes": False},
            "writer": {"threads_per_node": 4, "files_per_rank": 2, "inflight_chunks": 8, "fsync": False, "nice": 0,
                       "ionice_idle": True, "memory_budget_mib": 512, "mode": "service"},
            "storage": {"options": {"endpoint_url": "http://127.0.0.1:9000", "client_kwargs": {"verify": False}},
                        "block_mib": 8}}
    c = Config.from_dict(data)
    assert c.to_dict() == {**data, "busy_wait_s": 5.0, "commit_timeout_s": 12.0, "save_deadline_s": 30.0,
                           "snapshot_device_headroom_mib": 512.0, "codec": {**data["codec"], "chunk_mib": 1.0},
                           "writer": {**data["writer"], "memory_budget_mib": 512.0},
                           "storage": {**data["storage"], "block_mib": 8.0}}
    assert Config.from_dict(c.to_dict()) == c
    assert isinstance(c.commit_timeout_s, float) and c.codec.chunk_bytes == 1 << 20
    assert c.writer.memory_budget_bytes == 512 << 20
    assert {f.name for f in dataclasses.fields(Config)} == set(data)  # the test covers every key


@pytest.mark.parametrize("data, key", [
    ({"max_inflite": 2}, "max_inflite"),
    ({"codec": {"levle": 3}}, "codec.levle"),
    ({"writer": {"threads": 4}}, "writer.threads"),
    ({"codec": {"level": 1, "zstd": {"x": 1}}}, "codec.zstd"),
])
def test_unknown_keys_are_named(data, key):
    with pytest.raises(ConfigError) as ei:
        Config.from_dict(data)
    assert f"unknown config key {key!r}" in str(ei.value)
    assert "known keys here" in str(ei.value)
    assert isinstance(ei.value, ValueError) and isinstance(ei.value, asyncckpt.CheckpointError)


@pytest.mark.parametrize("data, key", [
    ({"max_inflight": "2"}, "max_inflight"),
    ({"max_inflight": 2.0}, "max_inflight"),
    ({"max_inflight": True}, "max_inflight"),
    ({"overwrite": "yes"}, "overwrite"),
    ({"overwrite": 1}, "overwrite"),
    ({"on_busy": 1}, "on_busy"),
    ({"commit_timeout_s": "10"}, "commit_timeout_s"),
    ({"commit_timeout_s": False}, "commit_timeout_s"),
    ({"codec": {"level": 1.5}}, "codec.level"),
    ({"codec": {"compression": "off"}}, "codec.compression"),
    ({"codec": {"chunk_mib": None}}, "codec.chunk_mib"),
    ({"writer": {"fsync": 0}}, "writer.fsync"),
    ({"writer": {"nice": "low"}}, "writer.nice"),
    ({"codec": 5}, "codec"),
    ({"writer": ["fsync"]}, "writer"),
])
def test_bad_types_are_named(data, key):
    with pytest.raises(ConfigError) as ei:
        Config.from_dict(data)
    assert repr(key) in str(ei.value), str(ei.value)


@pytest.mark.parametrize("data, key", [
    ({"max_inflight": 0}, "max_inflight"),
    ({"max_inflight": 65}, "max_inflight"),
    ({"on_busy": "maybe"}, "on_busy"),
    ({"pin_memory": "sometimes"}, "pin_memory"),
    ({"keep_last": -1}, "keep_last"),
    ({"commit_timeout_s": 0}, "commit_timeout_s"),
    ({"busy_wait_s": -1}, "busy_wait_s"),
    ({"busy_wait_s": 1e8}, "busy_wait_s"),
    ({"tag_validation": "strict"}, "tag_validation"),
    ({"codec": {"level": 23}}, "codec.level"),
    ({"codec": {"level": -8}}, "codec.level"),
    ({"codec": {"chunk_mib": 0}}, "codec.chunk_mib"),
    ({"codec": {"chunk_mib": 2048}}, "codec.chunk_mib"),
    ({"codec": {"min_saving": 1.0}}, "codec.min_saving"),
    ({"codec": {"min_saving": -0.1}}, "codec.min_saving"),
    ({"writer": {"threads_per_node": -1}}, "writer.threads_per_node"),
    ({"writer": {"files_per_rank": 0}}, "writer.files_per_rank"),
    ({"writer": {"inflight_chunks": 5000}}, "writer.inflight_chunks"),
    ({"writer": {"nice": 20}}, "writer.nice"),
    ({"writer": {"memory_budget_mib": -1}}, "writer.memory_budget_mib"),
])
def test_bad_values_are_named(data, key):
    with pytest.raises(ConfigError) as ei:
        Config.from_dict(data)
    assert f"config key {key!r}" in str(ei.value), str(ei.value)


def test_direct_construction_is_validated():
    with pytest.raises(ConfigError, match="'max_inflight'"):
        Config(max_inflight=0)
    with pytest.raises(ConfigError, match="'codec.level'"):
        Config(codec=CodecConfig(level=99))
    with pytest.raises(ConfigError, match="'writer.nice'"):
        Config(writer=WriterConfig(nice=-1))
    with pytest.raises(ConfigError, match="'on_busy'"):
        Config().replace(on_busy="never")
    assert Config().replace(max_inflight=4).max_inflight == 4


def test_coerce():
    c = Config(max_inflight=2)
    assert Config.coerce(c) is c and Config.coerce(None) == Config()
    assert Config.coerce({"max_inflight": 2}) == c
    with pytest.raises(ConfigError, match="must be a Config, a mapping, a YAML path or None"):
        Config.coerce(42)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="unknown config key 'bogus'"):
        asyncckpt.AsyncCheckpointer(torch.nn.Linear(2, 2), config={"bogus": 1})


# ---------------------------------------------------------------------------------------------- YAML
def test_from_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("max_inflight: 2\non_busy: skip\ncodec:\n  level: 3\n  chunk_mib: 0.5\nwriter:\n  fsync: false\n")
    c = Config.from_yaml(p)
    assert (c.max_inflight, c.on_busy, c.codec.level, c.codec.chunk_mib, c.writer.fsync) == (2, "skip", 3, 0.5, False)
    assert Config.from_yaml(str(p)) == c == Config.coerce(str(p))
    p.write_text("")
    assert Config.from_yaml(p) == Config()  # an empty file is the default configuration
    p.write_text("# only a comment\ncodec:\n")
    assert Config.from_yaml(p) == Config()


@pytest.mark.parametrize("text, needle", [
    ("max_inflite: 2\n", "unknown config key 'max_inflite'"),
    ("codec:\n  levle: 3\n", "unknown config key 'codec.levle'"),
    ("codec:\n  level: high\n", "config key 'codec.level'"),
    ("writer:\n  nice: 40\n", "config key 'writer.nice'"),
    ("on_busy: [wait]\n", "config key 'on_busy'"),
    ("max_inflight: [1, 2\n", "not valid YAML"),
    ("max_inflight: 1\n  on_busy: wait\n", "not valid YAML"),
    ("- max_inflight\n- 2\n", "the top level must be a mapping"),
    ("just a string\n", "the top level must be a mapping"),
    ("codec: 3\n", "config key 'codec' must be a mapping"),
])
def test_yaml_errors_name_the_file_and_key(tmp_path, text, needle):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as ei:
        Config.from_yaml(p)
    assert needle in str(ei.value), str(ei.value)
    assert str(p) in str(ei.value)


def test_missing_yaml_file(tmp_path):
    p = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="cannot read config file") as ei:
        Config.from_yaml(p)
    assert str(p) in str(ei.value)
    with pytest.raises(ConfigError, match="nope.yaml"):
        asyncckpt.AsyncCheckpointer(torch.nn.Linear(2, 2), config=str(p))


def _fields(cls, prefix: str = "") -> set[str]:
    out = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out |= _fields(hints[f.name], prefix + f.name + ".")
        else:
            out.add(prefix + f.name)
    return out


def _yaml_keys(d: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in d.items():
        out |= _yaml_keys(v, prefix + k + ".") if isinstance(v, dict) and v else {prefix + k}  # {}: a mapping key
    return out


@pytest.mark.thread_only("ASYNCCKPT_WRITER_MODE=service changes the default Config()")
def test_example_yaml_is_the_default_config():
    assert Config.from_yaml(EXAMPLE) == Config()


def test_example_yaml_documents_every_key():
    with open(EXAMPLE) as f:
        text = f.read()
    assert _yaml_keys(yaml.safe_load(text)) == _fields(Config)
    lines = text.splitlines()
    for i, line in enumerate(lines):  # each key has a comment on the line(s) above it
        if re.match(r"^\s*\w+:", line):
            assert lines[i - 1].strip().startswith("#"), f"key without a comment above it: {line!r}"


def test_busy_wait_s_is_the_slot_wait_and_defaults_to_commit_timeout_s():
    assert Config().busy_wait_s == 0.0 and Config().slot_wait_s == Config().commit_timeout_s == 600.0
    assert Config(commit_timeout_s=7).slot_wait_s == 7.0  # unchanged behaviour when busy_wait_s is not set
    assert Config(commit_timeout_s=7, busy_wait_s=2).slot_wait_s == 2.0


def test_busy_wait_s_bounds_the_wait_for_a_staging_slot(save_dir, writer_gate):
    """on_busy wait with a long commit_timeout_s: a save that finds no free slot fails after busy_wait_s."""
    cfg = {"max_inflight": 1, "on_busy": "wait", "busy_wait_s": 0.2, "commit_timeout_s": 600,
           "writer": {"threads_per_node": 1, "nice": 0, "fsync": False}}
    with asyncckpt.AsyncCheckpointer(torch.nn.Linear(4, 4), config=cfg) as saver:
        gate = writer_gate(saver.engine)
        first = saver.save_checkpoint(save_dir, tag="first")
        assert gate.entered.wait(30)
        with pytest.raises(asyncckpt.SaverBusyError, match=r"within 0\.2s"):
            saver.save_checkpoint(save_dir, tag="second")
        gate.open()
        assert first.result(timeout=30).tag == "first"


def test_pin_memory_always_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ConfigError, match="'pin_memory'"):
        asyncckpt.AsyncCheckpointer(torch.nn.Linear(2, 2), config={"pin_memory": "always"})


def test_config_reaches_the_engine(save_dir):
    cfg = {"max_inflight": 3, "save_rng_state": False, "codec": {"chunk_mib": 0.25, "compression": False, "level": 5},
           "writer": {"threads_per_node": 2, "files_per_rank": 3, "nice": 0, "fsync": False}}
    model = torch.nn.Sequential(*(torch.nn.Linear(200, 200, bias=False) for _ in range(3)))  # three equal tensors
    with asyncckpt.AsyncCheckpointer(model, config=cfg) as saver:
        e = saver.engine
        assert len(e.pool.slots) == 3
        if e.service is None:  # thread mode: this process's writer; service mode: the files below show it
            assert e.writer.chunk_bytes == 256 << 10 and e.writer.files_per_rank == 3 and e.writer.fsync is False
            assert e.writer.codec.compression is False and e.writer.codec.level == 5
        else:
            assert e.writer is None  # the training process runs no writer in service mode
        saver.save_checkpoint(save_dir, tag="t").result(timeout=30)
    reader = asyncckpt.CheckpointReader(save_dir, "t")
    assert sum(1 for n in reader.files if n.endswith(".bin")) == 3  # one data file per tensor
    assert "rng" not in reader.skeleton()
    assert {c.codec for recs in reader.records.values() for _, r in recs for c in r.chunks} == {"raw"}


# ----------------------------------------------------------------------------- every key, every bad shape
def _keys(kind: type) -> list[str]:
    """Every dotted config key whose field has the annotated type ``kind``."""
    out = []
    for section, prefix in ((Config, ""), (CodecConfig, "codec."), (WriterConfig, "writer."), (StorageConfig, "storage.")):
        hints = typing.get_type_hints(section)
        out += [prefix + f.name for f in dataclasses.fields(section) if hints[f.name] is kind]
    return out


FLOAT_KEYS, INT_KEYS, BOOL_KEYS, STR_KEYS, DICT_KEYS = _keys(float), _keys(int), _keys(bool), _keys(str), _keys(dict)
CHOICE_KEYS = ["codec.compression"]  # true | false | auto (tests/test_codec_auto.py)


def nested(key: str, value) -> dict:
    """``nested("codec.level", 3)`` → ``{"codec": {"level": 3}}``."""
    head, _, tail = key.partition(".")
    return {head: nested(tail, value)} if tail else {head: value}


def construct(key: str, value):
    """Build the config directly (no from_dict): ``Config(codec=CodecConfig(level=value))``."""
    head, _, tail = key.partition(".")
    if not tail:
        return Config(**{head: value})
    section = {"codec": CodecConfig, "writer": WriterConfig, "storage": StorageConfig}[head]
    return section(**{tail: value})


def yaml_text(key: str, scalar: str) -> str:
    head, _, tail = key.partition(".")
    return f"{head}:\n  {tail}: {scalar}\n" if tail else f"{head}: {scalar}\n"


def refused_everywhere(tmp_path, key: str, value, scalar: str | None, expected: str) -> None:
    """``value`` for ``key`` is a ConfigError naming the key from a mapping, from direct construction and
    (``scalar``, its YAML spelling) from a file, whose name the error carries."""
    for build in (lambda: Config.from_dict(nested(key, value)), lambda: construct(key, value)):
        with pytest.raises(ConfigError) as ei:
            build()
        assert f"config key {key!r}: expected {expected}" in str(ei.value), str(ei.value)
    if scalar is not None:
        p = tmp_path / "bad.yaml"
        p.write_text(yaml_text(key, scalar))
        with pytest.raises(ConfigError) as ei:
            Config.from_yaml(p)
        assert f"config key {key!r}: expected {expected}" in str(ei.value) and str(p) in str(ei.value), str(ei.value)


def test_the_key_lists_cover_every_field():
    assert len(FLOAT_KEYS) == 8 and len(INT_KEYS) == 7 and len(BOOL_KEYS) == 10 and len(STR_KEYS) == 6
    assert DICT_KEYS == ["storage.options"]
    everything = {f.name for f in dataclasses.fields(Config)} - {"codec", "writer", "storage"}
    everything |= {f"codec.{f.name}" for f in dataclasses.fields(CodecConfig)}
    everything |= {f"writer.{f.name}" for f in dataclasses.fields(WriterConfig)}
    everything |= {f"storage.{f.name}" for f in dataclasses.fields(StorageConfig)}
    assert everything == set(FLOAT_KEYS + INT_KEYS + BOOL_KEYS + STR_KEYS + DICT_KEYS + CHOICE_KEYS)


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value, scalar", [(math.inf, ".inf"), (-math.inf, "-.inf"), (math.nan, ".nan"),
                                           (math.inf, ".Inf"), (math.nan, ".NaN")])
def test_float_keys_must_be_finite(tmp_path, key, value, scalar):
    """``.inf`` was accepted for commit_timeout_s and writer.memory_budget_mib (an OverflowError later)."""
    refused_everywhere(tmp_path, key, value, scalar, "a finite number")


@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_float_keys_refuse_integers_too_large_for_a_float(tmp_path, key):
    """A 400-digit integer was an OverflowError from float(), not a ConfigError; the message stays short."""
    with pytest.raises(ConfigError) as ei:
        Config.from_dict(nested(key, 10 ** 400))
    assert f"config key {key!r}" in str(ei.value) and len(str(ei.value)) < 200
    refused_everywhere(tmp_path, key, 10 ** 400, "1" + "0" * 400, "a finite number")


@pytest.mark.parametrize("key, value", [("commit_timeout_s", 1e8), ("commit_timeout_s", 1e300),
                                        ("writer.memory_budget_mib", float(1 << 31)),
                                        ("writer.memory_budget_mib", 1e300)])
def test_float_keys_have_an_upper_bound(tmp_path, key, value):
    refused_everywhere(tmp_path, key, value, repr(value), "a number")


@pytest.mark.parametrize("key", INT_KEYS)
def test_int_keys_refuse_floats_even_integral_ones(tmp_path, key):
    """Chosen rule: an int key takes an integer literal only; ``1.0`` is refused rather than truncated."""
    refused_everywhere(tmp_path, key, 1.0, "1.0", "an integer")
    refused_everywhere(tmp_path, key, True, "true", "an integer")
    refused_everywhere(tmp_path, key, "1", "'1'", "an integer")


@pytest.mark.parametrize("key", INT_KEYS)
def test_int_keys_refuse_huge_integers(tmp_path, key):
    refused_everywhere(tmp_path, key, 10 ** 30, "1" + "0" * 30, "an integer in")
    refused_everywhere(tmp_path, key, -10 ** 30, "-1" + "0" * 30, "an integer in")


@pytest.mark.parametrize("key", BOOL_KEYS)
def test_bool_keys_refuse_strings_and_numbers(tmp_path, key):
    for value in ("yes", "true", "no", "on"):
        refused_everywhere(tmp_path, key, value, repr(value), "true or false")
    refused_everywhere(tmp_path, key, 1, "1", "true or false")


@pytest.mark.parametrize("key", BOOL_KEYS)
@pytest.mark.parametrize("scalar, value", [("true", True), ("False", False), ("yes", True), ("off", False)])
def test_unquoted_yaml_booleans_are_booleans(tmp_path, key, scalar, value):
    """YAML 1.1 (PyYAML) reads unquoted yes/no/on/off as booleans; only a quoted string is refused."""
    p = tmp_path / "c.yaml"
    p.write_text(yaml_text(key, scalar))
    c = Config.from_yaml(p)
    head, _, tail = key.partition(".")
    assert (getattr(getattr(c, head), tail) if tail else getattr(c, head)) is value


@pytest.mark.parametrize("key", STR_KEYS)
def test_string_keys_refuse_yaml_booleans_and_numbers(tmp_path, key):
    refused_everywhere(tmp_path, key, False, "off", "a string")
    refused_everywhere(tmp_path, key, 1, "1", "a string")


def test_ints_for_float_keys_become_floats_the_same_way_everywhere():
    for key in FLOAT_KEYS:
        n = {"codec.min_saving": 0, "storage.block_mib": 64}.get(key, 1)  # in range for every float key
        a, b = Config.from_dict(nested(key, n)), construct(key, n)
        head, _, tail = key.partition(".")
        value = getattr(b, tail) if tail else getattr(b, head)
        assert type(value) is float and value == n
        assert (getattr(a, head) if tail else a) == b
    assert Config(commit_timeout_s=10) == Config.from_dict({"commit_timeout_s": 10.0})


def test_direct_construction_checks_types_like_from_dict():
    """Direct construction skipped the type checks (``Config(max_inflight="2")`` was a TypeError,
    ``Config(overwrite="yes")`` was accepted)."""
    with pytest.raises(ConfigError, match="'max_inflight': expected an integer"):
        Config(max_inflight="2")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="'overwrite': expected true or false"):
        Config(overwrite="yes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="'codec': expected a CodecConfig"):
        Config(codec={"level": 3})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="'writer': expected a WriterConfig"):
        Config(writer=CodecConfig())  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="'codec.level': expected an integer in"):
        CodecConfig(level=99)  # a section on its own names its dotted key
    with pytest.raises(ConfigError, match="'codec.chunk_mib': expected a finite number"):
        dataclasses.replace(CodecConfig(), chunk_mib=math.nan)
    with pytest.raises(ConfigError, match="'commit_timeout_s': expected a finite number"):
        Config().replace(commit_timeout_s=math.inf)


# ------------------------------------------------------------------------------------- YAML file errors
@pytest.mark.parametrize("data, line", [
    (b"max_inflight: 1\n# caf\xe9\n", 2),  # latin-1 in a comment
    (b"on_busy: \xff\xfe\n", 1),  # in a value
    (b"\xff\xfem\x00a\x00", 1),  # UTF-16
    (b"codec:\n  level: 1\n  \xc3\n", 3),  # a cut multi-byte sequence
])
def test_non_utf8_yaml_names_the_file(tmp_path, data, line):
    """A non-UTF-8 file was a UnicodeDecodeError naming no file."""
    p = tmp_path / "latin.yaml"
    p.write_bytes(data)
    with pytest.raises(ConfigError) as ei:
        Config.from_yaml(p)
    assert str(p) in str(ei.value) and "not UTF-8" in str(ei.value) and f"(line {line})" in str(ei.value)
    with pytest.raises(ConfigError, match="not UTF-8"):
        asyncckpt.AsyncCheckpointer(torch.nn.Linear(2, 2), config=str(p))


def test_utf8_with_a_byte_order_mark_loads(tmp_path):
    p = tmp_path / "bom.yaml"
    p.write_bytes(b"\xef\xbb\xbfmax_inflight: 2\non_busy: skip # caf\xc3\xa9\n")
    assert Config.from_yaml(p) == Config(max_inflight=2, on_busy="skip")


@pytest.mark.parametrize("text, key, lines", [
    ("max_inflight: 1\nmax_inflight: 2\n", "max_inflight", (1, 2)),
    ("max_inflight: 2\nmax_inflight: 2\n", "max_inflight", (1, 2)),  # even with the same value
    ("codec:\n  level: 1\n  shuffle: true\n  level: 2\n", "codec.level", (2, 4)),
    ("writer:\n  nice: 0\ncodec: {}\nwriter:\n  fsync: false\n", "writer", (1, 4)),
    ("codec: {level: 1, level: 2}\n", "codec.level", (1, 1)),
    ("codec:\n  <<: {level: 1}\n  level: 3\n", "codec.level", (2, 3)),  # a merge key and the key itself
    ("codec:\n  <<: [{level: 1}, {level: 2}]\n", "codec.level", (2, 2)),  # two merged mappings
    ("codec: &c\n  level: 1\nwriter:\n  <<: *c\n  nice: 0\ncodec2:\n  <<: *c\n", None, None),  # no duplicate
    ("codec: &c {level: 1, chunk_mib: 1}\nx: 1\n", None, None),
])
def test_duplicate_yaml_keys_are_refused(tmp_path, text, key, lines):
    """A key given twice was silently 'last one wins'; now it is an error naming the dotted key and both
    lines, also when a merge key (``<<``) brings the duplicate in."""
    p = tmp_path / "dup.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as ei:
        Config.from_yaml(p)
    msg = str(ei.value)
    assert str(p) in msg
    if key is None:  # no duplicate here: the error is about something else (an unknown key)
        assert "given twice" not in msg and "unknown config key" in msg
    else:
        assert f"config key {key!r} is given twice (line {lines[0]} and line {lines[1]})" in msg, msg


def test_anchors_without_duplicates_still_load(tmp_path):
    p = tmp_path / "anchors.yaml"
    p.write_text("codec: &c\n  level: 3\nwriter: {nice: &n 5, threads_per_node: *n}\n")
    c = Config.from_yaml(p)
    assert c.codec.level == 3 and c.writer.nice == c.writer.threads_per_node == 5
