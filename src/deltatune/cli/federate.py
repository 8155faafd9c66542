"""``deltatune federate``: a Flower federation of clients training one delta on non-IID shares."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from .train import add_job_flags, job_from_args

#: local steps per round when --steps is not given
LOCAL_STEPS = 20
DEFAULT_OUT = "runs/federated"


def _federate(args: argparse.Namespace) -> int:
    from ..federated.work import FederateJob

    job = job_from_args(args)
    job = dataclasses.replace(job, steps=job.steps or LOCAL_STEPS, out=args.out or DEFAULT_OUT)
    fed = FederateJob(job=job, clients=args.clients, rounds=args.rounds, alpha=args.dirichlet_alpha, codec=args.codec,
                      personal_steps=args.personal_steps)
    if args.write_app:
        from ..federated.app import write_app

        folder = write_app(args.write_app, fed)
        print(f"wrote the Flower App {folder}/ (the job is in its pyproject.toml); run it with a SuperLink and "
              f"{fed.clients} SuperNodes (partition-id=0..{fed.clients - 1}), then `flwr run {folder} --stream`; "
              f"see docs/FEDERATED.md")
        return 0
    from ..federated.run import federate

    result = federate(fed, centralised=args.centralised, cpus_per_client=args.cpus_per_client)
    print(json.dumps(result["summary"], indent=2))
    print(f"wrote {job.out}/ (global/, personal/client-*/, federated.json)")
    return 0


def add_parsers(commands) -> None:
    parser = commands.add_parser(
        "federate", help="train a delta federated on Flower: N clients on non-IID shares, deltas aggregated on a server, "
                         "a personal delta per client",
        description="The job flags say what each client trains (--steps: local steps per round, default "
                    f"{LOCAL_STEPS}); the Flower simulation runs the clients as virtual SuperNodes on this machine.")
    parser.add_argument("--clients", type=int, default=10, help="number of clients (default 10)")
    parser.add_argument("--rounds", type=int, default=5, help="federated rounds (default 5)")
    parser.add_argument("--dirichlet-alpha", type=float, default=0.5,
                        help="Dirichlet concentration of the label skew: small is skewed, large is close to IID (default 0.5)")
    parser.add_argument("--codec", default="none",
                        help="client updates on the wire: none, int8, ternary, topk:<fraction>, or topk:<fraction>+int8")
    parser.add_argument("--personal-steps", type=int, default=20,
                        help="local steps from the final global delta that make each client's personal delta (default 20)")
    parser.add_argument("--centralised", action="store_true",
                        help="also train the same delta on all clients' rows pooled, as many steps as the clients took "
                             "together, and compare")
    parser.add_argument("--cpus-per-client", type=int, default=1, help="CPU cores each simulated client gets (default 1)")
    parser.add_argument("--write-app", type=Path, default=None, metavar="DIR",
                        help="write a Flower App folder for real processes (flower-superlink, flower-supernode, "
                             "flwr run) instead of simulating")
    add_job_flags(parser)
    parser.set_defaults(run=_federate)
