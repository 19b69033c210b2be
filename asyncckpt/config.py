"""Every knob of asyncckpt, as one tree of small frozen dataclasses that YAML maps onto 1:1.

``Config.from_yaml(path)`` and ``Config.from_dict(mapping)`` reject unknown keys and bad values with a
:class:`~asyncckpt.errors.ConfigError` naming the dotted key (``writer.threads``). ``examples/ckpt.yaml``
documents every key.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from .errors import ConfigError

ON_BUSY = ("wait", "skip", "error")
TAG_VALIDATION = ("warn", "fail", "ignore")
PIN_MEMORY = ("auto", "always", "never")


@dataclass(frozen=True)
class CodecConfig:
    """How each chunk is encoded before it is written."""

    compression: bool = True  # off: chunks are stored raw (still checksummed)
    level: int = 1  # zstd level, 1..22 (negative levels are zstd's fast modes, down to -7)
    shuffle: bool = True  # byte-shuffle by element size before compressing
    chunk_mib: float = 4.0  # a tensor is split into independently decodable chunks of this size
    min_saving: float = 0.05  # a byte plane is kept compressed only when it saves at least this fraction
    fast_planes: bool = True  # byte planes use zstd parameters tuned for float data (faster and smaller than
    #                           level 1 there); false: planes use `level` too. Unshuffled data always uses `level`.

    def validate(self, path: str) -> None:
        _check(-7 <= self.level <= 22, f"{path}.level", self.level, "an integer in -7..22")
        _check(1 / 64 <= self.chunk_mib <= 1024, f"{path}.chunk_mib", self.chunk_mib, "a number in 1/64..1024")
        _check(0.0 <= self.min_saving < 1.0, f"{path}.min_saving", self.min_saving, "a number in [0, 1)")

    @property
    def chunk_bytes(self) -> int:
        return max(4096, int(self.chunk_mib * (1 << 20)) // 64 * 64)


@dataclass(frozen=True)
class WriterConfig:
    """The background writer pool. Its budget is per node: local ranks split it between them."""

    threads_per_node: int = 0  # encode threads for the whole node; 0 = the node's CPU count, at most 8
    files_per_rank: int = 1  # data files each rank writes concurrently
    inflight_chunks: int = 0  # encoded chunks buffered ahead of the disk per rank; 0 = 2 x threads
    fsync: bool = True  # fsync files and directories before publishing (never turn off in production)
    nice: int = 10  # added niceness of writer threads (0 = leave as is), as Megatron's async worker does
    ionice_idle: bool = False  # best-effort I/O class 'idle' for writer threads (Linux); default lowers to 'best-effort 7'
    memory_budget_mib: float = 0  # staging memory for the node (all local ranks); 0 = unlimited

    def validate(self, path: str) -> None:
        _check(0 <= self.threads_per_node <= 1024, f"{path}.threads_per_node", self.threads_per_node, "an integer in 0..1024")
        _check(1 <= self.files_per_rank <= 256, f"{path}.files_per_rank", self.files_per_rank, "an integer in 1..256")
        _check(0 <= self.inflight_chunks <= 4096, f"{path}.inflight_chunks", self.inflight_chunks, "an integer in 0..4096")
        _check(0 <= self.nice <= 19, f"{path}.nice", self.nice, "an integer in 0..19")
        _check(self.memory_budget_mib >= 0, f"{path}.memory_budget_mib", self.memory_budget_mib, "a number >= 0")

    @property
    def memory_budget_bytes(self) -> int:
        return int(self.memory_budget_mib * (1 << 20))


@dataclass(frozen=True)
class Config:
    """The whole configuration. Every field is a YAML key of the same name."""

    max_inflight: int = 1  # saves staged or being written at once; each holds one set of host buffers
    on_busy: str = "wait"  # when max_inflight saves are in flight: wait | skip | error
    overwrite: bool = False  # allow saving over an existing tag
    allow_pickle: bool = False  # allow non-JSON Python objects (pickled) in saved and loaded state
    verify_on_load: bool = True  # check every chunk's checksum while loading
    pin_memory: str = "auto"  # host buffers: auto (pinned iff CUDA is available) | always | never
    keep_last: int = 0  # after publishing, delete all but the newest N tags this saver published; 0 = keep all
    save_rng_state: bool = True  # include python/numpy/torch/CUDA RNG states in AsyncCheckpointer saves
    commit_timeout_s: float = 600.0  # deadline for every cross-rank step of a commit (and of a load)
    tag_validation: str = "fail"  # a tag that differs across ranks: warn | fail | ignore
    use_node_local_storage: bool = False  # each node's local rank 0 publishes that node's copy
    codec: CodecConfig = field(default_factory=CodecConfig)
    writer: WriterConfig = field(default_factory=WriterConfig)

    def validate(self, path: str = "") -> None:
        p = f"{path}." if path else ""
        _check(1 <= self.max_inflight <= 64, f"{p}max_inflight", self.max_inflight, "an integer in 1..64")
        _check(self.on_busy in ON_BUSY, f"{p}on_busy", self.on_busy, " | ".join(ON_BUSY))
        _check(self.pin_memory in PIN_MEMORY, f"{p}pin_memory", self.pin_memory, " | ".join(PIN_MEMORY))
        _check(self.keep_last >= 0, f"{p}keep_last", self.keep_last, "an integer >= 0")
        _check(self.commit_timeout_s > 0, f"{p}commit_timeout_s", self.commit_timeout_s, "a number > 0")
        _check(self.tag_validation in TAG_VALIDATION, f"{p}tag_validation", self.tag_validation, " | ".join(TAG_VALIDATION))
        self.codec.validate(f"{p}codec")
        self.writer.validate(f"{p}writer")

    def __post_init__(self) -> None:
        if type(self) is Config:
            self.validate()

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, *, source: str = "config") -> "Config":
        """Build a Config from a (YAML-shaped) mapping; unknown keys and bad types raise ConfigError."""
        try:
            return _build(cls, data or {}, "", source)
        except ConfigError:
            raise
        except (TypeError, ValueError) as exc:  # from validate() inside nested constructors
            raise ConfigError(f"{source}: {exc}") from None

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "Config":
        import yaml

        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {str(path)!r}: {exc.strerror or exc}") from exc
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if data is not None and not isinstance(data, Mapping):
            raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
        return cls.from_dict(data, source=str(path))

    @classmethod
    def coerce(cls, config: "Config | Mapping[str, Any] | str | os.PathLike | None") -> "Config":
        """Accept a Config, a mapping, a YAML path or None (defaults)."""
        if config is None:
            return cls()
        if isinstance(config, Config):
            return config
        if isinstance(config, Mapping):
            return cls.from_dict(config)
        if isinstance(config, (str, os.PathLike)):
            return cls.from_yaml(config)
        raise ConfigError(f"config must be a Config, a mapping, a YAML path or None, not {type(config).__name__}")

    def replace(self, **changes: Any) -> "Config":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"config key {key!r}: expected {expected}, got {value!r}")


def _build(cls: type, data: Mapping[str, Any], prefix: str, source: str):
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: config key {prefix.rstrip('.') or '<root>'!r} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    unknown = [k for k in data if k not in known]
    if unknown:
        raise ConfigError(
            f"{source}: unknown config key {prefix + str(unknown[0])!r}; known keys here: {', '.join(sorted(known))}"
        )
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        key = prefix + name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value if value is not None else {}, key + ".", source)
        else:
            kwargs[name] = _coerce_scalar(hint, value, key, source)
    obj = cls.__new__(cls)
    try:
        obj.__init__(**kwargs)
        if cls is not Config:
            obj.validate(prefix.rstrip("."))
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return obj


def _coerce_scalar(hint: Any, value: Any, key: str, source: str) -> Any:
    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{source}: config key {key!r}: expected {expected}, got {value!r}")

    if hint is bool:
        if isinstance(value, bool):
            return value
        raise bad("true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad("an integer")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad("a number")
    if hint is str:
        if isinstance(value, str):
            return value
        raise bad("a string")
    raise bad(str(hint))  # pragma: no cover - every field has one of the types above
