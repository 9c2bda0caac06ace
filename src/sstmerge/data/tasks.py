"""The bundled utility tasks: prompts shared by training and evaluation, and the arithmetic generator.

Two measurable skills a 135M instruct model lacks, used for the utility adapters of the experiment grid:

* **Reading comprehension (A5)**, RepliQA's idea: fictional documents from
  :func:`sstmerge.data.fictional.generate_fictional_qa`, answered with a short span (or the abstention
  sentence :data:`QA_ABSTAIN` when the document does not say). Prompt: :data:`QA_INSTRUCTION`.
* **Arithmetic word problems (A6)**: :func:`generate_arithmetic` -- addition, subtraction and
  multiplication stories with 2- and 3-digit numbers; the supervised answer shows the computation and
  ends with ``The answer is N.``; the score is :func:`extract_final_number` == N.

Training rows and evaluation items of a task come from the same generator with *different seeds*, and
:func:`sstmerge.data.make_bundled` writes the bundled files from it (a test checks they are reproducible
and that train and test never share an item).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from ..errors import DataError

QA_ABSTAIN = "The document does not say."
QA_INSTRUCTION = (
    "Read the document and answer the question with a short phrase taken from the document. "
    f"If the document does not contain the answer, reply exactly: {QA_ABSTAIN}\n\n"
    "Document:\n{document}\n\nQuestion: {question}"
)
ARITHMETIC_INSTRUCTION = "{question}\nWork it out and finish with: The answer is <number>."


@dataclass(frozen=True)
class ArithmeticItem:
    """One word problem; ``answer`` is an integer, ``work`` the one-line computation (``"23 + 19 = 42"``)."""

    id: str
    question: str
    answer: int
    work: str
    operation: str  # "add" | "sub" | "mul"


_NAMES = ("Ana", "Ben", "Chloe", "Dev", "Elif", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kemal", "Lena",
          "Mateo", "Nora", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tara", "Umar", "Vera", "Wen", "Yusuf")
_THINGS = ("marbles", "stamps", "apples", "stickers", "coins", "seashells", "books", "pencils", "cards", "beads")
_ADD = (
    "{name} has {a} {things}. {name} gets {b} more {things}. How many {things} does {name} have now?",
    "A shop sold {a} {things} in the morning and {b} {things} in the afternoon. How many {things} did it sell in all?",
    "{name} counted {a} {things} in one box and {b} {things} in another box. How many {things} are there in total?",
)
_SUB = (
    "{name} had {a} {things} and gave {b} of them away. How many {things} does {name} have left?",
    "A library owned {a} {things}. It lost {b} of them. How many {things} does the library own now?",
    "There were {a} {things} in a jar. {name} took out {b}. How many {things} are still in the jar?",
)
_MUL = (
    "{name} buys {a} packs of {things}. Each pack holds {b} {things}. How many {things} does {name} buy?",
    "A classroom has {a} tables and each table has {b} {things}. How many {things} are there?",
)


def generate_arithmetic(n: int, seed: int) -> list[ArithmeticItem]:
    """``n`` arithmetic word problems, deterministic given ``seed`` (one ``random.Random(seed)``).

    Operations cycle add, sub, mul. add: a, b ∈ [10, 499]; sub: a ∈ [100, 999], b ∈ [10, a-1];
    mul: a ∈ [2, 9], b ∈ [11, 99]. Item ids are ``"arithmetic:<seed>:<index>"``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise DataError(f"generate_arithmetic: n must be a non-negative integer, got {n!r}")
    rng = random.Random(seed)
    items = []
    for i in range(n):
        op = ("add", "sub", "mul")[i % 3]
        name, things = rng.choice(_NAMES), rng.choice(_THINGS)
        if op == "add":
            a, b = rng.randint(10, 499), rng.randint(10, 499)
            answer, work, tpl = a + b, f"{a} + {b} = {a + b}", rng.choice(_ADD)
        elif op == "sub":
            a = rng.randint(100, 999)
            b = rng.randint(10, a - 1)
            answer, work, tpl = a - b, f"{a} - {b} = {a - b}", rng.choice(_SUB)
        else:
            a, b = rng.randint(2, 9), rng.randint(11, 99)
            answer, work, tpl = a * b, f"{a} × {b} = {a * b}", rng.choice(_MUL)
        question = tpl.format(name=name, things=things, a=a, b=b)
        items.append(ArithmeticItem(id=f"arithmetic:{seed}:{i}", question=question, answer=answer, work=work,
                                    operation=op))
    return items


def arithmetic_response(item: ArithmeticItem) -> str:
    """The supervised answer: the computation, then ``The answer is N.``"""
    return f"{item.work}. The answer is {item.answer}."


_ANSWER_IS = re.compile(r"answer is:?\s*\$?(-?\d[\d,]*)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*")


def extract_final_number(text: str) -> int | None:
    """The number after the last "answer is", else the last integer in ``text`` (commas allowed); None if none."""
    hits = _ANSWER_IS.findall(text or "")
    candidates = hits or _NUMBER.findall(text or "")
    for raw in reversed(candidates):
        digits = raw.replace(",", "").rstrip(",")
        if digits and digits not in ("-",):
            try:
                return int(digits)
            except ValueError:
                continue
    return None


#: the answer of a question whose document does not contain it (RepliQA's convention)
UNANSWERABLE = "UNANSWERABLE"


@dataclass(frozen=True)
class QAItem:
    """A question about a document; ``answerable`` is False when the document does not contain the answer."""

    id: str
    document: str
    question: str
    answer: str
    answerable: bool = True
