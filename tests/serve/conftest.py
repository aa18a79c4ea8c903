"""Shared by the serve tests: one flywheel round of the tiny model on two errands (`work`, built once per
session) and the stand-in upstream answering from its logs."""

import json

import openai
import pytest
from typer.testing import CliRunner

from slmtune.cli import app
from slmtune.serve.asgi import serve_in_thread
from slmtune.serve.config import ServeConfig, load_router
from slmtune.serve.server import create_app
from slmtune.synthetic.logs import write_logs
from slmtune.synthetic.upstream import create_upstream_app

WEATHER, SENTIMENT = "tool_calling-get_weather", "classification-sentiment"


def cli(*args, code=0):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output + (result.stderr or "") + repr(result.exception)
    return result


@pytest.fixture(scope="session")
def work(tiny_model, tmp_path_factory):
    """One flywheel round on two errands (weather tool calls, sentiment labels): router.json + two exports."""
    root = tmp_path_factory.mktemp("serve")
    write_logs(root / "data", 56, seed=3, errands=[WEATHER, SENTIMENT])
    gate = root / "gate.yaml"
    gate.write_text("parse_rate: {min: 0.0}\n")  # 2 steps teach the tiny model little: export whatever it learns
    cli("flywheel", root / "data" / "logs", "-w", root / "work", "--gpu", "cpu", "--base-model", tiny_model,
        "--max-steps", 2, "--eval-limit", 2, "--min-size", 8, "--gate", gate, "--min-coverage", 0,
        "--set", "method=lora")  # adapters, so adapter-only exports can share one base (the plan's pick is full)
    router = load_router(root / "work" / "router.json")
    routes = {r["category"]: r for r in router["routes"]}
    logs = [json.loads(line) for line in (root / "data" / "logs" / "openai.jsonl").open()]
    return {"root": root, "work": root / "work", "logs": root / "data" / "logs", "model": tiny_model,
            "weather": routes["tool_calling"], "sentiment": routes["classification"],
            "weather_logs": [x for x in logs if x["request"].get("tools")],
            "sentiment_logs": [x for x in logs if not x["request"].get("tools")]}


@pytest.fixture(scope="session")
def upstream(work):
    app_ = create_upstream_app([work["logs"]])
    running = serve_in_thread(app_)
    yield {"url": running.url, "app": app_}
    running.stop()


@pytest.fixture(scope="session")
def server_pool(work):
    """`yield from server_pool(configs, prefix)` in a module fixture: servers on 127.0.0.1 started on demand by
    name, each with its config and its own served-log folder (`<prefix><name>`), all stopped when the module
    is done."""

    def pool(configs: dict, prefix: str):
        started: dict = {}

        def get(name: str) -> dict:
            if name not in started:
                log_dir = work["root"] / f"{prefix}{name}"
                config = ServeConfig(**{"router": work["work"] / "router.json", "log_dir": log_dir} | configs[name])
                running = serve_in_thread(create_app(config))
                started[name] = {"url": running.url, "running": running, "log_dir": log_dir,
                                 "client": openai.OpenAI(base_url=running.url + "/v1", api_key="test-key",
                                                         max_retries=0)}
            return started[name]

        try:
            yield get
        finally:
            for s in started.values():
                s["running"].stop()

    return pool
