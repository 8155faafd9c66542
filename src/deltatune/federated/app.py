"""The federation as a Flower App for real processes: ``flwr run`` loads ``server_app`` and
``client_app`` from here (see :func:`write_app` and docs/FEDERATED.md).

    deltatune federate --write-app fed-app --clients 2 ...   # the app folder, job inside
    flower-superlink --insecure
    flower-supernode --insecure --superlink 127.0.0.1:9091 --port 9101 --node-config "partition-id=0 num-partitions=2"
    flower-supernode --insecure --superlink 127.0.0.1:9091 --port 9102 --node-config "partition-id=1 num-partitions=2"
    flwr run fed-app --stream
"""

from __future__ import annotations

import json
from pathlib import Path

from ..io.atomic import write_text_atomic
from .flower import JOB_KEY, make_client_app, make_server_app
from .work import FederateJob

server_app = make_server_app()
client_app = make_client_app()

PYPROJECT = """\
# A Flower App that runs a deltatune federation (written by `deltatune federate --write-app`).
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "deltatune-federation"
version = "1.0.0"
description = "Federated delta tuning with deltatune"
license = "Apache-2.0"
# deltatune and flwr come from the environment the SuperLink and SuperNodes run in
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "deltatune"

[tool.flwr.app.components]
serverapp = "deltatune.federated.app:server_app"
clientapp = "deltatune.federated.app:client_app"

[tool.flwr.app.config]
{key} = {job}
"""


def write_app(folder: str | Path, fed: FederateJob) -> Path:
    """Write a Flower App folder whose run config holds ``fed``; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / "pyproject.toml", PYPROJECT.format(key=JOB_KEY, job=json.dumps(fed.to_json())))
    return folder
