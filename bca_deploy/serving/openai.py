"""OpenAI-compatible routes of ``bca-deploy serve``, beside the native ones.

The official ``openai`` client (and anything that speaks its API: vLLM, LoRAX and TGI clients, LangChain)
works against the server with ``base_url="http://HOST:PORT/v1"``; the request's ``model`` picks the
adapter, as with vLLM's ``--lora-modules``:

    GET  /v1/models                 the base model (its served name) and every loaded adapter, each with vLLM's
                                    max_model_len
    GET  /v1/models/{model}         one of them
    POST /v1/embeddings             {"model", "input", "encoding_format"?, "dimensions"?,
                                     "truncate_prompt_tokens"?}                                encoders
    POST /v1/completions            {"model", "prompt", "max_tokens"?, "temperature"?, "top_p"?, "seed"?, "n"?,
                                     "stop"?, "presence_penalty"?, "frequency_penalty"?, "logit_bias"?,
                                     "logprobs"? (0..20), "echo"?, "stream"?, "stream_options"?,
                                     "truncate_prompt_tokens"?}                                decoders
    POST /v1/chat/completions       {"model", "messages", ...same..., "logprobs"? (true/false),  decoders with
                                     "top_logprobs"? (0..20)}                                  a chat template
    POST /v1/load_lora_adapter      {"lora_name", "lora_path"?}: load a store entry (vLLM's shape)
    POST /v1/unload_lora_adapter    {"lora_name"}

and vLLM's routes outside OpenAI's API, in vLLM's shapes:

    POST /tokenize                  {"model"?, "prompt", "add_special_tokens"?: true, "return_token_strs"?}
                                    or {"model"?, "messages", "add_generation_prompt"?: true,
                                    "continue_final_message"?, "add_special_tokens"?: false, "chat_template_kwargs"?,
                                    "return_token_strs"?} -> {"count", "max_model_len", "tokens", "token_strs"?}
    POST /detokenize                {"model"?, "tokens"} -> {"prompt"}
    GET  /version                   {"version"}: bca-deploy's

``/tokenize`` counts every token of a text past the context too, as vLLM does (a client asks to learn whether it
fits); the work is bounded by ``--max-text-chars`` (a prompt) and the chat route's rendered-characters limit
(messages). ``/detokenize`` decodes with the special tokens, as vLLM does; an id outside the model's vocabulary or not
an integer, or more ids than the larger of ``max_model_len`` and ``--max-text-chars``, is a 400 naming ``tokens``.
``model`` (optional, as in vLLM: the base model) is checked as every route checks it (404 for one not loaded).

``model`` is an adapter's name, or the base model's served name (``--served-model-name``, default: the
export directory's name) or ``"__base__"`` for no adapter. ``temperature`` 0 is greedy decoding
(token-equal to PyTorch's ``generate`` given the same end-of-sequence ids); otherwise tokens are sampled, every
prompt of a request with ``seed`` itself (as vLLM: a prompt samples as it would alone; its ``n`` choices with
``seed``, ``seed + 1``, ...; ``seed`` -1 is none, as in vLLM). ``temperature``,
``top_p`` and ``top_k`` left out take the export's ``generation_config.json`` values, as vLLM does, else OpenAI's
defaults (1, 1, off). ``presence_penalty`` and ``frequency_penalty`` (OpenAI's, in [-2, 2]) and vLLM's
``repetition_penalty`` (> 0; left out: the ``generation_config.json`` value, else 1) are applied as vLLM applies
them, to the raw logits before the temperature (see :class:`~bca_deploy.serving.decoding.SamplingParams`); greedy
decoding with a ``repetition_penalty`` is token-equal to ``generate(repetition_penalty=...)``. ``logit_bias``
(OpenAI's: ``{"token id": bias in [-100, 100]}``, ids in the vocabulary written in decimal, at most
:data:`~bca_deploy.serving.limits.MAX_LOGIT_BIAS` (OpenAI's 300); each problem a 400 naming ``logit_bias`` and the
keys; vLLM would clamp a value outside the range, OpenAI refuses it, as here) is added to those logits first, before
the penalties (vLLM's order), greedy rows too. vLLM's ``min_p`` (in [0, 1], 0: off; left out or null: the
``generation_config.json`` value, else 0, as vLLM reads it) drops, when sampling, the tokens less likely than ``min_p``
times the most likely one after the temperature, before top-k and top-p (vLLM's order; transformers' ``MinPLogitsWarper``
rule). A row ends at any
end-of-sequence id of ``config.json``, ``generation_config.json`` or the tokenizer
(:attr:`~bca_deploy.serving.MultiAdapterSession.eos_token_ids`).
``lora_path`` is a name in the adapter store, never a filesystem path.

Log-probabilities, as OpenAI and vLLM return them: chat's ``logprobs: true`` (with ``top_logprobs``: that many
alternatives, 0..20, only with ``logprobs: true``) gives each choice ``logprobs.content``, one ``{"token",
"logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}, ...]}`` per generated token; completions'
``logprobs: N`` (0..20, vLLM's default bound; OpenAI's is 5) gives ``{"tokens", "token_logprobs", "top_logprobs",
"text_offset"}`` (``top_logprobs``: the N most likely tokens, plus the chosen one when it is not among them;
``text_offset``: where each token's text starts in the choice's text, streamed or not). Every
generated token is listed, the end-of-sequence token and one cut by a stop string included (as ``usage`` counts
them); a token's ``token`` is its own text (the id decoded alone, special tokens kept, as vLLM shows it), except a
byte-level token that is only part of a character (an emoji's or a CJK character's first bytes: its decode is
U+FFFD, the same for all of them), written as OpenAI writes it, ``"bytes:\\xe2\\x80"``, chat's ``bytes`` then its
true bytes (:meth:`~bca_deploy.serving.MultiAdapterSession.token_texts`, ``token_bytes``), so two such alternatives
are two keys of completions' ``top_logprobs``. Streamed,
each chunk carries the log-probabilities of its tokens (a token with no text of its own goes with the next chunk).
The distribution is the model's raw one, vLLM's default: log_softmax of the logits of the adapter's model, before
``logit_bias``, penalties, ``min_tokens`` masking, temperature, min-p, top-k and top-p, so the numbers are the same
however a choice
samples (``n`` > 1, streamed or not); each row's are computed on its own logits, only for the rows that ask.
The native ``/v1/generate`` lists them by token id (its ``logprobs`` and ``prompt_logprobs``).

An answer that is not streamed holds every log-probability it lists until it is sent: one whose worst case (rows x
(echoed prompt tokens + ``max_tokens``) x (``logprobs`` + 1), each prompt's ``n`` choices a row each) is past
``--max-logprob-entries`` (:func:`check_logprob_entries`, default
:data:`~bca_deploy.serving.limits.MAX_LOGPROB_ENTRIES`) is refused before any work (400 naming the fields that asked:
``logprobs`` / ``top_logprobs``, ``max_tokens``, ``n``, the prompts; stream it, or ask fewer). A streamed answer
sends its tokens' log-probabilities a chunk at a time and is held to the bound for what it keeps: its echoed prompts'
(and, read for tool calls, all of them: a call is held until it is whole); a client that leaves more than the bound
unread, its connection full (:meth:`_Pumps._reader_behind`), has its rows stopped and gets a 408 error event after what
was queued.

Completions' ``echo: true`` (OpenAI's, vLLM's) puts the prompt before each choice's text: a text prompt as sent, token
ids decoded (special tokens left out, as in every text here). With ``logprobs`` N it also scores the prompt, what
evaluation harnesses (lm-evaluation-harness' ``local-completions``: ``"echo": true, "max_tokens": 0`` or 1,
``"logprobs": 1``) read a continuation's log-likelihood from: the prompt's tokens come first in ``tokens``,
``token_logprobs``, ``top_logprobs`` and ``text_offset``, then the generated ones; the first prompt token's
``token_logprobs`` and ``top_logprobs`` are null (nothing comes before it), each other's is its log-probability under
the logits of the position before it (teacher-forced, the adapter's model, the raw distribution as for generated
tokens), with the N most likely tokens there (plus itself). ``text_offset`` runs over the whole echoed text (a prompt
token's text starts where the token before it ends in the prompt). ``max_tokens: 0`` (with ``echo`` only, as in
vLLM) generates nothing: the prompt alone, ``finish_reason`` ``"length"``, ``completion_tokens`` 0. Streamed, each
choice's first chunk is its echoed prompt (with its log-probabilities), as vLLM sends it. The prompt is scored in
the engine's prefill (:attr:`~bca_deploy.serving.decoding.SamplingParams.prompt_logprobs`), under the same admission
and turns as any row; every position's logits are held a chunk at a time (``MAX_SCORE_LOGITS``). The prompt's
entries count toward ``--max-logprob-entries`` as the generated tokens' do (above), streamed or not.

Chat messages reach the template as vLLM passes them: text parts joined with a line break, ``name`` kept.
An assistant message sent back as the client got it (``message.model_dump()``: ``refusal``, ``tool_calls``...
null) is read as its text.

Tool calling, as vLLM serves it (:mod:`bca_deploy.serving.tools`): a request's ``tools`` reach the template as
``apply_chat_template(..., tools=...)`` takes them (on ``/tokenize`` too); assistant messages with ``tool_calls``
(their ``arguments`` given to the template as dicts, as vLLM passes them) and ``tool`` messages (``tool_call_id``)
are taken; ``tool_choice`` ``"auto"`` (the default with tools) reads each choice's text with the server's
``--tool-call-parser`` (``hermes`` or ``llama3_json``; a 400 naming ``--enable-auto-tool-choice`` and
``--tool-call-parser`` when the server has none) into ``message.tool_calls`` / streamed ``delta.tool_calls``,
``finish_reason`` ``"tool_calls"``; ``"none"`` renders the tools and reads nothing; ``"required"`` and a named
function are refused (they need constrained decoding).

Fields of OpenAI's schema that do not change the answer (``user``, ``metadata``, ``store``,
``service_tier``...) are accepted and ignored; fields that would change it and are not implemented
are refused with 400 (``invalid_request``; the native routes answer 422) unless they hold their neutral
value (``best_of`` > 1, ``suffix``,
``tool_choice`` ``"required"``, ``response_format`` other than text, ...). vLLM's extensions: ``top_k``,
``stop_token_ids``,
``repetition_penalty``, ``ignore_eos``, ``min_tokens``, ``min_p`` and ``stream_options.continuous_usage_stats`` are
served, and
chat's ``chat_template_kwargs``, ``documents``, ``add_generation_prompt``, ``continue_final_message``, ``echo`` and
``add_special_tokens`` (see :class:`ChatCompletionRequest`); ``skip_special_tokens``,
``spaces_between_special_tokens`` and ``include_stop_str_in_output`` are accepted at vLLM's default only, and a
request's ``chat_template`` is refused. ``truncate_prompt_tokens`` (completions, chat and embeddings) cuts each
prompt to that many tokens as vLLM cuts it: a completion's text keeps its *last* tokens (vLLM's tokenizer for
generation truncates on the left; its special tokens kept), and so does a chat conversation's text once the template
has rendered it (the same rule, :meth:`~bca_deploy.serving.MultiAdapterSession.prepare`; ``echo`` is still the last
message's text as sent, as in vLLM), an embedding's text its first ones (vLLM's
for pooling truncates on the right; at most where texts are cut anyway), a token-id prompt its last ones (both
routes, as vLLM slices them); -1 is the model's ``max_model_len``; above it, 0 or below -1 is a 400. A long text is
not tokenized whole for it (:func:`~bca_deploy.serving.prefix.bounded_ids`: a suffix or prefix cut at a space).
Other fields outside OpenAI's schema are refused. Errors have OpenAI's shape (see :mod:`bca_deploy.serving.wire`),
so the client raises its typed exceptions.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

import numpy as np
from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator, model_validator
from starlette.concurrency import run_in_threadpool

from ..config import show_json_value
from ..errors import BCAError, ContextLengthError
from .limits import MAX_LOGPROBS
from .session import BASE
from .tools import (CHAT_ROLES, content_text, make_parser, message_tool_problems, parse_tool_calls,
                    template_message, tool_calls_problems, tools_problems, unanswered_tool_message)
from .wire import (
    READ_METHODS,
    AdapterExistsError,
    InvalidRequestError,
    JSONNumber,
    RequestTimeoutError,
    error_body,
    error_status,
    is_openai_request,
    field_errors,
    json_answer,
    parse_body,
    validate_body,
)

if TYPE_CHECKING:
    from .http import Server

__all__ = ["add_routes", "model_card", "check_logprob_entries", "EmbeddingsRequest", "CompletionRequest",
           "ChatCompletionRequest", "TokenizeCompletionRequest", "TokenizeChatRequest", "DetokenizeRequest"]


class _OpenAIRequest(BaseModel):
    """Fields outside OpenAI's schema are refused; harmless ones of the schema are ignored."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    model: StrictStr
    user: StrictStr | None = None  # ignored: OpenAI uses it for abuse monitoring


