"""Quality evaluation: perplexity (:mod:`.perplexity`), top-1 for vision (:mod:`.top1`), and
lm-eval tasks (:mod:`.harness`)."""

from channelwise.evaluate.perplexity import perplexity, window_nll

__all__ = ["perplexity", "window_nll"]
