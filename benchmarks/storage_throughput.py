"""The same save and load, to a local directory and to an S3 server, as a throughput table.

    python -m benchmarks.storage_throughput [--mib 256] [--reps 3] [--local-dir DIR] [--endpoint URL]

Without ``--endpoint`` it starts moto's S3 server on 127.0.0.1 in a process of its own (pip install
'asyncckpt[test-s3]'): an emulator that keeps objects in memory, so its figures measure asyncckpt's object-store path (multipart uploads, ranged reads,
the marker protocol) plus the emulator's own cost, not a real object store's network. With ``--endpoint`` it
uses that server (credentials from the AWS_* environment variables) and a bucket named by ``--bucket``.

Workload: ``--mib`` MiB of float32 state in 64 MiB tensors (random, so compression saves little; the codec
runs as configured, ``--compression`` on or off). Per target and repetition: one save waited for (time to
durable: the save call until the checkpoint is published), one load of it (``asyncckpt.load``, verified).
Throughput is raw state bytes per second; the median of the repetitions is printed. A last row uploads and
downloads the same number of bytes as one object with s3fs alone: the server's own ceiling.
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

import torch

import asyncckpt

TENSOR_MIB = 64


def workload(mib: int) -> dict:
    g = torch.Generator().manual_seed(0)
    n = TENSOR_MIB << 18  # float32 elements in TENSOR_MIB MiB
    out = {f"t{i}": torch.randn(n, generator=g) for i in range(mib // TENSOR_MIB)}
    rest = (mib % TENSOR_MIB) << 18
    if rest:
        out["rest"] = torch.randn(rest, generator=g)
    return out


def measure(state: dict, save_dir: str, config: dict, storage: dict | None, reps: int) -> tuple[list, list]:
    saves, loads = [], []
    with asyncckpt.AsyncCheckpointer(torch.nn.Linear(2, 2), config=config) as saver:
        for r in range(reps + 1):  # the first is a warm-up (thread pools, connections)
            t0 = time.perf_counter()
            saver.save_checkpoint(save_dir, tag=f"r{r}", client_state=state).result(3600)
            t1 = time.perf_counter()
            back = asyncckpt.load(save_dir, storage=storage)["client_state"]
            t2 = time.perf_counter()
            assert all(torch.equal(back[k], v) for k, v in state.items())
            if r:
                saves.append(t1 - t0)
                loads.append(t2 - t1)
    return saves, loads


def server_ceiling(fs, path: str, mib: int, block_mib: float, reps: int) -> tuple[float, float]:
    """Median seconds to upload ``mib`` MiB as one object with s3fs alone (in parts of ``block_mib``, as a save
    does) and to read it back with one GET: what the server allows, without asyncckpt."""
    data = os.urandom(mib << 20)
    block = int(block_mib * (1 << 20))
    puts, gets = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        with fs.open(path, "wb", block_size=block) as f:
            for off in range(0, len(data), 4 << 20):
                f.write(data[off: off + (4 << 20)])
        t1 = time.perf_counter()
        fs.cat_file(path)
        puts.append(t1 - t0)
        gets.append(time.perf_counter() - t1)
    fs.rm_file(path)
    return statistics.median(puts), statistics.median(gets)


def start_moto() -> tuple[subprocess.Popen, str]:
    """moto's S3 server in a process of its own (in this one it would compete for the GIL with the saver)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("moto's server did not start") from None
            time.sleep(0.1)
    for k, v in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        os.environ.setdefault(k, v)
    return server, f"http://127.0.0.1:{port}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=256, help="MiB of state saved (default 256)")
    ap.add_argument("--reps", type=int, default=3, help="measured repetitions per target (default 3)")
    ap.add_argument("--local-dir", default=tempfile.gettempdir(), help="where the local target's directory goes")
    ap.add_argument("--endpoint", default="", help="an S3 endpoint URL (default: start moto's server)")
    ap.add_argument("--bucket", default="", help="the bucket to use with --endpoint (default: a new one)")
    ap.add_argument("--block-mib", type=float, default=64.0, help="multipart part size (storage.block_mib)")
    ap.add_argument("--compression", action="store_true", help="compress chunks (default: raw)")
    args = ap.parse_args()

    import s3fs

    server = None
    endpoint = args.endpoint
    if not endpoint:
        server, endpoint = start_moto()
    options = {"endpoint_url": endpoint}
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **options)
    bucket = args.bucket or f"bench-{uuid.uuid4().hex[:10]}"
    if not args.bucket:
        fs.mkdir(bucket)
    local = tempfile.mkdtemp(prefix="asyncckpt-bench-", dir=args.local_dir)
    url = f"s3://{bucket}/bench-{uuid.uuid4().hex[:8]}"
    base = {"writer": {"nice": 0}, "codec": {"compression": args.compression}, "keep_last": 1,
            "storage": {"options": options, "block_mib": args.block_mib}}
    state = workload(args.mib)
    rows = []
    try:
        for name, target, storage in (("local disk", os.path.join(local, "ckpt"), None), ("S3 " + endpoint, url, options)):
            saves, loads = measure(state, target, base, storage, args.reps)
            s, lo = statistics.median(saves), statistics.median(loads)
            rows.append((name, f"{s:.2f}", f"{args.mib / s:.0f}", f"{lo:.2f}", f"{args.mib / lo:.0f}"))
        s, lo = server_ceiling(fs, f"{bucket}/ceiling", args.mib, args.block_mib, args.reps)
        rows.append(("  same bytes, s3fs alone", f"{s:.2f}", f"{args.mib / s:.0f}", f"{lo:.2f}", f"{args.mib / lo:.0f}"))
    finally:
        shutil.rmtree(local, ignore_errors=True)
        try:
            fs.rm(url, recursive=True)
        except FileNotFoundError:
            pass
        if server is not None:
            server.terminate()
            server.wait(30)
    head = ("target", "save s", "save MiB/s", "load s", "load MiB/s")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    print(f"{args.mib} MiB of float32 state, compression {'on' if args.compression else 'off'}, "
          f"{args.reps} reps (median), part size {args.block_mib:g} MiB, {os.cpu_count()} CPUs")
    for r in [head] + rows:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))


if __name__ == "__main__":
    main()
