// wbc-batch review: plain JavaScript, no build step, nothing loaded from elsewhere.
// Every value from the server goes into the page as text (textContent), never as HTML.
"use strict";

const state = {session: null, samples: [], sel: 0, sample: null, cells: [], order: [], cur: null, camAll: false,
  queue: Promise.resolve()};
const $ = (id) => document.getElementById(id);

function h(tag, attrs, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const kid of kids.flat()) if (kid !== null && kid !== undefined && kid !== false)
    el.append(kid instanceof Node ? kid : String(kid));
  return el;
}

const LABELS = {ig: "IG", non_wbc: "Non-WBC"};
const label = (c) => LABELS[c] || (c ? c.charAt(0).toUpperCase() + c.slice(1) : "");
const pct = (k, n) => (n ? (100 * k / n).toFixed(1) : "—");
const when = (iso) => (iso ? iso.replace("T", " ").slice(0, 16) + " UTC" : "");

function toast(text, error) {
  const t = $("toast");
  t.textContent = text; t.className = error ? "error" : ""; t.hidden = false;
  clearTimeout(toast.timer); toast.timer = setTimeout(() => { t.hidden = true; }, error ? 6000 : 2500);
}

async function api(path, body) {
  const opts = {credentials: "same-origin", headers: {}};
  if (body !== undefined) {
    opts.method = "POST";
    opts.headers = {"Content-Type": "application/json", "X-WBC-Review": "1"};
    opts.body = JSON.stringify(body);
  }
  const res = await fetch(path, opts);
  const data = await res.json().catch(() => ({}));
  if (!res.ok) {
    const detail = typeof data.detail === "string" ? data.detail : res.statusText;
    throw Object.assign(new Error(detail), {status: res.status});
  }
  return data;
}

// --- reviewer name -------------------------------------------------------------

function reviewer() {
  const name = $("reviewer").value.trim();
  if (!name) {
    $("reviewer").classList.add("need"); $("reviewer").focus();
    toast("Type your name first: every verdict is recorded under it.", true);
  }
  return name;
}

// --- dialog -----------------------------------------------------------------

function ask({title, text, input, value, ok}) {
  return new Promise((resolve) => {
    const d = $("dialog");
    $("dialog-title").textContent = title; $("dialog-text").textContent = text || "";
    $("dialog-label").hidden = !input; $("dialog-label-text").textContent = input || "";
    $("dialog-input").value = value || ""; $("dialog-ok").firstChild.textContent = (ok || "OK") + " ";
    const done = (result) => { d.close(); cleanup(); resolve(result); };
    const onSubmit = (e) => {
      e.preventDefault();
      if (input && !$("dialog-input").value.trim()) { $("dialog-input").focus(); return; }
      done(input ? $("dialog-input").value.trim() : true);
    };
    const onCancel = (e) => { e.preventDefault(); done(null); };
    const cleanup = () => {
      $("dialog-form").removeEventListener("submit", onSubmit); d.removeEventListener("cancel", onCancel);
      $("dialog-cancel").removeEventListener("click", onCancel);
    };
    $("dialog-form").addEventListener("submit", onSubmit); d.addEventListener("cancel", onCancel);
    $("dialog-cancel").addEventListener("click", onCancel);
    d.showModal();
    (input ? $("dialog-input") : $("dialog-ok")).focus();
  });
}

// --- samples page --------------------------------------------------------------

function statusPill(s) {
  if (s.signed_off) return h("span", {class: "pill signed"}, `Signed off by ${s.signed_off.by}`);
  if (s.unreliable) return h("span", {class: "pill bad"}, "Unreliable: many cells out of distribution");
  if (s.awaiting) return h("span", {class: "pill open"}, `${s.awaiting} awaiting review`);
  return h("span", {class: "pill done"}, "Ready to sign off");
}

