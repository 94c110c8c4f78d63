// Starting and stopping the gateway under test, free ports, tokens, small HTTP helpers.
// Every process started here is tracked by PID and killed by PID (never by name).
import { spawn } from 'node:child_process';
import { generateKeyPairSync, sign } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

export const REPO = resolve(dirname(fileURLToPath(import.meta.url)), '../../..');
export const BIN = resolve(REPO, process.env.SSE_GATEWAY_BIN || 'target/debug/sse-gateway');
/**
 * The main app's identity provider for these tests: an Ed25519 key pair made per run. `--demo` signs
 * with a random secret of its own and refuses `--jwt-secret` (contract 7.1), so tests mint EdDSA
 * access tokens and every gateway verifies them with `--jwt-public-key` (a restart keeps them valid).
 */
const IDP = generateKeyPairSync('ed25519');
const KEY_DIR = mkdtempSync(join(tmpdir(), 'sse-e2e-'));
export const PUBLIC_KEY_FILE = join(KEY_DIR, 'idp.pub.pem');
writeFileSync(PUBLIC_KEY_FILE, IDP.publicKey.export({ type: 'spki', format: 'pem' }));

const live = new Set();   // child processes still running, killed on an abnormal exit of the runner
const killAll = () => {
  for (const c of live) { try { process.kill(c.pid, 'SIGKILL'); } catch { /* gone */ } }
  rmSync(KEY_DIR, { recursive: true, force: true });
};
process.once('exit', killAll);
for (const sig of ['SIGINT', 'SIGTERM']) process.once(sig, () => { killAll(); process.exit(128 + (sig === 'SIGINT' ? 2 : 15)); });

/** A TCP port on 127.0.0.1 that was free a moment ago. */
export function freePort() {
  return new Promise((res, rej) => {
    const s = createServer();
    s.unref();
    s.once('error', rej);
    s.listen(0, '127.0.0.1', () => { const { port } = s.address(); s.close(() => res(port)); });
  });
}

/** Resolves when `child` has exited (at once if it already has). */
export function exited(child) {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve();
  return new Promise((res) => child.once('exit', () => res()));
}

function withTimeout(promise, ms, what) {
  let timer;
  return Promise.race([promise, new Promise((_, rej) => { timer = setTimeout(() => rej(new Error(`timed out after ${ms} ms: ${what}`)), ms); })])
    .finally(() => clearTimeout(timer));
}

/**
 * Spawns `cmd args` and resolves once `ready` matches its stderr; rejects if it exits or stays silent.
 * Returns the child plus `log()` (everything it wrote to stderr so far).
 */
export async function spawnUntil(cmd, args, { env, ready, timeoutMs = 10000, name = cmd }) {
  const child = spawn(cmd, args, { env, stdio: ['ignore', 'ignore', 'pipe'] });
  live.add(child);
  child.once('exit', () => live.delete(child));
  let log = '';
  child.stderr.setEncoding('utf8');
  child.stderr.on('data', (d) => { log += d; if (log.length > 200000) log = log.slice(-100000); });
  try {
    await withTimeout(new Promise((res, rej) => {
      const check = () => { const m = ready.exec(log); if (m) res(m); };
      child.stderr.on('data', check);
      child.once('error', rej);
      child.once('exit', (code, sig) => rej(new Error(`${name} exited (${code ?? sig}) before it was ready:\n${log}`)));
    }), timeoutMs, `${name} to log ${ready}\n${log}`);
  } catch (err) {
    try { process.kill(child.pid, 'SIGKILL'); } catch { /* gone */ }
    throw err;
  }
  return { child, log: () => log };
}

/** Stops a child by PID: `signal` first, SIGKILL if it has not exited within `graceMs`. */
export async function stopChild(child, signal = 'SIGTERM', graceMs = 5000) {
  if (!child || child.exitCode !== null || child.signalCode !== null) return;
  try { process.kill(child.pid, signal); } catch { return; }
  try { await withTimeout(exited(child), graceMs, `pid ${child.pid} to exit on ${signal}`); } catch {
    try { process.kill(child.pid, 'SIGKILL'); } catch { /* gone */ }
    await exited(child);
  }
}

/**
 * Starts `sse-gateway --demo --listen 127.0.0.1:<port> --jwt-public-key <PUBLIC_KEY_FILE> ...args` with a clean
 * environment (no SSE_* variables leak in) and waits for its "listening on" log line.
 */
export async function startGateway({ port, args = [] } = {}) {
  port ??= await freePort();
  const env = { PATH: process.env.PATH, RUST_LOG: process.env.E2E_RUST_LOG || 'info' };
  const argv = ['--demo', '--listen', `127.0.0.1:${port}`, '--jwt-public-key', PUBLIC_KEY_FILE, '--drain-secs', '1', ...args];
  const { child, log } = await spawnUntil(BIN, argv, { env, ready: /listening on http:\/\/127\.0\.0\.1:(\d+)/, name: 'sse-gateway' });
  const url = `http://127.0.0.1:${port}`;
  return {
    child, port, url, log,
    /** Last lines of the gateway's log, for failure messages. */
    tail: (n = 30) => log().trimEnd().split('\n').slice(-n).join('\n'),
    stop: () => stopChild(child, 'SIGTERM', 4000),
    kill9: async () => { try { process.kill(child.pid, 'SIGKILL'); } catch { /* gone */ } await exited(child); },
  };
}

const b64url = (v) => Buffer.from(typeof v === 'string' ? v : JSON.stringify(v)).toString('base64url');

/** An EdDSA access token signed with the test identity provider's key, as the main app would issue it. */
export function mintToken(claims) {
  const body = { exp: Math.floor(Date.now() / 1000) + 600, ...claims };
  const unsigned = `${b64url({ alg: 'EdDSA', typ: 'JWT' })}.${b64url(body)}`;
  return `${unsigned}.${sign(null, Buffer.from(unsigned), IDP.privateKey).toString('base64url')}`;
}
export const adminToken = () => mintToken({ sub: 'admin', role: 'admin' });

/** Value of one Prometheus sample, e.g. metric(text, 'sse_streams_open{purpose="data"}'); null when absent. */
export function metric(text, name) {
  for (const line of text.split('\n')) {
    if (line.startsWith(`${name} `)) return Number(line.slice(name.length + 1));
  }
  return null;
}

/** POST /sse/stream-ticket with `token`; returns the ticket string. */
export async function ticketFor(base, token, purpose) {
  const res = await fetch(`${base}/sse/stream-ticket`, {
    method: 'POST',
    headers: { Authorization: `Bearer ${token}`, 'Content-Type': 'application/json' },
    body: JSON.stringify(purpose ? { purpose } : {}),
    signal: AbortSignal.timeout(5000),
  });
  if (res.status !== 200) throw new Error(`POST /sse/stream-ticket: HTTP ${res.status} ${await res.text()}`);
  return (await res.json()).ticket;
}

/**
 * Teardown in reverse order of setup (node:test runs t.after hooks first-in first-out):
 * `const defer = deferrer(t); defer(() => gw.stop()); defer(() => browser.close());`
 * closes the browser first, then stops the gateway.
 */
export function deferrer(t) {
  const fns = [];
  t.after(async () => {
    for (const fn of fns.reverse()) {
      try { await fn(); } catch (err) { t.diagnostic(`teardown: ${err.message}`); }
    }
  });
  return (fn) => fns.push(fn);
}
