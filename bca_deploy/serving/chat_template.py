"""Chat templates rendered in worker processes, each render bounded in time, memory and output size.

A chat template is Jinja code that ships with the model (``chat_template.jinja``, or ``tokenizer_config.json``'s
``"chat_template"``). Jinja's sandbox stops it from reaching Python's internals, not from running for ever:
``{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}`` is 10^10 iterations, a macro
can recurse, ``'x' * 10**9`` allocates a gigabyte in one C call, and a template can be fine on short conversations
and quadratic on a long one. Rendered in a server thread, such a template burned a CPU for ever on every
``/v1/chat/completions`` request, and SIGTERM could not stop the server (its shutdown waited for the thread).

A thread cannot be stopped from outside, and neither a deadline checked in Jinja's loops nor an asynchronous
exception (``PyThreadState_SetAsyncExc``) interrupts one long C call (a big ``str * int`` or ``**``, Jinja folding
such a constant while it compiles). A process can be killed, and its memory capped. So :class:`ChatTemplateRenderer`
renders in a few worker processes (``python -I``, started on first use, ~60 MB each): each holds a pickled copy of
the server's tokenizer and makes the very call the server made before, ``tokenizer.apply_chat_template(messages,
add_generation_prompt=True, tokenize=False)`` (with a request's ``continue_final_message`` and template variables,
vLLM's ``chat_template_kwargs``, when it sends them), so the text is the same, byte for byte, on any transformers
version.
A render past ``timeout_s`` is answered :class:`ChatTemplateLimitError` and its worker is killed (SIGKILL: its CPU
is free at once) and replaced; a worker's address space is capped at what it maps when ready plus ``memory_mb``
(``RLIMIT_AS``: an allocation past it raises ``MemoryError`` there, not in the server); a text longer than the
caller's ``max_chars`` is refused there, before it is sent back. A worker also ends itself (``SIGALRM``) should its
server not kill it in time, and exits when its pipe closes. Messages go to a worker as JSON and the text comes back
as JSON: nothing a template does can hand the server a pickle.

A normal template renders in ~0.1-0.2 ms through a worker (two pipe hops and a thread hop) where it took ~0.05 ms
in-process.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import json
import os
import pickle
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import ServingError

__all__ = ["ChatTemplateRenderer", "ChatTemplateLimitError", "ChatTemplateRenderError", "RenderedTooLongError",
           "chat_template_source", "template_kwargs_problems", "CHECK_MESSAGES", "CHAT_TOKENIZE_OPTIONS",
           "MAX_TEMPLATE_KWARGS_BYTES"]

#: How a rendered conversation is tokenized (serve's chat prompts, training's conversations): the template writes the
#: special tokens (BOS, role markers) as text, so none are added again, as ``apply_chat_template(tokenize=True)`` does.
CHAT_TOKENIZE_OPTIONS: dict[str, Any] = {"add_special_tokens": False}

#: The most bytes a request's template variables (``chat_template_kwargs``, as compact JSON) may hold: a flag such as
#: ``{"enable_thinking": false}`` is 25; each render sends them to a worker process.
MAX_TEMPLATE_KWARGS_BYTES = 65536

#: Names a request's template variables may not take, and why: the arguments of ``apply_chat_template`` and of the
#: ``render_jinja_template`` it passes them on to (the render's, set by the server or by the request's own fields;
#: ``self`` and ``conversations`` too: given as template variables, they made the render's call a ``TypeError``,
#: answered as the template refusing the messages) and ``messages`` (the conversation the template reads). vLLM
#: refuses ``chat_template`` and ``tokenize`` there, and versions of it disagree on which of ``add_generation_prompt``
#: given both ways wins, so each is refused naming it rather than read one way. Arguments a newer transformers adds
#: are refused too (:func:`template_kwargs_problems` reads the signatures).
_RESERVED_TEMPLATE_KWARGS = {
    "messages": "the conversation is the request's messages",
    "conversation": "the conversation is the request's messages",
    "conversations": "the conversation is the request's messages",
    "self": "the name of the tokenizer in the render's own call",
    "add_generation_prompt": 'send "add_generation_prompt" as a field of the request',
    "continue_final_message": 'send "continue_final_message" as a field of the request',
    "documents": 'send "documents" as a field of the request',
    "chat_template": "a chat template sent with a request is not accepted (see chat_template)",
    "tools": 'send "tools" as a field of the request',
}

#: The conversation ``serve`` renders once at start (under the same bounds) before it takes requests.
CHECK_MESSAGES = ({"role": "user", "content": "Hello"},)

#: Seconds a new worker process has to import transformers and load its tokenizer copy (a loaded machine: seconds).
START_TIMEOUT_S = 120.0

# A worker's environment: no torch (transformers 4.x imports it when installed: 3 s and 230 MB more per worker, and a
# template never needs it), one BLAS/OpenMP thread (their pools reserve address space, which RLIMIT_AS counts),
# transformers quiet, nothing fetched.
_WORKER_ENV = {"USE_TORCH": "0", "USE_TF": "0", "USE_FLAX": "0", "TRANSFORMERS_VERBOSITY": "error",
               "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
               "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

# ``python -I -c _BOOT REQUEST_FD REPLY_FD``: isolated (neither the current directory nor PYTHONPATH on sys.path: a
# ``jinja2.py`` where the server was started is not imported), then the server's own sys.path, sent first.
_BOOT = ("import sys,json\n"
         "from multiprocessing.connection import Connection\n"
         "i=Connection(int(sys.argv[1]),writable=False);o=Connection(int(sys.argv[2]),readable=False)\n"
         "try:\n"
         " sys.path[:]=json.loads(i.recv_bytes())\n"
         "except (EOFError,OSError):\n"
         " sys.exit(0)\n"  # its server went away while it started: nothing to say
         "from bca_deploy.serving.chat_template import _worker_main\n"
         "_worker_main(i,o)\n")


class ChatTemplateLimitError(ServingError):
    """The chat template did not render a request's messages within the server's bounds (``bound``: ``"time"`` or
    ``"memory"``). A 400, which clients do not retry (the same messages would be stopped again), as vLLM answers
    a template that fails on a request's messages."""

    def __init__(self, message: str, bound: str, param: str | None = "messages") -> None:
        super().__init__(message)
        self.bound = bound
        self.param = param


