"""Tool calling on the chat route: what a request's ``tools`` and tool messages may hold, and the parsers that read a
model's tool calls out of its text (vLLM's ``--tool-call-parser`` ``hermes`` and ``llama3_json``).

Input: ``tools`` (``[{"type": "function", "function": {"name", "description"?, "parameters"?, "strict"?}}]``) and a
conversation's assistant ``tool_calls`` (``[{"id", "type": "function", "function": {"name", "arguments": <JSON
string>}}]``) are checked here, each problem naming its field path (``tools[3].function.name``); the checks are
bounded by :data:`MAX_TOOLS`, :data:`MAX_TOOLS_BYTES` and the body's own limits (``--max-json-depth``,
``--max-text-chars``). An assistant call's ``arguments`` reach the chat template as a dict, as vLLM passes them
(transformers' templates read ``tool_call.function.arguments`` as a mapping: ``arguments | tojson``, ``.items()``).

Output: :class:`ToolCallParser` reads a choice's text as it is generated (:meth:`~ToolCallParser.feed`, then
:meth:`~ToolCallParser.finish`) into events: text to send as content, or a whole :class:`ToolCall`. The same parser
reads a whole answer (:func:`parse_tool_calls`), so a streamed answer's deltas add up to the unstreamed one.

- ``hermes`` (Hermes 2 Pro, Qwen2.5, Qwen3): each ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
  block is a call; text outside the blocks is content. A block whose JSON is not such an object (bad JSON, a
  nested ``<tool_call>``, arguments that are not an object, NaN, Infinity or a lone surrogate escape: what a
  request's arguments may not hold, so that every call returned can be sent back) and a block never closed (the
  answer cut by ``max_tokens``) are content as generated: never a 500, never a call the model did not finish.
- ``llama3_json`` (Llama 3.1/3.2 JSON tool calling): an answer that is, after white space and an optional
  ``<|python_tag|>``, one or more JSON objects ``{"name": ..., "parameters": {...}}`` (or ``"arguments"``) separated
  by ``;`` is that many calls and no content; any other answer is content, whole. (vLLM's parser looks for JSON
  anywhere in the text with a regular expression that reads at most two levels of nested braces; this one reads
  the whole answer with Python's JSON decoder, so nesting is not limited and text around JSON is not dropped.)

White space between or around calls is not content (the answer's ``content`` is null when only calls and white
space were generated; ``"Sure.\n<tool_call>..."`` has content ``"Sure."``); white space followed by text is sent
with that text, and an answer without calls is its text, unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import uuid
from collections.abc import Sequence
from typing import Any

from ..config import show_json_value
from .limits import TOOL_CALL_PARSERS

__all__ = ["TOOL_CALL_PARSERS", "MAX_TOOLS", "MAX_TOOLS_BYTES", "ToolCall", "ToolCallParser", "make_parser",
           "parse_tool_calls", "parsers_reading", "tools_problems", "tool_calls_problems", "template_tool_calls",
           "message_tool_problems", "unanswered_tool_message", "template_message", "lone_surrogate_problem", "CHAT_ROLES", "content_text"]


#: The most tools one request may list, and the most calls one assistant message may carry: OpenAI's bound (its API
#: refuses more than 128 tools).
MAX_TOOLS = 128

#: The most bytes a request's ``tools`` may hold as compact JSON: each render sends them to a chat template worker
#: and most templates write them whole into the prompt (128 detailed schemas are well under it).
MAX_TOOLS_BYTES = 1 << 20

#: The roles a chat message may have: OpenAI's (``developer``: its newer models' system turn), as the chat route and
#: training's conversations take them; each reaches the chat template as it was given (vLLM passes ``developer`` on
#: as it is, and so does serve: a template that knows no ``developer`` says so, as it does under vLLM).
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")

#: OpenAI's rule for a function's name.
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")

#: The keys of a tool's ``function`` (OpenAI's schema).
_FUNCTION_KEYS = frozenset({"name", "description", "parameters", "strict"})


def _name_problem(where: str, name: Any) -> str | None:
    if not isinstance(name, str):
        return f"{where}: must be a string, got {show_json_value(name)}"
    if not _NAME.fullmatch(name):
        return (f"{where}: {show_json_value(name)} is not a function name (1 to 64 letters, digits, '_' or '-', as "
                "OpenAI requires)")
    return None


def _unknown_fields(where: str, value: dict[str, Any], known: set[str] | frozenset[str], what: str) -> list[str]:
    """The problem of ``value``'s fields outside ``known`` (``what``: "a tool"...), as a list of none or one."""
    extra = sorted(set(value) - known)
    if not extra:
        return []
    return [f"{where}: fields {what} does not take ({', '.join(repr(k[:40]) for k in extra[:5])}); it takes "
            f"{', '.join(sorted(known))}"]


