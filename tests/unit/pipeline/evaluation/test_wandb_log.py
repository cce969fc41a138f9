"""The training run and the evaluation of its export are one W&B experiment: one
project and group, job_types train/eval, the checkpoint's sha256 in the eval
config; tables hold numbers and the plots are images. Read back from the
offline runs with W&B's own CLI (`wandb leet inspect`)."""
from __future__ import annotations

import io
import json
import os

import pytest

from pipeline.evaluation.config import EvalConfig
from pipeline.evaluation.report import REFERENCE_COLUMNS, checkpoint_identity, write_report
from pipeline.evaluation.wandb_log import checkpoint_artifact, log_eval, training_run
from launch.wandb_readback import read_offline_run, read_offline_run_record
from pipeline.tracking import WandbConfig, experiment_group
from pipeline.tracking import start_train_tracking

GENERATORS = ("flux", "gigagan")


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """Offline W&B without the user's settings or credentials."""
    for k in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_DIR",
              "WANDB_RUN_GROUP", "WANDB_JOB_TYPE", "WANDB_PROJECT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc-absent"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    return tmp_path


def _export(output_dir) -> str:
    """A training output folder's export/merged with one weight file."""
    merged = output_dir / "export" / "merged"
    merged.mkdir(parents=True)
    (merged / "model.safetensors").write_bytes(b"tiny weights")
    (merged / "config.json").write_text("{}")
    return str(merged)


def _shard_and_rows(folder) -> tuple[str, list[dict]]:
    """A real eval shard of 8 PNGs and one correct prediction row per image."""
    from PIL import Image

    from sharding.tar_writer import TarWriter

    folder.mkdir()
    shard = str(folder / "shard-000000.tar")
    w = TarWriter(shard)
    rows = []
    for i in range(8):
        g, label = GENERATORS[i % 2], (i // 2) % 2
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (30 * i, 0, 0)).save(buf, "PNG")
        w.add(f"k{i}.png", buf.getvalue())
        w.add(f"k{i}.json", json.dumps({"label": label, "generator": g, "image_ext": "png"}).encode())
        rows.append({"key": f"k{i}", "set": "mmfr", "generator": g, "label": label, "pred": label,
                     "parse_status": "ok", "p_fake": 0.2 + 0.6 * label, "reasoning": "edges", "reference": "edges",
                     "bleu1": 1.0, "rouge_l": 1.0, "css": None, "answer": "a", "relpath": f"{i}.png",
                     "shard": shard, "index": i})
    w.commit()
    return shard, rows


def _is_number(value) -> bool:
    # JSON (leet prints it from Go) writes 1.0 as 1: int or float, never a string or bool.
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _table(run_dir: str, pointer: dict) -> dict:
    """A logged table as W&B wrote it: the summary holds a pointer to its JSON under files/."""
    assert pointer["_type"] == "table-file"
    with open(os.path.join(run_dir, "files", pointer["path"]), encoding="utf-8") as f:
        return json.load(f)


