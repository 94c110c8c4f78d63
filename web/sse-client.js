/**
 * sse-client.js: the browser side of sse-gateway, served at /sse/client.js and
 * published as the npm package `sse-gateway-client` (types in index.d.ts).
 *
 *   import { SseClient } from '/sse/client.js';      // or from 'sse-gateway-client'
 *   const c = new SseClient({ getToken, endpoint: 'stream', deviceIds: ['Machine 1'] });
 *   c.on('realtime-update', (data, ev) => ...); c.onStatus((s) => ...); c.start();
 *
 * Why a wrapper instead of a bare EventSource? Each rule below is a field
 * failure we have seen:
 *  - EventSource retries on its own with the URL it was made with. Once the
 *    ticket in that URL expires, it loops forever on 401 ("the page keeps
 *    reconnecting"). So on every error we close it and run our own loop, which
 *    fetches a fresh ticket (POST /sse/stream-ticket) for every attempt after a
 *    failed one. A ticket that has carried a live stream is used once more for
 *    the reconnect while it has over 15 s left (minting is rate limited per
 *    user); if that attempt fails before the stream opens, the ticket is
 *    dropped and a fresh one is asked for at once.
 *  - A ticket request answered with Retry-After (429: the per-user mint limit;
 *    503: Redis is slow) is not repeated before that time.
 *  - Fixed-delay retries stampede a gateway that has just restarted. We wait
 *    min(30 s, 750 ms * 1.6^n) +-25 %, n reset once a stream opens; a server
 *    drain (system {"kind":"shutdown"}) is answered after 1..5 s instead.
 *  - Proxies and sleeping laptops leave half-dead TCP streams that never error.
 *    A watchdog reconnects when nothing arrives for 2.5 heartbeat periods
 *    (period learned from the gap between `system` heartbeats).
 *  - Reconnects lose events. We remember the last `id` and resume with
 *    ?lastEventId=..., and drop replayed frames that are not newer.
 *    A `system` {"kind":"replay-gap"} tells the app to refetch history.
 *  - A revoked ticket or access (system {"kind":"revoked"}) must not be
 *    answered by reconnecting with the same credentials: the client stops,
 *    in every tab, with status 'revoked'; the app decides (log in, setDevices,
 *    start() again).
 *  - The gateway allows one data and one alert stream per user, and browsers
 *    allow ~6 connections per origin, so a second tab must not open its own
 *    stream. Tabs elect a leader (Web Locks, else a lease over BroadcastChannel);
 *    only the leader holds the EventSource and rebroadcasts every frame and
 *    status. When it closes, a follower takes over and resumes from its last id.
 *  - Empty keep-alive data and non-JSON payloads must never throw.
 *
 * Every browser API is reached through `env` (defaults: the globals), so the
 * logic runs under node's test runner with fakes and a fake clock.
 */

export const EVENT_TYPES = ['realtime-update', 'spc-update', 'spc-series-update', 'machine-status',
  'machine-alert', 'alarm-update', 'system', 'message'];

/** Parses `<epoch_ms>-<seq>` into [ms, seq]; null when the id has another shape. */
export function parseEventId(id) {
  const m = /^(\d+)-(\d+)$/.exec(String(id ?? ''));
  return m ? [Number(m[1]), Number(m[2])] : null;
}

/** True when id `a` is newer than id `b` (or either cannot be compared). */
export function isNewerId(a, b) {
  const x = parseEventId(a), y = parseEventId(b);
  if (!x || !y) return a !== b;
  return x[0] > y[0] || (x[0] === y[0] && x[1] > y[1]);
}

/** Reconnect delay for attempt n: min(30 s, 750 ms * 1.6^n) +-25 %, at least 250 ms. */
export function backoffDelay(n, rand = Math.random) {
  const base = Math.min(30000, 750 * Math.pow(1.6, n));
  return Math.max(250, Math.round(base + base * 0.25 * (rand() * 2 - 1)));
}

/** A Retry-After header (seconds, or an HTTP date) as milliseconds from `now`; null when absent or unreadable. */
export function retryAfterMs(value, now = Date.now()) {
  const text = String(value ?? '').trim();
  if (text === '') return null;
  if (/^\d+$/.test(text)) return Number(text) * 1000;
  const at = /GMT$/i.test(text) ? Date.parse(text) : NaN;   // IMF-fixdate, e.g. Tue, 27 Jan 2026 12:00:30 GMT
  return Number.isFinite(at) ? Math.max(0, at - now) : null;
}

