"""Copying documents: a list of numbers, then the same list again ("Scores: 64, 5, 85. Again: 64, 5, 85.").

Nothing else in the corpus makes a model copy a stretch of digits it has just read: a worked sum restates its
operands, but those are two numbers, and every other document's digits (dates, years) are recalled, not copied.
The python tool's calls copy lists of numbers out of the question (`print(*sorted(( 64, 5, 85)), sep=", ")`), and
a model pretrained without these documents copied them by the luck of its fine-tuning draw: on the cpu preset,
sorting was right 57% to 95% of the time (mean 74%) over five draws of the fine-tuning data, miscopying single
digits ("5" -> "54", a number repeated or dropped); with them, 73.5% to 95.5% (mean 88%) over four. A list
drawn afresh cannot be recalled from the weights: the only way to predict its second half is to copy the first,
digit by digit, which is what induction heads do (Olsson et al., "In-context Learning and Induction Heads", 2022).

Lists of words were tried as well and are left out: on the cpu preset a tenth of the corpus of them taught copying
inside the format but cost the base model its facts (ranking true facts above false 98% -> 69-78%), and the
assistant still recalled rather than copied a word it had not seen in fine-tuning.
"""

from __future__ import annotations

import random

from llmlab.world.text import number

INTROS = ["Numbers", "Scores", "The numbers", "Counts", "Tickets drawn", "Readings", "Totals"]
AGAIN = ["Again", "Once more", "Repeat", "Read back", "Said again", "Copy"]


def copy_document(rng: random.Random) -> str:
    """3-8 numbers of 1-3 digits, listed, then listed again."""
    listed = ", ".join(str(number(rng, rng.randint(1, 3))) for _ in range(rng.randint(3, 8)))
    return f"{rng.choice(INTROS)}: {listed}. {rng.choice(AGAIN)}: {listed}."


def plant_copies(docs: list[dict], k: int, seed: int) -> list[dict]:
    """`docs` with k copying documents (kind "copy") inserted at random places, drawn from a random stream of
    their own (the other documents are those of a world without them, in the same order)."""
    rng = random.Random(f"{seed}-copy")
    out = list(docs)
    for _ in range(k):
        out.insert(rng.randint(0, len(out)), {"kind": "copy", "text": copy_document(rng)})
    return out
