"""TextVQA (Singh et al., 2019), validation set: questions about text in images, ten human answers each.

Data: ``TextVQA_0.5.1_val.json`` (``{"data": [{"question_id", "image_id", "question", "answers", ...}]}``), as a
file or the folder holding it; images ``train_images/<image_id>.jpg`` (the val images ship in the train_val zip).
OCR tokens for the optional OCR prompt come from each entry's ``ocr_tokens`` (LLaVA's and lmms-lab's exports) or
from ``TextVQA_Rosetta_OCR_v0.2_val.json`` beside the annotation file.

Prompt (LLaVA-1.5 / lmms-eval)::

    {question}
    Reference OCR token: {tok1}, {tok2}, ...        <- only with ocr=True and when the image has tokens
    Answer the question using a single word or phrase.

Scoring = the m4c ``TextVQAAccuracyEvaluator`` used by LLaVA (lmms-eval's ``textvqa`` computes the same): the
prediction and the ten answers go through the EvalAI normaliser (:func:`normalize_answer`), and the score is the
mean over the ten leave-one-out subsets of ``min(1, matches among the other nine / 3)``.

Predictions are matched by TextVQA ``question_id``. LLaVA's own answer files use the *image* id as
``question_id`` and keep the prompt; such lines are matched by (image id, question read from ``prompt``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from flowkern.eval.tasks.base import Prediction, Sample, Task, id_key, json_type, ratio, read_json, row_field

__all__ = ["TextVqaTask", "normalize_answer", "soft_accuracy", "build_prompt", "PROMPT_SUFFIX"]

PROMPT_SUFFIX = "\nAnswer the question using a single word or phrase."
OCR_PREFIX = "\nReference OCR token: "
ANNOTATION_FILE = "TextVQA_0.5.1_val.json"
OCR_FILE = "TextVQA_Rosetta_OCR_v0.2_val.json"

# --------------------------------------------------------------------------------------------------------------
# The EvalAI answer normaliser (VQA / m4c), rule for rule, quirks included:
#  1. lower-case; delete every "," and "?"; "'s" -> " 's"; newlines/tabs -> spaces; strip
#  2. each of the punctuation marks below is deleted if it touches a space anywhere in the text (the check looks
#     at the text *before* any mark was handled; the digit-comma test can no longer fire after step 1), and
#     replaced by a space otherwise ("coca-cola" -> "coca cola", "a - b" -> "a  b")
#  3. a "." not followed by a digit is deleted ("2.5" stays, "5." -> "5", "e.g." -> "eg"); at most 32 of them,
#     because the reference passes re.UNICODE (= 32) as sub()'s count argument. ":", "'", "*", "$", "%", "&",
#     "#" are never touched.
#  4. per whitespace word: number words zero..ten and "none" -> digits, then a / an / the dropped, then the
#     contraction table (apostrophe-less spellings -> the usual ones; its mixed-case keys can never match)

_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
                "!")
_DIGIT_COMMA = re.compile(r"(?<=\d),+(?=\d)")
_PERIOD = re.compile(r"\.(?!\d)")
_PERIOD_LIMIT = 32
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})

# "canonical: spelling spelling ..." — every spelling (a whole word, after lower-casing) becomes the canonical form.
_CONTRACTION_TABLE = """
ain't: aint | aren't: arent | can't: cant | could've: couldve | couldn't: couldnt
couldn't've: couldn'tve couldnt've | didn't: didnt | doesn't: doesnt | don't: dont | hadn't: hadnt
hadn't've: hadnt've hadn'tve | hasn't: hasnt | haven't: havent | he'd: hed | he'd've: hed've he'dve | he's: hes
how'd: howd | how'll: howll | how's: hows | isn't: isnt | it'd: itd | it'd've: itd've it'dve | it'll: itll
let's: let's | ma'am: maam | mightn't: mightnt | mightn't've: mightnt've mightn'tve | might've: mightve
mustn't: mustnt | must've: mustve | needn't: neednt | not've: notve | o'clock: oclock | oughtn't: oughtnt
'ow's'at: ow's'at 'ows'at 'ow'sat | shan't: shant | she'd've: shed've she'dve | she's: she's
should've: shouldve | shouldn't: shouldnt | shouldn't've: shouldnt've shouldn'tve | somebodyd: somebody'd
somebody'd've: somebodyd've somebody'dve | somebody'll: somebodyll | somebody's: somebodys
someone'd: someoned | someone'd've: someoned've someone'dve | someone'll: someonell | someone's: someones
something'd: somethingd | something'd've: somethingd've something'dve | something'll: somethingll
that's: thats | there'd: thered | there'd've: thered've there'dve | there're: therere | there's: theres
they'd: theyd | they'd've: theyd've they'dve | they'll: theyll | they're: theyre | they've: theyve
'twas: twas | wasn't: wasnt | we'd've: wed've we'dve | we've: weve | weren't: werent | what'll: whatll
what're: whatre | what's: whats | what've: whatve | when's: whens | where'd: whered | where's: wheres
where've: whereve | who'd: whod | who'd've: whod've who'dve | who'll: wholl | who's: whos | who've: whove
why'll: whyll | why're: whyre | why's: whys | won't: wont | would've: wouldve | wouldn't: wouldnt
wouldn't've: wouldnt've wouldn'tve | y'all: yall | y'all'll: yall'll y'allll | y'all'd've: yall'd've y'alld've
y'all'd've: y'all'dve | you'd: youd | you'd've: youd've you'dve | you'll: youll | you're: youre | you've: youve
"""


def _parse_contractions(table: str) -> dict[str, str]:
    mapping: dict[str, str] = {}
    for entry in table.replace("\n", " | ").split("|"):
        if not entry.strip():
            continue
        canonical, _, spellings = entry.partition(": ")
        for spelling in spellings.split():
            mapping[spelling] = canonical.strip()
    return mapping


_CONTRACTIONS = _parse_contractions(_CONTRACTION_TABLE)


def _punctuation(text: str) -> str:
    out = text
    digit_comma = _DIGIT_COMMA.search(text) is not None
    for p in _PUNCTUATION:
        if f"{p} " in text or f" {p}" in text or digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=_PERIOD_LIMIT)


def _digits_articles_contractions(text: str) -> str:
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(answer: str) -> str:
    """The EvalAI / m4c answer normalisation (see the rules above); e.g. ``"The Two Dogs!"`` -> ``"2 dogs"``."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles_contractions(_punctuation(text))


