"""CHAIR (Rohrbach et al., 2018): object hallucination in image captions, COCO val2014.

Data: ``instances_val2014.json`` and ``captions_val2014.json`` (COCO 2014 annotations), in the folder given or in
its ``annotations/`` subfolder; images ``val2014/COCO_val2014_<id>.jpg``. Prompt: ``"Please describe this image in
detail."``. Predictions: JSON lines with ``image_id`` and ``caption``.

Object list: the 80 COCO classes and their synonyms by default. Another object list (:class:`ObjectVocabulary`) can be
given as ``ChairTask(..., vocabulary=...)``, or as a ``chair_vocabulary.txt`` file beside the instance annotations
(one class per line, ``class = synonym; synonym``, ``#`` comments), which the task then reads instead of the COCO
list (the synthetic shapes-caption sets of :mod:`flowkern.shapes` ship one). Without either, nothing changes.

The algorithm is that of the reference ``chair.py`` (Rohrbach et al., as extended with recall by OPERA):

1. a caption is lower-cased, tokenised and each token singularised;
2. word pairs from :data:`DOUBLE_WORDS` become one word ("hot dog", "teddy bear"), ``baby``/``adult`` + animal and
   ``passenger`` + jet/train become the animal / vehicle, "bow tie" is a tie, "toilet seat" a toilet, and when a
   caption has both "toilet" and "seat" the seats are dropped;
3. each remaining word that names a COCO class (:data:`COCO_OBJECTS`, synonyms included) is a *mention* of it;
4. an image's ground-truth objects are the classes of its instance annotations plus every class mentioned in its
   reference captions (read by the same steps).

Metrics over the scored captions: ``chair_s`` = captions with at least one mention of an object not in the image /
captions; ``chair_i`` = such mentions / all mentions (each mention counts, repeats included); ``recall`` = distinct
ground-truth objects mentioned, summed over captions / ground-truth objects, summed over captions.

Where this differs from the reference: it singularises with ``lemminflect`` (a packaged lexicon, no NLTK data) as
nouns, where the reference runs NLTK's tokenizer and POS tagger and WordNet's lemmatizer per POS. A token ending in
"-ing" whose verb lemma names an object is read as that verb ("skiing" -> ski, "biking" -> bike), as WordNet does
for the VBG the tagger would give. Known differences (WordNet / here): comparative adjectives ("drier" -> "dry" /
"drier", so "hair drier" is found here); POS-dependent forms the tagger reads as nouns. ``inflect`` (another
packaged option) would give "bus" -> "bu" and "glass" -> unchanged but "glasses" -> "glass"; lemminflect keeps
"bus" and "glass" and maps "buses"/"glasses" to them, as WordNet does. Zero denominators give 0.0.
"""

from __future__ import annotations

import functools
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowkern.eval.tasks._coco_objects import ANIMAL_WORDS, COCO_OBJECTS, DOUBLE_WORDS, VEHICLE_WORDS
from flowkern.eval.tasks.base import Sample, Task, id_key, ratio, read_json, row_field

__all__ = ["ChairTask", "ObjectVocabulary", "caption_objects", "singularize", "tokenize", "chair_metrics", "PROMPT",
           "VOCABULARY_FILE"]

PROMPT = "Please describe this image in detail."

SYNONYM_TO_CLASS: dict[str, str] = {word: name for name, words in COCO_OBJECTS.items() for word in words}
"""Every word naming a COCO class -> the class."""

_PAIRS: dict[str, str] = {pair: pair for pair in DOUBLE_WORDS}
for _w in ANIMAL_WORDS:
    _PAIRS[f"baby {_w}"] = _w
    _PAIRS[f"adult {_w}"] = _w
for _w in VEHICLE_WORDS:
    _PAIRS[f"passenger {_w}"] = _w
_PAIRS["bow tie"] = "tie"
_PAIRS["toilet seat"] = "toilet"

VOCABULARY_FILE = "chair_vocabulary.txt"
"""A custom object list beside the instance annotations (see the module docstring)."""


