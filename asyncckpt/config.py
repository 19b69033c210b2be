"""Every knob of asyncckpt, as one tree of small frozen dataclasses that YAML maps onto 1:1.

``Config.from_yaml(path)``, ``Config.from_dict(mapping)`` and direct construction (``Config(...)``,
``CodecConfig(...)``, ``dataclasses.replace``) all check every key the same way: a bad type or value, a number
that is not finite, and, in YAML, a file that is not UTF-8 or a key given twice raise a
:class:`~asyncckpt.errors.ConfigError` naming the file (if any) and the dotted key (``writer.threads``).
``examples/ckpt.yaml`` documents every key.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Literal, Mapping

from .errors import ConfigError
from .format import MIN_CHUNK_BYTES

ON_BUSY = ("wait", "skip", "error")
TAG_VALIDATION = ("warn", "fail", "ignore")
PIN_MEMORY = ("auto", "always", "never")
SNAPSHOT = ("eager", "lazy")
SNAPSHOT_DEVICE = ("auto", "always", "never")
WRITER_MODES = ("thread", "service")
WRITER_MODE_ENV = "ASYNCCKPT_WRITER_MODE"  # the default of writer.mode when set (a config that gives it wins)
MAX_TIMEOUT_S = 1e7  # about 115 days; far below what threading and gloo accept
MAX_MEMORY_MIB = float(1 << 30)  # 1 PiB
MAX_KEEP_LAST = 1_000_000


class _Section:
    """Base of the config dataclasses: on construction every field is checked against its annotated type
    (ints stay ints, a float key takes an int or a float and stores a float, which must be finite), then
    :meth:`validate` checks the ranges. ``_key`` is the section's dotted key in the YAML file."""

    _key: ClassVar[str] = ""

    def __post_init__(self) -> None:
        prefix = f"{self._key}." if self._key else ""
        for name, hint in _hints(type(self)).items():
            object.__setattr__(self, name, _coerce(hint, getattr(self, name), prefix + name))
        self.validate()  # each section's range checks


