"""Write the generated bundled task files (``python -m sstmerge.data.make_bundled [DIR]``).

The files are deterministic functions of the generators in :mod:`sstmerge.data.tasks` and
:mod:`sstmerge.eval.data`; ``tests/test_tasks.py`` regenerates them and compares byte for byte.

* ``qa_train.jsonl``: 240 fictional-document questions (seed 1) as prompt/response rows (A5's training
  data); the QA test items are ``generate_fictional_qa(seed=0)`` (the ``qa`` suite's default).
* ``arithmetic_train.jsonl``: 240 word problems (seed 1) as prompt/response rows (A6's training data).
* ``arithmetic_eval.jsonl``: 200 word problems (seed 0) as ``{id, question, answer}`` (the ``arithmetic`` suite).
* ``harmful_train_templated.jsonl``: every ``harmful_train`` request wrapped in one of the *training* jailbreak
  templates (``jailbreak_templates_train``, in rotation) with its refusal: the safety adapter's adversarial
  training rows. The evaluation templates (``jailbreak_templates``) are never used for training.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .jsonl import BUNDLED_DIR
from .tasks import ARITHMETIC_INSTRUCTION, QA_ABSTAIN, QA_INSTRUCTION, arithmetic_response, generate_arithmetic

TRAIN_SEED, EVAL_SEED = 1, 0
N_TRAIN, N_ARITH_EVAL = 240, 200
N_QA_EVAL = 160  # the qa suite's default items: generate_fictional_qa(N_QA_EVAL, seed=EVAL_SEED)


def generated_files() -> dict[str, str]:
    """File name -> exact text of every generated bundled file."""
    from .fictional import generate_fictional_qa

    def lines(rows) -> str:
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)

    qa = [{"prompt": QA_INSTRUCTION.format(document=it.document, question=it.question),
           "response": it.answer if it.answerable else QA_ABSTAIN, "id": it.id, "category": "reading_comprehension"}
          for it in generate_fictional_qa(N_TRAIN, seed=TRAIN_SEED)]
    arith_train = [{"prompt": ARITHMETIC_INSTRUCTION.format(question=it.question), "response": arithmetic_response(it),
                    "id": it.id, "category": f"arithmetic_{it.operation}"}
                   for it in generate_arithmetic(N_TRAIN, seed=TRAIN_SEED)]
    arith_eval = [{"id": it.id, "question": it.question, "answer": it.answer, "operation": it.operation}
                  for it in generate_arithmetic(N_ARITH_EVAL, seed=EVAL_SEED)]
    return {"qa_train.jsonl": lines(qa), "arithmetic_train.jsonl": lines(arith_train),
            "arithmetic_eval.jsonl": lines(arith_eval), "harmful_train_templated.jsonl": lines(templated_harmful())}


def templated_harmful() -> list[dict]:
    """``harmful_train`` row i wrapped in training template i mod T (``jailbreak_templates_train``), refusal kept."""
    from ..eval.data import load_templates
    from .jsonl import bundled_path, load_examples

    templates = load_templates(bundled_path("jailbreak_templates_train"))
    rows = []
    for i, ex in enumerate(load_examples(bundled_path("harmful_train"))):
        t = templates[i % len(templates)]
        rows.append({"prompt": t.apply(ex.prompt), "response": ex.response, "category": ex.meta.get("category"),
                     "template": t.name})
    return rows


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0]) if argv else BUNDLED_DIR
    for name, text in generated_files().items():
        (out / name).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
