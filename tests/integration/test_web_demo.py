"""fakereasoning-demo as a real server process on a free localhost port with the tiny
model: Gradio's own client gets the same record as fakereasoning-predict, ten
requests at once all complete, bad input is a message and the server goes on; a
real headless Chromium uploads an image, reads the verdict from the page and
takes screenshots at a laptop's and a phone's width."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from launch.local_run import cpu_env, free_port

REPO = Path(__file__).resolve().parents[2]
NEW_TOKENS = 24
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("gradio_client") if os.environ.get("CI") != "true" else None
    from launch.tiny_models import build_tiny_model

    root = tmp_path_factory.mktemp("web")
    model = build_tiny_model(str(root / "model"))
    imgs = root / "imgs"
    imgs.mkdir()
    for i, size in enumerate([(48, 32), (30, 60)]):
        arr = np.random.default_rng(i).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(arr).save(imgs / f"{i}.png")
    (root / "bad.png").write_bytes(b"not an image at all")
    port = free_port()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.web_demo", "--checkpoint", model, "--port", str(port),
                             "--max-new-tokens", str(NEW_TOKENS), "--examples", str(imgs), "--concurrency", "2"],
                            cwd=str(REPO), env=cpu_env(), stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 240
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the demo server did not come up:\n{(root / 'server.log').read_text()[-3000:]}")
        time.sleep(1)
    yield {"url": url, "model": model, "imgs": imgs, "root": root, "proc": proc}
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def _client(server):
    from gradio_client import Client

    return Client(server["url"], verbose=False)


def _ask(client, path):
    from gradio_client import handle_file

    verdict, answer, evidence, record, = client.predict(handle_file(str(path)) if path else None, 0.5,
                                                        api_name="/predict")
    return verdict, answer, evidence, json.loads(record)


def _predicted(server, path) -> dict:
    from pipeline.inference.config import PredictConfig
    from pipeline.inference.run import run_predict

    out = server["root"] / f"pred-{Path(path).stem}.jsonl"
    run_predict(PredictConfig(checkpoint=server["model"], inputs=[str(path)], out=str(out), restart=True,
                              max_new_tokens=NEW_TOKENS, num_workers=0, progress=False, batch_size=1).validate())
    return json.loads(out.read_text().splitlines()[0])


def test_the_page_gives_what_predict_gives(server):
    client = _client(server)
    path = server["imgs"] / "0.png"
    verdict, answer, evidence, rec = _ask(client, path)
    want = _predicted(server, path)
    assert rec["status"] == "ok" and rec["sha256"] == want["sha256"]
    assert rec["answer"] == want["answer"] and rec["verdict"] == want["verdict"]
    assert rec["p_fake"] == pytest.approx(want["p_fake"], abs=1e-6)
    assert f"p(fake) = {want['p_fake']:.3f}" in verdict and want["verdict"].upper() in verdict
    assert 'id="fr-bot"' in answer and Path(evidence).is_file()


def test_the_answer_streams_before_the_verdict(server):
    """Partial answers arrive while generation runs, each a prefix of the next; the
    verdict (p(fake)) is only in the last update."""
    from gradio_client import handle_file

    client = _client(server)
    job = client.submit(handle_file(str(server["imgs"] / "1.png")), 0.5, api_name="/predict")
    job.result(timeout=300)
    updates = job.outputs()
    bots = [u[1].split('id="fr-bot">', 1)[1] for u in updates if u[1] and 'id="fr-bot"' in u[1]]
    assert len(bots) >= 3, len(bots)  # several streamed states before the final one
    assert all("p(fake) =" not in u[0] for u in updates[:-1]) and "p(fake) =" in updates[-1][0]


def test_ten_requests_at_once_all_complete(server):
    client = _client(server)
    paths = [server["imgs"] / f"{i % 2}.png" for i in range(10)]
    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(lambda p: _ask(client, p)[3], paths))
    assert [r["status"] for r in results] == ["ok"] * 10
    assert len({(r["sha256"], r["p_fake"]) for r in results}) == 2  # the same image, the same answer


def test_bad_input_is_a_message_and_the_server_goes_on(server):
    client = _client(server)
    verdict, _, evidence, rec = _ask(client, server["root"] / "bad.png")
    assert rec["status"] == "error" and rec["reason"].startswith("not_an_image")
    assert "cannot be analysed" in verdict and "Traceback" not in verdict and evidence is None
    verdict, _, _, rec = _ask(client, None)
    assert rec is None and "Choose an image first" in verdict
    assert _ask(client, server["imgs"] / "1.png")[3]["status"] == "ok"
    assert server["proc"].poll() is None


def _browser():
    """Headless Chromium through its driver from Debian's packages, or a skip saying how to get it
    (under CI=true a missing browser fails: .ci/run installs it)."""
    chrome = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chrome or not driver:
        msg = "needs Chromium and its driver: apt-get install chromium chromium-driver"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chrome
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(driver), options=opts)


def test_a_real_browser_uploads_an_image_and_reads_the_verdict(server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    path = server["imgs"] / "1.png"
    want = _predicted(server, path)
    shots = Path(os.environ.get("WEB_DEMO_SCREENSHOTS", str(tmp_path)))
    shots.mkdir(parents=True, exist_ok=True)
    driver = _browser()
    try:
        for name, (w, h) in {"laptop": (1280, 900), "phone": (390, 1400)}.items():
            driver.set_window_size(w, h)
            driver.get(server["url"])
            wait = WebDriverWait(driver, 120)
            upload = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#fr-image input[type=file]")))
            upload.send_keys(str(path))
            wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#fr-image img")))
            driver.find_element(By.CSS_SELECTOR, "#fr-analyse").click()
            pfake = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#fr-pfake")))
            word = driver.find_element(By.CSS_SELECTOR, "#fr-verdict-word").text
            assert pfake.text == f"p(fake) = {want['p_fake']:.3f}" and word == want["verdict"].upper()
            wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#fr-evidence img")))
            assert driver.find_element(By.CSS_SELECTOR, "#fr-bot").text.strip()
            assert "Traceback" not in driver.page_source
            driver.save_screenshot(str(shots / f"web_demo_{name}.png"))
            assert (shots / f"web_demo_{name}.png").stat().st_size > 10_000
    finally:
        driver.quit()
