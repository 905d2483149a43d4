"""Seeded prompts for teacher distillation: math, logic, reasoning (with ground truth) and knowledge.

Every prompt is a pure function of (seed, index): `prompt(cfg, i)` builds its own
`random.Random(f"mlxcore.distill.prompts/{seed}/{i}")` (string seeds hash with SHA-512, so the
stream is the same in every process and Python run), draws the category by `cfg.weights` from
it, then the kind (uniformly within the category), then the content. Nothing reads global
random state, so prompt i can be rebuilt on resume without generating prompts 0..i-1.

Categories and kinds (`KINDS`):

  math       arithmetic  an integer expression with parentheses (+ - * /, exact division)
             gcd_lcm     greatest common divisor or least common multiple of 2-3 numbers
             linear      a*x + b = c with an integer solution
             percent     percentage word problems with exact answers (of, discount, increase,
                         what-percent, original-price)
  logic      syllogism   two premises over nonsense nouns; answer yes / no / cannot tell
                         (decided by checking every Venn-diagram model of the premises)
             ordering    a chain of comparisons ("X is taller than Y"); who is tallest etc.
  reasoning  shopping    several items with quantities and prices, a coupon, change from a bill
             inventory   a stock count through several sells/deliveries/boxes/halvings
             travel      distance over several legs at given speeds (and what is left to go)
             ages        "P is k times as old as C; in y years P will be j times as old"
  knowledge  open        an open question from a bank of ~40 topics (no ground truth)

`Prompt.truth` is a canonical string (see `mlxcore.bench.answers.normalize_number`): an integer
or exact decimal for numeric kinds, "yes" / "no" / "cannot tell" for syllogisms, a name for
orderings, None for knowledge. `Prompt.meta` holds the structured values the text was built
from, so a checker can recompute the truth without trusting the generator's arithmetic.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from fractions import Fraction
from functools import lru_cache
from typing import Any, Iterator

from mlxcore.bench.answers import canonical_number
from mlxcore.distill.schema import ANSWER_TYPES, CATEGORIES, DEFAULT_WEIGHTS, KINDS, PromptConfig  # noqa: F401  (re-exported)

@dataclass(frozen=True)
class Prompt:
    id: str
    category: str
    kind: str
    messages: list[dict[str, str]]
    truth: str | None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        """The user message's content."""
        return self.messages[-1]["content"]

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "category": self.category, "kind": self.kind,
                "messages": [dict(m) for m in self.messages], "truth": self.truth, "meta": self.meta}


def prompt(cfg: PromptConfig, index: int) -> Prompt:
    """Prompt number `index` of the stream `cfg.seed`: the same on every call and machine."""
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    rng = random.Random(f"mlxcore.distill.prompts/{cfg.seed}/{index}")
    cats = [c for c in CATEGORIES if cfg.weights.get(c, 0.0) > 0]
    category = rng.choices(cats, weights=[cfg.weights[c] for c in cats])[0]
    kind = rng.choice(KINDS[category])
    text, truth, meta = _GENERATORS[kind](rng)
    atype = ANSWER_TYPES[kind]
    if atype is not None:
        text = f"{text}\n\n{rng.choice(_INSTRUCTIONS[atype])}"
    return Prompt(id=f"{category}-{cfg.seed}-{index:07d}", category=category, kind=kind,
                  messages=[{"role": "user", "content": text}], truth=truth, meta=meta)


def prompts(cfg: PromptConfig, start: int = 0, count: int | None = None) -> Iterator[Prompt]:
    """Prompts start, start+1, ... (`count` of them, or without end when count is None)."""
    i = start
    while count is None or i < start + count:
        yield prompt(cfg, i)
        i += 1


_INSTRUCTIONS: dict[str, tuple[str, ...]] = {
    "number": (
        "Show your reasoning briefly, then finish with a final line of the form `Answer: <number>`.",
        "Work it out step by step. End your reply with a line `Answer: <number>` and nothing after it.",
        "Explain your steps, then put the final result on its own last line as `Answer: <number>`.",
        "Think it through, and make the last line of your reply `Answer: <number>` (just the number).",
    ),
    "choice": (
        "Explain your reasoning, then end with a final line `Answer: yes`, `Answer: no` or `Answer: cannot tell`.",
        "Reason it out briefly. The last line must be `Answer: <yes|no|cannot tell>`.",
        "Justify your answer, then finish with one line: `Answer: yes`, `Answer: no`, or `Answer: cannot tell`.",
    ),
    "name": (
        "Explain your reasoning, then end with a final line of the form `Answer: <name>`.",
        "Work it out step by step and finish with the line `Answer: <name>`.",
        "Reason briefly, then give the final line as `Answer: <name>` (just the name).",
    ),
}

