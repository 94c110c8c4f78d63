// The client's connection logic in one tab, against fakes (test/fakes.js) and a fake clock:
// tickets, backoff, watchdog, resume, system events, Retry-After. Run: node --test test/
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { SseClient, backoffDelay, isNewerId, parseEventId, retryAfterMs } from '../sse-client.js';
import { FakeBrowser, settle } from './fakes.js';

/** A started single-tab client on a fake browser; records what the app hears. */
async function solo({ random = () => 0.5, ...opts } = {}) {
  const browser = new FakeBrowser();
  const env = browser.tab({ random });
  let tokens = 0;
  const client = new SseClient({
    getToken: async () => `access-${++tokens}`, endpoint: 'stream', deviceIds: ['Machine 1'], shareAcrossTabs: false, env, ...opts,
  });
  const heard = [], errors = [], statuses = [], system = [];
  client.on('*', (data, ev) => heard.push({ type: ev.type, data, id: ev.id }));
  client.on('system', (data) => system.push(data.kind));
  client.on('error', (e) => errors.push(e));
  client.onStatus((s) => statuses.push(s));
  client.start();
  await settle();
  const ES = browser.EventSource;
  return { browser, clock: browser.clock, ES, fetch: browser.fetch, client, heard, errors, statuses, system,
    es: () => ES.made.at(-1), tokens: () => tokens };
}

/** The one pending one-shot timer while the client waits to retry (the watchdog is cleared then). */
function retryTimer(c) {
  const pending = c.clock.pending();
  assert.equal(pending.length, 1, `one retry timer pending, not ${JSON.stringify(pending)}`);
  return pending[0];
}

test('backoffDelay: 750 ms * 1.6^n within +-25 %, capped at 30 s, never under 250 ms', () => {
  assert.equal(backoffDelay(0, () => 0.5), 750);
  assert.equal(backoffDelay(0, () => 0), 563);
  assert.equal(backoffDelay(0, () => 1), 938);
  assert.equal(backoffDelay(3, () => 0.5), Math.round(750 * 1.6 ** 3));
  assert.equal(backoffDelay(50, () => 0.5), 30000);
  assert.equal(backoffDelay(50, () => 1), 37500);
  for (let n = 0; n < 20; n++) {
    const base = Math.min(30000, 750 * 1.6 ** n);
    for (const r of [0, 0.3, 0.999]) {
      const d = backoffDelay(n, () => r);
      assert.ok(d >= Math.max(250, Math.floor(base * 0.75)) && d <= Math.ceil(base * 1.25), `n=${n} r=${r}: ${d}`);
    }
  }
});

test('event ids: <epoch_ms>-<seq> compare by time then sequence; other shapes never compare equal', () => {
  assert.deepEqual(parseEventId('1700000000000-7'), [1700000000000, 7]);
  assert.equal(parseEventId('abc'), null);
  assert.equal(parseEventId(undefined), null);
  assert.ok(isNewerId('1000-2', '1000-1'));
  assert.ok(isNewerId('1001-0', '1000-9'));
  assert.ok(!isNewerId('1000-1', '1000-1'));
  assert.ok(!isNewerId('999-9', '1000-0'));
  assert.ok(isNewerId('x', 'y'));
  assert.ok(!isNewerId('x', 'x'));
});

test('retryAfterMs reads delta-seconds and HTTP dates, ignores anything else', () => {
  const now = Date.parse('2026-01-27T12:00:00Z');
  assert.equal(retryAfterMs('20', now), 20000);
  assert.equal(retryAfterMs(' 0 ', now), 0);
  assert.equal(retryAfterMs('Tue, 27 Jan 2026 12:00:30 GMT', now), 30000);
  assert.equal(retryAfterMs('Tue, 27 Jan 2026 11:00:00 GMT', now), 0);
  assert.equal(retryAfterMs(null, now), null);
  assert.equal(retryAfterMs('', now), null);
  assert.equal(retryAfterMs('soon', now), null);
  assert.equal(retryAfterMs('-5', now), null);
});

