"""Servers for the HTTP tests: tiny adapter-bank exports with tokenizers, and ``bca-deploy serve`` processes.

Not a ``conftest.py`` (``tests/conftest.py`` is imported elsewhere as ``conftest``): test modules put this
folder on ``sys.path`` and import what they use. Exports are cached per pytest session.

- :func:`bert_bank`: the tiny BERT (``feature-extraction``) with a 128-token WordPiece tokenizer, three
  exported adapters (a0, a1, a2) and a store (``bext`` fits, ``misfit`` does not);
- :func:`llama_bank`: a tiny Llama (``text-generation-with-past``, 128 positions) with a word-level
  tokenizer carrying a chat template, three exported adapters and a store (``extra`` fits); its
  ``no_template`` copy is the same export without the chat template.
- :class:`ServeProcess`: ``python -m bca_deploy.cli serve ...`` on 127.0.0.1 and a free port, as a user
  runs it; stopped (SIGINT, then SIGKILL) on exit.
- module fixtures over the tiny Llama, for the OpenAI test modules that import them: ``llama`` (its artefacts),
  ``server`` (``bca-deploy serve`` of it, :func:`llama_serve`; one per module), ``llm`` (the ``openai`` client on it),
  ``session`` (an in-process :class:`~bca_deploy.serving.MultiAdapterSession` of the export), ``torch_llama`` (the
  PyTorch Llama with adapters a0..a2 loaded: the reference).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "exporters"))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # tests/: conftest's tokenizer builder
from exporters_helpers import build_model

from bca_deploy import inject, save_adapter

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VOCAB = 128
WORDS = (
    "the", "a", "an", "is", "of", "to", "and", "in", "it", "you", "that", "he", "was", "for", "on", "are", "with",
    "as", "his", "they", "be", "at", "one", "have", "this", "from", "or", "had", "by", "hot", "word", "but", "what",
    "some", "we", "can", "out", "other", "were", "all", "there", "when", "up", "use", "your", "how", "said", "each",
    "she", "which", "do", "their", "time", "if", "will", "way", "about", "many", "then", "them", "write", "would",
    "like", "so", "these", "her", "long", "make", "thing", "see", "him", "two", "has", "look", "more", "day",
    "could", "go", "come", "did", "number", "sound", "no", "most", "people", "my", "over", "know", "water", "than",
    "call", "first", "who", "may", "down",
)
CHAT_TEMPLATE = ("{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}<s> assistant :{% endif %}")
TIMEOUT = 60.0


def write_wordpiece_tokenizer(directory: Path) -> None:
    """A WordPiece tokenizer for the tiny BERT (128 tokens, built locally): texts reach the server's text path."""
    from conftest import wordpiece_tokenizer  # tests/conftest.py (not vocab_file=: transformers 5.x ignores it)

    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.ascii_lowercase,
              *("##" + c for c in string.ascii_lowercase)]
    tokens += [w for w in WORDS if w not in tokens][:VOCAB - len(tokens)]
    assert len(tokens) == VOCAB
    wordpiece_tokenizer(tokens).save_pretrained(directory)


def write_word_tokenizer(directory: Path, chat_template: str | None = CHAT_TEMPLATE) -> None:
    """A word-level tokenizer for the tiny Llama: <unk>=0, <s>=1, </s>=2, chat words, then common words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "system", "user", "assistant", ":", ".", ",", "!", "?"]
    words += [w for w in WORDS if w not in words][:VOCAB - len(words)]
    words += [f"w{i}" for i in range(VOCAB - len(words))]
    assert len(words) == VOCAB
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(directory)


def tiny_llama(positions: int = 128):
    """A 2-layer random Llama (hidden 32, vocabulary 128, ``positions`` positions); seeded."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=positions,
                         bos_token_id=1, eos_token_id=2)
    return tf.LlamaForCausalLM(cfg)


def _save_adapter(model_factory, directory: Path, targets, block_size: int, seed: int) -> Path:
    model = model_factory()
    inject(model, targets, block_size=block_size, init="normal", init_std=0.05, seed=seed)
    save_adapter(model, directory)
    return directory


_BANKS: dict[str, dict] = {}


