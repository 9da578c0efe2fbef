"""``python -m data_prep synth``: a deterministic synthetic compositional dataset.

Every scene holds 2-3 shapes (circle, square, triangle, star) with distinct colours (red, green,
blue, yellow, purple, orange) and distinct shapes, in distinct cells of a 3x3 grid, rendered with
PIL at ``size`` px (default 96; the model's processor resizes). Scene ``i`` of split ``s`` depends
only on ``(seed, s, i)``, so a larger ``--num`` extends a smaller one and reruns are byte-identical.

``sizes`` (``--sizes 56,84,112``) renders each image at a side drawn from the list instead, from its
own seeded stream ``(seed, s, i)`` (the scene and its text are those of the same scene at one
``--size``), so processors whose visual-token count follows the image size (Qwen2.5-VL, OneVision,
InternVL) see different counts inside a batch. ``OUT/<split>/render.json`` records the sizes; a
rerun with other sizes re-renders and re-shards that split.

Splits (each ``OUT/<split>/{data.json, images/, shards/}``; shards via ``prepare_llava``):

- ``caption``: one-turn "describe" prompt -> caption naming every shape and one spatial relation
  (two with 3 shapes); half open with a listing of the shapes.
- ``instruct``: Q/A about colour, shape, counts, presence and spatial relations; ~30% multi-turn
  (2-3 Q/A pairs); ~5% text-only records (no image) with general shape/colour questions.
- ``compositional``: test set in SugarCrepe style; see ``data_prep/FORMAT.md`` for the record layout.

``cell_words`` (``--cell-words``) also names each shape's grid cell: the caption listing says "a red
circle in the top left", and ``instruct`` gains "Where is the red circle?" questions. Absolute cells
are a one-hop read of the image, relations a comparison of two cells; the compositional split is
the same either way.

``all_relations`` (``--all-relations``) makes each caption state one true relation for every ordered
pair of shapes, a sentence each ("A red circle above a blue square. A blue square below a red
circle. ..."), instead of one or two: several times the relation words per caption. The compositional
split is the same either way.

``choice_questions`` (``--choice-questions``) adds two-option questions to ``instruct``: "Which caption
describes the image? A. ... B. ... Answer with the letter." -> "A" or "B", a true caption about two of the
scene's shapes against one hard negative of a random category (built as the compositional split's
are, from the training scene), the true one first or second at random. It is the question form of
``distill.eval compositional --protocol ab``: without some such data a model has never seen an A/B
question and answers one letter whatever the captions. The compositional split is the same either way.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass

from .shards import PrepResult, prepare_llava

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 30),
    "purple": (140, 50, 175),
    "orange": (245, 135, 25),
}
SHAPES = ("circle", "square", "triangle", "star")
# relation -> predicate on ((row_a, col_a), (row_b, col_b)); all strict, so r(a,b) excludes r(b,a)
RELATIONS = {
    "to the left of": lambda a, b: a[1] < b[1],
    "to the right of": lambda a, b: a[1] > b[1],
    "above": lambda a, b: a[0] < b[0],
    "below": lambda a, b: a[0] > b[0],
}
ROW_WORDS = ("top", "middle", "bottom")
COL_WORDS = ("left", "middle", "right")
NEGATIVE_CATEGORIES = ("swap_att", "swap_obj", "replace_rel", "replace_att")
SPLITS = ("caption", "instruct", "compositional")
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
CAPTION_PROMPTS = (
    "Describe the image briefly.",
    "What is shown in this picture?",
    "Give a short caption for the image.",
    "Summarize the scene.",
)


@dataclass(frozen=True)
class Obj:
    color: str
    shape: str
    cell: tuple[int, int]  # (row, col) in the 3x3 grid

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def where(self) -> str:
        """The grid cell in words: "in the top left", "in the center", "in the bottom middle"..."""
        if self.cell == (1, 1):
            return "in the center"
        return f"in the {ROW_WORDS[self.cell[0]]} {COL_WORDS[self.cell[1]]}"


def make_scene(rng: random.Random) -> list[Obj]:
    n = rng.choice((2, 3))
    colors = rng.sample(sorted(COLORS), n)
    shapes = rng.sample(SHAPES, n)
    cells = rng.sample([(r, c) for r in range(3) for c in range(3)], n)
    return [Obj(colors[i], shapes[i], cells[i]) for i in range(n)]


def true_relations(a: Obj, b: Obj) -> list[str]:
    return [r for r, fn in RELATIONS.items() if fn(a.cell, b.cell)]


def render(scene: list[Obj], size: int, rng: random.Random):
    """Render at 2x and downsample (anti-aliased edges). Returns a PIL RGB image ``size x size``."""
    from PIL import Image, ImageDraw

    import math

    s = 2 * size
    shade = rng.randint(225, 250)
    img = Image.new("RGB", (s, s), (shade, shade, shade))
    draw = ImageDraw.Draw(img)
    cell = s / 3
    for o in scene:
        cx = (o.cell[1] + 0.5 + rng.uniform(-0.08, 0.08)) * cell
        cy = (o.cell[0] + 0.5 + rng.uniform(-0.08, 0.08)) * cell
        r = cell * rng.uniform(0.28, 0.36)
        fill = COLORS[o.color]
        if o.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif o.shape == "square":
            h = r * 0.85
            draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
        elif o.shape == "triangle":
            draw.polygon([(cx, cy - r), (cx - r * 0.95, cy + r * 0.75), (cx + r * 0.95, cy + r * 0.75)], fill=fill)
        else:  # star: 5 points, inner radius 0.45 r
            pts = []
            for k in range(10):
                rad = r if k % 2 == 0 else 0.45 * r
                ang = -math.pi / 2 + k * math.pi / 5
                pts.append((cx + rad * math.cos(ang), cy + rad * math.sin(ang)))
            draw.polygon(pts, fill=fill)
    return img.resize((size, size), Image.LANCZOS)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _phrase(color: str, shape: str, rel: str, color2: str, shape2: str) -> str:
    first = f"{_article(color)} {color} {shape}"
    return f"{first[0].upper()}{first[1:]} {rel} {_article(color2)} {color2} {shape2}."


def caption_for(scene: list[Obj], rng: random.Random, cell_words: bool = False, all_relations: bool = False) -> str:
    a, b = scene[0], scene[1]
    rel = rng.choice(true_relations(a, b))
    text = _phrase(a.color, a.shape, rel, b.color, b.shape)
    if all_relations:  # one sentence per pair of shapes, each pair in both orders
        pairs = [(x, y) for x in scene for y in scene if x is not y and (x, y) != (a, b)]
        rng.shuffle(pairs)
        text = " ".join([text] + [_phrase(x.color, x.shape, rng.choice(true_relations(x, y)), y.color, y.shape)
                                  for x, y in pairs])
    elif len(scene) == 3:
        c = scene[2]
        rel2 = rng.choice(true_relations(c, b))
        text = text[:-1] + f", and {_article(c.color)} {c.name} {rel2} the {b.name}."
    if rng.random() < 0.5:
        names = [f"{_article(o.color)} {o.name}" + (f" {o.where}" if cell_words else "") for o in scene]
        listing = ", ".join(names[:-1]) + f" and {names[-1]}"
        text = f"There are {NUMBER_WORDS[len(scene)]} shapes: {listing}. " + text
    return text


CHOICE_PROMPT = "Which caption describes the image?\nA. {A}\nB. {B}\nAnswer with the letter."
"""``--choice-questions``' question: the two-option form ``distill.eval``'s A/B protocol asks."""


def hard_negatives(scene: list[Obj], rng: random.Random) -> tuple[str, list[dict]]:
    """A positive caption about two of ``scene``'s shapes and one hard negative per category
    (``{"caption", "category"}``), in :data:`NEGATIVE_CATEGORIES`' SugarCrepe sense."""
    a, b = rng.sample(scene, 2)
    rel = rng.choice(true_relations(a, b))
    positive = _phrase(a.color, a.shape, rel, b.color, b.shape)
    false_rel = rng.choice([r for r in RELATIONS if r not in true_relations(a, b)])
    other_color = rng.choice([c for c in sorted(COLORS) if c not in {o.color for o in scene}])
    return positive, [
        {"caption": _phrase(b.color, a.shape, rel, a.color, b.shape), "category": "swap_att"},
        {"caption": _phrase(b.color, b.shape, rel, a.color, a.shape), "category": "swap_obj"},
        {"caption": _phrase(a.color, a.shape, false_rel, b.color, b.shape), "category": "replace_rel"},
        {"caption": _phrase(other_color, a.shape, rel, b.color, b.shape), "category": "replace_att"},
    ]


