"""One module per pipeline stage: a `Config` dataclass and `main(cfg) -> dict` (metrics)."""
