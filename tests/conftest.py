"""Shared fixtures of the core tests: a fast config, the tests/trainer.py Trainer factory, savers that are
closed after each test, a gate that holds the background writer until a test releases it, and a bit-exact
comparison of nested states (NaN payloads included).

The suite in service mode: ``ASYNCCKPT_WRITER_MODE=service`` (the library's default of ``writer.mode``,
inherited by every child process) runs every saver the tests build, whose config does not name a mode, through
the node's writer service. The session then gets a private runtime directory (removed at its end), and a test
marked ``@pytest.mark.thread_only("why")`` (it reaches into the writer threads of the training process, which
service mode does not run) is skipped with its reason. Every writer service the session starts runs
``storage_faults.service_hooks`` (``ASYNCCKPT_SERVICE_HOOKS``), so that :func:`storage_faults.injected`
reaches the storage operations of the service too (through rule files in a private directory)."""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import math
import os
import threading

import shutil
import uuid

import numpy as np
import pytest
import torch

import asyncckpt
from asyncckpt.service import paths as service_paths
from asyncckpt.service.server import HOOKS_ENV
from patching import patch_existing
from storage_faults import FAULTS_DIR_ENV
from trainer import Trainer

# Small chunks (several per tensor), two encode threads, normal priority, no fsync: fast on a 2-core machine.
# The few tests about durability use fsync on explicitly.
FAST = {"codec": {"chunk_mib": 1 / 64}, "writer": {"threads_per_node": 2, "nice": 0, "fsync": False}}


def service_mode() -> bool:
    """Whether this run's savers default to the writer service (``ASYNCCKPT_WRITER_MODE=service``)."""
    return asyncckpt.Config().writer.mode == "service"


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "thread_only(reason): needs writer.mode thread (skipped when "
                                       "ASYNCCKPT_WRITER_MODE=service): the reason says which in-process seam it uses")
    if not service_mode():
        return
    if not os.environ.get(service_paths.RUNTIME_ENV):
        runtime = f"/dev/shm/asyncckpt-test-{uuid.uuid4().hex[:12]}"
        os.mkdir(runtime, 0o700)
        os.environ[service_paths.RUNTIME_ENV] = config._service_runtime = runtime
    # the services the tests start (and every rank the tests spawn) apply storage_faults.injected's rules
    here = os.path.dirname(os.path.abspath(__file__))
    config._faults_dir = f"/dev/shm/asyncckpt-faults-{uuid.uuid4().hex[:12]}"
    os.mkdir(config._faults_dir, 0o700)
    os.environ[FAULTS_DIR_ENV] = config._faults_dir
    os.environ.setdefault(HOOKS_ENV, "storage_faults:service_hooks")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))


def pytest_unconfigure(config) -> None:
    for path in (getattr(config, "_service_runtime", None), getattr(config, "_faults_dir", None)):
        if path is not None:
            shutil.rmtree(path, ignore_errors=True)


def pytest_collection_modifyitems(config, items) -> None:
    if not service_mode():
        return
    for item in items:
        mark = item.get_closest_marker("thread_only")
        if mark is not None:
            why = mark.args[0] if mark.args else mark.kwargs.get("reason", "")
            item.add_marker(pytest.mark.skip(reason=f"writer.mode thread only: {why}"))


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@pytest.fixture
def fast_config():
    """``fast_config(**overrides)`` → an ``asyncckpt.Config`` based on FAST; nested keys as dicts."""
    return lambda **over: asyncckpt.Config.from_dict(merge(FAST, over))


@pytest.fixture
def save_dir(tmp_path):
    return str(tmp_path / "ckpts")


# ---------------------------------------------------------------------------------------- model factory
@pytest.fixture
def make_trainer():
    """``make_trainer(seed=0, freeze_input=False)`` → a tests/trainer.py Trainer (model, optimizer, scheduler,
    step())."""
    return lambda seed=0, freeze_input=False: Trainer(seed, freeze_input)


@pytest.fixture
def make_saver(fast_config):
    """``make_saver(trainer_or_model, optimizer=None, scheduler=None, **config_overrides)``; closed at teardown."""
    savers: list[asyncckpt.AsyncCheckpointer] = []

    def make(obj, optimizer=None, scheduler=None, **over):
        if isinstance(obj, Trainer):
            obj, optimizer, scheduler = obj.model, obj.optimizer, obj.scheduler
        saver = asyncckpt.AsyncCheckpointer(obj, optimizer, lr_scheduler=scheduler, config=fast_config(**over))
        savers.append(saver)
        return saver

    yield make
    for s in savers:
        try:
            s.close(timeout=30)
        except Exception:  # noqa: BLE001 - a test that injected a failure may leave it unobserved
            pass


