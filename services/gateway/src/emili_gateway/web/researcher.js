// The researchers' page: the automatic loop's decisions (traced to the gate's numbers, pipelines and sessions), then
// studies, their progress per arm, canaries, exports, and the latest evaluation report of their arms.
// Plain JavaScript, no build step. The admin token is kept in sessionStorage (this tab only) and sent as a bearer
// token; exports and plots are fetched with it and handed to the browser as blob URLs.
"use strict";

const API = "/api/v1";
const TOKEN_KEY = "emili-researcher-token";
const RATING_DIMENSIONS = ["empathy", "relevance", "fluency"];
const VAD_DIMENSIONS = ["valence", "arousal", "dominance"];

const $ = (id) => document.getElementById(id);
let blobUrls = []; // Revoked on each refresh.

function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

async function request(path) {
  let response;
  try {
    response = await fetch(API + path, { headers: { Authorization: `Bearer ${token()}` } });
  } catch (err) {
    throw new Error("The gateway could not be reached. Check the connection and try again.");
  }
  if (!response.ok) {
    const data = await response.json().catch(() => ({}));
    const err = new Error(data.detail || `The gateway answered ${response.status}.`);
    err.status = response.status;
    throw err;
  }
  return response;
}

async function getJson(path) {
  return (await request(path)).json();
}

async function blobUrl(path) {
  const url = URL.createObjectURL(await (await request(path)).blob());
  blobUrls.push(url);
  return url;
}

function formatTime(ms) {
  return ms ? new Date(ms).toLocaleString() : "time not recorded";
}

function number(value, digits) {
  return typeof value === "number" && Number.isFinite(value) ? value.toFixed(digits) : "n/a";
}

function cell(stat, digits) {
  if (!stat || typeof stat !== "object") return "n/a";
  const [low, high] = Array.isArray(stat.ci95) ? stat.ci95 : [null, null];
  return `${number(stat.mean, digits)} [${number(low, digits)}, ${number(high, digits)}]`;
}

// A table's header row: one column header per name.
function tableHead(names) {
  const head = el("tr");
  for (const name of names) {
    const th = el("th", name);
    th.scope = "col";
    head.append(th);
  }
  const thead = el("thead");
  thead.append(head);
  return thead;
}

function table(caption, header, rows, studyArms) {
  const wrap = el("div", null, "table-wrap");
  const node = el("table");
  node.append(el("caption", caption));
  node.append(tableHead(header));
  const body = el("tbody");
  for (const [arm, cells] of rows) {
    const tr = el("tr", null, studyArms.includes(arm) ? "" : "other-arm");
    const th = el("th", studyArms.includes(arm) ? arm : `${arm} (not in this study)`);
    th.scope = "row";
    tr.append(th);
    for (const value of cells) tr.append(el("td", value));
    body.append(tr);
  }
  node.append(body);
  wrap.append(node);
  return wrap;
}

function capitalise(word) {
  return word.charAt(0).toUpperCase() + word.slice(1);
}

// --- one study --------------------------------------------------------------------------------------------

async function showProgress(card, study) {
  const body = card.querySelector(".progress-table tbody");
  try {
    const progress = await getJson(`/studies/${encodeURIComponent(study.study_id)}/progress`);
    card.querySelector(".progress-summary").textContent =
      `${progress.participants} participants, ${progress.sessions} sessions; ` +
      `${progress.invites} invites used ${progress.invite_uses} times.`;
    for (const arm of progress.arms) {
      const tr = el("tr");
      const th = el("th", arm.arm);
      th.scope = "row";
      tr.append(th);
      for (const key of ["weight", "assigned", "active", "completed", "abandoned", "withdrawn"]) {
        tr.append(el("td", arm[key]));
      }
      body.append(tr);
    }
  } catch (err) {
    card.querySelector(".progress-error").textContent = err.message;
  }
}

const CANARY_STATES = { running: "running", promoted: "promoted", rolled_back: "rolled back" };