class ChatTemplateRenderError(ServingError):
    """The chat template raised on a request's messages (``raise_exception``, a role it does not take, ...);
    ``why``: its message, or the exception's type."""

    def __init__(self, why: str) -> None:
        super().__init__(f"the chat template refused them ({why})")
        self.why = why


class RenderedTooLongError(ServingError):
    """The rendered text is longer than the ``max_chars`` asked for (``chars``: its length); it was not sent back."""

    def __init__(self, chars: int) -> None:
        super().__init__(f"the chat template rendered {chars:,} characters")
        self.chars = chars


def template_kwargs_problems(kwargs: dict[str, Any], field: str = "chat_template_kwargs") -> list[str]:
    """What is wrong with a request's template variables (vLLM's ``chat_template_kwargs``: passed to the template as
    ``apply_chat_template(..., **kwargs)`` passes them), each naming ``field`` and the key: more than
    :data:`MAX_TEMPLATE_KWARGS_BYTES` as JSON, or a key that is an argument of the render itself (``messages``,
    ``tokenize``, ``add_generation_prompt``, ``chat_template``... see :data:`_RESERVED_TEMPLATE_KWARGS`)."""
    size = len(json.dumps(kwargs, separators=(",", ":"), ensure_ascii=False).encode())
    if size > MAX_TEMPLATE_KWARGS_BYTES:
        return [f"{field}: {size:,} bytes as JSON; at most {MAX_TEMPLATE_KWARGS_BYTES:,} are taken (template "
                "variables such as enable_thinking are a few bytes)"]
    reserved = _render_arguments()
    problems = []
    for key in kwargs:
        if key in reserved:
            why = _RESERVED_TEMPLATE_KWARGS.get(key, "the server sets it: the template renders text, which the server "
                                                     "tokenizes")
            problems.append(f"{field}: {key!r} is an argument of the chat template render, not a template variable "
                            f"({why})")
    return problems


