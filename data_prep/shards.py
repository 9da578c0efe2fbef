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
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tarfile
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from .jsonstream import iter_records
from .records import REASONS, check_record, record_id

MANIFEST = "manifest.json"
REJECTS = "rejects.jsonl"
STATE_DIR = ".prep"
MANIFEST_VERSION = 1

_PIL_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}
# Extensions of a sample's image member: what every shard reader (loader, verify, eval) looks for.
# ``load_image`` writes only these (``img`` for formats outside ``_PIL_EXT``).
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff", "img")


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def sample_key(index: int) -> str:
    return f"{index:09d}"


def load_image(path: str) -> tuple[bytes, str]:
    """Read and fully decode an image; return ``(raw bytes, extension)``.

    Raises ``FileNotFoundError`` or ``ValueError("undecodable: ...")``.
    """
    from PIL import Image

    with open(path, "rb") as f:
        data = f.read()
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            fmt = im.format or ""
            if im.width < 1 or im.height < 1:
                raise ValueError(f"image has size {im.width}x{im.height}")
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError)
        raise ValueError(f"undecodable: {type(e).__name__}: {e}") from None
    return data, _PIL_EXT.get(fmt, "img")


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
                except FileNotFoundError:
                    bad = ("missing_image", f"{rec['image']} not found under {images_dir}")
                except (IsADirectoryError, PermissionError) as e:
                    bad = ("missing_image", f"{rec['image']}: {type(e).__name__}")
                except ValueError as e:
                    bad = ("undecodable_image", f"{rec['image']}: {e}")
            if bad is not None:
                rejects.append({"index": index, "id": record_id(rec, index), "reason": bad[0], "detail": bad[1]})
                continue
            key = sample_key(index)
            _add_member(tar, f"{key}.json", json.dumps(rec, ensure_ascii=False).encode("utf-8"))
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


def _completed(out_dir: str, shard_index: int, num_records: int) -> dict | None:
    """The completion record of a shard if the shard is complete on disk, else None."""
    path = os.path.join(out_dir, STATE_DIR, f"shard-{shard_index:06d}.json")
    try:
        with open(path, encoding="utf-8") as f:
            done = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    if done.get("num_records") != num_records:
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
    shards_skipped: int = 0
    rejects_by_reason: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def num_rejects(self) -> int:
        return sum(self.rejects_by_reason.values())

    def summary(self) -> str:
        rate = self.num_records / self.seconds if self.seconds > 0 else float("nan")
        lines = [
            f"{self.num_records} records -> {self.num_samples} samples in "
            f"{self.shards_written + self.shards_skipped} shards ({self.shards_written} written, "
            f"{self.shards_skipped} already complete) at {self.out_dir}",
            f"{self.seconds:.1f}s, {rate:.0f} records/s",
        ]
        if self.rejects_by_reason:
            lines.append(f"{self.num_rejects} rejected (see {os.path.join(self.out_dir, REJECTS)}):")
            for reason, count in self.rejects_by_reason.most_common():
                lines.append(f"  {reason:24s} {count:8d}  {REASONS.get(reason, '')}")
        else:
            lines.append("0 rejected")
        return "\n".join(lines)


def _check_state(out_dir: str, json_path: str, images_dir: str, shard_size: int) -> None:
    st = os.stat(json_path)
    state = {
        "source": os.path.abspath(json_path),
        "source_bytes": st.st_size,
        "source_mtime_ns": st.st_mtime_ns,
        "images": os.path.abspath(images_dir),
        "shard_size": shard_size,
    }
    path = os.path.join(out_dir, STATE_DIR, "run.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        for k in ("source_bytes", "source_mtime_ns", "shard_size"):
            if old.get(k) != state[k]:
                raise PrepError(
                    f"{out_dir} holds a previous run with {k}={old.get(k)} but this run has {k}={state[k]}; "
                    f"resume needs the same annotation file and --shard-size. Use a fresh --out directory "
                    f"(or delete {out_dir}) to start over."
                )
    _atomic_write_json(path, state)


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
    ``PrepError`` for unusable arguments and ``jsonstream.JSONStreamError`` for a malformed file.
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
    _check_state(out_dir, json_path, images_dir, shard_size)

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
    if workers == 1:
        for shard_index, start, recs in chunks:
            done = _completed(out_dir, shard_index, len(recs))
            if done is not None:
                result.shards_skipped += 1
            else:
                done = write_shard(shard_index, start, recs, images_dir, out_dir)
                result.shards_written += 1
            finish(done)
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            pending = set()
            for shard_index, start, recs in chunks:
                done = _completed(out_dir, shard_index, len(recs))
                if done is not None:
                    result.shards_skipped += 1
                    finish(done)
                    continue
                # Bounded in-flight work: at most 2 shards' records per worker are held.
                while len(pending) >= 2 * workers:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        finish(fut.result())
                pending.add(pool.submit(_write_shard_task, (shard_index, start, recs, images_dir, out_dir)))
                result.shards_written += 1
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
    # Shards left from a previous run that this input no longer produces (e.g. all records rejected).
    live = {s["name"] for s in shards}
    for name in os.listdir(out_dir):
        if name.startswith("shard-") and name.endswith(".tar") and name not in live:
            os.remove(os.path.join(out_dir, name))
    for r in rejects:
        result.rejects_by_reason[r["reason"]] += 1
    result.num_samples = sum(s["num_samples"] for s in shards)
    with open(os.path.join(out_dir, REJECTS + ".tmp"), "w", encoding="utf-8") as f:
        for r in rejects:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
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
