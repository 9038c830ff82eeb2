"""What crosses the wire: request bodies in, answers and errors out.

**Errors.** Every error a client can cause is a :class:`~bca_deploy.errors.BCAError` subclass, and
:data:`ERRORS` maps each type to one HTTP status and one ``type`` string (the most specific class in an
exception's MRO wins). Every error answer, on every route (404 routes and body parse errors too), has
the OpenAI shape::

    {"error": {"message": "...", "type": "unknown_adapter", "param": "model" | null, "code": 404}}

Messages name the field and what was expected; they never carry filesystem paths, the store's
location, internal exception text, or the names of adapters the request did not name.

**Bodies.** :func:`read_body` turns the raw bytes of a request into Python values with the limits
of :class:`~bca_deploy.serving.options.ServeOptions` that apply to any JSON applied before the body's
content is used: UTF-8 only (a leading byte order mark is skipped), no NaN/Infinity, no lone surrogates,
nesting up to ``max_json_depth``, every string (a text, a chat message, a key) up to ``max_text_chars``
characters. Arrays are bounded by the body's size here and by their meaning later: a request's inputs by
``max_request_rows`` (:func:`check_rows`), a token-id input by the model's positions. :func:`validate` then
checks the values against a pydantic model and reports every problem at once. Each 413 names the option that
sets its limit. The body's ``content-type`` and ``content-encoding`` (:func:`check_body_headers`) must say JSON,
uncompressed, each header sent once (or with the same value each time).

**Answers.** The routes that answer rows (generation, embeddings, classification) build and render their JSON in a
worker thread (:func:`json_answer`), never on the event loop that every other request and stream waits for.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Annotated, Any, TypeVar

from ..config import DuplicateKeyError, unique_key_object
from ..errors import (
    AdapterExistsError,
    AdapterFormatError,
    AdapterMismatchError,
    AdapterNameError,
    BCAError,
    ContextLengthError,
    ExportFileError,
    NonFiniteError,
    ServingError,
    UnknownAdapterError,
)
from .chat_template import ChatTemplateLimitError

__all__ = [
    "READ_METHODS",
    "ERRORS",
    "error_status",
    "error_body",
    "read_json",
    "read_body",
    "parse_body",
    "json_answer",
    "render_answer",
    "INLINE_BODY_BYTES",
    "ROW_FIELDS",
    "check_content_type",
    "check_content_encoding",
    "check_body_headers",
    "BODY_ROUTES",
    "check_rows",
    "body_too_large",
    "body_too_slow",
    "validate",
    "validate_body",
    "InvalidRequestError",
    "InvalidJSONError",
    "InvalidHTTPError",
    "RequestTooLargeError",
    "RequestTimeoutError",
    "ClientClosedRequestError",
    "ServerBusyError",
    "AdapterExistsError",
    "AdapterLimitError",
    "NonFiniteOutputError",
    "NotFoundError",
    "MethodNotAllowedError",
    "ForbiddenError",
    "WrongTaskError",
    "InternalServerError",
    "field_errors",
]

#: The methods of every route that only reads: HEAD is GET without the body (RFC 9110 §9.3.2), what load
#: balancers, uptime checkers and ``curl -I`` send.
READ_METHODS = ["GET", "HEAD"]


def _json_number(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"must be a number, not {type(value).__name__} {value!r}"[:200])
    return value


def __getattr__(name: str) -> Any:
    """``JSONNumber``: a JSON number in a request, as a float: an integer or a decimal, never a boolean or a numeric
    string (pydantic's lax ``float`` would take ``true`` as 1.0 and ``"0.5"`` as 0.5, changing the answer without a
    word). Made on first use: it needs pydantic (the serve extra), which the rest of this module does not; training
    reads tool-call arguments by :func:`read_json` in an install without it."""
    if name == "JSONNumber":
        from pydantic import BeforeValidator

        globals()[name] = value = Annotated[float, BeforeValidator(_json_number)]
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class InvalidRequestError(ServingError, ValueError):
    """A request's fields do not pass validation (types, ranges, unknown fields, OpenAI options not supported)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class InvalidJSONError(ServingError, ValueError):
    """A request body that is not a JSON document in UTF-8."""


