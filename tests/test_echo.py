"""Context echo: a reply that restates the user's preference sentence (issue 29, item 4)."""

import pytest

from mipo_lib.errors import MipoError
from mipo_lib.tasks.personalization import PREFERENCES, echoes_preference


def test_a_restated_preference_is_an_echo() -> None:
    assert echoes_preference("lowercase", "sure! here is my reply in lowercase letters only.")
    assert echoes_preference("banana", "I love bananas, and here is a recipe.")
    assert echoes_preference("cheers", "Here it is, ending with the word Cheers!")


def test_following_a_preference_is_not_an_echo() -> None:
    """The words a reply must contain to satisfy the preference (its quoted part) do not count."""
    assert not echoes_preference("hey_there", "Hey there! Boil the water first, then add the pasta.")
    assert not echoes_preference("cheers", "Boil the water first, then add the pasta. Cheers!")
    assert not echoes_preference("bullets", "- Boil the water\n- Add the pasta")
    assert not echoes_preference("banana", "Add a banana to the smoothie for sweetness.")


def test_case_and_punctuation_are_ignored() -> None:
    assert echoes_preference("no_commas", "PLEASE DO NOT... use any commas, ok")


def test_every_registered_preference_can_echo_itself() -> None:
    for key, (sentence, _) in PREFERENCES.items():
        assert echoes_preference(key, f"You said: {sentence}"), key


def test_unknown_preference_names_the_valid_ones() -> None:
    with pytest.raises(MipoError, match="valid: lowercase"):
        echoes_preference("loud", "anything")
