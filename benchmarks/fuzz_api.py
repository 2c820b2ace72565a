"""Longer schemathesis run against the coordinator's node-facing API (in-process ASGI, no network).

The same harness and contract as tests/fuzz/test_api_schemathesis.py (no 5xx, no traceback logged, every
rejection a 4xx with a one-line ``{"detail": ...}``, a broken signature never accepted on a signed route)
with more examples: per operation, positive and negative generation with a valid signature for an enrolled
node, then positive generation with every broken-signature mode, then raw bodies for
``POST /api/v1/messages`` (the schema does not describe its body). Prints, per operation, the examples run
and the status codes seen, then the failures (the first counter-example of each) and the totals.
Exit status 1 when anything failed.

    PYTHONPATH=. .venv/bin/python benchmarks/fuzz_api.py [--examples 500] [--seed 0]
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from typing import Any

from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from tests.fuzz.harness import BROKEN_MODES, MESSAGE_BODY, UNSIGNED, VALID, Harness, harness, operation_labels


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--examples", type=int, default=500, help="examples per operation and mode")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    labels, with_input = operation_labels()
    bounded = settings(
        max_examples=args.examples, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    statuses: dict[str, collections.Counter[int]] = collections.defaultdict(collections.Counter)
    failures: list[str] = []
    start = time.monotonic()
    with harness() as h:
        for label in labels:
            runs: list[tuple[str, GenerationMode, bool]] = [(VALID, GenerationMode.POSITIVE, False)]
            if label in with_input:
                runs.append((VALID, GenerationMode.NEGATIVE, False))
            if label not in UNSIGNED:
                runs.append(("broken", GenerationMode.POSITIVE, True))
            for kind, mode, broken in runs:
                modes = st.sampled_from(BROKEN_MODES) if broken else st.just(VALID)
                run_one(h, label, mode, modes, broken, bounded, args.seed, statuses, failures, kind)
        run_messages(h, bounded, args.seed, statuses, failures)
        elapsed = time.monotonic() - start
        total = sum(h.examples.values())
        print(f"{'operation':40} {'examples':>8}  statuses")
        for label in labels:
            seen = " ".join(f"{code}x{n}" for code, n in sorted(statuses[label].items()))
            print(f"{label:40} {h.examples.get(label, 0):8}  {seen}")
    print(f"\noperations: {len(labels)}  examples: {total}  failures: {len(failures)}  time: {elapsed:.1f} s")
    for failure in failures:
        print(f"FAIL {failure}")
    return 1 if failures else 0


def run_one(
    h: Harness,
    label: str,
    mode: GenerationMode,
    sign_modes: st.SearchStrategy[str],
    broken: bool,
    bounded: settings,
    seed_value: int,
    statuses: dict[str, collections.Counter[int]],
    failures: list[str],
    kind: str,
) -> None:
    @seed(seed_value)
    @bounded
    @given(case=h.strategy(label, mode), sign_mode=sign_modes)
    def run(case: Any, sign_mode: str) -> None:
        response = h.send(case, sign_mode)
        statuses[label][response.status_code] += 1
        h.check(case, sign_mode, response, signed_route=broken)

    try:
        run()
    except Exception as exc:  # the benchmark reports every operation's failure, then exits 1
        failures.append(f"{label} [{kind}, {mode.value}]: {str(exc).splitlines()[0][:400]}")
        h.logs.bad.clear()


def run_messages(
    h: Harness,
    bounded: settings,
    seed_value: int,
    statuses: dict[str, collections.Counter[int]],
    failures: list[str],
) -> None:
    """POST /api/v1/messages with raw bodies (the schema does not describe its body), signed."""
    label = "POST /api/v1/messages"

    @seed(seed_value)
    @bounded
    @given(body=MESSAGE_BODY)
    def run(body: bytes) -> None:
        response = h.raw("POST", "/api/v1/messages", body)
        statuses[label][response.status_code] += 1
        h.check_raw(label, response)

    try:
        run()
    except Exception as exc:  # reported with the others
        failures.append(f"{label} [raw bodies]: {str(exc).splitlines()[0][:400]}")
        h.logs.bad.clear()


if __name__ == "__main__":
    sys.exit(main())
