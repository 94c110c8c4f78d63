/**
 * sse-client.js: the browser side of sse-gateway, served at /sse/client.js.
 *
 *   import { SseClient } from '/sse/client.js';
 *   const c = new SseClient({ getToken, endpoint: 'stream', deviceIds: ['Machine 1'] });
 *   c.on('realtime-update', (data, ev) => ...); c.onStatus((s) => ...); c.start();
 *
 * Why a wrapper instead of a bare EventSource? Each rule below is a field
 * failure we have seen:
 *  - EventSource retries on its own with the URL it was made with. Once the
 *    ticket in that URL expires, it loops forever on 401 ("the page keeps
 *    reconnecting"). So on every error we close it and run our own loop, which
 *    fetches a fresh ticket (POST /sse/stream-ticket) for every attempt.
 *  - Fixed-delay retries stampede a gateway that has just restarted. We wait
 *    min(30 s, 750 ms * 1.6^n) +-25 %, n reset once a stream opens; a server
 *    drain (system {"kind":"shutdown"}) is answered after 1..5 s instead.
 *  - Proxies and sleeping laptops leave half-dead TCP streams that never error.
 *    A watchdog reconnects when nothing arrives for 2.5 heartbeat periods
 *    (period learned from the gap between `system` heartbeats).
 *  - Reconnects lose events. We remember the last `id` and resume with
 *    ?lastEventId=..., and drop replayed frames that are not newer.
 *    A `system` {"kind":"replay-gap"} tells the app to refetch history.
 *  - The gateway allows one data and one alert stream per user, and browsers
 *    allow ~6 connections per origin, so a second tab must not open its own
 *    stream. Tabs elect a leader (Web Locks, else a lease over BroadcastChannel);
 *    only the leader holds the EventSource and rebroadcasts every frame and
 *    status. When it closes, a follower takes over and resumes from its last id.
 *  - Empty keep-alive data and non-JSON payloads must never throw.
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

const LEASE_BEAT_MS = 1000, LEASE_TTL_MS = 3000;   // fallback election without Web Locks

export class SseClient {
  constructor(opts = {}) {
    this.opts = { baseUrl: '', endpoint: 'stream', deviceIds: [], includeStatus: true,
      pauseWhenHidden: false, shareAcrossTabs: true, heartbeatSecs: 25, withCredentials: false, ...opts };
    if (typeof this.opts.getToken !== 'function') throw new TypeError('SseClient: getToken is required');
    this.opts.deviceIds = [...(this.opts.deviceIds || [])];
    this.status = 'offline';
    this.lastEventId = null;
    this.role = 'idle';                      // 'idle' | 'leader' | 'follower'
    this._listeners = new Map();
    this._statusListeners = new Set();
    this._started = false;
    this._gen = 0;                           // bumps on every close: stale async work checks it
    this._attempt = 0;
    this._hbMs = this.opts.heartbeatSecs * 1000;
    this._tabId = Math.random().toString(36).slice(2) + Date.now().toString(36);
    this._statusCache = new Map();           // leader: last machine-status frame per device, for late followers
    this._onVisibility = () => this._sync();
    this._onOnline = () => { this._attempt = 0; this._sync(); };
    this._onOffline = () => { this._closeStream(); this._setStatus('offline'); };
    this._onPageHide = () => this._leaveGroup();
    this._onPageShow = (e) => { if (e.persisted) this._sync(); };
  }

  /** Adds a listener for an event type (or '*' for all); returns an unsubscribe function. */
  on(type, fn) {
    if (!this._listeners.has(type)) this._listeners.set(type, new Set());
    this._listeners.get(type).add(fn);
    return () => this.off(type, fn);
  }
  off(type, fn) { this._listeners.get(type)?.delete(fn); }

  /** Status listener: 'connecting' | 'live' | 'reconnecting' | 'offline'. Called at once with the current one. */
  onStatus(fn) { this._statusListeners.add(fn); fn(this.status); return () => this._statusListeners.delete(fn); }

  start() {
    if (this._started) return this;
    this._started = true;
    addEventListener('online', this._onOnline);
    addEventListener('offline', this._onOffline);
    addEventListener('pagehide', this._onPageHide);
    addEventListener('pageshow', this._onPageShow);
    document.addEventListener('visibilitychange', this._onVisibility);
    this._sync();
    return this;
  }

  stop() {
    if (!this._started) return this;
    this._started = false;
    removeEventListener('online', this._onOnline);
    removeEventListener('offline', this._onOffline);
    removeEventListener('pagehide', this._onPageHide);
    removeEventListener('pageshow', this._onPageShow);
    document.removeEventListener('visibilitychange', this._onVisibility);
    this._leaveGroup();
    this._setStatus('offline');
    return this;
  }

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

  // ---- lifecycle: decide whether this tab should be connected, following, or idle

  _wanted() {
    return this._started && !(this.opts.pauseWhenHidden && document.visibilityState === 'hidden')
      && this.opts.deviceIds.length + (this.opts.endpoint === 'alerts' ? 1 : 0) > 0;
  }

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
    const share = this.opts.shareAcrossTabs && typeof BroadcastChannel === 'function';
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
    const name = this._groupName();
    this.role = 'follower';
    this._setStatus(this.status === 'live' ? 'reconnecting' : 'connecting');
    this._bc = new BroadcastChannel(name);
    this._bc.onmessage = (e) => this._onTabMessage(e.data || {});
    this._post({ t: 'hello' });
    if (navigator.locks?.request) {
      const ac = this._lockAbort = new AbortController();
      navigator.locks.request(name, { signal: ac.signal }, () => new Promise((release) => {
        if (ac.signal.aborted) return release();
        this._releaseLock = release;
        this._becomeLeader();
      })).catch(() => {});                   // AbortError when we leave before getting it
    } else {
      this._leaseSeenAt = Date.now() - LEASE_TTL_MS + 500;   // give a live leader 500 ms to answer hello
      this._leaseTimer = setInterval(() => this._leaseTick(), LEASE_BEAT_MS / 2);
    }
  }

  _leaveGroup() {
    if (this.role === 'leader' && this._bc) this._post({ t: 'bye' });
    this._closeStream();
    this._lockAbort?.abort();
    this._releaseLock?.();
    clearInterval(this._leaseTimer);
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
    const now = Date.now();
    if (this.role === 'leader') this._post({ t: 'lease', from: this._tabId });
    else if (now - this._leaseSeenAt > LEASE_TTL_MS) { this._becomeLeader(); this._post({ t: 'lease', from: this._tabId }); }
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
      this._leaseSeenAt = Date.now();
    } else if (m.t === 'bye' && this.role === 'follower') {
      this._setStatus('reconnecting');
      if (!navigator.locks?.request) setTimeout(() => { this._leaseSeenAt = 0; }, Math.random() * 200);
    } else if (this.role === 'follower') {
      if (m.t === 'status') this._setStatus(m.status);
      else if (m.t === 'event') this._frame(m.type, m.data, m.id ?? '', m.id != null, true);
    }
  }

  // ---- the connection (leader or solo)

  async _connect(reason) {
    this._closeStream();
    if (!this._wanted()) return;
    if (!navigator.onLine) return this._setStatus('offline');
    const gen = this._connecting = ++this._gen;
    this._setStatus(reason === 'retry' ? 'reconnecting' : 'connecting');
    const { baseUrl, endpoint, deviceIds, includeStatus, withCredentials } = this.opts;
    let ticket;
    try {
      const token = await this.opts.getToken();
      if (gen !== this._gen) return;
      const res = await fetch(`${baseUrl}/sse/stream-ticket`, {
        method: 'POST',
        headers: { Authorization: `Bearer ${token}`, 'Content-Type': 'application/json' },
        body: JSON.stringify({ purpose: endpoint === 'alerts' ? 'alerts' : 'data' }),
        signal: AbortSignal.timeout ? AbortSignal.timeout(15000) : undefined,
      });
      if (gen !== this._gen) return;
      if (!res.ok) {
        const body = await res.text().catch(() => '');
        let parsed = body; try { parsed = JSON.parse(body); } catch { /* raw */ }
        throw Object.assign(new Error(`ticket request failed: HTTP ${res.status}`), { status: res.status, body: parsed });
      }
      ticket = (await res.json()).ticket;
      if (!ticket) throw new Error('ticket response has no ticket');
    } catch (err) {
      if (gen !== this._gen) return;
      this._emit('error', { stage: 'ticket', status: err.status ?? 0, message: err.message, body: err.body }, { type: 'error' });
      return this._retry();
    }
    if (gen !== this._gen) return;
    let q = `ticket=${encodeURIComponent(ticket)}`;
    if (endpoint !== 'alerts') {
      q += deviceIds.length === 1 ? `&deviceId=${encodeURIComponent(deviceIds[0])}`
        : `&deviceIds=${deviceIds.map(encodeURIComponent).join(',')}`;
      if (!includeStatus) q += '&includeStatus=false';
    }
    if (this.lastEventId) q += `&lastEventId=${encodeURIComponent(this.lastEventId)}`;
    const es = this._es = new EventSource(`${baseUrl}/sse/${endpoint}?${q}`, { withCredentials });
    let connId = '';                         // EventSource keeps lastEventId across id-less frames
    this._lastHbAt = 0;
    this._kick();                            // also bounds a connect that never opens
    es.onopen = () => { if (gen !== this._gen) return; this._attempt = 0; this._kick(); this._setStatus('live'); };
    es.onerror = () => {
      if (gen !== this._gen) return;
      this._emit('error', { stage: 'stream', status: 0, message: 'stream closed or refused' }, { type: 'error' });
      this._retry();
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
    clearTimeout(this._timer); clearTimeout(this._watchdog);
    this._timer = this._watchdog = null;
  }

  _retry(delayMs) {
    this._closeStream();
    if (!this._wanted()) return;
    if (!navigator.onLine) return this._setStatus('offline');
    this._setStatus('reconnecting');
    const ms = delayMs ?? backoffDelay(this._attempt++);
    this._timer = setTimeout(() => { this._timer = null; this._connect('retry'); }, ms);
  }

  _kick() {
    clearTimeout(this._watchdog);
    this._watchdog = setTimeout(() => {
      this._emit('error', { stage: 'watchdog', status: 0, message: `no data for ${Math.round(this._hbMs * 2.5)} ms` }, { type: 'error' });
      this._retry();
    }, this._hbMs * 2.5);
  }

  // ---- frames: dedupe, parse, system handling, rebroadcast, dispatch

  _frame(type, raw, id, hasId, fromTab) {
    if (hasId) {
      if (this.lastEventId && !isNewerId(id, this.lastEventId)) return;   // replayed duplicate
      this.lastEventId = id;
    }
    let data = raw;
    if (typeof raw === 'string' && raw.trim() !== '') { try { data = JSON.parse(raw); } catch { /* keep raw */ } }
    if (!fromTab) {
      this._kick();
      if (type === 'system' && data && data.kind === 'heartbeat') {
        const now = Date.now();
        if (this._lastHbAt) this._hbMs = Math.min(600000, Math.max(100, now - this._lastHbAt));
        this._lastHbAt = now;
      }
      if (this._bc && this.role === 'leader') {
        const msg = { t: 'event', type, data: raw, id: hasId ? id : null };
        this._post(msg);
        if (type === 'machine-status' && data?.deviceId) this._statusCache.set(data.deviceId, msg);
      }
      if (type === 'system' && data && data.kind === 'shutdown') {
        const hint = Number(data.retryMs ?? data.retry);   // EventSource hides the `retry:` field
        this._attempt = 0;
        this._retry(hint > 0 ? hint : 1000 + Math.random() * 4000);
      }
    }
    const ev = { type, id: hasId ? id : null, raw, fromTab };
    this._emit(type, data, ev);
    this._emit('*', data, ev);
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
