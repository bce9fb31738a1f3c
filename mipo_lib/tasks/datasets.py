"""The paper's real datasets (GSM8K, SVAMP, ARC, PRISM) for the GPU presets, as the official code ran them.

"The official code" below is `eval_scripts/{gsm,svamp,arc,prism}.py` inside `contrastive_finetune-main.zip` of
github.com/nam630/mutual_information_preference_optimization (added in commit 59d1b5e, deleted in 5551f32); line
numbers cite those files. Prompts, answer extraction, test subsets and sampling settings follow them; where they
are ambiguous or broken the choice is stated in the class docstring and in the README ("Differences from the
official code").

Every task reads either a local file in the dataset's own schema (JSON Lines, or a JSON list of records) or a
Hugging Face hub dataset through `datasets.load_dataset`. Machines without internet (CI, this workbook's CPU runs)
set `HF_HUB_OFFLINE=1`; a hub id then fails at once with a one-line `MipoError` that says to pass a local file, instead
of a long retry loop and a traceback. Local files are read with the standard library: no cache folder, no Arrow
conversion, the same records as the hub gives.

Test subsets of n are pandas' `DataFrame.sample(n=n, random_state=42, replace=False)` on the loaded records, exactly
the official draw (gsm.py line 177, arc.py line 57), the same for every training seed so comparisons are paired; PRISM
takes its first n test rows instead (prism.py line 205). A training subset of n is drawn the same way with the
caller's seed (the official code trained on every training row: `--set n_train_prompts=...` to match). Each task's
`official_settings` holds the preset fields the official code used for it (sampling temperature and top-p, token
caps, test-set size, kind of negative); the `t4` and `paper` presets take them (see `config.get_preset`). Data is read
on first use, so building a task costs nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import string
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

from mipo_lib.errors import MipoError
from mipo_lib.tasks.base import Example
from mipo_lib.tasks.numbers import final_answer, format_number, last_number, numbers_in, same_number

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


def sample_positions(n_rows: int, n: int | None, random_state: int) -> list[int]:
    """Row positions of a subset: all rows in file order, or pandas' `sample(n=n, random_state=..., replace=False)`.

    pandas' draw depends only on the number of rows and the random state, so a frame of `n_rows` rows picks the very
    rows `pd.DataFrame(records).sample(...)` picks (tests check it on the real GSM8K test file). n larger than the
    data gives all rows.
    """
    if n is not None and n < 1:
        raise MipoError(f"n must be at least 1, got {n}")
    if n is None or n >= n_rows:
        return list(range(n_rows))
    import pandas as pd  # here, not at the top: pandas costs half a second and presets import the task registry

    return pd.RangeIndex(n_rows).to_frame().sample(n=n, random_state=random_state, replace=False).index.tolist()


def split_state(split: str, seed: int) -> int:
    """The random state of a split's subset: 42 for test whatever the seed (the official draw, gsm.py line 177 and
    arc.py line 57; every seed evaluates the same prompts), the seed for training."""
    return TEST_RANDOM_STATE if split == "test" else seed


def subset(records: list[Record], split: str, n: int | None, seed: int) -> list[tuple[int, Record]]:
    """(row index, record) pairs of a split's subset (`sample_positions` with `split_state`)."""
    return [(i, records[i]) for i in sample_positions(len(records), n, split_state(split, seed))]


class _FileOrHubTask:
    """Shared plumbing: per-split sources (local path or hub id), lazy cached loading, seeded subsets."""

    name: str
    conditional = False
    hub_id: str
    hub_config: str | None = None
    fields: tuple[str, ...]
    #: the preset fields the official code used for this task; `config.get_preset` applies them for presets with
    #: `task_defaults=True` (t4, paper) unless the caller sets the field
    official_settings: Mapping[str, Any] = {}

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

    def _refuse_context(self, context: str | None) -> None:
        if context is not None:
            raise MipoError(f"{self.name} has no context to swap; use negative='random_prompt'")

    def group(self, example: Example) -> str:
        return self.name


