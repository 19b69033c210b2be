"""The ``asyncckpt`` command line: look at and check published checkpoints.

    asyncckpt inspect DIR          tags in DIR, which one ``latest`` names, sizes, compression ratio
    asyncckpt inspect DIR/TAG      one tag: ranks, files, sizes, and a table of every tensor (``--json`` too)
    asyncckpt verify DIR[/TAG]     read and check every chunk of every rank (``--all``: every tag in DIR)
    asyncckpt export DIR[/TAG] --to safetensors|torch OUT    consolidated full tensors (:func:`asyncckpt.export`)
    asyncckpt import SRC DIR --tag TAG    a torch.save / safetensors file as a checkpoint (:func:`asyncckpt.import_checkpoint`)

``verify``, ``export`` and ``import`` draw a progress bar (tqdm) on stderr when stderr is a terminal, or with
``--progress``; ``--no-progress`` (and ``--quiet``) turn it off.

Exit status: 0 good; 1 a checkpoint is corrupt or refused (the message names the file, chunk and tensor at
fault; ``inspect DIR`` and ``verify --all`` report every tag, then exit 1 if any was bad, or ``latest`` is);
2 usage errors and checkpoints that do not exist (the message lists the tags that do).

Only the public reader API of :mod:`asyncckpt.loader` is used: what this prints is what a load would see.

DIR may be an object-store URL (``s3://bucket/run``, docs/STORAGE.md): its options come from the environment
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...) and from ``--storage-option KEY=VALUE`` before the command
(``asyncckpt --storage-option endpoint_url=http://127.0.0.1:9000 inspect s3://bucket/run``).

``inspect --json`` prints one JSON object; its fields are stable (new fields may be added, none removed or
retyped). ``inspect DIR --json``::

    save_dir: str; latest: str | null (the tag `latest` names); partial: [str] (partial directories);
    latest_error: str (only when `latest` cannot be read); tags: [ one object per tag, oldest first:
        tag: str; latest: bool; and either
        world_size: int; global_steps: int | null; created_unix: number | null; raw_bytes: int;
        stored_bytes: int; ratio: number | null (raw / stored)
        or error: str (the tag cannot be read), with refused: true (an entry refused as a tag) ]

``inspect DIR/TAG --json``::

    save_dir, tag, path: str; latest: bool; format: str; format_version: int; library_version: str;
    created_unix: number; global_steps: int (only when the manifest has it); world_size: int;
    node_local: bool; raw_bytes, stored_bytes: int; ratio: number | null;
    files: {name: size in bytes};
    ranks: [ {rank: int, index: str (its rank index file), bytes: int | null, data_files: {name: size}} ];
    tensors: [ one object per record, by key then rank: key: str; rank: int; dtype: str; shape: [int];
        device: str; raw_bytes: int; stored_bytes: int; chunks: int; codecs: {codec: chunk count};
        file: str (a tensor with its own bytes) or view_of: str, byte_offset: int, stride: [int] (a view);
        global_shape, global_offset: [int] (a shard of a DTensor) ]
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import sys
import threading
import time
from typing import Any, Sequence

import click

from . import __version__
from .errors import (CheckpointError, CheckpointNotFoundError, ConfigError, CorruptCheckpointError, InvalidTagError,
                     StateMismatchError, TagExistsError)
from .export import DEFAULT_MAX_SHARD_SIZE, export, import_checkpoint
from .format import LATEST, PARTIAL_SUFFIX, TensorRecord, dtype_name
from .loader import CheckpointReader, list_tags, object_store, read_latest, refused_tags, split_path
from .storage import is_url

EXIT_OK, EXIT_CORRUPT, EXIT_USAGE = 0, 1, 2


class _Failure(Exception):
    """Stop the command with an exit status and a message on stderr."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


# ------------------------------------------------------------------------------------------ locating
def _storage() -> dict | None:
    """The fsspec options given with ``--storage-option`` (None: the environment's configuration only)."""
    ctx = click.get_current_context(silent=True)
    return ctx.find_root().obj if ctx is not None else None


def _is_save_dir(path: str) -> bool:
    """A directory asyncckpt saved into: it has ``latest``, a published tag or a partial directory."""
    store = object_store(path, _storage())
    if store is not None:
        return store.exists(store.join(path, LATEST)) or bool(list_tags(path, storage=store))
    if not os.path.isdir(path):
        return False
    return (os.path.lexists(os.path.join(path, LATEST)) or bool(list_tags(path)) or bool(refused_tags(path))
            or bool(_partials(path)))


