"""Evaluation: caption scoring against HF's own loss, compositional accounting, readers, VQA, CLI."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from distill.eval import (
    CompoSample,
    EvalDataError,
    ImageRef,
    build_caption_batch,
    compositional_accuracy,
    evaluate_compositional,
    evaluate_vqa,
    generate_answers,
    load_compositional,
    load_sugarcrepe,
    load_vqa,
    normalize_answer,
    score_captions,
    token_logprobs,
    vqa_accuracy,
)

FIXTURES = Path(__file__).parent / "fixtures"
SUGARCREPE = FIXTURES / "sugarcrepe"


@pytest.fixture(scope="module")
def student(tiny_models):
    from distill.models import load_processor, load_vlm

    model = load_vlm(tiny_models.student).eval()
    return model, load_processor(tiny_models.student)


def _images(tmp_path, n=3):
    paths = []
    for i in range(n):
        img = Image.new("RGB", (20 + 7 * i, 30), ((80 * i) % 256, 200 - 50 * i, 40 + 60 * i))
        p = tmp_path / f"img{i}.png"
        img.save(p)
        paths.append(p)
    return paths


# ----------------------------------------------------------------------------------------------
# scoring
# ----------------------------------------------------------------------------------------------
def test_caption_mask_covers_exactly_the_caption(student, tmp_path):
    model, proc = student
    imgs = [Image.open(p).convert("RGB") for p in _images(tmp_path, 2)]
    caps = ["a red square above a blue circle", "im_end"]  # also occurs after the caption in ChatML
    batch, mask = build_caption_batch(proc, imgs, caps, model.config.image_token_id)
    assert mask.shape == batch["input_ids"].shape
    for b, cap in enumerate(caps):
        assert proc.tokenizer.decode(batch["input_ids"][b][mask[b]]).strip() == cap
        # every caption token is a real (non-pad) token after all image tokens
        pos = mask[b].nonzero().flatten()
        img_pos = (batch["input_ids"][b] == model.config.image_token_id).nonzero().flatten()
        assert len(img_pos) > 0 and pos.min() > img_pos.max()
        assert batch["attention_mask"][b][pos].all()


def test_score_captions_equals_hf_loss_and_is_batch_invariant(student, tmp_path):
    """Mean caption log-likelihood == -HF cross-entropy with labels only on the caption tokens."""
    model, proc = student
    imgs = [Image.open(p).convert("RGB") for p in _images(tmp_path, 3)]
    caps = ["a red square", "a blue circle to the left of a green star", "yellow"]
    batched = score_captions(model, proc, imgs, caps, batch_size=3)
    single = score_captions(model, proc, imgs, caps, batch_size=1)
    assert batched.shape == (3,) and batched.dtype == torch.float32
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)
    batch, mask = build_caption_batch(proc, imgs, caps, model.config.image_token_id)
    summed = score_captions(model, proc, imgs, caps, reduction="sum")
    for b in range(3):
        labels = torch.full_like(batch["input_ids"][b:b + 1], -100)
        labels[mask[b:b + 1]] = batch["input_ids"][b:b + 1][mask[b:b + 1]]
        with torch.no_grad():
            out = model(input_ids=batch["input_ids"][b:b + 1], attention_mask=batch["attention_mask"][b:b + 1],
                        pixel_values=batch["pixel_values"][b:b + 1], labels=labels)
        torch.testing.assert_close(batched[b], -out.loss.float(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(summed[b], batched[b] * mask[b].sum(), rtol=1e-5, atol=1e-4)
    # the image matters: the same caption with another image scores differently
    other = score_captions(model, proc, [imgs[1]], caps[:1])
    assert not torch.allclose(other, batched[:1])


def test_caption_logprobs_sliced_equals_full_logits(student, tmp_path):
    """The logits_to_keep path equals log-softmax over the full [B,T,V] logits."""
    from distill.eval.scoring import caption_logprobs

    model, proc = student
    imgs = [Image.open(p).convert("RGB") for p in _images(tmp_path, 2)]
    batch, mask = build_caption_batch(proc, imgs, ["a red square", "two blue circles below a star"],
                                      model.config.image_token_id)
    with torch.no_grad():
        fast = caption_logprobs(model, batch, mask)
        full = token_logprobs(model(**batch).logits, batch["input_ids"], mask)
    assert bool((fast[mask] < 0).all()) and bool((fast[~mask] == 0).all())
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)


def test_user_turn_places_the_image_like_llava_json():
    from distill.eval.common import user_turn

    img, txt = {"type": "image"}, lambda t: {"type": "text", "text": t}
    assert user_turn("Describe.")["content"] == [img, txt("\nDescribe.")]
    assert user_turn("What is it?\n<image>")["content"] == [txt("What is it?\n"), img]
    assert user_turn("Hi", with_image=False) == {"role": "user", "content": [txt("Hi")]}
    with pytest.raises(EvalDataError, match="2 <image> placeholders"):
        user_turn("<image><image>x")
    with pytest.raises(EvalDataError, match="text-only"):
        user_turn("<image>x", with_image=False)


def test_token_logprobs_reference():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, dtype=torch.bfloat16)
    ids = torch.randint(0, 7, (2, 5))
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 2:4] = True
    mask[1, 4] = True
    out = token_logprobs(logits, ids, mask)
    ref = torch.zeros(2, 5)
    for b, t in mask.nonzero().tolist():
        ref[b, t] = torch.log_softmax(logits[b, t - 1].float(), -1)[ids[b, t]]
    torch.testing.assert_close(out, ref)
    assert out.dtype == torch.float32
    with pytest.raises(ValueError, match="first token"):
        token_logprobs(logits, ids, torch.ones(2, 5, dtype=torch.bool))


def test_empty_caption_and_mismatched_lengths_are_rejected(student, tmp_path):
    model, proc = student
    img = Image.open(_images(tmp_path, 1)[0]).convert("RGB")
    with pytest.raises(EvalDataError, match="empty caption"):
        score_captions(model, proc, [img], ["  "])
    with pytest.raises(EvalDataError, match="one image per caption"):
        score_captions(model, proc, [img], ["a", "b"])


# ----------------------------------------------------------------------------------------------
# compositional accounting
# ----------------------------------------------------------------------------------------------
def _sample(i, cats):
    return CompoSample(id=str(i), image=ImageRef(path="x"), positive="p", negatives=[(f"n{j}", c) for j, c in enumerate(cats)])


def test_accuracy_ties_are_misses_and_per_category():
    samples = [_sample(0, ["a", "b"]), _sample(1, ["a", "b"]), _sample(2, ["a", "a", "b"]), _sample(3, ["b"])]
    scores = [
        [1.0, 0.5, 0.2],       # beats both -> hit; a hit, b hit
        [1.0, 1.0, 0.2],       # tie with the 'a' negative -> miss overall; a miss, b hit
        [1.0, 0.1, 2.0, 0.0],  # loses to one of two 'a' negatives -> miss; a miss (counted once), b hit
        [-3.0, -3.0],          # exact tie -> miss
    ]
    r = compositional_accuracy(samples, scores)
    assert r["overall"] == {"hits": 1, "total": 4, "accuracy": 0.25}
    assert r["per_category"]["a"] == {"hits": 1, "total": 3, "accuracy": pytest.approx(1 / 3)}
    assert r["per_category"]["b"] == {"hits": 3, "total": 4, "accuracy": 0.75}
    with pytest.raises(ValueError, match="scores for"):
        compositional_accuracy(samples[:1], [[1.0, 0.0]])
    with pytest.raises(ValueError, match="non-finite"):
        compositional_accuracy(samples[3:], [[float("nan"), 0.0]])


def test_real_model_prefers_positive_gets_100_percent(student, tmp_path):
    """Positives are the captions the real tiny model scores highest for their image: 100%;
    swapping in the lowest-scoring one as positive: 0%. Exercises batching across samples."""
    model, proc = student
    paths = _images(tmp_path, 3)
    pool = ["a red square", "a blue circle", "a green star above a red square", "two yellow triangles", "purple"]
    ranked = []
    for p in paths:
        img = Image.open(p).convert("RGB")
        sc = score_captions(model, proc, [img] * len(pool), pool)
        assert len(set(sc.tolist())) == len(pool)  # no ties among the candidates
        ranked.append([pool[i] for i in sc.argsort(descending=True).tolist()])
    cats = ["swap_att", "replace_rel", "swap_att", "replace_obj"]
    best = [CompoSample(id=str(i), image=ImageRef(path=str(p)), positive=r[0], negatives=list(zip(r[1:], cats)))
            for i, (p, r) in enumerate(zip(paths, ranked))]
    res, per = evaluate_compositional(model, proc, best, batch_size=4, progress=False)
    assert res["overall"] == {"hits": 3, "total": 3, "accuracy": 1.0}
    assert set(res["per_category"]) == {"swap_att", "replace_rel", "replace_obj"}
    assert all(e["accuracy"] == 1.0 and e["total"] == 3 for e in res["per_category"].values())
    assert [len(row["scores"]) for row in per] == [5, 5, 5] and all(row["hit"] for row in per)
    worst = [CompoSample(id=str(i), image=ImageRef(path=str(p)), positive=r[-1], negatives=list(zip(r[:-1], cats)))
             for i, (p, r) in enumerate(zip(paths, ranked))]
    res, _ = evaluate_compositional(model, proc, worst, batch_size=3, progress=False)
    assert res["overall"]["accuracy"] == 0.0
    # identical negative -> tie -> miss, with real scores
    tie = [CompoSample(id="t", image=ImageRef(path=str(paths[0])), positive=ranked[0][0],
                       negatives=[(ranked[0][0], "dup"), (ranked[0][-1], "other")])]
    res, _ = evaluate_compositional(model, proc, tie, progress=False)
    assert res["overall"]["hits"] == 0 and res["per_category"]["dup"]["hits"] == 0
    assert res["per_category"]["other"]["hits"] == 1


# ----------------------------------------------------------------------------------------------
# readers
# ----------------------------------------------------------------------------------------------
def test_sugarcrepe_reader_fixture():
    samples = load_compositional([str(SUGARCREPE)], image_root=SUGARCREPE / "images")
    assert sorted(s.id for s in samples) == ["replace_rel/0", "swap_att/0", "swap_att/1"]
    s = next(s for s in samples if s.id == "swap_att/1")
    assert s.positive == "A blue ball next to a small box."
    assert s.negatives == [("A small ball next to a blue box.", "swap_att")]
    assert s.image.load().size == (32, 24)
    only = load_sugarcrepe([SUGARCREPE / "replace_rel.json"], SUGARCREPE / "images")
    assert len(only) == 1 and only[0].negatives[0][1] == "replace_rel"
    assert len(load_compositional([str(SUGARCREPE)], SUGARCREPE / "images", limit=2)) == 2


def test_missing_image_and_bad_records_have_clear_errors(tmp_path):
    samples = load_sugarcrepe([SUGARCREPE / "swap_att.json"], image_root=tmp_path)  # wrong root
    with pytest.raises(EvalDataError, match="--images"):
        samples[0].image.load()
    bad = tmp_path / "swap_obj.json"
    bad.write_text(json.dumps({"7": {"filename": "x.png", "caption": "a cat"}}))
    with pytest.raises(EvalDataError, match=r"swap_obj.json \[7\].*negative_caption|unknown compositional layout"):
        load_compositional([str(bad)])
    with pytest.raises(EvalDataError, match="does not exist"):
        load_compositional([str(tmp_path / "nope.json")])
    other = tmp_path / "other.json"
    other.write_text(json.dumps([{"foo": 1}]))
    with pytest.raises(EvalDataError, match="unknown compositional layout"):
        load_compositional([str(other)])


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from data_prep.synth import make_synthetic

    out = tmp_path_factory.mktemp("synth")
    make_synthetic(str(out), num=8, seed=0, num_test=3, progress=False)
    return out


def test_synthetic_split_json_and_shards_agree(synth):
    from_json = load_compositional([str(synth / "compositional" / "data.json")])
    from_shards = load_compositional([str(synth / "compositional" / "shards")])
    assert len(from_json) == len(from_shards) == 3
    for a, b in zip(from_json, from_shards):
        assert (a.id, a.positive, a.negatives) == (b.id, b.positive, b.negatives)
        assert {c for _, c in a.negatives} == {"swap_att", "swap_obj", "replace_rel", "replace_att"}
        assert a.image.load().tobytes() == b.image.load().tobytes()


def test_vqa_reader_instruct_split(synth):
    rows = json.loads((synth / "instruct" / "data.json").read_text())
    samples = load_vqa([str(synth / "instruct" / "data.json")])
    assert len(samples) == len(rows) == 8
    for s, r in zip(samples, rows):
        human = next(t["value"] for t in r["conversations"] if t["from"] == "human")
        gpt = next(t["value"] for t in r["conversations"] if t["from"] == "gpt")
        assert s.question == human and s.answers == [gpt]
        assert (s.image is None) == ("image" not in r)
    shards = load_vqa([str(synth / "instruct" / "shards")])
    assert [(s.id, s.question, s.answers) for s in shards] == [(s.id, s.question, s.answers) for s in samples]


# ----------------------------------------------------------------------------------------------
# VQA
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw,norm", [
    ("The Two dogs.", "2 dogs"), ("  a RED cube!! ", "red cube"), ("3.5", "3.5"), ("1,000", "1000"),
    ("It's an apple", "its apple"), ("twenty-one", "20 1"), ("Yes", "yes"), ("left_of", "left of"),
])
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


def test_vqa_accuracy_logic():
    r = vqa_accuracy(["Two.", "blue", "the cat", "no"], [["2"], ["red", "Blue"], ["dog"], ["No!"]],
                     ["count", "color", "obj", "yn"])
    assert r["overall"] == {"hits": 3, "total": 4, "accuracy": 0.75}
    assert r["per_category"]["obj"]["hits"] == 0 and r["per_category"]["count"]["hits"] == 1


def test_llava_question_file_with_answers_file(tmp_path):
    paths = _images(tmp_path, 2)
    q = tmp_path / "questions.jsonl"
    q.write_text("\n".join(json.dumps(r) for r in [
        {"question_id": 1, "image": paths[0].name, "text": "What colour?"},
        {"question_id": "b", "image": paths[1].name, "text": "<image>\nHow many?"},
    ]))
    a = tmp_path / "answers.jsonl"
    a.write_text(json.dumps({"question_id": 1, "answer": "red"}) + "\n" + json.dumps({"question_id": "b", "answers": ["2", "two"]}))
    samples = load_vqa([str(q)], answers=a)
    assert [(s.id, s.question, s.answers) for s in samples] == [("1", "What colour?", ["red"]), ("b", "<image>\nHow many?", ["2", "two"])]
    assert samples[1].image.load().size == (27, 30)
    with pytest.raises(EvalDataError, match="no reference answer"):
        load_vqa([str(q)])
    a.write_text(json.dumps({"question_id": 1, "answer": "red"}))
    with pytest.raises(EvalDataError, match="question_id 'b' has no entry"):
        load_vqa([str(q)], answers=a)


def test_generate_answers_batched_equals_single_and_scores(student, tmp_path):
    model, proc = student
    paths = _images(tmp_path, 3)
    imgs = [Image.open(p).convert("RGB") for p in paths]
    qs = ["What color is the square?", "How many shapes are there in the picture?", "Is it red?"]
    batched = generate_answers(model, proc, imgs, qs, max_new_tokens=6)
    single = [generate_answers(model, proc, [im], [q], max_new_tokens=6)[0] for im, q in zip(imgs, qs)]
    assert batched == single
    # reference answers = the model's own greedy output (hit) or something else (miss)
    q = tmp_path / "q.jsonl"
    q.write_text("\n".join(json.dumps({"question_id": i, "image": p.name, "text": t,
                                       "answer": batched[i] if i < 2 else batched[i] + " zebra"})
                           for i, (p, t) in enumerate(zip(paths, qs))))
    samples = load_vqa([str(q)])
    res, per = evaluate_vqa(model, proc, samples, batch_size=2, max_new_tokens=6, progress=False)
    assert [row["hit"] for row in per] == [True, True, False]
    assert res["overall"]["hits"] == 2 and res["overall"]["total"] == 3
    # text-only questions are answered without an image
    text_only = generate_answers(model, proc, None, ["What is a square?"], max_new_tokens=4)
    assert isinstance(text_only[0], str)


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
def test_cli_compositional_sugarcrepe(tiny_models, tmp_path, capsys):
    from distill.eval.__main__ import main

    out = tmp_path / "out"
    res = main(["compositional", "--model", str(tiny_models.student), "--data", str(SUGARCREPE),
                "--images", str(SUGARCREPE / "images"), "--batch-size", "3", "--out", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert "| swap_att | 2 |" in printed and "| replace_rel | 1 |" in printed and "**overall** | 3 |" in printed
    saved = json.loads((out / "compositional.json").read_text())
    assert saved["overall"] == res["overall"] and saved["overall"]["total"] == 3
    rows = [json.loads(line) for line in (out / "compositional_samples.jsonl").read_text().splitlines()]
    assert sum(r["scores"][0] > r["scores"][1] for r in rows) == saved["overall"]["hits"]
    assert (out / "compositional.md").read_text().startswith("| category |")
    with pytest.raises(SystemExit, match="--images"):
        main(["compositional", "--model", str(tiny_models.student), "--data", str(SUGARCREPE),
              "--images", str(tmp_path), "--no-progress"])


def test_cli_vqa_on_instruct_shards(tiny_models, synth, tmp_path, capsys):
    from distill.eval.__main__ import main

    out = tmp_path / "vqa"
    res = main(["vqa", "--model", str(tiny_models.student), "--data", str(synth / "instruct" / "shards"),
                "--limit", "3", "--batch-size", "2", "--max-new-tokens", "3", "--out", str(out), "--no-progress"])
    assert res["overall"]["total"] == 3 and "exact match" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "vqa_samples.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(isinstance(r["prediction"], str) for r in rows)
    assert json.loads((out / "vqa.json").read_text())["overall"]["hits"] == sum(r["hit"] for r in rows)


def test_student_checkpoint_scores_like_its_export(tiny_models, tmp_path):
    """--model accepts a training-form student checkpoint; it scores exactly like its export."""
    from distill.eval.common import load_model_and_processor
    from distill.export import export_student
    from distill.models import build_student, load_processor, save_student_checkpoint

    model = build_student(tiny_models.student, teacher_path=tiny_models.teacher, adapter_fetch=True)
    with torch.no_grad():  # move the adapter off its initialisation so folding is not trivial
        for p in model.model.multi_modal_projector.adapter.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ckpt = save_student_checkpoint(tmp_path / "ckpt", model, load_processor(tiny_models.student))
    exported = export_student(ckpt, tmp_path / "export")
    imgs = [Image.open(p).convert("RGB") for p in _images(tmp_path, 2)]
    caps = ["a red square", "a blue circle"]
    scores = []
    for path in (ckpt, exported):
        m, proc = load_model_and_processor(str(path), device="cpu")
        assert not m.training
        scores.append(score_captions(m, proc, imgs, caps))
    torch.testing.assert_close(scores[0], scores[1], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# A/B protocol (the reference's SugarCrepe protocol) and the released SugarCrepe layout
# ----------------------------------------------------------------------------------------------
SUGARCREPE_CATEGORIES = ["add_att", "add_obj", "replace_att", "replace_obj", "replace_rel", "swap_att", "swap_obj"]


def _write_sugarcrepe(root: Path, per_category: int = 2, missing: int = 1) -> dict:
    """The released SugarCrepe layout, generated: one ``<category>.json`` per category, each
    ``{id: {filename, caption, negative_caption}}``, COCO-style file names under ``root/val2017``
    (images drawn here with PIL: no COCO pixels). The first `missing` records of ``swap_obj``
    name images that are not written. Returns {category: [(filename, caption, negative), ...]}."""
    img_dir = root / "val2017"
    img_dir.mkdir(parents=True)
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
    made: dict[str, list] = {}
    n = 0
    for c, cat in enumerate(SUGARCREPE_CATEGORIES):
        recs, rows = {}, []
        for i in range(per_category):
            n += 1
            name = f"{139 + 1000 * n:012d}.jpg"
            a, b = colours[(c + i) % 8], colours[(c + i + 3) % 8]
            pos, neg = f"A {a} square above a {b} circle.", f"A {b} square above a {a} circle ({cat} {i})."
            recs[str(i)] = {"filename": name, "caption": pos, "negative_caption": neg}
            rows.append((name, pos, neg))
            if not (cat == "swap_obj" and i < missing):
                Image.new("RGB", (40 + 4 * i, 32), (30 * c, 200 - 20 * i, 90)).save(img_dir / name, quality=90)
        (root / f"{cat}.json").write_text(json.dumps(recs, indent=1))
        made[cat] = rows
    return made


def test_sugarcrepe_released_layout_generated_fixture(tmp_path, caplog):
    made = _write_sugarcrepe(tmp_path / "sugarcrepe", per_category=2, missing=1)
    root = tmp_path / "sugarcrepe"
    with caplog.at_level("WARNING", logger="distill.eval.compositional"):
        samples = load_compositional([str(root)], image_root=root / "val2017")
    # 7 categories x 2 records, one missing image skipped, counted and logged (never silent)
    assert len(samples) == 13 and samples.skipped == ["swap_obj/0"]
    assert any("skipping 1 of 14" in r.getMessage() and "swap_obj/0" in r.getMessage() for r in caplog.records)
    by_id = {s.id: s for s in samples}
    assert sorted({s.negatives[0][1] for s in samples}) == SUGARCREPE_CATEGORIES  # category = file stem
    for cat, rows in made.items():
        for i, (name, pos, neg) in enumerate(rows):
            if (cat, i) == ("swap_obj", 0):
                assert f"{cat}/{i}" not in by_id
                continue
            s = by_id[f"{cat}/{i}"]
            assert (s.positive, s.negatives) == (pos, [(neg, cat)])
            assert Path(s.image.path).name == name and s.image.load().size == (40 + 4 * i, 32)
    # --limit counts kept samples; strict mode fails on the missing file
    assert len(load_compositional([str(root)], root / "val2017", limit=13)) == 13
    with pytest.raises(EvalDataError, match="--images"):
        load_compositional([str(root / "swap_obj.json")], root / "val2017", missing_images="error")
    # every image missing: a clear error naming the option, not an empty evaluation
    with pytest.raises(EvalDataError, match=r"none of the images of the 14 .*--image-root"):
        load_compositional([str(root)], image_root=tmp_path)


def _ab_sample(i, cats, pos="p"):
    return CompoSample(id=str(i), image=ImageRef(path="x"), positive=pos,
                       negatives=[(f"n{i}{j}", c) for j, c in enumerate(cats)])


def test_ab_accuracy_swap_averaging_ties_and_categories():
    from distill.eval import ab_accuracy, pair_score

    # [pos as A: (A, B)], [pos as B: (A, B)]
    right, wrong, tie = (0.0, -1.0), (-1.0, 0.0), (-0.5, -0.5)
    # always "A": right when the positive is A, wrong when it is B -> exactly 0.5
    assert pair_score(right, right) == 0.5
    assert pair_score(right, wrong) == 1.0 and pair_score(wrong, right) == 0.0
    assert pair_score(tie, tie) == 0.5 and pair_score(right, tie) == 0.75 and pair_score(tie, right) == 0.25
    samples = [_ab_sample(0, ["a"]), _ab_sample(1, ["a"]), _ab_sample(2, ["b"]), _ab_sample(3, ["a", "b", "b"])]
    scores = [
        [[right, wrong]],                 # a: 1
        [[right, right]],                 # a: 0.5 (always A)
        [[tie, tie]],                     # b: 0.5 (ties)
        [[right, wrong], [right, tie], [wrong, right]],  # a: 1; b: mean(0.75, 0) = 0.375; overall min = 0
    ]
    r = ab_accuracy(samples, [torch.tensor(s) for s in scores])
    assert r["overall"] == {"hits": 2.0, "total": 4, "accuracy": 0.5}
    assert r["per_category"]["a"] == {"hits": 2.5, "total": 3, "accuracy": pytest.approx(2.5 / 3)}
    assert r["per_category"]["b"] == {"hits": 0.875, "total": 2, "accuracy": 0.4375}
    with pytest.raises(ValueError, match="expected \\(3, 2, 2\\)"):
        ab_accuracy(samples[3:], [torch.zeros(1, 2, 2)])
    with pytest.raises(ValueError, match="non-finite"):
        ab_accuracy(samples[:1], [torch.tensor([[[float("nan"), 0.0], [0.0, 0.0]]])])


def test_ab_question_and_letter_ids_from_tokenizer(student):
    from distill.eval import DEFAULT_AB_PROMPT, ab_question, letter_token_ids
    from distill.eval.common import render_chat, user_turn

    _, proc = student
    q = ab_question(DEFAULT_AB_PROMPT, "a {B} red square", "a blue circle")  # braces in a caption stay
    assert q == "Which caption describes the image?\nA. a {B} red square\nB. a blue circle\nAnswer with the letter."
    a_id, b_id = letter_token_ids(proc)
    tok = proc.tokenizer
    assert tok.decode([a_id]) == "A" and tok.decode([b_id]) == "B"
    prefix = render_chat(proc, [user_turn(q)], add_generation_prompt=True)
    assert tok(prefix + "B", add_special_tokens=False)["input_ids"][-1] == b_id
    with pytest.raises(EvalDataError, match=r"\{A\} exactly once"):
        ab_question("Pick: {A} or {A}", "x", "y")
    with pytest.raises(EvalDataError, match=r"\{B\} exactly once"):
        ab_question("Pick: {A} or {b}", "x", "y")


def test_score_letters_equals_plain_forward_and_is_batch_invariant(student, tmp_path):
    from distill.eval import DEFAULT_AB_PROMPT, ab_question, letter_token_ids, score_letters
    from distill.eval.common import render_chat, user_turn

    model, proc = student
    imgs = [Image.open(p).convert("RGB") for p in _images(tmp_path, 3)]
    qs = [ab_question(DEFAULT_AB_PROMPT, "a red square", "a blue circle"),
          ab_question(DEFAULT_AB_PROMPT, "two green stars to the left of a yellow triangle", "a red square"),
          ab_question(DEFAULT_AB_PROMPT, "purple", "grey")]
    ids = letter_token_ids(proc)
    batched = score_letters(model, proc, imgs, qs, ids, batch_size=3)
    single = score_letters(model, proc, imgs, qs, ids, batch_size=1)
    assert batched.shape == (3, 2) and bool((batched < 0).all())
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)
    for b in range(3):  # reference: full logits of one unpadded prompt, last position
        text = render_chat(proc, [user_turn(qs[b])], add_generation_prompt=True)
        enc = proc(images=[imgs[b]], text=[text], add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            ref = model(**enc).logits[0, -1].float().log_softmax(-1)[list(ids)]
        torch.testing.assert_close(batched[b], ref, rtol=1e-5, atol=1e-5)


class _LetterPolicy:
    """Forward hook on the real tiny model: reads the two options back from each prompt's tokens and
    overwrites the next-token logits of "A" and "B" with what `policy(caption_a, caption_b)` says,
    so the whole A/B path (prompts, order swap, batching, token ids, accounting) runs for real
    with answers the test controls. Records every (caption_a, caption_b) it was asked."""

    def __init__(self, model, proc, policy):
        from distill.eval import letter_token_ids

        self.proc, self.policy, self.asked = proc, policy, []
        self.ids = letter_token_ids(proc)
        self.handle = model.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output):
        import re

        texts = self.proc.tokenizer.batch_decode(kwargs["input_ids"], skip_special_tokens=True)
        for b, text in enumerate(texts):
            m = re.search(r"\nA\. (.*)\nB\. (.*)\nAnswer with the letter\.", text)
            assert m, text
            self.asked.append((m.group(1), m.group(2)))
            la, lb = self.policy(m.group(1), m.group(2))
            output.logits[b, :, self.ids[0]] = la
            output.logits[b, :, self.ids[1]] = lb
        return output

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_ab_protocol_on_sugarcrepe_fixture_with_controlled_answers(student, tmp_path):
    from distill.eval import evaluate_compositional_ab

    model, proc = student
    root = tmp_path / "sc"
    _write_sugarcrepe(root, per_category=2, missing=0)
    samples = load_compositional([str(root)], image_root=root / "val2017")
    positives = {s.positive for s in samples}
    cat_of = {s.negatives[0][0]: s.negatives[0][1] for s in samples}
    assert len(samples) == 14

    def run(policy, batch_size=4):
        with _LetterPolicy(model, proc, policy) as hook:
            res, per = evaluate_compositional_ab(model, proc, samples, batch_size=batch_size, progress=False)
        return res, per, hook.asked

    # always "A": exactly 50 % everywhere, and every pair was asked in both orders
    res, per, asked = run(lambda a, b: (10.0, -10.0))
    assert len(asked) == 28
    assert sorted(asked) == sorted([(s.positive, s.negatives[0][0]) for s in samples]
                                   + [(s.negatives[0][0], s.positive) for s in samples])
    assert res["overall"] == {"hits": 7.0, "total": 14, "accuracy": 0.5}
    assert all(e == {"hits": 1.0, "total": 2, "accuracy": 0.5} for e in res["per_category"].values())
    assert [p["score"] for p in per] == [0.5] * 14 and res["answered_a"] == 1.0
    from distill.eval import letter_token_ids

    assert res["letter_token_ids"] == dict(zip("AB", letter_token_ids(proc)))
    # oracle / anti-oracle: 100 % / 0 %; equal letter logits (ties): 50 %
    res, _, _ = run(lambda a, b: (1.0, 0.0) if a in positives else (0.0, 1.0), batch_size=3)
    assert res["overall"]["accuracy"] == 1.0 and res["answered_a"] == 0.5
    res, _, _ = run(lambda a, b: (0.0, 1.0) if a in positives else (1.0, 0.0))
    assert res["overall"]["accuracy"] == 0.0
    res, per, _ = run(lambda a, b: (3.0, 3.0))
    assert res["overall"]["accuracy"] == 0.5 and res["answered_a"] == 0.0
    assert all(p["pairs"][0]["pos_first"][0] == p["pairs"][0]["pos_first"][1] for p in per)

    # per category: oracle on swap_*, anti-oracle on add_*, else right when the positive is A and a
    # tie when it is B (0.75 per pair: averaging with a tie)
    def mixed(a, b):
        neg = b if a in positives else a
        cat = cat_of[neg]
        if cat.startswith("swap"):
            return (1.0, 0.0) if a in positives else (0.0, 1.0)
        if cat.startswith("add"):
            return (0.0, 1.0) if a in positives else (1.0, 0.0)
        return (1.0, 0.0) if a in positives else (2.0, 2.0)

    res, per, _ = run(mixed, batch_size=5)
    want = {"add_att": 0.0, "add_obj": 0.0, "replace_att": 0.75, "replace_obj": 0.75, "replace_rel": 0.75,
            "swap_att": 1.0, "swap_obj": 1.0}
    assert {c: e["accuracy"] for c, e in res["per_category"].items()} == want
    assert res["overall"]["hits"] == pytest.approx(2 * (3 * 0.75 + 2)) and res["overall"]["total"] == 14


def test_ab_multi_negative_sample_overall_is_worst_pair(student, tmp_path):
    """Synthetic-style samples (several negatives, several categories): per category each pair counts,
    overall is the sample's worst pair."""
    from distill.eval import evaluate_compositional_ab

    model, proc = student
    p = _images(tmp_path, 1)[0]
    smp = CompoSample(id="m", image=ImageRef(path=str(p)), positive="a red square",
                      negatives=[("a blue square", "replace_att"), ("a square red", "swap_att")])

    def policy(a, b):  # right on replace_att in both orders; always "A" on swap_att
        if "blue" in a + b:
            return (1.0, 0.0) if a == "a red square" else (0.0, 1.0)
        return (1.0, 0.0)

    with _LetterPolicy(model, proc, policy):
        res, per = evaluate_compositional_ab(model, proc, [smp], batch_size=3, progress=False)
    assert res["per_category"]["replace_att"]["accuracy"] == 1.0
    assert res["per_category"]["swap_att"]["accuracy"] == 0.5
    assert res["overall"]["accuracy"] == 0.5 and per[0]["score"] == 0.5
    assert [q["score"] for q in per[0]["pairs"]] == [1.0, 0.5]


