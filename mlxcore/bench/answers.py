"""Final answers in model replies: shared by the distill checks, the RL rewards and the bench.

`final_answer(text, answer_type, choices, prompt)` finds the reply's final answer and normalises
it, or returns None when the reply states no final answer (the distill `check` then rejects it as
`no_answer`; an RL completion then earns no correctness reward).

  where   The reply after its last `</think>` (an unclosed `<think>` means the answer never
          came: None).
  1 marks Explicit markers first: the last `Answer: ...` line (also "Final answer:",
          markdown bold "**Answer: 42**" / "**Answer:** 42", an answer on the line after a bare
          "Answer:"), else the last `#### ...` line, else the last `\\boxed{...}`. The first of
          these that normalises wins; when the reply has markers but none normalises
          ("Answer: it cannot be computed") there is no answer.
  2 ends  Numeric kinds only, for a reply without markers: its final statement must state the
          answer. The final statement is the reply's last sentence (markdown list markers and
          emphasis dropped; trailing sign-offs such as "Hope this helps!" skipped). None when it
          is unfinished (ends with "...", "…", a comma, colon, operator or a word such as "then",
          "and", "the"). Else it states an answer, unless it is a question ("?", "whether", "it
          depends") or, given the prompt, copied from it ("Find k if 5k - 66 = -31."), when it
            - holds a bold value: "**42**", "**42 apples**", "**x = 42**" (the last one counts);
            - is a lone value: "42", "$336.", "18 km";
            - begins "(So / Therefore ...) the (final) answer / result is|equals|= N";
            - has VERB N, the last such clause counting: VERB one of is / are / was / were /
              equals / "=" / comes to / totals / "'s" ("The total is $1,234.00.", "17 + 25 = 42",
              "x = -3", "That's 42."); after a conclusion word (so, therefore, thus, hence,
              finally, in total, in all, altogether, overall, in the end, which gives / makes /
              means) also gives / makes / leaves / gets / has / pays / costs / needs / becomes /
              reaches / remains / drops to / rises to / ends at ..., or N right after the word
              ("so 8 apples in total");
          where N is one number followed by at most four unit words ("42 apples", "12.5 km/h",
          "24.8%") up to the clause's end; not the head of a list ("are 14, 56, 56", "28 and
          56"), not a comparison ("6 more than", "3 times as"); "3 x 4 = 12" counts its last "=".
          Failing that, the last sentence anywhere that begins "(So ...) the answer / the result
          is N" counts ("The answer is 42. Each step was checked twice.").
          So a reply that restates the question ("To find 17 + 25 we add 17 and 25.", "It depends;
          compute lcm(28, 56) first, then ...") has no answer, whatever numbers it holds: there is
          no "last number in the text" fallback. Choice and name kinds take markers only.
  numbers `normalize_number`: "$1,234.00" -> "1234", "-3", "12.50" -> "12.5", "15%" -> "15",
          "3/4" and "0.75" -> "0.75", "1/3" -> "1/3", "\u22123" -> "-3"; compared exactly
          (fractions.Fraction). In a marked answer with an "=" the part after the last "=" counts
          ("x = -3").
  choices `normalize_choice`: yes / no / cannot tell, with synonyms ("True", "It cannot be
          determined", "Not enough information", "Not necessarily", ...).
  names   case-insensitive; `choices` (the prompt's names) picks the one name the answer
          mentions, so "Answer: Maria is the tallest." gives "maria".

Also here: `strip_think` (the one definition the chat client, the checker and the bench scorer
share) and `canonical_number` (how prompts write their truths).
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Iterable

_THINK_CLOSE = re.compile(r"</think>", re.I)
_THINK_OPEN = re.compile(r"<think>", re.I)


def strip_think(text: str) -> str | None:
    """The reply after its last `</think>`; None when a `<think>` block is never closed (the
    reasoning was cut off, so the answer never came). The one definition the client and the
    verifier share."""
    closes = list(_THINK_CLOSE.finditer(text))
    if closes:
        text = text[closes[-1].end():].lstrip()
    if _THINK_OPEN.search(text):
        return None
    return text



def canonical_number(value: Fraction | int) -> str:
    """An exact number as a string: "12", "-3", "12.5", or "1/3" when no finite decimal exists."""
    f = Fraction(value)
    if f.denominator == 1:
        return str(f.numerator)
    d, twos, fives = f.denominator, 0, 0
    while d % 2 == 0:
        d, twos = d // 2, twos + 1
    while d % 5 == 0:
        d, fives = d // 5, fives + 1
    if d != 1:
        return f"{f.numerator}/{f.denominator}"
    places = max(twos, fives)
    scaled = abs(f.numerator) * 10**places // f.denominator
    digits = str(scaled).rjust(places + 1, "0")
    out = f"{digits[:-places]}.{digits[-places:]}".rstrip("0").rstrip(".")
    return ("-" if f < 0 else "") + out


# ------------------------------------------------------------------------------- think blocks

_THINK_TAG = re.compile(r"</?think>", re.I)


# ------------------------------------------------------------------------------------ numbers

_NUMBER = re.compile(r"""
    (?<![\w.,/])                                 # not glued to a word, a decimal point or a fraction
    (?P<sign>[-\u2212\u2013]\s?)?
    (?:[$€£]\s?)?
    (?P<sign2>-)?
    (?P<num>(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)
    (?:\s?/\s?(?P<den>\d+)(?![\d.]))?
    (?![\d,]\d)
""", re.X)
_WHOLE_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:/[-+]?\d+)?")
_THOUSANDS = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d*)?")
_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty".split())}


def _to_fraction(s: str) -> Fraction | None:
    if "/" in s:
        num, den = s.split("/", 1)
        if Fraction(den) == 0:
            return None
        return Fraction(num) / Fraction(den)
    return Fraction(s)


def normalize_number(s: str) -> str | None:
    """A whole string read as one number, canonical ("1234", "-3", "12.5", "1/3"); else None.

    Tolerates surrounding space and markdown, a currency sign, thousands commas, a trailing
    "%" or full stop, a unicode minus and zero decimals ("42.00" -> "42")."""
    t = s.strip().strip("*_`").strip()
    t = t.rstrip(".;:!,").strip()
    t = (t.replace("\u2212", "-").replace("\u2013", "-").replace("\u202f", "").replace("\u2009", "")
         .replace("\xa0", " "))
    t = re.sub(r"(?<=\d) (?=\d{3}(?!\d))", "", t)  # "1 234" (thousands), but not "3 4"
    t = re.sub(r"(?<=[-+$€£]) +| +(?=%)", "", t)
    t = re.sub(r"^([-+]?)[$€£]", r"\1", t)
    t = re.sub(r"^[$€£]([-+]?)", r"\1", t)
    t = t.removesuffix("%")
    if "," in t:
        body = t.lstrip("+-")
        if not _THOUSANDS.fullmatch(body.split("/")[0]):
            return None
        t = t.replace(",", "")
    if t.lower() in _WORDS:
        return str(_WORDS[t.lower()])
    if not _WHOLE_NUMBER.fullmatch(t):
        return None
    f = _to_fraction(t)
    return None if f is None else canonical_number(f)


def _match_to_canonical(m: re.Match) -> str | None:
    neg = bool(m.group("sign") or m.group("sign2"))
    s = m.group("num").replace(",", "")
    if m.group("den"):
        s += "/" + m.group("den")
    f = _to_fraction(s)
    if f is None:
        return None
    return canonical_number(-f if neg else f)


def numbers(text: str) -> list[str]:
    """Every number in `text`, canonical, in order ("$1,200" -> "1200", "-3", "3/4" -> "0.75")."""
    return [c for c in (_match_to_canonical(m) for m in _NUMBER.finditer(text)) if c is not None]


_numbers = numbers


_LATEX = (
    (re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}"), r"(\1)/(\2)"),
    (re.compile(r"\\text(?:bf|rm)?\s*\{([^{}]*)\}"), r"\1"),
    (re.compile(r"\\mathrm\s*\{([^{}]*)\}"), r"\1"),
    (re.compile(r"\\[$%]"), lambda m: m.group(0)[1]),
    (re.compile(r"\\[,;!: ]|\\left|\\right|\\displaystyle"), ""),
)


def _clean_latex(s: str) -> str:
    for pat, rep in _LATEX:
        s = pat.sub(rep, s)
    s = re.sub(r"\((-?\d+)\)/\((\d+)\)", r"\1/\2", s)  # \frac{3}{4} -> 3/4
    return s.replace("\\", "")


# several different numbers joined like this state no one answer (a hedge), not a number and its working
_HEDGE = re.compile(r"\b(?:or|either|otherwise|if|unless|maybe|perhaps|possibly|between)\b|[,;]|\.\.\.|\band\b")


def number_from_candidate(cand: str) -> str | None:
    """The number a marked answer states ("x = -3" -> "-3", "$1,200." -> "1200", "ten" -> "10")."""
    cand = _clean_latex(cand)
    if "=" in cand:
        cand = cand.rsplit("=", 1)[1]
    whole = normalize_number(cand)
    if whole is not None:
        return whole
    nums = _numbers(cand)
    if len(set(nums)) > 1 and _HEDGE.search(cand):  # "-7 or -6", "-7, -6, -5", "4 if we round, otherwise 5"
        return None
    if nums:
        return nums[0]
    words = re.findall(r"[a-z]+", cand.lower())
    for w in words:
        if w in _WORDS:
            return str(_WORDS[w])
    return None


# ------------------------------------------------------------------------- choices and names

_CANNOT = re.compile(
    r"\b(?:can ?not|can't|cant|impossible to|unable to|no way to)\s+(?:be\s+)?(?:tell|told|determin\w*|know\w*|say|said|conclude\w*|decide\w*)\b"
    r"|\bundetermin\w*|\bindetermin\w*|\bundecid\w*|\bnot (?:enough|sufficient) information\b"
    r"|\binsufficient\b|\bunknown\b|\buncertain\b|\bnot necessarily\b|\bunclear\b|\bmaybe\b"
    r"|\bit depends\b|\bnot determin\w*|\bcan(?:'t| ?not) be sure\b|\bneither\b|\bunknowable\b")
_YES = re.compile(r"^(?:yes|true|correct|valid|yep|definitely(?: yes)?|certainly)\b")
_NO = re.compile(r"^(?:no|false|incorrect|invalid|nope|definitely not)\b")


def normalize_choice(s: str) -> str | None:
    """"yes", "no" or "cannot tell" for an answer such as "Yes.", "**No**", "It cannot be
    determined"; None when it says none of these."""
    t = s.lower().replace("\u2019", "'")
    t = re.sub(r"[*_`\"]", "", t).strip().strip(".!:;,()[] ")
    t = re.sub(r"^(?:the answer is|answer is|my answer is|so|therefore|thus|hence)[\s:,]+", "", t)
    if _CANNOT.search(t):
        return "cannot tell"
    said = {c for c, pat in (("no", _NO), ("yes", _YES)) if pat.match(t)}
    said |= {c for c, w in (("no", r"\bno\b"), ("yes", r"\byes\b")) if said and re.search(w, t)}
    return said.pop() if len(said) == 1 else None  # "yes or no" states neither


def normalize_name(s: str, choices: Iterable[str] | None = None) -> str | None:
    """A name, lowercased. With `choices`: the one choice the answer mentions (None if it
    mentions none or several); without: the answer when it is one word, else the word after
    "is" ("The tallest is Maria") or the first word ("Maria is the tallest")."""
    t = re.sub(r"[*_`\"]", "", s).strip().strip(".!:;,()[] ").lower()
    if not t:
        return None
    if choices is not None:
        found = {c.lower() for c in choices if re.search(rf"\b{re.escape(c.lower())}\b", t)}
        return found.pop() if len(found) == 1 else None
    words = re.findall(r"[^\W\d_][\w'-]*", t)
    if not words:
        return None
    if len(words) == 1:
        return words[0]
    m = re.match(r"^(?:the\s+)?(?:second\s+)?\w+(?:est)?(?:\s+(?:one|person))?\s+is\s+([^\W\d_][\w'-]*)", t)
    if m and (words[0] in ("the", "second") or words[0].endswith("est")):
        return m.group(1)
    return words[0]


# ------------------------------------------------------------------------------- extraction

_ANSWER_LINE = re.compile(
    r"^[ \t>*_#-]*(?:\*\*)?(?:the\s+)?(?:final\s+)?answer(?:\*\*)?\s*(?:is)?\s*[:：]\s*(?P<rest>.*?)\s*$",
    re.I | re.M)
_HASHES = re.compile(r"^\s*####\s*(?P<rest>.+?)\s*$", re.M)


def _boxed(text: str) -> list[str]:
    out = []
    for m in re.finditer(r"\\boxed\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            out.append(text[m.end():i - 1])
    return out


def explicit_candidates(body: str) -> list[str]:
    """Marked answers in order of preference: last Answer line, last ####, last \\boxed."""
    cands = []
    lines = list(_ANSWER_LINE.finditer(body))
    if lines:
        m = lines[-1]
        rest = m.group("rest").strip().strip("*_").strip()
        if not rest:
            after = [ln.strip() for ln in body[m.end():].splitlines() if ln.strip()]
            rest = after[0] if after else ""
        if rest:
            boxed = _boxed(rest)
            cands.append(boxed[-1] if boxed else rest)
    hashes = list(_HASHES.finditer(body))
    if hashes:
        cands.append(hashes[-1].group("rest"))
    boxed = _boxed(body)
    if boxed:
        cands.append(boxed[-1])
    return cands


# A reply's final statement (numeric kinds without markers; see the module doc).

_SIGNOFF = re.compile(r"\b(?:hope (?:this|that|it) helps|let me know|feel free|happy to help|good luck|"
                      r"cheers|thanks|thank you|any (?:other|more|further) questions)\b", re.I)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=\S)")
_MD_LINE = re.compile(r"^[ \t]*(?:>+|#{1,6}(?=\s)|[-*+•](?=\s)|\d+[.)](?=\s))?[ \t]*")
_UNFINISHED = re.compile(
    r"(?:\.\.\.|…|[,;:=+*/×÷(\[-]|\b(?:then|and|or|so|plus|minus|times|by|to|of|the|a|an|is|are|we|next|"
    r"first|which|that|because|since|with|from|into|gives?|equals?|makes?|get|gets)\b)\s*$", re.I)
_QUESTION = re.compile(r"\?|\bwhether\b|\bit depends\b", re.I)
_CUE = re.compile(r"\b(?:so|therefore|thus|hence|finally|in total|in all|altogether|all together|overall|"
                  r"in the end|in conclusion|which (?:gives|makes|means)|that (?:gives|makes|means)|"
                  r"this (?:gives|makes|means))\b", re.I)
_STRONG_VERB = r"\bis\b|\bare\b|\bwas\b|\bwere\b|\bequals?\b|=|\bcomes? to\b|\btotals?\b|(?<=\w)['’]s\b"
_VERB = re.compile(_STRONG_VERB, re.I)
_CUE_VERB = re.compile(
    _STRONG_VERB + r"|\b(?:gives?|gave|makes?|made|leaves?|left(?: with)?|gets?|got|has|have|had|pays?|paid|"
    r"costs?|needs?|becomes?|reach(?:es)?|remains?|be|total of|(?:drops?|falls?|rises?|goes|increases?|"
    r"decreases?|grows?) (?:up |down )?to|ends? (?:up )?(?:at|with))\b", re.I)
_ANSWER_PHRASE = re.compile(
    r"^(?:(?:so|therefore|thus|hence|finally|overall|in conclusion|in the end|and)\b[\s,]*)*"
    r"(?:the\s+|my\s+|our\s+)?(?:final\s+)?(?:answer|result)\s+"
    r"(?:is|equals|=|would be|will be|should be|comes to)\b\s*:?", re.I)
_CLAUSE_END = re.compile(r"[,;]\s|[.!?](?:\s|$)|\s(?:which|because|since|as|and|but|so|for|if|when)\b", re.I)
_LIST_GOES_ON = re.compile(r"\s*(?:(?:and|or)\s+)?[-\u2212$€£]?\s?\.?\d", re.I)
_UNIT_TAIL = re.compile(r"(?:[^\W\d_][\w/°%’'.-]*\s*){0,4}|%\s*(?:[^\W\d_][\w/°’'.-]*\s*){0,3}")
_COMPARISON = re.compile(r"\b(?:more|less|fewer|than|times|older|younger|bigger|smaller|greater|higher|"
                         r"lower|longer|shorter|per cent of|percent of|of)\b", re.I)
_BOLD = re.compile(r"\*\*(.+?)\*\*|__(.+?)__")


def _plain(s: str) -> str:
    """A line without markdown emphasis, inline code or TeX delimiters."""
    s = _clean_latex(s)
    s = re.sub(r"\*\*|__|`", "", s)
    s = re.sub(r"(?<![\w*])\*(?!\s)|(?<=\S)\*(?![\w*])", "", s)
    return re.sub(r"\$(?!\s?\.?\d)", "", s).strip()


def _value(seg: str) -> str | None:
    """The number `seg` states when it is just a value: "42", "$1,234.00 left", "3 x 4 = 12",
    "24.8%", "18 km/h" (a number and at most four unit words); else None."""
    m = _CLAUSE_END.search(seg)
    if m:
        if _LIST_GOES_ON.match(seg, m.end()):
            return None  # "are 14, 56, 56", "28 and 56": a list of numbers, not one value
        seg = seg[:m.start()]
    if "=" in seg:
        seg = seg.rsplit("=", 1)[1]
    seg = seg.strip().rstrip(".!")
    num = _NUMBER.match(seg)
    if not num:
        return None
    tail = seg[num.end():].strip()
    if not _UNIT_TAIL.fullmatch(tail) or _COMPARISON.search(tail):
        return None
    return _match_to_canonical(num)


def _statements(body: str) -> list[tuple[str, str]]:
    """(raw, plain) sentences of the reply, in order (lines without a letter or digit, such as
    a markdown rule, are left out)."""
    out = []
    for line in body.splitlines():
        raw = _MD_LINE.sub("", line).strip()
        if re.search(r"[^\W_]", raw):
            out += [(r, _plain(r)) for r in _SENTENCE_END.split(raw) if r.strip()]
    return out


def _lone(plain: str) -> str | None:
    """The number when the statement is nothing but a value ("42", "$336.", "18 km")."""
    t = plain.strip().rstrip(".!")
    num = _NUMBER.match(t)
    if not num or not _UNIT_TAIL.fullmatch(t[num.end():].strip()) or _COMPARISON.search(t[num.end():]):
        return None
    return _match_to_canonical(num)


def _squash(s: str) -> str:
    return " ".join(re.sub(r"[*_`$\\]", "", s).lower().split()).strip(" .!:")


def _copied(statement: str, prompt: str | None) -> bool:
    """A final statement of three or more words taken word for word from the prompt."""
    return bool(prompt) and len(statement.split()) >= 3 and _squash(statement) in _squash(prompt)


def _stated_number(raw: str, plain: str) -> str | None:
    """The answer a final statement states (module doc, step 2), or None."""
    for m in reversed(list(_BOLD.finditer(raw))):
        v = _value(_plain(m.group(1) or m.group(2)))
        if v is not None:
            return v
    v = _lone(plain)
    if v is not None:
        return v
    m = _ANSWER_PHRASE.match(plain)
    if m:
        return _value(plain[m.end():])
    cue = _CUE.search(plain)
    verbs = list((_CUE_VERB if cue else _VERB).finditer(plain, cue.end() if cue else 0))
    for verb in reversed(verbs):
        v = _value(plain[verb.end():])
        if v is not None:
            return v
    if cue:
        return _value(plain[cue.end():].lstrip(" ,:"))
    return None


def final_number(text: str, prompt: str | None = None) -> str | None:
    """The number a reply states as its final answer, canonical, or None (the module doc's rule
    for numeric kinds: markers, else the final statement). Shared by distill checks and RL rewards."""
    return final_answer(text, "number", prompt=prompt)


def _implicit_number(body: str, prompt: str | None) -> str | None:
    statements = _statements(body)
    if not statements or _UNFINISHED.search(statements[-1][1]):
        return None  # nothing, or the reply stops mid-computation
    while len(statements) > 1 and _SIGNOFF.search(statements[-1][1]) and not re.search(r"\d", statements[-1][1]):
        statements.pop()  # "Hope this helps!"
    raw, plain = statements[-1]
    if not _QUESTION.search(plain) and not _copied(plain, prompt):
        v = _stated_number(raw, plain)
        if v is not None:
            return v
    for raw, plain in reversed(statements):  # "The answer is 42." before a closing remark
        m = _ANSWER_PHRASE.match(plain)
        if m and not _QUESTION.search(plain) and not _copied(plain, prompt):
            v = _value(plain[m.end():])
            if v is not None:
                return v
    return None


def final_answer(text: str, atype: str | None, choices: Iterable[str] | None = None,
                 prompt: str | None = None) -> str | None:
    """The reply's normalised final answer of type `atype` ("number", "choice", "name", "text";
    None: no truth to compare), or None when it states none (see the module doc)."""
    if atype is None or not text:
        return None
    body = strip_think(text)
    if body is None:
        return None
    cands = explicit_candidates(body)
    choices = list(choices) if choices is not None else None
    for cand in cands:
        if atype == "number":
            out = number_from_candidate(cand)
        elif atype == "choice":
            out = normalize_choice(cand)
        elif atype == "name":
            out = normalize_name(cand, choices)
        else:
            out = cand.strip() or None
        if out is not None:
            return out
    if not cands and atype == "number":
        return _implicit_number(body, prompt)
    return None