async function showSamples() {
  state.sample = null;
  $("crumb").textContent = state.session ? state.session.output : "";
  state.samples = await api("/api/samples");
  state.sel = Math.min(state.sel, Math.max(0, state.samples.length - 1));
  const rows = state.samples.map((s, i) => h("tr", {class: "row" + (i === state.sel ? " sel" : ""), "data-sample": s.sample_id,
    onclick: () => openSample(s.sample_id)},
    h("td", {}, h("strong", {}, s.sample_id || "(no sample id)")),
    h("td", {class: "num"}, s.cells), h("td", {class: "num"}, s.awaiting), h("td", {class: "num"}, `${s.verified} / ${s.cells}`),
    h("td", {class: "num"}, s.out_of_distribution ? `${s.out_of_distribution} (${(100 * s.ood_share).toFixed(0)}%)` : "0"),
    h("td", {class: "num"}, s.errors),
    h("td", {}, statusPill(s), s.signed_off ? h("div", {class: "muted"}, when(s.signed_off.at)) : null)));
  $("view").replaceChildren(
    h("table", {class: "samples", id: "samples"},
      h("thead", {}, h("tr", {}, ["Sample", "Cells", "Awaiting review", "Verified", "Out of distribution", "Unreadable", "Status"]
        .map((t) => h("th", {}, t)))),
      h("tbody", {}, rows)),
    h("p", {class: "hint"}, h("kbd", {}, "↑"), " ", h("kbd", {}, "↓"), " choose a sample, ", h("kbd", {}, "Enter"), " open it."));
}

function moveSampleSel(delta) {
  if (!state.samples.length) return;
  state.sel = Math.max(0, Math.min(state.samples.length - 1, state.sel + delta));
  document.querySelectorAll("#samples tr.row").forEach((tr, i) => tr.classList.toggle("sel", i === state.sel));
  document.querySelectorAll("#samples tr.row")[state.sel].scrollIntoView({block: "nearest"});
}

// --- sample page ------------------------------------------------------------------

function openSample(id) { location.hash = "sample=" + encodeURIComponent(id); }

function counted(c) { return c.verified || c.predicted; }

function cellOrder(cells) {
  // Review-queue cells first (as an analyser's "unidentified" group), then one group per class in model order.
  const classes = state.session.classes;
  const rank = (c) => classes.indexOf(c.predicted);
  const byConf = (a, b) => rank(a) - rank(b) || a.confidence - b.confidence;
  const queue = cells.filter((c) => c.needs_review).sort(byConf);
  const groups = [{key: "queue", title: "Awaiting review", cells: queue}];
  for (const cls of classes) {
    const members = cells.filter((c) => !c.needs_review && c.predicted === cls).sort((a, b) => a.confidence - b.confidence);
    if (members.length) groups.push({key: cls, title: label(cls), cells: members});
  }
  return groups;
}

function verdictBadge(c) {
  if (!c.verified) return null;
  const kind = c.action === "amend" ? "amend" : c.verified !== c.predicted ? "reclassify" : "confirm";
  const text = (kind === "amend" ? "✎ " : kind === "confirm" ? "✓ " : "→ ") + label(c.verified);  // ✎: amended after sign-off
  return h("span", {class: "verdict " + kind, title: `${c.action || "verdict"} by ${c.verified_by}`}, text);
}

function tile(c) {
  const img = h("img", {src: `/api/cells/${c.id}/image`, alt: c.name, loading: "lazy", draggable: "false"});
  const el = h("div", {class: "tile" + (c.needs_review ? " queue" : "") + (c.verified ? " done" : ""), id: "t-" + c.id,
      "data-cell": c.id, onclick: () => select(c.id),
      onmouseenter: () => { if (c.has_heatmap && !state.camAll) img.src = `/api/cells/${c.id}/heatmap`; },
      onmouseleave: () => { if (!state.camAll) img.src = `/api/cells/${c.id}/image`; }},
    img,
    h("div", {class: "flags"}, c.needs_review ? h("span", {class: "flag q", title: "in the review queue"}, "review") : null,
      c.ood ? h("span", {class: "flag ood", title: "out of distribution"}, "OOD") : null,
      c.suspect ? h("span", {class: "flag cam", title: "Grad-CAM evidence lies off the cell"}, "CAM") : null),
    verdictBadge(c),
    h("div", {class: "cap"}, h("span", {}, label(c.predicted)),
      h("span", {class: "conf" + (c.confidence < 0.8 ? " low" : "")}, c.confidence.toFixed(2))));
  return el;
}

function renderGallery() {
  const groups = cellOrder(state.cells);
  state.order = groups.flatMap((g) => g.cells.map((c) => c.id));
  return h("section", {class: "gallery", id: "gallery"}, groups.filter((g) => g.cells.length).map((g) =>
    h("div", {class: "group" + (g.key === "queue" ? " queue" : ""), "data-group": g.key},
      h("h2", {}, g.title, h("span", {class: "n"}, `${g.cells.length}`),
        g.key === "queue" ? h("span", {class: "n"}, "· low confidence, out of distribution or Grad-CAM off the cell") : null),
      h("div", {class: "tiles"}, g.cells.map(tile)))));
}