async function showCanary(card, study) {
  const status = card.querySelector(".canary-status");
  let canary;
  try {
    canary = await getJson(`/studies/${encodeURIComponent(study.study_id)}/canary`);
  } catch (err) {
    status.textContent = err.status === 404 ? "No canary has run in this study." : err.message;
    return;
  }
  const when = canary.decided_ms ? `, decided ${formatTime(canary.decided_ms)}` : "";
  status.textContent =
    `${canary.candidate} in place of ${canary.production} for ${Math.round(canary.share * 100)}% of new ` +
    `participants: ${CANARY_STATES[canary.state]} (started ${formatTime(canary.started_ms)} by ` +
    `${canary.started_by}${when}; ${canary.participants} participants so far).`;
  const others = (canary.studies || []).filter((id) => id !== canary.study_id);
  if (others.length) {
    status.append(` One experiment with its canary in ${others.join(", ")}: the sessions of all are pooled, and ` +
      "one decision holds in each.");
  }
  card.querySelector(".canary-reason").textContent = canary.reason;
  const table = card.querySelector(".canary-table");
  const body = table.querySelector("tbody");
  for (const look of canary.looks) body.append(lookRow(look));
  table.hidden = canary.looks.length === 0;
  if (canary.looks.length) table.closest(".table-wrap").after(...canarySessionLists(canary));
}

// One outcome of a canary's last look: sessions per arm, the difference and the always-valid p-value for harm.
function lookRow(look) {
  const tr = el("tr");
  const th = el("th", look.outcome);
  th.scope = "row";
  tr.append(th, el("td", `${look.n_candidate} / ${look.n_production}`), el("td", number(look.difference, 3)),
    el("td", number(look.p_harm, 4)));
  return tr;
}

function looksTable(looks) {
  const wrap = el("div", null, "table-wrap");
  const node = el("table", null, "canary-looks");
  node.append(el("caption", "Its canary's last look, per outcome"));
  const thead = tableHead(["Outcome", "Sessions (candidate / production)", "Difference", "p (harm)"]);
  const body = el("tbody");
  for (const look of looks) body.append(lookRow(look));
  node.append(thead, body);
  wrap.append(node);
  return wrap;
}

async function exportSessions(card, study, format, button) {
  const error = card.querySelector(".export-error");
  error.textContent = "";
  button.disabled = true;
  try {
    const url = await blobUrl(`/studies/${encodeURIComponent(study.study_id)}/export?format=${format}`);
    const link = el("a");
    link.href = url;
    link.download = `${study.study_id}-sessions.${format}`;
    document.body.append(link);
    link.click();
    link.remove();
  } catch (err) {
    error.textContent = err.message;
  } finally {
    button.disabled = false;
  }
}

async function showReport(card, study) {
  const status = card.querySelector(".report-status");
  let report;
  try {
    report = await getJson(`/studies/${encodeURIComponent(study.study_id)}/report`);
  } catch (err) {
    status.textContent = err.status === 404 ? `No report yet: ${err.message}` : err.message;
    status.classList.toggle("error", err.status !== 404);
    return;
  }
  status.textContent = report.title;
  status.classList.add("ok");
  card.querySelector(".report-synthetic").hidden = report.synthetic !== true;
  card.querySelector(".report-meta").textContent =
    `Evaluation ${report.run_id} of ${report.arms.join(", ")}; last updated ${formatTime(report.updated_ms)}.`;

  const tables = card.querySelector(".report-tables");
  const ratings = Object.entries(report.ratings_table || {});
  if (ratings.length) {
    tables.append(table(
      "Table 1: human ratings (Likert 1-5, mean [bootstrap 95% CI])",
      ["Arm", "n", ...RATING_DIMENSIONS.map(capitalise)],
      ratings.map(([arm, row]) => [arm, [row.n ?? "n/a", ...RATING_DIMENSIONS.map((d) => cell(row[d], 2))]]),
      report.study_arms,
    ));
  } else {
    tables.append(el("p", "Table 1: no ratings recorded.", "hint"));
  }
  const deltas = Object.entries((report.delta_table && report.delta_table.arms) || {});
  if (deltas.length) {
    tables.append(table(
      "Table 2: change in VAD of the participants' texts, post-chat minus pre-chat (mean [bootstrap 95% CI])",
      ["Arm", "n", ...VAD_DIMENSIONS.map((d) => `Δ ${d}`)],
      deltas.map(([arm, row]) => [arm, [row.n ?? "n/a", ...VAD_DIMENSIONS.map((d) => cell(row[d], 3))]]),
      report.study_arms,
    ));
    const lexicon = report.delta_table.lexicon;
    tables.append(el("p", `Lexicon: ${lexicon || "n/a"}; sessions: ${report.delta_table.sessions ?? "n/a"}.`, "hint"));
  } else {
    tables.append(el("p", "Table 2: no labelled sessions with both surveys.", "hint"));
  }

  const plots = card.querySelector(".report-plots");
  for (const plot of report.plots) {
    const figure = el("figure");
    const img = el("img");
    img.alt = plot.title;
    figure.append(img, el("figcaption", plot.title));
    plots.append(figure);
    blobUrl(plot.url.startsWith(API) ? plot.url.slice(API.length) : plot.url)
      .then((url) => { img.src = url; })
      .catch((err) => { figure.replaceChildren(el("p", `${plot.title}: ${err.message}`, "error")); });
  }
}