/** The browser APIs the client uses, taken from `g`; `opts.env` overrides any of them. */
export function browserEnv(g = globalThis) {
  return {
    now: () => Date.now(),
    random: () => Math.random(),
    setTimeout: (fn, ms) => g.setTimeout(fn, ms),
    clearTimeout: (t) => g.clearTimeout(t),
    setInterval: (fn, ms) => g.setInterval(fn, ms),
    clearInterval: (t) => g.clearInterval(t),
    fetch: (url, init) => g.fetch(url, init),
    timeoutSignal: (ms) => g.AbortSignal?.timeout?.(ms),
    EventSource: g.EventSource,
    BroadcastChannel: g.BroadcastChannel,
    AbortController: g.AbortController,
    window: g,                               // online, offline, pagehide, pageshow
    document: g.document,                    // visibilitychange
    navigator: g.navigator,                  // onLine, locks
  };
}

const LEASE_BEAT_MS = 1000, LEASE_TTL_MS = 3000;   // fallback election without Web Locks
const TICKET_REUSE_MARGIN_MS = 15000;              // a ticket with less left is not reused
const RATE_LIMITED_FLOOR_MS = 5000;                // 429 without a readable Retry-After (CORS hides it)
const RETRY_AFTER_CAP_MS = 600000;
const TICKET_FETCH_TIMEOUT_MS = 15000;

export class SseClient {
  constructor(opts = {}) {
    const { env, ...rest } = opts;
    this.opts = { baseUrl: '', endpoint: 'stream', deviceIds: [], includeStatus: true, pauseWhenHidden: false,
      shareAcrossTabs: true, heartbeatSecs: 25, withCredentials: false, reuseTicket: true, ...rest };
    if (typeof this.opts.getToken !== 'function') throw new TypeError('SseClient: getToken is required');
    this.opts.deviceIds = [...(this.opts.deviceIds || [])];
    this._env = { ...browserEnv(), ...env };
    this.status = 'offline';
    this.lastEventId = null;
    this.role = 'idle';                      // 'idle' | 'leader' | 'follower'
    this._listeners = new Map();
    this._statusListeners = new Set();
    this._started = false;
    this._gen = 0;                           // bumps on every close: stale async work checks it
    this._attempt = 0;
    this._ticket = null;                     // { value, expiresAt, opened } of the last minted ticket
    this._hbMs = this.opts.heartbeatSecs * 1000;
    this._tabId = this._env.random().toString(36).slice(2) + this._env.now().toString(36);
    this._statusCache = new Map();           // leader: last machine-status frame per device, for late followers
    this._onVisibility = () => this._sync();
    this._onOnline = () => { this._attempt = 0; this._sync(); };
    this._onOffline = () => { this._closeStream(); this._setStatus('offline'); };
    this._onPageHide = () => this._leaveGroup();
    this._onPageShow = (e) => { if (e.persisted) this._sync(); };
  }

  /** Adds a listener for an event type (or '*' for all, 'error' for failures); returns an unsubscribe function. */
  on(type, fn) {
    if (!this._listeners.has(type)) this._listeners.set(type, new Set());
    this._listeners.get(type).add(fn);
    return () => this.off(type, fn);
  }
  off(type, fn) { this._listeners.get(type)?.delete(fn); }

  /** Status listener: 'connecting' | 'live' | 'reconnecting' | 'offline' | 'revoked'. Called at once with the current one. */
  onStatus(fn) { this._statusListeners.add(fn); fn(this.status); return () => { this._statusListeners.delete(fn); }; }

  start() {
    if (this._started) return this;
    this._started = true;
    this._pageEvents('addEventListener');
    this._sync();
    return this;
  }

  stop() { return this._halt('offline'); }

  /** Switches the data stream to other devices: a new stream (and a new tab group). */
  setDevices(ids) {
    const next = [...ids];
    if (next.join('\n') === this.opts.deviceIds.join('\n')) return this;
    this.opts.deviceIds = next;
    this.lastEventId = null;                 // a new subscription: the app loads history for new devices
    this._statusCache.clear();
    this._attempt = 0;
    if (this._started) { this._leaveGroup(); this._setStatus('connecting'); this._sync(); }
    return this;
  }

