"""Fuzz the running API from its own OpenAPI spec (schemathesis): no 5xx, and answers match the spec.

    .venv/bin/pytest tests/test_serve_fuzz.py -x -q

Positive cases (bodies the spec allows) must be accepted; negative ones (the spec forbids)
must be a 4xx; every answer's status, content type and body must be what the spec says.
"""

from __future__ import annotations

from collections import Counter

import pytest

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_fuzz_api_from_its_openapi_spec(served, mode):
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(f"{served.url}/openapi.json", timeout=30)
    strategy = schema.as_strategy(GenerationMode(mode))
    seen: Counter = Counter()

    # Explicit phases without shrinking: a failure shows the case as generated, and the run stays short.
    @settings(max_examples=60 if mode == "negative" else 30, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def fuzz(case):
        response = case.call(base_url=served.url, headers=served.headers, timeout=120)
        seen[(case.method, case.path, response.status_code)] += 1
        assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])
        case.validate_response(response, headers=served.headers)

    fuzz()
    # The fuzzer reached the operations that matter (bodiless GETs have no negative cases).
    if mode == "negative":
        for path in ("/v1/generate", "/v1/images/generations"):
            assert seen[("POST", path, 400)] > 0, seen
    else:
        assert len({(method, path) for (method, path, _) in seen}) >= 5, seen
        for path in ("/v1/generate", "/v1/images/generations"):
            assert seen[("POST", path, 200)] > 0, seen