class InvalidHTTPError(ServingError, ValueError):
    """A request that is not valid HTTP/1.1 (a malformed or oversized request head); answered before the app."""


class UnsupportedMediaTypeError(ServingError, ValueError):
    """A body sent as something other than JSON (``content-type``), e.g. a browser's cross-site form or text."""


class RequestTooLargeError(ServingError, ValueError):
    """A request over a size limit (body bytes, rows, string length, nesting)."""


class RequestTimeoutError(ServingError, TimeoutError):
    """A client that did not send its whole body in time, or read its answer too slowly."""


class ClientClosedRequestError(ServingError, ConnectionError):
    """The client closed the connection before its whole body arrived, or before its answer was ready
    (logged as 499, as nginx does; no answer can reach it, and it is not a server failure)."""


class ServerBusyError(ServingError):
    """The server's queue is full; retry later."""


class NotFoundError(ServingError, LookupError):
    """No route of this server has that path."""


class MethodNotAllowedError(ServingError):
    """The route exists but not with this HTTP method."""


class ForbiddenError(ServingError, PermissionError):
    """The operator turned this endpoint off (e.g. adapter listing)."""


class WrongTaskError(ServingError):
    """The endpoint needs a graph of another task (e.g. generation on an encoder export)."""


class AdapterLimitError(ServingError):
    """A load beyond ``--max-loaded-adapters``: HTTP 409 until an adapter is unloaded."""


class NonFiniteOutputError(ServingError):
    """The model gave NaN or infinite values for the request's rows: its adapter's weights overflow float32 on that
    input. A 500 that says so (the operator's adapter is at fault, not the request); other requests are unaffected."""


class InternalServerError(ServingError):
    """A failure inside the server: the client sees only this type and the request id; the log has the rest."""


#: Error type -> (HTTP status, the ``type`` string of the answer). Documented in the README.
ERRORS: Mapping[type[BaseException], tuple[int, str]] = {
    InvalidJSONError: (400, "invalid_json"),
    InvalidHTTPError: (400, "invalid_http"),
    ServingError: (400, "bad_request"),
    WrongTaskError: (400, "wrong_task"),
    ForbiddenError: (403, "forbidden"),
    UnknownAdapterError: (404, "unknown_adapter"),
    NotFoundError: (404, "not_found"),
    MethodNotAllowedError: (405, "method_not_allowed"),
    RequestTimeoutError: (408, "request_timeout"),
    ClientClosedRequestError: (499, "client_closed_request"),
    AdapterExistsError: (409, "adapter_exists"),
    AdapterLimitError: (409, "adapter_limit"),
    RequestTooLargeError: (413, "request_too_large"),
    UnsupportedMediaTypeError: (415, "unsupported_media_type"),
    InvalidRequestError: (422, "invalid_request"),
    ContextLengthError: (400, "context_length_exceeded"),  # OpenAI's and vLLM's status: clients detect overflow by it
    # the model's chat template stopped at --chat-template-timeout-s / --chat-template-memory-mb on the request's
    # messages: 400, as vLLM answers a template that fails on them, and as a limit is answered; a 5xx would be retried
    # by every OpenAI client (twice, by default), each retry burning the bound again
    ChatTemplateLimitError: (400, "chat_template_limit_exceeded"),
    AdapterNameError: (422, "invalid_adapter_name"),
    AdapterMismatchError: (422, "adapter_does_not_fit"),
    AdapterFormatError: (422, "invalid_adapter"),
    NonFiniteError: (422, "invalid_adapter"),
    BCAError: (400, "bad_request"),
    NonFiniteOutputError: (500, "non_finite_output"),
    ExportFileError: (500, "export_damaged"),
    InternalServerError: (500, "internal_error"),
    ServerBusyError: (503, "server_busy"),
}


#: The OpenAI-compatible routes that take a body (:mod:`bca_deploy.serving.openai`, vLLM's ``/tokenize`` and
#: ``/detokenize`` with them); ``/v1/embeddings`` is one only
#: for a body with ``model`` (without, it is the native route). What an OpenAI request is refused for as invalid (422
#: on the native routes) is a 400, as OpenAI and vLLM answer: the ``openai`` client raises ``BadRequestError`` for
#: it, which is what code written against OpenAI catches.
OPENAI_BODY_ROUTES = frozenset({"/v1/embeddings", "/v1/completions", "/v1/chat/completions", "/v1/load_lora_adapter",
                                "/v1/unload_lora_adapter", "/tokenize", "/detokenize"})