@dataclass(frozen=True)
class ObjectVocabulary:
    """The object list CHAIR reads captions with: every word naming a class -> the class, and the two-word rules
    (a singularised word pair -> the word it stands for). :meth:`coco` is the default; :meth:`from_classes` builds
    one from ``{class: [synonyms]}`` (a class name or synonym of two words becomes a pair rule)."""

    synonyms: Mapping[str, str]
    pairs: Mapping[str, str]
    toilet_seat: bool = False  # COCO only: "toilet" and "seat" in one caption drop the seats

    @classmethod
    def coco(cls) -> ObjectVocabulary:
        """The 80 COCO classes, their synonyms and the reference script's two-word rules."""
        return _COCO_VOCABULARY

    @classmethod
    def from_classes(cls, classes: Mapping[str, Iterable[str]]) -> ObjectVocabulary:
        """A vocabulary from ``{class: [synonym, ...]}`` (the class name always names itself; words lower-cased).

        Raises:
            ValueError: an empty class list, a word of more than two words, or a word naming two classes.
        """
        synonyms: dict[str, str] = {}
        pairs: dict[str, str] = {}
        for name, words in classes.items():
            for word in (name, *words):
                word = " ".join(word.lower().split())
                if not word:
                    continue
                if len(word.split()) > 2:
                    raise ValueError(f"CHAIR vocabulary: {word!r}: object words have one or two words")
                if synonyms.get(word, name) != name:
                    raise ValueError(f"CHAIR vocabulary: {word!r} names both {synonyms[word]!r} and {name!r}")
                synonyms[word] = name
                if " " in word:
                    pairs[word] = word
        if not synonyms:
            raise ValueError("CHAIR vocabulary: no object classes")
        return cls(synonyms, pairs)

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> ObjectVocabulary:
        """Read a ``chair_vocabulary.txt``: one ``class = synonym; synonym`` (or just ``class``) per line."""
        p = Path(path)
        classes: dict[str, list[str]] = {}
        for number, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            name, _, rest = line.partition("=")
            if not name.strip():
                raise ValueError(f"--data: {p}:{number}: expected 'class = synonym; synonym'")
            classes[name.strip()] = [w.strip() for w in rest.split(";") if w.strip()]
        try:
            return cls.from_classes(classes)
        except ValueError as exc:
            raise ValueError(f"--data: {p}: {exc}") from None


_COCO_VOCABULARY = ObjectVocabulary(SYNONYM_TO_CLASS, _PAIRS, toilet_seat=True)

_TOKEN = re.compile(r"[^\W_]+(?:-[^\W_]+)*|[^\w\s]|_")


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens; punctuation marks are tokens of their own (so "hot, dog" is no hot dog)."""
    return _TOKEN.findall(text.lower())


@functools.cache
def _lemminflect() -> Any:
    try:
        import lemminflect
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("CHAIR needs the lemminflect package for singularisation: pip install lemminflect") from exc
    return lemminflect


@functools.lru_cache(maxsize=1 << 16)
def singularize(token: str) -> str:
    """The singular of a (lower-case) token: lemminflect's shortest noun lemma; "-ing" words naming an object as
    a verb become that verb's lemma ("skiing" -> "ski"). Tokens without letters come back unchanged."""
    if not any(ch.isalpha() for ch in token):
        return token
    lem = _lemminflect()
    lemmas = lem.getLemma(token, upos="NOUN")
    lemma = min(lemmas, key=len) if lemmas else token
    if token.endswith("ing") and lemma not in SYNONYM_TO_CLASS:
        for verb in lem.getLemma(token, upos="VERB"):
            if verb in SYNONYM_TO_CLASS:
                return verb
    return lemma


def caption_objects(caption: str, vocabulary: ObjectVocabulary | None = None) -> list[tuple[str, str]]:
    """The object mentions of a caption as ``(word, class)`` pairs, in order (steps 1-3 of the module doc), with
    the COCO object list unless ``vocabulary`` is given."""
    vocab = vocabulary or _COCO_VOCABULARY
    pairs, synonyms = vocab.pairs, vocab.synonyms
    words = [singularize(t) for t in tokenize(caption)]
    merged: list[str] = []
    i = 0
    while i < len(words):
        pair = " ".join(words[i:i + 2])
        if pair in pairs:
            merged.append(pairs[pair])
            i += 2
        else:
            merged.append(words[i])
            i += 1
    if vocab.toilet_seat and "toilet" in merged and "seat" in merged:
        merged = [w for w in merged if w != "seat"]
    return [(w, synonyms[w]) for w in merged if w in synonyms]


def chair_metrics(items: Iterable[tuple[str, set[str] | frozenset[str]]],
                  vocabulary: ObjectVocabulary | None = None) -> dict[str, Any]:
    """CHAIR_s, CHAIR_i and recall of ``(caption, ground-truth classes)`` pairs, with the counts behind them
    (objects read with ``vocabulary``, COCO's by default)."""
    captions = hallucinated_captions = mentions = hallucinated = gt_total = recalled = 0
    for caption, truth in items:
        found = caption_objects(caption, vocabulary)
        bad = [cls for _, cls in found if cls not in truth]
        captions += 1
        mentions += len(found)
        hallucinated += len(bad)
        hallucinated_captions += bool(bad)
        gt_total += len(truth)
        recalled += len({cls for _, cls in found if cls in truth})
    return {
        "chair_s": ratio(hallucinated_captions, captions),
        "chair_i": ratio(hallucinated, mentions),
        "recall": ratio(recalled, gt_total),
        "counts": {"captions": captions, "hallucinated_captions": hallucinated_captions, "mentions": mentions,
                   "hallucinated_mentions": hallucinated, "gt_objects": gt_total, "recalled_objects": recalled},
    }


def _find(data: Path, name: str) -> Path:
    for folder in (data, data / "annotations"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"--data: {name} not found in {data} (nor in {data / 'annotations'})")


