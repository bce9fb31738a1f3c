"""One cache contract for every stage: a result is reused only when it was made with the same settings.

Every stage (pairs, training, evaluation, PMI, the LLM judge) declares below, in `STAGE_FIELDS`, the preset fields it
reads. Its key is those fields' values plus its upstream's key (the pairs' for training, the adapter's for evaluating a
trained method) plus a few values that are not preset fields (the seed, a digest of the task's prompts, the method).
Each stage's key is built next to its stage (`pairs.pairs_key`, `evaluate.evaluation_key` for every evaluating stage,
`evaluate.judge_key`, ...). The key is stored next to the result as `<result>.key.json` and checked before any reuse,
so a changed setting can never silently reuse a stale result. Folder and file names carry the key's short digest
(`mipo-3f2a9c0d1b7e/`), so results of other settings sit side by side (an ablation and the reference run share a runs
folder) instead of replacing each other.

What no key holds, and why that cannot go stale:
- a code judge (a preference checker, a gold answer): cached evaluations and pairs hold the replies (and whether each
  hit the token cap), and their scores are judged on every read by the task's judge of the moment
  (`evaluate.cached_records`, `pairs.judged_pairs`). An LLM judge is too slow for that: its scores are cached under
  `evaluate.judge_key` (the judge model, its 4-bit setting and dtype, its prompt and sampling, the judged replies);
- library versions: `<result>.key.json` records those of torch, transformers, trl, peft and mipo_lib the result was
  made with, outside the compared values. A result of other versions is reused (committed results must stay usable
  on Colab's versions), and one line says so, once per difference and process; `MIPO_CACHE_VERSIONS=strict` makes a
  version difference (or a record made before versions were recorded) count as a changed key.

A stage says what it does on the `mipo_lib.cache` logger, shown in a notebook cell's output: one summary line per
stage for the results it reuses ("reusing MIPO evaluation: 3 results (seeds 0, 1, 2)", said when the cell or the
process ends; `MIPO_CACHE_VERBOSE=1` says each result and where it is, as it is reused), and one line when it computes
a result although results of other settings exist (which fields differ from the nearest one). Silence it with
`logging.getLogger("mipo_lib.cache").setLevel("WARNING")`.

Results are written through `files.atomic` (a temporary file or folder renamed into place), so an interrupted run
never leaves a half-written result that a later run would take for a finished one. docs/caches.md sums it all up.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import sys
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mipo_lib.config import Preset, resolved_dtype, runs_dir
from mipo_lib.errors import MipoError
from mipo_lib.files import write_text

if TYPE_CHECKING:
    from mipo_lib.tasks.base import Example, Task

_MODEL = ("model_id", "dtype", "load_in_4bit")
_TRAINING = (
    "gradient_checkpointing", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "batch_size",
    "grad_accum", "warmup_ratio",
)
_EVALUATION = _MODEL + ("task", "n_test_prompts", "eval_max_new_tokens", "eval_batch_size", "eval_no_repeat_ngram",
                         "eval_batch_new_tokens")

STAGE_FIELDS: dict[str, tuple[str, ...]] = {
    # sampled responses of the pairs (a partial generation resumes only under this key); + seed, train prompts.
    # Batch sizes count: the batch plan seeds the sampling, and padding changes the numerics.
    "generation": _MODEL + (
        "task", "n_train_prompts", "negative", "k_negatives", "temperature", "top_p", "max_new_tokens", "gen_batch_size",
    ),
    # the scored pairs (reference log-probs, PMI); + the generation key
    "pairs": ("score_batch_size", "max_length"),
    # a trained adapter; + the pairs key and the method
    "dpo": _TRAINING + ("epochs", "beta", "learning_rate"),
    "sft": _TRAINING + ("sft_epochs", "sft_learning_rate"),
    # one method's replies to a split's prompts (scores are judged on read); + the prompts, the method's definition, a
    # trained one's adapter key (evaluate.evaluation_key builds every evaluating stage's key)
    "evaluation": _EVALUATION,
    "evaluation-cad": _EVALUATION + ("beta", "cad_alpha"),  # context-aware decoding's strength is cad_alpha or 1/beta
    # the LLM judge's scores of a set of records (PRISM): the judge loads in the preset's dtype (and, unless told,
    # its 4-bit setting) and samples in eval batches; + the judge's id, its 4-bit setting, the judge prompt and
    # sampling (a digest), the judged inputs (requests, preferences, reference replies) and the records' replies
    "llm-judge": ("dtype", "load_in_4bit", "eval_batch_size"),
    # base-model PMI of responses; + test prompts and a digest of the responses themselves
    "pmi": _MODEL + ("task", "n_test_prompts", "max_length", "score_batch_size"),
    # ablations: Monte-Carlo KL of the MIPO policy to the base model (replies sampled in gen batches, both models score
    # them); + the adapter key, the prompts, the token cap used and the sampling seed
    "kl": _MODEL + ("task", "eval_max_new_tokens", "gen_batch_size", "score_batch_size"),
    # ablations: seconds per prompt of prompting, MIPO and CAD (greedy evaluation settings, CAD's strength); + the
    # adapter key, the prompts and the number of timed repeats
    "generation-cost": _MODEL + ("task", "eval_max_new_tokens", "eval_batch_size", "eval_no_repeat_ngram",
                                 "eval_batch_new_tokens", "beta", "cad_alpha"),
}

NOT_AFFECTING: dict[str, str] = {
    "name": "names the runs folder (runs/<name>/) the results live in",
    "description": "documentation only",
    "seeds": "which seeds to run; each result is keyed by its own seed",
    "report_to": "where training logs are sent, not what is trained",
    "task_defaults": "only tells get_preset to fill in the task's official settings; the fields it fills are keyed",
}
"""Preset fields no result depends on, each with the reason. Every field is here or in a stage's `STAGE_FIELDS`
(tests/test_cache.py checks it), so a new field cannot be forgotten by the cache."""

KEY_SUFFIX = ".key.json"
#: Libraries whose versions are recorded with every stored result (with mipo_lib's own version).
LIBRARIES = ("torch", "transformers", "trl", "peft")
#: `MIPO_CACHE_VERSIONS=strict`: a result made under other library versions counts as stale (recomputed).
VERSIONS_ENV = "MIPO_CACHE_VERSIONS"
#: `MIPO_CACHE_VERBOSE=1`: one line per reused result (what and from where) instead of one summary line per stage.
VERBOSE_ENV = "MIPO_CACHE_VERBOSE"
log = logging.getLogger(__name__)


class _CellHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to the `sys.stdout` of the moment: a notebook cell's output, or pytest's capture (quiet unless a test
    fails), instead of the stream that was current when the library was imported."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stdout
        super().emit(record)


if not log.handlers:
    _handler = _CellHandler()
    _handler.setFormatter(logging.Formatter("cache: %(message)s"))
    log.addHandler(_handler)
    log.setLevel(logging.INFO)


# ------------------------------------------------------------------------------------------------------------ keys
@dataclass(frozen=True)
class Key:
    """What a result depends on: `values` (preset fields, upstream values, seed, ...); `label` names the result in
    log lines ("MIPO adapter (seed 0)") and, with `stage`, tells which stored results are versions of the same one."""

    stage: str
    label: str
    values: Mapping[str, Any]

    @property
    def digest(self) -> str:
        """12 hex digits of the values' hash: short enough for a folder name, far from any collision here."""
        return content_digest(self.values)[:12]

    def record(self) -> str:
        """What `store` writes: the key, and the library versions the result is made with (not compared by default:
        see `version_note`)."""
        return json.dumps({"stage": self.stage, "label": self.label, "digest": self.digest, "values": self.values,
                           "versions": library_versions()}, indent=1)


