"""Operations: Prometheus metrics of a real worker process scraped over real HTTP, and its
structured (JSON) logs."""

import json
import re
import time
import urllib.request

import numpy as np
import pytest

from streamrnn import Client
from streamrnn.cli.process import WorkerProcess
from tests.helpers.modelzoo import ModelSpec, build_model


def scrape(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    path = tmp_path_factory.mktemp("metrics") / "m.keras"
    build_model(ModelSpec("gru", features=4)).save(path)
    with WorkerProcess.start(path, 4, "--no-xla", "--metrics-port", "0",
                             "--log-format", "json") as process:
        yield process


def test_metrics_endpoint_counts_move_with_traffic(worker):
    url = re.search(r"metrics=(http://\S+/metrics)", worker.log()).group(1)
    before = scrape(url)
    assert before["streamrnn_slots"] == 4
    with Client(worker.endpoint) as client:
        for _ in range(3):
            client.push("m1", np.zeros((8, 4), np.float32))
        client.push("m2", np.zeros((5, 4), np.float32))
        with pytest.raises(Exception, match="shape"):
            client.push("m2", np.zeros((5, 3), np.float32))
    after = scrape(url)
    assert after["streamrnn_timesteps_total"] - before.get("streamrnn_timesteps_total", 0) == 29
    assert after["streamrnn_steps_total"] >= 4
    assert after["streamrnn_streams"] == 2 and after["streamrnn_slots_in_use"] == 2
    assert after['streamrnn_errors_total{code="BAD_SHAPE"}'] == 1
    assert after["streamrnn_chunk_latency_seconds_count"] == 4
    assert after['streamrnn_requests_total{type="push"}'] >= 5
    with Client(worker.endpoint) as client:
        client.close("m2")
    time.sleep(0.3)  # the gauges refresh after the batch that closed it
    closed = scrape(url)
    assert closed["streamrnn_streams"] == 1 and closed["streamrnn_slots_in_use"] == 1


def test_structured_logs_are_one_json_record_per_line(worker):
    records = [json.loads(line) for line in worker.log().splitlines()
               if line.startswith("{")]
    ready = [r for r in records if "worker ready on" in r["message"]]
    assert ready and ready[0]["level"] == "INFO" and ready[0]["logger"] == "streamrnn.worker"
    assert {"time", "level", "logger", "message"} <= ready[0].keys()


def test_router_metrics_show_workers_streams_and_requests(tmp_path, redis_url):
    from streamrnn.cli.process import RouterProcess
    from tests.helpers.cluster_helpers import fresh_store_url

    path = tmp_path / "m.keras"
    build_model(ModelSpec("gru", features=4)).save(path)
    store = fresh_store_url(redis_url)
    with RouterProcess.start("--metrics-port", "0", "--store", store) as router:
        url = re.search(r"metrics=(http://\S+/metrics)", router.log()).group(1)
        assert scrape(url)["streamrnn_router_workers_alive"] == 0
        with WorkerProcess.start(path, 2, "--no-xla", "--store", store, "--name", "w1"):
            with Client(router.endpoint, timeout=60) as client:
                for _ in range(20):  # wait for the router to see the worker's lease
                    if scrape(url)["streamrnn_router_workers_alive"] == 1:
                        break
                    time.sleep(0.2)
                client.push("r1", np.zeros((3, 4), np.float32))
                client.push("r1", np.zeros((2, 4), np.float32))
            after = scrape(url)
    assert after["streamrnn_router_workers_alive"] == 1
    assert after["streamrnn_router_streams"] == 1
    assert after['streamrnn_router_requests_total{type="push"}'] == 2
    assert after['streamrnn_router_events_total{event="forwarded"}'] >= 2
