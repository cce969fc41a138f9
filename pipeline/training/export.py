"""The final export: the ZeRO-3 partitions gathered into a plain model, written
as the trainable tensors and as a merged model folder."""
from __future__ import annotations

import os
import shutil
from collections.abc import Mapping

from common.atomic_files import RefusedLink, is_link, new_dir_beside, replace_dir
from pipeline import distributed as dist


def export_final(model, build_plain_model, tokenizer, out_dir: str, rank: int,
                 card: Mapping | str | None = None) -> dict[str, str]:
    """Every rank: gather the ZeRO-3 partitions; rank 0 writes

      <out_dir>/trainable/   LoRA adapter + the non-LoRA trainables (modeling.checkpoints.checkpoint.save_trainable)
      <out_dir>/merged/      the merged model directory (modeling.checkpoints.checkpoint.export_merged)

    `build_plain_model()` makes an unpartitioned model of the same architecture
    on rank 0, into which the gathered full state dict is loaded. `card`: the
    training section of both folders' README.md (the run's config dict, or
    markdown; modeling.checkpoints.model_card).
    """
    from modeling.checkpoints.checkpoint import export_merged, save_trainable

    state = dist.gather_state_dict(model, rank)
    paths = {"trainable": os.path.join(out_dir, "trainable"), "merged": os.path.join(out_dir, "merged")}
    # Each folder is built beside its final name and swapped in (atomic_files.replace_dir):
    # a crash while exporting leaves the previous export whole, never none at all.
    if rank == 0:
        with dist.plain_construction():
            plain = build_plain_model()
        missing, unexpected = plain.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"export: gathered state does not fit the model "
                               f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
        plain.eval()
        for p in paths.values():
            if is_link(p):  # before the minutes of writing, not only at the swap
                raise RefusedLink(f"export: {p} is a symbolic link; refusing to replace what it points at")
        staged = {k: new_dir_beside(p) for k, p in paths.items()}
        try:
            save_trainable(plain, staged["trainable"], training=card)
            export_merged(plain, tokenizer, staged["merged"], training=card)
        except BaseException:
            for d in staged.values():
                shutil.rmtree(d, ignore_errors=True)  # our own fresh folders (mkdtemp)
            raise
        for k, p in paths.items():
            replace_dir(staged[k], p)
    dist.barrier()
    return paths
