"""Verifiable personalization: the `cpu` preset's task, where the judge of "did the reply respect the user?" is code.

Conditional MIPO needs a user context that changes what a good reply looks like. Real personalization data (PRISM)
needs an LLM judge, which a laptop cannot run; here every user states one preference that a few lines of Python can
check ("end your reply with Cheers!", "mention bananas", ...). That keeps the whole loop (sample, pair, train,
evaluate) honest and fast on two CPU cores, and lets the notebooks break results down by preference: a 135M model
follows some preferences and never others, and MIPO can only amplify what the base model already samples.

An example is one (request x preference): 60 everyday requests, a fixed 30/10/20 train/validation/test split of
requests (validation and test requests are never seen in training; settings are chosen on validation, the test set is
used once), crossed with the 10 preferences below. Every request ends with the official PRISM template's length
instruction ("Respond with short 2-3 sentences."), with or without the user's context, so that replies finish inside
the token cap instead of being cut off (a cut-off reply can fake some verdicts: see `COMPLETE_ONLY`).

`personalization_unseen_types` is the same task with the preferences split in two: it trains on five preference types
and tests on the other five, asking whether MIPO teaches following preferences in general or only the ones it saw. `register_preference` adds another
checkable preference (key, sentence, checker); it then appears in pairs, training, evaluation, the per-preference
figure and tables like the built-in ones.

`personalization_constraints` is a test-only task: the same test requests under users who state a negative constraint
("Please do not mention coffee in your reply.", `NEGATIVE_CONSTRAINTS`), which no training or tuning ever sees. It asks
where MIPO's reward backfires: a sentence that names what to avoid makes that very thing likely (`make constraints`).
"""

from __future__ import annotations

import random
import re
from typing import TYPE_CHECKING, Callable

from mipo_lib.errors import MipoError
from mipo_lib.tasks.base import Example

if TYPE_CHECKING:  # generate imports torch: tasks stay cheap to import, since presets check task names
    from mipo_lib.generate import Messages

Checker = Callable[[str], bool]

# ------------------------------------------------------------------------------------------------------ checkers
# Sentence ends: a run of . ! ? (closing quotes or brackets may follow) before whitespace or the end of the text, and
# every line break (a bullet line is a sentence of its own). "3.5" and "e.g.x" do not split; "Mr. Smith" does: a
# rule a reader can predict beats a clever one.
_SENTENCE_END = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*(?=\s|$)")
_ALNUM = re.compile(r"[^\W_]")
_FINISHED = re.compile(r"[.!?][\"'\u201d\u2019)\]]*$")  # text that ends a sentence
_BANANA = re.compile(r"\bbananas?\b", re.IGNORECASE)


def sentences(text: str) -> list[str]:
    """Split `text` into sentences; pieces without a letter or digit (stray punctuation, blank lines) are dropped."""
    pieces = _SENTENCE_END.sub(lambda m: m.group() + "\n", text).split("\n")
    return [s.strip() for s in pieces if _ALNUM.search(s)]


def _has_letter(text: str) -> bool:
    return any(c.isalpha() for c in text)


def _lowercase(text: str) -> bool:
    return _has_letter(text) and not any(c.isupper() for c in text)


def _all_caps(text: str) -> bool:
    return _has_letter(text) and not any(c.islower() for c in text)


def _short(text: str) -> bool:
    # An empty reply is not an answer: requiring one word stops "say nothing" from counting as short.
    return 0 < len(text.split()) < 25


def _cheers(text: str) -> bool:
    return text.rstrip().endswith("Cheers!")


def _hey_there(text: str) -> bool:
    return text.lstrip().startswith("Hey there")


def _bullets(text: str) -> bool:
    # Indentation before the dash is allowed: "  - item" is still a bullet line.
    return sum(line.lstrip().startswith("- ") for line in text.splitlines()) >= 2


def _banana(text: str) -> bool:
    return _BANANA.search(text) is not None


def _no_commas(text: str) -> bool:
    return bool(text.strip()) and "," not in text


def _two_sentences(text: str) -> bool:
    # The second sentence must be finished: "Brew the tea. Then add milk and" is one sentence and a fragment.
    return len(sentences(text)) == 2 and _FINISHED.search(text.rstrip()) is not None