def tools_problems(tools: Any, field: str = "tools") -> list[str]:
    """What is wrong with a request's ``tools``, each problem naming its path (``tools[2].function.parameters``):
    a list of at most :data:`MAX_TOOLS` ``{"type": "function", "function": {"name", "description"?, "parameters"?,
    "strict"?}}``, ``parameters`` a JSON object (a JSON Schema), the whole at most :data:`MAX_TOOLS_BYTES` as JSON,
    no name twice. At most 20 problems are listed."""
    if not isinstance(tools, list):
        return [f"{field}: must be a list of tools, got {show_json_value(tools)}"]
    if len(tools) > MAX_TOOLS:
        return [f"{field}: {len(tools):,} tools; at most {MAX_TOOLS} are taken (OpenAI's bound)"]
    try:
        size = len(json.dumps(tools, separators=(",", ":"), ensure_ascii=False).encode())
    except UnicodeEncodeError as exc:  # a request body cannot hold one (wire.read_json); a training file's cell can
        return [f"{field}: holds a lone surrogate {exc.object[exc.start]!r} (not valid Unicode text)"]
    if size > MAX_TOOLS_BYTES:
        return [f"{field}: {size:,} bytes as JSON; at most {MAX_TOOLS_BYTES:,} are taken (every render writes the "
                "tools into the prompt)"]
    problems: list[str] = []
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        where = f"{field}[{i}]"
        if not isinstance(tool, dict):
            problems.append(f"{where}: must be an object {{\"type\": \"function\", \"function\": {{...}}}}, got "
                            f"{show_json_value(tool)}")
            continue
        problems += _unknown_fields(where, tool, {"type", "function"}, "a tool")
        if tool.get("type") != "function":
            problems.append(f"{where}.type: must be \"function\" (the only kind of tool on chat completions), got "
                            f"{show_json_value(tool.get('type'))}")
        function = tool.get("function")
        if not isinstance(function, dict):
            problems.append(f"{where}.function: must be an object with a name, got {show_json_value(function)}")
            continue
        problems += _unknown_fields(f"{where}.function", function, _FUNCTION_KEYS, "a function")
        problem = _name_problem(f"{where}.function.name", function.get("name"))
        if problem:
            problems.append(problem)
        elif function["name"] in seen:
            problems.append(f"{where}.function.name: {function['name']!r} is the name of an earlier tool too")
        else:
            seen.add(function["name"])
        for key, kinds, what in (("description", str, "a string"), ("parameters", dict, "a JSON Schema object"),
                                 ("strict", bool, "true or false")):
            value = function.get(key)
            if value is not None and not isinstance(value, kinds):
                problems.append(f"{where}.function.{key}: must be {what}, got {show_json_value(value)}")
        if len(problems) >= 20:
            break
    return problems[:20]


