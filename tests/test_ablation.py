"""Ablation aggregation (distill/eval/ablation.py): layout, schema, mean / sample std, errors, markdown."""

import json
import math

import pytest

from distill.eval.ablation import ablation_markdown, collect_ablation, main, write_ablation
from distill.eval.common import write_results

CATS = ("replace_att", "replace_rel", "swap_att", "swap_obj")
PER_SEED_KEYS = {"seed", "per_category", "overall", "ab", "vqa", "attn_similarity"}


def _entry(acc: float, total: int = 10) -> dict:
    """An accuracy entry as `compositional_accuracy` / `ab_accuracy` / `vqa_accuracy` write it."""
    return {"hits": acc * total, "total": total, "accuracy": acc}


def _write_eval(folder, lik, cats, ab, vqa, sim=None):
    """Write the eval JSONs the way the eval CLIs do (``write_results``, the CLIs' top-level keys)."""
    write_results(folder, "compositional", {
        "task": "compositional", "protocol": "likelihood", "prompt": "Describe the image.", "evaluated": 10,
        "skipped_missing_images": 0, "overall": _entry(lik),
        "per_category": {c: _entry(a) for c, a in zip(CATS, cats)}}, "table")
    write_results(folder, "compositional_ab", {
        "task": "compositional", "protocol": "ab", "prompt": "{A} {B}", "evaluated": 10, "skipped_missing_images": 0,
        "overall": _entry(ab), "per_category": {c: _entry(ab) for c in CATS}}, "table")
    write_results(folder, "vqa", {"task": "vqa", "overall": _entry(vqa), "per_category": {}}, "table")
    if sim is not None:
        write_results(folder, "attn_similarity", {
            "task": "attn_similarity", "student_layers": [1], "teacher_windows": [[1, 2]], "per_layer": [sim],
            "mean": sim, "images": 3, "kind": "filtered_cosine"}, "table")


def _shape(x):
    """Nested key structure of a JSON value (leaves: their type class)."""
    if isinstance(x, dict):
        return {k: _shape(v) for k, v in x.items()}
    return "num" if isinstance(x, (int, float)) and not isinstance(x, bool) else type(x).__name__


@pytest.fixture
def ablation_root(tmp_path):
    root = tmp_path / "abl"
    _write_eval(root / "teacher" / "eval", 0.9, (0.8, 0.7, 0.6, 0.5), 0.75, 0.4)
    for i, seed in enumerate((0, 1, 2)):
        base = 0.1 * (i + 1)  # 10, 20, 30 %
        for j, v in enumerate(("sft", "kd", "kd_attn")):
            _write_eval(root / f"seed{seed}" / v / "eval", base + 0.01 * j, (base, base, base, 0.5), base / 2,
                        0.2, sim=0.5 + 0.1 * i)
    return root


def test_schema_means_and_sample_std(ablation_root):
    res = collect_ablation(ablation_root, [0, 1, 2], ["sft", "kd", "kd_attn"])
    write_ablation(ablation_root, res)
    saved = json.loads((ablation_root / "ablation.json").read_text())
    assert saved == res
    assert set(saved) == {"seeds", "teacher", "variants"} and saved["seeds"] == [0, 1, 2]
    assert set(saved["teacher"]) == {"per_category", "overall", "ab", "vqa"}
    assert set(saved["teacher"]["ab"]) == {"per_category", "overall"}
    assert saved["teacher"]["overall"] == 90.0 and saved["teacher"]["vqa"] == 40.0
    assert saved["teacher"]["per_category"] == {"replace_att": 80.0, "replace_rel": 70.0, "swap_att": 60.0,
                                                "swap_obj": 50.0}
    assert list(saved["variants"]) == ["sft", "kd", "kd_attn"]
    for name, v in saved["variants"].items():
        assert set(v) == {"per_seed", "mean", "std"}
        assert [p["seed"] for p in v["per_seed"]] == [0, 1, 2]
        for p in v["per_seed"]:
            assert set(p) == PER_SEED_KEYS and set(p["ab"]) == {"per_category", "overall"}
            assert set(p["per_category"]) == set(CATS)
        for agg in (v["mean"], v["std"]):
            assert set(agg) == PER_SEED_KEYS - {"seed"} and set(agg["ab"]) == {"per_category", "overall"}
            assert set(agg["per_category"]) == set(CATS) and set(agg["ab"]["per_category"]) == set(CATS)
    sft = saved["variants"]["sft"]
    # values 10, 20, 30 -> mean 20, sample std 10
    assert sft["mean"]["overall"] == pytest.approx(20.0) and sft["std"]["overall"] == pytest.approx(10.0)
    assert sft["mean"]["per_category"]["swap_att"] == pytest.approx(20.0)
    assert sft["std"]["per_category"]["swap_att"] == pytest.approx(10.0)
    assert sft["mean"]["per_category"]["swap_obj"] == 50.0 and sft["std"]["per_category"]["swap_obj"] == 0.0
    assert sft["mean"]["ab"]["overall"] == pytest.approx(10.0) and sft["std"]["ab"]["overall"] == pytest.approx(5.0)
    assert sft["mean"]["vqa"] == pytest.approx(20.0) and sft["std"]["vqa"] == 0.0
    assert sft["mean"]["attn_similarity"] == pytest.approx(0.6) and sft["std"]["attn_similarity"] == pytest.approx(0.1)
    assert saved["variants"]["kd_attn"]["mean"]["overall"] == pytest.approx(22.0)
    assert [p["overall"] for p in sft["per_seed"]] == pytest.approx([10.0, 20.0, 30.0])