def test_cli_compositional_ab_protocol_records_protocol(tiny_models, tmp_path, capsys, synth):
    from distill.eval.__main__ import main

    root = tmp_path / "sc"
    _write_sugarcrepe(root, per_category=1, missing=1)
    out = tmp_path / "out"
    args = ["compositional", "--model", str(tiny_models.student), "--data", str(root),
            "--image-root", str(root / "val2017"), "--batch-size", "4", "--out", str(out), "--no-progress"]
    res = main(args + ["--protocol", "ab"])
    printed = capsys.readouterr().out
    assert "A/B accuracy (%)" in printed and "| swap_att | 1 |" in printed and "**overall** | 6 |" in printed
    saved = json.loads((out / "compositional_ab.json").read_text())
    assert saved["protocol"] == "ab" and saved["overall"] == res["overall"]
    assert saved["skipped_missing_images"] == 1 and saved["evaluated"] == 6 and "swap_obj" not in saved["per_category"]
    assert "{A}" in saved["prompt"] and set(saved["letter_token_ids"]) == {"A", "B"}
    rows = [json.loads(line) for line in (out / "compositional_ab_samples.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and sum(r["score"] for r in rows) == pytest.approx(saved["overall"]["hits"])
    assert all(r["score"] in (0.0, 0.25, 0.5, 0.75, 1.0) for r in rows)
    # the default protocol is likelihood, written beside it under its own name
    lik = main(args)
    assert lik["protocol"] == "likelihood" and json.loads((out / "compositional.json").read_text())["protocol"] == "likelihood"
    assert (out / "compositional_ab.json").exists()
    # the project's synthetic format under --protocol ab (several negatives per sample)
    syn = main(["compositional", "--model", str(tiny_models.student), "--data", str(synth / "compositional" / "shards"),
                "--protocol", "ab", "--limit", "2", "--no-progress"])
    assert syn["overall"]["total"] == 2
    assert set(syn["per_category"]) == {"swap_att", "swap_obj", "replace_rel", "replace_att"}
    with pytest.raises(SystemExit, match=r"\{A\} exactly once"):
        main(args + ["--protocol", "ab", "--prompt", "Which one?"])


# ----------------------------------------------------------------------------------------------
# the paper's setting as a config
# ----------------------------------------------------------------------------------------------
def test_paper_config_matches_reference_layers():
    from distill.config import load_config
    from distill.losses import match_layers

    repo = Path(__file__).resolve().parents[1]
    cfg = load_config(repo / "launch" / "configs" / "qwen_pair_stage3_paper.yaml", [], stage=3, check_paths=False)
    loss = cfg.loss
    assert (loss.lm_weight, loss.kd_weight, loss.attn_weight) == (1.0, 1.0, 1.0)
    # Qwen1.5-1.8B has 24 text layers, Qwen1.5-4B 40
    s_layers, windows = match_layers(24, 40, loss.student_layers, loss.teacher_layers, loss.num_layers, loss.window)
    assert s_layers == list(range(8, 15))
    assert windows == [list(range(start, start + 5)) for start in range(13, 20)]
