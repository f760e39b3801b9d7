"""The shapes world's questions and answers: captions, POPE questions, ScienceQA-style problems, label questions,
and the vocabulary all of them (with the LLaVA-1.5 prompts) are spelled with."""

from __future__ import annotations

import random
import string
from collections import Counter
from collections.abc import Sequence
from typing import Any

from flowkern.shapes.world import ALL_CLASSES, COLORS, LABEL_CHARS, NUMBER_WORDS, SHAPES, SYSTEM_PROMPT, Scene

__all__ = ["caption_text", "reference_captions", "near_misses", "pope_questions", "pope_question_text",
           "RELATIONS", "PEOPLE", "SQA_KINDS", "sqa_problem", "textvqa_question", "vocabulary"]


def _plural(shape: str) -> str:
    return shape + "s"


def caption_text(scene: Scene) -> str:
    """The canonical caption (what the demo model is trained to say), objects left to right:
    ``"There are two shapes : a red circle and a blue star ."``."""
    names = [f"a {n}" for n in scene.names]
    listed = names[0] if len(names) == 1 else " , ".join(names[:-1]) + " and " + names[-1]
    n = len(names)
    head = "There is one shape" if n == 1 else f"There are {NUMBER_WORDS[n]} shapes"
    label = f" . There is a label that says {scene.label.text}" if scene.label is not None else ""
    return f"{head} : {listed}{label} ."


def reference_captions(scene: Scene, rng: random.Random) -> list[str]:
    """Five human-style reference captions naming every object (COCO-like ``captions`` annotations)."""
    names = scene.names
    order = names[:]
    out = [caption_text(scene).replace(" ,", ",").replace(" .", ".").replace(" :", ":")]
    for _ in range(4):
        rng.shuffle(order)
        listed = ", ".join(f"a {n}" for n in order[:-1]) + (" and " if len(order) > 1 else "") + f"a {order[-1]}"
        form = rng.choice(["A picture of {x}.", "{X} on a {bg} background.", "An image showing {x}.",
                           "Some simple shapes: {x}."])
        out.append(form.format(x=listed, X=listed[0].upper() + listed[1:], bg=scene.background))
    return out


def near_misses(scene: Scene, *, colour: bool = True, shape: bool = True) -> list[str]:
    """The absent colour-shape pairs (in :data:`ALL_CLASSES` order) that share the colour (``colour``) or the shape
    (``shape``) of an object of ``scene``: POPE's adversarial negatives."""
    present = set(scene.names)
    return [c for c in ALL_CLASSES if c not in present
            and any((shape and c.split()[1] == o.shape) or (colour and c.split()[0] == o.color)
                    for o in scene.objects)]


def pope_questions(scene: Scene, rng: random.Random, counts: Counter) -> dict[str, list[tuple[str, str]]]:
    """Per POPE split, ``[(object, label), ...]``: one present object (yes) and one absent one (no).

    ``counts``: how often each class occurs in the set (the *popular* sampler's ranking).
    """
    present = set(scene.names)
    absent = [c for c in ALL_CLASSES if c not in present]
    pos = rng.choice(scene.names)
    near = near_misses(scene)
    ranked = sorted(absent, key=lambda c: (-counts.get(c, 0), ALL_CLASSES.index(c)))
    top = ranked[:3]
    return {
        "random": [(pos, "yes"), (rng.choice(absent), "no")],
        "popular": [(rng.choice(scene.names), "yes"), (rng.choice(top), "no")],
        "adversarial": [(rng.choice(scene.names), "yes"), (rng.choice(near or absent), "no")],
    }


def pope_question_text(obj: str) -> str:
    """``"Is there a red circle in the image?"``."""
    return f"Is there a {obj} in the image?"


RELATION_MARGIN = 0.12
"""Centre distance (fraction of the canvas) that makes "left of" unambiguous."""

RELATIONS = {
    "left": ("to the left of", lambda a, b: b.x - a.x > RELATION_MARGIN),
    "right": ("to the right of", lambda a, b: a.x - b.x > RELATION_MARGIN),
    "above": ("above", lambda a, b: b.y - a.y > RELATION_MARGIN),
    "below": ("below", lambda a, b: a.y - b.y > RELATION_MARGIN),
}
"""The relations of :func:`sqa_problem`: key -> (phrase, ``ok(a, b)``: ``a`` stands so to ``b``)."""

PEOPLE = ("Anna", "Ben", "Chen", "Dara")
"""Who draws the objects of a "whose shape" problem."""

SQA_KINDS = ("relation", "count", "color", "names")
"""The kinds of problem :func:`sqa_problem` asks (a relation becomes ``context-relation`` when it has a context)."""


def _options(correct: str, pool: Sequence[str], rng: random.Random, k: int) -> tuple[list[str], int]:
    wrong = [p for p in dict.fromkeys(pool) if p != correct]
    rng.shuffle(wrong)
    choices = [correct, *wrong[:k - 1]]
    rng.shuffle(choices)
    return choices, choices.index(correct)