# ---------------------------------------------------------------------------------------------------------- math
#: The official 8-shot chain-of-thought examples (question, worked answer, short answer), verbatim from gsm.py
#: lines 17-58 (svamp.py lines 16-57 holds the same list).
MATH_FEWSHOT: tuple[tuple[str, str, str], ...] = (
    (
        'There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, there will be 21 trees. How many trees did the grove workers plant today?',
        'There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have been 21 - 15 = 6. So the answer is 6.',
        '6',
    ),
    (
        'If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?',
        'There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. So the answer is 5.',
        '5',
    ),
    (
        'Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?',
        'Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, they had 74 - 35 = 39. So the answer is 39.',
        '39',
    ),
    (
        'Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did Jason give to Denny?',
        'Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8. So the answer is 8.',
        '8',
    ),
    (
        'Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have now?',
        'Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. 5 + 4 = 9. So the answer is 9.',
        '9',
    ),
    (
        'There were nine computers in the server room. Five more computers were installed each day, from monday to thursday. How many computers are now in the server room?',
        'There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 computers were added. 9 + 20 is 29. So the answer is 29.',
        '29',
    ),
    (
        'Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf balls did he have at the end of wednesday?',
        'Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, he had 35 - 2 = 33 golf balls. So the answer is 33.',
        '33',
    ),
    (
        'Olivia has $23. She bought five bagels for $3 each. How much money does she have left?',
        'Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars left. 23 - 15 is 8. So the answer is 8.',
        '8',
    ),
)
#: The official instruction that opens every math prompt (gsm.py line 139, svamp.py line 189).
MATH_HEADER = "You are a helpful math assistant. Solve the following problem step-by-step and give the final answer after ####.\n\n"
#: The official math sampling: temperature 0.1, top-p 0.9 for pairs and evaluation (gsm.py lines 76-82, 197-203;
#: svamp.py lines 93-99). Token caps: 512 here (official 1024 for pairs, 5012/1024 for evaluation), enough for a
#: worked GSM8K answer and affordable on a T4; the 8-shot prompt is about 800 tokens, hence max_length 1536.
MATH_SETTINGS: Mapping[str, Any] = {
    "negative": "random_prompt", "temperature": 0.1, "top_p": 0.9, "max_new_tokens": 512,
    "eval_max_new_tokens": 512, "max_length": 1536,
}


def math_prompt(question: str, n_shots: int = len(MATH_FEWSHOT)) -> str:
    """The official math prompt: header, `Example i:` blocks joined by blank lines, then `New question: ...`.

    gsm.py lines 137-139 and 156 build `PROMPT + "\\n\\nNew question: " + question`; evaluation strips it (line 184).
    `n_shots` < 8 keeps the first examples, for models with a short context (the smoke model reads 1024 bytes).
    """
    if not 1 <= n_shots <= len(MATH_FEWSHOT):
        raise MipoError(f"n_shots={n_shots} must be between 1 and {len(MATH_FEWSHOT)} (the official prompt uses 8)")
    shots = "\n\n".join(
        f"Example {i + 1}:\nQuestion: {q}\nAnswer: {a}\n#### {short}" for i, (q, a, short) in enumerate(MATH_FEWSHOT[:n_shots])
    )
    return (MATH_HEADER + shots + "\n\nNew question: " + question).strip()


def official_math_answer(response: str) -> float | None:
    """The number a reply commits to, read as the official code reads it, with two repairs.

    Official (gsm.py lines 219-222): the first number after the FIRST `####` (`response.split("####")[1]`), so a
    model that answers and then writes a new few-shot example is graded on its own answer. Repairs: the number may
    carry a thousands separator or a minus sign (the official `\\d+\\.?\\d*` reads "1,200" as 1 and "-10" as 10, which
    also misreads 16 of GSM8K's 1,319 gold answers); and a reply without `####` is graded on its last number instead
    of a second generation that asks the policy to extract the number (gsm.py lines 224-257).
    """
    if "####" in response:
        after = numbers_in(response.split("####")[1])
        if after:
            return after[0]
    return last_number(response)


class _MathTask(_FileOrHubTask):
    official_settings = MATH_SETTINGS

    def __init__(self, train_path: Source | None = None, test_path: Source | None = None, n_shots: int = len(MATH_FEWSHOT)) -> None:
        math_prompt("", n_shots)  # check n_shots now, not at the first prompt
        self.n_shots = n_shots
        super().__init__(train_path, test_path)

    def prompt(self, example: Example, with_context: bool = True, context: str | None = None) -> Messages:
        """One user turn with the official few-shot prompt (gsm.py lines 183-185)."""
        self._refuse_context(context)
        return [{"role": "user", "content": math_prompt(example.request, self.n_shots)}]

    def score(self, example: Example, response: str) -> float:
        """1.0 when `official_math_answer(response)` equals the gold number (exact numeric match, gsm.py line 264)."""
        return float(same_number(official_math_answer(response), float(example.answer)))


