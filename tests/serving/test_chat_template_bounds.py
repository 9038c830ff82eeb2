"""A chat template that loops, blows up or fails cannot burn the server (``bca_deploy.serving.chat_template``).

Before, ``/v1/chat/completions`` rendered the model's chat template in a server thread with no bound: a template
that loops (``{% for a in range(100000) %}{% for b in range(100000) %}...``) burned a CPU for ever on every chat
request, and SIGTERM could not stop the server (its shutdown waited for the thread). Now each render runs in a
worker process, stopped (killed) past ``--chat-template-timeout-s`` or ``--chat-template-memory-mb`` with a 400
``chat_template_limit_exceeded`` while other requests are answered; ``serve`` renders a one-message conversation at
start and refuses to start (exit 2) when that fails; and a signal stops the server within seconds, even with a
render (or any thread's work) stuck. Normal templates render exactly as ``apply_chat_template`` renders them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from http_helpers import CHAT_TEMPLATE, ServeProcess, assert_error, bank, call, free_port

from bca_deploy.errors import ServingError
from bca_deploy.models import load_saved_tokenizer
from bca_deploy.serving.chat_template import (
    ChatTemplateLimitError,
    ChatTemplateRenderError,
    ChatTemplateRenderer,
    RenderedTooLongError,
)
from bca_deploy.serving.options import ServeOptions
from bca_deploy.serving.wire import ServerBusyError

#: 10^10 empty iterations: what an earlier probe found burning a CPU for ever on every chat request.
LOOP = "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"
#: Fine on every conversation but the one whose last message is a trigger word (so it passes the start-up check).
TRIGGERED = ("{% set last = messages[-1]['content'] %}"
             "{% if last == 'loop' %}" + LOOP + "{% elif last == 'memory' %}{{ 'x' * 10**9 }}"
             "{% elif last == 'long' %}{{ 'y' * 5000 }}{% elif last == 'fail' %}{{ raise_exception('no ' + last) }}"
             "{% endif %}" + CHAT_TEMPLATE)
#: A template with what real ones use: a system prompt, loop variables, namespaces, tojson, whitespace control,
#: special tokens as variables.
RICH_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(system='') %}"
    "{%- for m in messages -%}{%- if m['role'] == 'system' -%}{%- set ns.system = m['content'] -%}{%- endif -%}"
    "{%- endfor -%}{% if ns.system %}[SYS] {{ ns.system | trim }}\n{% endif %}"
    "{% for m in messages if m['role'] != 'system' %}"
    "{{ loop.index }}/{{ loop.length }} {{ m['role'] | upper }}{% if m.get('name') %} ({{ m['name'] }}){% endif %}: "
    "{{ m['content'] }}{{ eos_token if not loop.last else '' }}\n"
    "{% endfor %}{{ messages | map(attribute='role') | list | tojson }}"
    "{% if add_generation_prompt %}\nASSISTANT:{% endif %}")
CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "  be brief\n"}, {"role": "user", "content": "héllo wörld 你好 🙂\ttab",
                                                      "name": "ann"},
     {"role": "assistant", "content": "</s> <s> not special here?"}, {"role": "user", "content": ""},
     {"role": "user", "content": "\"quotes\" and \\ backslash \u2028 and {{ not code }}"}],
]


def _export(llama: dict, root: Path, template: str, where: str = "chat_template.jinja") -> Path:
    """A copy of the tiny Llama export (served as ``export``) whose chat template is ``template``, written in
    ``chat_template.jinja`` or in ``tokenizer_config.json``'s ``"chat_template"``."""
    copy = root / "export"
    shutil.copytree(llama["onnx"], copy)
    for old in copy.glob("chat_template.*"):
        old.unlink()
    config_path = copy / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("chat_template", None)
    if where == "chat_template.jinja":
        (copy / "chat_template.jinja").write_text(template)
    else:
        config["chat_template"] = template
    config_path.write_text(json.dumps(config))
    return copy


def _renderer(tokenizer, timeout_s: float = 30.0, memory_mb: int = 256, workers: int = 1) -> ChatTemplateRenderer:
    return ChatTemplateRenderer(lambda: tokenizer, source="chat_template.jinja", timeout_s=timeout_s,
                                memory_mb=memory_mb, workers=workers)


