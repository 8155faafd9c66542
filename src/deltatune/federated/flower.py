"""The federation as a Flower app: a ``ClientApp`` and a ``ServerApp`` over Flower's Message API.

The same two apps run in Flower's simulation (:func:`simulate`: virtual clients on Ray
workers in this machine) and as real processes (a SuperLink, SuperNodes and ``flwr run``;
see :mod:`deltatune.federated.app` and docs/FEDERATED.md). Every message carries the job as
JSON, so a client needs nothing but its ``partition-id``.

- train messages: the global delta (an ``ArrayRecord``) and the job; the client replies with
  its update (encoded by the job's codec), its example count and its base's fingerprint;
- :class:`DeltaFedAvg` (Flower's FedAvg with deltatune's aggregation) checks each reply and
  aggregates the accepted ones; the server evaluates the global delta on the whole test split
  after every round;
- after the last round, evaluate messages ask each client for its personal delta (the global
  one plus ``personal_steps`` local steps) and how both do on its own test rows.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from .work import FederateJob, Workspace, workspace

JOB_KEY = "job"
PERSONAL_DIR = "personal"


def _imports():
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

    return ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict


def _to_arrays(values: dict[str, torch.Tensor]):
    ArrayRecord = _imports()[0]
    return ArrayRecord(torch_state_dict={key: value.contiguous() for key, value in values.items()})


def _from_arrays(record) -> dict[str, torch.Tensor]:
    return dict(record.to_torch_state_dict())


def _client_of(context) -> int:
    try:
        return int(context.node_config["partition-id"])
    except (KeyError, TypeError, ValueError):
        from ..errors import FederatedError

        raise FederatedError("this SuperNode has no partition-id; start it with --node-config "
                             "'partition-id=<k> num-partitions=<clients>'") from None


def client_train(msg, context):
    """A train message -> this client's update."""
    _, ConfigRecord, _, Message, MetricRecord, RecordDict = _imports()
    config = msg.content["config"]
    work = workspace(str(config[JOB_KEY]))
    client = _client_of(context)
    parts, count, loss = work.local_train(client, _from_arrays(msg.content["arrays"]), int(config["server-round"]),
                                          work.job.steps)
    content = RecordDict({"arrays": _to_arrays(parts), "metrics": MetricRecord({"num-examples": count, "train-loss": loss}),
                          "config": ConfigRecord({"base": work.fingerprint, "client": client})})
    return Message(content, reply_to=msg)


def client_personalise(msg, context):
    """An evaluate message (after the last round) -> the client's personal delta and its scores."""
    _, _, _, Message, MetricRecord, RecordDict = _imports()
    config = msg.content["config"]
    work = workspace(str(config[JOB_KEY]))
    client = _client_of(context)
    out = Path(work.job.out) / PERSONAL_DIR / f"client-{client}"
    metrics = work.personalise(client, _from_arrays(msg.content["arrays"]), out)
    return Message(RecordDict({"metrics": MetricRecord({**metrics, "client": client})}), reply_to=msg)


def make_client_app():
    from flwr.clientapp import ClientApp

    app = ClientApp()
    app.train()(client_train)
    app.evaluate()(client_personalise)
    return app


def _strategy_class():
    from flwr.serverapp.strategy import FedAvg

    class DeltaFedAvg(FedAvg):
        """Flower's FedAvg, with each reply checked and the deltas aggregated by deltatune
        (:meth:`Workspace.aggregate`: LoRA as the re-factored sum of updates)."""

        def __init__(self, work: Workspace, record: Callable[[dict], None]):
            clients = work.fed.clients
            super().__init__(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=clients,
                             min_available_nodes=clients, min_evaluate_nodes=0)
            self.work, self.record = work, record
            self.current = work.initial

        def aggregate_train(self, server_round: int, replies: Iterable):
            replies = list(replies)
            gathered, failed = [], []
            for reply in replies:
                if reply.has_error():
                    failed.append({"client": str(reply.metadata.src_node_id), "reason": str(reply.error.reason)})
                    continue
                content = reply.content
                try:
                    parts = _from_arrays(content["arrays"])
                    base = str(content["config"]["base"])
                    count = content["metrics"]["num-examples"]
                except (KeyError, TypeError, ValueError) as error:
                    parts, base, count = {"corrupt": torch.zeros(0)}, f"unreadable reply ({error})", 0
                gathered.append((reply.metadata.src_node_id, parts, base, count))
            values, record = self.work.aggregate(server_round, gathered, self.current)
            record["rejected"] += failed
            self.current = values
            self.record(record)
            return _to_arrays(values), _imports()[4]({"accepted": record["accepted"]})

    return DeltaFedAvg


