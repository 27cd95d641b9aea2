// The chat page: conversations kept in this browser (localStorage), replies streamed from this
// server's /v1/chat/completions, rendered by markdown.js as text nodes. Talks to nothing else.
"use strict";

const $ = (id) => document.getElementById(id);
const STORE = "gemma3.conversations", CURRENT = "gemma3.current", KEY = "gemma3.apiKey", PREFS = "gemma3.settings";
const MAX_IMAGE = 10 << 20; // bytes: the server takes 25 MB bodies, base64 is 4/3 larger

const state = { info: null, convs: [], current: null, controller: null, pending: [] };

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

function newId() {
  return (crypto.randomUUID ? crypto.randomUUID() : String(Date.now()) + Math.random().toString(16).slice(2));
}

// ------------------------------------------------------------------ storage

function load() {
  try {
    state.convs = JSON.parse(localStorage.getItem(STORE) || "[]");
    if (!Array.isArray(state.convs)) state.convs = [];
  } catch (e) {
    state.convs = [];
  }
  state.current = localStorage.getItem(CURRENT);
  if (!state.convs.some((c) => c.id === state.current)) state.current = state.convs.length ? state.convs[0].id : null;
}

function save() {
  localStorage.setItem(CURRENT, state.current || "");
  try {
    localStorage.setItem(STORE, JSON.stringify(state.convs));
  } catch (e) { // over the browser's quota: keep the words, drop the pictures
    const light = state.convs.map((c) => ({ ...c, messages: c.messages.map((m) => ({ ...m, images: [] })) }));
    try {
      localStorage.setItem(STORE, JSON.stringify(light));
      notice("The browser's storage is full: images are not kept after a reload.");
    } catch (e2) {
      notice("The browser's storage is full: delete some conversations to keep new ones.");
    }
  }
}

let saveTimer = null;
function saveSoon() {
  if (!saveTimer) saveTimer = setTimeout(() => { saveTimer = null; save(); }, 250);
}

function conv() {
  return state.convs.find((c) => c.id === state.current) || null;
}

function newConversation() {
  const c = { id: newId(), title: "New chat", created: Date.now(), messages: [] };
  state.convs.unshift(c);
  state.current = c.id;
  save();
  return c;
}

function prefs() {
  try {
    return JSON.parse(localStorage.getItem(PREFS) || "{}") || {};
  } catch (e) {
    return {};
  }
}

// ------------------------------------------------------------------ drawing

function notice(text) {
  const n = $("notice");
  n.textContent = text || "";
  n.hidden = !text;
}

function drawList() {
  const list = $("conversations");
  list.replaceChildren();
  for (const c of state.convs) {
    const li = el("li", c.id === state.current ? "current" : "");
    const open = el("button", "title", c.title);
    open.type = "button";
    open.title = c.title;
    open.addEventListener("click", () => { if (!state.controller) { state.current = c.id; save(); draw(); } });
    const rename = el("button", "rename", "\u270e");
    rename.type = "button";
    rename.setAttribute("aria-label", "Rename " + c.title);
    rename.addEventListener("click", () => startRename(li, c));
    const del = el("button", "delete", "\u00d7");
    del.type = "button";
    del.setAttribute("aria-label", "Delete " + c.title);
    del.addEventListener("click", () => {
      if (state.controller && c.id === state.current) return;
      state.convs = state.convs.filter((x) => x !== c);
      if (state.current === c.id) state.current = state.convs.length ? state.convs[0].id : null;
      save();
      draw();
    });
    li.append(open, rename, del);
    list.append(li);
  }
}

function startRename(li, c) {
  const input = el("input", "rename-input");
  input.value = c.title;
  input.setAttribute("aria-label", "New name");
  li.replaceChildren(input);
  input.focus();
  input.select();
  const done = (keep) => {
    if (keep && input.value.trim()) c.title = input.value.trim().slice(0, 80);
    save();
    drawList();
  };
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter") { e.preventDefault(); done(true); }
    if (e.key === "Escape") done(false);
  });
  input.addEventListener("blur", () => done(true), { once: true });
}

