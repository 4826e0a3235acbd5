"""Engine tier: live serving engines (SGLang) in their own venv, started and always stopped here.

EDLM_SGLANG_PYTHON names the python of a venv with SGLang (`make test-engines` makes `.venv-sglang`).
SGLang runs on CPU (torch-native attention, float32), with the `sgl_kernel` stand-in of
sgl_kernel_stub/ first on its PYTHONPATH: the published kernel wheel is CUDA-only and fails to import.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

STUB = Path(__file__).parent / "sgl_kernel_stub"
START_TIMEOUT_S = 180
RECORDS: list[dict] = []  # one per compared case, printed at the end of the run


def log_tail(path: Path, lines: int = 40) -> str:
    text = path.read_text(errors="replace") if path.is_file() else ""
    return "\n".join(text.splitlines()[-lines:])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SGLangServer:
    """`python -m sglang.launch_server` on a block-diffusion (SDAR) checkpoint, on CPU."""

    def __init__(self, python: Path, model: Path, log: Path):
        self.python, self.model, self.log = python, model, log
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.start_s = 0.0

    def start(self) -> None:
        cmd = [str(self.python), "-m", "sglang.launch_server", "--model-path", str(self.model),
               "--trust-remote-code", "--dllm-algorithm", "LowConfidence",
               "--dllm-algorithm-config", str(self.model / "dllm.yaml"),
               "--device", "cpu", "--attention-backend", "torch_native", "--dtype", "float32",
               "--disable-cuda-graph", "--max-total-tokens", "4096", "--mem-fraction-static", "0.1",
               "--sleep-on-idle",  # else its scheduler busy-polls a whole core between requests
               "--host", "127.0.0.1", "--port", str(self.port)]
        env = dict(os.environ, SGLANG_USE_CPU_ENGINE="1", PYTHONPATH=str(STUB), HF_HUB_OFFLINE="1")
        t0 = time.perf_counter()
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)  # its own process group: stop() ends all
        while time.perf_counter() - t0 < START_TIMEOUT_S:
            if self.proc.poll() is not None:
                raise RuntimeError(f"SGLang exited with code {self.proc.returncode} during start-up")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as r:
                    if r.status == 200:
                        self.start_s = time.perf_counter() - t0
                        return
            except (urllib.error.URLError, OSError):
                pass  # not listening yet, or 503 while it warms up
            time.sleep(1)
        raise RuntimeError(f"SGLang not healthy after {START_TIMEOUT_S} s")

    def generate(self, input_ids: list[int], max_new_tokens: int) -> list[int]:
        """Greedy, EOS ignored: exactly max_new_tokens ids."""
        body = {"input_ids": input_ids,
                "sampling_params": {"temperature": 0, "max_new_tokens": max_new_tokens, "ignore_eos": True}}
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/generate", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return json.load(r)["output_ids"]
        except (OSError, KeyError, ValueError) as e:  # URLError/HTTPError are OSErrors
            detail = e.read().decode(errors="replace") if isinstance(e, urllib.error.HTTPError) else ""
            pytest.fail(f"SGLang /generate failed: {e!r} {detail}\nlog {self.log}:\n{log_tail(self.log)}",
                        pytrace=False)

    def stop(self) -> None:
        """SIGTERM to the launcher (it ends its scheduler and detokenizer), then SIGKILL to whatever
        is left of the process group it was started in."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)


class SGLangPool:
    """At most one live server (2 shared cores): asking for another model stops the current one.
    A model whose server failed to start fails again at once, with the same log tail."""

    def __init__(self, python: Path, logs: Path):
        self.python, self.logs = python, logs
        self.current: SGLangServer | None = None
        self.failed: dict[Path, str] = {}
        self.starts: list[tuple[str, float]] = []

    def server(self, model: Path) -> SGLangServer:
        if model in self.failed:
            pytest.fail(self.failed[model], pytrace=False)
        if self.current is not None and self.current.model == model:
            if self.current.proc.poll() is None:
                return self.current
            pytest.fail(f"SGLang for {model} died (code {self.current.proc.returncode}); log "
                        f"{self.current.log}:\n{log_tail(self.current.log)}", pytrace=False)
        self.close()
        name = f"{model.parent.name}-{model.name}"
        self.current = SGLangServer(self.python, model, self.logs / f"sglang-{name}.log")
        try:
            self.current.start()
        except RuntimeError as e:
            self.current.stop()
            self.failed[model] = f"{e}; log {self.current.log}:\n{log_tail(self.current.log)}"
            self.current = None
            pytest.fail(self.failed[model], pytrace=False)
        self.starts.append((name, self.current.start_s))
        return self.current

    def close(self) -> None:
        if self.current is not None:
            self.current.stop()
            self.current = None


@pytest.fixture(scope="session")
def sglang(tmp_path_factory):
    """Servers from EDLM_SGLANG_PYTHON; every one is stopped when the session ends."""
    python = os.environ.get("EDLM_SGLANG_PYTHON")
    if not python:
        pytest.skip("set EDLM_SGLANG_PYTHON to the python of a venv with SGLang (make test-engines)")
    python = Path(python).absolute()  # not resolve(): the venv's python is a symlink out of the venv
    if not os.access(python, os.X_OK):
        pytest.fail(f"EDLM_SGLANG_PYTHON={python} is not an executable", pytrace=False)
    pool = SGLangPool(python, tmp_path_factory.mktemp("sglang-logs"))
    try:
        yield pool
    finally:
        pool.close()
        RECORDS.append({"starts": pool.starts})


@pytest.fixture
def engine_report():
    return RECORDS.append


def pytest_terminal_summary(terminalreporter):
    cases = [r for r in RECORDS if "case" in r]
    if not cases:
        return
    tr = terminalreporter
    tr.section("engine tier summary")
    for r in cases:
        tr.write_line(f"{r['case']:<34} {'match' if r['match'] else 'DIFFER':<6} {r['compared']:>3} tokens  "
                      f"edlm {r['edlm_s']:.2f}s  {r['engine']} {r['engine_s']:.2f}s")
    for r in RECORDS:
        for name, secs in r.get("starts", []):
            tr.write_line(f"SGLang start-up {name}: {secs:.0f}s")
    matched = sum(r["match"] for r in cases)
    tr.write_line(f"{matched}/{len(cases)} cases match; {sum(r['compared'] for r in cases)} tokens compared")
