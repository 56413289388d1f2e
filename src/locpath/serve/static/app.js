// locpath's page: slides with thumbnails and ingestion progress, and a chat panel whose answers stream in (server-sent
// events read from fetch), with timings and the evidence heatmap of the last answer. No build step.
"use strict";
const $ = (id) => document.getElementById(id);
let selected = null;

function headers(extra) {
  const h = Object.assign({}, extra || {});
  const key = $("apikey").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function api(path, options) {
  const opts = Object.assign({}, options || {});
  opts.headers = headers(opts.headers);
  const r = await fetch(path, opts);
  if (!r.ok) {
    let msg = r.status + " " + r.statusText;
    try { msg = (await r.json()).error.message; } catch (e) { /* not JSON */ }
    throw new Error(msg);
  }
  return r;
}

async function imageURL(path) {  // thumbnails need the API key too: fetch them, show them as blobs
  const r = await api(path);
  return URL.createObjectURL(await r.blob());
}

const thumbs = new Map();  // slide id -> promise of its thumbnail's object URL: fetched once, not at every refresh
function thumbURL(s) {
  if (!thumbs.has(s.id)) {
    const p = imageURL(s.thumbnail);
    p.catch(() => thumbs.delete(s.id));
    thumbs.set(s.id, p);
  }
  return thumbs.get(s.id);
}

let viewSeq = 0;  // only the latest image asked for reaches the view (a slow thumbnail must not cover a heatmap)
let viewBlob = null;  // the heatmap's object URL, released when replaced
async function showView(urlPromise, evidenceJob) {
  const seq = ++viewSeq;
  const url = await urlPromise;
  if (seq !== viewSeq) {
    if (evidenceJob) URL.revokeObjectURL(url);
    return;
  }
  const img = $("view-image");
  if (viewBlob) URL.revokeObjectURL(viewBlob);
  viewBlob = evidenceJob ? url : null;
  img.onload = () => {
    if (evidenceJob) img.dataset.evidence = evidenceJob;
    else delete img.dataset.evidence;
  };
  img.src = url;
}

function slideItem(s) {
  const li = document.createElement("li");
  li.dataset.id = s.id;
  li.dataset.status = s.status;
  if (selected && selected.id === s.id) li.classList.add("selected");
  const img = document.createElement("img");
  img.alt = s.name;
  if (s.status === "ready") thumbURL(s).then((u) => { img.src = u; }).catch(() => {});
  const text = document.createElement("div");
  text.innerHTML = "<div class='name'></div><div class='status'></div><div class='progress'><div></div></div>";
  text.querySelector(".name").textContent = s.name;
  text.querySelector(".status").textContent = s.status + (s.status === "ready" ? " - " + s.tiles + " tiles" :
    s.status === "failed" ? ": " + (s.error || "") : " " + Math.round(100 * s.progress) + "%");
  text.querySelector(".progress > div").style.width = Math.round(100 * s.progress) + "%";
  li.append(img, text);
  li.onclick = () => select(s);
  return li;
}

async function refresh() {
  try {
    const r = await api("/v1/slides");
    const slides = (await r.json()).slides;
    const ul = $("slides");
    ul.replaceChildren(...slides.map(slideItem));
    if (selected) {
      const now = slides.find((s) => s.id === selected.id);
      if (now && now.status !== selected.status) select(now);
    }
    $("slides-error").textContent = "";
  } catch (e) {
    $("slides-error").textContent = e.message;
  }
}

async function select(s) {
  selected = s;
  document.querySelectorAll("#slides li").forEach((li) => li.classList.toggle("selected", li.dataset.id === s.id));
  $("chat-title").textContent = s.name + " (" + s.status + ")";
  const ready = s.status === "ready";
  $("question").disabled = !ready;
  $("ask-button").disabled = !ready;
  if (ready) LocpathViewer.open(s);  // viewer.js
  if (ready) await showView(thumbURL(s), null);
}

function sseEvents(text) {  // complete "event:/data:" blocks of a server-sent-event buffer, and the rest
  const blocks = text.split(/\r?\n\r?\n/);
  const rest = blocks.pop();
  const events = blocks.map((b) => {
    const ev = { event: "message", data: "" };
    b.split(/\r?\n/).forEach((line) => {
      if (line.startsWith("event:")) ev.event = line.slice(6).trim();
      else if (line.startsWith("data:")) ev.data += line.slice(5).trim();
    });
    return ev;
  });
  return [events, rest];
}

async function ask(question) {
  $("answer").textContent = "";
  $("timings").textContent = "";
  showTrust(null);
  $("chat-error").textContent = "";
  $("answer").dataset.state = "streaming";
  const r = await api("/v1/slides/" + selected.id + "/questions", {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ question: question, stream: true }),
  });
  const reader = r.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    const [events, rest] = sseEvents(buffer);
    buffer = rest;
    for (const ev of events) {
      if (!ev.data) continue;
      const data = JSON.parse(ev.data);
      if (ev.event === "piece") $("answer").textContent += data.text;
      else if (ev.event === "done") finish(question, data);
      else if (ev.event === "error") throw new Error(data.message);
    }
  }
}