function statsText(s) {
  const parts = [`${s.completion} tokens`];
  if (s.seconds > 0 && s.completion > 1) parts.push(`${((s.completion - 1) / s.seconds).toFixed(1)} tok/s`);
  if (s.prompt) {
    const share = Math.round((100 * s.cached) / s.prompt);
    parts.push(`prompt ${s.prompt} tokens, ${s.cached} from cache (${share}%)`);
  }
  return parts.join(" \u00b7 ");
}

function drawMessage(c, m, index) {
  const box = el("div", "msg " + m.role);
  box.dataset.index = index;
  if (m.images && m.images.length) {
    const imgs = el("div", "images");
    for (const url of m.images) {
      const img = el("img");
      img.alt = "attached image";
      img.src = url; // the user's own picture, as a data: URL
      imgs.append(img);
    }
    box.append(imgs);
  }
  const body = el("div", "body");
  if (m.role === "assistant") Markdown.render(m.content, body);
  else body.textContent = m.content;
  box.append(body);
  if (m.error) box.append(el("div", "error", m.error));
  const foot = el("div", "foot");
  if (m.stopped) foot.append(el("span", "stopped", "stopped"));
  if (m.stats) foot.append(el("span", "stats", statsText(m.stats)));
  const last = index === c.messages.length - 1;
  if (m.role === "user" && !state.controller) {
    const edit = el("button", "edit", "Edit");
    edit.type = "button";
    edit.addEventListener("click", () => startEdit(box, c, index));
    foot.append(edit);
  }
  if (m.role === "assistant" && last && !state.controller) {
    const again = el("button", "regenerate", "Regenerate");
    again.type = "button";
    again.addEventListener("click", regenerate);
    foot.append(again);
  }
  box.append(foot);
  return box;
}

function drawMessages() {
  const c = conv();
  const list = $("messages");
  list.replaceChildren();
  if (!c || !c.messages.length) {
    const hint = el("div", "empty", state.info ? `Chat with ${state.info.model}.` : "");
    list.append(hint);
    return;
  }
  c.messages.forEach((m, i) => list.append(drawMessage(c, m, i)));
  list.scrollTop = list.scrollHeight;
}

function draw() {
  drawList();
  drawMessages();
}

function drawAttachments() {
  const box = $("attachments");
  box.replaceChildren();
  state.pending.forEach((url, i) => {
    const item = el("span", "attachment");
    const img = el("img");
    img.src = url;
    img.alt = "image to send";
    const remove = el("button", "", "\u00d7");
    remove.type = "button";
    remove.setAttribute("aria-label", "Remove image");
    remove.addEventListener("click", () => { state.pending.splice(i, 1); drawAttachments(); });
    item.append(img, remove);
    box.append(item);
  });
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
}

// ------------------------------------------------------------------ talking to the server

function headers() {
  const h = { "content-type": "application/json" };
  const key = localStorage.getItem(KEY);
  if (key) h.authorization = "Bearer " + key;
  return h;
}

function askKey(why) {
  return new Promise((resolve) => {
    const dialog = $("key-dialog");
    $("key-why").textContent = why;
    $("key").value = "";
    $("key-form").onsubmit = (e) => {
      e.preventDefault();
      localStorage.setItem(KEY, $("key").value.trim());
      dialog.close();
      resolve();
    };
    dialog.showModal();
  });
}

function samplingBody() {
  const p = readSettings();
  const body = { temperature: p.temperature, top_p: p.top_p, max_tokens: p.max_tokens };
  if (p.top_k > 0) body.top_k = p.top_k;
  if (Number.isInteger(p.seed)) body.seed = p.seed;
  if (p.json_mode) {
    let schema;
    try {
      schema = JSON.parse(p.schema);
    } catch (e) {
      throw new Error("The JSON schema is not valid JSON: " + e.message);
    }
    body.response_format = { type: "json_schema", json_schema: { name: "reply", schema, strict: true } };
  }
  return body;
}

