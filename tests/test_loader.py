"""distill.data: label masking, truncation, collation, splitting, equal batch counts, resume, skips."""

import io
import json
import tarfile

import pytest
import torch
from PIL import Image

from data_prep.shards import prepare_llava
from data_prep.synth import write_split_json
from distill.data import (DataConfig, Encoded, SampleEncoder, SkipSample, build_loader, collate,
                          resolve_shards, split_by_node, split_by_worker)


@pytest.fixture(scope="module")
def processor(tiny_models):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(tiny_models.student))


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Synthetic instruct records (incl. multi-turn) + extra text-only ones: 36 records, 9 shards of 4."""
    root = tmp_path_factory.mktemp("mixed")
    js = write_split_json(str(root), "instruct", 32, seed=0, size=64)
    recs = json.load(open(js))
    recs += [{"id": f"t{i}", "conversations": [{"from": "human", "value": f"Say {i}."},
                                               {"from": "gpt", "value": f"{i}."}]} for i in range(4)]
    json.dump(recs, open(root / "all.json", "w"))
    res = prepare_llava(str(root / "all.json"), str(root / "instruct" / "images"), str(root / "shards"),
                        shard_size=4, progress=False)
    assert res.num_samples == 36 and res.num_rejects == 0
    return root / "shards", recs


def cfg(shards, **kw):
    base = dict(shards=[str(shards)], batch_size=4, max_length=256, shuffle_buffer=5, num_workers=0)
    base.update(kw)
    return DataConfig(**base)


def keys_of(loader):
    return [b["sample_keys"] for b in loader]


def test_split_functions_disjoint_complete():
    items = list(range(23))
    for world, workers in [(1, 1), (2, 3), (4, 2), (3, 5)]:
        got = [split_by_worker(split_by_node(items, r, world), w, workers) for r in range(world) for w in range(workers)]
        flat = [x for g in got for x in g]
        assert sorted(flat) == items  # complete and disjoint
    with pytest.raises(ValueError):
        split_by_node(items, 2, 2)


def test_label_masking_multi_turn_matches_reference(processor):
    enc = SampleEncoder(processor, max_length=512)
    msgs = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "The star is red."},
            {"role": "user", "content": "and the circle?"}, {"role": "assistant", "content": "No circle."}]
    got = enc.encode_messages(msgs)
    # Independent reference: the template's {% generation %} markers via HF's assistant mask.
    ref = processor.tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert got.input_ids.tolist() == list(ref["input_ids"])
    want = [t if m else -100 for t, m in zip(ref["input_ids"], ref["assistant_masks"])]
    assert got.labels.tolist() == want
    assert processor.tokenizer.decode([t for t in want if t != -100]) == "The star is red.<|im_end|>No circle.<|im_end|>"


def test_image_sample_matches_processor(processor, mixed):
    shards, recs = mixed
    enc = SampleEncoder(processor, max_length=512)
    tar = sorted(shards.glob("shard-*.tar"))[0]
    with tarfile.open(tar) as t:
        members = {m.name: t.extractfile(m).read() for m in t}
    key = sorted(k.split(".")[0] for k in members if k.endswith(".png"))[0]
    raw = {"__key__": key, "json": members[f"{key}.json"], "png": members[f"{key}.png"]}
    got = enc.encode(raw)
    rec = json.loads(raw["json"])
    text, _ = enc.answer_spans(enc._messages(rec["conversations"]))
    img = Image.open(io.BytesIO(raw["png"])).convert("RGB")
    ref = processor(images=[img], text=[text], add_special_tokens=False, return_tensors="pt")
    assert got.input_ids.tolist() == ref["input_ids"][0].tolist()  # expansion == processor's own
    assert torch.equal(got.pixel_values, ref["pixel_values"][0])
    again = enc.encode(raw)  # second time: cached expansion + image processor only
    assert torch.equal(again.input_ids, got.input_ids) and torch.equal(again.pixel_values, got.pixel_values)
    img_pos = (got.input_ids == enc.image_token_id).nonzero().flatten()
    n = processor.tokenizer(text, add_special_tokens=False)["input_ids"].count(enc.image_token_id)
    assert n == 1 and img_pos.numel() == (ref["input_ids"][0] == enc.image_token_id).sum()
    assert (got.labels[img_pos] == -100).all()
    answers = [t["value"] for t in rec["conversations"] if t["from"] == "gpt"]
    labelled = processor.tokenizer.decode([t for t in got.labels.tolist() if t != -100])
    assert labelled == "".join(a + "<|im_end|>" for a in answers)


def test_truncation_keeps_image_tokens(processor):
    enc0 = SampleEncoder(processor, max_length=4096)
    img = Image.new("RGB", (40, 30), (200, 10, 10))
    long_answer = " ".join(["red circle"] * 30)
    msgs = [{"role": "user", "content": "<image>\nDescribe."}, {"role": "assistant", "content": long_answer}]
    full = enc0.encode_messages(msgs, img)
    pos = (full.input_ids == enc0.image_token_id).nonzero().flatten()
    img_end = int(pos[-1]) + 1
    cut = img_end + 10
    got = SampleEncoder(processor, max_length=cut).encode_messages(msgs, img)
    assert got.input_ids.numel() == cut and got.truncated and not full.truncated
    assert torch.equal(got.input_ids, full.input_ids[:cut]) and torch.equal(got.labels, full.labels[:cut])
    assert int((got.input_ids == enc0.image_token_id).sum()) == pos.numel()
    with pytest.raises(SkipSample) as e:
        SampleEncoder(processor, max_length=img_end - 1).encode_messages(msgs, img)
    assert e.value.reason == "image_truncated"
    with pytest.raises(SkipSample) as e:  # answer entirely cut: nothing to learn
        SampleEncoder(processor, max_length=img_end + 2).encode_messages(msgs, img)
    assert e.value.reason == "no_labels"


def test_collate_layout():
    pv = torch.randn(3, 4, 4)
    a = Encoded(torch.tensor([5, 1, 1, 1, 6, 7]), torch.tensor([-100, -100, -100, -100, 6, 7]), pv, "a")
    b = Encoded(torch.tensor([8, 9]), torch.tensor([-100, 9]), None, "b")
    c = Encoded(torch.tensor([5, 4, 1, 1, 1, 6, 7, 2]), torch.tensor([-100] * 7 + [2]), pv + 1, "c")
    out = collate([a, b, c], pad_token_id=0, image_token_id=1)
    assert out["input_ids"].shape == (3, 8) and out["input_ids"][1].tolist() == [8, 9, 0, 0, 0, 0, 0, 0]
    assert out["attention_mask"].sum(1).tolist() == [6, 2, 8]
    assert out["labels"][0].tolist() == [-100, -100, -100, -100, 6, 7, -100, -100]
    assert out["has_image"].tolist() == [True, False, True]
    assert out["vis_pos"].tolist() == [[1, 2, 3], [0, 1, 2], [2, 3, 4]]
    assert out["vis_key_len"] == 5 and isinstance(out["vis_key_len"], int)  # last visual position + 1
    assert torch.equal(out["pixel_values"], torch.stack([pv, pv + 1]))
    out = collate([b, b], pad_token_id=0, image_token_id=1)
    assert out["pixel_values"] is None and out["vis_pos"].shape == (2, 0) and out["vis_key_len"] == 0
    d = Encoded(torch.tensor([1, 1, 6]), torch.tensor([-100, -100, 6]), pv, "d")
    with pytest.raises(ValueError, match="different image-token counts"):
        collate([a, d], pad_token_id=0, image_token_id=1)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_ranks_and_workers_cover_disjoint_and_complete(processor, mixed):
    shards, _ = mixed
    all_keys = []
    for rank in range(3):  # 9 shards / (3 ranks x 3 readers): every sample exactly once per epoch
        loader = build_loader(cfg(shards, num_workers=3, batch_size=2, samples_per_epoch=12), processor,
                              rank=rank, world_size=3, seed=0, with_keys=True)
        batches = list(loader)
        assert len(batches) == len(loader) == 6
        all_keys += [k for b in batches for k in b["sample_keys"]]
        b = next(b for b in batches if bool(b["has_image"].any()))
        assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape
        assert b["vis_pos"].shape == (2, 64) and b["pixel_values"].shape[0] == int(b["has_image"].sum())
    assert len(all_keys) == 36 and len(set(all_keys)) == 36


def test_equal_batch_counts_uneven_data(processor, mixed):
    shards, _ = mixed
    # 36 samples, 4 ranks, drop_text_only removes 4 + unknown synth text-only ones: readers run short and
    # must cycle; every rank still yields exactly len(loader) batches.
    counts, seen, dropped = [], [], 0
    for rank in range(4):
        loader = build_loader(cfg(shards, batch_size=3, drop_text_only=True), processor, rank=rank, world_size=4, seed=1,
                              with_keys=True)
        batches = list(loader)
        counts.append((len(batches), len(loader)))
        assert all(bool(b["has_image"].all()) for b in batches)
        dropped += loader.stats.counts["text_only_dropped"]
        seen += [k for b in batches for k in b["sample_keys"]]
    assert counts == [(3, 3)] * 4  # (36 // 4) // 3
    assert dropped >= 4  # the 4 appended text-only records share one shard, which some rank must read
    # resampled mode: fixed samples per epoch per rank, reproducible for a seed, different per rank
    runs = {}
    for rank in (0, 1, 0):
        loader = build_loader(cfg(shards, resampled=True, samples_per_epoch=10, batch_size=5), processor,
                              rank=rank, world_size=2, seed=7, with_keys=True)
        got = keys_of(loader)
        assert len(got) == 2
        runs.setdefault(rank, []).append(got)
    assert runs[0][0] == runs[0][1] and runs[0][0] != runs[1][0]


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_resume_continues_exact_stream(processor, mixed):
    shards, _ = mixed
    c = cfg(shards, num_workers=3, batch_size=2, samples_per_epoch=14)  # 7 batches: reader quotas 3/2/2
    full = build_loader(c, processor, rank=0, world_size=1, seed=5, with_keys=True)
    ref = keys_of(full)
    assert len(ref) == 7 and full.state_dict()["epoch"] == 1
    part = build_loader(c, processor, rank=0, world_size=1, seed=5, with_keys=True)
    head = []
    for b in part:
        head.append(b["sample_keys"])
        if len(head) == 3:
            break
    state = part.state_dict()
    assert (state["epoch"], state["batches"]) == (0, 3)
    resumed = build_loader(c, processor, rank=0, world_size=1, seed=5, with_keys=True)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    tail = keys_of(resumed)
    assert head + tail == ref
    slow = build_loader(c, processor, rank=0, world_size=1, seed=5, with_keys=True)  # fallback: re-encode batches
    slow.load_state_dict({k: v for k, v in state.items() if k != "reader_pos"})
    assert head + keys_of(slow) == ref
    again = []
    for b in part:  # re-iterating the partly consumed loader continues where it stopped
        again.append(b["sample_keys"])
    assert head + again == ref
    assert resumed.state_dict()["epoch"] == 1
    assert keys_of(resumed) != ref  # next epoch: a different order
    with pytest.raises(ValueError, match="world_size"):
        build_loader(c, processor, rank=0, world_size=2, seed=5).load_state_dict(state)


def _tar(path, samples):
    with tarfile.open(path, "w") as t:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


def test_bad_samples_are_counted_not_fatal(processor, tmp_path):
    png = io.BytesIO()
    Image.new("RGB", (16, 16), (0, 0, 255)).save(png, format="PNG")
    rec = {"image": "x.png", "conversations": [{"from": "human", "value": "<image>\nColor?"},
                                               {"from": "gpt", "value": "Blue."}]}
    good = lambda k: [(f"{k}.json", json.dumps(rec).encode()), (f"{k}.png", png.getvalue())]  # noqa: E731
    samples = good("000") + [("001.json", json.dumps(rec).encode()), ("001.png", b"\x89PNG garbage")]
    samples += good("002") + [("003.json", b"{not json")] + good("004")
    samples += [("005.json", json.dumps(rec).encode())] + good("006") + good("007")
    _tar(tmp_path / "a.tar", samples)
    _tar(tmp_path / "b.tar", good("100") + good("101") + good("102"))
    with tarfile.open(tmp_path / "b.tar") as t:
        cut = [m for m in t][3].offset_data + 30  # inside the second sample's image data
    data = (tmp_path / "b.tar").read_bytes()
    (tmp_path / "b.tar").write_bytes(data[:cut])  # truncated shard
    loader = build_loader(cfg(tmp_path / "*.tar", batch_size=2, samples_per_epoch=12, shuffle_buffer=0), processor,
                          rank=0, world_size=1, seed=0)
    assert [s.num_samples for s in loader.shards] == [None, None]
    batches = list(loader)
    assert len(batches) == 6
    st = loader.stats.as_dict()
    for reason in ("image_decode_error", "bad_record", "missing_image", "shard_read_error"):
        assert st.get(reason, 0) >= 1, st
    assert loader.stats.yielded == 12
    # read errors are events, not samples: reported apart from the skipped-sample count
    stats = loader.stats
    assert stats.read_errors == st["shard_read_error"] + st.get("shard_short", 0)
    assert stats.total == sum(v for k, v in st.items() if k not in ("shard_read_error", "shard_short"))
    assert "shard read errors" in stats.summary() and f"{stats.total} skipped" in stats.summary()


def test_text_truncated_at_max_length_is_counted(processor, mixed):
    shards, _ = mixed
    full = build_loader(cfg(shards, max_length=4096, shuffle_buffer=0, batch_size=1), processor, rank=0,
                        world_size=1, seed=0, with_keys=True)
    length = {b["sample_keys"][0]: int(b["attention_mask"].sum()) for b in full}
    assert full.stats.truncated == 0
    limit = sorted(length.values())[len(length) // 2]
    cut = build_loader(cfg(shards, max_length=limit, shuffle_buffer=0, batch_size=1), processor, rank=0,
                       world_size=1, seed=0, with_keys=True)
    kept = [b["sample_keys"][0] for b in cut]
    want = sum(length[k] > limit for k in kept)
    assert want > 0 and cut.stats.truncated == want, (cut.stats.as_dict(), want)
    assert cut.stats.total == cut.stats.as_dict().get("image_truncated", 0) + cut.stats.as_dict().get("no_labels", 0)
    assert "truncated at max_length" in cut.stats.summary()


def test_config_and_shard_errors(processor, mixed, tmp_path):
    shards, _ = mixed
    with pytest.raises(ValueError, match="reshard"):
        build_loader(cfg(shards, num_workers=2), processor, rank=0, world_size=8, seed=0)
    with pytest.raises(ValueError, match="matched no file|does not exist"):
        build_loader(cfg(tmp_path / "nothing-*.tar"), processor, rank=0, world_size=1, seed=0)
    with pytest.raises(ValueError, match="no manifest.json"):
        resolve_shards([str(tmp_path)])
    with pytest.raises(ValueError, match="unknown key"):
        build_loader({"shards": [str(shards)], "batchsize": 3}, processor, rank=0, world_size=1, seed=0)
    with pytest.raises(ValueError, match="samples_per_epoch is required"):
        build_loader(cfg(shards, resampled=True), processor, rank=0, world_size=1, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        DataConfig(shards=["x"], batch_size=0)
    assert sum(s.num_samples for s in resolve_shards([str(shards / "shard-{000000..000002}.tar")])) == 12


def test_truncated_shard_counted_against_manifest(processor, mixed, tmp_path):
    import shutil

    shards, _ = mixed
    shutil.copy(shards / "shard-000000.tar", tmp_path / "shard-000000.tar")
    man = json.loads((shards / "manifest.json").read_text())
    man["shards"] = man["shards"][:1]
    (tmp_path / "manifest.json").write_text(json.dumps(man))
    with tarfile.open(tmp_path / "shard-000000.tar") as t:
        cut = [m for m in t][4].offset  # header of the third sample: a clean block-boundary cut
    data = (tmp_path / "shard-000000.tar").read_bytes()
    (tmp_path / "shard-000000.tar").write_bytes(data[:cut])
    loader = build_loader(cfg(tmp_path, batch_size=2, samples_per_epoch=2), processor, rank=0, world_size=1, seed=0)
    assert len(list(loader)) == 1
    assert loader.stats.as_dict() == {"shard_short": 2}


def test_list_content_templates_and_unusable_templates(processor):
    import copy

    from distill.data import TemplateError

    base = SampleEncoder(processor, max_length=512)
    msgs = [{"role": "user", "content": "<image>\nWhat shape?"}, {"role": "assistant", "content": "A star."}]
    img = Image.new("RGB", (20, 20), (0, 200, 0))
    ref = base.encode_messages(msgs, img)
    # A llava-hf style template that only understands list content ({"type": "image"} items).
    listy = copy.deepcopy(processor)
    listy.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}{% for it in m['content'] %}"
        "{% if it['type'] == 'image' %}{{ '<image>' }}{% elif it['type'] == 'text' %}{{ it['text'] }}{% endif %}"
        "{% endfor %}{{ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    enc = SampleEncoder(listy, max_length=512)
    assert enc._list_content
    conv = [{"from": "human", "value": "<image>\nWhat shape?"}, {"from": "gpt", "value": "A star."}]
    got = enc.encode_messages(enc._messages(conv), img)
    assert torch.equal(got.input_ids, ref.input_ids) and torch.equal(got.labels, ref.labels)
    # A template whose prefixes are not prefixes of the full rendering cannot be masked: clear error.
    rev = copy.deepcopy(processor)
    rev.chat_template = "{% for m in messages|reverse %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(TemplateError, match="prefix-stable"):
        SampleEncoder(rev, max_length=512)


def test_llava_batches_carry_no_family_keys(processor, mixed):
    """A LLaVA processor is no family (distill.data.families): fixed-count path, no model_inputs key."""
    shards, _ = mixed
    loader = build_loader(cfg(shards, samples_per_epoch=4), processor, rank=0, world_size=1, seed=0)
    assert loader.encoder.family is None and loader.encoder.model_inputs == ("pixel_values",)
    batch = next(iter(loader))
    assert set(batch) == {"input_ids", "attention_mask", "labels", "pixel_values", "has_image", "vis_pos",
                          "num_targets", "vis_key_len"}