def _refuse(problems: list[str], name: str, value: Any, neutral: Any, why: str) -> None:
    if value is not None and value != neutral and not (isinstance(neutral, tuple) and value in neutral):
        problems.append(f"{name}: {show_json_value(value)} is not supported ({why})")  # described: it may be MBs


def _is_count(value: Any) -> bool:
    """An integer of JSON (not a boolean)."""
    return isinstance(value, int) and not isinstance(value, bool)


class EmbeddingsRequest(_OpenAIRequest):
    """``POST /v1/embeddings`` in OpenAI's shape, with vLLM's ``truncate_prompt_tokens``."""

    input: Union[StrictStr, list[StrictStr], list[StrictInt], list[list[StrictInt]]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = Field(default=None, ge=1)
    truncate_prompt_tokens: StrictInt | None = None  # vLLM's: see truncate_prompt_tokens()


#: Sampling fields whose OpenAI schema allows null, meaning the default (clients generated from the schema send
#: null for a value left unset); the others with a non-None default here are not nullable there. (vLLM's ``min_p``:
#: null is its default too, generation_config.json's value, as vLLM reads it.)
_NULL_MEANS_DEFAULT = frozenset({"temperature", "top_p", "n", "stream", "min_p"})


class _Sampling(_OpenAIRequest):
    """What completions and chat completions share."""

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if not (v is None and k in _NULL_MEANS_DEFAULT)}
        return data

    max_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: JSONNumber = Field(default=1.0, ge=0, le=2)
    top_p: JSONNumber = Field(default=1.0, gt=0, le=1)
    top_k: StrictInt | None = Field(default=None, ge=-1)  # vLLM's extension (-1 or 0: off)
    # vLLM's range, int64; -1 is vLLM's "no seed" (clients send it for "random"), see _engine_seed
    seed: StrictInt | None = Field(default=None, ge=-2**63, lt=2**63)
    stop: Union[StrictStr, list[StrictStr], None] = None
    stream: StrictBool = False
    stream_options: dict[str, Any] | None = None
    n: StrictInt = Field(default=1, ge=1)  # choices per prompt (each a row of its own; rows limited per request)
    logprobs: Any = None
    top_logprobs: Any = None
    # OpenAI's ranges, as vLLM checks them (null: 0, off)
    presence_penalty: JSONNumber | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: JSONNumber | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, Any] | None = None  # {"token id": bias in [-100, 100]}, checked by SamplingParams
    # vLLM's sampling extensions (clients written for vLLM send them): stop_token_ids, repetition_penalty, ignore_eos,
    # min_tokens and min_p are served; the others are accepted at their neutral value (vLLM's default) and refused
    # otherwise.
    stop_token_ids: list[StrictInt] | None = None
    ignore_eos: StrictBool | None = None
    min_tokens: StrictInt | None = Field(default=None, ge=0)  # at most the row's max tokens (SamplingParams)
    min_p: JSONNumber | None = Field(default=None, ge=0, le=1)  # null: generation_config.json's, else 0 (off)
    repetition_penalty: JSONNumber | None = Field(default=None, gt=0)  # null: generation_config.json's, else 1 (off)
    skip_special_tokens: StrictBool | None = None
    spaces_between_special_tokens: StrictBool | None = None
    include_stop_str_in_output: StrictBool | None = None
    truncate_prompt_tokens: StrictInt | None = None
    # OpenAI fields that do not change the answer: accepted, ignored.
    metadata: dict[str, Any] | None = None
    store: StrictBool | None = None
    service_tier: StrictStr | None = None
    prompt_cache_key: StrictStr | None = None
    safety_identifier: StrictStr | None = None

    def unsupported(self) -> list[str]:
        problems = self.logprobs_problems()
        _refuse(problems, "skip_special_tokens", self.skip_special_tokens, True, "special tokens are left out of text")
        _refuse(problems, "spaces_between_special_tokens", self.spaces_between_special_tokens, True,
                "special tokens are left out of text")
        _refuse(problems, "include_stop_str_in_output", self.include_stop_str_in_output, False,
                "the text is cut before a stop string")
        if self.stream_options is not None:
            # OpenAI's keys, and vLLM's continuous_usage_stats (usage in every chunk, with include_usage)
            extra = set(self.stream_options) - {"include_usage", "include_obfuscation", "continuous_usage_stats"}
            flags = [k for k, v in self.stream_options.items() if k not in extra and not isinstance(v, bool)]
            if extra:
                shown = ", ".join(repr(k[:40]) for k in sorted(extra)[:5]) + (", ..." if len(extra) > 5 else "")
                problems.append(f"stream_options: {len(extra)} unknown key(s) ({shown})")
            elif flags:
                problems.append(f"stream_options: {', '.join(flags)} must be true or false")
            elif not self.stream:
                problems.append("stream_options: only with stream: true")
        return problems

    def logprobs_problems(self) -> list[str]:
        """What is wrong with the request's ``logprobs`` / ``top_logprobs`` (each route reads them its own way)."""
        raise NotImplementedError

    def logprob_count(self) -> int | None:
        """The engine's ``logprobs``: alternatives per token (0 or more), or ``None`` for no log-probabilities."""
        raise NotImplementedError

    def usage_options(self) -> tuple[bool, bool]:
        """``(include_usage, continuous)`` of a streamed answer, from ``stream_options``: OpenAI's ``include_usage``
        (a last chunk with the request's usage; left out: false, OpenAI's default) and vLLM's
        ``continuous_usage_stats`` (every chunk with its choice's usage so far, only with ``include_usage``). Sent
        without ``include_usage``, ``continuous_usage_stats`` reads it as vLLM's default (true): a client of vLLM's
        field gets the usage vLLM sends it, not none."""
        options = self.stream_options or {}
        continuous = bool(options.get("continuous_usage_stats"))
        include = options.get("include_usage")
        include = continuous if include is None else bool(include)
        return include, include and continuous