def _make(name: str, root: Path) -> dict:
    from bca_deploy.exporters import export

    if name == "bert":
        factory, task = (lambda: build_model("bert")), "feature-extraction"
        exported = {"a0": (["query", "value"], 8, 0), "a1": (["query", "intermediate.dense"], 8, 1),
                    "a2": (["query", "value"], 16, 2)}
        store = {"bext": (["value", "intermediate.dense"], 8, 20), "misfit": (["value"], 4, 21)}
    else:
        factory, task = tiny_llama, "text-generation-with-past"
        exported = {"a0": (["q_proj", "v_proj"], 8, 0), "a1": (["q_proj", "v_proj", "gate_proj"], 8, 1),
                    "a2": (["q_proj", "v_proj", "down_proj"], 16, 2)}
        store = {"extra": (["q_proj", "gate_proj"], 8, 10), "misfit": (["k_proj"], 8, 11)}
    model_dir = root / "model"
    factory().save_pretrained(model_dir)
    (write_wordpiece_tokenizer if name == "bert" else write_word_tokenizer)(model_dir)
    adapters = [_save_adapter(factory, root / "adapters" / n, t, p, s) for n, (t, p, s) in exported.items()]
    for n, (t, p, s) in store.items():
        _save_adapter(factory, root / "store" / n, t, p, s)
    onnx = export(model_dir, root / "onnx", adapters, merge=False, bank=True, task=task, verbose=False)
    art = {"name": name, "root": root, "model": model_dir, "onnx": Path(onnx), "store": root / "store"}
    if name == "llama":  # the same export without a chat template
        plain = root / "no-template"
        shutil.copytree(onnx, plain)
        write_word_tokenizer(plain, chat_template=None)
        for leftover in plain.glob("chat_template.*"):
            leftover.unlink()
        art["no_template"] = plain
    return art


def bank(name: str, tmp_path_factory) -> dict:
    """The cached artefacts of ``"bert"`` or ``"llama"`` (see the module docstring)."""
    if name not in _BANKS:
        _BANKS[name] = _make(name, tmp_path_factory.mktemp(f"http-{name}"))
    return _BANKS[name]


# ---- a real server process ------------------------------------------------------------------------------


@functools.cache
def reference_llama(root: str, store_entries: tuple[str, ...] = ()):
    """The PyTorch tiny Llama of :func:`bank` ``("llama")`` at ``root``, with the exported adapters a0, a1, a2 and the
    store's ``store_entries`` loaded by name (one per root and entries: the references of a module share it)."""
    from transformers import AutoModelForCausalLM

    from bca_deploy import load_adapter

    model = AutoModelForCausalLM.from_pretrained(Path(root) / "model").eval()
    for name in ("a0", "a1", "a2"):
        load_adapter(model, Path(root) / "adapters" / name, adapter_name=name)
    for name in store_entries:
        load_adapter(model, Path(root) / "store" / name, adapter_name=name)
    return model


def continuation(session, prompt: list[int], tokens: list[int]) -> str:
    """The text ``tokens`` add after ``prompt``: both decoded together, less the prompt's own text. An OpenAI
    completion's (and chat answer's) text is this, so prompt + text reads as one decoded sequence (as vLLM answers):
    with a word-level or SentencePiece tokenizer it starts with the space before the first word."""
    return session.decode(list(prompt) + list(tokens))[len(session.decode(list(prompt))):]


def openai_client(url: str, timeout: float = 120.0):
    """The official ``openai`` client on the server at ``url`` (its ``/v1``), without retries: a test sees every error."""
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=timeout)


def llama_serve(export_dir: Path, store: Path, log: Path, *options: str) -> ServeProcess:
    """``bca-deploy serve`` of a tiny Llama export with its adapter store, served as ``tiny-llama``, batches formed
    within 2 ms, and any further ``options`` (use as a context manager)."""
    return ServeProcess(export_dir, "--adapter-store", str(store), "--served-model-name", "tiny-llama",
                        "--max-wait-ms", "2", *options, log=log)


def metric_total(url: str, name: str) -> float:
    """The sum of the server's /metrics samples named ``name`` (over all their labels)."""
    with urllib.request.urlopen(url + "/metrics", timeout=15) as response:
        text = response.read().decode()
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


@contextlib.contextmanager
def log_lines(name: str = "bca_deploy.serve", level: int = logging.NOTSET) -> Iterator[list[str]]:
    """The messages the logger ``name`` (the server's by default) gets at ``level`` and above while the block runs
    (the logger's own level lowered to INFO meanwhile, as serve sets it), as they come."""
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger, keep = logging.getLogger(name), Keep(level)
    logger.addHandler(keep)
    before = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        logger.removeHandler(keep)
        logger.setLevel(before)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_beside_ray() -> int:
    """A free port for serve-ray's HTTP proxy that Ray's own services cannot take while it starts: they bind port 0
    (the kernel's ephemeral range, where :func:`free_port` also draws) or Ray's worker ports (10002-19999), so a port
    drawn there was sometimes taken by one of them before the proxy bound it, and the test's health probe read that
    service's binary reply (ci133: ``BadStatusLine: @@@...``). Drawn from 20000 up to the ephemeral range instead."""
    import random

    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    top = max(20001, min(30000, low))
    for _ in range(500):
        port = random.randrange(20000, top)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    return free_port()