def _digit(text: str) -> bool:
    return re.search(r"[0-9]", text) is not None


#: key -> (the sentence the user states, the checker). Order is the order of figures and of balanced subsets.
#: Add to it with `register_preference` (which checks the entry), not by assignment.
PREFERENCES: dict[str, tuple[str, Checker]] = {
    "lowercase": ("Please write your whole reply in lowercase letters only, with no capital letters.", _lowercase),
    "short": ("Keep your reply short: under 25 words.", _short),
    "cheers": ('Always end your reply with the word "Cheers!"', _cheers),
    "hey_there": ('Always start your reply with "Hey there".', _hey_there),
    "bullets": ('I like lists: give your reply as bullet points, each on its own line starting with "- ".', _bullets),
    "banana": ("I love bananas, so please mention bananas somewhere in your reply.", _banana),
    "no_commas": ("Please do not use any commas in your reply.", _no_commas),
    "two_sentences": ("Answer in exactly two sentences.", _two_sentences),
    "all_caps": ("Please write your whole reply in CAPITAL LETTERS.", _all_caps),
    "digit": ("I like numbers: include at least one number written in digits in your reply.", _digit),
}


#: Preferences whose verdict more text can overturn (a later capital, comma, sentence or word), so a reply cut off
#: at the token cap cannot be judged on them: the judge fails it (`score(..., truncated=True)`). The others (a
#: banana, a digit, a greeting, two bullet lines) stay met however the reply continues.
COMPLETE_ONLY: set[str] = {"lowercase", "short", "cheers", "no_commas", "two_sentences", "all_caps"}

#: Preference keys end up in example ids (`r07-banana`) and folder-free tables: lower-case letters, digits and _.
_KEY = re.compile(r"[a-z][a-z0-9_]*")
#: Replies a checker is tried on when it is registered: an empty one and an ordinary one.
_PROBES = ("", "Hey there, here is a short reply. Cheers!")


def register_preference(key: str, sentence: str, checker: Checker, *, replace: bool = False, complete_only: bool = True) -> None:
    """Add a preference users can state: `sentence` goes into the prompt, `checker(reply)` judges the reply.

    `complete_only` (the safe default): a reply cut off at the token cap fails it, because more text could have
    overturned the verdict; pass False only for a preference that, once met, stays met (a word is mentioned).

    The checker is tried at once on an empty and an ordinary reply and must return a bool: a checker that crashes
    or returns something else would otherwise fail at evaluation time, after minutes of generation. Sentences must
    differ between preferences (random-context negatives swap them). Training and test subsets then cross requests
    with every registered preference when the size allows it (see `balanced_shape`): with 11 preferences choose
    n_train_prompts and n_test_prompts as multiples of 11.
    """
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise MipoError(f"preference key {key!r} must be lower-case letters, digits and _ (it goes into example ids)")
    if key in PREFERENCES and not replace:
        raise MipoError(f"preference {key!r} is already registered; pick another key or pass replace=True")
    if not isinstance(sentence, str) or not sentence.strip():
        raise MipoError(f"preference {key!r}: the sentence must be the non-empty text a user states")
    clash = [k for k, (s, _) in PREFERENCES.items() if s == sentence and k != key]
    if clash:
        raise MipoError(f"preference {key!r}: the sentence is already the one of {clash[0]!r}; word it differently")
    if not callable(checker):
        raise MipoError(f"preference {key!r}: the checker must be a function from the reply text to True/False")
    for probe in _PROBES:
        try:
            verdict = checker(probe)
        except Exception as err:  # noqa: BLE001 - any crash on an ordinary reply is the same mistake to the user
            raise MipoError(f"preference {key!r}: the checker fails on the reply {probe!r} ({type(err).__name__}: {err})") from None
        if type(verdict).__name__ not in ("bool", "bool_"):  # numpy's bool is fine too
            raise MipoError(f"preference {key!r}: the checker returned {verdict!r} for {probe!r}; return True or False")
    PREFERENCES[key] = (sentence, checker)
    if complete_only:
        COMPLETE_ONLY.add(key)
    else:
        COMPLETE_ONLY.discard(key)


