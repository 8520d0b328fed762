"""Fact verification, the papers' workload: claims in, verdicts out.

A language model reads each claim in a prompt and the verdict is the label word it
finds most likely next. This module holds the pieces shared by the main job
(``python -m dask_context``), ``examples/fact_verification.py`` and the benchmarks:
a reproducible claim generator, the prompt, and the task function.
"""

from __future__ import annotations

import random
from typing import Any

from dask_context.worker import get_context

LABELS = {"true": "SUPPORTED", "false": "REFUTED", "unknown": "NOT ENOUGH INFO"}

PROMPT = "claim : {claim} . is the claim true , false or unknown ? answer :"

_FACTS = [
    ("the danube", "flows through", ["vienna", "berlin", "prague", "paris"]),
    ("the rhine", "borders", ["france", "germany", "spain", "norway"]),
    ("the thames", "flows through", ["london", "dublin", "oslo", "rome"]),
    ("everest", "is the highest mountain in", ["asia", "europe", "africa", "america"]),
    ("the seine", "flows through", ["paris", "madrid", "warsaw", "athens"]),
    ("lisbon", "is the capital of", ["portugal", "spain", "greece", "italy"]),
    ("the alps", "lie in", ["austria", "ireland", "poland", "norway"]),
    ("the pacific", "is the largest ocean on", ["earth", "europe", "asia", "africa"]),
]


def make_claims(n: int, seed: int = 0) -> list[str]:
    """``n`` reproducible claims, some true, some false.

    Examples
    --------
    >>> make_claims(2)
    ['the alps lie in norway in 1810', 'the seine flows through athens in 1903']
    """
    rng = random.Random(seed)
    claims = []
    for _ in range(n):
        subject, relation, objects = rng.choice(_FACTS)
        claims.append(f"{subject} {relation} {rng.choice(objects)} in {rng.randint(1800, 2025)}")
    return claims


def judge(model: Any, claims: list[str]) -> list[dict[str, Any]]:
    """Verdicts of ``model`` (a :class:`~dask_context.models.LanguageModel`) on ``claims``."""
    if not claims:
        return []
    words = list(LABELS)
    logprobs = model.next_token_logprobs([PROMPT.format(claim=c) for c in claims], words)
    out = []
    for claim, row in zip(claims, logprobs, strict=True):
        best = int(row.argmax())
        out.append({"claim": claim, "verdict": LABELS[words[best]], "logprob": float(row[best])})
    return out


def verify(claims: list[str], context: str = "verifier") -> list[dict[str, Any]]:
    """Task function: judge a batch of claims with the worker's warm model."""
    return judge(get_context(context), list(claims))