def has_period(question: str) -> bool:
    """Whether the official GSM8K training builder keeps a question: it splits on "." and skips questions with no
    sentence before the last piece (gsm.py lines 145-150), i.e. questions without a period."""
    return len(question.split(".")[:-1]) >= 1


class GSM8KTask(_MathTask):
    """GSM8K grade-school word problems (`question`, `answer` ending in `#### <number>`) with the official 8-shot prompt.

    Test: `sample(n=200, random_state=42)` of the test split (gsm.py line 177), drawn here from all 1,319 rows in the
    hub's order. The official test file is not in the repository; had it been built by the training builder, the 15
    test questions without a period would be missing and the draw would differ. Training: the training rows the
    official builder keeps (those with a period, `has_period`: 7,473 minus the few without).
    """

    name = "gsm8k"
    hub_id = "openai/gsm8k"
    hub_config = "main"
    fields = ("question", "answer")
    official_settings = {**MATH_SETTINGS, "n_test_prompts": 200}

    def examples(self, split: str, n: int | None = None, seed: int = 0) -> list[Example]:
        if split != "train":
            return super().examples(split, n, seed)
        kept = [(i, r) for i, r in enumerate(self.records("train")) if has_period(r["question"])]
        return [self._example(*kept[p], "train") for p in sample_positions(len(kept), n, seed)]

    def _example(self, index: int, record: Record, split: str) -> Example:
        gold = final_answer(record["answer"])
        if gold is None or "####" not in record["answer"]:
            raise MipoError(f"gsm8k {split} row {index}: answer has no '#### <number>' line")
        return Example(id=f"gsm8k-{split}-{index:04d}", request=record["question"], answer=format_number(gold))


#: GSM8K training problems the official SVAMP training set adds (svamp.py line 152: `sample(n=700, random_state=42)`).
SVAMP_GSM8K_EXTRA = 700


class SVAMPTask(_MathTask):
    """SVAMP word problems (`Body`, `Question`, numeric `Answer`, optional `question_concat`), the official 8-shot prompt.

    Test: all 300 rows of `ChilleD/SVAMP`'s test split in file order (svamp.py lines 214-218, no sampling). Training:
    SVAMP's 700 training problems plus 700 GSM8K training problems, `sample(n=700, random_state=42)` of the rows the
    official GSM8K builder keeps (svamp.py lines 150-157; `gsm8k_train_path` replaces the hub's GSM8K training split).
    The request is `question_concat` (svamp.py line 194) when the record has it, else `Body` and `Question` joined by a
    space (what `question_concat` holds). Grouped by problem `Type`; the GSM8K problems form the group "gsm8k".
    """

    name = "svamp"
    hub_id = "ChilleD/SVAMP"
    fields = ("Body", "Question", "Answer")
    official_settings = {**MATH_SETTINGS, "n_test_prompts": 300}

    def __init__(
        self, train_path: Source | None = None, test_path: Source | None = None, n_shots: int = len(MATH_FEWSHOT),
        gsm8k_train_path: Source | None = None,
    ) -> None:
        super().__init__(train_path, test_path, n_shots)
        self._gsm8k = GSM8KTask(train_path=gsm8k_train_path, n_shots=n_shots)

    def examples(self, split: str, n: int | None = None, seed: int = 0) -> list[Example]:
        if split != "train":
            return super().examples(split, n, seed)
        pool = [self._example(i, r, "train") for i, r in enumerate(self.records("train"))]
        gsm8k = self._gsm8k.examples("train")
        extra = [gsm8k[p] for p in sample_positions(len(gsm8k), SVAMP_GSM8K_EXTRA, TEST_RANDOM_STATE)]
        pool += [Example(e.id, e.request, answer=e.answer, meta={"type": "gsm8k"}) for e in extra]
        return [pool[p] for p in sample_positions(len(pool), n, seed)]

    def _example(self, index: int, record: Record, split: str) -> Example:
        request = record.get("question_concat") or f"{record['Body'].strip()} {record['Question'].strip()}"
        return Example(
            id=str(record.get("ID", f"svamp-{split}-{index:04d}")),
            request=request.strip(),
            answer=format_number(float(record["Answer"])),
            meta={"type": record.get("Type") or "svamp"},
        )

    def group(self, example: Example) -> str:
        return example.meta["type"]