#: Every route that reads a JSON body (all ``POST``; :func:`~bca_deploy.serving.http.create_app`'s and
#: :mod:`~bca_deploy.serving.openai`'s): the Ray router refuses such a request by its headers
#: (:func:`check_body_headers`) before it reads the body, as a single server's routes do, and reads the body for the
#: adapter it names; any other request is the replica's to answer (404, 405), as ``serve`` answers it.
BODY_ROUTES = OPENAI_BODY_ROUTES | {"/v1/adapters", "/v1/classify", "/v1/generate"}


def is_openai_request(path: str, body: Any) -> bool:
    """Whether a request to ``path`` with the parsed JSON ``body`` (None: not parsed, or not JSON) is an OpenAI one."""
    if path == "/v1/embeddings":
        return isinstance(body, dict) and "model" in body
    return path in OPENAI_BODY_ROUTES


def error_status(exc: BaseException, openai: bool = False) -> tuple[int, str]:
    """(status, type) of ``exc``: the entry of the most specific class in its MRO; 500 for anything else. For an
    OpenAI request (``openai``: :func:`is_openai_request`) a 422 is a 400 of the same type."""
    status, kind = next((ERRORS[cls] for cls in type(exc).__mro__ if cls in ERRORS), ERRORS[InternalServerError])
    if status == 422 and openai:
        return 400, kind
    return status, kind


@contextlib.contextmanager
def field_errors(param: str) -> Iterator[None]:
    """Errors raised inside (:class:`~bca_deploy.errors.BCAError`) name the request field ``param`` in their
    answer, unless they name one already: the library's checks know values, the route knows field names."""
    try:
        yield
    except BCAError as exc:
        if getattr(exc, "param", None) is None:
            exc.param = param  # type: ignore[attr-defined]
        raise


def error_body(status: int, kind: str, message: str, param: str | None = None) -> dict[str, Any]:
    """The JSON of an error answer (OpenAI's shape; ``code`` is the HTTP status)."""
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


# ---- request bodies ---------------------------------------------------------------------------------

_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")  # a JSON escape of one (\\uD800-\\uDFFF)


def _reject_constant(name: str):
    raise InvalidJSONError(f"the body contains {name}; JSON numbers must be finite")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise InvalidJSONError(f"the number {text[:32]} is out of range for a 64-bit float")
    return value


def check_content_type(value: str | None) -> None:
    """Refuse a body whose ``content-type`` is not JSON (415), before it is read.

    ``application/json`` or any ``+json`` type, with parameters (``; charset=utf-8``), or no header at all (as
    FastAPI reads it). Anything else is refused even when the bytes are JSON: a web page on another site can make
    a browser send ``text/plain``, form or multipart bodies to a server on this machine without asking it first
    (a CORS "simple request"), never a JSON one, so without this rule any site a user visits could load, unload
    or run adapters on a server bound to 127.0.0.1."""
    if value is None:
        return
    media = value.split(";", 1)[0].strip().lower()
    if media == "application/json" or (media.startswith("application/") and media.endswith("+json")):
        return
    shown = value if len(value) <= 64 else value[:64] + "..."
    raise UnsupportedMediaTypeError(f"content-type {shown!r}: request bodies are JSON; send "
                                    "'content-type: application/json'")


def read_body(body: bytes, options, headers: Mapping[str, str]) -> Any:
    """:func:`check_content_type` of the request's ``content-type`` header and :func:`check_content_encoding` of its
    ``content-encoding`` (absent: not sent), then :func:`read_json` with the limits of ``options`` (a
    :class:`~bca_deploy.serving.options.ServeOptions`): what every route (native, OpenAI, the Ray router) uses to
    read a body, so none can read one sent as text, a form or compressed. ``headers``: the request's (Starlette's
    ``request.headers``, whose names are case-insensitive; a plain mapping needs lower-case names)."""
    check_body_headers(headers)
    return read_json(body, max_depth=options.max_json_depth, max_chars=options.max_text_chars)


