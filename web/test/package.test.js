// The package as an app gets it: `npm pack`, install the tarball into a scratch project, import
// it from node, and type-check test/typed-app (TypeScript and a React hook) with `tsc --strict`
// under NodeNext and Bundler resolution. Needs `npm ci` in web/ first (typescript, @types/react).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { cpSync, existsSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const web = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const repo = resolve(web, '..');
const pkg = JSON.parse(readFileSync(join(web, 'package.json'), 'utf8'));
const tsc = join(web, 'node_modules', 'typescript', 'bin', 'tsc');
const run = (cmd, args, cwd) => execFileSync(cmd, args, { cwd, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], timeout: 60000 });

/**
 * Writes the TypeScript blocks of the README's "Use it from your app" section into `dir`, with
 * declarations of the names they leave to the app; returns the file names.
 */
function readmeExamples(dir) {
  const readme = readFileSync(join(repo, 'README.md'), 'utf8');
  const section = /\n## Use it from your app\n([\s\S]*?)\n## /.exec(readme);
  assert.ok(section, 'README has a "Use it from your app" section');
  const blocks = [...section[1].matchAll(/```(ts|tsx)\n([\s\S]*?)```/g)];
  assert.deepEqual(blocks.map((b) => b[1]), ['ts', 'tsx'], 'a TypeScript and a React example');
  const prelude = 'declare const session: { accessToken: string };\n'
    + 'declare const chart: { push(device: string, value: number, id: string | null): void };\n'
    + 'declare const badge: { textContent: string | null };\n'
    + 'declare function refetchHistory(): void;\ndeclare function showLogin(): void;\n';
  return blocks.map(([, ext, code], i) => {
    const name = `readme-${i}.${ext}`;
    writeFileSync(join(dir, name), (ext === 'ts' ? prelude : '') + code);
    return name;
  });
}

test('the module served at /sse/client.js is the package module itself (one file, no copy)', () => {
  const routes = readFileSync(join(repo, 'src', 'routes', 'admin.rs'), 'utf8');
  const m = /const STATIC_CLIENT: &\[u8\] = include_bytes!\("([^"]+)"\);/.exec(routes);
  assert.ok(m, 'routes/admin.rs embeds the client with include_bytes!');
  const served = resolve(repo, 'src', 'routes', m[1]);
  assert.equal(served, resolve(web, pkg.exports['.'].default), 'include_bytes! names the package module');
  assert.equal(resolve(web, pkg.exports['.'].types), resolve(web, pkg.types));
});

test('npm pack: the tarball installs, imports, and a typed app type-checks with tsc --noEmit --strict', (t) => {
  assert.ok(existsSync(tsc), `typescript is missing: run npm ci in ${web}`);
  const scratch = mkdtempSync(join(tmpdir(), 'sse-client-pack-'));
  t.after(() => rmSync(scratch, { recursive: true, force: true }));

  const [packed] = JSON.parse(run('npm', ['pack', '--json', '--pack-destination', scratch, '--loglevel=error'], web));
  assert.deepEqual(packed.files.map((f) => f.path).sort(), ['index.d.ts', 'package.json', 'sse-client.js']);

  const app = join(scratch, 'app');
  cpSync(join(web, 'test', 'typed-app'), app, { recursive: true });
  writeFileSync(join(app, 'package.json'), JSON.stringify({ name: 'typed-app', private: true, type: 'module' }));
  run('npm', ['install', '--offline', '--no-audit', '--no-fund', '--no-package-lock', '--loglevel=error', join(scratch, packed.filename)], app);
  const installed = join(app, 'node_modules', pkg.name);
  assert.deepEqual(readFileSync(join(installed, 'sse-client.js')), readFileSync(join(web, 'sse-client.js')), 'byte-identical module');

  const probe = "const m = await import('sse-gateway-client'); "
    + "console.log(JSON.stringify([typeof m.SseClient, m.default === m.SseClient, m.EVENT_TYPES.includes('alarm-update'), m.backoffDelay(0, () => 0.5)]));";
  assert.equal(run(process.execPath, ['--input-type=module', '-e', probe], app).trim(), '["function",true,true,750]');

  const extra = readmeExamples(app);
  const tsconfig = JSON.parse(readFileSync(join(app, 'tsconfig.json'), 'utf8').replace(/^\s*\/\/.*$/gm, ''));
  writeFileSync(join(app, 'tsconfig.json'), JSON.stringify({ ...tsconfig, files: [...tsconfig.files, ...extra] }));
  symlinkSync(join(web, 'node_modules', '@types'), join(app, 'node_modules', '@types'), 'dir');   // @types/react from web's lockfile
  for (const config of ['tsconfig.json', 'tsconfig.bundler.json']) {
    try {
      run(process.execPath, [tsc, '-p', config, '--pretty', 'false'], app);
    } catch (err) {
      assert.fail(`tsc -p ${config} found type errors:\n${err.stdout}${err.stderr}`);
    }
  }
});
