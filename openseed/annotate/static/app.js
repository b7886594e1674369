// openseed annotate: the page. Talks to the JSON API of openseed/annotate/server.py; no library, nothing remote.
"use strict";

const $ = (id) => document.getElementById(id);
const COLOURS = [[230, 25, 75], [60, 180, 75], [0, 130, 200], [245, 130, 48], [145, 30, 180], [70, 240, 240],
                 [240, 50, 230], [210, 245, 60], [250, 190, 190], [0, 128, 128]];
const state = { images: [], index: -1, objects: [], pending: [], selected: null, picture: null, drag: null,
                masks: new Map(), vocabulary: [] };

async function api(method, path, body) {
  const options = { method, headers: { "Content-Type": "application/json" } };
  if (body !== undefined) options.body = JSON.stringify(body);
  const response = await fetch(path, options);
  const data = await response.json();
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}

function say(text) { $("status").textContent = text; }

async function loadState() {
  const data = await api("GET", "/api/state");
  state.images = data.images;
  state.vocabulary = data.vocabulary;
  $("image-list").innerHTML = "";
  data.images.forEach((image, i) => {
    const item = document.createElement("li");
    item.textContent = `${image.name} (${image.objects}${image.proposed ? " + " + image.proposed + "?" : ""})`;
    item.classList.toggle("done", image.objects > 0);
    item.classList.toggle("current", i === state.index);
    item.onclick = () => openImage(i);
    $("image-list").appendChild(item);
  });
  const done = data.images.filter((image) => image.objects > 0).length;
  $("progress").textContent = `${done} / ${data.images.length}`;
  $("unreadable-title").hidden = data.unreadable.length === 0;
  $("unreadable-list").innerHTML = data.unreadable.map((u) => `<li title="${u.reason}">${u.name}</li>`).join("");
  refreshVocabulary();
}

function refreshVocabulary() {
  const names = new Set(state.vocabulary);
  state.objects.forEach((o) => names.add(o.category));
  $("vocabulary").innerHTML = [...names].sort().map((n) => `<option value="${n}">`).join("");
}

async function openImage(index) {
  if (index < 0 || index >= state.images.length) return;
  state.index = index;
  state.pending = [];
  state.selected = null;
  const name = state.images[index].name;
  say(`encoding ${name} ...`);
  const picture = new Image();
  picture.src = `/api/image?name=${encodeURIComponent(name)}`;
  await picture.decode();
  state.picture = picture;
  const next = state.images[index + 1];
  const encoded = await api("POST", "/api/encode", { name, next: next ? next.name : undefined });
  say(`${name}: encoded in ${encoded.seconds.toFixed(2)} s`);
  await loadObjects();
  await loadState();
}

function currentName() { return state.images[state.index].name; }

async function loadObjects() {
  const data = await api("GET", `/api/objects?name=${encodeURIComponent(currentName())}`);
  setObjects(data.objects);
}

function setObjects(objects) {
  state.objects = objects;
  state.masks = new Map(objects.map((o) => [o.id, paintMask(o)]));
  renderList();
  draw();
}

function paintMask(object) {
  if (!object.runs) return null;
  const [height, width] = object.size;
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  const context = canvas.getContext("2d");
  const pixels = context.createImageData(width, height);
  const [r, g, b] = COLOURS[object.id % COLOURS.length];
  let position = 0;
  object.runs.forEach((run, i) => {
    if (i % 2 === 1) {  // odd runs are the mask's pixels, column-major
      for (let p = position; p < position + run; p++) {
        const x = Math.floor(p / height), y = p % height, k = 4 * (y * width + x);
        pixels.data[k] = r; pixels.data[k + 1] = g; pixels.data[k + 2] = b; pixels.data[k + 3] = 255;
      }
    }
    position += run;
  });
  context.putImageData(pixels, 0, 0);
  return canvas;
}

