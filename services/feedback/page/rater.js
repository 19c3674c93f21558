"use strict";
// The rater page. Texts go in with textContent; only the server's rendered markdown (raw HTML
// off, unsafe links refused) goes in with innerHTML, and the page's CSP runs no other script.
const $ = (id) => document.getElementById(id);
let token = sessionStorage.getItem("token") || "";
let me = null, campaign = null, item = null, verdict = null;

class Refused extends Error {}

async function api(path, body) {
  const init = { headers: token ? { Authorization: `Bearer ${token}` } : {} };
  if (body !== undefined) {
    init.method = "POST";
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  const reply = await fetch(path, init);
  const answer = await reply.json().catch(() => ({ error: reply.statusText }));
  if (reply.status === 401) {
    showLogin(token ? answer.error : "");
    throw new Refused(answer.error);
  }
  if (!reply.ok) {
    $("status").textContent = answer.error;
    throw new Refused(answer.error);
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
  show("work");
  await next();
}

function allowed(kind) {
  return campaign.judgements.includes(kind);
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
      if (e.target.tagName !== "SELECT" && e.target.tagName !== "OPTION" && allowed("choice")) pick(i);
    });
    box.appendChild(el);
  });
  markVerdict();
}

function pick(choice) {
  verdict = choice;
  markVerdict();
}

function markVerdict() {
  document.querySelectorAll(".response").forEach((el, i) => el.classList.toggle("chosen", verdict === i));
  for (const button of [$("tie"), $("both-bad")]) button.classList.toggle("selected", verdict === button.dataset.verdict);
}

async function submit() {
  if (!item) return;
  const body = { item_id: item.item_id };
  const scores = [...document.querySelectorAll(".response select")].map((s) => s.value);
  const correction = $("correction").value.trim();
  if (verdict === "tie" || verdict === "both_bad") body[verdict] = true;
  else if (correction && typeof verdict === "number") body.correction = { response_index: verdict, corrected_response: correction };
  else if (scores.length && scores.every((s) => s !== "")) body.scores = scores.map(Number);
  else if (typeof verdict === "number" && allowed("choice")) body.choice = verdict;
  else {
    $("status").textContent = allowed("rating") && !allowed("choice") ? "Rate every response." :
      "Pick a response (1–9)" + (allowed("rating") ? " or rate every response." : ".");
    return;
  }
  await api(path("judgements"), body);
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
  if (/^[1-9]$/.test(e.key) && Number(e.key) <= item.responses_html.length && allowed("choice")) pick(Number(e.key) - 1);
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
