"""The scoring loop in one process with the tiny model: batching does not change
answers, every image gets a row or a failure, rows carry what the report needs."""
import pytest
import torch

from pipeline.evaluation.config import EvalConfig, EvalConfigError
from pipeline.evaluation.parsing import ALL_STATUSES
from pipeline.evaluation.report import PREDICTION_FIELDS
from pipeline.evaluation.runner import Scorer, add_text_scores, load_model, score_items


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from launch.tiny_models import build_tiny_model

    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("m")
    return build_tiny_model(str(d / "model"))


def _cfg(model, tmp_path, **kw):
    (tmp_path / "shards").mkdir(exist_ok=True)
    kw = {"max_new_tokens": 6, **kw}
    return EvalConfig(checkpoint=model, out=str(tmp_path / "out"), shards=str(tmp_path / "shards"),
                      num_workers=0, **kw)


def test_batched_generation_matches_batch_of_one(tiny, tmp_path):
    model, tok, fmt = load_model(_cfg(tiny, tmp_path))
    assert fmt == "fakereasoning"
    scorer = Scorer(model, _cfg(tiny, tmp_path), torch.device("cpu"))
    torch.manual_seed(1)
    px = torch.randn(3, 3, model.config.image_size, model.config.image_size)
    samples = [{"key": f"k{i}", "set": "s", "generator": "flux", "label": i % 2, "reference": "the edges",
                "relpath": f"{i}.png", "shard": "x.tar", "index": i} for i in range(3)]
    batched = scorer.score_batch(px, samples)
    single = [scorer.score_batch(px[i:i + 1], samples[i:i + 1])[0] for i in range(3)]
    for a, b in zip(batched, single):
        assert a["answer"] == b["answer"] and a["parse_status"] == b["parse_status"]
        assert a["p_fake"] == pytest.approx(b["p_fake"], abs=1e-5) and 0.0 <= a["p_fake"] <= 1.0
        assert set(PREDICTION_FIELDS) <= set(a) and a["parse_status"] in ALL_STATUSES
    add_text_scores(batched, None)
    assert all(r["bleu1"] is not None and r["css"] is None for r in batched)


def test_score_items_counts_failures(tiny, tmp_path):
    import io
    import json

    from PIL import Image

    from pipeline.evaluation.data import enumerate_items
    from sharding.tar_writer import TarWriter

    d = tmp_path / "set"
    d.mkdir()
    w = TarWriter(str(d / "shard-000000.tar"))
    for i, ok in enumerate([True, False, True]):
        buf = io.BytesIO()
        Image.new("RGB", (9, 7), (i, 0, 0)).save(buf, "PNG")
        w.add(f"k{i}.png", buf.getvalue() if ok else b"not an image")
        w.add(f"k{i}.json", json.dumps({"label": i % 2, "generator": "g", "reference": "", "relpath": f"{i}.png",
                                        "image_ext": "png"}).encode())
    w.commit()
    (d / "sizes.json").write_text('{"shard-000000.tar": 3}')
    cfg = _cfg(tiny, tmp_path, batch_size=2)
    model, _, _ = load_model(cfg)
    from modeling.image_processing import ImageProcessor

    rows, failures = score_items(Scorer(model, cfg, torch.device("cpu")), enumerate_items({"b": str(d)}),
                                 ImageProcessor(model.config), cfg, show_progress=False)
    assert sorted(r["key"] for r in rows) == ["k0", "k2"]
    assert [(f["key"], f["set"]) for f in failures] == [("k1", "b")] and "UnidentifiedImageError" in failures[0]["reason"]


def test_config_errors_name_the_field(tiny, tmp_path):
    with pytest.raises(EvalConfigError, match="batch_size"):
        _cfg(tiny, tmp_path, batch_size=0).validate()
    with pytest.raises(EvalConfigError, match="checkpoint"):
        EvalConfig(checkpoint=str(tmp_path / "nope"), out="o", shards=str(tmp_path)).validate()
    with pytest.raises(EvalConfigError, match="give at least one set"):
        EvalConfig(checkpoint=tiny, out="o").validate()
    with pytest.raises(EvalConfigError, match="used twice"):
        EvalConfig(checkpoint=tiny, out="o", shards=str(tmp_path), benchmarks={"mmfr": str(tmp_path)}).sets()