def test_training_and_eval_runs_read_back_as_one_experiment(wandb_env):
    out = wandb_env / "runs" / "exp1"
    out.mkdir(parents=True)
    # The training side as pipeline/training/run.py does it: its tracker, then
    # run_info.json with the tracker's record next to the export.
    wb = WandbConfig(mode="offline", project="fr")
    train = start_train_tracking(wb, str(out), {"optim": {"lr": 0.1}}, str(out), is_main=True)
    train.log({"train/loss": 1.5}, step=1)
    train.finish()
    (out / "run_info.json").write_text(json.dumps({"world_size": 1, **train.record()}))
    merged = _export(out)

    # The evaluation side: the real report (tables, plots) and its W&B logging.
    _, rows = _shard_and_rows(wandb_env / "shards")
    cfg = EvalConfig(checkpoint=merged, out=str(wandb_env / "eval"), shards=str(wandb_env / "shards"),
                     wandb=WandbConfig(mode="offline", project="fr", dir=str(out)), wandb_samples=4)
    identity = checkpoint_identity(merged)
    results = write_report(cfg.out, rows, {"mmfr": len(rows)}, [], identity, cfg.to_dict())
    eval_dir = log_eval(cfg, results, rows)
    assert eval_dir and eval_dir != train.run_dir

    t_rec, e_rec = read_offline_run_record(train.run_dir), read_offline_run_record(eval_dir)
    group = experiment_group(str(out), train.run_id)
    assert (t_rec["run_group"], t_rec["job_type"]) == (group, "train")
    assert (e_rec["run_group"], e_rec["job_type"]) == (group, "eval")
    assert t_rec["project"] == e_rec["project"] == "fr"

    ev = read_offline_run(eval_dir)
    assert ev["config"]["checkpoint_sha256"] == identity["sha256"]
    assert ev["config"]["checkpoint_path"] == os.path.abspath(merged)
    assert ev["config"]["training_run"]["run_id"] == train.run_id
    s = ev["summary"]
    assert s["eval/mmfr/average/acc"] == results["sets"]["mmfr"]["average"]["acc"] == 1.0
    averages = {k: v for k, v in s.items() if k.startswith("eval/mmfr/average/")}
    assert len(averages) > 10 and all(_is_number(v) for v in averages.values()), averages

    # Tables: numbers in their column's unit (pct x100), None where undefined, not strings.
    table = _table(eval_dir, s["eval/mmfr/reference"])
    assert table["columns"][:5] == ["generator", "N", "Real Acc %", "Fake Acc %", "Acc %"]
    by_row = {r[0]: dict(zip(table["columns"], r)) for r in table["data"]}
    assert list(by_row) == [*results["sets"]["mmfr"]["order"], "average", "all images"]
    assert by_row["average"]["Acc %"] == 100.0 and by_row["flux"]["N"] == 4
    assert by_row["average"]["CSS"] is None
    assert by_row["all images"]["AUC"] == results["sets"]["mmfr"]["pooled"]["auc"] == 1.0
    assert len(table["columns"]) == 1 + len(REFERENCE_COLUMNS)
    for row in table["data"]:
        for (key, _, kind), cell in zip(REFERENCE_COLUMNS, row[1:]):
            assert cell is None or (isinstance(cell, int) if kind == "int" else _is_number(cell)), (key, cell)
    # The predictions' image cells: W&B writes each wandb.Image of a table as "Image".
    assert [r[0] for r in _table(eval_dir, s["eval/predictions"])["data"]] == ["Image"] * cfg.wandb_samples

    # The report's plots, as images.
    assert {"accuracy_mmfr.png", "roc_mmfr.png"} <= set(results["plots"])
    for name in results["plots"]:
        image = s[f"eval/plots/{os.path.splitext(name)[0]}"]
        assert image["_type"] == "image-file" and image["format"] == "png"
        assert os.path.isfile(os.path.join(eval_dir, "files", image["path"]))


def test_training_run_is_found_above_the_export(tmp_path):
    out = tmp_path / "exp2"
    merged = _export(out)
    assert training_run(merged) is None, "no run_info.json: not linked (group by content instead)"
    # A run_info.json from before groups were recorded: the group is derived from the id.
    (out / "run_info.json").write_text(json.dumps({"wandb_run_id": "abc123"}))
    assert training_run(merged) == {"output_dir": str(out), "run_id": "abc123",
                                    "group": experiment_group(str(out), "abc123")}
    (out / "run_info.json").write_text(json.dumps({"wandb_run_id": "abc123", "wandb_group": "ablation-7"}))
    assert training_run(merged)["group"] == "ablation-7"


def test_eval_of_an_unlinked_checkpoint_groups_by_content(wandb_env):
    merged = _export(wandb_env / "copied")
    _, rows = _shard_and_rows(wandb_env / "shards")
    identity = checkpoint_identity(merged)
    cfg = EvalConfig(checkpoint=merged, out=str(wandb_env / "eval"), shards=str(wandb_env / "shards"),
                     plots=False, wandb=WandbConfig(mode="offline", project="fr"), wandb_samples=2)
    results = write_report(cfg.out, rows, {"mmfr": len(rows)}, [], identity, cfg.to_dict(), plots=False)
    rec = read_offline_run_record(log_eval(cfg, results, rows))
    assert rec["run_group"] == f"checkpoint-{identity['sha256'][:12]}" and rec["job_type"] == "eval"


