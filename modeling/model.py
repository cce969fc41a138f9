"""FakeReasoningModel: towers -> projectors -> forgery-aware fusion -> LLM (+ LoRA) with CPM.

Module names (what optimisers, checkpoints and ZeRO see):
  clip_tower.model.*          frozen CLIPVisionModel
  dino_tower.model.*          frozen Dinov2Model (transformers) or timm VisionTransformer
  clip_projector.{0,2}.*      trainable (reference: model.mm_projector)
  dino_projector.{0,2}.*      trainable (reference: model.dino_mm_projector)
  fusion.*                    trainable (reference: model.crossattention, see fusion.REFERENCE_NAMES)
  llm.*                       peft PeftModelForCausalLM; only lora_A/lora_B trainable
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from transformers.utils import ModelOutput

from modeling import cpm as cpm_math
from modeling.checkpoints.base import init_projectors_from_base, inspect_base
from modeling.config import ModelConfig
from modeling.fusion import ForgeryAwareFusion
from modeling.llm import apply_lora, build_llm, causal_lm, llm_dtype
from modeling.projector import build_projector
from modeling.template import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from modeling.vision import ClipTower, DinoTower, torch_dtype


@dataclass
class FakeReasoningOutput(ModelOutput):
    """loss = lm_loss + cpm.weight x cpm_loss. Per sample: p_fake (NaN where no CPM
    position was found), cpm_correct, cpm_found. logits only when asked for.

    A transformers ModelOutput (an ordered dict that is also a dataclass), so that
    DeepSpeed ZeRO-3's module hooks, which look for tensors only inside tensors,
    lists, tuples and dicts, see every output tensor (a plain dataclass makes it
    warn that the tensors inside cannot be detected). ModelOutput requires the
    fields after the first to default to None; forward always sets all but logits.
    """

    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    cpm_loss: torch.Tensor | None = None
    p_fake: torch.Tensor | None = None
    cpm_correct: torch.Tensor | None = None
    cpm_found: torch.Tensor | None = None
    logits: torch.Tensor | None = None


def merge_image_features(text_embeds: torch.Tensor, input_ids: torch.Tensor,
                         image_features: torch.Tensor, attention_mask: torch.Tensor,
                         labels: torch.Tensor | None = None):
    """Replace the single IMAGE_TOKEN_INDEX position of each row by its N image tokens.

    text_embeds [B, T, D] (the placeholder's row is ignored), image_features [B, N, D].
    Returns (embeds [B, T+N-1, D], attention_mask [B, T+N-1], labels or None), with
    image positions attended and not supervised. Every row grows by the same N, so
    right (training) and left (generation) padding are both preserved.
    """
    b, t = input_ids.shape
    n = image_features.shape[1]
    is_img = input_ids == IMAGE_TOKEN_INDEX
    counts = is_img.sum(dim=1)
    if bool((counts != 1).any()):
        bad = [i for i, c in enumerate(counts.tolist()) if c != 1]
        raise ValueError(f"each row of input_ids needs exactly one image placeholder "
                         f"({IMAGE_TOKEN_INDEX}); rows {bad} have {[counts[i].item() for i in bad]}")
    pos = is_img.long().argmax(dim=1, keepdim=True)  # [B, 1]
    j = torch.arange(t + n - 1, device=input_ids.device).unsqueeze(0)  # [1, L]
    in_img = (j >= pos) & (j < pos + n)
    text_idx = torch.where(j < pos, j, j - n + 1).clamp(0, t - 1)
    img_idx = (j - pos).clamp(0, n - 1)
    d = text_embeds.shape[-1]
    txt = text_embeds.gather(1, text_idx.unsqueeze(-1).expand(b, -1, d))
    img = image_features.to(text_embeds.dtype).gather(1, img_idx.unsqueeze(-1).expand(b, -1, d))
    embeds = torch.where(in_img.unsqueeze(-1), img, txt)
    mask = torch.where(in_img, torch.ones_like(text_idx), attention_mask.long().gather(1, text_idx))
    new_labels = None
    if labels is not None:
        new_labels = torch.where(in_img, torch.full_like(text_idx, IGNORE_INDEX),
                                 labels.gather(1, text_idx))
    return embeds, mask, new_labels


class FakeReasoningModel(nn.Module):
    def __init__(self, cfg: ModelConfig, tokenizer=None):
        """Build every component from `cfg` (random weights where a path is None).

        tokenizer: a transformers tokenizer; gives the vocabulary size, pad/eos
        ids and the CPM ids (via modeling.tokenization.tokenizer.cpm_context). Without one
        (e.g. the meta-device summary), `cfg.llm.vocab_size` must be set and
        the CPM/generation methods are unavailable.
        """
        super().__init__()
        cfg.validate()
        cfg.check_runtime()
        self.config = cfg
        self.tokenizer = tokenizer
        self.real_id = self.fake_id = None
        self.cpm_locator: cpm_math.DecisionLocator | None = None
        vocab = None
        pad = bos = eos = None
        if tokenizer is not None:
            from modeling.tokenization.tokenizer import cpm_context, cpm_decision_tokens

            prefix = cfg.cpm.resolved_prefix
            prefix_ids, self.real_id, self.fake_id = cpm_context(tokenizer, prefix)
            self.cpm_locator = cpm_math.DecisionLocator(tokenizer, prefix, cpm_decision_tokens(tokenizer, prefix),
                                                        len(prefix_ids))
            vocab = len(tokenizer)
            pad, bos, eos = tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id

        self.clip_tower = ClipTower(cfg)
        self.dino_tower = DinoTower(cfg)
        width = cfg.llm.hidden_size
        self.clip_projector = build_projector(cfg.projector_type, cfg.clip.hidden_size, width)
        self.dino_projector = build_projector(cfg.projector_type, cfg.dino.hidden_size, width)
        f = cfg.fusion
        self.fusion = ForgeryAwareFusion(width, f.num_heads, cfg.dino.num_heads, f.dropout,
                                         f.ffn_mult, f.norm_eps, f.log_eps, f.attn_implementation)
        dtype = torch_dtype(cfg.dtype)
        for m in (self.clip_projector, self.dino_projector, self.fusion):
            m.to(dtype)
        # The base folder's files are listed once, for the LLM and the projectors.
        base = inspect_base(cfg.llm.path) if cfg.llm.path else None
        self.llm = apply_lora(build_llm(cfg, vocab, pad, bos, eos, base=base), cfg.lora)
        # A LLaVA base at llm.path carries the projectors' starting weights (fusion stays random).
        init_projectors_from_base(cfg, {"clip_projector": self.clip_projector, "dino_projector": self.dino_projector},
                                  base)
        for tower, tcfg in ((self.clip_tower, cfg.clip), (self.dino_tower, cfg.dino)):
            tower.requires_grad_(not tcfg.freeze)

    @classmethod
    def from_config(cls, cfg: ModelConfig, tokenizer) -> "FakeReasoningModel":
        return cls(cfg, tokenizer)

    # ------------------------------------------------------------------ helpers
    def train(self, mode: bool = True):
        super().train(mode)
        # Frozen towers stay in eval mode (no dropout / drop-path) whatever the caller does.
        for tower, tcfg in ((self.clip_tower, self.config.clip), (self.dino_tower, self.config.dino)):
            if tcfg.freeze:
                tower.eval()
        return self

    def enable_gradient_checkpointing(self) -> None:
        """Activation checkpointing of the LLM's decoder layers (non-reentrant, so it
        works with frozen embeddings, LoRA and ZeRO-3)."""
        lm = causal_lm(self.llm)
        # transformers 5 renamed the method; keep working on both spellings.
        kwargs = {"use_reentrant": False}
        if hasattr(lm, "activation_checkpointing_enable"):
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        lm.config.use_cache = False

    def trainable_parameter_names(self) -> list[str]:
        return [n for n, p in self.named_parameters() if p.requires_grad]

    def _require_tokenizer(self, what: str):
        if self.tokenizer is None or self.real_id is None:
            raise RuntimeError(f"{what} needs the model to be built with a tokenizer "
                               f"(FakeReasoningModel.from_config(cfg, tokenizer))")
        return self.tokenizer

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> fused image tokens [B, N, llm width] in the LLM's dtype."""
        s = self.config.image_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, s, s):
            raise ValueError(f"pixel_values must be [B, 3, {s}, {s}] (model.image_size), got "
                             f"{tuple(pixel_values.shape)}")
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.clip.freeze):
            clip = self.clip_tower(pixel_values.to(torch_dtype(self.config.dtype)))
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.dino.freeze):
            dino, attn = self.dino_tower(pixel_values.to(torch_dtype(self.config.dtype)))
        clip = self.clip_projector(clip.to(self.clip_projector[0].weight.dtype))
        dino = self.dino_projector(dino.to(self.dino_projector[0].weight.dtype))
        fused = self.fusion(clip, dino, attn)
        return fused.to(llm_dtype(self.llm))

    def _embed(self, pixel_values, input_ids, attention_mask, labels=None):
        features = self.encode_images(pixel_values)
        emb_layer = causal_lm(self.llm).get_input_embeddings()
        safe_ids = input_ids.masked_fill(input_ids == IMAGE_TOKEN_INDEX, 0)
        return merge_image_features(emb_layer(safe_ids), input_ids, features, attention_mask,
                                    labels)

    # ------------------------------------------------------------------ training
    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor, labels: torch.Tensor,
                forgery_labels: torch.Tensor | None = None,
                return_logits: bool = False) -> FakeReasoningOutput:
        """Teacher-forced step. input_ids/labels right padded, -200 at the image position,
        labels -100 outside the answer; forgery_labels [B] 0 real / 1 fake."""
        embeds, mask, labels_x = self._embed(pixel_values, input_ids, attention_mask, labels)
        c = self.config.cpm
        use_cpm = c.enabled and self.real_id is not None
        # From the labels alone, before the LLM's forward is queued behind it.
        pos = self.cpm_locator.positions(labels_x) if use_cpm and c.position == "labels" else None
        out = causal_lm(self.llm)(inputs_embeds=embeds, attention_mask=mask, labels=labels_x,
                                  use_cache=False)
        lm_loss = out.loss
        logits = out.logits
        b = input_ids.shape[0]
        if use_cpm:
            if pos is None:
                pos = cpm_math.find_positions_by_argmax(logits, labels_x, self.real_id,
                                                        self.fake_id)
            found = pos >= 0
            pair = cpm_math.gather_pair_logits(logits, pos, self.real_id, self.fake_id)
            cpm_loss, p_fake, correct = cpm_math.cpm_from_pair_logits(
                pair, forgery_labels, c.temperature, found)
            if cpm_loss is None:
                cpm_loss = lm_loss.new_zeros(())
                correct = torch.zeros(b, dtype=torch.bool, device=logits.device)
        else:
            cpm_loss = lm_loss.new_zeros(())
            found = torch.zeros(b, dtype=torch.bool, device=logits.device)
            p_fake = torch.full((b,), float("nan"), device=logits.device)
            correct = torch.zeros(b, dtype=torch.bool, device=logits.device)
        loss = lm_loss + c.weight * cpm_loss if c.enabled else lm_loss
        return FakeReasoningOutput(loss=loss, lm_loss=lm_loss.detach(), cpm_loss=cpm_loss.detach(),
                                   p_fake=p_fake.detach(), cpm_correct=correct, cpm_found=found,
                                   logits=logits if return_logits else None)

    # ------------------------------------------------------------------ inference
    def _prompt_ids(self, prompts: Sequence) -> list[list[int]]:
        tok = self._require_tokenizer("prompting")
        from modeling.template import build_prompt

        ids = []
        for p in prompts:
            ids.append(list(build_prompt(tok, p)[0]) if isinstance(p, str) else list(p))
        return ids

    def _left_padded(self, pixel_values, id_lists: list[list[int]]):
        tok = self._require_tokenizer("batching")
        if len(id_lists) != pixel_values.shape[0]:
            raise ValueError(f"{len(id_lists)} prompts for {pixel_values.shape[0]} images")
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        t = max(len(x) for x in id_lists)
        dev = pixel_values.device
        input_ids = torch.full((len(id_lists), t), pad, dtype=torch.long, device=dev)
        mask = torch.zeros((len(id_lists), t), dtype=torch.long, device=dev)
        for i, ids in enumerate(id_lists):
            input_ids[i, t - len(ids):] = torch.as_tensor(ids, dtype=torch.long, device=dev)
            mask[i, t - len(ids):] = 1
        embeds, mask, _ = self._embed(pixel_values, input_ids, mask)
        return embeds, mask

    def _generate_ids(self, pixel_values: torch.Tensor, ids: list[list[int]], max_new_tokens: int,
                      do_sample: bool, temperature: float, top_p: float, **generate_kwargs) -> torch.Tensor:
        """[B, steps] ids generated after the prompt ids `ids` (left padded), pads after eos."""
        tok = self._require_tokenizer("generate")
        embeds, mask = self._left_padded(pixel_values, ids)
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample,
                      pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                      eos_token_id=tok.eos_token_id)
        if do_sample:
            kwargs.update(temperature=temperature, top_p=top_p)
        kwargs.update(generate_kwargs)
        return causal_lm(self.llm).generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)

    @torch.no_grad()
    def generate(self, pixel_values: torch.Tensor, prompts: Sequence, max_new_tokens: int = 512,
                 do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                 answer_prefix: str = "", **generate_kwargs) -> list[str]:
        """Batched generation (left padding). prompts: questions (str, put into the
        template with build_prompt) or prompt id lists (with one -200). Greedy by
        default. answer_prefix forces the start of the answer; the returned texts
        are the continuations only (without the prefix)."""
        tok = self._require_tokenizer("generate")
        ids = self._prompt_ids(prompts)
        if answer_prefix:
            from modeling.template import encode_answer
            ids = [x + encode_answer(tok, answer_prefix) for x in ids]
        out = self._generate_ids(pixel_values, ids, max_new_tokens, do_sample, temperature, top_p,
                                 **generate_kwargs)
        return tok.batch_decode(out, skip_special_tokens=True)

    @torch.no_grad()
    def generate_scored(self, pixel_values: torch.Tensor, prompts: Sequence, max_new_tokens: int = 512,
                        do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                        **generate_kwargs) -> ScoredGeneration:
        """generate + score_p_fake with one full forward per image where the answer allows.

        The same texts as `generate` (recording does not touch the RNG or the
        scores decoding uses). p_fake is the value `score_p_fake(pixel_values,
        prompts, texts)` gives: that method feeds the prompt plus the answer ids
        up to its last conclusion prefix; when generation produced exactly those
        ids, the logits at the next step are the ones it needs, so they are read
        from the generation's forwards (a forward hook keeps the canonical
        real/fake pair of every step, B x steps x 2 floats instead of the whole
        vocabulary). The rest (no conclusion, a conclusion whose re-encoding
        differs from the generated ids, a prefix at the very end, beam search)
        get score_p_fake's forced forward, batched over just those rows.
        """
        tok = self._require_tokenizer("generate_scored")
        ids = self._prompt_ids(prompts)
        lm = causal_lm(self.llm)
        recorder = _PairRecorder(self.real_id, self.fake_id)
        # Beam search reorders rows between steps, so steps do not line up with the
        # output rows (the checkpoint's generation_config may ask for beams too).
        beams = generate_kwargs.get("num_beams", getattr(lm.generation_config, "num_beams", 1))
        handle = lm.register_forward_hook(recorder, with_kwargs=True) if (beams or 1) == 1 else None
        try:
            out = self._generate_ids(pixel_values, ids, max_new_tokens, do_sample, temperature, top_p,
                                     **generate_kwargs)
        finally:
            if handle is not None:
                handle.remove()
        if out.shape[0] != len(ids):
            raise ValueError(f"generate_scored scores one answer per image; generation returned {out.shape[0]} "
                             f"sequences for {len(ids)} images (num_return_sequences?)")
        texts = tok.batch_decode(out, skip_special_tokens=True)
        steps = recorder.stacked()  # [B, steps, 2] or None
        p_fake = torch.full((len(texts),), float("nan"), dtype=torch.float32, device=out.device)
        from_generation = [False] * len(texts)
        rows, at = [], []
        for i, (row, (answer_ids, has_conclusion)) in enumerate(zip(out.tolist(), self._cpm_answer_ids(texts))):
            k = len(answer_ids)
            # steps[:, k] predicts generated id k, i.e. follows prompt + row[:k].
            if has_conclusion and steps is not None and k < steps.shape[1] and row[:k] == answer_ids:
                rows.append(i)
                at.append(k)
        if rows:
            r = torch.tensor(rows, device=steps.device)
            pair = steps[r, torch.tensor(at, device=steps.device)]
            _, p, _ = cpm_math.cpm_from_pair_logits(pair, None, self.config.cpm.temperature)
            p_fake[r.to(p_fake.device)] = p.to(p_fake.device)
            for i in rows:
                from_generation[i] = True
        rest = [i for i, g in enumerate(from_generation) if not g]
        if rest:
            sel = torch.tensor(rest, device=pixel_values.device)
            forced = self.score_p_fake(pixel_values[sel], [ids[i] for i in rest], [texts[i] for i in rest])
            p_fake[sel.to(p_fake.device)] = forced.to(p_fake.device)
        return ScoredGeneration(texts=texts, p_fake=p_fake, from_generation=from_generation)

    def _cpm_answer_ids(self, answers: Sequence[str | None]) -> list[tuple[list[int], bool]]:
        """Per answer: (the answer ids score_p_fake feeds after the prompt, whether the
        answer has its own conclusion). With a conclusion: the stripped answer up to
        the end of its last prefix (any whitespace); without: the answer followed by
        the forced prefix (`cpm.answer_prefix`, the spelling trained on)."""
        tok = self._require_tokenizer("score_p_fake")
        from modeling.template import encode_answer

        prefix = self.config.cpm.resolved_prefix
        out = []
        for ans in answers:
            ans = (ans or "").strip()
            end = cpm_math.last_prefix_end(ans, prefix)
            if end >= 0:
                text = ans[:end]
            else:
                text = f"{ans} {prefix}" if ans else prefix
            out.append((encode_answer(tok, text), end >= 0))
        return out

    @torch.no_grad()
    def score_p_fake(self, pixel_values: torch.Tensor, prompts: Sequence,
                     answers: Sequence[str | None] | None = None) -> torch.Tensor:
        """p(fake) [B] (float32) from the real/fake logits right after the conclusion
        prefix (`cpm.answer_prefix`, the one the model was trained on): the last one
        inside each generated answer, whatever its whitespace (text up to it is kept),
        or a forced one (appended to the answer, or alone when the answer is None /
        has no conclusion). One full forward (towers, fusion, LLM) over prompt + answer;
        `generate_scored` avoids it for answers whose generation already computed it."""
        ids = self._prompt_ids(prompts)
        answers = list(answers) if answers is not None else [None] * len(ids)
        if len(answers) != len(ids):
            raise ValueError(f"{len(answers)} answers for {len(ids)} prompts")
        full = [x + a for x, (a, _) in zip(ids, self._cpm_answer_ids(answers))]
        embeds, mask = self._left_padded(pixel_values, full)
        out = causal_lm(self.llm)(inputs_embeds=embeds, attention_mask=mask, use_cache=False,
                                  logits_to_keep=1)
        last = out.logits[:, -1]
        pair = torch.stack([last[:, self.real_id], last[:, self.fake_id]], dim=-1).float()
        _, p_fake, _ = cpm_math.cpm_from_pair_logits(pair, None, self.config.cpm.temperature)
        return p_fake