def run_server(grid, fed: FederateJob) -> dict[str, Any]:
    """The server's whole run on ``grid``: the rounds, then the personal deltas; writes
    ``<out>/global`` and ``<out>/federated.json`` and returns what it wrote there."""
    _, ConfigRecord, _, Message, _, RecordDict = _imports()
    from flwr.app import MessageType

    work = workspace(fed.to_json())
    rounds: list[dict] = []
    central: dict[int, dict] = {}

    def evaluate_fn(server_round: int, arrays):
        central[server_round] = work.evaluate_global(_from_arrays(arrays))
        return _imports()[4]({k: float(v) for k, v in central[server_round].items()})

    strategy = _strategy_class()(work, rounds.append)
    config = ConfigRecord({JOB_KEY: fed.to_json()})
    result = strategy.start(grid=grid, initial_arrays=_to_arrays(work.initial), num_rounds=fed.rounds,
                            train_config=config, evaluate_fn=evaluate_fn)
    final = _from_arrays(result.arrays)
    messages = [Message(RecordDict({"arrays": result.arrays, "config": ConfigRecord({JOB_KEY: fed.to_json()})}),
                        dst_node_id=node, message_type=MessageType.EVALUATE) for node in grid.get_node_ids()]
    personal = []
    for reply in grid.send_and_receive(messages):
        if reply.has_error():
            personal.append({"node": reply.metadata.src_node_id, "error": str(reply.error.reason)})
        else:
            personal.append(dict(reply.content["metrics"]))
    personal.sort(key=lambda row: row.get("client", 1 << 30))
    for row in rounds:
        row["test"] = central.get(row["round"])
    return write_results(work, fed, final, rounds, central.get(0), personal)


def write_results(work: Workspace, fed: FederateJob, final: dict[str, torch.Tensor], rounds: list[dict],
                  initial: dict | None, personal: list[dict]) -> dict[str, Any]:
    """``<out>/global`` (the global delta) and ``<out>/federated.json``."""
    from ..io.atomic import write_text_atomic

    out = Path(fed.job.out)
    test = rounds[-1]["test"] if rounds else None
    work.save_global(final, out / "global", {"test": test, "rounds": fed.rounds, "clients": fed.clients})
    delta_bytes = sum(t.numel() * t.element_size() for t in final.values())
    result = {
        "job": json.loads(fed.to_json()), "data": work.splits.describe(),
        "partitions": [{"client": i, "train": len(p.train), "test": len(p.test)} for i, p in enumerate(work.partitions)],
        "initial_test": initial, "rounds": rounds, "final_test": test, "personal": personal,
        "delta_bytes": delta_bytes, "full_model_bytes": work.base_bytes(),
        "bytes_up_per_round": [r["bytes_up"] for r in rounds], "bytes_down_per_round": [r["bytes_down"] for r in rounds],
        "full_model_bytes_per_round": 2 * work.base_bytes() * fed.clients,
    }
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "federated.json", json.dumps(result, indent=2) + "\n")
    return result


def make_server_app(fed: FederateJob | None = None, results: list | None = None):
    """The ServerApp: runs ``fed`` (or the job in the run config's ``job``, for ``flwr run``)."""
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid, context) -> None:
        job = fed if fed is not None else FederateJob.from_json(str(context.run_config[JOB_KEY]))
        outcome = run_server(grid, job)
        if results is not None:
            results.append(outcome)

    return app


def simulate(fed: FederateJob, *, cpus: int | None = None, cpus_per_client: int = 1) -> dict[str, Any]:
    """Run ``fed`` in Flower's simulation (``fed.clients`` virtual SuperNodes on Ray workers)."""
    from flwr.simulation import run_simulation

    results: list = []
    cpus = cpus or os.cpu_count() or 1
    run_simulation(make_server_app(fed, results), make_client_app(), num_supernodes=fed.clients,
                   backend_config={"client_resources": {"num_cpus": cpus_per_client},
                                   "init_args": {"num_cpus": cpus, "include_dashboard": False}})
    if not results:
        raise RuntimeError("the Flower simulation ended without a result; see the log above for the ServerApp's error")
    return results[0]