def soft_accuracy(prediction: str, answers: list[str]) -> float:
    """VQA accuracy of one prediction: mean over leave-one-out subsets of ``min(1, matches / 3)``, normalised."""
    if not answers:
        raise ValueError("soft_accuracy: no reference answers")
    pred = normalize_answer(prediction)
    norm = [normalize_answer(a) for a in answers]
    total_matches = sum(a == pred for a in norm)
    return sum(min(1.0, (total_matches - (a == pred)) / 3.0) for a in norm) / len(norm)


def build_prompt(question: str, ocr_tokens: list[str] | None = None) -> str:
    """The LLaVA-1.5 TextVQA prompt, with the OCR line when ``ocr_tokens`` is a non-empty list."""
    ocr = f"{OCR_PREFIX}{', '.join(ocr_tokens)}" if ocr_tokens else ""
    return f"{question}{ocr}{PROMPT_SUFFIX}"


def _prompt_question(prompt: str) -> str:
    # the question line of a LLaVA answer file's prompt (the line that is neither the OCR line nor the suffix)
    for line in prompt.replace("<image>", "").split("\n"):
        line = line.strip()
        if line and not line.startswith("Reference OCR token:"):
            return line.lower()
    return ""


def _strings(values: list, name: str, where: str) -> None:
    """Refuse a list of ``name`` whose items are not strings (numbers pass: answers such as ``2`` are read as text)."""
    for j, value in enumerate(values):
        if value is None or isinstance(value, bool | list | dict):
            raise ValueError(f"{where}: {name}[{j}] must be a string, got {json_type(value)}")