# ----------------------------------------------------------------------------------------------- multiple choice
#: The official ARC prompt around the question and its lettered choices (arc.py lines 65-69, verbatim).
ARC_HEADER = (
    "You are a helpful assistant. The following is a multiple choice question with answer choices. Your response "
    'should show clear and concise reasoning, and you should end with "The answer is: <X>", where X is the correct '
    "letter choice.\n\n"
)
ARC_FOOTER = '\n\nYour response should end with "The answer is: <X>", where X is the correct letter choice.'
#: The official ARC sampling: temperature 1.0, top-p 0.9 for pairs and evaluation (arc.py lines 33-39), 500 test
#: questions (line 57); 512 new tokens (official 1024) are plenty for "concise reasoning".
ARC_SETTINGS: Mapping[str, Any] = {
    "negative": "random_prompt", "temperature": 1.0, "top_p": 0.9, "max_new_tokens": 512,
    "eval_max_new_tokens": 512, "max_length": 1024, "n_test_prompts": 500,
}


class ARCTask(_FileOrHubTask):
    """AI2 ARC (`question`, `choices` {text, label}, `answerKey`) with the official prompt and answer extraction.

    The prompt letters the choices A, B, C, ... by position whatever the dataset's labels (arc.py lines 66-68); the
    reply is graded by `official_arc_choice`. Test: `sample(n=500, random_state=42)` of the test split (line 57).
    Two repairs, both for rows the official code can only get wrong: an `answerKey` of "1"-"5" (about 1% of ARC) is
    mapped to the letter the prompt showed at that position (the official compares it with a letter), and the fifth
    choice E counts (the official regex reads only A-D).
    """

    hub_id = "allenai/ai2_arc"
    fields = ("question", "choices", "answerKey")
    official_settings = ARC_SETTINGS

    def __init__(self, config: str, train_path: Source | None = None, test_path: Source | None = None) -> None:
        if config not in ("ARC-Easy", "ARC-Challenge"):
            raise MipoError(f"unknown ARC config {config!r}; use 'ARC-Easy' or 'ARC-Challenge'")
        self.hub_config = config
        self.name = "arc_easy" if config == "ARC-Easy" else "arc_challenge"
        super().__init__(train_path, test_path)

    def _example(self, index: int, record: Record, split: str) -> Example:
        texts, keys = list(record["choices"]["text"]), [str(k).strip() for k in record["choices"]["label"]]
        letters = [string.ascii_uppercase[i] for i in range(len(texts))]
        key = str(record["answerKey"]).strip()
        if key not in keys:
            raise MipoError(f"{self.name} {split} row {index}: answerKey {key!r} is not one of the labels {keys}")
        choices = "\n".join(f"{letter}: {text}" for letter, text in zip(letters, texts))
        return Example(
            id=str(record.get("id", f"{self.name}-{split}-{index:04d}")),
            request=record["question"] + "\n\n" + choices,
            answer=letters[keys.index(key)],
            meta={"labels": letters},
        )

    def prompt(self, example: Example, with_context: bool = True, context: str | None = None) -> Messages:
        """One user turn: the official header, the question and its choices, the official footer."""
        self._refuse_context(context)
        return [{"role": "user", "content": ARC_HEADER + example.request + ARC_FOOTER}]

    def score(self, example: Example, response: str) -> float:
        return float(official_arc_choice(response, example.meta["labels"]) == example.answer)


def official_arc_choice(response: str, labels: Sequence[str]) -> str | None:
    """The letter after the first "the answer is" (any case), as arc.py lines 89-95 read it; None without one.

    Official: split once on `(?i)the answer is`, then the first `\\b[ABCD]\\b` after it (capital letters only, so the
    article "a" is not a choice). Here the letters are the question's own (A-E), not always A-D.
    """
    parts = re.split(r"(?i)the answer is", response, maxsplit=1)
    if len(parts) < 2:
        return None
    found = re.search(rf"\b({'|'.join(map(re.escape, labels))})\b", parts[1])
    return found.group(1) if found else None


# ----------------------------------------------------------------------------------------------- personalization
#: The official PRISM prompts (prism.py lines 277 and 279, verbatim): the positive carries the user's requirements,
#: the negative is the same without that sentence; both end by repeating the length request.
PRISM_TEMPLATE = (
    "Give me short 2-3 sentence answers to the following prompt: {prompt} "
    "Please respect the following requirements made by the user: {request} Respond with short 2-3 sentences."
)
PRISM_TEMPLATE_NO_CONTEXT = (
    "Give me short 2-3 sentence answers to the following prompt: {prompt} Respond with short 2-3 sentences."
)
#: The official PRISM sampling: temperature 0.1, top-p 0.9, 512 new tokens for pairs and evaluation (prism.py lines
#: 294-300, 164-170); the first 200 test prompts (line 205); negatives drop the user's requirements (line 279).
PRISM_SETTINGS: Mapping[str, Any] = {
    "negative": "context_drop", "temperature": 0.1, "top_p": 0.9, "max_new_tokens": 512,
    "eval_max_new_tokens": 512, "max_length": 1024, "n_test_prompts": 200,
}


