"""Token F1 and ROUGE-L on cases computed by hand."""

from __future__ import annotations

import pytest

from carve.evaluation.metrics import best_over, normalize_answer, rouge_l, score_prediction, token_f1


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The Cat sat.", "cat sat"),
        ("  An   apple,  a pear;\tthe end ", "apple pear end"),
        ("first-degree", "firstdegree"),  # SQuAD deletes punctuation, it does not split on it
        ("C9 deficiency <Disease>", "c9 deficiency disease"),
        ("Hedgehog <Gene_or_gene_product>", "hedgehog geneorgeneproduct"),
        ("theory and another", "theory and another"),  # articles only as whole words
        ("", ""),
    ],
)
def test_normalize_answer(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


def test_token_f1_by_hand() -> None:
    # prediction [cat, sat], gold [cat, sat, on, mat]: P = 1, R = 1/2, F1 = 2/3
    assert token_f1("the cat sat", "A cat sat on the mat.") == pytest.approx(2 / 3)
    # a bag of tokens: repeated tokens count only as often as the gold has them
    # prediction [yes, yes], gold [yes]: overlap 1, P = 1/2, R = 1, F1 = 2/3
    assert token_f1("yes yes", "Yes") == pytest.approx(2 / 3)
    assert token_f1("Yes.", "yes") == 1.0
    assert token_f1("no", "yes") == 0.0


def test_empty_prediction() -> None:
    assert token_f1("", "C9 deficiency <Disease>") == 0.0
    assert rouge_l("", "C9 deficiency <Disease>") == 0.0
    # only punctuation and articles normalise to nothing
    assert token_f1("the, a.", "yes") == 0.0
    assert token_f1("", "") == 1.0


def test_ner_strings() -> None:
    gold = "C9 deficiency <Disease>"
    assert score_prediction("C9 deficiency <Disease>", [gold]) == (1.0, 1.0)
    # [c9, deficiency] against [c9, deficiency, disease]: P = 1, R = 2/3 -> 0.8 for both metrics
    f1, rouge = score_prediction("C9 deficiency", [gold])
    assert f1 == pytest.approx(0.8) and rouge == pytest.approx(0.8)
    # stemming: ROUGE-L matches deficiencies/deficiency, token F1 does not (2 of 3 tokens: 2/3)
    f1, rouge = score_prediction("C9 deficiencies <Disease>", [gold])
    assert f1 == pytest.approx(2 / 3) and rouge == pytest.approx(1.0)
    # order: F1 is a bag of tokens (1.0), ROUGE-L a subsequence (LCS 2 of 3: 2/3)
    f1, rouge = score_prediction("<Disease> C9 deficiency", [gold])
    assert f1 == pytest.approx(1.0) and rouge == pytest.approx(2 / 3)


def test_ner_several_entities() -> None:
    gold = "Hedgehog <Gene_or_gene_product>, cancer cells <Cell>, tumor <Cancer>"
    # prediction [cancer, cells, cell]; gold [hedgehog, geneorgeneproduct, cancer, cells, cell, tumor, cancer]
    # overlap 3: P = 1, R = 3/7, F1 = 0.6
    assert token_f1("cancer cells <Cell>", gold) == pytest.approx(0.6)


def test_best_over_several_answers() -> None:
    answers = ["interleukin 6", "IL-6", "IL6"]
    # "il6" matches the third answer exactly once the hyphen is deleted
    assert score_prediction("IL-6", answers)[0] == 1.0
    # "interleukin" alone: 2/3 against the first answer (P 1, R 1/2), 0 against the others
    assert best_over(token_f1, "interleukin", answers) == pytest.approx(2 / 3)
    assert best_over(rouge_l, "interleukin", answers) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="gold answer"):
        score_prediction("x", [])
