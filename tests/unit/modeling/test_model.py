"""FakeReasoningModel on the tiny preset: forward/backward, trainable set, image
splicing, CPM math by hand, batched generation, p_fake scoring."""
import math
import time

import pytest
import torch

from modeling import cpm as cpm_math
from modeling.config import ConfigError, ModelConfig
from modeling.model import IMAGE_TOKEN_INDEX, FakeReasoningModel, merge_image_features
from modeling.template import build_training_example
from modeling.tokenization.tokenizer import build_bpe_tokenizer, cpm_context, demo_corpus

torch.set_num_threads(1)
QUESTION = "Is this image real or fake?"
# The real MMFR layout (a space after each opening tag) and a minority spelling.
ANSWERS = [
    ("<SUMMARY> I will check the image. </SUMMARY> <CAPTION> A scene. </CAPTION> "
     "<REASONING> The texture looks unnatural. </REASONING> <CONCLUSION> This image is fake. </CONCLUSION>", 1),
    ("<REASONING>The image shows a natural scene with consistent lighting and fine "
     "detail.</REASONING>\n<CONCLUSION>This image is real.</CONCLUSION>", 0),
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    corpus = demo_corpus(["Low Image Quality", "High Image Quality"], [QUESTION])
    return build_bpe_tokenizer(corpus, tmp_path_factory.mktemp("tok"), vocab_size=400)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    return FakeReasoningModel.from_config(ModelConfig.preset("tiny"), tokenizer)


def _batch(tokenizer, answers=ANSWERS, size=56):
    exs = [build_training_example(tokenizer, QUESTION, a) for a, _ in answers]
    t = max(len(e.input_ids) for e in exs)
    b = len(exs)
    ids = torch.full((b, t), tokenizer.pad_token_id)
    labels = torch.full((b, t), -100)
    mask = torch.zeros((b, t), dtype=torch.long)
    for i, e in enumerate(exs):
        n = len(e.input_ids)
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(e.input_ids), torch.tensor(e.labels), 1
    px = torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(0))
    return dict(pixel_values=px, input_ids=ids, attention_mask=mask, labels=labels,
                forgery_labels=torch.tensor([lab for _, lab in answers]))


def test_tiny_forward_backward_and_exact_trainable_set(model, tokenizer):
    batch = _batch(tokenizer)
    model.train()
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()  # warm-up
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    out = model(**batch)
    out.loss.backward()
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.0, f"tiny training step took {elapsed:.2f}s"
    assert torch.isfinite(out.loss) and out.loss.dim() == 0
    torch.testing.assert_close(out.loss.detach(), out.lm_loss + 1.0 * out.cpm_loss)
    assert out.p_fake.shape == (2,) and out.p_fake.dtype == torch.float32
    assert out.cpm_found.all() and out.cpm_correct.dtype == torch.bool
    trainable, frozen = [], []
    for name, p in model.named_parameters():
        (trainable if p.requires_grad else frozen).append(name)
        if p.requires_grad:
            assert p.grad is not None, f"no gradient reached trainable {name}"
        else:
            assert p.grad is None, f"gradient reached frozen {name}"
    expected = [n for n in trainable if n.startswith(("clip_projector.", "dino_projector.",
                                                      "fusion.")) or "lora_" in n]
    assert trainable == expected and any("lora_" in n for n in trainable)
    assert any(n.startswith("fusion.bias_net.") for n in trainable)
    assert all(n.startswith(("clip_tower.", "dino_tower.", "llm.")) and "lora_" not in n
               for n in frozen)
    # lora_B starts at zero, so at least one step's worth of gradient flows into the fusion
    assert model.fusion.bias_net[0].weight.grad.abs().sum() > 0


def test_image_features_shapes_and_dtype(model):
    cfg = model.config
    feats = model.encode_images(torch.randn(3, 3, 56, 56))
    assert feats.shape == (3, cfg.num_image_tokens, cfg.llm.hidden_size)
    assert feats.dtype == torch.float32
    with pytest.raises(ValueError, match="model.image_size"):
        model.encode_images(torch.randn(1, 3, 64, 64))