NAMES: tuple[str, ...] = (
    "Aisha", "Mateo", "Yuki", "Olga", "Kwame", "Priya", "Liam", "Fatima", "Chen", "Sofia", "Omar",
    "Ingrid", "Diego", "Amara", "Hiroshi", "Elena", "Tariq", "Mei", "Lucas", "Zanele", "Ravi",
    "Noor", "Henrik", "Camila", "Tomasz", "Leila", "Kofi", "Ananya", "Pablo", "Astrid", "Jamal",
    "Hana", "Mikhail", "Isabel", "Sven", "Ayesha", "Bruno", "Nadia", "Kenji", "Lucia", "Emeka",
    "Freya", "Arjun", "Maya", "Dmitri", "Rosa", "Tobias", "Zara", "Joon", "Greta", "Samir",
    "Chloe", "Felipe", "Imani", "Oskar", "Lina", "Rohan", "Elif", "Marco", "Thandi", "Viktor",
    "Naomi", "Andre", "Sakura", "Nils", "Yara", "Ibrahim", "Clara", "Wei", "Esther", "Kai",
    "Julia", "Rafael", "Selin", "Patrick", "Adaeze", "Hugo", "Anika", "Mohammed", "Beatriz",
)


# --------------------------------------------------------------------------------------- math

_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}


def _arith_tree(rng: random.Random, ops: int) -> tuple[str, int, int]:
    """(expression, value, precedence) with `ops` operators; every division is exact."""
    if ops == 0:
        n = rng.randint(1, 60) if rng.random() < 0.7 else rng.randint(2, 12)
        return str(n), n, 3
    left_ops = rng.randint(0, ops - 1)
    ls, lv, lp = _arith_tree(rng, left_ops)
    op = rng.choices("+-*/", weights=(3, 3, 2, 1.5))[0]
    if op == "/":
        divisors = [d for d in range(2, 13) if lv != 0 and lv % d == 0]
        if not divisors:
            op = rng.choice("+-")
        else:
            d = rng.choice(divisors)
            rs, rv, rp = str(d), d, 3
            left = f"({ls})" if lp < _PREC[op] else ls
            return f"{left} / {rs}", lv // d, _PREC[op]
    rs, rv, rp = _arith_tree(rng, ops - 1 - left_ops)
    if op == "*" and abs(lv * rv) > 5000:
        op = rng.choice("+-")
    value = {"+": lv + rv, "-": lv - rv, "*": lv * rv}[op]
    left = f"({ls})" if lp < _PREC[op] else ls
    right = f"({rs})" if rp < _PREC[op] or (rp == _PREC[op] and op in "-/") else rs
    return f"{left} {op} {right}", value, _PREC[op]


def _gen_arithmetic(rng: random.Random) -> tuple[str, str, dict]:
    for _ in range(100):
        expr, value, _ = _arith_tree(rng, rng.randint(3, 5))
        if "(" in expr and abs(value) <= 100_000:
            break
    shown = expr
    if rng.random() < 0.4:
        shown = expr.replace("*", "×").replace("/", "÷")
    text = rng.choice((
        "Compute {e}.", "What is the value of {e}?", "Evaluate the expression {e}.",
        "Calculate {e} exactly.", "Without a calculator, work out {e}.",
    )).format(e=shown)
    return text, canonical_number(value), {"expr": expr, "shown": shown}


def _gen_gcd_lcm(rng: random.Random) -> tuple[str, str, dict]:
    op = rng.choice(("gcd", "lcm"))
    k = 3 if rng.random() < 0.25 else 2
    while True:
        g = rng.randint(2, 40) if op == "gcd" else rng.randint(2, 12)
        hi = 25 if op == "gcd" else 15
        nums = [g * m for m in rng.sample(range(1, hi + 1), k)]
        if len(set(nums)) == k and min(nums) > 1:
            break
    value = math.gcd(*nums) if op == "gcd" else math.lcm(*nums)
    listed = ", ".join(map(str, nums[:-1])) + f" and {nums[-1]}"
    if op == "gcd":
        text = rng.choice((
            "What is the greatest common divisor of {n}?", "Find the GCD of {n}.",
            "What is the largest whole number that divides each of {n}?",
            "Compute gcd({c}).",
        ))
    else:
        text = rng.choice((
            "What is the least common multiple of {n}?", "Find the LCM of {n}.",
            "What is the smallest positive integer that is a multiple of each of {n}?",
            "Compute lcm({c}).",
        ))
    return text.format(n=listed, c=", ".join(map(str, nums))), str(value), {"op": op, "numbers": nums}