def test_checkpoint_artifact_references_the_files_in_place(tmp_path):
    merged = _export(tmp_path / "exp3")
    identity = checkpoint_identity(merged)
    artifact = checkpoint_artifact(identity)
    assert artifact.type == "model" and artifact.name == f"checkpoint-{identity['sha256'][:16]}"
    assert artifact.metadata["sha256"] == identity["sha256"]
    refs = {path: entry.ref for path, entry in artifact.manifest.entries.items()}
    assert refs == {name: f"file://{merged}/{name}" for name in ("config.json", "model.safetensors")}


# ------------------------------------------------------------------ what is uploaded (issue 25, item 6)
def test_prediction_images_are_thumbnails_and_only_of_sets_whose_terms_allow_it(tmp_path):
    from PIL import Image

    from pipeline.evaluation.config import EvalConfig
    from pipeline.evaluation.wandb_log import THUMBNAIL_PX, image_sets, predictions_table, upload_description
    from sharding.tar_writer import TarWriter

    def bench(name, registry_name):
        folder = tmp_path / name
        (folder / "set").mkdir(parents=True)
        shard = str(folder / "set" / "shard-000000.tar")
        w = TarWriter(shard)
        buf = io.BytesIO()
        Image.new("RGB", (1000, 640), (200, 10, 10)).save(buf, "PNG")
        w.add("k0.png", buf.getvalue())
        w.add("k0.json", json.dumps({"label": 1, "generator": "g", "image_ext": "png"}).encode())
        w.commit()
        if registry_name:
            (folder / "benchmark.json").write_text(json.dumps({"arguments": {"benchmark": registry_name}}))
        return str(folder / "set"), shard

    sets = {"genimage": bench("genimage", "genimage"), "ffpp": bench("ffpp", "ffpp"),
            "celeb-df": bench("celeb-df", "celeb-df"), "mine": bench("mine", None)}
    cfg = EvalConfig(checkpoint="x", out=str(tmp_path / "out"), benchmarks={k: v[0] for k, v in sets.items()})
    assert image_sets(cfg) == {"genimage": True, "ffpp": False, "celeb-df": False, "mine": False}
    assert "thumbnails of genimage (no images of ffpp, celeb-df, mine" in upload_description(cfg)
    rows = [{"set": name, "shard": shard, "index": 0, "generator": "g", "label": 1, "pred": 1, "parse_status": "ok",
             "p_fake": 0.9, "answer": "a", "reference": ""} for name, (_, shard) in sets.items()]
    table = predictions_table(rows, 4, image_sets(cfg))
    images = {row[1]: row[0] for row in table.data}
    assert images["ffpp"] is None and images["celeb-df"] is None and images["mine"] is None
    assert images["genimage"].image.size == (THUMBNAIL_PX, 164)  # 1000 x 640, longer side 256


def test_an_online_run_says_where_it_uploads_and_what(wandb_env, monkeypatch, capsys):
    from pipeline import tracking
    from pipeline.tracking import WandbConfig, start_tracking, upload_notice

    assert "your default W&B entity" in upload_notice(WandbConfig(project="fr"), "metrics")
    # mode auto with credentials goes online; the init itself (network) is a stand-in here.
    monkeypatch.setenv("WANDB_API_KEY", "fake-key-for-the-mode-only")
    monkeypatch.setattr(tracking, "_try_init", lambda cfg, root, config, mode, *a: object())
    tracker = start_tracking(WandbConfig(project="fr", entity="lab"), str(wandb_env / "w"), {}, is_main=True,
                             uploads="metrics and 3 thumbnails")
    assert tracker.mode == "online"
    err = capsys.readouterr().err
    assert "W&B online: uploading to lab, project 'fr': metrics and 3 thumbnails" in err
    assert "fake-key-for-the-mode-only" not in err
    start_tracking(WandbConfig(project="fr", mode="offline"), str(wandb_env / "w2"), {}, is_main=True).finish()
    assert "uploading" not in capsys.readouterr().err
