"""``deltatune serve`` over real HTTP: a uvicorn server on loopback, talked to with httpx.

Reference: the offline API on a separately loaded base (``dt.load`` + ``dt.using``, each
input run alone without padding). Completions: test_serve_completions.py; load: test_serve_load.py.
"""

from __future__ import annotations

import asyncio
import shutil
import time

import httpx
import pytest
import torch
from serve_helpers import (
    REFERENCE_MODELS,
    assert_error,
    post_concurrently,
    reference_probabilities,
    save_random_deltas,
)

import deltatune as dt
from deltatune.serve import DeltaLibrary, Settings, create_app, engine_from_options, load_base
from deltatune.serve.background import running

TOKEN = "s3cret"
TEXTS = ["good movie", "the plot was very dull", "what a great film", "bad"]
CLASSIFY_DELTAS = {"sentiment": dt.LoRAConfig(r=4, modules_to_save=["classifier"]),
                   "spam": dt.IA3Config(modules_to_save=["classifier"]),
                   "topic": dt.AdapterConfig(bottleneck=8, modules_to_save=["classifier"])}


@pytest.fixture(scope="module")
def classify_setup(tiny_bert, tmp_path_factory):
    """A classifier server with three deltas, one on another base, and a link out of the folder."""
    deltas = tmp_path_factory.mktemp("deltas")
    model, _, _ = load_base(str(tiny_bert), DeltaLibrary(deltas))
    save_random_deltas(model, deltas, CLASSIFY_DELTAS)
    with torch.no_grad():  # another base: same architecture, other weights
        model.bert.encoder.layer[0].attention.self.query.weight.add_(0.5)
    save_random_deltas(model, deltas, {"otherbase": dt.LoRAConfig(r=4, modules_to_save=["classifier"])})
    outside = tmp_path_factory.mktemp("outside")
    shutil.copytree(deltas / "sentiment", outside / "sentiment")
    (deltas / "escape").symlink_to(outside / "sentiment")
    engine = engine_from_options(str(tiny_bert), deltas, max_deltas=8)
    settings = Settings(admin_token=TOKEN, max_inputs=8, max_wait_ms=10)
    app = create_app(engine, settings)
    with running(app) as url:
        yield {"url": url, "app": app, "engine": engine, "deltas": deltas, "folder": tiny_bert}


@pytest.fixture
def client(classify_setup):
    with httpx.Client(base_url=classify_setup["url"], timeout=30) as http:
        yield http


def assert_matches_reference(setup, delta, texts, results) -> None:
    assert len(results) == len(texts)
    for text, result in zip(texts, results):
        expected = reference_probabilities(setup["folder"], setup["deltas"], delta, text)
        got = list(result["probabilities"].values())
        assert got == pytest.approx(expected, abs=1e-5)
        assert result["label_id"] == max(range(len(expected)), key=expected.__getitem__)


# --- classification -------------------------------------------------------------------------


def test_classify_equals_the_offline_api_for_each_delta_and_the_base(classify_setup):
    names = [None, *CLASSIFY_DELTAS]
    payloads = [{"delta": name, "inputs": TEXTS[i % 2:]} for i, name in enumerate(names)]
    responses = post_concurrently(classify_setup["url"], "/v1/classify", payloads)
    for payload, response in zip(payloads, responses):
        assert response.status_code == 200, response.text
        assert response.json()["delta"] == payload["delta"]
        assert_matches_reference(classify_setup, payload["delta"], payload["inputs"], response.json()["results"])


def test_label_names_come_from_the_delta_folder(client):
    body = client.post("/v1/classify", json={"delta": "sentiment", "inputs": "good"}).json()
    assert list(body["results"][0]["probabilities"]) == ["negative", "positive"]
    assert body["results"][0]["label"] in ("negative", "positive")


