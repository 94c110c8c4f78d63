// Scenario 3: quick reloads never meet a 429, and three tabs of one browser share one stream.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { launch, valueChanged, waitInPage } from './lib/browser.js';
import { deferrer, metric, startGateway, ticketFor } from './lib/gateway.js';

const bothLive = () => window.__sse.status === 'live' && window.__sse.alertsStatus === 'live';

test('ten quick reloads never meet a 429; three tabs share one data stream', { timeout: 90000 }, async (t) => {
  const defer = deferrer(t);
  const gw = await startGateway();
  defer(() => gw.stop());
  const b = await launch();
  defer(() => b.close());

  // Every response on /sse/* in any tab of the profile, by status.
  const refused = [];
  const opened = { stream: 0, alerts: 0 };
  b.ctx.on('response', (r) => {
    const u = new URL(r.url());
    if (!u.pathname.startsWith('/sse/')) return;
    if (r.status() === 429) refused.push(`${new Date().toISOString()} ${r.request().method()} ${u.pathname} -> 429`);
    if (r.status() === 200 && (u.pathname === '/sse/stream' || u.pathname === '/sse/alerts')) opened[u.pathname.slice(5)]++;
  });

  const page = await b.page();
  await page.goto(`${gw.url}/`, { waitUntil: 'domcontentloaded' });
  await waitInPage(page, 'both streams live on first load', bothLive, null, { gw });
  const t0 = Date.now();
  for (let i = 1; i <= 10; i++) {
    // Reload as soon as the previous load's streams are open: the old streams are still
    // registered at the gateway when the new page asks for its own.
    await page.reload({ waitUntil: 'domcontentloaded' });
    await waitInPage(page, `both streams live after reload ${i}`, bothLive, null, { timeout: 5000, gw });
  }
  t.diagnostic(`10 reloads, each to Live on both streams, in ${Date.now() - t0} ms; streams opened: ${JSON.stringify(opened)}`);
  assert.deepEqual(refused, [], 'no 429 on any /sse/ request during the reloads');
  assert.deepEqual(opened, { stream: 11, alerts: 11 }, 'each load opened exactly one data and one alert stream');

  // Three tabs of one profile: one leader holds the streams, the others follow over BroadcastChannel.
  const tabs = [page, await b.ctx.newPage(), await b.ctx.newPage()];
  await Promise.all(tabs.slice(1).map((p) => p.goto(`${gw.url}/`, { waitUntil: 'domcontentloaded' })));
  await Promise.all(tabs.map((p, i) => p.evaluate(() => window.__e2eResetChange())
    .then(() => waitInPage(p, `tab ${i + 1} shows changing values`, valueChanged, null, { timeout: 5000, gw }))));
  const states = await Promise.all(tabs.map((p) => p.evaluate(() => ({
    status: window.__sse.status, text: document.querySelector('#status .status-text').textContent,
    role: window.__sseClients.data.role, alertsRole: window.__sseClients.alerts.role, events: window.__sse.events,
  }))));
  t.diagnostic(`tabs: ${JSON.stringify(states)}`);
  for (const s of states) assert.equal(s.text, 'Live');
  assert.deepEqual(states.map((s) => s.role).sort(), ['follower', 'follower', 'leader']);
  assert.deepEqual(states.map((s) => s.alertsRole).sort(), ['follower', 'follower', 'leader']);

  const metrics = await (await fetch(`${gw.url}/metrics`)).text();
  assert.equal(metric(metrics, 'sse_streams_open{purpose="data"}'), 1, `one data stream open:\n${metrics}`);
  assert.equal(metric(metrics, 'sse_streams_open{purpose="alerts"}'), 1, 'one alert stream open');
  const { token } = await (await fetch(`${gw.url}/demo/token`)).json();
  const status = await (await fetch(`${gw.url}/sse/status?ticket=${encodeURIComponent(await ticketFor(gw.url, token))}`)).json();
  assert.equal(status.connections?.data, 1, `/sse/status: ${JSON.stringify(status)}`);
  assert.equal(status.connections?.alerts, 1);
  assert.deepEqual(refused, [], 'no 429 with three tabs either');
  assert.deepEqual(b.consoleErrors, [], 'no console errors or warnings');

  // The leader tab closes: a follower takes the streams over (fresh ticket, resume id) and the
  // other tab keeps getting values from it; still one data stream at the gateway.
  const leader = tabs[states.findIndex((s) => s.role === 'leader')];
  const rest = tabs.filter((p) => p !== leader);
  await Promise.all(rest.map((p) => p.evaluate(() => window.__e2eResetChange())));
  const handoff = Date.now();
  const refusedBeforeHandoff = refused.length;
  const reopened = b.ctx.waitForEvent('response', { predicate: (r) => new URL(r.url()).pathname === '/sse/stream' && r.status() === 200 });
  await leader.close();
  const closedIn = Date.now() - handoff;
  await Promise.all(rest.map((p, i) => waitInPage(p, `remaining tab ${i + 1} live with changing values after the leader closed`,
    () => window.__sse.status === 'live' && window.__sseClients.data.role !== 'idle' && window.__e2eChange !== null,
    null, { timeout: 8000, gw })));
  const liveIn = Date.now() - handoff;
  await reopened;
  const roles = await Promise.all(rest.map((p) => p.evaluate(() => window.__sseClients.data.role)));
  t.diagnostic(`leader tab closed in ${closedIn} ms; the remaining tabs were live with new values ${liveIn} ms after the close began; roles ${roles}`);
  assert.deepEqual(roles.sort(), ['follower', 'leader']);
  const after = await (await fetch(`${gw.url}/metrics`)).text();
  assert.equal(metric(after, 'sse_streams_open{purpose="data"}'), 1, 'still one data stream after the handoff');
  // Not asserted: on a CPU-starved machine the new leader's request can reach the gateway before
  // the gateway has handled the old leader's FIN (a gateway-side race, reported); the client then
  // retries after its backoff, which the waits above already cover.
  const handoff429 = refused.length - refusedBeforeHandoff;
  if (handoff429) t.diagnostic(`leader handoff met ${handoff429} transient 429: ${refused.slice(refusedBeforeHandoff)}`);
  assert.deepEqual(b.pageErrors, []);
});
