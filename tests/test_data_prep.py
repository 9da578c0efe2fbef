"""data_prep: streaming JSON, LLaVA -> shards (counts, rejects, workers, resume), verify, synth."""

import json
import os
import tarfile

import pytest
from PIL import Image

from data_prep.__main__ import main as cli
from data_prep.jsonstream import JSONStreamError, iter_records
from data_prep.shards import MANIFEST, PrepError, prepare_llava
from data_prep.synth import NEGATIVE_CATEGORIES, Obj, _qa, caption_for, make_synthetic
from data_prep.verify import verify_dir


def _conv(q="<image>\nWhat is it?", a="A red circle."):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


def make_llava(root, n_good=10):
    """Images + JSON mixing good records with every kind of bad one. Returns (json, images, expected)."""
    images = root / "images"
    images.mkdir()
    recs = []
    for i in range(n_good):
        fmt, ext = ("PNG", "png") if i % 2 else ("JPEG", "jpg")
        Image.new("RGB", (8 + i, 6), (20 * i, 0, 0)).save(images / f"img{i}.{ext}", format=fmt)
        recs.append({"id": f"good.{i}", "image": f"img{i}.{ext}", "conversations": _conv()})
    recs.append({"id": "text.0", "conversations": _conv("Hello?", "Hi.")})
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    bad = [
        ({"id": "b.missing", "image": "nope.png", "conversations": _conv()}, "missing_image"),
        ({"id": "b.broken", "image": "broken.png", "conversations": _conv()}, "undecodable_image"),
        ({"id": "b.order", "image": "img0.jpg", "conversations": _conv()[::-1]}, "malformed_conversation"),
        ({"id": "b.noconv", "image": "img0.jpg"}, "malformed_conversation"),
        ({"id": "b.empty", "image": "img0.jpg", "conversations": _conv(a="  ")}, "empty_text"),
        ({"id": "b.notoken", "image": "img0.jpg", "conversations": _conv(q="What is it?")}, "image_token_mismatch"),
        ({"id": "b.texttoken", "conversations": _conv()}, "image_token_mismatch"),
        ({"id": "b.escape", "image": "../x.png", "conversations": _conv()}, "bad_image_field"),
        ("just a string", "not_an_object"),
    ]
    # interleave bad records among the good ones
    out = []
    for i, r in enumerate(recs):
        out.append(r)
        if i < len(bad):
            out.append(bad[i][0])
    out.extend(b for b, _ in bad[len(recs):])
    path = root / "data.json"
    path.write_text(json.dumps(out, indent=1))
    expected = {}
    for _, reason in bad:
        expected[reason] = expected.get(reason, 0) + 1
    return path, images, expected, out


def read_tar(path):
    with tarfile.open(path) as t:
        return {m.name: t.extractfile(m).read() for m in t}


def test_json_stream_chunk_boundaries(tmp_path):
    recs = [{"id": i, "v": "x" * (i % 7), "n": 12345678 + i, "s": "\u00e9\u4e2d"} for i in range(50)] + [7, 123456789]
    p = tmp_path / "a.json"
    p.write_text(json.dumps(recs))
    for chunk in (1, 3, 7, 1 << 20):
        assert list(iter_records(str(p), chunk_size=chunk)) == recs
    p.write_text("\n".join(json.dumps(r) for r in recs[:5]) + "\n")  # JSON Lines
    assert list(iter_records(str(p), chunk_size=4)) == recs[:5]
    p.write_text("[]")
    assert list(iter_records(str(p))) == []
    for bad in ('[{"a": 1} {"b": 2}]', '[{"a": 1},', '{"a": 1', '"text"', '[1] x'):
        p.write_text(bad)
        with pytest.raises(JSONStreamError, match="a.json"):
            list(iter_records(str(p), chunk_size=3))


