"""serve.py as a real uvicorn server on a free loopback port: batching and the full queue over HTTP, the page in
headless chromium, Ctrl-C during a request, and the prompt optimiser generating through the A1111 API."""
import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from PIL import Image

from inference import ImageTextGenerator
from serving.app import create_app
from serving.settings import ServeSettings
from specialize.cli import main as specialize_main
from test_prompt_opt import FAST, tiny_sd, write_tables, write_targets  # noqa: F401 (tiny_sd: a fixture used here)

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red circle on the left"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"   # Debian's chromium-driver; an explicit path keeps Selenium Manager off


@pytest.fixture(scope="module")
def generator(tiny_checkpoint):
    return ImageTextGenerator(tiny_checkpoint, device="cpu")


@contextmanager
def live_server(app):
    """uvicorn on a socket bound to a free loopback port, in a thread; yields the base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def wait_for(condition, seconds: float = 30, what: str = "condition"):
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))), dtype=np.int16)


def test_queued_http_requests_share_a_batch_and_a_full_queue_answers_503(generator):
    app = create_app(generator, ServeSettings(max_batch_images=8, max_queue_images=3))
    with live_server(app) as url, httpx.Client(base_url=url, timeout=60) as http, ThreadPoolExecutor(3) as pool:
        health = lambda: http.get("/health").json()  # noqa: E731
        gate = threading.Event()
        app.state.batcher.executor.submit(gate.wait)          # the model thread is busy with something else
        posted = [pool.submit(httpx.post, url + "/sdapi/v1/txt2img", timeout=60,
                              json={"prompt": PROMPT, "steps": 2, "seed": seed}) for seed in (1, 2, 3)]
        # the worker has taken the first request (waiting for the model thread), the other two queue
        wait_for(lambda: health()["queue_images"] == 2, what="two queued images")
        full = http.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "steps": 2, "batch_size": 2})
        assert full.status_code == 503 and int(full.headers["Retry-After"]) >= 1
        assert "waiting" in full.json()["detail"]
        gate.set()
        responses = [f.result(timeout=60) for f in posted]
        assert all(r.status_code == 200 for r in responses)
        stats = health()
        assert (stats["batches"], stats["largest_batch"], stats["images"]) == (2, 2, 3)
        for response in responses:
            seed = json.loads(response.json()["info"])["seed"]
            alone = http.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "steps": 2, "seed": seed}).json()
            assert np.abs(pixels(response.json()["images"][0]) - pixels(alone["images"][0])).max() <= 1


@pytest.mark.skipif(not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()),
                    reason=f"needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}); "
                           "setup.sh installs both")
def test_page_generates_and_captions_in_headless_chromium(generator, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    upload = tmp_path / "upload.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(upload)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(arg)
    with live_server(create_app(generator, ServeSettings(api_key="k3y"))) as url:
        driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
        try:
            wait = WebDriverWait(driver, 60)
            driver.get(url + "/")
            driver.find_element(By.ID, "key").send_keys("k3y")
            prompt = driver.find_element(By.ID, "prompt")
            prompt.clear()
            prompt.send_keys("a blue square")
            driver.find_element(By.ID, "steps").send_keys("2")
            driver.find_element(By.ID, "seed").clear()
            driver.find_element(By.ID, "seed").send_keys("4")
            driver.find_element(By.ID, "generate").click()
            image = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#images img"))[0]
            src = image.get_attribute("src")
            assert src.startswith("data:image/png;base64,")
            drawn = generator.generate(["a blue square"], [4], 2, None, None)[0]
            assert np.array_equal(pixels(src.split(",", 1)[1]), np.asarray(drawn, dtype=np.int16))
            assert "seed 4, 2 steps" in driver.find_element(By.ID, "info").text
            assert image.get_attribute("naturalWidth") == "16"    # the browser decoded the PNG

            driver.find_element(By.ID, "upload").send_keys(str(upload))
            caption = driver.find_element(By.ID, "caption")
            wait.until(lambda d: caption.text and caption.text != "captioning...")
            expected = generator.image_to_text(Image.open(upload)) or "(empty caption)"
            assert caption.text == expected and caption.get_attribute("class") != "error"
        finally:
            driver.quit()


@pytest.mark.slow
def test_ctrl_c_finishes_the_request_in_flight_then_exits(tiny_checkpoint, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log_path = tmp_path / "serve.log"     # a file, not a pipe: an unread pipe fills and stalls the server
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "serve.py", "--checkpoint", str(tiny_checkpoint), "--port",
                                 str(port), "--device", "cpu", "--threads", "1"], cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT, env={**os.environ, "DUET_API_KEY": ""})
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as http, ThreadPoolExecutor(1) as pool:
            def up():
                assert proc.poll() is None, log_path.read_text()
                try:
                    return http.get("/health").status_code == 200
                except httpx.TransportError:
                    return False
            wait_for(up, 180, "serve.py to start")
            slow = {"prompt": PROMPT, "steps": 100, "batch_size": 16, "seed": 0}   # tiny: 100 timesteps
            posted = pool.submit(httpx.post, f"http://127.0.0.1:{port}/sdapi/v1/txt2img", json=slow, timeout=300)
            # the worker draws it as two batches of max_batch_images (8); SIGINT lands during the first
            wait_for(lambda: http.get("/health").json()["drawing"] > 0, 60, "the request to reach the model")
            proc.send_signal(signal.SIGINT)
            response = posted.result(timeout=300)
            assert response.status_code == 200 and len(response.json()["images"]) == 16
        assert proc.wait(timeout=60) == 0
        log = log_path.read_text()
        assert "Shutting down" in log and "Traceback" not in log
    finally:
        if proc.poll() is None:
            proc.kill()


def sdapi_args(url: str, tmp_path: Path, *judge: str) -> list[str]:
    return ["--mode", "prompt", "--backend", "sdapi", "--url", url, *judge, "--attributes",
            str(write_tables(tmp_path / "tables")), "--dataset", str(write_targets(tmp_path / "data")), "--out",
            str(tmp_path / "out"), "--device", "cpu", "--cache-dir", "", *FAST, "--num-targets", "1"]


def test_prompt_optimiser_generates_through_the_server(generator, tiny_checkpoint, tmp_path, capsys):
    app = create_app(generator, ServeSettings(api_key="k3y"))
    out = tmp_path / "out"
    with live_server(app) as url:
        args = sdapi_args(url, tmp_path, "--checkpoint", str(tiny_checkpoint))
        assert specialize_main([*args, "--api-key", "k3y"]) == 0
        drawn = httpx.get(url + "/health", headers={"Authorization": "Bearer k3y"}).json()["images"]
        assert specialize_main([*args, "--api-key", "wrong", "--overwrite"]) == 2
        assert "answered 401" in capsys.readouterr().err
    summary = json.loads((out / "prompt" / "summary.json").read_text())
    assert summary["backend"] == "sdapi" and summary["targets"] == 1 and summary["weights_unchanged"]
    assert summary["model"].startswith(url)
    report = json.loads(next((out / "prompt" / "targets").glob("*.json")).read_text())
    assert {"type_only", "caption"} <= {c["strategy"] for c in report["candidates"]}    # the judge captions
    assert drawn == report["evaluations"] + 2     # one image per evaluation, then naive and chosen on held-out seeds
    assert specialize_main([*args, "--url", url, "--overwrite"]) == 2       # the server is gone
    assert "cannot reach" in capsys.readouterr().err


def test_prompt_optimiser_through_the_server_judged_by_clip(generator, tiny_sd, tmp_path):
    with live_server(create_app(generator)) as url:
        assert specialize_main(sdapi_args(url, tmp_path, "--clip-path", str(tiny_sd / "clip"))) == 0
    summary = json.loads((tmp_path / "out" / "prompt" / "summary.json").read_text())
    assert summary["weights_unchanged"] and str(tiny_sd / "clip") in summary["model"]
    report = json.loads(next((tmp_path / "out" / "prompt" / "targets").glob("*.json")).read_text())
    assert "caption" not in {c["strategy"] for c in report["candidates"]}       # CLIP does not caption
