"""Store entries a tenant who can write into ``--adapter-store`` (or a careless operator) can leave, against a
running ``bca-deploy serve`` (a child process: a SIGBUS must not take pytest down with it).

- a named pipe, socket or device where the reader expects ``adapter_config.json`` or ``adapter_model.safetensors``
  is refused at once, naming the adapter and what the file is (it was a 404 "no adapter", or "no such file");
- a named pipe swapped in between the server's look and its open never blocks a load (it blocked a thread-pool
  thread and the load lock for good: every later load of every tenant waited);
- weights rewritten in place (``cp``, truncate then write) during a load never kill the server (safetensors' memory
  map of a truncated file: SIGBUS, the server gone without a line in its log);
- an entry replaced whole during a load (the directory exchanged, as bca-deploy's own writers do) loads as the old
  adapter or the new one, never the config of one with the weights of the other.

Every answer is checked against the in-process :class:`~bca_deploy.serving.MultiAdapterSession`.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import socket
import stat
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serving"))
from http_helpers import ServeProcess, assert_error, bank, call  # noqa: E402

from bca_deploy.atomic import _RENAME_EXCHANGE, _RENAMEAT2, _renameat2  # noqa: E402
from bca_deploy.serving import MultiAdapterSession  # noqa: E402

TEXTS = ["the water is hot", "you can see the day"]
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
LOAD_TIMEOUT = 15.0


def _variant(good: Path, target: Path, scaling: float, sign: float) -> Path:
    """``good`` with its kernels times ``sign`` and every scaling set to ``scaling``: the same modules and shapes,
    other answers (a config of one with the weights of the other gives answers of neither)."""
    from safetensors.torch import load_file, save_file

    target.mkdir(parents=True)
    config = json.loads((good / CONFIG).read_text())
    config["scaling"] = scaling
    for module in config["modules"].values():
        module["scaling"] = scaling
    (target / CONFIG).write_text(json.dumps(config))
    save_file({k: v * sign for k, v in load_file(good / WEIGHTS).items()}, target / WEIGHTS)
    return target


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    bert = bank("bert", tmp_path_factory)
    store = tmp_path_factory.mktemp("entries") / "store"
    shutil.copytree(bert["store"], store)
    good = store / "bext"
    a = _variant(good, tmp_path_factory.mktemp("variants") / "A", 1.0, 1.0)
    b = _variant(good, a.parent / "B", 2.0, -1.0)
    session = MultiAdapterSession(bert["onnx"], provider="cpu", intra_op_threads=1)
    ab = a.parent / "AB"  # A's config over B's kernels: what an in-place rewrite of A's weights with B's gives
    ab.mkdir()
    shutil.copy(a / CONFIG, ab / CONFIG)
    shutil.copy(b / WEIGHTS, ab / WEIGHTS)
    for variant, directory in (("A", a), ("B", b), ("AB", ab)):
        session.register(variant, directory)
    expected = {v: session.embed(TEXTS, [v] * len(TEXTS), pooling="mean", normalize=True) for v in ("A", "B", "AB")}
    assert not np.allclose(expected["A"], expected["B"], atol=1e-3)
    return {"onnx": bert["onnx"], "store": store, "good": good, "A": a, "B": b, "expected": expected}


@pytest.fixture(scope="module")
def server(art, tmp_path_factory):
    log = tmp_path_factory.mktemp("entries-log") / "serve.log"
    with ServeProcess(art["onnx"], "--adapter-store", str(art["store"]), "--max-wait-ms", "1", log=log) as srv:
        yield srv


def _alive(server) -> None:
    code = server.process.poll()
    assert code is None, f"the server died ({code}):\n{server.log.read_text()[-2000:]}"
    status, body = call(server.url + "/v1/embeddings", "POST", {"input": TEXTS, "adapter": "a0"}, timeout=LOAD_TIMEOUT)
    assert status == 200, body


def _load(server, name: str, as_name: str | None = None) -> tuple[int, dict, float]:
    """``POST /v1/adapters`` (replacing), or with ``as_name`` vLLM's ``/v1/load_lora_adapter`` (entry ``name`` as
    ``as_name``); (status, body, seconds)."""
    start = time.perf_counter()
    route, body = (("/v1/adapters", {"name": name, "replace": True}) if as_name is None
                   else ("/v1/load_lora_adapter", {"lora_name": as_name, "lora_path": name}))
    try:
        status, body = call(server.url + route, "POST", body, timeout=LOAD_TIMEOUT)
    except OSError as exc:  # a timeout, or the server gone
        pytest.fail(f"loading {name!r}: no answer in {LOAD_TIMEOUT} s ({exc!r}); server alive: "
                    f"{server.process.poll() is None}")
    return status, body, time.perf_counter() - start


def _answer_is_one_of(server, art, name: str, variants=("A", "B")) -> str:
    """Which of ``variants`` adapter ``name`` answers as (the in-process session's embeddings); fails for none."""
    status, body = call(server.url + "/v1/embeddings", "POST", {"input": TEXTS, "adapter": name, "normalize": True})
    assert status == 200, body
    got = np.array([row["embedding"] for row in body["data"]])
    for variant in variants:
        if np.allclose(got, art["expected"][variant], atol=2e-5):
            return variant
    pytest.fail(f"adapter {name!r} answers as none of {variants} (a mix): "
                f"{[float(np.abs(got - art['expected'][v]).max()) for v in variants]}")


def _entry(store: Path, name: str, config=None, weights=None, good: Path | None = None) -> Path:
    entry = store / name
    entry.mkdir()
    for file, make in ((CONFIG, config), (WEIGHTS, weights)):
        if make is None:
            shutil.copy(good / file, entry / file)
        else:
            make(entry / file)
    return entry


def _socket(path: Path) -> None:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    sock.close()  # the socket file stays


def test_files_that_are_not_files_are_named(server, art):
    kinds = {"fifo": (os.mkfifo, "named pipe"), "sock": (_socket, "socket")}
    if os.geteuid() == 0:  # a device node needs root
        kinds["dev"] = (lambda p: os.mknod(p, 0o600 | stat.S_IFCHR, os.makedev(1, 5)), "character device")
    for kind, (make, words) in kinds.items():
        for file in (CONFIG, WEIGHTS):
            name = f"{kind}-{file.split('_')[1].split('.')[0]}"
            _entry(art["store"], name, **{"config" if file == CONFIG else "weights": make}, good=art["good"])
            status, body, took = _load(server, name, as_name=name)  # vLLM's route: OpenAI's 400
            assert_error(status, body, 400, "invalid_adapter", words=(repr(name), file, words))
            assert took < 2.0, (name, took)
    status, body = call(server.url + "/v1/adapters")
    assert status == 200 and not {n for n in body["available"] if n.startswith(("fifo-", "sock-", "dev-"))}, body
    _alive(server)


def _swap_in_fifo(entry: Path, file: str, stop) -> None:
    data = (entry / file).read_bytes()
    while not stop.is_set():
        os.mkfifo(entry / ".fifo")
        os.rename(entry / ".fifo", entry / file)
        (entry / ".regular").write_bytes(data)
        os.rename(entry / ".regular", entry / file)


@pytest.mark.parametrize("file", [CONFIG, WEIGHTS])
def test_a_named_pipe_swapped_in_never_blocks_a_load(server, art, file):
    name = f"swap-{file.split('_')[1].split('.')[0]}"
    entry = shutil.copytree(art["A"], art["store"] / name)
    stop = multiprocessing.Event()
    racer = multiprocessing.Process(target=_swap_in_fifo, args=(entry, file, stop), daemon=True)
    racer.start()
    statuses = []
    try:
        deadline = time.monotonic() + 6.0
        while time.monotonic() < deadline:
            status, body, _ = _load(server, name)
            statuses.append(status)
            if status != 201:  # what it was at the moment: named by test_files_that_are_not_files_are_named
                assert status in (404, 422), body
                assert_error(status, body, status)
    finally:
        stop.set()
        racer.join(10)
    assert 201 in statuses and len(set(statuses)) > 1, statuses
    assert _answer_is_one_of(server, art, name) == "A"
    status, body, took = _load(server, "bext", as_name=f"after-{name}")  # other tenants' loads go on
    assert status == 200 and took < 5.0, (status, body, took)
    _alive(server)


def _rewrite_in_place(weights: Path, sources: list[bytes], stop) -> None:
    i = 0
    while not stop.is_set():
        with open(weights, "r+b") as f:  # what cp does to an existing file: truncate, then write
            f.truncate(0)
            f.write(sources[i % 2])
        i += 1


def test_weights_rewritten_during_loads_never_kill_the_server(server, art):
    entry = shutil.copytree(art["A"], art["store"] / "inplace")
    # both variants' weights under A's config: each in-place state is a whole file of A's or B's kernels
    shutil.copy(art["A"] / CONFIG, entry / CONFIG)
    sources = [(art["A"] / WEIGHTS).read_bytes(), (art["B"] / WEIGHTS).read_bytes()]
    stop = multiprocessing.Event()
    writer = multiprocessing.Process(target=_rewrite_in_place, args=(entry / WEIGHTS, sources, stop), daemon=True)
    writer.start()
    statuses = []
    try:
        deadline = time.monotonic() + 8.0
        while time.monotonic() < deadline and len(statuses) < 600:
            status, body, _ = _load(server, "inplace")
            statuses.append(status)
            assert status in (201, 422), body
            if status == 422:  # caught mid-write (an empty or half-written file): the adapter's own error
                assert_error(status, body, 422, words=("inplace",))
            else:  # A's config over A's kernels or over B's, whole
                _answer_is_one_of(server, art, "inplace", ("A", "AB"))
    finally:
        stop.set()
        writer.join(10)
    _alive(server)
    assert 201 in statuses, statuses
    shutil.copy(art["A"] / WEIGHTS, entry / WEIGHTS)
    status, body, _ = _load(server, "inplace")
    assert status == 201, body
    assert _answer_is_one_of(server, art, "inplace", ("A",)) == "A"


def _exchange(store: Path, a: Path, b: Path, stop) -> None:
    """Put A and B at ``store/mixed`` in turn, each whole (``renameat2(RENAME_EXCHANGE)``, as bca-deploy's writers
    replace a directory)."""
    spare = store.parent / "spare"
    shutil.copytree(a, store / "mixed")
    shutil.copytree(b, spare)
    while not stop.is_set():
        assert _renameat2(spare, store / "mixed", _RENAME_EXCHANGE)


def test_an_entry_replaced_during_loads_is_the_old_or_the_new_adapter(server, art):
    if _RENAMEAT2 is None:
        pytest.skip("no renameat2 (Linux only)")
    stop = multiprocessing.Event()
    writer = multiprocessing.Process(target=_exchange, args=(art["store"], art["A"], art["B"], stop), daemon=True)
    writer.start()
    seen = {"A": 0, "B": 0}
    try:
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and sum(seen.values()) < 120:
            status, body, _ = _load(server, "mixed")
            if status == 201:
                # the answers of what was loaded (the entry keeps changing, the loaded adapter does not)
                seen[_answer_is_one_of(server, art, "mixed")] += 1
            else:
                assert_error(status, body, status, words=("mixed",))
                assert status in (404, 422), body
    finally:
        stop.set()
        writer.join(10)
    assert seen["A"] and seen["B"], seen
    _alive(server)
