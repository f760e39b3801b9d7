"""The demo model's training data: examples drawn on the fly from a seed, their guide and read-out targets, and the
encoded batches of the training stream.

Example ``i`` of stream ``seed`` comes from ``random.Random(f"train:{seed}:{i}")``: a scene and one of the four task
analogues (POPE yes/no, SQA multiple choice, TextVQA label reading, caption), with the prompts the
:mod:`flowkern.eval` loaders build, so evaluation sees exactly the training format. The prompt goes through the
processor exactly as at inference; the answer ids and ``</s>`` are appended.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from flowkern import shapes as world
from flowkern.eval.tasks import chair, pope, sqa, textvqa
from tools.demo_model.config import (
    COMPARE_GUIDES,
    GUIDES,
    NAMES_GUIDES,
    NAMES_PLACE_LAYER,
    PLACE_LAYER,
    POPE_TRAIN_SPLITS,
    TASK_MIX,
)

__all__ = ["word_spans", "answer_ids", "training_example", "attention_targets", "encode", "patch_batch",
           "TrainingStream"]

_POPE_ANSWER = {"yes": "Yes", "no": "No"}


def word_spans(tokenizer: Any, text: str) -> list[list[int]]:
    """Token ids of each whitespace word of ``text``: a word of the vocabulary is one token; a two-character label
    missing from it is its first character and the ``##`` continuation of the second (decoded without a space).

    Raises:
        ValueError: a word the vocabulary cannot spell.
    """
    vocab = tokenizer.get_vocab()
    spans: list[list[int]] = []
    for word in text.split():
        if word in vocab:
            spans.append([vocab[word]])
        elif len(word) == 2 and word[0] in vocab and f"##{word[1]}" in vocab:
            spans.append([vocab[word[0]], vocab[f"##{word[1]}"]])
        else:
            raise ValueError(f"answer word {word!r} is not in the demo vocabulary")
    return spans


def answer_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of an answer (the words of :func:`word_spans`, concatenated).

    Raises:
        ValueError: a word the vocabulary cannot spell.
    """
    return [i for span in word_spans(tokenizer, text) for i in span]


def _binding_negative(scene: Any, rng: random.Random) -> str:
    """An absent colour-shape pair that shares its colour with a present object (else one sharing a shape): a "No"
    that needs the colour and the shape bound together."""
    return rng.choice(world.near_misses(scene, shape=False) or world.near_misses(scene))


def training_example(seed: int, index: int, mix: dict[str, float] | None = None,
                     boost: tuple[str, float] | None = None) -> dict[str, Any]:
    """Training example ``index`` of stream ``seed``: ``task``, ``scene``, ``image`` (PIL, JPEG round trip for
    TextVQA like its files), ``prompt`` (the loaders' user text), ``answer``, ``focus`` (POPE / SQA: the names
    of the objects the one-word answer is about), ``kind`` (SQA: the problem kind) and ``option`` (SQA: the right
    option's line, ``"B. blue star"``; the text guide's target)."""
    rng = random.Random(f"train:{seed}:{index}")
    focus: list[str] = []
    kind = option = ""
    mix = TASK_MIX if mix is None else mix
    task = rng.choices(list(mix), weights=list(mix.values()))[0]
    scene = world.make_scene(rng, label=True if task == "textvqa" else None, seed=f"train:{seed}:{index}")
    image = world.render(scene)
    if task == "pope":
        split = rng.choice(POPE_TRAIN_SPLITS)
        # training's "popular" negatives: a random ranking per example (any absent pair), drawn from its own rng
        ranking = Counter({c: rng.random() for c in world.ALL_CLASSES})
        questions = world.pope_questions(scene, rng, ranking)
        pairs = ([questions["random"][0], (_binding_negative(scene, rng), "no")] if split == "binding"
                 else questions[split])
        obj, label = rng.choice(pairs)
        prompt, answer = world.pope_question_text(obj) + pope.PROMPT_SUFFIX, _POPE_ANSWER[label]
        focus = [obj] if label == "yes" else []
    elif task == "sqa":
        p = world.sqa_problem(scene, rng, kind=boost[0] if boost is not None and rng.random() < boost[1] else None)
        prompt, answer = sqa.build_prompt(p["question"], p["choices"], p["hint"]), chr(ord("A") + p["answer"])
        focus, kind = p["focus"], p["kind"]
        option = f"{answer}. {p['choices'][p['answer']]}"
    elif task == "textvqa":
        question, _ = world.textvqa_question(scene, rng)
        prompt, answer = textvqa.build_prompt(question), scene.label.text
        image = world.jpeg_roundtrip(image)
    else:
        prompt, answer = chair.PROMPT, world.caption_text(scene)
    return {"task": task, "scene": scene, "image": image, "prompt": prompt, "answer": answer, "focus": focus,
            "kind": kind, "option": option}


