"""The paper's real datasets (GSM8K, SVAMP, ARC, PRISM) for the GPU presets, each a Task with a clear judge.

Every task reads either a local file in the dataset's own schema (JSON Lines, or a JSON list of records) or a
Hugging Face hub dataset through `datasets.load_dataset`. Machines without internet (CI, this workbook's CPU runs)
set `HF_HUB_OFFLINE=1`; a hub id then fails at once with a one-line `MipoError` that says to pass a local file, instead
of a long retry loop and a traceback. Local files are read with the standard library: no cache folder, no Arrow
conversion, the same records as the hub gives.

Splits follow METHOD.md: a test subset of n is `DataFrame.sample(n, random_state=42)` (the official code's GSM8K draw
of 200 problems), the same for every training seed so comparisons are paired; a training subset of n is drawn with
the caller's seed. Data is read on first use, so building a task costs nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mipo_lib.errors import MipoError
from mipo_lib.tasks.base import Example
from mipo_lib.tasks.numbers import final_answer, format_number, same_number

if TYPE_CHECKING:  # generate imports torch: tasks stay cheap to import, since presets check task names
    from mipo_lib.generate import Messages

Record = dict[str, Any]
Source = str | Path
TEST_RANDOM_STATE = 42
SPLITS = ("train", "test")


# ----------------------------------------------------------------------------------------------------- loading
def _is_local(source: Source) -> bool:
    text = str(source)
    return isinstance(source, Path) or Path(text).exists() or text.endswith((".json", ".jsonl"))


def read_records(path: Source) -> list[Record]:
    """Records of a local JSON Lines file (`.jsonl`) or JSON file holding a list of records."""
    path = Path(path)
    if not path.is_file():
        raise MipoError(f"data file {path} not found; pass the path of a .jsonl or .json file in the dataset's schema")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            records = json.loads(text)
    except json.JSONDecodeError as err:
        expected = "JSON Lines (.jsonl) or a JSON list (.json)"
        raise MipoError(f"{path} is not valid JSON ({err}); expected {expected}") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise MipoError(f"{path} must hold a list of records (objects), one per example")
    return records


def _offline_requested() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def load_hub(dataset_id: str, config: str | None, split: str) -> list[Record]:
    """Records of a hub dataset split; any failure (offline, unknown id, no network) becomes a one-line MipoError.

    `datasets` and `huggingface_hub` read HF_HUB_OFFLINE once, at import. When the variable was set later (a
    notebook cell, a test module imported after trl), they would retry the network for ~25 s; the setting is
    honoured for this call instead, so offline still fails in well under a second (or loads from the local cache).
    """
    import datasets  # imported here: it takes a second and only hub loading needs it
    from huggingface_hub import constants as hub_constants

    offline = _offline_requested()
    saved = datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE
    if offline:
        datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        return datasets.load_dataset(dataset_id, config, split=split).to_list()
    except Exception as err:  # noqa: BLE001 - datasets raises many types; the user needs one message
        where = "HF_HUB_OFFLINE is set" if offline else f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        raise MipoError(
            f"cannot load {dataset_id!r} ({config or 'default'}, {split}) from the Hugging Face hub ({where}); "
            "pass a local file path (.jsonl or .json in the dataset's schema) instead"
        ) from None
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


def load_split(source: Source, split: str, config: str | None = None) -> list[Record]:
    """Records from a local file path or, for anything else, a hub dataset id."""
    return read_records(source) if _is_local(source) else load_hub(str(source), config, split)


def _require(records: list[Record], fields: tuple[str, ...], what: str) -> None:
    missing = sorted({f for r in records for f in fields if f not in r})
    if missing:
        raise MipoError(f"{what}: records lack field(s) {missing}; expected fields {list(fields)}")


def subset(records: list[Record], split: str, n: int | None, seed: int) -> list[tuple[int, Record]]:
    """(row index, record) pairs of a split's subset: all rows in file order, or a pandas sample of n rows.

    The test sample uses `random_state=42` whatever the seed (paired comparisons); n larger than the data gives all.
    """
    if n is not None and n < 1:
        raise MipoError(f"n must be at least 1, got {n}")
    if n is None or n >= len(records):
        return list(enumerate(records))
    import pandas as pd  # here, not at the top: pandas costs half a second and presets import the task registry

    state = TEST_RANDOM_STATE if split == "test" else seed
    rows = pd.Series(range(len(records))).sample(n=n, random_state=state).tolist()
    return [(i, records[i]) for i in rows]


class _FileOrHubTask:
    """Shared plumbing: per-split sources (local path or hub id), lazy cached loading, seeded subsets."""

    name: str
    conditional = False
    hub_id: str
    hub_config: str | None = None
    fields: tuple[str, ...]
    #: appended to the request in the user message (the answer format the judge reads)
    instruction: str = ""

    def __init__(self, train_path: Source | None = None, test_path: Source | None = None) -> None:
        self._sources: dict[str, Source] = {
            "train": train_path if train_path is not None else self.hub_id,
            "test": test_path if test_path is not None else self.hub_id,
        }
        self._cache: dict[str, list[Record]] = {}

    def records(self, split: str) -> list[Record]:
        """All records of a split, loaded once and checked for the fields the task reads."""
        if split not in SPLITS:
            raise MipoError(f"unknown split {split!r}; use 'train' or 'test'")
        if split not in self._cache:
            records = self._load(self._sources[split], split)
            if not records:  # an empty file would otherwise give 0 pairs and a division by zero much later
                raise MipoError(
                    f"{self.name} {split} split from {self._sources[split]} has no records; "
                    "pass a file with at least one example in the dataset's schema"
                )
            _require(records, self.fields, f"{self.name} {split} split")
            self._cache[split] = records
        return self._cache[split]

    def _load(self, source: Source, split: str) -> list[Record]:
        return load_split(source, split, self.hub_config)

    def examples(self, split: str, n: int | None = None, seed: int = 0) -> list[Example]:
        return [self._example(i, r, split) for i, r in subset(self.records(split), split, n, seed)]

    def _example(self, index: int, record: Record, split: str) -> Example:
        raise NotImplementedError

    def prompt(self, example: Example, with_context: bool = True, context: str | None = None) -> Messages:
        if context is not None:
            raise MipoError(f"{self.name} has no context to swap; use negative='random_prompt'")
        return [{"role": "user", "content": f"{example.request}\n\n{self.instruction}"}]

    def group(self, example: Example) -> str:
        return self.name


# ---------------------------------------------------------------------------------------------------------- math
MATH_INSTRUCTION = "Solve the problem step by step. End with the final answer on its own line, as '#### <number>'."


class _MathTask(_FileOrHubTask):
    instruction = MATH_INSTRUCTION

    def score(self, example: Example, response: str) -> float:
        """1.0 when the reply's final number (after `####`, else its last number) equals the answer."""
        return float(same_number(final_answer(response), float(example.answer)))