class CompletionRequest(_Sampling):
    """``POST /v1/completions`` (OpenAI's legacy completions): one choice per prompt."""

    prompt: Union[StrictStr, list[StrictStr], list[StrictInt], list[list[StrictInt]]]
    max_tokens: StrictInt | None = Field(default=None, ge=0)  # 0: with echo only (the prompt alone)
    best_of: StrictInt | None = None
    echo: StrictBool | None = None
    suffix: StrictStr | None = None

    def logprobs_problems(self) -> list[str]:
        # an integer (0: the chosen tokens' alone; OpenAI's and vLLM's reading, so 0 is not "none": only null is);
        # a boolean is refused, not read as 0 or 1: it is chat's shape, and neither reading is what its sender meant
        problems = []
        if self.logprobs is not None and (not _is_count(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            problems.append(f"logprobs: must be null or an integer from 0 to {MAX_LOGPROBS} (the most likely tokens "
                            f"listed beside each chosen one), got {show_json_value(self.logprobs)}")
        _refuse(problems, "top_logprobs", self.top_logprobs, 0,
                f'a chat completions field; completions take "logprobs": 0..{MAX_LOGPROBS}')
        return problems

    def logprob_count(self) -> int | None:
        return self.logprobs

    def unsupported(self) -> list[str]:
        problems = super().unsupported()
        _refuse(problems, "best_of", self.best_of, 1, "one candidate per prompt")
        if self.max_tokens == 0 and not self.echo:
            # vLLM's rule: no token and no prompt is an empty answer; with echo it is the prompt (scored with logprobs)
            problems.append('max_tokens: 0 is taken with "echo": true only (the prompt alone, scored with "logprobs"); '
                            "ask for at least 1 token")
        _refuse(problems, "suffix", self.suffix, "", "no insertion mode")
        return problems


class ChatMessage(BaseModel):
    """One chat message: a role and its text (a string, or text parts); an assistant message may carry the
    ``tool_calls`` it made (its content then null or absent), and a ``tool`` message answers one of them
    (``tool_call_id``).

    An assistant message a client sends back as it got it (``message.model_dump()`` of the ``openai`` client, or a
    vLLM answer) carries the answer's other fields, empty: ``refusal``, ``function_call``, ``audio``,
    ``annotations`` (and vLLM's ``reasoning_content``) are accepted when null (or an empty list), as they say
    nothing; with a value they are refused (audio, refusals and reasoning are not implemented).
    """

    model_config = ConfigDict(extra="forbid")
    role: Literal[CHAT_ROLES]  # type: ignore[valid-type]  # (one constant: training's conversations take these too)
    content: StrictStr | None = None  # a string or text parts, read into their text by _text_parts_only
    name: StrictStr | None = None
    tool_calls: Any = None  # an assistant's: checked by tools.tool_calls_problems (each problem with its path)
    tool_call_id: StrictStr | None = None  # a tool message's: the call it answers
    # fields of an answer's message, sent back with the conversation: accepted empty only (see _has_content)
    refusal: Any = None
    function_call: Any = None
    audio: Any = None
    annotations: Any = None
    reasoning_content: Any = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, content: Any) -> Any:
        # text parts read into their text by the one rule training's conversations are read by (tools.content_text):
        # a content that is not a string or text parts (an image or audio part, a number) named by its first wrong
        # part and what is taken instead, not with pydantic's attempt at each branch of a union. null is left to
        # _has_content.
        text, problem = content_text(content)
        if problem is not None:
            raise ValueError(problem)
        return text

    @field_validator("tool_calls", mode="after")
    @classmethod
    def _tool_calls(cls, calls: Any) -> Any:
        if calls is None or calls == []:  # an answer sent back as it came (no calls): nothing
            return None
        problems = tool_calls_problems(calls, "tool_calls")
        if problems:
            raise ValueError("; ".join(problems))
        return calls

    @model_validator(mode="after")
    def _has_content(self) -> ChatMessage:
        for field in ("refusal", "function_call", "audio", "annotations", "reasoning_content"):
            value = getattr(self, field)
            if value is not None and value != []:
                raise ValueError(f"{field}: only null is supported in a message (audio, refusals, legacy function "
                                 "calls and reasoning are not implemented)")
        problems = message_tool_problems(self.role, self.content is not None, self.tool_calls, self.tool_call_id)
        if problems:
            raise ValueError(problems[0])
        return self

    def text(self) -> str:
        # text parts were joined with a line break when read (tools.content_text), as vLLM (and SGLang, TensorRT-LLM)
        # join them
        return self.content or ""

    def for_template(self) -> dict[str, Any]:
        """The message as the chat template sees it, as vLLM passes it: role, text ("" for an assistant message
        with tool calls and no content), ``name`` when given, an assistant's ``tool_calls`` with their arguments as
        dicts (:func:`~bca_deploy.serving.tools.template_tool_calls`), a tool message's ``tool_call_id``."""
        return template_message(self.role, self.text(), self.name, self.tool_calls, self.tool_call_id)


def _rendering_problems(chat_template: str | None, chat_template_kwargs: Mapping[str, Any] | None,
                        continue_final_message: bool | None, add_generation_prompt: bool) -> list[str]:
    """What is wrong with how a request asks its messages rendered (the chat route's and ``/tokenize``'s one rule):
    a template of its own, reserved or bad ``chat_template_kwargs``, ``continue_final_message`` with a generation
    prompt."""
    from .chat_template import template_kwargs_problems

    problems: list[str] = []
    if chat_template is not None:
        problems.append("chat_template: a chat template sent with a request is not accepted (a template is code the "
                        "server would run; vLLM refuses it too unless started with --trust-request-chat-template); "
                        "this server renders the model's own template")
    if chat_template_kwargs:
        problems += template_kwargs_problems(chat_template_kwargs)
    if continue_final_message and add_generation_prompt:
        problems.append('continue_final_message: cannot be true with add_generation_prompt true (its default), as in '
                        'vLLM: send "add_generation_prompt": false to continue the last message')
    return problems


def _tools_problems(tools: list[Any] | None, tool_choice: Any, decoded: bool = True) -> list[str]:
    """What is wrong with a request's ``tools`` (:func:`~bca_deploy.serving.tools.tools_problems`: each problem with
    its path) and ``tool_choice`` (OpenAI's: ``"none"``, ``"auto"``, ``"required"`` or ``{"type": "function",
    "function": {"name"}}``). ``"required"`` and a named function are refused when the request is ``decoded`` (the
    chat route): both need decoding constrained to the tools' schemas (vLLM's structured outputs), which this server
    does not have; ``/tokenize`` (not decoded: the prompt is the same whatever the choice) takes them, a named function
    being one of the tools. Without tools they are refused as vLLM refuses them."""
    problems = tools_problems(tools) if tools else []
    if tool_choice is None or tool_choice in ("none", "auto"):
        return problems
    named = isinstance(tool_choice, dict) and tool_choice.get("type") == "function" \
        and isinstance(tool_choice.get("function"), dict) and isinstance(tool_choice["function"].get("name"), str) \
        and set(tool_choice) == {"type", "function"} and set(tool_choice["function"]) == {"name"}
    if tool_choice != "required" and not named:
        problems.append(f'tool_choice: must be "none", "auto", "required" or {{"type": "function", "function": '
                        f'{{"name": ...}}}}, got {show_json_value(tool_choice)}')
    elif not tools:
        problems.append("tool_choice: names a tool choice but the request has no tools")
    elif not decoded:
        names = {t["function"]["name"] for t in tools if isinstance(t, dict) and isinstance(t.get("function"), dict)
                 and isinstance(t["function"].get("name"), str)}
        if named and tool_choice["function"]["name"] not in names:
            problems.append(f"tool_choice: names function {show_json_value(tool_choice['function']['name'])}, which is "
                            "not one of the request's tools")
    else:
        what = '"required"' if tool_choice == "required" else f"a named function ({tool_choice['function']['name']!r})"
        problems.append(f'tool_choice: {what} is not supported: it needs decoding constrained to the tools\' schemas, '
                        'which this server does not have; send "auto" (the model chooses; the server needs '
                        '--enable-auto-tool-choice and --tool-call-parser) or "none"')
    return problems


def _tool_messages_answer_calls(messages: list[ChatMessage]) -> list[ChatMessage]:
    found = unanswered_tool_message([(m.role, m.tool_calls, m.tool_call_id) for m in messages])
    if found is not None:
        raise ValueError(f"message {found[0]} (a tool message): {found[1]}")
    return messages


#: A chat request's messages (the chat route's and /tokenize's): each checked alone, then each tool message against
#: the calls it answers (tools.unanswered_tool_message).
ChatMessages = Annotated[list[ChatMessage], Field(min_length=1), AfterValidator(_tool_messages_answer_calls)]


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``: messages through the tokenizer's chat template.

    vLLM's chat extensions are served as vLLM serves them (null: the default): ``chat_template_kwargs`` (template
    variables such as Qwen3's ``enable_thinking``; keys that are arguments of the render itself are refused, see
    :func:`~bca_deploy.serving.chat_template.template_kwargs_problems`) and ``documents`` reach the template;
    ``add_generation_prompt`` (true) and ``continue_final_message`` (false: the last message left open, for the model
    to continue: a prefilled answer) are the render's, both true refused as vLLM refuses them; without the generation
    prompt the answer's role is the last message's (vLLM's). ``echo``: the answer starts with the last message's text
    when that message has the answer's role. ``add_special_tokens`` (false): the tokenizer's special tokens added to
    the rendered text. ``chat_template`` (a template sent with the request: code run on the server) is refused, as
    vLLM refuses it unless started with ``--trust-request-chat-template``.
    """

    messages: ChatMessages
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: StrictBool | None = None  # ignored without tools
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None
    modalities: list[StrictStr] | None = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    web_search_options: Any = None
    # vLLM's chat extensions (see the class docstring); null is the default
    echo: StrictBool | None = None
    add_generation_prompt: StrictBool | None = None
    continue_final_message: StrictBool | None = None
    add_special_tokens: StrictBool | None = None
    documents: list[dict[str, StrictStr]] | None = None
    chat_template: StrictStr | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    def unsupported(self) -> list[str]:
        problems = super().unsupported()
        problems += _rendering_problems(self.chat_template, self.chat_template_kwargs, self.continue_final_message,
                                        self.generation_prompt)
        problems += _tools_problems(self.tools, self.tool_choice)
        _refuse(problems, "functions", self.functions or None, None, "function calling is not implemented")
        _refuse(problems, "function_call", self.function_call, ("none", "auto"), "function calling is not implemented")
        if self.response_format is not None and self.response_format != {"type": "text"}:
            problems.append(f"response_format: {self.response_format!r} is not supported (text only)")
        _refuse(problems, "modalities", self.modalities, (["text"],), "text only")
        for name in ("audio", "prediction", "reasoning_effort", "verbosity", "web_search_options"):
            _refuse(problems, name, getattr(self, name), None, "not implemented")
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            problems.append("max_completion_tokens: disagrees with max_tokens; send one of them")
        return problems

    def logprobs_problems(self) -> list[str]:
        # OpenAI's: logprobs a boolean, top_logprobs 0..20 and only with logprobs true (vLLM refuses a top_logprobs
        # above 0 without it, and takes 0 as none: so does this server)
        problems = []
        if self.logprobs is not None and not isinstance(self.logprobs, bool):
            problems.append(f"logprobs: must be true or false, got {show_json_value(self.logprobs)}")
        top = self.top_logprobs
        if top is not None and (not _is_count(top) or not 0 <= top <= MAX_LOGPROBS):
            problems.append(f"top_logprobs: must be null or an integer from 0 to {MAX_LOGPROBS}, "
                            f"got {show_json_value(top)}")
        elif top and self.logprobs is not True:
            problems.append('top_logprobs: needs "logprobs": true (as OpenAI and vLLM require)')
        return problems

    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs is True else None

    @property
    def generation_prompt(self) -> bool:
        """``add_generation_prompt``, null read as vLLM's default (true)."""
        return self.add_generation_prompt is not False

    def template_kwargs(self) -> dict[str, Any]:
        """The template variables of the render: ``chat_template_kwargs``, and ``documents`` when given (transformers'
        argument of that name, as vLLM passes it)."""
        kwargs = dict(self.chat_template_kwargs or {})
        if self.documents is not None:
            kwargs["documents"] = self.documents
        if self.tools:  # transformers' argument, as vLLM passes it (tool_choice "none" too: the model sees them)
            kwargs["tools"] = self.tools
        return kwargs

    def tool_parser(self, options) -> str | None:
        """The ``--tool-call-parser`` that reads this request's answer, or None when it is not read for calls (no
        tools, or ``tool_choice`` ``"none"``). ``"auto"`` (the default with tools, as in vLLM) needs the server
        started with ``--enable-auto-tool-choice`` and a ``--tool-call-parser``: a 400 naming them otherwise, as
        vLLM answers it (the request's ``tool_choice`` named, else ``tools``)."""
        if not self.tools or self.tool_choice == "none":
            return None
        if not (options.enable_auto_tool_choice and options.tool_call_parser):
            raise InvalidRequestError(
                '"auto" tool choice (the default when tools are given) requires the server to be started with '
                "--enable-auto-tool-choice and --tool-call-parser (hermes or llama3_json: the format the model writes "
                'its calls in); send "tool_choice": "none" to render the tools without reading calls',
                param="tool_choice" if self.tool_choice is not None else "tools")
        return options.tool_call_parser

    def answer_role(self) -> str:
        """The answer's role, as vLLM gives it: the assistant's after the generation prompt, else the last message's
        (the one continued, with ``continue_final_message``)."""
        return "assistant" if self.generation_prompt else self.messages[-1].role

    def echoed(self) -> str:
        """What vLLM's ``echo`` puts before each choice's text: the last message's text when that message has the
        answer's role (a prefilled assistant message), else nothing."""
        last = self.messages[-1]
        return last.text() if self.echo and last.role == self.answer_role() else ""


class TokenizeCompletionRequest(_OpenAIRequest):
    """vLLM's ``POST /tokenize`` of a prompt: its ids as ``tokenizer(prompt, add_special_tokens=...)`` gives them."""

    model: StrictStr | None = None  # vLLM's: optional (the base model)
    prompt: StrictStr
    add_special_tokens: StrictBool = True
    return_token_strs: StrictBool | None = False


class TokenizeChatRequest(_OpenAIRequest):
    """vLLM's ``POST /tokenize`` of chat messages: the ids of the chat template's text, as the chat route makes its
    prompt (``add_generation_prompt``, ``continue_final_message``, ``add_special_tokens``, ``chat_template_kwargs``
    and ``tools`` as :class:`ChatCompletionRequest` reads them; vLLM's defaults). ``tool_choice``, which vLLM's
    ``/tokenize`` ignores (a chat body sent here as it is, to count its prompt), is checked as the chat route checks
    its form and does not change the prompt (the chat route renders the tools whatever the choice)."""

    model: StrictStr | None = None
    messages: ChatMessages
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False
    add_special_tokens: StrictBool = False
    return_token_strs: StrictBool | None = False
    chat_template: StrictStr | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None

    def unsupported(self) -> list[str]:
        problems = _rendering_problems(self.chat_template, self.chat_template_kwargs, self.continue_final_message,
                                       self.add_generation_prompt)
        problems += _tools_problems(self.tools, self.tool_choice, decoded=False)
        return problems

    def template_kwargs(self) -> dict[str, Any]:
        """The render's template variables: ``chat_template_kwargs``, and ``tools`` when given (vLLM's)."""
        kwargs = dict(self.chat_template_kwargs or {})
        if self.tools:
            kwargs["tools"] = self.tools
        return kwargs


class DetokenizeRequest(_OpenAIRequest):
    """vLLM's ``POST /detokenize``: ``tokenizer.decode(tokens)`` (special tokens kept, as vLLM decodes them)."""

    model: StrictStr | None = None
    tokens: list[StrictInt]


class LoadLoraRequest(BaseModel):
    """``POST /v1/load_lora_adapter`` (vLLM's shape): ``lora_path`` is a store name, never a path."""

    model_config = ConfigDict(extra="forbid")
    lora_name: StrictStr
    lora_path: StrictStr | None = None
    load_inplace: StrictBool = False  # vLLM: replace an adapter of that name


class UnloadLoraRequest(BaseModel):
    """``POST /v1/unload_lora_adapter``."""

    model_config = ConfigDict(extra="forbid")
    lora_name: StrictStr
    lora_int_id: StrictInt | None = None  # vLLM sends it; names identify adapters here


def truncate_prompt_tokens(server: Server, value: int | None) -> int | None:
    """vLLM's ``truncate_prompt_tokens`` as a count of tokens to keep (None: not truncated): -1 is the model's
    ``max_model_len`` (:attr:`~bca_deploy.serving.http.Server.max_model_len`), a count above it is refused as vLLM
    refuses it, and 0 (no prompt left) or below -1 is refused."""
    if value is None:
        return None
    limit = server.max_model_len
    if value == -1:
        return limit
    if value < 1:
        raise InvalidRequestError(f"truncate_prompt_tokens: {value} is not a number of tokens to keep; send -1 (the "
                                  "model's maximum length) or at least 1", param="truncate_prompt_tokens")
    if limit and value > limit:
        raise InvalidRequestError(f"truncate_prompt_tokens: {value} is greater than the model's max_model_len of "
                                  f"{limit} tokens; send a smaller truncation size (or -1)",
                                  param="truncate_prompt_tokens")
    return value


def model_card(name: str, parent: str | None, created: int, max_model_len: int | None) -> dict[str, Any]:
    """One ``/v1/models`` entry, as ``bca-deploy serve`` and the Ray router list them: ``parent`` the base model's name
    for an adapter (None for the base model); ``max_model_len`` vLLM's field (clients size prompts by it), the same
    for the base model and every adapter."""
    return {"id": name, "object": "model", "created": created, "owned_by": "bca-deploy", "root": name,
            "parent": parent, "max_model_len": max_model_len}


def _as_rows(value: Any) -> list:
    """OpenAI's input/prompt shapes as rows: a text, texts, one token list, or token lists."""
    if isinstance(value, str):
        return [value]
    if value and all(isinstance(t, int) for t in value):
        return [list(value)]
    return list(value)


def _refuse_empty(value: Any, rows: list) -> None:
    """OpenAI's embeddings refuse an empty ``input`` and any empty text or token list in it (the vector of no text
    is the model's bias, not something a client meant to ask for); ``rows`` is :func:`_as_rows` of ``value``."""
    if not rows or (isinstance(value, str) and not value):
        raise InvalidRequestError("input: must not be empty", param="input")
    for i, row in enumerate(rows):
        if len(row) == 0:
            what = "text" if isinstance(row, str) else "token list"
            raise InvalidRequestError(f"input[{i}]: an empty {what}; each input must have at least one character "
                                      "or token", param="input")


def add_routes(app, server: Server, native_embeddings) -> None:
    """Add the OpenAI-compatible routes to ``app`` (``native_embeddings``: the handler of native embedding bodies)."""
    options = server.options
    created = int(time.time())

    def check(body: _Sampling | EmbeddingsRequest | TokenizeChatRequest) -> None:
        problems = body.unsupported() if isinstance(body, (_Sampling, TokenizeChatRequest)) else []
        if problems:
            # the problem's top-level field: "tools" of "tools[2].function.name: ..."
            field = re.match(r"[A-Za-z_]\w*", problems[0].split(":")[0])
            raise InvalidRequestError("; ".join(problems), param=field.group() if field else None)

    def card(name: str, parent: str | None) -> dict[str, Any]:
        return model_card(name, parent, created, server.max_model_len)

    @app.api_route("/v1/models", methods=READ_METHODS)
    async def list_models():
        cards = [card(server.model_name, None)]
        if options.list_adapters:
            cards += [card(name, server.model_name) for name in sorted(server.session.snapshot().slots)]
        return {"object": "list", "data": cards}

    @app.api_route("/v1/models/{model}", methods=READ_METHODS)
    async def get_model(model: str):
        if model in (server.model_name, BASE):
            return card(server.model_name, None)
        server.adapter(model, param="model")
        return card(model, server.model_name)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        server.require("embed")
        body = await server.body(request)
        data = await parse_body(body, options, request.headers)
        if not is_openai_request(request.url.path, data):
            return await native_embeddings(request, data)
        request.state.openai = True  # its refusals are OpenAI's 400s (wire.error_status)
        req = await validate_body(EmbeddingsRequest, data, len(body), options.max_request_rows)
        adapter = server.select(request, req.model, param="model")
        hidden = int(getattr(server.session.config, "hidden_size", 0) or 0)
        if req.dimensions is not None and req.dimensions != hidden:
            raise InvalidRequestError(f"dimensions: {req.dimensions} is not supported; this model's embeddings have "
                                      f"{hidden} dimensions", param="dimensions")
        rows = _as_rows(req.input)
        _refuse_empty(req.input, rows)
        recipe = server.embeddings
        vectors, token_rows = await server.infer(request, "embed", rows, adapter,
                                                 {"pooling": recipe.pooling, "normalize": recipe.normalize},
                                                 max_text_tokens=recipe.max_text_tokens,
                                                 keep_tokens=truncate_prompt_tokens(server, req.truncate_prompt_tokens))
        tokens = sum(len(r) for r in token_rows)

        def answer() -> dict[str, Any]:  # in a worker thread: 256 vectors of thousands of floats each
            if req.encoding_format == "base64":
                items = [base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode("ascii") for v in vectors]
            else:
                items = [np.asarray(v, dtype=np.float32).tolist() for v in vectors]
            return {"object": "list", "model": req.model,
                    "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(items)],
                    "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

        return await json_answer(answer)

    @app.post("/v1/completions")
    async def completions(request: Request):
        server.require("generate")
        req = await server.read(request, CompletionRequest)
        check(req)
        adapter = server.select(request, req.model, param="model")
        rows = _as_rows(req.prompt)
        server.check_rows(len(rows), "prompt")
        server.check_rows(len(rows) * req.n, "n")  # every choice is a row
        keep = truncate_prompt_tokens(server, req.truncate_prompt_tokens)
        prompts = await server.prepare(rows, param="prompt", keep_tokens=keep)
        # a prompt cut by truncate_prompt_tokens is echoed as what the model read: its kept ids, decoded
        echo_rows = (rows if keep is None else prompts) if req.echo else None
        return await _generate(request, server, req, adapter, prompts, "text_completion", default_max_tokens=16,
                               echo_rows=echo_rows)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        server.require("generate")
        req = await server.read(request, ChatCompletionRequest)
        check(req)
        adapter = server.select(request, req.model, param="model")
        server.check_rows(req.n, "n")  # every choice is a row
        tool_parser = req.tool_parser(options)  # refused before any work when "auto" has no parser
        # vLLM's truncate_prompt_tokens: the rendered conversation's ids cut to their last k, as a completion's prompt
        prompt = await server.chat_prompt([m.for_template() for m in req.messages], adapter,
                                          add_generation_prompt=req.generation_prompt,
                                          continue_final_message=bool(req.continue_final_message),
                                          template_kwargs=req.template_kwargs() or None,
                                          add_special_tokens=bool(req.add_special_tokens),
                                          keep_tokens=truncate_prompt_tokens(server, req.truncate_prompt_tokens))
        return await _generate(request, server, req, adapter, [prompt], "chat.completion", default_max_tokens=None,
                               tool_parser=tool_parser)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        # vLLM's: a prompt (or chat messages) as token ids, every token counted (a text past the context too, as
        # vLLM counts it: a client asks to find out whether it fits); the work is bounded by --max-text-chars (a
        # prompt) and the chat route's rendered-characters limit (messages)
        body = await server.body(request)
        data = await parse_body(body, options, request.headers)
        chat = isinstance(data, dict) and "messages" in data
        req = await validate_body(TokenizeChatRequest if chat else TokenizeCompletionRequest, data, len(body),
                                  options.max_request_rows)
        if isinstance(req, TokenizeChatRequest):
            check(req)
        adapter = server.select(request, req.model, param="model")
        if isinstance(req, TokenizeChatRequest):
            ids = await server.chat_prompt([m.for_template() for m in req.messages], adapter,
                                           add_generation_prompt=req.add_generation_prompt,
                                           continue_final_message=req.continue_final_message,
                                           template_kwargs=req.template_kwargs() or None,
                                           add_special_tokens=req.add_special_tokens, count_only=True)
        else:
            with field_errors("prompt"):  # no tokenizer: the field that needed one is named
                ids = await run_in_threadpool(server.session.tokenize, [req.prompt], False,
                                              add_special_tokens=req.add_special_tokens)
            ids = ids[0]
        answer: dict[str, Any] = {"count": len(ids), "max_model_len": server.max_model_len, "tokens": ids}
        if req.return_token_strs:
            answer["token_strs"] = await run_in_threadpool(server.session.token_strings, ids)
        return await json_answer(lambda: answer)  # up to a rendered conversation's worth of ids

    @app.post("/detokenize")
    async def detokenize(request: Request):
        # vLLM's: the text of token ids, special tokens kept (tokenizer.decode(tokens), as vLLM decodes them)
        req = await server.read(request, DetokenizeRequest)
        server.select(request, req.model, param="model")
        # bounded as texts are (a 4 MB body holds up to 2 million ids; a million took a WordPiece decode 1.2 s): no
        # row of the model holds more ids, and a prompt /tokenize takes (--max-text-chars) rarely tokenizes to more
        most = max(server.max_model_len or 0, options.max_text_chars)
        if len(req.tokens) > most:
            raise InvalidRequestError(f"tokens: {len(req.tokens):,} ids; this server decodes at most {most:,} (the "
                                      "larger of the model's max_model_len and --max-text-chars)", param="tokens")
        vocabulary = server.session.vocabulary
        outside = [t for t in req.tokens if t < 0 or (vocabulary and t >= vocabulary)]
        if outside:
            shown = ", ".join(map(str, outside[:5])) + (", ..." if len(outside) > 5 else "")
            raise InvalidRequestError(f"tokens: {len(outside)} id(s) outside this model's vocabulary of {vocabulary} "
                                      f"token ids ({shown}); each must be an integer in [0, {vocabulary})",
                                      param="tokens")
        with field_errors("tokens"):
            text = await run_in_threadpool(server.session.decode, req.tokens, False)
        return {"prompt": text}

    @app.api_route("/version", methods=READ_METHODS)
    async def version():
        from .. import __version__

        return {"version": __version__}

    @app.post("/v1/load_lora_adapter")
    async def load_lora(request: Request):
        server.check_management()
        req = await server.read(request, LoadLoraRequest)
        request.state.log["adapter"] = req.lora_name
        with field_errors("lora_path"):
            entry = req.lora_name if req.lora_path is None else _store_name(req.lora_path)
        entry_param = "lora_path" if req.lora_path is not None else "lora_name"
        with lora_load_errors(req.lora_name, entry_param):
            info = await server.load(req.lora_name, entry, replace=req.load_inplace, name_param="lora_name",
                                     entry_param=entry_param)
        request.state.adapter_label = server.metrics.adapter_label(req.lora_name)
        return {"status": "ok", "message": f"adapter {req.lora_name!r} loaded", "adapter": info}

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora(request: Request):
        server.check_management()
        req = await server.read(request, UnloadLoraRequest)
        request.state.log["adapter"] = req.lora_name
        request.state.adapter_label = server.metrics.adapter_label(req.lora_name)
        with field_errors("lora_name"):
            info = await server.unload(req.lora_name)
        return {"status": "ok", "message": f"adapter {req.lora_name!r} unloaded", "adapter": info}


@contextlib.contextmanager
def lora_load_errors(name: str, entry_param: str = "lora_name",
                     exists_advice: str = '; send "load_inplace": true to replace it') -> Iterator[None]:
    """The refusals of ``POST /v1/load_lora_adapter`` loading adapter ``name``, on ``serve`` and on each Ray replica
    alike: an entry not in the store, or one that does not fit, names the field that named the entry
    (``entry_param``); "already loaded" names ``lora_name`` in vLLM's words (``exists_advice``: what to do about it;
    the native route's message names its own field, ``replace``)."""
    try:
        with field_errors(entry_param):
            yield
    except AdapterExistsError:
        exists = AdapterExistsError(f"lora_name: adapter {name!r} is already loaded{exists_advice}")
        exists.param = "lora_name"  # type: ignore[attr-defined]
        raise exists from None


def _store_name(lora_path: str) -> str:
    """vLLM's ``lora_path`` as a store entry name; anything path-like is refused."""
    from .session import check_adapter_name

    if "/" in lora_path or "\\" in lora_path or lora_path.startswith("~"):
        raise InvalidRequestError("lora_path: this server loads adapters from its adapter store by name only; "
                                  "send the entry's name (or leave lora_path out to use lora_name)",
                                  param="lora_path")
    return check_adapter_name(lora_path)


# ---- generation ----------------------------------------------------------------------------------------


def check_logprob_entries(limit: int, prompts: list[list[int]], params: list, fields: Mapping[str, Any],
                          param: str, advice: str, generated: bool = True) -> None:
    """Refuse, before any work, an answer that may hold more than ``limit`` log-probability entries (``--max-logprob-
    entries``, :attr:`~bca_deploy.serving.options.ServeOptions.max_logprob_entries`): the one bound on what an answer
    holds, its prompts' (completions' ``echo``, the native ``prompt_logprobs``) and its generated tokens' alike.

    ``prompts[i]`` is row ``i``'s prompt and ``params[i]`` its :class:`~bca_deploy.serving.decoding.SamplingParams`
    (a request's every row, its ``n`` choices each a row); a row may hold
    :meth:`~bca_deploy.serving.decoding.SamplingParams.logprob_entries`, its worst case (every token up to its
    ``max_new_tokens`` generated; ``generated`` False: its prompt's alone, what a streamed row holds to its end).
    Refused with a 400 naming ``param`` (the field that asked log-probabilities), the request's ``fields`` that made
    the count (shown as ``name value``, a text as ``name (text)``) and ``advice`` (what to send instead)."""
    entries = sum(p.logprob_entries(len(prompt), generated) for prompt, p in zip(prompts, params, strict=True))
    if entries > limit:
        shown = ", ".join(f"{name} ({value})" if isinstance(value, str) else f"{name} {show_json_value(value)}"
                          for name, value in fields.items())
        raise InvalidRequestError(
            f"{param}: with {shown}, this answer may hold {entries:,} log-probabilities (each listed token and its "
            f"alternatives, in every choice); this server holds at most {limit:,} for one answer "
            f"(--max-logprob-entries): {advice}", param=param)


def _check_answer_entries(server: Server, req: _Sampling, prompts: list[list[int]], rows: list[list[int]],
                          params: list, tool_parser: str | None = None) -> None:
    """:func:`check_logprob_entries` of a completions or chat request (``rows``: each prompt's ``n`` choices, with their
    ``params``), naming its fields. A streamed answer's generated tokens are not counted: their log-probabilities are
    sent a chunk at a time and held no longer (a client that falls behind is held to the bound by :class:`_Pumps`);
    its echoed prompts' are (each row holds them to its end), and so are all of a streamed chat answer read for tool
    calls (a call's tokens are held until the call is whole, up to the whole answer)."""
    if req.logprob_count() is None:
        return
    chat = isinstance(req, ChatCompletionRequest)
    generated = not req.stream or tool_parser is not None
    ask = "top_logprobs" if chat and req.top_logprobs else "logprobs"
    tokens = _max_tokens_param(req)
    fields: dict[str, Any] = {"logprobs": req.logprobs}  # as sent: chat's true (with top_logprobs), completions' N
    if chat and req.top_logprobs:
        fields["top_logprobs"] = req.top_logprobs
    if generated:
        fields[tokens] = max(p.max_new_tokens for p in params)
    if not chat:
        fields["prompt"] = f"{len(prompts)} prompt(s)" + (f", {sum(map(len, prompts)):,} tokens echoed"
                                                         if req.echo else "")
    fields["n"] = req.n
    if not generated:
        advice = f"send fewer or shorter prompts, a lower n or a lower {ask}"
    elif req.stream:
        advice = f"send a lower n, a lower {tokens} or a lower {ask}"
    else:
        advice = (f'stream it ("stream": true: a streamed answer holds a chunk at a time), or send '
                  f"{'' if chat else 'fewer prompts, '}a lower n, a lower {tokens} or a lower {ask}")
    check_logprob_entries(server.options.max_logprob_entries, rows, params, fields, ask, advice, generated)


@dataclasses.dataclass(frozen=True)
class _Echo:
    """A prompt as completions' ``echo`` shows it: its ``text``, its first token (listed with null log-probabilities)
    and, when log-probabilities are asked, where each of its tokens' text starts in ``text`` (``offsets``)."""

    text: str
    first: int
    offsets: list[int] | None = None


def _echoes(server: Server, rows: list, prompts: list[list[int]], offsets: bool) -> list[_Echo]:
    """Each prompt's :class:`_Echo` (in a worker thread: it decodes). A text prompt is echoed as sent, its tokens'
    offsets from the tokenizer's offset mapping (:meth:`~bca_deploy.serving.MultiAdapterSession.text_offsets`); token
    ids are decoded, and so is a text whose tokenizer gives no offsets, token by token (the generated tokens'
    detokenizer): each token's offset is where its text starts in the decoded text (held to the text's length)."""
    session = server.session
    echoes = []
    for row, ids in zip(rows, prompts, strict=True):
        text = row if isinstance(row, str) else None
        where = session.text_offsets(text, ids) if text is not None and offsets else None
        if text is None or (offsets and where is None):
            decoded, by_token = _decoded(server, ids)
            text = decoded if text is None else text
            where = [min(o, len(text)) for o in by_token] if offsets else None
        echoes.append(_Echo(text, int(ids[0]), where))
    return echoes


def _decoded(server: Server, ids: list[int]) -> tuple[str, list[int]]:
    """The text of ``ids`` and where each token's text starts in it, decoded a token at a time as generated tokens
    are (a short window, whole characters only: a token that ends inside a character adds no text)."""
    from .engine import _Detokenizer

    try:
        server.session.tokenizer  # noqa: B018
    except BCAError:  # no tokenizer: no text (every token at 0)
        return "", [0] * len(ids)
    detokenizer = _Detokenizer(server.session.decode, ())
    text, offsets = "", []
    for token in ids:
        offsets.append(len(text))
        delta, _ = detokenizer.push(token)
        text += delta
    return text + detokenizer.flush(), offsets


def _sampling_params(server: Server, req: _Sampling, prompt_len: int, default_max_tokens: int | None):
    """The engine's settings for a prompt of ``req`` (OpenAI's temperature 0 is greedy decoding), for its first
    choice (:func:`_choices` makes the others').

    Every prompt of a request gets ``seed`` itself, as in vLLM: a prompt sent in a batch is sampled as it is when
    sent alone (clients such as LangChain batch prompts into one request), not with a seed shifted by its index.
    """
    param = _max_tokens_param(req)
    asked = req.max_completion_tokens if param == "max_completion_tokens" else req.max_tokens
    # OpenAI's default: 16 for completions, as much as fits for chat (here: up to the server's limit); clipped to what
    # fits after the prompt, by the rule the native route uses too
    max_new = server.new_tokens(asked, prompt_len, default_max_tokens, param)
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    # What the request leaves out comes from the checkpoint's generation_config.json, as vLLM does; else OpenAI's
    temperature, top_p, top_k, min_p = _sampling_defaults(server, req)
    greedy = temperature == 0
    try:
        return server.sampling(max_new_tokens=max_new, do_sample=not greedy,
                               temperature=1.0 if greedy else float(temperature),
                               top_k=top_k if top_k is not None and top_k > 0 else 0,
                               top_p=float(top_p), seed=_engine_seed(req.seed),
                               stop=tuple(stop), stop_token_ids=tuple(req.stop_token_ids or ()),
                               ignore_eos=bool(req.ignore_eos), min_tokens=req.min_tokens or 0,
                               repetition_penalty=server.repetition_penalty(req.repetition_penalty),
                               frequency_penalty=float(req.frequency_penalty or 0.0),
                               presence_penalty=float(req.presence_penalty or 0.0),
                               min_p=0.0 if greedy else float(min_p), logit_bias=req.logit_bias,
                               logprobs=req.logprob_count(), prompt_logprobs=_prompt_logprobs(req))
    except InvalidRequestError as exc:
        raise _renamed(exc, param) from None


def _prompt_logprobs(req: _Sampling) -> int | None:
    """The engine's ``prompt_logprobs``: completions' ``logprobs`` when the prompt is echoed (vLLM's reading)."""
    return req.logprobs if isinstance(req, CompletionRequest) and req.echo else None


def _engine_seed(seed: int | None) -> int | None:
    """A request's ``seed`` (vLLM's int64 range) as the engine's (``[0, 2**64)``): -1 is no seed, as vLLM's
    ``SamplingParams`` reads it; another negative seed is taken modulo 2**64, as torch's ``manual_seed`` (vLLM's
    generators) takes it, so every seed of vLLM's range samples reproducibly."""
    if seed is None or seed == -1:
        return None
    return seed % 2**64


def _choices(params, n: int) -> list:
    """The settings of a prompt's ``n`` choices (each a row): with a seed, choice j samples with ``seed + j`` (as vLLM
    seeds a request's ``n`` child requests), so the choices differ and each is reproducible; choice 0 is the prompt
    sampled alone with that seed."""
    if params.seed is None:
        return [params] * n
    return [params] + [dataclasses.replace(params, seed=(params.seed + j) % 2**64) for j in range(1, n)]


def _sampling_defaults(server: Server, req: _Sampling) -> tuple[float, float, int | None, float]:
    """``(temperature, top_p, top_k, min_p)`` of ``req``: each the request's own, else the export's
    ``generation_config.json`` value (as vLLM reads all four from it), else OpenAI's default (1, 1, off, off)."""
    given, defaults = req.model_fields_set, server.session.generation_defaults

    def pick(name: str, fallback):
        own = getattr(req, name)
        if name in given or getattr(defaults, name) is None:
            return own if own is not None else fallback
        return getattr(defaults, name)

    return pick("temperature", 1.0), pick("top_p", 1.0), pick("top_k", None), pick("min_p", 0.0)


def _max_tokens_param(req: _Sampling) -> str:
    chat = isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None
    return "max_completion_tokens" if chat else "max_tokens"


def _renamed(exc: InvalidRequestError | ContextLengthError, param: str) -> InvalidRequestError | ContextLengthError:
    """The engine's ``max_new_tokens`` under the name the client sent (``max_tokens``...), in the error that names it
    and in ``min_tokens``' (which must not exceed it)."""
    if exc.param not in ("max_new_tokens", "min_tokens"):
        return exc
    return type(exc)(str(exc).replace("max_new_tokens", param), param=param if exc.param == "max_new_tokens" else
                     exc.param)


async def _generate(request: Request, server: Server, req: _Sampling, adapter: str | None, prompts: list[list[int]],
                    kind: str, default_max_tokens: int | None, echo_rows: list | None = None,
                    tool_parser: str | None = None):
    """Check every prompt and the log-probabilities the answer may list (:func:`_check_answer_entries`), submit each
    prompt's ``n`` choices to the engine (choice ``i * n + j``: prompt i's j-th, as vLLM numbers them), then answer
    whole or as server-sent events. ``echo_rows``: completions' ``echo``, the rows as their prompts are echoed (texts as
    sent, token ids decoded; :func:`_echoes`). ``tool_parser``: chat's ``--tool-call-parser`` reading each choice's
    text for tool calls (None: not read)."""
    n = req.n
    echo_only = echo_rows is not None and req.max_tokens == 0 and req.logprobs is None
    params = rows = None
    if not echo_only:  # nothing to compute for the prompts alone: they are the answer
        params = [p for prompt in prompts
                  for p in _choices(_sampling_params(server, req, len(prompt), default_max_tokens), n)]
        rows = [prompt for prompt in prompts for _ in range(n)]
        _check_answer_entries(server, req, prompts, rows, params, tool_parser)
    echoes = None
    if echo_rows is not None:
        echoes = await run_in_threadpool(_echoes, server, echo_rows, prompts, req.logprobs is not None)
    if echo_only:
        return await _echo_only(req, prompts, echoes)
    try:
        streams, release = server.submit(request, rows, adapter, params)
    except (InvalidRequestError, ContextLengthError) as exc:
        raise _renamed(exc, _max_tokens_param(req)) from None
    ident = ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    chat = isinstance(req, ChatCompletionRequest)
    role, echo = (req.answer_role(), req.echoed()) if chat else ("assistant", "")
    if req.stream:
        # the status line goes out with the first event, not before: a request whose rows fail before any token
        # (its adapter unloaded while they queued, the graph refusing them) is answered with the error's status
        # (404 unknown_adapter...), as the same request unstreamed is, instead of a 200 and an error event that
        # OpenAI clients raise as an untyped APIError; the first token is sent with the status, so TTFT is the same
        pumps = _Pumps(request, server, streams, release,
                       echoes=None if echoes is None else [e for e in echoes for _ in range(n)])
        try:
            first = await server.unless_gone(request, pumps.get())
        except BaseException:
            await pumps.close()
            raise
        if first[2] == "error":
            await pumps.close()
            raise first[1]
        include_usage, continuous = req.usage_options()
        events = _stream_events(request, server, pumps, first, kind, ident, created, req.model, include_usage,
                                continuous, n, role=role, echo=echo, tool_parser=tool_parser,
                                one_call=_one_call(req))
        return ClosingStreamingResponse(events, media_type="text/event-stream", on_close=pumps.close,
                                        headers=_SSE_HEADERS)
    try:
        results = await server.collect(request, streams)
    finally:
        server.log_streams(request, streams)  # what was generated, however it ended (a client gone: 499)
        for stream in streams:
            stream.cancel()
        release()
    return await json_answer(lambda: _answer(server, req, results, streams, kind, ident, created, role, echo, echoes,
                                             tool_parser))


def _answer(server: Server, req: _Sampling, results: list, streams: list, kind: str, ident: str, created: int,
            role: str, echo: str, echoes: list[_Echo] | None, tool_parser: str | None) -> dict[str, Any]:
    """The whole answer of :func:`_generate` (not streamed) from its rows' ``results``; in a worker thread, since
    their tokens' texts and log-probabilities may be hundreds of thousands of values (:func:`~bca_deploy.serving.wire.
    json_answer`). Its ``choices`` are an iterator: :func:`~bca_deploy.serving.wire.render_answer` makes, renders and
    drops one choice at a time, and each row's result is let go once its choice is made (``results`` is emptied)."""
    return {"id": ident, "object": kind, "created": created, "model": req.model,
            "choices": _answer_choices(server, req, results, kind, role, echo, echoes, tool_parser),
            "usage": _usage(streams, req.n)}


def _answer_choices(server: Server, req: _Sampling, results: list, kind: str, role: str, echo: str,
                    echoes: list[_Echo] | None, tool_parser: str | None) -> Iterator[dict[str, Any]]:
    """The choices of :func:`_answer`, one at a time, each row's result dropped from ``results`` as it is used."""
    n = req.n
    for i in range(len(results)):
        result, results[i] = results[i], None
        if kind == "chat.completion":
            message: dict[str, Any] = {"role": role, "content": echo + result.text}
            finish = result.finish_reason
            if tool_parser is not None:
                content, calls = parse_tool_calls(tool_parser, result.text)
                if calls:  # vLLM's answer: the calls, the text outside them (null if none), finish_reason tool_calls
                    calls = calls[:1] if _one_call(req) else calls
                    message = {"role": role, "content": echo + content if content is not None else (echo or None),
                               "tool_calls": [call.message() for call in calls]}
                    finish = "tool_calls"
            yield {"index": i, "message": message, "logprobs": _chat_logprobs(server, result.logprobs),
                   "finish_reason": finish}
        elif echoes is not None:
            shown = echoes[i // n]
            logprobs = None
            if result.logprobs is not None:
                offsets = [*(shown.offsets or []), *(len(shown.text) + o for o in result.text_offsets or [])]
                logprobs = _completion_logprobs(server, [*(result.prompt_logprobs or []), *result.logprobs], offsets,
                                                first=shown.first)
            yield {"index": i, "text": shown.text + result.text, "logprobs": logprobs,
                   "finish_reason": result.finish_reason}
        else:
            yield {"index": i, "text": result.text,
                   "logprobs": _completion_logprobs(server, result.logprobs, result.text_offsets),
                   "finish_reason": result.finish_reason}


def _one_call(req: _Sampling) -> bool:
    """``parallel_tool_calls: false``: an answer keeps its first tool call only (vLLM's reading)."""
    return isinstance(req, ChatCompletionRequest) and req.parallel_tool_calls is False


def _chat_logprobs(server: Server, items: list | None) -> dict[str, Any] | None:
    """A chat choice's ``logprobs`` (OpenAI's shape) of the tokens ``items`` (:class:`~bca_deploy.serving.engine.
    TokenLogprob`; ``None``: not asked): ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token",
    "logprob", "bytes"}, ...]}, ...]}``, the alternatives most likely first; ``bytes``: the token's own bytes (a
    byte-level token that is part of a character: its true bytes, its ``token`` ``"bytes:\\xe2\\x80"``; see
    :meth:`~bca_deploy.serving.MultiAdapterSession.token_bytes`)."""
    if items is None:
        return None
    texts = _texts(server, items)
    ids = list(texts)
    raw = dict(zip(ids, server.session.token_bytes(ids), strict=True))

    def entry(token: int, logprob: float) -> dict[str, Any]:
        return {"token": texts[token], "logprob": logprob, "bytes": list(raw[token])}

    return {"content": [{**entry(item.token_id, item.logprob),
                         "top_logprobs": [entry(t, lp) for t, lp in zip(item.top_ids, item.top_logprobs)]}
                        for item in items]}


#: Headers of a server-sent events answer: no cache, and no buffering by a proxy (nginx) between the tokens.
_SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
#: The last event of a stream, as OpenAI ends one.
_SSE_DONE = b"data: [DONE]\n\n"


def _sse(payload: dict[str, Any]) -> bytes:
    """One server-sent event holding ``payload`` as compact JSON."""
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


async def _echo_only(req: CompletionRequest, prompts: list[list[int]], echoes: list[_Echo]):
    """The answer to ``echo`` with ``max_tokens`` 0 and no ``logprobs``: each prompt's text, ``n`` times, nothing
    generated (``finish_reason`` ``"length"``, as vLLM answers it), whole or as vLLM streams it (one chunk per choice).
    """
    ident, created = "cmpl-" + uuid.uuid4().hex[:24], int(time.time())
    texts = [e.text for e in echoes for _ in range(req.n)]
    prompt = sum(len(p) for p in prompts)
    usage = {"prompt_tokens": prompt, "completion_tokens": 0, "total_tokens": prompt}
    if not req.stream:
        return await json_answer(lambda: {"id": ident, "object": "text_completion", "created": created,
                                          "model": req.model,
                                          "choices": [{"index": i, "text": t, "logprobs": None,
                                                       "finish_reason": "length"} for i, t in enumerate(texts)],
                                          "usage": usage})
    include_usage, continuous = req.usage_options()

    async def events() -> AsyncIterator[bytes]:
        for i, text in enumerate(texts):
            payload: dict[str, Any] = {"id": ident, "object": "text_completion", "created": created,
                                       "model": req.model, "choices": [{"index": i, "text": text, "logprobs": None,
                                                                        "finish_reason": "length"}]}
            if include_usage:
                tokens = len(prompts[i // req.n])
                payload["usage"] = {"prompt_tokens": tokens, "completion_tokens": 0, "total_tokens": tokens} \
                    if continuous else None
            yield _sse(payload)
        if include_usage:
            payload = {"id": ident, "object": "text_completion", "created": created, "model": req.model,
                       "choices": [], "usage": usage}
            yield _sse(payload)
        yield _SSE_DONE

    return StreamingResponse(events(), media_type="text/event-stream", headers=_SSE_HEADERS)


def _completion_logprobs(server: Server, items: list | None, offsets: list[int] | None,
                         first: int | None = None) -> dict[str, Any] | None:
    """A completion choice's ``logprobs`` (OpenAI's legacy shape) of the tokens ``items`` (``None``: not asked):
    ``tokens`` (each token's own text), ``token_logprobs``, ``top_logprobs`` (per token, ``{text: logprob}`` of the
    most likely tokens, then the chosen one when it is not among them: up to ``logprobs`` + 1 entries, as OpenAI and
    vLLM give them; two ids of the same text keep the likelier; a token that is part of a character is keyed by its
    bytes, ``"bytes:\\xe2\\x80"``, so two such tokens are two entries) and ``text_offset``: ``offsets``, where each
    token's text starts in the choice's text (OpenAI's meaning, the same streamed or not; a token that adds no text of
    its own, e.g. the end-of-sequence token, is where the next text starts). ``first``: a token listed before ``items``
    with null log-probabilities (an echoed prompt's first token: nothing comes before it; ``offsets`` include it)."""
    if items is None:
        return None
    texts = _texts(server, items, () if first is None else (first,))
    tokens: list[str] = []
    logprobs: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    if first is not None:
        tokens.append(texts[first])
        logprobs.append(None)
        tops.append(None)
    for item in items:
        text = texts[item.token_id]
        top: dict[str, float] = {}
        for token, logprob in zip(item.top_ids, item.top_logprobs):
            top.setdefault(texts[token], logprob)
        top.setdefault(text, item.logprob)
        tokens.append(text)
        logprobs.append(item.logprob)
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": list(offsets or [])}


def _texts(server: Server, items: list, more: tuple[int, ...] = ()) -> dict[int, str]:
    """Each token id of ``items`` (chosen and alternatives) and ``more`` -> its own text (:meth:`~bca_deploy.serving.
    MultiAdapterSession.token_texts`)."""
    ids = list(dict.fromkeys([*more, *(item.token_id for item in items),
                              *(t for item in items for t in item.top_ids)]))
    return dict(zip(ids, server.session.token_texts(ids), strict=True))


def _usage(streams, n: int = 1) -> dict[str, int]:
    """OpenAI's usage of a request whose prompts have ``n`` choices each (rows ``i * n ... i * n + n - 1``): each
    prompt's tokens count once, as OpenAI and vLLM count them, and every choice's tokens."""
    prompt = sum(s.prompt_tokens for s in streams[::n])
    completion = sum(s.completion_tokens for s in streams)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class ClosingStreamingResponse(StreamingResponse):
    """A streamed answer whose body generator is closed however the response ends.

    Starlette leaves the generator suspended at its ``yield`` when sending fails (a client that stopped reading,
    cut off after ``--body-timeout-s``), so the generator's cleanup (cancel the rows, free their place in the
    queue) waited for the garbage collector: 8 such clients of 256 rows held the whole queue, and every tenant
    got 503 for minutes. Used by every streamed answer (the OpenAI routes, the Ray router's forwarding).
    """

    def __init__(self, *args, on_close: Callable[[], Awaitable[None]] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._on_close = on_close  # also run when the body generator never started (its own cleanup would not)

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                await close()
            if self._on_close is not None:
                await self._on_close()


class _Pumps:
    """The engine streams of a streamed answer, read into one queue of ``(index, text, None, tokens, logprobs)`` per
    token text, ``(index, None, finish_reason, tokens, logprobs)`` per row's end and ``(index, exception, "error",
    tokens, None)`` per failure (``tokens``: the row's tokens so far; ``logprobs``: ``(TokenLogprob list, text offsets
    in the choice's text, first)`` of the row's tokens since its last item, those whose text was empty included, or
    ``None``: none asked or none new; ``first``: a token listed before them with null log-probabilities, or None).
    ``echoes`` (completions' ``echo``, one per stream): each row's first item is its echoed prompt, put when the row's
    first token or end comes (so a row that fails before answers with its error), with the prompt's log-probabilities
    when asked; the generated tokens' offsets follow its text.
    Read with :meth:`get`. The generated tokens' log-probability entries queued and not read yet (a client reading
    slower than its rows generate) are held to ``--max-logprob-entries``: past it, while the client is behind (its
    connection full: :meth:`_reader_behind`), the rows are stopped and the answer ends, once what was queued is sent,
    with an error event (408, :class:`~bca_deploy.serving.wire.RequestTimeoutError`); the echoed prompts' are bounded
    before any work (:func:`_check_answer_entries`). A queue past the bound while the client takes all that is sent
    is the server's own lag (the event loop rendering chunks slower than the engine makes tokens), not the client's:
    it is not stopped for it.
    :meth:`close` (once, however the answer ends) logs the streams, cancels their rows and frees their place in the
    queue."""

    def __init__(self, request: Request, server: Server, streams, release, echoes: list[_Echo] | None = None) -> None:
        self.request, self.server, self.streams, self._release = request, server, streams, release
        self.queue: asyncio.Queue = asyncio.Queue()
        self._echoes = echoes
        self.held = 0  # log-probability entries in the queue
        self._limit = server.options.max_logprob_entries
        self._stopped = False  # the backlog passed the bound: nothing more is queued
        from .http import WRITE_WATCH  # (http imports this module)

        # the connection's WriteWatch: bca-deploy serve's protocol, or a Ray replica's in-process connection
        # (ray._Outbox, which takes Ray's streaming call for the client); None elsewhere
        self._watch = request.scope.get("extensions", {}).get(WRITE_WATCH)
        self._tasks = [asyncio.create_task(self._pump(i, s)) for i, s in enumerate(streams)]
        self._closed = False

    async def get(self) -> tuple:
        """The next item (waits for one)."""
        item = await self.queue.get()
        self.held -= _entries(item[4])
        return item

    async def _put(self, item: tuple) -> None:
        """Queue ``item``, unless the backlog of log-probabilities passed the bound (then stop every row, once)."""
        if self._stopped:
            return
        entries = _entries(item[4])
        if self.held + entries > self._limit and self._reader_behind():
            self._stopped = True
            for stream in self.streams:  # no row makes more; their pumps end with nothing more queued
                stream.cancel()
            error = RequestTimeoutError(
                f"the log-probabilities of this stream waiting for the client to read them passed this server's "
                f"--max-logprob-entries ({self._limit:,}); its rows were stopped: read the stream as it comes, or ask "
                "fewer log-probabilities")
            await self.queue.put((item[0], error, "error", item[3], None))
            return
        self.held += entries
        await self.queue.put(item)

    def _reader_behind(self) -> bool:
        """Whether the client is not taking what is sent: the server's write buffer holds bytes the kernel, its
        socket's send buffer full, would not take (:meth:`~bca_deploy.serving.http.WriteWatch.buffered`). A client
        reading as it comes leaves it empty however long the queue is: counted alone, the queue grew past the bound
        when the event loop rendered 256 rows' chunks slower than the engine made them, and clients reading at once
        were cut with this 408. Without a watch (not bca-deploy serve's protocol), the queue alone decides."""
        return self._watch is None or self._watch.buffered() > 0

    async def _echo(self, index: int, stream, echo: _Echo) -> int:
        """Put row ``index``'s echoed prompt; returns the characters it takes in the choice's text."""
        logprobs = None
        if stream.params.logprobs is not None:
            logprobs = (list(stream.prompt_logprobs or []), list(echo.offsets or []), echo.first)
        await self._put((index, echo.text, None, 0, logprobs))
        return len(echo.text)

    async def _pump(self, index: int, stream) -> None:
        tokens = chars = 0
        echo = self._echoes[index] if self._echoes is not None else None
        # log-probabilities of tokens not sent yet (a token without text is sent with the next), their text offsets
        pending: list = []
        offsets: list[int] = []
        try:
            async for token in stream:
                if echo is not None:
                    chars, echo = await self._echo(index, stream, echo), None
                tokens += 1
                if token.logprob is not None:
                    pending.append(token.logprob)
                    offsets.append(chars)
                if token.text:
                    chars += len(token.text)
                    await self._put((index, token.text, None, tokens, (pending, offsets, None) if pending else None))
                    pending, offsets = [], []
            if echo is not None:  # no token (max_tokens 0): the prompt, then the end
                await self._echo(index, stream, echo)
            await self._put((index, None, stream.finish_reason, tokens, (pending, offsets, None) if pending else None))
        except Exception as exc:  # noqa: BLE001 - sent to the client as an error answer or event
            await self._put((index, exc, "error", tokens, None))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.server.log_streams(self.request, self.streams)  # what was generated, however it ended
        for stream in self.streams:
            stream.cancel()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        self._release()


def _entries(logprobs: tuple[list, list[int], int | None] | None) -> int:
    """The generated tokens' log-probability entries of a :class:`_Pumps` item's ``logprobs`` (each token and its
    alternatives). An echoed prompt's (the item whose ``first`` is set) count 0: they are held to the bound before
    any work (:func:`_check_answer_entries`), and counted again here a request the check took, its prompts' entries
    near the bound, would be stopped before its client could read its first chunk."""
    if logprobs is None or logprobs[2] is not None:
        return 0
    return sum(len(item.top_ids) + 1 for item in logprobs[0])


async def _stream_events(request: Request, server: Server, pumps: _Pumps, first: tuple, kind: str, ident: str,
                         created: int, model: str, include_usage: bool, continuous: bool = False,
                         n: int = 1, role: str = "assistant", echo: str = "", tool_parser: str | None = None,
                         one_call: bool = False) -> AsyncIterator[bytes]:
    """Server-sent events: a chunk per token and choice, a last chunk per choice with its finish_reason, [DONE].

    ``first``: the first item of ``pumps`` (read before the answer started). A failure after the answer started is
    sent as an ``{"error": ...}`` event (the status line is out already). When the client goes away, the rows are
    cancelled and leave the batch at the next step. ``include_usage``: every chunk has ``usage`` (null; with
    ``continuous``, its choice's prompt and completion tokens so far, as vLLM's ``continuous_usage_stats``), then a
    last chunk with no choices carries the request's usage (each prompt's ``n`` choices counted as :func:`_usage`).
    Chat: each choice's first chunk has the answer's ``role``; ``echo`` (vLLM's, see
    :meth:`ChatCompletionRequest.echoed`), when not empty, is each choice's next chunk, as vLLM sends it.
    ``tool_parser`` (chat with tools, ``"auto"``): each choice's text goes through its own
    :class:`~bca_deploy.serving.tools.ToolCallParser`: text outside calls streams as content, a call is held until
    it is whole and sent as one ``delta.tool_calls`` entry (index, id, type, name, arguments), and the choice ends
    with ``finish_reason`` ``"tool_calls"`` when it made one; the log-probabilities of held tokens go with the next
    chunk. ``one_call``: ``parallel_tool_calls: false``, the calls after a choice's first are dropped.
    """
    chunk_kind = "chat.completion.chunk" if kind == "chat.completion" else "text_completion"
    streams = pumps.streams
    parsers = None
    if tool_parser is not None:
        parsers = [make_parser(tool_parser) for _ in streams]
    held: list[list] = [[] for _ in streams]  # per choice: log-probabilities of tokens whose text is held

    def chunk(index: int, text: str | None, finish: str | None, first: bool = False, tokens: int = 0,
              logprobs: tuple[list, list[int], int | None] | None = None, call: dict[str, Any] | None = None) -> bytes:
        items, offsets, unscored = logprobs if logprobs is not None else (None, None, None)
        if kind == "chat.completion":
            delta: dict[str, Any] = {"role": role, "content": ""} if first else \
                ({"content": text} if text is not None else {})
            if call is not None:
                delta = {"tool_calls": [call]}
            choice: dict[str, Any] = {"index": index, "delta": delta, "logprobs": _chat_logprobs(server, items),
                                      "finish_reason": finish}
        else:
            choice = {"index": index, "text": text or "",
                      "logprobs": _completion_logprobs(server, items, offsets, first=unscored), "finish_reason": finish}
        payload = {"id": ident, "object": chunk_kind, "created": created, "model": model, "choices": [choice]}
        if continuous:
            prompt = streams[index].prompt_tokens
            payload["usage"] = {"prompt_tokens": prompt, "completion_tokens": tokens, "total_tokens": prompt + tokens}
        elif include_usage:
            payload["usage"] = None
        return _sse(payload)

    try:
        if kind == "chat.completion":
            for i in range(len(streams)):
                yield chunk(i, None, None, first=True)
            if echo:
                for i in range(len(streams)):
                    yield chunk(i, echo, None)
        left = len(streams)
        item = first
        while left:
            index, text, finish, tokens, logprobs = item if item is not None else await pumps.get()
            item = None
            if finish == "error":
                status, error_type = error_status(text, openai=True)
                message = server.redact(str(text)) if isinstance(text, BCAError) else \
                    f"internal error (request id {request.state.request_id}); the server log has the details"
                request.state.log["error"] = f"{type(text).__name__}: {text}"
                yield _sse(error_body(status, error_type, message, server.error_param(text, request.scope["state"])))
                break
            if parsers is None:
                if finish is None:
                    yield chunk(index, text, None, tokens=tokens, logprobs=logprobs)
                else:
                    left -= 1
                    yield chunk(index, None, finish, tokens=tokens, logprobs=logprobs)
                continue
            parser = parsers[index]
            if logprobs is not None:
                held[index] += logprobs[0]
            made = parser.calls
            events = parser.feed(text) if finish is None else parser.finish()
            for event_kind, value in events:
                scored = (held[index], [], None) if held[index] else None
                held[index] = []
                if event_kind == "content":
                    yield chunk(index, value, None, tokens=tokens, logprobs=scored)
                elif not (one_call and made):
                    yield chunk(index, None, None, tokens=tokens, logprobs=scored, call=value.delta(made))
                    made += 1
            if finish is not None:
                left -= 1
                scored = (held[index], [], None) if held[index] else None
                held[index] = []
                yield chunk(index, None, "tool_calls" if parser.calls else finish, tokens=tokens, logprobs=scored)
        else:
            if include_usage:
                yield _sse({"id": ident, "object": chunk_kind, "created": created, "model": model, "choices": [],
                             "usage": _usage(streams, n)})
        yield _SSE_DONE
    finally:  # the end, or the client went away: free the rows at once
        await pumps.close()
