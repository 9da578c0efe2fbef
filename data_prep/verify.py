"""``python -m data_prep verify DIR``: re-read every shard and check it against ``manifest.json``.

Checks, per shard: the file exists, its byte size and sha256 match the manifest, it is a readable
tar, every sample has a parseable ``<key>.json`` record, every image record has exactly one image
member that PIL decodes, no member is orphaned, and the sample count matches. Also: manifest totals
add up, no ``shard-*.tar`` in DIR is missing from the manifest, the manifest has the documented
types (a wrong type is an invalid manifest, not a crash), and no temporary file of an interrupted
run is left in DIR or DIR/.prep. Returns a list of problems, each a precise one-line message (empty
list = all good).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections import OrderedDict

from .shards import IMAGE_EXTS, MANIFEST, STATE_DIR, TMP_RE, file_sha256

_HEX = set("0123456789abcdef")


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def manifest_problems(manifest) -> list[str]:
    """Type/shape problems of a parsed manifest (empty list = usable)."""
    if not isinstance(manifest, dict):
        return [f"top level is a {type(manifest).__name__}, not an object"]
    out = []
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        return [f"'shards' is {type(shards).__name__ if 'shards' in manifest else 'missing'}, not a list"]
    for k in ("num_samples", "total_bytes"):
        if not _is_count(manifest.get(k)):
            out.append(f"{k!r} is {manifest.get(k)!r}, not a non-negative integer")
    names = set()
    for i, e in enumerate(shards):
        if not isinstance(e, dict):
            out.append(f"shards[{i}] is a {type(e).__name__}, not an object")
            continue
        name = e.get("name")
        if not isinstance(name, str) or not name or name != os.path.basename(name) or name.startswith("."):
            out.append(f"shards[{i}].name is {name!r}, not a file name in the directory")
        elif name in names:
            out.append(f"shards[{i}].name {name!r} is listed twice")
        else:
            names.add(name)
        for k in ("num_samples", "bytes"):
            if not _is_count(e.get(k)):
                out.append(f"shards[{i}].{k} is {e.get(k)!r}, not a non-negative integer")
        sha = e.get("sha256")
        if not (isinstance(sha, str) and len(sha) == 64 and set(sha) <= _HEX):
            out.append(f"shards[{i}].sha256 is {sha!r}, not a 64-digit hex digest")
    return out


def stray_temporaries(root: str) -> list[str]:
    """Temporary files an interrupted ``data_prep llava`` run left in ``root`` or ``root/.prep``."""
    out = []
    for d in (root, os.path.join(root, STATE_DIR)):
        try:
            names = sorted(os.listdir(d))
        except OSError:
            continue
        out.extend(os.path.relpath(os.path.join(d, n), root) for n in names
                   if TMP_RE.match(n) and os.path.isfile(os.path.join(d, n)))
    return out


def _check_tar(path: str, name: str) -> tuple[int, list[str]]:
    from PIL import Image

    problems: list[str] = []
    samples: "OrderedDict[str, dict[str, bytes]]" = OrderedDict()
    try:
        with tarfile.open(path, "r") as tar:
            for member in tar:
                if not member.isreg():
                    problems.append(f"{name}: member {member.name!r} is not a regular file")
                    continue
                base = os.path.basename(member.name)
                key, dot, ext = base.partition(".")
                if not dot:
                    problems.append(f"{name}: member {member.name!r} has no extension")
                    continue
                data = tar.extractfile(member).read()
                if ext in samples.setdefault(key, {}):
                    problems.append(f"{name}: sample {key} has a duplicate .{ext} member")
                samples[key][ext] = data
    except (tarfile.TarError, OSError, EOFError) as e:
        problems.append(f"{name}: unreadable tar ({type(e).__name__}: {e})")
        return len(samples), problems
    for key, files in samples.items():
        if "json" not in files:
            problems.append(f"{name}: sample {key} has no .json record (members: {sorted(files)})")
            continue
        try:
            rec = json.loads(files["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            problems.append(f"{name}: sample {key} record is not valid JSON ({e})")
            continue
        images = [e for e in files if e in IMAGE_EXTS]
        others = [e for e in files if e != "json" and e not in IMAGE_EXTS]
        if others:
            problems.append(f"{name}: sample {key} has unexpected members {others}")
        wants_image = isinstance(rec, dict) and rec.get("image") is not None
        if wants_image and len(images) != 1:
            problems.append(f"{name}: sample {key} (id {rec.get('id')!r}) has {len(images)} image members, expected 1")
        if not wants_image and images:
            problems.append(f"{name}: sample {key} is text-only but has image members {images}")
        for ext in images:
            try:
                with Image.open(io.BytesIO(files[ext])) as im:
                    im.load()
            except Exception as e:  # any PIL failure is a decode failure
                problems.append(f"{name}: sample {key} image .{ext} does not decode ({type(e).__name__}: {e})")
    return len(samples), problems


def verify_dir(root: str) -> tuple[list[str], dict]:
    """Verify a shard directory. Returns ``(problems, counts)``; counts has shards/samples/bytes checked."""
    counts = {"shards": 0, "samples": 0, "bytes": 0}
    mpath = os.path.join(root, MANIFEST)
    strays = [
        f"{name}: stray temporary file left by an interrupted run (rerun `python -m data_prep llava` with the "
        "same arguments to finish the run and remove it, or delete it)" for name in stray_temporaries(root)
    ]
    if not os.path.isfile(mpath):
        return [f"{mpath}: no manifest (was `python -m data_prep llava --out {root}` run to completion?)"] + strays, counts
    try:
        with open(mpath, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
        return [f"{mpath}: malformed manifest ({type(e).__name__}: {e})"], counts
    bad = manifest_problems(manifest)
    if bad:
        return [f"{mpath}: invalid manifest: {p}" for p in bad], counts
    shards = manifest["shards"]
    problems: list[str] = strays
    listed = set()
    for entry in shards:
        name = entry.get("name")
        listed.add(name)
        path = os.path.join(root, name)
        if not os.path.isfile(path):
            problems.append(f"{name}: listed in the manifest but missing")
            continue
        size = os.path.getsize(path)
        if size != entry.get("bytes"):
            problems.append(f"{name}: {size} bytes on disk, manifest says {entry.get('bytes')}")
        digest = file_sha256(path)
        if digest != entry.get("sha256"):
            problems.append(f"{name}: sha256 {digest[:16]}... does not match manifest {str(entry.get('sha256'))[:16]}...")
        n, tar_problems = _check_tar(path, name)
        problems.extend(tar_problems)
        if n != entry.get("num_samples"):
            problems.append(f"{name}: {n} samples in the tar, manifest says {entry.get('num_samples')}")
        counts["shards"] += 1
        counts["samples"] += n
        counts["bytes"] += size
    total = sum(e.get("num_samples", 0) for e in shards)
    if manifest.get("num_samples") != total:
        problems.append(f"{MANIFEST}: num_samples {manifest.get('num_samples')} != sum over shards {total}")
    total_bytes = sum(e.get("bytes", 0) for e in shards)
    if manifest.get("total_bytes") != total_bytes:
        problems.append(f"{MANIFEST}: total_bytes {manifest.get('total_bytes')} != sum over shards {total_bytes}")
    for name in sorted(os.listdir(root)):
        if name.endswith(".tar") and name not in listed:
            problems.append(f"{name}: tar file in {root} not listed in the manifest")
    return problems, counts
