"""The API contract: buf lint clean, generated code in sync with protos/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from support import ROOT

BIN = Path(sys.executable).parent


def test_buf_lint_standard_and_comments():
    result = subprocess.run([BIN / "buf", "lint"], cwd=ROOT / "protos", capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_generated_code_matches_protos():
    result = subprocess.run(
        [sys.executable, ROOT / "scripts" / "gen_protos.py", "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_service_has_its_rpcs():
    from rlhf_mesh.v1 import feedback_pb2, generation_pb2, learner_pb2, reward_pb2

    rpcs = {
        svc.full_name: sorted(m.name for m in svc.methods)
        for mod in (generation_pb2, reward_pb2, learner_pb2, feedback_pb2)
        for svc in mod.DESCRIPTOR.services_by_name.values()
    }
    assert rpcs == {
        "rlhf_mesh.v1.GenerationService": sorted(
            ["Generate", "GetModelInfo", "PushWeights", "InitWeightTransfer", "PushWeightsCollective", "FetchWeights"]
        ),
        "rlhf_mesh.v1.RewardService": sorted(["Score", "ScoreStream", "ListModels", "ReloadModel"]),
        "rlhf_mesh.v1.LearnerService": sorted(["GetStatus", "WatchMetrics", "SaveCheckpoint", "Pause", "Resume"]),
        "rlhf_mesh.v1.FeedbackService": sorted(
            ["SubmitFeedback", "ListFeedback", "ExportPreferences", "AddRatingItems", "CreateCampaign",
             "ListCampaigns", "ListCampaignStats"]
        ),
    }
    generate = generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].methods_by_name["Generate"]
    assert generate.server_streaming and not generate.client_streaming
    push = generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].methods_by_name["PushWeights"]
    assert push.client_streaming and not push.server_streaming
    stream = reward_pb2.DESCRIPTOR.services_by_name["RewardService"].methods_by_name["ScoreStream"]
    assert stream.client_streaming and stream.server_streaming
