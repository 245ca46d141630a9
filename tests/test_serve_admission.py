"""Cost-aware admission (issue 15 item 3): the bound is on queued work, not on the number of requests.

    .venv/bin/pytest tests/test_serve_admission.py -x -q

Unit tests of the accounting (serve/admission.py) with a hand-driven clock, then a burst against the
real Ray Serve app of tests/fixtures_serve.py (configs/serve_test.yaml: a budget of 80,000
pixel-steps, so two requests of n=4, 8 steps, 32x32 fill it while 16 requests would fit the count bound).
"""

from __future__ import annotations

import asyncio

import pytest

from serve.admission import Overbudget, WorkBudget, job_cost


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_cost_is_images_times_steps_times_pixels():
    assert job_cost(1, 20, 16, 16) == 5120
    assert job_cost(4, 50, 64, 64) == 4 * 50 * 4096 == 160 * job_cost(1, 20, 16, 16)
    assert job_cost(2, 0, 16, 16) == job_cost(2, 1, 16, 16)  # a step is the least a request costs


def test_budget_admits_by_work_not_by_count():
    budget = WorkBudget(max_work=10_000, max_requests=100, clock=Clock())
    heavy = budget.admit(6000)
    with pytest.raises(Overbudget) as refused:
        budget.admit(6000)
    assert "budget 10000" in str(refused.value)
    cheap = [budget.admit(100) for _ in range(40)]  # forty cheap ones still fit beside the heavy one
    assert budget.queued_work == 10_000 and budget.in_flight == 41
    with pytest.raises(Overbudget):
        budget.admit(1)
    budget.release(heavy)
    assert budget.queued_work == 4000 and budget.admit(6000).cost == 6000
    for ticket in cheap:
        budget.release(ticket)
    assert budget.in_flight == 1


def test_request_count_stays_a_second_bound():
    budget = WorkBudget(max_work=10**9, max_requests=3, clock=Clock())
    for _ in range(3):
        budget.admit(1)
    with pytest.raises(Overbudget, match="3 requests in flight, capacity 3"):
        budget.admit(1)


def test_a_request_over_the_whole_budget_runs_alone():
    budget = WorkBudget(max_work=1000, clock=Clock())
    big = budget.admit(5000)  # an empty queue takes it
    with pytest.raises(Overbudget):
        budget.admit(1)  # and nothing joins it
    budget.release(big)
    small = budget.admit(10)
    with pytest.raises(Overbudget):
        budget.admit(5000)  # not beside anything
    budget.release(small)


def test_retry_after_comes_from_the_measured_drain_rate():
    clock = Clock()
    budget = WorkBudget(max_work=10_000, fallback_retry_after_s=7, max_retry_after_s=300, clock=clock)
    first = budget.admit(8000)
    with pytest.raises(Overbudget) as refused:
        budget.admit(4000)
    assert refused.value.retry_after_s == 7  # nothing finished yet: the configured fallback
    clock.now += 4.0
    budget.release(first)  # 8000 pixel-steps in 4 busy seconds: 2000 a second
    assert budget.work_per_s() == pytest.approx(2000, rel=1e-6)
    clock.now += 100.0  # idle time does not dilute the rate (it decays, both parts alike)
    assert budget.work_per_s() == pytest.approx(2000, rel=1e-6)
    budget.admit(9000)
    with pytest.raises(Overbudget) as refused:
        budget.admit(5000)
    # 9000 + 5000 - 10000 = 4000 pixel-steps must drain first: 2 s at 2000/s.
    assert refused.value.retry_after_s == 2
    with pytest.raises(Overbudget) as refused:
        budget.admit(50_000)  # over the whole budget: waits for the queue to empty, 9000 / 2000 -> 5 s
    assert refused.value.retry_after_s == 5


def test_retry_after_is_capped_and_failures_do_not_count_as_throughput():
    clock = Clock()
    budget = WorkBudget(max_work=1000, max_retry_after_s=30, clock=clock)
    ticket = budget.admit(1000)
    clock.now += 10.0
    budget.release(ticket, finished=False)  # failed: no work done
    assert budget.work_per_s() is None and budget.queued_work == 0
    ticket = budget.admit(10)
    clock.now += 100.0
    budget.release(ticket)  # 0.1 pixel-steps a second
    budget.admit(1000)
    with pytest.raises(Overbudget) as refused:
        budget.admit(1000)
    assert refused.value.retry_after_s == 30


def test_budget_rejects_nonsense():
    with pytest.raises(ValueError, match="max_work=0"):
        WorkBudget(max_work=0)


def test_config_defaults_and_bounds():
    from omnidiff.config import ConfigError, load_config
    from serve.config import ServeConfig

    cfg = load_config(ServeConfig)
    assert cfg.admission.max_queued_work == 500_000 and cfg.http.header_timeout_s == 10.0
    with pytest.raises(ConfigError, match="admission.max_queued_work"):
        load_config(ServeConfig, overrides=["admission.max_queued_work=0"])


# ----------------------------------------------------------------------------- the real app


