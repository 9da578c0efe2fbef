"""Hostile-but-realistic input (issue 20): data_prep never crashes on a bad record, says clearly what is
wrong with a bad file, resumes only what it can, leaves nothing behind; the loader decodes 16-bit images
and refuses an unusable max_length or an all-unreadable rank at build time. Fixtures are written here."""

import bz2
import gzip
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time

import numpy as np
import pytest
from PIL import Image

from data_prep.__main__ import main as cli
from data_prep.jsonstream import BadLine, JSONStreamError, iter_records
from data_prep.records import REASONS
from data_prep.shards import MANIFEST, prepare_llava
from data_prep.verify import verify_dir


def conv(q="<image>\nWhat is it?", a="A red circle."):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


def rec(id_, image=None, **kw):
    r = {"id": id_, "conversations": kw.pop("conversations", conv() if image is not None else conv("Hi?", "Hello."))}
    if image is not None:
        r["image"] = image
    r.update(kw)
    return r


def png16(path, w=16, h=8):
    """A 16-bit greyscale PNG: a horizontal ramp 0..65535 (mean ~ mid-grey)."""
    a = np.tile(np.linspace(0, 65535, w).astype(np.uint16), (h, 1))
    Image.fromarray(a).save(path, format="PNG")
    return a


def rejects_of(out):
    return [json.loads(line) for line in (out / "rejects.jsonl").read_text(encoding="utf-8").splitlines()]


def run(tmp_path, records, images=None, name="data.json", raw=None, out="out", **kw):
    """Write records as a JSON array (or ``raw`` bytes) and run the CLI; returns (rc, out dir)."""
    images = images or (tmp_path / "images")
    images.mkdir(exist_ok=True)
    js = tmp_path / name
    js.write_bytes(raw if raw is not None else json.dumps(records).encode())
    args = ["llava", "--json", str(js), "--images", str(images), "--out", str(tmp_path / out), "--quiet"]
    for k, v in kw.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return cli(args), tmp_path / out


@pytest.fixture
def images(tmp_path):
    d = tmp_path / "images"
    d.mkdir()
    Image.new("RGB", (8, 6), (200, 0, 0)).save(d / "ok.png")
    return d


# ---- data_prep stops with a traceback ----------------------------------------------------------------
def test_os_errors_on_image_paths_are_rejects(tmp_path, images):
    os.symlink("loop_b.png", images / "loop_a.png")
    os.symlink("loop_a.png", images / "loop_b.png")
    (images / "sub").mkdir()
    os.mkfifo(images / "fifo.png")
    os.symlink("/dev/zero", images / "zero.png")
    recs = [rec("loop", "loop_a.png"), rec("long", "x" * 300 + ".png"), rec("notdir", "ok.png/inner.png"),
            rec("dir", "sub"), rec("fifo", "fifo.png"), rec("dev", "zero.png"), rec("good", "ok.png")]
    rc, out = run(tmp_path, recs)
    assert rc == 0
    got = {r["id"]: (r["reason"], r["detail"]) for r in rejects_of(out)}
    assert got["loop"][0] == "unreadable_image" and "ELOOP" in got["loop"][1]
    assert got["long"][0] == "missing_image" and "ENAMETOOLONG" in got["long"][1]
    assert got["notdir"][0] == "missing_image" and "ENOTDIR" in got["notdir"][1]
    assert got["dir"][0] == "missing_image" and "EISDIR" in got["dir"][1]
    assert got["fifo"][0] == got["dev"][0] == "unreadable_image" and "not a regular file" in got["fifo"][1]
    assert json.loads((out / MANIFEST).read_text())["num_samples"] == 1
    assert cli(["llava", "--json", str(tmp_path / "data.json"), "--images", str(images), "--out", str(out),
                "--quiet"]) == 0  # the rerun resumes, it does not die on the same record