def _qa(scene: list[Obj], rng: random.Random, cell_words: bool = False,
        choice_questions: bool = False) -> tuple[str, str]:
    kind = rng.choice(("color", "shape", "count", "exists") + (("where",) if cell_words else ()) + ("spatial", "spatial")
                      + (("choice", "choice") if choice_questions else ()))
    if kind == "choice":  # the true caption against one hard negative, in a random order
        positive, negatives = hard_negatives(scene, rng)
        negative = rng.choice(negatives)["caption"]
        if rng.random() < 0.5:
            return CHOICE_PROMPT.format(A=positive, B=negative), "A"
        return CHOICE_PROMPT.format(A=negative, B=positive), "B"
    o = rng.choice(scene)
    if kind == "where":
        return f"Where is the {o.name}?", f"The {o.name} is {o.where}."
    if kind == "color":
        return f"What color is the {o.shape}?", f"The {o.shape} is {o.color}."
    if kind == "shape":
        return f"What shape is the {o.color} object?", f"It is {_article(o.shape)} {o.shape}."
    if kind == "count":
        n = len(scene)
        return "How many shapes are in the image?", f"There are {NUMBER_WORDS[n]} shapes."
    if kind == "exists":
        if rng.random() < 0.5:
            return f"Is there {_article(o.color)} {o.name} in the image?", "Yes."
        color = rng.choice([c for c in sorted(COLORS) if c not in {x.color for x in scene}])
        return f"Is there {_article(color)} {color} {o.shape} in the image?", "No."
    a, b = rng.sample(scene, 2)
    true = true_relations(a, b)
    if rng.random() < 0.5:
        return f"Is the {a.name} {rng.choice(true)} the {b.name}?", "Yes."
    false = [r for r in RELATIONS if r not in true]
    return f"Is the {a.name} {rng.choice(false)} the {b.name}?", "No."


