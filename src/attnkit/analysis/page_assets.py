"""The analysis page's inline style and script (plain CSS and JS, no library, nothing fetched).

The script reads the JSON payload of :mod:`attnkit.analysis.page_data`, draws the thumbnails (canvas), the
head view (SVG: token columns and lines, or a patch grid for an image model), sorts tables on a click, and
marks the body for the end-to-end test: ``data-thumbs-drawn``, ``data-lines-drawn`` / ``data-cells-drawn``,
``data-js-errors``; with ``#selfcheck`` in the address it also clicks a column header and hovers a token and
records ``data-sort-check`` and ``data-hover-check`` (``ok`` or what went wrong).
"""

from __future__ import annotations

STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1400px;
       padding: 0 24px 48px; color: #222; }
h1 { margin: 24px 0 4px; } h2 { margin-top: 36px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
nav a { margin-right: 14px; } .sub, .note { color: #666; margin-top: 0; }
ul.answer li { margin: 3px 0; font-size: 15px; }
#thumbs { display: grid; gap: 3px; align-items: center; }
#thumbs canvas { width: 52px; height: 52px; image-rendering: pixelated; border: 2px solid transparent;
                 cursor: pointer; }
#thumbs canvas.current { border-color: #d62728; } #thumbs .lab { font-size: 11px; color: #666; text-align: center; }
.controls { margin: 8px 0; } .controls label { margin-right: 14px; }
#headview svg text { font: 12px ui-monospace, monospace; cursor: default; }
#headview svg text.out { fill: #bbb; } #headview svg text.hi { fill: #d62728; font-weight: 700; }
#headview svg line { stroke-width: 2; }
#headview svg.dim line { visibility: hidden; } #headview svg.dim line.hi { visibility: visible; }
#headview rect.cell { cursor: pointer; } #prefix button { margin: 2px; font-size: 12px; }
table { border-collapse: collapse; margin: 8px 0; font-size: 12.5px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; } th { background: #f5f5f5; }
td { font-variant-numeric: tabular-nums; } table.sortable th { cursor: pointer; user-select: none; }
table.sortable th.asc::after { content: " \\25B2"; } table.sortable th.desc::after { content: " \\25BC"; }
table.sortable tbody tr { cursor: pointer; } table.sortable tbody tr:hover { background: #f3f7ff; }
.plots { display: flex; flex-wrap: wrap; gap: 12px; } .plots img { max-width: 100%; border: 1px solid #e3e3e3; }
svg.clusters circle { cursor: pointer; stroke: #fff; stroke-width: 1; } svg.clusters text { font-size: 9px; }
"""

SCRIPT = r"""
(function () {
  'use strict';
  var body = document.body;
  window.addEventListener('error', function () {
    body.setAttribute('data-js-errors', String(1 + Number(body.getAttribute('data-js-errors') || 0)));
  });
  var NS = 'http://www.w3.org/2000/svg';
  var data = JSON.parse(document.getElementById('attn-data').textContent);
  var WINDOW = 64, ROW = 16;  // queries drawn at once in the token view; pixels per token row
  var VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  var state = {input: 0, layer: 0, head: 0, from: 0, query: null};

  function bytes(b64) {
    var s = atob(b64), out = new Uint8Array(s.length);
    for (var i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
    return out;
  }
  var decoded = data.inputs.map(function (inp) {
    return {idx: new Uint16Array(bytes(inp.idx).buffer), w: new Int8Array(bytes(inp.w).buffer)};
  });
  function colour(x) {  // x in [0, 1] -> viridis
    x = Math.max(0, Math.min(1, x)) * (VIRIDIS.length - 1);
    var i = Math.min(Math.floor(x), VIRIDIS.length - 2), f = x - i, a = VIRIDIS[i], b = VIRIDIS[i + 1];
    return [0, 1, 2].map(function (c) { return Math.round(a[c] + f * (b[c] - a[c])); });
  }
  function el(name, attrs, parent) {
    var node = document.createElementNS(NS, name);
    Object.keys(attrs).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (parent) parent.appendChild(node);
    return node;
  }

  // ---- thumbnails: the layer x head grid ------------------------------------------------------------
  function drawThumbs() {
    var box = document.getElementById('thumbs'), inp = data.inputs[0], size = inp.thumbSize, drawn = 0;
    var pix = bytes(inp.thumbs);
    box.style.gridTemplateColumns = '36px repeat(' + data.heads + ', 56px)';
    box.appendChild(document.createElement('span'));
    for (var h = 0; h < data.heads; h++) {
      var lab = document.createElement('span'); lab.className = 'lab'; lab.textContent = 'H' + h; box.appendChild(lab);
    }
    for (var l = 0; l < data.layers; l++) {
      var row = document.createElement('span'); row.className = 'lab'; row.textContent = 'L' + l; box.appendChild(row);
      for (h = 0; h < data.heads; h++) {
        var c = document.createElement('canvas'); c.width = size; c.height = size;
        c.title = 'layer ' + l + ', head ' + h; c.setAttribute('data-l', l); c.setAttribute('data-h', h);
        var ctx = c.getContext('2d'), img = ctx.createImageData(size, size), off = (l * data.heads + h) * size * size;
        for (var p = 0; p < size * size; p++) {
          var rgb = colour(pix[off + p] / 255);
          img.data.set([rgb[0], rgb[1], rgb[2], 255], 4 * p);
        }
        ctx.putImageData(img, 0, 0);
        c.addEventListener('click', pick);
        box.appendChild(c);
        drawn++;
      }
    }
    body.setAttribute('data-thumbs-drawn', String(drawn));
  }
  function pick(ev) {
    var t = ev.currentTarget;
    select(Number(t.getAttribute('data-l')), Number(t.getAttribute('data-h')));
    document.getElementById('head').scrollIntoView();
  }

  // ---- the head view ------------------------------------------------------------------------------------
  function select(l, h) {
    state.layer = l; state.head = h;
    document.getElementById('sel-layer').value = String(l);
    document.getElementById('sel-head').value = String(h);
    drawHead();
  }
  function rowWeights(inp, dec, n, i) {  // dense weights of query i of head n from its top-k keys
    var out = new Float32Array(inp.tokens.length), base = (n * inp.queries + i) * inp.k;
    for (var r = 0; r < inp.k; r++) out[dec.idx[base + r]] = dec.w[base + r] / 127;
    return out;
  }
  function drawHead() {
    var view = document.getElementById('headview'), inp = data.inputs[state.input], dec = decoded[state.input];
    var n = state.layer * data.heads + state.head;
    view.textContent = '';
    document.querySelectorAll('#thumbs canvas').forEach(function (c) {
      var on = Number(c.getAttribute('data-l')) === state.layer && Number(c.getAttribute('data-h')) === state.head;
      c.classList.toggle('current', on && state.input === 0);
    });
    if (inp.grid) drawGrid(view, inp, dec, n); else drawTokens(view, inp, dec, n);
  }
  function drawTokens(view, inp, dec, n) {
    var T = inp.tokens.length, Q = inp.queries, from = Math.min(state.from, Math.max(0, Q - WINDOW));
    var to = Math.min(Q, from + WINDOW), xl = 170, xr = 430, drawn = 0;
    var svg = el('svg', {width: 620, height: T * ROW + 8, role: 'img'}, view);
    var byQuery = [], byKey = [], left = [], right = [];
    for (var i = 0; i < T; i++) { byQuery.push([]); byKey.push([]); }
    for (i = from; i < to; i++) {
      var base = (n * Q + i) * inp.k;
      for (var r = 0; r < inp.k; r++) {
        var w = dec.w[base + r] / 127, j = dec.idx[base + r];
        if (Math.abs(w) < 0.01) continue;
        var line = el('line', {x1: xl + 6, y1: i * ROW + 8, x2: xr - 6, y2: j * ROW + 8,
                               'stroke-opacity': Math.abs(w).toFixed(3), stroke: w < 0 ? '#d62728' : '#1f5fbf'}, svg);
        byQuery[i].push(line); byKey[j].push(line); drawn++;
      }
    }
    inp.tokens.forEach(function (tok, i) {
      var cls = i >= from && i < to ? 'q' : 'q out';
      left.push(el('text', {x: xl, y: i * ROW + 12, 'text-anchor': 'end', 'class': cls}, svg));
      right.push(el('text', {x: xr, y: i * ROW + 12, 'class': 'k'}, svg));
      left[i].textContent = tok; right[i].textContent = tok;
      hover(svg, left[i], byQuery[i], right, 'y2');
      hover(svg, right[i], byKey[i], left, 'y1');
    });
    body.setAttribute('data-view', 'tokens');
    body.setAttribute('data-lines-drawn', String(drawn));
    var note = document.getElementById('head-note');
    note.textContent = 'Queries ' + from + '-' + (to - 1) + ' of ' + T + ' (left) and the ' + inp.k +
      ' strongest keys of each (right; opacity = weight, red = negative). Hover a token to see only its lines.';
  }
  function hover(svg, token, lines, others, end) {
    token.addEventListener('mouseenter', function () {
      svg.classList.add('dim'); token.classList.add('hi');
      lines.forEach(function (ln) {
        ln.classList.add('hi');
        others[Math.round((Number(ln.getAttribute(end)) - 8) / ROW)].classList.add('hi');
      });
    });
    token.addEventListener('mouseleave', function () {
      svg.classList.remove('dim');
      svg.querySelectorAll('.hi').forEach(function (x) { x.classList.remove('hi'); });
    });
  }
  function drawGrid(view, inp, dec, n) {
    var g = inp.grid, T = inp.tokens.length, cell = Math.max(6, Math.min(28, Math.floor(560 / g.cols)));
    if (state.query === null || state.query >= Math.min(T, inp.queries)) {
      state.query = Math.min(inp.queries - 1, g.prefix + Math.floor(g.rows / 2) * g.cols + Math.floor(g.cols / 2));
    }
    var w = rowWeights(inp, dec, n, state.query), peak = 1e-12, drawn = 0;
    for (var j = g.prefix; j < T; j++) peak = Math.max(peak, Math.abs(w[j]));
    var prefix = document.createElement('div'); prefix.id = 'prefix'; view.appendChild(prefix);
    for (j = 0; j < g.prefix; j++) {
      var b = document.createElement('button'); b.setAttribute('data-q', j);
      b.textContent = inp.tokens[j] + ': ' + w[j].toFixed(3) + (j === state.query ? ' (query)' : '');
      b.addEventListener('click', chooseQuery);
      prefix.appendChild(b);
    }
    var svg = el('svg', {width: g.cols * cell + 2, height: g.rows * cell + 2, role: 'img'}, view);
    for (j = g.prefix; j < T; j++) {
      var p = j - g.prefix, rgb = colour(Math.abs(w[j]) / peak);
      var r = el('rect', {x: 1 + (p % g.cols) * cell, y: 1 + Math.floor(p / g.cols) * cell, width: cell, height: cell,
                          fill: 'rgb(' + rgb.join(',') + ')', 'class': 'cell', 'data-q': j}, svg);
      if (j === state.query) { r.setAttribute('stroke', '#d62728'); r.setAttribute('stroke-width', 3); }
      el('title', {}, r).textContent = 'patch ' + Math.floor(p / g.cols) + ',' + (p % g.cols) + ': ' + w[j].toFixed(4);
      r.addEventListener('click', chooseQuery);
      drawn++;
    }
    body.setAttribute('data-view', 'grid');
    body.setAttribute('data-cells-drawn', String(drawn));
    document.getElementById('head-note').textContent = 'The weights query ' + state.query + ' (outlined) gives the ' +
      g.rows + ' x ' + g.cols + ' patches (its ' + inp.k + ' strongest keys; colour scaled to the largest); click a ' +
      'patch or a prefix token to make it the query.';
  }
  function chooseQuery(ev) {
    state.query = Number(ev.currentTarget.getAttribute('data-q'));
    drawHead();
  }
  function controls() {
    var sel = {input: document.getElementById('sel-input'), layer: document.getElementById('sel-layer'),
               head: document.getElementById('sel-head'), from: document.getElementById('sel-from')};
    function fill(s, n, label) {
      for (var i = 0; i < n; i++) {
        var o = document.createElement('option'); o.value = String(i); o.textContent = label(i); s.appendChild(o);
      }
    }
    fill(sel.input, data.inputs.length, function (i) {
      return String(i + 1) + ' (' + data.inputs[i].tokens.length + ' tokens)';
    });
    fill(sel.layer, data.layers, function (i) { return data.names[i] || String(i); });
    fill(sel.head, data.heads, String);
    function range() {
      var q = data.inputs[state.input].queries;
      sel.from.max = String(Math.max(0, q - WINDOW));
      sel.from.disabled = q <= WINDOW || !!data.inputs[state.input].grid;
    }
    sel.input.addEventListener('change', function () {
      state.input = Number(sel.input.value); state.from = 0; state.query = null; sel.from.value = '0';
      range(); drawHead();
    });
    sel.layer.addEventListener('change', function () { state.layer = Number(sel.layer.value); drawHead(); });
    sel.head.addEventListener('change', function () { state.head = Number(sel.head.value); drawHead(); });
    sel.from.addEventListener('input', function () { state.from = Number(sel.from.value); drawHead(); });
    range();
  }

  // ---- sortable tables ------------------------------------------------------------------------------------
  function value(td) {
    var v = td.getAttribute('data-v');
    return v === null ? td.textContent : (v === '' ? -Infinity : Number(v));
  }
  function sortBy(th) {
    var table = th.closest('table'), col = Array.prototype.indexOf.call(th.parentNode.children, th);
    var desc = !th.classList.contains('desc');
    table.querySelectorAll('th').forEach(function (x) {
      x.classList.remove('asc', 'desc'); x.removeAttribute('aria-sort');
    });
    th.classList.add(desc ? 'desc' : 'asc'); th.setAttribute('aria-sort', desc ? 'descending' : 'ascending');
    var tbody = table.tBodies[0], rows = Array.prototype.slice.call(tbody.rows);
    rows.sort(function (a, b) {
      var x = value(a.cells[col]), y = value(b.cells[col]);
      var c = typeof x === 'number' && typeof y === 'number' ? x - y : String(x).localeCompare(String(y));
      return desc ? -c : c;
    });
    rows.forEach(function (r) { tbody.appendChild(r); });
  }
  function tables() {
    document.querySelectorAll('table.sortable th').forEach(function (th) {
      th.addEventListener('click', function () { sortBy(th); });
    });
    document.querySelectorAll('[data-l][data-h]').forEach(function (node) {
      if (node.tagName.toLowerCase() !== 'canvas') node.addEventListener('click', pick);
    });
  }

  // ---- self-check (#selfcheck): click a header, hover a token --------------------------------------------
  function selfcheck() {
    var table = document.getElementById('metric-table'), th = table && table.tHead.rows[0].cells[3];
    if (th) {
      th.click();
      var vals = Array.prototype.map.call(table.tBodies[0].rows, function (r) { return value(r.cells[3]); });
      var sorted = vals.every(function (v, i) { return i === 0 || vals[i - 1] >= v; });
      var ok = sorted && th.classList.contains('desc');
      body.setAttribute('data-sort-check', ok ? 'ok' : 'not sorted: ' + vals.slice(0, 5));
    }
    var token = document.querySelector('#headview text.q');
    if (token) {
      token.dispatchEvent(new MouseEvent('mouseenter'));
      var hi = document.querySelectorAll('#headview line.hi').length;
      body.setAttribute('data-hover-check', hi > 0 ? 'ok' : 'no line highlighted');
      token.dispatchEvent(new MouseEvent('mouseleave'));
    }
  }

  controls();
  drawThumbs();
  tables();
  drawHead();
  if (location.hash === '#selfcheck') selfcheck();
})();
"""