def test_encodings_and_compression(tmp_path, images):
    recs = [rec("a\u00e9", "ok.png"), rec("b\u4e2d")]
    text = json.dumps(recs, ensure_ascii=False)
    for i, raw in enumerate([b"\xef\xbb\xbf" + text.encode(), text.encode("utf-16"), text.encode("utf-16-le"),
                             gzip.compress(text.encode()), bz2.compress(("\n".join(json.dumps(r) for r in recs)).encode())]):
        rc, out = run(tmp_path, None, raw=raw, out=f"out{i}")
        assert rc == 0, i
        assert json.loads((out / MANIFEST).read_text())["num_samples"] == 2
    p = tmp_path / "latin1.json"
    for raw, want in [(text.encode("latin-1", "replace"), "byte offset 10, line 1"),  # the e-acute of "a\u00e9"
                      (b'[\n{"id": "x",\n "v": "\xff"}]', r"byte\(s\) ff at byte offset 21, line 3"),
                      (gzip.compress(text.encode())[:-12], "truncated gzip"),
                      (b"\x28\xb5\x2f\xfd0000", "zstd-compressed")]:
        p.write_bytes(raw)
        with pytest.raises(JSONStreamError, match=want):
            list(iter_records(str(p)))


def test_cli_whole_file_errors_exit_2_with_a_message(tmp_path, images, capsys):
    cases = {
        "latin1": ('[{"id": "caf\u00e9"}]'.encode("latin-1"), "not valid UTF-8 text"),
        "wrapper": (json.dumps({"data": [rec("a", "ok.png")]}, indent=1).encode(), "one JSON object with keys 'data'"),
        "wrapper1": (json.dumps({"info": "x", "data": [rec("a", "ok.png")]}).encode(), "under 'data'"),
        "empty": (b"", "holds no records"),
        "blank": (b"\n  \n", "holds no records"),
        "emptyarray": (b"[]", "holds no records"),
        "string": (b'"hello"', "starts with a JSON string"),
    }
    for name, (raw, want) in cases.items():
        rc, _ = run(tmp_path, None, raw=raw, name=f"{name}.json", out=f"out-{name}")
        err = capsys.readouterr().err
        assert rc == 2 and want in err, (name, err)


def test_lone_surrogates_are_rejected(tmp_path, images):
    raw = ('[{"id": "s1", "conversations": [{"from": "human", "value": "x\\ud800"}, {"from": "gpt", "value": "y"}]},'
           ' {"id": "s2\\udfff", "conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]},'
           ' {"id": "s3", "image": "ok\\ud800.png", "conversations": [{"from": "human", "value": "<image>x"},'
           ' {"from": "gpt", "value": "y"}]},'
           ' {"id": "s4", "\\ud83d": 1, "conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]},'
           ' {"id": "ok", "conversations": [{"from": "human", "value": "\\ud83d\\ude00"}, {"from": "gpt", "value": "y"}]}]')
    rc, out = run(tmp_path, None, raw=raw.encode())
    assert rc == 0
    rj = rejects_of(out)
    assert [r["reason"] for r in rj] == ["invalid_unicode"] * 4  # a valid surrogate pair is fine
    assert rj[1]["id"] == "s2\\udfff"  # the id stays readable JSON
    assert json.loads((out / MANIFEST).read_text())["num_samples"] == 1


# ---- data_prep misleads ----------------------------------------------------------------------------------
def test_json_lines_bad_line_is_a_reject_with_its_line_number(tmp_path, images):
    lines = [json.dumps(rec("a", "ok.png")), "", json.dumps(rec("b")), '{"id": "c", "conversations": [', json.dumps(rec("d"))]
    rc, out = run(tmp_path, None, raw="\n".join(lines).encode(), name="d.jsonl")
    assert rc == 0
    (r,) = rejects_of(out)
    assert r["reason"] == "malformed_json" and "line 4" in r["detail"] and r["index"] == 2
    got = list(iter_records(str(tmp_path / "d.jsonl")))
    assert isinstance(got[2], BadLine) and got[2].line == 4
    p = tmp_path / "bad.json"
    p.write_text('[{"a": 1},\n {"b": 2}\n {"c": 3}]')
    with pytest.raises(JSONStreamError, match="line 3 column 2"):
        list(iter_records(str(p), chunk_size=5))


