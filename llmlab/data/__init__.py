"""Corpus sources, their weighted mixture, and the packing loader."""

from llmlab.data.loader import PackedLoader
from llmlab.data.sources import Mixture, Source, open_source, parse_corpus

__all__ = ["Mixture", "PackedLoader", "Source", "open_source", "parse_corpus"]
