"""Answer extraction and checking for the reasoning benchmarks, following SkyThought's rules task by
task (pure functions on strings).

The paper scored AIME24, MATH500, GSM8K and GPQA-Diamond with SkyThought (NovaSky-AI/SkyThought,
`skythought/evals`: the math, GSM8K and GPQA handlers and `util/math_parsing_util.py`, itself from
Qwen2.5-Math). The built-in scorer applies the same rules, written here from reading them, so that a
run without SkyThought gives the number SkyThought would have given:

- everything is read from the whole response, reasoning included: a response cut inside its think
  block is still scored (SkyThought never looks for `</think>`);
- `math` (AIME24, MATH500): the answer is the content of the last `boxed`, else what follows the last
  "he answer is" / "final answer is", else the last number; prediction and gold are normalised
  (`normalize_answer`) and compared by `answers_equal` (strings, numbers within 1e-4 and the x100 /
  /100 percentage forms, brackets, element-wise tuples and matrices, equations, then sympy);
- `number` (GSM8K): the same extraction, then the last number in it, compared as a string with the
  gold number (the one after "####", commas removed);
- `choice` (GPQA): the last stand-alone A, B, C or D of the upper-cased response.

The departures that remain (each on purpose) are listed in docs/paper.md.
"""

from __future__ import annotations

import math
import re
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass

# Which rules scored a built-in reasoning result (recorded in its settings: a result scored by
# other rules is recomputed). Change it whenever a rule here changes a verdict.
SCORER = "skythought-0.1.0-rules"

# --- extraction ------------------------------------------------------------------------------

# The step separator of Math-Shepherd-style process-reward data; SkyThought deletes it first.
_STEP_TAG = "\u043a\u0438"
# Minerva's few-shot answers end "Final Answer: The final answer is $x$. I hope it is correct."
_MINERVA_OPEN, _MINERVA_CLOSE = "final answer is $", "$. I hope"
# "he answer is" (not "the answer is") also matches "The answer is" at a sentence start.
_ANSWER_IS, _FINAL_ANSWER_IS, _CHINESE_ANSWER_IS = "he answer is", "final answer is", "答案是"
_LAST_NUMBER = re.compile(r"-?\d*\.?\d+")


@dataclass(frozen=True)
class Check:
    correct: bool
    extracted: str | None  # what was compared (None: nothing extractable)
    reason: str  # "correct", "wrong answer", "no answer", "no choice letter"
    rule: str = ""  # which rule found the answer: boxed, answer is, last number, ...


def extract_answer(response: str) -> tuple[str, str]:
    """(normalised answer, the rule that found it) from the whole response; ("", "none") if nothing."""
    text = response.replace(_STEP_TAG, "")
    if _MINERVA_OPEN in text and _MINERVA_CLOSE in text:
        raw, rule = text.split(_MINERVA_OPEN, 1)[1].split(_MINERVA_CLOSE, 1)[0].strip(), "minerva"
    elif "boxed" in text:
        raw, rule = after_last_boxed(text), "boxed"
    elif _ANSWER_IS in text:
        raw, rule = text.rsplit(_ANSWER_IS, 1)[1].strip(), "answer is"
    elif _FINAL_ANSWER_IS in text:
        raw, rule = text.rsplit(_FINAL_ANSWER_IS, 1)[1].strip(), "final answer is"
    elif _CHINESE_ANSWER_IS in text:  # the first one, up to the paragraph's end (few-shot Chinese answers)
        raw, rule = text.split(_CHINESE_ANSWER_IS, 1)[1].strip().split("\n\n")[0].strip(), "answer is (zh)"
    else:
        numbers = _LAST_NUMBER.findall(text.replace(",", ""))
        raw, rule = (numbers[-1], "last number") if numbers else ("", "none")
    raw = re.sub(r"\n\s*", "", raw)  # an answer wrapped over lines is one answer
    raw = raw.removeprefix(":").removesuffix(".").removesuffix("/")
    return normalize_answer(raw), rule


