"""Federated deltas: partitions, the aggregation maths, the wire codec, refused updates, and the
Flower apps in simulation and as real processes on loopback."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.cli import main as cli
from deltatune.core.slot import slot_sites
from deltatune.errors import ConfigError, FederatedError
from deltatune.federated.aggregate import aggregate, check_weights
from deltatune.federated.split import group_skew, label_skew
from deltatune.federated.wire import Codec, decode_update, delta_values, encode_update, load_values, payload_bytes
from deltatune.federated.work import FederateJob, Workspace
from deltatune.train.job import TrainJob

pytest.importorskip("flwr")

ROOT = Path(__file__).resolve().parents[1]


# -- partitions -----------------------------------------------------------------------------------
def test_label_skew_deals_every_row_once_and_skews_by_alpha():
    train = ["pos"] * 300 + ["neg"] * 300
    test = ["pos"] * 60 + ["neg"] * 60
    skewed = label_skew(train, test, 5, 0.1, seed=0)
    assert sorted(i for p in skewed for i in p.train) == list(range(600))
    assert sorted(i for p in skewed for i in p.test) == list(range(120))

    def largest_share(parts):  # per label: the largest fraction of its rows one client holds
        return [max(sum(train[i] == label for i in p.train) for p in parts) / train.count(label) for label in ("pos", "neg")]

    assert min(largest_share(skewed)) > 0.5  # alpha 0.1: each label sits mostly with one client
    assert max(largest_share(label_skew(train, test, 5, 1000.0, seed=0))) < 0.3  # alpha 1000: close to 1/5 each
    # a client's test rows follow its training shares (same Dirichlet draw per label)
    for part in skewed:
        if len(part.test) >= 10:
            share_train = sum(train[i] == "pos" for i in part.train) / len(part.train)
            share_test = sum(test[i] == "pos" for i in part.test) / len(part.test)
            assert abs(share_train - share_test) < 0.1
    assert label_skew(train, test, 5, 0.1, seed=0) == skewed and label_skew(train, test, 5, 0.1, seed=1) != skewed


def test_group_skew_keeps_groups_whole():
    train = ["food"] * 4 + ["sports"] * 3 + ["money"] * 5 + ["ai"] * 2
    test = ["food", "sports", "money", "ai"]
    parts = group_skew(train, test, 2, seed=0)
    for part in parts:
        groups = {train[i] for i in part.train}
        assert {test[i] for i in part.test} == groups  # the client's test rows are its own topics
        assert all(sum(train[j] == g for j in part.train) == train.count(g) for g in groups)  # whole groups
    assert sorted(i for p in parts for i in p.train) == list(range(len(train)))


def test_chatterbot_clients_get_whole_categories():
    from deltatune.data.datasets import load_dataset
    from deltatune.federated.split import partition

    splits = load_dataset("chatterbot")
    parts = partition(splits, 10, seed=0)
    assert sorted(i for p in parts for i in p.train) == list(range(len(splits.train)))
    owners = {}
    for client, part in enumerate(parts):
        for i in part.train:
            owners.setdefault(splits.train[i].group, set()).add(client)
    assert len(owners) == 21 and all(len(clients) == 1 for clients in owners.values())  # 21 categories, none split


# -- aggregation maths ----------------------------------------------------------------------------
def _linear_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    dt.attach(model, dt.LoRAConfig(r=2, alpha=4.0, targets=["0", "2"]), "fed")
    return model


def _update_of(values, path, scaling):
    return scaling * values[f"{path}.lora_B"].double() @ values[f"{path}.lora_A"].double()


def test_lora_aggregate_is_the_weighted_sum_of_updates_hand_computed():
    model = _linear_model()
    scaling = 2.0  # alpha / r
    # two clients whose updates are rank one each: their weighted sum has rank two, which a rank-2 LoRA holds exactly
    b1, a1 = torch.tensor([[1.0, 0], [2, 0], [0, 0], [1, 0], [0, 0]]), torch.zeros(2, 6)
    a1[0] = torch.tensor([1.0, 0, 0, 2, 0, 0])
    b2, a2 = torch.tensor([[0.0, 0], [0, 1], [3, 0], [0, 0], [1, 0]]), torch.zeros(2, 6)
    a2[0] = torch.tensor([0.0, 1, 0, 0, 0, -1])
    clients = []
    for b, a in ((b1, a1), (b2, a2)):
        values = delta_values(model, "fed")
        values["0.lora_B"], values["0.lora_A"] = b, a
        clients.append(values)
    report = aggregate(model, "fed", clients, counts=[10, 30])
    expected = 0.25 * scaling * (b1 @ a1) + 0.75 * scaling * (b2 @ a2)  # by hand: weights n_i / sum n
    got = _update_of(delta_values(model, "fed"), "0", scaling)
    torch.testing.assert_close(got, expected.double(), rtol=0, atol=1e-6)
    first = next(m for m in report if m.path == "0")
    assert first.rule == "sum of updates, re-factored" and first.error < 1e-6
    # averaging A and B separately (plain FedAvg on the parameters) is far from the average update
    naive = scaling * (0.25 * b1 + 0.75 * b2) @ (0.25 * a1 + 0.75 * a2)
    assert first.naive_error == pytest.approx(float((naive - expected).norm() / expected.norm()), rel=1e-5)
    assert first.naive_error > 0.5


def test_lora_aggregate_keeps_the_best_rank_r_part_and_reports_the_rest():
    model = _linear_model()
    torch.manual_seed(1)
    clients = [{key: torch.randn_like(value) for key, value in delta_values(model, "fed").items()} for _ in range(3)]
    report = aggregate(model, "fed", clients, counts=[1, 2, 3])
    for path in ("0", "2"):
        exact = sum(w * _update_of(c, path, 2.0) for w, c in zip((1 / 6, 2 / 6, 3 / 6), clients))
        singular = torch.linalg.svdvals(exact)
        tail = math.sqrt(float(singular[2:].square().sum() / singular.square().sum()))  # Eckart-Young
        module = next(m for m in report if m.path == path)
        assert module.error == pytest.approx(tail, rel=1e-5) and module.rank == 2
        got = _update_of(delta_values(model, "fed"), path, 2.0)
        assert float((got - exact).norm() / exact.norm()) == pytest.approx(tail, rel=1e-5)


def test_other_units_get_the_weighted_parameter_mean():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4))
    dt.attach(model, dt.IA3Config(targets=["0"], feedforward=[]), "fed")
    one, two = delta_values(model, "fed"), delta_values(model, "fed")
    key = next(iter(one))
    one[key], two[key] = torch.full_like(one[key], 2.0), torch.full_like(two[key], 6.0)
    report = aggregate(model, "fed", [one, two], counts=[3, 1])
    assert delta_values(model, "fed")[key].tolist() == [3.0] * 4  # (3 * 2 + 1 * 6) / 4
    assert [m.rule for m in report] == ["parameter mean"]


def test_bad_counts_are_refused():
    with pytest.raises(ConfigError, match="no client updates"):
        check_weights([])
    with pytest.raises(ConfigError, match="positive"):
        check_weights([3, 0])


# -- the wire ------------------------------------------------------------------------------------
def test_codec_round_trip_and_bytes():
    torch.manual_seed(0)
    reference = {"a.lora_A": torch.randn(8, 64), "a.lora_B": torch.randn(64, 8), "head.bias": torch.randn(3)}
    values = {key: value + 0.01 * torch.randn_like(value) for key, value in reference.items()}
    plain = encode_update(values, reference, Codec.parse("none"))
    back = decode_update(plain, reference, Codec())
    assert all(torch.equal(back[k], values[k]) for k in values)  # no codec: bit for bit
    for text, smaller in (("int8", 3.5), ("topk:0.1+int8", 10.0), ("ternary", 10.0)):
        codec = Codec.parse(text)
        parts = encode_update(values, reference, codec)
        assert payload_bytes(plain) / payload_bytes(parts) > smaller, text
        back = decode_update(parts, reference, codec)
        torch.testing.assert_close(back["head.bias"], values["head.bias"], rtol=0, atol=1e-7)  # vectors go as they are
        if text == "int8":  # each element within half a quantisation step of the difference
            for key in ("a.lora_A", "a.lora_B"):
                step = float((values[key] - reference[key]).abs().max()) / 127
                assert float((back[key] - values[key]).abs().max()) <= step / 2 + 1e-6
    with pytest.raises(ConfigError, match="unknown codec part"):
        Codec.parse("zip")


def test_corrupt_or_wrong_updates_are_refused_by_name():
    reference = {"w": torch.zeros(4, 4), "b": torch.zeros(4)}
    with pytest.raises(FederatedError, match="missing"):
        decode_update({"w": torch.zeros(4, 4)}, reference, Codec())
    with pytest.raises(FederatedError, match="shape"):
        decode_update({"w": torch.zeros(4, 3), "b": torch.zeros(4)}, reference, Codec())
    with pytest.raises(FederatedError, match="NaN"):
        decode_update({"w": torch.full((4, 4), float("nan")), "b": torch.zeros(4)}, reference, Codec())
    parts = encode_update({"w": torch.ones(4, 4), "b": torch.ones(4)}, reference, Codec.parse("int8"))
    parts["w#values"] = parts["w#values"][:5]  # truncated
    with pytest.raises(FederatedError, match="corrupt"):
        decode_update(parts, reference, Codec.parse("int8"))


# -- the server's checks, on a real (tiny) workspace ---------------------------------------------------
def _fed(tiny_bert, reviews_csv, out, **changes) -> FederateJob:
    job = TrainJob(model=str(tiny_bert), data=str(reviews_csv), text_column="review", label_column="sentiment",
                   method="lora", steps=3, batch_size=8, lr=1e-2, max_length=16, out=str(out), progress=False)
    return FederateJob(job=job, **{"clients": 3, "rounds": 2, "personal_steps": 2, **changes})


def test_refused_updates_are_logged_and_the_round_goes_on(tiny_bert, reviews_csv, tmp_path, caplog):
    work = Workspace(_fed(tiny_bert, reviews_csv, tmp_path))
    start = work.initial
    good, count, _ = work.local_train(0, start, 1, 3)
    nan = {key: value.clone() for key, value in good.items()}
    next(iter(nan.values()))[0] = float("nan")
    missing = dict(list(good.items())[1:])
    replies = [("a", good, work.fingerprint, count), ("b", good, "0" * 64, count), ("c", nan, work.fingerprint, count),
               ("d", missing, work.fingerprint, count), ("e", good, work.fingerprint, -1)]
    with caplog.at_level(logging.WARNING, logger="deltatune.federated"):
        values, record = work.aggregate(1, replies, start)
    assert record["accepted"] == 1
    reasons = {r["client"]: r["reason"] for r in record["rejected"]}
    assert "another base" in reasons["b"] and "NaN" in reasons["c"] and "missing" in reasons["d"]
    assert "example count" in reasons["e"]
    assert sum("refused" in r.message for r in caplog.records) == 4
    # the one accepted update is the new global delta: the same updates (re-factored at their own rank), the same head
    def updates(of):
        load_values(work.model, work.name, of)
        factors = {path: slot[work.name].low_rank_update() for path, _, slot in slot_sites(work.model) if work.name in slot}
        return {path: None if f is None else f[0] @ f[1] for path, f in factors.items()}  # a new tensor: no view

    wanted, got = updates(good), updates(values)
    assert sum(update is not None for update in wanted.values()) == 4  # query and value of two blocks
    for path, update in wanted.items():
        if update is None:
            assert got[path] is None
        else:
            torch.testing.assert_close(got[path], update, rtol=0, atol=1e-5)
    head = [key for key in good if "lora" not in key]
    assert head and all(torch.equal(values[key], good[key]) for key in head)
    # with nothing accepted the global delta stays
    same, record = work.aggregate(2, [("b", good, "0" * 64, count)], start)
    assert record["accepted"] == 0 and all(torch.equal(same[k], start[k]) for k in start)


def test_federate_job_checks_its_options(tiny_bert, reviews_csv, tmp_path):
    with pytest.raises(ConfigError, match="clients"):
        _fed(tiny_bert, reviews_csv, tmp_path, clients=0)
    with pytest.raises(ConfigError, match="alpha"):
        _fed(tiny_bert, reviews_csv, tmp_path, alpha=0)
    with pytest.raises(ConfigError, match="codec"):
        _fed(tiny_bert, reviews_csv, tmp_path, codec="gzip")
    fed = _fed(tiny_bert, reviews_csv, tmp_path, codec="int8")
    assert FederateJob.from_json(fed.to_json()) == fed


# -- Flower: simulation, and real processes ------------------------------------------------------------
def _by_hand(fed: FederateJob) -> dict[str, torch.Tensor]:
    """The same federation without Flower: every client's local steps, then the aggregation."""
    work = Workspace(fed)
    current = work.initial
    for server_round in range(1, fed.rounds + 1):
        replies = []
        for client in range(fed.clients):
            parts, count, _ = work.local_train(client, current, server_round, fed.job.steps)
            replies.append((client, parts, work.fingerprint, count))
        current, _ = work.aggregate(server_round, replies, current)
    return current


