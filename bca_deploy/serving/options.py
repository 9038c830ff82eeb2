"""``ServeOptions``: every setting of ``bca-deploy serve`` in one typed, validated dataclass.

The CLI builds its options from these fields (:func:`click_options`), the library takes the
dataclass (:func:`bca_deploy.serving.http.build`), and the Ray deployment forwards it: one list of
names, defaults and help texts. Validation collects every problem and reports them together.

Fields marked ``ray=False`` (:data:`NOT_ON_RAY`) set ``bca-deploy serve``'s own HTTP protocol (uvicorn's
connection handling); Ray Serve's HTTP proxy has its own, so ``serve-ray`` does not offer them and the
Ray deployment refuses them rather than ignore them.

Limits are checked before a request does any work (body bytes while it arrives, then rows, text
lengths and ``max_new_tokens`` after parsing, then the queue): a request over a limit is refused with
413 (size) or 422 (a parameter out of range) and a queue already full answers 503.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import ServingError, format_problems
from .limits import MAX_LOGPROB_ENTRIES, MAX_NEW_TOKENS, PREEMPT_WAIT_STEPS, TOOL_CALL_PARSERS

__all__ = ["ServeOptions", "click_options", "NOT_ON_RAY"]


def _opt(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True)
class ServeOptions:
    """Settings of one server: where it listens, how it batches, what it refuses, what it shows."""

    host: str = _opt("127.0.0.1", "Interface to bind (0.0.0.0 for all).")
    port: int = _opt(8000, "TCP port (1-65535).")
    provider: str = _opt("cpu", "onnxruntime execution provider.", choices=("cpu", "cuda"))
    threads: int | None = _opt(None, "onnxruntime intra-op threads (default: onnxruntime's).")
    spin: bool = _opt(True, "onnxruntime's intra-op threads spin (busy-wait) between runs, as onnxruntime does by "
                            "default: the next run starts a little sooner on a machine the server has to itself; "
                            "--no-spin: they sleep, leaving the CPU to the server's own threads and to other "
                            "processes (shared machines, CPU quotas; generation's many small runs).")
    max_batch_rows: int = _opt(64, "Most rows in one batch (requests are batched together, each row with its "
                                   "adapter; a larger request runs in several batches).")
    max_prefill_tokens: int = _opt(4096, "Generation: most padded prompt tokens (rows x longest prompt) in one "
                                         "prefill run; a longer prompt is prefilled in chunks of this size, with "
                                         "a step of the running rows between chunks. Lower bounds their token "
                                         "gaps; higher starts bursts sooner.")
    preempt: bool = _opt(True, "Generation: pre-empt (and later recompute) rows of a tenant (adapter) holding more "
                               "than its fair share of --max-batch-rows while another tenant below its share waits, "
                               "as vLLM recomputes; off: a running row is never pre-empted, and a newcomer that "
                               "finds every row busy waits until one ends.")
    preempt_wait_steps: int = _opt(PREEMPT_WAIT_STEPS, "Generation: do not pre-empt when enough rows of tenants above "
                                                       "their share end within this many decode steps anyway (a "
                                                       "short wait costs less than recomputing a row).")
    max_batch_tokens: int = _opt(2048, "Most padded tokens (rows x longest row) in one embedding/classification "
                                       "batch: bounds the memory of a batch of long texts and how long another "
                                       "request waits behind the one running (a longer row runs alone).")
    max_wait_ms: float = _opt(5.0, "How long a request waits for others to join its batch.")
    served_model_name: str | None = _opt(None, "The base model's name in the OpenAI-compatible API ('model'); "
                                               "default: the export directory's name.")
    list_adapters: bool = _opt(True, "Let clients list the loaded adapters (GET /v1/adapters, adapters in "
                                     "GET /v1/models) and see their names in GET /metrics; off: each client must "
                                     "know its adapter's name, and metrics label every adapter's requests "
                                     "'__adapter__'.")
    max_loaded_adapters: int = _opt(1024, "Most adapters loaded at once (the exported ones included); a client's load "
                                          "beyond it is answered 409 adapter_limit until one is unloaded (each loaded "
                                          "adapter holds its kernels and head in memory; vLLM: --max-cpu-loras).")
    max_labels: int = _opt(1024, "Most labels of a classifier head loaded at run time (422 above); never below the "
                                 "widest exported head's, which are always taken: every row of every adapter computes "
                                 "the widest loaded head's labels, so one wide head would slow every tenant and widen "
                                 "every answer.")
    manage_adapters: bool = _opt(True, "Let clients load and unload adapters at run time (POST /v1/adapters, "
                                       "DELETE /v1/adapters/NAME, /v1/load_lora_adapter, /v1/unload_lora_adapter); "
                                       "off: those answer 403 and the adapters loaded at start are all a client can "
                                       "use or remove (vLLM: VLLM_ALLOW_RUNTIME_LORA_UPDATING).")
    metrics: bool = _opt(True, "Serve Prometheus metrics on GET /metrics.")
    embedding_pooling: str | None = _opt(None, "Pooling of the OpenAI /v1/embeddings route. Default: the export's "
                                               "sentence-transformers pooling (1_Pooling/config.json), else mean.",
                                         choices=("mean", "cls", "last"))
    embedding_normalize: bool | None = _opt(None, "L2-normalize the vectors of the OpenAI /v1/embeddings route. "
                                                  "Default: as the export's sentence-transformers modules.json says "
                                                  "(a Normalize module), else on.")
    # ---- limits (refused before any work) ----
    max_request_rows: int = _opt(256, "Most inputs (texts, token lists, prompts) in one request (413 above).")
    max_body_bytes: int = _opt(4 * 1024 * 1024, "Largest request body in bytes (413 above).")
    max_text_chars: int = _opt(32_768, "Longest text of one input or chat message (any string in a body), in "
                                       "characters (413 above).")
    max_new_tokens: int = _opt(1024, "Largest max_new_tokens / max_tokens a request may ask for (422 above); at "
                                     f"most {MAX_NEW_TOKENS}, the most one row can generate.")
    max_logprob_entries: int = _opt(MAX_LOGPROB_ENTRIES, "Most log-probabilities one answer that is not streamed may "
                                    "list (each listed token and its alternatives, over every choice: prompts x n x "
                                    "(echoed prompt tokens + max_tokens) x (logprobs + 1), counted before any work; "
                                    "400 above, naming the fields: stream it or ask fewer). An answer holds them "
                                    "until it is sent, ~75 bytes each at its peak (the default: ~80 MB). A streamed "
                                    "answer's generated tokens are not counted (it holds a chunk at a time); a client "
                                    "that leaves more than this many unread, its connection full, has its rows "
                                    "stopped (408 event).")
    max_queued_rows: int = _opt(2048, "Most rows admitted and not yet done, over all requests (a generated row is "
                                      "done at its last token, a slow client still reading it or not); a request "
                                      "that would go beyond is answered 503 at once.")
    max_queued_rows_per_adapter: int | None = _opt(
        None, "Most of --max-queued-rows that the requests naming one adapter may hold (the base model's count as "
        "one adapter); beyond it that adapter's requests are answered 503 while other adapters' are still admitted, "
        "so one tenant cannot fill the queue. Default: half of --max-queued-rows (at least --max-request-rows).")
    max_json_depth: int = _opt(16, "Deepest nesting of JSON arrays/objects in a body (413 above).")
    # ---- the chat template (code shipped with the model: bounded like a client's input) ----
    chat_template_timeout_s: float = _opt(5.0, "Seconds the model's chat template may take to render one chat "
                                               "request's messages; past it the render is stopped (its worker "
                                               "process killed) and the request answered 400 "
                                               "chat_template_limit_exceeded. serve also renders a one-message "
                                               "conversation at start and refuses to start when that fails.")
    chat_template_memory_mb: int = _opt(512, "MiB of memory one chat template render may use beyond its worker's own "
                                             "(400 chat_template_limit_exceeded past it).")
    chat_template_workers: int = _opt(2, "Worker processes rendering chat templates (~60 MB each, started on first "
                                         "use); a render stopped at its bound holds one until then, and a request "
                                         "that finds none free for --chat-template-timeout-s is answered 503.")
    # ---- tool calling (vLLM's pair of options) ----
    enable_auto_tool_choice: bool = _opt(False, "Chat: read the model's tool calls out of its answers when a request "
                                                "sends tools with tool_choice \"auto\" (the default with tools), "
                                                "as vLLM's --enable-auto-tool-choice; needs --tool-call-parser. Off: "
                                                "such a request is answered 400 (tool_choice \"none\" still renders "
                                                "the tools).")
    tool_call_parser: str | None = _opt(None, "Chat: the format the model writes its tool calls in, vLLM's names: "
                                              "hermes (<tool_call>{...}</tool_call>: Hermes 2 Pro, Qwen2.5, Qwen3) or "
                                              "llama3_json (an answer of JSON {\"name\", \"parameters\"}: Llama "
                                              "3.1/3.2).", choices=TOOL_CALL_PARSERS)
    # ---- slow or stalled clients ----
    header_timeout_s: float = _opt(10.0, "Seconds a new connection has to send its request headers.", ray=False)
    body_timeout_s: float = _opt(30.0, "Seconds a request has to send its whole body, and the longest a client may "
                                 "go without reading any of its answer (408 after; the connection is dropped).")
    keep_alive_s: float = _opt(5.0, "Seconds an idle keep-alive connection stays open; also the most a client "
                               "answered before its body was whole (a 413) may go on sending it before the "
                               "connection closes.")
    max_connections: int = _opt(512, "Most concurrent connections; more are answered 503.", ray=False)
    max_header_bytes: int = _opt(16 * 1024, "Largest request head (request line + headers) in bytes.", ray=False)
    shutdown_timeout_s: float = _opt(10.0, "Seconds the requests in flight get to finish after SIGTERM or SIGINT "
                                           "(none is taken meanwhile) before they are cancelled; the process exits "
                                           "at most a few seconds later even if a request's work is stuck in a "
                                           "thread. A second signal: at once.", ray=False)

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ServingError(format_problems("invalid server options:", problems))

    def problems(self) -> list[str]:
        """Every invalid setting, one line each (empty when all are valid)."""
        problems: list[str] = []
        mistyped: set[str] = set()
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None and f.default is None:
                continue
            kind = _kind(f)
            before = len(problems)
            if kind is bool:
                if not isinstance(value, bool):
                    problems.append(f"{f.name}: expected true or false, got {value!r}")
            elif kind is int:
                if isinstance(value, bool) or not isinstance(value, int):
                    problems.append(f"{f.name}: expected an integer, got {value!r}")
            elif kind is float:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    problems.append(f"{f.name}: expected a finite number, got {value!r}")
            elif not isinstance(value, str):
                problems.append(f"{f.name}: expected a string, got {value!r}")
            elif "choices" in f.metadata and value not in f.metadata["choices"]:
                problems.append(f"{f.name}: {value!r} is not one of {', '.join(f.metadata['choices'])}")
            if len(problems) > before:
                mistyped.add(f.name)

        def at_least(name: str, low: float, high: float | None = None) -> None:
            value = getattr(self, name)
            if name not in mistyped and value is not None and (value < low or (high is not None and value > high)):
                span = f">= {low}" if high is None else f"in [{low}, {high}]"
                problems.append(f"{name}: {value} is out of range; expected {span}")

        at_least("port", 1, 65535)
        at_least("max_loaded_adapters", 1)
        at_least("max_labels", 1, 100_000)
        at_least("threads", 1, 1024)
        at_least("max_batch_rows", 1, 65536)
        at_least("max_batch_tokens", 1)
        at_least("max_prefill_tokens", 1)
        at_least("preempt_wait_steps", 0, MAX_NEW_TOKENS)
        at_least("max_wait_ms", 0, 60_000)
        at_least("max_request_rows", 1)
        at_least("max_body_bytes", 64)
        at_least("max_text_chars", 1)
        at_least("max_new_tokens", 1, MAX_NEW_TOKENS)  # what SamplingParams allows one row
        at_least("max_queued_rows", 1)
        at_least("max_logprob_entries", 1)
        at_least("max_json_depth", 2, 1000)
        at_least("chat_template_timeout_s", 0.01, 3600)
        at_least("chat_template_memory_mb", 16, 1 << 20)
        at_least("chat_template_workers", 1, 64)
        at_least("shutdown_timeout_s", 0, 3600)
        for name in ("header_timeout_s", "body_timeout_s", "keep_alive_s"):
            at_least(name, 0.001, 86_400)
        at_least("max_connections", 1)
        at_least("max_header_bytes", 1024)
        if self.enable_auto_tool_choice is True and self.tool_call_parser is None:
            problems.append("enable_auto_tool_choice: needs tool_call_parser (--tool-call-parser hermes or "
                            "llama3_json: the format the model writes its tool calls in), as vLLM requires")
        if "host" not in mistyped and not self.host:
            problems.append("host: empty; expected an interface address such as 127.0.0.1")
        if self.served_model_name is not None and "served_model_name" not in mistyped:
            from .session import BASE, check_adapter_name

            try:
                check_adapter_name(self.served_model_name)
            except Exception:
                problems.append(f"served_model_name: {self.served_model_name!r} is not a valid name (1-128 letters, "
                                "digits, '.', '_' or '-', starting with a letter or digit)")
            if self.served_model_name == BASE:
                problems.append(f"served_model_name: {BASE!r} is reserved (it already selects the base model)")
        if not mistyped & {"max_request_rows", "max_queued_rows"} and self.max_request_rows > self.max_queued_rows:
            problems.append(f"max_request_rows ({self.max_request_rows}) is larger than max_queued_rows "
                            f"({self.max_queued_rows}): such a request could never be admitted")
        per_adapter = self.max_queued_rows_per_adapter
        if per_adapter is not None and not mistyped & {"max_request_rows", "max_queued_rows",
                                                       "max_queued_rows_per_adapter"}:
            if not self.max_request_rows <= per_adapter <= self.max_queued_rows:
                problems.append(f"max_queued_rows_per_adapter: {per_adapter} is out of range; expected in "
                                f"[{self.max_request_rows}, {self.max_queued_rows}] (max_request_rows: a request "
                                "of that many rows must fit; max_queued_rows: the whole queue)")
        return problems

    @property
    def queued_rows_per_adapter(self) -> int:
        """The rows one adapter's requests may hold (:attr:`max_queued_rows_per_adapter`, or its default)."""
        if self.max_queued_rows_per_adapter is not None:
            return self.max_queued_rows_per_adapter
        return min(self.max_queued_rows, max(self.max_request_rows, self.max_queued_rows // 2))

    def replace(self, **changes: Any) -> ServeOptions:
        """A copy with ``changes`` (validated again)."""
        return dataclasses.replace(self, **changes)


#: Fields Ray Serve's HTTP proxy does not apply (see the module docstring): not offered by ``serve-ray``.
NOT_ON_RAY: frozenset[str] = frozenset(f.name for f in dataclasses.fields(ServeOptions) if f.metadata.get("ray") is False)


def _kind(f: dataclasses.Field) -> type:
    """The field's value type from its annotation (``"int | None"`` -> int)."""
    return {"bool": bool, "int": int, "float": float, "str": str}[str(f.type).split("|")[0].strip()]


def _options_from_flags(values: dict[str, Any]) -> ServeOptions:
    """ServeOptions from the command line's values (fields not given: their defaults); problems name the
    ``--flags`` the user typed."""
    unchecked = object.__new__(ServeOptions)  # the same fields, not validated yet
    for f in dataclasses.fields(ServeOptions):
        object.__setattr__(unchecked, f.name, values.get(f.name, f.default))
    problems = unchecked.problems()
    if problems:
        fields = sorted(values, key=len, reverse=True)  # longest first: max_batch_rows before max_batch
        named = []
        for line in problems:
            for name in fields:
                if line.startswith(name + ":") or line.startswith(name + " "):
                    line = "--" + name.replace("_", "-") + line[len(name):]
                    break
            named.append(line)
        raise ServingError(format_problems("invalid server options:", named))
    return ServeOptions(**values)


def click_options(command=None, *, ray: bool = False):
    """Decorate a click command with one ``--option`` per :class:`ServeOptions` field (``ray``: the fields
    Ray Serve applies, without :data:`NOT_ON_RAY`).

    The command receives ``options=ServeOptions(...)``; an invalid combination raises
    :class:`~bca_deploy.errors.ServingError` (the CLI prints it without a traceback).
    """
    import functools

    import click

    if command is None:
        return functools.partial(click_options, ray=ray)
    offered = [f for f in dataclasses.fields(ServeOptions) if not (ray and f.name in NOT_ON_RAY)]
    names = [f.name for f in offered]

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        values = {name: kwargs.pop(name) for name in names}
        return command(*args, options=_options_from_flags(values), **kwargs)

    for f in reversed(offered):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata["help"]
        if _kind(f) is bool:
            negative = "--no-" + f.name.replace("_", "-")
            wrapper = click.option(f"{flag}/{negative}", f.name, default=f.default, show_default=True,
                                   help=help_text)(wrapper)
        elif "choices" in f.metadata:
            wrapper = click.option(flag, f.name, type=click.Choice(f.metadata["choices"]), default=f.default,
                                   show_default=True, help=help_text)(wrapper)
        else:
            wrapper = click.option(flag, f.name, type=_kind(f), default=f.default, show_default=f.default is not None,
                                   help=help_text)(wrapper)
    return wrapper
