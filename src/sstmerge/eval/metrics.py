"""Reading-comprehension metrics (RepliQA / SQuAD style): exact match, token F1, abstention detection.

* :func:`normalize_answer`, :func:`exact_match`, :func:`token_f1` follow the official SQuAD v2 evaluation
  script: lowercase, drop ASCII punctuation (``string.punctuation``; Unicode quotes/dashes are kept, as
  in the official script), drop the articles a/an/the, collapse whitespace; F1 over the bag of
  normalised tokens, 1.0 when both sides normalise to nothing and 0.0 when only one does. ``gold`` may
  also be a list of acceptable answers (the maximum is taken, as in SQuAD).
* :func:`is_abstention` detects answers saying the document does not contain the answer (the correct
  behaviour on RepliQA's unanswerable questions). It is distinct from a *safety refusal*: "I'm sorry, but
  I can't help with that" is not an abstention. Recognised forms (case-insensitive, curly apostrophes
  normalised, first ``window`` characters) are listed in :data:`ABSTENTION_PATTERNS`:

  - "the document/text/passage/context/article/source (does not|doesn't|did not) mention / say / state /
    contain / specify / provide / include / discuss / indicate / address / give / cover / answer / tell";
  - "(is|are|was) not / isn't mentioned / stated / specified / provided / given / included / found / discussed /
    addressed / covered / present in the document/text/...";
  - "cannot / can't be answered / determined / found / inferred / deduced from / based on / using the
    document/text/information";
  - "no information / no mention / no details about|on|regarding|in ...", "there is no information",
    "not enough / insufficient information", "does not provide enough information";
  - "unanswerable", "the answer is not in / not found / not provided / not available";
  - "I don't know" / "I do not know" as a statement (not "I don't know how to ...").
* :func:`score_qa` scores one prediction: on answerable questions EM/F1 (an abstention scores 0); on
  unanswerable ones EM = F1 = 1.0 iff the model abstained.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "`": "'"})


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lowercase, remove punctuation, remove articles, collapse whitespace."""
    s = (s or "").lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _golds(gold: str | Sequence[str]) -> list[str]:
    golds = [gold] if isinstance(gold, str) else list(gold)
    return golds or [""]


def exact_match(pred: str, gold: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals the (any) normalised gold answer, else 0.0."""
    p = normalize_answer(pred)
    return max(float(p == normalize_answer(g)) for g in _golds(gold))


def _f1(pred: str, gold: str) -> float:
    pred_toks = normalize_answer(pred).split()
    gold_toks = normalize_answer(gold).split()
    if not pred_toks or not gold_toks:
        return float(pred_toks == gold_toks)
    common = Counter(pred_toks) & Counter(gold_toks)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred_toks)
    recall = same / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def token_f1(pred: str, gold: str | Sequence[str]) -> float:
    """SQuAD token F1 (max over gold answers): both empty → 1.0, exactly one empty → 0.0."""
    return max(_f1(pred, g) for g in _golds(gold))


_SOURCE = (
    r"(?:provided |given |above |this |that )?"
    r"(?:document|text|passage|context|article|source|report|excerpt|information)"
)
_NEG = r"(?:does not|doesn't|did not|didn't|do not|don't)"
_ADV = r"(?:explicitly |directly |specifically |clearly )?"
#: regular expressions (on lowercased text with straight apostrophes) that mark an abstention
ABSTENTION_PATTERNS: tuple[str, ...] = (
    rf"\b(?:the|this) {_SOURCE} {_NEG} {_ADV}"
    r"(?:mention|say|state|contain|specify|provide|include|discuss|indicate|address|give|cover|answer|tell|reveal)",
    rf"\b(?:not|isn't|aren't|wasn't|weren't) {_ADV}"
    r"(?:mentioned|stated|specified|provided|given|included|found|discussed|addressed|covered|present) "
    rf"(?:in|by) (?:the|this) {_SOURCE}",
    r"\b(?:cannot|can't|can not|could not|couldn't) be "
    r"(?:answered|determined|found|inferred|deduced|derived|identified) "
    rf"(?:from|based on|using|with|given) (?:the|this) {_SOURCE}",
    r"\bno (?:relevant |specific )?(?:information|mention|details?|data) "
    r"(?:about|on|regarding|in|of|is|was|provided|given|available|as to)\b",
    r"\bthere (?:is|are|was) no (?:relevant |specific )?(?:information|mention|details?)\b",
    r"\b(?:not enough|insufficient) information\b",
    r"\bdoes not provide enough information\b",
    r"\bunanswerable\b",
    r"\bthe answer (?:is not|isn't|was not|cannot be) (?:in|found|provided|available|given|present|mentioned|stated)\b",
    r"\bi (?:don't|do not) know(?! (?:how|why|if|whether|what|where|who|when|which)\b)\b",
)
_ABSTENTION_RE = re.compile("|".join(f"(?:{p})" for p in ABSTENTION_PATTERNS))


def is_abstention(answer: str, *, window: int = 300) -> bool:
    """True if the first ``window`` characters say the document does not contain the answer.

    A safety refusal ("I'm sorry, but I can't help with that") is *not* an abstention.
    """
    text = " ".join((answer or "").translate(_APOSTROPHES).lower().split())[:window]
    return bool(text) and _ABSTENTION_RE.search(text) is not None


def score_qa(pred: str, gold: str | Sequence[str], answerable: bool) -> dict:
    """Score one prediction: ``{"em", "f1", "abstained"}``.

    Answerable: EM/F1 against ``gold`` (0.0 when the model abstained). Unanswerable: EM = F1 = 1.0 if the
    model abstained, else 0.0 (``gold`` is ignored).
    """
    abstained = is_abstention(pred)
    if answerable:
        if abstained:
            return {"em": 0.0, "f1": 0.0, "abstained": True}
        return {"em": exact_match(pred, gold), "f1": token_f1(pred, gold), "abstained": False}
    score = 1.0 if abstained else 0.0
    return {"em": score, "f1": score, "abstained": abstained}