function studyCard(study) {
  const card = $("study-template").content.firstElementChild.cloneNode(true);
  card.id = anchorId("study", study.study_id);
  card.querySelector(".canary-title").id = anchorId("canary", study.study_id);
  card.querySelector(".study-title").textContent = study.name;
  card.querySelector(".study-synthetic").hidden = study.synthetic !== true;
  const arms = study.arms.map((a) => `${a.arm} (weight ${a.weight})`).join(", ");
  card.querySelector(".study-meta").textContent =
    `${study.study_id} · created ${formatTime(study.created_ms)} by ${study.created_by} · arms: ${arms}`;
  for (const button of card.querySelectorAll("button.export")) {
    button.addEventListener("click", () => exportSessions(card, study, button.dataset.format, button));
  }
  showProgress(card, study);
  showCanary(card, study);
  showReport(card, study);
  return card;
}

// --- the automatic loop -------------------------------------------------------------------------------------

const PHASES = {
  idle: "idle (waiting for enough new sessions)",
  training: "training a candidate",
  gating: "judging a candidate at the evaluation gate",
  canary: "running a canary",
};

function anchorId(prefix, name) {
  return `${prefix}-${String(name).replace(/[^A-Za-z0-9_-]/g, "_")}`;
}

function numbersText(numbers) {
  const parts = Object.entries(numbers || {}).map(([key, value]) => {
    const shown = Array.isArray(value) ? value.join(", ") || "none" : value;
    return `${key.replaceAll("_", " ")}: ${typeof shown === "object" ? JSON.stringify(shown) : shown}`;
  });
  return parts.join("; ");
}

// The sessions a canary's last look compared: what its decision rests on.
function canarySessionLists(canary) {
  const sessions = canary.sessions || {};
  return [
    sessionList(`Canary sessions of the candidate (${canary.candidate})`, sessions.candidate || []),
    sessionList(`Canary sessions of the production arm (${canary.production})`, sessions.production || []),
  ];
}

// An expandable list of session ids (they can be many).
function sessionList(title, ids) {
  const details = el("details", null, "session-list");
  details.append(el("summary", `${title} (${ids.length})`));
  if (ids.length) {
    const list = el("ol", null, "session-ids");
    for (const id of ids) {
      const item = el("li");
      item.append(el("code", id));
      list.append(item);
    }
    details.append(list);
  } else {
    details.append(el("p", "None recorded.", "hint"));
  }
  return details;
}

function pipelineTrace(pipeline) {
  const box = el("div", null, "pipeline-trace");
  const models = Object.entries(pipeline.models || {}).map(([step, version]) => `${step}: ${version}`).join(", ");
  const steps = Object.entries(pipeline.steps || {}).map(([step, state]) => `${step} ${state}`).join(", ");
  box.append(el("p",
    `Pipeline ${pipeline.pipeline_id}, compared with ${pipeline.baseline || "base"}; started ` +
    `${formatTime(pipeline.created_ms)}, last updated ${formatTime(pipeline.updated_ms)}. ` +
    `Trained: ${models || "nothing yet"}.`, "hint"));
  if (steps) box.append(el("p", `Steps: ${steps}.`, "hint"));
  box.append(
    sessionList("Training sessions", pipeline.train_sessions || []),
    sessionList("Held-out sessions (evaluation only)", pipeline.heldout_sessions || []),
  );
  return box;
}

// Loaded when first opened: the details element's body is filled by ``fill(body)``.
function lazyDetails(summary, className, fill) {
  const details = el("details", null, className);
  details.append(el("summary", summary));
  const body = el("div", null, "trace");
  details.append(body);
  let loaded = false;
  details.addEventListener("toggle", async () => {
    if (!details.open || loaded) return;
    loaded = true;
    body.replaceChildren(el("p", "Loading…", "status"));
    try {
      body.replaceChildren(...await fill());
    } catch (err) {
      loaded = false;
      body.replaceChildren(el("p", err.message, "error"));
    }
  });
  return details;
}

function pipelineDetails(pipelineId) {
  return lazyDetails(pipelineId, "loop-pipeline", async () => {
    const pipeline = await getJson(`/loop/pipelines/${encodeURIComponent(pipelineId)}`);
    return [pipelineTrace(pipeline)];
  });
}

