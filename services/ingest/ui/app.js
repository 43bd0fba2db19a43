// ShipperD's upload page: the same HTTP API and token as every client, nothing else.
// Everything the server sends is shown as text (textContent), never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const query = new URLSearchParams(location.search);
// Bytes per part (?part= for tests; at least 1 MiB, as the server wants).
const PART = Math.max(1 << 20, Number(query.get("part")) || 16 << 20);
// Sends of one part (or of a one-piece upload) before giving up.
const ATTEMPTS = 8;
const PAGE = 50;

let token = sessionStorage.getItem("shipperd-token") || "";
let selected = null; // the bundle shown below the list
let imageOffset = 0;
let deleteArmed = false;

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function authHeaders() {
  return token ? { Authorization: "Bearer " + token } : {};
}

function why(status, doc, fallback) {
  let text = (doc && doc.error) || fallback || `the server answered ${status}`;
  if (status === 401) text += " (enter the token at the top right)";
  if (status === 403) text += " (the token's user may not do this)";
  return text;
}

async function api(method, path) {
  let r;
  try {
    r = await fetch(path, { method, headers: authHeaders() });
  } catch (e) {
    throw new ApiError(0, "cannot reach the server: " + e.message);
  }
  let doc = null;
  try {
    doc = await r.json();
  } catch (_) { /* not JSON */ }
  if (!r.ok) throw new ApiError(r.status, why(r.status, doc, r.statusText));
  return doc;
}

// One PUT with upload progress (fetch has none): resolves with {status, doc}; status 0
// when the connection broke.
function put(url, body, onProgress) {
  return new Promise((resolve) => {
    const x = new XMLHttpRequest();
    x.open("PUT", url);
    for (const [k, v] of Object.entries(authHeaders())) x.setRequestHeader(k, v);
    x.upload.onprogress = (e) => onProgress(e.loaded);
    x.onload = () => {
      let doc = null;
      try {
        doc = JSON.parse(x.responseText);
      } catch (_) { /* not JSON */ }
      resolve({ status: x.status, doc });
    };
    x.onerror = () => resolve({ status: 0, doc: null });
    x.ontimeout = x.onerror;
    x.send(body);
  });
}

const retryable = (status) => status === 0 || status === 408 || status === 429 || status >= 500;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const enc = encodeURIComponent;

async function sha256(blob) {
  if (!(window.crypto && crypto.subtle)) return null; // only on https or loopback
  const d = await crypto.subtle.digest("SHA-256", await blob.arrayBuffer());
  return Array.from(new Uint8Array(d), (b) => b.toString(16).padStart(2, "0")).join("");
}

function human(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let u = 0;
  while (n >= 1024 && u < units.length - 1) {
    n /= 1024;
    u++;
  }
  return (u ? n.toFixed(1) : String(n)) + " " + units[u];
}

// The transfer box: bytes, rate, ETA.
const meter = {
  start(name, total) {
    this.total = total;
    this.began = performance.now();
    $("transfer").hidden = false;
    $("transfer-name").textContent = name;
    this.state("sending");
    this.show(0);
  },
  state(text) {
    $("transfer-state").textContent = text;
  },
  show(done, note) {
    const secs = (performance.now() - this.began) / 1000;
    const rate = secs > 0 ? done / secs : 0;
    const eta = rate > 0 ? Math.round((this.total - done) / rate) + " s" : "-";
    $("transfer-bar").value = this.total ? (100 * done) / this.total : 100;
    $("transfer-detail").textContent =
      `${human(done)} of ${human(this.total)}, ${human(Math.round(rate))}/s, ETA ${eta}` +
      (note ? " — " + note : "");
  },
};

function showUploadError(text) {
  const e = $("upload-error");
  e.textContent = text;
  e.hidden = !text;
}

// Sends `body` to `url` until it is taken, sending it again (bounded) when the
// connection breaks or the server is busy. `base` is what was sent before it.
async function sendWithRetries(url, body, base, label) {
  for (let attempt = 1; ; attempt++) {
    const r = await put(url, body, (loaded) => meter.show(base + loaded));
    if (r.status >= 200 && r.status < 300) return r.doc;
    const reason = why(r.status, r.doc, r.status ? `answered ${r.status}` : "the connection broke");
    if (!retryable(r.status) || attempt >= ATTEMPTS) throw new ApiError(r.status, `${label}: ${reason}`);
    meter.show(base, `${label}: ${reason}; sending it again (attempt ${attempt + 1})`);
    await sleep(Math.min(8000, 500 * 2 ** (attempt - 1)));
  }
}