def _partials(save_dir: str) -> list[str]:
    """Partial directories left in ``save_dir`` (saves in progress or cut short; never read). An object store
    has none: an incomplete tag there is one without its commit marker, which no reader lists."""
    if is_url(save_dir):
        return []
    try:
        names = os.listdir(save_dir)
    except OSError:
        return []
    return sorted(n for n in names if n.startswith(".") and n.endswith(PARTIAL_SUFFIX)
                  and os.path.isdir(os.path.join(save_dir, n)))


def _locate(path: str) -> tuple[str, str | None]:
    """``DIR`` or ``DIR/TAG`` → (save_dir, tag or None). ``DIR/TAG`` of a tag that does not exist (or is
    incomplete) still resolves to (DIR, TAG), so that the reader's error lists the tags that do exist."""
    save_dir, tag = split_path(path, storage=_storage())
    if tag is None and not _is_save_dir(save_dir):
        parent, name = os.path.split(save_dir)
        parent = parent or "."
        if name and _is_save_dir(parent):
            return parent, name
        if is_url(save_dir) or not os.path.exists(save_dir):
            raise _Failure(EXIT_USAGE, f"{path}: no such file or directory")
        raise _Failure(EXIT_USAGE, f"{path}: not an asyncckpt checkpoint directory (no '{LATEST}' file, no published tags)")
    return save_dir, tag


def _open(save_dir: str, tag: str | None) -> CheckpointReader:
    """A reader, or a failure with the right exit status: 2 when the tag does not exist, 1 when it is corrupt."""
    try:
        return CheckpointReader(save_dir, tag, storage=_storage())
    except CheckpointNotFoundError as exc:
        raise _Failure(EXIT_USAGE, str(exc)) from None
    except CorruptCheckpointError as exc:
        raise _Failure(EXIT_CORRUPT, f"CORRUPT: {exc}") from None
    except InvalidTagError as exc:
        raise _Failure(EXIT_USAGE, str(exc)) from None
    except (CheckpointError, OSError) as exc:
        raise _Failure(EXIT_CORRUPT, f"cannot read {os.path.join(save_dir, tag or '')}: {exc}") from None


def _latest_or_none(save_dir: str) -> tuple[str | None, str]:
    """(tag named by ``latest``, problem with ``latest`` or "")."""
    try:
        return read_latest(save_dir, storage=_storage()), ""
    except CheckpointError as exc:
        return None, str(exc)


