"""Synthetic benchmark suites: every example is a pure function of (suite, seed, index).

Each example draws from its own RNG, seeded with the string
`"mlxflow-bench/{suite}/{seed}/{index}"` (string seeds are hashed with SHA-512 by `random`, never
with the salted `hash()`), so example i is the same whatever n is asked for and in any process.

Suites and their categories are listed in `CATEGORIES`; an example's `kind` picks its scorer
(`mlxcore.bench.scoring`): "choice" (a letter among `options`), "ints" (a list of integers),
"json" (a JSON object) or "exact" (one normalised word, number or string). `candidates` holds
what `baseline` needs to guess uniformly from the example's answer space.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

LETTERS = "ABCD"

SUITES: tuple[str, ...] = ("math_mcq", "qa", "logic", "knowledge", "sort", "json", "copy")

CATEGORIES: dict[str, tuple[str, ...]] = {
    "math_mcq": ("add", "sub", "mul", "div"),
    "qa": ("age", "city", "job", "older", "same_city", "count"),
    "logic": ("boolean", "ordering"),
    "knowledge": ("geography", "chemistry", "astronomy", "units", "counting"),
    "sort": ("sort",),
    "json": ("json",),
    "copy": ("short", "long"),
}


@dataclass(frozen=True)
class Example:
    """One benchmark item; `answer` is the canonical gold text (for "choice", the letter)."""

    id: str
    suite: str
    category: str
    prompt: str
    answer: str
    kind: str
    options: tuple[str, ...] = ()
    candidates: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (tuples become lists)."""
        return {"id": self.id, "suite": self.suite, "category": self.category,
                "prompt": self.prompt, "answer": self.answer, "kind": self.kind,
                "options": list(self.options), "candidates": list(self.candidates)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Example:
        """The inverse of `to_dict`."""
        return cls(**{**d, "options": tuple(d.get("options", ())),
                      "candidates": tuple(d.get("candidates", ()))})


# (category, prompt, answer, kind, options, candidates)
_Item = tuple[str, str, str, str, tuple[str, ...], tuple[str, ...]]

NAMES = ("Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Irene", "Jack",
         "Kate", "Leo")
CITIES = ("Paris", "Berlin", "Madrid", "Rome", "Lisbon", "Vienna", "Oslo", "Dublin", "Prague",
          "Warsaw")
JOBS = ("teacher", "doctor", "baker", "pilot", "nurse", "farmer", "lawyer", "chef", "painter",
        "plumber", "writer", "dentist")

# (category, question, one-word answer): true, uncontroversial facts.
KNOWLEDGE: tuple[tuple[str, str, str], ...] = (
    *(("geography", f"What is the capital of {country}?", city) for country, city in (
        ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
        ("Japan", "Tokyo"), ("Canada", "Ottawa"), ("Australia", "Canberra"), ("Egypt", "Cairo"),
        ("Norway", "Oslo"), ("Portugal", "Lisbon"), ("Greece", "Athens"), ("Kenya", "Nairobi"),
        ("Peru", "Lima"), ("Poland", "Warsaw"), ("Sweden", "Stockholm"))),
    *(("chemistry", f"What is the chemical symbol for {element}?", symbol) for element, symbol in (
        ("gold", "Au"), ("silver", "Ag"), ("iron", "Fe"), ("sodium", "Na"), ("potassium", "K"),
        ("oxygen", "O"), ("hydrogen", "H"), ("carbon", "C"), ("helium", "He"), ("lead", "Pb"),
        ("copper", "Cu"), ("mercury", "Hg"), ("tin", "Sn"), ("nitrogen", "N"))),
    *(("astronomy", f"Which planet is {nth} from the Sun?", planet) for nth, planet in (
        ("first", "Mercury"), ("second", "Venus"), ("third", "Earth"), ("fourth", "Mars"),
        ("fifth", "Jupiter"), ("sixth", "Saturn"), ("seventh", "Uranus"), ("eighth", "Neptune"))),
    ("astronomy", "Which is the largest planet in the Solar System?", "Jupiter"),
    ("astronomy", "Which planet is known as the Red Planet?", "Mars"),
    *(("units", f"What is the SI unit of {quantity}?", unit) for quantity, unit in (
        ("electric current", "ampere"), ("mass", "kilogram"), ("force", "newton"),
        ("energy", "joule"), ("power", "watt"), ("frequency", "hertz"),
        ("electrical resistance", "ohm"), ("pressure", "pascal"), ("time", "second"),
        ("thermodynamic temperature", "kelvin"), ("electric charge", "coulomb"),
        ("electric potential difference", "volt"))),
    *(("counting", question, n) for question, n in (
        ("How many days are in a week?", "7"), ("How many sides does a hexagon have?", "6"),
        ("How many minutes are in an hour?", "60"), ("How many seconds are in a minute?", "60"),
        ("How many hours are in a day?", "24"), ("How many months are in a year?", "12"),
        ("How many degrees are in a right angle?", "90"),
        ("How many sides does a triangle have?", "3"), ("How many legs does an insect have?", "6"),
        ("How many legs does a spider have?", "8"))),
)


def _knowledge_answers(category: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(a for c, _, a in KNOWLEDGE if c == category))


# --- generators: (rng, category) -> _Item ------------------------------------------------------

def _math_mcq(rng: random.Random, category: str) -> _Item:
    if category == "add":
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        ans, sym, wrong = a + b, "+", [abs(a - b), a * b]
    elif category == "sub":
        a = rng.randint(20, 99)
        b = rng.randint(10, a - 1)
        ans, sym, wrong = a - b, "-", [a + b]
    elif category == "mul":
        a, b = rng.randint(3, 19), rng.randint(3, 12)
        ans, sym, wrong = a * b, "*", [a + b, a * (b + 1)]
    else:  # div: exact, a = b * q
        b, q = rng.randint(2, 12), rng.randint(2, 20)
        a = b * q
        ans, sym, wrong = q, "/", [a - b, q + b]
    digits = str(ans)
    swap = int(digits[:-2] + digits[-1] + digits[-2]) if len(digits) >= 2 else ans
    pool = [v for v in dict.fromkeys([ans + 1, ans - 1, ans + 10, ans - 10, swap, *wrong])
            if v >= 0 and v != ans]
    pool += [v for v in (ans + 2, ans + 3, ans + 11) if v not in pool][:max(0, 3 - len(pool))]
    values = [ans, *rng.sample(pool, 3)]
    rng.shuffle(values)
    options = tuple(str(v) for v in values)
    lines = "\n".join(f"{LETTERS[i]}) {o}" for i, o in enumerate(options))
    prompt = f"What is {a} {sym} {b}?\n{lines}\nAnswer with the letter only."
    return category, prompt, LETTERS[values.index(ans)], "choice", options, tuple(LETTERS)


def _qa(rng: random.Random, category: str) -> _Item:
    names = rng.sample(NAMES, 3)
    ages = rng.sample(range(18, 71), 3)
    jobs = rng.sample(JOBS, 3)
    pool = rng.sample(CITIES, 3)
    cities = [rng.choice(pool) for _ in range(3)]
    i, j = rng.sample(range(3), 2)
    if category == "same_city":
        same = rng.random() < 0.5
        cities[j] = cities[i] if same else rng.choice([c for c in pool if c != cities[i]])
    if category == "age":
        question, answer, cands = f"How old is {names[i]}?", str(ages[i]), tuple(map(str, ages))
    elif category == "city":
        question, answer = f"In which city does {names[i]} live?", cities[i]
        cands = tuple(sorted(set(cities)))
    elif category == "job":
        question, answer, cands = f"What is {names[i]}'s job?", jobs[i], tuple(jobs)
    elif category == "older":
        question = f"Who is older, {names[i]} or {names[j]}?"
        answer = names[i] if ages[i] > ages[j] else names[j]
        cands = (names[i], names[j])
    elif category == "same_city":
        question = f"Do {names[i]} and {names[j]} live in the same city?"
        answer, cands = ("yes" if cities[i] == cities[j] else "no"), ("yes", "no")
    else:  # count
        city = rng.choice(pool)
        question, answer = f"How many of them live in {city}?", str(cities.count(city))
        cands = ("0", "1", "2", "3")
    passage = " ".join(f"{n} is {a} years old, lives in {c} and works as a {jb}."
                       for n, a, c, jb in zip(names, ages, cities, jobs))
    prompt = f"{passage}\nQuestion: {question}\nAnswer with one word or number only."
    return category, prompt, answer, "exact", (), cands


def _bool_expr(rng: random.Random, depth: int, top: bool = False) -> tuple[str, bool]:
    """A random expression over true/false with and/or/not; binary subterms are parenthesised."""
    if not top and (depth == 0 or rng.random() < 0.3):
        value = rng.random() < 0.5
        return ("true" if value else "false"), value
    if rng.random() < 0.2:
        text, value = _bool_expr(rng, depth - 1)
        return f"not {text}", not value
    (lt, lv), (rt, rv) = _bool_expr(rng, depth - 1), _bool_expr(rng, depth - 1)
    op = rng.choice(("and", "or"))
    text = f"{lt} {op} {rt}"
    return (text if top else f"({text})"), (lv and rv) if op == "and" else (lv or rv)


def _logic(rng: random.Random, category: str) -> _Item:
    if category == "boolean":
        expr, value = _bool_expr(rng, rng.randint(2, 3), top=True)
        prompt = f"Evaluate this boolean expression: {expr}\nAnswer with true or false only."
        return category, prompt, ("true" if value else "false"), "exact", (), ("true", "false")
    people = rng.sample(NAMES, rng.randint(3, 5))  # tallest first
    sentences = [f"{hi} is taller than {lo}." if rng.random() < 0.5
                 else f"{lo} is shorter than {hi}." for hi, lo in zip(people, people[1:])]
    rng.shuffle(sentences)
    which = rng.choice(("tallest", "shortest"))
    answer = people[0] if which == "tallest" else people[-1]
    prompt = f"{' '.join(sentences)}\nWho is the {which}?\nAnswer with one name only."
    return category, prompt, answer, "exact", (), tuple(sorted(people))


def _knowledge(rng: random.Random, category: str) -> _Item:
    question, answer = rng.choice([(q, a) for c, q, a in KNOWLEDGE if c == category])
    prompt = f"{question}\nAnswer with one word or number only."
    return category, prompt, answer, "exact", (), _knowledge_answers(category)


def _sort(rng: random.Random, category: str) -> _Item:
    """Eight digits 0-9: a uniformly random order of them is sorted about once in 4,000 tries."""
    nums = [rng.randint(0, 9) for _ in range(8)]
    prompt = "Sort these numbers in ascending order: " + " ".join(map(str, nums))
    answer = " ".join(map(str, sorted(nums)))
    return category, prompt, answer, "ints", (), tuple(map(str, nums))


def _json(rng: random.Random, category: str) -> _Item:
    a, b = rng.randint(-50, 99), rng.randint(-50, 99)
    prompt = (f"Let a = {a} and b = {b}. Compute sum = a + b, diff = a - b and prod = a * b.\n"
              'Reply with only a JSON object with the keys "sum", "diff" and "prod".')
    answer = json.dumps({"sum": a + b, "diff": a - b, "prod": a * b})
    return category, prompt, answer, "json", (), ()


def _copy(rng: random.Random, category: str) -> _Item:
    length = rng.randint(4, 7) if category == "short" else rng.randint(8, 10)
    s = "".join(rng.choice(string.ascii_lowercase) for _ in range(length))
    # on its own line: a byte-level BPE splits it into the same tokens as the answer
    return category, f"Copy this string exactly:\n{s}", s, "exact", (), ()


_GENERATORS: dict[str, Callable[[random.Random, str], _Item]] = {
    "math_mcq": _math_mcq, "qa": _qa, "logic": _logic, "knowledge": _knowledge,
    "sort": _sort, "json": _json, "copy": _copy,
}


def _check_suite(suite: str) -> None:
    if suite not in _GENERATORS:
        raise ValueError(f"unknown benchmark suite {suite!r}; known suites: {', '.join(SUITES)}")


def example(suite: str, seed: int, index: int) -> Example:
    """Example `index` of `suite` under `seed`: a pure function of its three arguments."""
    return sample(suite, random.Random(f"mlxflow-bench/{suite}/{seed}/{index}"), f"{suite}-{seed}-{index}")


def sample(suite: str, rng: random.Random, id: str = "") -> Example:
    """An example of `suite` drawn from `rng`: training data in the bench's own formats
    (the synthetic `copy` and `sort` tasks), never one of `example`'s questions unless the
    RNG streams collide."""
    _check_suite(suite)
    category = rng.choice(CATEGORIES[suite])
    category, prompt, answer, kind, options, candidates = _GENERATORS[suite](rng, category)
    return Example(id=id or f"{suite}-sample", suite=suite, category=category, prompt=prompt,
                   answer=answer, kind=kind, options=options, candidates=candidates)


def make(suites: Sequence[str], n: int, seed: int = 0) -> list[Example]:
    """`n` examples (indices 0..n-1) of each suite, suites in the given order."""
    if isinstance(suites, str):
        suites = (suites,)
    for suite in suites:
        _check_suite(suite)
    return [example(suite, seed, i) for suite in suites for i in range(n)]


def baseline(ex: Example, rng: random.Random) -> str:
    """A uniformly random reply from `ex`'s answer space (chance-level accuracy)."""
    if ex.kind == "choice":
        return rng.choice(LETTERS[:len(ex.options)])
    if ex.suite == "sort":
        nums = list(ex.candidates)
        rng.shuffle(nums)
        return " ".join(nums)
    if ex.suite == "copy":
        return "".join(rng.choice(string.ascii_lowercase) for _ in range(len(ex.answer)))
    if ex.suite == "json":
        return json.dumps({"sum": rng.randint(-100, 198), "diff": rng.randint(-149, 149),
                           "prod": rng.randint(-4950, 9801)})
    if ex.candidates:
        return rng.choice(ex.candidates)
    raise ValueError(f"no baseline for suite {ex.suite!r} (example {ex.id})")