test('every attempt after a failure mints a fresh ticket with a fresh access token', async () => {
  const c = await solo();
  assert.equal(c.fetch.calls.length, 1);
  assert.equal(c.fetch.calls[0].auth, 'Bearer access-1');
  assert.deepEqual(c.fetch.calls[0].body, { purpose: 'data' });
  assert.equal(c.es().url.pathname, '/sse/stream');
  assert.equal(c.es().ticket, 'T1');
  assert.equal(c.es().url.searchParams.get('deviceId'), 'Machine 1');
  assert.deepEqual(c.statuses, ['offline', 'connecting']);

  for (let i = 2; i <= 4; i++) {
    c.es().error();                          // refused or unreachable before it opened
    assert.equal(c.client.status, 'reconnecting');
    await c.clock.advance(60000);
    assert.equal(c.fetch.calls.length, i, `attempt ${i} asked for a ticket`);
    assert.equal(c.fetch.calls[i - 1].auth, `Bearer access-${i}`);
    assert.equal(c.es().ticket, `T${i}`);
  }
  assert.equal(c.ES.made.length, 4);
  assert.equal(c.ES.live().length, 1, 'every failed EventSource was closed (no browser auto-retry)');
  assert.deepEqual(c.errors.map((e) => e.stage), ['stream', 'stream', 'stream']);
});

test('backoff grows per failure with the injected jitter, and resets once a stream opens', async () => {
  const c = await solo({ random: () => 1 });   // +25 % on every delay
  const waits = [];
  for (let n = 0; n < 4; n++) {
    c.es().error();
    const timer = retryTimer(c);
    waits.push(timer.delay);
    const before = c.ES.made.length;
    await c.clock.advance(timer.delay - 1);
    assert.equal(c.ES.made.length, before, `no attempt before ${timer.delay} ms`);
    await c.clock.advance(1);
    assert.equal(c.ES.made.length, before + 1);
  }
  assert.deepEqual(waits, [0, 1, 2, 3].map((n) => backoffDelay(n, () => 1)));
  assert.deepEqual(waits, [938, 1500, 2400, 3840]);

  c.es().open();
  assert.equal(c.client.status, 'live');
  c.es().error();                            // a drop after a live stream starts over at attempt 0
  assert.equal(retryTimer(c).delay, 938);
});

test('watchdog: a stream silent for 2.5 heartbeat periods is replaced; the period is learned', async () => {
  const c = await solo({ heartbeatSecs: 10 });
  const first = c.es();
  first.open();
  await c.clock.advance(20000);
  first.send('realtime-update', { deviceId: 'Machine 1', data: { t: 1 }, timestamp: 'x' }, '1-1');
  await c.clock.advance(24999);              // 25 s since the last frame: not yet
  assert.equal(first.closed, false);
  await c.clock.advance(1);
  assert.equal(first.closed, true, 'silent for 25 s: closed');
  assert.equal(c.errors.at(-1).stage, 'watchdog');
  assert.equal(c.client.status, 'reconnecting');
  await c.clock.advance(1000);
  const second = c.es();
  assert.notEqual(second, first);
  assert.equal(second.resumeId, '1-1');

  second.open();                             // heartbeats every 2 s: the watchdog tightens to 5 s
  second.send('system', { kind: 'heartbeat', ts: 'a' });
  await c.clock.advance(2000);
  second.send('system', { kind: 'heartbeat', ts: 'b' });
  await c.clock.advance(4999);
  assert.equal(second.closed, false);
  await c.clock.advance(1);
  assert.equal(second.closed, true);
});

test('a connect that never opens is bounded by the watchdog too', async () => {
  const c = await solo({ heartbeatSecs: 4 });
  await c.clock.advance(9999);
  assert.equal(c.es().closed, false);
  await c.clock.advance(1);
  assert.equal(c.ES.made[0].closed, true);
  assert.equal(c.errors.at(-1).stage, 'watchdog');
});

test('reconnect resumes with the last id and drops replayed duplicates; id-less frames pass', async () => {
  const c = await solo();
  const a = c.es();
  a.open();
  a.send('machine-status', { deviceId: 'Machine 1', data: 'RUNNING', source: 'cache', timestamp: 't' });
  a.send('realtime-update', { deviceId: 'Machine 1', data: { v: 1 }, timestamp: 't' }, '1000-1');
  a.send('realtime-update', { deviceId: 'Machine 1', data: { v: 2 }, timestamp: 't' }, '1000-2');
  a.send('system', { kind: 'heartbeat', ts: 't' });            // no id: EventSource still reports 1000-2
  assert.equal(c.client.lastEventId, '1000-2');
  a.error();
  await c.clock.advance(2000);
  const b = c.es();
  assert.equal(b.resumeId, '1000-2');
  b.open();
  b.send('realtime-update', { deviceId: 'Machine 1', data: { v: 1 }, timestamp: 't' }, '1000-1');   // replayed
  b.send('realtime-update', { deviceId: 'Machine 1', data: { v: 2 }, timestamp: 't' }, '1000-2');   // replayed
  b.send('realtime-update', { deviceId: 'Machine 1', data: { v: 3 }, timestamp: 't' }, '1001-0');
  b.send('machine-status', { deviceId: 'Machine 1', data: 'IDLE', source: 'cache', timestamp: 't' });
  assert.deepEqual(c.heard.map((h) => [h.type, h.id, h.data.data ?? h.data.kind]), [
    ['machine-status', null, 'RUNNING'],
    ['realtime-update', '1000-1', { v: 1 }],
    ['realtime-update', '1000-2', { v: 2 }],
    ['system', null, 'heartbeat'],
    ['realtime-update', '1001-0', { v: 3 }],
    ['machine-status', null, 'IDLE'],
  ]);
  assert.equal(c.client.lastEventId, '1001-0');
});

