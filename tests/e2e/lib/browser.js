// Headless Chromium (Debian's /usr/bin/chromium) through playwright-core, with a fresh profile.
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

export const CHROMIUM = process.env.CHROMIUM_BIN || '/usr/bin/chromium';
const ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync'];

/**
 * Launches Chromium with a new user-data-dir (removed again by close()). One persistent
 * context = one browser profile: its pages are tabs that share Web Locks and BroadcastChannel.
 */
export async function launch({ viewport = { width: 1440, height: 900 } } = {}) {
  const dir = await mkdtemp(join(tmpdir(), 'sse-e2e-chromium-'));
  const ctx = await chromium.launchPersistentContext(dir, {
    executablePath: CHROMIUM, headless: true, args: ARGS, viewport, timeout: 30000,
  });
  ctx.setDefaultTimeout(10000);
  await ctx.addInitScript(valueWatch);
  const pageErrors = [], consoleErrors = [];
  const watch = (p) => {
    p.on('pageerror', (e) => pageErrors.push(`${p.url()}: ${e.message}`));
    p.on('console', (m) => { if (m.type() === 'error' || m.type() === 'warning') consoleErrors.push(`${m.type()}: ${m.text()}`); });
  };
  ctx.pages().forEach(watch);
  ctx.on('page', watch);
  return {
    ctx,
    pageErrors,
    /** Console errors and warnings of every tab (failed loads, the client's 401/403/429 warnings). */
    consoleErrors,
    /** The first tab (a persistent context opens with one). */
    page: async () => ctx.pages()[0] ?? ctx.newPage(),
    close: async () => { await ctx.close().catch(() => {}); await rm(dir, { recursive: true, force: true }); },
  };
}

/** What the page's test hooks say, for failure messages. */
export async function pageState(page) {
  return page.evaluate(() => ({
    sse: window.__sse,
    statusText: document.querySelector('#status .status-text')?.textContent,
    role: window.__sseClients?.data?.role,
    cards: document.querySelectorAll('.machine-card').length,
    values: document.querySelectorAll('.machine-card .value').length,
  })).catch((e) => `(page state unavailable: ${e.message})`);
}

/**
 * page.waitForFunction with a failure message that says what was awaited, the page's state and
 * the gateway's log tail, so a red test explains itself.
 */
export async function waitInPage(page, what, fn, arg, { timeout = 10000, gw, polling = 'raf' } = {}) {
  try {
    return await (await page.waitForFunction(fn, arg, { timeout, polling })).jsonValue();
  } catch (err) {
    const state = await pageState(page);
    throw new Error(`${what}: not within ${timeout} ms (${err.message.split('\n')[0]})\n`
      + `page: ${JSON.stringify(state)}\n${gw ? `gateway log:\n${gw.tail()}` : ''}`);
  }
}

/**
 * Init script (every page of the context): a MutationObserver that notes when a
 * `.machine-card .value` first shows a text other than the first one it showed. Observing every
 * DOM change, rather than polling, cannot miss a change that lands between two polls (the status
 * snapshot and the first realtime-update often arrive a few ms apart).
 * window.__e2eChange: performance.now() (ms since navigation start) of that change, or null.
 * window.__e2eResetChange(): takes the current texts as the new baseline and clears __e2eChange.
 */
function valueWatch() {
  const base = new Map();
  window.__e2eChange = null;
  const scan = () => {
    for (const el of document.querySelectorAll('.machine-card .value')) {
      const key = `${el.closest('.machine-card')?.dataset.device}|${el.closest('.field')?.dataset.field}`;
      const text = el.textContent;
      if (!base.has(key)) base.set(key, text);
      else if (window.__e2eChange === null && base.get(key) !== text) window.__e2eChange = performance.now();
    }
  };
  window.__e2eResetChange = () => { base.clear(); window.__e2eChange = null; scan(); };
  new MutationObserver(scan).observe(document, { subtree: true, childList: true, characterData: true });

  // Timeline for diagnostics: when each EventSource was made, opened, and got its first frames.
  const times = window.__e2eTimes = {};
  const mark = (k) => { times[k] ??= Math.round(performance.now()); };
  const Native = window.EventSource;
  window.EventSource = class extends Native {
    constructor(url, init) {
      super(url, init);
      const path = new URL(url, location.href).pathname.replace('/sse/', '');
      mark(`${path} created`);
      this.addEventListener('open', () => mark(`${path} open`));
      for (const type of ['machine-status', 'realtime-update']) this.addEventListener(type, () => mark(`${path} first ${type}`));
    }
  };
  document.addEventListener('DOMContentLoaded', () => mark('DOMContentLoaded'));
}

/** The page's timeline (ms since navigation start) of DOMContentLoaded and its streams' first frames. */
export async function timeline(page) {
  return page.evaluate(() => Object.entries(window.__e2eTimes || {}).sort((a, b) => a[1] - b[1])
    .map(([k, v]) => `${k} ${v}`).join(', '));
}

/** In-page predicate for waitForFunction: the time of the first value change, or false. */
export function valueChanged() {
  return window.__e2eChange ?? false;
}

/**
 * Publishes `n` realtime-update probes from inside the page (same-origin POST /sse/publish with an
 * admin token) and returns, per probe, the ms from just before the POST to the moment the page's
 * data client delivered that probe (both on the page's performance.now() clock).
 */
export async function publishLatencies(page, token, n = 10, deviceId = 'Machine 1') {
  return page.evaluate(async ({ token, n, deviceId }) => {
    const client = window.__sseClients.data;
    const out = [];
    for (let i = 0; i < n; i++) {
      const probe = `e2e-${i}-${Math.random().toString(36).slice(2)}`;
      let off;
      const seen = new Promise((resolve) => {
        off = client.on('realtime-update', (d) => { if (d?.data?.probe === probe) resolve(performance.now()); });
      });
      const t0 = performance.now();
      const res = await fetch('/sse/publish', {
        method: 'POST',
        headers: { Authorization: `Bearer ${token}`, 'Content-Type': 'application/json' },
        body: JSON.stringify({ channel: 'mqtt:realtime:processed', message: { deviceId, data: { probe } } }),
      });
      if (res.status !== 200) throw new Error(`POST /sse/publish: HTTP ${res.status} ${await res.text()}`);
      const t1 = performance.now();
      const t2 = await Promise.race([seen, new Promise((r) => setTimeout(() => r(null), 3000))]);
      off();
      out.push({ ack: Math.round((t1 - t0) * 10) / 10, seen: t2 === null ? null : Math.round((t2 - t0) * 10) / 10 });
    }
    return out;
  }, { token, n, deviceId });
}

/** "min/median/max ms" of a list of numbers. */
export function summary(xs) {
  const s = [...xs].sort((a, b) => a - b);
  return `min ${s[0]} / median ${s[Math.floor(s.length / 2)]} / max ${s.at(-1)} ms`;
}