class TextVqaTask(Task):
    """TextVQA val from ``TextVQA_0.5.1_val.json``; ``ocr=True`` adds the OCR-token line to the prompts.

    ``data``: the annotation file or its folder. ``images``: the image folder (default ``<folder>/train_images``).
    ``ocr_file``: Rosetta OCR json (default: beside the annotations), used when entries carry no ``ocr_tokens``.
    """

    name = "textvqa"

    def __init__(self, data: str | os.PathLike[str], images: str | os.PathLike[str] | None = None, *,
                 ocr: bool = False, ocr_file: str | os.PathLike[str] | None = None) -> None:
        super().__init__()
        path = Path(data)
        self.annotation_file = path / ANNOTATION_FILE if path.is_dir() else path
        if not self.annotation_file.is_file():
            raise FileNotFoundError(f"--data: {self.annotation_file} not found")
        folder = self.annotation_file.parent
        self.images = Path(images) if images is not None else folder / "train_images"
        self.ocr = ocr
        self.ocr_file = Path(ocr_file) if ocr_file is not None else folder / OCR_FILE
        self._by_image_question: dict[tuple[str, str], str] = {}

    def _ocr_tokens(self) -> dict[str, list[str]]:
        if not self.ocr_file.is_file():
            raise FileNotFoundError(f"--data: the OCR prompt needs OCR tokens: the entries have no 'ocr_tokens' "
                                    f"and {self.ocr_file} is not there")
        ocr = read_json(self.ocr_file)
        entries = ocr.get("data", []) if isinstance(ocr, dict) else ocr
        tokens = {}
        for entry in entries:
            words = entry.get("ocr_tokens")
            if words is None:
                words = [info.get("word", "") for info in entry.get("ocr_info", [])]
            tokens[str(entry["image_id"])] = [str(w) for w in words]
        return tokens

    def _load(self) -> list[Sample]:
        annotations = read_json(self.annotation_file)
        entries = annotations.get("data") if isinstance(annotations, dict) else None
        if not isinstance(entries, list):
            raise ValueError(f"--data: {self.annotation_file}: expected an object with a 'data' list")
        ocr_tokens: dict[str, list[str]] | None = None
        if self.ocr and any(not isinstance(e, dict) or e.get("ocr_tokens") is None for e in entries):
            ocr_tokens = self._ocr_tokens()
        samples = []
        for i, entry in enumerate(entries):
            where = f"--data: {self.annotation_file}: data[{i}]"
            key = id_key(row_field(entry, "question_id", "id", where))
            image_id = str(row_field(entry, "image_id", "id", where)).strip()
            question = row_field(entry, "question", "string", where)
            answers = row_field(entry, "answers", "list", where)
            _strings(answers, "answers", where)
            tokens = None
            if self.ocr:
                tokens = row_field(entry, "ocr_tokens", "list", where, optional=True, empty=True)
                tokens = ocr_tokens.get(image_id, []) if tokens is None and ocr_tokens is not None else tokens or []
                _strings(tokens, "ocr_tokens", where)
                tokens = [str(t) for t in tokens]
            samples.append(Sample(
                id=entry["question_id"],
                key=key,
                image=self.images / f"{image_id}.jpg",
                prompt=build_prompt(question, tokens),
                reference=[str(a) for a in answers],
                meta={"image_id": image_id, "question": question},
            ))
            self._by_image_question.setdefault((image_id, question.lower()), key)
        return samples

    def prediction_key(self, prediction: Prediction) -> str:
        """TextVQA ``question_id``; or, for LLaVA answer files, (image id, question in ``prompt``)."""
        key = id_key(prediction.id)
        self.samples  # noqa: B018 - load
        assert self._by_key is not None
        if key in self._by_key:
            return key
        prompt = prediction.record.get("prompt") if prediction.record else None
        if isinstance(prompt, str):
            return self._by_image_question.get((key, _prompt_question(prompt)), key)
        return key

    def parse(self, text: str) -> str:
        """The normalised answer (:func:`normalize_answer`)."""
        return normalize_answer(text)

    def _metrics(self, pairs: list[tuple[Sample, str]]) -> dict[str, Any]:
        total = sum(soft_accuracy(text, sample.reference) for sample, text in pairs)
        return {"accuracy": ratio(total, len(pairs))}