def attention_targets(tokenizer: Any, example: dict[str, Any], grid: int) -> list[tuple[int, list[int]]]:
    """Where each answer token should look: ``[(answer token index, image patch indices), ...]`` (patches
    row-major on the ``grid x grid`` image grid; tokens about nothing in the image are left out).

    POPE "Yes" and the SQA letter look at the objects of ``focus``; a TextVQA or caption label character at its
    half of the label; in a caption, an object's colour and shape words at that object and the count word at every
    object.
    """
    scene = example["scene"]
    by_name = {o.name: o for o in scene.objects}
    spans = word_spans(tokenizer, example["answer"])
    starts = [sum(len(sp) for sp in spans[:k]) for k in range(len(spans))]
    out: list[tuple[int, list[int]]] = []

    def objects(names: Sequence[str]) -> list[int]:
        return sorted({c for n in names for c in world.object_patches(by_name[n], grid)})

    def label_word(k: int) -> None:
        for j in range(len(spans[k])):
            out.append((starts[k] + j, world.label_patches(scene.label, grid, j)))

    task = example["task"]
    if task in ("pope", "sqa"):
        if example["focus"]:
            out.append((0, objects(example["focus"])))
    elif task == "textvqa":
        label_word(0)
    else:
        words = example["answer"].split()
        out.append((starts[2], objects(scene.names)))  # "There are <two> shapes" / "There is <one> shape"
        k, obj = 0, 0
        while k < len(words):
            if words[k] == "a" and k + 2 < len(words) and obj < len(scene.objects) and \
                    f"{words[k + 1]} {words[k + 2]}" == scene.objects[obj].name:
                cells = world.object_patches(scene.objects[obj], grid)
                out += [(starts[k + 1], cells), (starts[k + 2], cells)]
                k, obj = k + 3, obj + 1
            elif words[k] == "says" and scene.label is not None and k + 1 < len(words):
                label_word(k + 1)
                k += 2
            else:
                k += 1
    return out


def _mention_targets(tok: Any, example: dict[str, Any], prompt_ids: Sequence[int], image_pos: Sequence[int],
                     grid: int) -> list[tuple[int, list[int]]]:
    """Focus-guide targets for the object mentions of a prompt: ``[(query position, key positions), ...]``.

    Each ``<colour> <shape>`` mention after the image (POPE's question, an SQA question, option or context) looks,
    from its shape word, at that object's image positions when the object is in the image, and at every earlier
    non-image position when it is not: the heads learn to find an object only where both its colour and its shape
    match, so the answer can read "found" or "not found" off the mention."""
    # the word-level vocabulary keeps a word's punctuation ("square?", "triangle.")
    words = [w.rstrip(".?,") for w in tok.convert_ids_to_tokens(list(prompt_ids))]
    by_name = {o.name: o for o in example["scene"].objects}
    image = set(image_pos)
    off = [i for i in range(len(prompt_ids)) if i not in image]
    out: list[tuple[int, list[int]]] = []
    for i in range(image_pos[-1] + 1, len(prompt_ids) - 1):
        if words[i] in world.COLORS and words[i + 1] in world.SHAPES:
            name = f"{words[i]} {words[i + 1]}"
            keys = ([image_pos[c] for c in world.object_patches(by_name[name], grid)] if name in by_name
                    else [j for j in off if j <= i + 1])
            out.append((i + 1, keys))
    return out


def _drawn(tok: Any, prompt_ids: Sequence[int]) -> tuple[list[str], dict[str, tuple[int, str]]]:
    """A prompt's words (punctuation stripped) and its ``<Name> drew the <colour> <shape>.`` sentences: name ->
    (position of the sentence's shape word, ``"<colour> <shape>"``)."""
    words = [w.rstrip(".?,") for w in tok.convert_ids_to_tokens(list(prompt_ids))]
    return words, {words[i]: (i + 4, f"{words[i + 3]} {words[i + 4]}") for i in range(len(words) - 4)
                   if words[i + 1] == "drew" and words[i + 2] == "the" and words[i + 4] in world.SHAPES}