def read_at_once(port: int, path: str, body: dict) -> tuple[bytes, list[dict]]:
    """POST ``body`` on a raw socket and read the answer as fast as the socket gives it; (status line, events)."""
    raw = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        sock.sendall(b"POST %s HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                     b"connection: close\r\n\r\n" % (path.encode(), len(raw)) + raw)
        data = bytearray()
        while piece := sock.recv(1 << 20):
            data += piece
    head, _, rest = bytes(data).partition(b"\r\n\r\n")
    events = [json.loads(line[6:]) for line in rest.decode().splitlines() if line.startswith("data: {")]
    return head.split(b"\r\n")[0], events


def _ignore_sigint() -> None:  # what a shell does for a job it starts with &
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def serve_ray(export_dir: Path, log: Path, *options: str):
    """``bca-deploy serve-ray EXPORT [options]`` (one replica, its own local Ray instance), started as a shell's ``&``
    starts it (SIGINT ignored), once its health route answers: yields ``(process, url)``; killed on exit."""
    import http.client

    port = free_port_beside_ray()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "RAY_DISABLE_USAGE_STATS": "1"}
    command = [sys.executable, "-m", "bca_deploy.cli", "serve-ray", str(export_dir), "--replicas", "1",
               "--replica-cpus", "0", "--host", "127.0.0.1", "--port", str(port), "--threads", "1", *options]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, preexec_fn=_ignore_sigint)
        try:
            deadline = time.monotonic() + 240
            while True:  # up: the health route answers (the signal may come before the "serving" line)
                assert process.poll() is None, log.read_text()[-3000:]
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=60) as response:
                        response.read()
                        if response.status == 200:
                            break
                except (OSError, http.client.HTTPException):  # not up yet (or, at worst, another service's port)
                    pass
                assert time.monotonic() < deadline, "serve-ray did not come up"
                time.sleep(0.5)
            yield process, f"http://127.0.0.1:{port}"
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)


class ServeProcess:
    """``bca-deploy serve EXPORT [args]`` on 127.0.0.1:<free port>, in a child process; ``url`` once it answers."""

    def __init__(self, export_dir: Path, *args: str, log: Path, startup_timeout: float = 180.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [sys.executable, "-m", "bca_deploy.cli", "serve", str(export_dir), "--host", "127.0.0.1",
                        "--port", str(self.port), "--threads", "1", *args]
        self.log = log
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> ServeProcess:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
        self._log_file = open(self.log, "wb")  # noqa: SIM115 - closed in __exit__
        self.process = subprocess.Popen(self.command, stdout=self._log_file, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"bca-deploy serve exited with {self.process.returncode}:\n{self.log.read_text()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"bca-deploy serve did not answer within {self.startup_timeout} s")
            time.sleep(0.2)

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=20)
        self._log_file.close()

    def log_entries(self) -> list[dict]:
        """The JSON lines the server wrote so far."""
        entries = []
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    entries.append(json.loads(line))
                except ValueError:
                    continue
        return entries


def call(url: str, method: str = "GET", body=None, raw: bytes | None = None, headers: dict | None = None,
         timeout: float = TIMEOUT) -> tuple[int, dict]:
    """(status, JSON body) of one request; HTTP errors are returned, not raised."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, _json(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, _json(exc.read())


def _json(data: bytes):
    try:
        return json.loads(data)
    except ValueError:
        return {"not_json": data.decode("utf-8", "replace")}


def assert_error(status: int, body: dict, expected_status: int, kind: str | None = None, words=()) -> None:
    """An error answer in the documented shape, with no filesystem path in it."""
    assert status == expected_status, body
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message", "param", "code"}, body
    message = body["error"]["message"]
    assert isinstance(message, str) and message, body
    assert body["error"]["code"] == expected_status, body
    assert "/tmp" not in message and "pytest-of" not in message and "Traceback" not in message, body
    if kind is not None:
        assert body["error"]["type"] == kind, body
    for word in words:
        assert word in message, body


# ---- module fixtures of the tiny Llama (imported by the OpenAI test modules) --------------------------------------


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> dict:
    return bank("llama", tmp_path_factory)


@pytest.fixture(scope="module")
def server(llama, tmp_path_factory, request):
    log = tmp_path_factory.mktemp("logs") / f"{request.module.__name__.rpartition('.')[2]}-serve.log"
    with llama_serve(llama["onnx"], llama["store"], log) as process:
        yield process


@pytest.fixture(scope="module")
def llm(server):
    return openai_client(server.url)


@pytest.fixture(scope="module")
def session(llama):
    from bca_deploy.serving import MultiAdapterSession

    return MultiAdapterSession(llama["onnx"], intra_op_threads=1)


@pytest.fixture(scope="module")
def torch_llama(llama):
    import transformers

    from bca_deploy import load_adapter

    model = transformers.LlamaForCausalLM.from_pretrained(llama["model"])
    for name in ("a0", "a1", "a2"):
        load_adapter(model, llama["root"] / "adapters" / name, adapter_name=name)
    return model.eval()