def _linear_equation(a: int, b: int, c: int, var: str) -> str:
    coef = var if a == 1 else f"-{var}" if a == -1 else f"{a}{var}"
    return f"{coef} {'+' if b > 0 else '-'} {abs(b)} = {c}"


def _gen_linear(rng: random.Random) -> tuple[str, str, dict]:
    var = rng.choice("xyznkt")
    a = rng.choice([v for v in range(-15, 16) if v != 0])
    x = rng.randint(-30, 30)
    b = rng.choice([v for v in range(-90, 91) if v != 0])
    c = a * x + b
    eq = _linear_equation(a, b, c, var)
    if a > 1 and rng.random() < 0.25:
        verb_b = f"add {b}" if b > 0 else f"subtract {-b}"
        text = rng.choice((
            "I think of a number, multiply it by {a} and then {vb}. The result is {c}. What number did I think of?",
            "A number is multiplied by {a}, and then you {vb}, giving {c}. What is the number?",
        )).format(a=a, vb=verb_b, c=c)
        form = "words"
    else:
        text = rng.choice((
            "Solve for {v}: {eq}.", "Find {v} if {eq}.", "What value of {v} satisfies {eq}?",
            "Solve the equation {eq} for {v}.",
        )).format(v=var, eq=eq)
        form = "equation"
    return text, str(x), {"a": a, "b": b, "c": c, "var": var, "form": form, "equation": eq}


_GOODS = ("jacket", "bicycle", "lamp", "backpack", "pair of boots", "guitar", "desk chair", "kettle",
          "tent", "watch", "rug", "printer", "camera", "blender", "suitcase", "bookshelf")


