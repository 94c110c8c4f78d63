// Scenario 2: the gateway dies (SIGKILL) and comes back on the same port: the page shows
// "Reconnecting", then "Live" again, on a stream opened with a freshly fetched ticket.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { launch, waitInPage } from './lib/browser.js';
import { deferrer, freePort, startGateway } from './lib/gateway.js';

test('gateway killed and restarted: Reconnecting, then Live with a fresh ticket', { timeout: 60000 }, async (t) => {
  const defer = deferrer(t);
  const port = await freePort();
  let gw = await startGateway({ port });
  defer(() => gw.stop());
  const b = await launch();
  defer(() => b.close());
  const page = await b.page();

  // Every ticket POST of the data stream, and every data stream request with the ticket it used.
  const ticketPosts = [];   // { at, status }
  const streams = [];       // { at, ticket, lastEventId, status }
  page.on('request', (r) => {
    const u = new URL(r.url());
    if (r.method() === 'POST' && u.pathname === '/sse/stream-ticket' && JSON.parse(r.postData() || '{}').purpose === 'data') {
      const rec = { at: Date.now(), status: null };
      ticketPosts.push(rec);
      r.response().then((res) => { rec.status = res?.status() ?? 'no response'; }, () => { rec.status = 'failed'; });
    }
    if (u.pathname === '/sse/stream') {
      const rec = { at: Date.now(), ticket: u.searchParams.get('ticket'), lastEventId: u.searchParams.get('lastEventId'), status: null };
      streams.push(rec);
      r.response().then((res) => { rec.status = res?.status() ?? 'no response'; }, () => { rec.status = 'failed'; });
    }
  });
  page.on('requestfailed', (r) => {
    const rec = streams.find((s) => r.url().includes(encodeURIComponent(s.ticket)) && s.status === null);
    if (rec) rec.status = 'failed';
  });

  await page.goto(`${gw.url}/`, { waitUntil: 'domcontentloaded' });
  await waitInPage(page, 'Live with realtime data before the kill',
    () => window.__sse.status === 'live' && (window.__sse.byType['realtime-update'] || 0) > 0, null, { gw });
  const firstTicket = streams.at(-1)?.ticket;
  await page.evaluate(() => window.__sseClients.data.on('system', (d) => {
    if (d?.kind === 'replay-gap') window.__e2eGaps = (window.__e2eGaps || 0) + 1;
  }));
  assert.equal(ticketPosts.length, 1, 'one data ticket for the first connect');
  assert.equal(streams.length, 1);

  const killedAt = Date.now();
  await gw.kill9();
  await waitInPage(page, 'status shows Reconnecting after SIGKILL',
    () => window.__sse.status === 'reconnecting' && /^Reconnecting/.test(document.querySelector('#status .status-text').textContent),
    null, { timeout: 5000 });
  const reconnectingAfter = Date.now() - killedAt;

  const restartBegan = Date.now();
  gw = await startGateway({ port });   // same port, a new random demo secret: the page fetches a new access token
  const restartedAt = Date.now();
  const realtimeBefore = await page.evaluate(() => window.__sse.byType['realtime-update'] || 0);
  await waitInPage(page, 'Live again after the restart',
    () => window.__sse.status === 'live' && document.querySelector('#status .status-text').textContent === 'Live',
    null, { timeout: 15000, gw });
  const liveAfter = Date.now() - restartedAt;
  await waitInPage(page, 'new realtime data after the restart',
    (n) => (window.__sse.byType['realtime-update'] || 0) > n, realtimeBefore, { timeout: 3000, gw });

  // Requests after the kill: those before the restart fail (connection refused), later ones succeed.
  const freshPosts = ticketPosts.filter((p) => p.at >= killedAt);
  const ok = streams.filter((s) => s.at >= killedAt && s.status === 200);
  t.diagnostic(`Reconnecting shown ${reconnectingAfter} ms after SIGKILL; restart began ${restartBegan - killedAt} ms and was listening ${restartedAt - killedAt} ms after SIGKILL; `
    + `ticket POSTs at ${ticketPosts.map((p) => p.at - killedAt).join(', ')} ms after SIGKILL; Live again ${liveAfter} ms after restart; `
    + `data ticket POSTs: ${ticketPosts.length} (${ticketPosts.map((p) => p.status).join(',')}), stream requests: `
    + `${streams.map((s) => s.status).join(',')}`);
  assert.ok(freshPosts.some((p) => p.status === 200), `a ticket POST after the restart succeeded: ${JSON.stringify(ticketPosts)}`);
  assert.ok(ok.length >= 1, `a data stream opened (200) after the restart: ${JSON.stringify(streams)}`);
  assert.notEqual(ok.at(-1).ticket, firstTicket, 'the new stream uses a fresh ticket, not the pre-kill URL');
  assert.ok(ok.at(-1).lastEventId, 'the reconnect resumes with ?lastEventId=');
  // The resume id was issued by the killed process: the README promises a replay-gap system event.
  await waitInPage(page, 'replay-gap after resuming with an id of the dead process',
    () => window.__e2eGaps >= 1, null, { timeout: 3000, gw });
  assert.deepEqual(b.pageErrors, []);
});
