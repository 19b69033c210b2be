"""``asyncckpt.Config``: one frozen dataclass tree that YAML maps onto 1:1. Every error names the dotted key
(or the file) at fault and is a ``ConfigError`` (also a ``ValueError``)."""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch

import asyncckpt
from asyncckpt import CodecConfig, Config, ConfigError, WriterConfig

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
    data = {"max_inflight": 3, "on_busy": "skip", "overwrite": True, "allow_pickle": True, "verify_on_load": False,
            "pin_memory": "never", "keep_last": 2, "save_rng_state": False, "commit_timeout_s": 12, "tag_validation": "warn",
            "use_node_local_storage": True,
            "codec": {"compression": False, "level": -3, "shuffle": False, "chunk_mib": 1, "min_saving": 0.5,
                      "fast_planes": False},
            "writer": {"threads_per_node": 4, "files_per_rank": 2, "inflight_chunks": 8, "fsync": False, "nice": 0,
                       "ionice_idle": True, "memory_budget_mib": 512}}
    c = Config.from_dict(data)
    assert c.to_dict() == {**data, "commit_timeout_s": 12.0, "codec": {**data["codec"], "chunk_mib": 1.0},
                           "writer": {**data["writer"], "memory_budget_mib": 512.0}}
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


def test_example_yaml_loads():
    if not os.path.exists(EXAMPLE):
        pytest.skip("examples/ckpt.yaml is not there")
    c = Config.from_yaml(EXAMPLE)
    assert isinstance(c, Config)
    assert c == Config()  # the example documents the defaults


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
        assert e.writer.chunk_bytes == 256 << 10 and e.writer.files_per_rank == 3 and e.writer.fsync is False
        assert e.writer.codec.compression is False and e.writer.codec.level == 5
        saver.save_checkpoint(save_dir, tag="t").result(timeout=30)
    reader = asyncckpt.CheckpointReader(save_dir, "t")
    assert sum(1 for n in reader.files if n.endswith(".bin")) == 3  # one data file per tensor
    assert "rng" not in reader.skeleton()
    assert {c.codec for recs in reader.records.values() for _, r in recs for c in r.chunks} == {"raw"}
