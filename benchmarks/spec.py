"""The benchmark's YAML configuration: which workloads, which systems, how many repetitions.

Unknown keys are errors (a typo must not silently fall back to a default). Every key, with its default:

.. code-block:: yaml

    name: gpt_0p1gb             # names the results folder (default: the file name)
    reps: 3                     # repetitions per system; medians and min-max are over them
    warm_saves: 2               # saves after the first one in each repetition (the "warm" figures)
    rounds: 1                   # run every system this many times in turn, reps each (interleaves drift)
    isolate: true               # one process per system (clean peak-RSS figures); false: one process for all
    warmup: true                # run each system once on a tiny model first (imports, lazy init, thread pools)
    timeout_s: 3600             # per measurement process (per rank with several ranks)
    world_sizes: [1]            # [1, 2]: each system also runs on 2 gloo ranks with DDP-replicated state
    torch_threads: 0            # training's intra-op threads per rank (0: torch's default, CPUs / ranks)
    first_save_after_s: 0       # seconds from building the saver to its first save (background allocation)
    paired_memcpy: false        # time the memcpy floor right before every save (a floor beside each stall)
    systems: [torch_save, deepspeed, dcp_save, dcp_async, asyncckpt, ...]   # see benchmarks.systems.SYSTEMS
    plugins: []                 # modules to import first: they add systems with benchmarks.systems.register
    asyncckpt: {}               # asyncckpt Config overrides applied to every asyncckpt mode
    loop: {enabled: true, span: 1.5, min_steps: 3, max_steps: 100, pairs: 1}
    growth: {saves: 50, systems: all}
    floors: {enabled: true, reps: 3, write_mib: 16, codec_reps: 1}
    workloads:                  # one or more (a size sweep); see WorkloadSpec below
      - {name: gpt_0p1gb, vocab: 8192, d_model: 256, n_layers: 6, n_heads: 4, seq_len: 64, batch: 4, dtype: float32}
      - {name: many_small, kind: many_small, n_tensors: 10000, numel: 16, optimizer: sgd}
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Mapping


DTYPE_SIZES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2}
KINDS = ("gpt", "many_small")
OPTIMIZERS = {"adamw": 2, "sgd": 1}  # optimizer -> state tensors per parameter of the parameter's size


@dataclass(frozen=True)
class WorkloadSpec:
    """Sizes of one workload (a YAML entry under ``workloads:``). ``kind: gpt`` (the default) is the GPT
    decoder below; ``kind: many_small`` is ``n_tensors`` parameters of ``numel`` elements each (the per-tensor
    overheads of a checkpointer, not its bandwidth), with ``optimizer``'s state for each."""

    name: str
    kind: str = "gpt"
    n_tensors: int = 10000  # many_small: parameters
    numel: int = 16  # many_small: elements of each
    optimizer: str = "adamw"  # adamw | sgd (SGD with momentum: one buffer per parameter)
    vocab: int = 8192
    d_model: int = 256
    n_layers: int = 6
    n_heads: int = 4
    seq_len: int = 64
    batch: int = 4
    dtype: str = "float32"
    seed: int = 0
    lr: float = 1e-4
    dense_init: bool = True  # see build(): no all-zero embedding rows in AdamW's moments

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"workload {self.name!r}: kind must be one of {list(KINDS)}, got {self.kind!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"workload {self.name!r}: optimizer must be one of {sorted(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.n_tensors < 1 or self.numel < 1:
            raise ValueError(f"workload {self.name!r}: n_tensors and numel must be >= 1")
        if self.dtype not in DTYPE_SIZES:
            raise ValueError(f"workload {self.name!r}: dtype must be one of {sorted(DTYPE_SIZES)}, got {self.dtype!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"workload {self.name!r}: d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})")
        for key in ("vocab", "d_model", "n_layers", "n_heads", "seq_len", "batch"):
            if getattr(self, key) < 1:
                raise ValueError(f"workload {self.name!r}: {key} must be >= 1")

    @property
    def n_params(self) -> int:
        """Parameter count without building the model (embeddings, blocks, final norm, untied head)."""
        if self.kind == "many_small":
            return self.n_tensors * self.numel
        d, v, t = self.d_model, self.vocab, self.seq_len
        block = (4 * d) + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
        return v * d + t * d + self.n_layers * block + 2 * d + d * v

    @property
    def state_bytes_estimate(self) -> int:
        """Parameters plus the optimizer's state (AdamW's ``step`` counters are negligible)."""
        return (1 + OPTIMIZERS[self.optimizer]) * self.n_params * DTYPE_SIZES[self.dtype]


# The built-in systems (benchmarks.systems implements each), in report order; plugins may register more.
SYSTEM_NAMES = ("torch_save", "deepspeed", "dcp_save", "dcp_async", "dcp_async_default", "asyncckpt",
                "asyncckpt_prepared", "asyncckpt_zstd", "asyncckpt_raw", "asyncckpt_raw_prepared", "asyncckpt_service",
                "lightning_async", "asyncckpt_lightning", "deepspeed_asyncckpt")
PEERS = ("torch_save", "deepspeed", "dcp_save", "dcp_async", "dcp_async_default", "lightning_async")
# asyncckpt's systems: its own modes and its framework integrations (report columns; the peers are the rows)
ASYNCCKPT_MODES = tuple(n for n in SYSTEM_NAMES if n.startswith("asyncckpt") or n.endswith("_asyncckpt"))
DEFAULT_SYSTEMS = ("torch_save", "deepspeed", "dcp_save", "dcp_async", "dcp_async_default", "asyncckpt",
                   "asyncckpt_prepared", "asyncckpt_zstd", "asyncckpt_raw", "asyncckpt_raw_prepared", "asyncckpt_service")


class SpecError(ValueError):
    pass


@dataclass(frozen=True)
class LoopSpec:
    """Training-loop overhead: K steps with one checkpoint minus K steps without. K is chosen per system so
    that the K steps span ``span`` times the system's warm time to durable (at least ``min_steps``)."""

    enabled: bool = True
    span: float = 1.5
    min_steps: int = 3
    max_steps: int = 100
    pairs: int = 1  # with/without pairs per repetition


@dataclass(frozen=True)
class GrowthSpec:
    """Host memory over many consecutive saves (each waited for; older checkpoints deleted as it goes)."""

    saves: int = 50
    systems: Any = "all"  # "all" or a list of system names


@dataclass(frozen=True)
class FloorSpec:
    enabled: bool = True
    reps: int = 3
    write_mib: int = 16  # size of each write() of the disk floor
    codec_reps: int = 1


@dataclass(frozen=True)
class RunSpec:
    name: str
    workloads: tuple[WorkloadSpec, ...]
    systems: tuple[str, ...] = DEFAULT_SYSTEMS
    reps: int = 3
    warm_saves: int = 2
    rounds: int = 1
    isolate: bool = True
    warmup: bool = True
    timeout_s: float = 3600.0
    world_sizes: tuple[int, ...] = (1,)
    torch_threads: int = 0
    first_save_after_s: float = 0.0  # a saver built ahead of its first save allocates in the background meanwhile
    paired_memcpy: bool = False  # the memcpy floor timed right before each save: drift falls on both figures
    plugins: tuple[str, ...] = ()
    asyncckpt: Mapping[str, Any] = field(default_factory=dict)
    loop: LoopSpec = field(default_factory=LoopSpec)
    growth: GrowthSpec = field(default_factory=GrowthSpec)
    floors: FloorSpec = field(default_factory=FloorSpec)

    @property
    def distributed(self) -> bool:
        """With several world sizes every run (world size 1 included) goes through the same gloo harness."""
        return any(w > 1 for w in self.world_sizes)

    def growth_for(self, system: str) -> bool:
        s = self.growth.systems
        return self.growth.saves > 0 and (s == "all" or system in (s or ()))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, default_name: str = "bench") -> "RunSpec":
        data = dict(data)
        _only(data, {f.name for f in dataclasses.fields(cls)}, "")
        workloads = data.pop("workloads", None)
        if not workloads or not isinstance(workloads, list):
            raise SpecError("'workloads' must be a non-empty list of workload mappings")
        wls = []
        for i, w in enumerate(workloads):
            if not isinstance(w, Mapping):
                raise SpecError(f"workloads[{i}] must be a mapping")
            _only(w, {f.name for f in dataclasses.fields(WorkloadSpec)}, f"workloads[{i}].")
            w = dict(w)
            w.setdefault("name", f"workload{i}")
            try:
                wls.append(WorkloadSpec(**w))
            except (TypeError, ValueError) as exc:
                raise SpecError(str(exc)) from None
        kwargs: dict[str, Any] = {"name": data.pop("name", default_name), "workloads": tuple(wls)}
        for key, sub in (("loop", LoopSpec), ("growth", GrowthSpec), ("floors", FloorSpec)):
            if key in data:
                value = data.pop(key) or {}
                if not isinstance(value, Mapping):
                    raise SpecError(f"'{key}' must be a mapping")
                _only(value, {f.name for f in dataclasses.fields(sub)}, f"{key}.")
                kwargs[key] = sub(**value)
        if "plugins" in data:
            plugins = data.pop("plugins") or []
            if not isinstance(plugins, (list, tuple)) or not all(isinstance(p, str) for p in plugins):
                raise SpecError("'plugins' must be a list of module names")
            kwargs["plugins"] = tuple(plugins)
        for key in ("systems", "world_sizes"):
            if key in data:
                value = data.pop(key)
                if not isinstance(value, (list, tuple)) or not value:
                    raise SpecError(f"'{key}' must be a non-empty list")
                kwargs[key] = tuple(value)
        kwargs.update(data)
        spec = cls(**kwargs)
        spec.validate()
        return spec

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "RunSpec":
        import yaml

        with open(path) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, Mapping):
            raise SpecError(f"{path}: the top level must be a mapping")
        try:
            return cls.from_dict(data, default_name=os.path.splitext(os.path.basename(path))[0])
        except SpecError as exc:
            raise SpecError(f"{path}: {exc}") from None

    def validate(self) -> None:
        known = known_systems(self.plugins)
        unknown = [s for s in self.systems if s not in known]
        if unknown:
            raise SpecError(f"unknown system(s) {unknown}; known: {', '.join(known)}")
        if type(self.torch_threads) is not int or not 0 <= self.torch_threads <= 1024:
            raise SpecError(f"'torch_threads' must be an integer in 0..1024, got {self.torch_threads!r}")
        if isinstance(self.first_save_after_s, bool) or not isinstance(self.first_save_after_s, (int, float)) \
                or not 0 <= self.first_save_after_s <= 600:
            raise SpecError(f"'first_save_after_s' must be a number of seconds in 0..600, got {self.first_save_after_s!r}")
        if not isinstance(self.paired_memcpy, bool):
            raise SpecError(f"'paired_memcpy' must be true or false, got {self.paired_memcpy!r}")
        if self.reps < 1 or self.rounds < 1 or self.warm_saves < 0:
            raise SpecError("reps and rounds must be >= 1, warm_saves >= 0")
        if any(w < 1 for w in self.world_sizes):
            raise SpecError("world_sizes must be >= 1")
        if len({w.name for w in self.workloads}) != len(self.workloads):
            raise SpecError("workload names must be unique")
        if self.asyncckpt:  # (imports torch: only when there is something to check)
            from asyncckpt import Config

            try:
                Config.from_dict(dict(self.asyncckpt), source="asyncckpt")
            except ValueError as exc:
                raise SpecError(str(exc)) from None

    def with_overrides(self, *, reps: int | None = None, systems: list[str] | None = None) -> "RunSpec":
        changes: dict[str, Any] = {}
        if reps is not None:
            changes["reps"] = reps
        if systems:
            changes["systems"] = tuple(systems)
        spec = dataclasses.replace(self, **changes)
        spec.validate()
        return spec


def known_systems(plugins: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The built-in systems, then those the ``plugins`` modules register (importing them registers them)."""
    import importlib

    for module in plugins:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise SpecError(f"plugin {module!r} cannot be imported: {exc}") from None
    from .systems import SYSTEMS  # (imports torch: only once a spec is checked)

    return tuple(SYSTEMS)


def _only(data: Mapping, known: set[str], prefix: str) -> None:
    unknown = sorted(str(k) for k in data if k not in known)
    if unknown:
        raise SpecError(f"unknown key {prefix}{unknown[0]!r}; known keys here: {', '.join(sorted(known))}")
