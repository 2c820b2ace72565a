"""schemathesis against the token-gated ``/api/v1/admin/*`` routes WITH an admin-scoped token (issue 13).

tests/fuzz/test_api_schemathesis.py reaches these routes only without a token (every request stops at the
gate with a 401); here each request carries ``Authorization: Bearer`` with a live ``admin`` token, so the
generated parameters and bodies reach the handlers: no 5xx, no traceback in the log, every rejection a 4xx
with a one-line ``{"detail": ...}``. Its own coordinator (the handlers delete nodes, rotate the signing
key, revoke tokens: the other fuzz runs must not see that) and its own bound: 10 examples per operation
and generation mode.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from schemathesis import GenerationMode

from tests.fuzz.harness import ADMIN_TOKEN, Harness, harness, operation_labels

pytestmark = [pytest.mark.hostile, pytest.mark.slow]

LABELS, WITH_INPUT = operation_labels()
#: revoking tokens last: a generated id may be this run's own token (then every later request is a 401)
REVOKE = "DELETE /api/v1/admin/tokens/{token_id}"
ADMIN = sorted(
    (label for label in LABELS if label.split(" ", 1)[1].startswith("/api/v1/admin/")),
    key=lambda label: (label == REVOKE, label),
)
CASES = [(label, GenerationMode.POSITIVE) for label in ADMIN] + [
    (label, GenerationMode.NEGATIVE) for label in ADMIN if label in WITH_INPUT
]
EXAMPLES = 10
#: read-only routes every schema-valid request passes: the positive control that the token works
ACCEPTS_ANY_VALID = {"GET /api/v1/admin/users", "GET /api/v1/admin/nodes", "GET /api/v1/admin/policy"}


@pytest.fixture(scope="module")
def coordinator() -> Iterator[Harness]:
    with harness() as h:
        h.admin_token()
        yield h


def test_every_admin_route_is_covered() -> None:
    assert len(ADMIN) >= 20, ADMIN
    assert set(ADMIN) >= ACCEPTS_ANY_VALID


@pytest.mark.parametrize(("label", "mode"), CASES, ids=[f"{label}-{mode.value}" for label, mode in CASES])
def test_admin_route_with_a_token(coordinator: Harness, label: str, mode: GenerationMode) -> None:
    coordinator.fuzz(label, mode, ADMIN_TOKEN, EXAMPLES)
    if mode is GenerationMode.POSITIVE and label in ACCEPTS_ANY_VALID:
        assert coordinator.accepted.get(label), f"no example of {label} got past the token gate"
