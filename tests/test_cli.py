"""`python app.py` as a user runs it: a real process, serving on localhost."""

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
from gradio_client import Client

from .test_app import OUT, free_port

ROOT = Path(__file__).resolve().parent.parent


def test_python_app_py_serves_the_default_model_and_streams(tmp_path):
    port = free_port()
    env = dict(os.environ, STEPWISE_CACHE=str(tmp_path), GRADIO_TEMP_DIR=str(tmp_path / "gradio"))
    outputs = tmp_path / "outputs"
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--outputs", str(outputs)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}/"
        for _ in range(120):
            try:
                if httpx.get(url, timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        else:
            raise AssertionError("app.py did not start serving within 60 s")
        updates = list(Client(url, verbose=False).submit(prompt="a red circle", seed=1, steps=4, width=64, height=64,
                                                          api_name="/txt2img"))
        assert len({u[OUT["preview"]] for u in updates[:-1]}) == 4
        assert updates[-1][OUT["final"]].endswith("final.png")
        assert len(list(outputs.glob("*/*/run.json"))) == 1  # the run is saved
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_unknown_model_exits_with_a_clear_message(tmp_path):
    result = subprocess.run([sys.executable, "app.py", "--model", "nobody/missing-model", "--port", str(free_port())],
                            cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path)),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "error: model 'nobody/missing-model' is not in the local Hugging Face cache" in result.stderr