class _Recording:
    """The real tiny model, with the calls the scorer makes to it written down;
    `steer` (generate keyword arguments) is added to every generation call."""

    def __init__(self, model, **steer):
        self.model, self.tokenizer, self.calls, self.steer = model, model.tokenizer, [], steer

    def to(self, device):
        self.model.to(device)
        return self

    def eval(self):
        self.model.eval()
        return self

    def generate(self, pixel_values, prompts, **kwargs):
        self.calls.append(("generate", [list(p) for p in prompts], kwargs))
        return self.model.generate(pixel_values, prompts, **kwargs, **self.steer)

    def generate_scored(self, pixel_values, prompts, **kwargs):
        self.calls.append(("generate_scored", [list(p) for p in prompts], kwargs))
        return self.model.generate_scored(pixel_values, prompts, **kwargs, **self.steer)

    def score_p_fake(self, pixel_values, prompts, answers):
        self.calls.append(("score_p_fake", [list(p) for p in prompts], {}))
        return self.model.score_p_fake(pixel_values, prompts, answers)


def _samples(n):
    return [{"key": f"k{i}", "set": "mmfr", "generator": "flux", "label": i % 2, "reference": "the edges",
             "relpath": f"{i}.png", "shard": "x.tar", "index": i} for i in range(n)]


def test_reference_protocol_prompts_with_llava_v1_and_samples_at_0_2(tiny, tmp_path):
    from modeling.template import LLAVA_V1_SYSTEM, build_prompt
    from sharding.schema import EVAL_QUESTION

    model, tok, _ = load_model(_cfg(tiny, tmp_path))
    cfg = _cfg(tiny, tmp_path, protocol="reference", max_new_tokens=None)
    rec = _Recording(model)
    scorer = Scorer(rec, cfg, torch.device("cpu"), tok)
    assert scorer.generate_kwargs() == {"max_new_tokens": 512, "do_sample": True, "temperature": 0.2,
                                        "top_p": 1.0, "num_beams": 1}
    cfg.max_new_tokens = 6  # keep the tiny run short; the other settings stay the protocol's
    scorer = Scorer(rec, cfg, torch.device("cpu"), tok)
    torch.manual_seed(1)
    px = torch.randn(2, 3, model.config.image_size, model.config.image_size)
    rows = scorer.score_batch(px, _samples(2))
    ((name, prompts, kwargs),) = rec.calls
    assert name == "generate_scored"
    assert kwargs == {"max_new_tokens": 6, "do_sample": True, "temperature": 0.2, "top_p": 1.0, "num_beams": 1}
    want = build_prompt(tok, EVAL_QUESTION, conversation="llava_v1")[0]
    assert prompts == [want, want] and want != build_prompt(tok, EVAL_QUESTION)[0]
    # The two-pass way: the same prompts to generate and to score_p_fake.
    rec.calls.clear()
    Scorer(rec, cfg, torch.device("cpu"), tok, one_pass=False).score_batch(px, _samples(2))
    assert [(c[0], c[1]) for c in rec.calls] == [("generate", [want, want]), ("score_p_fake", [want, want])]
    i = want.index(-200)
    assert tok.decode(want[:i], skip_special_tokens=True).startswith(LLAVA_V1_SYSTEM)
    # Rows are parsed with the reference's parser.
    from pipeline.evaluation.parsing import parse_answer_reference

    assert [r["parse_status"] for r in rows] == [parse_answer_reference(r["answer"]).parse_status for r in rows]
    # Our protocol: Vicuna v1 ids and greedy decoding.
    ours = Scorer(rec, _cfg(tiny, tmp_path), torch.device("cpu"), tok)
    assert ours.prompt_ids == build_prompt(tok, EVAL_QUESTION)[0]
    assert ours.generate_kwargs()["do_sample"] is False