class ChairTask(Task):
    """CHAIR on COCO val2014 from ``instances_val2014.json`` + ``captions_val2014.json``.

    ``data``: the folder holding them (or its ``annotations/`` subfolder). ``images``: the val2014 image folder
    (default ``<data>/val2014``). ``vocabulary``: the object list (default: ``chair_vocabulary.txt`` beside the
    instance file when there is one, else COCO's). Samples are every image of the annotation files, by ascending
    id; a run usually captions a seeded subset (500 images in OPERA's protocol) and scores only those.
    """

    name = "chair"
    id_field = "image_id"
    text_field = "caption"

    def __init__(self, data: str | os.PathLike[str], images: str | os.PathLike[str] | None = None, *,
                 vocabulary: ObjectVocabulary | None = None) -> None:
        super().__init__()
        self.data = Path(data)
        if not self.data.exists():
            raise FileNotFoundError(f"--data: {self.data} not found")
        if self.data.is_file():
            self.data = self.data.parent
        self.instances_file = _find(self.data, "instances_val2014.json")
        self.captions_file = _find(self.data, "captions_val2014.json")
        self.images = Path(images) if images is not None else self.data / "val2014"
        vocab_file = self.instances_file.parent / VOCABULARY_FILE
        if vocabulary is None and vocab_file.is_file():
            vocabulary = ObjectVocabulary.read(vocab_file)
        self.vocabulary = vocabulary or _COCO_VOCABULARY
        self._truth: dict[str, frozenset[str]] = {}

    def _load(self) -> list[Sample]:
        instances = read_json(self.instances_file)
        captions = read_json(self.captions_file)
        for what, obj in ((self.instances_file, instances), (self.captions_file, captions)):
            if not isinstance(obj, dict) or "annotations" not in obj or "images" not in obj:
                raise ValueError(f"--data: {what}: expected a COCO annotation file with 'images' and 'annotations'")
        inst, caps = self.instances_file, self.captions_file
        for what, obj in ((inst, instances), (caps, captions)):
            for name in ("images", "annotations"):
                row_field(obj, name, "list", f"--data: {what}", empty=True)
        categories = {}
        for i, cat in enumerate(row_field(instances, "categories", "list", f"--data: {inst}", optional=True,
                                          empty=True) or []):
            where = f"--data: {inst}: categories[{i}]"
            cat_id, name = row_field(cat, "id", "id", where), row_field(cat, "name", "string", where)
            synonyms = self.vocabulary.synonyms
            if name not in synonyms:
                what = "a COCO class" if self.vocabulary is _COCO_VOCABULARY else "in the object vocabulary"
                raise ValueError(f"--data: {inst}: category {name!r} is not {what}")
            categories[cat_id] = synonyms[name]
        file_names: dict[str, str] = {}
        ids: dict[str, Any] = {}
        for what, obj in ((caps, captions), (inst, instances)):
            for i, image in enumerate(obj["images"]):
                where = f"--data: {what}: images[{i}]"
                key = id_key(row_field(image, "id", "id", where))
                name = row_field(image, "file_name", "string", where, optional=True)
                if name is None and not key.isdigit():
                    raise ValueError(f"{where}: no 'file_name', and the id {key!r} is not a COCO number")
                ids.setdefault(key, image["id"])
                file_names.setdefault(key, name or f"COCO_val2014_{int(key):012d}.jpg")
        objects: dict[str, set[str]] = defaultdict(set)
        for i, ann in enumerate(instances["annotations"]):
            where = f"--data: {inst}: annotations[{i}]"
            image_id, category = row_field(ann, "image_id", "id", where), row_field(ann, "category_id", "id", where)
            if category not in categories:
                raise ValueError(f"--data: {inst}: unknown category_id {category!r}")
            objects[id_key(image_id)].add(categories[category])
        refs: dict[str, list[str]] = defaultdict(list)
        for i, ann in enumerate(captions["annotations"]):
            where = f"--data: {caps}: annotations[{i}]"
            image_id, caption = row_field(ann, "image_id", "id", where), row_field(ann, "caption", "string", where)
            refs[id_key(image_id)].append(caption)
        for key in list(objects) + list(refs):
            if key not in ids:
                raise ValueError(f"--data: annotations refer to image {key}, which is not in the 'images' lists")
        order = sorted(ids, key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0, k))
        return [Sample(
            id=ids[k], key=k, image=self.images / file_names[k], prompt=PROMPT,
            reference={"classes": frozenset(objects.get(k, ())), "captions": tuple(refs.get(k, ()))},
        ) for k in order]

    def ground_truth(self, sample: Sample) -> frozenset[str]:
        """The sample image's objects: instance classes plus classes mentioned in its reference captions."""
        if sample.key not in self._truth:
            found = set(sample.reference["classes"])
            for caption in sample.reference["captions"]:
                found.update(cls for _, cls in caption_objects(caption, self.vocabulary))
            self._truth[sample.key] = frozenset(found)
        return self._truth[sample.key]

    def parse(self, text: str) -> list[tuple[str, str]]:
        """The object mentions of a caption (:func:`caption_objects`)."""
        return caption_objects(text, self.vocabulary)

    def _metrics(self, pairs: list[tuple[Sample, str]]) -> dict[str, Any]:
        return chair_metrics(((text, self.ground_truth(sample)) for sample, text in pairs), self.vocabulary)
