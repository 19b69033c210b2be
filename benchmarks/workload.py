"""The training state every system checkpoints: a GPT-style decoder (token and position embeddings, N pre-LN
transformer blocks, LM head) with AdamW, after one optimizer step so that AdamW's moments exist.

``kind: many_small`` replaces the decoder by ``n_tensors`` parameters of ``numel`` elements each (what
per-tensor overheads cost), trained by the same kind of step.

The model is deterministic for a seed, so separate processes (one per system, one per rank) build identical
states. ``dtype: bfloat16`` gives the bf16-weights variant: parameters, gradients and AdamW moments in bf16.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .spec import WorkloadSpec

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def torch_dtype(spec: WorkloadSpec) -> torch.dtype:
    return DTYPES[spec.dtype]


class Block(nn.Module):
    def __init__(self, d: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        heads = lambda z: z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2)  # noqa: E731
        y = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, spec: WorkloadSpec):
        super().__init__()
        self.tok = nn.Embedding(spec.vocab, spec.d_model)
        self.pos = nn.Embedding(spec.seq_len, spec.d_model)
        self.blocks = nn.ModuleList(Block(spec.d_model, spec.n_heads) for _ in range(spec.n_layers))
        self.ln_f = nn.LayerNorm(spec.d_model)
        self.head = nn.Linear(spec.d_model, spec.vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok(idx) + self.pos(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


class ManySmall(nn.Module):
    """``n_tensors`` parameters of ``numel`` elements; the loss is their mean square."""

    def __init__(self, spec: WorkloadSpec, gen: torch.Generator):
        super().__init__()
        self.params = nn.ParameterList(nn.Parameter(torch.randn(spec.numel, generator=gen, device=gen.device))
                                       for _ in range(spec.n_tensors))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.cat([p.reshape(-1) for p in self.params]).square().mean()


@dataclass
class Workload:
    """A built workload: the model (possibly DDP-wrapped), its optimizer, and one training step."""

    spec: WorkloadSpec
    model: nn.Module  # what the checkpointers see (DDP-wrapped with several ranks)
    module: nn.Module  # the bare GPT
    optimizer: torch.optim.Optimizer
    step: Callable[[], float]
    build_s: float

    def state_tensors(self) -> list[torch.Tensor]:
        """Every tensor of the model and optimizer state (what a checkpoint must hold)."""
        out = [t for t in self.module.state_dict().values() if isinstance(t, torch.Tensor)]
        for st in self.optimizer.state.values():
            out.extend(v for v in st.values() if isinstance(v, torch.Tensor))
        return out

    @property
    def raw_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state_tensors())

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    def zero_fraction(self) -> float:
        """Fraction of state bytes in elements that are exactly zero (these compress to nothing)."""
        zeros = sum(int((t == 0).sum()) * t.element_size() for t in self.state_tensors() if t.is_floating_point())
        return zeros / max(1, self.raw_bytes)

    def describe(self) -> dict:
        return {"name": self.spec.name, "kind": self.spec.kind, "optimizer": self.spec.optimizer, "dtype": self.spec.dtype, "n_params": self.n_params,
                "raw_bytes": self.raw_bytes, "n_tensors": len(self.state_tensors()), "build_s": self.build_s,
                "zero_fraction": self.zero_fraction(), "spec": dict(self.spec.__dict__)}


def build(spec: WorkloadSpec, *, ddp: bool = False, device: str = "cpu") -> Workload:
    """Build the model and optimizer on ``device`` and take one step (AdamW state exists afterwards)."""
    t0 = time.perf_counter()
    gen = torch.Generator(device=device).manual_seed(spec.seed)
    torch.manual_seed(spec.seed)
    module: nn.Module
    if spec.kind == "many_small":
        module = ManySmall(spec, gen)
    else:
        with torch.device(device):
            module = GPT(spec)
        _init(module, gen)
    model: nn.Module = module
    if ddp:
        model = nn.parallel.DistributedDataParallel(module)
    # foreach=False: the optimizer step keeps no multi-tensor temporaries around (steadier RSS figures)
    if spec.optimizer == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(module.parameters(), lr=spec.lr, momentum=0.9, foreach=False)
    else:
        optimizer = torch.optim.AdamW(module.parameters(), lr=spec.lr, foreach=False)
    tokens = torch.randint(0, spec.vocab, (spec.batch, spec.seq_len + 1), generator=gen, device=device)
    x, y = tokens[:, :-1], tokens[:, 1:]

    def step(densify: bool = False) -> float:
        if spec.kind == "many_small":
            loss = model(x)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return float(loss.detach())
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
        loss.backward()
        if densify:
            _densify_embedding_grad(module.tok, x, gen)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    step(densify=spec.dense_init and spec.kind == "gpt")
    if torch_dtype(spec) != torch.float32:
        # The first step runs in fp32, then parameters and AdamW moments are cast (a bf16 matmul is ~20x slower
        # than fp32 on CPUs without AVX512-BF16, and a first step from bf16 weights has the same kind of
        # values). Later steps (the loop-overhead figure) run in bf16.
        module.to(torch_dtype(spec))  # in place: the optimizer keeps the same Parameter objects
        for st in optimizer.state.values():
            for k, v in st.items():
                if isinstance(v, torch.Tensor) and v.is_floating_point() and k != "step":
                    st[k] = v.to(torch_dtype(spec))
    return Workload(spec, model, module, optimizer, step, time.perf_counter() - t0)


def _densify_embedding_grad(emb: nn.Embedding, tokens: torch.Tensor, gen: torch.Generator) -> None:
    """One step only touches the embedding rows of the tokens in the batch, so AdamW's moments would be zero
    in every other row (a 32k vocabulary and a few hundred tokens: ~99% zero rows, 13% of a 1.5 GB state),
    which compresses unrealistically well. After many real steps every row has been touched, so the other
    rows get a Gaussian gradient with the touched rows' per-column scale (no repeated bytes, realistic
    exponents)."""
    g = emb.weight.grad
    if g is None:
        return
    touched = torch.unique(tokens.reshape(-1))
    mask = torch.ones(g.shape[0], dtype=torch.bool, device=g.device)
    mask[touched] = False
    if not mask.any():
        return
    scale = g[touched].float().std(dim=0, unbiased=False).clamp_min(1e-12)
    noise = torch.randn(int(mask.sum()), g.shape[1], generator=gen, device=g.device) * scale
    g[mask] = noise.to(g.dtype)


def _init(module: nn.Module, gen: torch.Generator) -> None:
    """GPT-2 style init, from a private generator (identical on every rank and in every process)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02, generator=gen)
                if name.endswith(("proj.weight", "out.weight")):
                    p.div_(math.sqrt(2 * max(1, len(getattr(module, "blocks", [])))))
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)


TINY = WorkloadSpec("warmup", vocab=64, d_model=16, n_layers=1, n_heads=2, seq_len=8, batch=2)