  /** Stops everything and ends in `status`: 'offline' (stop()) or 'revoked'. */
  _halt(status) {
    if (this._started) {
      this._started = false;
      this._pageEvents('removeEventListener');
      this._leaveGroup();
      this._ticket = null;                   // credentials may change before the next start()
    }
    this._setStatus(status);
    return this;
  }

  /** Adds or removes (`method`) the listeners of the page's connectivity, lifecycle and visibility. */
  _pageEvents(method) {
    const { window: w, document: d } = this._env;
    w?.[method]?.('online', this._onOnline);
    w?.[method]?.('offline', this._onOffline);
    w?.[method]?.('pagehide', this._onPageHide);
    w?.[method]?.('pageshow', this._onPageShow);
    d?.[method]?.('visibilitychange', this._onVisibility);
  }

  // ---- lifecycle: decide whether this tab should be connected, following, or idle

  _wanted() {
    return this._started && !(this.opts.pauseWhenHidden && this._env.document?.visibilityState === 'hidden')
      && this.opts.deviceIds.length + (this.opts.endpoint === 'alerts' ? 1 : 0) > 0;
  }

  _online() { return this._env.navigator?.onLine !== false; }

  _sync() {
    if (!this._wanted()) {
      this._leaveGroup();
      if (this._started) this._setStatus('offline');
      return;
    }
    if (this.role !== 'idle') {             // already in place; a leader without a stream (back online) reconnects
      if (this.role === 'leader' && !this._es && !this._timer && this._connecting !== this._gen) this._connect('retry');
      return;
    }
    const share = this.opts.shareAcrossTabs && typeof this._env.BroadcastChannel === 'function';
    if (!share) { this.role = 'leader'; this._connect('start'); return; }
    this._joinGroup();
  }

  _groupName() {
    const { baseUrl, endpoint, deviceIds, includeStatus } = this.opts;
    const devs = endpoint === 'alerts' ? '' : [...deviceIds].sort().join(',');
    return `sse-gateway|${baseUrl}|${endpoint}|${devs}|${includeStatus}`;
  }

  // ---- tab sharing: leader election and rebroadcast

  _joinGroup() {
    const env = this._env, name = this._groupName(), locks = env.navigator?.locks;
    this.role = 'follower';
    this._setStatus(this.status === 'live' ? 'reconnecting' : 'connecting');
    this._bc = new env.BroadcastChannel(name);
    this._bc.onmessage = (e) => this._onTabMessage(e.data || {});
    this._post({ t: 'hello' });
    if (locks?.request) {
      const ac = this._lockAbort = new env.AbortController();
      locks.request(name, { signal: ac.signal }, () => new Promise((release) => {
        if (ac.signal.aborted) return release();
        this._releaseLock = release;
        this._becomeLeader();
      })).catch(() => {});                   // AbortError when we leave before getting it
    } else {
      this._leaseSeenAt = env.now() - LEASE_TTL_MS + 500;   // give a live leader 500 ms to answer hello
      this._leaseTimer = env.setInterval(() => this._leaseTick(), LEASE_BEAT_MS / 2);
    }
  }

  _leaveGroup() {
    if (this.role === 'leader' && this._bc) this._post({ t: 'bye' });
    this._closeStream();
    this._lockAbort?.abort();
    this._releaseLock?.();
    if (this._leaseTimer) this._env.clearInterval(this._leaseTimer);
    this._bc?.close();
    this._bc = this._lockAbort = this._releaseLock = this._leaseTimer = null;
    this.role = 'idle';
  }

  _becomeLeader() {
    const wasFollowingLive = this.status === 'live' || this.status === 'reconnecting';
    this.role = 'leader';
    this._attempt = 0;
    this._connect(wasFollowingLive ? 'retry' : 'start');
  }

  _leaseTick() {
    if (this.role === 'leader') this._post({ t: 'lease', from: this._tabId });
    else if (this._env.now() - this._leaseSeenAt > LEASE_TTL_MS) { this._becomeLeader(); this._post({ t: 'lease', from: this._tabId }); }
  }

  _post(msg) { try { this._bc?.postMessage(msg); } catch { /* channel closed */ } }

