"""The web page: an image in; the verdict, the answer as a chat turn, the evidence map out.

A thin view over pipeline.inference's Predictor: the uploaded file is read,
bounded and decoded by the same function the command uses (data.image_sample),
scored by the same Predictor (so the page shows what `fakereasoning-predict`
prints for that file), and its record is rendered. Nothing here scores.

- The upload event runs with `preprocess=False`: Gradio only stores the file;
  every check (size, pixel count, decodability) is ours, so a bad file becomes a
  readable message in the page, never a traceback, and the server goes on.
- The answer streams token by token (a transformers TextIteratorStreamer fed by
  the same generate call); the verdict and p(fake) appear when generation ends,
  right after the answer's conclusion, with the evidence map.
- One model, one lock: requests wait in Gradio's queue (concurrency limit
  `concurrency`, at most `max_queue` waiting, each shown its position), and the
  model runs one request at a time, so the attention capture of one request can
  never see another's forward.
- The opacity slider re-blends the stored grid over the stored square; it
  does not run the model again.
"""
from __future__ import annotations

import html
import os
import threading
from dataclasses import dataclass, field
from typing import Any

QUESTION_SHOWN = "Is this image real or fake? Please describe the image, reasoning step-by-step and conclude."
SECTION_TAGS = ("summary", "caption", "reasoning", "conclusion")

CSS = """
#fr-verdict .fr-verdict-box {border-radius: 10px; padding: 12px 14px; border: 1px solid #d0d0d0;}
#fr-verdict .fr-word {font-size: 1.6em; font-weight: 700; letter-spacing: .04em;}
#fr-verdict .fr-fake .fr-word {color: #b3261e;} #fr-verdict .fr-real .fr-word {color: #1e6b35;}
#fr-verdict .fr-bar {position: relative; height: 14px; background: #e6e6e6; border-radius: 7px;
  margin: 10px 0 4px 0;}
#fr-verdict .fr-fill {position: absolute; left: 0; top: 0; bottom: 0; border-radius: 7px 0 0 7px;}
#fr-verdict .fr-fake .fr-fill {background: #d9534f;} #fr-verdict .fr-real .fr-fill {background: #3c9a5f;}
#fr-verdict .fr-threshold {position: absolute; top: -4px; bottom: -4px; width: 2px; background: #222;}
#fr-verdict .fr-scale {display: flex; justify-content: space-between; font-size: .8em; color: #666;}
#fr-verdict .fr-message {color: #8a4b00; font-weight: 600;}
#fr-answer .fr-turn {border-radius: 12px; padding: 10px 14px; margin: 6px 0; max-width: 100%;}
#fr-answer .fr-user {background: #eef2ff; margin-left: 12%;}
#fr-answer .fr-bot {background: #f6f6f6; margin-right: 4%;}
#fr-answer .fr-tag {display: inline-block; font-size: .7em; color: #777; text-transform: uppercase;
  letter-spacing: .08em; border: 1px solid #ccc; border-radius: 4px; padding: 0 4px; margin-right: 6px;}
#fr-answer .fr-section {margin: 4px 0;}
#fr-answer .fr-conclusion {font-weight: 700;}
#fr-answer .fr-disagree {color: #8a4b00; font-size: .9em; margin-top: 6px;}
"""


def verdict_html(rec: dict[str, Any] | None, threshold: float, message: str | None = None) -> str:
    """The verdict and p(fake) as a bar with the threshold marked; or a message."""
    if message is not None:
        return (f'<div class="fr-verdict-box"><div class="fr-message" id="fr-message">'
                f'{html.escape(message)}</div></div>')
    if rec is None:
        return '<div class="fr-verdict-box"><span class="fr-scale">No image analysed yet.</span></div>'
    p = rec.get("p_fake")
    verdict = rec.get("verdict") or "n/a"
    p_text = "n/a" if p is None else f"{p:.3f}"
    fill = 0.0 if p is None else max(0.0, min(1.0, p))
    return (f'<div class="fr-verdict-box fr-{html.escape(verdict)}">'
            f'<span class="fr-word" id="fr-verdict-word">{html.escape(verdict.upper())}</span>'
            f'&nbsp; <span id="fr-pfake">p(fake) = {p_text}</span>'
            f'<div class="fr-bar" title="p(fake)"><div class="fr-fill" style="width:{fill * 100:.1f}%"></div>'
            f'<div class="fr-threshold" style="left:{threshold * 100:.1f}%" title="threshold"></div></div>'
            f'<div class="fr-scale"><span>0 real</span><span>threshold {threshold:.2f}</span><span>fake 1</span>'
            f'</div></div>')