def test_sampling_is_seeded_per_batch_not_per_rank(tiny, tmp_path):
    from pipeline.evaluation.runner import batch_seed

    model, tok, _ = load_model(_cfg(tiny, tmp_path))
    # A high temperature so that unseeded draws would differ between runs.
    scorer = Scorer(model, _cfg(tiny, tmp_path, protocol="reference", temperature=5.0), torch.device("cpu"), tok)
    torch.manual_seed(2)
    px = torch.randn(3, 3, model.config.image_size, model.config.image_size)
    first = [r["answer"] for r in scorer.score_batch(px, _samples(3))]
    torch.manual_seed(12345)  # whatever the process's RNG state (rank seeds differed before)
    assert [r["answer"] for r in scorer.score_batch(px, _samples(3))] == first
    other = Scorer(model, _cfg(tiny, tmp_path, protocol="reference", temperature=5.0, seed=7), torch.device("cpu"), tok)
    assert [r["answer"] for r in other.score_batch(px, _samples(3))] != first
    assert batch_seed(0, _samples(1)[0]) == batch_seed(0, {"set": "mmfr", "key": "k0"}) != batch_seed(1, _samples(1)[0])


def test_protocol_settings_and_errors(tiny, tmp_path):
    cfg = _cfg(tiny, tmp_path, protocol="reference", temperature=0.7, conversation="vicuna_v1")
    assert cfg.generation() == {"conversation": "vicuna_v1", "temperature": 0.7, "top_p": None, "num_beams": 1,
                                "max_new_tokens": 6}
    assert cfg.protocol_record()["deviations"] == {"conversation": "vicuna_v1", "temperature": 0.7,
                                                   "max_new_tokens": 6}
    assert cfg.reasoning_sets() == ("mmfr",) and _cfg(tiny, tmp_path).reasoning_sets() == ()
    for bad, field in (({"protocol": "paper"}, "protocol"), ({"max_per_class": 0}, "max_per_class"),
                       ({"conversation": "chatml"}, "conversation"), ({"top_p": 0}, "top_p")):
        with pytest.raises(EvalConfigError, match=field):
            _cfg(tiny, tmp_path, **bad).validate()


def test_sampled_answers_do_not_depend_on_the_number_of_ranks(tiny, tmp_path):
    """The ranks of a W-rank run, played one after another in this process: with
    per-batch seeds and batches cut at fixed positions, every world size gives the
    same sampled answer for every image."""
    import io
    import json

    from PIL import Image

    from modeling.image_processing import ImageProcessor
    from pipeline.evaluation.data import enumerate_items, rank_slice
    from sharding.tar_writer import TarWriter

    d = tmp_path / "set"
    d.mkdir()
    w = TarWriter(str(d / "shard-000000.tar"))
    for i in range(7):
        buf = io.BytesIO()
        Image.new("RGB", (12, 10), (30 * i, 200 - 20 * i, 90)).save(buf, "PNG")
        w.add(f"k{i}.png", buf.getvalue())
        w.add(f"k{i}.json", json.dumps({"label": i % 2, "generator": "flux", "reference": "r", "relpath": f"{i}.png",
                                        "image_ext": "png"}).encode())
    w.commit()
    (d / "sizes.json").write_text('{"shard-000000.tar": 7}')
    cfg = _cfg(tiny, tmp_path, protocol="reference", temperature=5.0, batch_size=2, max_new_tokens=5)
    model, tok, _ = load_model(cfg)
    scorer, proc = Scorer(model, cfg, torch.device("cpu"), tok), ImageProcessor(model.config)
    items = enumerate_items({"mmfr": str(d)})
    answers = {}
    for world in (1, 2, 3):
        rows = []
        for rank in range(world):
            torch.manual_seed(rank)  # what each rank's process state could be
            rows += score_items(scorer, rank_slice(items, rank, world, cfg.batch_size), proc, cfg, False)[0]
        answers[world] = {r["key"]: r["answer"] for r in rows}
    assert len(answers[1]) == 7 and answers[1] == answers[2] == answers[3]
    assert len(set(answers[1].values())) > 1  # really sampled text, not one constant answer


