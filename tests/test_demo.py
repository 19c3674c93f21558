"""`rlhf-mesh demo`, the main job: the whole loop through the real services, and its clean-up."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess

import pytest

from support import PYTHON, ROOT

pytestmark = pytest.mark.slow


def _addresses(output: str) -> list[tuple[str, int]]:
    return [(host, int(port)) for host, port in re.findall(r"^  \w+ +(localhost):(\d+) ", output, re.MULTILINE)]


def _closed(host: str, port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex((host, port)) != 0


def test_the_rater_likes_the_policy_more_after_the_loop(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run([PYTHON, "-m", "rlhf_mesh", "demo", "--out", str(out), "--seed", "0"],
                            capture_output=True, text=True, cwd=ROOT, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rounds = json.loads((out / "rounds.json").read_text())
    print((out / "summary.txt").read_text())
    assert [r["round"] for r in rounds] == [0, 1, 2]
    # Seeds 0, 1 and 2 went from 45%, 43%, 36% to 95%, 88%, 95% (docs/demo.md); +25 points leaves room.
    assert rounds[-1]["polite_rate"] >= rounds[0]["polite_rate"] + 0.25
    assert all(r["kl"] < 25 for r in rounds[1:])  # 14-16 nats per 24-token response on those seeds
    assert rounds[-1]["rm_accuracy"] > 0.6  # 0.72-0.89 on ~20 held-out pairs
    assert (out / "demo.png").stat().st_size > 0 and (out / "summary.txt").is_file()
    assert list((out / "ppo" / "tensorboard").glob("events.out.tfevents.*"))
    assert (out / "ppo" / "checkpoints" / "step-000024" / "policy" / "config.json").is_file()
    addresses = _addresses(result.stdout)
    assert len(addresses) == 3 and all(_closed(*a) for a in addresses)


def test_a_service_that_fails_is_named_with_its_log_and_nothing_is_left_running(tmp_path, tiny_models):
    out = tmp_path / "demo"
    result = subprocess.run(
        [PYTHON, "-m", "rlhf_mesh", "demo", "--out", str(out), "--policy", str(tmp_path / "no-such-policy"),
         "--reward-model-path", str(tiny_models["reward"]), "--prompts", str(tiny_models["prompts"])],
        capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 1
    assert "the generation service did not start" in result.stderr
    assert str(out / "logs" / "generation.log") in result.stderr
    addresses = _addresses(result.stdout)
    assert len(addresses) == 3 and all(_closed(*a) for a in addresses)


def test_ctrl_c_stops_every_service(tmp_path, tiny_models):
    out = tmp_path / "demo"
    # SIGINT as a terminal delivers it, even where the test run itself was started in the background
    # (a shell starts background jobs with SIGINT ignored, and children inherit that).
    demo = subprocess.Popen(
        [PYTHON, "-m", "rlhf_mesh", "demo", "--out", str(out), "--policy", str(tiny_models["policy"]),
         "--reward-model-path", str(tiny_models["reward"]), "--prompts", str(tiny_models["prompts"])],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = []
    for line in demo.stdout:  # wait until the services serve and the first round begins
        lines.append(line)
        if line.startswith("round 0"):
            break
    demo.send_signal(signal.SIGINT)
    try:
        _, stderr = demo.communicate(timeout=120)
    except subprocess.TimeoutExpired:  # say where it hangs
        demo.kill()
        _, stderr = demo.communicate()
        logs = "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted((out / "logs").glob("*.log")))
        pytest.fail(f"the demo was still running 120 s after Ctrl-C; its stderr:\n{stderr[-3000:]}\n{logs}")
    assert demo.returncode == 130 and "interrupted; stopping the services" in stderr, stderr[-3000:]
    addresses = _addresses("".join(lines))
    assert len(addresses) == 3 and all(_closed(*a) for a in addresses)


def test_the_arithmetic_rater_prefers_the_right_answer_then_the_shorter():
    """`demo --model real`'s scripted rater: math-verify against the answer decides; of two right
    answers the shorter wins; two wrong ones get no judgement."""
    from rlhf_mesh.demo import judge_answers

    assert judge_answers(["12 + 7 = \\boxed{19}", "12 + 7 = \\boxed{9}"], "19") == 0
    assert judge_answers(["\\boxed{9}", "so it is \\boxed{19}"], "19") == 1
    assert judge_answers(["The sum is 19, so \\boxed{19}.", "\\boxed{19}"], "19") == 1
    assert judge_answers(["\\boxed{1}", "\\boxed{2}"], "19") is None


def test_the_real_demo_takes_its_own_defaults_only_for_the_keys_not_given(tmp_path):
    from rlhf_mesh.demo import REAL_DEFAULTS, Demo, DemoSettings

    real = Demo(DemoSettings(model="real", steps=5, out=tmp_path)).s
    assert real.steps == 5 and real.rounds == REAL_DEFAULTS["rounds"] and real.learning_rate == 2e-4
    assert Demo(DemoSettings(out=tmp_path)).s.steps == DemoSettings.model_fields["steps"].default == 12