function verdictTable(verdict) {
  const wrap = el("div", null, "table-wrap");
  const node = el("table", null, "verdict-table");
  node.append(el("caption",
    `Gate "${verdict.policy}": ${verdict.passed ? "passed" : "failed"} (${formatTime(verdict.decided_ms)}, ` +
    `${verdict.sessions ?? "n/a"} sessions)`));
  const thead = tableHead(["Check", "Metric", "Kind", "n", "Estimate", "Interval", "Result", "Reason"]);
  const body = el("tbody");
  for (const check of verdict.checks) {
    const tr = el("tr", null, check.passed ? "passed" : "failed");
    const th = el("th", check.name);
    th.scope = "row";
    // An association check has a p-value, not an interval (its estimate is Spearman's rho).
    const interval = Array.isArray(check.ci) ? `[${number(check.ci[0], 3)}, ${number(check.ci[1], 3)}]`
      : check.p_value != null ? `p = ${number(check.p_value, 4)}` : "n/a";
    const paired = check.paired && check.kind !== "associated";  // An association's items are always pairs.
    const kind = `${check.kind.replaceAll("_", " ")}${paired ? ", paired" : ""}`;
    const n = check.min_n ? `${check.n} (needs ${check.min_n})` : check.n;
    tr.append(th, el("td", check.metric), el("td", kind), el("td", n),
      el("td", number(check.estimate, 3)), el("td", interval), el("td", check.passed ? "passed" : "failed"),
      el("td", check.reason, "reason"));
    body.append(tr);
  }
  node.append(thead, body);
  wrap.append(node);
  return wrap;
}

function canaryTrace(detail) {
  const box = el("p", null, "canary-trace");
  if (!detail.studies.length) {
    box.textContent = "No canary: the loop gave this candidate no share of a study.";
    return box;
  }
  const canary = detail.canary;
  const where = `${detail.studies.length > 1 ? "studies" : "study"} ${detail.studies.join(", ")}`;
  box.append(canary
    ? `Canary in ${where}: ${CANARY_STATES[canary.state]}` +
      `${canary.reason ? ` (${canary.reason})` : ""}; ${canary.participants} participants. `
    : `Canary in ${where}: its record was not found. `);
  detail.studies.forEach((studyId, i) => {
    const link = el("a", detail.studies.length > 1 ? `See ${studyId}'s canary` : "See the study's canary");
    link.href = `#${anchorId("canary", studyId)}`;
    box.append(i ? ", " : "", link);
  });
  return box;
}

function candidateTrace(detail) {
  const parts = [];
  if (detail.pipeline) {
    parts.push(pipelineTrace(detail.pipeline));
  } else {
    parts.push(el("p", "Its pipeline's record was not found.", "hint"));
  }
  if (detail.registered) {
    const datasets = detail.lineage_datasets.map((d) => `${d.id}${d.kind ? ` (${d.kind})` : ""}`).join(", ");
    parts.push(el("p",
      `Registered; learned from datasets ${datasets || "none recorded"}` +
      `${detail.lineage_parents.length ? `, starting from ${detail.lineage_parents.join(" ← ")}` : ""}.`, "hint"));
    parts.push(sessionList("Sessions it learned from (model registry lineage)", detail.lineage_sessions));
  } else {
    parts.push(el("p", "Not in the model registry.", "hint"));
  }
  parts.push(canaryTrace(detail));
  // The candidate's own canary numbers: the study's card shows only its newest canary's.
  if (detail.canary && detail.canary.looks.length) {
    parts.push(looksTable(detail.canary.looks), ...canarySessionLists(detail.canary));
  }
  return parts;
}

function candidateCard(candidate) {
  const verdict = candidate.verdict;
  const gate = verdict ? `gate ${verdict.passed ? "passed" : "failed"}` : "not judged by the gate yet";
  const latest = candidate.latest_event ? `; latest: ${candidate.latest_event} (${formatTime(candidate.latest_ms)})` : "";
  const details = lazyDetails(`${candidate.version}: ${gate}${latest}`, "loop-candidate", async () => {
    const detail = await getJson(`/loop/candidates/${encodeURIComponent(candidate.version)}`);
    return candidateTrace(detail);
  });
  details.id = anchorId("loop-candidate", candidate.version);
  details.classList.add(verdict ? (verdict.passed ? "passed" : "failed") : "pending");
  // The verdict is in the loop's view already: shown before the trace that is loaded on opening.
  details.insertBefore(verdict ? verdictTable(verdict) : el("p", "No verdict yet.", "hint"), details.lastChild);
  return details;
}

function openCandidate(version) {
  const card = document.getElementById(anchorId("loop-candidate", version));
  if (!card) return;
  card.open = true;
  card.scrollIntoView({ block: "start" });
}