@pytest.mark.parametrize("protocol", ["ours", "reference"])
def test_one_pass_scores_equal_two_pass_with_one_forward_per_concluded_image(tiny, tmp_path, protocol):
    """The runner's default (p(fake) from generation's logits) against the two-pass
    way on the same images and seeds: identical rows, p(fake) to 1e-5, and one
    full forward for each image whose answer concludes. The random tiny model is
    steered into conclusions for the first rows (generate's prefix_allowed_tokens_fn)."""
    from modeling.template import encode_answer
    from pipeline.evaluation.runner import forwards_per_image

    model, tok, _ = load_model(_cfg(tiny, tmp_path))
    prefix = model.config.cpm.resolved_prefix
    scripts = [encode_answer(tok, a) for a in (f"{prefix} fake. </CONCLUSION>",
                                               f"<REASONING> The edges. </REASONING>\n{prefix}", "")]
    everything = list(range(len(tok)))

    def steer(b, ids):
        return [scripts[b][len(ids)]] if len(ids) < len(scripts[b]) else everything

    cfg = _cfg(tiny, tmp_path, protocol=protocol, max_new_tokens=max(map(len, scripts)) + 3)
    px = torch.randn(3, 3, model.config.image_size, model.config.image_size,
                     generator=torch.Generator().manual_seed(3))
    ways = {}
    for one_pass in (True, False):
        scorer = Scorer(_Recording(model, prefix_allowed_tokens_fn=steer), cfg, torch.device("cpu"), tok,
                        one_pass=one_pass)
        ways[one_pass] = (scorer.score_batch(px, _samples(3)), scorer)
    (rows, one), (rows2, two) = ways[True], ways[False]
    assert [r["answer"] for r in rows] == [r["answer"] for r in rows2]
    assert [prefix in r["answer"] for r in rows] == [True, True, False]
    for a, b in zip(rows, rows2):
        assert a["p_fake"] == pytest.approx(b["p_fake"], abs=1e-5)
        assert {k: v for k, v in a.items() if k != "p_fake"} == {k: v for k, v in b.items() if k != "p_fake"}
    assert (one.images, one.forwards, two.images, two.forwards) == (3, 4, 3, 6)
    per_rank = [{"scored": one.images, "forwards": one.forwards}, {"scored": 1, "forwards": 2}]
    assert forwards_per_image(per_rank) == 6 / 4 and forwards_per_image([{"scored": 0, "forwards": 0}]) is None


def test_sweep_scores_every_image_under_every_perturbation(tiny, tmp_path, eval_shard):
    from PIL import Image

    from modeling.image_processing import ImageProcessor
    from pipeline.evaluation.data import enumerate_items

    d = eval_shard(tmp_path / "set", [(f"{i}.png", Image.new("RGB", (40, 30), (60 * i, 90, 200)), i % 2, "g")
                                      for i in range(3)])
    cfg = _cfg(tiny, tmp_path, batch_size=2, perturb=["jpeg:50", "blur:2"])
    model, _, _ = load_model(cfg)
    scorer, proc, items = Scorer(model, cfg, torch.device("cpu")), ImageProcessor(model.config), enumerate_items({"b": d})
    plain, _ = score_items(scorer, items, proc, cfg, False)
    perturbed: list = []
    clean, failures = score_items(scorer, items, proc, cfg, False, perturbed=perturbed)
    assert not failures and [r["answer"] for r in clean] == [r["answer"] for r in plain]  # clean run unchanged
    assert [r["p_fake"] for r in clean] == pytest.approx([r["p_fake"] for r in plain], abs=1e-6)
    assert sorted((r["key"], r["perturbation"]) for r in perturbed) == sorted(
        (r["key"], p) for r in clean for p in ("jpeg:50", "blur:2"))
    assert all("perturbation" not in r and r["video"] is None for r in clean)
