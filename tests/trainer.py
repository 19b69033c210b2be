"""The one training helper of the tests: the models, the training steps and a bit-exact digest of saved state.

Importable by spawned and forkserver children (it needs only torch and numpy).

* :func:`mlp` and :func:`train_step` / :func:`train`: a plain ``Linear``/``ReLU`` stack trained on seeded
  random data, deterministic through an explicit ``torch.Generator`` (crash, fault and multi-rank tests).
* :class:`Trainer`: a small MLP with dropout, AdamW and a StepLR schedule whose step draws on the torch, python
  and numpy global RNGs, so resuming it exactly needs the RNG state (the core tests, through the
  ``make_trainer`` fixture).
* :func:`digest`: what the crash and fault tests compare a loaded checkpoint against.
"""
from __future__ import annotations

import hashlib
import random
from typing import Any, Sequence

import numpy as np
import torch


# ------------------------------------------------------------------------------------- generator-driven
def mlp(seed: int = 0, widths: Sequence[int] = (16, 32, 8)) -> torch.nn.Sequential:
    """``Linear(widths[0], widths[1]), ReLU, ..., Linear(widths[-2], widths[-1])``, initialised from ``seed``."""
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(widths, widths[1:])):
        if i:
            layers.append(torch.nn.ReLU())
        layers.append(torch.nn.Linear(n_in, n_out))
    return torch.nn.Sequential(*layers)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator, batch: int = 8) -> None:
    """One optimizer step on a batch drawn from ``gen`` (the model's input width comes from its first layer)."""
    x = torch.randn(batch, _in_features(model), generator=gen)
    model(x).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int, batch: int = 16) -> None:
    """``steps`` of :func:`train_step` on data from a generator seeded with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        train_step(model, opt, gen, batch)


def _in_features(model: torch.nn.Module) -> int:
    return next(m for m in model.modules() if isinstance(m, torch.nn.Linear)).in_features


# ---------------------------------------------------------------------------------- global-RNG driven
class Net(torch.nn.Module):
    """Small MLP with dropout (so resuming needs the RNG state) and a frozen-able first layer."""

    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(8, 32)
        self.drop = torch.nn.Dropout(0.25)
        self.hidden = torch.nn.Linear(32, 32)
        self.out = torch.nn.Linear(32, 4)
        self.register_buffer("seen", torch.zeros((), dtype=torch.int64))

    def forward(self, x):
        self.seen += x.shape[0]
        return self.out(self.drop(torch.relu(self.hidden(self.drop(torch.relu(self.inp(x)))))))


class Trainer:
    """:class:`Net`, AdamW and a StepLR schedule."""

    def __init__(self, seed: int = 0, freeze_input: bool = False):
        torch.manual_seed(seed)
        self.model = Net()
        if freeze_input:
            self.model.inp.requires_grad_(False)
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-2,
                                           weight_decay=0.1)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=2, gamma=0.5)

    def step(self) -> float:
        """One step whose data and dropout masks come from the torch, python and numpy RNGs."""
        self.model.train()
        x = torch.randn(16, 8) * (1.0 + random.random()) + float(np.random.rand())
        y = torch.randn(16, 4)
        loss = torch.nn.functional.mse_loss(self.model(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        return loss.item()

    def train(self, n: int) -> None:
        for _ in range(n):
            self.step()


# ------------------------------------------------------------------------------------------------ digest
def digest(obj: Any) -> str:
    """A bit-exact digest of nested state: container types, keys, order, tensor dtype, shape and bytes."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _feed(h, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, np.ndarray):
        h.update(f"A{obj.dtype.str}{obj.shape}|".encode())
        h.update(np.ascontiguousarray(obj).tobytes())
    elif isinstance(obj, dict):
        h.update(f"D{type(obj).__name__}{len(obj)}|".encode())
        items = list(obj.items())
        if type(obj) is dict:  # plain dicts come back in sorted key order (the skeleton is sorted JSON)
            items.sort(key=lambda kv: repr(kv[0]))
        for k, v in items:
            _feed(h, k)
            _feed(h, v)
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{type(obj).__name__}{len(obj)}|".encode())
        if all(type(v) in (int, float, str, bool, type(None)) for v in obj):  # e.g. the python RNG state
            h.update(repr([(type(v).__name__, v) for v in obj]).encode())
            return
        for v in obj:
            _feed(h, v)
    else:
        h.update(f"S{type(obj).__name__}:{obj!r}|".encode())