@dataclass
class ScoredGeneration:
    """What FakeReasoningModel.generate_scored returns for a batch of B images.

    texts: the generated answers (continuations only), as `generate` returns them;
    p_fake: [B] float32, score_p_fake's value for each answer;
    from_generation: per image, True when p_fake was read from the generation's own
    logits (one full forward: the prefill), False when score_p_fake's forced
    forward ran for it (two).
    """

    texts: list[str]
    p_fake: torch.Tensor
    from_generation: list[bool]

    @property
    def forwards(self) -> list[int]:
        """Full prompt forwards per image: generation's prefill, plus the forced one where it ran."""
        return [1 if g else 2 for g in self.from_generation]


class _PairRecorder:
    """Forward hook on the causal LM during `generate`: keeps the last position's raw
    logits of the canonical real/fake tokens from every forward, i.e. per decoding
    step the values the CPM reads ([B, 2] float32, as generate's own float32 copy).

    A hook rather than a LogitsProcessor because generate runs custom processors
    after the ones it builds from the generation config (repetition penalty,
    suppressed tokens, ...; transformers' _merge_criteria_processor_list appends
    custom ones), so a processor may see modified scores; the model's output is
    raw by construction. Only the first forward may span several positions (the
    prefill); a chunked prefill would shift the steps, so it is refused.
    """

    def __init__(self, real_id: int, fake_id: int):
        self.ids = [int(real_id), int(fake_id)]
        self.steps: list[torch.Tensor] = []

    def __call__(self, module, args, kwargs, output):
        x = kwargs.get("inputs_embeds")
        if x is None:
            x = kwargs.get("input_ids", args[0] if args else None)
        if self.steps and x is not None and x.shape[1] > 1:
            raise RuntimeError("generate ran a multi-position forward after the prefill (chunked prefill?); "
                               "generate_scored needs one forward per decoding step")
        self.steps.append(output.logits[:, -1, self.ids].float())

    def stacked(self) -> torch.Tensor | None:
        """[B, steps, 2], steps in decoding order (a few extra at the end are harmless), or None."""
        return torch.stack(self.steps, dim=1) if self.steps else None