@dataclass(frozen=True)
class CodecConfig(_Section):
    """How each chunk is encoded before it is written."""

    _key: ClassVar[str] = "codec"
    compression: Literal[True, False, "auto"] = "auto"  # auto: compress a byte plane only while that costs the
    #   save no time (the encoders keep pace with the disk, at rates measured as saves run) and saves min_saving;
    #   true: wherever it saves min_saving; false: chunks are stored raw (still checksummed)
    level: int = 1  # zstd level, 1..22 (negative levels are zstd's fast modes, down to -7)
    shuffle: bool = True  # byte-shuffle by element size before compressing
    chunk_mib: float = 4.0  # a tensor is split into independently decodable chunks of this size
    min_saving: float = 0.05  # a byte plane is kept compressed only when it saves at least this fraction
    fast_planes: bool = True  # byte planes use zstd parameters tuned for float data (faster and smaller than
    #                           level 1 there); false: planes use `level` too. Unshuffled data always uses `level`.

    def validate(self) -> None:
        _check(-7 <= self.level <= 22, "codec.level", self.level, "an integer in -7..22")
        _check(1 / 64 <= self.chunk_mib <= 1024, "codec.chunk_mib", self.chunk_mib, "a number in 1/64..1024")
        _check(0.0 <= self.min_saving < 1.0, "codec.min_saving", self.min_saving, "a number in [0, 1)")

    @property
    def chunk_bytes(self) -> int:
        return max(MIN_CHUNK_BYTES, int(self.chunk_mib * (1 << 20)) // 64 * 64)


@dataclass(frozen=True)
class WriterConfig(_Section):
    """The background writer pool. Its budget is per node: local ranks split it between them."""

    _key: ClassVar[str] = "writer"
    threads_per_node: int = 0  # encode threads for the whole node; 0 = the node's CPU count, at most 8
    files_per_rank: int = 1  # data files each rank writes concurrently
    inflight_chunks: int = 0  # encoded chunks buffered ahead of the disk per rank; 0 = 2 x threads
    fsync: bool = True  # fsync files and directories before publishing (never turn off in production)
    nice: int = 10  # added niceness of writer threads (0 = leave as is), as Megatron's async worker does
    ionice_idle: bool = False  # best-effort I/O class 'idle' for writer threads (Linux); default lowers to 'best-effort 7'
    memory_budget_mib: float = 0  # staging memory for the node (all local ranks); 0 = unlimited
    mode: str = field(default_factory=lambda: os.environ.get(WRITER_MODE_ENV) or "thread")  # thread: writer
    #   threads in the training process | service: a per-node writer process; default $ASYNCCKPT_WRITER_MODE

    def validate(self) -> None:
        _check(self.mode in WRITER_MODES, "writer.mode", self.mode, " | ".join(WRITER_MODES)
               + (f" (its default comes from ${WRITER_MODE_ENV})" if os.environ.get(WRITER_MODE_ENV) else ""))
        _check(0 <= self.threads_per_node <= 1024, "writer.threads_per_node", self.threads_per_node, "an integer in 0..1024")
        _check(1 <= self.files_per_rank <= 256, "writer.files_per_rank", self.files_per_rank, "an integer in 1..256")
        _check(0 <= self.inflight_chunks <= 4096, "writer.inflight_chunks", self.inflight_chunks, "an integer in 0..4096")
        _check(0 <= self.nice <= 19, "writer.nice", self.nice, "an integer in 0..19")
        _check(0 <= self.memory_budget_mib <= MAX_MEMORY_MIB, "writer.memory_budget_mib", self.memory_budget_mib,
               f"a number in 0..{MAX_MEMORY_MIB:.0f} (1 PiB)")

    @property
    def node_threads(self) -> int:
        """The node's encode threads: ``threads_per_node``, or by default the node's CPU count, at most 8."""
        return self.threads_per_node or max(1, min(8, os.cpu_count() or 1))

    @property
    def memory_budget_bytes(self) -> int:
        return int(self.memory_budget_mib * (1 << 20))


@dataclass(frozen=True)
class StorageConfig(_Section):
    """Where a save directory given as a URL (``s3://bucket/run``) is stored (docs/STORAGE.md). A local path
    ignores this group."""

    _key: ClassVar[str] = "storage"
    options: dict = field(default_factory=dict, hash=False)  # fsspec options (s3fs: endpoint_url, key,
    #                                              secret, client_kwargs, config_kwargs, ...), passed as given
    block_mib: float = 64.0  # multipart upload part size (S3 allows 5..5120 MiB)

    def validate(self) -> None:
        for key in self.options:
            _check(isinstance(key, str) and key.isidentifier(), "storage.options", key,
                   "option names that are identifiers (keyword arguments of the fsspec file system)")
        _check("block_size" not in self.options, "storage.options.block_size", self.options.get("block_size"),
               "no block_size here: set storage.block_mib")
        _check(5 <= self.block_mib <= 5120, "storage.block_mib", self.block_mib, "a number in 5..5120")

    def fsspec_options(self) -> dict[str, Any]:
        """What :func:`asyncckpt.storage.open_storage` takes: the options and the part size."""
        return {**self.options, "block_size": int(self.block_mib * (1 << 20))}


@dataclass(frozen=True)
class Config(_Section):
    """The whole configuration. Every field is a YAML key of the same name."""

    max_inflight: int = 1  # saves staged or being written at once; each holds one set of host buffers
    on_busy: str = "wait"  # when max_inflight saves are in flight: wait | skip | error
    busy_wait_s: float = 0.0  # on_busy wait: the longest a save waits for a free staging slot; 0 = commit_timeout_s
    overwrite: bool = False  # allow saving over an existing tag
    allow_pickle: bool = False  # allow non-JSON Python objects (pickled) in saved and loaded state
    verify_on_load: bool = True  # check every chunk's checksum while loading
    pin_memory: str = "auto"  # host buffers: auto (pinned iff CUDA is available) | always | never
    keep_last: int = 0  # after publishing, delete all but the newest N tags of the save directory; 0 = keep all
    save_rng_state: bool = True  # include python/numpy/torch/CUDA RNG states in AsyncCheckpointer saves
    commit_timeout_s: float = 600.0  # deadline for every cross-rank step of a commit (and of a load)
    save_deadline_s: float = 0.0  # a save whose slowest rank took longer (from its save call) is not published; 0 = none
    tag_validation: str = "fail"  # a tag that differs across ranks: warn | fail | ignore
    use_node_local_storage: bool = False  # each node's local rank 0 publishes that node's copy
    verify_replicated: bool = False  # compare every rank's copy of each replicated tensor (checksums) at commit
    snapshot: str = "lazy"  # AsyncCheckpointer: lazy (copy in the background until the next optimizer step /
    #   forward / load_state_dict; see saver.wait_snapshot; the default: on an H100 the next step was 14 ms late
    #   instead of 189 ms) | eager (copy before save_checkpoint returns)
    snapshot_device: str = "never"  # copy CUDA state into a device buffer first (milliseconds), then drain it
    #   to the host through a small pinned ring: auto (when the device has room) | always (refuse a save that
    #   cannot) | never (copy straight to host buffers; the default: on an H100 lazy host staging stalled
    #   less, and the device buffer is training memory)
    snapshot_device_headroom_mib: float = 2048.0  # device memory a device snapshot must leave free
    codec: CodecConfig = field(default_factory=CodecConfig)
    writer: WriterConfig = field(default_factory=WriterConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)

    def validate(self) -> None:
        """Range checks of the top-level keys (the sections checked their own when they were built)."""
        _check(1 <= self.max_inflight <= 64, "max_inflight", self.max_inflight, "an integer in 1..64")
        _check(self.on_busy in ON_BUSY, "on_busy", self.on_busy, " | ".join(ON_BUSY))
        _check(0 <= self.busy_wait_s <= MAX_TIMEOUT_S, "busy_wait_s", self.busy_wait_s,
               f"a number >= 0 (0 = commit_timeout_s) and at most {MAX_TIMEOUT_S:.0f}")
        _check(self.pin_memory in PIN_MEMORY, "pin_memory", self.pin_memory, " | ".join(PIN_MEMORY))
        _check(0 <= self.keep_last <= MAX_KEEP_LAST, "keep_last", self.keep_last, f"an integer in 0..{MAX_KEEP_LAST}")
        _check(0 < self.commit_timeout_s <= MAX_TIMEOUT_S, "commit_timeout_s", self.commit_timeout_s,
               f"a number > 0 and at most {MAX_TIMEOUT_S:.0f}")
        _check(0 <= self.save_deadline_s <= MAX_TIMEOUT_S, "save_deadline_s", self.save_deadline_s,
               f"a number >= 0 (0 = no deadline) and at most {MAX_TIMEOUT_S:.0f}")
        _check(self.snapshot in SNAPSHOT, "snapshot", self.snapshot, " | ".join(SNAPSHOT))
        _check(self.snapshot_device in SNAPSHOT_DEVICE, "snapshot_device", self.snapshot_device,
               " | ".join(SNAPSHOT_DEVICE))
        _check(0 <= self.snapshot_device_headroom_mib <= MAX_MEMORY_MIB, "snapshot_device_headroom_mib",
               self.snapshot_device_headroom_mib, f"a number in 0..{MAX_MEMORY_MIB:.0f} (1 PiB)")
        _check(self.tag_validation in TAG_VALIDATION, "tag_validation", self.tag_validation, " | ".join(TAG_VALIDATION))

    @property
    def slot_wait_s(self) -> float:
        """How long ``on_busy: wait`` waits for a free staging slot (``busy_wait_s``, else ``commit_timeout_s``)."""
        return self.busy_wait_s or self.commit_timeout_s

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, *, source: str = "config") -> "Config":
        """Build a Config from a (YAML-shaped) mapping; unknown keys and bad types raise ConfigError."""
        return _build(cls, {} if data is None else data, "", source)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "Config":
        import yaml

        path = Path(path)
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {str(path)!r}: {exc.strerror or exc}") from exc
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = raw.count(b"\n", 0, exc.start) + 1
            raise ConfigError(f"{path}: not UTF-8 text: byte {raw[exc.start]:#04x} at offset {exc.start} "
                              f"(line {line})") from None
        try:
            data = yaml.load(text, Loader=_yaml_loader())  # noqa: S506 - a SafeLoader subclass
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
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
        raise ConfigError(f"config key {key!r}: expected {expected}, got {_shown(value)}")


