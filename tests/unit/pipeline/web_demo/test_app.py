"""The web page's pieces without a server: model text is escaped, sections get labels,
the verdict bar places p(fake) and the threshold, bad uploads become messages."""
import pytest

from pipeline.web_demo.app import DemoService, answer_html, readable_reason, verdict_html


def test_model_text_is_escaped_and_sections_are_labelled():
    ans = ("<SUMMARY> s </SUMMARY> <CAPTION> <script>alert(1)</script> </CAPTION> "
           "<REASONING> r & q </REASONING> <CONCLUSION> This image is fake. </CONCLUSION>")
    html = answer_html(ans, {"disagree": True, "answer_verdict": "fake", "verdict": "real"})
    assert "<script>" not in html and "&lt;script&gt;" in html and "r &amp; q" in html
    assert html.count('class="fr-tag"') == 4 and 'fr-section fr-conclusion' in html
    assert "The written conclusion says fake; p(fake) says real." in html


def test_an_answer_without_tags_is_shown_as_text():
    assert "just words" in answer_html("just words") and 'class="fr-tag"' not in answer_html("just words")


def test_verdict_bar_places_p_fake_and_threshold():
    html = verdict_html({"p_fake": 0.25, "verdict": "real"}, 0.4)
    assert "REAL" in html and "p(fake) = 0.250" in html
    assert "width:25.0%" in html and "left:40.0%" in html and "threshold 0.40" in html
    msg = verdict_html(None, 0.5, "This file cannot be analysed: <b>x</b>")
    assert 'id="fr-message"' in msg and "<b>" not in msg


class _Predictor:
    """Stands in for the model (unit test): DemoService's input checks run before it."""

    def __init__(self, cfg):
        from types import SimpleNamespace

        self.cfg = cfg
        self.model = SimpleNamespace(config=SimpleNamespace(image_size=8, image_mean=(0.5,) * 3,
                                                            image_std=(0.5,) * 3, apply_exif_orientation=False))

    def records(self, samples, streamer=None):
        raise AssertionError("a bad upload must not reach the model")


@pytest.mark.parametrize("content,reason", [(b"", "zero_byte"), (b"GIF89a broken", "not_an_image")])
def test_bad_uploads_are_messages_before_the_model(tmp_path, content, reason):
    from pipeline.inference.config import PredictConfig

    f = tmp_path / "upload.png"
    f.write_bytes(content)
    service = DemoService(_Predictor(PredictConfig(checkpoint="x", evidence=str(tmp_path))), "x")
    [(rec, text, message, square)] = list(service.analyse(str(f)))
    assert rec["status"] == "error" and rec["reason"].startswith(reason) and text is None and square is None
    assert message.startswith("This file cannot be analysed: ") and readable_reason(rec["reason"]) in message
    [(rec, _, message, _)] = list(service.analyse(None))
    assert rec is None and "Choose an image first" in message
