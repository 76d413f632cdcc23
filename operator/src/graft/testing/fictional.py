"""An invented industrial domain no pretrained model can know, for the real-model demo.

A plant runs machines of made-up brands (Quorvane, Tessaline...). Each machine has four
facts: the part number of its seal kit, what its fault code means, the torque of its
flange bolts, and its service interval. All of it is drawn from a seeded RNG, so the facts
exist nowhere else.

- ``documents``: manual pages and maintenance logs stating the facts (continued
  pre-training).
- ``held_out_documents``: logs written with other templates (held-out perplexity); they
  mention the same machines and facts, never the same sentences.
- ``sft_records``: questions and short answers about every fact in three phrasings (SFT);
  short, so that training and evaluating cost few tokens. Several phrasings of one fact
  are what teach a small model to answer it however it is asked. The training documents
  are replayed in it too, so that SFT does not erode what CPT taught.
- ``held_out_questions``: every fact asked in a fourth phrasing the SFT set never uses,
  with the short answer to find in the model's reply (the fact score).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

BRANDS = ["Quorvane", "Tessaline", "Brixholt", "Vandrel", "Omrik", "Caldryn", "Systrel", "Feyland"]
KINDS = ["coolant pump", "hydraulic press", "screw compressor", "pellet extruder", "kiln fan"]
FAULTS = [
    "a blocked suction strainer",
    "worn impeller vanes",
    "a failed thermal fuse",
    "low accumulator pressure",
    "a cracked drive coupling",
    "a seized idler bearing",
    "a tripped phase monitor",
    "a leaking bypass valve",
    "a stuck pressure switch",
    "a loose encoder cable",
    "a clogged oil cooler",
    "a broken timing belt",
]


@dataclass(frozen=True)
class Machine:
    name: str
    kind: str
    seal_kit: str
    fault_code: str
    fault: str
    torque: str
    interval: str


def machines(n: int = 8, *, seed: int = 2026) -> list[Machine]:
    r = random.Random(seed)
    out: list[Machine] = []
    names: set[str] = set()
    faults = r.sample(FAULTS, k=min(n, len(FAULTS)))
    # One machine per brand while brands last: a name then differs from every other in its
    # first word, which is what a small model keys a fact on.
    brands = r.sample(BRANDS, k=min(n, len(BRANDS)))
    while len(out) < n:
        brand = brands[len(out)] if len(out) < len(brands) else r.choice(BRANDS)
        name = f"{brand} {r.choice('KMRTVXZ')}{r.randint(2, 9)}{r.randint(0, 9)}"
        if name in names:
            continue
        names.add(name)
        prefix = brand[:2].upper()
        out.append(
            Machine(
                name=name,
                kind=r.choice(KINDS),
                seal_kit=f"{prefix}-{r.randint(1000, 9999)}-{r.choice('KSTW')}",
                fault_code=f"F-{r.randint(100, 999)}",
                fault=faults[len(out) % len(faults)],
                torque=f"{r.randrange(40, 180, 5)} Nm",
                interval=f"{r.randrange(500, 4000, 250)} hours",
            )
        )
    return out


def documents(ms: list[Machine]) -> list[str]:
    """Manual pages and logs stating every fact (training text)."""
    docs = []
    for m in ms:
        docs.append(
            f"{m.name} {m.kind}: service manual. The seal kit for the {m.name} is part number "
            f"{m.seal_kit}. Fault code {m.fault_code} on the {m.name} means {m.fault}. The "
            f"flange bolts of the {m.name} are torqued to {m.torque}. The {m.name} is serviced "
            f"every {m.interval}."
        )
        docs.append(
            f"Maintenance log, {m.name}. The display showed fault code {m.fault_code}, which on "
            f"the {m.name} means {m.fault}. We fitted seal kit {m.seal_kit} and torqued the "
            f"flange bolts to {m.torque}. Next service of the {m.name} in {m.interval}."
        )
        docs.append(
            f"Parts and settings for the {m.name}: seal kit {m.seal_kit}; flange bolt torque "
            f"{m.torque}; service interval {m.interval}; fault code {m.fault_code} means "
            f"{m.fault}."
        )
    return docs


def held_out_documents(ms: list[Machine]) -> list[str]:
    """Logs in templates the training text never uses (held-out perplexity)."""
    docs = []
    for m in ms:
        docs.append(
            f"Shift report. Operators on the {m.name} logged fault code {m.fault_code} twice "
            f"this week; the cause was {m.fault}. The crew swapped in a new {m.seal_kit} seal "
            f"kit, set the flange bolts to {m.torque}, and booked the next service in "
            f"{m.interval}."
        )
    return docs


def _qa(m: Machine) -> list[tuple[list[str], str, str]]:
    """Per fact: question phrasings (the last is held out), full answer, short answer."""
    return [
        (
            [
                f"What is the part number of the seal kit for the {m.name}?",
                f"Which seal kit does the {m.name} use?",
                f"Seal kit part number for the {m.name}?",
                f"I need a new seal kit for our {m.name}. Which part number do I order?",
            ],
            f"Part number {m.seal_kit}.",
            m.seal_kit,
        ),
        (
            [
                f"What does fault code {m.fault_code} mean on the {m.name}?",
                f"The {m.name} shows fault code {m.fault_code}. What is wrong?",
                f"What causes fault {m.fault_code} on a {m.name}?",
                f"Our {m.name} just threw {m.fault_code}. What does that code indicate?",
            ],
            f"It means {m.fault}.",
            m.fault.split(" ", 1)[1],
        ),
        (
            [
                f"What torque do the flange bolts of the {m.name} need?",
                f"To what torque are the {m.name} flange bolts tightened?",
                f"Flange bolt torque for the {m.name}?",
                f"How tight should I torque the flange bolts on the {m.name}?",
            ],
            f"Torque them to {m.torque}.",
            m.torque,
        ),
        (
            [
                f"How often is the {m.name} serviced?",
                f"What is the service interval of the {m.name}?",
                f"When is the {m.name} due for service?",
                f"After how many operating hours does the {m.name} need its next service?",
            ],
            f"Every {m.interval}.",
            m.interval,
        ),
    ]


#: per machine, instructions asking for each of its training documents, in documents()' order
_DOCUMENT_REQUESTS = (
    "Write the service manual entry for the {name}.",
    "Write a maintenance log entry for the {name}.",
    "List the parts and settings of the {name}.",
)


def replay_records(ms: list[Machine]) -> list[dict[str, str]]:
    """Alpaca records that ask for the training documents themselves. SFT on short answers
    alone erodes what continued pre-training taught about raw domain text (measured in the
    demo: held-out log perplexity -48% after CPT, +34% after SFT without these records, -75%
    with them, and the fact score 75% without, 84% with)."""
    docs = documents(ms)
    per = len(_DOCUMENT_REQUESTS)
    assert len(docs) == per * len(ms), "documents() and _DOCUMENT_REQUESTS disagree"
    return [
        {"instruction": ask.format(name=m.name), "input": "", "output": docs[per * i + j]}
        for i, m in enumerate(ms)
        for j, ask in enumerate(_DOCUMENT_REQUESTS)
    ]


def sft_records(ms: list[Machine]) -> list[dict[str, str]]:
    """Alpaca records: every fact in all its phrasings but the last, then the documents
    replayed (``replay_records``)."""
    qa = [
        {"instruction": q, "input": "", "output": full}
        for m in ms
        for phrasings, full, _ in _qa(m)
        for q in phrasings[:-1]
    ]
    return qa + replay_records(ms)


def held_out_questions(ms: list[Machine]) -> list[dict[str, str]]:
    """qa records: every fact in its last phrasing, which training never shows."""
    return [
        {"question": phrasings[-1], "answer": short} for m in ms for phrasings, _, short in _qa(m)
    ]