def test_concurrent_requests_for_different_deltas_share_one_mixed_batch(classify_setup, monkeypatch):
    engine, metrics = classify_setup["engine"], classify_setup["app"].state.metrics
    original, sizes = engine.classify, []

    def slow_classify(works):
        sizes.append(sorted(str(w.delta) for w in works))
        time.sleep(0.3)  # keeps the worker busy while the others queue up
        return original(works)

    monkeypatch.setattr(engine, "classify", slow_classify)
    before = metrics.value("deltatune_serve_batch_requests_count")

    async def main():
        async with httpx.AsyncClient(base_url=classify_setup["url"], timeout=30) as http:
            first = asyncio.create_task(http.post("/v1/classify", json={"delta": "sentiment", "inputs": ["good"]}))
            await asyncio.sleep(0.1)
            rest = [http.post("/v1/classify", json={"delta": d, "inputs": [TEXTS[i]]})
                    for i, d in enumerate(["spam", "topic", None])]
            return await asyncio.gather(first, *rest)

    responses = asyncio.run(main())
    assert [r.status_code for r in responses] == [200] * 4
    assert sizes == [["sentiment"], ["None", "spam", "topic"]]  # the three waiting requests ran as one batch
    assert metrics.value("deltatune_serve_batch_requests_count") - before == 2
    for delta, text, response in zip(["spam", "topic", None], TEXTS, responses[1:]):
        assert_matches_reference(classify_setup, delta, [text], response.json()["results"])


def test_list_deltas_shows_loaded_and_available_with_method_size_fingerprint_metrics(classify_setup, client):
    client.post("/v1/classify", json={"delta": "spam", "inputs": ["good"]}).raise_for_status()
    body = client.get("/v1/deltas").json()
    assert {"sentiment", "spam", "topic", "otherbase"} <= set(body["available"])
    assert "spam" in body["loaded"]
    entries = {d["name"]: d for d in body["deltas"]}
    meta = dt.read_meta(classify_setup["deltas"] / "sentiment")
    assert entries["sentiment"]["method"] == "lora" and entries["spam"]["method"] == "ia3"
    assert entries["sentiment"]["fingerprint"] == meta["base"]["sha256"]
    assert entries["sentiment"]["size_bytes"] == (classify_setup["deltas"] / "sentiment" / "delta.safetensors").stat().st_size
    assert entries["sentiment"]["metrics"] == {"labels": ["negative", "positive"]}
    assert entries["spam"]["loaded"] is True
    assert body["base"]["task"] == "classification"


def test_healthz(client):
    assert client.get("/healthz").json()["status"] == "ok"


# --- admin --------------------------------------------------------------------------------------


def test_admin_endpoints_refuse_a_missing_or_wrong_token(client):
    assert_error(client.post("/v1/deltas/topic"), 401, "unauthorized")
    assert_error(client.post("/v1/deltas/topic", headers={"Authorization": "Bearer nope"}), 403, "forbidden")
    assert_error(client.delete("/v1/deltas/topic", headers={"Authorization": f"Basic {TOKEN}"}), 401, "unauthorized")


def test_admin_load_and_unload(client):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    loaded = client.post("/v1/deltas/topic", headers=auth)
    assert loaded.status_code == 200 and loaded.json()["loaded"] is True
    assert "topic" in client.get("/v1/deltas").json()["loaded"]
    assert client.delete("/v1/deltas/topic", headers=auth).json() == {"name": "topic", "loaded": False}
    assert "topic" not in client.get("/v1/deltas").json()["loaded"]
    assert_error(client.delete("/v1/deltas/topic", headers=auth), 404, "not_loaded")
    assert_error(client.post("/v1/deltas/missing", headers=auth), 404, "unknown_delta")
    assert_error(client.post("/v1/deltas/..%2Fetc", headers=auth), 404, "not_found")  # no route takes a slash
    assert_error(client.post("/v1/deltas/..etc", headers=auth), 422, "invalid_request")  # the schema's name pattern
    assert_error(client.post("/v1/deltas/otherbase", headers=auth), 409, "other_base")


