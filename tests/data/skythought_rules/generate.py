"""Regenerate cases.jsonl: each case's answer and verdict as SkyThought itself gives them.

Needs SkyThought's released package (read, not installed: it pins vllm) and the libraries its
scorer imports, in a separate environment (latex2sympy2 pins an antlr runtime that conflicts
with math-verify's):

    python -m venv /tmp/sky && /tmp/sky/bin/pip install regex latex2sympy2 word2number sympy
    pip download --no-deps --python-version 3.10 --only-binary=:all: skythought==0.1.0 -d /tmp/whl
    unzip -q /tmp/whl/skythought-0.1.0-py3-none-any.whl -d /tmp/skythought
    /tmp/sky/bin/python tests/data/skythought_rules/generate.py /tmp/skythought

The cases are Qwen3-format responses (a closed or cut think block, then the answer) built from the
bundled GSM8K and MATH-500 rows and from answer pairs where SkyThought's rules and math-verify
disagree. SkyThought's functions are called exactly as its handlers call them (math, gsm8k,
gpqa_diamond handlers of skythought 0.1.0).
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parents[2]
THINK = "<think>\nOkay, let me work this out step by step.\n</think>\n\n"
CUT = "<think>\nOkay, let me work this out step by step. "


def cases() -> list[dict]:
    out = []
    math_rows = [json.loads(line) for line in (ROOT / "eval/data/math500.jsonl").open()]
    for row in math_rows:
        gold = row["answer"]
        for variant in (gold, gold.replace("\\frac", "\\dfrac"), gold + "1", "x = " + gold, gold + " \\text{ units}"):
            out.append({"format": "math", "response": f"{THINK}So the result is $\\boxed{{{variant}}}$.", "gold": gold})
        out.append({"format": "math", "response": f"{THINK}The answer is {gold}.", "gold": gold})
        out.append({"format": "math", "response": f"{CUT}we get \\boxed{{{gold}}} and then I keep", "gold": gold})
    pairs = [("5", "500"), ("25", "0.25"), ("\\frac{1}{2}", "0.5"), ("[1,2]", "(1,2)"), ("(1,2]", "[1,2)"),
             ("1,3", "3, 1"), ("5", "\\text{five}"), ("18", "18 \\text{ dollars}"), ("10\\%", "10"),
             ("\\text{(C)}", "C"), ("x^2+1", "1+x^2"), ("y = 2x + 1", "2x - y + 1 = 0"),
             ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}"), ("3\\sqrt{3}", "\\sqrt{27}"), ("\\pi", "3.14159"),
             ("90^\\circ", "90"), ("\\$18.50", "18.5"), ("2i", "2j"), ("12", "12th grade"),
             ("(3, \\frac{\\pi}{2})", "\\left( 3, \\frac{\\pi}{2} \\right)"), ("0.3", ".3"), ("k=4", "4"),
             ("3", "3.0"), ("B", "(B)"), ("\\frac{3}{4}", "3/4"), ("1000", "1{,}000"),
             ("\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", "\\begin{bmatrix}1&2\\\\3&4\\end{bmatrix}")]
    for gold, predicted in pairs:
        out.append({"format": "math", "response": f"{THINK}\\boxed{{{predicted}}}", "gold": gold})
        out.append({"format": "math", "response": f"{THINK}\\boxed{{{gold}}}", "gold": predicted})
    for text in ("The answer is 3 apples and 4 pears.", "The final answer is 7/8", "答案是 12\n\nmore",
                 "Final Answer: The final answer is $\\frac{1}{2}$. I hope it is correct.", "The value is -3.5",
                 "\\boxed 5$ ok", "\\boxed{", "unboxed answers 4", "ки 5 ки", "no numbers here"):
        for gold in ("3", "\\frac78", "12", "\\frac{1}{2}", "5", "4", "-3.5"):
            out.append({"format": "math", "response": text, "gold": gold})
    for row in [json.loads(line) for line in (ROOT / "eval/data/gsm8k.jsonl").open()]:
        gold = row["answer"]
        for response in (f"{THINK}The final answer is {gold}.", f"{THINK}The final answer is ${gold}",
                         f"{THINK}The final answer is **{gold}**.", f"{THINK}\\boxed{{{gold}}}",
                         f"{THINK}She earns {gold} dollars a day", f"{CUT}so it is {gold} and",
                         f"{THINK}The final answer is {gold}.00", f"{THINK}The final answer is {int(gold) + 1:,}.",
                         f"{THINK}The answer is: {gold} apples."):
            out.append({"format": "number", "response": response, "gold": gold})
    for gold in "ABCD":
        for response in (f"{THINK}\\boxed{{{gold}}}", f"{THINK}The answer is ({gold}).",
                         f"{THINK}\\boxed{{{gold}}}. This is a classic.", f"{CUT}I think b is right but",
                         f"{THINK}**Answer: {gold}**", f"{THINK}\\boxed{{\\text{{{gold}}}}}", "no letter here 42",
                         f"{THINK}Final answer: {gold.lower()}"):
            out.append({"format": "choice", "response": response, "gold": gold})
    return out


def skythought_verdicts(package: Path, rows: list[dict]) -> None:
    spec = importlib.util.spec_from_file_location("mpu", package / "skythought/evals/util/math_parsing_util.py")
    util = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(util)
    gsm8k_number = re.compile(r"((-?[$0-9.,]{2,})|(-?[0-9]+))")  # gsm8k_handler.GSM8KTaskHandler.ans_re

    def sanitize(answer: str) -> str:  # gsm8k_handler.GSM8KTaskHandler.sanitize_answer, as released
        for pattern in (",", r"\$", (r"\.$" r"\*")):  # its two patterns, joined as it joins them
            answer = re.sub(pattern, "", answer)
        found = gsm8k_number.findall(answer)
        return found[-1][0].strip() if found else "[invalid]"

    for row in rows:
        if row["format"] == "math":  # math_handler.MathTaskHandler.check_correctness
            predicted = util.strip_answer_string(util.extract_answer(row["response"]))
            correct = util.math_equal(predicted, util.strip_answer_string(row["gold"]))
        elif row["format"] == "number":  # gsm8k_handler.GSM8KTaskHandler.check_correctness
            predicted = sanitize(util.extract_answer(row["response"]))
            correct = predicted == row["gold"]
        else:  # gpqa_diamond_handler.GPQADiamondTaskHandler.check_correctness
            predicted = util.get_multiple_choice_answer(row["response"])
            correct = predicted == row["gold"]
        row["skythought"] = {"extracted": predicted, "correct": bool(correct)}


if __name__ == "__main__":
    rows = cases()
    skythought_verdicts(Path(sys.argv[1]), rows)
    with (HERE / "cases.jsonl").open("w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    print(f"{len(rows)} cases written to {HERE / 'cases.jsonl'}")