def check_body_headers(headers: Mapping[str, str]) -> None:
    """:func:`check_content_type` and :func:`check_content_encoding` of a request's headers: what refuses a body by its
    headers alone. A route calls it before it reads the body too, so a client that sent ``Expect: 100-continue`` gets
    the 415 at once instead of ``100 Continue`` and then the 415 for the body it was invited to send (RFC 9110 section
    10.1.1; uvicorn sends the 100 when the body is first read)."""
    check_content_type(_single_header(headers, "content-type"))
    check_content_encoding(_single_header(headers, "content-encoding"))


def _single_header(headers: Mapping[str, str], name: str) -> str | None:
    """The value of header ``name`` (None: not sent); refused (400) when it is sent more than once with different
    values. Starlette's ``headers.get`` gives the first, a proxy in front may read the last: ``content-type:
    application/json`` then ``content-type: text/plain`` was served as JSON here, so the browser-form rule of
    :func:`check_content_type` held only for the first of them (the same reason a body's repeated JSON key is
    refused). The same value twice (a header set twice by a client's layers) means one thing to everybody."""
    getlist = getattr(headers, "getlist", None)
    values = list(getlist(name)) if getlist is not None else ([headers[name]] if name in headers else [])
    if len(set(values)) > 1:
        shown = ", ".join(repr(v if len(v) <= 40 else v[:40] + "...") for v in values[:4])
        raise InvalidHTTPError(f"the request has {len(values)} {name} headers with different values ({shown}); "
                               f"send one {name} header")
    return values[0] if values else None


#: Bodies up to this size are parsed on the event loop (a few ms at most); a larger one in a worker thread, so that
#: its parse (up to ~0.5 s for a body of the default 4 MiB limit made of a million tiny values) interleaves with
#: every other request and stream instead of stopping them.
INLINE_BODY_BYTES = 64 * 1024


async def parse_body(body: bytes, options, headers: Mapping[str, str]) -> Any:
    """:func:`read_body`, off the event loop for a body over :data:`INLINE_BODY_BYTES` (what the async routes call)."""
    if len(body) <= INLINE_BODY_BYTES:
        return read_body(body, options, headers)
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(read_body, body, options, headers)


async def json_answer(build: Callable[[], dict[str, Any]]) -> Any:
    """The answer ``build()`` makes (a dict of plain JSON values: dicts with string keys, lists, str, int, float,
    bool, None) as a JSON response, built and rendered in a worker thread (:func:`render_answer`); the bytes FastAPI
    writes for a returned dict, without its ``jsonable_encoder`` walk (which the values do not need). An answer's size
    is bounded only by its rows, tokens and log-probabilities (256 rows x 120 tokens x 21 log-probabilities: ~650,000
    values, 2-3 s to build and render in Python): on the event loop that stopped every other request, stream and
    health check for as long (another client's 8-token completion waited up to 3.6 s; 0.8 s now, on a loaded
    2-core machine)."""
    from fastapi.responses import Response
    from starlette.concurrency import run_in_threadpool

    return Response(await run_in_threadpool(lambda: render_answer(build())), media_type="application/json")


_dumps = functools.partial(json.dumps, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":"))


def render_answer(content: dict[str, Any]) -> bytes:
    """``content`` as Starlette's ``JSONResponse`` renders it (compact UTF-8, NaN refused), each item of its top-level
    lists of objects or lists (an answer's choices, rows) rendered alone: the C encoder holds the GIL for a whole
    call, and one call over a 20 MB answer held the event loop for as long, whatever thread it ran in.

    A top-level value may also be an iterator (of what a list holds): its items are made, rendered and dropped one at
    a time, so an answer of many choices holds one choice's objects at once beside the bytes rendered so far. Each
    part is encoded to UTF-8 as it is rendered and the bytes are joined once: the answer exists as text only a part at
    a time (a whole-answer ``str`` joined, then encoded, held the answer three to four times over at its peak)."""
    parts: list[bytes] = []
    for key, value in content.items():
        if not isinstance(key, str):
            raise TypeError(f"answer keys are strings, got {key!r}")
        parts.append((b"," if parts else b"{") + _dumps(key).encode("utf-8") + b":")
        if isinstance(value, Iterator) or (isinstance(value, list) and value and isinstance(value[0], (dict, list))):
            parts.append(b"[")
            separator = b""
            for item in value:  # not enumerate(): its reused tuple held each item until the next was made
                parts.append(separator + _dumps(item).encode("utf-8"))
                separator, item = b",", None  # let it go before the next is made
            parts.append(b"]")
        else:
            parts.append(_dumps(value).encode("utf-8"))
    parts.append(b"}" if parts else b"{}")
    return b"".join(parts)