function draw() {
  const canvas = $("canvas"), context = canvas.getContext("2d");
  if (!state.picture) return;
  canvas.width = state.picture.naturalWidth;
  canvas.height = state.picture.naturalHeight;
  // shown as large as the stage allows (small pictures enlarged, large ones reduced); boxes stay in picture pixels
  const stage = $("stage"), scale = Math.min(stage.clientWidth / canvas.width, stage.clientHeight / canvas.height);
  canvas.style.width = `${Math.floor(canvas.width * scale)}px`;
  canvas.style.height = `${Math.floor(canvas.height * scale)}px`;
  context.imageSmoothingEnabled = false;
  context.drawImage(state.picture, 0, 0);
  if ($("show").checked) {
    context.globalAlpha = $("opacity").value / 100;
    state.objects.forEach((o) => { const mask = state.masks.get(o.id); if (mask) context.drawImage(mask, 0, 0); });
    context.globalAlpha = 1;
  }
  state.objects.forEach((o) => box(context, o.box, o.id === state.selected ? "#ff0" : "#fff",
                                   o.status === "proposed"));
  state.pending.forEach((b) => box(context, b, "#0f0", true));
  if (state.drag && state.drag.current) box(context, dragBox(), "#0f0", true);
}

function box(context, [x0, y0, x1, y1], colour, dashed) {
  context.strokeStyle = colour;
  context.lineWidth = 2;
  context.setLineDash(dashed ? [6, 4] : []);
  context.strokeRect(x0, y0, x1 - x0, y1 - y0);
  context.setLineDash([]);
}

function renderList() {
  $("object-list").innerHTML = "";
  state.objects.forEach((o) => {
    const item = document.createElement("li");
    item.dataset.id = o.id;
    item.className = (o.status === "proposed" ? "proposed " : "") + (o.id === state.selected ? "selected" : "");
    item.innerHTML = `#${o.id} <b>${o.category}</b> ${o.status === "proposed"
      ? '(proposed) <button data-act="accept">accept</button>' : ""} <button data-act="remove">remove</button>
      <button data-act="relabel" title="give it the class typed above and decode its mask again">relabel</button>`;
    item.onclick = async (event) => {
      const act = event.target.dataset.act;
      if (act === "accept") await accept(o.id);
      else if (act === "remove") await removeObject(o.id);
      else if (act === "relabel") await relabel(o.id);
      else { state.selected = state.selected === o.id ? null : o.id; renderList(); draw(); }
    };
    $("object-list").appendChild(item);
  });
  $("pending-count").textContent = state.pending.length;
}

function toImage(event) {
  const rect = $("canvas").getBoundingClientRect();
  return [(event.clientX - rect.left) * $("canvas").width / rect.width,
          (event.clientY - rect.top) * $("canvas").height / rect.height];
}

function dragBox() {
  const [ax, ay] = state.drag.start, [bx, by] = state.drag.current;
  return [Math.min(ax, bx), Math.min(ay, by), Math.max(ax, bx), Math.max(ay, by)];
}

$("canvas").addEventListener("mousedown", (event) => { state.drag = { start: toImage(event), current: null }; });
$("canvas").addEventListener("mousemove", (event) => {
  if (state.drag) { state.drag.current = toImage(event); draw(); }
});
$("canvas").addEventListener("mouseup", async () => {
  if (!state.drag || !state.drag.current) { state.drag = null; return; }
  const b = dragBox();
  state.drag = null;
  if (b[2] - b[0] < 2 || b[3] - b[1] < 2) { draw(); return; }
  if (state.selected !== null) {  // a redrawn box for the selected object
    await run(async () => {
      const data = await api("POST", "/api/update", { id: state.selected, box: b, decode: true });
      say(`object #${data.object.id} redrawn`);
      await loadObjects();
    });
  } else {
    state.pending.push(b);
    renderList();
    draw();
  }
});

async function decodePending() {
  const category = $("category").value.trim();
  if (!state.pending.length) return say("draw a box first");
  if (!category) return say("type a class name first");
  await run(async () => {
    const started = performance.now();
    await api("POST", "/api/segment", { name: currentName(), boxes: state.pending,
                                        names: state.pending.map(() => category) });
    say(`${state.pending.length} mask(s) in ${((performance.now() - started) / 1000).toFixed(2)} s`);
    state.pending = [];
    await loadObjects();
    await loadState();
  });
}

