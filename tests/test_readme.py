"""README.md's code blocks run as a reader would run them, so the README cannot drift from the API.

* Every ```python block runs, in README order, in one scratch directory, each in a fresh namespace that holds
  only what ``README_PRELUDE`` defines (the model, optimizer, scheduler, loader and epoch a snippet assumes
  the reader already has) plus ``examples/ckpt.yaml`` copied as ``ckpt.yaml``. A block that cannot run that
  way starts with a line ``# not run: <reason>`` and is reported as skipped with that reason.
* Every ``asyncckpt ...`` line of a ```bash block runs (through the CLI's entry point) against the
  checkpoints the python blocks saved there and must exit 0. ``make ...`` lines are NOT executed (they build a
  virtual environment and run the demo or the whole suite; tests/test_demo.py covers what ``make demo``
  runs); any other command needs a ``# not run:`` block.
* A python block whose first line is ``# requires: mod, mod`` needs optional packages (an integration): it is
  skipped when one is missing, and otherwise runs in its own Python process (a framework may initialise
  ``torch.distributed`` or global state), in the same directory and after the same prelude, with the variables a
  launcher such as torchrun sets for one process (``SUBPROCESS_PRELUDE``). These blocks run after all the
  others and at the same time as each other (so one must not need another's files): each process is forked from
  one that has imported what they all import (``SUBPROCESS_PRELOAD``; tests/readme_workers.py) and is otherwise
  what ``python -c`` gives the block (an empty ``__main__``, the interpreter's normal exit).
* Every ```yaml block is a valid ``asyncckpt.Config``.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import traceback

import pytest
import torch
import yaml
from click.testing import CliRunner

import asyncckpt
from asyncckpt.cli import main as cli_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
NOT_RUN = "# not run:"
REQUIRES = "# requires:"
SUBPROCESS_TIMEOUT_S = 300
# the first test's setup runs every block (a module fixture): on a loaded machine that outlasts the default timeout
pytestmark = pytest.mark.timeout(900)

README_PRELUDE = '''
import types

import torch

class TinyLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, batch):
        return types.SimpleNamespace(loss=self.proj(batch).pow(2).mean())

torch.manual_seed(0)
model = TinyLM()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
sched = torch.optim.lr_scheduler.StepLR(optimizer, step_size=100)
loader = [torch.randn(4, 8) for _ in range(500)]
epoch = 0
'''


# What a launcher (torchrun) gives a one-process job; and, for DeepSpeed on a CPU-only machine, its shared-memory
# all-reduce op switched off (DeepSpeed would otherwise compile it with g++ for minutes before the first step).
SUBPROCESS_PRELUDE = '''
import os, socket
with socket.socket() as _s:
    _s.bind(("127.0.0.1", 0))
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(_s.getsockname()[1]))
try:
    import deepspeed.ops
    deepspeed.ops.__compatible_ops__ = {}
except ImportError:
    pass
'''


# What SUBPROCESS_PRELUDE and every `# requires:` block import anyway: imported once, before the blocks' processes
# are forked from the one that imported them.
SUBPROCESS_PRELOAD = ("torch", "asyncckpt", "deepspeed.ops")


def _requires(block: str) -> list[str]:
    first = block.lstrip().split("\n", 1)[0]
    if not first.startswith(REQUIRES):
        return []
    return [m.strip() for m in first[len(REQUIRES):].split(",") if m.strip()]


def _missing(block: str) -> list[str]:
    return [m for m in _requires(block) if importlib.util.find_spec(m) is None]


class _Subprocesses:
    """The process that runs the ``# requires:`` blocks (tests/readme_workers.py). It starts at once, so that its
    imports overlap the other blocks, and is handed the blocks by :meth:`run`."""

    def __init__(self, where):
        code = (f"import sys; sys.path.insert(0, {os.path.join(ROOT, 'tests')!r}); import readme_workers; "
                f"del sys.path[0]; readme_workers.serve({list(SUBPROCESS_PRELOAD)!r})")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
        self.logs = where.parent / f"{where.name}-logs"
        self.logs.mkdir()
        self.proc = subprocess.Popen([sys.executable, "-c", code], cwd=where, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def run(self, blocks: list[tuple[int, str]]) -> dict[int, str | None]:
        """Each block's outcome: None, or why it failed."""
        jobs = [{"line": line, "code": [["<SUBPROCESS_PRELUDE>", SUBPROCESS_PRELUDE, 1],
                                        ["<README_PRELUDE>", README_PRELUDE, 1], [README, block, line]]}
                for line, block in blocks]
        request = json.dumps({"jobs": jobs, "logs": str(self.logs), "timeout_s": SUBPROCESS_TIMEOUT_S})
        try:
            out, err = self.proc.communicate(request, timeout=SUBPROCESS_TIMEOUT_S + 120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        if self.proc.returncode != 0:
            why = f"the process running the blocks exited {self.proc.returncode}\n{out[-3000:]}\n{err[-6000:]}"
            return {line: why for line, _ in blocks}
        outcomes = json.loads(out.splitlines()[-1])
        result: dict[int, str | None] = {}
        for line, _ in blocks:
            status, output = outcomes[str(line)]
            result[line] = (None if status == 0 else f"timed out after {SUBPROCESS_TIMEOUT_S} s\n{output[-9000:]}"
                            if status is None else f"exit status {status}\n{output[-9000:]}")
        return result

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def _blocks(lang: str) -> list[tuple[int, str]]:
    """(line number of the block's first line, text) of every ```lang block of README.md."""
    with open(README) as f:
        text = f.read()
    out = []
    for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
        if m.group(1) == lang:
            out.append((text.count("\n", 0, m.start(2)) + 1, m.group(2)))
    return out


def _not_run(block: str) -> str | None:
    first = block.lstrip().split("\n", 1)[0]
    return first[len(NOT_RUN):].strip() if first.startswith(NOT_RUN) else None


PYTHON = _blocks("python")
BASH = _blocks("bash")
YAML = _blocks("yaml")
COMMANDS = [(line + i, cmd) for line, block in BASH if _not_run(block) is None
            for i, cmd in enumerate(block.splitlines()) if shlex.split(cmd, comments=True)]


@pytest.fixture(scope="module")
def readme_dir(tmp_path_factory):
    """Runs every python block (see the module docstring); yields the directory and each block's outcome."""
    where = tmp_path_factory.mktemp("readme")
    shutil.copy(os.path.join(ROOT, "examples", "ckpt.yaml"), where / "ckpt.yaml")
    outcomes: dict[int, str | None] = {}
    runnable = [(line, block) for line, block in PYTHON if _not_run(block) is None and not _missing(block)]
    separate = [(line, block) for line, block in runnable if _requires(block)]
    subprocesses = _Subprocesses(where) if separate else None
    cwd, rng, threads = os.getcwd(), torch.get_rng_state(), torch.get_num_threads()
    os.chdir(where)
    try:
        for line, block in runnable:
            if _requires(block):
                continue
            namespace: dict = {"__name__": "__readme__"}
            exec(compile(README_PRELUDE, "<README_PRELUDE>", "exec"), namespace)
            try:  # padded so that a traceback names the README line
                exec(compile("\n" * (line - 1) + block, README, "exec"), namespace)
                outcomes[line] = None
            except BaseException:  # noqa: BLE001 - reported by the block's test
                outcomes[line] = traceback.format_exc()
            finally:
                for value in namespace.values():  # a block that failed before its close() leaks no writer
                    if isinstance(value, asyncckpt.AsyncCheckpointer):
                        try:
                            value.close(timeout=30)
                        except asyncckpt.CheckpointError:
                            pass
        if subprocesses is not None:
            outcomes.update(subprocesses.run(separate))
    finally:
        if subprocesses is not None:
            subprocesses.close()
        os.chdir(cwd)
        torch.set_rng_state(rng)
        torch.set_num_threads(threads)
    yield where, outcomes


def test_readme_has_blocks_of_each_kind():
    assert PYTHON and COMMANDS and YAML


@pytest.mark.parametrize("line,block", PYTHON, ids=[f"README.md:{line}" for line, _ in PYTHON])
def test_python_block_runs(readme_dir, line, block):
    reason = _not_run(block)
    if reason is not None:
        pytest.skip(f"README.md:{line} is marked not run: {reason}")
    if _missing(block):
        pytest.skip(f"README.md:{line} needs {', '.join(_missing(block))}, which is not installed")
    _, outcomes = readme_dir
    assert outcomes[line] is None, f"README.md:{line} failed:\n{outcomes[line]}"


@pytest.mark.parametrize("line,command", COMMANDS, ids=[f"README.md:{line}" for line, _ in COMMANDS])
def test_shell_command_runs(readme_dir, line, command):
    argv = shlex.split(command, comments=True)
    if argv[0] == "make":
        pytest.skip(f"README.md:{line} `{command.strip()}` is not executed here: make builds a virtual environment "
                    "and runs the demo or the whole suite")
    assert argv[0] == "asyncckpt", f"README.md:{line} runs {argv[0]!r}: mark its block `{NOT_RUN} <reason>`"
    where, outcomes = readme_dir
    assert all(o is None for o in outcomes.values()), "a python block failed: no checkpoint to run against"
    cwd = os.getcwd()
    os.chdir(where)
    try:
        result = CliRunner().invoke(cli_main, argv[1:], catch_exceptions=False)
    finally:
        os.chdir(cwd)
    assert result.exit_code == 0, f"README.md:{line} `{command.strip()}` exited {result.exit_code}:\n{result.output}"
    assert result.output.strip()


@pytest.mark.parametrize("line,block", YAML, ids=[f"README.md:{line}" for line, _ in YAML])
def test_yaml_block_is_a_valid_config(line, block):
    asyncckpt.Config.from_dict(yaml.safe_load(block))
