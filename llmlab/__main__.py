"""`python -m llmlab <stage>`: the same as the `llmlab` console command (and what torchrun runs)."""

from llmlab.cli import main

if __name__ == "__main__":
    main()
