"""What the framework integrations share: the rule for their configuration and one drain at interpreter exit."""
from __future__ import annotations

import logging
import os
import weakref
from typing import Mapping

from .. import engine  # noqa: F401  (registers the engines' exit drain first, so ours runs before it)
from ..config import Config
from ..errors import ConfigError
from ..threads import at_shutdown

log = logging.getLogger(__name__)


def framework_config(config: Config | Mapping | str | os.PathLike | None, who: str, retention: str) -> Config:
    """``config`` as a :class:`Config` for an integration whose framework decides which checkpoints are kept
    (``retention`` names its setting), so ``keep_last`` must be 0."""
    cfg = Config.coerce(config)
    if cfg.keep_last:
        raise ConfigError(f"config key 'keep_last' must be 0 with {who}: {retention} decides which checkpoints "
                          "are kept")
    return cfg


_drains: "weakref.WeakKeyDictionary[object, str]" = weakref.WeakKeyDictionary()


def drain_at_exit(obj: object, method: str) -> None:
    """Call ``obj.<method>()`` when the main thread finishes, unless ``obj`` is gone by then: saves accepted
    after its last explicit drain are finished with their framework's own work (stub files, renames, removals),
    before the engines' own drain and while thread pools still take work."""
    _drains[obj] = method


def _drain() -> None:
    for obj, method in list(_drains.items()):
        try:
            getattr(obj, method)()
        except Exception as exc:  # noqa: BLE001 - at exit there is nobody left to raise to
            log.error("asyncckpt: draining the checkpoints of %s at exit failed: %s", type(obj).__name__, exc)


at_shutdown(_drain)
