"""LLaVA JSON + image folder -> WebDataset shards + ``manifest.json`` (``python -m data_prep llava``).

Layout of ``OUT``::

    shard-000000.tar ...   WebDataset shards; sample key = 9-digit index of the record in the JSON
                           (no dots), members ``<key>.json`` (the record, verbatim) and, for image
                           records, ``<key>.<ext>`` (the image bytes as they are; ext from the
                           decoded format: jpg, png, webp, ..., ``img`` for any other format)
    manifest.json          per-shard ``num_samples``, ``bytes``, ``sha256`` and totals (below)
    rejects.jsonl          one ``{"index", "id", "reason", "detail"}`` per rejected record
    .prep/                 per-shard completion records (what makes a rerun resumable)

Shard ``k`` holds the accepted records among input records ``[k*S, (k+1)*S)`` (``S`` =
``--shard-size``), so shard contents do not depend on worker count or on how a previous run was
interrupted. A shard is written under a temporary name and renamed, then its completion record is
written the same way; a rerun skips every shard whose completion record and tar (same byte size)
exist, and redoes the rest. The manifest and ``rejects.jsonl`` are assembled from the completion
records at the end.

Resume state (``.prep/run.json``) records every argument that changes the output (the annotation
file's path, size and mtime, the real path of ``--images``, ``--shard-size`` and the rules
version ``PREP_VERSION``); a rerun with any of them changed is refused with the fix, so one output
never mixes two inputs. A run holds an exclusive lock on ``.prep/lock``; it starts by deleting the
temporary files an interrupted run left behind. Worker processes exit on their own when the main
process dies (``kill -9``), instead of lingering as orphans.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import stat
import sys
import tarfile
import threading
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from .images import to_rgb
from .jsonstream import iter_records
from .records import REASONS, check_record, record_id

MANIFEST = "manifest.json"
REJECTS = "rejects.jsonl"
STATE_DIR = ".prep"
MANIFEST_VERSION = 1
PREP_VERSION = 2
"""Version of the accept/reject rules and shard layout; part of the resume state (a run made by
other rules is not resumed)."""
# Temporary files of an interrupted run (removed at the start of the next one, reported by verify).
TMP_RE = re.compile(r"^(\.shard-\d+\.tar\.tmp-\d+|.+\.tmp-\d+|.+\.tmp)$")
# Not-found-like errors (the path cannot name an existing file) vs. a file that cannot be read.
_NOT_FOUND = {errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG, errno.EISDIR}

_PIL_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}
# Extensions of a sample's image member: what every shard reader (loader, verify, eval) looks for.
# ``load_image`` writes only these (``img`` for formats outside ``_PIL_EXT``).
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff", "img")


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def sample_key(index: int) -> str:
    return f"{index:09d}"


class ImagePathError(ValueError):
    """The image path cannot be passed to the OS (NUL byte, unencodable name)."""


def load_image(path: str) -> tuple[bytes, str]:
    """Read and fully decode an image (and its conversion to 8-bit RGB, as the loader does it);
    return ``(raw bytes, extension)``.

    Raises ``OSError`` (any: not found, permission, symlink loop, ...) from reading,
    ``ImagePathError`` for a path the OS cannot take, ``ValueError("undecodable: ...")`` from decoding.
    """
    from PIL import Image

    try:  # non-blocking open: a FIFO must not hang the run; only regular files are read
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except ValueError as e:  # embedded NUL, unencodable file name
        raise ImagePathError(str(e)) from None
    with open(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, "is a directory", path)
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, "not a regular file (FIFO, device or socket)", path)
        data = f.read()
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            fmt = im.format or ""
            if im.width < 1 or im.height < 1:
                raise ValueError(f"image has size {im.width}x{im.height}")
            to_rgb(im)  # what the training loader does: a mode it cannot convert is a reject here
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError)
        raise ValueError(f"undecodable: {type(e).__name__}: {e}") from None
    return data, _PIL_EXT.get(fmt, "img")


def _os_reject(image: str, images_dir: str, e: OSError) -> tuple[str, str]:
    name = errno.errorcode.get(e.errno, type(e).__name__) if e.errno is not None else type(e).__name__
    shown = image if len(image) <= 200 else image[:200] + "..."
    if e.errno in _NOT_FOUND:
        what = "not found" if e.errno == errno.ENOENT else (e.strerror or name)
        return "missing_image", f"{shown} under {images_dir}: {what} ({name})"
    return "unreadable_image", f"{shown} under {images_dir}: {e.strerror or e} ({name})"


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # deterministic bytes -> deterministic sha256
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _atomic_write_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def write_shard(shard_index: int, start: int, records: list, images_dir: str, out_dir: str) -> dict:
    """Validate ``records`` (input indices ``start, start+1, ...``) and write shard ``shard_index``.

    Returns the completion record: ``{"shard", "name", "num_samples", "bytes", "sha256",
    "num_records", "rejects": [...]}`` (``name`` is None when no record was accepted). Runs in a
    worker process; it holds one shard's images in memory at most.
    """
    rejects: list[dict] = []
    name = shard_name(shard_index)
    final = os.path.join(out_dir, name)
    tmp = os.path.join(out_dir, f".{name}.tmp-{os.getpid()}")
    n = 0
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for offset, rec in enumerate(records):
            index = start + offset
            bad = check_record(rec)
            image = None
            if bad is None and rec.get("image") is not None:
                try:
                    image = load_image(os.path.join(images_dir, rec["image"]))
                except OSError as e:
                    bad = _os_reject(rec["image"], images_dir, e)
                except ImagePathError as e:
                    bad = ("bad_image_field", f"{rec['image']!r}: {e}")
                except ValueError as e:
                    bad = ("undecodable_image", f"{rec['image']}: {e}")
            if bad is None:
                try:
                    text = json.dumps(rec, ensure_ascii=False).encode("utf-8")
                except (UnicodeEncodeError, ValueError, TypeError) as e:  # check_record catches these first
                    bad = ("invalid_unicode", f"record cannot be written as UTF-8 JSON ({type(e).__name__}: {e})")
            if bad is not None:
                rejects.append({"index": index, "id": record_id(rec, index), "reason": bad[0], "detail": bad[1]})
                continue
            key = sample_key(index)
            _add_member(tar, f"{key}.json", text)
            if image is not None:
                _add_member(tar, f"{key}.{image[1]}", image[0])
            n += 1
    done = {"shard": shard_index, "num_records": len(records), "num_samples": n, "rejects": rejects}
    if n:
        os.replace(tmp, final)
        done.update(name=name, bytes=os.path.getsize(final), sha256=file_sha256(final))
    else:
        os.remove(tmp)
        if os.path.exists(final):
            os.remove(final)
        done.update(name=None, bytes=0, sha256=None)
    _atomic_write_json(os.path.join(out_dir, STATE_DIR, f"shard-{shard_index:06d}.json"), done)
    return done


def _write_shard_task(args: tuple) -> dict:
    return write_shard(*args)


def _exit_with_parent(parent_pid: int, poll_s: float = 0.5) -> None:
    """Pool-worker initializer: a daemon thread ends this process once ``parent_pid`` is gone.

    ``kill -9`` of the main process gives its pool workers no signal; they would finish their shard
    and then wait forever on the task queue. Polling ``getppid`` (re-parenting) and ``parent_pid``
    catches it under every start method."""
    ppid = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != ppid:
                os._exit(1)
            try:
                os.kill(parent_pid, 0)
            except ProcessLookupError:
                os._exit(1)
            except OSError:
                pass

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def make_pool(workers: int) -> ProcessPoolExecutor:
    """A process pool whose workers exit when this process dies."""
    return ProcessPoolExecutor(max_workers=workers, initializer=_exit_with_parent, initargs=(os.getpid(),))


def remove_stale_temporaries(out_dir: str) -> list[str]:
    """Delete the temporary files an interrupted run left in ``out_dir`` and its ``.prep``."""
    removed = []
    for d in (out_dir, os.path.join(out_dir, STATE_DIR)):
        try:
            names = os.listdir(d)
        except OSError:
            continue
        for name in names:
            path = os.path.join(d, name)
            if TMP_RE.match(name) and os.path.isfile(path):
                os.remove(path)
                removed.append(path)
    return removed


def _completed(out_dir: str, shard_index: int, num_records: int) -> dict | None:
    """The completion record of a shard if the shard is complete on disk, else None."""
    path = os.path.join(out_dir, STATE_DIR, f"shard-{shard_index:06d}.json")
    try:
        with open(path, encoding="utf-8") as f:
            done = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(done, dict) or done.get("num_records") != num_records or not isinstance(done.get("rejects"), list):
        return None
    if not isinstance(done.get("num_samples"), int) or done.get("name") not in (None, shard_name(shard_index)):
        return None
    if done.get("name"):
        tar = os.path.join(out_dir, done["name"])
        if not os.path.isfile(tar) or os.path.getsize(tar) != done.get("bytes"):
            return None
    return done


def _chunks(records: Iterable, size: int) -> Iterator[tuple[int, int, list]]:
    chunk: list = []
    start = 0
    for i, rec in enumerate(records):
        if not chunk:
            start = i
        chunk.append(rec)
        if len(chunk) == size:
            yield start // size, start, chunk
            chunk = []
    if chunk:
        yield start // size, start, chunk


class PrepError(RuntimeError):
    """A fatal, user-fixable problem (message says what to do)."""


@dataclass
class PrepResult:
    out_dir: str
    num_records: int = 0
    num_samples: int = 0
    shards_written: int = 0
    """Shards (re)written by this run (input chunks that kept at least one record)."""
    shards_skipped: int = 0
    """Shards already complete from a previous run."""
    empty_chunks: int = 0
    """Input chunks of ``shard_size`` records that kept no record, so produced no shard."""
    rejects_by_reason: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    removed_temporaries: int = 0

    @property
    def num_rejects(self) -> int:
        return sum(self.rejects_by_reason.values())

    @property
    def num_shards(self) -> int:
        return self.shards_written + self.shards_skipped

    def summary(self) -> str:
        rate = self.num_records / self.seconds if self.seconds > 0 else float("nan")
        lines = [
            f"{self.num_records} records -> {self.num_samples} samples in "
            f"{self.num_shards} shards ({self.shards_written} written, "
            f"{self.shards_skipped} already complete) at {self.out_dir}",
            f"{self.seconds:.1f}s, {rate:.0f} records/s",
        ]
        if self.empty_chunks:
            lines.append(f"{self.empty_chunks} chunk(s) of input records kept no record and produced no shard")
        if self.removed_temporaries:
            lines.append(f"removed {self.removed_temporaries} temporary file(s) left by an interrupted run")
        if self.rejects_by_reason:
            lines.append(f"{self.num_rejects} rejected (see {os.path.join(self.out_dir, REJECTS)}):")
            for reason, count in self.rejects_by_reason.most_common():
                lines.append(f"  {reason:24s} {count:8d}  {REASONS.get(reason, '')}")
        else:
            lines.append("0 rejected")
        if self.num_records and not self.num_samples:
            lines.append("warning: every record was rejected; the output holds no sample")
        return "\n".join(lines)


# What a resumed run must share with the run that wrote OUT, with the flag to name in messages.
_STATE_KEYS = {
    "prep_version": "the data_prep version",
    "source": "--json (path)",
    "source_bytes": "--json (file size)",
    "source_mtime_ns": "--json (modification time)",
    "images": "--images",
    "shard_size": "--shard-size",
}


def _run_state(json_path: str, images_dir: str, shard_size: int) -> dict:
    st = os.stat(json_path)
    return {
        "prep_version": PREP_VERSION,
        "source": os.path.realpath(json_path),
        "source_bytes": st.st_size,
        "source_mtime_ns": st.st_mtime_ns,
        "images": os.path.realpath(images_dir),
        "shard_size": shard_size,
    }


def state_changes(out_dir: str, json_path: str, images_dir: str, shard_size: int) -> list[str] | None:
    """What differs between a previous run's resume state in ``out_dir`` and these arguments:
    ``None`` when there is no previous run, ``[]`` when it can be resumed, else one line per change.
    Raises ``PrepError`` for an unreadable state file."""
    path = os.path.join(out_dir, STATE_DIR, "run.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        if not isinstance(old, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise PrepError(f"{path}: unreadable resume state ({type(e).__name__}: {e}); use a fresh --out "
                        f"directory (or delete {out_dir}) to start over") from None
    state = _run_state(json_path, images_dir, shard_size)
    return [f"{_STATE_KEYS[k]}: was {old.get(k)!r}, now {state[k]!r}" for k in _STATE_KEYS if old.get(k) != state[k]]


def _check_state(out_dir: str, json_path: str, images_dir: str, shard_size: int) -> None:
    changed = state_changes(out_dir, json_path, images_dir, shard_size)
    if changed:
        raise PrepError(
            f"{out_dir} holds a previous run made with other inputs ({'; '.join(changed)}). Resuming would mix "
            f"the two in one output. Rerun with the previous arguments to resume it, or use a fresh --out "
            f"directory (or delete {out_dir}) to start over with these."
        )
    _atomic_write_json(os.path.join(out_dir, STATE_DIR, "run.json"), _run_state(json_path, images_dir, shard_size))


def _lock(out_dir: str):
    """Hold an exclusive lock on ``OUT/.prep/lock`` (None where ``fcntl`` is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return None
    f = open(os.path.join(out_dir, STATE_DIR, "lock"), "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise PrepError(f"another data_prep run is writing to {out_dir}; wait for it to end (one run per --out)") from None
    return f


def prepare_llava(
    json_path: str,
    images_dir: str,
    out_dir: str,
    shard_size: int = 1000,
    workers: int = 1,
    progress: bool = True,
) -> PrepResult:
    """Convert a LLaVA JSON (array or JSON Lines) into WebDataset shards; resumable.

    Bad records are rejected (``rejects.jsonl``, counts in the result), never fatal. Raises
    ``PrepError`` for unusable arguments and empty input, and ``jsonstream.JSONStreamError`` for a
    malformed or undecodable file.
    """
    if shard_size < 1:
        raise PrepError(f"--shard-size must be >= 1, got {shard_size}")
    if workers < 1:
        raise PrepError(f"--workers must be >= 1, got {workers}")
    if not os.path.isfile(json_path):
        raise PrepError(f"--json {json_path} is not a file")
    if not os.path.isdir(images_dir):
        raise PrepError(f"--images {images_dir} is not a directory")
    os.makedirs(os.path.join(out_dir, STATE_DIR), exist_ok=True)
    lock = _lock(out_dir)
    try:
        _check_state(out_dir, json_path, images_dir, shard_size)
        removed = remove_stale_temporaries(out_dir)
        result = _prepare(json_path, images_dir, out_dir, shard_size, workers, progress)
        result.removed_temporaries = len(removed)
        return result
    finally:
        if lock is not None:
            lock.close()


def _prepare(json_path: str, images_dir: str, out_dir: str, shard_size: int, workers: int,
             progress: bool) -> PrepResult:
    t0 = time.perf_counter()
    result = PrepResult(out_dir=out_dir)
    done_by_shard: dict[int, dict] = {}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(unit="rec", desc="data_prep llava", file=sys.stderr, dynamic_ncols=True)

    def finish(done: dict) -> None:
        done_by_shard[done["shard"]] = done
        if bar is not None:
            bar.update(done["num_records"])

    chunks = _chunks(iter_records(json_path), shard_size)
    skipped: set[int] = set()
    if workers == 1:
        for shard_index, start, recs in chunks:
            done = _completed(out_dir, shard_index, len(recs))
            if done is not None:
                skipped.add(shard_index)
            else:
                done = write_shard(shard_index, start, recs, images_dir, out_dir)
            finish(done)
    else:
        with make_pool(workers) as pool:
            pending = set()
            for shard_index, start, recs in chunks:
                done = _completed(out_dir, shard_index, len(recs))
                if done is not None:
                    skipped.add(shard_index)
                    finish(done)
                    continue
                # Bounded in-flight work: at most 2 shards' records per worker are held.
                while len(pending) >= 2 * workers:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        finish(fut.result())
                pending.add(pool.submit(_write_shard_task, (shard_index, start, recs, images_dir, out_dir)))
            for fut in wait(pending).done:
                finish(fut.result())
    if bar is not None:
        bar.close()

    shards = []
    rejects: list[dict] = []
    for k in sorted(done_by_shard):
        done = done_by_shard[k]
        result.num_records += done["num_records"]
        rejects.extend(done["rejects"])
        if done["name"]:
            shards.append({"name": done["name"], "num_samples": done["num_samples"],
                           "bytes": done["bytes"], "sha256": done["sha256"]})
            if k in skipped:
                result.shards_skipped += 1
            else:
                result.shards_written += 1
        else:
            result.empty_chunks += 1
    if not done_by_shard:
        raise PrepError(f"--json {json_path} holds no records (an empty file or an empty array); nothing to convert")
    # Shards left from a previous run that this input no longer produces (e.g. all records rejected).
    live = {s["name"] for s in shards}
    for name in os.listdir(out_dir):
        if name.startswith("shard-") and name.endswith(".tar") and name not in live:
            os.remove(os.path.join(out_dir, name))
    for r in rejects:
        result.rejects_by_reason[r["reason"]] += 1
    result.num_samples = sum(s["num_samples"] for s in shards)
    with open(os.path.join(out_dir, REJECTS + ".tmp"), "wb") as f:
        for r in rejects:  # backslashreplace: a lone surrogate in an id stays a valid JSON escape
            f.write((json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8", "backslashreplace"))
    os.replace(os.path.join(out_dir, REJECTS + ".tmp"), os.path.join(out_dir, REJECTS))
    manifest = {
        "format": "llava-wds",
        "version": MANIFEST_VERSION,
        "source": os.path.abspath(json_path),
        "shard_size": shard_size,
        "num_records": result.num_records,
        "num_samples": result.num_samples,
        "num_rejects": result.num_rejects,
        "rejects_by_reason": dict(sorted(result.rejects_by_reason.items())),
        "total_bytes": sum(s["bytes"] for s in shards),
        "shards": shards,
    }
    _atomic_write_json(os.path.join(out_dir, MANIFEST), manifest)
    result.seconds = time.perf_counter() - t0
    return result