def _names_targets(tok: Any, example: dict[str, Any],
                   prompt_ids: Sequence[int]) -> dict[str, list[tuple[int, list[int]]]]:
    """Guide targets of a "whose shape" SQA problem (``<Name> drew the <colour> <shape>.`` sentences in the context,
    options naming the people): ``owner``: each sentence's shape word at its name; ``pick``: the position that
    predicts the letter at the shape word of the right name's sentence; ``link``: each option's name at the shape
    word of that name's sentence."""
    if example.get("kind") != "names":
        return {}
    words, drawn = _drawn(tok, prompt_ids)
    drew = {name: at for name, (at, _) in drawn.items()}  # name -> its sentence's shape-word position
    out: dict[str, list[tuple[int, list[int]]]] = {"owner": [(at, [at - 4]) for at in drew.values()], "pick": [],
                                                   "link": []}
    right = example["option"].split()[1]
    out["pick"].append((len(prompt_ids) - 1, [drew[right]]))
    last = max(drew.values())
    for j in range(last + 1, len(words) - 1):
        if len(words[j]) == 1 and words[j].isupper() and words[j + 1] in drew:  # "A." "Ben" (the dot stripped)
            out["link"].append((j + 1, [drew[words[j + 1]]]))
    return out


def _option_owners(tok: Any, example: dict[str, Any], prompt_ids: Sequence[int]) -> list[tuple[int, str]]:
    """The options of a "whose shape" SQA problem, each as ``(position of the option's name, the name of the object
    that person drew)`` (``Anna drew the red circle.`` ... ``B. Anna`` -> ``(position of Anna, "red circle")``);
    ``[]`` for any other example."""
    if example.get("kind") != "names":
        return []
    words, drew = _drawn(tok, prompt_ids)
    last = max(at for at, _ in drew.values())
    return [(j + 1, drew[words[j + 1]][1]) for j in range(last + 1, len(words) - 1)
            if len(words[j]) == 1 and words[j].isupper() and words[j + 1] in drew]


