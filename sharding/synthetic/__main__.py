"""Command line of the synthetic MMFR generator: `python -m sharding.synthetic --help`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sharding.schema import GENERATORS
from sharding.synthetic.generate import SyntheticConfig, generate_from_config

_EPILOG = f"""\
layout written (as the released MMFR, docs/architecture.md, section 3):
  diffusiondb/part-000001/<uuid>.png ...        training fakes, ceil(N/2), PNG
  diffusiondb/diffusiondb_reasoning.json
  laion/00000/<9 digits>.jpg ...                training reals, floor(N/2), JPEG
  laion/laion_reasoning.json
  evaluation_sets/<gen>/0_real/*, 1_fake/*      M/2 real + M/2 fake per generator
  evaluation_sets/<gen>/<gen>_reasoning.json    keys like "flux/1_fake/flux_00000.png"
  forgery_reasoning_cot.json                    LLaVA records; ~30% of images have 2-3

generators, in reference order: {", ".join(GENERATORS)}

example:
  python -m sharding.synthetic --out runs/mmfr --train-images 2000 \\
      --eval-images-per-generator 100 --seed 0
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sharding.synthetic",
        description=(
            "Write a small synthetic MMFR dataset in exactly the released layout.\n"
            "Fakes carry generator-specific learnable traces (periodic up-sampling tiles,\n"
            "spectral ripples, colour banding) that transfer unevenly from the training\n"
            "fakes to the 10 evaluation generators; reals are noisy JPEG 'photographs'.\n"
            "The same arguments and seed give byte-identical files."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, required=True, help="dataset root to write (created if missing)")
    parser.add_argument("--train-images", type=int, required=True, metavar="N",
                        help="training images: ceil(N/2) diffusiondb fakes + floor(N/2) laion reals")
    parser.add_argument("--eval-images-per-generator", type=int, required=True, metavar="M",
                        help="images per evaluation generator, M/2 real + M/2 fake (M must be even)")
    parser.add_argument("--seed", type=int, default=0, help="seed of everything random (default 0)")
    parser.add_argument("--image-size", type=int, default=64, metavar="PX",
                        help="base image side, multiple of 8 and >= 32; sizes vary up to +25%% (default 64)")
    parser.add_argument("--images-per-folder", type=int, default=0, metavar="K",
                        help="images per diffusiondb part / laion folder; 0 = auto: 4 folders, "
                             "at most 1000 images each (default 0)")
    parser.add_argument("--multi-record-fraction", type=float, default=0.3, metavar="F",
                        help="fraction of training images with 2-3 CoT records (default 0.3)")
    parser.add_argument("--null-fraction", type=float, default=0.3, metavar="F",
                        help="probability that an attribute text is null (default 0.3)")
    parser.add_argument("--workers", type=int, default=1,
                        help="rendering processes; the output does not depend on it (default 1)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace diffusiondb/, laion/, evaluation_sets/ and the CoT file if present")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = SyntheticConfig(
        out=args.out, train_images=args.train_images,
        eval_images_per_generator=args.eval_images_per_generator, seed=args.seed,
        image_size=args.image_size, images_per_folder=args.images_per_folder,
        multi_record_fraction=args.multi_record_fraction, null_fraction=args.null_fraction,
        workers=args.workers, overwrite=args.overwrite, progress=not args.quiet,
    )
    try:
        summary = generate_from_config(config)
    except (ValueError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
