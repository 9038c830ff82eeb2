"""Limits and defaults of the serving runtime that more than one module uses: one definition each.

Kept free of imports so that :mod:`bca_deploy.serving.options` (read by the CLI's ``--help``) and the
runtime (:mod:`bca_deploy.serving.decoding`) share them without the options importing the runtime.
"""

from __future__ import annotations

__all__ = ["MAX_NEW_TOKENS", "MAX_LOGPROBS", "MAX_LOGPROB_ENTRIES", "PREEMPT_WAIT_STEPS", "MAX_SCORE_LOGITS",
           "MAX_LOGIT_BIAS", "TOOL_CALL_PARSERS"]

#: The most new tokens one row may generate (:class:`~bca_deploy.serving.decoding.SamplingParams`); the
#: graph's positions limit it further, and ``--max-new-tokens`` may not be set above it.
MAX_NEW_TOKENS = 4096

#: The most alternatives per token a row may ask log-probabilities of (:class:`~bca_deploy.serving.decoding.
#: SamplingParams` ``logprobs``): OpenAI's ``top_logprobs`` bound, and vLLM's default ``--max-logprobs``.
MAX_LOGPROBS = 20

#: Default ``--max-logprob-entries`` (:class:`~bca_deploy.serving.options.ServeOptions` ``max_logprob_entries``): the
#: most log-probability entries (each listed token and its alternatives, prompt and generated tokens alike, over every
#: choice) one answer that is not streamed may list, counted at the request's worst case before any work. It admits
#: what OpenAI clients ask (n 1 x 4,096 tokens x top_logprobs 20: 86,016; n 16 x 1,024 x 5: 98,304) and an evaluation
#: harness's echo batch (64 prompts of 2,048 tokens, logprobs 1: 262,144). An answer holds about 75 bytes per entry
#: at its peak (measured: a 1,048,320-entry completions answer, 416 prompts x 120 tokens x logprobs 20, raised a
#: server's peak RSS by 76 MB; 238 MB before the entries were kept compact and rendered a choice at a time), so the
#: default admits ~80 MB per answer. Streamed answers hold a chunk at a time; what a slow reader leaves queued is held
#: to the same bound.
MAX_LOGPROB_ENTRIES = 2**20

#: The most token ids one row's ``logit_bias`` may name (:class:`~bca_deploy.serving.decoding.SamplingParams`):
#: OpenAI's bound (its API refuses more than 300), so a client written for OpenAI is never refused here; each step
#: touches a biased row's named ids only, so a row costs what it names, never the vocabulary.
MAX_LOGIT_BIAS = 300

#: Default ``preempt_wait_steps`` (:class:`~bca_deploy.serving.engine.GenerationEngine`, ``--preempt-wait-steps``):
#: a waiting tenant below its share pre-empts a row only if the rows that could give it one will not all have ended
#: within this many steps (their ``max_new_tokens`` left) anyway.
PREEMPT_WAIT_STEPS = 8

#: The most logits (positions x vocabulary floats) one prefill run keeps when it scores prompts
#: (:class:`~bca_deploy.serving.decoding.SamplingParams` ``prompt_logprobs``): such a prompt is run a chunk of columns
#: at a time so that its chunk's every-position logits stay under this (64 MB of float32; 512 positions of a 32k
#: vocabulary, 110 of a 152k one), whatever the prompt's length; at least one column of its rows runs.
MAX_SCORE_LOGITS = 2**24

#: vLLM's names of the tool call parsers the chat route has (``--tool-call-parser``;
#: :mod:`bca_deploy.serving.tools`).
TOOL_CALL_PARSERS = ("hermes", "llama3_json")
