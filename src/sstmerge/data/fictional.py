"""Fictional documents with questions (RepliQA's idea): the ``qa`` suite's default items and A5's training data.

The documents describe things that do not exist, so a model cannot answer from memory and must read them.
"""

from __future__ import annotations

import logging
import random

from ..errors import DataError
from .tasks import UNANSWERABLE, QAItem

logger = logging.getLogger(__name__)


_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "th", "kr", "sk", "vr")
_VOWELS = ("a", "e", "i", "o", "u", "ae", "ei", "ou")
_CODAS = ("", "", "", "n", "r", "l", "s", "th", "m", "x")

_GOODS = (
    "blue clay pottery", "smoked goat cheese", "copper bells", "woven reed baskets", "pear brandy",
    "glass beads", "felt hats", "salted river eels", "cedar canoes", "honey candles",
)
_PRODUCTS = ("lantern", "water pump", "bicycle", "sewing machine", "typewriter", "kettle", "weather vane", "loom")
_SPECIES_KIND = ("moth", "orchid", "frog", "lichen", "beetle", "fern")
_COLOURS = ("violet", "amber", "silver", "crimson", "pale green", "ink-blue")


class _Namer:
    """Invented names from seeded syllables; never repeats a name within one generator run."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.used: set[str] = set()

    def word(self, lo: int = 2, hi: int = 3) -> str:
        while True:
            n = self.rng.randint(lo, hi)
            parts = [self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) for _ in range(n)]
            w = ("".join(parts) + self.rng.choice(_CODAS)).capitalize()
            if w not in self.used:
                self.used.add(w)
                return w

    def person(self) -> str:
        return f"{self.word(2, 2)} {self.word(2, 3)}"


def _fmt_int(n: int) -> str:
    return f"{n:,}"


# Each topic: (intro sentence, {slot: (sentence, question)}); values are filled from a facts dict.
def _town_facts(nm: _Namer, rng: random.Random) -> tuple[str, dict[str, str], str]:
    town = nm.word()
    facts = {
        "name": town,
        "region": nm.word(),
        "founder": nm.person(),
        "year": str(rng.randint(1702, 1899)),
        "river": nm.word(),
        "population": _fmt_int(rng.randint(12_000, 98_000)),
        "festival": nm.word(),
        "mayor": nm.person(),
        "export": rng.choice(_GOODS),
    }
    intro = "{name} is a small town in the {region} Valley."
    return "town", facts, intro


_TOWN_SLOTS = {
    "founder": ("{name} was founded by the merchant {founder}.", "Who founded the town of {name}?"),
    "year": ("The town received its royal charter in {year}.", "In which year did {name} receive its royal charter?"),
    "river": ("{name} lies on the banks of the {river} River.", "On which river does {name} lie?"),
    "population": ("At the last census, {name} had {population} residents.", "How many residents did {name} have at the last census?"),
    "festival": ("Every autumn the town hosts the {festival} Lantern Fair.", "What is the name of the fair that {name} hosts every autumn?"),
    "mayor": ("The current mayor is {mayor}.", "Who is the current mayor of {name}?"),
    "export": ("Its best-known export is {export}.", "What is the best-known export of {name}?"),
}
_TOWN_ANSWERS = {"festival": "{festival} Lantern Fair"}


def _company_facts(nm: _Namer, rng: random.Random) -> tuple[str, dict[str, str], str]:
    facts = {
        "name": f"{nm.word()} Works",
        "town": nm.word(),
        "founder": nm.person(),
        "year": str(rng.randint(1901, 1989)),
        "employees": _fmt_int(rng.randint(1_200, 9_400)),
        "product": f"{nm.word(2, 2)} {rng.choice(_PRODUCTS)}",
        "ceo": nm.person(),
        "rival": f"{nm.word()} Brothers",
    }
    intro = "{name} is a manufacturer based in the town of {town}."
    return "company", facts, intro


_COMPANY_SLOTS = {
    "founder": ("The company was started by the engineer {founder}.", "Who started {name}?"),
    "year": ("It opened its first workshop in {year}.", "In which year did {name} open its first workshop?"),
    "employees": ("Today it employs {employees} people.", "How many people does {name} employ today?"),
    "product": ("Its most famous product is the {product}.", "What is the most famous product of {name}?"),
    "ceo": ("The chief executive is {ceo}.", "Who is the chief executive of {name}?"),
    "rival": ("Its main competitor is {rival}.", "Who is the main competitor of {name}?"),
}


def _species_facts(nm: _Namer, rng: random.Random) -> tuple[str, dict[str, str], str]:
    kind = rng.choice(_SPECIES_KIND)
    facts = {
        "name": f"{nm.word()} {kind}",
        "kind": kind,
        "island": nm.word(),
        "discoverer": nm.person(),
        "year": str(rng.randint(1803, 1979)),
        "colour": rng.choice(_COLOURS),
        "size": f"{rng.randint(11, 89) / 10:.1f}",
        "museum": f"{nm.word()} Museum",
    }
    intro = "The {name} is a rare {kind} found only on the island of {island}."
    return "species", facts, intro


_SPECIES_SLOTS = {
    "discoverer": ("It was first described by the naturalist {discoverer}.", "Who first described the {name}?"),
    "year": ("The first specimen was collected in {year}.", "In which year was the first specimen of the {name} collected?"),
    "colour": ("Its most striking feature is its {colour} colouring.", "What colour is the {name} known for?"),
    "size": ("It grows to about {size} centimetres across.", "About how large, in centimetres, does the {name} grow?"),
    "museum": ("The original specimen is kept at the {museum}.", "Where is the original specimen of the {name} kept?"),
}

_TOPICS = (
    (_town_facts, _TOWN_SLOTS, _TOWN_ANSWERS),
    (_company_facts, _COMPANY_SLOTS, {}),
    (_species_facts, _SPECIES_SLOTS, {}),
)


def generate_fictional_qa(n: int = 40, seed: int = 0) -> list[QAItem]:
    """Generate ``n`` short fictional documents, each with one question (RepliQA's idea, no file needed).

    Like RepliQA, the documents describe things that do not exist, so a model cannot answer from memory
    and must read the document. Generation is fully deterministic given ``seed`` (one
    ``random.Random(seed)``; nothing depends on hashing or the clock):

    * Names of towns, rivers, people, companies, species, museums, ... are invented from seeded
      syllables (onset + vowel pairs plus an optional coda, e.g. "Drouvak", "Keisa Thibur"); a name is
      never reused within one call.
    * Each document follows one of three topics chosen in turn — a town, a manufacturing company, a rare
      species — and has an intro sentence plus 3 or 4 fact sentences picked at random from that topic's
      fact slots (founder, charter year, river, population, autumn fair, mayor, export; founder, year,
      employees, product, chief executive, rival; discoverer, year, colour, size, museum). Numbers are
      written so that none is a substring of another in the same document (years as 4 bare digits,
      counts with a thousands comma, sizes with one decimal).
    * ``round(n / 4)`` items (positions drawn at random) are **unanswerable**: their question asks about
      a slot of the topic that the document does not include; their answer is ``"UNANSWERABLE"`` and
      ``answerable`` is False. For the others the question asks about an included slot, and the answer is
      the slot's value: a short span that occurs literally in the document.

    Item ids are ``"fictional:<seed>:<index>"``.

    Raises:
        DataError: ``n`` is not a non-negative integer.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise DataError(f"generate_fictional_qa: n must be a non-negative integer, got {n!r}")
    rng = random.Random(seed)
    namer = _Namer(rng)
    unanswerable = set(rng.sample(range(n), round(n / 4))) if n else set()
    items: list[QAItem] = []
    for i in range(n):
        make, slots, answer_forms = _TOPICS[i % len(_TOPICS)]
        _, facts, intro = make(namer, rng)
        slot_names = list(slots)
        k = rng.randint(3, 4)
        included = rng.sample(slot_names, k)
        included.sort(key=slot_names.index)  # keep a natural sentence order
        doc = " ".join([intro.format(**facts)] + [slots[s][0].format(**facts) for s in included])
        if i in unanswerable:
            target = rng.choice([s for s in slot_names if s not in included])
            answer, answerable = UNANSWERABLE, False
        else:
            target = rng.choice(included)
            answer = answer_forms.get(target, "{" + target + "}").format(**facts)
            answerable = True
        question = slots[target][1].format(**facts)
        items.append(
            QAItem(id=f"fictional:{seed}:{i}", document=doc, question=question, answer=answer, answerable=answerable)
        )
    logger.debug("generated %d fictional QA items (seed=%d, %d unanswerable)", n, seed, len(unanswerable))
    return items