def answer_html(answer: str | None, rec: dict[str, Any] | None = None) -> str:
    """The question and the answer as a chat turn, each section under a quiet label."""
    from pipeline.evaluation.parsing import split_sections

    user = f'<div class="fr-turn fr-user">{html.escape(QUESTION_SHOWN)}</div>'
    if answer is None:
        return user
    sections = split_sections(answer)
    if not any(sections.values()):
        body = html.escape(answer) or "&hellip;"
    else:
        parts = []
        for tag in SECTION_TAGS:
            text = sections.get(tag)
            if text is None:
                continue
            cls = "fr-section fr-conclusion" if tag == "conclusion" else "fr-section"
            parts.append(f'<div class="{cls}"><span class="fr-tag">{tag}</span>{html.escape(text)}</div>')
        body = "".join(parts)
    if rec is not None and rec.get("disagree"):
        body += (f'<div class="fr-disagree">The written conclusion says {html.escape(rec["answer_verdict"])}; '
                 f'p(fake) says {html.escape(rec["verdict"])}.</div>')
    return user + f'<div class="fr-turn fr-bot" id="fr-bot">{body}</div>'


@dataclass
class DemoState:
    """What the opacity slider needs of the last prediction (per browser session)."""

    grid: Any = None
    square: Any = None
    width: int = 0
    height: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class DemoService:
    """The Predictor behind the page, with the lock that keeps one request on the model."""

    def __init__(self, predictor, checkpoint_name: str):
        from modeling.image_processing import ImageProcessor

        self.predictor = predictor
        self.cfg = predictor.cfg
        self.processor = ImageProcessor(predictor.model.config)
        self.checkpoint_name = checkpoint_name
        self.lock = threading.Lock()

    def settings(self) -> dict[str, Any]:
        g = self.cfg.generation()
        return {"checkpoint": self.checkpoint_name, "protocol": self.cfg.protocol,
                "conversation": g["conversation"], "temperature": g["temperature"], "top_p": g["top_p"],
                "max_new_tokens": g["max_new_tokens"], "threshold": self.cfg.threshold, "seed": self.cfg.seed,
                "quantize": self.cfg.quantize, "dtype": self.cfg.dtype}

    def sample(self, path: str) -> dict[str, Any]:
        from pipeline.inference.data import image_sample

        return image_sample(path, self.processor, True, self.cfg.max_pixels, self.cfg.max_file_bytes,
                            limits=self.cfg.image_limits())

    def analyse(self, path: str | None):
        """Yields (record or None, partial answer, message or None, display square or None)
        as the answer streams; the record comes last."""
        from transformers import TextIteratorStreamer

        from pipeline.inference.data import error_reason

        if not path:
            yield None, None, "Choose an image first: upload, paste or drop one, or pick an example.", None
            return
        try:
            sample = self.sample(path)
        except Exception as exc:  # noqa: BLE001 - every unreadable upload is a message, not a traceback
            yield {"path": os.path.basename(path), "status": "error", "reason": error_reason(exc)}, None, (
                f"This file cannot be analysed: {readable_reason(error_reason(exc))}"), None
            return
        with self.lock:
            if self.cfg.detect_only:
                rec = self.predictor.records([sample])[0]
                yield rec, None, None, sample["display"]
                return
            tok = self.predictor.scorer.model.tokenizer
            streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True, timeout=600)
            box: dict[str, Any] = {}

            def work():
                try:
                    box["rec"] = self.predictor.records([sample], streamer=streamer)[0]
                except BaseException as exc:  # noqa: BLE001 - reported below, after the stream ends
                    box["error"] = exc
                    streamer.end()

            t = threading.Thread(target=work, daemon=True)
            t.start()
            text = ""
            for piece in streamer:
                text += piece
                yield None, text, None, None
            t.join()
        if "error" in box:
            raise box["error"]
        rec = box["rec"]
        yield rec, rec["answer"], None, sample["display"]


