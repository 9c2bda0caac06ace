"""RepliQA/SQuAD-style metrics: normalisation, EM, token F1, abstention detection, score_qa."""

from __future__ import annotations

import pytest

from sstmerge.eval.metrics import exact_match, is_abstention, normalize_answer, score_qa, token_f1


@pytest.mark.parametrize(
    ("raw", "norm"),
    [
        ("The Eiffel Tower!", "eiffel tower"),
        ("  a   cat, an apple and THE dog. ", "cat apple and dog"),
        ("U.S.A.", "usa"),
        ("Theatre", "theatre"),  # articles only as whole words
        ("an-apple", "anapple"),  # punctuation removed before articles
        ("", ""),
        ("...", ""),
        ("1,000 people", "1000 people"),
    ],
)
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


def test_exact_match():
    assert exact_match("The Eiffel Tower.", "eiffel tower") == 1.0
    assert exact_match("Eiffel", "Eiffel Tower") == 0.0
    assert exact_match("Paris", ["London", "paris!"]) == 1.0
    assert exact_match("", "") == 1.0


def test_token_f1_exact_values():
    # pred: [quick, brown, fox]; gold: [brown, fox, jumps, high] -> P = 2/3, R = 2/4, F1 = 4/7
    assert token_f1("the quick brown fox", "brown fox jumps high") == pytest.approx(4 / 7)
    # repeated tokens count by multiplicity: pred [a1 x3 -> "paris paris paris"], gold [paris]
    assert token_f1("paris paris paris", "paris") == pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1))
    assert token_f1("Paris", "paris.") == 1.0
    assert token_f1("London", "Paris") == 0.0
    assert token_f1("", "") == 1.0
    assert token_f1("the", "a") == 1.0  # both normalise to nothing
    assert token_f1("", "Paris") == 0.0
    assert token_f1("Paris", "") == 0.0
    assert token_f1("in Paris", ["London", "Paris France"]) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "answer",
    [
        "The document does not mention who founded the company.",
        "The provided text doesn’t say when the bridge was built.",  # curly apostrophe
        "This information is not mentioned in the document.",
        "The question cannot be answered from the document.",
        "There is no information about the CEO's salary in the passage.",
        "Unanswerable.",
        "I don't know.",
        "I do not know the answer based on the context.",
        "The context does not provide enough information to answer this.",
        "Based on the article, the answer is not stated. The article does not specify the date.",
    ],
)
def test_abstentions(answer):
    assert is_abstention(answer)


@pytest.mark.parametrize(
    "answer",
    [
        "I'm sorry, but I can't help with that.",  # safety refusal, not an abstention
        "I cannot assist with that request.",
        "As an AI, I won't provide that.",
        "The company was founded in 1998 by Jane Doe.",
        "The document mentions that the bridge was built in 1890.",
        "This is mentioned in the document: the CEO is John.",
        "I don't know how he did it, but the record was 9.58 seconds.",
        "",
    ],
)
def test_not_abstentions(answer):
    assert not is_abstention(answer)


def test_score_qa():
    assert score_qa("The Eiffel Tower", "Eiffel Tower", answerable=True) == {"em": 1.0, "f1": 1.0, "abstained": False}
    r = score_qa("the quick brown fox", "brown fox jumps high", answerable=True)
    assert r["em"] == 0.0 and r["f1"] == pytest.approx(4 / 7) and r["abstained"] is False
    # abstaining on an answerable question scores 0 even if it repeats gold words
    r = score_qa("The document does not mention the Eiffel Tower.", "Eiffel Tower", answerable=True)
    assert r == {"em": 0.0, "f1": 0.0, "abstained": True}
    # unanswerable: credit only for abstaining
    assert score_qa("The text does not say.", "", answerable=False) == {"em": 1.0, "f1": 1.0, "abstained": True}
    assert score_qa("It was 1998.", "", answerable=False) == {"em": 0.0, "f1": 0.0, "abstained": False}
    # a safety refusal is not an abstention
    assert score_qa("I'm sorry, but I can't help with that.", "", answerable=False)["abstained"] is False