def test_dotdot_names_nul_and_escape(tmp_path, images):
    (images / "..ok.jpg").write_bytes((images / "ok.png").read_bytes())
    (images / "d").mkdir()
    (images / "d" / "...x.png").write_bytes((images / "ok.png").read_bytes())
    recs = [rec("dots", "..ok.jpg"), rec("dots2", "d/...x.png"), rec("nul", "ok.png\x00.jpg"), rec("up", "../x.png"),
            rec("up2", "d/../../x.png"), rec("abs", "/etc/passwd")]
    rc, out = run(tmp_path, recs)
    assert rc == 0
    got = {r["id"]: r for r in rejects_of(out)}
    assert set(got) == {"nul", "up", "up2", "abs"}
    assert got["nul"]["reason"] == "bad_image_field" and "NUL" in got["nul"]["detail"]
    assert all(got[k]["reason"] == "bad_image_field" for k in ("up", "up2", "abs"))


def test_summary_counts_only_shards_that_exist(tmp_path, images, capsys):
    recs = [rec("a", "ok.png"), rec("b", "ok.png"), rec("x", "nope.png"), rec("y", "nope.png"), rec("c", "ok.png")]
    rc, out = run(tmp_path, recs, shard_size=2)
    assert rc == 0
    text = capsys.readouterr().out
    assert "in 2 shards (2 written, 0 already complete)" in text and "1 chunk(s)" in text
    assert len(json.loads((out / MANIFEST).read_text())["shards"]) == 2


