from pipeline.evaluation.parsing import ALL_STATUSES, PARSEABLE_STATUSES, extract_reasoning, parse_answer


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