def unregister_preference(key: str) -> None:
    """Remove a preference (tests undo their registrations with it)."""
    if PREFERENCES.pop(key, None) is None:
        raise MipoError(f"unknown preference {key!r}; valid: {', '.join(PREFERENCES)}")
    COMPLETE_ONLY.discard(key)


def check(preference_key: str, response: str, truncated: bool = False) -> bool:
    """Whether `response` satisfies the preference named `preference_key`; a `truncated` reply (cut off at the token
    cap) fails every preference in `COMPLETE_ONLY`."""
    try:
        _, checker = PREFERENCES[preference_key]
    except KeyError:
        raise MipoError(f"unknown preference {preference_key!r}; valid: {', '.join(PREFERENCES)}") from None
    if truncated and preference_key in COMPLETE_ONLY:
        return False
    return checker(response)


# ------------------------------------------------------------------------------------------------------ requests
#: 60 everyday requests; `r00` is the first. Every third one (r02, r05, ..., r59) is held out for testing; of the other
#: 40, every fourth (r05... see VALIDATION_REQUEST_IDS) is held out for choosing settings.
REQUESTS: tuple[str, ...] = (
    "How do I make tea?",
    "Suggest a weekend activity.",
    "What should I cook for dinner tonight?",
    "How can I sleep better?",
    "Give me a tip for saving money.",
    "What is a good book to read on vacation?",
    "How do I keep my houseplants alive?",
    "Recommend a movie for a rainy evening.",
    "How can I stay focused while studying?",
    "What should I pack for a day at the beach?",
    "How do I clean a coffee mug with stains?",
    "Suggest a fun game for a family evening.",
    "How can I make my mornings less rushed?",
    "What is a healthy snack for work?",
    "How do I start running as a beginner?",
    "Give me an idea for a birthday present for a friend.",
    "How can I learn a new language faster?",
    "What can I do on a long train ride?",
    "How do I write a polite email asking for a day off?",
    "Suggest a quick breakfast.",
    "How do I remove a sticker from a laptop?",
    "What is a good way to relax after work?",
    "How should I prepare for a job interview?",
    "Give me an idea for a picnic lunch.",
    "How do I fold a shirt neatly?",
    "Suggest a hobby I can do at home.",
    "How can I drink more water during the day?",
    "What should I do when I feel bored?",
    "How do I make a simple salad dressing?",
    "Recommend a board game for two people.",
    "How can I keep my desk tidy?",
    "What is a nice thing to do for a neighbor?",
    "How do I choose a ripe avocado?",
    "Suggest a short stretching routine.",
    "How can I make a small room feel bigger?",
    "What should I bring to a potluck dinner?",
    "How do I get rid of fruit flies in the kitchen?",
    "Give me an idea for a date night at home.",
    "How can I remember people's names?",
    "What is a good gift for a new neighbor?",
    "How do I make my bike last longer?",
    "Suggest a song to wake me up in the morning.",
    "How can I spend less time on my phone?",
    "What should I plant in a small balcony garden?",
    "How do I boil an egg?",
    "Give me an idea for a rainy day with kids.",
    "How can I make a good first impression?",
    "What is an easy dessert to bake?",
    "How do I pack a suitcase efficiently?",
    "Suggest a way to celebrate a small win.",
    "How can I cool down my bedroom in summer?",
    "What should I write in a thank-you card?",
    "How do I keep bread fresh longer?",
    "Recommend a podcast topic for a commute.",
    "How can I be more patient?",
    "What is a good warm drink for winter?",
    "How do I organize my closet?",
    "Suggest a simple way to start journaling.",
    "How can I save time on grocery shopping?",
    "What should I do on my first day at a new job?",
)
REQUEST_IDS: tuple[str, ...] = tuple(f"r{i:02d}" for i in range(len(REQUESTS)))
TEST_REQUEST_IDS: tuple[str, ...] = REQUEST_IDS[2::3]
_NOT_TEST: tuple[str, ...] = tuple(r for r in REQUEST_IDS if r not in TEST_REQUEST_IDS)
VALIDATION_REQUEST_IDS: tuple[str, ...] = _NOT_TEST[3::4]
TRAIN_REQUEST_IDS: tuple[str, ...] = tuple(r for r in _NOT_TEST if r not in VALIDATION_REQUEST_IDS)
SPLITS: tuple[str, ...] = ("train", "validation", "test")
#: Appended to every request (with and without the context), as the official PRISM prompt template does: a 135M
#: model's replies otherwise run past any affordable token cap (measured with greedy decoding on the test prompts at
#: 128 tokens: 40% of prompting replies and 100% of context-free ones hit the cap without it, 21% / 40% with it).
LENGTH_INSTRUCTION = "Respond with short 2-3 sentences."
#: The held-out subsets (validation, test) must be the same for every training seed, so that methods and seeds are
#: compared on the same prompts (paired comparisons); they are drawn with this fixed seed, never the caller's.
TEST_SUBSET_SEED = 20240601


