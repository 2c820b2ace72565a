"""schemathesis against the coordinator's node-facing OpenAPI schema, in-process (ASGI, no network).

Every operation, positive and negative generation, with a valid signature for an enrolled node and with
each way of breaking it: no 5xx, no traceback in the log, every rejection a 4xx with a one-line
`{"detail": "..."}`; a broken signature is never accepted on a signed route. Bounded: 25 examples per
operation and mode. The longer run is benchmarks/fuzz_api.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from tests.fuzz.harness import (
    BROKEN_MODES,
    MESSAGE_BODY,
    UNSIGNED,
    VALID,
    Harness,
    bounded,
    harness,
    operation_labels,
)

pytestmark = [pytest.mark.hostile, pytest.mark.slow]

LABELS, WITH_INPUT = operation_labels()
#: Negative generation needs something to break: operations without parameters or body get none.
CASES = [(label, GenerationMode.POSITIVE) for label in LABELS] + [
    (label, GenerationMode.NEGATIVE) for label in LABELS if label in WITH_INPUT
]
EXAMPLES = 25
#: Signed routes whose every schema-valid request succeeds: the positive control for the signing hook.
ACCEPTS_ANY_VALID = {"POST /api/v1/cert/renew", "GET /api/v1/signing-keys", "GET /api/v1/map"}
BOUNDED = bounded(EXAMPLES)


@pytest.fixture(scope="module")
def coordinator() -> Iterator[Harness]:
    with harness() as h:
        yield h


def test_schema_lists_every_public_route(coordinator: Harness) -> None:
    """The fuzzer covers the whole node-facing surface, and the schema served equals the one fuzzed."""
    served = sorted(r.ok().label for r in coordinator.schema.get_all_operations())  # type: ignore[union-attr]
    assert served == sorted(LABELS)
    assert {"GET /api/v1/map", "POST /api/v1/messages", "POST /api/v1/register"} <= set(LABELS)


@pytest.mark.parametrize(("label", "mode"), CASES, ids=[f"{label}-{mode.value}" for label, mode in CASES])
def test_valid_signature(coordinator: Harness, label: str, mode: GenerationMode) -> None:
    """Signed for the enrolled node: whatever the parameters and body, no 5xx and a clean rejection."""

    coordinator.fuzz(label, mode, VALID, EXAMPLES)
    if mode is GenerationMode.POSITIVE and label in ACCEPTS_ANY_VALID:
        # Positive control: the signing hook works, so the broken runs below cannot pass by accident.
        assert coordinator.accepted.get(label), f"no valid example of {label} was accepted"


@pytest.mark.parametrize("label", sorted(set(LABELS) - UNSIGNED))
def test_broken_signature(coordinator: Harness, label: str) -> None:
    """Every way of breaking the envelope is a 4xx with a one-line reason, never a 2xx or a 5xx."""

    @BOUNDED
    @given(case=coordinator.strategy(label, GenerationMode.POSITIVE), sign_mode=st.sampled_from(BROKEN_MODES))
    def run(case: object, sign_mode: str) -> None:
        response = coordinator.send(case, sign_mode)
        coordinator.check(case, sign_mode, response, signed_route=True)

    run()


def test_messages_body(coordinator: Harness) -> None:
    """POST /api/v1/messages reads a raw body the schema does not describe: fuzz it directly, signed."""

    @settings(BOUNDED, max_examples=4 * EXAMPLES)
    @given(body=MESSAGE_BODY)
    def run(body: bytes) -> None:
        r = coordinator.raw("POST", "/api/v1/messages", body)
        coordinator.check_raw("POST /api/v1/messages", r)

    run()


def test_the_contract_check_catches_what_it_must(coordinator: Harness) -> None:
    """Control for the checker itself: a 5xx, a multi-line or non-JSON rejection, an accepted broken
    signature and a logged traceback each fail it."""
    case = coordinator.operation("GET /api/v1/map").Case()
    ok = httpx.Response(401, json={"detail": "missing header x-mesh-node"})
    assert coordinator.check(case, "absent", ok, signed_route=True).status == 401
    bad = [
        (httpx.Response(500, json={"detail": "boom"}), VALID, False),
        (httpx.Response(400, json={"detail": "line one\nline two"}), VALID, False),
        (httpx.Response(400, text="Internal Server Error"), VALID, False),
        (httpx.Response(200, json={}), "stale", True),
    ]
    for response, sign_mode, signed in bad:
        with pytest.raises(AssertionError):
            coordinator.check(case, sign_mode, response, signed_route=signed)
    coordinator.logs.bad.append("coordinator: ERROR: Traceback (most recent call last)")
    try:
        with pytest.raises(AssertionError):
            coordinator.check(case, VALID, ok, signed_route=False)
    finally:
        coordinator.logs.bad.clear()
