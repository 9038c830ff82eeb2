"""The per-step machinery of generation: sampling settings, samplers, and a decoder batch rows join and leave.

:class:`DecodeBatch` holds the rows that decode together on a ``text-generation-with-past`` adapter-bank
graph. Rows join between steps (their prompts prefilled in one run, or a chunk of columns per run) and
leave between steps (finished, cancelled or failed); :meth:`MultiAdapterSession.generate` and the
continuous-batching :class:`~bca_deploy.serving.engine.GenerationEngine` both step one.

Layout (exact, not approximate). Every row's real tokens are right-aligned in one past of width ``P``::

    past  (B, kv_heads, P, head_dim)   row b's L_b real positions in columns P-L_b .. P-1, zeros before
    mask  (B, P + 1)                   1 on those columns and on the new token, 0 on the padding
    position_ids (B, 1)                L_b: the row's own count of real tokens, whatever P is

A padded key gets exactly zero attention weight (the graph adds the dtype's minimum to masked scores
before the softmax; ``exp`` underflows to 0.0 in fp32) and positions ignore the padding, so a row's
logits are those of the row run alone up to the summation order of the longer (zero) reductions.
A row that leaves frees its slot; a newcomer is written into a free slot in place (its past
right-aligned, the columns before it zeroed); the past is copied whole only to grow the batch or to
drop waste (free slots, columns that are padding for every row) once it reaches ``compact_at``.

Adapters: a row keeps the bank snapshot (:class:`~bca_deploy.serving.session.BankSnapshot`) it started
with to its last token. A run feeds one bank, so when rows of different snapshots share a step the run
gets a *composite* bank holding slot 0 (zeros: the base model) plus exactly the (snapshot, slot) pairs
the rows use, each copied from its own snapshot; row ids point into it. Rows of one snapshot (the usual
case) use that snapshot's bank as it is, without a copy.
"""

from __future__ import annotations

import dataclasses
import math
from array import array
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from ..config import show_json_value
from ..errors import ServingError
from ..exporters.bank import LOGITS_TO_KEEP
from ..exporters.validate import PAST_INPUT, PRESENT_OUTPUT, empty_past
from .limits import MAX_LOGIT_BIAS, MAX_LOGPROBS, MAX_NEW_TOKENS, MAX_SCORE_LOGITS

__all__ = ["SamplingParams", "SamplingParamsError", "Sampler", "Penalties", "DecodeRow", "DecodeBatch", "PrefillJob",
           "MAX_NEW_TOKENS", "MAX_LOGPROBS", "MAX_LOGIT_BIAS", "LOGPROB_FLOOR", "TokenLogprob", "choose_tokens",
           "apply_penalties", "token_logprobs", "LOGIT_BIAS_RANGE"]

#: The repetition penalties taken (vLLM takes any > 0): logits of up to ~1e4 divided or multiplied by these stay far
#: inside float32 (3.4e38), so no row's logits become inf or NaN.
REPETITION_PENALTY_RANGE = (1e-30, 1e30)

#: OpenAI's range of a ``logit_bias`` value (vLLM clamps to it; OpenAI refuses a value outside it, and so do we).
LOGIT_BIAS_RANGE = (-100.0, 100.0)

_MAX_STOP = 16  # stop strings / stop token ids per request
_MAX_STOP_CHARS = 256