  _onTabMessage(m) {
    if (m.t === 'hello' && this.role === 'leader') {
      this._post({ t: 'status', status: this.status });
      if (!this._releaseLock) this._post({ t: 'lease', from: this._tabId });
      for (const f of this._statusCache.values()) this._post(f);
    } else if (m.t === 'lease') {
      if (this.role === 'leader' && m.from !== this._tabId) {
        if (m.from < this._tabId) return;    // two leaders: the larger tab id keeps the stream
        this._closeStream(); this.role = 'follower';
      }
      this._leaseSeenAt = this._env.now();
    } else if (m.t === 'bye' && this.role === 'follower') {
      this._setStatus('reconnecting');
      if (!this._env.navigator?.locks?.request) {
        this._env.setTimeout(() => { this._leaseSeenAt = 0; }, this._env.random() * 200);
      }
    } else if (m.t === 'event' && this.role === 'leader' && /"kind"\s*:\s*"revoked"/.test(m.data ?? '')) {
      this._frame(m.type, m.data, '', false, true);   // took the lock before the old leader's revoked arrived
    } else if (this.role === 'follower') {
      if (m.t === 'status') this._setStatus(m.status);
      else if (m.t === 'event') this._frame(m.type, m.data, m.id ?? '', m.id != null, true);
    }
  }

  // ---- tickets: mint (POST /sse/stream-ticket) or reuse one that carried a live stream

  async _takeTicket(gen) {
    const env = this._env, held = this._ticket;
    if (this.opts.reuseTicket && held?.opened && env.now() < held.expiresAt - TICKET_REUSE_MARGIN_MS) {
      held.reused = true;
      return held;
    }
    this._ticket = null;
    const token = await this.opts.getToken();
    if (gen !== this._gen) return null;
    const { baseUrl, endpoint } = this.opts;
    const res = await env.fetch(`${baseUrl}/sse/stream-ticket`, {
      method: 'POST',
      headers: { Authorization: `Bearer ${token}`, 'Content-Type': 'application/json' },
      body: JSON.stringify({ purpose: endpoint === 'alerts' ? 'alerts' : 'data' }),
      signal: env.timeoutSignal(TICKET_FETCH_TIMEOUT_MS),
    });
    if (gen !== this._gen) return null;
    if (!res.ok) {
      const text = await res.text().catch(() => '');
      let body = text; try { body = JSON.parse(text); } catch { /* raw */ }
      const wait = retryAfterMs(res.headers?.get?.('Retry-After'), env.now());
      throw Object.assign(new Error(`ticket request failed: HTTP ${res.status}`),
        { status: res.status, body, retryAfterMs: wait ?? undefined });
    }
    const body = await res.json();
    if (!body?.ticket) throw new Error('ticket response has no ticket');
    const ttlMs = Number(body.expiresInSeconds) * 1000;
    return (this._ticket = { value: body.ticket, expiresAt: env.now() + (ttlMs > 0 ? ttlMs : 0), opened: false });
  }

  /** Delay before the next attempt after a failed ticket request: backoff, or Retry-After when longer. */
  _ticketRetryDelay(err) {
    const backoff = backoffDelay(this._attempt++, this._env.random);
    const told = err.retryAfterMs ?? (err.status === 429 ? RATE_LIMITED_FLOOR_MS : null);
    if (told == null) return backoff;
    const jitter = Math.round(this._env.random() * Math.min(1000, told * 0.1));
    return Math.max(backoff, Math.min(RETRY_AFTER_CAP_MS, told) + jitter);
  }

  // ---- the connection (leader or solo)

