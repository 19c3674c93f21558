"""The `rlhf-mesh` command: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

SERVICES = ("generation", "reward", "learner", "feedback")


def _not_implemented(what: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        print(f"rlhf-mesh {what}: not implemented yet", file=sys.stderr)
        return 1

    return run


def _models_build(args: argparse.Namespace) -> int:
    from rlhf_mesh.tiny_models import build

    paths = build(args.dir, seed=args.seed, preset=args.preset)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    return _not_implemented(f"serve {args.service}")(args)


def parser() -> argparse.ArgumentParser:
    from rlhf_mesh.tiny_models import PRESETS

    top = argparse.ArgumentParser(prog="rlhf-mesh", description="RLHF as gRPC microservices.")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve", help="run a service",
        description="Run a service. Settings come from flags, RLHF_MESH_<SERVICE>_* environment "
        "variables and an optional YAML file (--config FILE), flags first. "
        "`rlhf-mesh serve SERVICE --help` lists them.",
    )
    serve.add_argument("service", choices=SERVICES)
    serve.add_argument("args", nargs=argparse.REMAINDER, help="settings of the service")
    serve.set_defaults(run=_serve)

    for name, help_ in (
        ("train", "run the PPO learner"),
        ("train-rm", "train a reward model from preference pairs"),
        ("score", "score prompt/response pairs with a RewardService"),
        ("generate", "sample from a GenerationService"),
        ("demo", "run the whole RLHF loop on this machine"),
    ):
        cmd = sub.add_parser(name, help=help_, add_help=False)
        cmd.add_argument("args", nargs=argparse.REMAINDER)
        cmd.set_defaults(run=_not_implemented(name))

    models = sub.add_parser("models", help="local models").add_subparsers(dest="action", required=True)
    build = models.add_parser("build", help="write a tiny policy and reward model with their tokenizer")
    build.add_argument("dir", help="output folder; gets policy/ and reward/")
    build.add_argument("--seed", type=int, default=0, help="the same seed writes the same files")
    build.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="model size")
    build.set_defaults(run=_models_build)
    return top


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    raise SystemExit(args.run(args))