def record_text(rec: dict[str, Any] | None) -> str:
    """The record as JSON text: a JSON component would hand a dict with a "path" key to
    Gradio's client as a file to download."""
    import json

    return json.dumps(rec, indent=1, sort_keys=True, ensure_ascii=False)


def readable_reason(reason: str) -> str:
    key, _, detail = reason.partition(":")
    words = {
        "not_an_image": "it is not an image in a format the model reads (PNG, JPEG, WebP, BMP, GIF, TIFF).",
        "too_many_pixels": f"the image is too large ({detail.strip()}).",
        "image_size": f"its size is outside the accepted bounds ({detail.strip()}).",
        "file_too_large": f"the file is too large ({detail.strip()}).",
        "zero_byte": "the file is empty.",
        "truncated": "the image data is cut short (truncated file).",
        "missing": "the upload did not arrive.",
    }
    return words.get(key, reason)


def build_app(service: DemoService, examples: list[str] | None = None):
    """The gr.Blocks page (not launched)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr
    import numpy as np

    from pipeline.inference.evidence import Geometry, HEAT_ALPHA, render_overlay

    threshold = service.cfg.threshold

    def overlay(state: DemoState, alpha: float):
        if state is None or state.grid is None:
            return None
        return render_overlay(state.square, state.grid, Geometry(state.width, state.height), alpha)

    def analyse(payload, alpha):
        path = payload.get("path") if isinstance(payload, dict) else None
        state = DemoState()
        yield (verdict_html(None, threshold, "Analysing…") if path else verdict_html(None, threshold),
               answer_html(None), None, record_text(None), state)
        for rec, text, message, square in service.analyse(path):
            if message is not None:
                yield verdict_html(None, threshold, message), answer_html(None), None, record_text(rec), state
                return
            if rec is None:
                yield gr.skip(), answer_html(text), gr.skip(), gr.skip(), gr.skip()
                continue
            ev = rec.get("evidence")
            if ev:
                state.grid = np.load(ev["npy"])
                state.width, state.height, state.square = rec["width"], rec["height"], square
            yield (verdict_html(rec, threshold), answer_html(rec.get("answer"), rec), overlay(state, alpha),
                   record_text(rec), state)

    with gr.Blocks(title="FakeReasoning: is this image real or fake?", analytics_enabled=False) as app:
        gr.Markdown("## FakeReasoning: is this image real or fake, and why?\n"
                    f"Checkpoint `{html.escape(service.checkpoint_name)}`. Upload, paste or drop an image, "
                    "then press **Analyse**.")
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                image = gr.Image(type="filepath", sources=["upload", "clipboard"], label="Image",
                                 elem_id="fr-image", height=320)
                button = gr.Button("Analyse", variant="primary", elem_id="fr-analyse")
                if examples:
                    gr.Examples(examples=[[e] for e in examples], inputs=[image], label="Examples (demo data)")
            with gr.Column(scale=1, min_width=300):
                verdict = gr.HTML(verdict_html(None, threshold), elem_id="fr-verdict")
                answer = gr.HTML(answer_html(None), elem_id="fr-answer")
                evidence = gr.Image(label="Evidence: DINOv2 attention the fusion module consumed (padding hatched)",
                                    interactive=False, elem_id="fr-evidence", height=320, type="pil")
                alpha = gr.Slider(0.0, 1.0, value=HEAT_ALPHA, step=0.05, label="Evidence map opacity",
                                  elem_id="fr-opacity")
        with gr.Accordion("Settings and raw record", open=False):
            gr.JSON(service.settings(), label="Settings")
            record = gr.Code(label="Record (as fakereasoning-predict writes it)", language="json",
                             elem_id="fr-record", interactive=False)
        state = gr.State(DemoState())
        button.click(analyse, inputs=[image, alpha], outputs=[verdict, answer, evidence, record, state],
                     preprocess=False, api_name="predict", show_progress="minimal")
        alpha.change(overlay, inputs=[state, alpha], outputs=[evidence], api_name=False, queue=False)
    return app