@functools.cache
def _render_arguments() -> frozenset[str]:
    """:data:`_RESERVED_TEMPLATE_KWARGS` and every named argument of the installed transformers'
    ``apply_chat_template`` (``tokenize``, ``return_dict``, ``tokenizer_kwargs``...) and of the
    ``render_jinja_template`` it hands the template variables to (``conversations``...): a variable of one of those
    names is a second value for that argument (``TypeError``), whatever the template."""
    import importlib
    import inspect

    names = set(_RESERVED_TEMPLATE_KWARGS) | {"tokenize", "padding", "truncation", "max_length", "return_tensors",
                                              "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"}
    for module, owner, function in (("transformers.tokenization_utils_base", "PreTrainedTokenizerBase",
                                      "apply_chat_template"),
                                     ("transformers.utils.chat_template_utils", None, "render_jinja_template")):
        try:
            found = importlib.import_module(module)
            found = getattr(getattr(found, owner) if owner else found, function)
            names |= {p.name for p in inspect.signature(found).parameters.values()
                      if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        except (ImportError, AttributeError, TypeError, ValueError):  # the names above, then
            continue
    return frozenset(names)


class _WorkerGone(Exception):
    """The worker process ended without answering (killed, crashed)."""


def chat_template_source(export_dir: str | Path | None) -> str:
    """Where the export's chat template is written, for messages: the file transformers reads it from."""
    if export_dir is not None:
        for name in ("chat_template.jinja", "chat_template.json"):
            if (Path(export_dir) / name).is_file():
                return name
    return "tokenizer_config.json's \"chat_template\""


class _Worker:
    """One worker process and its two pipes; used by one thread at a time (killed from any)."""

    def __init__(self, boot: bytes, init: bytes) -> None:
        from multiprocessing.connection import Connection

        request_r, request_w = os.pipe()
        reply_r, reply_w = os.pipe()
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-I", "-c", _BOOT, str(request_r), str(reply_w)], pass_fds=(request_r, reply_w),
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env={**os.environ, **_WORKER_ENV},
                # a session of its own: a terminal's Ctrl-C reaches the server, which stops its workers itself
                start_new_session=True)
        except BaseException:
            for fd in (request_r, request_w, reply_r, reply_w):
                os.close(fd)
            raise
        os.close(request_r)
        os.close(reply_w)
        self._to = Connection(request_w, readable=False)
        self._from = Connection(reply_r, writable=False)
        try:
            try:
                self._to.send_bytes(boot)
                self._to.send_bytes(init)
            except OSError as exc:  # BrokenPipeError: it exited before reading them
                raise _WorkerGone() from exc
            reply = self._receive(START_TIMEOUT_S)
        except _WorkerGone:
            self.close()
            raise ServingError(f"the chat template worker process exited as it started (exit status "
                               f"{self.process.returncode}; its error is in the server's log)") from None
        except BaseException:
            self.close()
            raise
        if reply is None or "ready" not in reply:
            self.close()
            raise ServingError(f"the chat template worker process did not start within {START_TIMEOUT_S:.0f} s"
                               if reply is None else
                               f"the chat template worker process could not start: {reply.get('failed', reply)}")

    def _receive(self, timeout: float) -> dict[str, Any] | None:
        """The worker's next reply; None when none came within ``timeout``."""
        try:
            if not self._from.poll(timeout):
                return None
            return json.loads(self._from.recv_bytes())
        except (EOFError, OSError) as exc:
            raise _WorkerGone() from exc

    def call(self, request: bytes, timeout: float) -> dict[str, Any] | None:
        """Send one request; its reply, or None when none came within ``timeout``."""
        try:
            self._to.send_bytes(request)
        except OSError as exc:  # BrokenPipeError: it is gone
            raise _WorkerGone() from exc
        return self._receive(timeout)

    def kill(self) -> None:
        """SIGKILL it (from any thread: the one using it sees its pipe close)."""
        if self.process.poll() is None:
            try:
                self.process.kill()
            except OSError:
                pass

    def close(self) -> None:
        """Kill it, reap it, close its pipes."""
        self.kill()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        for conn in (self._to, self._from):
            try:
                conn.close()
            except OSError:
                pass