def _shown(value: Any) -> str:
    """``repr(value)``, cut short (a 400-digit integer from a YAML file must not flood the message)."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:40]}...({len(text)} characters)"


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    """The annotated type of every field of a config dataclass (resolved once per class)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def _build(cls: type, data: Mapping[str, Any], prefix: str, source: str):
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: config key {prefix.rstrip('.') or '<root>'!r} must be a mapping, got {data!r}")
    hints = _hints(cls)
    unknown = [k for k in data if k not in hints]
    if unknown:
        raise ConfigError(
            f"{source}: unknown config key {prefix + str(unknown[0])!r}; known keys here: {', '.join(sorted(hints))}"
        )
    kwargs = {name: _build(hints[name], {} if value is None else value, f"{prefix}{name}.", source)
              if dataclasses.is_dataclass(hints[name]) else value for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _coerce(hint: Any, value: Any, key: str) -> Any:
    """``value`` as the type of a field, or a ConfigError naming the key. No lossy conversion: a bool is never
    a number, a float never an int (``2.0`` for an int key is refused); an int for a float key becomes a
    float; numbers must be finite."""
    def bad(expected: str) -> ConfigError:
        return ConfigError(f"config key {key!r}: expected {expected}, got {_shown(value)}")

    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        raise bad(f"a {hint.__name__} (use Config.from_dict for nested mappings)")
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
            try:
                number = float(value)
            except OverflowError:
                raise bad("a finite number") from None
            if math.isfinite(number):
                return number
            raise bad("a finite number")
        raise bad("a number")
    if hint is str:
        if isinstance(value, str):
            return value
        raise bad("a string")
    if hint is dict:
        if isinstance(value, Mapping):
            return dict(value)
        raise bad("a mapping")
    if typing.get_origin(hint) is Literal:  # one of a few values (codec.compression: true | false | auto)
        options = typing.get_args(hint)
        if any(value is o if isinstance(o, bool) else (type(value) is type(o) and value == o) for o in options):
            return value
        raise bad(" | ".join(str(o).lower() if isinstance(o, bool) else str(o) for o in options))
    raise bad(str(hint))  # pragma: no cover - every field has one of the types above


@functools.lru_cache(maxsize=None)
def _yaml_loader() -> type:
    """A ``yaml.SafeLoader`` that refuses a key given twice in one mapping, directly or through merge keys
    (``<<: *anchor``): YAML would silently keep the last one. Built on first use (PyYAML is imported lazily)."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def construct_document(self, node):
            self._key_paths: dict[int, str] = {}
            self._index(node, "")
            return super().construct_document(node)

        def _index(self, node, prefix: str) -> None:
            """Remember the dotted key of every mapping, to name it in errors."""
            if isinstance(node, yaml.MappingNode) and id(node) not in self._key_paths:
                self._key_paths[id(node)] = prefix
                for key_node, value_node in node.value:
                    if isinstance(key_node, yaml.ScalarNode):
                        self._index(value_node, f"{prefix}{key_node.value}.")

        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                self.flatten_mapping(node)  # resolves '<<' merge keys into node.value
                seen: dict[Any, Any] = {}
                for key_node, _ in node.value:
                    key = self.construct_object(key_node, deep=deep)
                    try:
                        first = seen.setdefault(key, key_node)
                    except TypeError:  # unhashable: the base constructor reports it
                        continue
                    if first is not key_node:
                        prefix = self._key_paths.get(id(node), "")
                        raise ConfigError(f"config key {prefix + str(key)!r} is given twice (line "
                                          f"{first.start_mark.line + 1} and line {key_node.start_mark.line + 1})")
            return super().construct_mapping(node, deep=deep)

    return StrictLoader