function apiMessages(c) {
  const out = [];
  const system = readSettings().system.trim();
  if (system) out.push({ role: "system", content: system });
  for (const m of c.messages) {
    if (m.role === "assistant" && !m.content) continue; // a failed reply
    if (m.role === "user" && m.images && m.images.length) {
      out.push({ role: "user", content: [{ type: "text", text: m.content },
        ...m.images.map((url) => ({ type: "image_url", image_url: { url } }))] });
    } else {
      out.push({ role: m.role, content: m.content });
    }
  }
  return out;
}

async function reply(c) {
  const m = { role: "assistant", content: "" };
  let body;
  try {
    body = { model: state.info.model, messages: apiMessages(c), stream: true, stream_options: { include_usage: true },
      ...samplingBody() };
  } catch (e) {
    notice(e.message);
    return;
  }
  c.messages.push(m);
  state.controller = new AbortController();
  setBusy(true);
  draw();
  const node = $("messages").lastElementChild;
  const text = node.querySelector(".body");
  let frame = 0;
  let first = 0;
  try {
    let res = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body),
      signal: state.controller.signal });
    if (res.status === 401) {
      await askKey("The server refused the key: enter its API key (gemma3 serve --api-key).");
      res = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body),
        signal: state.controller.signal });
    }
    if (!res.ok) {
      const err = await res.json().catch(() => null);
      m.error = (err && err.error && err.error.message) || `${res.status} ${res.statusText}`;
    } else {
      await readEvents(res, (chunk) => {
        if (chunk.error) m.error = chunk.error.message;
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
        if (delta && delta.content) {
          if (!first) first = performance.now();
          m.content += delta.content;
          if (!frame) {
            frame = requestAnimationFrame(() => { frame = 0; Markdown.render(m.content, text); });
          }
          saveSoon();
        }
        if (chunk.usage) {
          const u = chunk.usage;
          m.stats = { completion: u.completion_tokens, prompt: u.prompt_tokens,
            cached: (u.prompt_tokens_details && u.prompt_tokens_details.cached_tokens) || 0,
            seconds: first ? (performance.now() - first) / 1000 : 0 };
          $("speed").textContent = statsText(m.stats);
        }
      });
    }
  } catch (e) {
    if (e.name === "AbortError") m.stopped = true;
    else m.error = "The server cannot be reached: " + e.message;
  } finally {
    if (frame) cancelAnimationFrame(frame);
    state.controller = null;
    if (!m.stats && first) $("speed").textContent = "";
    setBusy(false);
    save();
    draw();
  }
}

async function readEvents(res, onChunk) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        try {
          onChunk(JSON.parse(data));
        } catch (e) {
          // not JSON: ignore the line
        }
      }
    }
  }
}

// ------------------------------------------------------------------ actions

async function send() {
  const input = $("input");
  const text = input.value.trim();
  if ((!text && !state.pending.length) || state.controller || !state.info) return;
  notice("");
  const c = conv() || newConversation();
  c.messages.push({ role: "user", content: text, images: state.pending });
  if (c.title === "New chat") c.title = (text.replace(/\s+/g, " ") || "Image").slice(0, 60);
  state.pending = [];
  drawAttachments();
  input.value = "";
  grow();
  save();
  await reply(c);
}

async function regenerate() {
  const c = conv();
  if (!c || state.controller) return;
  if (c.messages.length && c.messages[c.messages.length - 1].role === "assistant") c.messages.pop();
  await reply(c);
}

function startEdit(box, c, index) {
  const m = c.messages[index];
  const area = el("textarea", "edit-area");
  area.value = m.content;
  area.setAttribute("aria-label", "Edit message");
  const resend = el("button", "resend", "Send");
  resend.type = "button";
  const cancel = el("button", "cancel", "Cancel");
  cancel.type = "button";
  const bar = el("div", "foot");
  bar.append(resend, cancel);
  box.querySelector(".body").replaceChildren(area);
  box.querySelector(".foot").replaceWith(bar);
  area.focus();
  cancel.addEventListener("click", drawMessages);
  const go = async () => {
    if (state.controller || !area.value.trim()) return;
    c.messages = c.messages.slice(0, index);
    c.messages.push({ role: "user", content: area.value.trim(), images: m.images || [] });
    save();
    await reply(c);
  };
  resend.addEventListener("click", go);
  area.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); go(); }
  });
}