async function upload(files) {
  showUploadError("");
  if (!files.length) return;
  const name = $("name").value.trim() || files[0].name;
  const target = $("target").value.trim();
  const given = $("sha256").value.trim();
  const whole = files.length === 1 ? files[0] : new Blob(files); // not copied: read as sent
  meter.start(name, whole.size);
  try {
    let done;
    const squashfs = (await whole.slice(0, 4).text()) === "hsqs";
    if (squashfs) {
      // A squashfs image cannot be stored in parts: one request, sent again whole.
      const q = new URLSearchParams();
      if (given) q.set("sha256", given);
      if (target) q.set("target", target);
      done = await sendWithRetries(`/v1/bundles/${enc(name)}?${q}`, whole, 0, "upload");
    } else {
      const count = Math.max(1, Math.ceil(whole.size / PART));
      let uploadId = null;
      for (let n = 1; n <= count; n++) {
        const part = whole.slice((n - 1) * PART, Math.min(whole.size, n * PART));
        meter.state(`part ${n}/${count}`);
        const q = new URLSearchParams();
        const sum = await sha256(part);
        if (sum) q.set("sha256", sum);
        if (uploadId) q.set("upload_id", uploadId);
        const doc = await sendWithRetries(
          `/v1/uploads/${enc(name)}/parts/${n}?${q}`, part, (n - 1) * PART, `part ${n}`);
        uploadId = doc.upload_id;
      }
      const q = new URLSearchParams({ parts: String(count), upload_id: uploadId });
      if (target) q.set("target", target);
      done = await api("POST", `/v1/uploads/${enc(name)}/complete?${q}`);
    }
    meter.show(whole.size);
    meter.state(`received as ${String(done.id).slice(0, 12)}`);
    select(done.id);
    refresh();
  } catch (e) {
    meter.state("failed");
    showUploadError(`${name}: ${e.message}`);
  }
}

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text == null ? "" : String(text);
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

function phaseCell(row, phase) {
  const td = document.createElement("td");
  const span = document.createElement("span");
  span.className = "phase " + phase;
  span.textContent = phase;
  td.appendChild(span);
  row.appendChild(td);
}

function progressCell(row, b) {
  const td = document.createElement("td");
  const bar = document.createElement("span");
  bar.className = "bar";
  const fill = document.createElement("span");
  const pct = b.bytes_total ? Math.floor((100 * b.bytes_done) / b.bytes_total) : b.phase === "Published" ? 100 : 0;
  fill.style.width = pct + "%";
  bar.appendChild(fill);
  td.appendChild(bar);
  td.appendChild(document.createTextNode(" " + pct + "%"));
  row.appendChild(td);
}

async function refreshList() {
  const listError = $("list-error");
  try {
    const doc = await api("GET", "/v1/bundles?limit=100");
    listError.hidden = true;
    $("bundles-total").textContent = `(${doc.total})`;
    const rows = $("bundle-rows");
    rows.replaceChildren();
    for (const b of doc.bundles) {
      const tr = document.createElement("tr");
      tr.className = "row";
      tr.dataset.id = b.id;
      tr.dataset.phase = b.phase;
      cell(tr, b.name);
      phaseCell(tr, b.phase);
      const c = b.counts || {};
      cell(tr, `${(c.published || 0) + (c.failed || 0)}/${c.total || 0}` + (c.failed ? ` (${c.failed} failed)` : ""));
      progressCell(tr, b);
      cell(tr, (b.received_at || "").replace("T", " ").slice(0, 19));
      cell(tr, b.error, "err");
      tr.addEventListener("click", () => select(b.id));
      rows.appendChild(tr);
    }
  } catch (e) {
    listError.textContent = e.message;
    listError.hidden = false;
  }
}

function select(id) {
  if (selected !== id) {
    selected = id;
    imageOffset = 0;
    deleteArmed = false;
    $("b-delete").textContent = "Delete";
    $("b-action").textContent = "";
  }
  refreshBundle();
}

