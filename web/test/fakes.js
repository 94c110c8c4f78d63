/**
 * Fakes of the browser APIs the client reaches through `env`: a clock with timers that only
 * move when a test advances it, EventSource, fetch of the ticket endpoint, BroadcastChannel and
 * Web Locks shared by the "tabs" of one fake browser. Deterministic: no real timers, no network.
 */

/** Lets every pending promise chain (and microtask-delivered tab message) run. */
export async function settle() {
  for (let i = 0; i < 4; i++) await new Promise((resolve) => setImmediate(resolve));
}

/** Virtual time: `advance(ms)` runs due timers in order, settling promises between them. */
export class FakeClock {
  constructor(start = 1_700_000_000_000) {
    this.t = start;
    this.timers = new Map();
    this.seq = 0;
    this.now = () => this.t;
    this.setTimeout = (fn, ms) => this._add(fn, ms, null);
    this.setInterval = (fn, ms) => this._add(fn, ms, Math.max(1, ms));
    this.clearTimeout = (id) => { this.timers.delete(id); };
    this.clearInterval = this.clearTimeout;
  }

  _add(fn, ms, every) {
    const id = ++this.seq;
    this.timers.set(id, { at: this.t + Math.max(0, Number(ms) || 0), delay: ms, fn, every });
    return id;
  }

  /** One-shot timers still pending, earliest first: [{ at, delay }]. */
  pending() {
    return [...this.timers.values()].filter((x) => !x.every).sort((a, b) => a.at - b.at);
  }

  async advance(ms) {
    const end = this.t + ms;
    for (;;) {
      await settle();
      let next = null, nextId = null;
      for (const [id, x] of this.timers) if (x.at <= end && (!next || x.at < next.at)) { next = x; nextId = id; }
      if (!next) break;
      this.t = next.at;
      if (next.every) next.at += next.every; else this.timers.delete(nextId);
      next.fn();
    }
    this.t = end;
    await settle();
  }
}

/** An EventSource class whose instances a test drives: open(), send(), error(). */
export function fakeEventSource() {
  const made = [];
  class FakeEventSource {
    constructor(url, init) {
      this.url = new URL(url, 'http://gw.test');
      this.init = init;
      this.closed = false;
      this.lastEventId = '';                 // like a browser: kept across frames without `id:`
      this.listeners = new Map();
      this.onopen = this.onerror = null;
      made.push(this);
    }
    addEventListener(type, fn) {
      if (!this.listeners.has(type)) this.listeners.set(type, []);
      this.listeners.get(type).push(fn);
    }
    close() { this.closed = true; }
    get ticket() { return this.url.searchParams.get('ticket'); }
    get resumeId() { return this.url.searchParams.get('lastEventId'); }
    open() { if (!this.closed) this.onopen?.({}); }
    error() { if (!this.closed) this.onerror?.({}); }
    /** A frame `event: type`, `data: data` (objects as JSON), optional `id:`. */
    send(type, data, id) {
      if (this.closed) return;
      if (id !== undefined) this.lastEventId = id;
      const raw = typeof data === 'string' ? data : JSON.stringify(data);
      for (const fn of this.listeners.get(type) || []) fn({ type, data: raw, lastEventId: this.lastEventId });
    }
  }
  FakeEventSource.made = made;
  FakeEventSource.live = () => made.filter((es) => !es.closed);
  return FakeEventSource;
}

/**
 * fetch of POST /sse/stream-ticket: answers tickets T1, T2, ... (ttl 300 s) unless a test
 * queued other answers with `next(status, body, headers)`. Records every call.
 */
export function fakeTicketFetch() {
  const calls = [], queued = [];
  let minted = 0;
  const fetch = async (url, init) => {
    const call = { url, init, auth: init.headers.Authorization, body: JSON.parse(init.body) };
    calls.push(call);
    const q = queued.shift();
    if (q) return response(q.status, q.body, q.headers);
    minted += 1;
    return response(200, { ticket: `T${minted}`, expiresInSeconds: fetch.ttl, ticketId: `id-${minted}` }, {});
  };
  fetch.ttl = 300;
  fetch.calls = calls;
  fetch.next = (status, body, headers = {}) => { queued.push({ status, body, headers }); };
  return fetch;
}

function response(status, body, headers) {
  const text = typeof body === 'string' ? body : JSON.stringify(body);
  const lower = Object.fromEntries(Object.entries(headers).map(([k, v]) => [k.toLowerCase(), v]));
  return {
    ok: status >= 200 && status < 300,
    status,
    headers: { get: (name) => lower[name.toLowerCase()] ?? null },
    json: async () => JSON.parse(text),
    text: async () => text,
  };
}

/** Web Locks (exclusive mode only): granted in request order, released when the callback's promise settles. */
export class FakeLocks {
  constructor() { this.held = new Map(); this.queues = new Map(); }

  request(name, opts, cb) {
    return new Promise((resolve, reject) => {
      const waiter = { cb, resolve, reject, signal: opts.signal };
      if (!this.queues.has(name)) this.queues.set(name, []);
      this.queues.get(name).push(waiter);
      opts.signal?.addEventListener('abort', () => {
        const q = this.queues.get(name), i = q.indexOf(waiter);
        if (i >= 0) { q.splice(i, 1); reject(Object.assign(new Error('aborted'), { name: 'AbortError' })); }
      });
      queueMicrotask(() => this._grant(name));
    });
  }

  holder(name) { return this.held.get(name) ?? null; }

  _grant(name) {
    if (this.held.has(name)) return;
    const waiter = this.queues.get(name)?.shift();
    if (!waiter) return;
    this.held.set(name, waiter);
    Promise.resolve(waiter.cb({ name, mode: 'exclusive' })).then(waiter.resolve, waiter.reject).finally(() => {
      this.held.delete(name);
      this._grant(name);
    });
  }
}

/** One fake browser profile: tabs made with `tab()` share BroadcastChannel and (optionally) Web Locks. */
export class FakeBrowser {
  constructor({ clock = new FakeClock(), locks = true } = {}) {
    this.clock = clock;
    this.locks = locks ? new FakeLocks() : undefined;
    this.channels = new Set();
    this.EventSource = fakeEventSource();
    this.fetch = fakeTicketFetch();
    const channels = this.channels;
    this.BroadcastChannel = class FakeBroadcastChannel {
      constructor(name) { this.name = name; this.onmessage = null; this.closed = false; channels.add(this); }
      postMessage(msg) {
        if (this.closed) throw new Error('InvalidStateError: channel closed');
        const copy = structuredClone(msg);
        for (const other of channels) {
          if (other !== this && other.name === this.name) queueMicrotask(() => { if (!other.closed) other.onmessage?.({ data: copy }); });
        }
      }
      close() { this.closed = true; channels.delete(this); }
    };
  }

  /** The env of one tab; `random` decides its tab id and its jitter. */
  tab({ random = () => 0.5, online = true } = {}) {
    const document = Object.assign(new EventTarget(), { visibilityState: 'visible' });
    return {
      now: this.clock.now,
      random,
      setTimeout: this.clock.setTimeout,
      clearTimeout: this.clock.clearTimeout,
      setInterval: this.clock.setInterval,
      clearInterval: this.clock.clearInterval,
      fetch: this.fetch,
      timeoutSignal: () => undefined,
      EventSource: this.EventSource,
      BroadcastChannel: this.BroadcastChannel,
      AbortController,
      window: new EventTarget(),
      document,
      navigator: { onLine: online, locks: this.locks },
    };
  }
}