def _finished(slots: asyncio.Semaphore, release_tenant: Callable[[], None], future: asyncio.Future) -> None:
    slots.release()
    release_tenant()
    if not future.cancelled():
        future.exception()  # read: a render whose client went away leaves no "exception never retrieved" log


def _kill_all(workers: set[_Worker]) -> None:
    for worker in list(workers):
        worker.kill()


class ChatTemplateRenderer:
    """A tokenizer's chat template, rendered in up to ``workers`` worker processes (see the module docstring).

    ``tokenizer``: a callable giving the tokenizer (called once, when the first worker starts); ``source``: where its
    template is written (for messages); ``timeout_s`` / ``memory_mb``: the bounds of one render. :meth:`render` (async,
    for requests) waits at most ``timeout_s`` for a free worker (then 503, as a full queue is answered) and renders in
    a thread of the renderer's own, so waiting renders never hold the threads other requests' work runs in.

    The workers are shared by every tenant (the adapter a request names; adapters carry no template of their own:
    the export's tokenizer has the one template), and one tenant's messages can make the template slow (one that
    grows fast with the conversation) up to ``timeout_s`` per render. So one tenant's renders hold at most
    :attr:`per_tenant` workers at once (``workers - 1``; 1 with one worker), the others waiting for their tenant's
    turn (503 past ``timeout_s``): with two workers or more, one tenant's slow renders cannot make another's wait.
    :meth:`render_sync` blocks (the start-up :meth:`check`). :meth:`close` kills every worker at once, renders in
    flight included: they end with a 503 saying the server is shutting down.
    """

    def __init__(self, tokenizer: Callable[[], Any], *, source: str, timeout_s: float, memory_mb: int,
                 workers: int) -> None:
        self._tokenizer = tokenizer
        self.source = source
        self.timeout_s = float(timeout_s)
        self.memory_mb = int(memory_mb)
        self.workers = int(workers)
        #: Workers one tenant's renders may hold at once: one is always left to the other tenants.
        self.per_tenant = max(1, self.workers - 1)
        self._tenants: dict[Any, list] = {}  # tenant -> [its asyncio.Semaphore, renders holding or waiting for it]
        self._cond = threading.Condition()
        self._idle: list[_Worker] = []
        self._all: set[_Worker] = set()
        self._alive = 0  # workers started or starting
        self._closed = False
        self._init: bytes | None = None
        self._boot = json.dumps(sys.path).encode()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._slots: tuple[asyncio.AbstractEventLoop, asyncio.Semaphore] | None = None
        self._finalizer = weakref.finalize(self, _kill_all, self._all)  # garbage collected, or the interpreter exits
        self.renders = 0  # renders answered
        self.stopped = 0  # renders stopped at a bound (their worker killed)

    # ---- requests ----
    async def render(self, messages: Sequence[dict[str, Any]], max_chars: int,
                     then: Callable[[str], Any] | None = None, tenant: Any = None, *,
                     add_generation_prompt: bool = True, continue_final_message: bool = False,
                     template_kwargs: dict[str, Any] | None = None) -> Any:
        """``messages`` through the template, with the generation prompt unless ``add_generation_prompt`` is false (see
        :meth:`render_sync` for errors and the other arguments); ``then(text)`` instead when given, called in the same
        thread (one thread hop for both: tokenizing it). ``tenant``: whose render it is (the adapter; None: the base
        model), held to :attr:`per_tenant` workers.

        Raises also :class:`~bca_deploy.serving.wire.ServerBusyError` when no worker is free for it within
        ``timeout_s``.
        """
        from .wire import ServerBusyError

        loop = asyncio.get_running_loop()
        if self._slots is None or self._slots[0] is not loop:
            self._slots = (loop, asyncio.Semaphore(self.workers))
            self._tenants = {}
        slots = self._slots[1]
        deadline = loop.time() + self.timeout_s
        gate = self._tenants.setdefault(tenant, [asyncio.Semaphore(self.per_tenant), 0])
        gate[1] += 1
        acquired = False

        def release_tenant() -> None:
            if acquired:
                gate[0].release()
            gate[1] -= 1
            if not gate[1] and self._tenants.get(tenant) is gate:
                del self._tenants[tenant]  # a bounded table: only tenants with renders running or waiting

        try:
            try:
                await asyncio.wait_for(gate[0].acquire(), self.timeout_s)
                acquired = True
            except asyncio.TimeoutError:
                whose = "the base model's" if tenant is None else f"adapter {tenant!r}'s"
                raise ServerBusyError(f"{whose} chat requests held the {self.per_tenant} of the {self.workers} chat "
                                      f"template workers one adapter may hold (the rest are kept for other adapters; "
                                      f"--chat-template-workers) for {self.timeout_s:g} s; retry in a moment") from None
            try:
                await asyncio.wait_for(slots.acquire(), max(deadline - loop.time(), 0.0))
            except asyncio.TimeoutError:
                raise ServerBusyError(f"every chat template worker ({self.workers}, --chat-template-workers) stayed "
                                      f"busy for {self.timeout_s:g} s; retry in a moment") from None
        except BaseException:
            release_tenant()
            raise
        try:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(self.workers,
                                                                       thread_name_prefix="bca-chat-template")
            render = functools.partial(self.render_sync, messages, max_chars, add_generation_prompt,
                                       continue_final_message, template_kwargs)
            future = loop.run_in_executor(self._executor, self._render_then, render, then)
        except BaseException:
            slots.release()
            release_tenant()
            raise
        # when it ends, not when its client goes
        future.add_done_callback(functools.partial(_finished, slots, release_tenant))
        return await asyncio.shield(future)

    @staticmethod
    def _render_then(render: Callable[[], str], then: Callable[[str], Any] | None):
        text = render()
        return text if then is None else then(text)

    # ---- blocking ----
    def render_sync(self, messages: Sequence[dict[str, Any]], max_chars: int,
                    add_generation_prompt: bool = True, continue_final_message: bool = False,
                    template_kwargs: dict[str, Any] | None = None) -> str:
        """``messages`` through the template, as ``tokenizer.apply_chat_template(messages,
        add_generation_prompt=add_generation_prompt, tokenize=False, **template_kwargs)`` renders them (with
        ``continue_final_message=True`` when asked: the last message left open, for the model to continue), in a
        worker process (training renders conversations without the generation prompt too, to find the assistant
        turns' spans). ``template_kwargs``: JSON values (a request's ``chat_template_kwargs`` and ``documents``,
        checked by :func:`template_kwargs_problems`).

        Raises:
            ChatTemplateLimitError: not done within ``timeout_s``, or over ``memory_mb`` (the worker was stopped).
            ChatTemplateRenderError: the template raised (its message, or the exception's type).
            RenderedTooLongError: the text is longer than ``max_chars`` (its length is given).
            ServerBusyError: the renderer was closed (the server is stopping).
            ServingError: a worker could not start, or died while rendering.
        """
        ask: dict[str, Any] = {"messages": list(messages), "max_chars": int(max_chars),
                               "add_generation_prompt": bool(add_generation_prompt)}
        if continue_final_message:
            ask["continue_final_message"] = True
        if template_kwargs:
            ask["kwargs"] = template_kwargs
        request = json.dumps(ask).encode()
        worker = self._take()
        started = time.perf_counter()
        keep = False
        try:
            try:
                reply = worker.call(request, self.timeout_s)
            except _WorkerGone:
                self._raise_if_closed()
                worker.close()
                raise ServingError(f"the chat template's worker process died while rendering these messages (exit "
                                   f"status {worker.process.returncode}); the server's operator should check the "
                                   f"chat template ({self.source})") from None
            if reply is None:  # past the bound: killed (by _give_back), so the CPU it burns is free now
                self.stopped += 1
                self._raise_if_closed()
                raise ChatTemplateLimitError(
                    f"messages: the model's chat template ({self.source}) did not finish rendering these messages "
                    f"within {self.timeout_s:g} s (--chat-template-timeout-s) and was stopped; the template loops "
                    "or grows too fast on them, and the server's operator should check it", "time")
            self.renders += 1
            keep = "recycle" not in reply
            if "text" in reply:
                return reply["text"]
            if "too_long" in reply:
                raise RenderedTooLongError(int(reply["too_long"]))
            if "memory" in reply:
                self.stopped += 1
                raise ChatTemplateLimitError(
                    f"messages: the model's chat template ({self.source}) needed more than {self.memory_mb} MiB "
                    f"to render these messages (--chat-template-memory-mb) and was stopped after "
                    f"{time.perf_counter() - started:.2f} s; the server's operator should check it", "memory")
            raise ChatTemplateRenderError(str(reply.get("error", "?")))
        finally:
            self._give_back(worker, keep)

    def check(self) -> None:
        """Render :data:`CHECK_MESSAGES` once under the bounds (start-up); raises :class:`ServingError` saying
        why the template cannot serve chat requests, naming the file it is written in."""
        try:
            self.render_sync(CHECK_MESSAGES, max_chars=1 << 62)
        except ChatTemplateLimitError as exc:
            if exc.bound == "time":
                what, flag = f"did not finish within {self.timeout_s:g} s", "--chat-template-timeout-s"
            else:
                what, flag = f"needed more than {self.memory_mb} MiB", "--chat-template-memory-mb"
            raise ServingError(
                f"the chat template in {self.source} {what} ({flag}) rendering a one-message conversation, so every "
                f"chat request would be stopped the same way: fix the template in {self.source} (or raise {flag} "
                "if it is only slow)") from None
        except ChatTemplateRenderError as exc:
            raise ServingError(f"the chat template in {self.source} fails on a one-message conversation "
                               f"({exc.why}): fix the template in {self.source}") from None
        except ServingError as exc:
            raise ServingError(f"the chat template in {self.source} cannot be checked: {exc}") from None

    def reopen(self) -> None:
        """Take renders again after :meth:`close` (a server started again); workers start on first use."""
        with self._cond:
            self._closed = False
        self._executor = None

    def close(self) -> None:
        """Kill every worker now (renders in flight end with a 503); renders asked for later are refused so."""
        with self._cond:
            self._closed = True
            busy = [w for w in self._all if w not in self._idle]  # their renders' threads close them
            idle, self._idle = self._idle, []
            self._all.difference_update(idle)
            self._alive -= len(idle)
            self._cond.notify_all()
        for worker in busy:
            worker.kill()
        for worker in idle:
            worker.close()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def pids(self) -> list[int]:
        """The worker processes' ids (tests)."""
        with self._cond:
            return [w.process.pid for w in self._all]

    # ---- workers ----
    def _raise_if_closed(self) -> None:
        if self._closed:
            from .wire import ServerBusyError

            raise ServerBusyError("the server is shutting down; this request's chat template render was stopped")

    def _take(self) -> _Worker:
        with self._cond:
            while True:
                self._raise_if_closed()
                if self._idle:
                    return self._idle.pop()
                if self._alive < self.workers:
                    self._alive += 1
                    break
                self._cond.wait()  # short: render()'s slots admit at most `workers` renders, one per worker
        try:
            worker = _Worker(self._boot, self._init_blob())
        except BaseException:
            with self._cond:
                self._alive -= 1
                self._cond.notify()
            raise
        with self._cond:
            self._all.add(worker)
            closed = self._closed
        if closed:
            self._give_back(worker, False)
            self._raise_if_closed()
        return worker

    def _give_back(self, worker: _Worker, keep: bool) -> None:
        with self._cond:
            if keep and not self._closed:
                self._idle.append(worker)
                self._cond.notify()
                return
            self._all.discard(worker)
            self._alive -= 1
            self._cond.notify()
            replace = not self._closed
        worker.close()
        if replace:  # a fresh one, started now rather than in the next request's time (~1 s)
            threading.Thread(target=self._start_spare, name="bca-chat-template-start", daemon=True).start()

    def _start_spare(self) -> None:
        try:
            worker = self._take()
        except Exception:  # noqa: BLE001 - the next request starts one itself, and says why it cannot
            return
        self._give_back(worker, True)

    def _init_blob(self) -> bytes:
        with self._cond:
            if self._init is None:
                self._init = pickle.dumps({"tokenizer": pickle.dumps(self._tokenizer()),
                                           "memory_bytes": self.memory_mb << 20,
                                           "backstop_s": 2 * self.timeout_s + 5})
            return self._init


