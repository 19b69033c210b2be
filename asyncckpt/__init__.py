"""asyncckpt: near-zero-stall asynchronous checkpointing for PyTorch.

Public API: :class:`AsyncCheckpointer` (DeepSpeed-shaped ``save_checkpoint``/``load_checkpoint``),
:func:`save`/:func:`load` for any nested state, :func:`export`/:func:`import_checkpoint` to and from
torch.save and safetensors files, :class:`Config`, and the :class:`CheckpointError` family.
"""
__version__ = "0.1.0"

from .api import load, save, wait_all  # noqa: E402
from .checkpointer import AsyncCheckpointer  # noqa: E402
from .config import CodecConfig, Config, WriterConfig  # noqa: E402
from .errors import (  # noqa: E402
    CheckpointError, CheckpointNotFoundError, CommitError, CommitTimeoutError, ConfigError,
    CorruptCheckpointError, InvalidTagError, KeyCollisionError, MissingPackageError, PickleNotAllowedError,
    SaverBusyError,
    StateMismatchError, TagExistsError, UnsafeCheckpointError, UnsupportedStateError, WriteError,
)
from .export import export, import_checkpoint  # noqa: E402  (the function shadows the submodule's name)
from .future import SaveFuture  # noqa: E402
from .io_types import SaveResult  # noqa: E402
from .loader import CheckpointReader, list_tags  # noqa: E402

__all__ = [
    "AsyncCheckpointer", "save", "load", "wait_all", "export", "import_checkpoint", "Config", "CodecConfig", "WriterConfig", "SaveFuture",
    "SaveResult", "CheckpointReader", "list_tags", "CheckpointError", "CheckpointNotFoundError", "CommitError",
    "CommitTimeoutError", "ConfigError", "CorruptCheckpointError", "InvalidTagError", "KeyCollisionError",
    "MissingPackageError", "PickleNotAllowedError", "SaverBusyError", "StateMismatchError", "TagExistsError",
    "UnsafeCheckpointError", "UnsupportedStateError", "WriteError",
]