  async _connect(reason) {
    this._closeStream();
    if (!this._wanted()) return;
    if (!this._online()) return this._setStatus('offline');
    const gen = this._connecting = ++this._gen;
    this._setStatus(reason === 'retry' ? 'reconnecting' : 'connecting');
    const { baseUrl, endpoint, deviceIds, includeStatus, withCredentials } = this.opts;
    let ticket;
    try {
      ticket = await this._takeTicket(gen);
      if (!ticket) return;
    } catch (err) {
      if (gen !== this._gen) return;
      this._emit('error', { stage: 'ticket', status: err.status ?? 0, message: err.message, body: err.body,
        retryAfterMs: err.retryAfterMs }, { type: 'error' });
      return this._retry(this._ticketRetryDelay(err));
    }
    if (gen !== this._gen) return;
    let q = `ticket=${encodeURIComponent(ticket.value)}`;
    if (endpoint !== 'alerts') {
      q += deviceIds.length === 1 ? `&deviceId=${encodeURIComponent(deviceIds[0])}`
        : `&deviceIds=${deviceIds.map(encodeURIComponent).join(',')}`;
      if (!includeStatus) q += '&includeStatus=false';
    }
    if (this.lastEventId) q += `&lastEventId=${encodeURIComponent(this.lastEventId)}`;
    const es = this._es = new this._env.EventSource(`${baseUrl}/sse/${endpoint}?${q}`, { withCredentials });
    let connId = '', opened = false;         // EventSource keeps lastEventId across id-less frames
    this._lastHbAt = 0;
    this._kick();                            // also bounds a connect that never opens
    es.onopen = () => {
      if (gen !== this._gen) return;
      opened = ticket.opened = true;
      this._attempt = 0; this._kick(); this._setStatus('live');
    };
    es.onerror = () => {
      if (gen !== this._gen) return;
      if (!opened && this._ticket === ticket) this._ticket = null;   // refused: never this ticket again
      this._emit('error', { stage: 'stream', status: 0, message: 'stream closed or refused' }, { type: 'error' });
      this._retry(!opened && ticket.reused ? 0 : undefined);           // a refused reused ticket: mint at once
    };
    for (const type of EVENT_TYPES) {
      es.addEventListener(type, (e) => {
        if (gen !== this._gen) return;
        const hasId = e.lastEventId !== '' && e.lastEventId !== connId;
        connId = e.lastEventId;
        this._frame(type, e.data, e.lastEventId, hasId, false);
      });
    }
  }

  _closeStream() {
    this._gen++;
    if (this._es) { this._es.onopen = this._es.onerror = null; this._es.close(); this._es = null; }
    if (this._timer) this._env.clearTimeout(this._timer);
    if (this._watchdog) this._env.clearTimeout(this._watchdog);
    this._timer = this._watchdog = null;
  }

  _retry(delayMs) {
    this._closeStream();
    if (!this._wanted()) return;
    if (!this._online()) return this._setStatus('offline');
    this._setStatus('reconnecting');
    const ms = delayMs ?? backoffDelay(this._attempt++, this._env.random);
    this._timer = this._env.setTimeout(() => { this._timer = null; this._connect('retry'); }, ms);
  }

  _kick() {
    if (this._watchdog) this._env.clearTimeout(this._watchdog);
    const ms = this._hbMs * 2.5;
    this._watchdog = this._env.setTimeout(() => {
      this._watchdog = null;
      this._emit('error', { stage: 'watchdog', status: 0, message: `no data for ${Math.round(ms)} ms` }, { type: 'error' });
      this._retry();
    }, ms);
  }

  // ---- frames: dedupe, parse, system handling, rebroadcast, dispatch

  _frame(type, raw, id, hasId, fromTab) {
    if (hasId) {
      if (this.lastEventId && !isNewerId(id, this.lastEventId)) return;   // replayed duplicate
      this.lastEventId = id;
    }
    let data = raw;
    if (typeof raw === 'string' && raw.trim() !== '') { try { data = JSON.parse(raw); } catch { /* keep raw */ } }
    const kind = type === 'system' && data && typeof data === 'object' ? data.kind : undefined;
    if (!fromTab) {
      if (kind === 'heartbeat') {
        const now = this._env.now();
        if (this._lastHbAt) this._hbMs = Math.min(600000, Math.max(100, now - this._lastHbAt));
        this._lastHbAt = now;
      }
      this._kick();
      if (this._bc && this.role === 'leader') {
        const msg = { t: 'event', type, data: raw, id: hasId ? id : null };
        this._post(msg);
        if (type === 'machine-status' && data?.deviceId) this._statusCache.set(data.deviceId, msg);
      }
      if (kind === 'shutdown') {
        const hint = Number(data.retryMs ?? data.retry);   // EventSource hides the `retry:` field
        this._attempt = 0;
        this._retry(hint > 0 ? hint : 1000 + this._env.random() * 4000);
      }
    }
    const ev = { type, id: hasId ? id : null, raw, fromTab };
    this._emit(type, data, ev);
    this._emit('*', data, ev);
    if (kind === 'revoked') this._halt('revoked');
  }

  _emit(type, data, ev) {
    for (const fn of this._listeners.get(type) || []) {
      try { fn(data, ev); } catch (err) { console.error('SseClient listener failed:', err); }
    }
  }

  _setStatus(s) {
    if (s === this.status) return;
    this.status = s;
    if (this.role === 'leader') this._post({ t: 'status', status: s });
    for (const fn of this._statusListeners) {
      try { fn(s); } catch (err) { console.error('SseClient status listener failed:', err); }
    }
  }
}

export default SseClient;
