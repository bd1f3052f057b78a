"""The report page's script and style (plain JavaScript and CSS, no library), as text to inline.

The script reads the JSON data block (``<script type="application/json" id="embedlens-data">``) and
builds one interactive panel per probed image: the picture with its patch grid on a canvas; hovering
(or tapping) a patch fills the inspector with its top-k tokens, scores, group and norm; clicking a
patch pins it; clicking a token pins the token and colours the grid by "contains this token". A layer
slider and a lens switch appear when several were probed; the grid is coloured by group, norm, top-1
score or a searched token. Arrays are decoded lazily per lens (see :mod:`embedlens.report.encode`).
When every panel is drawn it sets ``window.__ready`` to ``performance.now()`` (time to interactive).
"""

from __future__ import annotations

SCRIPT = r"""
(function () {
"use strict";
const DATA = JSON.parse(document.getElementById("embedlens-data").textContent);
const PIECES = DATA.tokens.pieces, IDS = DATA.tokens.ids, GROUPS = DATA.groups;
const VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
const TYPES = {u16: Uint16Array, u32: Uint32Array, f32: Float32Array};

function decode(text, kind) {
  const bin = atob(text), bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  return new TYPES[kind](bytes.buffer);
}
function bare(piece) { return piece.replace(/^[\u2581\u0120 ]+/, "").toLowerCase(); }
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "text") node.textContent = value; else node.setAttribute(key, value);
  }
  for (const child of children) if (child != null) node.append(child);
  return node;
}
function ramp(t) {
  t = Math.min(1, Math.max(0, t)) * (VIRIDIS.length - 1);
  const i = Math.min(VIRIDIS.length - 2, Math.floor(t)), f = t - i;
  return VIRIDIS[i].map((c, j) => Math.round(c + f * (VIRIDIS[i + 1][j] - c)));
}
function fmt(x) { return Math.abs(x) >= 100 ? x.toFixed(1) : x.toFixed(4); }

class Panel {
  constructor(root, spec) {
    this.root = root; this.spec = spec; this.cache = {};
    this.layer = 0; this.lens = spec.lenses[0];
    this.mode = spec.groups ? "group" : "score"; this.query = ""; this.hover = -1; this.pinned = -1;
    this.pins = [];
    const [rows, cols] = spec.grid;
    this.width = cols >= rows ? 448 : Math.round(448 * cols / rows);
    this.height = Math.round(this.width * rows / cols);
    this.build();
    this.draw(); this.showHint();
  }
  arrays() {
    if (!this.cache[this.lens]) {
      const d = this.spec.data[this.lens];
      this.cache[this.lens] = {ids: decode(d.ids, this.spec.idType), scores: decode(d.scores, "f32"),
                               norms: decode(d.norms, "f32")};
    }
    return this.cache[this.lens];
  }
  build() {
    const s = this.spec, name = "lens-" + s.id;
    const controls = el("div", {class: "controls"});
    if (s.layers.length > 1) {
      this.slider = el("input", {type: "range", class: "layer", min: "0", max: String(s.layers.length - 1),
                                 value: "0", step: "1", "aria-label": "layer"});
      this.slider.addEventListener("input", () => { this.layer = Number(this.slider.value); this.update(); });
      this.layerLabel = el("span", {class: "layer-value"});
      controls.append(el("label", {}, "layer ", this.slider, " ", this.layerLabel));
    } else {
      controls.append(el("span", {class: "layer-value"}));
      this.layerLabel = controls.lastChild;
    }
    if (s.lenses.length > 1) {
      const box = el("span", {class: "lenses"}, "lens ");
      for (const lens of s.lenses) {
        const radio = el("input", {type: "radio", name: name, value: lens, class: "lens"});
        if (lens === this.lens) radio.checked = true;
        radio.addEventListener("change", () => { this.lens = lens; this.update(); });
        box.append(el("label", {}, radio, lens));
      }
      controls.append(box);
    }
    this.select = el("select", {class: "mode", "aria-label": "colour the grid by"});
    const modes = [["group", "group"], ["norm", "norm"], ["score", "top-1 score"], ["token", "contains token"]];
    for (const [value, label] of modes) {
      const option = el("option", {value: value, text: label});
      if (value === "group" && !s.groups) option.disabled = true;
      this.select.append(option);
    }
    this.select.value = this.mode;
    this.select.addEventListener("change", () => { this.mode = this.select.value; this.update(); });
    this.search = el("input", {type: "search", class: "search", placeholder: "token, e.g. cat",
                               "aria-label": "search a token"});
    this.search.addEventListener("input", () => this.setQuery(this.search.value));
    this.count = el("span", {class: "match-count"});
    controls.append(el("label", {}, "colour by ", this.select), this.search, this.count);
    const picture = el("div", {class: "picture", style: `width:${this.width}px;height:${this.height}px`});
    if (s.image) {
      const img = el("img", {src: s.image, alt: "the picture the model saw", width: String(this.width),
                             height: String(this.height)});
      if (s.imageSize && Math.max(...s.imageSize) < this.width / 2) img.className = "pixelated";
      picture.append(img);
    }
    this.canvas = el("canvas", {class: "grid", width: String(this.width * devicePixelRatio),
                                height: String(this.height * devicePixelRatio)});
    this.canvas.style.width = this.width + "px"; this.canvas.style.height = this.height + "px";
    this.canvas.addEventListener("pointermove", (e) => this.onMove(e));
    this.canvas.addEventListener("pointerleave", () => { this.hover = -1; this.draw(); this.render(); });
    this.canvas.addEventListener("click", (e) => this.onClick(e));
    picture.append(this.canvas);
    this.tip = el("div", {class: "tip", "aria-live": "polite"});
    this.legend = el("div", {class: "legend"});
    this.pinBox = el("div", {class: "pins"});
    this.root.append(controls, el("div", {class: "stage"}, picture, this.tip), this.legend, this.pinBox);
    this.layerLabel.textContent = this.layerText();
  }
  layerText() { return `layer ${this.spec.layers[this.layer]}` + (this.spec.layers.length > 1 ?
    ` (${this.layer + 1} of ${this.spec.layers.length} probed)` : ""); }
  cellAt(event) {
    const box = this.canvas.getBoundingClientRect(), [rows, cols] = this.spec.grid;
    const col = Math.floor((event.clientX - box.left) / box.width * cols);
    const row = Math.floor((event.clientY - box.top) / box.height * rows);
    return row >= 0 && row < rows && col >= 0 && col < cols ? row * cols + col : -1;
  }
  onMove(event) {
    const cell = this.cellAt(event);
    if (cell !== this.hover) { this.hover = cell; this.draw(); this.render(); }
  }
  onClick(event) {
    const cell = this.cellAt(event);
    this.pinned = cell === this.pinned ? -1 : cell; this.hover = cell; this.draw(); this.render();
  }
  setQuery(text) {
    this.query = bare(text.trim());
    if (this.search.value !== text) this.search.value = text;
    this.matches = new Set();
    if (this.query) PIECES.forEach((p, i) => { if (bare(p) === this.query) this.matches.add(i); });
    if (this.query) { this.mode = "token"; this.select.value = "token"; }
    this.update();
  }
  pinToken(index) {
    if (!this.pins.includes(index)) this.pins.push(index);
    this.renderPins(); this.setQuery(PIECES[index]);
  }
  renderPins() {
    this.pinBox.replaceChildren();
    if (!this.pins.length) return;
    this.pinBox.append("pinned tokens: ");
    for (const index of this.pins) {
      const chip = el("button", {class: "chip", type: "button", title: "id " + IDS[index], text: PIECES[index]});
      chip.addEventListener("click", () => this.setQuery(PIECES[index]));
      const drop = el("button", {class: "unpin", type: "button", "aria-label": "unpin", text: "×"});
      drop.addEventListener("click", () => { this.pins = this.pins.filter((i) => i !== index); this.renderPins(); });
      this.pinBox.append(el("span", {class: "pin"}, chip, drop));
    }
  }
  update() { this.layerLabel.textContent = this.layerText(); this.draw(); this.render(); }
  rank(cell) {
    const {ids} = this.arrays(), k = this.spec.k, base = (this.layer * this.spec.n + cell) * k;
    for (let r = 0; r < k; r++) if (this.matches && this.matches.has(ids[base + r])) return r;
    return -1;
  }
  values() {
    const {scores, norms} = this.arrays(), n = this.spec.n, k = this.spec.k, out = new Float32Array(n);
    for (let t = 0; t < n; t++) {
      out[t] = this.mode === "norm" ? norms[this.layer * n + t] : scores[(this.layer * n + t) * k];
    }
    let lo = Infinity, hi = -Infinity;
    for (const v of out) { if (v < lo) lo = v; if (v > hi) hi = v; }
    return {out, lo, hi};
  }
  draw() {
    const ctx = this.canvas.getContext("2d"), [rows, cols] = this.spec.grid, n = this.spec.n;
    const w = this.canvas.width / cols, h = this.canvas.height / rows;
    ctx.clearRect(0, 0, this.canvas.width, this.canvas.height);
    let legend = "", matched = 0;
    const scale = this.mode === "norm" || this.mode === "score" ? this.values() : null;
    for (let t = 0; t < n; t++) {
      const x = (t % cols) * w, y = Math.floor(t / cols) * h;
      let fill = null;
      if (this.mode === "group" && this.spec.groups) {
        const g = GROUPS[this.spec.groups[t]];
        if (g.paint) fill = `rgba(${g.colour.join(",")},0.6)`;
      } else if (scale) {
        const c = ramp((scale.out[t] - scale.lo) / ((scale.hi - scale.lo) || 1));
        fill = `rgba(${c.join(",")},0.62)`;
      } else if (this.mode === "token" && this.query) {
        const r = this.rank(t);
        if (r >= 0) { matched++; fill = `rgba(255,0,200,${0.85 - 0.55 * r / this.spec.k})`; }
        else fill = "rgba(0,0,0,0.45)";
      }
      if (fill) { ctx.fillStyle = fill; ctx.fillRect(x, y, w, h); }
    }
    ctx.strokeStyle = "rgba(255,255,255,0.35)"; ctx.lineWidth = 1;
    ctx.beginPath();
    for (let c = 1; c < cols; c++) { ctx.moveTo(c * w, 0); ctx.lineTo(c * w, this.canvas.height); }
    for (let r = 1; r < rows; r++) { ctx.moveTo(0, r * h); ctx.lineTo(this.canvas.width, r * h); }
    ctx.stroke();
    for (const [cell, colour] of [[this.hover, "#ffd400"], [this.pinned, "#ff2d2d"]]) {
      if (cell < 0) continue;
      ctx.strokeStyle = colour; ctx.lineWidth = 2 * devicePixelRatio;
      ctx.strokeRect((cell % cols) * w + 1, Math.floor(cell / cols) * h + 1, w - 2, h - 2);
    }
    this.legend.replaceChildren();
    if (this.mode === "group" && this.spec.groups) {
      for (const [code, g] of Object.entries(GROUPS)) {
        const count = this.spec.groups.split(code).length - 1;
        this.legend.append(el("span", {class: "key"}, el("span", {class: "sw",
          style: `background:rgb(${g.colour.join(",")})`}), `${g.name} ${count}`));
      }
      legend = "groups by the layer-0 rule";
    } else if (scale) {
      const label = this.mode === "norm" ? "norm" : "top-1 score";
      this.legend.append(el("span", {class: "bar"}), ` ${label}: ${fmt(scale.lo)} … ${fmt(scale.hi)} at this layer`);
    } else if (this.mode === "token") {
      legend = this.query ? `${matched} of ${n} patches have “${this.query}” in their top-${this.spec.k}` +
        " (brighter: higher rank)" : "type a token to find the patches that contain it";
    }
    if (legend) this.legend.append(el("span", {class: "legend-text"}, legend));
    this.count.textContent = this.mode === "token" && this.query ? `${matched} patches` : "";
  }
  showHint() { this.tip.replaceChildren(el("p", {class: "hint",
    text: "Hover or tap a patch to see its top tokens; click to pin it."})); }
  render() {
    const cell = this.pinned >= 0 ? this.pinned : this.hover;
    if (cell < 0) return;
    const s = this.spec, {ids, scores, norms} = this.arrays(), k = s.k, cols = s.grid[1];
    const base = (this.layer * s.n + cell) * k;
    const rows = [];
    for (let r = 0; r < k; r++) {
      const index = ids[base + r];
      const button = el("button", {class: "tok", type: "button", title: "id " + IDS[index] + " — click to pin",
                                   text: PIECES[index]});
      button.addEventListener("click", () => this.pinToken(index));
      rows.push(el("tr", {}, el("td", {class: "rank", text: String(r + 1)}), el("td", {}, button),
        el("td", {class: "id", text: String(IDS[index])}), el("td", {class: "score", text: fmt(scores[base + r])})));
    }
    const group = s.groups ? GROUPS[s.groups[cell]].name : "n/a";
    this.tip.replaceChildren(
      el("div", {class: "tip-head", text: `patch row ${Math.floor(cell / cols)}, col ${cell % cols} · token ${cell}` +
        ` · layer ${s.layers[this.layer]} · ${this.lens} lens` + (this.pinned >= 0 ? " · pinned" : "")}),
      el("div", {class: "tip-meta", text: `norm ${fmt(norms[this.layer * s.n + cell])} · group ${group}`}),
      el("table", {class: "tip-tokens"},
        el("thead", {}, el("tr", {}, el("th", {text: "#"}), el("th", {text: "token"}), el("th", {text: "id"}),
          el("th", {text: this.lens === "logit" ? "logit" : "cosine"}))),
        el("tbody", {}, ...rows)));
  }
}

const panels = [];
for (const spec of DATA.panels) {
  const root = document.getElementById("panel-" + spec.id);
  if (root) panels.push(new Panel(root, spec));
}
window.__panels = panels.length;
window.__ready = performance.now();
document.documentElement.dataset.ready = "1";
})();
"""