# ---- the worker process -----------------------------------------------------------------------------------------


def _worker_main(requests, replies) -> None:  # pragma: no cover - runs in the worker process
    """Render requests until the pipe closes: ``{"messages", "max_chars", "add_generation_prompt",
    "continue_final_message"?, "kwargs"?}`` in, one JSON reply out for each."""
    try:
        _serve_requests(requests, replies)
    except (EOFError, OSError):  # its server went away (or closed it) mid-message: nothing to say, no one to say it to
        pass


def _serve_requests(requests, replies) -> None:  # pragma: no cover - runs in the worker process
    import signal

    data = requests.recv_bytes()  # from the server that started this process
    try:
        init = pickle.loads(data)
        tokenizer = pickle.loads(init["tokenizer"])
        import jinja2  # noqa: F401 - imported now, not within the first render's bound

        _cap_memory(int(init["memory_bytes"]))
    except Exception as exc:  # noqa: BLE001 - said to the server, which refuses to start on it
        replies.send_bytes(json.dumps({"failed": f"{type(exc).__name__}: {str(exc)[:300]}"}).encode())
        return
    backstop = float(init["backstop_s"])
    replies.send_bytes(b'{"ready": true}')
    while True:
        request = json.loads(requests.recv_bytes())  # EOFError: the server is gone, or closed this worker
        # Should the server not kill this process in time (gone, stopped), the kernel does: SIGALRM's default action
        # ends the process, even inside one long C call.
        signal.setitimer(signal.ITIMER_REAL, backstop)
        try:
            reply = _render(tokenizer, request)
            data = json.dumps(reply).encode()
        except MemoryError:
            reply, data = {"recycle": True}, b'{"memory": true, "recycle": true}'
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        replies.send_bytes(data)
        if reply.get("recycle"):
            return


