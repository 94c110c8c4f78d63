// Demo dashboard for sse-gateway --demo. No framework, no build: the gateway
// serves this file at /app.js and the client library at /sse/client.js.
import { SseClient } from '/sse/client.js';

const MACHINES = ['Machine 1', 'Machine 2', 'Machine 3', 'Machine 4', 'Machine 5', 'Machine 6'];
const MAX_DEVICES = 10;
const SPARK_POINTS = 60;
const SPC_POINTS = 60;
const MAX_ALERTS = 100;
const $ = (sel, root = document) => root.querySelector(sel);
const fmt = new Intl.NumberFormat(undefined, { maximumFractionDigits: 2 });
const timeOf = (t) => new Date(t).toLocaleTimeString([], { hour12: false });

// Test hooks: counters the browser tests read.
const hooks = window.__sse = { events: 0, lastEventAt: null, status: 'offline', alertsStatus: 'offline',
  lastEventId: null, byType: {} };

// ---- access token: the demo gateway hands one out at /demo/token

let tokenCache = null;
async function getToken() {
  if (tokenCache && tokenCache.exp - 30 > Date.now() / 1000) return tokenCache.token;
  const res = await fetch('/demo/token', { cache: 'no-store' });
  if (!res.ok) throw new Error(`GET /demo/token: HTTP ${res.status}`);
  const { token } = await res.json();
  let exp = Date.now() / 1000 + 60;
  try { exp = JSON.parse(atob(token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/'))).exp || exp; } catch { /* opaque */ }
  tokenCache = { token, exp };
  return token;
}

// ---- device picker

const params = new URLSearchParams(location.search);
let selected = (params.get('devices') || '').split(',').map((s) => s.trim()).filter((d) => MACHINES.includes(d));
if (!selected.length) selected = [...MACHINES];

const chips = $('#device-picker .chips');
for (const m of MACHINES) {
  const label = document.createElement('label');
  label.className = 'chip';
  label.innerHTML = '<input type="checkbox"><span></span>';
  const box = label.firstChild;
  box.value = m;
  box.checked = selected.includes(m);
  label.lastChild.textContent = m;
  chips.append(label);
}
chips.addEventListener('change', (e) => {
  const boxes = [...chips.querySelectorAll('input[type=checkbox]')];
  const next = boxes.filter((b) => b.checked).map((b) => b.value);
  if (next.length < 1 || next.length > MAX_DEVICES) { e.target.checked = !e.target.checked; flashHint(); return; }
  selected = next;
  renderCards();
  data.setDevices(selected);
});
function flashHint() {
  const h = $('#picker-hint');
  h.classList.remove('flash'); void h.offsetWidth; h.classList.add('flash');
}

// ---- machine cards with sparklines

const cards = new Map();      // deviceId -> { el, fields: Map(name -> {li, value, canvas, series}), lastAt }
const dirty = new Set();

function card(deviceId) {
  let c = cards.get(deviceId);
  if (c) return c;
  const el = $('#card-tpl').content.firstElementChild.cloneNode(true);
  el.dataset.device = deviceId;
  $('.name', el).textContent = deviceId;
  c = { el, fields: new Map(), lastAt: 0 };
  cards.set(deviceId, c);
  return c;
}

function renderCards() {
  const box = $('#machines');
  for (const [id, c] of cards) if (!selected.includes(id)) { c.el.remove(); cards.delete(id); }
  for (const id of MACHINES.filter((m) => selected.includes(m))) box.append(card(id).el);
  $('#empty').hidden = selected.length > 0;
}

/** Numeric fields of a payload's data, one level of `Data` flattened. */
function numericFields(d) {
  const out = {};
  const take = (obj) => {
    if (!obj || typeof obj !== 'object') return;
    for (const [k, v] of Object.entries(obj)) {
      const n = typeof v === 'number' ? v : typeof v === 'string' && v.trim() !== '' ? Number(v) : NaN;
      if (Number.isFinite(n)) out[k] = n;
    }
  };
  take(d);
  if (d && typeof d.Data === 'object') take(d.Data);
  return out;
}

function onRealtime(p) {
  if (!p || typeof p !== 'object' || !cards.has(p.deviceId)) return;
  const c = cards.get(p.deviceId);
  const values = numericFields(p.data);
  for (const [name, v] of Object.entries(values)) {
    let f = c.fields.get(name);
    if (!f) {
      const li = document.createElement('li');
      li.className = 'field';
      li.dataset.field = name;
      li.innerHTML = '<span class="label"></span><span class="value"></span><canvas class="spark" height="28"></canvas>';
      $('.label', li).textContent = name;
      f = { li, value: $('.value', li), canvas: $('canvas', li), series: [] };
      c.fields.set(name, f);
      const list = $('.fields', c.el);
      const after = [...list.children].find((x) => x.dataset.field.localeCompare(name, undefined, { numeric: true }) > 0);
      list.insertBefore(li, after || null);
    }
    f.value.textContent = fmt.format(v);
    f.series.push(v);
    if (f.series.length > SPARK_POINTS) f.series.shift();
  }
  c.lastAt = Date.parse(p.timestamp) || Date.now();
  $('.updated', c.el).textContent = `updated ${timeOf(c.lastAt)}`;
  c.el.classList.add('has-data');
  c.el.classList.remove('stale');
  c.el.classList.remove('pulse'); void c.el.offsetWidth; c.el.classList.add('pulse');
  dirty.add(c);
  scheduleDraw();
}

function onMachineStatus(p) {
  if (!p || !cards.has(p.deviceId)) return;
  const d = p.data && typeof p.data === 'object' ? p.data : {};
  const s = d.status ?? d.state ?? d.Data?.status ?? d.Data?.state ?? (typeof p.data === 'string' ? p.data : 'known');
  const badge = $('.machine-state', cards.get(p.deviceId).el);
  badge.textContent = String(s);
  badge.dataset.state = String(s).toLowerCase();
  if (Object.keys(numericFields(p.data)).length) onRealtime({ ...p, timestamp: p.timestamp });
}

// ---- drawing (batched per animation frame)

let drawQueued = false;
function scheduleDraw() {
  if (drawQueued) return;
  drawQueued = true;
  requestAnimationFrame(() => {
    drawQueued = false;
    for (const c of dirty) for (const f of c.fields.values()) sparkline(f.canvas, f.series);
    dirty.clear();
    if (spcDirty) { spcDirty = false; drawSpc(); }
  });
}

function sizeCanvas(cv) {
  const dpr = window.devicePixelRatio || 1;
  const w = Math.max(1, Math.round(cv.clientWidth * dpr)), h = Math.max(1, Math.round(cv.clientHeight * dpr));
  if (cv.width !== w || cv.height !== h) { cv.width = w; cv.height = h; }
  const ctx = cv.getContext('2d');
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, cv.clientWidth, cv.clientHeight);
  return { ctx, w: cv.clientWidth, h: cv.clientHeight };
}

function sparkline(cv, s) {
  const { ctx, w, h } = sizeCanvas(cv);
  if (s.length < 2) return;
  let lo = Math.min(...s), hi = Math.max(...s);
  if (hi === lo) { hi += 1; lo -= 1; }
  const x = (i) => 2 + (i / (s.length - 1)) * (w - 6);
  const y = (v) => h - 3 - ((v - lo) / (hi - lo)) * (h - 6);
  ctx.beginPath();
  s.forEach((v, i) => (i ? ctx.lineTo(x(i), y(v)) : ctx.moveTo(x(i), y(v))));
  ctx.strokeStyle = '#f5a524'; ctx.lineWidth = 1.5; ctx.lineJoin = 'round'; ctx.stroke();
  ctx.lineTo(x(s.length - 1), h); ctx.lineTo(x(0), h); ctx.closePath();
  ctx.fillStyle = 'rgba(245,165,36,0.12)'; ctx.fill();
  ctx.beginPath(); ctx.arc(x(s.length - 1), y(s[s.length - 1]), 2.2, 0, Math.PI * 2);
  ctx.fillStyle = '#ffd27a'; ctx.fill();
}

// ---- SPC control chart: one field of one device, mean and +-3 sigma

const spc = new Map();        // deviceId -> Map(field -> number[])
let spcDirty = false;
const spcDevice = $('#spc-device'), spcField = $('#spc-field');

function onSpc(p) {
  if (!p || typeof p !== 'object' || !p.deviceId) return;
  const d = p.data && typeof p.data === 'object' ? p.data : {};
  const src = { ...d, ...(d.Data && typeof d.Data === 'object' ? d.Data : {}) };
  // spc-series-update may name its field: {"field": "ECYCT", "values": [...]} extends ECYCT's series
  if (typeof src.field === 'string' && src.field && Array.isArray(src.values)) {
    src[src.field] = src.values;
    delete src.field; delete src.values;
  }
  let fields = spc.get(p.deviceId);
  if (!fields) { fields = new Map(); spc.set(p.deviceId, fields); syncOptions(spcDevice, [...spc.keys()]); }
  for (const [k, v] of Object.entries(src)) {
    // a number, a numeric string, or (spc-series-update) an array of them
    const vals = (Array.isArray(v) ? v : [v]).filter((x) => typeof x === 'number' || (typeof x === 'string' && x.trim() !== ''))
      .map(Number).filter(Number.isFinite);
    if (!vals.length) continue;
    if (!fields.has(k)) fields.set(k, []);
    const s = fields.get(k);
    s.push(...vals);
    if (s.length > SPC_POINTS) s.splice(0, s.length - SPC_POINTS);
  }
  if (p.deviceId === spcDevice.value) syncOptions(spcField, [...fields.keys()]);
  spcDirty = true;
  scheduleDraw();
}

function syncOptions(sel, values) {
  const cur = [...sel.options].map((o) => o.value);
  if (cur.join('\n') === values.join('\n')) return;
  const keep = sel.value;
  sel.replaceChildren(...values.map((v) => new Option(v, v)));
  if (values.includes(keep)) sel.value = keep;
  else if (sel === spcField) {
    // default to a measured quantity (non-integer values) rather than a counter such as CYCN
    const fields = spc.get(spcDevice.value);
    sel.value = values.find((f) => fields?.get(f)?.some((x) => !Number.isInteger(x))) ?? values[0] ?? '';
  }
}
spcDevice.addEventListener('change', () => { syncOptions(spcField, [...(spc.get(spcDevice.value)?.keys() || [])]); drawSpc(); });
spcField.addEventListener('change', () => drawSpc());

function drawSpc() {
  const cv = $('#spc-chart');
  const { ctx, w, h } = sizeCanvas(cv);
  const s = spc.get(spcDevice.value)?.get(spcField.value) || [];
  $('#spc-empty').hidden = s.length > 0;
  $('#spc-n').textContent = s.length;
  if (!s.length) return;
  const mean = s.reduce((a, b) => a + b, 0) / s.length;
  const sigma = Math.sqrt(s.reduce((a, b) => a + (b - mean) ** 2, 0) / Math.max(1, s.length - 1));
  const ucl = mean + 3 * sigma, lcl = mean - 3 * sigma;
  for (const [id, v] of [['last', s[s.length - 1]], ['mean', mean], ['sigma', sigma], ['ucl', ucl], ['lcl', lcl]]) {
    $(`#spc-${id}`).textContent = fmt.format(v);
  }
  const pad = { l: 44, r: 8, t: 8, b: 14 };
  let lo = Math.min(lcl, ...s), hi = Math.max(ucl, ...s);
  if (hi - lo < 1e-9) { hi += 1; lo -= 1; }
  const span = hi - lo; hi += span * 0.06; lo -= span * 0.06;
  const x = (i) => pad.l + (i / Math.max(1, SPC_POINTS - 1)) * (w - pad.l - pad.r);
  const y = (v) => pad.t + (1 - (v - lo) / (hi - lo)) * (h - pad.t - pad.b);
  const hline = (v, color, dash, label) => {
    ctx.setLineDash(dash); ctx.strokeStyle = color; ctx.lineWidth = 1;
    ctx.beginPath(); ctx.moveTo(pad.l, y(v)); ctx.lineTo(w - pad.r, y(v)); ctx.stroke();
    ctx.setLineDash([]); ctx.fillStyle = color; ctx.font = '10px ui-monospace, "DejaVu Sans Mono", monospace';
    ctx.textAlign = 'right'; ctx.textBaseline = 'middle'; ctx.fillText(label, pad.l - 4, y(v));
  };
  ctx.fillStyle = 'rgba(62,207,110,0.06)';
  ctx.fillRect(pad.l, y(ucl), w - pad.l - pad.r, y(lcl) - y(ucl));
  hline(ucl, '#ff5a5f', [4, 3], 'UCL');
  hline(lcl, '#ff5a5f', [4, 3], 'LCL');
  hline(mean, '#8aa1b8', [], 'x̄');
  ctx.beginPath();
  s.forEach((v, i) => (i ? ctx.lineTo(x(i), y(v)) : ctx.moveTo(x(i), y(v))));
  ctx.strokeStyle = '#f5a524'; ctx.lineWidth = 1.5; ctx.stroke();
  s.forEach((v, i) => {
    const out = sigma > 0 && (v > ucl || v < lcl);
    ctx.beginPath(); ctx.arc(x(i), y(v), out ? 3.5 : 2, 0, Math.PI * 2);
    ctx.fillStyle = out ? '#ff5a5f' : '#ffd27a'; ctx.fill();
  });
}

// ---- alerts list and toasts

const alertsEl = $('#alerts');
let alertCount = 0;

function describe(kind, p) {
  const body = kind === 'alarm-update' ? p?.alarm : p?.alert;
  const o = body && typeof body === 'object' ? body : {};
  const severity = String(o.severity ?? o.level ?? o.alertType ?? o.type ?? (kind === 'alarm-update' ? 'alarm' : 'warning')).toLowerCase();
  let text = o.message ?? o.text ?? o.description ?? (typeof body === 'string' ? body : null);
  if (text == null) text = body == null ? (typeof p === 'string' ? p : '(no details)') : JSON.stringify(body);
  if (kind === 'alarm-update' && (o.active === false || o.state === 'cleared')) text += ' (cleared)';
  return { severity, text: String(text), device: p?.deviceId ?? '?', at: Date.parse(p?.timestamp) || Date.now() };
}

function onAlert(kind, p, ev) {
  const a = describe(kind, p);
  const li = document.createElement('li');
  const sev = `sev-${a.severity.replace(/[^a-z0-9-]/g, '')}`;
  li.className = `alert ${sev}`;
  li.dataset.kind = kind;
  li.dataset.device = a.device;
  if (ev?.id) li.dataset.id = ev.id;
  li.innerHTML = '<span class="sev"></span><div class="body"><div class="line"><strong></strong><time></time></div><p></p></div>';
  $('.sev', li).textContent = kind === 'alarm-update' ? 'ALARM' : a.severity.toUpperCase();
  $('strong', li).textContent = a.device;
  $('time', li).textContent = timeOf(a.at);
  $('p', li).textContent = a.text;
  alertsEl.prepend(li);
  while (alertsEl.children.length > MAX_ALERTS) alertsEl.lastElementChild.remove();
  $('#alert-count').textContent = ++alertCount;
  $('#alerts-empty').hidden = true;
  toast(`${a.device}: ${a.text}`, kind === 'alarm-update' ? `${sev} sev-alarm` : sev);
}
$('#alerts-clear').addEventListener('click', () => {
  alertsEl.replaceChildren(); alertCount = 0;
  $('#alert-count').textContent = '0'; $('#alerts-empty').hidden = false;
});

function toast(text, cls = '') {
  const box = $('#toasts');
  const t = document.createElement('div');
  t.className = `toast ${cls}`;
  t.textContent = text;
  box.append(t);
  while (box.children.length > 4) box.firstElementChild.remove();
  setTimeout(() => { t.classList.add('out'); setTimeout(() => t.remove(), 300); }, 5000);
}

// ---- connection indicators

const LABELS = { connecting: 'Connecting…', live: 'Live', reconnecting: 'Reconnecting…', offline: 'Offline', revoked: 'Access revoked' };
function paintStatus(el, s, prefix = '') {
  el.className = el.className.replace(/\b(connecting|live|reconnecting|offline|revoked)\b/g, '').trim() + ` ${s}`;
  $('.status-text', el).textContent = prefix + LABELS[s];
}
function paintLastEvent() {
  $('#last-event').textContent = hooks.lastEventAt
    ? `last event ${timeOf(hooks.lastEventAt)} · ${hooks.events} events` : 'no events yet';
}

function countEvent(data, ev) {
  hooks.events++;
  hooks.lastEventAt = Date.now();
  hooks.byType[ev.type] = (hooks.byType[ev.type] || 0) + 1;
  if (ev.id) hooks.lastEventId = ev.id;
  paintLastEvent();
}

// ---- the two streams

const data = new SseClient({ getToken, endpoint: 'stream', deviceIds: selected, includeStatus: true, shareAcrossTabs: true });
data.on('*', countEvent);
data.on('realtime-update', onRealtime);
data.on('machine-status', onMachineStatus);
data.on('spc-update', onSpc);
data.on('spc-series-update', onSpc);
data.on('system', (d) => {
  if (d?.kind === 'replay-gap') toast('Some events were missed while reconnecting; history may have gaps.', 'sev-info');
  if (d?.kind === 'degraded') toast('Gateway lost its message bus; waiting for recovery.', 'sev-warning');
  if (d?.kind === 'recovered') toast('Gateway message bus recovered.', 'sev-info');
  if (d?.kind === 'revoked') toast('Access to this stream was revoked; reload to sign in again.', 'sev-warning');
});
// A refused access token (a restarted demo gateway signs with a new random secret): fetch a new one.
const forgetRefusedToken = (e) => { if (e.stage === 'ticket' && e.status === 401) tokenCache = null; };
data.on('error', (e) => { forgetRefusedToken(e); if (e.status === 401 || e.status === 403 || e.status === 429) console.warn('data stream:', e.message, e.body); });
data.onStatus((s) => { hooks.status = s; paintStatus($('#status'), s); });

const alerts = new SseClient({ getToken, endpoint: 'alerts', shareAcrossTabs: true });
alerts.on('*', countEvent);
alerts.on('error', forgetRefusedToken);
alerts.on('machine-alert', (d, ev) => onAlert('machine-alert', d, ev));
alerts.on('alarm-update', (d, ev) => onAlert('alarm-update', d, ev));
alerts.onStatus((s) => { hooks.alertsStatus = s; paintStatus($('#alerts-status'), s, 'Alerts: '); });

// Cards that have not updated for 15 s dim, so a silent machine is visible.
setInterval(() => {
  const now = Date.now();
  for (const c of cards.values()) c.el.classList.toggle('stale', c.lastAt > 0 && now - c.lastAt > 15000);
}, 1000);
addEventListener('resize', () => { for (const c of cards.values()) dirty.add(c); spcDirty = true; scheduleDraw(); });

renderCards();
data.start();
alerts.start();
window.__sseClients = { data, alerts };
