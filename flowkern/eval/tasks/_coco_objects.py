"""Data for CHAIR: the 80 COCO object classes with the words that name them, and the two-word rules.

The word list is the one of Rohrbach et al. (2018, "Object Hallucination in Image Captioning", ``synonyms.txt``),
as used by OPERA's ``chair.py``, restated here one class per line as ``class = word; word; ...`` (the class name
itself always counts). Three entries of the original can never match a caption there and are left out so that the
numbers agree: ``" motor bike"`` and ``" cheesecake"`` (their line has a double space, so the entry keeps a leading
space) and ``"iPhone"`` (captions are lower-cased). Duplicates are dropped.
"""

from __future__ import annotations

__all__ = ["COCO_OBJECTS", "DOUBLE_WORDS", "ANIMAL_WORDS", "VEHICLE_WORDS"]

_TABLE = """
person = girl; boy; man; woman; kid; child; chef; baker; people; adult; rider; children; baby; worker; passenger;
    sister; biker; policeman; cop; officer; lady; cowboy; bride; groom; male; female; guy; traveler; mother;
    father; gentleman; pitcher; player; skier; snowboarder; skater; skateboarder; foreigner; caller; offender;
    coworker; trespasser; patient; politician; soldier; grandchild; serviceman; walker; drinker; doctor;
    bicyclist; thief; buyer; teenager; student; camper; driver; solider; hunter; shopper; villager
bicycle = bike; unicycle; minibike; trike
car = automobile; van; minivan; sedan; suv; hatchback; cab; jeep; coupe; taxicab; limo; taxi
motorcycle = scooter; motor cycle; motorbike; moped
airplane = jetliner; plane; air plane; monoplane; aircraft; jet; airbus; biplane; seaplane
bus = minibus; trolley
train = locomotive; tramway; caboose
truck = pickup; lorry; hauler; firetruck
boat = ship; liner; sailboat; motorboat; dinghy; powerboat; speedboat; canoe; skiff; yacht; kayak; catamaran;
    pontoon; houseboat; vessel; rowboat; trawler; ferryboat; watercraft; tugboat; schooner; barge; ferry;
    sailboard; paddleboat; lifeboat; freighter; steamboat; riverboat; battleship; steamship
traffic light = street light; traffic signal; stop light; streetlight; stoplight
fire hydrant = hydrant
stop sign
parking meter
bench = pew
bird = ostrich; owl; seagull; goose; duck; parakeet; falcon; robin; pelican; waterfowl; heron; hummingbird;
    mallard; finch; pigeon; sparrow; seabird; osprey; blackbird; fowl; shorebird; woodpecker; egret; chickadee;
    quail; bluebird; kingfisher; buzzard; willet; gull; swan; bluejay; flamingo; cormorant; parrot; loon;
    gosling; waterbird; pheasant; rooster; sandpiper; crow; raven; turkey; oriole; cowbird; warbler; magpie;
    peacock; cockatiel; lorikeet; puffin; vulture; condor; macaw; peafowl; cockatoo; songbird
cat = kitten; feline; tabby
dog = puppy; beagle; pup; chihuahua; schnauzer; dachshund; rottweiler; canine; pitbull; collie; pug; terrier;
    poodle; labrador; doggie; doberman; mutt; doggy; spaniel; bulldog; sheepdog; weimaraner; corgi; cocker;
    greyhound; retriever; brindle; hound; whippet; husky
horse = colt; pony; racehorse; stallion; equine; mare; foal; palomino; mustang; clydesdale; bronc; bronco
sheep = lamb; ram; goat; ewe
cow = cattle; oxen; ox; calf; holstein; heifer; buffalo; bull; zebu; bison
elephant
bear = panda
zebra
giraffe
backpack = knapsack
umbrella
handbag = wallet; purse; briefcase
tie = bow; bow tie
suitcase = suit case; luggage
frisbee
skis = ski
snowboard
sports ball = ball
kite
baseball bat
baseball glove
skateboard
surfboard = longboard; skimboard; shortboard; wakeboard
tennis racket = racket
bottle
wine glass
cup
fork
knife = pocketknife; knive
spoon
bowl = container
banana
apple
sandwich = burger; sub; cheeseburger; hamburger
orange
broccoli
carrot
hot dog
pizza
donut = doughnut; bagel
cake = cupcake; shortcake; coffeecake; pancake
chair = seat; stool
couch = sofa; recliner; futon; loveseat; settee; chesterfield
potted plant = houseplant
bed
dining table = table; desk
toilet = urinal; commode; lavatory; potty
tv = monitor; televison; television
laptop = computer; notebook; netbook; lenovo; macbook; laptop computer
mouse
remote
keyboard
cell phone = mobile phone; phone; cellphone; telephone; phon; smartphone
microwave
oven = stovetop; stove; stove top oven
toaster
sink
refrigerator = fridge; freezer
book
clock
vase
scissors
teddy bear = teddybear
hair drier = hairdryer
toothbrush
"""


def _parse(table: str) -> dict[str, tuple[str, ...]]:
    classes: dict[str, tuple[str, ...]] = {}
    lines: list[str] = []
    for raw in table.strip().splitlines():
        if raw.startswith("    "):
            lines[-1] += " " + raw.strip()
        else:
            lines.append(raw.strip())
    for line in lines:
        name, _, words = line.partition(" = ")
        seen = [name.strip()]
        for word in words.split(";"):
            word = word.strip()
            if word and word not in seen:
                seen.append(word)
        classes[name.strip()] = tuple(seen)
    return classes


COCO_OBJECTS: dict[str, tuple[str, ...]] = _parse(_TABLE)
"""COCO class name -> the words naming it (the class name first)."""

DOUBLE_WORDS: tuple[str, ...] = (
    "motor bike", "motor cycle", "air plane", "traffic light", "street light", "traffic signal", "stop light",
    "fire hydrant", "stop sign", "parking meter", "suit case", "sports ball", "baseball bat", "baseball glove",
    "tennis racket", "wine glass", "hot dog", "cell phone", "mobile phone", "teddy bear", "hair drier",
    "potted plant", "bow tie", "laptop computer", "stove top oven", "home plate", "train track",
)
"""Word pairs read as one word (some, like "home plate" or "motor bike", then name no object at all)."""

ANIMAL_WORDS: tuple[str, ...] = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra",
                                 "giraffe", "animal", "cub")
"""``baby X`` / ``adult X`` -> ``X`` for these (so a baby elephant is no person)."""

VEHICLE_WORDS: tuple[str, ...] = ("jet", "train")
"""``passenger X`` -> ``X`` for these (so a passenger train is no person)."""
