"""The docs and the code name the same settings and flags, so that neither drifts from the other.

Every flag a page names is a flag of a settings class or of the `rlhf-mesh` command; every
key of a settings table or a settings YAML block is a settings field; every settings field is
on some page; every deprecated name is in the table of renamed settings; the role table of
docs/security.md is the `required_role` of every RPC in protos/.
"""

from __future__ import annotations

import argparse
import importlib
import re
import typing

import pytest
import yaml

from rlhf_mesh.cli import SERVICE_MODULES, parser
from rlhf_mesh.demo import DemoSettings
from rlhf_mesh.services.reward.training import TrainRmSettings
from rlhf_mesh.settings import FileSettings

from support import ROOT

DOCS = ROOT / "docs"
PAGES = sorted([*DOCS.glob("*.md"), ROOT / "README.md", ROOT / "deploy" / "README.md"])
# Where old names may appear: the table of renamed settings and the CLI page's note on renamed flags.
RENAMES_PAGES = {DOCS / "configuration.md", DOCS / "cli.md"}
# Flags of other programs that the pages name (torchrun, OpenRLHF's and vLLM's servers, kubectl,
# kubernetes-validate, pip, debootstrap) and configuration.md's placeholder for every flag.
FOREIGN_FLAGS = {"--standalone", "--nproc-per-node", "--nnodes", "--node-rank", "--rdzv-endpoint",
                 "--rdzv-backend", "--rdzv-id", "--master-addr", "--master-port", "--remote_rm_url",
                 "--runner", "--replicas", "--strict", "--key-name", "--no-index", "--variant"}


def _settings_classes() -> dict[str, type[FileSettings]]:
    classes = {name: importlib.import_module(module).Settings for name, module in SERVICE_MODULES.items()}
    return {**classes, "train-rm": TrainRmSettings, "demo": DemoSettings}


SETTINGS = _settings_classes()


def _flags_of(cls: type[FileSettings]) -> tuple[set[str], set[str]]:
    """The flags of a settings class: (current ones, deprecated old names)."""
    flags, old = {"--config"}, set()
    for name, field in cls.model_fields.items():
        flag = name.replace("_", "-")
        (old if name in cls.renamed() else flags).update({f"--{flag}", f"--no-{flag}"} if field.annotation is bool
                                                         else {f"--{flag}"})
    return flags, old


def _cli_flags(command: argparse.ArgumentParser) -> tuple[set[str], set[str]]:
    """The flags of the `rlhf-mesh` command and its subcommands: (current ones, deprecated old names)."""
    flags, old = set(), set()
    for action in command._actions:  # argparse keeps no public list of them
        first, *others = action.option_strings or [""]
        flags.add(first)
        (old if type(action).__name__ == "_Renamed" else flags).update(others)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                sub_flags, sub_old = _cli_flags(sub)
                flags, old = flags | sub_flags, old | sub_old
    return flags, old


def _benchmark_flags() -> set[str]:
    return {flag for script in (ROOT / "benchmarks").glob("*.py")
            for flag in re.findall(r"""add_argument\(\s*["'](--[\w-]+)""", script.read_text())}


def _code_spans(text: str) -> list[str]:
    """The text of every `inline` span and fenced block (where flags and keys are written)."""
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    inline = re.findall(r"`([^`\n]+)`", re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL))
    return blocks + inline


def test_every_flag_the_docs_name_exists():
    known, old = _cli_flags(parser())
    for cls in SETTINGS.values():
        flags, old_names = _flags_of(cls)
        known, old = known | flags, old | old_names
    known |= _benchmark_flags() | FOREIGN_FLAGS
    unknown = {}
    for page in PAGES:
        allowed = known | (old if page in RENAMES_PAGES else set())
        named = {flag for span in _code_spans(page.read_text())
                 for flag in re.findall(r"(?<![\w-])--[a-z][\w-]*", span)}
        if named - allowed:
            unknown[page.relative_to(ROOT).as_posix()] = sorted(named - allowed)
    assert not unknown, f"flags named in the docs that nothing takes (or deprecated names): {unknown}"


def _table_keys(text: str, heading: str | None = None) -> set[str]:
    """The `key`s in the first column of the markdown tables (below `heading`, if given)."""
    if heading is not None:
        text = text[text.index(heading):]
    keys = set()
    for row in re.findall(r"^\|([^|\n]*)\|", text, re.MULTILINE):
        keys.update(re.findall(r"`([a-z][a-z0-9_]*)`", row))
    return keys


def _current(command: str) -> set[str]:
    cls = SETTINGS[command]
    return set(cls.model_fields) - set(cls.renamed())