def check_content_encoding(value: str | None) -> None:
    """Refuse a compressed body (415, naming the encoding): bodies are read as sent. A gzip body was a 400 "the body
    is not UTF-8", which sent the client after the wrong problem."""
    if value is None or value.strip().lower() in ("", "identity"):
        return
    shown = value if len(value) <= 64 else value[:64] + "..."
    raise UnsupportedMediaTypeError(f"content-encoding {shown!r}: request bodies are read uncompressed; send the body "
                                    "without a content-encoding")


def read_json(body: bytes, *, max_depth: int, max_chars: int) -> Any:
    """Parse a request body into Python values, refusing what the server will not handle.

    Args:
        body: the raw bytes (the body-size limit is applied while they arrive).
        max_depth: the deepest nesting of arrays/objects allowed (the top level is depth 1).
        max_chars: the longest string allowed, in characters (texts, chat messages, object keys).

    Raises:
        InvalidJSONError: not UTF-8, not JSON, NaN/Infinity, a number out of range, a lone surrogate, a key
            twice in one object.
        RequestTooLargeError: nested deeper than ``max_depth`` (``--max-json-depth``), or a string over
            ``max_chars`` (``--max-text-chars``).
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidJSONError(f"the body is not UTF-8 (invalid byte at offset {exc.start}); send JSON in "
                               "UTF-8") from None
    # a UTF-8 byte order mark before the JSON (PowerShell's and Windows editors' UTF-8 files start with one) is
    # skipped, as RFC 8259 section 8.1 allows and FastAPI (vLLM) reads it; it was a 400 telling the client to
    # "decode using utf-8-sig", Python's advice to itself
    text = text.removeprefix("\ufeff")
    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float,
                           object_pairs_hook=unique_key_object)
    except DuplicateKeyError as exc:
        # with a repeated key, which one counts depends on the parser (Python's takes the last, a proxy in front may
        # take the first), so a request could mean one thing to a gateway and another here
        shown = exc.key if len(exc.key) <= 64 else exc.key[:64] + "..."
        raise InvalidJSONError(f"the body has the key {shown!r} more than once in one object; send each key once") \
            from None
    except RecursionError:
        raise _too_deep(max_depth) from None
    except json.JSONDecodeError as exc:
        what = exc.msg.removesuffix(" at")  # json's own text may end in "at" (e.g. "Invalid control character at")
        raise InvalidJSONError(f"the body is not valid JSON: {what} at line {exc.lineno} column {exc.colno}") \
            from None
    except InvalidJSONError:
        raise
    except ValueError:  # e.g. an integer of more than 4300 digits
        raise InvalidJSONError("the body holds a number too large to parse") from None
    # valid UTF-8 holds no surrogate code points: a lone one can only come from a \\uD800-\\uDFFF escape
    _check_values(value, max_depth, max_chars, surrogates=_SURROGATE_ESCAPE.search(text) is not None)
    return value


def check_rows(rows: int, limit: int, param: str = "input") -> None:
    """Refuse a request of more than ``limit`` inputs (``max_request_rows``) with a 413 naming the option."""
    if rows > limit:
        error = RequestTooLargeError(f"{param}: {rows} rows; this server's limit is {limit} per request "
                                     "(--max-request-rows)")
        error.param = param  # type: ignore[attr-defined]  # the field the rows come from, in the answer's "param"
        raise error


def body_too_large(limit: int, length: str | None = None) -> RequestTooLargeError:
    """The 413 of a body over ``max_body_bytes`` (``length``: its content-length, when it announced one)."""
    size = f"has {length} bytes" if length is not None else "is larger than that"
    return RequestTooLargeError(f"the body {size}; this server's limit is {limit} bytes (--max-body-bytes)")


def body_too_slow(seconds: float) -> RequestTimeoutError:
    """The 408 of a body not received within ``body_timeout_s``."""
    return RequestTimeoutError(f"the request body did not arrive within {seconds:g} s (--body-timeout-s)")


def _too_deep(max_depth: int, where: str | None = None) -> RequestTooLargeError:
    at = f" (at {where})" if where else ""
    return RequestTooLargeError(f"the body is nested deeper than {max_depth} levels{at}; this server's limit is "
                                f"{max_depth} (--max-json-depth)")


def _check_values(value: Any, max_depth: int, max_chars: int, surrogates: bool = True) -> None:
    """Refuse a string over ``max_chars``, a lone surrogate (only looked for when ``surrogates``: the body has an
    escape that could write one) or nesting deeper than ``max_depth`` anywhere in ``value``.

    A body is checked on every request, and may hold a million values within the body limit (a 4 MiB array of
    ``{}``), so the walk that passes a body keeps no paths (it took seconds on such a body, on the event loop, building
    a path string per value); only a body it fails is walked again, by :func:`_refuse_values`, which names the value."""
    if not _values_ok(value, max_depth, max_chars, surrogates):
        _refuse_values(value, max_depth, max_chars)


def _values_ok(value: Any, max_depth: int, max_chars: int, surrogates: bool) -> bool:
    # Iterative (no recursion limit to trip). Each value is looked at once, by its container: a string there and
    # then, a container's depth there and then, and only non-empty containers are pushed to be looked into.
    def bad_string(text: str) -> bool:
        return len(text) > max_chars or (surrogates and _SURROGATE.search(text) is not None)

    if type(value) is str:
        return not bad_string(value)
    if type(value) not in (dict, list):
        return True
    stack: list[tuple[Any, int]] = [(value, 1)]
    pop, push = stack.pop, stack.append
    while stack:
        item, depth = pop()
        if depth > max_depth:
            return False
        if type(item) is dict:
            for key in item:
                if bad_string(key):
                    return False
            item = item.values()
        inner = depth + 1
        for child in item:
            kind = type(child)
            if kind is str:
                if len(child) > max_chars or (surrogates and _SURROGATE.search(child) is not None):
                    return False
            elif kind is dict or kind is list:
                if child:
                    push((child, inner))
                elif inner > max_depth:
                    return False
    return True


def _refuse_values(value: Any, max_depth: int, max_chars: int) -> None:
    """Raise the refusal of :func:`_check_values` for ``value``, naming where the value is (``body.messages[3]
    .content``) and the top-level field it is under (the error's ``param``)."""
    # Iterative walk (no recursion limit to trip), one visit per value. ``field``: the top-level key a value is
    # under, the ``param`` of a refusal (None at the top level itself).
    stack: list[tuple[Any, int, str, str | None]] = [(value, 1, "body", None)]
    field = None
    try:
        while stack:
            item, depth, where, field = stack.pop()
            if isinstance(item, str):
                _check_string(item, where, max_chars)
            elif isinstance(item, (list, dict)):
                if depth > max_depth:
                    raise _too_deep(max_depth, where)
                if isinstance(item, dict):
                    for key, child in item.items():
                        _check_string(key, f"{where} key", max_chars)
                        if isinstance(child, (str, list, dict)):
                            top = field if depth > 1 else _join("body", key)
                            stack.append((child, depth + 1, _join(where, key), top))
                else:
                    for i, child in enumerate(item):
                        if isinstance(child, (str, list, dict)):
                            stack.append((child, depth + 1, f"{where}[{i}]", field))
    except (InvalidJSONError, RequestTooLargeError) as exc:  # the field of the value being checked
        exc.param = field  # type: ignore[attr-defined]
        raise
    raise AssertionError("_check_values found a problem that _refuse_values did not")  # pragma: no cover


def _join(where: str, key: str) -> str:
    key = key if len(key) <= 40 else key[:40] + "..."
    return key if where == "body" else f"{where}.{key}"


def _check_string(text: str, where: str, max_chars: int) -> None:
    if len(text) > max_chars:
        raise RequestTooLargeError(f"{where}: a string of {len(text)} characters; this server's limit is "
                                   f"{max_chars} (--max-text-chars)")
    match = _SURROGATE.search(text)
    if match is not None:
        raise InvalidJSONError(f"{where}: a lone surrogate (\\u{ord(match.group()):04x}) at character "
                               f"{match.start()}; strings must be valid Unicode")


Model = TypeVar("Model")


#: Fields holding a request's rows (a list of texts or of token-id lists), counted before the body is validated.
ROW_FIELDS = ("input", "prompt")
_MANY_UNKNOWN = 20  # more unknown fields than pydantic's message would list: refused by count, unvalidated


async def validate_body(model: type[Model], data: Any, body_bytes: int, max_rows: int | None = None) -> Model:
    """:func:`validate` of a parsed body, with its rows counted first (``max_rows``: 413 above, as
    :func:`check_rows`), off the event loop for a body over :data:`INLINE_BODY_BYTES`: validating a body of
    700,000 token-id rows or 120,000 chat messages took pydantic 2 s, during which no other request moved."""
    if max_rows is not None and isinstance(data, dict):
        for field in ROW_FIELDS:
            rows = data.get(field)
            if field in model.model_fields and isinstance(rows, list) and rows and isinstance(rows[0], (str, list)):
                check_rows(len(rows), max_rows, field)
    if body_bytes <= INLINE_BODY_BYTES:
        return validate(model, data)
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(validate, model, data)


def validate(model: type[Model], data: Any) -> Model:
    """``model.model_validate(data)``, every problem in one :class:`InvalidRequestError` (``param``: the first
    problem's top-level field, e.g. ``stop`` where pydantic's path is ``stop.str``, its branch of the union; the
    message has the whole path)."""
    from pydantic import ValidationError

    if not isinstance(data, dict):
        raise InvalidRequestError(f"the body must be a JSON object, got {_json_type(data)}")
    fields = model.model_fields  # type: ignore[attr-defined]
    if model.model_config.get("extra") == "forbid" and len(data) > _MANY_UNKNOWN:  # type: ignore[attr-defined]
        unknown = [key for key in data if key not in fields]
        if len(unknown) > _MANY_UNKNOWN:  # 300,000 of them took pydantic 4 s to list
            shown = ", ".join(_join("body", key) for key in unknown[:5])
            raise InvalidRequestError(f"{len(unknown):,} fields this request does not take ({shown}, ...)",
                                      param=unknown[0][:40])
    try:
        return model.model_validate(data)  # type: ignore[attr-defined]
    except ValidationError as exc:
        problems, first = [], None
        for e in exc.errors(include_url=False, include_input=False):
            where = ".".join(str(p) for p in e["loc"]) or "body"
            first = first or (str(e["loc"][0]) if e["loc"] else None)
            problems.append(f"{where}: {_unknown_field(model, e) or _message(e)}")
        raise InvalidRequestError("; ".join(problems[:20]) + (f"; ... {len(problems) - 20} more"
                                                              if len(problems) > 20 else ""), param=first) from None


#: A field a body names the adapter with on the other family of routes -> the field this route takes for it: the
#: OpenAI-compatible routes take ``model``, the native ones ``adapter`` (a client that switches between them sends
#: the other's name).
_ADAPTER_FIELDS = {"model": "adapter", "adapter": "model"}


def _unknown_field(model: type[Model], error: Mapping[str, Any]) -> str | None:
    """The message for a top-level field ``model`` does not take: what it takes instead (pydantic's own, "Extra inputs
    are not permitted", names neither), and for a ``model``/``adapter`` mix-up which field names the adapter here.
    None for any other error."""
    loc = error.get("loc") or ()
    if error.get("type") != "extra_forbidden" or len(loc) != 1:
        return None
    fields = model.model_fields  # type: ignore[attr-defined]
    takes = ", ".join(info.alias or name for name, info in fields.items())
    instead = _ADAPTER_FIELDS.get(str(loc[0]))
    if instead in fields:
        return f"not a field of this request: name the adapter with '{instead}' here (this request takes: {takes})"
    return f"not a field of this request (it takes: {takes})"


def _message(error: Mapping[str, Any]) -> str:
    # pydantic's own text, except for its wrapped ValueErrors ("Value error, ...") where ours is the message.
    message = str(error.get("msg", "invalid"))
    return message.removeprefix("Value error, ")


def _json_type(value: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number",
            type(None): "null"}.get(type(value), type(value).__name__)