function differentialTable() {
  const nonWbc = new Set(state.session.non_wbc);
  const white = (cls) => cls && !nonWbc.has(cls);
  const model = {}, now = {};
  let nModel = 0, nNow = 0;
  for (const c of state.cells) {
    if (white(c.predicted)) { model[c.predicted] = (model[c.predicted] || 0) + 1; nModel++; }
    if (white(counted(c))) { now[counted(c)] = (now[counted(c)] || 0) + 1; nNow++; }
  }
  const verified = state.cells.filter((c) => c.verified).length;
  const rows = state.session.classes.filter(white).map((cls) => {
    const m = model[cls] || 0, v = now[cls] || 0;
    return h("tr", {class: m !== v ? "changed" : "", "data-class": cls}, h("td", {}, label(cls)),
      h("td", {}, m), h("td", {}, pct(m, nModel)), h("td", {class: "v"}, v), h("td", {}, pct(v, nNow)));
  });
  return h("div", {id: "differential"},
    h("table", {class: "diff"},
      h("thead", {}, h("tr", {}, h("th", {}, "Class"), h("th", {}, "Model"), h("th", {}, "%"), h("th", {}, "Verified"), h("th", {}, "%"))),
      h("tbody", {}, rows),
      h("tfoot", {}, h("tr", {}, h("td", {}, "White cells"), h("td", {}, nModel), h("td", {}), h("td", {}, nNow), h("td", {})))),
    h("div", {class: "muted", id: "verified-count"}, `${verified} of ${state.cells.length} cells have a verdict; `,
      "“Verified” counts each cell under its verdict, else under the model's class."));
}

function signBox() {
  const s = state.sample.summary;
  if (s.signed_off) {
    return h("div", {class: "signbox signed", id: "signbox"}, h("strong", {}, `Signed off by ${s.signed_off.by}`),
      h("div", {class: "muted"}, when(s.signed_off.at)),
      h("div", {class: "muted"}, "Locked: a change is recorded as an amendment with a reason."));
  }
  const waiting = s.awaiting;
  return h("div", {class: "signbox", id: "signbox"},
    h("button", {class: "primary", id: "sign-off", disabled: waiting > 0, onclick: signOff},
      waiting ? `Sign off (${waiting} still awaiting review)` : "Sign off sample…"),
    h("div", {class: "muted"}, "Needs your name; locks the sample."));
}

function trailList() {
  const items = state.sample.trail.slice().reverse().map((t) => h("li", {},
    h("span", {class: "muted"}, when(t.at).slice(11, 16) + " "), h("strong", {}, t.reviewer), " ",
    t.action === "sign-off" ? "signed off" : `${t.action} ${t.cell || ""}: ${label(t.predicted)} → ${label(t.verified)}`,
    t.reason ? ` (“${t.reason}”)` : "", t.source !== "app" ? ` [${t.source}]` : ""));
  return h("details", {id: "trail"}, h("summary", {}, `Trail (${state.sample.trail.length} records)`),
    h("ul", {class: "trail"}, items));
}