def stage_key(stage: str, preset: Preset, label: str, *, upstream: Key | None = None, **extra: Any) -> Key:
    """The key of `stage`: its declared fields of `preset`, the upstream key's values and the `extra` values."""
    own = {name: getattr(preset, name) for name in STAGE_FIELDS[stage]}
    if "dtype" in own:
        own["resolved_dtype"] = resolved_dtype(preset)  # a runs folder copied between a bf16 and an fp32 CPU
    values = {**(upstream.values if upstream else {}), **own, **extra}
    return Key(stage, label, json.loads(json.dumps(values, default=str)))  # tuples -> lists: equal after a round trip


def content_digest(obj: Any) -> str:
    """Hash of any JSON-able value (dict order does not matter)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def prompts_digest(task: Task, examples: Sequence[Example]) -> str:
    """Digest of a task's prompts for `examples`, with and without the context: editing a task's prompts or its
    example list changes every key that includes it."""
    prompts = [(e.id, task.prompt(e), task.prompt(e, with_context=False)) for e in examples]
    return content_digest(prompts)[:16]


# ------------------------------------------------------------------------------------------------------ versions
@functools.cache
def library_versions() -> dict[str, str | None]:
    """The versions of mipo_lib and of `LIBRARIES` in this process (None for one not installed)."""
    import mipo_lib  # the package itself, already imported: this module is part of it

    found: dict[str, str | None] = {"mipo_lib": mipo_lib.__version__}
    for name in LIBRARIES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def strict_versions() -> bool:
    """True when `MIPO_CACHE_VERSIONS=strict`: results made under other library versions are recomputed.

    Off by default: a result is a function of its settings, and a new library release rarely changes one; the
    committed reference results must stay usable on Colab's versions. The reuse line says when versions differ.
    """
    value = os.environ.get(VERSIONS_ENV, "").strip().lower()
    if value not in ("", "strict"):
        raise MipoError(f"{VERSIONS_ENV}={value!r} is not a setting; set it to strict (recompute results made under "
                        "other library versions) or leave it unset (reuse them)")
    return value == "strict"


def version_note(stored: Mapping[str, Any]) -> str:
    """How the library versions of a stored record differ from this process's: "made with transformers 5.24.0
    (now 5.25.0)", "made before library versions were recorded", or "" when they are the same."""
    if "versions" not in stored:
        return "made before library versions were recorded"
    old, now = stored["versions"], library_versions()
    diff = [f"{name} {old.get(name) or '(not installed)'} (now {version or '(not installed)'})"
            for name, version in now.items() if old.get(name) != version]
    return f"made with {', '.join(diff)}" if diff else ""