def test_simulation_of_three_clients_for_two_rounds(tiny_bert, reviews_csv, tmp_path):
    from deltatune.federated.flower import simulate

    fed = _fed(tiny_bert, reviews_csv, tmp_path / "run", codec="int8")
    result = simulate(fed)
    assert [r["accepted"] for r in result["rounds"]] == [3, 3] and not any(r["rejected"] for r in result["rounds"])
    assert [row["client"] for row in result["personal"]] == [0, 1, 2]
    assert all(0 < up < result["full_model_bytes_per_round"] / 2 for up in result["bytes_up_per_round"])
    saved = json.loads((tmp_path / "run" / "federated.json").read_text())
    assert saved["final_test"] == result["final_test"]
    # the global delta Flower carried equals the same federation run by hand in this process
    model = Workspace(fed).model
    dt.delete(model, "lora")
    dt.load(model, tmp_path / "run" / "global")
    reference = _by_hand(fed)
    got = delta_values(model, "lora")
    for key, value in reference.items():
        torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-5)
    for client in range(3):  # every personal delta is a delta folder that loads on the base
        assert (tmp_path / "run" / "personal" / f"client-{client}" / "delta.safetensors").is_file()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_real_flower_processes_on_loopback(tiny_bert, reviews_csv, tmp_path):
    """A SuperLink, two SuperNodes (one per client) and `flwr run` on the app `federate --write-app` writes."""
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "flower-superlink").exists():
        pytest.skip("flwr's console scripts are not next to this Python")
    out = tmp_path / "run"
    fed = _fed(tiny_bert, reviews_csv, out, clients=2, rounds=2)
    app = tmp_path / "app"
    code = cli(["federate", "--write-app", str(app), "--model", str(tiny_bert), "--data", str(reviews_csv),
                        "--text-column", "review", "--label-column", "sentiment", "--clients", "2", "--rounds", "2",
                        "--steps", "3", "--batch-size", "8", "--lr", "1e-2", "--max-length", "16", "--personal-steps",
                        "2", "--out", str(out), "--no-progress"])
    assert code == 0
    written = FederateJob.from_json(tomllib.loads((app / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]["job"])
    assert written == fed
    home, link = tmp_path / "flwr-home", _free_port()
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{link}"\n'
                                      f'insecure = true\n')
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in ("superlink", "node0", "node1", "run")}
    processes = [subprocess.Popen([str(bin_dir / "flower-superlink"), "--insecure", "--port", str(link),
                                   "--disable-runtime-dependency-installation"], env=env, stdout=logs["superlink"],
                                  stderr=subprocess.STDOUT)]
    try:
        time.sleep(3)
        for k in range(2):
            processes.append(subprocess.Popen(
                [str(bin_dir / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link}", "--port",
                 str(_free_port()), "--node-config", f"partition-id={k} num-partitions=2"],
                env=env, stdout=logs[f"node{k}"], stderr=subprocess.STDOUT))
        time.sleep(3)
        run = subprocess.run([str(bin_dir / "flwr"), "run", str(app), "--stream"], env=env, stdout=logs["run"],
                             stderr=subprocess.STDOUT, timeout=900)
        assert run.returncode == 0, (tmp_path / "run.log").read_text()[-3000:]
        deadline = time.time() + 120
        while not (out / "federated.json").is_file() and time.time() < deadline:
            time.sleep(1)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
        for handle in logs.values():
            handle.close()
    result = json.loads((out / "federated.json").read_text())
    assert [r["accepted"] for r in result["rounds"]] == [2, 2]
    assert [row["client"] for row in result["personal"]] == [0, 1]
    assert (out / "global" / "delta.safetensors").is_file()
    shutil.rmtree(home, ignore_errors=True)


def test_cli_refuses_bad_options(tmp_path, capsys):
    assert cli(["federate", "--clients", "0", "--out", str(tmp_path)]) == 2
    assert "clients must be a positive integer" in capsys.readouterr().err
    assert cli(["federate", "--codec", "zip", "--out", str(tmp_path)]) == 2
    assert "unknown codec part" in capsys.readouterr().err