class GSM8KTask(_MathTask):
    """GSM8K grade-school word problems (`question`, `answer` ending in `#### <number>`); exact numeric match.

    Zero-shot with a format instruction; the official evaluation used 8-shot chain of thought.
    """

    name = "gsm8k"
    hub_id = "openai/gsm8k"
    hub_config = "main"
    fields = ("question", "answer")

    def _example(self, index: int, record: Record, split: str) -> Example:
        gold = final_answer(record["answer"])
        if gold is None or "####" not in record["answer"]:
            raise MipoError(f"gsm8k {split} row {index}: answer has no '#### <number>' line")
        return Example(id=f"gsm8k-{split}-{index:04d}", request=record["question"], answer=format_number(gold))


class SVAMPTask(_MathTask):
    """SVAMP word problems (`Body`, `Question`, numeric `Answer`); graded like GSM8K, grouped by problem `Type`."""

    name = "svamp"
    hub_id = "ChilleD/SVAMP"
    fields = ("Body", "Question", "Answer")

    def _example(self, index: int, record: Record, split: str) -> Example:
        body, question = record["Body"].strip(), record["Question"].strip()
        return Example(
            id=str(record.get("ID", f"svamp-{split}-{index:04d}")),
            request=f"{body} {question}".strip(),
            answer=format_number(float(record["Answer"])),
            meta={"type": record.get("Type") or "svamp"},
        )

    def group(self, example: Example) -> str:
        return example.meta["type"]


# ----------------------------------------------------------------------------------------------- multiple choice
ARC_INSTRUCTION = "Answer with the letter of the correct choice."


class ARCTask(_FileOrHubTask):
    """AI2 ARC (`question`, `choices` {text, label}, `answerKey`), scored by the answer letter found in the reply.

    About 1% of ARC rows label their choices 1-5 instead of A-E; they are relabelled to letters (as lm-eval-harness
    does) so one instruction, "answer with the letter", fits every question.
    """

    hub_id = "allenai/ai2_arc"
    fields = ("question", "choices", "answerKey")
    instruction = ARC_INSTRUCTION

    def __init__(self, config: str, train_path: Source | None = None, test_path: Source | None = None) -> None:
        if config not in ("ARC-Easy", "ARC-Challenge"):
            raise MipoError(f"unknown ARC config {config!r}; use 'ARC-Easy' or 'ARC-Challenge'")
        self.hub_config = config
        self.name = "arc_easy" if config == "ARC-Easy" else "arc_challenge"
        super().__init__(train_path, test_path)

    def _example(self, index: int, record: Record, split: str) -> Example:
        labels = [_letter(label) for label in record["choices"]["label"]]
        lines = [f"{label}. {text}" for label, text in zip(labels, record["choices"]["text"])]
        answer = _letter(record["answerKey"])
        if answer not in labels:
            raise MipoError(f"{self.name} {split} row {index}: answerKey {record['answerKey']!r} is not a choice label")
        return Example(
            id=str(record.get("id", f"{self.name}-{split}-{index:04d}")),
            request=record["question"].strip() + "\n\n" + "\n".join(lines),
            answer=answer,
            meta={"labels": labels},
        )

    def score(self, example: Example, response: str) -> float:
        return float(extract_choice(response, example.meta["labels"]) == example.answer)