function addImages(files) {
  const images = [...files].filter((f) => f.type.startsWith("image/"));
  if (!images.length) return;
  if (!state.info.vision) {
    notice(`${state.info.model} is a text-only model: it cannot see images.`);
    return;
  }
  for (const f of images) {
    if (f.size > MAX_IMAGE) {
      notice(`${f.name} is ${(f.size / 1e6).toFixed(1)} MB: images up to ${MAX_IMAGE >> 20} MB can be sent.`);
      continue;
    }
    const reader = new FileReader();
    reader.onload = () => { state.pending.push(reader.result); drawAttachments(); };
    reader.readAsDataURL(f);
  }
}

// ------------------------------------------------------------------ settings

const FIELDS = ["system", "temperature", "top_p", "top_k", "max_tokens", "seed", "schema"];

function readSettings() {
  const num = (id, fallback) => {
    const v = parseFloat($(id).value);
    return Number.isFinite(v) ? v : fallback;
  };
  return { system: $("system").value, temperature: num("temperature", 0), top_p: num("top_p", 1),
    top_k: Math.max(0, Math.round(num("top_k", 0))), max_tokens: Math.max(1, Math.round(num("max_tokens", 512))),
    seed: $("seed").value === "" ? null : Math.round(num("seed", 0)), json_mode: $("json-mode").checked,
    schema: $("schema").value };
}

function initSettings() {
  const p = prefs();
  for (const id of FIELDS) if (p[id] !== undefined && p[id] !== null) $(id).value = p[id];
  $("json-mode").checked = !!p.json_mode;
  $("schema-box").hidden = !$("json-mode").checked;
  const store = () => localStorage.setItem(PREFS, JSON.stringify(readSettings()));
  for (const id of FIELDS) $(id).addEventListener("change", store);
  $("json-mode").addEventListener("change", () => { $("schema-box").hidden = !$("json-mode").checked; store(); });
  $("settings-toggle").addEventListener("click", () => {
    const open = $("settings").hidden;
    $("settings").hidden = !open;
    $("settings-toggle").setAttribute("aria-expanded", String(open));
  });
}

function grow() {
  const input = $("input");
  input.style.height = "auto";
  input.style.height = Math.min(input.scrollHeight, 240) + "px";
}

// ------------------------------------------------------------------ start

async function start() {
  load();
  initSettings();
  draw();
  const input = $("input");
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  });
  input.addEventListener("input", grow);
  input.addEventListener("paste", (e) => {
    const files = [...(e.clipboardData ? e.clipboardData.files : [])];
    if (files.length) { e.preventDefault(); addImages(files); }
  });
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("stop").addEventListener("click", () => { if (state.controller) state.controller.abort(); });
  $("new-chat").addEventListener("click", () => {
    if (state.controller) return;
    const c = conv();
    if (!c || c.messages.length) newConversation();
    draw();
    input.focus();
  });
  $("file").addEventListener("change", (e) => { addImages(e.target.files); e.target.value = ""; });
  document.addEventListener("dragover", (e) => { e.preventDefault(); document.body.classList.add("dragging"); });
  document.addEventListener("dragleave", () => document.body.classList.remove("dragging"));
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    document.body.classList.remove("dragging");
    if (e.dataTransfer) addImages(e.dataTransfer.files);
  });
  try {
    const res = await fetch("/ui/info");
    state.info = await res.json();
  } catch (e) {
    notice("The server cannot be reached: is gemma3 serve still running?");
    return;
  }
  $("model-name").textContent = state.info.model;
  $("model-kind").textContent = (state.info.vision ? "text and images" : "text only") +
    (state.info.transcript ? " \u00b7 base model: answers through a transcript" : "");
  document.title = state.info.model + " \u00b7 gemma3 chat";
  if (!state.info.vision) $("attach").title = `${state.info.model} is a text-only model: it cannot see images`;
  if (state.info.api_key && !localStorage.getItem(KEY)) {
    await askKey("This server needs its API key (gemma3 serve --api-key): enter it once, it is kept in this browser.");
  }
  drawMessages();
  document.body.dataset.ready = "1";
  input.focus();
}

start();