def test_admin_load_of_a_loaded_delta_swaps_in_its_files_from_disk(classify_setup, client):
    deltas, config = classify_setup["deltas"], {"swapme": dt.LoRAConfig(r=4, modules_to_save=["classifier"])}
    model, _, _ = load_base(str(classify_setup["folder"]), DeltaLibrary(deltas))
    save_random_deltas(model, deltas, config, seed=11)
    first = client.post("/v1/classify", json={"delta": "swapme", "inputs": ["good"]}).json()["results"]
    assert_matches_reference(classify_setup, "swapme", ["good"], first)
    save_random_deltas(model, deltas, config, seed=12)  # new weights under the same name
    REFERENCE_MODELS.pop((str(classify_setup["folder"]), str(deltas), "swapme"))
    answer = client.post("/v1/deltas/swapme", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert answer["reloaded"] is True and answer["in_place"] is True
    second = client.post("/v1/classify", json={"delta": "swapme", "inputs": ["good"]}).json()["results"]
    assert second != first
    assert_matches_reference(classify_setup, "swapme", ["good"], second)



def test_admin_endpoints_are_absent_without_a_token(classify_setup):
    app = create_app(classify_setup["engine"], Settings(admin_token=None))
    with running(app) as url, httpx.Client(base_url=url) as http:
        assert_error(http.post("/v1/deltas/topic", headers={"Authorization": f"Bearer {TOKEN}"}), 404, "not_found")
        assert_error(http.delete("/v1/deltas/topic"), 404, "not_found")
        assert_error(http.put("/v1/deltas"), 405, "method_not_allowed")


# --- bad input ----------------------------------------------------------------------------------

BAD_CLASSIFY = [
    pytest.param({"delta": "sentiment", "inputs": []}, 400, "empty_input", id="empty-inputs"),
    pytest.param({"delta": "sentiment", "inputs": ["good"] * 9}, 413, "too_many_inputs", id="too-many-inputs"),
    pytest.param({"delta": "sentiment", "inputs": ["good " * 70]}, 413, "input_too_long", id="input-too-long"),
    pytest.param({"delta": "nosuch", "inputs": ["good"]}, 404, "unknown_delta", id="unknown-delta"),
    pytest.param({"delta": "../sentiment", "inputs": ["good"]}, 422, "invalid_request", id="dot-dot"),
    pytest.param({"delta": "/etc/passwd", "inputs": ["good"]}, 422, "invalid_request", id="absolute-path"),
    pytest.param({"delta": "a/b", "inputs": ["good"]}, 422, "invalid_request", id="slash"),
    pytest.param({"delta": "escape", "inputs": ["good"]}, 400, "invalid_delta_name", id="symlink-outside"),
    pytest.param({"delta": "otherbase", "inputs": ["good"]}, 409, "other_base", id="other-base"),
    pytest.param({"delta": "sentiment", "inputs": [1, 2]}, 422, "invalid_request", id="wrong-type"),
    pytest.param({"delta": "sentiment"}, 422, "invalid_request", id="missing-field"),
    pytest.param({"delta": "sentiment", "inputs": ["a"], "extra": 1}, 422, "invalid_request", id="unknown-field"),
    pytest.param({"delta": 5, "inputs": ["good"]}, 422, "invalid_request", id="delta-not-a-string"),
]


@pytest.mark.parametrize(("payload", "status", "kind"), BAD_CLASSIFY)
def test_bad_classify_requests_get_json_errors_and_the_server_keeps_serving(classify_setup, client, payload, status,
                                                                           kind):
    good = {"delta": "sentiment", "inputs": ["good movie"]}
    assert client.post("/v1/classify", json=good).status_code == 200
    error = assert_error(client.post("/v1/classify", json=payload), status, kind)
    after = client.post("/v1/classify", json=good)
    assert after.status_code == 200
    assert_matches_reference(classify_setup, "sentiment", good["inputs"], after.json()["results"])
    if kind == "too_many_inputs":
        assert error["limit"] == 8 and "8" in error["message"]
    if kind == "input_too_long":
        assert error["limit"] == 64 and "64" in error["message"]
    if kind == "invalid_request":
        assert any(f.startswith(("inputs", "delta", "extra")) for f in error["fields"])
    if kind == "other_base":
        recorded = dt.read_meta(classify_setup["deltas"] / "otherbase")["base"]["sha256"]
        assert error["fingerprint"] == recorded and recorded[:16] in error["message"]


def test_malformed_json_is_422(client):
    response = client.post("/v1/classify", content=b'{"delta": "sentiment", "inputs": [',
                           headers={"Content-Type": "application/json"})
    assert "JSON" in assert_error(response, 422, "invalid_json")["message"]


def test_wrong_type_names_the_field(client):
    error = assert_error(client.post("/v1/classify", json={"delta": "spam", "inputs": ["ok", 3]}), 422, "invalid_request")
    assert error["fields"] == ["inputs.1"] and "inputs.1" in error["message"]


def test_unknown_route_and_wrong_task_are_json_errors(client):
    assert_error(client.get("/v2/nothing"), 404, "not_found")
    assert_error(client.post("/v1/completions", json={"model": "base", "prompt": "hi"}), 400, "wrong_task")


# --- metrics ------------------------------------------------------------------------------------


def test_metrics_expose_requests_latency_batches_loaded_deltas_and_errors(classify_setup, client):
    client.post("/v1/classify", json={"delta": "sentiment", "inputs": ["good", "bad"]}).raise_for_status()
    client.post("/v1/classify", json={"delta": "nosuch", "inputs": ["good"]})
    text = client.get("/metrics").text
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    assert samples['deltatune_serve_requests_total{endpoint="/v1/classify",status="200"}'] >= 1
    assert samples['deltatune_serve_requests_total{endpoint="/v1/classify",status="404"}'] >= 1
    assert samples['deltatune_serve_errors_total{type="unknown_delta"}'] >= 1
    count = samples['deltatune_serve_request_seconds_count{endpoint="/v1/classify"}']
    assert samples['deltatune_serve_request_seconds_bucket{endpoint="/v1/classify",le="+Inf"}'] == count
    assert samples["deltatune_serve_batch_rows_count"] >= 1 and samples["deltatune_serve_rows_total"] >= 2
    assert samples["deltatune_serve_loaded_deltas"] == len(classify_setup["engine"].loaded())
    assert samples['deltatune_serve_delta_requests_total{delta="sentiment"}'] >= 1
    assert "# TYPE deltatune_serve_request_seconds histogram" in text


# --- back-pressure and timeouts -----------------------------------------------------------------


def _slow_server(classify_setup, seconds: float, **settings):
    engine = engine_from_options(str(classify_setup["folder"]), classify_setup["deltas"])
    original = engine.classify

    def slow(works):
        time.sleep(seconds)
        return original(works)

    engine.classify = slow
    return create_app(engine, Settings(**settings))


def test_a_full_queue_answers_503_with_retry_after(classify_setup):
    app = _slow_server(classify_setup, 0.4, queue_size=1, max_batch=1, max_wait_ms=1)
    with running(app) as url:
        responses = post_concurrently(url, "/v1/classify", [{"delta": "spam", "inputs": [t]} for t in TEXTS * 2])
        statuses = sorted(r.status_code for r in responses)
        assert 503 in statuses and 200 in statuses, statuses
        refused = next(r for r in responses if r.status_code == 503)
        assert_error(refused, 503, "queue_full")
        assert int(refused.headers["Retry-After"]) >= 1
        for payload_text, response in zip(TEXTS * 2, responses):
            if response.status_code == 200:
                assert_matches_reference(classify_setup, "spam", [payload_text], response.json()["results"])


def test_a_slow_answer_times_out_with_504_and_the_server_recovers(classify_setup):
    app = _slow_server(classify_setup, 0.6, timeout_s=0.2)
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        assert_error(http.post("/v1/classify", json={"delta": None, "inputs": ["good"]}), 504, "timeout")
        del app.state.engine.classify  # back to the real model
        time.sleep(0.6)
        assert http.post("/v1/classify", json={"delta": None, "inputs": ["good"]}).status_code == 200


def test_engine_refuses_to_load_a_deltas_folder_that_does_not_exist(tmp_path, tiny_bert):
    with pytest.raises(dt.DeltaFileError, match="does not exist"):
        engine_from_options(str(tiny_bert), tmp_path / "nowhere")


def test_cli_serve_takes_the_admin_token_from_the_environment(classify_setup, monkeypatch):
    import uvicorn

    from deltatune.cli import main

    started = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: started.update(app=app, **options))
    monkeypatch.setenv("DELTATUNE_ADMIN_TOKEN", "from-env")
    argv = ["serve", "--model", str(classify_setup["folder"]), "--deltas", str(classify_setup["deltas"]), "--port", "9"]
    assert main([*argv, "--max-batch", "4"]) == 0
    settings = started["app"].state.settings
    assert started["port"] == 9 and settings.admin_token == "from-env" and settings.max_batch == 4
    with pytest.raises(SystemExit):
        main([*argv, "--max-batch", "0"])
