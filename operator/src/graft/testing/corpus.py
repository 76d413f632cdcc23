"""A small synthetic domain corpus and instruction set, deterministic for a given seed.

The domain is wind-turbine maintenance: sentences from templates with varied slots, so a
tiny model can learn it in a few dozen steps, and two generated documents are never near
duplicates by accident (each document carries many random slot values). Planted duplicates
let tests check de-duplication: an exact duplicate differs only in case and whitespace,
a near duplicate in one word.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

COMPONENTS = [
    "gearbox",
    "main bearing",
    "pitch motor",
    "yaw drive",
    "generator",
    "converter",
    "blade root",
    "hydraulic pump",
    "brake caliper",
    "anemometer",
    "slip ring",
    "cooling fan",
    "tower flange",
    "nacelle crane",
    "transformer",
]
SYMPTOMS = [
    "vibration",
    "oil leak",
    "overheating",
    "noise",
    "corrosion",
    "cracking",
    "misalignment",
    "wear",
    "voltage drop",
    "pressure loss",
    "sensor drift",
    "icing",
]
ACTIONS = [
    "replaced",
    "inspected",
    "lubricated",
    "re-torqued",
    "cleaned",
    "recalibrated",
    "tightened",
    "rewired",
    "balanced",
    "flushed",
    "repainted",
    "tested",
]
SITES = [
    "North Ridge",
    "Coastal Bay",
    "Eastfield",
    "Highmoor",
    "Saltmarsh",
    "Pine Hill",
    "Westgate",
    "Stormhead",
    "Clearwater",
    "Granite Point",
]
TECHS = [
    "Alvarez",
    "Brennan",
    "Chen",
    "Dubois",
    "Eriksen",
    "Fischer",
    "Garcia",
    "Haddad",
    "Ivanova",
    "Jensen",
    "Kowalski",
    "Larsen",
]

SENTENCES = [
    "Turbine {t} at {site} reported {sym} in the {comp}.",
    "Technician {tech} {act} the {comp} on turbine {t}.",
    "The {comp} of turbine {t} showed {sym} after {n} operating hours.",
    "After the {comp} was {act}, output of turbine {t} returned to {p} percent.",
    "Inspection of the {comp} at {site} found {sym} at {n} hours.",
    "Work order {wo} covers the {comp} of turbine {t} at {site}.",
    "Wind speed was {w} metres per second when the {comp} alarm was raised.",
    "The crew {act} the {comp} and closed work order {wo}.",
]


def _fill(r: random.Random, template: str) -> str:
    return template.format(
        t=f"T{r.randint(1, 400):03d}",
        site=r.choice(SITES),
        sym=r.choice(SYMPTOMS),
        comp=r.choice(COMPONENTS),
        tech=r.choice(TECHS),
        act=r.choice(ACTIONS),
        n=r.randint(100, 90000),
        p=r.randint(60, 100),
        wo=f"WO-{r.randint(10000, 99999)}",
        w=r.randint(3, 25),
    )


def domain_documents(n: int, *, seed: int = 0, sentences: tuple[int, int] = (10, 16)) -> list[str]:
    """``n`` distinct maintenance-log documents of ``sentences`` sentences each."""
    r = random.Random(seed)
    return [
        " ".join(_fill(r, r.choice(SENTENCES)) for _ in range(r.randint(*sentences)))
        for _ in range(n)
    ]


def instruction_records(n: int, *, seed: int = 0) -> list[dict[str, str]]:
    """Alpaca records (instruction, input, output) about the domain."""
    r = random.Random(seed)
    out = []
    for _ in range(n):
        comp, sym, act = r.choice(COMPONENTS), r.choice(SYMPTOMS), r.choice(ACTIONS)
        t = f"T{r.randint(1, 400):03d}"
        site = r.choice(SITES)
        kind = r.randrange(3)
        if kind == 0:
            out.append(
                {
                    "instruction": f"What should be done about {sym} in the {comp}?",
                    "input": f"Turbine {t} at {site}.",
                    "output": f"The {comp} of turbine {t} should be {act} and checked for {sym}.",
                }
            )
        elif kind == 1:
            out.append(
                {
                    "instruction": "Summarize the maintenance log entry.",
                    "input": _fill(r, SENTENCES[1]) + " " + _fill(r, SENTENCES[0]),
                    "output": f"The {comp} needed work because of {sym}.",
                }
            )
        else:
            out.append(
                {
                    "instruction": f"Which component of turbine {t} was {act}?",
                    "input": "",
                    "output": f"The {comp} of turbine {t} was {act}.",
                }
            )
    return out


def chat_records(n: int, *, seed: int = 0) -> list[dict[str, Any]]:
    """Chat records ({messages: [...]}) built from the instruction records."""
    out = []
    for rec in instruction_records(n, seed=seed):
        user = rec["instruction"] + (f"\n\n{rec['input']}" if rec["input"] else "")
        out.append(
            {
                "messages": [
                    {"role": "system", "content": "You are a wind-turbine maintenance assistant."},
                    {"role": "user", "content": user},
                    {"role": "assistant", "content": rec["output"]},
                ]
            }
        )
    return out


@dataclass(frozen=True)
class Planted:
    """A corpus with known duplicates: ``originals`` unique docs, then the planted copies."""

    documents: list[str]
    originals: int
    exact: int
    near: int


def plant_duplicates(docs: Sequence[str], *, exact: int, near: int, seed: int = 1) -> Planted:
    """Append ``exact`` case/whitespace variants and ``near`` one-word edits of random docs,
    then shuffle (deterministically)."""
    r = random.Random(seed)
    out = list(docs)
    for _ in range(exact):
        d = r.choice(docs)
        out.append("  " + d.upper().replace(" ", "   ") + "\n")
    for _ in range(near):
        words = r.choice(docs).split(" ")
        i = r.randrange(len(words) // 2, len(words))
        words[i] = "refurbished"
        out.append(" ".join(words))
    r.shuffle(out)
    return Planted(out, len(docs), exact, near)


def write_text(path: Path, docs: Iterable[str]) -> Path:
    """One document per blank-line-separated block (dataset format ``text``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(d.strip() for d in docs) + "\n", encoding="utf-8")
    return path


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    return path