_versions_said: set[str] = set()


def _say_versions_once(note: str) -> None:
    """One line per distinct version difference and process (not one per reused file)."""
    if note not in _versions_said:
        _versions_said.add(note)
        log.info("results %s are reused; set %s=strict to recompute them", note, VERSIONS_ENV)


# --------------------------------------------------------------------------------------------------- reuse or not
def key_file(result: Path) -> Path:
    """Where `result`'s key is stored: next to it (`pairs.jsonl.key.json`; a folder's result is the file that marks
    it finished, as `training_done.json` for an adapter, so the key travels with the folder)."""
    return result.with_name(result.name + KEY_SUFFIX)


def reuse(result: Path, key: Key) -> bool:
    """True (and one log line) when `result` exists and was stored under `key`.

    Made under other library versions, it is reused all the same (and that said once per difference and process),
    unless `MIPO_CACHE_VERSIONS=strict`.
    """
    stored = _stored(key_file(result))
    if stored is None or stored.get("values") != key.values or not result.exists():
        return False
    if note := version_note(stored):
        if strict_versions():
            return False
        _say_versions_once(note)
    if verbose():
        log.info("reusing %s from %s", key.label, _shown(result))
    else:
        _tally(key, result)
    return True


# ----------------------------------------------------------------------------------------- one line per stage
def verbose() -> bool:
    """True when `MIPO_CACHE_VERBOSE` is set (not 0/false/empty): every reused result gets its own line."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


_SEED = re.compile(r" \(seed (\d+)\)")
#: Reused results not yet said, by stage: a label without its seed -> {path: label} of each result reused (a result
#: read twice, as the pairs by training after the pairs cell, counts once).
_reused: dict[str, dict[Path, str]] = defaultdict(dict)
_hooked = False


def _tally(key: Key, result: Path) -> None:
    """Count a reused result towards its stage's summary line, said when the notebook cell (or the process) ends.

    Why not one line each: a notebook cell that loops over seeds and methods reuses dozens of results, and a line per
    result buried the cell's real output (78 lines in notebook 06).
    """
    _reused[_SEED.sub("", key.label)][result] = key.label
    _hook_once()


def _hook_once() -> None:
    """Say the pending summary when each notebook cell ends (IPython's post_run_cell), and when the process exits."""
    global _hooked
    if _hooked:
        return
    _hooked = True
    atexit.register(say_reused)
    try:
        from IPython import get_ipython  # type: ignore[attr-defined]
    except ImportError:
        return
    if (shell := get_ipython()) is not None:
        shell.events.register("post_run_cell", lambda *_: say_reused())


def summary_lines() -> list[str]:
    """The pending summary, one line per stage: "reusing MIPO evaluation: 3 results (seeds 0, 1, 2)"; a stage with
    one result names it and its place, as the verbose line does."""
    lines = []
    for stage, results in _reused.items():
        if len(results) == 1:
            [(path, label)] = results.items()
            lines.append(f"reusing {label} from {_shown(path)}")
            continue
        seeds = sorted({int(m.group(1)) for label in results.values() if (m := _SEED.search(label))})
        seen = f" (seeds {', '.join(map(str, seeds))})" if seeds else ""
        lines.append(f"reusing {stage}: {len(results)} results{seen}")
    return lines


def say_reused() -> None:
    """Log the pending summary lines and start a new tally (a notebook's next cell, a script's next stage)."""
    lines = summary_lines()
    _reused.clear()
    for line in lines:
        log.info(line)


def prepare(result: Path, key: Key) -> bool:
    """Before computing `result` for `key`: log why when other settings were stored, drop a stale stored key (so an
    interrupted rewrite can never pass for a finished one), and return True when `result` itself holds a result of
    other settings (or of unknown ones: no key), which the caller replaces or clears.

    Nothing stored at `result`: the nearest stored result with the same label (the same seed's adapter of an earlier
    `lora_r`, say) is named with the fields that differ, so the reader sees why the stage runs again.
    """
    say_reused()  # what was reused so far comes before what is computed now
    stored = _stored(key_file(result))
    if stored is not None and (why := _stale(stored, key)):
        log.info("%s in %s was %s: recomputing", key.label, _shown(result), why)
        key_file(result).unlink(missing_ok=True)
        return True
    if stored is None and result.exists():
        log.info("%s in %s has no cache key (made by an older version): recomputing", key.label, _shown(result))
        return True
    if stored is None and (nearest := _nearest(result, key)) is not None:
        path, values = nearest
        log.info("computing %s: the nearest stored one, %s, differs in %s", key.label, _shown(path), changes(values, key.values))
    return False


def store(result: Path, key: Key) -> None:
    """Store `key` (and the library versions) next to `result`: after the result is complete, or, for a resumable
    stage (training), as it starts (`reuse` still waits for the result itself)."""
    write_text(key_file(result), key.record())


def changes(old: Mapping[str, Any], new: Mapping[str, Any], limit: int = 6) -> str:
    """`lora_r 8 -> 4, beta 0.1 -> 0.3`: the values that differ, at most `limit` named."""
    diff = [f"{k} {old.get(k, '(unset)')} -> {new.get(k, '(unset)')}" for k in sorted({*old, *new}) if old.get(k) != new.get(k)]
    more = f" and {len(diff) - limit} more" if len(diff) > limit else ""
    return ", ".join(diff[:limit]) + more


def _stale(stored: Mapping[str, Any], key: Key) -> str:
    """Why a stored record does not hold `key`'s result ("made with other settings (lora_r 8 -> 4)", or under
    `MIPO_CACHE_VERSIONS=strict` its version note), "" when it does."""
    if stored.get("values") != key.values:
        return f"made with other settings ({changes(stored.get('values', {}), key.values)})"
    return version_note(stored) if strict_versions() else ""


def _stored(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # none stored, or torn: treated as no key


def _nearest(result: Path, key: Key) -> tuple[Path, Mapping[str, Any]] | None:
    """The stored result of the same stage and label closest to `key` (fewest differing values, then the newest): a
    sibling file (`eval/*.jsonl`) or the same file in a sibling folder (`seed0/pairs-*/pairs.jsonl`,
    `seed0/mipo-*/training_done.json`)."""
    own = key_file(result)
    candidates = {*result.parent.glob(f"*{KEY_SUFFIX}"), *result.parent.parent.glob(f"*/{own.name}")} - {own}
    found = []
    for path in candidates:
        stored = _stored(path)
        if stored and stored.get("stage") == key.stage and stored.get("label") == key.label:
            values = stored.get("values", {})
            n = sum(values.get(k) != key.values.get(k) for k in {*values, *key.values})
            found.append((n, -path.stat().st_mtime, path.with_name(path.name[: -len(KEY_SUFFIX)]), values))
    if not found:
        return None
    _, _, path, values = min(found, key=lambda f: f[:2])
    return path, values


def _shown(path: Path) -> str:
    """A path as the reader knows it: `<runs>/smoke/personalization/...` inside the runs folder."""
    try:
        return f"<runs>/{path.relative_to(runs_dir()).as_posix()}"
    except ValueError:
        return str(path)