function cellPanel() {
  const c = state.cells.find((x) => x.id === state.cur);
  if (!c) return h("p", {class: "muted"}, "No cells.");
  const why = [c.needs_review && c.confidence < 0.8 ? "low confidence" : null, c.ood ? "out of distribution" : null,
    c.suspect ? "Grad-CAM off the cell" : null].filter(Boolean);
  const big = h("div", {class: "big" + (state.camAll ? " showcam" : ""), id: "big"},
    h("img", {src: `/api/cells/${c.id}/image`, alt: c.name}),
    c.has_heatmap ? h("img", {class: "cam", src: `/api/cells/${c.id}/heatmap`, alt: "Grad-CAM"}) : null);
  if (c.has_heatmap) {
    big.addEventListener("mouseenter", () => big.classList.add("showcam"));
    big.addEventListener("mouseleave", () => big.classList.toggle("showcam", state.camAll));
  }
  const keys = state.session.classes.map((cls, i) => h("button", {
      class: (cls === c.predicted ? "model" : "") + (cls === c.verified ? " current" : ""), "data-class": cls,
      onclick: () => verdict(cls)}, h("kbd", {}, i + 1), label(cls)));
  return h("div", {id: "cell-panel"}, h("div", {class: "cellrow"}, big,
    h("div", {class: "cellinfo"},
      h("div", {class: "model"}, "Model: ", h("strong", {}, label(c.predicted)), ` ${c.confidence.toFixed(2)}`),
      c.top.length > 1 ? h("div", {class: "muted"}, `next: ${label(c.top[1].cls)} ${c.top[1].p.toFixed(2)}`) : null,
      why.length ? h("div", {class: "why"}, "Flagged: " + why.join(", ")) : null,
      h("div", {id: "cell-verdict"}, c.verified ? `Verdict: ${label(c.verified)} (${c.verified_by})` : "No verdict yet"),
      c.has_heatmap ? h("div", {class: "muted"}, "Hover the image for Grad-CAM") : null,
      h("div", {class: "name"}, c.name))),
    h("h3", {}, "Class"), h("div", {class: "keys"}, keys),
    h("div", {class: "actions"},
      h("button", {id: "confirm", onclick: () => verdict(c.predicted)}, h("kbd", {}, "Enter"), ` Confirm ${label(c.predicted)}`),
      h("button", {id: "confirm-rest", onclick: confirmRest}, h("kbd", {}, "Shift+Enter"), " Confirm the rest"),
      h("button", {id: "toggle-cam", onclick: toggleCam}, h("kbd", {}, "G"), state.camAll ? " Hide Grad-CAM" : " Show Grad-CAM")));
}

function renderPanel() {
  $("panel").replaceChildren(cellPanel(), h("h3", {}, "Differential"), differentialTable(),
    h("h3", {}, "Sign-off"), signBox(), trailList(),
    h("h3", {}, "Keys"), h("div", {class: "shortcuts"}, h("kbd", {}, "1"), "–", h("kbd", {}, String(state.session.classes.length)),
      " class and next · ", h("kbd", {}, "Enter"), " confirm and next · ", h("kbd", {}, "←"), h("kbd", {}, "→"), h("kbd", {}, "↑"),
      h("kbd", {}, "↓"), " move · ", h("kbd", {}, "G"), " Grad-CAM · ", h("kbd", {}, "S"), " sign off · ", h("kbd", {}, "Esc"), " samples"));
}

function renderHeader() {
  const s = state.sample.summary;
  $("crumb").replaceChildren(h("a", {href: "#", id: "back"}, "‹ Samples"), h("strong", {}, s.sample_id),
    h("span", {class: "muted", id: "sample-counts"}, `${s.cells} cells · ${s.awaiting} awaiting review · ${s.verified} verified`),
    s.signed_off ? h("span", {class: "pill signed"}, `Signed off by ${s.signed_off.by}`)
      : h("button", {class: "primary", id: "sign-off-top", disabled: s.awaiting > 0, onclick: signOff,
          title: s.awaiting ? "every flagged cell needs a verdict first" : "sign off this sample"},
        h("kbd", {}, "S"), s.awaiting ? ` Sign off (${s.awaiting} awaiting)` : " Sign off…"));
}

function renderSample() {
  const s = state.sample.summary;
  const banners = [];
  if (s.signed_off) banners.push(h("div", {class: "banner signed"}, `Signed off by ${s.signed_off.by} at ${when(s.signed_off.at)}.`));
  if (s.unreliable) banners.push(h("div", {class: "banner bad"},
    `${(100 * s.ood_share).toFixed(0)}% of this sample's cells are out of distribution: do not report the model's differential without reviewing every cell.`));
  if (state.sample.errors.length) banners.push(h("div", {class: "banner bad"},
    `${state.sample.errors.length} image(s) could not be read: ` + state.sample.errors.map((e) => e.name).join(", ")));
  renderHeader();
  $("view").replaceChildren(...banners, h("div", {class: "sample"}, renderGallery(), h("aside", {class: "panel", id: "panel"})));
  if (!state.order.includes(state.cur)) state.cur = state.order[0] || null;
  renderPanel();
  markSelected();
}

function markSelected() {
  document.querySelectorAll(".tile.sel").forEach((t) => t.classList.remove("sel"));
  const t = $("t-" + state.cur);
  if (t) { t.classList.add("sel"); t.scrollIntoView({block: "nearest"}); }
}

