"""Building a training run, on every rank in the same order (`build_run` -> `Run`):
the global batch and the DeepSpeed config, the CPM conclusion prefix, the run's
files, the tokenizer, the model under ZeRO, the engine and its parameter counts.

run.py restores the training state into what this builds, then trains it.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass
from typing import Any

import torch
import yaml

from common.atomic_files import new_dir_beside, replace_dir, write_atomic
from modeling.vision import torch_dtype
from pipeline import distributed as dist
from pipeline.training import checkpoint_space as space
from pipeline.training.batch import BatchPlan, plan_for
from pipeline.training.checkpoint_tags import newest_checkpoint_bytes
from pipeline.training.checkpointing import TrainState, save_checkpoint
from pipeline.training.config import TrainConfig
from pipeline.training.lr_schedule import build_schedule
from pipeline.training.resume import ResumePoint

log = logging.getLogger("pipeline.training")


# --------------------------------------------------------------------------- tokenizer

def resolve_cpm_prefix(cfg: TrainConfig, info: dist.DistInfo) -> str:
    """The conclusion prefix the CPM trains on, decided on rank 0 and broadcast.

    model.cpm.answer_prefix="auto" takes the most common spelling in the first
    cpm_check.prefix_samples answers of the training shards, so the forced prefix
    stored with the checkpoint (and used by evaluation) is the one the data has.
    An explicit prefix is checked against the same answers: one that occurs in
    none of them is an error, since the CPM would never find its position.
    """
    c = cfg.model.cpm
    decision: tuple[str | None, str | None] = (None, None)
    if info.is_main and c.enabled and c.weight > 0:  # the same rule as the loop's CpmWatch
        decision = _decide_cpm_prefix(cfg)
    prefix, error = dist.broadcast_object(decision)
    if error is not None:
        raise ValueError(error)
    return prefix if prefix is not None else c.resolved_prefix


def _decide_cpm_prefix(cfg: TrainConfig) -> tuple[str | None, str | None]:
    """Rank 0's decision for `resolve_cpm_prefix`: (prefix, None), or (None, the error)."""
    from modeling.cpm import prefix_spellings
    from pipeline.data.corpus import shard_corpus

    c = cfg.model.cpm
    wanted = c.resolved_prefix
    try:
        answers = list(shard_corpus(cfg.data.train_shards, cfg.cpm_check.prefix_samples, roles=("gpt",),
                                    purpose="model.cpm.answer_prefix is checked against the training answers",
                                    remedy="check data.train_shards", sizes_file=cfg.data.sizes_file))
        counts = prefix_spellings(answers, wanted)
        if not counts:
            return (None, f"none of the first {len(answers)} training answers of {cfg.data.train_shards} "
                          f"contains the CPM conclusion {wanted!r} followed by real/fake (in any "
                          f"whitespace); the CPM loss would be zero. Set model.cpm.answer_prefix to "
                          f"the text before the decision word in your answers, or model.cpm.enabled=false")
        spelling, n = counts.most_common(1)[0]
        found = sum(counts.values())
        chosen = spelling if c.answer_prefix == "auto" else c.answer_prefix
        log.info("CPM conclusion prefix %r (%s): %d of %d answers read spell it %r; %d have a conclusion "
                 "in some whitespace variant; spellings: %s", chosen,
                 "from the data" if c.answer_prefix == "auto" else "from the config", n, len(answers),
                 spelling, found, dict(counts.most_common(5)))
        if c.answer_prefix != "auto" and spelling != c.answer_prefix:
            log.warning("model.cpm.answer_prefix=%r but the training answers mostly spell it %r: positions "
                        "are still found, but evaluation will force the configured spelling",
                        c.answer_prefix, spelling)
        return (chosen, None)
    except (FileNotFoundError, ValueError) as e:
        return (None, str(e))


