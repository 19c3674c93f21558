"""The rater page in a real headless Chromium (Debian's, driven by Playwright) against a real
FeedbackService: raters log in with their tokens, judge with the keyboard, and the store has
exactly what they did. Set RLHF_MESH_SCREENSHOTS=DIR to keep the page's screenshots there."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import sqlalchemy
from playwright.sync_api import expect

from rlhf_mesh.clients.feedback import FeedbackClient
from rlhf_mesh.clients.health import wait_until_serving
from rlhf_mesh.v1 import feedback_pb2

from support import PYTHON, ROOT, ChildServer, RaterApi, free_port, write_tokens

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Without the background-networking flags Chromium keeps dialling out of this closed network.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
ROLES = {"boss": ["admin"], "ann": ["rate"], "bob": ["rate"]}
GUIDELINES = """Pick the response that **answers the question** best.

- Prefer correct over fluent.
- Press `t` when they are equally good, `b` when both are bad.
"""
HOSTILE = [  # model output that must render as text and run nothing
    "<script>window.__pwned = 'script'</script>Sure!",
    '<img src=x onerror="window.__pwned = \'img\'"> Here: [click me](javascript:window.__pwned=\'link\')',
]


@pytest.fixture(scope="module")
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


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rater-page")
    tokens = write_tokens(folder / "tokens.yaml", **ROLES)
    port = free_port()
    child = ChildServer([PYTHON, "-m", "rlhf_mesh", "serve", "feedback", "--db", f"sqlite:///{folder / 'fb.db'}",
                         "--rater-port", str(port), "--tokens-file", str(folder / "tokens.yaml")],
                        folder / "feedback.log")
    wait_until_serving(child.address, timeout_s=60, alive=child.alive)
    child.url, child.tokens, child.db = f"http://localhost:{port}/", tokens, f"sqlite:///{folder / 'fb.db'}"
    yield child
    child.stop()


def _campaign(server, kinds: list[int], k: int, items: list[tuple[str, list[str]]]) -> str:
    name = f"c-{uuid.uuid4().hex[:6]}"
    with FeedbackClient(server.address, token=server.tokens["boss"]) as client:
        client.create_campaign(feedback_pb2.Campaign(campaign_id=name, title="Which answer is better?",
                                                     guidelines=GUIDELINES, judgements=kinds, judgements_per_item=k))
        client.add_rating_items([feedback_pb2.RatingItem(prompt=p, responses=r) for p, r in items], campaign_id=name)
    return name


def _log_in(browser, server, rater: str, campaign: str, viewport=(1280, 900)):
    page = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]}).new_page()
    page.goto(server.url)
    page.wait_for_selector("#login:not([hidden])")
    page.fill("#token", server.tokens[rater])
    page.press("#token", "Enter")
    page.wait_for_selector(f"#who:text('{rater}')")
    page.click(f"a[href='#campaign={campaign}']")
    page.wait_for_selector("#item:not([hidden]), #done:not([hidden])")
    page.click("h1")  # focus on the page: keys now choose
    return page


def _judgements(server, campaign: str) -> list[feedback_pb2.Feedback]:
    with FeedbackClient(server.address, token=server.tokens["boss"]) as client:
        return [f for f in client.list(page_size=1000) if f.campaign_id == campaign]


CHOICE, TIE, BOTH_BAD, RATING, CORRECTION = (
    feedback_pb2.JUDGEMENT_KIND_CHOICE, feedback_pb2.JUDGEMENT_KIND_TIE, feedback_pb2.JUDGEMENT_KIND_BOTH_BAD,
    feedback_pb2.JUDGEMENT_KIND_RATING, feedback_pb2.JUDGEMENT_KIND_CORRECTION)


def test_two_raters_at_once_see_each_item_once_and_it_closes_after_both(chromium, server):
    items = [(f"What is {i} + {i}?", [f"It is {2 * i}.", f"It is {2 * i + 1}."]) for i in range(3)]
    name = _campaign(server, [CHOICE, TIE], k=2, items=items)
    pages = {rater: _log_in(chromium, server, rater, name) for rater in ("ann", "bob")}
    seen = {rater: [] for rater in pages}
    for step in range(3):
        for rater, page in pages.items():  # both hold the same item: k = 2 places
            page.wait_for_selector(f"#progress:text('You: {step} judged')")
            seen[rater].append(page.text_content("#prompt").strip())
            page.keyboard.press("1" if rater == "ann" or step != 1 else "2")
            page.keyboard.press("Enter")
        if step < 2:
            assert seen["ann"][-1] == seen["bob"][-1]
    for page in pages.values():
        page.wait_for_selector("#done:not([hidden])")
    pages["bob"].wait_for_selector("#progress:text('3 of 3 items closed')")
    pages["ann"].reload()  # still logged in (the tab keeps the token), and the item closed meanwhile
    pages["ann"].wait_for_selector("#progress:text('You: 3 judged, 0 skipped · campaign: 3 of 3 items closed')")
    assert seen["ann"] == seen["bob"] == [p for p, _ in items]
    stored = _judgements(server, name)
    assert sorted((f.rater_id, f.prompt, f.choice.chosen_index) for f in stored) == sorted(
        [("ann", p, 0) for p, _ in items] + [("bob", p, 1 if i == 1 else 0) for i, (p, _) in enumerate(items)])

    admin = _log_in(chromium, server, "boss", name)
    admin.goto(f"{server.url}#stats={name}")
    admin.wait_for_selector("#stats:not([hidden])")
    assert [r.split("\t") for r in admin.inner_text("#stats-raters").strip().splitlines()] == [
        ["ann", "3", "0"], ["bob", "3", "0"]]
    assert admin.inner_text("#stats-pairs").split() == ["ann", "bob", "3", "2", "0.667"]
    assert "pairwise agreement 0.667" in admin.text_content("#stats-summary")


def test_skip_tie_undo_and_the_guidelines(chromium, server):
    items = [(f"Question {i}", [f"Answer {i}a", f"Answer {i}b"]) for i in range(3)]
    name = _campaign(server, [CHOICE, TIE, BOTH_BAD], k=2, items=items)
    page = _log_in(chromium, server, "ann", name)
    assert page.inner_text("#guidelines-body strong") == "answers the question"
    assert page.get_attribute("#guidelines", "open") is not None  # open before the first judgement
    first = page.text_content("#prompt").strip()
    page.keyboard.press("s")  # skip: the next item
    page.wait_for_selector("#progress:text('1 skipped')")
    second = page.text_content("#prompt").strip()
    page.keyboard.press("t")
    assert "selected" in page.get_attribute("#tie", "class")
    page.keyboard.press("Enter")
    page.wait_for_selector("#progress:text('You: 1 judged')")
    page.keyboard.press("u")  # undo the tie: the item is back
    page.wait_for_selector("#status:text('Reopened item')")
    assert page.text_content("#prompt").strip() == second
    assert "You: 0 judged" in page.text_content("#progress")
    page.keyboard.press("b")
    page.keyboard.press("Enter")
    page.wait_for_selector("#progress:text('You: 1 judged')")
    third = page.text_content("#prompt").strip()
    page.keyboard.press("2")
    assert page.get_attribute(".response[data-index='1']", "class") == "response chosen"
    page.keyboard.press("Enter")
    page.wait_for_selector("#done:not([hidden])")
    assert (first, second, third) == tuple(p for p, _ in items)
    stored = _judgements(server, name)
    assert sorted((f.prompt, f.WhichOneof("judgement"), f.tie.both_bad, f.choice.chosen_index) for f in stored) == [
        (second, "tie", True, 0), (third, "choice", False, 1)]


def test_model_output_renders_as_text_and_runs_nothing(chromium, server, tmp_path):
    prompt = "Explain `eval` in **one** line:\n\n```python\nprint('<b>hi</b>')\n```"
    name = _campaign(server, [CHOICE, RATING, CORRECTION, TIE], k=1, items=[(prompt, HOSTILE)])
    page = _log_in(chromium, server, "ann", name)
    errors = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    responses = page.locator(".response .markdown")
    assert responses.nth(0).inner_text().strip() == "<script>window.__pwned = 'script'</script>Sure!"
    assert "<img src=x onerror=" in responses.nth(1).inner_text()
    assert page.locator("#responses script, #responses img, a[href^='javascript']").count() == 0
    assert page.inner_text("#prompt code >> nth=0") == "eval" and page.inner_text("#prompt strong") == "one"
    assert page.inner_text("#prompt pre code").strip() == "print('<b>hi</b>')"
    page.get_by_text("[click me](javascript:").click()  # text, not a link: clicking does nothing
    assert page.evaluate("window.__pwned") is None and errors == []
    # A rating of each response and a correction of the picked one, as a person would enter them.
    page.keyboard.press("1")
    page.fill("#correction", "It runs a string as code.")
    page.keyboard.press("Control+Enter")
    page.wait_for_selector("#done:not([hidden])")
    [stored] = _judgements(server, name)
    assert stored.correction == feedback_pb2.Correction(response_index=0,
                                                        corrected_response="It runs a string as code.")
    assert list(stored.responses) == HOSTILE


def test_side_by_side_when_wide_stacked_when_narrow(chromium, server):
    items = [("Write a haiku about *gradients*.", ["Loss slopes to the sea,\nsteps follow the falling hill,\n"
                                                   "minima at rest.",
                                                   "Gradients flow down\n```\nw -= lr * grad\n```\nthe model learns."])]
    name = _campaign(server, [CHOICE, TIE, BOTH_BAD, RATING], k=2, items=items)
    shots = os.environ.get("RLHF_MESH_SCREENSHOTS")
    for width, side_by_side in ((1280, True), (420, False)):
        page = _log_in(chromium, server, "ann" if side_by_side else "bob", name, viewport=(width, 900))
        first, second = (page.locator(".response").nth(i).bounding_box() for i in range(2))
        if side_by_side:
            assert first["y"] == second["y"] and second["x"] > first["x"] + first["width"] - 1
        else:
            assert first["x"] == second["x"] and second["y"] >= first["y"] + first["height"]
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")  # no sideways scroll
        if shots:
            page.keyboard.press("1")
            page.screenshot(path=str(Path(shots) / f"rater-page-{'wide' if side_by_side else 'narrow'}.png"),
                            full_page=True)


def test_unauthenticated_calls_get_401_and_store_nothing(chromium, server):
    name = _campaign(server, [CHOICE], k=1, items=[("Q", ["a", "b"])])
    page = chromium.new_page()
    page.goto(server.url)
    page.wait_for_selector("#login:not([hidden])")
    # The browser's own fetch, as a script on the page would send it, with no token.
    status, body = page.evaluate("""async (path) => {
        const reply = await fetch(path, {method: "POST", headers: {"Content-Type": "application/json"},
                                         body: JSON.stringify({item_id: 1, choice: 0})});
        return [reply.status, await reply.json()];
    }""", f"api/campaigns/{name}/judgements")
    assert status == 401 and "log in" in body["error"]["message"]
    assert page.evaluate("async (path) => (await fetch(path)).status", f"api/campaigns/{name}/next") == 401
    page.fill("#token", "not-a-valid-token-at-all")
    page.press("#token", "Enter")
    page.wait_for_selector("#status:text('invalid token')")
    assert page.evaluate("sessionStorage.getItem('token')") is None  # a refused token is not kept
    page.reload()
    page.wait_for_selector("#login:not([hidden])")
    assert page.text_content("#status") == ""  # nothing was sent: there was no token to send
    assert _judgements(server, name) == []


def test_every_mix_of_judgements_can_be_submitted_and_nothing_typed_is_dropped(chromium, server):
    def said(page, text: str) -> None:
        expect(page.locator("#status")).to_contain_text(text)

    # Corrections alone: pick the response, then type its correction.
    only = _campaign(server, [CORRECTION], k=1, items=[("Fix the spelling", ["teh cat", "a dgo"])] * 2)
    page = _log_in(chromium, server, "ann", only)
    assert page.inner_text("#correction-box").startswith("Your correction of the picked response")
    page.keyboard.press("Enter")
    said(page, "Pick a response and correct it.")
    page.keyboard.press("2")
    page.keyboard.press("Enter")
    said(page, "Type your correction of response 2.")
    page.fill("#correction", "a dog")
    page.keyboard.press("Control+Enter")
    page.wait_for_selector("#progress:text('You: 1 judged')")
    page.fill("#correction", "the cat")  # typed before picking
    page.keyboard.press("Control+Enter")
    said(page, "Pick the response your correction is of (1–2).")
    page.click(".response[data-index='0'] .markdown")
    page.keyboard.press("Control+Enter")
    page.wait_for_selector("#done:not([hidden])")
    stored = sorted((f.correction.response_index, f.correction.corrected_response)
                    for f in _judgements(server, only))
    assert stored == [(0, "the cat"), (1, "a dog")]

    # Ratings and a correction: one of them per item, never one dropped for the other.
    both = _campaign(server, [RATING, CORRECTION], k=1, items=[("Answer 2 + 2", ["4", "5"])])
    page = _log_in(chromium, server, "ann", both)
    page.select_option(".response[data-index='0'] select", "5")
    page.keyboard.press("Enter")
    said(page, "Rate every response, or set the ratings back")
    page.select_option(".response[data-index='1'] select", "1")
    page.keyboard.press("2")
    page.fill("#correction", "4")
    page.keyboard.press("Control+Enter")
    said(page, "One judgement per item: you gave a correction of response 2 and ratings.")
    assert _judgements(server, both) == []
    for i in range(2):
        page.select_option(f".response[data-index='{i}'] select", "")
    page.keyboard.press("Control+Enter")
    page.wait_for_selector("#done:not([hidden])")
    [stored] = _judgements(server, both)
    assert stored.correction == feedback_pb2.Correction(response_index=1, corrected_response="4")

    # A pick and ratings.
    pick = _campaign(server, [CHOICE, RATING], k=1, items=[("Say hi", ["hi", "bye"])] * 2)
    page = _log_in(chromium, server, "ann", pick)
    page.keyboard.press("2")
    for i, score in enumerate(("2", "4")):
        page.select_option(f".response[data-index='{i}'] select", score)
    page.click("h1")
    page.keyboard.press("Enter")
    said(page, "you gave a pick of response 2 and ratings")
    page.keyboard.press("2")  # the pick taken back: the ratings are the judgement
    assert page.locator(".response.chosen").count() == 0
    page.keyboard.press("Enter")
    page.wait_for_selector("#progress:text('You: 1 judged')")
    page.keyboard.press("1")
    page.keyboard.press("Enter")
    page.wait_for_selector("#done:not([hidden])")
    judged = sorted((f.WhichOneof("judgement"), list(f.rating.scores), f.choice.chosen_index)
                    for f in _judgements(server, pick))
    assert judged == [("choice", [], 0), ("rating", [2.0, 4.0], 0)]


def test_links_open_elsewhere_showing_where_and_bidi_controls_show_as_code_points(chromium, server):
    homoglyph = "p\u0430ypal.com"  # a Cyrillic a
    responses = [f"Log in at [{homoglyph}](https://{homoglyph}/login) now.", "Open the file \u202egpj.exe"]
    name = _campaign(server, [CHOICE, TIE], k=1, items=[("Where do I log in?", responses)])
    page = _log_in(chromium, server, "ann", name)
    link = page.locator(".response a")
    assert (link.get_attribute("target"), link.get_attribute("rel")) == ("_blank", "noopener noreferrer")
    assert link.get_attribute("href") == "https://xn--pypal-4ve.com/login"
    first = page.locator(".response[data-index='0']")
    assert first.inner_text().strip().endswith(f"Log in at {homoglyph} (xn--pypal-4ve.com) now.")
    with page.context.expect_page() as opened:
        link.click()
    assert opened.value.url.startswith(("https://xn--pypal-4ve.com/", "chrome-error:"))
    assert page.url.startswith(server.url) and "#campaign=" in page.url  # the rater stays on the page
    assert page.locator(".response.chosen").count() == 0  # and following a link picks nothing
    second = page.locator(".response[data-index='1'] .markdown").inner_text()
    assert second.strip() == "Open the file [U+202E]gpj.exe" and "\u202e" not in page.content()
    page.keyboard.press("2")
    page.keyboard.press("Enter")
    page.wait_for_selector("#done:not([hidden])")
    [stored] = _judgements(server, name)
    assert list(stored.responses) == responses and stored.choice.chosen_index == 1  # stored as given


def test_a_judgement_whose_hold_expired_and_was_taken_moves_on(chromium, server):
    name = _campaign(server, [CHOICE], k=1, items=[("First", ["a", "b"]), ("Second", ["c", "d"])])
    page = _log_in(chromium, server, "ann", name)
    assert page.text_content("#prompt").strip() == "First"
    engine = sqlalchemy.create_engine(server.db)
    with engine.begin() as connection:  # as if ann had walked away for longer than the lease
        connection.execute(sqlalchemy.text("UPDATE assignments SET expires_at = '2000-01-01 00:00:00.000000' "
                                           "WHERE campaign_id = :c AND rater_id = 'ann'"), {"c": name})
    engine.dispose()
    bob = RaterApi(server.url, server.tokens["bob"])
    assert bob.item(name)["prompt_html"].strip() == "<p>First</p>"  # the place went back, to bob
    page.keyboard.press("1")
    page.keyboard.press("Enter")
    expect(page.locator("#prompt")).to_have_text("Second")  # on to the next item
    expect(page.locator("#status")).to_contain_text("expired and other raters took its places")
    page.keyboard.press("2")
    page.keyboard.press("Enter")
    page.wait_for_selector("#done:not([hidden])")
    assert [(f.rater_id, f.prompt) for f in _judgements(server, name)] == [("ann", "Second")]


def test_responses_sampled_from_the_policy_are_judged_in_the_browser(chromium, server, tiny_models, tmp_path):
    from support import start_generation_server

    generation = start_generation_server(tiny_models["policy"], tmp_path / "generation.log")
    try:
        prompts = tmp_path / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("The cat likes", "A robot helps")))
        token = tmp_path / "admin.token"
        token.write_text(server.tokens["boss"])
        sampled = subprocess.run(
            [PYTHON, "-m", "rlhf_mesh", "feedback", "sample", "--prompts", str(prompts), "--generation",
             generation.address, "--feedback", server.address, "--token-file", str(token), "-n", "2",
             "--max-tokens", "12", "--seed", "3"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    finally:
        generation.stop()
    assert sampled.returncode == 0, sampled.stderr
    assert "queued 2 of 2 prompts" in sampled.stdout

    page = _log_in(chromium, server, "ann", "default")
    first_prompt = page.text_content("#prompt").strip()
    for select, value in zip(page.query_selector_all(".response select"), ("4", "1"), strict=True):
        select.select_option(value)
    page.click("#submit")
    page.wait_for_selector("#progress:text('You: 1 judged')")
    page.keyboard.press("2")
    page.keyboard.press("Enter")
    page.wait_for_selector("#done:not([hidden])")
    rating, choice = _judgements(server, "default")
    assert (rating.prompt, list(rating.rating.scores), rating.rater_id) == (first_prompt, [4.0, 1.0], "ann")
    assert (choice.choice.chosen_index, choice.rater_id) == (1, "ann")
    assert all(f.model_id == str(tiny_models["policy"]) and len(f.responses) == 2 for f in (rating, choice))
