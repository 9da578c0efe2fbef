"""distill.data for the VLM families whose image-token counts vary per image (Qwen2.5-VL,
LLaVA-OneVision, InternVL, Qwen3-VL): the loader's batches from mixed-size synth shards against the
processor's own batch, assistant-only labels, ragged ``vis_pos``, the model forward (batch rows ==
samples alone), truncation around image blocks, and the placeholder image row."""

import io
import json
import tarfile

import pytest
import torch
from PIL import Image

from data_prep.synth import make_synthetic
from distill.data import (DataConfig, PlaceholderImage, SampleEncoder, SkipSample, add_placeholder_image,
                          build_loader, collate)
from distill.data import families as fam
from distill.models import tiny_families as tf

FAMILIES = tf.FAMILIES


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("fam_synth")
    make_synthetic(str(root), num=8, seed=0, num_test=1, shard_size=4, progress=False, sizes=[56, 112])
    return root / "instruct" / "shards"


@pytest.fixture(scope="module")
def raw_samples(shards):
    out = {}
    for tar in sorted(shards.glob("*.tar")):
        with tarfile.open(tar) as t:
            for m in t:
                key, ext = m.name.split(".", 1)
                out.setdefault(key, {"__key__": key})[ext] = t.extractfile(m).read()
    return out


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fam_pairs")
    return {f: tf.build_family_pair(f, root / f, seed=0) for f in FAMILIES}


def _model(folder):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(folder).eval()


def _forward(model, batch):
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    inputs.update({k: batch[k] for k in batch["model_inputs"] if batch[k] is not None})
    with torch.no_grad():
        return model(**inputs).logits


def _recount(batch, image_id):
    rows = [(r == image_id).nonzero().flatten().tolist() for r in batch["input_ids"]]
    n = max(len(r) for r in rows)
    return [r + [-1] * (n - len(r)) for r in rows]


def test_model_inputs_match_family_files():
    for f in FAMILIES:
        assert fam.MODEL_INPUTS[f] == tf.SPECS[f].batch_keys
        assert fam.family_of(tf.make_processor(f)) == f


@pytest.mark.parametrize("family", FAMILIES)
def test_family_batches(pairs, shards, raw_samples, family):
    folder = pairs[family].student
    proc = tf.load_processor(folder)
    image_id = tf.family_info(folder)["image_token_id"]
    workers = 2 if family == "qwen2_5_vl" else 0  # worker processes carry the family keys too
    cfg = DataConfig(shards=[str(shards)], batch_size=4, max_length=1024, shuffle_buffer=0, num_workers=workers)
    loader = build_loader(cfg, proc, rank=0, world_size=1, seed=0, with_keys=True)
    enc, tok = loader.encoder, proc.tokenizer
    assert enc.family == family and enc.image_token_id == image_id
    model = _model(folder)
    differ = False
    for batch in loader:
        assert batch["model_inputs"] == list(tf.SPECS[family].batch_keys)
        ids, am, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        counts = (ids == image_id).sum(1)
        differ |= len(set(counts[batch["has_image"]].tolist())) > 1
        assert batch["vis_pos"].dtype == torch.long and batch["vis_pos"].tolist() == _recount(batch, image_id)
        assert batch["vis_key_len"] == int(batch["vis_pos"].max()) + 1 and isinstance(batch["vis_key_len"], int)
        assert batch["num_targets"] == int((labels[:, 1:] != -100).sum()) and isinstance(batch["num_targets"], int)
        texts, images = [], []
        for b, key in enumerate(batch["sample_keys"]):
            raw = raw_samples[key]
            rec = json.loads(raw["json"])
            msgs = enc._messages(rec["conversations"])
            text, _ = enc.answer_spans(msgs)
            texts.append(text)
            img = Image.open(io.BytesIO(raw["png"])).convert("RGB") if rec.get("image") else None
            assert bool(batch["has_image"][b]) == (img is not None)
            if img is not None:
                images.append(img)
            # labels: exactly the template's assistant tokens ({% generation %}), none on the image block
            ref = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
            r_ids, r_mask = list(ref["input_ids"]), list(ref["assistant_masks"])
            L = int(am[b].sum())
            row = ids[b, :L].tolist()
            k = L - len(r_ids) + 1
            p = r_ids.index(image_id) if img is not None else len(r_ids)
            if img is not None:
                assert row[:p] == r_ids[:p] and row[p + k:] == r_ids[p + 1:]
                want = r_mask[:p] + [0] * k + r_mask[p + 1:]
            else:
                assert row == r_ids
                want = r_mask
            assert (labels[b, :L] != -100).long().tolist() == want
            assert (labels[b, L:] == -100).all() and (ids[b, L:] == tok.pad_token_id).all()
            lab = labels[b, :L]
            assert torch.equal(lab[lab != -100], ids[b, :L][lab != -100])
        # the processor's own right-padded batch for the same texts and images
        ref = proc(text=texts, images=images or None, padding=True, add_special_tokens=False, return_tensors="pt")
        assert torch.equal(ref["input_ids"], ids) and torch.equal(ref["attention_mask"], am)
        for k in batch["model_inputs"]:
            if images or fam.LAYOUT[family][k] == "seq":
                assert torch.equal(ref[k], batch[k]), k
            else:
                assert batch[k] is None
        # the model: finite logits, each row == the sample run alone (right padding changes no real position)
        logits = _forward(model, batch)
        assert torch.isfinite(logits).all()
        it = iter(images)
        for b, text in enumerate(texts):
            alone = proc(text=[text], images=[next(it)] if batch["has_image"][b] else None, add_special_tokens=False,
                         return_tensors="pt")
            L = int(am[b].sum())
            assert torch.equal(alone["input_ids"][0], ids[b, :L])
            with torch.no_grad():
                one = model(**alone).logits[0]
            torch.testing.assert_close(logits[b, :L], one, rtol=1e-5, atol=1e-5)
    assert differ, "synth sizes 56/112 should give different image-token counts inside a batch"


