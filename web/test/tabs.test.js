// Tabs of one browser share one stream: leader election over Web Locks, or over a
// BroadcastChannel lease where Web Locks are missing; rebroadcast; hand-over; revocation.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { SseClient } from '../sse-client.js';
import { FakeBrowser, settle } from './fakes.js';

const ELECTIONS = [['Web Locks', true], ['BroadcastChannel lease', false]];

/** A tab with a data client for two machines; `random` makes its tab id differ from the others'. */
function tab(browser, random) {
  const client = new SseClient({ getToken: async () => 'access', deviceIds: ['Machine 2', 'Machine 1'], env: browser.tab({ random }) });
  const heard = [], statuses = [];
  client.on('*', (data, ev) => heard.push({ type: ev.type, data, id: ev.id, fromTab: ev.fromTab }));
  client.onStatus((s) => statuses.push(s));
  return { client, heard, statuses };
}

/** Starts the tab and lets the election settle (the lease needs over 500 ms of silence). */
async function join(browser, t) {
  t.client.start();
  await browser.clock.advance(browser.locks ? 0 : 1000);
}

/** Two tabs of one browser, joined in order: `a` leads. */
async function twoTabs(locks) {
  const browser = new FakeBrowser({ locks });
  const a = tab(browser, () => 0.25), b = tab(browser, () => 0.75);
  await join(browser, a);
  await join(browser, b);
  return { browser, a, b };
}

for (const [election, locks] of ELECTIONS) {
  test(`${election}: two tabs share one stream; the follower hears every frame and status`, async () => {
    const { browser, a, b } = await twoTabs(locks);
    assert.equal(a.client.role, 'leader');
    assert.equal(b.client.role, 'follower');
    assert.equal(browser.EventSource.made.length, 1, 'one EventSource for both tabs');
    assert.equal(browser.fetch.calls.length, 1);
    const es = browser.EventSource.made[0];
    assert.equal(es.url.searchParams.get('deviceIds'), 'Machine 2,Machine 1');

    es.open();
    es.send('realtime-update', { deviceId: 'Machine 1', data: { v: 1 }, timestamp: 't' }, '1000-1');
    es.send('system', { kind: 'heartbeat', ts: 't' });
    es.send('spc-update', { deviceId: 'Machine 2', data: { x: 2 }, timestamp: 't' }, '1000-2');
    await settle();
    assert.equal(b.client.status, 'live');
    assert.deepEqual(b.heard, [
      { type: 'realtime-update', data: { deviceId: 'Machine 1', data: { v: 1 }, timestamp: 't' }, id: '1000-1', fromTab: true },
      { type: 'system', data: { kind: 'heartbeat', ts: 't' }, id: null, fromTab: true },
      { type: 'spc-update', data: { deviceId: 'Machine 2', data: { x: 2 }, timestamp: 't' }, id: '1000-2', fromTab: true },
    ]);
    assert.deepEqual(a.heard.map((h) => [h.id, h.fromTab]), [['1000-1', false], [null, false], ['1000-2', false]]);
    assert.equal(b.client.lastEventId, '1000-2');
    await browser.clock.advance(10000);
    assert.equal(browser.EventSource.made.length, 1, 'the follower stays a follower');
  });

  test(`${election}: the leader closes; a follower takes over with a fresh ticket and the last id`, async () => {
    const { browser, a, b } = await twoTabs(locks);
    const first = browser.EventSource.made[0];
    first.open();
    first.send('realtime-update', { deviceId: 'Machine 1', data: 1, timestamp: 't' }, '2000-5');
    await settle();

    a.client.stop();                         // the leader tab closes (pagehide does the same)
    assert.equal(first.closed, true);
    await browser.clock.advance(locks ? 0 : 1000);
    assert.equal(b.client.role, 'leader');
    assert.ok(b.statuses.includes('reconnecting'));
    assert.equal(browser.EventSource.live().length, 1);
    const second = browser.EventSource.made.at(-1);
    assert.notEqual(second, first);
    assert.equal(browser.fetch.calls.length, 2, 'the new leader mints its own ticket');
    assert.equal(second.ticket, 'T2');
    assert.equal(second.resumeId, '2000-5', 'resumes from the last id the follower saw');
    second.open();
    assert.equal(b.client.status, 'live');
  });

  test(`${election}: revoked in the leader stops every tab; no tab reconnects`, async () => {
    const { browser, a, b } = await twoTabs(locks);
    const es = browser.EventSource.made[0];
    es.open();
    await settle();
    es.send('system', { kind: 'revoked' });
    await browser.clock.advance(60000);
    assert.equal(a.client.status, 'revoked');
    assert.equal(b.client.status, 'revoked');
    assert.deepEqual(b.heard.map((h) => [h.type, h.data.kind, h.fromTab]), [['system', 'revoked', true]]);
    assert.equal(browser.EventSource.made.length, 1, 'nobody reconnected');
    assert.equal(browser.fetch.calls.length, 1);
    assert.equal(b.client.role, 'idle');
  });
}

test('Web Locks: a late tab gets the current status and the machine-status snapshot from the leader', async () => {
  const browser = new FakeBrowser();
  const a = tab(browser, () => 0.25);
  await join(browser, a);
  const es = browser.EventSource.made[0];
  es.open();
  es.send('machine-status', { deviceId: 'Machine 1', data: 'RUNNING', source: 'cache', timestamp: 't' });
  es.send('machine-status', { deviceId: 'Machine 2', data: 'IDLE', source: 'cache', timestamp: 't' });
  es.send('machine-status', { deviceId: 'Machine 1', data: 'STOPPED', timestamp: 't2' });
  const late = tab(browser, () => 0.75);
  await join(browser, late);
  assert.equal(late.client.status, 'live');
  assert.deepEqual(late.heard.map((h) => [h.data.deviceId, h.data.data]), [['Machine 1', 'STOPPED'], ['Machine 2', 'IDLE']]);
  assert.equal(browser.EventSource.made.length, 1);
});

test('tabs on other devices are other groups: each has its own stream', async () => {
  const { browser, b } = await twoTabs(true);
  b.client.setDevices(['Machine 3']);
  await settle();
  assert.equal(b.client.role, 'leader');
  assert.equal(browser.EventSource.live().length, 2);
  assert.equal(browser.EventSource.made.at(-1).url.searchParams.get('deviceId'), 'Machine 3');
  assert.equal(browser.EventSource.made.at(-1).resumeId, null, 'a new subscription does not resume');
});

test('a tab that took the lead before the old leader\'s revoked arrived stops when it does', async () => {
  const browser = new FakeBrowser();
  const b = tab(browser, () => 0.75);
  await join(browser, b);
  assert.equal(b.client.role, 'leader');
  const oldLeader = new browser.BroadcastChannel('sse-gateway||stream|Machine 1,Machine 2|true');
  oldLeader.postMessage({ t: 'event', type: 'system', data: '{"kind":"revoked"}', id: null });
  oldLeader.close();
  await browser.clock.advance(60000);
  assert.equal(b.client.status, 'revoked');
  assert.deepEqual(b.heard.map((h) => [h.type, h.data.kind, h.fromTab]), [['system', 'revoked', true]]);
  assert.equal(browser.EventSource.live().length, 0);
  assert.equal(browser.EventSource.made.length, 1);
});