TEXT_ONLY_QA = (
    ("How many sides does a triangle have?", "A triangle has three sides."),
    ("How many corners does a square have?", "A square has four corners."),
    ("What color do you get by mixing blue and yellow paint?", "Mixing blue and yellow gives green."),
    ("What color do you get by mixing red and yellow paint?", "Mixing red and yellow gives orange."),
    ("Does a circle have any corners?", "No, a circle has no corners."),
    ("What color do you get by mixing red and blue paint?", "Mixing red and blue gives purple."),
)


def image_size_for(split: str, i: int, seed: int, size: int, sizes=None) -> int:
    """Side of image ``i`` of ``split``: ``size``, or a seeded draw from ``sizes`` (its own stream, so the
    scene's random draws are the same with or without ``sizes``)."""
    if not sizes:
        return size
    return random.Random(f"{seed}/{split}/{i}/size").choice(list(sizes))


def _record(split: str, i: int, seed: int, size: int, images_dir: str, sizes=None, cell_words: bool = False,
            all_relations: bool = False, choice_questions: bool = False) -> dict:
    rng = random.Random(f"{seed}/{split}/{i}")
    rid = f"synth-{split}-{i:07d}"
    if split == "instruct" and rng.random() < 0.05:
        q, a = rng.choice(TEXT_ONLY_QA)
        return {"id": rid, "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
    scene = make_scene(rng)
    image = f"{i:07d}.png"
    path = os.path.join(images_dir, image)
    render(scene, image_size_for(split, i, seed, size, sizes), rng).save(path, format="PNG")  # always: a rerun with another seed/size must not keep stale images
    rec = {"id": rid, "image": image}
    if split == "caption":
        rec["conversations"] = [
            {"from": "human", "value": f"<image>\n{rng.choice(CAPTION_PROMPTS)}"},
            {"from": "gpt", "value": caption_for(scene, rng, cell_words, all_relations)},
        ]
    elif split == "instruct":
        turns = 1 if rng.random() < 0.7 else rng.choice((2, 3))
        conv = []
        for t in range(turns):
            q, a = _qa(scene, rng, cell_words, choice_questions)
            if t == 0:
                q = f"<image>\n{q}" if rng.random() < 0.8 else f"{q}\n<image>"
            conv += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        rec["conversations"] = conv
    else:
        positive, negatives = hard_negatives(scene, rng)
        rec["positive"], rec["negatives"] = positive, negatives  # this key order: data.json stays byte-identical
        rec["scene"] = [{"color": o.color, "shape": o.shape, "row": o.cell[0], "col": o.cell[1]} for o in scene]
        rec["conversations"] = [
            {"from": "human", "value": f"<image>\n{CAPTION_PROMPTS[0]}"},
            {"from": "gpt", "value": positive},
        ]
    return rec


def write_split_json(out_dir: str, split: str, num: int, seed: int, size: int, sizes=None,
                     cell_words: bool = False, all_relations: bool = False, choice_questions: bool = False) -> str:
    """Render ``num`` scenes of ``split`` into ``out_dir/<split>/{images/, data.json}``; return the JSON path.

    ``data.json`` is rewritten only when its content changes (so a rerun can resume sharding).
    """
    return _write_split_json(out_dir, split, num, seed, size, sizes, cell_words, all_relations, choice_questions)[0]


RENDER_FILE = "render.json"


def _render_text(size: int, sizes=None) -> str:
    return json.dumps({"sizes": list(sizes)} if sizes else {"size": size}) + "\n"


def _write_split_json(out_dir: str, split: str, num: int, seed: int, size: int, sizes=None,
                      cell_words: bool = False, all_relations: bool = False,
                      choice_questions: bool = False) -> tuple[str, bool]:
    """Also says whether anything the shards hold changed: the records, or the rendering sizes (the images
    change, data.json does not) against ``<split>/render.json``, which the caller rewrites once any stale
    shards are gone (:func:`_write_render`)."""
    split_dir = os.path.join(out_dir, split)
    images_dir = os.path.join(split_dir, "images")
    os.makedirs(images_dir, exist_ok=True)
    records = [_record(split, i, seed, size, images_dir, sizes, cell_words, all_relations, choice_questions)
               for i in range(num)]
    text = json.dumps(records, indent=1) + "\n"
    path = os.path.join(split_dir, "data.json")
    render_path = os.path.join(split_dir, RENDER_FILE)
    same_render = False
    if os.path.exists(render_path):
        with open(render_path, encoding="utf-8") as f:
            same_render = f.read() == _render_text(size, sizes)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            if f.read() == text:
                return path, not same_render
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
    return path, True


def _write_render(out_dir: str, split: str, size: int, sizes=None) -> None:
    path = os.path.join(out_dir, split, RENDER_FILE)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(_render_text(size, sizes))
    os.replace(path + ".tmp", path)


def make_synthetic(out_dir: str, num: int, seed: int = 0, num_test: int | None = None, size: int = 96,
                   shard_size: int = 1000, workers: int = 1, progress: bool = True,
                   sizes=None, cell_words: bool = False, all_relations: bool = False,
                   choice_questions: bool = False) -> dict[str, PrepResult]:
    """Write all three splits and shard them. Returns ``{split: PrepResult}``.

    ``sizes``: render each image at a side drawn (seeded, per image) from this list instead of ``size``.
    ``cell_words``: name each shape's grid cell in the captions' listing and in "Where is" Q/A.
    ``all_relations``: captions state a relation for every ordered pair of shapes.
    ``choice_questions``: ``instruct`` gains two-option caption questions (:data:`CHOICE_PROMPT`)."""
    from .shards import PrepError, state_changes

    if num < 1:
        raise PrepError(f"--num must be >= 1, got {num}")
    if size < 24:
        raise PrepError(f"--size must be >= 24 pixels, got {size}")
    if sizes is not None:
        sizes = [int(s) for s in sizes]
        if not sizes:
            raise PrepError("--sizes must name at least one size")
        if min(sizes) < 24:
            raise PrepError(f"--sizes must all be >= 24 pixels, got {','.join(map(str, sizes))}")
    counts = {"caption": num, "instruct": num, "compositional": num_test if num_test is not None else max(1, num // 4)}
    results = {}
    for split in SPLITS:
        path, changed = _write_split_json(out_dir, split, counts[split], seed, size, sizes, cell_words, all_relations,
                                          choice_questions)
        shards = os.path.join(out_dir, split, "shards")
        images = os.path.join(out_dir, split, "images")
        if os.path.isdir(shards) and (changed or state_changes(shards, path, images, shard_size)):
            shutil.rmtree(shards)  # other seed/num/size/rules: old shards are stale (synth owns the folder)
        _write_render(out_dir, split, size, sizes)
        results[split] = prepare_llava(path, os.path.join(out_dir, split, "images"), os.path.join(out_dir, split, "shards"),
                                       shard_size=shard_size, workers=workers, progress=progress)
    return results