function select(id) { state.cur = id; markSelected(); renderPanel(); }

async function showSample(id) {
  const data = await api("/api/samples/" + encodeURIComponent(id));
  const same = state.sample && state.sample.summary.sample_id === id;
  state.sample = data;
  state.cells = data.cells;
  if (!same) state.cur = null;
  renderSample();
  if (same) return;
  const first = state.order.find((cid) => !state.cells.find((c) => c.id === cid).verified);
  if (first) select(first);  // start at the first cell without a verdict: the review queue first
}

function applySample(data) {
  // The server's answer is the truth: replace cells and counts, keep the selection.
  state.sample = data;
  const byId = new Map(data.cells.map((c) => [c.id, c]));
  state.cells = state.cells.map((c) => byId.get(c.id) || c);
  for (const c of state.cells) {
    const t = $("t-" + c.id);
    if (t) t.replaceWith(tile(c));
  }
  renderHeader(); renderPanel(); markSelected();
}

function nextId(fromId) {
  const i = state.order.indexOf(fromId);
  const after = state.order.slice(i + 1).concat(state.order.slice(0, Math.max(0, i)));
  const open = after.find((id) => !state.cells.find((c) => c.id === id).verified);
  return open || state.order[Math.min(state.order.length - 1, i + 1)];
}

async function send(sampleId, body) {
  // Keystrokes are sent one after another, so the trail keeps their order.
  const run = state.queue.then(() => api(`/api/samples/${encodeURIComponent(sampleId)}/verdicts`, body));
  state.queue = run.catch(() => {});
  return run;
}

async function verdict(cls) {
  const c = state.cells.find((x) => x.id === state.cur);
  if (!c) return;
  const who = reviewer();
  if (!who) return;
  let reason = null;
  if (state.sample.summary.signed_off) {
    reason = await ask({title: "Amend a signed-off sample", text: `${c.name}: ${label(counted(c))} → ${label(cls)}. ` +
      "The sample is signed off; the change is kept in the trail as an amendment.", input: "Reason for the amendment", ok: "Amend"});
    if (!reason) return;
  }
  const sampleId = state.sample.summary.sample_id;
  const before = {verified: c.verified, verified_by: c.verified_by};
  Object.assign(c, {verified: cls, verified_by: who});  // shown at once; the server's answer follows
  const t = $("t-" + c.id);
  if (t) t.replaceWith(tile(c));
  state.cur = nextId(c.id);
  markSelected(); renderPanel();
  try {
    const data = await send(sampleId, {reviewer: who, verdicts: [{cell: c.id, verified_class: cls}], reason});
    if (state.sample && state.sample.summary.sample_id === sampleId) applySample(data);
  } catch (err) {
    Object.assign(c, before);
    if (state.sample && state.sample.summary.sample_id === sampleId) { const t2 = $("t-" + c.id); if (t2) t2.replaceWith(tile(c)); renderPanel(); markSelected(); }
    toast(`Not recorded: ${err.message}`, true);
  }
}

async function confirmRest() {
  const rest = state.cells.filter((c) => !c.verified);
  if (!rest.length) { toast("Every cell already has a verdict."); return; }
  const who = reviewer();
  if (!who) return;
  const flagged = rest.filter((c) => c.needs_review).length;
  const ok = await ask({title: "Confirm the rest",
    text: `Record the model's class for the ${rest.length} cell(s) without a verdict` +
      (flagged ? `, including ${flagged} flagged for review?` : "?"), ok: `Confirm ${rest.length}`});
  if (!ok) return;
  let reason = null;
  if (state.sample.summary.signed_off) {
    reason = await ask({title: "Amend a signed-off sample", input: "Reason for the amendment", ok: "Amend"});
    if (!reason) return;
  }
  try {
    applySample(await send(state.sample.summary.sample_id,
      {reviewer: who, reason, verdicts: rest.map((c) => ({cell: c.id, verified_class: c.predicted}))}));
    toast(`${rest.length} cells confirmed.`);
  } catch (err) { toast(`Not recorded: ${err.message}`, true); }
}