def balanced_shape(n: int, n_requests: int, n_preferences: int | None = None) -> tuple[int, int]:
    """(requests, preferences per request) for a balanced subset of exactly `n` examples.

    The rule: use the largest number of preferences p <= n_preferences (default: all registered, 10 built in) that
    divides n, and n // p requests, each crossed with the same p preferences, so every preference used appears
    equally often (with 10: n=120 -> 12 x 10, n=16 -> 2 x 8, n=20 -> 2 x 10, n=7 -> 1 x 7). The default is read at
    call time, so a registered preference is part of every subset whose size it divides.
    """
    if n_preferences is None:
        n_preferences = len(PREFERENCES)
    if n_preferences < 1:
        raise MipoError(f"n_preferences must be at least 1, got {n_preferences}; register_preference one")
    if n < 1:
        raise MipoError(f"n must be at least 1, got {n}")
    p = max(d for d in range(1, n_preferences + 1) if n % d == 0)
    if n // p > n_requests:
        raise MipoError(
            f"n={n} needs {n // p} requests x {p} preferences but the split has only {n_requests} requests; "
            f"use n <= {n_requests * n_preferences}"
        )
    return n // p, p


class PersonalizationTask:
    """Requests crossed with checkable user preferences; the user's preference sentence is the context."""

    name = "personalization"
    conditional = True

    def preference_keys(self, split: str) -> list[str]:
        """The preferences a split crosses with its requests: all registered ones (a subclass may hold some out)."""
        return list(PREFERENCES)

    def examples(self, split: str, n: int | None = None, seed: int = 0) -> list[Example]:
        """(request x preference) examples of a split, ids like `r07-banana`, grouped request by request.

        With `n`, a balanced subset (see `balanced_shape`): for 'train' the requests and (if fewer than all)
        preferences are a seeded draw, nested in n for a given seed; for 'validation' and 'test' the draw ignores
        `seed`.
        """
        request_ids, subset_seed = {
            "train": (TRAIN_REQUEST_IDS, seed),
            "validation": (VALIDATION_REQUEST_IDS, TEST_SUBSET_SEED),
            "test": (TEST_REQUEST_IDS, TEST_SUBSET_SEED),
        }.get(split, ((), None))
        if subset_seed is None:
            raise MipoError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        keys = self.preference_keys(split)
        if not keys:
            raise MipoError("the personalization task has no preferences (all unregistered); register_preference one")
        chosen_requests = list(request_ids)
        if n is not None:
            n_requests, n_prefs = balanced_shape(n, len(request_ids), len(keys))
            rng = random.Random(subset_seed)
            rng.shuffle(chosen_requests)
            chosen_requests = chosen_requests[:n_requests]
            if n_prefs < len(keys):
                picked = set(rng.sample(keys, n_prefs))
                keys = [k for k in keys if k in picked]
        return [self._example(rid, key) for rid in chosen_requests for key in keys]

    @staticmethod
    def _example(request_id: str, key: str) -> Example:
        return Example(
            id=f"{request_id}-{key}",
            request=REQUESTS[int(request_id[1:])],
            context=PREFERENCES[key][0],
            meta={"preference": key, "request_id": request_id},
        )

    def prompt(self, example: Example, with_context: bool = True, context: str | None = None) -> Messages:
        """One user message: the preference sentence, a blank line, the request and `LENGTH_INSTRUCTION`; without
        context the same minus the preference sentence.

        `context` swaps in another user's preference sentence (random-context negatives).
        """
        if not with_context:
            if context is not None:
                raise MipoError("prompt(): a replacement context was given with with_context=False; drop one of them")
            return [{"role": "user", "content": _with_length(example.request)}]
        sentence = context if context is not None else example.context
        request = _with_length(example.request)
        content = f"{sentence}\n\n{request}" if sentence else request
        return [{"role": "user", "content": content}]

    def score(self, example: Example, response: str, truncated: bool = False) -> float:
        """1.0 when the response satisfies the example's preference (its own, not a swapped-in one), else 0.0; a
        reply cut off at the token cap fails the preferences a longer reply could have broken (`COMPLETE_ONLY`)."""
        return float(check(example.meta["preference"], response, truncated))

    def group(self, example: Example) -> str:
        """The preference key: results are reported per preference."""
        return example.meta["preference"]