@pytest.mark.e2e
def test_burst_of_heavy_requests_gets_503s_with_retry_after_while_cheap_ones_are_admitted(served):
    import httpx
    import requests

    from serve.config import parse_size

    limits, admission = served.cfg.limits, served.cfg.admission
    sizes = requests.get(f"{served.url}/v1/models", timeout=30).json()["data"][0]["sizes"]  # the model's card
    width, height = max((parse_size(s) for s in sizes), key=lambda wh: wh[0] * wh[1])
    heavy = {"prompt": "a red circle", "n": limits.max_n, "steps": limits.max_steps, "size": f"{width}x{height}"}
    cheap = {"prompt": "a blue square", "n": 1, "steps": 1, "size": "16x16"}
    fit = admission.max_queued_work // job_cost(limits.max_n, limits.max_steps, width, height)  # heavies at once
    capacity = served.cfg.replicas * served.cfg.max_ongoing_requests + served.cfg.max_queued_requests
    burst = capacity - 3
    assert 1 <= fit <= burst - 4  # what this test assumes of configs/serve_test.yaml
    assert admission.max_queued_work - fit * job_cost(limits.max_n, limits.max_steps, width, height) >= 2 * 256

    # One heavy request alone first: admitted (the budget is about queued work), and it measures the rate.
    alone = requests.post(f"{served.url}/v1/generate", json=heavy, headers=served.headers, timeout=300)
    assert alone.status_code == 200, alone.text

    async def storm():
        async with httpx.AsyncClient(timeout=300, headers=served.headers) as client:
            heavies = [client.post(f"{served.url}/v1/generate", json=heavy) for _ in range(burst)]
            cheaps = [client.post(f"{served.url}/v1/generate", json=cheap) for _ in range(2)]
            return await asyncio.gather(*heavies), await asyncio.gather(*cheaps)

    heavies, cheaps = asyncio.run(storm())
    statuses = [a.status_code for a in heavies]
    assert set(statuses) <= {200, 503}, [a.text for a in heavies if a.status_code not in (200, 503)]
    assert statuses.count(200) >= fit, statuses  # as many as fit the budget at once
    # The rest do not, though the count bound would take them all (one may finish during the burst).
    assert statuses.count(503) >= burst - fit - 1, statuses
    for answer in heavies:
        if answer.status_code == 503:
            assert answer.headers["content-type"] == "application/json"
            assert answer.json()["error"]["code"] == "queue_full"
            assert "pixel-steps" in answer.json()["error"]["message"]
            assert 1 <= int(answer.headers["retry-after"]) <= admission.max_retry_after_s
            # Refused by Serve's proxy itself (serve/edge.py, admission.edge), never reaching the ingress.
            assert answer.headers["x-omnidiff-admission"] == "edge"
    assert [a.status_code for a in cheaps] == [200, 200], [a.text for a in cheaps]


def test_the_ingress_prices_the_models_own_size_at_the_largest_until_it_has_seen_it():
    from serve.app import HandleBackend

    backend = HandleBackend(None, budget=WorkBudget(max_work=10**6), sizes=("16x16", "64x32", "32x32"))
    job = {"n": 2, "steps": 10, "width": None, "height": None}
    assert backend.cost(job) == job_cost(2, 10, 64, 32)  # not known yet: never under-priced
    assert backend.cost({**job, "width": 16, "height": 16}) == 2 * 10 * 256
    backend.native_size = (16, 16)  # what a finished request of the model's own size showed
    assert backend.cost(job) == 2 * 10 * 256


def test_the_gate_refuses_before_the_body_only_when_nothing_could_be_admitted():
    from serve.app import HandleBackend

    budget = WorkBudget(max_work=1000, max_requests=2, clock=Clock())
    backend = HandleBackend(None, budget=budget, sizes=("16x16", "32x32"))
    with backend.gate() as first, backend.gate() as second:
        assert first is None and second is None and backend.requests == 2
        with backend.gate() as third:  # two requests inside (one may still be reading its body): full
            assert "2 requests in flight, capacity 2" in str(third) and third.retry_after_s >= 1
    assert backend.requests == 0
    ticket = budget.admit(1000 - 255)  # room left for 255 pixel-steps: not one 1-step 16x16 image
    with backend.gate() as refused:
        assert refused is not None and "budget 1000" in str(refused)
    budget.release(ticket)
    budget.admit(1000 - 256)  # room for exactly the cheapest request: the body decides
    with backend.gate() as refused:
        assert refused is None


def test_the_api_answers_a_full_gate_503_before_reading_the_body_and_401_before_503():
    """The ingress's FastAPI app with a backend (the app's seam, serve.http_api.GenerationBackend)
    whose budget is spent: generation requests get the JSON 503 and Retry-After without their body
    being read or validated; a caller without the token still gets 401; other routes are untouched."""
    from fastapi.testclient import TestClient

    from omnidiff.config import to_dict
    from serve import auth
    from serve.app import HandleBackend
    from serve.config import LimitsConfig
    from serve.http_api import ApiSettings, build_fastapi

    budget = WorkBudget(max_work=1000, max_requests=8, fallback_retry_after_s=3, clock=Clock())
    budget.admit(1000)
    backend = HandleBackend(None, budget=budget, sizes=("16x16",))
    settings = ApiSettings(limits=to_dict(LimitsConfig()), token_digest=auth.token_digest("s3cret"), retry_after_s=3,
                           route_prefix="/")
    client = TestClient(build_fastapi(settings, backend))
    token = {"Authorization": "Bearer s3cret"}
    for path in ("/v1/generate", "/v1/images/generations"):
        answer = client.post(path, content=b"not even json", headers=token)  # never parsed
        assert answer.status_code == 503 and answer.headers["retry-after"] == "3"  # nothing finished yet
        assert answer.json()["error"]["code"] == "queue_full" and "budget 1000" in answer.json()["error"]["message"]
        assert client.post(path, json={"prompt": "x"}).status_code == 401
    assert client.get("/healthz").status_code == 200
    assert backend.requests == 0
