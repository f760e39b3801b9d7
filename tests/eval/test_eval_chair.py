"""CHAIR: object mentions (synonyms, two-word objects, special rules), ground truth, CHAIR_s / CHAIR_i / recall."""

from __future__ import annotations

import pytest

from flowkern.eval import ChairTask, get_task
from flowkern.eval.tasks._coco_objects import COCO_OBJECTS
from flowkern.eval.tasks.chair import SYNONYM_TO_CLASS, caption_objects, singularize, tokenize
from tests.fixtures import write_coco, write_jsonl

pytest.importorskip("lemminflect")


def classes(caption):
    return [cls for _, cls in caption_objects(caption)]


def test_the_word_list():
    assert len(COCO_OBJECTS) == 80
    assert SYNONYM_TO_CLASS["puppy"] == "dog" and SYNONYM_TO_CLASS["sofa"] == "couch"
    assert SYNONYM_TO_CLASS["table"] == "dining table" and SYNONYM_TO_CLASS["tv"] == "tv"
    assert "motor bike" not in SYNONYM_TO_CLASS and "cheesecake" not in SYNONYM_TO_CLASS  # unreachable upstream


@pytest.mark.parametrize(("word", "singular"), [
    ("dogs", "dog"), ("bus", "bus"), ("buses", "bus"), ("glass", "glass"), ("glasses", "glass"),
    ("children", "child"), ("people", "people"), ("mice", "mouse"), ("knives", "knife"), ("skis", "ski"),
    ("scissors", "scissors"), ("skiing", "ski"), ("biking", "bike"), ("surfing", "surfing"), (",", ","),
])
def test_singularize(word, singular):
    assert singularize(word) == singular


def test_tokenize():
    assert tokenize("A hot-dog, and the dog's bone.") == ["a", "hot-dog", ",", "and", "the", "dog", "'", "s", "bone",
                                                           "."]


@pytest.mark.parametrize(("caption", "expected"), [
    ("Two dogs and a puppy.", ["dog", "dog"]),                          # every mention counts
    ("A hot dog on a plate.", ["hot dog"]),                             # two-word object, not a dog
    ("A hot, dog.", ["dog"]),                                           # punctuation breaks the pair
    ("Teddy bears on a bed.", ["teddy bear", "bed"]),
    ("A baby elephant and an adult dog.", ["elephant", "dog"]),        # baby/adult animal: no person
    ("A baby in a crib.", ["person"]),
    ("A passenger train at a station.", ["train"]),                     # passenger vehicle: no person
    ("The passenger waits.", ["person"]),
    ("A toilet seat is up.", ["toilet"]),
    ("A seat next to the toilet.", ["toilet"]),                         # toilet and seat: the seat is dropped
    ("A seat by the window.", ["chair"]),
    ("A man wearing a bow tie.", ["person", "tie"]),
    ("Wine glasses on a dining table.", ["wine glass", "dining table"]),
    ("A man on a motor bike.", ["person"]),                             # upstream quirk: "motor bike" names nothing
    ("A man on a motorbike near a home plate.", ["person", "motorcycle"]),
    ("Kids skiing past two buses.", ["person", "skis", "bus"]),
    ("", []),
])
def test_caption_objects(caption, expected):
    assert classes(caption) == expected


IMAGES = {
    1: (["dog", "person"], ["A man walking his dogs."]),
    2: (["toilet"], ["A white toilet seat in a bathroom."]),
    3: (["car"], ["Two buses parked on the street."]),      # the bus comes from the reference caption only
    4: ([], ["A person skiing down a hill."]),              # person and skis from the caption
    5: (["sink"], []),                                      # never predicted
}
PREDICTIONS = {
    1: "A woman and her puppy sit on a couch next to a hot dog.",  # person, dog | couch, hot dog hallucinated
    2: "The toilet seat is up.",                                   # toilet
    3: "A bus and a baby elephant near a stop sign.",              # bus | elephant, stop sign hallucinated
    4: "A man skiing with glasses and a wine glass.",              # person, skis | wine glass hallucinated
}


@pytest.fixture
def coco(tmp_path):
    return write_coco(tmp_path / "annotations", IMAGES)


def test_ground_truth(coco):
    task = ChairTask(coco)
    truth = {s.id: task.ground_truth(s) for s in task.samples}
    assert truth == {1: {"dog", "person"}, 2: {"toilet"}, 3: {"car", "bus"}, 4: {"person", "skis"}, 5: {"sink"}}
    s = task.samples[0]
    assert s.prompt == "Please describe this image in detail."
    assert s.image == coco / "val2014" / "COCO_val2014_000000000001.jpg"


def test_metrics_hand_computed(coco, tmp_path):
    task = get_task("chair", coco.parent)  # the folder above annotations/ works too
    path = write_jsonl(tmp_path / "captions.jsonl",
                       [{"image_id": i, "caption": c} for i, c in reversed(PREDICTIONS.items())])
    m = task.score(task.read_predictions(path))
    assert m["counts"] == {"captions": 4, "hallucinated_captions": 3, "mentions": 11, "hallucinated_mentions": 5,
                           "gt_objects": 7, "recalled_objects": 6}
    assert m["chair_s"] == pytest.approx(3 / 4, abs=1e-12)
    assert m["chair_i"] == pytest.approx(5 / 11, abs=1e-12)
    assert m["recall"] == pytest.approx(6 / 7, abs=1e-12)
    assert m["n"] == 4 and m["missing"] == 1


def test_empty_caption_and_no_mentions(coco):
    m = ChairTask(coco).score({1: "", 2: "Nothing to see here."})
    assert m["chair_s"] == 0.0 and m["chair_i"] == 0.0 and m["recall"] == 0.0


def test_bad_input(coco, tmp_path):
    task = ChairTask(coco)
    with pytest.raises(ValueError, match="image_id 9 is not in"):
        task.score({9: "A dog."})
    path = write_jsonl(tmp_path / "p.jsonl", [{"image_id": 1, "text": "A dog."}])
    with pytest.raises(ValueError, match=r"p\.jsonl:1: missing field 'caption'"):
        task.read_predictions(path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="instances_val2014.json"):
        ChairTask(tmp_path / "empty")