def tool_calls_problems(calls: Any, field: str, *, openai_shape: bool = True) -> list[str]:
    """What is wrong with an assistant message's ``tool_calls`` (``field``: its path, ``messages[2].tool_calls``):
    a list of at most :data:`MAX_TOOLS` ``{"id", "type": "function", "function": {"name", "arguments"}}``,
    ``arguments`` a string holding a JSON object (OpenAI's shape; what :func:`template_tool_calls` gives the
    template as a dict). At most 20 problems are listed.

    ``openai_shape=False`` (training data) also takes the shape transformers' tool-use guide writes, as many
    tool-calling data sets do: ``arguments`` the JSON object itself, no ``id`` (a template that writes ids writes
    what it writes for none). A request's calls are what a client sends back of an answer, so serve keeps OpenAI's."""
    if not isinstance(calls, list):
        return [f"{field}: must be a list of tool calls, got {show_json_value(calls)}"]
    if len(calls) > MAX_TOOLS:
        return [f"{field}: {len(calls):,} tool calls; at most {MAX_TOOLS} are taken"]
    problems: list[str] = []
    for i, call in enumerate(calls):
        where = f"{field}[{i}]"
        if not isinstance(call, dict):
            problems.append(f"{where}: must be an object {{\"id\", \"type\": \"function\", \"function\": {{\"name\", "
                            f"\"arguments\"}}}}, got {show_json_value(call)}")
            continue
        problems += _unknown_fields(where, call, {"id", "type", "function", "index"}, "a tool call")
        if not isinstance(call.get("id"), str) and (openai_shape or call.get("id") is not None):
            problems.append(f"{where}.id: must be a string (the id a tool message answers), got "
                            f"{show_json_value(call.get('id'))}")
        elif call.get("id") is not None and (problem := lone_surrogate_problem(call["id"])) is not None:
            # the template writes it into the prompt
            problems.append(f"{where}.id: {problem}")
        if call.get("type", "function") != "function":
            problems.append(f"{where}.type: must be \"function\", got {show_json_value(call.get('type'))}")
        function = call.get("function")
        if not isinstance(function, dict):
            problems.append(f"{where}.function: must be an object {{\"name\", \"arguments\"}}, got "
                            f"{show_json_value(function)}")
            continue
        problems += _unknown_fields(f"{where}.function", function, {"name", "arguments"}, "a function call")
        problem = _name_problem(f"{where}.function.name", function.get("name"))
        if problem:
            problems.append(problem)
        arguments = function.get("arguments")
        as_object = isinstance(arguments, dict) and not openai_shape
        text = _json_text(arguments) if as_object else arguments  # an object read as the string it stands for
        if as_object and text is None:  # a value a Parquet struct holds (a date, bytes)
            try:
                found = _unwritable(arguments, "arguments")
            except RecursionError:
                found = None
            problems.append(f"{where}.function.arguments: must be a JSON object, but {found or 'it'} has no JSON form")
        elif not isinstance(text, str):
            shapes = "a string of JSON (OpenAI's shape, as the answer gave it)" if openai_shape else \
                "a JSON object, or a string of one (OpenAI's shape)"
            problems.append(f"{where}.function.arguments: must be {shapes}, got {show_json_value(arguments)}")
        else:
            value, why = _read_json(text)
            if why is not None:  # read as the body is read: what the body may not hold, its arguments may not either
                if as_object:
                    why = why.replace("a JSON object written as a string", "a JSON object")
                problems.append(f"{where}.function.arguments: {why}")
            elif not isinstance(value, dict):
                problems.append(f"{where}.function.arguments: must be a JSON object written as a string, got "
                                f"{show_json_value(arguments)}")
        if len(problems) >= 20:
            break
    return problems[:20]