async function signOff() {
  const s = state.sample.summary;
  const name = await ask({title: `Sign off ${s.sample_id}`, input: "Your name",
    text: `${s.verified} of ${s.cells} cells have a verdict; the others count as the model classified them. ` +
      "Signing locks the sample: later changes are amendments with a reason.", value: $("reviewer").value.trim(), ok: "Sign off"});
  if (!name) return;
  $("reviewer").value = name; localStorage.setItem("wbc-reviewer", name);
  try {
    await state.queue;
    applySample(await api(`/api/samples/${encodeURIComponent(s.sample_id)}/sign-off`, {reviewer: name}));
    renderSample();
    toast(`${s.sample_id} signed off.`);
  } catch (err) { toast(`Not signed off: ${err.message}`, true); }
}

function toggleCam() {
  state.camAll = !state.camAll;
  document.querySelectorAll(".tile").forEach((t) => {
    const c = state.cells.find((x) => x.id === t.dataset.cell);
    if (c && c.has_heatmap) t.querySelector("img").src = `/api/cells/${c.id}/${state.camAll ? "heatmap" : "image"}`;
  });
  renderPanel();
}

function moveBy(key) {
  if (!state.cur) return;
  const i = state.order.indexOf(state.cur);
  if (key === "ArrowRight") return select(state.order[Math.min(state.order.length - 1, i + 1)]);
  if (key === "ArrowLeft") return select(state.order[Math.max(0, i - 1)]);
  // Up and down: the tile in the next row (also across groups) closest to the current column.
  const here = $("t-" + state.cur).getBoundingClientRect();
  let best = null;
  for (const id of state.order) {
    const r = $("t-" + id).getBoundingClientRect();
    const dy = key === "ArrowDown" ? r.top - here.top : here.top - r.top;
    if (dy < 5) continue;
    const score = dy * 10000 + Math.abs(r.left - here.left);
    if (!best || score < best.score) best = {id, score};
  }
  if (best) select(best.id);
}

// --- keyboard and routing --------------------------------------------------------------

function onKey(e) {
  if ($("dialog").open || e.target.tagName === "INPUT" || e.ctrlKey || e.metaKey || e.altKey) return;
  if (!state.sample) {
    if (e.key === "ArrowDown" || e.key === "ArrowUp") { e.preventDefault(); moveSampleSel(e.key === "ArrowDown" ? 1 : -1); }
    else if (e.key === "Enter" && state.samples[state.sel]) { e.preventDefault(); openSample(state.samples[state.sel].sample_id); }
    return;
  }
  const n = Number(e.key);
  if (Number.isInteger(n) && n >= 1 && n <= state.session.classes.length) { e.preventDefault(); verdict(state.session.classes[n - 1]); }
  else if (e.key === "Enter" && e.shiftKey) { e.preventDefault(); confirmRest(); }
  else if (e.key === "Enter") {
    e.preventDefault();
    const c = state.cells.find((x) => x.id === state.cur);
    if (c) verdict(c.predicted);
  } else if (e.key.startsWith("Arrow")) { e.preventDefault(); moveBy(e.key); }
  else if (e.key === "g" || e.key === "G") toggleCam();
  else if ((e.key === "s" || e.key === "S") && !state.sample.summary.signed_off) {
    if (state.sample.summary.awaiting) toast(`${state.sample.summary.awaiting} flagged cell(s) still need a verdict.`, true);
    else signOff();
  }
  else if (e.key === "Escape") location.hash = "";
}

async function route() {
  const m = /^#sample=(.*)$/.exec(location.hash);
  try {
    if (m) await showSample(decodeURIComponent(m[1]));
    else await showSamples();
  } catch (err) {
    $("view").replaceChildren(h("p", {class: "pad"}, `Cannot load: ${err.message}`));
  }
}

async function start() {
  $("reviewer").value = localStorage.getItem("wbc-reviewer") || "";
  $("reviewer").addEventListener("input", () => {
    $("reviewer").classList.remove("need"); localStorage.setItem("wbc-reviewer", $("reviewer").value.trim());
  });
  $("reviewer").addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === "Escape") $("reviewer").blur(); });
  document.addEventListener("keydown", onKey);
  document.addEventListener("click", (e) => {
    if (e.target.id === "back" || e.target.id === "home") { e.preventDefault(); location.hash = ""; }
  });
  window.addEventListener("hashchange", route);
  try {
    state.session = await api("/api/session");
  } catch (err) {
    $("view").replaceChildren(h("p", {class: "pad"}, `Cannot start: ${err.message}`));
    return;
  }
  route();
}

start();
