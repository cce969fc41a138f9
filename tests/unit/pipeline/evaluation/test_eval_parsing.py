import pytest

from pipeline.evaluation.parsing import (
    ALL_STATUSES, PARSEABLE_STATUSES, PARSERS, extract_reasoning, parse_answer, parse_answer_reference,
)


def test_canonical_answers():
    p = parse_answer("<REASONING> edges are smooth </REASONING>\n<CONCLUSION>This image is real.</CONCLUSION>")
    assert (p.pred, p.parse_status, p.reasoning, p.parseable) == (0, "ok", "edges are smooth", True)
    p = parse_answer("<REASONING>x</REASONING><CONCLUSION> this IMAGE is  fake </CONCLUSION>")
    assert (p.pred, p.parse_status) == (1, "ok")


def test_loose_and_undecided_conclusions():
    p = parse_answer("<CONCLUSION>I think it is fake.</CONCLUSION>")
    assert (p.pred, p.parse_status) == (1, "loose")
    p = parse_answer("<CONCLUSION>Either real or fake.</CONCLUSION>")
    assert (p.pred, p.parse_status, p.parseable) == (None, "ambiguous", False)
    p = parse_answer("<CONCLUSION>Cannot tell.</CONCLUSION>")
    assert (p.pred, p.parse_status) == (None, "no_decision")
    # Two canonical conclusions that disagree carry no decision.
    p = parse_answer("<CONCLUSION>This image is real.</CONCLUSION><CONCLUSION>This image is fake.</CONCLUSION>")
    assert (p.pred, p.parse_status) == (None, "ambiguous")
    # Two that agree do.
    p = parse_answer("<CONCLUSION>This image is fake.</CONCLUSION> <CONCLUSION>This image is fake.</CONCLUSION>")
    assert (p.pred, p.parse_status) == (1, "ok")


def test_missing_or_truncated_conclusion():
    p = parse_answer("The image looks fine. This image is real.")
    assert (p.pred, p.parse_status, p.reasoning) == (None, "no_conclusion", "")
    p = parse_answer("<REASONING>edges are irregular and the light")
    assert (p.pred, p.parse_status, p.reasoning) == (None, "no_conclusion", "edges are irregular and the light")
    p = parse_answer("<REASONING>cut <CONCLUSION>This image is fake.")
    assert (p.parse_status, p.reasoning) == ("no_conclusion", "cut")
    assert parse_answer("").parse_status == "no_conclusion"


def test_reasoning_extraction():
    assert extract_reasoning("<REASONING>a</REASONING> mid <REASONING> b </REASONING>") == "a b"
    assert extract_reasoning("no tags") == ""
    assert set(PARSEABLE_STATUSES) < set(ALL_STATUSES)


# --- answers in the MMFR layout (a space inside every tag; some records differ in whitespace)
def mmfr_answer(reasoning: str, conclusion: str, inside: str = " ", between: str = " ") -> str:
    blocks = [("SUMMARY", "I will inspect the image."), ("CAPTION", "A cat sits on a mat."),
              ("REASONING", reasoning), ("CONCLUSION", conclusion)]
    return between.join(f"<{t}>{inside}{x}{inside}</{t}>" for t, x in blocks)


@pytest.mark.parametrize("inside,between", [(" ", " "), ("", ""), ("\n", "\n\n"), ("  ", " \n ")])
def test_mmfr_layout_parses_whatever_the_whitespace(inside, between):
    for conclusion, label in (("This image is fake.", 1), ("This image is real.", 0)):
        a = mmfr_answer("The edges are irregular.", conclusion, inside, between)
        for parse in (parse_answer, parse_answer_reference):
            p = parse(a)
            assert (p.pred, p.parse_status, p.reasoning) == (label, "ok", "The edges are irregular."), (parse, a)


def test_the_two_loose_parser_bugs_are_fixed():
    # Before: "not fake" read as fake (substring "fake"), "unrealistic" as real (substring "real").
    p = parse_answer(mmfr_answer("x", "This image is not fake."))
    assert (p.pred, p.parse_status, p.parseable) == (None, "negated", False)
    p = parse_answer(mmfr_answer("x", "This image looks unrealistic."))
    assert (p.pred, p.parse_status) == (None, "no_decision")