function historyRow(event, listed) {
  const tr = el("tr");
  const th = el("th", formatTime(event.at_ms));
  th.scope = "row";
  const candidate = el("td");
  if (event.candidate) {
    if (listed.has(event.candidate)) {
      const link = el("a", event.candidate);
      link.href = `#${anchorId("loop-candidate", event.candidate)}`;
      link.addEventListener("click", (e) => { e.preventDefault(); openCandidate(event.candidate); });
      candidate.append(link);
    } else {
      candidate.textContent = event.candidate;
    }
  }
  const pipeline = el("td", null, "trace-cell");
  if (event.pipeline_id) pipeline.append(pipelineDetails(event.pipeline_id));
  const numbers = el("td", numbersText(event.numbers), "numbers");
  event.studies.forEach((studyId, i) => {
    const link = el("a", `canary in ${studyId}`);
    link.href = `#${anchorId("canary", studyId)}`;
    numbers.append(numbers.textContent || i ? "; " : "", link);
  });
  tr.append(th, el("td", event.event), el("td", event.phase || ""), candidate, pipeline, numbers);
  return tr;
}

async function showLoop() {
  $("loop").hidden = false;
  $("loop-error").textContent = "";
  $("loop-body").hidden = true;
  $("loop-history").querySelector("tbody").replaceChildren();
  $("loop-candidates").replaceChildren();
  $("loop-status").textContent = "Loading the loop…";
  let view;
  try {
    view = await getJson("/loop");
  } catch (err) {
    $("loop-status").textContent = "";
    $("loop-error").textContent = err.message;
    return;
  }
  if (!view.ran) {
    $("loop-status").textContent = "The automatic loop has not run yet: no decisions to show.";
    return;
  }
  const candidate = view.candidate ? `; candidate ${view.candidate}` : "";
  const pipeline = view.pipeline_id ? ` (pipeline ${view.pipeline_id})` : "";
  const shown = view.events > view.history.length ? `; the newest ${view.history.length} are listed` : "";
  $("loop-status").textContent =
    `Phase: ${PHASES[view.phase] || view.phase}${candidate}${pipeline}. Production: ` +
    `${view.production || "the study's own arm (nothing promoted yet)"}. ${view.events} decisions${shown}; ` +
    `${view.used_sessions} sessions used by candidates so far.`;
  const listed = new Set(view.candidates.map((c) => c.version));
  const body = $("loop-history").querySelector("tbody");
  for (const event of view.history) body.append(historyRow(event, listed));
  for (const c of view.candidates) $("loop-candidates").append(candidateCard(c));
  if (!view.candidates.length) $("loop-candidates").append(el("p", "No candidate yet.", "hint"));
  $("loop-body").hidden = false;
}

function hideLoop() {
  $("loop").hidden = true;
  $("loop-history").querySelector("tbody").replaceChildren();
  $("loop-candidates").replaceChildren();
}

// --- the page ---------------------------------------------------------------------------------------------

async function load() {
  for (const url of blobUrls) URL.revokeObjectURL(url);
  blobUrls = [];
  $("studies").replaceChildren();
  $("token-error").textContent = "";
  $("studies-status").textContent = "Loading studies…";
  const loop = showLoop();
  try {
    const { studies } = await getJson("/studies");
    $("studies-status").textContent = studies.length
      ? `${studies.length} ${studies.length === 1 ? "study" : "studies"}, newest first.`
      : "No studies yet (create one with POST /api/v1/studies).";
    for (const study of [...studies].reverse()) $("studies").append(studyCard(study));
    $("refresh").hidden = false;
    $("token-forget").hidden = false;
  } catch (err) {
    $("studies-status").textContent = "";
    $("token-error").textContent = err.status === 401 || err.status === 403
      ? `${err.message} (an admin token is needed)` : err.message;
    hideLoop();
  }
  await loop;
}

function useToken(event) {
  event.preventDefault();
  const value = $("admin-token").value.trim();
  if (!value && !token()) {
    $("token-error").textContent = "Paste an admin token first.";
    $("admin-token").focus();
    return;
  }
  if (value) sessionStorage.setItem(TOKEN_KEY, value);
  $("admin-token").value = "";
  load();
}

function forget() {
  sessionStorage.removeItem(TOKEN_KEY);
  $("studies").replaceChildren();
  hideLoop();
  $("studies-status").textContent = "The token is forgotten.";
  $("refresh").hidden = true;
  $("token-forget").hidden = true;
}

$("token-form").addEventListener("submit", useToken);
$("refresh").addEventListener("click", load);
$("token-forget").addEventListener("click", forget);
if (token()) load();