def encode(processor: Any, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """A right-padded training batch: ``input_ids`` ``[B, S]``, ``attention_mask`` ``[B, S]``, ``pixel_values``,
    ``labels`` ``[B, S]`` (-100 on the prompt and padding), ``weights`` ``[B]`` (``1 / answer tokens``: every example
    weighs the same, a one-word answer as much as a caption) and
    the attention guide: ``focus_rows`` ``[T, 2]`` (batch row, query position that predicts the answer token) and
    ``focus_keys`` ``[T, S]`` (1.0 on the image positions that token should look at; see
    :func:`attention_targets`).

    The prompt goes through the processor exactly as at inference (chat template with the generation prompt, the
    image placeholder expanded to the image tokens), then the answer ids and ``</s>`` are appended.
    """
    tok = processor.tokenizer
    texts = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ex["prompt"]}]}],
        add_generation_prompt=True, tokenize=False) for ex in examples]
    enc = processor(images=[ex["image"] for ex in examples], text=texts, return_tensors="pt", padding=True)
    rows, labels, weights = [], [], []
    guides: dict[str, list[tuple[int, int, list[int]]]] = {
        name: [] for name in {**GUIDES, **NAMES_GUIDES, **COMPARE_GUIDES}}
    places: list[tuple[int, int, int, int, int]] = []  # (batch row, position, column, row, decoder layer)
    compares: list[tuple[int, int, int]] = []  # (batch row, second option's name position, 1: it is the answer)
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    for k, ex in enumerate(examples):
        prompt_ids = enc["input_ids"][k][enc["attention_mask"][k].bool()].tolist()
        ans = answer_ids(tok, ex["answer"]) + [tok.eos_token_id]
        rows.append(prompt_ids + ans)
        labels.append([-100] * len(prompt_ids) + ans)
        weights.append(1.0 / len(ans))
        if "scene" in ex:
            image_pos = [i for i, t in enumerate(prompt_ids) if t == image_id]
            grid = math.isqrt(len(image_pos))
            guides["focus"] += [(k, len(prompt_ids) - 1 + t, [image_pos[c] for c in cells])
                                for t, cells in attention_targets(tok, ex, grid)]
            mentions = _mention_targets(tok, ex, prompt_ids, image_pos, grid)
            guides["focus"] += [(k, q, keys) for q, keys in mentions]
            places += [(k, q, *_cell(ex["scene"], tok.convert_ids_to_tokens(prompt_ids[q - 1:q + 1]), grid),
                        PLACE_LAYER) for q, keys in mentions if set(keys) <= set(image_pos)]
            owners = _option_owners(tok, ex, prompt_ids)
            places += [(k, q, *_cell(ex["scene"], name.split(), grid), NAMES_PLACE_LAYER) for q, name in owners]
            if len(owners) == 2:  # the second option: is its person's object further to the side asked?
                x = {o.name: o.x for o in ex["scene"].objects}
                (_, first), (q, second) = owners
                further = x[second] < x[first] if "left?" in ex["prompt"] else x[second] > x[first]
                compares.append((k, q, int(further)))
                guides["read"].append((k, len(prompt_ids) - 1, [q]))
            for name, entries in _names_targets(tok, ex, prompt_ids).items():
                guides[name] += [(k, q, keys) for q, keys in entries]
        if ex.get("task") == "sqa" and ex.get("option"):
            option = tok(ex["option"], add_special_tokens=False)["input_ids"]
            at = max(i for i in range(len(prompt_ids) - len(option) + 1)
                     if prompt_ids[i:i + len(option)] == option)
            guides["text"].append((k, len(prompt_ids) - 1, list(range(at, at + len(option)))))
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    label_t = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for k, (r, lab) in enumerate(zip(rows, labels, strict=True)):
        input_ids[k, :len(r)] = torch.tensor(r)
        label_t[k, :len(r)] = torch.tensor(lab)
        mask[k, :len(r)] = 1
    def targets(entries: list[tuple[int, int, list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
        keys = torch.zeros((len(entries), width))
        for n, (_, _, cols) in enumerate(entries):
            keys[n, cols] = 1.0
        return torch.tensor([[k, q] for k, q, _ in entries], dtype=torch.long).reshape(-1, 2), keys

    batch = {"input_ids": input_ids, "attention_mask": mask, "pixel_values": enc["pixel_values"],
             "labels": label_t, "weights": torch.tensor(weights)}
    for name, entries in guides.items():
        batch[f"{name}_rows"], batch[f"{name}_keys"] = targets(entries)
    batch["place_rows"] = torch.tensor([p[:2] for p in places], dtype=torch.long).reshape(-1, 2)
    batch["place_cells"] = torch.tensor([p[2:4] for p in places], dtype=torch.long).reshape(-1, 2)
    batch["place_layers"] = torch.tensor([p[4] for p in places], dtype=torch.long)
    batch["compare_rows"] = torch.tensor([c[:2] for c in compares], dtype=torch.long).reshape(-1, 2)
    batch["compare_labels"] = torch.tensor([c[2] for c in compares], dtype=torch.long)
    return batch


def _cell(scene: Any, words: Sequence[str], grid: int) -> tuple[int, int]:
    """(column, row) on the ``grid x grid`` patch grid of the centre of the object ``words`` (colour, shape) name."""
    name = f"{words[0]} {words[1].rstrip('.?,')}"
    return world.centre_cell(next(o for o in scene.objects if o.name == name), grid)


def patch_batch(examples: Sequence[dict[str, Any]], grid: int) -> dict[str, torch.Tensor]:
    """The patch-loss targets of ``examples``: ``color``, ``shape``, ``char``, ``char_second``, each
    ``[B, grid * grid]`` (:func:`flowkern.shapes.patch_targets` of each scene)."""
    targets = [world.patch_targets(ex["scene"], grid) for ex in examples]
    return {k: torch.tensor([t[k] for t in targets]) for k in ("color", "shape", "char", "char_second")}


class TrainingStream(torch.utils.data.IterableDataset):
    """The training stream as batches, drawn in a worker process so that drawing overlaps the optimizer steps:
    ``("vision", pixel_values, patch targets)`` for stage 1, then ``("full", encoded batch, patch targets)``."""

    def __init__(self, processor: Any, seed: int, grid: int, plan: Sequence[tuple[str, int, int]],
                 mix: dict[str, float] | None = None, boost: tuple[str, float] | None = None) -> None:
        self.processor, self.seed, self.grid, self.plan, self.mix = processor, seed, grid, list(plan), mix
        self.boost = boost

    def __iter__(self) -> Iterator[tuple[str, dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
        index = 0
        for stage, steps, size in self.plan:
            for _ in range(steps):
                examples = [training_example(self.seed, index + k, self.mix, self.boost) for k in range(size)]
                index += size
                targets = patch_batch(examples, self.grid)
                if stage == "vision":
                    pixels = self.processor.image_processor(images=[ex["image"] for ex in examples],
                                                            return_tensors="pt")["pixel_values"]
                    yield stage, {"pixel_values": pixels}, targets
                else:
                    yield stage, encode(self.processor, examples), targets