async function accept(id) {
  await run(async () => { await api("POST", "/api/update", { id, status: "accepted" }); await loadObjects(); await loadState(); });
}
async function relabel(id) {
  const category = $("category").value.trim();
  if (!category) return say("type the new class name first");
  await run(async () => {
    await api("POST", "/api/update", { id, category, decode: true });
    say(`object #${id} is now ${category}`);
    await loadObjects();
    refreshVocabulary();
  });
}

async function removeObject(id) { await run(async () => { await api("POST", "/api/remove", { id }); state.selected = null; await loadObjects(); await loadState(); }); }

async function undoRedo(which) {
  await run(async () => { const data = await api("POST", `/api/${which}`, { name: currentName() }); setObjects(data.objects); });
}

async function exportCoco(format) {
  await run(async () => {
    const data = await api("POST", "/api/export", { format });
    say(`exported ${data.annotations} annotations of ${data.images} images to ${data.path}`);
  });
}

async function run(work) {
  try { await work(); } catch (error) { say(`error: ${error.message}`); }
}

$("decode").onclick = decodePending;
$("prev").onclick = () => openImage(state.index - 1);
$("next").onclick = () => openImage(state.index + 1);
$("undo").onclick = () => undoRedo("undo");
$("redo").onclick = () => undoRedo("redo");
$("opacity").oninput = draw;
window.addEventListener("resize", draw);
$("show").onchange = draw;
$("export-rle").onclick = () => exportCoco("rle");
$("export-poly").onclick = () => exportCoco("polygons");
$("propose").onclick = () => run(async () => {
  const data = await api("POST", "/api/propose", { name: currentName() });
  say(`${data.objects.length} proposal(s) to review`);
  await loadObjects();
  await loadState();
});

$("propose-all").onclick = () => run(async () => { await api("POST", "/api/propose_all"); await watchJob(); });
$("cancel").onclick = () => run(async () => { await api("POST", "/api/cancel"); });

async function watchJob() {  // the background proposal run: a progress bar and a cancel button until it ends
  for (;;) {
    const { job } = await api("GET", "/api/job");
    $("job-progress").hidden = $("cancel").hidden = !job.running;
    $("job-progress").max = Math.max(job.total, 1);
    $("job-progress").value = job.done;
    if (!job.running) {
      say(`proposals: ${job.done} of ${job.total} images${job.cancelled ? " (cancelled)" : ""}` +
          (job.error ? ` - ${job.error}` : ""));
      await loadState();
      if (state.index >= 0) await loadObjects();
      return;
    }
    say(`proposals: ${job.done} / ${job.total} images (${job.current || ""})`);
    await new Promise((resolve) => setTimeout(resolve, 500));
  }
}

document.addEventListener("keydown", (event) => {
  if (event.target === $("category")) { if (event.key === "Enter") decodePending(); return; }
  const key = event.key.toLowerCase();
  if ((event.ctrlKey || event.metaKey) && key === "z") { event.preventDefault(); undoRedo(event.shiftKey ? "redo" : "undo"); }
  else if ((event.ctrlKey || event.metaKey) && key === "y") { event.preventDefault(); undoRedo("redo"); }
  else if (key === "enter") decodePending();
  else if (key === "n" || key === "arrowright") openImage(state.index + 1);
  else if (key === "p" || key === "arrowleft") openImage(state.index - 1);
  else if (key === "h") { $("show").checked = !$("show").checked; draw(); }
  else if (key === "a" && state.selected !== null) accept(state.selected);
  else if ((key === "delete" || key === "backspace") && state.selected !== null) removeObject(state.selected);
  else if (key === "escape") { state.pending = []; state.selected = null; renderList(); draw(); }
});

loadState().then(() => { if (state.images.length) openImage(0); }).catch((error) => say(`error: ${error.message}`));