# ------------------------------------------------------------------------------------------ writer gate
class WriterGate:
    """Holds every save of an engine before it writes anything, until :meth:`open` (deterministic
    backpressure and aliasing tests: no sleeping). The background never waits more than 30 s.

    In thread mode the engine's writer waits (after the save's prepare); in service mode the hand-over to the
    service waits (the engine's call returns at once; the saves go over in order once the gate opens), so the
    service has not even prepared a held save."""

    def __init__(self):
        self._opened: concurrent.futures.Future = concurrent.futures.Future()
        self.entered = threading.Event()
        self.calls = 0
        self._order: concurrent.futures.ThreadPoolExecutor | None = None  # service mode: the held hand-overs

    def install(self, monkeypatch, engine) -> "WriterGate":
        if engine.service is not None:
            return self._hold_handover(monkeypatch, engine.service)
        real = engine.writer.write_rank

        async def gated(**kwargs):
            self.calls += 1
            self.entered.set()
            await asyncio.wait_for(asyncio.wrap_future(self._opened), timeout=30)
            return await real(**kwargs)

        patch_existing(monkeypatch, engine.writer, "write_rank", gated)
        return self

    def close(self) -> None:
        self.open()
        if self._order is not None:
            self._order.shutdown(wait=False)  # its thread ends once the held saves went over

    def _hold_handover(self, monkeypatch, service) -> "WriterGate":
        real = service.submit
        order = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="test-gate")  # saves stay in order

        def hand_over(outer: concurrent.futures.Future, args: tuple) -> None:
            try:
                self._opened.result(timeout=30)
                inner = real(*args)
            except BaseException as exc:  # noqa: BLE001 - the save's future carries it
                outer.set_exception(exc)
                return
            inner.add_done_callback(lambda f: outer.set_exception(f.exception()) if f.exception() is not None
                                    else outer.set_result(f.result()))

        def gated(*args) -> concurrent.futures.Future:
            self.calls += 1
            self.entered.set()
            outer: concurrent.futures.Future = concurrent.futures.Future()
            order.submit(hand_over, outer, args)
            return outer

        patch_existing(monkeypatch, service, "submit", gated)
        self._order = order
        return self

    def open(self) -> None:
        if not self._opened.done():
            self._opened.set_result(None)


@pytest.fixture
def writer_gate(monkeypatch):
    """``gate = writer_gate(saver.engine)``; opened at teardown so no background save stays blocked."""
    gates: list[WriterGate] = []

    def install(engine) -> WriterGate:
        gate = WriterGate().install(monkeypatch, engine)
        gates.append(gate)
        return gate

    yield install
    for g in gates:
        g.close()


def done_event(fut) -> threading.Event:
    """An event set when ``fut`` resolves, without observing its outcome."""
    ev = threading.Event()
    fut.add_done_callback(lambda _: ev.set())
    return ev


@pytest.fixture
def wait_resolved():
    """``wait_resolved(fut)``: block (at most 30 s) until the future resolves, without observing it."""

    def wait(fut, timeout: float = 30.0) -> None:
        assert done_event(fut).wait(timeout), f"{fut!r} did not resolve within {timeout}s"

    return wait


# ------------------------------------------------------------------------------------ state comparison
def tensor_bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes in logical order, as uint8 (NaN payloads, -0.0 and padding bits included)."""
    flat = torch.empty(t.numel(), dtype=t.dtype)  # fresh, standard strides (size-1 dims may keep odd ones)
    flat.copy_(t.detach().cpu().reshape(-1))
    return flat.view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)


def assert_same(a, b, path: str = "<root>") -> None:
    """Bit-exact equality of nested states: same container types, keys, tensor dtypes/shapes/devices/bytes,
    floats equal or both NaN, numpy arrays byte-equal."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{path}: tensor vs {type(b).__name__}"
        assert a.dtype == b.dtype, f"{path}: dtype {a.dtype} vs {b.dtype}"
        assert a.shape == b.shape, f"{path}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
        assert a.device == b.device, f"{path}: device {a.device} vs {b.device}"
        assert torch.equal(tensor_bits(a), tensor_bits(b)), f"{path}: tensor bytes differ"
        return
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape, f"{path}: ndarray differs"
        assert a.tobytes() == b.tobytes(), f"{path}: ndarray bytes differ"
        return
    assert type(a) is type(b), f"{path}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()), f"{path}: keys {list(a)} vs {list(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{path}/{k}")
        if isinstance(a, collections.OrderedDict):
            assert_same(getattr(a, "_metadata", None), getattr(b, "_metadata", None), f"{path}/_metadata")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}/{i}")
    elif isinstance(a, float):
        assert (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b)), \
            f"{path}: {a!r} vs {b!r}"
    elif isinstance(a, np.generic):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), f"{path}: {a!r} vs {b!r}"
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


@pytest.fixture
def same():
    """``same(a, b)``: assert nested states are bit-exactly equal (see :func:`assert_same`)."""
    return assert_same


@pytest.fixture
def bits():
    return tensor_bits


def partials(save_dir: str) -> list[str]:
    """Leftover partial directories and temporary files in ``save_dir``."""
    if not os.path.isdir(save_dir):
        return []
    return sorted(n for n in os.listdir(save_dir) if n.endswith(".partial") or n.endswith(".tmp"))


@pytest.fixture
def leftovers():
    return partials


def read_latest(save_dir: str) -> str | None:
    try:
        with open(os.path.join(save_dir, "latest")) as f:
            return f.read().strip()
    except FileNotFoundError:
        return None


@pytest.fixture
def latest():
    return read_latest


# ------------------------------------------------------------------------------------- failure injection
