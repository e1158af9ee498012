"""Serving: an OpenAI-compatible API over the continuous-batching scheduler, a static web chat UI, and the
feedback store that turns what users rate, flag and compare into training data."""
