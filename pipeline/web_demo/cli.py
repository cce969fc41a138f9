"""A web page that asks a FakeReasoning checkpoint about an image: the verdict and
p(fake), the reasoning as a chat turn, and where the model looked.

    pip install '.[demo]'
    fakereasoning-demo --checkpoint runs/x/export/merged            # http://127.0.0.1:7860
    fakereasoning-demo --checkpoint DIR --examples runs/demo/mmfr/evaluation_sets/flux/1_fake

It listens on 127.0.0.1 (this machine only) by default. `--host 0.0.0.0` makes it
reachable by anyone who can reach this machine's port: there is no login, every
visitor can upload images and use the GPU, and uploads are kept in Gradio's
temporary folder; use it only on a trusted network or behind an authenticating
proxy. No telemetry is sent (Gradio's analytics are off) and no public share link
is made unless you pass --share.

The page shows what `fakereasoning-predict --evidence DIR` writes for the same
file and settings (the same Predictor runs it): protocol, generation flags and
threshold are the command's. Requests queue (a position is shown to each
visitor); --concurrency of them are admitted at once and the model serves one
at a time.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="fakereasoning-demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="model folder (anything fakereasoning-eval accepts)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; 0.0.0.0 exposes it, see above)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--examples", nargs="*", default=[], metavar="PATH",
                   help="example images shown under the upload box (files or folders)")
    p.add_argument("--max-examples", type=int, default=8, help="at most this many examples (default 8)")
    p.add_argument("--concurrency", type=int, default=1,
                   help="requests admitted at once (default 1: one GPU serves one generation at a time)")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests beyond which new ones are refused")
    p.add_argument("--share", action="store_true", help="also make a public Gradio share link (off by default)")
    p.add_argument("--threshold", type=float, default=0.5, help="verdict fake when p(fake) >= this (default 0.5)")
    p.add_argument("--protocol", choices=("ours", "reference"), default="ours", help="as in fakereasoning-eval")
    p.add_argument("--max-new-tokens", type=int, help="answer length limit (default 512)")
    p.add_argument("--temperature", type=float, help="0 = greedy (default: the protocol's)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="override the checkpoint's dtype")
    p.add_argument("--quantize", choices=("8bit", "4bit"), help="load the LLM in 8 or 4 bits (bitsandbytes)")
    p.add_argument("--detect-only", action="store_true", help="no reasoning, p(fake) only (see fakereasoning-predict)")
    p.add_argument("--max-pixels", type=int, default=89_478_485, help="refuse larger images (pixels)")
    p.add_argument("--max-file-bytes", type=int, default=50 << 20, help="refuse larger uploads (default 50 MiB)")
    return p.parse_args(argv)


def example_files(paths: list[str], limit: int) -> list[str]:
    from pipeline.inference.inputs import Source, iter_inputs

    out = [i.path for i in iter_inputs(Source(p) for p in paths) if i.kind == "image"]
    return out[:limit]


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from pipeline.cli_config import checked_config
    from pipeline.inference.config import PredictConfig

    evidence_dir = tempfile.mkdtemp(prefix="fakereasoning-demo-evidence-")
    cfg = checked_config(lambda: PredictConfig(
        checkpoint=args.checkpoint, threshold=args.threshold, protocol=args.protocol,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, dtype=args.dtype,
        quantize=args.quantize, detect_only=args.detect_only, evidence=evidence_dir, batch_size=1,
        max_pixels=args.max_pixels, max_file_bytes=args.max_file_bytes, progress=False).validate(
            require_inputs=False), False)
    if isinstance(cfg, int):
        return cfg
    for name in ("concurrency", "max_queue", "max_examples"):
        if getattr(args, name) < 1:
            print(f"error: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    try:
        import gradio  # noqa: F401
    except ImportError:
        print("error: the web demo needs Gradio: pip install '.[demo]'", file=sys.stderr)
        return 2
    from pipeline.inference.run import Predictor
    from pipeline.web_demo.app import DemoService, build_app

    predictor = Predictor.load(cfg)
    service = DemoService(predictor, os.path.basename(os.path.normpath(args.checkpoint)))
    app = build_app(service, example_files(args.examples, args.max_examples))
    app.queue(default_concurrency_limit=args.concurrency, max_size=args.max_queue)
    print(f"fakereasoning-demo: serving {args.checkpoint} on http://{args.host}:{args.port}", file=sys.stderr,
          flush=True)
    from pipeline.web_demo.app import CSS

    app.launch(server_name=args.host, server_port=args.port, share=args.share, show_error=False,
               allowed_paths=[evidence_dir], quiet=True, css=CSS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
