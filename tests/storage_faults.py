"""The tests' way to inject storage faults: a :class:`asyncckpt.storage.faults.Faults` installed around every
storage opened while the context is active (no private name is patched)."""
from __future__ import annotations

import contextlib
from typing import Iterator

import pytest

from asyncckpt.storage import wrapping
from asyncckpt.storage.faults import Faults, Gate

__all__ = ["Faults", "Gate", "faults_fixture", "injected"]


@contextlib.contextmanager
def injected() -> Iterator[Faults]:
    """A fresh set of fault rules, applied to every save and load started inside the block."""
    faults = Faults()
    with wrapping(faults.wrap):
        yield faults


@pytest.fixture(name="faults")
def faults_fixture() -> Iterator[Faults]:
    """:func:`injected` for the whole test."""
    with injected() as f:
        yield f