def test_llava_counts_rejects_and_content(tmp_path):
    js, images, expected, recs = make_llava(tmp_path)
    res = prepare_llava(str(js), str(images), str(tmp_path / "out"), shard_size=4, progress=False)
    assert res.num_records == len(recs) and res.num_samples == 11
    assert dict(res.rejects_by_reason) == expected
    man = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert man["num_samples"] == 11 and sum(s["num_samples"] for s in man["shards"]) == 11
    assert man["num_rejects"] == sum(expected.values())
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert sorted(r["reason"] for r in rejects) == sorted(r for r, c in expected.items() for _ in range(c))
    assert {r["id"] for r in rejects if r["reason"] == "missing_image"} == {"b.missing"}
    seen_ids = []
    for s in man["shards"]:
        members = read_tar(tmp_path / "out" / s["name"])
        assert len([m for m in members if m.endswith(".json")]) == s["num_samples"]
        for name, data in members.items():
            key, ext = name.split(".", 1)
            assert key.isdigit() and "." not in ext  # dot-free keys
            if ext == "json":
                rec = json.loads(data)
                seen_ids.append(rec["id"])
                assert rec == recs[int(key)]  # key = input index, record verbatim
                if "image" in rec:  # image bytes stored as they are
                    img_name = [m for m in members if m.startswith(key + ".") and not m.endswith(".json")]
                    assert members[img_name[0]] == (images / rec["image"]).read_bytes()
    assert sorted(seen_ids) == sorted([f"good.{i}" for i in range(10)] + ["text.0"])


