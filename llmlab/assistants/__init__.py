"""Custom assistants: instructions, knowledge files, tools and adapters over one of llmlab's models.

    files.py      a user's files as text: plain text, Markdown, JSONL, PDF; clear errors for the rest
    chunks.py     text cut into passages of whole sentences that overlap, each knowing its file
    retrieval.py  BM25, dense and hybrid ranking of passages; Recall@k and nDCG@k against known relevance
    embedder.py   the dense retriever: the model's own backbone as a bi-encoder, trained by InfoNCE
    store.py      assistants on disk (instructions, files and their passages, tools)
    reader.py     paging: retrieved passages read one at a time after the question, the best-ranked answer kept
    memory.py     a conversation's memory: what the user said, kept past the context and paged back in
    evals.py      accuracy with files and without, needle in a haystack, memory recall N turns back
"""