def after_last_boxed(text: str) -> str:
    """What follows the last "boxed": its braces' content (balanced; an unclosed box runs to the end
    of the text), or for `\\boxed 5$` the text up to the next `$`."""
    after = text.rsplit("boxed", 1)[1]
    if not after.startswith("{"):
        return after.split("$")[0].strip()
    depth = 0
    for position, char in enumerate(after):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth == 0:
            return after[1:position]
    return after[1:]


# --- normalisation ---------------------------------------------------------------------------

_UNITS = {"zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
          "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15,
          "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19, "twenty": 20, "thirty": 30,
          "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90}
_SCALES = {"thousand": 1_000, "million": 1_000_000, "billion": 1_000_000_000}


def number_from_words(text: str) -> str | None:
    """"twenty five" -> "25", "007" -> "7"; None unless every word is a number word.

    SkyThought converts with word2number, which also reads the number words out of a longer text
    ("five apples" -> 5); here only a text made of number words is converted (docs/paper.md).
    """
    if text.isdigit():
        return str(int(text))
    words = text.lower().replace("-", " ").split()
    if not words or any(w not in _UNITS and w not in _SCALES and w != "hundred" for w in words):
        return None
    total = current = 0
    for word in words:
        if word in _UNITS:
            current += _UNITS[word]
        elif word == "hundred":
            current = (current or 1) * 100
        else:
            total += (current or 1) * _SCALES[word]
            current = 0
    return str(total + current)


def _braced_fractions(text: str) -> str:
    r"""\frac12 -> \frac{1}{2}, \frac1{72} -> \frac{1}{72}; a \frac with fewer than two characters
    after it leaves the text unchanged."""
    pieces = text.split("\\frac")
    out = pieces[0]
    for piece in pieces[1:]:
        if piece.startswith("{"):
            out += "\\frac" + piece
            continue
        if len(piece) < 2:
            return text
        numerator, rest = piece[0], piece[1:]
        out += "\\frac{" + numerator + "}" + (rest if rest[0] == "{" else "{" + rest[0] + "}" + rest[1:])
    return out


def _slash_fraction(text: str) -> str:
    r"""3/4 -> \frac{3}{4} when both sides are plain integers (or hold a sqrt)."""
    parts = text.split("/")
    if len(parts) != 2:
        return text
    sides = []
    for side in parts:
        if "sqrt" in side:
            sides.append(side)
        elif re.fullmatch(r"-?\d+", side):
            sides.append(str(int(side)))
        else:
            return text
    if f"{sides[0]}/{sides[1]}" != text:  # "03/4" or "+3/4": not a plain fraction
        return text
    return "\\frac{" + sides[0] + "}{" + sides[1] + "}"


_LATEX_SPELLINGS = (("tfrac", "frac"), ("dfrac", "frac"), ("\\neq", "\\ne"), ("\\leq", "\\le"), ("\\geq", "\\ge"),
                    ("\\left", ""), ("\\right", ""), ("\\{", "{"), ("\\}", "}"))
_DROPPED = ("^{\\circ}", "^\\circ", "\\$", "$", "\\(", "\\)")
_VARIABLE_PREFIXES = ("x=", "y=", "z=", "x\\in", "y\\in", "z\\in", "x\\to", "y\\to", "z\\to")


def normalize_answer(answer: str) -> str:
    """SkyThought's answer normalisation (its `strip_answer_string`), step by step.

    Each step exists because models write the same answer several ways: units and `\\text{}`
    around numbers, `\\dfrac` for `\\frac`, degrees, dollar signs, percentages, "x = 3", `3/4`,
    unordered integer lists, number words.
    """
    s = str(answer).strip().replace("\n", "").rstrip(".")
    s = s.replace("\\!", "")
    s = re.sub(r"\\begin\{array\}\{.*?\}", r"\\begin{pmatrix}", s)
    s = s.replace("\\end{array}", "\\end{pmatrix}").replace("bmatrix", "pmatrix")
    for old, new in _LATEX_SPELLINGS:
        s = s.replace(old, new)
    s = re.sub(r"\\text\{([a-zA-Z]+)\}", lambda m: number_from_words(m.group(1)) or m.group(0), s)
    s = re.sub(r"(cm|inches)\}\^2", r"\1}", s)  # an area's unit: the square goes with the unit
    without_unit = re.sub(r"\\text\{.*?\}$", "", s).strip()  # a trailing \text{...} is a unit
    s = without_unit or s
    for dropped in _DROPPED:
        s = s.replace(dropped, "")
    s = number_from_words(s) or s
    s = re.sub(r"\\text\{(.*?)\}", r"\1", s)
    for prefix in _VARIABLE_PREFIXES:
        s = s.replace(prefix, "")
    s = s.replace("\\emptyset", "{}").replace("(-\\infty,\\infty)", "\\mathbb{R}")
    s = s.replace("\\%", "").replace("%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    s = s.replace("infinity", "\\infty")
    if "\\infty" not in s:
        s = s.replace("inf", "\\infty")
    s = s.replace("+\\inity", "\\infty")
    s = s.replace("and", "").replace("\\mathbf", "")  # "3 and 5" lists, bold vectors
    s = re.sub(r"\\mbox\{.*?\}", "", s)
    if "j" in s and "i" not in s:  # the imaginary unit written j
        s = s.replace("j", "i")
    s = re.sub(r"(\d+)\.0*([^\d])", r"\1\2", s)  # 2.0x -> 2x, 3.00 -> 3
    s = re.sub(r"(\d+)\.0*$", r"\1", s)
    if not s:
        return s
    if s.startswith("."):
        s = "0" + s
    sides = s.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:  # "k = 5" -> "5"
        s = sides[1]
    s = re.sub(r"\\sqrt(\w+)", r"\\sqrt{\1}", s)
    s = s.replace(" ", "")
    s = _braced_fractions(s)
    s = _slash_fraction(s)
    s = re.sub(r"\\(?=-?\d+(\\|\)|,|\]|$))", "", s)  # a stray backslash before a number
    s = re.sub(r"thgrade$", "", s)  # "12th grade" -> "12"
    if re.fullmatch(r"(\s*-?\d+\s*,)*\s*-?\d+\s*", s):  # integers listed in any order
        s = ",".join(str(v) for v in sorted(int(x) for x in s.split(",")))
    return s


# --- equality --------------------------------------------------------------------------------

REL_TOL = 1e-4
SYMBOLIC_SECONDS = 5  # SkyThought waits for sympy without limit; a comparison over this counts as unequal
_CHOICE_LETTERS = ("A", "B", "C", "D", "E")
_BRACKETED = re.compile(r"[(\[].+[)\]]")
_PMATRIX_OPEN, _PMATRIX_CLOSE = "\\begin{pmatrix}", "\\end{pmatrix}"


def _as_number(text: str) -> float | None:
    text = text.replace(",", "")
    try:
        return float(text)
    except ValueError:
        pass
    if text.endswith("%"):
        try:
            return float(text[:-1].removesuffix("\\")) / 100
        except ValueError:
            return None
    return None


def _choice_in(text: str) -> str:
    """The last stand-alone letter A-E of a text (a gold answer that is a letter), else the text."""
    text = text.strip("\n").rstrip(".").rstrip("/").strip(" ").lstrip(":")
    letters = re.findall(r"\b[A-E]\b", text.upper())
    return (letters[-1] if letters else text.strip().strip(".")).rstrip(".").rstrip("/")


def _as_pmatrix(text: str) -> str:
    """`{1,2},{3,4}` -> pmatrix rows, for a gold vector written as a set when the prediction is a matrix."""
    rows = [m.strip("{}") for m in re.findall(r"\{.*,.*\}", text.strip())]
    return ", ".join(_PMATRIX_OPEN + row.replace(",", "\\") + _PMATRIX_CLOSE for row in rows)


def answers_equal(predicted: str, gold: str) -> bool:
    """SkyThought's equality (its `math_equal`) of two normalised answers."""
    if predicted.strip().lower() == gold.strip().lower():
        return True
    if gold in _CHOICE_LETTERS and _choice_in(predicted) == gold:
        return True
    p, g = _as_number(predicted), _as_number(gold)
    if p is not None and g is not None:
        # a percentage question answered as a fraction (25 vs 0.25) or the reverse counts
        return any(math.isclose(candidate, p, rel_tol=REL_TOL) for candidate in (g / 100, g, g * 100))
    if not predicted:
        return False
    predicted, gold = predicted.strip(), gold.strip()
    if "pmatrix" in predicted and "pmatrix" not in gold:
        gold = _as_pmatrix(gold)
    if _equal_without_brackets(predicted, gold):
        return True
    if _BRACKETED.match(predicted) and _BRACKETED.match(gold):  # tuples and intervals, element by element
        p_items, g_items = predicted[1:-1].split(","), gold[1:-1].split(",")
        if len(p_items) == len(g_items) and all(answers_equal(a, b) for a, b in zip(p_items, g_items)):
            return True
    if _matrices_equal(predicted, gold):
        return True
    if predicted.count("=") == 1 and gold.count("=") == 1:  # equations: equal up to sides and sign
        p_zero, g_zero = (f"{lhs.strip()} - ({rhs.strip()})" for lhs, rhs in (predicted.split("="), gold.split("=")))
        if symbolic_equal(p_zero, g_zero) or symbolic_equal(f"-({p_zero})", g_zero):
            return True
    elif predicted.count("=") == 1 and len(predicted.split("=")[0].strip()) <= 2 and "=" not in gold:
        if answers_equal(predicted.split("=")[1], gold):  # "k = 5" against 5
            return True
    elif gold.count("=") == 1 and len(gold.split("=")[0].strip()) <= 2 and "=" not in predicted:  # noqa: SIM102
        if answers_equal(predicted, gold.split("=")[1]):
            return True
    return symbolic_equal(predicted, gold)


def _equal_without_brackets(predicted: str, gold: str) -> bool:
    """Equal once braces and parentheses are dropped; a bracketed prediction also loses its outer
    square brackets unless the gold opens with the other kind."""
    p, g = predicted, gold
    if (p.startswith("[") and p.endswith("]") and not g.startswith("(")) or (
            p.startswith("(") and p.endswith(")") and not g.startswith("[")):
        p, g = p.strip("[]()"), g.strip("[]()")
    p, g = (re.sub(r"[{}()]", "", x) for x in (p, g))
    return p.lower() == g.lower()


def _matrix_rows(text: str) -> list[list[str]] | None:
    if not (text.startswith(_PMATRIX_OPEN) and text.endswith(_PMATRIX_CLOSE)):
        return None
    body = text[len(_PMATRIX_OPEN) : -len(_PMATRIX_CLOSE)]
    return [row.strip().split("&") for row in body.split("\\\\") if row.strip()]


def _matrices_equal(predicted: str, gold: str) -> bool:
    p_rows, g_rows = _matrix_rows(predicted), _matrix_rows(gold)
    if p_rows is None or g_rows is None or len(p_rows) != len(g_rows):
        return False
    return all(len(p) == len(g) and all(answers_equal(a, b) for a, b in zip(p, g)) for p, g in zip(p_rows, g_rows))


class _SymbolicTimeout(BaseException):
    """Raised by the alarm; a BaseException so that sympy's own `except Exception` cannot swallow it."""


@contextmanager
def _time_limit(seconds: int):
    """An alarm after `seconds` in the main thread (signals work only there); elsewhere no limit."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGALRM"):
        yield
        return

    def expire(signum, frame):
        raise _SymbolicTimeout()

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _to_sympy(text: str):
    """A sympy object, or the text itself when no parser reads it. SkyThought's order: sympy's
    parse_latex (which needs an antlr runtime that latex2sympy2's pin excludes, so it never parses
    there), parse_expr, then latex2sympy; each on the text with `\\\\` halved, then as it is."""
    from latex2sympy2_extended import latex2sympy
    from sympy.parsing.sympy_parser import parse_expr

    for parser in (parse_expr, latex2sympy):
        for candidate in dict.fromkeys((text.replace("\\\\", "\\"), text)):
            try:
                return parser(candidate)
            except Exception:  # noqa: BLE001, S112 - any parse failure means "try the next parser", as in SkyThought
                continue
    return text


def symbolic_equal(a: str, b: str) -> bool:
    """Equal as sympy objects: same form, zero difference, same equation, same value, same rounded matrix."""
    from sympy import N, simplify

    def same_form(x, y):
        return str(x) == str(y) or x == y

    def zero_difference(x, y):
        return x.equals(y) or simplify(x - y) == 0

    def same_equation(x, y):
        return abs(x.lhs - x.rhs).equals(abs(y.lhs - y.rhs))

    def same_value(x, y):
        return math.isclose(float(N(y)), float(N(x)), rel_tol=REL_TOL)

    def same_rounded_matrix(x, y):
        return x.shape == y.shape and x.applyfunc(lambda v: round(v, 3)).equals(y.applyfunc(lambda v: round(v, 3)))

    try:
        with _time_limit(SYMBOLIC_SECONDS):
            x, y = _to_sympy(a), _to_sympy(b)
            for test in (same_form, zero_difference, same_equation, same_value, same_rounded_matrix):
                try:
                    if test(x, y):
                        return True
                except Exception:  # noqa: BLE001, S112 - a test that does not apply (no .lhs, no .shape, a string) is False
                    continue
    except _SymbolicTimeout:
        return False
    return False


# --- checks per answer format ----------------------------------------------------------------

_GSM8K_NUMBER = re.compile(r"-?[$0-9.,]{2,}|-?[0-9]+")


def _verdict(correct: bool, extracted: str, rule: str) -> Check:
    if not extracted:
        return Check(False, None, "no answer", rule)
    return Check(correct, extracted, "correct" if correct else "wrong answer", rule)


def check_math(response: str, gold: str) -> Check:
    """AIME / MATH: SkyThought's math handler normalises the extracted answer a second time."""
    answer, rule = extract_answer(response)
    predicted = normalize_answer(answer)
    return _verdict(bool(predicted) and answers_equal(predicted, normalize_answer(gold)), predicted, rule)


def check_number(response: str, gold: str) -> Check:
    """GSM8K: the last number of the extracted answer, as a string, against the gold number."""
    answer, rule = extract_answer(response)
    # SkyThought also meant to drop a trailing period and asterisks here, but its two patterns were
    # joined into one that never matches; the number pattern below leaves both out anyway.
    numbers = _GSM8K_NUMBER.findall(answer.replace(",", "").replace("$", ""))
    predicted = numbers[-1].strip() if numbers else ""
    return _verdict(predicted == gold.strip().replace(",", ""), predicted, rule)


def extract_choice(response: str, letters: str = "ABCD") -> str | None:
    """The last stand-alone option letter of the whole response, upper-cased first, as SkyThought's
    GPQA handler reads it: `\\boxed{C}` gives C, and so does "... choose c" (and a lone article "a"
    after the answer counts as A, a SkyThought rule kept so that the numbers compare)."""
    found = re.findall(rf"\b[{letters}]\b", response.upper())
    return found[-1] if found else None


def check_choice(response: str, gold: str) -> Check:
    letter = extract_choice(response)
    if letter is None:
        return Check(False, None, "no choice letter", "last letter")
    correct = letter == gold.strip().upper()
    return Check(correct, letter, "correct" if correct else "wrong answer", "last letter")


CHECKERS = {"math": check_math, "number": check_number, "choice": check_choice}


def check_answer(answer_format: str, response: str, gold: str) -> Check:
    try:
        checker = CHECKERS[answer_format]
    except KeyError:
        raise ValueError(f"unknown answer format {answer_format!r}; choose one of: {', '.join(CHECKERS)}") from None
    return checker(response, gold)
