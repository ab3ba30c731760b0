"""Quality evaluation: perplexity today; top-1, lm-eval, speed and memory later."""

from channelwise.evaluate.perplexity import perplexity, window_nll

__all__ = ["perplexity", "window_nll"]