@pytest.mark.parametrize("family", ["qwen2_5_vl", "internvl"])
def test_truncation_keeps_image_block_and_markers(pairs, family):
    proc = tf.load_processor(pairs[family].student)
    big = SampleEncoder(proc, max_length=4096)
    img = Image.new("RGB", (112, 112), (200, 10, 10))
    msgs = big._messages([{"from": "human", "value": "<image>\nDescribe."},
                          {"from": "gpt", "value": " ".join(["red circle"] * 20)}])
    full = big.encode_messages(msgs, img)
    assert full.extras is not None and not full.truncated
    pos = (full.input_ids == big.image_token_id).nonzero().flatten()
    end = int(pos[-1]) + 1
    markers = fam.end_marker_ids(proc)
    while int(full.input_ids[end]) in markers:
        end += 1
    if family == "qwen2_5_vl":
        assert end == int(pos[-1]) + 2  # <|vision_end|> belongs to the block
        assert torch.equal(full.extras["mm_token_type_ids"], (full.input_ids == big.image_token_id).long())
    for cut in (int(pos[0]) + 1, end - 1):
        with pytest.raises(SkipSample) as e:
            SampleEncoder(proc, max_length=cut).encode_messages(msgs, img)
        assert e.value.reason == "image_truncated"
    cut = end + 12
    got = SampleEncoder(proc, max_length=cut).encode_messages(msgs, img)
    assert got.truncated and got.input_ids.numel() == cut
    assert torch.equal(got.input_ids, full.input_ids[:cut]) and torch.equal(got.labels, full.labels[:cut])
    for k, v in got.extras.items():
        if fam.LAYOUT[family][k] == "seq":
            assert torch.equal(v, full.extras[k][:cut])
        else:
            assert torch.equal(v, full.extras[k])
    with pytest.raises(SkipSample) as e:
        SampleEncoder(proc, max_length=end + 2).encode_messages(msgs, img)
    assert e.value.reason == "no_labels"


