"""The security lab: attacks on the assistant, defenses, and the security card that measures both.

    goals.py      what an attacker wants, judged exactly by the world: a forbidden request complied with, a
                  secret code leaked
    attacks.py    black-box prompt transformations: role-play personas, encodings
    gcg.py        a universal adversarial suffix by greedy coordinate gradient (white-box)
    defenses.py   a perplexity filter; adversarial training data from the attacks that worked
    assistant.py  the assistant under attack: a checkpoint, or a running `llmlab serve`, behind the defenses
    card.py       attack success rates with Wilson 95% intervals, utility, over-refusal
    garak.py      NVIDIA garak's report as card rows (garak itself runs against `llmlab serve`)
"""