async function refreshBundle() {
  const box = $("bundle");
  if (!selected) {
    box.hidden = true;
    return;
  }
  try {
    const b = await api("GET", `/v1/bundles/${enc(selected)}?limit=0`);
    box.hidden = false;
    box.dataset.phase = b.phase;
    $("b-name").textContent = b.name;
    $("b-phase").textContent = b.phase;
    $("b-phase").className = "phase " + b.phase;
    $("b-id").textContent = b.id;
    $("b-error").textContent = b.error || "";
    $("b-error").hidden = !b.error;
    const causes = $("b-causes");
    causes.replaceChildren();
    for (const c of b.causes || []) {
      const li = document.createElement("li");
      li.textContent = `${c.images} image(s): ${c.cause}`;
      causes.appendChild(li);
    }
    const c = b.counts || {};
    $("b-counts").textContent =
      `${c.total || 0} images: ${c.published || 0} published (${c.skipped || 0} already there), ` +
      `${c.failed || 0} failed, ${c.pending || 0} pending` + (b.target ? ` — target ${b.target}` : "");
    const v = b.verification;
    $("b-trust").hidden = !v;
    $("b-trust").textContent = v
      ? `signature policy: ${v.signed} image(s) accepted by a signature, ${v.unsigned} without one` +
        ((v.keys || []).length ? ` — keys ${v.keys.join(", ")}` : "")
      : "";
    $("b-retry").disabled = b.phase !== "Failed";
    const phase = $("i-phase").value;
    const q = new URLSearchParams({ offset: String(imageOffset), limit: String(PAGE) });
    if (phase) q.set("phase", phase);
    const page = await api("GET", `/v1/bundles/${enc(selected)}/images?${q}`);
    const rows = $("image-rows");
    rows.replaceChildren();
    for (const img of page.images) {
      const tr = document.createElement("tr");
      tr.dataset.phase = img.phase;
      cell(tr, img.index);
      cell(tr, img.source);
      cell(tr, img.target);
      cell(tr, img.digest, "digest");
      phaseCell(tr, img.phase);
      cell(tr, img.error || img.last_error, "err");
      cell(tr, (img.trust && img.trust.by || [])
        .map(t => t.key ? `${t.requirement} (${t.key})` : t.requirement).join(", "));
      rows.appendChild(tr);
    }
    const end = imageOffset + page.images.length;
    $("i-range").textContent = page.total ? `${imageOffset + 1}–${end} of ${page.total}` : "none";
    $("i-prev").disabled = imageOffset === 0;
    $("i-next").disabled = page.next == null;
    $("i-next").dataset.next = page.next == null ? "" : page.next;
  } catch (e) {
    if (e.status === 404) {
      selected = null;
      box.hidden = true;
      return;
    }
    $("b-action").textContent = e.message;
  }
}

function refresh() {
  refreshList();
  refreshBundle();
}

async function act(method, path, doneText) {
  try {
    await api(method, path);
    $("b-action").textContent = doneText;
  } catch (e) {
    $("b-action").textContent = e.message;
  }
  refresh();
}

document.addEventListener("DOMContentLoaded", () => {
  $("token").value = token;
  $("token").addEventListener("change", () => {
    token = $("token").value.trim();
    sessionStorage.setItem("shipperd-token", token);
    refresh();
  });
  $("file").addEventListener("change", (e) => {
    const files = Array.from(e.target.files);
    e.target.value = ""; // the next choice starts afresh (the same file again, too)
    upload(files);
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    upload(Array.from(e.dataTransfer.files));
  });
  $("b-retry").addEventListener("click", () =>
    act("POST", `/v1/bundles/${enc(selected)}/retry`, "retry accepted"));
  $("b-delete").addEventListener("click", () => {
    if (!deleteArmed) {
      deleteArmed = true;
      $("b-delete").textContent = "Really delete? (its stored files and state; not the registry's images)";
      return;
    }
    deleteArmed = false;
    $("b-delete").textContent = "Delete";
    act("DELETE", `/v1/bundles/${enc(selected)}`, "deleted");
  });
  $("b-close").addEventListener("click", () => {
    selected = null;
    $("bundle").hidden = true;
  });
  $("i-phase").addEventListener("change", () => {
    imageOffset = 0;
    refreshBundle();
  });
  $("i-prev").addEventListener("click", () => {
    imageOffset = Math.max(0, imageOffset - PAGE);
    refreshBundle();
  });
  $("i-next").addEventListener("click", () => {
    const next = $("i-next").dataset.next;
    if (next !== "") {
      imageOffset = Number(next);
      refreshBundle();
    }
  });
  refresh();
  setInterval(refresh, 2000);
});