def sqa_problem(scene: Scene, rng: random.Random, *, kind: str | None = None) -> dict[str, Any]:
    """One ScienceQA-style problem about the scene: ``question``, ``choices``, ``answer`` (index), ``hint``,
    ``kind`` (relation / count / colour / names / context-count), ``solution``, ``focus`` (the names of the
    objects the answer is about: a training aid, not written to the files).

    ``kind``: ask this kind (``relation``, ``count``, ``color`` or ``names``) when the scene allows it, else one
    drawn as usual (training uses it to ask more of a kind; the files never do).

    Relations need a centre distance above a margin, so the right option is unambiguous; wrong options are
    objects of the image that do not satisfy the relation (or absent colour-shape pairs when there are too few).
    """
    objs = list(scene.objects)
    absent = [c for c in ALL_CLASSES if c not in scene.names]
    shape_counts = Counter(o.shape for o in objs)
    unique = [o for o in objs if shape_counts[o.shape] == 1]
    kinds = ["count", "color"] if unique else ["count"]
    pairs = [(rel, a, b) for rel, (_, ok) in RELATIONS.items() for a in objs for b in objs
             if a is not b and ok(a, b)]
    if pairs:
        kinds += ["relation", "relation", "relation"]
    named = [(a, b) for a in objs for b in objs if a is not b and abs(a.x - b.x) > RELATION_MARGIN]
    if named:
        kinds.append("names")
    kind = kind if kind in kinds else rng.choice(kinds)
    hint = ""
    if kind == "relation":
        rel, a, b = rng.choice(pairs)
        phrase, ok = RELATIONS[rel]
        question = f"Which shape is {phrase} the {b.name}?"
        others = [o.name for o in objs if o is not b and not ok(o, b)]
        pool = others + rng.sample(absent, 3)
        choices, answer = _options(a.name, pool, rng, rng.randint(2, 4))
        solution = f"The {a.name} is {phrase} the {b.name}."
        focus = [a.name, b.name]
        if rng.random() < 0.3:
            hint = f"There {'is' if len(objs) == 1 else 'are'} {NUMBER_WORDS[len(objs)]} " \
                   f"shape{'s' if len(objs) > 1 else ''} in the picture."
            kind = "context-relation"
    elif kind == "count":
        if rng.random() < 0.5:
            shape = rng.choice(SHAPES)
            n = sum(o.shape == shape for o in objs)
            question = f"How many {_plural(shape)} are there?"
            focus = [o.name for o in objs if o.shape == shape]
        else:
            n = len(objs)
            question = "How many shapes are there?"
            focus = [o.name for o in objs]
        choices, answer = _options(str(n), [str(k) for k in range(5)], rng, rng.randint(2, 4))
        solution = f"Count them: {n}."
    elif kind == "color":
        o = rng.choice(unique)
        question = f"What colour is the {o.shape}?"
        choices, answer = _options(o.color, list(COLORS), rng, rng.randint(2, 4))
        solution = f"The {o.shape} is {o.color}."
        focus = [o.name]
    else:  # names: the answer needs the context and the image
        a, b = rng.choice(named)
        n1, n2 = rng.sample(PEOPLE, 2)
        hint = f"{n1} drew the {a.name}. {n2} drew the {b.name}."
        side = rng.choice(["left", "right"])
        question = f"Whose shape is further to the {side}?"
        correct = n1 if (a.x < b.x) == (side == "left") else n2
        choices, answer = _options(correct, [n1, n2], rng, 2)
        solution = f"{correct} drew the shape further to the {side}."
        focus = [a.name, b.name]
    return {"question": question, "choices": choices, "answer": answer, "hint": hint, "kind": kind,
            "solution": solution, "focus": focus}


_TEXT_QUESTIONS = ("What is written in the image?", "What does the label say?", "What is written on the label?",
                   "Which characters are on the label?")


def textvqa_question(scene: Scene, rng: random.Random) -> tuple[str, list[str]]:
    """A question about the label and its ten reference answers (the label, some written in lower case)."""
    if scene.label is None:
        raise ValueError("textvqa_question: the scene has no label")
    text = scene.label.text
    answers = [text if rng.random() < 0.8 else text.lower() for _ in range(10)]
    return rng.choice(_TEXT_QUESTIONS), answers




def vocabulary() -> list[str]:
    """Every whitespace word of the shapes prompts and answers (LLaVA-1.5 prompt suffixes and system prompt
    included), sorted: the demo model's word-level vocabulary. Label characters come twice: ``"K"`` and the
    continuation piece ``"##K"`` (two-character labels are two tokens that decode without a space)."""
    from flowkern.eval.tasks import chair, pope, sqa, textvqa

    texts = [SYSTEM_PROMPT, pope.PROMPT_SUFFIX, sqa.PROMPT_SUFFIX, textvqa.PROMPT_SUFFIX, textvqa.OCR_PREFIX,
             chair.PROMPT, "USER : ASSISTANT : Yes No Context: There is are one shape shapes : a and , . label",
             "that says", *_TEXT_QUESTIONS, *(f"{c}." for c in string.ascii_uppercase[:5])]
    for name in ALL_CLASSES:
        texts.append(pope_question_text(name))
    for rel, (phrase, _) in RELATIONS.items():
        texts.append(f"Which shape is {phrase} the {rel}?")
    for s in SHAPES:
        texts += [f"How many {_plural(s)} are there?", f"What colour is the {s}?", f"the {s}? {s}s {s}"]
    texts += ["How many shapes are there?", "Whose shape is further to the left? right?",
              *(f"{n} drew the {s}." for n in PEOPLE for s in SHAPES), *NUMBER_WORDS, *COLORS,
              "in the picture.", "shape shapes"]
    words = {w for t in texts for w in t.split()}
    words |= set(LABEL_CHARS) | {f"##{c}" for c in LABEL_CHARS} | set("01234")
    return sorted(words)