@pytest.mark.parametrize("conclusion,want", [
    ("This image isn't real.", (None, "negated")),
    ("It is neither real nor fake.", (None, "negated")),
    ("No, this image is never fake.", (None, "negated")),
    ("This image is realistic.", (None, "no_decision")),
    ("Looks like fakery.", (None, "no_decision")),
    ("This image is really fake.", (1, "loose")),  # "really" is not "real"
    ("Surely a FAKE!", (1, "loose")),
    ("The photo is real", (0, "loose")),  # not the canonical sentence, but one class word
])
def test_word_boundaries_and_negation(conclusion, want):
    p = parse_answer(mmfr_answer("x", conclusion))
    assert (p.pred, p.parse_status) == want


def test_negation_decides_the_training_label_too():
    from sharding.schema import conclusion_label

    assert conclusion_label("<CONCLUSION> This image is fake. </CONCLUSION>") == 1
    assert conclusion_label(mmfr_answer("x", "This image is real.")) == 0
    assert conclusion_label("<CONCLUSION> This image is not fake. </CONCLUSION>") is None
    assert conclusion_label("<CONCLUSION> This image looks unrealistic. </CONCLUSION>") is None


def test_reference_rule_order_and_case():
    # "fake" sentence first, case-sensitive, the period is part of the sentence.
    p = parse_answer_reference(mmfr_answer("x", "This image is real. This image is fake."))
    assert (p.pred, p.parse_status) == (1, "ok")
    assert parse_answer_reference(mmfr_answer("x", "this image is fake.")).parse_status == "no_decision"
    assert parse_answer_reference(mmfr_answer("x", "This image is fake")).parse_status == "no_decision"
    assert parse_answer_reference(mmfr_answer("x", "I think it is fake.")).parse_status == "no_decision"
    # The substring rule does not look at negation: "... is not fake." is no sentence, but
    # "This image is fake." inside a longer text is.
    assert parse_answer_reference(mmfr_answer("x", "This image is not fake.")).parse_status == "no_decision"
    assert parse_answer_reference(mmfr_answer("x", "So: This image is fake. Yes.")).pred == 1
    # Only the <CONCLUSION> block counts, and only the first one.
    a = "<REASONING> This image is fake. </REASONING> <CONCLUSION> This image is real. </CONCLUSION>"
    assert parse_answer_reference(a).pred == 0
    a += " <CONCLUSION> This image is fake. </CONCLUSION>"
    assert parse_answer_reference(a).pred == 0
    # A truncated conclusion block is read to the end of the text.
    assert parse_answer_reference("<REASONING> r </REASONING> <CONCLUSION> This image is real.").pred == 0
    assert parse_answer_reference("<REASONING> r </REASONING> This image is real.").parse_status == "no_conclusion"


def test_reference_drops_answers_without_a_reasoning_block_and_takes_the_first():
    for a in ("<CONCLUSION> This image is fake. </CONCLUSION>",
              "<REASONING> cut by the token limit",
              "</REASONING> <REASONING> <CONCLUSION> This image is fake. </CONCLUSION>", ""):
        p = parse_answer_reference(a)
        assert (p.pred, p.parse_status, p.reasoning, p.parseable) == (None, "no_reasoning", "", False), a
    a = ("<REASONING> first </REASONING> <REASONING> second </REASONING> "
         "<CONCLUSION> This image is real. </CONCLUSION>")
    assert parse_answer_reference(a).reasoning == "first"
    assert parse_answer(a).reasoning == "first second"  # ours joins every block
    p = parse_answer_reference("<REASONING></REASONING><CONCLUSION>This image is real.</CONCLUSION>")
    assert (p.pred, p.reasoning) == (0, "")  # an empty block is kept: empty hypothesis
    assert PARSERS == {"ours": parse_answer, "reference": parse_answer_reference}
    assert "no_reasoning" in ALL_STATUSES and "no_reasoning" not in PARSEABLE_STATUSES
