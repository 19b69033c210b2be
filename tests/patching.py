"""The one way the tests rebind a name to inject a fault: :func:`patch_existing`.

A fault injected by rebinding a name that asyncckpt no longer has (renamed, moved, inlined) would silently
test nothing; :func:`patch_existing` raises instead. Every rebinding of an asyncckpt attribute (and of the
``os`` functions asyncckpt calls) in the tests goes through it, so ``grep patch_existing tests/`` lists every
seam the tests depend on.
"""
from __future__ import annotations

from typing import Any


def patch_existing(monkeypatch, target: Any, name: str, new: Any) -> Any:
    """Set ``target.name = new`` and return the old value; raise AttributeError if ``target`` has no ``name``.

    With a pytest ``monkeypatch`` the change is undone at the end of the test (or of ``monkeypatch.context()``);
    with ``None`` it is permanent (a child process that exits afterwards)."""
    if not hasattr(target, name):
        raise AttributeError(f"cannot inject a fault: {_describe(target)} has no attribute {name!r} "
                             "(renamed or removed? the test would silently test nothing)")
    old = getattr(target, name)
    if monkeypatch is None:
        setattr(target, name, new)
    else:
        monkeypatch.setattr(target, name, new)
    return old


def _describe(target: Any) -> str:
    return getattr(target, "__name__", None) or type(target).__name__