@pytest.mark.parametrize("family", FAMILIES)
def test_placeholder_row(pairs, family, tiny_models):
    folder = pairs[family].student
    proc = tf.load_processor(folder)
    image_id = tf.family_info(folder)["image_token_id"]
    enc = SampleEncoder(proc, max_length=512)
    texts = [enc.encode_messages(enc._messages([{"from": "human", "value": q}, {"from": "gpt", "value": a}]))
             for q, a in (("Say hi.", "Hi."), ("Name a shape.", "A red star is a shape."))]
    batch = collate(texts, enc.pad_token_id, image_id, enc.family)
    assert batch["pixel_values"] is None and batch["vis_pos"].shape == (2, 0) and batch["vis_key_len"] == 0
    ph = PlaceholderImage.from_processor(proc, image_id)
    out = add_placeholder_image(batch, ph)
    n = int((ph.input_ids == image_id).sum())
    assert n > 0 and out["input_ids"].shape[0] == 3 and out["has_image"].tolist() == [False, False, False]
    assert (out["labels"][2] == -100).all()
    assert out["vis_pos"].tolist() == _recount(out, image_id) and out["vis_pos"].shape == (3, n)
    assert out["vis_key_len"] == int(out["vis_pos"].max()) + 1 and out["num_targets"] == batch["num_targets"]
    for k in out["model_inputs"]:
        assert out[k] is not None and (fam.LAYOUT[family][k] != "seq" or out[k].shape == out["input_ids"].shape)
    # the image-only row is what the processor gives for the family's image text (same layout as the loader's)
    row = proc(text=[fam.image_text(family, proc)], images=[Image.new("RGB", (32, 32))], add_special_tokens=False,
               return_tensors="pt")
    L = ph.input_ids.shape[1]
    assert torch.equal(out["input_ids"][2, :L], row["input_ids"][0]) and int(out["attention_mask"][2].sum()) == L
    for k in out["model_inputs"]:
        want = row[k][0] if fam.LAYOUT[family][k] == "seq" else row[k]
        got = out[k][2, :L] if fam.LAYOUT[family][k] == "seq" else out[k]
        assert torch.equal(got, want), k
    # the model runs the vision path; the text rows' logits are those of the batch without the row
    model = _model(folder)
    full, base = _forward(model, out), _forward(model, batch)
    assert torch.isfinite(full).all()
    T = batch["input_ids"].shape[1]
    am = batch["attention_mask"].bool()
    torch.testing.assert_close(full[:2, :T][am], base[am], rtol=1e-5, atol=1e-5)
    assert add_placeholder_image(out, ph) is out  # a batch with an image is returned as is
    # a placeholder of another processor (LLaVA) is refused with a clear error
    from transformers import AutoProcessor

    llava = AutoProcessor.from_pretrained(str(tiny_models.student))
    other = PlaceholderImage.from_processor(llava, llava.tokenizer.convert_tokens_to_ids("<image>"))
    with pytest.raises(ValueError, match="model inputs"):
        add_placeholder_image(batch, other)


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_text_only_and_image_samples(pairs, family):
    """Text-only rows inside an image batch: vis_pos all -1, the image keys cover the image samples only,
    the processor's own batch and the rows run alone agree."""
    folder = pairs[family].student
    proc = tf.load_processor(folder)
    enc = SampleEncoder(proc, max_length=1024)
    convs = [("<image>\nWhat is it?", "A blue square."), ("Say hi.", "Hi there."), ("<image>\nColor?", "Red.")]
    imgs = [Image.new("RGB", (112, 84), (20, 20, 200)), None, Image.new("RGB", (56, 56), (200, 20, 20))]
    samples, texts = [], []
    for (q, a), img in zip(convs, imgs):
        msgs = enc._messages([{"from": "human", "value": q}, {"from": "gpt", "value": a}])
        samples.append(enc.encode_messages(msgs, img))
        texts.append(enc.answer_spans(msgs)[0])
    batch = collate(samples, enc.pad_token_id, enc.image_token_id, enc.family)
    assert batch["has_image"].tolist() == [True, False, True]
    assert batch["vis_pos"].tolist() == _recount(batch, enc.image_token_id) and (batch["vis_pos"][1] == -1).all()
    images = [i for i in imgs if i is not None]
    ref = proc(text=texts, images=images, padding=True, add_special_tokens=False, return_tensors="pt")
    assert torch.equal(ref["input_ids"], batch["input_ids"]) and torch.equal(ref["attention_mask"], batch["attention_mask"])
    for k in batch["model_inputs"]:
        assert torch.equal(ref[k], batch[k]), k
    model = _model(folder)
    logits = _forward(model, batch)
    for b, (text, img) in enumerate(zip(texts, imgs)):
        alone = proc(text=[text], images=[img] if img is not None else None, add_special_tokens=False,
                     return_tensors="pt")
        L = int(batch["attention_mask"][b].sum())
        with torch.no_grad():
            one = model(**alone).logits[0]
        torch.testing.assert_close(logits[b, :L], one, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision"])
def test_max_length_too_short_for_an_image_is_a_config_error(pairs, shards, family):
    from distill.data import DataConfigError

    proc = tf.load_processor(pairs[family].student)
    cfg = DataConfig(shards=[str(shards)], batch_size=2, max_length=8, num_workers=0)
    with pytest.raises(DataConfigError, match="cannot hold one image sample"):
        build_loader(cfg, proc, rank=0, world_size=1, seed=0)