STYLE = r"""
:root { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1b1b1b; }
body { margin: 0 auto; max-width: 1180px; padding: 0 18px 60px; line-height: 1.4; font-size: 14px; }
header { border-bottom: 2px solid #0072b2; margin-bottom: 10px; }
h1 { font-size: 22px; margin: 16px 0 4px; } h2 { font-size: 18px; margin: 0 0 6px; } h4 { margin: 14px 0 4px; }
nav a { margin-right: 12px; } section.sec { border-top: 1px solid #ddd; padding: 14px 0; }
.kind { font-size: 11px; text-transform: uppercase; background: #eef3f8; color: #0b4f80; padding: 1px 6px;
  border-radius: 3px; margin-right: 6px; vertical-align: middle; }
dl.prov { display: flex; flex-wrap: wrap; gap: 2px 0; font-size: 12px; color: #444;
  background: #f7f7f7; padding: 5px 10px; border-radius: 4px; margin: 6px 0 10px; }
dl.prov dt { font-weight: 600; margin-left: 14px; } dl.prov dt:first-child { margin-left: 0; }
dl.prov dt::after { content: ":"; } dl.prov dd { margin: 0 0 0 4px; overflow-wrap: anywhere; }
table { border-collapse: collapse; margin: 6px 0; font-size: 12.5px; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: left; vertical-align: top; }
th { background: #f2f2f2; } table.wide { display: block; overflow-x: auto; max-width: 100%; }
.delta { color: #555; font-size: 11.5px; } .note { color: #666; font-size: 12px; }
.sw { display: inline-block; width: 11px; height: 11px; border: 1px solid #777; margin-right: 5px;
  vertical-align: -1px; }
.charts { display: flex; flex-wrap: wrap; gap: 12px; } svg.chart { background: #fff; }
svg .ct { font-size: 12px; text-anchor: middle; font-weight: 600; } svg .cx { font-size: 10px; text-anchor: middle; }
svg .cy { font-size: 10px; text-anchor: end; } svg .cl { font-size: 11px; text-anchor: middle; fill: #333; }
svg .cg { stroke: #e6e6e6; } svg .lg, svg .pl { font-size: 10px; }
.controls { display: flex; flex-wrap: wrap; gap: 14px; align-items: center; margin: 6px 0 10px; }
.controls input.layer { width: 240px; vertical-align: middle; } .lenses label { margin-left: 6px; }
.stage { display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }
.picture { position: relative; background: #ccc; flex: none; }
.picture img, .picture canvas { position: absolute; left: 0; top: 0; width: 100%; height: 100%; }
.picture img.pixelated { image-rendering: pixelated; }
.picture canvas { cursor: crosshair; touch-action: manipulation; }
.tip { min-width: 300px; max-width: 420px; flex: 1; font-size: 13px; }
.tip-head { font-weight: 600; } .tip-meta { color: #444; margin: 2px 0 4px; }
.tip-tokens td.score, .tip-tokens td.id, .tip-tokens td.rank { font-variant-numeric: tabular-nums; text-align: right; }
button.tok, button.chip { font-family: ui-monospace, "SFMono-Regular", Menlo, monospace; font-size: 12.5px;
  background: #f4f4f4; border: 1px solid #ccc; border-radius: 3px; padding: 0 5px; cursor: pointer; white-space: pre; }
button.tok:hover, button.chip:hover { background: #ffe9fb; border-color: #ff00c8; }
.legend { margin: 8px 0; font-size: 12px; display: flex; gap: 12px; flex-wrap: wrap; align-items: center; }
.legend .bar { display: inline-block; width: 140px; height: 10px;
  background: linear-gradient(90deg, #440154, #3b528b, #21918c, #5ec962, #fde725); }
.pins { font-size: 12px; } .pin { margin-right: 6px; } button.unpin { border: none; background: none; cursor: pointer; }
.hint { color: #777; } code { font-size: 12px; }
"""