class SamplingParamsError(ServingError, ValueError):
    """Sampling settings are invalid. ``fields`` names every offending field (first: ``field``)."""

    def __init__(self, problems: Mapping[str, str]) -> None:
        self.problems = dict(problems)
        self.fields = list(self.problems)
        self.field = self.fields[0] if self.fields else None
        lines = "; ".join(f"{name}: {why}" for name, why in self.problems.items())
        super().__init__(f"invalid sampling parameters: {lines}")


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one row generates. Validated in full on construction (:class:`SamplingParamsError` names every bad field).

    Greedy by default (``do_sample=False``: the argmax, PyTorch ``generate(do_sample=False)`` token for
    token). Sampling draws from softmax(logits / ``temperature``) after top-k and top-p filtering, from the
    row's own generator seeded by ``seed`` (``None``: fresh entropy), so a row's tokens never depend on the
    rows it shares a batch with.

    Penalties (vLLM's, in vLLM's order, on the raw logits before the argmax or the temperature): first
    ``repetition_penalty`` (transformers' ``RepetitionPenaltyLogitsProcessor``: the logit of every token of the
    prompt or of the output so far is divided by it where > 0 and multiplied by it where < 0), then
    ``frequency_penalty`` times the times each token occurs in the output so far, and ``presence_penalty`` for
    each token that occurs in it, are subtracted (OpenAI's definitions). Neutral values (1, 0, 0) cost nothing.
    ``repetition_penalty`` here defaults to 1 (off); the server's routes and
    :meth:`~bca_deploy.serving.MultiAdapterSession.generate` default it to the export's ``generation_config.json``.

    ``logit_bias`` (OpenAI's; vLLM's ``LogitBiasLogitsProcessor``): ``{token id: bias in [-100, 100]}``, each bias
    added to that token's logit, greedy rows too (+100 all but forces a token, -100 all but bans it). As in vLLM's
    sampler it comes first, before the penalties and the ``min_tokens`` masking. At most :data:`MAX_LOGIT_BIAS`
    ids; keys may be ints or their decimal strings (JSON's object keys), kept as sorted ``(id, bias)`` pairs.
    ``min_p`` (vLLM's and transformers' ``MinPLogitsWarper``): when sampling, tokens whose probability after the
    temperature is below ``min_p`` times the most likely token's are dropped; applied after the temperature and
    before top-k and top-p, in vLLM's order (transformers applies it after them: the same set with top-k, whose
    kept tokens are a prefix by probability too, and a larger one with top-p, whose mass vLLM counts over the
    tokens min-p kept). 0: off; greedy rows are unaffected (the most likely token is always kept).

    Ends (vLLM's ``ignore_eos`` and ``min_tokens``): with ``ignore_eos`` the model's end-of-sequence ids do not end
    the row (their text is left out; ``stop_token_ids`` still end it). For its first ``min_tokens`` tokens a row
    cannot end: its end ids (the end-of-sequence ids the row ends at, and ``stop_token_ids``) are never chosen
    (their logits are -inf, as vLLM's ``MinTokensLogitsProcessor`` sets them) and no stop string ends it in their
    text (one that ends after them does, as in vLLM's detokenizer).

    ``logprobs`` (vLLM's ``SamplingParams.logprobs``): each chosen token comes with its log-probability and those of
    the ``logprobs`` most likely tokens (:class:`TokenLogprob`), from the model's raw distribution: log_softmax of the
    logits as the graph gave them, before ``logit_bias``, penalties, ``min_tokens`` masking, temperature, min-p and
    top-k/top-p (vLLM's default, ``logprobs_mode="raw_logprobs"``), so they are the same however the row samples.
    ``None``: none computed.
    ``prompt_logprobs`` (vLLM's): the same for the prompt's tokens, teacher-forced: token t's log-probability under the
    logits of position t - 1, for every prompt token but the first (nothing comes before it), with the
    ``prompt_logprobs`` most likely tokens there; what evaluation harnesses score a continuation by (OpenAI's
    ``echo`` with ``logprobs``). With ``max_new_tokens`` 0 nothing is generated: the prompt alone is scored.
    """

    max_new_tokens: int = dataclasses.field(default=32, metadata={"help": f"new tokens at most (1..{MAX_NEW_TOKENS}; "
                                                                           "prompt + new tokens <= the graph's context; "
                                                                           "0 with prompt_logprobs: the prompt "
                                                                           "scored alone)"})
    do_sample: bool = dataclasses.field(default=False, metadata={"help": "sample instead of taking the argmax"})
    temperature: float = dataclasses.field(default=1.0, metadata={"help": "> 0; divides the logits when sampling"})
    top_k: int = dataclasses.field(default=0, metadata={"help": ">= 0; keep the k most likely tokens (0: all)"})
    top_p: float = dataclasses.field(default=1.0, metadata={"help": "in (0, 1]; keep the smallest set reaching p"})
    seed: int | None = dataclasses.field(default=None, metadata={"help": "in [0, 2**64); the row's own generator "
                                                                             "seed"})
    stop: tuple[str, ...] = dataclasses.field(default=(), metadata={
        "help": "strings that end the row; the text is cut before the first one (needs a tokenizer)"})
    stop_token_ids: tuple[int, ...] = dataclasses.field(default=(), metadata={
        "help": "token ids that end the row besides the model's end-of-sequence ids (the token and its text are kept, "
                "as vLLM keeps them)"})
    repetition_penalty: float = dataclasses.field(default=1.0, metadata={
        "help": "> 0; the logits of the prompt's and output's tokens divided by it (> 0) or multiplied (< 0); 1: off"})
    frequency_penalty: float = dataclasses.field(default=0.0, metadata={
        "help": "in [-2, 2]; times a token's count in the output so far, subtracted from its logit; 0: off"})
    presence_penalty: float = dataclasses.field(default=0.0, metadata={
        "help": "in [-2, 2]; subtracted from the logit of every token the output holds so far; 0: off"})
    ignore_eos: bool = dataclasses.field(default=False, metadata={
        "help": "the model's end-of-sequence ids do not end the row (stop_token_ids still do)"})
    min_tokens: int = dataclasses.field(default=0, metadata={
        "help": "0..max_new_tokens; the row cannot end (end ids masked, stop strings not matched) before this many"})
    logprobs: int | None = dataclasses.field(default=None, metadata={
        "help": f"None (off) or 0..{MAX_LOGPROBS}: each token's log-probability and this many most likely "
                "alternatives' (see token_logprobs)"})
    prompt_logprobs: int | None = dataclasses.field(default=None, metadata={
        "help": f"None (off) or 0..{MAX_LOGPROBS}: each prompt token's log-probability after the first (at the "
                "position before it) and this many most likely alternatives' there"})
    min_p: float = dataclasses.field(default=0.0, metadata={
        "help": "in [0, 1]; when sampling, drop tokens less likely than min_p times the most likely one (after the "
                "temperature, before top-k/top-p); 0: off"})
    logit_bias: Mapping[int | str, float] | tuple[tuple[int, float], ...] | None = dataclasses.field(
        default=None, metadata={"help": f"{{token id: bias in [-100, 100]}} (at most {MAX_LOGIT_BIAS} ids) added to "
                                        "those logits before anything else, greedy too; None: off"})

    def __post_init__(self) -> None:
        problems: dict[str, str] = {}
        # 0 (no token) only for a prompt scored alone (prompt_logprobs): a row that asks nothing has nothing to run
        low = 0 if self.prompt_logprobs is not None else 1
        if not _is_int(self.max_new_tokens) or not low <= self.max_new_tokens <= MAX_NEW_TOKENS:
            problems["max_new_tokens"] = (f"must be an integer in [1, {MAX_NEW_TOKENS}] (0 only with "
                                          f"prompt_logprobs), got {show_json_value(self.max_new_tokens)}")
        if not isinstance(self.do_sample, (bool, np.bool_)):
            problems["do_sample"] = f"must be true or false, got {show_json_value(self.do_sample)}"
        if not _is_number(self.temperature) or not math.isfinite(self.temperature) or self.temperature <= 0:
            problems["temperature"] = f"must be a finite number > 0, got {show_json_value(self.temperature)}"
        if not _is_int(self.top_k) or self.top_k < 0:
            problems["top_k"] = f"must be an integer >= 0 (0: no top-k filtering), got {show_json_value(self.top_k)}"
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            problems["top_p"] = f"must be in (0, 1], got {show_json_value(self.top_p)}"
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**64):
            problems["seed"] = f"must be null or an integer in [0, 2**64), got {show_json_value(self.seed)}"
        if not isinstance(self.ignore_eos, (bool, np.bool_)):
            problems["ignore_eos"] = f"must be true or false, got {show_json_value(self.ignore_eos)}"
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            problems["min_tokens"] = f"must be an integer >= 0, got {show_json_value(self.min_tokens)}"
        elif "max_new_tokens" not in problems and self.min_tokens > self.max_new_tokens:
            # vLLM's rule: a row that must outlive its own length limit cannot be generated
            problems["min_tokens"] = (f"{self.min_tokens} is more than max_new_tokens ({self.max_new_tokens}); it "
                                      "must be at most that")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
            problems["stop"] = f"must be a list of strings, got {show_json_value(self.stop)}"
        elif len(stop) > _MAX_STOP or any(not s or len(s) > _MAX_STOP_CHARS for s in stop):
            # what is wrong, not the value: a refused list is up to the body limit long
            wrong = (f"{len(stop)} strings" if len(stop) > _MAX_STOP else next(
                f"entry {i} {'is empty' if not s else f'has {len(s):,} characters'}"
                for i, s in enumerate(stop) if not s or len(s) > _MAX_STOP_CHARS))
            problems["stop"] = (f"at most {_MAX_STOP} non-empty strings of at most {_MAX_STOP_CHARS} characters, "
                                f"got {wrong}")
        else:
            object.__setattr__(self, "stop", tuple(stop))
        ids = self.stop_token_ids
        if not isinstance(ids, (list, tuple)) or not all(_is_int(t) and t >= 0 for t in ids) or len(ids) > _MAX_STOP:
            # what is wrong, as for stop: the routes pass a tuple, which show_json_value described as "tuple"
            wrong = (show_json_value(ids) if not isinstance(ids, (list, tuple)) else f"{len(ids)} ids"
                     if len(ids) > _MAX_STOP else next(f"entry {i} is {show_json_value(t)}" for i, t in enumerate(ids)
                                                       if not (_is_int(t) and t >= 0)))
            problems["stop_token_ids"] = f"must be a list of at most {_MAX_STOP} token ids >= 0, got {wrong}"
        else:
            object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in ids))
        # vLLM's ranges (SamplingParams._verify_args), and a finite number: JSON cannot carry an infinity
        rep = self.repetition_penalty
        # and within what float32 logits survive: 1e-300 is 0 in float32 (a logit / 0: inf, then NaN, a 500)
        if not _is_number(rep) or not math.isfinite(rep) or not REPETITION_PENALTY_RANGE[0] <= rep <= \
                REPETITION_PENALTY_RANGE[1]:
            problems["repetition_penalty"] = (f"must be a number from {REPETITION_PENALTY_RANGE[0]:g} to "
                                              f"{REPETITION_PENALTY_RANGE[1]:g} (> 0; 1: off), got "
                                              f"{show_json_value(rep)}")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2 <= value <= 2:
                problems[name] = f"must be a number in [-2, 2] (0: off), got {show_json_value(value)}"
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            problems["logprobs"] = (f"must be null (off) or an integer from 0 to {MAX_LOGPROBS}, "
                                    f"got {show_json_value(self.logprobs)}")
        prompt = self.prompt_logprobs
        if prompt is not None and (not _is_int(prompt) or not 0 <= prompt <= MAX_LOGPROBS):
            problems["prompt_logprobs"] = (f"must be null (off) or an integer from 0 to {MAX_LOGPROBS}, "
                                           f"got {show_json_value(prompt)}")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:  # NaN fails both comparisons
            problems["min_p"] = f"must be a number in [0, 1] (0: off), got {show_json_value(self.min_p)}"
        bias, wrong = _read_logit_bias(self.logit_bias)
        if wrong:
            problems["logit_bias"] = wrong
        if problems:
            raise SamplingParamsError(problems)
        object.__setattr__(self, "logit_bias", bias)
        object.__setattr__(self, "min_p", float(self.min_p))
        object.__setattr__(self, "repetition_penalty", float(self.repetition_penalty))
        object.__setattr__(self, "frequency_penalty", float(self.frequency_penalty))
        object.__setattr__(self, "presence_penalty", float(self.presence_penalty))
        object.__setattr__(self, "max_new_tokens", int(self.max_new_tokens))
        object.__setattr__(self, "do_sample", bool(self.do_sample))
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_k", int(self.top_k))
        object.__setattr__(self, "top_p", float(self.top_p))
        object.__setattr__(self, "ignore_eos", bool(self.ignore_eos))
        object.__setattr__(self, "min_tokens", int(self.min_tokens))
        if self.seed is not None:
            object.__setattr__(self, "seed", int(self.seed))
        if self.logprobs is not None:
            object.__setattr__(self, "logprobs", int(self.logprobs))
        if self.prompt_logprobs is not None:
            object.__setattr__(self, "prompt_logprobs", int(self.prompt_logprobs))

    def logprob_entries(self, prompt_tokens: int, generated: bool = True) -> int:
        """The most log-probability entries a row of these settings over a prompt of ``prompt_tokens`` tokens may list
        (each listed token and its alternatives; every token up to ``max_new_tokens`` generated; ``generated`` False:
        the prompt's alone): what its answer holds, bounded per answer by ``--max-logprob-entries``
        (:func:`~bca_deploy.serving.openai.check_logprob_entries`). The prompt's first token, which lists nothing, is
        counted too."""
        entries = 0
        if self.prompt_logprobs is not None:
            entries += prompt_tokens * (self.prompt_logprobs + 1)
        if self.logprobs is not None and generated:
            entries += self.max_new_tokens * (self.logprobs + 1)
        return entries

    def check_vocabulary(self, vocabulary: int | None) -> None:
        """Refuse ``stop_token_ids`` and ``logit_bias`` ids outside the vocabulary a row can generate, [0,
        ``vocabulary``) (``None``: not known, the ids' int64 range; the callers pass
        :attr:`~bca_deploy.serving.MultiAdapterSession.generated_vocabulary`, which an output layer narrower than the
        embedding lowers), as vLLM checks both: an id no step can choose ends nothing and biases nothing (a client's
        mistake, not a no-op; the penalties, which also count prompt ids, skip such ids instead), and one past int64
        made the ``min_tokens`` mask (:attr:`Sampler.held_ids`) raise OverflowError: a 500.

        Raises:
            SamplingParamsError: naming each field with ids outside (the first five of each).
        """
        vocab = vocabulary or 2**63
        problems = {}
        for name, ids in (("stop_token_ids", self.stop_token_ids), ("logit_bias", [t for t, _ in self.logit_bias or ()])):
            outside = [t for t in ids if t >= vocab]
            if outside:
                shown = ", ".join(show_json_value(t) if name == "stop_token_ids" else repr(str(t)) for t in outside[:5])
                more = f" (and {len(outside) - 5} more)" if len(outside) > 5 else ""
                what = "token ids must be" if name == "stop_token_ids" else "keys must be token ids"
                problems[name] = f"{what} in the vocabulary the model generates from, [0, {vocab}); got {shown}{more}"
        if problems:
            raise SamplingParamsError(problems)

    @property
    def penalized(self) -> bool:
        """Whether any penalty is on (not at its neutral value)."""
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


def _read_logit_bias(value: Any) -> tuple[tuple[tuple[int, float], ...] | None, str | None]:
    """``(pairs, None)``: ``value`` (a mapping of token ids, ints or their decimal strings, to biases; or the
    ``(id, bias)`` pairs this returns) as ``(id, bias)`` pairs sorted by id (``None`` when empty or ``None``); or
    ``(None, why)`` naming every offending key (the first five)."""
    if value is None:
        return None, None
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, tuple) and all(isinstance(item, tuple) and len(item) == 2 for item in value):
        items = list(value)  # this function's own output (dataclasses.replace passes it back)
    else:
        return None, (f"must be an object mapping token ids to biases in [-100, 100], got "
                      f"{show_json_value(value)}")
    if len(items) > MAX_LOGIT_BIAS:
        return None, f"at most {MAX_LOGIT_BIAS} token ids may be biased, got {len(items):,}"
    low, high = LOGIT_BIAS_RANGE
    pairs: dict[int, float] = {}
    wrong: list[str] = []
    for key, bias in items:
        token = _token_key(key)
        shown = f"key {show_json_value(str(key) if _is_int(key) else key)}"
        if token is None and (_is_decimal(key) or (_is_int(key) and key >= 0)):  # past int64: past any vocabulary
            wrong.append(f"{shown} is past the largest token id, {2**63 - 1}")
        elif token is None:
            wrong.append(f"{shown} is not a token id (an integer >= 0 in plain decimal: no sign, spaces or leading "
                         "zeros)")
        elif token in pairs:
            wrong.append(f"{shown} names token {token} again")
        elif not _is_number(bias) or not low <= bias <= high:  # NaN fails both comparisons
            wrong.append(f"{shown}: the bias must be a number in [{low:g}, {high:g}], got {show_json_value(bias)}")
        else:
            pairs[token] = float(bias)
    if wrong:
        more = f" (and {len(wrong) - 5} more)" if len(wrong) > 5 else ""
        return None, "; ".join(wrong[:5]) + more
    return (tuple(sorted(pairs.items())) or None), None


def _token_key(key: Any) -> int | None:
    """A ``logit_bias`` key as a token id: an integer in [0, 2**63), or its canonical decimal string ("50256"; not
    "050256", "+5" or " 5", so that no two keys name one token); else ``None``."""
    if _is_int(key):
        token = int(key)
    elif _is_decimal(key) and len(key) <= 19:
        token = int(key)
    else:
        return None
    return token if 0 <= token < 2**63 else None


def _is_decimal(key: Any) -> bool:
    """Whether ``key`` is a canonical decimal string of an integer >= 0 (ASCII digits, no sign, no leading zero)."""
    return isinstance(key, str) and key.isascii() and key.isdigit() and (key == "0" or key[0] != "0")


class Penalties:
    """One row's penalty state: the token ids its penalties touch and how often each occurs in its output so far.

    Sparse: ``ids[:size]`` are the distinct ids of the prompt (only where ``repetition_penalty`` is on: the other
    penalties look at the output alone) followed by output ids not in the prompt, ``counts[:size]`` their counts in
    the output (float32, as vLLM's counts meet float32 penalties). :meth:`add` updates them by one token (no pass over
    the prompt or the vocabulary), and :func:`apply_penalties` touches only these ids, so a row costs what it has seen.
    """

    __slots__ = ("repetition", "frequency", "presence", "ids", "counts", "size", "_prompt", "_where")

    def __init__(self, params: SamplingParams, prompt: Sequence[int] = ()) -> None:
        self.repetition = np.float32(params.repetition_penalty)
        self.frequency = np.float32(params.frequency_penalty)
        self.presence = np.float32(params.presence_penalty)
        if params.repetition_penalty != 1.0 and len(prompt):
            self._prompt = np.unique(np.asarray(prompt, dtype=np.int64))  # sorted, for searchsorted in add()
        else:
            self._prompt = np.zeros(0, dtype=np.int64)
        self.size = int(self._prompt.size)
        capacity = self.size + 16
        self.ids = np.zeros(capacity, dtype=np.int64)
        self.ids[:self.size] = self._prompt
        self.counts = np.zeros(capacity, dtype=np.float32)
        self._where: dict[int, int] = {}  # output token -> its index in ids

    def add(self, token: int) -> None:
        """One more output token."""
        index = self._where.get(token)
        if index is None:
            index = int(np.searchsorted(self._prompt, token)) if self._prompt.size else 0
            if index >= self._prompt.size or self._prompt[index] != token:  # not in the prompt: a new id
                if self.size == self.ids.size:
                    self.ids = np.concatenate([self.ids, np.zeros(self.size, dtype=np.int64)])
                    self.counts = np.concatenate([self.counts, np.zeros(self.size, dtype=np.float32)])
                index = self.size
                self.ids[index] = token
                self.size += 1
            self._where[token] = index
        self.counts[index] += 1


def apply_penalties(logits: np.ndarray, penalties: Sequence[Penalties],
                    rows: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Apply each row's penalties to its row of ``logits`` (B, V), a C-contiguous float32 array, in place, in one
    pass over every penalized row's seen ids together (vLLM's ``apply_penalties``, computed on the ids it changes
    only): repetition (transformers' ``where(score < 0, score * r, score / r)`` in float32), then
    ``- frequency * count``, then ``- presence * (count > 0)``. Ids at or beyond the logits' width (an embedding
    larger than the output layer) are skipped, as transformers skips them.

    Args:
        rows: the row of ``logits`` of each entry of ``penalties`` (default: 0, 1, ...).

    Returns:
        ``(positions, before)``: the positions changed in ``logits.reshape(-1)`` and their values before, so that a
        caller can put them back (``logits.reshape(-1)[positions] = before``).
    """
    width = logits.shape[-1]
    sizes = np.fromiter((p.size for p in penalties), dtype=np.int64, count=len(penalties))
    if not sizes.any():
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=logits.dtype)
    index = np.arange(len(penalties)) if rows is None else np.asarray(rows, dtype=np.int64)
    ids = np.concatenate([p.ids[:p.size] for p in penalties])
    counts = np.concatenate([p.counts[:p.size] for p in penalties])
    repetition, frequency, presence = (np.repeat(np.array(values, dtype=np.float32), sizes) for values in zip(
        *((p.repetition, p.frequency, p.presence) for p in penalties)))
    positions = np.repeat(index * width, sizes) + ids
    if ids.max() >= width:
        inside = ids < width
        positions, counts = positions[inside], counts[inside]
        repetition, frequency, presence = repetition[inside], frequency[inside], presence[inside]
    flat = logits.reshape(-1)  # a view (C-contiguous): flat indexing is ~8x faster than [rows, ids]
    before = flat[positions]
    values = np.where(before < 0, before * repetition, before / repetition)
    values -= frequency * counts
    values -= presence * (counts > 0).astype(np.float32)
    flat[positions] = values
    return positions, before


class Sampler:
    """One row's token chooser: the argmax, or a draw from the row's own generator (seeded once), after the row's
    ``logit_bias`` (:attr:`bias_ids`, :attr:`bias_values`; ``None`` without one) and penalties (:class:`Penalties`,
    given the row's prompt; ``None`` when every penalty is off).

    ``end_ids``: the end-of-sequence ids the row ends at (none with ``ignore_eos``); with them and
    ``stop_token_ids``, the ids masked while the row has fewer than ``min_tokens`` tokens (:attr:`held_ids`).
    """

    def __init__(self, params: SamplingParams, prompt: Sequence[int] = (), end_ids: Iterable[int] = ()) -> None:
        self.params = params
        self.generator = np.random.default_rng(params.seed) if params.do_sample else None
        self.penalties = Penalties(params, prompt) if params.penalized else None
        self.bias_ids: np.ndarray | None = None  # (N,) int64, sorted
        self.bias_values: np.ndarray | None = None  # (N,) float32: added as float32 logits meet it
        if params.logit_bias:
            self.bias_ids = np.array([t for t, _ in params.logit_bias], dtype=np.int64)
            self.bias_values = np.array([b for _, b in params.logit_bias], dtype=np.float32)
        held = (set(end_ids) | set(params.stop_token_ids)) if params.min_tokens else ()
        self.held_ids = np.array(sorted(held), dtype=np.int64)  # (H,)
        self.generated = 0  # tokens chosen so far (a pre-empted row keeps its sampler, so its count)

    @property
    def holding(self) -> bool:
        """Whether the row's end ids are masked at this step (fewer than ``min_tokens`` tokens so far)."""
        return self.generated < self.params.min_tokens and self.held_ids.size > 0

    def draw(self, logits: np.ndarray) -> int:
        """A token drawn from :meth:`distribution` (``logits``: (V,), after the row's bias and penalties).

        Raises:
            FloatingPointError: the row's logits hold NaN or +Inf (the model's output overflowed): nothing
                can be drawn. The caller fails this row alone.
        """
        probs = self.distribution(logits)
        assert self.generator is not None
        # Generator.choice(V, p=probs)'s own draw, without its checks of p (O(V) each; probs is a distribution by
        # construction): one uniform double, the first token whose cumulative probability exceeds it (never a token
        # of probability 0: the sums are flat there). The same token for the same seed as choice gave.
        cumulative = np.cumsum(probs)
        cumulative /= cumulative[-1]
        return int(cumulative.searchsorted(self.generator.random(), side="right"))

    def distribution(self, logits: np.ndarray) -> np.ndarray:
        """The probabilities (V,) float64 a sampled row draws from: softmax(logits / temperature), then min-p, top-k
        and top-p filtering (vLLM's order; each renormalises), ``logits`` not changed.

        Min-p keeps the tokens whose probability is at least ``min_p`` times the largest (transformers'
        ``MinPLogitsWarper`` and vLLM's rule, compared on probabilities as they compare them: ties are kept or
        dropped together, the most likely token always kept).

        Raises:
            FloatingPointError: the row's logits hold NaN or +Inf.
        """
        p = self.params
        scores = logits.astype(np.float64)
        top = scores.max()
        if not np.isfinite(top):  # NaN anywhere makes the max NaN; +Inf: an overflowed output
            raise FloatingPointError(f"the model's logits for this row are not finite (largest: {top}); "
                                     "no token can be sampled")
        # shift before dividing: any temperature > 0, however small, gives scores in [-inf, 0] (never inf - inf)
        with np.errstate(over="ignore"):  # a tiny temperature sends the other scores to -inf, as it should
            scores = (scores - top) / p.temperature
        if p.min_p > 0.0:
            probs = np.exp(scores)
            probs /= probs.sum()
            # probs.max() is the top token's (its score is 0): below min_p times it is out, as MinPLogitsWarper says
            np.putmask(scores, probs < p.min_p * probs.max(), -np.inf)  # scores is this call's own array
        if 0 < p.top_k < scores.size:
            cutoff = np.partition(scores, -p.top_k)[-p.top_k]
            np.putmask(scores, scores < cutoff, -np.inf)
        probs = np.exp(scores)  # the largest score is 0: the sum is at least 1
        probs /= probs.sum()
        if p.top_p < 1.0:
            order, kept = _top_p_prefix(probs, p.top_p)
            filtered = np.zeros_like(probs)
            filtered[order[:kept]] = probs[order[:kept]]
            probs = filtered / filtered.sum()
        return probs


#: The most likely tokens :func:`_top_p_prefix` sorts first (then 8 times more, until their mass reaches top-p).
_TOP_P_FIRST = 64
#: The share of the vocabulary past which :func:`_top_p_prefix` sorts every token at once: a prefix that must hold
#: at least this many costs more in repeated partitions than one whole sort.
_TOP_P_WHOLE_SORT = 1 / 32


def _top_p_prefix(probs: np.ndarray, top_p: float) -> tuple[np.ndarray, int]:
    """Top-p's kept tokens of ``probs`` (V,): ``(order, kept)``, ``order[:kept]`` the smallest prefix of the tokens
    by probability (ties by id, a stable sort's order) whose mass reaches ``top_p`` (the first always kept).

    The same prefix, and the same cumulative sums, as a stable sort of the whole vocabulary (``argsort(-probs,
    kind="stable")``, which this took before: 2-6 ms a row at 32k tokens, the larger part of a sampled step), found by
    sorting only the tokens at least as likely as the k-th (``np.partition``, linear; every token tied with the k-th
    included, so they are exactly the whole sort's first ones), k = 64, then more, until the prefix ends inside them.
    A prefix that must hold a large part of the vocabulary (a flat distribution: known from the first k's mass) is
    sorted whole at once. When top-k or min-p left most tokens at probability 0, only the others are looked at: a
    prefix past them keeps no more mass.
    """
    size = probs.size
    if np.count_nonzero(probs) < size // 2:
        support = np.flatnonzero(probs)  # ascending ids: the stable sorts break ties by id, as the whole sort does
        values = probs[support]
    else:
        support, values = None, probs
    count = values.size
    k = _TOP_P_FIRST
    while k < count:
        threshold = np.partition(values, count - k)[count - k]  # the k-th largest
        picked = np.flatnonzero(values >= threshold)
        candidates = picked if support is None else support[picked]
        order = candidates[np.argsort(-probs[candidates], kind="stable")]
        sorted_probs = probs[order]
        cumulative = np.cumsum(sorted_probs)
        keep = cumulative - sorted_probs < top_p  # a prefix: the mass before each token only grows
        if not keep[-1]:
            return order, int(keep.sum())
        # not reached yet: no token left is likelier than the k-th, so at least (top_p - mass) / threshold more are
        # needed (a lower bound); past a small share of the vocabulary one whole sort costs less than partitioning
        # again (a flat distribution was 0.8x the whole sort's speed when k only grew 8-fold)
        needed = order.size + max(top_p - float(cumulative[-1]), 0.0) / float(threshold)
        if needed > count * _TOP_P_WHOLE_SORT:
            break
        k = max(k * 8, int(2 * needed))
    if support is None:
        order = np.argsort(-probs, kind="stable")
    else:
        order = support[np.argsort(-values, kind="stable")]
    sorted_probs = probs[order]
    return order, int((np.cumsum(sorted_probs) - sorted_probs < top_p).sum())


def choose_tokens(logits: np.ndarray, samplers: Sequence[Sampler]) -> tuple[list[int], dict[int, Exception]]:
    """Next token of each row from its last-position logits (B, V): argmax, or its sampler's draw, after the row's
    ``logit_bias``, then its penalties and, for a row short of its ``min_tokens``, with its end ids masked
    (:attr:`Sampler.holding`), in vLLM's order; each chosen token then counts in its row's penalties and in its
    sampler's :attr:`~Sampler.generated`.

    The biased rows' ids are biased in ``logits`` itself, the penalized rows' seen ids penalized, all rows together,
    and the held rows' end ids set to -inf, then all put back (last first) before this returns (``logits`` is
    unchanged afterwards, so log-probabilities read from it are the raw ones; not for arrays other threads read
    meanwhile): no row is copied, so rows that ask none of these cost what they did, and a biased or penalized row
    costs the ids it names or has seen, not the vocabulary.

    Returns:
        ``(tokens, failures)``: one token per row (-1 for a row that failed), and ``{row: exception}`` for
        rows whose draw raised. A row that cannot be sampled fails alone, never the rows beside it.
    """
    biased = [b for b, sampler in enumerate(samplers) if sampler.bias_ids is not None]
    penalized = [b for b, sampler in enumerate(samplers) if sampler.penalties is not None]
    holding = [b for b, sampler in enumerate(samplers) if sampler.holding]
    changed = masked = shifted = None
    if biased or penalized or holding:
        if not (logits.flags.c_contiguous and logits.flags.writeable and logits.dtype == np.float32):
            logits = np.array(logits, dtype=np.float32, order="C")  # a copy of our own: nothing to put back
    if biased:  # first, as vLLM's LogitBiasLogitsProcessor runs before its penalties
        width = logits.shape[-1]
        # ids past the logits' width (an embedding larger than the output layer) are skipped, as the penalties skip them
        inside = [samplers[b].bias_ids < width for b in biased]
        positions = np.concatenate([b * width + samplers[b].bias_ids[keep] for b, keep in zip(biased, inside)])
        values = np.concatenate([samplers[b].bias_values[keep] for b, keep in zip(biased, inside)])
        flat = logits.reshape(-1)
        shifted = (positions, flat[positions])
        flat[positions] = shifted[1] + values
    if penalized:
        changed = apply_penalties(logits, [samplers[b].penalties for b in penalized], penalized)
    if holding:  # after the penalties (they leave -inf as it is); put back first, then the penalties' values
        width = logits.shape[-1]
        positions = np.concatenate([b * width + samplers[b].held_ids[samplers[b].held_ids < width] for b in holding])
        flat = logits.reshape(-1)
        masked = (positions, flat[positions])
        flat[positions] = -np.inf
    tokens: list[int] = []
    failures: dict[int, Exception] = {}
    try:
        greedy = logits.argmax(-1).tolist()  # Python ints
        for b, sampler in enumerate(samplers):
            if sampler.generator is None:
                tokens.append(greedy[b])
                continue
            try:
                tokens.append(sampler.draw(logits[b]))  # draw copies the row before it changes anything
            except Exception as exc:  # noqa: BLE001 - this row's failure, reported to its request alone
                tokens.append(-1)
                failures[b] = exc
    finally:  # last change first: each saved what the one before it had left
        if masked is not None:
            logits.reshape(-1)[masked[0]] = masked[1]
        if changed is not None:
            logits.reshape(-1)[changed[0]] = changed[1]
        if shifted is not None:
            logits.reshape(-1)[shifted[0]] = shifted[1]
    for b in penalized:
        if b not in failures:
            samplers[b].penalties.add(tokens[b])
    for b, sampler in enumerate(samplers):
        if b not in failures:
            sampler.generated += 1
    return tokens, failures


@dataclasses.dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A chosen token's log-probability and the ``k`` most likely tokens' (:func:`token_logprobs`).

    ``top_ids`` / ``top_logprobs``: the ``k`` most likely tokens' ids and log-probabilities, most likely first (ties:
    the lower id first), as compact arrays (``array('i')``, ``array('d')``; ``()`` when ``k`` is 0); :attr:`top` reads
    them as ``(token_id, logprob)`` pairs. The chosen token is among them only if it is one of the ``k`` most likely.
    Log-probabilities are floats >= :data:`LOGPROB_FLOOR` (vLLM's and OpenAI's floor for a probability that
    underflows; a non-finite logit gives the floor too), never inf or NaN, so they go into JSON as they are.

    Compact because an answer holds one per listed token until it is rendered (rows x tokens of them): pairs of Python
    ints and floats in a tuple, in an object with a ``__dict__``, took ~92 bytes per alternative; slots and two arrays
    take ~21 at ``k`` 20 (the float64 values unchanged, so the JSON is byte-equal).
    """

    token_id: int
    logprob: float
    top_ids: Sequence[int] = ()
    top_logprobs: Sequence[float] = ()

    @property
    def top(self) -> tuple[tuple[int, float], ...]:
        """The alternatives as ``(token_id, logprob)`` pairs, most likely first."""
        return tuple(zip(self.top_ids, self.top_logprobs))


#: The lowest log-probability reported (vLLM clamps to it, as OpenAI does: -inf is not JSON).
LOGPROB_FLOOR = -9999.0


def token_logprobs(logits: np.ndarray, rows: Sequence[int], tokens: Sequence[int],
                   tops: Sequence[int]) -> list[TokenLogprob]:
    """The log-probabilities of ``tokens[i]`` and of the ``tops[i]`` most likely tokens under row ``rows[i]`` of
    ``logits`` (B, V): log_softmax of the row's raw logits (see :class:`SamplingParams` ``logprobs``).

    Only the rows asked are read (a copy of those rows alone): a step where no row asks costs nothing, and a row's
    numbers never depend on the rows beside it. Of log_softmax only the values reported are formed (logit - max -
    log(sum(exp(logits - max))), the sum in float64): one pass of ``exp`` over each row, and a partition for the rows'
    alternatives. ``logits`` is not changed.
    """
    if not rows:
        return []
    picked = logits[np.asarray(rows, dtype=np.int64)]  # these rows alone: (R, V)
    width = picked.shape[-1]
    with np.errstate(invalid="ignore", over="ignore"):
        top = picked.max(-1, keepdims=True)
        norm = top.astype(np.float64) + np.log(np.exp(picked - top).sum(-1, keepdims=True, dtype=np.float64))
    most = min(max(int(k) for k in tops), width)
    candidates = None
    if most:  # the `most` largest of every row (unordered), ordered per row below
        candidates = np.argpartition(picked, width - most, axis=-1)[:, width - most:] if most < width else \
            np.broadcast_to(np.arange(width), picked.shape)
    out = []
    for r, (token, k) in enumerate(zip(tokens, tops, strict=True)):
        chosen = _floored(picked[r, token] - norm[r, 0]) if 0 <= token < width else LOGPROB_FLOOR
        if k and candidates is not None:
            ids = candidates[r]
            values = picked[r, ids] - norm[r, 0]
            # most likely first, ties by id; a tie across the cut is settled by the partition, as torch.topk's is
            order = np.lexsort((ids, -values))[:min(int(k), width)]
            best = values[order].astype(np.float64)
            # _floored's rule on the whole array (NaN and -inf: the floor); int32 ids: every vocabulary fits
            best = np.where(best >= LOGPROB_FLOOR, best, LOGPROB_FLOOR)
            out.append(TokenLogprob(int(token), chosen, array("i", ids[order].tolist()), array("d", best.tolist())))
        else:
            out.append(TokenLogprob(int(token), chosen))
    return out


def _floored(value: Any) -> float:
    """A log-probability as a float of at least :data:`LOGPROB_FLOOR` (NaN and -inf: the floor)."""
    value = float(value)
    return value if value >= LOGPROB_FLOOR else LOGPROB_FLOOR


@dataclasses.dataclass(eq=False)
class DecodeRow:
    """One row of a :class:`DecodeBatch`.

    ``prompt``: its token ids; ``adapter``: a name in ``snapshot`` or ``None`` (base model);
    ``length``: tokens in its past so far; ``next_token``: the token the next step feeds (set by the
    caller after each prefill/step); ``owner``: anything the caller wants to find the row's request by;
    ``score``: its prefill scores its prompt (``None``: not), listing this many alternatives per position
    (:attr:`PrefillJob.scores`).
    """

    prompt: list[int]
    adapter: str | None
    snapshot: Any  # BankSnapshot
    owner: Any = None
    length: int = 0
    next_token: int | None = None
    score: int | None = None


@dataclasses.dataclass(eq=False)
class PrefillJob:
    """A prefill in progress (:meth:`DecodeBatch.start_prefill`): its rows' padded prompts and the past so far.

    ``rows``: as given; ``live``: indices of the rows still in it (never empty until ``finished``);
    ``running``: those of them that run (the *leaders*; ``feeds`` and ``past`` hold one row each, in this order) and
    ``follows``: ``{index of a row still in it: index of its leader}`` for the others. Rows that read the same prompt
    on the same adapter and bank snapshot, scoring as many alternatives (a request's ``n`` choices, pass@k sampling),
    have the same logits and past (a row's numbers are its own, whatever runs beside it), so they are run once: the
    first is the leader, the others follow and get copies of its last logits, past and scores when the prefill ends;
    ``failures``: ``{index in rows: exception}``;
    ``logits``: once ``finished``, last-position logits (len(rows), V) float32, NaN for rows not prefilled;
    ``width``/``done``/``columns``: prompt columns in all, run so far, and per run;
    ``scores``: in a scoring prefill (its rows' ``score`` set), ``{index in rows: [TokenLogprob of prompt token 1,
    2, ...]}`` so far: each prompt token after the first under the logits of the position before it (teacher-forced),
    computed chunk by chunk, so a chunk's every-position logits are the only ones held.
    """

    rows: list[DecodeRow]
    logits: np.ndarray
    failures: dict[int, Exception] = dataclasses.field(default_factory=dict)
    live: list[int] = dataclasses.field(default_factory=list)
    running: list[int] = dataclasses.field(default_factory=list)
    follows: dict[int, int] = dataclasses.field(default_factory=dict)
    feeds: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # (running, width) inputs, mask included
    past: dict[str, Any] = dataclasses.field(default_factory=dict)  # past input -> (running, heads, done, head_dim)
    width: int = 0
    done: int = 0
    columns: int = 0
    finished: bool = False
    reported: set[int] = dataclasses.field(default_factory=set)  # failures the caller has handled (indices in rows)
    last_run: tuple[int, int] = (0, 0)  # (rows, padded tokens) of the last prefill_chunk's run; (0, 0): it ran none
    scoring: bool = False  # every position's logits are run and scored (rows asking score)
    scores: dict[int, list] = dataclasses.field(default_factory=dict)

    @property
    def tokens_left(self) -> int:
        """Padded prompt tokens still to run (the leaders' only: followers run none)."""
        return len(self.running) * (self.width - self.done)

    def drop(self, indices: Sequence[int]) -> None:
        """Rows (indices in ``rows``) leave the prefill; their inputs and past go. A leader that leaves while rows
        follow it hands its place (its inputs, past and scores so far: the same numbers) to the first of them."""
        if not indices:
            return
        gone = set(indices)
        self.live = [i for i in self.live if i not in gone]
        for i in gone:
            self.follows.pop(i, None)
        running, keep = [], []
        for k, leader in enumerate(self.running):
            if leader in gone:
                heirs = [f for f in self.live if self.follows.get(f) == leader]
                if not heirs:
                    continue
                heir = heirs[0]
                del self.follows[heir]
                for f in heirs[1:]:
                    self.follows[f] = heir
                if leader in self.scores:
                    self.scores[heir] = self.scores.pop(leader)
                leader = heir
            running.append(leader)
            keep.append(k)
        if len(keep) < len(self.running):
            index = np.array(keep, dtype=np.int64)
            self.feeds = {name: value[index] for name, value in self.feeds.items()}
            self.past = {name: _host(value)[index] for name, value in self.past.items()}
        self.running = running

    def fail(self, leader: int, exc: Exception) -> None:
        """Running row ``leader`` failed (its inputs and past are taken out by the caller): it and the rows following
        it (the same inputs: they would fail the same way) leave with ``exc``."""
        for i in [leader, *(f for f, lead in self.follows.items() if lead == leader)]:
            self.failures[i] = exc
            self.follows.pop(i, None)
        self.live = [i for i in self.live if i not in self.failures]


class DecodeBatch:
    """Rows decoding together on one session: :meth:`prefill` newcomers, :meth:`step` everyone, :meth:`remove`.

    The batch is a list of *slots* (the past's batch dimension). A row that leaves frees its slot
    without moving anyone (a free slot still runs, on a pad token that attends only to itself, until it
    is reused or dropped); a newcomer whose tokens fit the current width is written into a free slot in
    place. Only a batch that must grow (no free slot, or a newcomer longer than the width) or that
    carries much waste (free slots or all-padding columns at least ``compact_at`` of the batch) is
    rebuilt: one copy of the past. So the usual step, where one row leaves and another joins, copies
    just the newcomer's past.

    Where the past lives: a step where no row joins feeds the previous run's presents back as they are,
    in the execution provider's memory (on a GPU they never leave it). Writing newcomers in, compaction
    and running rows apart work on host arrays, so on a GPU those steps copy the past to the host and
    back once (a gather on the device would avoid that copy).

    Not thread-safe: one thread steps a batch. Runs go through ``session.run_ortvalues``; a run that
    raises is retried row by row, so a row that breaks the graph fails alone (``failures`` of the
    result) and every other row gets its logits. ``before_run`` is called right before each run.

    Scoring prefills (rows with ``score``, see :meth:`start_prefill`) keep every position's logits, at most
    ``max_score_logits`` of them (positions x vocabulary) per run.
    """

    def __init__(self, session, *, compact_at: float = 0.25, before_run: Callable[[], None] | None = None,
                 max_score_logits: int = MAX_SCORE_LOGITS) -> None:
        session.require("generate")
        self.session = session
        self.compact_at = float(compact_at)
        self.max_score_logits = int(max_score_logits)
        self.slots: list[DecodeRow | None] = []
        self.width = 0  # P: columns of the past
        # past input -> (slots, kv_heads, P, head_dim): the last run's present OrtValues as they came (on the
        # execution provider's device), or host arrays once rows were written in (see _host_past)
        self._past: dict[str, Any] = {}
        self._presents = [n for n in session.output_names if PRESENT_OUTPUT.fullmatch(n)]
        self._past_of = {n: n.replace("present", "past_key_values", 1) for n in self._presents}
        missing = sorted(set(self._past_of.values()) - {n for n in session.inputs if PAST_INPUT.fullmatch(n)})
        if missing:
            raise ServingError(f"the graph's present outputs have no matching past inputs: {', '.join(missing)}")
        self._outputs = ["logits", *self._presents]
        self._pending: list[tuple[list[DecodeRow], dict[str, np.ndarray], int]] = []  # prefilled, not joined yet
        self._prefilling: list[PrefillJob] = []  # started, not finished
        # id() of rows to drop before the next step -> the row: held, so that its id is not a new row's meanwhile (a
        # row removed while nothing decodes waits here until a step; a newcomer allocated where it was got dropped)
        self._leaving: dict[int, DecodeRow] = {}
        self._composite: tuple[tuple, Any] | None = None  # (key, BankSnapshot) for rows of several snapshots
        self._pad = session.pad_token_id
        self._empty: dict[str, np.ndarray] | None = None  # _empty_past's template
        self._step_inputs = ("attention_mask" in session.inputs, "position_ids" in session.inputs)
        self.rebuilds = 0  # times the past was copied whole (growth or compaction)
        self._columns = session.vocabulary  # the logits' columns kept: the ids a row may hold (None: all)
        self.before_run = before_run  # called right before each onnxruntime run (which releases the GIL)

    @property
    def rows(self) -> list[DecodeRow]:
        """The rows in the batch's slots (not counting prefilled rows that join at the next step)."""
        return [r for r in self.slots if r is not None]

    @property
    def prefilling(self) -> list[PrefillJob]:
        """The prefills started and not finished, in the order they started."""
        return list(self._prefilling)

    @property
    def joined(self) -> list[DecodeRow]:
        """Every row that takes part in the next step (in slots or prefilled, minus removed)."""
        rows = [r for r in self.slots if r is not None]
        for group, _, _ in self._pending:
            rows.extend(group)
        return [r for r in rows if id(r) not in self._leaving] if self._leaving else rows

    @property
    def has_joined(self) -> bool:
        """Whether any row takes part in the next step (``bool(joined)``, without building the list)."""
        leaving = self._leaving
        return any(r is not None and id(r) not in leaving for r in self.slots) or any(
            id(r) not in leaving for group, _, _ in self._pending for r in group)

    @property
    def has_prefills(self) -> bool:
        """Whether a prefill is in progress (``bool(prefilling)``, without a copy of the list)."""
        return bool(self._prefilling)

    def __len__(self) -> int:
        return len(self.joined)

    # ---- rows in and out ---------------------------------------------------------------------------------

    def prefill(self, rows: Sequence[DecodeRow], *, chunk_tokens: int | None = None
                ) -> tuple[np.ndarray, dict[int, Exception]]:
        """Run the prompts of ``rows`` (left-padded, empty past) to the end; they join at the next step.

        ``chunk_tokens``: as :meth:`start_prefill` (``None``: one run).

        Returns:
            ``(logits, failures)``: last-position logits (len(rows), V) as float32 (rows that failed: NaN),
            and ``{index in rows: exception}`` for rows that failed alone (they do not join).
        """
        job = self.start_prefill(rows, chunk_tokens=chunk_tokens)
        while not job.finished:
            self.prefill_chunk(job)
        return job.logits, job.failures

    def start_prefill(self, rows: Sequence[DecodeRow], *, chunk_tokens: int | None = None) -> PrefillJob:
        """A prefill of ``rows`` to run a chunk at a time with :meth:`prefill_chunk` (nothing runs yet).

        Rows of the same prompt, adapter, bank snapshot and alternatives scored run once (:class:`PrefillJob`'s
        leaders and followers): ``n`` choices of one prompt cost one row's prefill. The prompts are left-padded to the
        longest; each run feeds the next ``max(1, chunk_tokens // running rows)`` columns with the past of the columns
        before (``None``: every column in one run). A chunk's queries see exactly the keys they would see in one run,
        so the logits and the past are those of one run. Chunks let the caller step the running rows between them: a
        long prompt then holds them up for one chunk at a time, never for its whole prefill (chunked prefill, as vLLM
        and TGI schedule it). A row whose ids the graph refuses fails at once, alone (with the rows following it).

        Rows with ``score`` make a scoring prefill (:attr:`PrefillJob.scores`): every position's logits are run (the
        graph's ``logits_to_keep`` 0), so its chunks are also held to ``max_score_logits`` logits (at least one
        column); the caller keeps rows that do not score out of it, as they would pay for the whole output layer.
        """
        rows = list(rows)
        job = PrefillJob(rows, logits=np.full((len(rows), 0), np.nan, dtype=np.float32),
                         scoring=any(row.score is not None for row in rows))
        # rows of the same numbers (prompt, adapter, bank snapshot, alternatives scored) run once: the first leads. The
        # key holds everything a row's logits and past depend on, so rows of different requests share as safely as a
        # request's own choices (the snapshot by identity: the rows hold it, so its id is not reused meanwhile)
        leaders: dict[tuple, int] = {}
        for i, row in enumerate(rows):
            leader = leaders.setdefault((tuple(row.prompt), row.adapter, id(row.snapshot), row.score), i)
            if leader != i:
                job.follows[i] = leader
        job.running = [i for i in range(len(rows)) if i not in job.follows]
        try:  # every row at once (checks ids and empty rows); padding: masked, at position 1 (as generate pads)
            job.feeds = self.session.pad_ids([rows[i].prompt for i in job.running], side="left", pad_id=self._pad)
        except Exception:  # noqa: BLE001 - a row the session refuses: found below, it fails alone (with its followers)
            job.live = list(range(len(rows)))
            for i in list(job.running):
                try:
                    self.session.check_ids([rows[i].prompt])
                except Exception as exc:  # noqa: BLE001 - this row fails alone
                    job.fail(i, exc)
            job.running = [i for i in job.running if i not in job.failures]
            if not job.running:
                job.finished = True
                return job
            job.feeds = self.session.pad_ids([rows[i].prompt for i in job.running], side="left", pad_id=self._pad)
        job.live = [i for i in range(len(rows)) if i not in job.failures]
        width = job.feeds["input_ids"].shape[1]
        job.width = width
        job.columns = width if chunk_tokens is None else max(1, int(chunk_tokens) // len(job.running))
        if job.scoring:  # a chunk's logits: rows x columns x vocabulary floats, held under max_score_logits
            vocab = max(1, int(getattr(self.session.config, "vocab_size", 0) or 0) or (self.session.vocabulary or 1))
            job.columns = max(1, min(job.columns, self.max_score_logits // (vocab * len(job.running))))
            job.scores = {i: [] for i in job.running}
        self._prefilling.append(job)
        return job

    def prefill_chunk(self, job: PrefillJob, columns: int | None = None) -> bool:
        """Run the next chunk of ``job`` (``columns`` columns, at least 1; default ``job.columns``); returns
        ``job.finished``. When the last chunk has run, the rows that did not fail are prefilled (``length`` set;
        they join at the next step) and ``job.logits`` holds their last-position logits. Rows removed meanwhile
        (:meth:`remove`) have left it already."""
        job.last_run = (0, 0)
        if job.finished:
            return True
        start, stop = job.done, min(job.done + max(1, columns or job.columns), job.width)
        job.last_run = (len(job.running), len(job.running) * (stop - start))  # rows and tokens run: leaders only
        everyone = job.running

        def feeds(subset: list[int]) -> dict[str, Any]:  # subset: positions in job.running
            out = {name: value[subset, :stop] if name == "attention_mask" else value[subset, start:stop]
                   for name, value in job.feeds.items()}
            if not job.past:
                out.update(self._empty_past(len(subset)))
            elif len(subset) == len(everyone):  # the usual run: the last chunk's presents go back in as they are
                out.update(job.past)
            else:
                index = np.array(subset)
                out.update({k: _host(v)[index] for k, v in job.past.items()})
            if self.session.keeps_last_logits:  # the output layer on the last position only (scoring: on all)
                out[LOGITS_TO_KEEP] = np.array(0 if job.scoring else 1, dtype=np.int64)
            return out

        logits, presents, failures = self._run_isolated([job.rows[i] for i in everyone], feeds,
                                                        all_positions=job.scoring)
        if job.scoring:
            if logits.shape[-1]:
                self._score(job, everyone, start, stop, logits, failures)
            logits = _last(logits) if logits.ndim == 3 else logits
        job.done = stop
        if failures:  # rows that fail alone leave the job (their followers with them); the others keep their past
            keep = [k for k in range(len(everyone)) if k not in failures]
            for k, exc in failures.items():
                job.fail(everyone[k], exc)
            job.running = [everyone[k] for k in keep]
            index = np.array(keep, dtype=np.int64)
            presents = {k: _host(v)[index] for k, v in presents.items()} if keep else {}
            logits = logits[index] if keep else logits[:0]
        job.past = {self._past_of[k]: v for k, v in presents.items()}
        if job.done < job.width and job.running:
            return False
        return self._finish_prefill(job, logits)

    def _score(self, job: PrefillJob, everyone: list[int], start: int, stop: int, logits: np.ndarray,
               failures: Mapping[int, Exception]) -> None:
        """Add to ``job.scores`` the prompt tokens this chunk's positions predict: column c's logits (``logits``:
        (rows, stop - start, V), every position) score the token in column c + 1, for each real column c of a row
        (its prompt is left-padded) before the last (whose logits choose the first new token).

        ``everyone``: the running rows (leaders); rows following one (its twins: a request's ``n`` choices of one
        prompt) take its scores when the prefill ends."""
        ids = job.feeds["input_ids"]  # (running rows, width): every column's token, the next chunk's too
        flat = logits.reshape(-1, logits.shape[-1])  # a view: row k, column c -> k * columns + (c - start)
        columns = stop - start
        picks, tokens, tops, owners = [], [], [], []
        for k, i in enumerate(everyone):
            if k in failures:
                continue
            row = job.rows[i]
            first = max(start, job.width - len(row.prompt))
            for c in range(first, min(stop, job.width - 1)):
                picks.append(k * columns + c - start)
                tokens.append(int(ids[k, c + 1]))
                tops.append(row.score or 0)
                owners.append(i)
        for owner, item in zip(owners, token_logprobs(flat, picks, tokens, tops), strict=True):
            job.scores[owner].append(item)

    def _empty_past(self, rows: int) -> dict[str, np.ndarray]:
        """Zero-length past feeds for ``rows`` rows (:func:`empty_past`, its shapes read from the graph once)."""
        if self._empty is None:
            self._empty = empty_past(self.session.session, 1)
        return {name: np.zeros((rows, *value.shape[1:]), dtype=value.dtype) for name, value in self._empty.items()}

    def _finish_prefill(self, job: PrefillJob, logits: Any) -> bool:
        """``job`` ends: ``logits`` (len(job.running), V) are its leaders' last; each follower gets copies of its
        leader's logits, past and scores, and every row still in it waits in ``_pending`` to join at the next step."""
        job.finished = True
        self._prefilling = [j for j in self._prefilling if j is not job]
        if job.running:
            vocab = logits.shape[-1]
            job.logits = np.full((len(job.rows), vocab), np.nan, dtype=np.float32)
            job.logits[np.array(job.running)] = logits
            past = {k: _host(v) for k, v in job.past.items()}  # newcomers are written into the past on the host
            # a past row (and logits) per row in job.live's order, followers' copied from their leader's. The leaders
            # run in job.running's order, which is not always job.live's: an heir takes its cancelled leader's place,
            # which may come before a row of another prompt listed ahead of the heir
            position = {i: k for k, i in enumerate(job.running)}
            index = [position[job.follows.get(i, i)] for i in job.live]
            if index != list(range(len(job.running))):
                index = np.array(index, dtype=np.int64)
                job.logits[np.array(job.live)] = logits[index]
                past = {k: v[index] for k, v in past.items()}
            for follower, leader in job.follows.items():
                if leader in job.scores:
                    job.scores[follower] = list(job.scores[leader])
            for i in job.live:
                job.rows[i].length = len(job.rows[i].prompt)
            self._pending.append(([job.rows[i] for i in job.live], past, job.width))
        job.past = {}
        return True

    def remove(self, rows: Iterable[DecodeRow]) -> None:
        """Rows leave the batch (finished, cancelled): their slots are freed before the next step, and a row still
        being prefilled leaves its prefill before its next chunk (a leader's followers go on: one of them runs)."""
        gone = {id(row): row for row in rows}
        self._leaving.update(gone)
        for job in list(self._prefilling):
            job.drop([i for i in job.live if id(job.rows[i]) in gone])
            if not job.live:  # every row left: the prefill ends without another run
                self._finish_prefill(job, None)
        # a prefilled row waits in _pending, its past with it, until a step joins it; a row that ends at its first
        # token (max_new_tokens 1, a prompt scored alone: an evaluation harness's every loglikelihood request) never
        # steps, so while no row decoded their pasts and rows piled up here. A group all of whose rows left goes now;
        # only rows still in a slot or in a pending group wait for the next step (to be taken out there)
        self._pending = [p for p in self._pending if any(id(r) not in self._leaving for r in p[0])]
        held = {id(r) for r in self.slots if r is not None} | {id(r) for group, _, _ in self._pending for r in group}
        self._leaving = {key: row for key, row in self._leaving.items() if key in held}

    def _prepare(self) -> None:
        """Apply removals and joins before a step: free slots, write newcomers in place, or rebuild."""
        if self._leaving:
            self.slots = [None if r is not None and id(r) in self._leaving else r for r in self.slots]
        newcomers = [(r, past, i, w) for group, past, w in self._pending for i, r in enumerate(group)
                     if id(r) not in self._leaving]
        self._pending, self._leaving = [], {}
        free = [s for s, r in enumerate(self.slots) if r is None]
        if len(newcomers) > len(free) or any(r.length > self.width for r, *_ in newcomers):
            self._rebuild(newcomers)
            return
        for (row, past, i, w), slot in zip(newcomers, free):  # in place: one row's past each
            for name, value in self._host_past().items():
                value[slot, :, :self.width - row.length] = 0
                value[slot, :, self.width - row.length:] = past[name][i, :, w - row.length:]
            self.slots[slot] = row
        active = self.rows
        waste_rows = len(self.slots) - len(active)
        waste_columns = self.width - max((r.length for r in active), default=0)
        if active and ((waste_rows and waste_rows >= self.compact_at * len(self.slots))
                       or (waste_columns and waste_columns >= self.compact_at * self.width)):
            self._rebuild([])

    def _rebuild(self, newcomers) -> None:
        """One new past: the rows in slots, then ``newcomers``, right-aligned, without free slots or padding columns."""
        keep = [s for s, r in enumerate(self.slots) if r is not None]
        rows = [self.slots[s] for s in keep] + [r for r, *_ in newcomers]
        width = max((r.length for r in rows), default=0)
        past: dict[str, np.ndarray] = {}
        old = self._host_past() if keep else {}
        for name in self._past_of.values():
            if not rows:
                break
            like = old[name] if keep else newcomers[0][1][name]
            merged = np.zeros((len(rows), like.shape[1], width, like.shape[3]), dtype=like.dtype)
            for b, s in enumerate(keep):
                length = self.slots[s].length
                merged[b, :, width - length:] = old[name][s, :, self.width - length:]
            for b, (row, new_past, i, w) in enumerate(newcomers, start=len(keep)):
                merged[b, :, width - row.length:] = new_past[name][i, :, w - row.length:]
            past[name] = merged
        self.slots, self._past, self.width = rows, past, width
        self.rebuilds += 1

    def _host_past(self) -> dict[str, np.ndarray]:
        """The past as numpy arrays, for writing rows in or picking some out (kept: later writes go to them).

        On CPU an ``OrtValue``'s array is a view of the same memory; on a GPU this is the one device-to-host
        copy, made only when rows join, leave for good (compaction) or run apart, never on a plain step.
        """
        self._past = {name: _host(value) for name, value in self._past.items()}
        return self._past

    # ---- a decoding step ---------------------------------------------------------------------------------------

    def step(self) -> tuple[list[DecodeRow], np.ndarray, dict[int, Exception]]:
        """Feed every row (:attr:`joined`) its ``next_token`` in one run over the batch.

        Returns:
            ``(rows, logits, failures)``: the rows that ran, their last-position logits (len(rows), V)
            (rows that failed: NaN), and ``{index in rows: exception}`` for rows that failed alone; those
            leave the batch.
        """
        self._prepare()
        slots, width = self.slots, self.width
        active = [s for s, r in enumerate(slots) if r is not None]
        if not active:
            return [], np.zeros((0, 0), np.float32), {}
        rows = [slots[s] for s in active]
        missing = sum(r.next_token is None for r in rows)
        if missing:
            raise ServingError(f"{missing} row(s) have no next token to feed")
        # a free slot: a pad token at position 0 attending only to itself (its output is ignored); built once per
        # step with numpy over all slots (a Python loop over the rows cost more than a tiny decoder's run)
        tokens = np.array([self._pad if r is None else r.next_token for r in slots], dtype=np.int64).reshape(-1, 1)
        lengths = np.array([0 if r is None else r.length for r in slots], dtype=np.int64).reshape(-1, 1)
        names = self._step_inputs

        def feeds(subset: list[int]) -> dict[str, Any]:
            whole = len(subset) == len(slots)
            index = None if whole else np.array(subset)
            ids, positions = (tokens, lengths) if whole else (tokens[index], lengths[index])
            out: dict[str, Any] = {"input_ids": ids}
            if names[0]:  # row b attends to its last `length` columns of the past and to its new token
                out["attention_mask"] = (np.arange(width + 1, dtype=np.int64) >= width - positions).astype(np.int64)
            if names[1]:
                out["position_ids"] = positions
            if whole:  # the usual step: the last run's presents go back in as they are (no copy)
                out.update(self._past)
            else:
                out.update({k: v[index] for k, v in self._host_past().items()})
            return out

        logits, presents, failures = self._run_isolated(slots, feeds)
        failed = {active.index(s): exc for s, exc in failures.items()} if failures else {}
        for s, row in zip(active, rows):
            if failures and s in failures:
                slots[s] = None
            else:
                row.length += 1
                row.next_token = None
        if presents:
            self._past = {self._past_of[k]: v for k, v in presents.items()}
            self.width = width + 1
        else:  # every row failed: the batch is empty, the next rows start a new past
            self.slots, self._past, self.width = [], {}, 0
        # every slot taken (the usual step): the logits as they are, not a copy of them
        return rows, logits if len(active) == len(logits) else logits[np.array(active)], failed

    # ---- running ------------------------------------------------------------------------------------------------

    def _run_isolated(self, slots: Sequence[DecodeRow | None], feeds: Callable[[list[int]], dict[str, Any]],
                      all_positions: bool = False) -> tuple[np.ndarray, dict[str, np.ndarray], dict[int, Exception]]:
        """One run over every slot; if it raises, one run per row, so only the rows that fail alone fail.

        Returns ``(logits (slots, V) float32, presents (slots, ...) as OrtValues or numpy, {slot: exception})``; free
        and failed slots get NaN logits and zero presents. When every row fails alone too, the logits have
        no columns and ``presents`` is empty: the caller drops those rows and nothing else (a prefill of
        bad prompts alone must not fail the rows already decoding). ``all_positions``: the logits of every position
        the run fed, (slots, positions, V), as the graph gave them (a scoring prefill).
        """
        def kept(logits: np.ndarray) -> np.ndarray:
            logits = logits.astype(np.float32, copy=False) if all_positions else _last(logits)
            if self._columns is not None and logits.shape[-1] > self._columns:
                # an output layer wider than the ids a row may hold (padded): those columns are never chosen nor
                # scored, as vLLM cuts the logits to the model's vocabulary; a chosen one failed the next step
                logits = np.ascontiguousarray(logits[..., :self._columns])
            return logits

        everyone = list(range(len(slots)))
        try:
            out = self._run(slots, feeds(everyone))
        except Exception:  # noqa: BLE001, S110 - isolated below: each row is run alone
            pass
        else:  # the presents stay OrtValues (on the device that made them): the next step feeds them back
            return kept(out["logits"].numpy()), {k: out[k] for k in self._presents}, {}
        failures: dict[int, Exception] = {}
        done: dict[int, dict[str, Any]] = {}
        for s, row in enumerate(slots):
            if row is None:
                continue
            try:
                done[s] = self._run([row], feeds([s]))
            except Exception as exc:  # noqa: BLE001 - this row fails alone
                failures[s] = exc
        if not done:
            return np.full((len(slots), 0), np.nan, dtype=np.float32), {}, failures
        first = next(iter(done.values()))
        shape = kept(first["logits"].numpy()).shape[1:]
        logits = np.full((len(slots), *shape), np.nan, dtype=np.float32)
        presents = {k: np.zeros((len(slots), *first[k].numpy().shape[1:]), first[k].numpy().dtype)
                    for k in self._presents}
        for s, out in done.items():
            logits[s] = kept(out["logits"].numpy())[0]
            for k in self._presents:
                presents[k][s] = out[k].numpy()[0]
        return logits, presents, failures

    def _run(self, slots: Sequence[DecodeRow | None], feeds: dict[str, Any]) -> dict[str, Any]:
        snapshot, names = self._bank(slots)
        if self.before_run is not None:
            self.before_run()
        # the presents stay in the execution provider's memory (a GPU's under provider="cuda"; onnxruntime would
        # otherwise copy them to the host after every run and back before the next)
        return self.session.run_ortvalues(feeds, names, self._outputs, snapshot, on_device=self._presents)

    def _bank(self, slots: Sequence[DecodeRow | None]) -> tuple[Any, list[str | None]]:
        """The bank snapshot one run over ``slots`` feeds, and each slot's adapter name in it (free: base)."""
        rows = [r for r in slots if r is not None]
        first = rows[0].snapshot
        if all(r.snapshot is first for r in rows):
            return first, [r.adapter if r is not None else None for r in slots]
        pairs = [(r.snapshot, int(r.snapshot.ids([r.adapter])[0])) if r is not None else None for r in slots]
        used = tuple(dict.fromkeys((s.version, slot) for s, slot in filter(None, pairs) if slot))
        if self._composite is None or self._composite[0] != used:
            snapshots = {s.version: s for s, _ in filter(None, pairs)}
            self._composite = (used, _composite_snapshot(self.session, first, snapshots, used))
        return self._composite[1], [f"{p[0].version}/{p[1]}" if p and p[1] else None for p in pairs]


def _composite_snapshot(session, like, snapshots: Mapping[int, Any], used: Sequence[tuple[int, int]]):
    """A bank of slot 0 (zeros) then the ``used`` (snapshot version, slot) pairs, each copied from its snapshot.

    Named ``"<version>/<slot>"``; shaped like ``like`` (a BankSnapshot) but for these slots only.
    """
    import onnxruntime as ort

    from ..exporters.bank import SLOT_AXIS

    device, device_id = getattr(session, "_device", ("cpu", 0))
    feeds = {}
    for name, value in like.feeds.items():
        template = value.numpy()
        zero = np.zeros_like(np.take(template, [0], axis=SLOT_AXIS))
        slices = [np.take(snapshots[version].feeds[name].numpy() if version != like.version else template, [slot],
                          axis=SLOT_AXIS) for version, slot in used]
        stacked = np.ascontiguousarray(np.concatenate([zero, *slices], axis=SLOT_AXIS))
        feeds[name] = ort.OrtValue.ortvalue_from_numpy(stacked, device, device_id)
    slots = {f"{version}/{slot}": i + 1 for i, (version, slot) in enumerate(used)}
    return dataclasses.replace(like, version=-1, slots=slots, infos={}, feeds=feeds)


def _host(value: Any) -> np.ndarray:
    """An ``OrtValue`` or array as a numpy array (a view on CPU, a copy from a GPU)."""
    return value if isinstance(value, np.ndarray) else value.numpy()


def _last(logits: np.ndarray) -> np.ndarray:
    """(B, T, V) or (B, V) logits -> the last position's (B, V), float32."""
    return (logits[:, -1, :] if logits.ndim == 3 else logits).astype(np.float32, copy=False)