# ------------------------------------------------------------------------------------------ formatting
def _size(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def _ratio(raw: int, stored: int) -> float | None:
    return round(raw / stored, 4) if stored else None


def _ratio_text(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def _when(unix: Any) -> str:
    """A manifest's ``created_unix`` as a UTC time; "-" for anything that is not a representable time (the
    manifest is untrusted: 1e300, -1e18, strings, booleans)."""
    if isinstance(unix, bool) or not isinstance(unix, (int, float)):
        return "-"
    try:
        return datetime.datetime.fromtimestamp(unix, tz=datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, ValueError, OSError):
        return "-"


def _table(headers: Sequence[str], rows: list[Sequence[Any]], right: Sequence[int] = (), indent: str = "  ") -> list[str]:
    """Aligned columns; the columns whose indices are in ``right`` are right-aligned (numbers)."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for r in cells:
        parts = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append((indent + "  ".join(parts)).rstrip())
    return lines


def _codec_mix(rec: TensorRecord) -> dict[str, int]:
    """How a tensor's chunks are stored: ``raw``, ``zstd``, or ``shuffle[zzrr]`` (each byte plane zstd or raw)."""
    mix: dict[str, int] = {}
    for c in rec.chunks:
        name = c.codec
        if c.codec == "shuffle":
            name += "[" + "".join("z" if p == "zstd" else "r" for p, _ in c.planes) + "]"
        mix[name] = mix.get(name, 0) + 1
    return mix


def _tensor_info(key: str, rank: int, rec: TensorRecord) -> dict[str, Any]:
    d: dict[str, Any] = {"key": key, "rank": rank, "dtype": dtype_name(rec.dtype), "shape": list(rec.shape),
                         "device": rec.device}
    if rec.is_view:
        d.update(view_of=rec.base, byte_offset=rec.byte_offset, stride=list(rec.stride), raw_bytes=rec.nbytes,
                 stored_bytes=0, chunks=0, codecs={})
    else:
        d.update(file=rec.file, raw_bytes=rec.nbytes, stored_bytes=sum(c.length for c in rec.chunks),
                 chunks=len(rec.chunks), codecs=_codec_mix(rec))
    if rec.is_shard:
        d.update(global_shape=list(rec.global_shape), global_offset=list(rec.global_offset))
    return d


def _natural(key: str) -> list:
    """Sort key that orders ``state/2`` before ``state/10`` (digit runs compare by length, then digits: no int()
    of a forged 5000-digit key)."""
    return [(len(p.lstrip("0")), p.lstrip("0"), p) if i % 2 else p
            for i, p in enumerate(re.split(r"([0-9]+)", key))]


def _shape_text(t: dict[str, Any]) -> str:
    text = "[" + ", ".join(str(s) for s in t["shape"]) + "]"
    if "global_shape" in t:
        text += f" at {t['global_offset']} of {t['global_shape']}"
    return text


def _codecs_text(t: dict[str, Any]) -> str:
    if "view_of" in t:
        return f"view of {t['view_of']} at byte {t['byte_offset']}"
    return " ".join(f"{name}:{n}" for name, n in t["codecs"].items()) or "-"


# ------------------------------------------------------------------------------------------ describing
def describe_dir(save_dir: str) -> dict[str, Any]:
    """Every published tag in ``save_dir`` with its sizes; a tag that cannot be read carries its error, and
    entries refused as tags (symlinked tag directories, ...) are listed with ``refused`` and the reason."""
    latest, latest_error = _latest_or_none(save_dir)
    tags = []
    for tag in list_tags(save_dir, storage=_storage()):
        entry: dict[str, Any] = {"tag": tag, "latest": tag == latest}
        try:  # a format v3 reader reads the indices (and lists the directory) for the sizes
            with CheckpointReader(save_dir, tag, storage=_storage()) as reader:
                m = reader.manifest
                entry.update(world_size=reader.world_size, global_steps=m.get("global_steps"),
                             created_unix=m.get("created_unix"), raw_bytes=reader.raw_bytes,
                             stored_bytes=reader.stored_bytes, ratio=_ratio(reader.raw_bytes, reader.stored_bytes))
        except Exception as exc:  # noqa: BLE001 - one unreadable tag must not hide the others
            entry["error"] = _error_text(exc)
        tags.append(entry)
    for name, why in refused_tags(save_dir, storage=_storage()).items():
        tags.append({"tag": name, "latest": name == latest, "refused": True, "error": why})
    out: dict[str, Any] = {"save_dir": save_dir, "latest": latest, "tags": tags, "partial": _partials(save_dir)}
    if latest_error:
        out["latest_error"] = latest_error
    return out


def describe_tag(reader: CheckpointReader) -> dict[str, Any]:
    m = reader.manifest
    latest, _ = _latest_or_none(reader.save_dir)
    ranks = []
    for entry in reader.rank_entries():
        index = reader.indices.get(entry["rank"], {})
        ranks.append({"rank": entry["rank"], "index": entry["index"], "bytes": entry.get("bytes"),
                      "data_files": dict(index.get("files", {}))})
    tensors = [_tensor_info(key, rank, rec) for key in sorted(reader.records, key=_natural)
               for rank, rec in sorted(reader.records[key], key=lambda r: r[0])]
    out = {"save_dir": reader.save_dir, "tag": reader.tag, "path": reader.path, "latest": reader.tag == latest,
           "format": m.get("format"), "format_version": m.get("format_version"),
           "library_version": m.get("library_version"), "created_unix": m.get("created_unix"),
           "world_size": reader.world_size, "node_local": bool(m.get("node_local")), "ranks": ranks,
           "files": reader.files, "raw_bytes": reader.raw_bytes, "stored_bytes": reader.stored_bytes,
           "ratio": _ratio(reader.raw_bytes, reader.stored_bytes), "tensors": tensors}
    if "global_steps" in m:
        out["global_steps"] = m["global_steps"]
    return out


def _print_dir(d: dict[str, Any]) -> None:
    head = f"checkpoints in {d['save_dir']}"
    if d["latest"]:
        head += f"  (latest -> {d['latest']})"
    elif "latest_error" in d:
        head += f"  (latest is unreadable: {d['latest_error']})"
    else:
        head += "  (no latest file)"
    click.echo(head)
    if d["tags"]:
        rows = []
        for t in d["tags"]:
            mark = "*" if t["latest"] else ""
            if "error" in t:
                what = "refused: " if t.get("refused") else "unreadable: "
                rows.append([mark, t["tag"], "-", "-", "-", "-", "-", what + (t["error"].splitlines() or [""])[0]])
                continue
            steps = "-" if t.get("global_steps") is None else t["global_steps"]
            rows.append([mark, t["tag"], steps, t["world_size"], _size(t["raw_bytes"]), _size(t["stored_bytes"]),
                         _ratio_text(t["ratio"]), _when(t.get("created_unix"))])
        for line in _table(["", "TAG", "STEPS", "RANKS", "RAW", "ON DISK", "RATIO", "CREATED"], rows,
                           right=(2, 3, 4, 5, 6)):
            click.echo(line)
    else:
        click.echo("  no published tags")
    if d["latest"] and d["latest"] not in {t["tag"] for t in d["tags"]}:
        click.echo(f"warning: latest names {d['latest']!r}, which is not a published tag here")
    if d["partial"]:
        click.echo("partial directories (saves in progress or cut short; never loaded; a save removes "
                   "leftovers): " + ", ".join(d["partial"]))


def _print_tag(d: dict[str, Any]) -> None:
    fields = [
        ("checkpoint", d["path"] + ("  (named by latest)" if d["latest"] else "")),
        ("format", f"{d['format']} v{d['format_version']}, written by asyncckpt {d['library_version']}"),
        ("created", _when(d["created_unix"])),
    ]
    if "global_steps" in d:
        fields.append(("global steps", d["global_steps"]))
    rank_ids = [r["rank"] for r in d["ranks"]]
    ranks = ", ".join(str(r) for r in rank_ids) if len(rank_ids) <= 16 else f"{len(rank_ids)} ranks"
    fields += [
        ("world size", f"{d['world_size']}  (ranks present: {ranks}{'; node-local copy' if d['node_local'] else ''})"),
        ("raw bytes", f"{_size(d['raw_bytes'])}  ({d['raw_bytes']:,} B of tensor data)"),
        ("on disk", f"{_size(d['stored_bytes'])}  ({d['stored_bytes']:,} B in {len(d['files'])} files)"),
        ("ratio", _ratio_text(d["ratio"]) + "  (raw / on disk)"),
    ]
    width = max(len(k) for k, _ in fields)
    for k, v in fields:
        click.echo(f"{k.ljust(width)}  {v}")
    click.echo("")
    click.echo("files")
    for line in _table(["NAME", "SIZE", "BYTES"], [[n, _size(s), f"{s:,}"] for n, s in d["files"].items()],
                       right=(1, 2)):
        click.echo(line)
    click.echo("")
    multi = d["world_size"] > 1
    click.echo(f"tensors ({len(d['tensors'])})")
    headers = ["KEY"] + (["RANK"] if multi else []) + ["DTYPE", "SHAPE", "DEVICE", "CHUNKS", "RAW", "STORED", "CODECS"]
    rows = []
    for t in d["tensors"]:
        stored = "-" if "view_of" in t else _size(t["stored_bytes"])
        rows.append([t["key"]] + ([t["rank"]] if multi else []) +
                    [t["dtype"], _shape_text(t), t["device"], t["chunks"], _size(t["raw_bytes"]), stored, _codecs_text(t)])
    first_num = 2 if multi else 1
    right = ((1,) if multi else ()) + (first_num + 3, first_num + 4, first_num + 5)
    for line in _table(headers, rows, right=right):
        click.echo(line)
    click.echo("codecs: raw = stored as is; zstd = compressed; shuffle[..] = byte planes, each z (zstd) or r (raw)")


# ------------------------------------------------------------------------------------------ progress
_PROGRESS = click.option("--progress/--no-progress", default=None,
                         help="Draw a progress bar on stderr (default: when stderr is a terminal).")


def _show_progress(flag: bool | None) -> bool:
    return flag if flag is not None else sys.stderr.isatty()


@contextlib.contextmanager
def _watch_reads(reader: CheckpointReader, enabled: bool):
    """While the block runs (a verify), a bar of the stored bytes ``reader`` has read, polled from its public
    ``bytes_read`` counter by a helper thread."""
    if not enabled:
        yield
        return
    try:
        from tqdm.auto import tqdm
    except ImportError:
        yield
        return
    total = sum(c.length for recs in reader.records.values() for _, rec in recs if not rec.is_view for c in rec.chunks)
    start = reader.bytes_read
    bar = tqdm(total=total, desc=f"verify {reader.tag}", unit="B", unit_scale=True, unit_divisor=1024,
               file=sys.stderr, dynamic_ncols=True, leave=False)
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(0.2):
            bar.update(min(total, reader.bytes_read - start) - bar.n)

    thread = threading.Thread(target=poll, name="asyncckpt-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        bar.update(min(total, reader.bytes_read - start) - bar.n)
        bar.close()


# ------------------------------------------------------------------------------------------ commands
@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="asyncckpt")
@click.option("--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE",
              help="An option of the object store's fsspec file system (s3fs: endpoint_url, key, secret, ...), "
                   "for DIR given as a URL; repeatable. VALUE is read as YAML (true, 5, text).")
@click.pass_context
def main(ctx: click.Context, storage_options: tuple[str, ...]) -> None:
    """Inspect, verify, export and import asyncckpt checkpoints.

    Exit status: 0 good, 1 corrupt checkpoint, 2 usage error or checkpoint not found."""
    ctx.obj = _parse_storage_options(storage_options) or None


def _parse_storage_options(items: tuple[str, ...]) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise click.BadParameter(f"{item!r}: expected KEY=VALUE with KEY an option name",
                                     param_hint="--storage-option")
        out[key] = yaml.safe_load(value) if value else ""
    return out


def _run(fn) -> None:
    try:
        fn()
    except _Failure as exc:
        click.echo(str(exc), err=True)
        raise click.exceptions.Exit(exc.code) from None
    except CheckpointError as exc:  # e.g. a save directory that cannot be listed
        click.echo(str(exc), err=True)
        raise click.exceptions.Exit(EXIT_USAGE if isinstance(exc, CheckpointNotFoundError) else EXIT_CORRUPT) from None


def _error_text(exc: BaseException) -> str:
    """An asyncckpt error's own message; any other error (a bug) with its type, so that it is not mistaken."""
    return str(exc) if isinstance(exc, CheckpointError) else f"{type(exc).__name__}: {exc}"


@main.command("inspect")
@click.argument("path", type=click.Path(file_okay=False, path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of tables.")
def inspect_cmd(path: str, as_json: bool) -> None:
    """Show the tags in DIR, or one tag in detail (DIR/TAG).

    DIR: every published tag, which one `latest` names, world size, raw bytes, bytes on disk and the
    compression ratio; tags that cannot be read, and entries refused as tags (symlinked tag directories),
    with the reason (exit status 1 then, and when `latest` is unreadable). DIR/TAG: ranks, files, sizes and
    a table of every tensor (key, dtype, shape, device, chunks, codec mix)."""

    def go() -> None:
        save_dir, tag = _locate(path)
        if tag is None:
            d = describe_dir(save_dir)
            if as_json:
                click.echo(json.dumps(d, indent=2))
            else:
                _print_dir(d)
            if not d["tags"]:
                raise _Failure(EXIT_USAGE, f"{save_dir}: no published checkpoints")
            bad = [t["tag"] for t in d["tags"] if "error" in t]
            if bad or "latest_error" in d:
                problems = ([f"{LATEST} is unreadable"] if "latest_error" in d else []) + \
                    ([f"{len(bad)} tag(s) unreadable or refused: {', '.join(bad)}"] if bad else [])
                raise _Failure(EXIT_CORRUPT, f"{save_dir}: " + "; ".join(problems))
            return
        d = describe_tag(_open(save_dir, tag))
        if as_json:
            click.echo(json.dumps(d, indent=2))
        else:
            _print_tag(d)

    _run(go)


@main.command("verify")
@click.argument("path", type=click.Path(file_okay=False, path_type=str))
@click.option("--all", "all_tags", is_flag=True, help="Verify every published tag in DIR.")
@_PROGRESS
def verify_cmd(path: str, all_tags: bool, progress: bool | None) -> None:
    """Read and check every chunk of every rank of a checkpoint.

    PATH is DIR (the tag `latest` names; with --all every published tag, and every entry refused as a tag)
    or DIR/TAG. Checks everything a load checks (sealed manifest and rank indices, file kinds and sizes,
    every skeleton's references, views and DTensor shards), then the xxh3 checksum of every decoded chunk.
    Exit status 1 on the first corruption found in a tag, naming the file, chunk and tensor."""

    show = _show_progress(progress)

    def go() -> None:
        save_dir, tag = _locate(path)
        if not all_tags:
            if not _verify_one(save_dir, tag, stop_if_missing=True, progress=show):
                raise click.exceptions.Exit(EXIT_CORRUPT)
            return
        if tag is not None:
            raise _Failure(EXIT_USAGE, f"--all verifies every tag of a directory; pass DIR, not {path}")
        tags, refused = list_tags(save_dir, storage=_storage()), refused_tags(save_dir, storage=_storage())
        if not tags and not refused:
            raise _Failure(EXIT_USAGE, f"{save_dir}: no published checkpoints")
        failed = 0
        for t in tags:  # one bad tag does not stop the others from being verified
            if not _verify_one(save_dir, t, stop_if_missing=False, progress=show):
                failed += 1
        for why in refused.values():
            click.echo(f"REFUSED: {why}", err=True)
        total, failed = len(tags) + len(refused), failed + len(refused)
        if total > 1:
            click.echo(f"{total - failed} of {total} checkpoints OK" + (f", {failed} CORRUPT" if failed else ""))
        if failed:
            raise click.exceptions.Exit(EXIT_CORRUPT)

    _run(go)


def _verify_one(save_dir: str, tag: str | None, stop_if_missing: bool, progress: bool) -> bool:
    """Verify one tag; print one line. False when it is corrupt (or, with ``stop_if_missing`` off, cannot be
    opened at all); with it on, a tag that does not exist stops the command with a usage error."""
    t0 = time.perf_counter()
    try:
        reader = _open(save_dir, tag)
    except _Failure as exc:
        if exc.code != EXIT_CORRUPT and stop_if_missing:
            raise
        click.echo(str(exc), err=True)
        return False
    try:
        with _watch_reads(reader, progress):
            counts = reader.verify()
    except CorruptCheckpointError as exc:
        click.echo(f"CORRUPT: {exc}", err=True)
        return False
    except Exception as exc:  # noqa: BLE001 - reported as a failure of this tag, not a traceback
        click.echo(f"CORRUPT: cannot verify {reader.path}: {_error_text(exc)}", err=True)
        return False
    click.echo(f"OK {reader.path}: {reader.world_size} rank(s), {counts['tensors']} tensors, {counts['chunks']} chunks, "
               f"{_size(counts['raw_bytes'])} raw, {_size(counts['stored_bytes'])} on disk, "
               f"checked in {time.perf_counter() - t0:.2f} s")
    return True


_USAGE_ERRORS = (CheckpointNotFoundError, ConfigError, InvalidTagError, StateMismatchError, TagExistsError)


def _convert(fn) -> Any:
    """Run an export or import; its errors as failures: 2 for what the user asked for (a missing checkpoint or
    source, a bad option, an existing output), 1 for what cannot be read or written."""
    try:
        return fn()
    except _USAGE_ERRORS as exc:
        raise _Failure(EXIT_USAGE, str(exc)) from None
    except CorruptCheckpointError as exc:
        raise _Failure(EXIT_CORRUPT, f"CORRUPT: {exc}") from None
    except CheckpointError as exc:
        raise _Failure(EXIT_CORRUPT, str(exc)) from None
    except OSError as exc:
        raise _Failure(EXIT_CORRUPT, f"{exc.filename or ''}: {exc.strerror or exc}") from None


@main.command("export")
@click.argument("path", type=click.Path(path_type=str))
@click.option("--to", "to", type=click.Choice(["safetensors", "torch"]), required=True,
              help="safetensors: OUT is a directory (model.safetensors, or shards and an index); torch: OUT is a file.")
@click.argument("out", type=click.Path(path_type=str))
@click.option("--model-only", is_flag=True, help="Only the model: the 'module' entry of an AsyncCheckpointer checkpoint.")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32", "fp64"], case_sensitive=False),
              help="Cast floating-point tensors (never integers or booleans).")
@click.option("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE, show_default=True,
              help="safetensors: start a new shard file past this size (5GB = 5*10^9 bytes; MiB/GiB too).")
@click.option("--rank", default=0, show_default=True, type=int, help="Whose rank-local state to export.")
@click.option("--overwrite", is_flag=True, help="Replace an existing export at OUT.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary.")
@_PROGRESS
def export_cmd(path: str, to: str, out: str, model_only: bool, dtype: str | None, max_shard_size: str, rank: int,
               overwrite: bool, quiet: bool, progress: bool | None) -> None:
    """Write checkpoint PATH (DIR: the tag `latest` names; or DIR/TAG) as consolidated full tensors.

    FSDP2 shards are stitched into full tensors and replicated (DDP) state is taken from whichever rank wrote
    it; rank-local state is the state rank --rank (0) saved. Tensors are read and written one at a time.
    --to torch writes one torch.save file of the whole state (or of the model with --model-only) that loads
    with torch.load(weights_only=True). --to safetensors writes tensors only, keyed by key path
    (module/fc.weight; fc.weight with --model-only): non-tensor values (step counters, hyper-parameters,
    client state) are left out and counted; tied tensors are written once and the other names recorded in
    the file's metadata."""
    show = not quiet and _show_progress(progress)

    def go() -> None:
        save_dir, tag = _locate(path)
        r = _convert(lambda: export(save_dir, out, to=to, tag=tag, model_only=model_only, dtype=dtype,
                                    max_shard_size=max_shard_size, rank=rank, overwrite=overwrite, progress=show))
        if quiet:
            return
        click.echo(f"exported {r.tensors} tensors ({_size(r.nbytes)}) from {r.source} to {out}")
        for f in r.files:
            click.echo(f"  {f}")
        if r.world_size > 1:
            click.echo(f"note: rank-local state (not sharded, not replicated) is rank {r.rank}'s of "
                       f"{r.world_size} ranks (--rank to choose)")
        if r.non_tensors:
            click.echo(f"note: safetensors holds tensors only: {r.non_tensors} non-tensor values were left out "
                       "(use --to torch to keep the whole state)")
        if r.aliases:
            click.echo(f"note: {len(r.aliases)} tied tensor(s) written once: " +
                       ", ".join(f"{a} = {k}" for a, k in list(r.aliases.items())[:5]) +
                       (", ..." if len(r.aliases) > 5 else ""))
        if r.dropped:
            click.echo(f"note: {len(r.dropped)} pickled object(s) (torch.load(weights_only=True) refuses them) were "
                       "replaced by None: " + ", ".join(r.dropped[:5]) + (", ..." if len(r.dropped) > 5 else ""))

    _run(go)


@main.command("import")
@click.argument("source", type=click.Path(path_type=str))
@click.argument("save_dir", type=click.Path(file_okay=False, path_type=str))
@click.option("--tag", required=True, help="The tag to publish the imported state as.")
@click.option("--as-module", is_flag=True,
              help="Save {'module': state}, which AsyncCheckpointer.load_checkpoint loads into a model.")
@click.option("--no-latest", is_flag=True, help="Do not point `latest` at the imported tag.")
@click.option("--config", "config", type=click.Path(dir_okay=False, path_type=str),
              help="A YAML config for the save (compression, writer threads, ...).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary.")
@_PROGRESS
def import_cmd(source: str, save_dir: str, tag: str, as_module: bool, no_latest: bool, config: str | None,
               quiet: bool, progress: bool | None) -> None:
    """Publish a torch.save or safetensors file as checkpoint TAG of SAVE_DIR.

    SOURCE: a torch.save file (loaded with weights_only=True), a safetensors file, a Hugging Face
    model.safetensors.index.json (with its shards), or a directory holding one of the last two."""
    show = not quiet and _show_progress(progress)

    def go() -> None:
        r = _convert(lambda: import_checkpoint(source, save_dir, tag, as_module=as_module, save_latest=not no_latest,
                                               config=config, progress=show))
        if not quiet:
            files = f"{len(r.sources)} {r.kind} files" if len(r.sources) > 1 else f"a {r.kind} file"
            click.echo(f"imported {r.tensors} tensors ({_size(r.nbytes)}) from {source} ({files}) as {r.path}")

    _run(go)


if __name__ == "__main__":  # pragma: no cover
    main()
