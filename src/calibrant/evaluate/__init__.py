"""Evaluation: perplexity with a recorded protocol (zero-shot tasks come with lm-eval)."""

from calibrant.evaluate.perplexity import PerplexityResult, perplexity, windows

__all__ = ["PerplexityResult", "perplexity", "windows"]
