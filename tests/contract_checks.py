"""Schemathesis hooks of tests/test_openapi_contract.py (loaded through SCHEMATHESIS_HOOKS).

One check replaces the built-in `positive_data_acceptance`, and only for the cost bounds
(qaserve.limits) that JSON Schema cannot state: a question's length in tokens, a product of
fields (documents x beams x tokens), the characters of all documents together. The routes'
descriptions and the question's `x-max-tokens` state them; a schema-valid request beyond
one is refused by design, with 422 (400 on the OpenAI route) naming the field and the bound.
Every other refusal of a schema-valid request still fails the run, as the built-in does.
"""

from __future__ import annotations

from typing import Any

import schemathesis
from schemathesis.specs.openapi.checks import positive_data_acceptance

UNSTATABLE_BOUNDS = (
    "(limits.max_question_tokens",
    "(limits.max_generation_tokens",
    "(limits.max_read_chars",
)


def _refused_by_an_unstatable_bound(response: Any) -> bool:
    if response.status_code not in (400, 422):
        return False
    try:
        message = str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return False
    return any(bound in message for bound in UNSTATABLE_BOUNDS)


@schemathesis.check
def positive_data_acceptance_within_cost_bounds(ctx: Any, response: Any, case: Any) -> Any:
    """`positive_data_acceptance`, but for a refusal by one of UNSTATABLE_BOUNDS."""
    if _refused_by_an_unstatable_bound(response):
        return None
    return positive_data_acceptance(ctx, response, case)