def test_cli_strict_and_workers_deterministic(tmp_path, capsys):
    js, images, expected, _ = make_llava(tmp_path)
    assert cli(["llava", "--json", str(js), "--images", str(images), "--out", str(tmp_path / "a"),
                "--shard-size", "3", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "missing_image" in out and "rejected" in out
    assert cli(["llava", "--json", str(js), "--images", str(images), "--out", str(tmp_path / "b"),
                "--shard-size", "3", "--workers", "2", "--strict", "--quiet"]) == 1
    a = json.loads((tmp_path / "a" / MANIFEST).read_text())["shards"]
    b = json.loads((tmp_path / "b" / MANIFEST).read_text())["shards"]
    assert a == b  # same bytes regardless of worker count
    assert cli(["llava", "--json", str(tmp_path / "nope.json"), "--images", str(images), "--out", str(tmp_path / "c")]) == 2


def test_resume_after_interrupted_run(tmp_path):
    js, images, _, _ = make_llava(tmp_path)
    out = tmp_path / "out"
    prepare_llava(str(js), str(images), str(out), shard_size=4, progress=False)
    manifest = (out / MANIFEST).read_text()
    names = [s["name"] for s in json.loads(manifest)["shards"]]
    # Simulate a crash: shard 1 mid-write (temp file, no completion record), shard 2 truncated.
    (out / ".prep" / "shard-000001.json").unlink()
    (out / names[1]).rename(out / f".{names[1]}.tmp-999")
    data = (out / names[2]).read_bytes()
    (out / names[2]).write_bytes(data[: len(data) // 2])
    (out / MANIFEST).unlink()
    untouched = {n: os.stat(out / n).st_mtime_ns for n in names[3:]}
    res = prepare_llava(str(js), str(images), str(out), shard_size=4, progress=False)
    assert res.shards_written == 2 and res.shards_skipped == len(names) - 2
    assert (out / MANIFEST).read_text() == manifest
    assert {n: os.stat(out / n).st_mtime_ns for n in names[3:]} == untouched
    assert verify_dir(str(out))[0] == []
    with pytest.raises(PrepError, match="--shard-size: was 4, now 5"):
        prepare_llava(str(js), str(images), str(out), shard_size=5, progress=False)


def test_verify_catches_corruption(tmp_path, capsys):
    js, images, _, _ = make_llava(tmp_path)
    out = tmp_path / "out"
    prepare_llava(str(js), str(images), str(out), shard_size=4, progress=False)
    assert cli(["verify", str(out)]) == 0
    shards = json.loads((out / MANIFEST).read_text())["shards"]
    # Flip a byte inside an image member: size unchanged, checksum and decoding must catch it.
    target = out / shards[0]["name"]
    raw = bytearray(target.read_bytes())
    with tarfile.open(target) as t:
        img = next(m for m in t if not m.name.endswith(".json"))
    raw[img.offset_data + 20: img.offset_data + 60] = b"\x00" * 40
    target.write_bytes(bytes(raw))
    (out / shards[1]["name"]).unlink()
    assert cli(["verify", str(out)]) == 1
    report = capsys.readouterr().out
    assert f"{shards[0]['name']}: sha256" in report
    assert f"{shards[1]['name']}: listed in the manifest but missing" in report
    problems, _ = verify_dir(str(out))
    assert not any(shards[2]["name"] in p for p in problems)


def test_other_image_format_is_stored_under_a_known_extension(tmp_path):
    # PIL decodes PPM, but "ppm" is no image extension the shard readers know: it is stored as .img.
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 6), (1, 2, 3)).save(images / "a.ppm")
    js = tmp_path / "data.json"
    js.write_text(json.dumps([{"id": "a", "image": "a.ppm", "conversations": _conv()}]))
    out = tmp_path / "out"
    res = prepare_llava(str(js), str(images), str(out), progress=False)
    assert res.num_samples == 1 and not res.num_rejects
    assert sorted(read_tar(out / "shard-000000.tar")) == ["000000000.img", "000000000.json"]
    assert verify_dir(str(out))[0] == []


def test_synth_deterministic_and_layout(tmp_path):
    a = make_synthetic(str(tmp_path / "a"), num=12, seed=3, num_test=6, shard_size=5, progress=False)
    make_synthetic(str(tmp_path / "b"), num=12, seed=3, num_test=6, shard_size=5, progress=False)
    make_synthetic(str(tmp_path / "c"), num=12, seed=4, num_test=6, shard_size=5, progress=False)
    assert {s: r.num_samples for s, r in a.items()} == {"caption": 12, "instruct": 12, "compositional": 6}
    for split in a:
        ma = json.loads((tmp_path / "a" / split / "shards" / MANIFEST).read_text())["shards"]
        mb = json.loads((tmp_path / "b" / split / "shards" / MANIFEST).read_text())["shards"]
        mc = json.loads((tmp_path / "c" / split / "shards" / MANIFEST).read_text())["shards"]
        assert ma == mb and ma != mc
        assert verify_dir(str(tmp_path / "a" / split / "shards"))[0] == []
    comp = json.loads((tmp_path / "a" / "compositional" / "data.json").read_text())
    for rec in comp:
        assert [n["category"] for n in rec["negatives"]] == list(NEGATIVE_CATEGORIES)
        caps = [rec["positive"]] + [n["caption"] for n in rec["negatives"]]
        assert len(set(caps)) == len(caps)  # every negative differs from the positive and each other
        assert rec["conversations"][1]["value"] == rec["positive"]
        # the positive's first object exists in the scene with that colour
        words = rec["positive"].split()
        assert {"color": words[1], "shape": words[2]} in [{"color": o["color"], "shape": o["shape"]} for o in rec["scene"]]
    # rerun into the same folder with another seed replaces everything (no stale images or shards)
    make_synthetic(str(tmp_path / "a"), num=12, seed=4, num_test=6, shard_size=5, progress=False)
    for split in a:
        assert (tmp_path / "a" / split / "shards" / MANIFEST).read_text().replace("/a/", "/c/") == \
            (tmp_path / "c" / split / "shards" / MANIFEST).read_text()
    make_synthetic(str(tmp_path / "a"), num=12, seed=3, num_test=6, shard_size=5, progress=False)
    # a larger --num extends a smaller one (scene i depends only on seed, split, i)
    make_synthetic(str(tmp_path / "d"), num=4, seed=3, num_test=2, shard_size=5, progress=False)
    small = json.loads((tmp_path / "d" / "instruct" / "data.json").read_text())
    big = json.loads((tmp_path / "a" / "instruct" / "data.json").read_text())
    assert small == big[:4]
    assert (tmp_path / "d" / "caption" / "images" / "0000001.png").read_bytes() == \
        (tmp_path / "a" / "caption" / "images" / "0000001.png").read_bytes()


def test_synth_position_words_name_each_objects_cell():
    """The caption listing and the "Where is" answers name every object's grid cell in words."""
    import random

    assert Obj("red", "circle", (0, 0)).where == "in the top left"
    assert Obj("red", "circle", (1, 1)).where == "in the center"
    assert Obj("red", "circle", (2, 1)).where == "in the bottom middle"
    assert Obj("red", "circle", (1, 2)).where == "in the middle right"
    scene = [Obj("red", "circle", (0, 2)), Obj("blue", "square", (2, 0)), Obj("green", "star", (1, 1))]
    rng = random.Random(0)
    listings = [c for c in (caption_for(scene, rng, cell_words=True) for _ in range(40)) if c.startswith("There are")]
    assert listings  # about half the captions list the shapes
    for c in listings:
        assert c.startswith("There are three shapes: a red circle in the top right, a blue square in the bottom "
                            "left and a green star in the center. ")
    wheres = {a for q, a in (_qa(scene, rng, cell_words=True) for _ in range(200)) if q.startswith("Where is")}
    assert wheres == {"The red circle is in the top right.", "The blue square is in the bottom left.",
                      "The green star is in the center."}
    # off by default: no cell in the listing, no "Where is" question
    assert not any(" in the " in caption_for(scene, rng).split(". ")[0] for _ in range(40))
    assert not any(_qa(scene, rng)[0].startswith("Where is") for _ in range(200))


def test_synth_all_relations_states_a_true_relation_for_every_ordered_pair():
    import random

    from data_prep.synth import RELATIONS

    scene = [Obj("red", "circle", (0, 2)), Obj("blue", "square", (2, 0)), Obj("green", "star", (1, 1))]
    by_name = {f"{o.color} {o.shape}": o for o in scene}
    rng = random.Random(0)
    for _ in range(20):
        text = caption_for(scene, rng, all_relations=True)
        sentences = [s for s in text.split(". ") if not s.startswith("There are")]
        pairs = []
        for s in sentences:
            rel = next(r for r in RELATIONS if f" {r} " in s)
            a, b = (" ".join(part.split()[-2:]) for part in s.rstrip(".").split(f" {rel} "))
            assert RELATIONS[rel](by_name[a].cell, by_name[b].cell), s  # every stated relation is true
            pairs.append((a, b))
        assert sorted(pairs) == sorted((x, y) for x in by_name for y in by_name if x != y)  # each ordered pair once
        assert sentences[0].startswith("A red circle ") and sentences[0].endswith("a blue square")  # the usual first
    two = scene[:2]
    assert all(len(caption_for(two, rng, all_relations=True).split(". ")) in (2, 3) for _ in range(20))
    assert " and a green star " in caption_for(scene, random.Random(1))  # off by default: one sentence


def test_synth_cell_words_cli_keeps_the_compositional_split(tmp_path):
    assert cli(["synth", "--out", str(tmp_path / "plain"), "--num", "8", "--num-test", "4", "--quiet"]) == 0
    assert cli(["synth", "--out", str(tmp_path / "cells"), "--num", "8", "--num-test", "4", "--quiet",
                "--cell-words"]) == 0
    read = lambda d, split: json.loads((tmp_path / d / split / "data.json").read_text())
    assert read("plain", "compositional") == read("cells", "compositional")
    plain, cells = read("plain", "caption"), read("cells", "caption")
    assert [r["image"] for r in plain] == [r["image"] for r in cells]
    listed = [r["conversations"][1]["value"] for r in cells if r["conversations"][1]["value"].startswith("There are")]
    assert listed and all(" in the " in c.split(". ")[0] for c in listed)
    assert read("plain", "caption") != cells


def test_synth_choice_questions_ask_the_true_caption_against_a_hard_negative(tmp_path):
    import random

    from data_prep.synth import CHOICE_PROMPT, RELATIONS, hard_negatives
    from distill.eval.ab import DEFAULT_AB_PROMPT

    assert CHOICE_PROMPT == DEFAULT_AB_PROMPT  # the question distill.eval's A/B protocol asks
    scene = [Obj("red", "circle", (0, 2)), Obj("blue", "square", (2, 0)), Obj("green", "star", (1, 1))]
    by_name = {f"{o.color} {o.shape}": o for o in scene}

    def true(caption):
        rel = next(r for r in RELATIONS if f" {r} " in caption)
        a, b = (" ".join(part.split()[-2:]) for part in caption.rstrip(".").split(f" {rel} "))
        return a in by_name and b in by_name and RELATIONS[rel](by_name[a].cell, by_name[b].cell)

    rng = random.Random(0)
    positive, negatives = hard_negatives(scene, rng)
    assert true(positive) and [n["category"] for n in negatives] == list(NEGATIVE_CATEGORIES)
    assert not any(true(n["caption"]) for n in negatives)
    letters = set()
    for q, a in (_qa(scene, rng, choice_questions=True) for _ in range(300)):
        if not q.startswith("Which caption"):
            continue
        first, second = (line[3:] for line in q.split("\n")[1:3])
        assert q == CHOICE_PROMPT.format(A=first, B=second)
        assert (true(first), true(second)) == ((True, False) if a == "A" else (False, True))
        letters.add(a)
    assert letters == {"A", "B"}  # the true caption comes first or second
    # the CLI: only instruct changes (and only where a choice question was drawn)
    assert cli(["synth", "--out", str(tmp_path / "plain"), "--num", "40", "--num-test", "4", "--quiet"]) == 0
    assert cli(["synth", "--out", str(tmp_path / "ab"), "--num", "40", "--num-test", "4", "--quiet",
                "--choice-questions"]) == 0
    read = lambda d, split: json.loads((tmp_path / d / split / "data.json").read_text())
    for split in ("caption", "compositional"):
        assert read("plain", split) == read("ab", split)
    asked = [t["value"] for r in read("ab", "instruct") for t in r["conversations"] if "Which caption" in t["value"]]
    assert asked and not any("Which caption" in t["value"] for r in read("plain", "instruct")
                             for t in r["conversations"])


def test_synth_sizes_mixes_image_sizes(tmp_path, capsys):
    """--sizes draws each image's side from the list (seeded); the records are those of a --size run,
    shards verify, and a rerun with other sizes re-renders and re-shards."""
    args = ["synth", "--num", "8", "--num-test", "4", "--shard-size", "3", "--seed", "1", "--quiet"]
    assert cli(args + ["--out", str(tmp_path / "a"), "--sizes", "56,84"]) == 0
    assert cli(args + ["--out", str(tmp_path / "b"), "--sizes", "56,84"]) == 0
    assert cli(args + ["--out", str(tmp_path / "one")]) == 0  # the default --size 96
    seen = set()
    for split in ("caption", "instruct", "compositional"):
        images = sorted((tmp_path / "a" / split / "images").iterdir())
        sizes = {p.name: Image.open(p).size for p in images}
        assert set(sizes.values()) <= {(56, 56), (84, 84)}
        seen |= set(sizes.values())
        assert verify_dir(str(tmp_path / "a" / split / "shards"))[0] == []
        # deterministic: same seed, same sizes and bytes
        for p in images:
            assert p.read_bytes() == (tmp_path / "b" / split / "images" / p.name).read_bytes()
        # the scenes and texts are those of the single-size run
        assert (tmp_path / "a" / split / "data.json").read_text() == (tmp_path / "one" / split / "data.json").read_text()
        assert {Image.open(p).size for p in (tmp_path / "one" / split / "images").iterdir()} == {(96, 96)}
    assert seen == {(56, 56), (84, 84)}
    # the shards hold the images: some sample images differ in size from the 96 px run's
    before = json.loads((tmp_path / "a" / "caption" / "shards" / MANIFEST).read_text())["shards"]
    assert before != json.loads((tmp_path / "one" / "caption" / "shards" / MANIFEST).read_text())["shards"]
    # rerun in place with one size: every image re-rendered, every split re-sharded (data.json is unchanged)
    assert cli(args + ["--out", str(tmp_path / "a"), "--size", "96"]) == 0
    for split in ("caption", "instruct", "compositional"):
        assert (tmp_path / "a" / split / "shards" / MANIFEST).read_text().replace("/a/", "/one/") == \
            (tmp_path / "one" / split / "shards" / MANIFEST).read_text()
    capsys.readouterr()
    assert cli(args + ["--out", str(tmp_path / "c"), "--sizes", "56,84", "--size", "56"]) == 2
    assert cli(args + ["--out", str(tmp_path / "c"), "--sizes", "56,x"]) == 2
    assert cli(args + ["--out", str(tmp_path / "c"), "--sizes", "56,12"]) == 2
    assert "error" in capsys.readouterr().err