def requirement_strings(value: Any) -> Iterator[str]:
    """Every string in a nested dict/list, in order: the official `extract_strings` (prism.py lines 13-21)."""
    if isinstance(value, dict):
        for v in value.values():
            yield from requirement_strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from requirement_strings(v)
    elif isinstance(value, str):
        yield value


def chosen_first_reply(history: Sequence[Record]) -> str | None:
    """The reply the user chose in the first turn of a PRISM `conversation_history` (the dataset's reference)."""
    for turn in history:
        if turn.get("turn") == 0 and turn.get("role") == "model" and turn.get("if_chosen"):
            return str(turn["content"])
    return None


class PRISMTask(_FileOrHubTask):
    """PRISM: a user's opening prompt and the user's stated requirements, prompted and judged as the official code does.

    Records are conversations joined with the survey on `user_id` (fields `conversation_id`, `user_id`,
    `opening_prompt`, `system_string`, optional `conversation_type`, `instructions`, `chosen_response`); from the hub
    the join is done here and `chosen_response` is the reply the user chose in the first turn. The user's stated
    preferences are the strings of `instructions` (a dict or list, the official files' field, read with the official
    `extract_strings`) when a record has it, else the one string `system_string`: the official preprocessed files
    are not published, so which PRISM field filled `instructions` is unknown. The context (the prompt's requirements)
    is all preferences joined by spaces (prism.py line 275); the LLM judge is called once per preference
    (`meta["preferences"]`) and the reference is `meta["reference"]` (the dataset's chosen reply).

    PRISM has a single split, so users are assigned to train or test by a stable hash of `user_id` (one in five to
    test): test users are never seen in training. The test subset is the split's first n rows in file order, as the
    official `iloc[:200]` (prism.py line 205). Whether a reply fits a user's requirements needs an LLM judge, so `score`
    refuses; use `mipo_lib.evaluate.llm_judge_scores`.
    """

    name = "prism"
    conditional = True
    #: no judge in code: `score` raises; pairs and evaluation leave scores empty and use the LLM judge instead
    program_judge = False
    hub_id = "HannahRoseKirk/prism-alignment"
    fields = ("conversation_id", "user_id", "opening_prompt")
    official_settings = PRISM_SETTINGS

    def __init__(self, path: Source | None = None) -> None:
        """`path`: one local file holding both splits (they are separated by user); default the hub dataset."""
        super().__init__(path, path)

    def _load(self, source: Source, split: str) -> list[Record]:
        if _is_local(source):
            records = read_records(source)
        else:
            survey = {r["user_id"]: r for r in load_hub(str(source), "survey", "train")}
            records = [
                {**c, "system_string": survey[c["user_id"]]["system_string"],
                 "chosen_response": chosen_first_reply(c.get("conversation_history") or [])}
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

    def examples(self, split: str, n: int | None = None, seed: int = 0) -> list[Example]:
        if split != "test":
            return super().examples(split, n, seed)
        if n is not None and n < 1:
            raise MipoError(f"n must be at least 1, got {n}")
        return [self._example(i, r, split) for i, r in enumerate(self.records(split)[:n])]

    def _example(self, index: int, record: Record, split: str) -> Example:
        source = record.get("instructions") or record.get("system_string")
        preferences = [s.strip() for s in requirement_strings(source) if s.strip()]
        if not preferences:
            raise MipoError(
                f"prism {split} record {record['conversation_id']!r} states no preference; give it `instructions` "
                "(strings) or a non-empty `system_string`"
            )
        return Example(
            id=str(record["conversation_id"]),
            request=record["opening_prompt"].strip(),
            context=" ".join(preferences),
            meta={"user_id": record["user_id"], "conversation_type": record.get("conversation_type") or "prism",
                  "preferences": preferences, "reference": record.get("chosen_response")},
        )

    def prompt(self, example: Example, with_context: bool = True, context: str | None = None) -> Messages:
        """One user turn: the official positive prompt with the requirements (or `context`, another user's), or
        without them the official negative prompt."""
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
