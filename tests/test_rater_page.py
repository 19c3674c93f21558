"""The rater page in a real headless Chromium (Debian's, driven by Playwright): responses
sampled from the GenerationService are queued, a person picks and rates with the keyboard,
and the feedback is in the store."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from rlhf_mesh.clients.feedback import FeedbackClient
from rlhf_mesh.clients.health import wait_until_serving
from rlhf_mesh.v1 import feedback_pb2

from support import PYTHON, ROOT, ChildServer, free_port, start_generation_server

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Without the background-networking flags Chromium keeps dialling out of this closed network.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture
def chromium():
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("no chromium: CI must run the browser test (.ci/run installs Debian's chromium)")
        pytest.skip("no chromium on this machine (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


def test_a_rater_picks_and_rates_in_the_browser_and_the_store_has_it(chromium, tiny_models, tmp_path):
    generation = start_generation_server(tiny_models["policy"], tmp_path / "generation.log")
    page_port = free_port()
    store = ChildServer([PYTHON, "-m", "rlhf_mesh", "serve", "feedback", "--db", f"sqlite:///{tmp_path / 'fb.db'}",
                         "--rater-port", str(page_port)], tmp_path / "feedback.log")
    try:
        wait_until_serving(store.address, timeout_s=60, alive=store.alive)
        prompts = tmp_path / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("The cat likes", "A robot helps",
                                                                              "The city reads")))
        sampled = subprocess.run(
            [PYTHON, "-m", "rlhf_mesh", "feedback", "sample", "--prompts", str(prompts), "--generation",
             generation.address, "--feedback", store.address, "-n", "2", "--max-tokens", "12", "--seed", "3"],
            capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert sampled.returncode == 0, sampled.stderr
        assert "queued 3 of 3 prompts" in sampled.stdout

        page = chromium.new_page()
        page.goto(f"http://localhost:{page_port}/")
        page.fill("#rater", "ann")
        page.dispatch_event("#rater", "change")
        page.wait_for_selector("#remaining:text('3')")
        first_prompt = page.text_content("#prompt")
        page.click("h1")  # focus leaves the rater box: keys now choose
        page.keyboard.press("2")
        assert page.get_attribute(".response[data-index='1']", "class") == "response chosen"
        page.keyboard.press("Enter")
        page.wait_for_selector("#remaining:text('2')")

        second_prompt = page.text_content("#prompt")
        for select, value in zip(page.query_selector_all(".response select"), ("4", "1"), strict=True):
            select.select_option(value)
        page.click("#submit")
        page.wait_for_selector("#remaining:text('1')")

        page.keyboard.press("1")
        page.fill("#correction", "A better answer, thank you.")
        page.keyboard.press("Control+Enter")
        page.wait_for_selector("#done:not([hidden])")
        assert page.text_content("#remaining") == "0"
    finally:
        store.stop()
        generation.stop()

    restarted = ChildServer([PYTHON, "-m", "rlhf_mesh", "serve", "feedback", "--db", f"sqlite:///{tmp_path / 'fb.db'}",
                             "--rater-port", "0"], tmp_path / "feedback2.log")
    try:
        wait_until_serving(restarted.address, timeout_s=60, alive=restarted.alive)
        with FeedbackClient(restarted.address) as client:
            stored = list(client.list(rater_id="ann"))
    finally:
        restarted.stop()
    assert [f.WhichOneof("judgement") for f in stored] == ["choice", "rating", "correction"]
    choice, rating, correction = stored
    assert (choice.prompt, choice.choice.chosen_index) == (first_prompt, 1)
    assert (rating.prompt, list(rating.rating.scores)) == (second_prompt, [4.0, 1.0])
    assert correction.correction == feedback_pb2.Correction(response_index=0,
                                                            corrected_response="A better answer, thank you.")
    assert all(f.model_id == str(tiny_models["policy"]) and len(f.responses) == 2 for f in stored)
