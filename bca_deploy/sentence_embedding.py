"""What a sentence-transformers checkpoint says about its embeddings, read as sentence-transformers and vLLM read it.

A sentence-transformers model directory (all-MiniLM-L6-v2, BGE, E5...) is a transformers checkpoint plus
``modules.json`` (the pipeline: Transformer, Pooling, often Normalize), the Pooling module's ``config.json``
(``1_Pooling/config.json``: CLS, mean, last-token... pooling) and ``sentence_bert_config.json``
(``max_seq_length``: texts are cut there, often below the tokenizer's limit: 256 for all-MiniLM-L6-v2, whose
tokenizer says 512). Export copies these files (:func:`sentence_transformers_files`) into a feature-extraction
export, and ``bca-deploy serve`` takes its OpenAI ``/v1/embeddings`` pooling, normalisation and text length from
them (:class:`EmbeddingRecipe`), so a served vector equals ``SentenceTransformer(dir).encode(text)`` (vLLM reads
the same files: ``get_pooling_config``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["EmbeddingRecipe", "sentence_transformers_files", "MODULES_FILE"]

MODULES_FILE = "modules.json"
#: The files of a sentence-transformers directory besides its modules' own (copied by export as they are).
TOP_LEVEL_FILES = (MODULES_FILE, "sentence_bert_config.json", "config_sentence_transformers.json")


def _present(path: Path) -> bool:
    """Whether ``path`` is there by name, whatever it is: a link to nothing (a cache's missing blob), a pipe or a
    folder where a file belongs is then read, and refused naming it (:func:`bca_deploy.config.read_json`), rather than
    taken for absent: a ``modules.json`` skipped so lost the model's pooling and normalisation without a word."""
    return os.path.lexists(path)


def _kind(module: dict[str, Any]) -> str | None:
    """A module's class name: ``sentence_transformers.models.Pooling`` (the hub's files) and
    ``sentence_transformers.sentence_transformer.modules.pooling.Pooling`` (sentence-transformers 5.x) are both
    ``"Pooling"``; only sentence-transformers' own modules count."""
    kind = module.get("type")
    if isinstance(kind, str) and kind.startswith("sentence_transformers."):
        return kind.rsplit(".", 1)[-1]
    return None


#: sentence-transformers' pooling modes -> bca-deploy's pooling (None: not computed here).
POOLING_MODES = {"cls": "cls", "mean": "mean", "lasttoken": "last", "max": None, "mean_sqrt_len_tokens": None,
                 "weightedmean": None}
#: The Pooling config's older keys (sentence-transformers before 5.x, most files on the hub): one boolean per mode.
_LEGACY_MODE_KEYS = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                     "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                     "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}


def _pooling_modes(config: dict[str, Any]) -> list[str]:
    """The modes a Pooling config asks for (their vectors are concatenated when there are several)."""
    mode = config.get("pooling_mode")
    if mode is not None:  # sentence-transformers 5.x: a name or a list of names
        return [str(m)[:40] for m in (mode if isinstance(mode, list) else [mode])]
    return [name for key, name in _LEGACY_MODE_KEYS.items() if config.get(key) is True]


#: A module's ``path``: one folder name inside the model directory (never absolute, never ``..``).
_MODULE_PATH = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")


def _modules(model_dir: Path) -> tuple[list[dict[str, Any]] | None, str | None]:
    """modules.json's entries (None without the file) and why it cannot be used, if it cannot."""
    from .config import read_json_value
    from .errors import BCAError

    path = model_dir / MODULES_FILE
    if not _present(path):
        return None, None
    try:
        data = read_json_value(path, what="sentence-transformers modules file")
    except BCAError as exc:
        return None, str(exc)
    if not (isinstance(data, list) and all(isinstance(m, dict) for m in data)):
        return None, f"{path}: expected a JSON array of module objects"
    return data, None


def _module_dir(model_dir: Path, module: dict[str, Any]) -> Path | None:
    path = module.get("path")
    if isinstance(path, str) and _MODULE_PATH.fullmatch(path) and path not in (".", ".."):
        return model_dir / path
    return None


def _default_prompt(model_dir: Path, problems: list[str]) -> str | None:
    """The prompt ``config_sentence_transformers.json`` has ``encode`` prepend by default (``default_prompt_name``
    naming one of its ``prompts``), else None."""
    from .config import read_json
    from .errors import BCAError

    path = model_dir / "config_sentence_transformers.json"
    if not _present(path):
        return None
    try:
        data = read_json(path, what="sentence-transformers config")
    except BCAError as exc:
        problems.append(str(exc))
        return None
    name, prompts = data.get("default_prompt_name"), data.get("prompts")
    if isinstance(name, str) and isinstance(prompts, dict) and isinstance(prompts.get(name), str) and prompts[name]:
        return prompts[name]
    return None