def test_every_settings_key_the_docs_name_exists():
    configuration = (DOCS / "configuration.md").read_text()
    shared = _table_keys(configuration[: configuration.index("## Renamed settings")])
    services = set().union(*(_current(service) for service in SERVICE_MODULES))
    assert shared and not shared - services, sorted(shared - services)
    # The reward page's list of settings, without the defaults in parentheses.
    reward = (DOCS / "reward.md").read_text()
    listed = re.search(r"Reward settings \(env prefix `RLHF_MESH_REWARD_`\): (.*?)\n\n", reward, re.DOTALL).group(1)
    keys = set(re.findall(r"`([a-z][a-z0-9_]*)`", re.sub(r"\([^()]*\)", "", listed)))
    assert keys and not keys - _current("reward"), sorted(keys - _current("reward"))
    # The learner page's ppo.yaml: its keys, and the keys its comments name.
    learner = (DOCS / "learner.md").read_text()
    block = re.search(r"```yaml\n(# ppo.yaml.*?)```", learner, re.DOTALL).group(1)
    keys = set(yaml.safe_load(block)) | set(re.findall(r"\b([a-z]+_[a-z_]+)\b", "".join(re.findall(r"#.*", block))))
    values = {str(v) for field in SETTINGS["learner"].model_fields.values() for v in _choices(field.annotation)}
    assert not keys - _current("learner") - values, sorted(keys - _current("learner") - values)


def _choices(annotation) -> set:
    """The values a Literal annotation (maybe inside a union) allows."""
    if typing.get_origin(annotation) is typing.Literal:
        return set(typing.get_args(annotation))
    return set().union(*(_choices(a) for a in typing.get_args(annotation)))


def test_every_setting_is_documented():
    text = "\n".join(page.read_text() for page in PAGES)
    missing = {}
    for command, cls in SETTINGS.items():
        renamed = cls.renamed()
        for name in cls.model_fields:
            if name in renamed:
                continue
            flag = name.replace("_", "-")
            if not re.search(rf"(?<![\w-])({re.escape(name)}|--(no-)?{re.escape(flag)})(?![\w-])", text):
                missing.setdefault(command, []).append(name)
    assert not missing, f"settings no page describes: {missing}"


def test_every_renamed_setting_is_in_the_table_with_its_new_name():
    configuration = (DOCS / "configuration.md").read_text()
    table = configuration[configuration.index("## Renamed settings"):]
    rows = re.findall(r"^\|.*\|$", table, re.MULTILINE)
    for command, cls in SETTINGS.items():
        for old, new in cls.renamed().items():
            assert any(f"`{old}`" in row and f"`{new}`" in row for row in rows), (command, old, new)


def test_examples_and_deploy_configs_use_current_names():
    """Configs and the secured overlay's variables name live settings, never a deprecated one; every
    example is a valid learner config."""
    learner = SETTINGS["learner"]
    for example in (ROOT / "examples").glob("*.yaml"):
        config = yaml.safe_load(example.read_text())
        assert set(config) <= set(learner.model_fields) - set(learner.renamed()), (example.name, set(config))
        learner(**config)
    for config in (ROOT / "deploy" / "k8s").rglob("config/*.yaml"):
        cls = SETTINGS[config.stem]
        assert set(yaml.safe_load(config.read_text())) <= set(cls.model_fields) - set(cls.renamed()), config
    for manifest in (ROOT / "deploy" / "k8s").rglob("*.yaml"):
        for variable in re.findall(r"name: (RLHF_MESH_[A-Z_]+)", manifest.read_text()):
            service = next((s for s in SETTINGS if variable.startswith(f"RLHF_MESH_{s.upper()}_")), None)
            if service is None:
                continue
            key = variable.removeprefix(f"RLHF_MESH_{service.upper()}_").lower()
            cls = SETTINGS[service]
            assert key in cls.model_fields and key not in cls.renamed(), (manifest.name, variable)


def test_the_role_table_is_the_protos_roles():
    from rlhf_mesh.v1 import (
        common_pb2,
        environment_pb2,
        feedback_pb2,
        generation_pb2,
        learner_pb2,
        reward_pb2,
        session_pb2,
    )

    roles: dict[str, set[str]] = {}
    for module in (environment_pb2, feedback_pb2, generation_pb2, learner_pb2, reward_pb2, session_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                role = common_pb2.Role.Name(method.GetOptions().Extensions[common_pb2.required_role])
                roles.setdefault(role.removeprefix("ROLE_").lower(), set()).add(method.name)
    security = (DOCS / "security.md").read_text()
    documented = {}
    for role, rpcs in re.findall(r"^\| `([a-z]+)`[^|]*\| (.*) \|$", security, re.MULTILINE):
        documented[role] = set(re.findall(r"`([A-Z]\w+)`", rpcs))
    assert {role: rpcs for role, rpcs in documented.items() if rpcs} == roles


@pytest.mark.parametrize("command", sorted(SETTINGS))
def test_help_lists_no_deprecated_name(command, capsys):
    """Old names are accepted, not advertised: --help shows the new ones only."""
    from rlhf_mesh.settings import load_settings

    cls = SETTINGS[command]
    with pytest.raises(SystemExit):
        load_settings(cls, ["--help"], f"rlhf-mesh {command}")
    shown = capsys.readouterr().out
    for old, new in cls.renamed().items():
        assert f"--{old.replace('_', '-')} " not in shown and f"--{new.replace('_', '-')} " in shown