def prepare_tokenizer(cfg: TrainConfig, info: dist.DistInfo):
    """The configured tokenizer, or (rank 0 builds, the others wait) a BPE built
    from the shards under <output_dir>/tokenizer; an existing one is reused, so a
    resumed run tokenises exactly as before."""
    from modeling.tokenization.loading import load_tokenizer

    path = cfg.tokenizer.path
    if path is None:
        path = os.path.join(cfg.output_dir, "tokenizer")
        if info.is_main and not os.path.isfile(os.path.join(path, "tokenizer.json")):
            from modeling.tokenization.tokenizer import build_bpe_tokenizer
            from pipeline.data.corpus import tokenizer_corpus

            corpus = tokenizer_corpus(cfg.data.train_shards, cfg.tokenizer.corpus_samples, cfg.data.sizes_file)
            staged = new_dir_beside(path)  # a fresh, unpredictable name: nothing planted there is followed
            build_bpe_tokenizer(corpus, staged, vocab_size=cfg.tokenizer.vocab_size,
                                model_max_length=cfg.data.max_length)
            replace_dir(staged, path)
            log.info("built a %d-token BPE tokenizer in %s", cfg.tokenizer.vocab_size, path)
        dist.barrier()
    return load_tokenizer(path)


# --------------------------------------------------------------------------- model and engine

def build_model(cfg: TrainConfig, tokenizer, skip_init: bool = False):
    """The model (seeded). skip_init: its weights are about to be overwritten
    (the export loads the gathered state), so skip the initialisers."""
    from modeling.checkpoints.tensor_io import skip_weight_init
    from modeling.model import FakeReasoningModel

    torch.manual_seed(cfg.loop.seed)
    with skip_weight_init() if skip_init else contextlib.nullcontext():
        model = FakeReasoningModel.from_config(cfg.model, tokenizer)
    if cfg.loop.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model


def total_optimizer_steps(cfg: TrainConfig, batches_per_epoch: int, grad_accum: int) -> int:
    """The run's optimizer steps: loop.max_steps, or loop.epochs of the stream."""
    if cfg.loop.max_steps is not None:
        return cfg.loop.max_steps
    return max(1, math.floor(cfg.loop.epochs * batches_per_epoch / grad_accum))


