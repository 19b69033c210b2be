"""Train a small GPT-style decoder on random tokens with asynchronous checkpoints, then resume from `latest`.

    .venv/bin/python scripts/train_demo.py --out .demo_ckpt --steps 60 --save-every 10     (what `make demo` runs)

Every --save-every steps the trainer calls ``save_checkpoint``: it returns as soon as the state is copied into
host buffers (the *stall*), and training goes on while the writer pool compresses, checksums, writes and
fsyncs the checkpoint in the background. Each save prints one line when it is taken (its stall) and one
when its future resolves (time to durable, bytes on disk). Then the demo simulates a restart: a fresh model
and optimizer load `latest`, the parameters must equal the trained model's at that step exactly, and the
resumed run continues with the very same losses as the uninterrupted one (RNG states are restored too).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from collections import deque
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, ROOT)

import asyncckpt  # noqa: E402
from asyncckpt.format import LATEST, PARTIAL_SUFFIX  # noqa: E402


# ------------------------------------------------------------------------------------------------ model
@dataclass(frozen=True)
class GPTConfig:
    vocab: int = 2048
    context: int = 32
    dim: int = 192
    heads: int = 6
    layers: int = 4
    batch: int = 4


TINY = GPTConfig(vocab=64, context=16, dim=32, heads=2, layers=1, batch=2)


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then an MLP."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.heads = cfg.heads
        self.ln1 = nn.LayerNorm(cfg.dim)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.ln2 = nn.LayerNorm(cfg.dim)
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, 4 * cfg.dim), nn.GELU(), nn.Linear(4 * cfg.dim, cfg.dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab, cfg.dim)
        self.pos = nn.Embedding(cfg.context, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab, bias=False)
        self.head.weight = self.tok.weight  # tied weights: one storage, saved once, tied again after load
        for m in self.modules():  # GPT-2 initialisation
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def build(cfg: GPTConfig, seed: int) -> tuple[GPT, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(seed)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 10))
    return model, opt, sched


def train_step(model: GPT, opt: torch.optim.Optimizer, sched, cfg: GPTConfig) -> float:
    """One step on a random batch drawn from torch's global RNG (restored on load, so a resumed run sees
    the same batches)."""
    idx = torch.randint(cfg.vocab, (cfg.batch, cfg.context + 1))
    logits = model(idx[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, cfg.vocab), idx[:, 1:].reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    return loss.item()


def state_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    seen, total = set(), 0
    tensors = list(model.state_dict().values()) + [v for s in opt.state.values() for v in s.values()
                                                    if isinstance(v, torch.Tensor)]
    for t in tensors:
        if t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.numel() * t.element_size()
    return total


# ------------------------------------------------------------------------------------------------ output dir
def clear_out_dir(path: str) -> None:
    """Empty ``path`` for a fresh run, but only if it is empty or holds nothing but asyncckpt checkpoints
    (``latest``, published tags, partial directories, leftover temporary files): never someone's data."""
    if not os.path.exists(path):
        return
    if not os.path.isdir(path):
        raise SystemExit(f"--out {path} exists and is not a directory; refusing to touch it")
    tags = set(asyncckpt.list_tags(path))
    foreign = [n for n in os.listdir(path)
               if not (n == LATEST or n in tags
                       or (n.startswith(".") and n.endswith(PARTIAL_SUFFIX))
                       or (n.startswith(f".{LATEST}.") and n.endswith(".tmp")))]
    if foreign:
        raise SystemExit(f"--out {path} holds files that are not asyncckpt checkpoints ({', '.join(sorted(foreign)[:5])}); "
                         "refusing to clear it: pass an empty or new directory")
    shutil.rmtree(path)