def _gone(pid: int) -> bool:
    """Whether process ``pid`` no longer runs (reaped, or a zombie: it uses no CPU)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    if int(stat.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (FileNotFoundError, ProcessLookupError, ValueError):
                continue
    return found


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return bank("llama", tmp_path_factory)


@pytest.fixture(scope="module")
def tokenizer(llama):
    return load_saved_tokenizer(llama["onnx"])


# ---- the same text as apply_chat_template -------------------------------------------------------------------


@pytest.mark.parametrize("template", [CHAT_TEMPLATE, RICH_TEMPLATE, "named"], ids=["plain", "rich", "named"])
def test_a_normal_template_renders_as_apply_chat_template(tokenizer, template):
    import copy

    tok = copy.deepcopy(tokenizer)
    # "named": several templates by name, as some models ship them; apply_chat_template takes "default"
    tok.chat_template = {"default": RICH_TEMPLATE, "other": "x"} if template == "named" else template
    renderer = _renderer(tok)
    try:
        for messages in CONVERSATIONS:
            expected = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            assert renderer.render_sync(messages, max_chars=10**6) == expected
        assert len(renderer.pids()) == 1  # one worker, reused
    finally:
        renderer.close()


# ---- each render bounded --------------------------------------------------------------------------------------


def test_a_render_past_its_bounds_is_stopped_and_its_worker_killed(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = TRIGGERED
    renderer = _renderer(tok, timeout_s=0.5, memory_mb=64)
    ok = [{"role": "user", "content": "hi"}]
    try:
        expected = tok.apply_chat_template(ok, add_generation_prompt=True, tokenize=False)
        assert renderer.render_sync(ok, 10**6) == expected  # the worker is up
        [pid] = renderer.pids()
        started = time.perf_counter()
        with pytest.raises(ChatTemplateLimitError) as caught:
            renderer.render_sync([{"role": "user", "content": "loop"}], 10**6)
        took = time.perf_counter() - started
        assert caught.value.bound == "time" and 0.5 <= took < 3.0, took
        for words in ("chat_template.jinja", "0.5 s", "--chat-template-timeout-s", "stopped"):
            assert words in str(caught.value)
        assert _gone(pid)  # killed: its CPU is free
        with pytest.raises(ChatTemplateLimitError) as caught:  # 'x' * 10**9 in 64 MiB: MemoryError in the worker
            renderer.render_sync([{"role": "user", "content": "memory"}], 10**6)
        assert caught.value.bound == "memory" and "--chat-template-memory-mb" in str(caught.value)
        with pytest.raises(RenderedTooLongError) as too_long:
            renderer.render_sync([{"role": "user", "content": "long"}], 4000)
        assert too_long.value.chars > 5000
        with pytest.raises(ChatTemplateRenderError, match="no fail"):
            renderer.render_sync([{"role": "user", "content": "fail"}], 10**6)
        assert renderer.render_sync(ok, 10**6) == expected  # a fresh worker took over
        # a render in flight when the renderer closes (the server stops) ends at once
        renderer.timeout_s = 60
        outcome = []

        def render() -> None:
            try:
                renderer.render_sync([{"role": "user", "content": "loop"}], 10**6)
            except Exception as exc:  # noqa: BLE001 - the test looks at it
                outcome.append(exc)

        thread = threading.Thread(target=render)
        thread.start()
        time.sleep(0.5)
        started = time.perf_counter()
        renderer.close()
        thread.join(timeout=10)
        assert not thread.is_alive() and time.perf_counter() - started < 3
        assert isinstance(outcome[0], ServerBusyError) and "shutting down" in str(outcome[0])
        with pytest.raises(ServerBusyError):
            renderer.render_sync(ok, 10**6)
        renderer.reopen()  # a server started again
        assert renderer.render_sync(ok, 10**6) == expected
    finally:
        renderer.close()


def test_options_bound_the_renders():
    for field, value in (("chat_template_timeout_s", 0), ("chat_template_memory_mb", 1),
                         ("chat_template_workers", 0), ("shutdown_timeout_s", -1)):
        with pytest.raises(ServingError, match=field):
            ServeOptions().replace(**{field: value})


def test_a_looping_render_gets_a_400_while_other_tenants_are_answered(llama, tmp_path):
    from bca_deploy.serving.http import ServerThread, build

    export = _export(llama, tmp_path, TRIGGERED)
    app = build(export, options=ServeOptions(threads=1, max_wait_ms=2, chat_template_timeout_s=1.0))
    answers: dict[str, tuple] = {}

    def chat(content: str) -> None:
        started = time.perf_counter()
        status, body = call(server.url + "/v1/chat/completions", "POST",
                            {"model": "export", "messages": [{"role": "user", "content": content}], "max_tokens": 2})
        answers[content] = (status, body, time.perf_counter() - started, time.perf_counter())

    with ServerThread(app) as server:
        chat("hi")
        assert answers["hi"][0] == 200, answers["hi"]
        looping = threading.Thread(target=chat, args=("loop",))
        looping.start()
        time.sleep(0.2)
        # another tenant meanwhile: answered at once, not after the looping render
        started = time.perf_counter()
        status, body = call(server.url + "/v1/completions", "POST", {"model": "a0", "prompt": "the day",
                                                                    "max_tokens": 2})
        other_done = time.perf_counter()
        assert status == 200, body
        looping.join(timeout=30)
        status, body, took, done = answers["loop"]
        assert_error(status, body, 400, "chat_template_limit_exceeded",
                     words=("chat_template.jinja", "--chat-template-timeout-s"))
        assert body["error"]["param"] == "messages"
        assert 1.0 <= took < 4.0, took
        assert other_done < done and other_done - started < 1.0
        chat("hi again")  # the next chat request renders in a fresh worker
        assert answers["hi again"][0] == 200, answers["hi again"]


def test_one_tenants_slow_renders_do_not_hold_another_tenants_chat(llama, tmp_path):
    # the render workers are shared by every tenant (adapters carry no template: the export's tokenizer has one):
    # two concurrent chats of adapter a0 whose messages make the template loop held both workers, so a1's chat waited
    # for one of them to be stopped at --chat-template-timeout-s (or got a 503); one tenant holds all but one now
    from bca_deploy.serving.http import ServerThread, build

    export = _export(llama, tmp_path, TRIGGERED)
    # 6 s: a1's chat starts the second worker process meanwhile, which took over 3 s under CI's load (ci110)
    app = build(export, options=ServeOptions(threads=1, max_wait_ms=2, chat_template_timeout_s=6.0,
                                             chat_template_workers=2))
    answers: dict[str, tuple] = {}

    def chat(key: str, model: str, content: str) -> None:
        status, body = call(server.url + "/v1/chat/completions", "POST",
                            {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 2})
        answers[key] = (status, body, time.perf_counter())

    with ServerThread(app) as server:
        chat("warm", "a1", "hi")  # both tenants' first renders in a warm worker
        assert answers["warm"][0] == 200, answers["warm"]
        looping = [threading.Thread(target=chat, args=(f"loop{i}", "a0", "loop")) for i in range(2)]
        for thread in looping:
            thread.start()
        time.sleep(0.3)
        chat("other", "a1", "hi")  # the other tenant, meanwhile
        for thread in looping:
            thread.join(timeout=60)
        status, body, other_done = answers["other"]
        assert status == 200, body
        # a0's first render took one worker and was stopped (400); its second waited for a0's turn: the 400 of its
        # own render, or a 503 naming a0 when that turn did not come within the bound
        outcomes = sorted((answers[f"loop{i}"][0], answers[f"loop{i}"][1]["error"]["type"]) for i in range(2))
        assert outcomes[0] == (400, "chat_template_limit_exceeded"), outcomes
        assert outcomes[1] in ((400, "chat_template_limit_exceeded"), (503, "server_busy")), outcomes
        # answered while a0's renders ran
        assert all(other_done < answers[f"loop{i}"][2] for i in range(2)), (
            other_done, [answers[f"loop{i}"][2] for i in range(2)])


# ---- start-up ---------------------------------------------------------------------------------------------------


def test_serve_refuses_to_start_with_a_template_that_does_not_finish(llama, tmp_path):
    export = _export(llama, tmp_path, LOOP + "x")
    command = [sys.executable, "-m", "bca_deploy.cli", "serve", str(export), "--port", str(free_port()),
               "--threads", "1", "--chat-template-timeout-s", "1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    try:
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:  # serving (the template unchecked): not refused
            process.kill()
            process.communicate()
    assert process.returncode == 2, err[-2000:]
    assert "chat_template.jinja" in err and "--chat-template-timeout-s" in err and "one-message" in err, err
    assert "Traceback" not in err and "serving" not in err, err


def test_build_refuses_a_template_in_tokenizer_config_that_blows_up(llama, tmp_path):
    from bca_deploy.serving.http import build

    export = _export(llama, tmp_path, "{{ 'x' * 10**9 }}", where="tokenizer_config.json")
    with pytest.raises(ServingError) as caught:
        build(export, options=ServeOptions(threads=1, chat_template_memory_mb=64))
    assert "tokenizer_config.json" in str(caught.value) and "--chat-template-memory-mb" in str(caught.value)


def test_an_app_made_by_create_app_alone_runs_the_start_up_checks_as_it_starts(llama, tmp_path, capfd):
    # the library path (create_app on a session, served by the embedding program's uvicorn) skipped the start-up
    # render that build() and serve run: a looping template was found by every chat request instead
    from starlette.testclient import TestClient

    from bca_deploy.serving import MultiAdapterSession
    from bca_deploy.serving.http import ServerThread, create_app

    export = _export(llama, tmp_path, LOOP + "x")
    for start in ("uvicorn", "testclient"):
        app = create_app(MultiAdapterSession(export, intra_op_threads=1),
                         options=ServeOptions(threads=1, chat_template_timeout_s=1.0))
        with pytest.raises(ServingError) as caught:
            if start == "uvicorn":
                with ServerThread(app):
                    pass
            else:
                with TestClient(app):
                    pass
        assert "chat_template.jinja" in str(caught.value) and "one-message" in str(caught.value), caught.value
        assert not app.state.server.chat_templates.pids()  # its workers stopped
    # uvicorn said why on one line, not with a traceback
    logged = capfd.readouterr().err
    assert "Error: the chat template in chat_template.jinja did not finish" in logged, logged
    assert "Traceback" not in logged, logged
    # a template that renders: the app starts and answers, the checks run once
    app = create_app(MultiAdapterSession(_export(llama, tmp_path / "ok", CHAT_TEMPLATE), intra_op_threads=1),
                     options=ServeOptions(threads=1, max_wait_ms=2))
    with ServerThread(app) as server:
        assert app.state.server.checked
        status, body = call(server.url + "/v1/chat/completions", "POST",
                            {"model": "export", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert status == 200, body


# ---- stopping -------------------------------------------------------------------------------------------------


def test_sigterm_stops_serve_within_seconds_during_a_stuck_render(llama, tmp_path):
    export = _export(llama, tmp_path, TRIGGERED)
    with ServeProcess(export, "--chat-template-timeout-s", "300", log=tmp_path / "serve.log") as server:
        answer: list = []
        stuck = threading.Thread(target=lambda: answer.append(call(
            server.url + "/v1/chat/completions", "POST",
            {"model": "export", "messages": [{"role": "user", "content": "loop"}], "max_tokens": 2})))
        stuck.start()
        time.sleep(1.5)  # the render is in its worker, looping
        workers = _children(server.process.pid)
        assert workers, "no chat template worker"
        started = time.perf_counter()
        server.process.send_signal(signal.SIGTERM)
        try:
            code = server.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pytest.fail("serve was still running 20 s after SIGTERM")
        took = time.perf_counter() - started
        stuck.join(timeout=10)
    assert took < 5.0, took
    assert code == -signal.SIGTERM, code  # uvicorn's way: the signal again, once the shutdown is done
    assert answer and answer[0][0] == 503, answer  # the stuck render's request: told the server is stopping
    deadline = time.monotonic() + 5
    while not all(_gone(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(_gone(pid) for pid in workers), workers  # no worker left burning a CPU


_STUCK_THREAD = """
import sys, time
from bca_deploy.serving.session import MultiAdapterSession