def write_run_files(cfg: TrainConfig, ds_config: dict) -> None:
    """Rank 0: train_config.yaml in output_dir and the DeepSpeed JSON in the checkpoint folder."""
    os.makedirs(cfg.output_dir, exist_ok=True)
    write_atomic(os.path.join(cfg.output_dir, "train_config.yaml"), yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    dist.write_deepspeed_config(ds_config, cfg.checkpoint_dir)


def start_engine(cfg: TrainConfig, model, ds_config: dict, total_steps: int):
    """The DeepSpeed engine over `model`, with its parameter groups and the LR schedule."""
    schedule = build_schedule(total_steps, cfg.optim.warmup_ratio, cfg.optim.warmup_steps, cfg.optim.lr_schedule,
                              cfg.optim.min_lr_ratio)
    groups = dist.param_groups(model, cfg.optim.lr, cfg.optim.projector_lr or cfg.optim.lr,
                               cfg.optim.weight_decay)
    return dist.initialize_engine(model, ds_config, groups, schedule)


@dataclass
class ParamCounts:
    """The engine's parameter elements, for the run's record and the checkpoint-size estimate."""

    total: int
    """Elements of the whole model."""
    per_rank: list[int]
    """Elements each rank stores (its ZeRO partition and the persistent parameters)."""
    trainable_per_rank: list[int]
    """Trainable elements each rank stores."""
    trainable: int
    """Trainable elements of the whole model."""
    element_bytes: int
    """Bytes of one parameter element (model.dtype)."""

    @classmethod
    def gather(cls, engine, dtype: str) -> "ParamCounts":
        """Every rank (two all-gathers): the counts of the engine's module."""
        local, whole = dist.partition_numels(engine.module)
        per_rank = dist.all_gather_objects(local)
        trainable_per_rank = dist.all_gather_objects(dist.partition_numels(engine.module, trainable_only=True)[0])
        return cls(total=whole, per_rank=per_rank, trainable_per_rank=trainable_per_rank,
                   trainable=sum(dist.full_numel(p) for p in engine.module.parameters() if p.requires_grad),
                   element_bytes=torch.tensor([], dtype=torch_dtype(dtype)).element_size())


# --------------------------------------------------------------------------- the run

@dataclass
class Run:
    """One training run as built on this rank: what the restore, the loop and the
    end of the run need besides the training state."""

    cfg: TrainConfig
    info: dist.DistInfo
    plan: BatchPlan
    ds_config: dict
    tokenizer: Any
    model: Any
    engine: Any
    batches_per_epoch: int
    """Batches of one epoch on each rank."""
    total_steps: int
    """Optimizer steps of the whole run (the LR schedule's length)."""
    params: ParamCounts
    stream: dict
    """The data stream's identity (pipeline.data.stream_identity), kept with each checkpoint."""

    def checkpoint_estimate(self) -> int:
        """Bytes one checkpoint takes: the newest complete one's, or an estimate before there is one."""
        p = self.params
        return space.estimate_checkpoint_bytes(p.per_rank, p.trainable_per_rank, p.element_bytes,
                                               measured=newest_checkpoint_bytes(self.cfg.checkpoint_dir))

    def save(self, state: TrainState) -> None:
        """Every rank: a complete checkpoint of `state` (checkpointing.save_checkpoint)."""
        cfg, is_main = self.cfg, self.info.is_main
        save_checkpoint(self.engine, cfg.checkpoint_dir, state, cfg.to_dict(), cfg.checkpoint.keep_last, is_main,
                        estimate=self.checkpoint_estimate() if is_main else None,
                        space_margin=cfg.checkpoint.space_margin)

    def record(self) -> dict:
        """What run_info.json says of the run (the tracker adds its own)."""
        return {"world_size": self.info.world_size, "backend": self.info.backend,
                "zero_stage": dist.zero_stage(self.ds_config), "params_total": self.params.total,
                "params_per_rank": self.params.per_rank, "trainable_params": self.params.trainable,
                "batches_per_epoch": self.batches_per_epoch, "total_steps": self.total_steps,
                **self.plan.record(), "stream": self.stream}


def build_run(cfg: TrainConfig, info: dist.DistInfo, resume: ResumePoint | None) -> Run:
    """Every rank, in this order (the collectives must match): the batch plan, the
    DeepSpeed config, the CPM prefix, the run's files, the tokenizer, the model,
    the engine and its parameter counts."""
    from pipeline.data import batches_per_epoch, stream_identity

    plan = plan_for(cfg, info.world_size)  # the CLI checked it already for the launcher's WORLD_SIZE
    ds_config = dist.resolve_deepspeed_config(cfg, info.world_size)
    if resume is not None and resume.universal:
        dist.enable_universal_load(ds_config)
    # Stored in the model config (before train_config.yaml is written), so the run's
    # files, checkpoints and export all carry the prefix trained on.
    cfg.model.cpm.answer_prefix = resolve_cpm_prefix(cfg, info)
    if info.is_main:
        write_run_files(cfg, ds_config)
    tokenizer = prepare_tokenizer(cfg, info)

    with dist.model_construction(ds_config):
        model = build_model(cfg, tokenizer)
    bpe = batches_per_epoch(cfg.data, info.world_size)
    total = total_optimizer_steps(cfg, bpe, plan.grad_accum)
    engine = start_engine(cfg, model, ds_config, total)
    params = ParamCounts.gather(engine, cfg.model.dtype)
    return Run(cfg=cfg, info=info, plan=plan, ds_config=ds_config, tokenizer=tokenizer, model=model, engine=engine,
               batches_per_epoch=bpe, total_steps=total, params=params,
               stream=stream_identity(cfg.data, info.world_size))