def sentence_transformers_files(model_dir: str | Path) -> list[str]:
    """The sentence-transformers files of ``model_dir`` an export of its embeddings keeps, relative to it: the
    top-level ones and the Pooling module's ``config.json`` (empty for a plain transformers checkpoint)."""
    model_dir = Path(model_dir)
    modules, problem = _modules(model_dir)
    if modules is None:  # none, or one that does not read: listed, for the export's reader to refuse by name
        return [MODULES_FILE] if problem is not None else []
    files = [name for name in TOP_LEVEL_FILES if _present(model_dir / name)]
    for module in modules:
        folder = _module_dir(model_dir, module) if _kind(module) == "Pooling" else None
        if folder is not None and _present(folder / "config.json"):
            files.append(f"{folder.name}/config.json")
    return files


@dataclass(frozen=True)
class EmbeddingRecipe:
    """How sentence-transformers makes ``model_dir``'s embeddings; every field None where the files do not say
    (a plain transformers checkpoint: no files at all).

    Attributes:
        pooling: ``"mean"``, ``"cls"`` or ``"last"``.
        normalize: whether the pipeline L2-normalises (a Normalize module), when it has a ``modules.json``.
        max_seq_length: the tokens a text is cut to (``sentence_bert_config.json``).
        pooling_problem: why the pooling the files ask for cannot be computed here (max pooling, several modes, a
            Pooling config that does not read), naming the file; None when it can be or nothing asks.
        problems: other things the files ask for that bca-deploy does not do (a Dense projection...), or files
            that do not read; each one line naming the file.
    """

    pooling: str | None = None
    normalize: bool | None = None
    max_seq_length: int | None = None
    pooling_problem: str | None = None
    problems: tuple[str, ...] = ()

    @classmethod
    def read(cls, model_dir: str | Path) -> EmbeddingRecipe:
        from .config import read_json
        from .errors import BCAError

        model_dir = Path(model_dir)
        modules, problem = _modules(model_dir)
        problems = [problem] if problem else []
        pooling = normalize = max_seq_length = pooling_problem = None
        not_run: list[str] = []
        if modules is not None:
            normalize = any(_kind(m) == "Normalize" for m in modules)
            for module in modules:
                kind = _kind(module)
                if kind == "Pooling":
                    folder = _module_dir(model_dir, module)
                    try:
                        if folder is None:
                            raise BCAError(f"{model_dir / MODULES_FILE}: the Pooling module's path "
                                           f"{str(module.get('path'))[:80]!r} is not a folder name")
                        config = read_json(folder / "config.json", what="sentence-transformers pooling config")
                    except BCAError as exc:
                        pooling_problem = str(exc)
                        continue
                    modes = _pooling_modes(config)
                    if len(modes) == 1 and POOLING_MODES.get(modes[0]) is not None:
                        pooling = POOLING_MODES[modes[0]]
                    else:
                        pooling_problem = (f"{folder / 'config.json'} pools by {' + '.join(modes) or 'no mode'}; "
                                           "bca-deploy computes one of cls, mean, lasttoken")
                elif kind not in ("Transformer", "Normalize"):
                    not_run.append(str(module.get("type"))[:100])
        if not_run:  # one line, however many (a hostile modules.json can list thousands)
            shown = ", ".join(sorted(set(not_run))[:5])
            problems.append(f"{model_dir / MODULES_FILE} has {len(not_run)} module(s) bca-deploy does not run "
                            f"({shown}): its embeddings are the pooled vectors before them")
        prompt = _default_prompt(model_dir, problems)
        if prompt is not None:
            problems.append(f"{model_dir / 'config_sentence_transformers.json'}: SentenceTransformer.encode prepends "
                            f"the default prompt {prompt[:80]!r} to every text; /v1/embeddings does not, so send it "
                            "in the input")
        bert_config = model_dir / "sentence_bert_config.json"
        if _present(bert_config):
            try:
                value = read_json(bert_config, what="sentence-transformers config").get("max_seq_length")
            except BCAError as exc:
                problems.append(str(exc))
            else:
                if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                    max_seq_length = value
                elif value is not None:
                    problems.append(f"{bert_config}: max_seq_length {str(value)[:40]!r} is not a positive integer")
        return cls(pooling, normalize, max_seq_length, pooling_problem, tuple(problems))