text_ids = MultiAdapterSession.text_ids

def stuck(self, text, **options):
    if "stuck" in text:  # a tokenization that never ends: any thread's work that does not end
        time.sleep(3600)
    return text_ids(self, text, **options)

MultiAdapterSession.text_ids = stuck
from bca_deploy.cli import main
main(sys.argv[1:], prog_name="bca-deploy")
"""


def test_sigint_exits_even_with_work_stuck_in_a_thread(llama, tmp_path):
    """Python waits at exit for every worker thread: past --shutdown-timeout-s and a few seconds, serve exits."""
    from bca_deploy.serving.http import EXIT_GRACE_S

    port = free_port()
    log = tmp_path / "serve.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-c", _STUCK_THREAD, "serve", str(llama["onnx"]), "--port",
                                    str(port), "--threads", "1", "--shutdown-timeout-s", "0.5"],
                                   stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 120
            while True:
                assert process.poll() is None, log.read_text()
                try:
                    if call(url + "/health", timeout=2)[0] == 200:
                        break
                except OSError:
                    pass
                assert time.monotonic() < deadline, "serve did not start"
                time.sleep(0.2)
            threading.Thread(target=call, args=(url + "/v1/chat/completions", "POST", {
                "model": "onnx", "messages": [{"role": "user", "content": "stuck"}], "max_tokens": 2}),
                kwargs={"timeout": 60}, daemon=True).start()
            time.sleep(1.0)
            started = time.perf_counter()
            process.send_signal(signal.SIGINT)
            try:
                code = process.wait(timeout=0.5 + EXIT_GRACE_S + 15)
            except subprocess.TimeoutExpired:
                pytest.fail("serve was still running after SIGINT, its work stuck in a thread")
            took = time.perf_counter() - started
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)
    text = log.read_text(errors="replace")
    assert code == 130, (code, text[-2000:])
    assert took < 0.5 + EXIT_GRACE_S + 5, took
    assert "still stopping" in text and "Traceback" not in text, text[-2000:]