def _render(tokenizer, request: dict[str, Any]) -> dict[str, Any]:  # pragma: no cover - in the worker process
    from jinja2 import TemplateError

    kwargs = dict(request.get("kwargs") or {})
    if request.get("continue_final_message"):  # only when asked: the call is the one it always was otherwise
        kwargs["continue_final_message"] = True
    try:
        text = tokenizer.apply_chat_template(request["messages"], tokenize=False,
                                             add_generation_prompt=request.get("add_generation_prompt", True),
                                             **kwargs)
    except MemoryError:
        return {"memory": True, "recycle": True}  # whatever the template left half-built: start afresh
    except (TemplateError, ValueError) as exc:  # ValueError: transformers' (continue_final_message on a template
        return {"error": str(exc)[:300] or type(exc).__name__}  # that drops the final message...), said as it is
    except RecursionError:
        return {"error": "RecursionError"}
    except Exception as exc:  # noqa: BLE001 - the template's failure on these messages, named
        return {"error": type(exc).__name__}
    if not isinstance(text, str):
        return {"error": f"it gave {type(text).__name__}, not text"}
    if len(text) > request["max_chars"]:
        return {"too_long": len(text)}
    return {"text": text}


def _cap_memory(extra_bytes: int) -> None:  # pragma: no cover - in the worker process
    """Cap the address space at what this process maps now plus ``extra_bytes`` (past it: MemoryError)."""
    try:
        import resource
    except ImportError:  # not POSIX: the time and output bounds only
        return
    try:
        with open("/proc/self/statm") as statm:
            size = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return
    limit = size + extra_bytes
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