def _gen_percent(rng: random.Random) -> tuple[str, str, dict]:
    sub = rng.choice(("of", "discount", "increase", "what_percent", "original"))
    if sub == "of":
        p, n = rng.choice((5, 10, 12, 15, 20, 25, 30, 35, 40, 45, 60, 75, 80, 120, 150)), rng.randint(2, 400) * rng.choice((1, 2, 5))
        value = Fraction(p * n, 100)
        text = rng.choice(("What is {p}% of {n}?", "Compute {p} percent of {n}.",
                           "How much is {p}% of {n}?")).format(p=p, n=n)
        meta = {"p": p, "n": n}
    elif sub == "discount":
        p, price = rng.choice((5, 10, 15, 20, 25, 30, 40, 50, 60, 70)), rng.randint(8, 600)
        item = rng.choice(_GOODS)
        value = Fraction(price * (100 - p), 100)
        text = rng.choice((
            "A {i} costs ${x}. It is on sale for {p}% off. What is the sale price in dollars?",
            "A shop marks a {i} priced at ${x} down by {p}%. How many dollars does it cost after the discount?",
            "{name} buys a {i} listed at ${x} with a {p}% discount. How much does {name} pay, in dollars?",
        )).format(i=item, x=price, p=p, name=rng.choice(NAMES))
        meta = {"p": p, "price": price, "item": item}
    elif sub == "increase":
        p = rng.choice((2, 4, 5, 8, 10, 12, 15, 20, 25, 30, 50))
        step = 100 // math.gcd(p, 100)
        n = step * rng.randint(max(1, 200 // step), max(2, 20000 // step))
        value = Fraction(n * (100 + p), 100)
        what, unit = rng.choice((("A town", "residents"), ("A library", "books"), ("A farm", "chickens"),
                                 ("A website", "daily visitors"), ("A school", "students")))
        text = rng.choice((
            "{w} had {n} {u}. The number grew by {p}%. How many {u} are there now?",
            "{w} has {n} {u}, and that number rises by {p}% over a year. How many {u} does it have at the end of the year?",
        )).format(w=what, n=n, u=unit, p=p)
        meta = {"p": p, "n": n}
    elif sub == "what_percent":
        total = rng.choice((8, 16, 20, 25, 40, 50, 80, 125, 200, 250, 400, 500))
        part = rng.randint(1, total - 1)
        value = Fraction(part * 100, total)
        noun, verb = rng.choice((("students", "passed the exam"), ("seeds", "sprouted"), ("games", "were won"),
                                 ("emails", "were spam"), ("trees", "were oaks")))
        text = rng.choice((
            "{a} out of {b} {n} {v}. What percentage of the {n} {v}?",
            "Of {b} {n}, {a} {v}. What percent is that?",
        )).format(a=part, b=total, n=noun, v=verb)
        meta = {"part": part, "total": total}
    else:
        p = rng.choice((10, 20, 25, 30, 40, 50, 60, 75))
        original = rng.randint(1, 60) * 20
        sale = original * (100 - p) // 100
        item = rng.choice(_GOODS)
        value = Fraction(original)
        text = rng.choice((
            "After a {p}% discount, a {i} costs ${s}. What was its original price in dollars?",
            "{name} paid ${s} for a {i} that was {p}% off. What was the price before the discount, in dollars?",
        )).format(p=p, i=item, s=sale, name=rng.choice(NAMES))
        meta = {"p": p, "sale": sale, "item": item}
    return text, canonical_number(value), {"sub": sub, **meta}


# -------------------------------------------------------------------------------------- logic

_ONSETS = ("b", "bl", "br", "d", "dr", "f", "fl", "g", "gl", "gr", "k", "kr", "m", "n", "p", "pl",
           "pr", "r", "s", "sk", "sl", "sn", "st", "t", "tr", "v", "w", "z", "zw", "j")
_VOWELS = ("a", "e", "i", "o", "u", "oo", "ee", "ai", "ou")
_CODAS = ("b", "d", "g", "k", "m", "n", "p", "t", "x", "z", "nk", "mp", "rt", "lt", "sh", "ff")


def _nonsense(rng: random.Random) -> str:
    w = rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
    if rng.random() < 0.6:
        w += rng.choice(_VOWELS[:5]) + rng.choice(_CODAS)
    return w


def _plural(w: str) -> str:
    return w + ("es" if w.endswith(("x", "z", "sh", "s")) else "s")


# Three sets A, B, C (bits 0, 1, 2). A model says which of the 7 Venn regions (1..7; region 0 is
# outside all three) are non-empty: 128 models, one bit each in the masks below.
_MODELS = range(128)


def _region_nonempty(model: int, region: int) -> bool:
    return bool(model >> (region - 1) & 1)


@lru_cache(maxsize=None)
def _truth_mask(quant: str, x: int, y: int) -> int:
    """Bitmask over the 128 models where the statement `quant(X, Y)` holds."""
    mask = 0
    for m in _MODELS:
        regions = [r for r in range(1, 8) if _region_nonempty(m, r)]
        if quant == "all":
            ok = not any(r >> x & 1 and not r >> y & 1 for r in regions)
        elif quant == "no":
            ok = not any(r >> x & 1 and r >> y & 1 for r in regions)
        elif quant == "some":
            ok = any(r >> x & 1 and r >> y & 1 for r in regions)
        elif quant == "some_not":
            ok = any(r >> x & 1 and not r >> y & 1 for r in regions)
        else:
            raise ValueError(quant)
        mask |= ok << m
    return mask


@lru_cache(maxsize=None)
def _nonempty_mask() -> int:
    mask = 0
    for m in _MODELS:
        if all(any(_region_nonempty(m, r) and r >> s & 1 for r in range(1, 8)) for s in range(3)):
            mask |= 1 << m
    return mask


def syllogism_answer(premises: list[tuple[str, int, int]], question: tuple[str, int, int]) -> str | None:
    """yes / no / cannot tell for a question over sets 0, 1, 2 (all non-empty); None if the
    premises contradict each other."""
    models = _nonempty_mask()
    for p in premises:
        models &= _truth_mask(*p)
    if not models:
        return None
    q = _truth_mask(*question)
    if models & ~q == 0:
        return "yes"
    if models & q == 0:
        return "no"
    return "cannot tell"


def _statement(rng: random.Random, quant: str, x: str, y: str) -> str:
    px, py = _plural(x), _plural(y)
    return rng.choice({
        "all": (f"All {px} are {py}.", f"Every {x} is a {y}."),
        "no": (f"No {px} are {py}.", f"No {x} is a {y}."),
        "some": (f"Some {px} are {py}.", f"At least one {x} is a {y}."),
        "some_not": (f"Some {px} are not {py}.", f"At least one {x} is not a {y}."),
    }[quant])


def _question(rng: random.Random, quant: str, x: str, y: str) -> str:
    px, py = _plural(x), _plural(y)
    return rng.choice({
        "all": (f"Are all {px} {py}?", f"Is every {x} a {y}?"),
        "no": (f"Is it true that no {px} are {py}?", f"Is it the case that no {x} is a {y}?"),
        "some": (f"Are some {px} {py}?", f"Is at least one {x} a {y}?"),
        "some_not": (f"Are some {px} not {py}?", f"Is there at least one {x} that is not a {y}?"),
    }[quant])


_QUANTS = ("all", "no", "some", "some_not")


def _gen_syllogism(rng: random.Random) -> tuple[str, str, dict]:
    words: list[str] = []
    while len(words) < 3:
        w = _nonsense(rng)
        if all(w[:3] != v[:3] for v in words):
            words.append(w)
    target = rng.choice(("yes", "no", "cannot tell"))
    for _ in range(400):
        p1 = (rng.choice(_QUANTS), *rng.choice(((0, 1), (1, 0))))
        p2 = (rng.choice(_QUANTS), *rng.choice(((1, 2), (2, 1))))
        q = (rng.choice(_QUANTS), *rng.choice(((0, 2), (2, 0))))
        answer = syllogism_answer([p1, p2], q)
        if answer == target:
            break
    premises = [p1, p2]
    rng.shuffle(premises)
    sentences = [_statement(rng, qt, words[x], words[y]) for qt, x, y in premises]
    intro = rng.choice((
        "Consider these statements about made-up creatures.",
        "Suppose the following are true.",
        "Here are two facts about imaginary things.",
        "Assume both statements below are true.",
    ))
    text = (f"{intro} (Every kind of thing mentioned exists: each group is non-empty.)\n"
            + "\n".join(f"{i + 1}. {s}" for i, s in enumerate(sentences))
            + f"\nBased only on these statements: {_question(rng, q[0], words[q[1]], words[q[2]])}"
            " Answer yes, no, or cannot tell.")
    meta = {"terms": words, "premises": [list(p) for p in premises], "question": list(q)}
    return text, answer, meta


_ORDER_ATTRS = (
    ("taller", "shorter", "tallest", "shortest"),
    ("older", "younger", "oldest", "youngest"),
    ("faster", "slower", "fastest", "slowest"),
    ("heavier", "lighter", "heaviest", "lightest"),
    ("richer", "poorer", "richest", "poorest"),
    ("stronger", "weaker", "strongest", "weakest"),
)


def _gen_ordering(rng: random.Random) -> tuple[str, str, dict]:
    more, less, most, least = rng.choice(_ORDER_ATTRS)
    n = rng.randint(3, 6)
    order = rng.sample(NAMES, n)  # order[0] has the most of the attribute
    facts = [[order[i], order[i + 1]] for i in range(n - 1)]
    rng.shuffle(facts)
    sentences = [f"{a} is {more} than {b}" if rng.random() < 0.5 else f"{b} is {less} than {a}" for a, b in facts]
    ask = rng.choice(("max", "min") + (("second_max", "second_min") if n >= 4 else ()))
    truth = {"max": order[0], "min": order[-1], "second_max": order[1], "second_min": order[-2]}[ask]
    phrase = {"max": f"Who is the {most}", "min": f"Who is the {least}",
              "second_max": f"Who is the second {most}", "second_min": f"Who is the second {least}"}[ask]
    joiner = rng.choice(("; ", ". "))
    body = joiner.join(sentences) if joiner == "; " else ". ".join(s[0].upper() + s[1:] for s in sentences)
    text = rng.choice((
        "{b}. {q}?", "There are {n} people: {names}. {b}. {q}?", "{b}. Among {names}, {q2}?",
    )).format(b=body, q=phrase, q2=phrase[0].lower() + phrase[1:], n=n,
              names=", ".join(sorted(order, key=lambda _: rng.random())))
    meta = {"names": sorted(order), "facts": facts, "more": more, "less": less, "ask": ask}
    return text, truth, meta


# ---------------------------------------------------------------------------------- reasoning

_ITEMS = (
    ("notebook", "notebooks", 2, 9), ("pen", "pens", 1, 4), ("apple", "apples", 1, 3),
    ("loaf of bread", "loaves of bread", 2, 6), ("bottle of juice", "bottles of juice", 2, 5),
    ("T-shirt", "T-shirts", 8, 25), ("pair of socks", "pairs of socks", 3, 9), ("mug", "mugs", 4, 14),
    ("candle", "candles", 2, 11), ("comic book", "comic books", 3, 12), ("box of tea", "boxes of tea", 3, 10),
    ("plant pot", "plant pots", 5, 18), ("puzzle", "puzzles", 9, 30), ("towel", "towels", 6, 20),
    ("board game", "board games", 15, 45), ("bag of rice", "bags of rice", 4, 16), ("lightbulb", "lightbulbs", 2, 8),
    ("sketchbook", "sketchbooks", 5, 15), ("jar of honey", "jars of honey", 5, 13), ("scarf", "scarves", 10, 28),
)


def _gen_shopping(rng: random.Random) -> tuple[str, str, dict]:
    name = rng.choice(NAMES)
    items = []
    parts = []
    for sing, plur, lo, hi in rng.sample(_ITEMS, rng.randint(2, 4)):
        qty, price = rng.randint(1, 6), rng.randint(lo, hi)
        items.append({"item": sing, "qty": qty, "price": price})
        if qty == 1:
            parts.append(f"a {sing} for ${price}" if not sing[0] in "aeiou" else f"an {sing} for ${price}")
        else:
            parts.append(rng.choice((f"{qty} {plur} at ${price} each", f"{qty} {plur} costing ${price} apiece")))
    total = sum(i["qty"] * i["price"] for i in items)
    coupon = rng.choice((0, 0, 3, 5, 10)) if total > 25 else 0
    due = total - coupon
    paid = next(b for b in (10, 20, 50, 100, 200, 500) if b >= due)
    if rng.random() < 0.3 and paid < 500:
        paid = next(b for b in (20, 50, 100, 200, 500) if b > paid)
    listing = ", ".join(parts[:-1]) + f" and {parts[-1]}"
    coupon_s = f" A coupon takes ${coupon} off the total." if coupon else ""
    text = rng.choice((
        "{n} buys {l}.{c} {n} pays with a ${p} bill. How much change, in dollars, does {n} get back?",
        "At the market, {n} picks up {l}.{c} If {n} hands the cashier ${p}, how many dollars of change should {n} receive?",
        "{n} goes shopping and buys {l}.{c} Paying with ${p}, how much change (in dollars) does {n} get?",
    )).format(n=name, l=listing, c=coupon_s, p=paid)
    return text, str(paid - due), {"items": items, "coupon": coupon, "paid": paid}


_STOCKS = (("bakery", "muffins", "trays"), ("library", "books", "crates"), ("farm stand", "eggs", "cartons"),
           ("warehouse", "parcels", "pallets"), ("shop", "T-shirts", "boxes"), ("florist", "roses", "buckets"),
           ("cafe", "cookies", "tins"), ("garden centre", "seedlings", "trays"))


def _gen_inventory(rng: random.Random) -> tuple[str, str, dict]:
    place, thing, box = rng.choice(_STOCKS)
    count = start = rng.randint(40, 600)
    steps: list[list] = []
    sentences = [f"A {place} starts the day with {count} {thing}."]
    for _ in range(rng.randint(3, 5)):
        op = rng.choice(("sell", "add", "add_boxes", "remove_boxes", "half"))
        if op == "half" and (count % 2 or count < 10):
            op = "add"
        if op == "remove_boxes" and count < 8:
            op = "add"
        if op == "sell" and count < 2:
            op = "add"
        if op == "sell":
            k = rng.randint(1, count - 1)
            count -= k
            steps.append(["sell", k])
            sentences.append(rng.choice((f"It sells {k}.", f"Customers take {k} {thing}.", f"Then {k} are sold.")))
        elif op == "add":
            k = rng.randint(5, 150)
            count += k
            steps.append(["add", k])
            sentences.append(rng.choice((f"A delivery brings {k} more.", f"It receives {k} more {thing}.",
                                         f"Then {k} {thing} arrive.")))
        elif op == "add_boxes":
            b, s = rng.randint(2, 9), rng.randint(4, 24)
            count += b * s
            steps.append(["add_boxes", b, s])
            sentences.append(f"It gets {b} {box} holding {s} {thing} each.")
        elif op == "remove_boxes":
            s = rng.randint(4, min(24, count // 2))
            b = rng.randint(1, count // s)
            count -= b * s
            steps.append(["remove_boxes", b, s])
            sentences.append(f"It ships out {b} full {box if b > 1 else box[:-1]} of {s} {thing} each.")
        else:
            count //= 2
            steps.append(["half"])
            sentences.append(rng.choice(("Half of what is left is given away.", "It donates half of its stock.")))
    text = " ".join(sentences) + rng.choice((f" How many {thing} does it have at the end?",
                                             f" How many {thing} are left?"))
    return text, str(count), {"start": start, "steps": steps}


_VEHICLES = (("cyclist", "rides", 10, 36), ("train", "travels", 60, 240), ("hiker", "walks", 3, 7),
             ("car", "drives", 30, 120), ("boat", "sails", 10, 60), ("runner", "runs", 6, 18),
             ("bus", "travels", 20, 90))


def _gen_travel(rng: random.Random) -> tuple[str, str, dict]:
    who, verb, lo, hi = rng.choice(_VEHICLES)
    legs = []
    parts = []
    while len(legs) < 2 or (len(legs) < 3 and rng.random() < 0.4):
        minutes = rng.choice((15, 20, 30, 40, 45, 60, 90, 120, 150, 180, 240))
        speeds = [v for v in range(lo, hi + 1) if v * minutes % 60 == 0]
        if not speeds:
            continue
        speed = rng.choice(speeds)
        legs.append([speed, minutes])
        dur = f"{minutes} minutes" if minutes < 60 or minutes % 60 else f"{minutes // 60} hour{'s' if minutes > 60 else ''}"
        parts.append(f"at {speed} km/h for {dur}")
    distance = sum(Fraction(s * m, 60) for s, m in legs)
    assert distance.denominator == 1
    if rng.random() < 0.4:
        total = int(distance) + rng.randint(5, 200)
        text = (f"A {who} sets out on a {total} km journey and {verb} " + ", then ".join(parts)
                + ". How many kilometres are still left to go?")
        value, meta = total - int(distance), {"legs": legs, "total": total}
    else:
        text = f"A {who} {verb} " + ", then ".join(parts) + f". How many kilometres does the {who} cover in total?"
        value, meta = int(distance), {"legs": legs, "total": None}
    return text, str(value), meta


def _gen_ages(rng: random.Random) -> tuple[str, str, dict]:
    while True:
        k = rng.randint(3, 7)
        j = rng.randint(2, k - 1)
        child = rng.randint(2, 25)
        num = child * (k - j)
        if num % (j - 1) == 0 and 20 <= k * child <= 95:
            years = num // (j - 1)
            if 1 <= years <= 40:
                break
    parent_name, child_name = rng.sample(NAMES, 2)
    rel = rng.choice(("parent", "aunt or uncle", "grandparent", "older cousin"))
    ask = rng.choice(("parent", "child"))
    times = {2: "twice", 3: "three times", 4: "four times", 5: "five times", 6: "six times", 7: "seven times"}
    q = (f"How old is {parent_name} now?" if ask == "parent" else f"How old is {child_name} now?")
    text = (f"{parent_name} is {child_name}'s {rel}. Today {parent_name} is {times[k]} as old as {child_name}. "
            f"In {years} years, {parent_name} will be {times[j]} as old as {child_name}. {q}")
    truth = k * child if ask == "parent" else child
    return text, str(truth), {"k": k, "j": j, "years": years, "ask": ask}


# ---------------------------------------------------------------------------------- knowledge

KNOWLEDGE_TOPICS: tuple[tuple[str, ...], ...] = (
    ("photosynthesis", "the light-dependent reactions of photosynthesis", "C4 photosynthesis"),
    ("plate tectonics", "subduction zones", "how mountain ranges form"),
    ("the water cycle", "how clouds form", "groundwater recharge"),
    ("vaccines", "herd immunity", "mRNA vaccines"),
    ("antibiotic resistance", "how bacteria share resistance genes", "the discovery of penicillin"),
    ("black holes", "the event horizon of a black hole", "Hawking radiation"),
    ("the seasons on Earth", "why the equator is warm", "the midnight sun"),
    ("inflation", "how central banks set interest rates", "hyperinflation"),
    ("compound interest", "the rule of 72", "how mortgages are amortized"),
    ("supply and demand", "price elasticity", "price ceilings"),
    ("the printing press", "the Gutenberg Bible", "how printing changed literacy"),
    ("the Silk Road", "trade along the Silk Road", "the spread of paper to Europe"),
    ("the French Revolution", "the Estates-General of 1789", "the Reign of Terror"),
    ("the Industrial Revolution", "the steam engine", "early factory working conditions"),
    ("ancient Roman aqueducts", "Roman concrete", "Roman roads"),
    ("the Byzantine Empire", "the fall of Constantinople", "the Hagia Sophia"),
    ("TCP and UDP", "the TCP three-way handshake", "packet loss and retransmission"),
    ("public-key cryptography", "digital signatures", "how HTTPS keeps traffic private"),
    ("hash tables", "hash collisions", "consistent hashing"),
    ("garbage collection in programming languages", "reference counting", "generational garbage collection"),
    ("version control with git", "merge conflicts", "git rebase versus merge"),
    ("how a CPU cache works", "cache misses", "branch prediction"),
    ("neural networks", "backpropagation", "overfitting in machine learning"),
    ("the transformer architecture", "attention in language models", "tokenization of text"),
    ("the human immune system", "white blood cells", "allergies"),
    ("sleep", "REM sleep", "circadian rhythms"),
    ("the human heart", "blood pressure", "how arteries and veins differ"),
    ("nutrition and protein", "dietary fibre", "how the body uses carbohydrates"),
    ("the theory of evolution", "natural selection", "convergent evolution"),
    ("DNA replication", "how genes are expressed", "CRISPR gene editing"),
    ("coral reefs", "coral bleaching", "ocean acidification"),
    ("rainforests", "the nitrogen cycle", "pollination by insects"),
    ("renewable energy", "how solar panels make electricity", "wind turbines"),
    ("nuclear fission", "nuclear fusion", "radioactive half-life"),
    ("electric motors", "how batteries store energy", "alternating versus direct current"),
    ("bridges", "suspension bridges", "why concrete is reinforced with steel"),
    ("the Renaissance", "perspective in Renaissance painting", "the patronage of the Medici"),
    ("jazz", "the blues", "improvisation in music"),
    ("the scientific method", "controlled experiments", "peer review"),
    ("probability", "the law of large numbers", "the birthday paradox"),
    ("prime numbers", "the Pythagorean theorem", "the concept of infinity in mathematics"),
    ("volcanoes", "earthquakes and seismic waves", "tsunamis"),
    ("democracy in ancient Athens", "the separation of powers", "how elections are counted"),
    ("the history of writing", "the Rosetta Stone", "how alphabets developed"),
)
_KNOWLEDGE_TEMPLATES: tuple[str, ...] = (
    "Explain {t}.",
    "Tell me about {t}, and why the subject matters.",
    "Give a clear overview of {t}.",
    "What are the most common misconceptions about {t}?",
    "How would you explain {t} to someone who has never heard of the idea?",
    "Describe {t} and give one concrete real-world example.",
    "What are the key ideas someone should understand about {t}?",
    "Summarize what is known about {t}.",
    "Why should a non-specialist care about {t}?",
    "Walk me through {t} step by step.",
    "What questions do people usually ask about {t}? Answer the most important one.",
    "Teach me the basics of {t}.",
    "What is the history behind our understanding of {t}?",
    "Compare two different ways of thinking about {t}.",
)
_OPENERS: tuple[str, ...] = (
    "", "", "Quick question: ", "I'm studying for an exam. ", "I'm curious about something. ",
    "A friend asked me this and I wasn't sure. ", "For a presentation I'm preparing: ",
)
_AUDIENCES: tuple[str, ...] = (
    "", " Write for a curious twelve-year-old.", " Write for a high-school student.",
    " Write for a university student.", " Assume the reader is an expert in a different field.",
    " Write for a busy professional.", " Use one analogy from everyday life.",
    " Avoid jargon where you can.",
)
_FORMATS: tuple[str, ...] = (
    "", " Keep it to one paragraph.", " Use about three short paragraphs.",
    " Use a short bulleted list followed by a one-sentence summary.", " Keep it under 150 words.",
    " End with one surprising fact.",
)


def _gen_open(rng: random.Random) -> tuple[str, None, dict]:
    ti = rng.randrange(len(KNOWLEDGE_TOPICS))
    topic = rng.choice(KNOWLEDGE_TOPICS[ti])
    template = rng.choice(_KNOWLEDGE_TEMPLATES)
    text = rng.choice(_OPENERS) + template.format(t=topic) + rng.choice(_AUDIENCES) + rng.choice(_FORMATS)
    return text, None, {"topic_index": ti, "topic": topic}


_GENERATORS = {
    "arithmetic": _gen_arithmetic, "gcd_lcm": _gen_gcd_lcm, "linear": _gen_linear, "percent": _gen_percent,
    "syllogism": _gen_syllogism, "ordering": _gen_ordering,
    "shopping": _gen_shopping, "inventory": _gen_inventory, "travel": _gen_travel, "ages": _gen_ages,
    "open": _gen_open,
}
assert set(_GENERATORS) == {k for ks in KINDS.values() for k in ks}