def test_one_seed_std_is_zero(ablation_root):
    res = collect_ablation(ablation_root, [1], ["kd"])
    kd = res["variants"]["kd"]
    assert list(res["variants"]) == ["kd"] and len(kd["per_seed"]) == 1
    assert kd["mean"]["overall"] == pytest.approx(21.0)

    def leaves(d):
        for v in d.values():
            yield from leaves(v) if isinstance(v, dict) else [v]

    assert all(x == 0.0 for x in leaves(kd["std"]))
    assert "std (0.00: one seed) over 1 seed" in ablation_markdown(res)


def test_missing_file_names_the_path_and_run(ablation_root):
    gone = ablation_root / "seed1" / "kd_attn" / "eval" / "attn_similarity.json"
    gone.unlink()
    with pytest.raises(FileNotFoundError) as e:
        collect_ablation(ablation_root, [0, 1, 2], ["sft", "kd", "kd_attn"])
    assert str(gone) in str(e.value) and "'kd_attn', seed 1" in str(e.value)
    (ablation_root / "teacher" / "eval" / "vqa.json").unlink()
    with pytest.raises(FileNotFoundError, match="vqa.json.*teacher"):
        collect_ablation(ablation_root, [0], ["sft"])
    with pytest.raises(SystemExit, match="missing"):
        main(["--root", str(ablation_root), "--seeds", "0"])


def test_swapped_protocol_files_are_rejected(ablation_root):
    ev = ablation_root / "seed0" / "sft" / "eval"
    (ev / "compositional.json").write_text((ev / "compositional_ab.json").read_text())
    with pytest.raises(ValueError, match="protocol 'ab', expected 'likelihood'"):
        collect_ablation(ablation_root, [0], ["sft"])


def test_markdown_rows_and_cells(ablation_root, capsys):
    res = main(["--root", str(ablation_root), "--seeds", "0", "1", "2"])
    md = (ablation_root / "ablation.md").read_text()
    assert md == ablation_markdown(res) + "\n" and md.strip() in capsys.readouterr().out
    lines = md.splitlines()
    assert lines[0].startswith("Seeds 0, 1, 2:") and "mean ± sample std (ddof=1) over 3 seeds" in lines[0]
    table = [ln for ln in lines if ln.startswith("|")]
    assert table[0] == ("| model | likelihood overall | replace_att | replace_rel | swap_att | swap_obj | "
                        "A/B overall | VQA | attn similarity |")
    assert [r.split("|")[1].strip() for r in table[2:]] == ["teacher", "sft", "kd", "kd_attn"]
    assert table[2] == "| teacher | 90.00 | 80.00 | 70.00 | 60.00 | 50.00 | 75.00 | 40.00 | — |"
    assert table[3] == ("| sft | 20.00 ± 10.00 | 20.00 ± 10.00 | 20.00 ± 10.00 | 20.00 ± 10.00 | 50.00 ± 0.00 | "
                        "10.00 ± 5.00 | 20.00 ± 0.00 | 0.6000 ± 0.1000 |")


def test_real_eval_clis_feed_the_aggregation(tiny_models, tmp_path):
    """One teacher and one run evaluated by the real CLIs: the files have the fabricated format
    and the aggregation reads their accuracies (x100) and similarity."""
    from data_prep.synth import make_synthetic
    from distill.eval.__main__ import main as eval_main

    synth = tmp_path / "synth"
    make_synthetic(str(synth), num=2, seed=0, num_test=2, progress=False)
    comp, inst = str(synth / "compositional" / "shards"), str(synth / "instruct" / "shards")
    root = tmp_path / "abl"
    for model, folder in ((tiny_models.teacher, root / "teacher" / "eval"),
                          (tiny_models.student, root / "seed0" / "sft" / "eval")):
        common = ["--model", str(model), "--out", str(folder), "--no-progress", "--device", "cpu", "--limit", "2"]
        eval_main(["compositional", "--data", comp] + common)
        eval_main(["compositional", "--data", comp, "--protocol", "ab"] + common)
        eval_main(["vqa", "--data", inst, "--max-new-tokens", "2"] + common)
    eval_main(["attn_similarity", "--teacher", str(tiny_models.teacher), "--student", str(tiny_models.student),
               "--data", comp, "--limit", "1", "--device", "cpu", "--out", str(root / "seed0" / "sft" / "eval"),
               "--no-progress"])
    fake = tmp_path / "fake"
    _write_eval(fake, 0.5, (0.5,) * 4, 0.5, 0.5, sim=0.5)
    real_ev = root / "seed0" / "sft" / "eval"
    for name in ("compositional.json", "compositional_ab.json", "vqa.json", "attn_similarity.json"):
        real, fab = json.loads((real_ev / name).read_text()), json.loads((fake / name).read_text())
        for key in ("overall", "protocol", "mean"):
            assert (key in real) == (key in fab), (name, key)
            if key in real:
                assert _shape(real[key]) == _shape(fab[key]), (name, key)
        for c in real.get("per_category", {}).values():
            assert _shape(c) == _shape(_entry(0.5))
    res = collect_ablation(root, [0], ["sft"])
    run = res["variants"]["sft"]["per_seed"][0]
    lik = json.loads((real_ev / "compositional.json").read_text())
    assert run["overall"] == round(100 * lik["overall"]["accuracy"], 2)
    assert run["per_category"] == {c: round(100 * e["accuracy"], 2) for c, e in lik["per_category"].items()}
    assert run["vqa"] == round(100 * json.loads((real_ev / "vqa.json").read_text())["overall"]["accuracy"], 2)
    sim = json.loads((real_ev / "attn_similarity.json").read_text())["mean"]
    assert math.isclose(run["attn_similarity"], sim, abs_tol=1e-6)
    assert res["variants"]["sft"]["mean"] == {k: v for k, v in run.items() if k != "seed"}
    write_ablation(root, res)
    assert "± 0.00" in (root / "ablation.md").read_text()
