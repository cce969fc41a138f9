"""`pip install .` gives a working package: the wheel holds the runtime packages,
the recipes and the `evaluate` metric, and every command runs from outside the
checkout.

The wheel is built from this checkout and installed with `--no-deps` into a
fresh venv; the suite's own site-packages (torch, deepspeed, ...) is reached
through a .pth line, which adds that folder to sys.path without running the
.pth files in it, so the checkout's editable install stays out of the way and
every `import pipeline` must come from the wheel.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from launch.local_run import free_port

REPO = Path(__file__).resolve().parents[2]
COMMANDS = ("fakereasoning-shard", "fakereasoning-shard-benchmark", "fakereasoning-verify",
            "fakereasoning-train", "fakereasoning-eval", "fakereasoning-annotate", "fakereasoning-predict",
            "fakereasoning-demo")


def _run(cmd: list[str], cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with the wheel of this checkout installed; returns its bin/."""
    root = tmp_path_factory.mktemp("wheel")
    wheels = root / "dist"
    # No build isolation: the suite's setuptools builds it, so no index is needed.
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
          "-w", str(wheels), str(REPO)], cwd=root)
    (wheel,) = wheels.glob("fakereasoning_pipeline-*.whl")
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=root)
    py = venv / "bin" / "python"
    site = _run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=root).stdout.strip()
    Path(site, "suite_site_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--quiet", str(wheel)], cwd=root)
    return venv / "bin"


def _clean_env(bin_dir: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["DS_ACCELERATOR"] = "cpu"
    return env


@pytest.mark.slow
def test_wheel_holds_the_packages_recipes_and_metric(installed, tmp_path):
    code = ("import json, os, common, pipeline, modeling, sharding\n"
            "import modeling.checkpoints, modeling.tokenization, modeling.costs\n"
            "from pipeline.training.config import packaged_recipes, recipe_path\n"
            "from pipeline.evaluation.metrics import FDR_METRIC_DIR\n"
            "from sharding.annotate.prompts import load_prompts\n"
            "print(json.dumps({'files': [m.__file__ for m in (common, pipeline, modeling, sharding,\n"
            "  modeling.checkpoints, modeling.tokenization, modeling.costs)],\n"
            "  'recipes': packaged_recipes(), 'tiny': recipe_path('tiny-cpu'),\n"
            "  'metric': os.path.isfile(os.path.join(FDR_METRIC_DIR, 'fdr_metric.py')),\n"
            "  'prompts': load_prompts().path}))\n")
    out = json.loads(_run([str(installed / "python"), "-c", code], cwd=tmp_path,
                          env=_clean_env(installed)).stdout.strip().splitlines()[-1])
    venv = str(installed.parent)
    assert all(f.startswith(venv) for f in out["files"]), out["files"]  # the wheel, not the checkout
    assert out["recipes"] == ["fakereasoning-13b", "tiny-cpu"]
    assert out["tiny"].startswith(venv) and os.path.isfile(out["tiny"])
    assert out["metric"] is True
    assert out["prompts"].startswith(venv)  # the annotate prompt file is package data
    # launch/ and tests/ are checkout-only
    probe = subprocess.run([str(installed / "python"), "-c", "import launch"], cwd=tmp_path,
                           env=_clean_env(installed), capture_output=True, text=True)
    assert probe.returncode != 0 and "No module named 'launch'" in probe.stderr


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_runs_outside_the_checkout(installed, tmp_path, command):
    proc = _run([str(installed / command), "--help"], cwd=tmp_path, env=_clean_env(installed))
    assert proc.stdout.startswith("usage: "), proc.stdout[:300]


@pytest.mark.slow
@pytest.mark.parametrize("module", ["pipeline.training", "pipeline.evaluation", "sharding.shard_mmfr",
                                    "sharding.eval_sets", "sharding.verify", "sharding.annotate",
                                    "pipeline.inference", "pipeline.web_demo"])
def test_python_m_modules_run_outside_the_checkout(installed, tmp_path, module):
    proc = _run([str(installed / "python"), "-m", module, "--help"], cwd=tmp_path, env=_clean_env(installed))
    assert proc.stdout.startswith("usage: "), proc.stdout[:300]


@pytest.mark.slow
def test_installed_train_resolves_a_packaged_recipe(installed, tmp_path):
    """`--config tiny-cpu` finds the packaged recipe; --check then names the
    missing shard set (the recipe's relative default), proving the recipe loaded."""
    proc = subprocess.run([str(installed / "fakereasoning-train"), "--config", "tiny-cpu", "--check"],
                          cwd=tmp_path, env=_clean_env(installed), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "data.train_shards='runs/demo/shards/train' does not exist" in proc.stderr, proc.stderr[-2000:]
    bad = subprocess.run([str(installed / "fakereasoning-train"), "--config", "no-such-recipe", "--check"],
                         cwd=tmp_path, env=_clean_env(installed), capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "fakereasoning-13b, tiny-cpu" in bad.stderr, bad.stderr[-2000:]


@pytest.mark.slow
def test_deepspeed_module_launch_of_the_installed_package(installed, tmp_path):
    """`deepspeed --module pipeline.training` (the documented launch of an installed
    package): the runner starts the fresh venv's interpreter, which runs the
    wheel's module on every rank."""
    env = _clean_env(installed)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = _run([str(installed / "python"), "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
                 "--master_port", str(free_port()), "--module", "pipeline.training", "--help"], cwd=tmp_path, env=env)
    assert proc.stdout.count("usage: ") >= 2, proc.stdout[-3000:]  # both ranks printed our help