# ------------------------------------------------------------------------------------------------ main
def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=".demo_ckpt", help="checkpoint directory (cleared at start if it only holds checkpoints)")
    p.add_argument("--steps", type=int, default=60, help="training steps before the simulated restart")
    p.add_argument("--save-every", type=int, default=10, help="save a checkpoint every N steps")
    p.add_argument("--resume-steps", type=int, default=5, help="steps to train after resuming")
    p.add_argument("--config", default=None, help="asyncckpt YAML config (default: asyncckpt defaults)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads for training (0 = all cores but one, at most 4: the writer pool "
                        "needs a core, and an OpenMP region with a descheduled thread stalls the whole step)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="a tiny model (for tests)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.save_every < 1 or args.resume_steps < 0:
        p.error("--steps and --save-every must be >= 1, --resume-steps >= 0")
    threads = args.threads or max(1, min(4, (os.cpu_count() or 2) - 1))
    torch.set_num_threads(threads)
    cfg = TINY if args.tiny else GPTConfig()
    out = args.out
    clear_out_dir(out)

    model, opt, sched = build(cfg, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    config = asyncckpt.Config.coerce(args.config)
    print(f"model: GPT, {cfg.layers} blocks, dim {cfg.dim}, vocab {cfg.vocab}, {n_params / 1e6:.2f} M parameters; "
          f"AdamW; {args.steps} steps, a checkpoint every {args.save_every} -> {out}; {threads} training thread(s)")

    pending: deque = deque()  # (step, future) in save order
    last_saved_step, last_snapshot = None, None
    losses: list[float] = []

    def report(block: bool) -> None:
        """One line per save whose future has resolved (all of them when ``block``), in save order."""
        while pending and (block or pending[0][1].done()):
            step, fut = pending.popleft()
            r = fut.result(timeout=600)
            if r.skipped:
                print(f"  step {step:4d}  {r.tag:<14} skipped (writer busy, on_busy=skip)")
                continue
            ratio = r.raw_bytes / r.total_bytes_written if r.total_bytes_written else float("nan")
            print(f"  step {step:4d}  {r.tag:<14} durable after {r.time_to_durable_s * 1e3:7.1f} ms   "
                  f"{mib(r.raw_bytes)} raw -> {mib(r.total_bytes_written)} on disk ({ratio:.2f}x)")

    t_train = time.perf_counter()
    with asyncckpt.AsyncCheckpointer(model, opt, lr_scheduler=sched, config=config) as saver:
        for step in range(1, args.steps + 1):
            losses.append(train_step(model, opt, sched, cfg))
            if step == 1:
                print(f"state: {mib(state_bytes(model, opt))} (parameters + AdamW moments, fp32)")
                saver.prepare()  # allocate the host buffers now, so that even the first save only copies
            if step % args.save_every == 0:
                t0 = time.perf_counter()
                fut = saver.save_checkpoint(out, client_state={"step": step, "loss": losses[-1]})
                stall = time.perf_counter() - t0
                print(f"save step {step:4d}  {fut.tag:<14} stall {stall * 1e3:6.1f} ms   (loss {losses[-1]:.4f})")
                pending.append((step, fut))
                last_saved_step = step
                last_snapshot = {k: v.clone() for k, v in model.state_dict().items()}
            report(block=False)
        report(block=True)
    train_s = time.perf_counter() - t_train
    print(f"trained {args.steps} steps in {train_s:.1f} s; checkpoints: {', '.join(asyncckpt.list_tags(out))}")
    if last_saved_step is None:
        print("no checkpoint was saved (--steps < --save-every); nothing to resume")
        return 1

    # The uninterrupted run goes on from the last save, if that was the end of training (for comparison).
    reference = None
    if last_saved_step == args.steps:
        rng = torch.get_rng_state()
        reference = [train_step(model, opt, sched, cfg) for _ in range(args.resume_steps)]
        torch.set_rng_state(rng)

    # ---- simulated restart: fresh objects (different initial weights), resume from `latest`
    print(f"restart: fresh model and optimizer, load_checkpoint({out!r}) from latest")
    model2, opt2, sched2 = build(cfg, args.seed + 1)
    with asyncckpt.AsyncCheckpointer(model2, opt2, lr_scheduler=sched2, config=config) as saver2:
        t0 = time.perf_counter()
        path, client_state = saver2.load_checkpoint(out)
        load_s = time.perf_counter() - t0
        print(f"loaded {path} in {load_s * 1e3:.1f} ms: global_steps={saver2.global_steps}, client_state={client_state}")
        assert path is not None and client_state["step"] == last_saved_step, (path, client_state)
        assert saver2.global_steps == last_saved_step, saver2.global_steps
        state = model2.state_dict()
        assert state.keys() == last_snapshot.keys()
        for k, v in last_snapshot.items():
            assert torch.equal(state[k], v), f"parameter {k} differs after resume"
        assert model2.head.weight.data_ptr() == model2.tok.weight.data_ptr(), "tied weights came apart"
        print(f"resume OK: all {len(state)} tensors of step {last_saved_step} are bit-identical")
        resumed = [train_step(model2, opt2, sched2, cfg) for _ in range(args.resume_steps)]
    if resumed:
        print("resumed losses: " + " ".join(f"{x:.4f}" for x in resumed))
    if reference is not None and resumed:
        same = all(a == b for a, b in zip(reference, resumed))
        print("the resumed run " + ("repeats the uninterrupted run exactly (same batches, same losses)" if same else
                                    "differs from the uninterrupted run: " + " ".join(f"{x:.4f}" for x in reference)))
        if not same:
            return 1
    print(f"look at it:  asyncckpt inspect {out}   |   asyncckpt verify {out} --all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
