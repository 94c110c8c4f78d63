// Scenario 4: the demo page behind nginx (deploy/nginx/sse-gateway.conf): events arrive
// unbuffered, and X-Forwarded-For (appended by nginx) decides the per-IP stream limit.
import assert from 'node:assert/strict';
import { request } from 'node:http';
import { test } from 'node:test';
import { launch, publishLatencies, summary, timeline, valueChanged, waitInPage } from './lib/browser.js';
import { adminToken, deferrer, mintToken, startGateway, ticketFor } from './lib/gateway.js';
import { startNginx } from './lib/nginx.js';

const TRUST_NGINX = ['--trusted-proxies', '127.0.0.1/32'];

test('through nginx: the page goes live and published events are seen within 100 ms (median)', { timeout: 60000 }, async (t) => {
  const defer = deferrer(t);
  const gw = await startGateway({ args: TRUST_NGINX });
  defer(() => gw.stop());
  const nx = await startNginx({ upstreamPort: gw.port });
  defer(() => nx.stop());
  const b = await launch();
  defer(() => b.close());
  const page = await b.page();
  const streamResponse = page.waitForResponse((r) => new URL(r.url()).pathname === '/sse/stream');

  await page.goto(`${nx.url}/`, { waitUntil: 'domcontentloaded' });
  const changedAt = await waitInPage(page, 'a value changes through nginx', valueChanged, null, { timeout: 5000, gw });
  await waitInPage(page, 'both streams live through nginx',
    () => window.__sse.status === 'live' && window.__sse.alertsStatus === 'live', null, { gw });
  const res = await streamResponse;
  assert.equal(res.status(), 200);
  assert.match(res.headers()['content-type'], /^text\/event-stream/);
  assert.equal(res.headers()['content-encoding'], undefined, 'nginx must not compress the stream');
  assert.ok(res.url().startsWith(`${nx.url}/sse/stream?`), res.url());
  assert.match(res.headers().server ?? '', /nginx/, 'the stream response came through nginx');

  const samples = await publishLatencies(page, adminToken(), 20);
  const seen = samples.map((s) => s.seen);
  t.diagnostic(`first value change ${Math.round(changedAt)} ms after navigation (${await timeline(page)}); publish->seen through nginx over ${samples.length} probes: `
    + `${summary(seen.filter((x) => x !== null))} (publish ack ${summary(samples.map((s) => s.ack))})`);
  assert.ok(seen.every((x) => x !== null), `every probe arrived: ${JSON.stringify(samples)}`);
  // A buffering proxy holds small events until its buffer fills or the upstream closes: seconds,
  // or never. The median is the proof of "unbuffered"; single probes on a CPU-starved machine can
  // take longer, and then the POST /sse/publish answer is just as late, so the bound on every
  // probe is looser.
  const median = [...seen].sort((x, y) => x - y)[Math.floor(seen.length / 2)];
  assert.ok(median < 100, `median publish->seen ${median} ms, budget 100 ms: ${JSON.stringify(samples)}`);
  assert.ok(Math.max(...seen) < 1000, `every probe seen within 1 s of its publish: ${JSON.stringify(samples)}`);
  assert.deepEqual(b.consoleErrors, [], 'no console errors or warnings');
  assert.deepEqual(b.pageErrors, []);
});

/** GET through nginx with an X-Forwarded-For; resolves at the first body bytes (200) or the whole body (otherwise). */
function openStream(base, path, xff) {
  return new Promise((resolve, reject) => {
    const req = request(`${base}${path}`, { agent: false, headers: { 'X-Forwarded-For': xff, Accept: 'text/event-stream' }, timeout: 5000 });
    req.on('timeout', () => req.destroy(new Error(`no answer to ${xff} within 5 s`)));
    req.on('error', reject);
    req.on('response', (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (d) => {
        body += d;
        if (res.statusCode === 200 && /^retry: \d+/m.test(body)) resolve({ status: 200, body, close: () => req.destroy() });
      });
      res.on('end', () => resolve({ status: res.statusCode, body, close: () => req.destroy() }));
      res.on('error', reject);
    });
    req.end();
  });
}

test('through nginx: X-Forwarded-For decides the per-IP limit', { timeout: 60000 }, async (t) => {
  const defer = deferrer(t);
  const gw = await startGateway({ args: [...TRUST_NGINX, '--max-conns-per-ip', '1'] });
  defer(() => gw.stop());
  const nx = await startNginx({ upstreamPort: gw.port });
  defer(() => nx.stop());
  const open = [];
  defer(() => open.forEach((s) => s.close()));

  // One user per stream, so only the per-IP limit can refuse (one alert stream per user is allowed).
  const alertStream = async (user, xff) => {
    const ticket = await ticketFor(nx.url, mintToken({ sub: user }), 'alerts');
    const s = await openStream(nx.url, `/sse/alerts?ticket=${encodeURIComponent(ticket)}`, xff);
    open.push(s);
    return s;
  };

  const a = await alertStream('xff-a', '203.0.113.7');
  const b = await alertStream('xff-b', '203.0.113.8');
  assert.equal(a.status, 200, `first client's stream opens: ${a.body}`);
  assert.equal(b.status, 200, `second client (another X-Forwarded-For) opens too: ${b.body}`);

  const c = await alertStream('xff-c', '203.0.113.7');
  assert.equal(c.status, 429, `same X-Forwarded-For as the first stream is over the limit: ${c.body}`);
  const body = JSON.parse(c.body);
  assert.equal(body.statusCode, 429);
  assert.equal(body.maxConnectionsPerIp, 1, c.body);

  // Entries left of the client's own address are the client's to forge: they must not help.
  const d = await alertStream('xff-d', '198.51.100.23, 203.0.113.8');
  assert.equal(d.status, 429, `a forged left-hand X-Forwarded-For entry does not dodge the limit: ${d.body}`);

  const clients = [...gw.log().matchAll(/stream open .*client=(\S+)/g)].map((m) => m[1]);
  t.diagnostic(`streams: ${a.status}, ${b.status}, ${c.status}, ${d.status}; gateway saw clients ${clients.join(', ')}; 429 body ${c.body}`);
});