// how far to trust the answer (its "trust" field): the confidence and each warning in words, under the answer
function showTrust(trust) {
  let box = $("trust");
  if (!box) {
    box = document.createElement("div");
    box.id = "trust";
    $("answer").after(box);
  }
  box.textContent = "";
  if (!trust || trust.confidence == null) return;
  const line = document.createElement("div");
  line.className = "confidence";
  line.textContent = "confidence " + trust.confidence.toFixed(3) + (trust.calibrated ? "" : " (uncalibrated)") +
    (trust.abstained ? "; abstained (decoded answer: " + trust.raw_answer + ")" : "");
  box.append(line);
  for (const w of trust.warnings || []) {
    const d = document.createElement("div");
    d.className = "error warning";
    d.dataset.code = w.code;
    d.textContent = "\u26a0 " + w.message;
    box.append(d);
  }
}

async function finish(question, data) {
  const t = data.timings_ms;
  $("answer").textContent = data.answer;
  showTrust(data.trust);
  $("answer").dataset.state = "done";
  $("timings").textContent = "time to first token " + t.time_to_first_token.toFixed(0) + " ms, prefill " +
    (t.prefill || 0).toFixed(1) + " ms, decode " + (t.decode_per_token || 0).toFixed(2) + " ms/token, total " +
    t.total.toFixed(0) + " ms; " + (data.evidence ? data.evidence.top.length + " evidence tiles" : "");
  const li = document.createElement("li");
  li.textContent = question + " - " + data.answer;
  $("history").prepend(li);
  if (data.job) LocpathViewer.evidence(data.job, data.evidence)
    .catch((e) => { $("chat-error").textContent = e.message; });  // viewer.js
  if (data.job) await showView(imageURL(selected.thumbnail + "?evidence=" + data.job), data.job);
}

$("register-form").onsubmit = async (e) => {
  e.preventDefault();
  try {
    await api("/v1/slides", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ path: $("register-path").value.trim() }) });
    $("register-path").value = "";
    refresh();
  } catch (err) { $("slides-error").textContent = err.message; }
};

$("upload-form").onsubmit = async (e) => {
  e.preventDefault();
  const f = $("upload-file").files[0];
  if (!f) return;
  try {
    await api("/v1/slides/upload?filename=" + encodeURIComponent(f.name), { method: "POST", body: f });
    refresh();
  } catch (err) { $("slides-error").textContent = err.message; }
};

$("ask-form").onsubmit = async (e) => {
  e.preventDefault();
  const q = $("question").value.trim();
  if (!q || !selected) return;
  try { await ask(q); } catch (err) { $("chat-error").textContent = err.message; $("answer").dataset.state = "error"; }
};

$("apikey").value = sessionStorage.getItem("locpath-key") || "";
$("apikey").onchange = () => { sessionStorage.setItem("locpath-key", $("apikey").value); refresh(); };
api("/v1/models").then((r) => r.json()).then((m) => { $("model").textContent = m.data[0].bundle; }).catch(() => {});
refresh();
setInterval(refresh, 2000);