test('replay-gap and bus state reach the app as system events; empty and non-JSON data never throw', async () => {
  const c = await solo();
  c.es().open();
  c.es().send('system', { kind: 'replay-gap' });
  c.es().send('system', { kind: 'degraded' });
  c.es().send('system', { kind: 'recovered' });
  c.es().send('realtime-update', 'not json', '5-1');
  c.es().send('message', '');
  assert.deepEqual(c.system, ['replay-gap', 'degraded', 'recovered']);
  assert.deepEqual(c.heard.slice(-2).map((h) => h.data), ['not json', '']);
  assert.equal(c.client.status, 'live');
});

test('revoked: the app hears it, status is revoked, nothing reconnects; start() again mints a fresh ticket', async () => {
  const c = await solo();
  c.es().open();
  c.es().send('system', { kind: 'revoked' });
  assert.deepEqual(c.system, ['revoked']);
  assert.equal(c.client.status, 'revoked');
  assert.equal(c.statuses.at(-1), 'revoked');
  assert.equal(c.ES.live().length, 0);
  c.es().error();                            // the gateway closes the stream after the frame
  await c.clock.advance(600000);
  assert.equal(c.ES.made.length, 1, 'no reconnect with revoked credentials');
  assert.equal(c.fetch.calls.length, 1);
  assert.equal(c.client.status, 'revoked');

  c.client.start();                          // the app got new credentials
  await settle();
  assert.equal(c.fetch.calls.length, 2, 'a revoked ticket is never reused');
  assert.equal(c.es().ticket, 'T2');
});

test('shutdown: reconnect after a random 1..5 s (or the hinted retryMs), with the same ticket', async () => {
  for (const [r, wait] of [[0, 1000], [0.25, 2000], [0.999, 4996]]) {
    const c = await solo({ random: () => r });
    c.es().open();
    c.es().send('system', { kind: 'shutdown' });
    assert.equal(c.client.status, 'reconnecting');
    const made = c.ES.made.length;
    await c.clock.advance(wait - 1);
    assert.equal(c.ES.made.length, made, `r=${r}: not before ${wait} ms`);
    await c.clock.advance(1);
    assert.equal(c.ES.made.length, made + 1, `r=${r}: at ${wait} ms`);
    assert.equal(c.es().ticket, 'T1', 'the drained stream\'s ticket is reused');
    assert.equal(c.fetch.calls.length, 1);
  }
  const h = await solo();
  h.es().open();
  h.es().send('system', { kind: 'shutdown', retryMs: 3333 });
  await h.clock.advance(3332);
  assert.equal(h.ES.made.length, 1);
  await h.clock.advance(1);
  assert.equal(h.ES.made.length, 2);
});

