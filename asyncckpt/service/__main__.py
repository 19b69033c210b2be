"""``python -m asyncckpt.service --dir D --key K [--detach]``: run a node's writer service (started by the
first rank that needs it, see :mod:`asyncckpt.service.client`). ``--detach`` forks once more so that the
service is nobody's child (it outlives the training process and never lingers as its zombie)."""
import os
import sys

if "--detach" in sys.argv:
    sys.argv.remove("--detach")
    if os.fork():
        os._exit(0)

from .server import main  # noqa: E402

main()