def test_resume_refuses_changed_images_root(tmp_path, images, capsys):
    recs = [rec("a", "ok.png"), rec("b", "only_in_fixed.png")]
    rc, out = run(tmp_path, recs)
    assert rc == 0 and [r["reason"] for r in rejects_of(out)] == ["missing_image"]
    fixed = tmp_path / "fixed"
    fixed.mkdir()
    for n in ("ok.png", "only_in_fixed.png"):
        (fixed / n).write_bytes((images / "ok.png").read_bytes())
    capsys.readouterr()
    assert cli(["llava", "--json", str(tmp_path / "data.json"), "--images", str(fixed), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--images: was" in err and "fresh --out" in err
    assert cli(["llava", "--json", str(tmp_path / "data.json"), "--images", str(fixed), "--out", str(tmp_path / "o2"),
                "--quiet"]) == 0
    assert json.loads((tmp_path / "o2" / MANIFEST).read_text())["num_rejects"] == 0


# ---- Leftovers -----------------------------------------------------------------------------------------
def test_stale_temporaries_removed_on_rerun_and_reported_by_verify(tmp_path, images):
    rc, out = run(tmp_path, [rec("a", "ok.png"), rec("b")], shard_size=1)
    assert rc == 0 and verify_dir(str(out))[0] == []
    strays = [out / ".shard-000001.tar.tmp-4242", out / ".prep" / "shard-000001.json.tmp-4242",
              out / "manifest.json.tmp-4242", out / "rejects.jsonl.tmp"]
    for p in strays:
        p.write_bytes(b"partial")
    problems, _ = verify_dir(str(out))
    assert len(problems) == 4 and all("stray temporary file" in p for p in problems), problems
    res = prepare_llava(str(tmp_path / "data.json"), str(images), str(out), shard_size=1, progress=False)
    assert res.removed_temporaries == 4 and not any(p.exists() for p in strays)
    assert verify_dir(str(out))[0] == []
    (out / MANIFEST).unlink()  # killed before the manifest: both are reported
    strays[0].write_bytes(b"partial")
    problems, _ = verify_dir(str(out))
    assert "no manifest" in problems[0] and "stray temporary file" in problems[1]


def test_pool_workers_exit_when_the_parent_is_killed(tmp_path):
    script = textwrap.dedent("""
        import os, sys, time
        from data_prep.shards import make_pool
        pool = make_pool(2)
        pids = set()
        while len(pids) < 2:
            pids |= {pool.submit(os.getpid).result() for _ in range(4)}
        pool.submit(time.sleep, 60)
        print(" ".join(map(str, sorted(pids))), flush=True)
        time.sleep(60)
    """)
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    workers = [int(x) for x in p.stdout.readline().split()]
    assert len(workers) == 2
    os.kill(p.pid, signal.SIGKILL)
    p.wait()

    def alive(pid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().split(")")[-1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    deadline = time.time() + 10
    while any(alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(alive(w) for w in workers)


def test_verify_reports_wrongly_typed_manifests(tmp_path, images):
    rc, out = run(tmp_path, [rec("a", "ok.png")])
    good = json.loads((out / MANIFEST).read_text())
    sh = good["shards"][0]
    bad = [[], {"shards": {"a": 1}}, {**good, "shards": ["shard-000000.tar"]}, {**good, "num_samples": "1"},
           {**good, "shards": [{**sh, "name": 7}]}, {**good, "shards": [{**sh, "name": "../x.tar"}]},
           {**good, "shards": [{**sh, "bytes": None}]}, {**good, "shards": [{**sh, "sha256": 5}]}, {**good, "total_bytes": [1]}]
    for m in bad:
        (out / MANIFEST).write_text(json.dumps(m))
        problems, _ = verify_dir(str(out))
        assert problems and all("invalid manifest" in p for p in problems), (m, problems)
    (out / MANIFEST).write_bytes(b"\xff\xfe garbage")
    assert "malformed manifest" in verify_dir(str(out))[0][0]


# ---- one run over every bad kind -------------------------------------------------------------------------
def test_mix_of_every_bad_kind(tmp_path, images):
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    (images / "..ok.jpg").write_bytes((images / "ok.png").read_bytes())
    png16(images / "grey16.png")
    os.symlink("loop_b.png", images / "loop_a.png")
    os.symlink("loop_a.png", images / "loop_b.png")
    (images / "sub").mkdir()
    os.mkfifo(images / "fifo.png")
    good = [rec("g1", "ok.png"), rec("g2"), rec("g3", "..ok.jpg"), rec("g4", "grey16.png"),
            rec("g5", "ok.png", extra={"k": [1, 2]})]
    bad = [json.dumps(x, ensure_ascii=False) for x in [
        "a string", [1, 2], rec("m1", "ok.png", conversations=conv()[::-1]), rec("m2", "ok.png", conversations=[]),
        rec("e1", "ok.png", conversations=conv(a=" ")), rec("t1", "ok.png", conversations=conv(q="no token")),
        rec("t2", conversations=conv()), rec("f1", ["ok.png"]), rec("f2", "/abs.png"), rec("f3", "../up.png"),
        rec("f4", "ok\x00.png"), rec("i1", "nope.png"), rec("i2", "broken.png"), rec("i3", "loop_a.png"),
        rec("i4", "y" * 300), rec("i5", "ok.png/x.png"), rec("i6", "sub"), rec("i7", "fifo.png"),
    ]] + ['{"id": "s1", "conversations": [{"from": "human", "value": "\\ud800"}, {"from": "gpt", "value": "y"}]}',
          '{"id": "j1", "conversations": [{"from": "human"']
    lines = []
    for i in range(max(len(good), len(bad))):  # interleaved
        if i < len(good):
            lines.append(json.dumps(good[i]))
        if i < len(bad):
            lines.append(bad[i])
    raw = gzip.compress(("\ufeff" + "\n".join(lines) + "\n").encode())
    rc, out = run(tmp_path, None, raw=raw, name="mix.jsonl.gz", shard_size=3, workers=2)
    assert rc == 0
    man = json.loads((out / MANIFEST).read_text())
    rj = rejects_of(out)
    assert man["num_records"] == len(lines) and man["num_samples"] == len(good)
    assert man["num_samples"] + man["num_rejects"] == len(lines) and len(rj) == len(bad)
    assert all(r["reason"] in REASONS and r["detail"] for r in rj)
    assert {r["reason"] for r in rj} == set(REASONS)  # every kind of reject is in the mix
    assert verify_dir(str(out))[0] == []


# ---- Training corrupts or wastes ------------------------------------------------------------------------
def test_16bit_greyscale_png_is_scaled_not_whitened(tmp_path, images):
    from distill.data.encode import decode_image

    a = png16(images / "g.png", w=64, h=4)
    rc, out = run(tmp_path, [rec("g", "g.png")])
    assert rc == 0 and json.loads((out / MANIFEST).read_text())["num_samples"] == 1
    with tarfile.open(out / "shard-000000.tar") as t:
        data = t.extractfile("000000000.png").read()
    assert data == (images / "g.png").read_bytes()  # bytes kept as they are
    rgb = np.asarray(decode_image(data))
    assert rgb.shape == (4, 64, 3) and rgb.dtype == np.uint8
    assert np.abs(rgb[..., 0].astype(float) - a / 257).max() <= 1  # a ramp, not white
    assert np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).mean() > 250  # what it used to be


@pytest.fixture(scope="module")
def processor(tiny_models):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(tiny_models.student))


def _shards(tmp_path, n_shards=2):
    d = tmp_path / "img"
    d.mkdir()
    Image.new("RGB", (16, 16), (0, 0, 255)).save(d / "a.png")
    js = tmp_path / "d.json"
    js.write_text(json.dumps([rec(f"r{i}", "a.png") for i in range(2 * n_shards)]))
    prepare_llava(str(js), str(d), str(tmp_path / "shards"), shard_size=2, progress=False)
    return tmp_path / "shards"


def test_max_length_below_image_tokens_fails_at_build_time(processor, tmp_path):
    from distill.data import SampleEncoder, SkipSample, build_loader

    shards = _shards(tmp_path)
    n_image, need, size = SampleEncoder(processor, 4096).image_length_floor()
    assert need > n_image >= 1
    base = dict(shards=[str(shards)], batch_size=1, num_workers=0, shuffle_buffer=0)
    with pytest.raises(ValueError, match=rf"data.max_length={need - 1} .* {n_image} image tokens.* at least {need}"):
        build_loader({**base, "max_length": need - 1}, processor, rank=0, world_size=1)
    build_loader({**base, "max_length": need}, processor, rank=0, world_size=1)
    # the floor is exact: the shortest image sample fits in `need` tokens, not in one less
    enc = SampleEncoder(processor, need)
    msgs = enc._messages([{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a"}])
    assert enc.encode_messages(msgs, Image.new("RGB", size)).input_ids.numel() <= need
    with pytest.raises(SkipSample):
        SampleEncoder(processor, need - 1).encode_messages(msgs, Image.new("RGB", size))


def test_rank_with_only_unreadable_shards_fails_at_build_time(processor, tmp_path):
    from distill.data import build_loader

    shards = _shards(tmp_path)
    tars = sorted(shards.glob("shard-*.tar"))
    base = dict(batch_size=1, num_workers=0, shuffle_buffer=0, max_length=4096, samples_per_epoch=2)
    tars[0].write_bytes(b"this is not a tar file" * 40)
    build_loader({**base, "shards": [str(t) for t in tars]}, processor, rank=0, world_size=1)  # one is readable
    tars[1].write_bytes(b"")
    with pytest.raises(ValueError, match=r"rank 0 cannot read any of its 2 shard.*(empty file.*not a tar file|not a tar file.*empty file)"):
        build_loader({**base, "shards": [str(t) for t in tars]}, processor, rank=0, world_size=1)
    with pytest.raises(ValueError, match="cannot read any"):
        build_loader({**base, "shards": [str(t) for t in tars], "resampled": True}, processor, rank=0, world_size=1)


def test_json_lines_bad_first_line_and_pretty_printed_values(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"id": 1,, "x": 2}\n{"id": 2}\n')
    got = list(iter_records(str(p)))
    assert isinstance(got[0], BadLine) and got[0].line == 1 and got[1] == {"id": 2}
    p.write_text('{"id": 1}\n{"n": ' + "9" * 5000 + '}\n{"d": ' + "[" * 100000 + "]" * 100000 + "}\n")
    got = list(iter_records(str(p)))
    assert got[0] == {"id": 1} and [b.line for b in got[1:]] == [2, 3]
    p.write_text("[" + "[" * 100000 + "]" * 100000 + "]")
    with pytest.raises(JSONStreamError, match="unreadable JSON value"):
        list(iter_records(str(p)))
    p.write_text(json.dumps({"id": 1}, indent=2) + "\n" + json.dumps({"id": 2}, indent=2))
    assert list(iter_records(str(p), chunk_size=4)) == [{"id": 1}, {"id": 2}]


def test_synth_redoes_shards_made_by_older_rules(tmp_path):
    from data_prep.synth import make_synthetic

    make_synthetic(str(tmp_path), num=2, num_test=1, shard_size=2, progress=False)
    state = tmp_path / "caption" / "shards" / ".prep" / "run.json"
    old = json.loads(state.read_text())
    del old["prep_version"]  # as written before the version was recorded
    state.write_text(json.dumps(old))
    res = make_synthetic(str(tmp_path), num=2, num_test=1, shard_size=2, progress=False)
    assert res["caption"].shards_written == 1 and res["instruct"].shards_skipped == 1
