"""Hand-made HellaSwag records whose contexts are whole sentences: a haystack for passkey tests."""

from __future__ import annotations

from envs.hellaswag import HellaSwagItem

_SUBJECTS = ["The man", "A woman", "The dog", "A child", "The cook", "A girl", "The team", "A boy"]
_VERBS = ["opens the door slowly", "paints a long wall", "jumps over the fence", "reads a thick book",
          "cuts the fresh bread", "rides a red bike", "kicks the ball away", "climbs a tall tree"]

#: 32 records of two sentences each: 64 distinct digit-free sentences of ~30 characters
SOURCE: tuple[HellaSwagItem, ...] = tuple(
    HellaSwagItem(
        row=i,
        activity_label="Story",
        ctx=f"{_SUBJECTS[i % 8]} {_VERBS[(i // 8) % 8]}. {_SUBJECTS[(i + 3) % 8]} {_VERBS[(i // 8 + 4) % 8]} too.",
        endings=("a", "b", "c", "d"),
        label=0,
    )
    for i in range(32)
)