def test_merge_image_features_by_hand():
    d, n = 2, 3
    ids = torch.tensor([[5, IMAGE_TOKEN_INDEX, 6, 7, 0], [IMAGE_TOKEN_INDEX, 8, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    labels = torch.tensor([[-100, -100, 6, 7, -100], [-100, 8, -100, -100, -100]])
    text = ids.clamp(min=0).float()[..., None].expand(-1, -1, d)
    img = -torch.arange(1, 2 * n + 1).float().view(2, n, 1).expand(-1, -1, d)
    emb, m, lab = merge_image_features(text, ids, img, mask, labels)
    assert emb[0, :, 0].tolist() == [5, -1, -2, -3, 6, 7, 0]
    assert emb[1, :, 0].tolist() == [-4, -5, -6, 8, 0, 0, 0]
    assert m.tolist() == [[1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0, 0]]
    assert lab.tolist() == [[-100, -100, -100, -100, 6, 7, -100], [-100, -100, -100, 8, -100, -100, -100]]
    with pytest.raises(ValueError, match="exactly one image placeholder"):
        merge_image_features(text, ids.clamp(min=0), img, mask, labels)


def test_cpm_loss_by_hand():
    # Positions as the locator gives them (tests/unit/modeling/test_cpm.py checks those).
    real, fake = 11, 12
    pos = torch.tensor([3, 3, -1])
    logits = torch.zeros(3, 7, 16)
    logits[0, 3, real], logits[0, 3, fake] = 2.0, 7.0
    logits[1, 3, real], logits[1, 3, fake] = 1.0, 4.0   # wrong: label real, leans fake
    pair = cpm_math.gather_pair_logits(logits, pos, real, fake)
    assert pair[:2].tolist() == [[2.0, 7.0], [1.0, 4.0]]
    target = torch.tensor([1, 0, 1])
    loss, p_fake, correct = cpm_math.cpm_from_pair_logits(pair, target, 10.0, pos >= 0)
    p0 = math.exp(0.7) / (math.exp(0.2) + math.exp(0.7))
    p1 = math.exp(0.4) / (math.exp(0.1) + math.exp(0.4))
    assert p_fake[0].item() == pytest.approx(p0, abs=1e-6)
    assert p_fake[1].item() == pytest.approx(p1, abs=1e-6)
    assert math.isnan(p_fake[2].item())
    assert loss.item() == pytest.approx((-math.log(p0) - math.log(1 - p1)) / 2, abs=1e-6)
    assert correct.tolist() == [True, False, False]


def test_cpm_argmax_matching_by_hand():
    real, fake = 1, 2
    labels = torch.tensor([[-100, -100, 5, 6, 7]])
    logits = torch.zeros(1, 5, 4)
    logits[0, 0, fake] = 9.0   # before the answer: ignored (next label unsupervised)
    logits[0, 2, real] = 9.0   # predicts "real" at t=2 (next label supervised)
    logits[0, 3, 3] = 9.0
    assert cpm_math.find_positions_by_argmax(logits, labels, real, fake).tolist() == [2]


def test_forward_p_fake_matches_logits_at_the_ground_truth_position(model, tokenizer):
    batch = _batch(tokenizer)
    model.eval()
    with torch.no_grad():
        out = model(**batch, return_logits=True)
    prefix, real, fake = cpm_context(tokenizer)
    n = model.config.num_image_tokens
    for i, (answer, label) in enumerate(ANSWERS):
        row = batch["input_ids"][i].tolist()
        word = real if label == 0 else fake
        # the decision word's index in the text ids, shifted by the spliced image tokens
        t_word = max(j for j, tok in enumerate(row) if tok == word) + n - 1
        pair = out.logits[i, t_word - 1, [real, fake]] / 10.0
        expected = torch.softmax(pair, -1)[1]
        assert out.p_fake[i].item() == pytest.approx(expected.item(), abs=1e-6)
    ce = torch.nn.functional.cross_entropy(
        torch.stack([out.logits[i, max(j for j, tok in enumerate(batch["input_ids"][i].tolist())
                                       if tok == (real, fake)[lab]) + n - 2, [real, fake]]
                     for i, (_, lab) in enumerate(ANSWERS)]) / 10.0, batch["forgery_labels"])
    assert out.cpm_loss.item() == pytest.approx(ce.item(), abs=1e-6)


def test_generate_batched_left_padding_equals_unbatched(model):
    model.eval()
    qs = [QUESTION, QUESTION + " Please describe the image, reasoning step-by-step.", "Real?"]
    px = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(3))
    batched = model.generate(px, qs, max_new_tokens=6)
    single = [model.generate(px[i:i + 1], [q], max_new_tokens=6)[0] for i, q in enumerate(qs)]
    assert batched == single and all(isinstance(t, str) for t in batched)
    assert any(batched)  # something was generated


def test_score_p_fake(model):
    model.eval()
    px = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(4))
    forced = model.score_p_fake(px, [QUESTION, QUESTION])
    assert forced.shape == (2,) and ((forced > 0) & (forced < 1)).all()
    # an answer whose conclusion is present is cut right after "This image is"
    answers = ["<REASONING>x</REASONING>\n<CONCLUSION>This image is fake.</CONCLUSION>", None]
    cut = ["<REASONING>x</REASONING>\n<CONCLUSION>This image is", None]
    torch.testing.assert_close(model.score_p_fake(px, [QUESTION] * 2, answers),
                               model.score_p_fake(px, [QUESTION] * 2, cut))
    # batching does not change the score
    torch.testing.assert_close(model.score_p_fake(px[1:], [QUESTION], answers[1:]),
                               model.score_p_fake(px, [QUESTION] * 2, answers)[1:],
                               atol=1e-5, rtol=1e-5)


def test_argmax_mode_and_full_finetune(tokenizer):
    cfg = ModelConfig.preset("tiny")
    cfg.cpm.position = "argmax"
    cfg.lora.enabled = False
    torch.manual_seed(0)
    m = FakeReasoningModel.from_config(cfg, tokenizer)
    out = m(**_batch(tokenizer))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    llm_trainable = [n for n, p in m.named_parameters() if n.startswith("llm.") and p.requires_grad]
    assert llm_trainable and all("lora_" not in n for n in llm_trainable)
    assert all(p.grad is None for n, p in m.named_parameters() if n.startswith("clip_tower."))


def test_flash_attention_is_a_startup_error_on_cpu(tokenizer):
    if torch.cuda.is_available():
        pytest.skip("CUDA present: flash attention may be usable here")
    cfg = ModelConfig.preset("tiny")
    cfg.clip.attn_implementation = "flash_attention_2"
    with pytest.raises(ConfigError, match="clip.attn_implementation=flash_attention_2"):
        FakeReasoningModel.from_config(cfg, tokenizer)


def test_gradient_checkpointing_recomputes_layers_and_keeps_the_loss(tokenizer):
    cfg = ModelConfig.preset("tiny")
    cfg.lora.dropout = cfg.fusion.dropout = 0.0  # train mode, yet deterministic
    torch.manual_seed(0)
    m = FakeReasoningModel.from_config(cfg, tokenizer).train()
    batch = _batch(tokenizer)
    calls = []
    # A pre-hook on the attention fires when the layer is recomputed (a post-hook
    # might not: recomputation stops as soon as the saved tensors are rebuilt).
    attn = m.llm.get_base_model().model.layers[0].self_attn
    attn.register_forward_pre_hook(lambda *a: calls.append(1))
    ref = m(**batch).loss
    ref.backward()
    assert len(calls) == 1
    calls.clear()
    m.zero_grad(set_to_none=True)
    m.enable_gradient_checkpointing()
    loss = m(**batch).loss
    loss.backward()
    assert len(calls) == 2  # the layer ran again during backward
    torch.testing.assert_close(loss, ref)
    assert m.fusion.ffn_up.weight.grad is not None


def _steered(tokenizer, scripts):
    """prefix_allowed_tokens_fn (a generate option) making row b generate the ids
    scripts[b] first and then whatever the model picks: answers with a conclusion
    from a random-weight model. A generate-built processor changes the scores, so
    a p_fake read from processed scores instead of raw logits would differ."""
    everything = list(range(len(tokenizer)))

    def allowed(b, ids):
        return [scripts[b][len(ids)]] if len(ids) < len(scripts[b]) else everything
    return allowed


def _tower_calls(model):
    calls = []
    return calls, model.clip_tower.register_forward_pre_hook(lambda *a: calls.append(1))


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_generate_scored_takes_p_fake_from_generation(model, tokenizer, sampled):
    from modeling.template import encode_answer

    model.eval()
    prefix = model.config.cpm.resolved_prefix
    # The ids of a conclusion whose re-encoding differs ("This" spelled by single
    # characters): read there, p_fake would not be score_p_fake's, so it is forced.
    chars = [i for c in " This" for i in tokenizer.encode(c, add_special_tokens=False)]
    odd = encode_answer(tokenizer, "<CONCLUSION>") + chars
    odd += encode_answer(tokenizer, "image is")
    assert odd != encode_answer(tokenizer, "<CONCLUSION> This image is")
    assert tokenizer.decode(odd).strip() == "<CONCLUSION> This image is"
    scripts = [encode_answer(tokenizer, ANSWERS[0][0]), encode_answer(tokenizer, ANSWERS[1][0]),
               encode_answer(tokenizer, f"<REASONING>x</REASONING>\n{prefix}"),  # then the model's own word
               [],  # the random model's own answer: no conclusion, forced
               None,  # below: an answer that ends right after its prefix, nothing computed after it
               odd + encode_answer(tokenizer, "fake.")]
    longest = max(len(s) for s in scripts if s)
    reasoning = "<REASONING> The texture looks unnatural."
    while len(encode_answer(tokenizer, f"{reasoning} </REASONING> {prefix}")) <= longest:
        reasoning += " The lighting is flat."
    scripts[4] = encode_answer(tokenizer, f"{reasoning} </REASONING> {prefix}")
    n_new = len(scripts[4])
    b = len(scripts)
    px = torch.randn(b, 3, 56, 56, generator=torch.Generator().manual_seed(5))
    prompts = [QUESTION] * b
    kw = dict(max_new_tokens=n_new, do_sample=sampled, temperature=0.2,
              prefix_allowed_tokens_fn=_steered(tokenizer, scripts))
    torch.manual_seed(9)
    texts = model.generate(px, prompts, **kw)
    calls, hook = _tower_calls(model)
    try:
        torch.manual_seed(9)
        out = model.generate_scored(px, prompts, **kw)
    finally:
        hook.remove()
    assert out.texts == texts  # recording changes nothing generation does
    assert [cpm_math.last_prefix_end(t, prefix) >= 0 for t in texts] == [True, True, True, False, True, True]
    assert out.from_generation == [True, True, True, False, False, False]
    assert out.forwards == [1, 1, 1, 2, 2, 2] and len(calls) == 2  # generation + one forced batch of 3
    two_pass = model.score_p_fake(px, prompts, texts)
    assert out.p_fake.dtype == torch.float32 and not out.p_fake.isnan().any()
    torch.testing.assert_close(out.p_fake, two_pass, atol=1e-5, rtol=0)


def test_generate_scored_runs_one_forward_when_every_answer_concludes(model, tokenizer):
    from modeling.template import encode_answer

    model.eval()
    scripts = [encode_answer(tokenizer, a) for a, _ in ANSWERS]
    px = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(6))
    calls, hook = _tower_calls(model)
    try:
        out = model.generate_scored(px, [QUESTION] * 2, max_new_tokens=max(map(len, scripts)) + 2,
                                    prefix_allowed_tokens_fn=_steered(tokenizer, scripts))
    finally:
        hook.remove()
    assert len(calls) == 1 and out.forwards == [1, 1]
    torch.testing.assert_close(out.p_fake, model.score_p_fake(px, [QUESTION] * 2, out.texts), atol=1e-5, rtol=0)
    # Beam search reorders rows between steps: every row gets the forced forward.
    beams = model.generate_scored(px, [QUESTION] * 2, max_new_tokens=len(scripts[0]) + 2, num_beams=2,
                                  prefix_allowed_tokens_fn=_steered(tokenizer, [scripts[0]] * 2))
    assert beams.from_generation == [False, False]