def _letter(label: Any) -> str:
    """ARC's numeric labels "1".."5" as letters "A".."E"; letters unchanged."""
    text = str(label).strip()
    return "ABCDE"[int(text) - 1] if text in ("1", "2", "3", "4", "5") else text


def extract_choice(response: str, labels: list[str]) -> str | None:
    """The choice label a reply commits to, or None.

    In order: an explicit "answer is X" / "Answer: (X)" (the last one wins, so a reply may think aloud first); a
    reply that opens with the label ("B", "(B) Paris", "B. Paris", "**B**", but not "A plant ..."); else the only
    label written as "(X)" or "X)". Ambiguous replies get None rather than a guess, so they score 0.
    """
    alt = "|".join(re.escape(label) for label in sorted(labels, key=len, reverse=True))
    explicit_pattern = rf"answer(?:\s+is)?\s*[:\-]?\s*(?:choice\s+|option\s+)?[(*]*({alt})\b"
    explicit = re.findall(explicit_pattern, response, re.IGNORECASE)
    explicit = [x for x in explicit if x in labels]  # IGNORECASE must not turn the article "a" into choice A
    if explicit:
        return explicit[-1]
    leading = re.match(rf"\s*[(*]*({alt})(?:[).:*]|\s*$|\s*\n)", response)
    if leading:
        return leading.group(1)
    found = {a or b for a, b in re.findall(rf"\(({alt})\)|(?<![\w(])({alt})\)", response)}
    return found.pop() if len(found) == 1 else None


# ----------------------------------------------------------------------------------------------- personalization
PRISM_TEMPLATE = (
    "Give me short 2-3 sentence answers to the following prompt: {prompt} "
    "Please respect the following requirements made by the user: {request}"
)
PRISM_TEMPLATE_NO_CONTEXT = "Give me short 2-3 sentence answers to the following prompt: {prompt}"


class PRISMTask(_FileOrHubTask):
    """PRISM: a user's opening prompt, with the user's own written requirements (`system_string`) as the context.

    Records are conversations joined with the survey on `user_id` (fields `conversation_id`, `user_id`,
    `opening_prompt`, `system_string`, optional `conversation_type`); from the hub that join is done here. PRISM has a
    single split, so users are assigned to train or test by a stable hash of `user_id` (one in five to test): test
    users are never seen in training. Whether a reply fits a user's requirements needs an LLM judge, so `score`
    refuses; use `mipo_lib.evaluate.llm_judge_scores`.
    """

    name = "prism"
    conditional = True
    #: no judge in code: `score` raises; pairs and evaluation leave scores empty and use the LLM judge instead
    program_judge = False
    hub_id = "HannahRoseKirk/prism-alignment"
    fields = ("conversation_id", "user_id", "opening_prompt", "system_string")

    def __init__(self, path: Source | None = None) -> None:
        """`path`: one local file holding both splits (they are separated by user); default the hub dataset."""
        super().__init__(path, path)

    def _load(self, source: Source, split: str) -> list[Record]:
        if _is_local(source):
            records = read_records(source)
        else:
            survey = {r["user_id"]: r for r in load_hub(str(source), "survey", "train")}
            records = [
                {**c, "system_string": survey[c["user_id"]]["system_string"]}
                for c in load_hub(str(source), "conversations", "train")
                if c["user_id"] in survey
            ]
        chosen = [r for r in records if prism_split(str(r.get("user_id", ""))) == split]
        if records and not chosen:
            raise MipoError(
                f"prism: no user among {len(records)} records falls in the {split} split (users are split one in five "
                "to test by a hash of user_id); pass records from more users"
            )
        return chosen

    def _example(self, index: int, record: Record, split: str) -> Example:
        return Example(
            id=str(record["conversation_id"]),
            request=record["opening_prompt"].strip(),
            context=record["system_string"].strip(),
            meta={"user_id": record["user_id"], "conversation_type": record.get("conversation_type") or "prism"},
        )

    def prompt(self, example: Example, with_context: bool = True, context: str | None = None) -> Messages:
        """The official positive template with the user's requirements; without context, its first sentence only."""
        if not with_context:
            if context is not None:
                raise MipoError("prompt(): a replacement context was given with with_context=False; drop one of them")
            return [{"role": "user", "content": PRISM_TEMPLATE_NO_CONTEXT.format(prompt=example.request)}]
        requirements = context if context is not None else example.context
        return [{"role": "user", "content": PRISM_TEMPLATE.format(prompt=example.request, request=requirements)}]

    def score(self, example: Example, response: str) -> float:
        raise MipoError("PRISM has no program judge: score with the LLM judge mipo_lib.evaluate.llm_judge_scores")

    def group(self, example: Example) -> str:
        return example.meta["conversation_type"]


def prism_split(user_id: str) -> str:
    """'test' for one user in five (stable md5 of the id, the same on every machine and Python), else 'train'."""
    return "test" if int(hashlib.md5(user_id.encode()).hexdigest(), 16) % 5 == 0 else "train"