test('a ticket request answered 429 is not repeated before Retry-After; 429 without it waits >= 5 s', async () => {
  const c = await solo({ random: () => 0 });
  c.es().open();
  c.client.stop();
  c.fetch.next(429, { statusCode: 429, message: 'Too many stream tickets', error: 'Too Many Requests' }, { 'Retry-After': '20' });
  c.client.start();
  await settle();
  assert.equal(c.fetch.calls.length, 2);
  assert.equal(c.errors.at(-1).stage, 'ticket');
  assert.equal(c.errors.at(-1).status, 429);
  assert.equal(c.errors.at(-1).retryAfterMs, 20000);
  assert.equal(c.errors.at(-1).body.error, 'Too Many Requests');
  assert.equal(c.client.status, 'reconnecting');
  await c.clock.advance(19999);
  assert.equal(c.fetch.calls.length, 2, 'nothing before Retry-After');
  await c.clock.advance(1);
  assert.equal(c.fetch.calls.length, 3);
  assert.equal(c.es().ticket, 'T2');

  c.es().error();                            // fails before open: the next ticket is minted
  c.fetch.next(429, 'slow down', {});        // a cross-origin page cannot read Retry-After
  await c.clock.advance(retryTimer(c).delay);
  assert.equal(c.fetch.calls.length, 4);
  assert.equal(retryTimer(c).delay, 5000, 'no readable Retry-After: 5 s, more than the backoff');
  await c.clock.advance(4999);
  assert.equal(c.fetch.calls.length, 4);
  await c.clock.advance(1);
  assert.equal(c.fetch.calls.length, 5);

  c.es().error();
  const askAt = c.clock.now() + retryTimer(c).delay;
  const date = new Date(askAt + 61000).toUTCString();   // whole seconds: 60..61 s after the request
  c.fetch.next(503, { statusCode: 503 }, { 'Retry-After': date });
  await c.clock.advance(retryTimer(c).delay);
  assert.equal(c.fetch.calls.length, 6);
  const wait = retryAfterMs(date, c.clock.now());
  assert.ok(wait > 59000 && wait <= 61000, `${wait}`);
  assert.equal(retryTimer(c).delay, wait, 'an HTTP-date Retry-After (503) is honoured too');
  await c.clock.advance(wait);
  assert.equal(c.fetch.calls.length, 7);
});

test('ticket reuse: a ticket that carried a live stream is used once more while over 15 s are left', async () => {
  const c = await solo();
  c.es().open();
  c.es().error();                            // e.g. a proxy cut the stream
  await c.clock.advance(2000);
  assert.equal(c.fetch.calls.length, 1, 'no new ticket request');
  assert.equal(c.es().ticket, 'T1');
  assert.equal(c.tokens(), 1);

  c.es().error();                            // the reused ticket was refused before opening
  assert.equal(retryTimer(c).delay, 0, 'a fresh ticket is asked for at once');
  await c.clock.advance(0);
  assert.equal(c.fetch.calls.length, 2);
  assert.equal(c.es().ticket, 'T2');

  c.fetch.ttl = 30;                          // T3 lives 30 s: reused up to 15 s before its expiry
  c.es().error();
  await c.clock.advance(retryTimer(c).delay);
  assert.equal(c.es().ticket, 'T3');
  const mintedAt = c.clock.now();
  c.es().open();
  await c.clock.advance(14000);
  c.es().error();
  await c.clock.advance(retryTimer(c).delay);
  assert.equal(c.es().ticket, 'T3', '16 s left: reused');
  c.es().open();
  await c.clock.advance(mintedAt + 15001 - c.clock.now());
  c.es().error();
  await c.clock.advance(retryTimer(c).delay);
  assert.equal(c.fetch.calls.length, 4, 'under 15 s left: minted a new one');
  assert.equal(c.es().ticket, 'T4');

  const off = await solo({ reuseTicket: false });
  off.es().open();
  off.es().error();
  await off.clock.advance(2000);
  assert.equal(off.fetch.calls.length, 2, 'reuseTicket: false mints every time');
  assert.equal(off.es().ticket, 'T2');
});

test('offline: no attempt while the browser is offline; online reconnects at once', async () => {
  const c = await solo();
  const env = c.client._env;
  c.es().open();
  env.navigator.onLine = false;
  env.window.dispatchEvent(new Event('offline'));
  assert.equal(c.client.status, 'offline');
  assert.equal(c.ES.live().length, 0);
  await c.clock.advance(120000);
  assert.equal(c.ES.made.length, 1);
  env.navigator.onLine = true;
  env.window.dispatchEvent(new Event('online'));
  await settle();
  assert.equal(c.ES.made.length, 2);
  assert.equal(c.client.status, 'reconnecting');
});

test('alerts endpoint: purpose alerts, no device parameters; stop() closes and goes offline', async () => {
  const c = await solo({ endpoint: 'alerts', deviceIds: [] });
  assert.deepEqual(c.fetch.calls[0].body, { purpose: 'alerts' });
  assert.equal(c.es().url.pathname, '/sse/alerts');
  assert.equal(c.es().url.searchParams.get('deviceId'), null);
  c.client.stop();
  assert.equal(c.es().closed, true);
  assert.equal(c.client.status, 'offline');
  await c.clock.advance(600000);
  assert.equal(c.ES.made.length, 1);
});
