"""An answer's confidence, from the log-probabilities of the tokens generation picked
(`Generation.token_logprobs`, read after every logits processor: under a grammar the distribution is
renormalized over the tokens it allows, and a token it forces has probability 1, so it never lowers a minimum).

Candidates, each a float in [0, 1]:

* `min_prob` — the lowest probability among the answer's tokens: the one decision the model was least sure of
  (a function name, an argument value, a label, the choice to stop). Under a grammar the structural tokens are
  forced and drop out; decoded free they are near-certain and rarely the minimum.
* `mean_prob` — the geometric mean token probability, exp(mean log-probability): how sure the model was on
  average; a long answer with one shaky value scores high.
* `first_prob` — the probability of the first token: for tool calling, calling (``<tool_call>``) vs answering
  in text; for labels, usually the label itself.

For free text (summaries) these measure how surely the model wrote what it wrote, not whether it is right:
nothing checks a summary's content, so text routes are judged by their eval metric, not by this number.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

CANDIDATES = ("min_prob", "mean_prob", "first_prob")
DEFAULT = "min_prob"


def confidence(logprobs: Sequence[float], kind: str = DEFAULT) -> float | None:
    """`kind` of the answer whose tokens had these log-probabilities; None when nothing was generated."""
    if not logprobs:
        return None
    if kind == "min_prob":
        value = math.exp(min(logprobs))
    elif kind == "mean_prob":
        value = math.exp(sum(logprobs) / len(logprobs))
    elif kind == "first_prob":
        value = math.exp(logprobs[0])
    else:
        raise ValueError(f"confidence kind {kind!r}: one of {', '.join(CANDIDATES)}")
    return min(1.0, max(0.0, value))


def all_confidences(logprobs: Sequence[float]) -> dict[str, float | None]:
    """Every candidate, for reports that compare them."""
    return {k: confidence(logprobs, k) for k in CANDIDATES}