# -------------------------------------------------------------------------------------------------- context echo
#: How many consecutive words of the preference sentence a reply must repeat to count as echoing it. Three: two-word
#: runs ("your reply", "in your") occur by chance in any reply; a three-word run of the user's own sentence rarely does.
ECHO_NGRAM = 3
_WORD = re.compile(r"[a-z0-9]+")
_QUOTED = re.compile(r'"[^"]*"')


def _word_ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = _WORD.findall(text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def echoes_preference(preference_key: str, response: str, n: int = ECHO_NGRAM) -> bool:
    """Whether `response` restates the user's preference sentence: it repeats `n` consecutive words of it
    (case and punctuation ignored), not counting the words a reply must contain to satisfy it (the quoted part:
    "Cheers!", "Hey there", "- ").

    Why measure it: MIPO rewards replies the context makes likely, and repeating the context is the cheapest way to be
    likely under it ("I will write my reply in lowercase letters"). A rise in echo next to a rise in success says
    part of the gain is the model talking about the preference rather than following it. The no-context base model
    never saw the sentence, so its echo rate is the chance level of this measure.
    """
    try:
        sentence, _ = PREFERENCES[preference_key]
    except KeyError:
        raise MipoError(f"unknown preference {preference_key!r}; valid: {', '.join(PREFERENCES)}") from None
    return _echoes(sentence, response, n)


def _echoes(sentence: str, response: str, n: int) -> bool:
    """Whether `response` repeats `n` consecutive words of `sentence`, its quoted part left out."""
    payload = _word_ngrams(" ".join(_QUOTED.findall(sentence)), n)
    return bool((_word_ngrams(sentence, n) - payload) & _word_ngrams(response, n))


def _with_length(request: str) -> str:
    return f"{request} {LENGTH_INSTRUCTION}"


#: The five preference types `personalization_unseen_types` trains on; it tests on the other five. Every other type in
#: the built-in order, so both halves mix surface forms (case, endings, words, layout).
SEEN_TYPES: tuple[str, ...] = ("lowercase", "cheers", "bullets", "no_commas", "all_caps")


class UnseenTypesTask(PersonalizationTask):
    """Personalization with held-out preference *types*: train (and validation) prompts state one of `SEEN_TYPES`,
    test prompts one of the other registered preferences, on the same held-out requests as `personalization`.

    Does MIPO teach following a stated preference in general, or only the preferences it was trained on? The paper
    does not test this; its test set shares preference types with training, as `personalization` does.
    """

    name = "personalization_unseen_types"

    def preference_keys(self, split: str) -> list[str]:
        seen = [k for k in PREFERENCES if k in SEEN_TYPES]
        return seen if split != "test" else [k for k in PREFERENCES if k not in SEEN_TYPES]


# ------------------------------------------------------------------------------------ negative constraints (test only)
# Every preference above names something the reply should *contain*, and MIPO's reward (the base model's PMI of the
# reply with the user's sentence) pays for words that sentence makes likely: naming the thing helps. A constraint
# that names something to *avoid* ("do not mention coffee") makes that very word likely too, so the same reward can
# pull the reply towards what the user forbade. These constraints measure that; they are never trained on or tuned
# on (they are not in `PREFERENCES`): only `NegativeConstraintsTask`'s test split states them.
_COFFEE = re.compile(r"\bcoffee", re.IGNORECASE)
_HELLO = re.compile(r"^[\W_]*hello", re.IGNORECASE)
_YOU = re.compile(r"\byou\b", re.IGNORECASE)


def _no_coffee(text: str) -> bool:
    # Any word that starts with "coffee" (coffee, Coffees, coffeehouse), in any case, breaks it.
    return bool(text.strip()) and _COFFEE.search(text) is None


def _no_hello(text: str) -> bool:
    # The first word, after any leading punctuation or quotes, may not start with "hello" in any case.
    return bool(text.strip()) and _HELLO.search(text) is None


def _no_you(text: str) -> bool:
    # The word "you" in any case, also before an apostrophe (you're, you'll); "your" and "yourself" are other words.
    return bool(text.strip()) and _YOU.search(text) is None


def _no_exclamation(text: str) -> bool:
    return bool(text.strip()) and "!" not in text


#: key -> (the sentence the user states, the checker: True when the reply keeps the constraint, whether a reply cut at
#: the token cap fails it). An empty reply keeps none (saying nothing is no answer). A cut reply fails the constraints
#: that more text could still break (`COMPLETE_ONLY`'s rule); how a reply starts is settled once it has started.
NEGATIVE_CONSTRAINTS: dict[str, tuple[str, Checker, bool]] = {
    "no_coffee": ("Please do not mention coffee in your reply.", _no_coffee, True),
    "no_hello": ('Never start your reply with "Hello".', _no_hello, False),
    "no_you": ('Please never use the word "you" in your reply.', _no_you, True),
    "no_exclamation": ("Please do not use any exclamation marks in your reply.", _no_exclamation, True),
}


def _constraint(key: str) -> tuple[str, Checker, bool]:
    try:
        return NEGATIVE_CONSTRAINTS[key]
    except KeyError:
        raise MipoError(f"unknown negative constraint {key!r}; valid: {', '.join(NEGATIVE_CONSTRAINTS)}") from None


def check_constraint(key: str, response: str, truncated: bool = False) -> bool:
    """Whether `response` keeps the negative constraint `key`; a `truncated` reply fails the ones more text could
    break."""
    _, checker, complete_only = _constraint(key)
    return not (truncated and complete_only) and checker(response)


def echoes_constraint(key: str, response: str, n: int = ECHO_NGRAM) -> bool:
    """`echoes_preference` for a negative constraint: the reply repeats `n` consecutive words of its sentence (the
    quoted word it forbids left out: saying it is a violation, counted by `check_constraint`)."""
    return _echoes(_constraint(key)[0], response, n)


class NegativeConstraintsTask(PersonalizationTask):
    """The personalization test requests, each under a user who states a `NEGATIVE_CONSTRAINTS` sentence instead of a
    preference; prompted exactly as `personalization` prompts, judged by `check_constraint`, reported per constraint.

    Test only: it has no training or validation examples, so nothing is ever trained or tuned on a constraint. With
    `n`, its test subset is `balanced_shape`'s draw with the personalization test subset's seed: `n` = (the
    personalization subset's requests) x (the constraints) gives the same requests, crossed with every constraint.
    """

    name = "personalization_constraints"

    def preference_keys(self, split: str) -> list[str]:
        if split != "test":
            raise MipoError(f"{self.name} is a test-only task (negative constraints are never trained or tuned on); "
                            f"ask for its 'test' split, not {split!r}")
        return list(NEGATIVE_CONSTRAINTS)

    @staticmethod
    def _example(request_id: str, key: str) -> Example:
        return Example(id=f"{request_id}-{key}", request=REQUESTS[int(request_id[1:])],
                       context=NEGATIVE_CONSTRAINTS[key][0], meta={"preference": key, "request_id": request_id})

    def score(self, example: Example, response: str, truncated: bool = False) -> float:
        """1.0 when the reply keeps the example's constraint, else 0.0 (`check_constraint`)."""
        return float(check_constraint(example.meta["preference"], response, truncated))
