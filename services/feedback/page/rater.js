"use strict";
// The rater page. Texts go in with textContent; only the server's rendered markdown (raw HTML
// off, unsafe links refused) goes in with innerHTML, and the page's CSP runs no other script.
const $ = (id) => document.getElementById(id);
let token = sessionStorage.getItem("token") || "";
let me = null, campaign = null, item = null, verdict = null;

class Refused extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

async function api(path, body) {
  const init = { headers: token ? { Authorization: `Bearer ${token}` } : {} };
  if (body !== undefined) {
    init.method = "POST";
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  const reply = await fetch(path, init);
  const answer = await reply.json().catch(() => ({}));
  const error = answer.error?.message || reply.statusText;
  if (reply.status === 401) {
    const refused = token;
    token = "";  // a token the server refused is not kept
    sessionStorage.removeItem("token");
    showLogin(refused ? error : "");
    throw new Refused(error, reply.status);
  }
  if (!reply.ok) {
    $("status").textContent = error;
    throw new Refused(error, reply.status);
  }
  $("status").textContent = "";
  return answer;
}

// Runs a user action; a refusal is already on the page.
function act(work) {
  return (...args) => work(...args).catch((err) => { if (!(err instanceof Refused)) $("status").textContent = err; });
}

function show(section) {
  for (const name of ["login", "campaigns", "work", "stats"]) $(name).hidden = name !== section;
}

function showLogin(message) {
  show("login");
  $("status").textContent = message || "";
  $("token").focus();
}

function cell(row, text) {
  const td = document.createElement("td");
  td.textContent = text;
  row.appendChild(td);
  return td;
}

function link(parent, text, hash) {
  const a = document.createElement("a");
  a.textContent = text;
  a.href = `#${hash}`;
  parent.appendChild(a);
  return a;
}

async function start() {
  me = await api("api/me");
  $("who").textContent = `${me.rater_id}${me.admin ? " (admin)" : ""}`;
  $("logout").hidden = !token;
  await route();
}

async function route() {
  const hash = new URLSearchParams(location.hash.slice(1));
  if (hash.get("stats")) return showStats(hash.get("stats"));
  if (hash.get("campaign")) return openCampaign(hash.get("campaign"));
  return listCampaigns();
}

async function listCampaigns() {
  const { campaigns } = await api("api/campaigns");
  const body = $("campaign-list");
  body.replaceChildren();
  for (const c of campaigns) {
    const row = document.createElement("tr");
    link(cell(row, ""), c.title, `campaign=${encodeURIComponent(c.campaign_id)}`);
    cell(row, c.judgements_per_item);
    cell(row, `${c.progress.closed_items} of ${c.progress.items}`);
    cell(row, c.progress.mine);
    const last = cell(row, "");
    if (me.admin) link(last, "agreement", `stats=${encodeURIComponent(c.campaign_id)}`);
    body.appendChild(row);
  }
  $("title").textContent = "rlhf-mesh · rate responses";
  show("campaigns");
}

async function openCampaign(id) {
  const { campaigns } = await api("api/campaigns");
  campaign = campaigns.find((c) => c.campaign_id === id);
  if (!campaign) {
    $("status").textContent = `no campaign ${id}`;
    return listCampaigns();
  }
  $("title").textContent = campaign.title;
  $("guidelines-body").innerHTML = campaign.guidelines_html;
  $("guidelines").hidden = !campaign.guidelines_html.trim();
  $("tie").hidden = !allowed("tie");
  $("both-bad").hidden = !allowed("both_bad");
  $("correction-box").hidden = !allowed("correction");
  $("correction-label").textContent = campaign.judgements.length === 1 ? "Your correction of the picked response" :
    "Correction of the picked response (optional)";
  show("work");
  await next();
}

function allowed(kind) {
  return campaign.judgements.includes(kind);
}

// A pick is a choice, or the response a correction is of.
function pickable() {
  return allowed("choice") || allowed("correction");
}

function path(action) {
  return `api/campaigns/${encodeURIComponent(campaign.campaign_id)}/${action}`;
}

async function next() {
  showState(await api(path("next")));
}

function showState(state) {
  const p = state.progress;
  $("progress").textContent = `You: ${p.mine} judged, ${p.my_skips} skipped · campaign: ${p.closed_items} of ` +
    `${p.items} items closed (${campaign.judgements_per_item} raters each)`;
  item = state.item;
  verdict = null;
  $("item").hidden = !item;
  $("done").hidden = !!item;
  if (!item) return;
  $("guidelines").open = p.mine === 0;
  $("prompt").innerHTML = item.prompt_html;
  $("correction").value = "";
  const box = $("responses");
  box.replaceChildren();
  box.classList.toggle("pair", item.responses_html.length === 2);
  item.responses_html.forEach((html, i) => {
    const el = document.createElement("div");
    el.className = "response";
    el.dataset.index = i;
    const head = document.createElement("div");
    head.className = "head";
    const key = document.createElement("span");
    key.className = "key";
    key.textContent = `Response ${i + 1}`;
    head.appendChild(key);
    if (allowed("rating")) {
      const select = document.createElement("select");
      select.setAttribute("aria-label", `rating of response ${i + 1}`);
      select.add(new Option("rate", ""));
      for (let v = 1; v <= campaign.rating_scale; v++) select.add(new Option(String(v), String(v)));
      head.appendChild(select);
    }
    const text = document.createElement("div");
    text.className = "markdown";
    text.innerHTML = html;
    el.append(head, text);
    el.addEventListener("click", (e) => {
      // A link opens in a new tab and picks nothing; so does rating.
      if (!e.target.closest("a, select") && pickable()) pick(i);
    });
    box.appendChild(el);
  });
  markVerdict();
}

// Picking again what is picked takes the pick back.
function pick(choice) {
  verdict = verdict === choice ? null : choice;
  markVerdict();
}

function markVerdict() {
  document.querySelectorAll(".response").forEach((el, i) => el.classList.toggle("chosen", verdict === i));
  for (const button of [$("tie"), $("both-bad")]) button.classList.toggle("selected", verdict === button.dataset.verdict);
}

// The one judgement of what the rater entered, or why there is none: nothing entered is
// dropped, so two judgements at once (ratings and a pick, say) are sent back to the rater.
function judgement() {
  const n = item.responses_html.length;
  const scores = [...document.querySelectorAll(".response select")].map((s) => s.value);
  const rated = scores.filter((s) => s !== "").length;
  const correction = $("correction").value.trim();
  const picked = typeof verdict === "number" ? verdict : null;
  const found = [];
  if (verdict === "tie" || verdict === "both_bad") found.push([verdict === "tie" ? "a tie" : "both bad", { [verdict]: true }]);
  if (correction && found.length) found.push(["a correction", null]);
  else if (correction) {
    const target = picked ?? (n === 1 ? 0 : null);
    if (target === null) return { problem: `Pick the response your correction is of (1–${Math.min(n, 9)}).` };
    found.push([`a correction of response ${target + 1}`,
      { correction: { response_index: target, corrected_response: correction } }]);
  } else if (picked !== null) {
    if (!allowed("choice")) return { problem: `Type your correction of response ${picked + 1}.` };
    found.push([`a pick of response ${picked + 1}`, { choice: picked }]);
  }
  if (rated && rated < scores.length) return { problem: "Rate every response, or set the ratings back to “rate”." };
  if (rated) found.push(["ratings", { scores: scores.map(Number) }]);
  if (found.length > 1) {
    return { problem: `One judgement per item: you gave ${found.map(([what]) => what).join(" and ")}. ` +
      "Take back all but one (press a picked key again, set ratings back to “rate”, clear the correction)." };
  }
  if (found.length === 1) return { body: found[0][1] };
  const ways = [];
  if (allowed("choice")) ways.push(`pick a response (1–${Math.min(n, 9)})`);
  if (allowed("rating")) ways.push("rate every response");
  if (allowed("correction")) ways.push(allowed("choice") ? "correct the picked response" : "pick a response and correct it");
  if (allowed("tie")) ways.push("press t for a tie");
  if (allowed("both_bad")) ways.push("press b if both are bad");
  const said = ways.join(", ");
  return { problem: `${said.charAt(0).toUpperCase()}${said.slice(1)}.` };
}

async function submit() {
  if (!item) return;
  const { body, problem } = judgement();
  if (problem) {
    $("status").textContent = problem;
    return;
  }
  try {
    await api(path("judgements"), { item_id: item.item_id, ...body });
  } catch (err) {
    // A hold that lapsed while its place went to another rater: on to the next item, with the reason kept.
    if (!(err instanceof Refused && err.status === 409 && /expired/.test(err.message))) throw err;
    await next();
    $("status").textContent = err.message;
    return;
  }
  await next();
}

async function skip() {
  if (!item) return;
  await api(path("skip"), { item_id: item.item_id });
  await next();
}

async function undo() {
  const { item_id } = await api(path("undo"), {});
  await next();
  $("status").textContent = `Reopened item ${item_id}: judge it again.`;
}

async function showStats(id) {
  const stats = await api(`api/campaigns/${encodeURIComponent(id)}/stats`);
  const number = (x) => (x === null || x === undefined ? "–" : x.toFixed(3));
  $("stats-campaign").textContent = id;
  $("stats-summary").textContent = `Krippendorff's alpha: choices ${number(stats.alpha_choice)} (nominal), ` +
    `ratings ${number(stats.alpha_rating)} (ordinal); pairwise agreement ${number(stats.percent_agreement)}`;
  const raters = $("stats-raters");
  raters.replaceChildren();
  for (const r of stats.raters) {
    const row = document.createElement("tr");
    [r.rater_id, r.judgements, r.skips].forEach((v) => cell(row, v));
    raters.appendChild(row);
  }
  const pairs = $("stats-pairs");
  pairs.replaceChildren();
  for (const p of stats.pairs) {
    const row = document.createElement("tr");
    [p.rater_a, p.rater_b, p.units, p.agreed, number(p.units ? p.agreed / p.units : null)].forEach((v) => cell(row, v));
    pairs.appendChild(row);
  }
  show("stats");
}

document.addEventListener("keydown", (e) => {
  if ($("work").hidden) return;
  const typing = ["TEXTAREA", "INPUT"].includes(e.target.tagName);
  if (e.key === "Enter" && (!typing || e.ctrlKey)) {
    e.preventDefault();
    act(submit)();
    return;
  }
  if (typing || e.ctrlKey || e.metaKey || e.altKey) return;
  if (e.key === "u") act(undo)();
  if (!item) return;
  if (/^[1-9]$/.test(e.key) && Number(e.key) <= item.responses_html.length && pickable()) pick(Number(e.key) - 1);
  else if (e.key === "t" && allowed("tie")) pick("tie");
  else if (e.key === "b" && allowed("both_bad")) pick("both_bad");
  else if (e.key === "s") act(skip)();
});

$("login-form").addEventListener("submit", act(async (e) => {
  e.preventDefault();
  token = $("token").value.trim();
  sessionStorage.setItem("token", token);
  $("token").value = "";
  await start();
}));
$("logout").addEventListener("click", () => {
  token = "";
  sessionStorage.removeItem("token");
  showLogin();
});
// Buttons take no focus, so Enter keeps submitting after a click.
document.querySelectorAll("#actions button").forEach((b) => b.addEventListener("mousedown", (e) => e.preventDefault()));
$("tie").addEventListener("click", () => pick("tie"));
$("both-bad").addEventListener("click", () => pick("both_bad"));
$("skip").addEventListener("click", act(skip));
$("undo").addEventListener("click", act(undo));
$("submit").addEventListener("click", act(submit));
window.addEventListener("hashchange", act(route));
act(start)();