def lone_surrogate_problem(text: str) -> str | None:
    """Why ``text`` cannot reach a chat template (None when it can): a lone surrogate (``"\\ud800"`` in JSON), which
    has no UTF-8 form, so the tokenizer refuses the rendered prompt. A request body cannot hold one (wire.read_json
    refuses the escape); a training file's JSON line can."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"holds a lone surrogate {text[exc.start]!r} at character {exc.start + 1} (not valid Unicode text)"
    return None


def _read_json(text: str) -> tuple[Any, str | None]:
    """``(value, None)`` of ``text`` read by the rules a request body is read by (:func:`~bca_deploy.serving.wire.
    read_json`: no NaN or Infinity, no number out of a float's range, no key twice in one object, no lone surrogate
    escape such as ``"\\ud800"``), or ``(None, why)``. An assistant call's ``arguments`` are JSON inside the body's
    JSON: read by looser rules, a lone surrogate reached the template and the tokenizer (a 500) and a repeated key
    meant the last one here and maybe the first to a proxy."""
    from .wire import InvalidJSONError, read_json

    try:
        return read_json(text.encode(), max_depth=sys.maxsize, max_chars=sys.maxsize), None
    except UnicodeEncodeError:  # a lone surrogate character (only a model's decoded escape can make one)
        return None, "holds a lone surrogate, which UTF-8 cannot encode"
    except InvalidJSONError as exc:
        return None, "must be a JSON object written as a string: " + str(exc).replace("the body", "the arguments")
    except ValueError:  # nested past the decoder's recursion (RequestTooLargeError)
        return None, "must be a JSON object written as a string: it is nested too deeply to read"


def _json_object(text: str) -> Any:
    """``json.loads(text)``, or None when it is not JSON (nesting too deep for the decoder included)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _unwritable(value: Any, path: str) -> str | None:
    """Where in ``value`` (an object read from a data file) the first value JSON cannot write is, as
    ``arguments.when (a date value)``; None where every value is JSON's (a Parquet struct's field may hold a
    date, a timestamp or bytes: the row is then refused naming it)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not (key is None or isinstance(key, (str, int, float, bool))):  # the keys json.dumps writes
                return f"{path} (a key of type {type(key).__name__})"
            if (found := _unwritable(item, f"{path}.{key}")) is not None:
                return found
        return None
    if isinstance(value, list):
        return next((found for i, item in enumerate(value) if (found := _unwritable(item, f"{path}[{i}]"))), None)
    if value is None or isinstance(value, (str, int, float, bool)):
        return None
    return f"{path} (a {type(value).__name__} value)"


def _json_text(value: Any) -> str | None:
    """``value`` (an object read from a data file) written as JSON, or None when it has no JSON form."""
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=True)
    except (TypeError, ValueError, RecursionError):
        return None


def template_tool_calls(calls: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """An assistant message's checked ``tool_calls`` as the chat template reads them: ``arguments`` parsed into a
    dict, as vLLM passes them (transformers' convention: templates write ``arguments | tojson``); arguments already
    an object (training data in transformers' shape) as they are; ``id`` only when the call has one."""
    rendered = []
    for call in calls:
        arguments = call["function"]["arguments"]
        function = {"name": call["function"]["name"],
                    "arguments": json.loads(arguments) if isinstance(arguments, str) else arguments}
        rendered.append({**({"id": call["id"]} if call.get("id") is not None else {}), "type": "function",
                         "function": function})
    return rendered


def message_tool_problems(role: str, has_content: bool, tool_calls: Any, tool_call_id: Any, *,
                          openai_shape: bool = True) -> list[str]:
    """What is wrong with how one message uses the tool fields (a chat request's message, a training conversation's),
    ``tool_calls`` and ``tool_call_id`` already checked for their own shape (None: absent): tool calls only on an
    assistant message, a tool message naming the call it answers (``openai_shape=False``, training data in the
    shape transformers documents: it may name none), ``tool_call_id`` only on a tool message, and text or tool calls
    in every message."""
    problems = []
    if tool_calls is not None and role != "assistant":
        problems.append(f"tool_calls: only an assistant message carries tool calls, not a {role} message")
    if role == "tool" and tool_call_id is None and openai_shape:
        problems.append("tool_call_id: a tool message must name the tool call it answers (the id of a call in an "
                        "earlier assistant message's tool_calls)")
    if tool_call_id is not None and role != "tool":
        problems.append(f"tool_call_id: only a tool message answers a tool call, not a {role} message")
    if not has_content and tool_calls is None:
        problems.append("content: a message needs text (an assistant message may have tool_calls instead)")
    return problems


def unanswered_tool_message(conversation: Sequence[tuple[str, Any, Any]]) -> tuple[int, str] | None:
    """The first tool message of a conversation that answers no call of the assistant message it follows, as
    ``(index, problem)`` (the problem starting with its field, ``tool_call_id``), or None.

    ``conversation``: each message's ``(role, tool_calls, tool_call_id)``, every message already checked alone
    (:func:`message_tool_problems`, :func:`tool_calls_problems`). OpenAI's rule: a tool message responds to the
    assistant message with ``tool_calls`` before it (other tool messages answering the same calls may come between),
    and its ``tool_call_id`` is the id of one of those calls. Checked only alone, a tool message answering no call
    (after a user message, or with an id no call has) was rendered as the answer to one, and templates that write the
    id wrote it; a chat request and a training conversation are read by this one rule, so an adapter never trains on
    a conversation serve refuses."""
    calls: list[Any] | None = None  # the ids of the calls the next tool message may answer
    for index, (role, tool_calls, call_id) in enumerate(conversation):
        if role != "tool":
            calls = [call.get("id") for call in tool_calls] if role == "assistant" and tool_calls else None
        elif calls is None:
            what = f"tool_call_id: {show_json_value(call_id)}" if call_id is not None else "role: this tool message"
            return index, (f"{what} answers no tool call: a tool message follows the assistant message whose "
                           "tool_calls it answers (or another tool message answering them), as OpenAI requires")
        elif call_id is None:  # training data in transformers' shape names no call: it answers the calls before it
            continue
        elif call_id not in calls:
            if all(c is None for c in calls):  # calls in transformers' shape (training data): there is no id to name
                return index, (f"tool_call_id: {show_json_value(call_id)} names no call: the calls of the assistant "
                               "message it answers have no id (give each call the id its tool message names, or "
                               "leave tool_call_id out)")
            shown = ", ".join(show_json_value(c) for c in calls[:5] if c is not None) + (", ..." if len(calls) > 5
                                                                                          else "")
            return index, (f"tool_call_id: {show_json_value(call_id)} is not the id of a call of the assistant "
                           f"message it answers (its calls: {shown})")
    return None


def content_text(content: Any) -> tuple[str | None, str | None]:
    """``(text, None)``: a message's ``content`` as the chat template gets it, or ``(None, problem)`` (the problem
    without its field: the caller names it, the chat route ``messages.0.content``, training ``line 3:
    messages[2].content``). A string is itself; a list of OpenAI text parts (``[{"type": "text", "text": ...}]``) is
    their texts joined with a line break, as vLLM (and SGLang, TensorRT-LLM) join them; null is ``(None, None)``
    (whether a message may have no text is :func:`message_tool_problems`'). Anything else (an image or audio part:
    what a client sends a vision model; a part with other fields; a number) is refused naming the first wrong part
    and what is taken instead: an adapter trains on the text serve renders, and neither reads what the other would
    drop."""
    if content is None or isinstance(content, str):
        return content, None
    if not isinstance(content, list):
        return None, f"must be a string or a list of text parts, got {show_json_value(content)}"
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if not isinstance(part, dict) or kind is None:
            problem = f"is {show_json_value(part)}" if not isinstance(part, dict) else "has no type"
        elif kind != "text":
            problem = f"has type {show_json_value(kind)}; the model reads text only"
        elif "text" not in part:
            problem = "has no text"
        elif not isinstance(part["text"], str):
            problem = f"has text {show_json_value(part['text'])}, not a string"
        elif len(part) > 2:
            extra = ", ".join(repr(k[:40]) for k in part if k not in ("type", "text"))
            problem = f"has fields a text part does not take ({extra})"
        else:
            continue
        return None, f"part {i} {problem}: expected a string or {{\"type\": \"text\", \"text\": ...}} parts"
    return "\n".join(part["text"] for part in content), None


def template_message(role: str, text: str, name: str | None = None,
                     tool_calls: Sequence[dict[str, Any]] | None = None,
                     tool_call_id: str | None = None) -> dict[str, Any]:
    """One checked message as the chat template sees it, as vLLM passes it: role, text (``""`` for an assistant
    message with tool calls and no content), ``name`` when given, an assistant's ``tool_calls`` with their arguments
    as dicts (:func:`template_tool_calls`), a tool message's ``tool_call_id``. The server's chat route and training's
    conversations both render this shape, so an adapter trains on the prompt it is served."""
    message: dict[str, Any] = {"role": role, "content": text}
    if name is not None:
        message["name"] = name
    if tool_calls is not None:
        message["tool_calls"] = template_tool_calls(tool_calls)
    if tool_call_id is not None:
        message["tool_call_id"] = tool_call_id
    return message


# ---- reading calls out of generated text ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """One call the model made: ``arguments`` is its arguments object as compact JSON (OpenAI's string)."""

    name: str
    arguments: str
    id: str = dataclasses.field(default_factory=lambda: "chatcmpl-tool-" + uuid.uuid4().hex)

    def message(self) -> dict[str, Any]:
        """The call in an answer's ``message.tool_calls``."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}

    def delta(self, index: int) -> dict[str, Any]:
        """The call as one streamed ``delta.tool_calls`` entry (the client's accumulator takes it whole)."""
        return {"index": index, **self.message()}


def _call(obj: Any, argument_keys: tuple[str, ...]) -> ToolCall | None:
    """``obj`` (decoded JSON) as a call: an object with a function ``name`` and exactly one of ``argument_keys`` holding
    an object; None otherwise."""
    if not isinstance(obj, dict) or _name_problem("name", obj.get("name")) is not None:
        return None
    given = [k for k in argument_keys if k in obj]
    if len(given) != 1 or not isinstance(obj[given[0]], dict):
        return None
    arguments = json.dumps(obj[given[0]], ensure_ascii=False)
    # a call is one the client can send back: NaN, Infinity or a lone surrogate ("\ud800" in the model's JSON) is
    # refused in a request's arguments (_read_json), so such a block stays text, as bad JSON does
    if _read_json(arguments)[1] is not None:
        return None
    return ToolCall(obj["name"], arguments)


class ToolCallParser:
    """Reads one choice's text, piece by piece, into ``("content", text)`` and ``("call", ToolCall)`` events (see the
    module docstring); :attr:`calls` counts the calls so far. White space alone is held until text follows it (then
    sent with it) or the answer ends (then sent only if no call was made): the same text gives the same events
    however it is cut into pieces."""

    def __init__(self) -> None:
        self.calls = 0
        self._space = ""  # white space not sent yet

    def feed(self, text: str) -> list[tuple[str, Any]]:
        """The events ``text`` (the next piece of the choice's text) completes."""
        raise NotImplementedError

    def finish(self) -> list[tuple[str, Any]]:
        """The events of what is left once the choice has ended."""
        raise NotImplementedError

    def _content(self, text: str, events: list[tuple[str, Any]]) -> None:
        # white space at the end is held (whatever the pieces, the same answer: "Sure.\n" then a call is "Sure.")
        body = text.rstrip()
        if body:
            events.append(("content", self._space + body))
            self._space = ""
        self._space += text[len(body):]

    def _found(self, call: ToolCall, events: list[tuple[str, Any]]) -> None:
        self._space = ""  # white space around calls is not content
        self.calls += 1
        events.append(("call", call))

    def _end(self, events: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
        if self._space and not self.calls:
            events.append(("content", self._space))
        self._space = ""
        return events


class HermesParser(ToolCallParser):
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks (vLLM's ``hermes``)."""

    START, END = "<tool_call>", "</tool_call>"

    def __init__(self) -> None:
        super().__init__()
        self._pending = ""  # text not read yet: a tag's beginning, or the end of an open block's text
        self._block: list[str] = []  # an open block's text before _pending (searched already: no end tag in it)
        self._open = False  # inside a block

    def feed(self, text: str) -> list[tuple[str, Any]]:
        # Work linear in the text however it is cut: each character is searched once, and an open block's text is
        # kept as pieces (joined once, when the block closes), never copied again with each piece.
        self._pending += text
        events: list[tuple[str, Any]] = []
        while True:
            if self._open:
                end = self._pending.find(self.END)
                if end < 0:
                    cut = max(0, len(self._pending) - len(self.END) + 1)  # the rest may be the end tag's beginning
                    self._block.append(self._pending[:cut])
                    self._pending = self._pending[cut:]
                    return events
                block = "".join(self._block) + self._pending[:end]
                self._pending, self._block, self._open = self._pending[end + len(self.END):], [], False
                call = _call(_json_object(block), ("arguments",))
                if call is None:  # not a call: the block is text, as generated
                    self._content(self.START + block + self.END, events)
                else:
                    self._found(call, events)
                continue
            start = self._pending.find(self.START)
            if start >= 0:
                self._content(self._pending[:start], events)
                self._pending = self._pending[start + len(self.START):]
                self._open = True
                continue
            keep = _partial_suffix(self._pending, self.START)  # "<tool" may be the start of a tag: held
            cut = len(self._pending) - keep
            self._content(self._pending[:cut], events)
            self._pending = self._pending[cut:]
            return events

    def finish(self) -> list[tuple[str, Any]]:
        events: list[tuple[str, Any]] = []
        opened = self.START + "".join(self._block) if self._open else ""
        self._content(opened + self._pending, events)  # an unclosed block is text, as generated
        self._pending, self._block, self._open = "", [], False
        return self._end(events)


class Llama3JsonParser(ToolCallParser):
    """An answer that is JSON calls ``{"name", "parameters"}`` separated by ``;`` (vLLM's ``llama3_json``)."""

    TAG = "<|python_tag|>"

    def __init__(self) -> None:
        super().__init__()
        self._held: list[str] = []  # the answer so far while it may be calls (pieces: joined once, at the end)
        self._head = ""  # its beginning less white space, while undecided (at most the tag's length and a piece)
        self._calls: bool | None = None  # None: undecided; True: it starts as JSON (held whole); False: text

    def feed(self, text: str) -> list[tuple[str, Any]]:
        events: list[tuple[str, Any]] = []
        if self._calls is False:
            self._content(text, events)
            return events
        self._held.append(text)
        if self._calls is None:
            self._head = (self._head + text) if self._head else text.lstrip()
            if not self._head or (self.TAG.startswith(self._head) and self._head != self.TAG):
                return events  # white space, or the tag's beginning: undecided
            self._calls = self._head.startswith("{") or self._head.startswith(self.TAG)
            if not self._calls:
                held, self._held = "".join(self._held), []
                self._content(held, events)
        return events

    def finish(self) -> list[tuple[str, Any]]:
        events: list[tuple[str, Any]] = []
        held, self._held = "".join(self._held), []
        calls = self._read(held) if self._calls else None
        if calls is None:
            self._content(held, events)
        else:
            for call in calls:
                self._found(call, events)
        return self._end(events)

    def _read(self, text: str) -> list[ToolCall] | None:
        """The calls ``text`` is, or None when it is not only calls."""
        text = text.strip()
        if text.startswith(self.TAG):
            text = text[len(self.TAG):].lstrip()
        decoder = json.JSONDecoder()
        calls: list[ToolCall] = []
        at = 0
        try:
            while True:
                obj, at = decoder.raw_decode(text, at)
                call = _call(obj, ("parameters", "arguments"))
                if call is None:
                    return None
                calls.append(call)
                rest = text[at:].lstrip()
                if not rest:
                    return calls
                if not rest.startswith(";"):
                    return None
                at = len(text) - len(rest) + 1
                while at < len(text) and text[at].isspace():
                    at += 1
        except (ValueError, RecursionError):
            return None


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of ``text`` that is a beginning of ``tag`` (shorter than it)."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0


_PARSERS = {"hermes": HermesParser, "llama3_json": Llama3JsonParser}


def make_parser(name: str) -> ToolCallParser:
    """A new parser of one choice's text (``name``: one of :data:`TOOL_CALL_PARSERS`)."""
    return _PARSERS[name]()


def parse_tool_calls(name: str, text: str) -> tuple[str | None, list[ToolCall]]:
    """``(content, calls)`` of a whole answer's ``text`` read by parser ``name``: content is the text outside the
    calls (None when there is none but white space and there are calls; ``""`` stays ``""`` without calls)."""
    parser = make_parser(name)
    events = parser.feed(text) + parser.finish()
    content = "".join(value for kind, value in events if kind == "content")
    calls = [value for kind, value in events if kind == "call"]
    return (content if content or not calls else None), calls


def parsers_reading(text: str, calls: Sequence[tuple[str, Any]]) -> list[str]:
    """The ``--tool-call-parser`` names (of :data:`TOOL_CALL_PARSERS`, in that order) that read exactly ``calls``
    (``(name, arguments object)`` pairs, in order) out of ``text``, an assistant turn as the model writes it (its
    tokens decoded without special tokens, as the server decodes an answer): the parsers a server of a model trained
    on such turns is to be started with. Empty when none reads them (the calls would be answered as text)."""
    fitting = []
    for name in TOOL_CALL_PARSERS:
        found = parse_tool_calls(name, text)[1]
        if len(found) == len(calls) and all(
                call.name == want and _json_object(call.arguments) == arguments
                for call, (want, arguments) in zip(found, calls)):
            fitting.append(name)
    return fitting
