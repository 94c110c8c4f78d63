/** Configuration from the environment, read once at start-up. */
export interface Config {
  port: number;
  host: string;
  redisUrl: string;
  jwtSecret: string;
  ticketSecret: string;
  heartbeatMs: number;
  maxConnsPerIp: number;
  maxAlertsPerUser: number;
  maxDataPerUser: number;
  maxDevices: number;
  maxBacklogBytes: number;
  trustedProxies: string[];
  corsOrigins: string[];
  debug: boolean;
}

export const CONFIG = Symbol('CONFIG');

export class ConfigError extends Error {}

function num(name: string, def: number, opts: { min?: number; int?: boolean } = {}): number {
  const raw = process.env[name];
  if (raw === undefined || raw.trim() === '') return def;
  const v = Number(raw);
  if (!Number.isFinite(v) || (opts.int && !Number.isInteger(v)) || v < (opts.min ?? 0)) {
    throw new ConfigError(`${name}: invalid value "${raw}"`);
  }
  return v;
}

function list(name: string): string[] {
  return (process.env[name] ?? '').split(',').map((s) => s.trim()).filter(Boolean);
}

export function loadConfig(): Config {
  const redisUrl = process.env.REDIS_URL;
  if (!redisUrl) throw new ConfigError('REDIS_URL: required (e.g. redis://127.0.0.1:6379)');
  const jwtSecret = process.env.JWT_SECRET;
  if (!jwtSecret) throw new ConfigError('JWT_SECRET: required');
  const heartbeatSecs = num('SSE_HEARTBEAT_SECS', 25);
  if (heartbeatSecs <= 0) throw new ConfigError('SSE_HEARTBEAT_SECS: must be > 0');
  return {
    port: num('PORT', 3000, { int: true }),
    host: process.env.HOST || '127.0.0.1',
    redisUrl,
    jwtSecret,
    ticketSecret: process.env.SSE_TICKET_SECRET || jwtSecret,
    heartbeatMs: Math.max(1, Math.round(heartbeatSecs * 1000)),
    maxConnsPerIp: num('SSE_MAX_CONNS_PER_IP', 5, { int: true }),
    maxAlertsPerUser: num('SSE_MAX_ALERTS_PER_USER', 1, { int: true }),
    maxDataPerUser: num('SSE_MAX_DATA_PER_USER', 1, { int: true }),
    maxDevices: num('SSE_MAX_DEVICES', 10, { int: true, min: 1 }),
    maxBacklogBytes: num('SSE_MAX_BACKLOG_BYTES', 1048576, { int: true }),
    trustedProxies: list('SSE_TRUSTED_PROXIES'),
    corsOrigins: list('SSE_CORS_ORIGINS'),
    debug: /^(debug|trace)$/i.test(process.env.LOG_LEVEL ?? ''),
  };
}

/**
 * @Sse() options are fixed when the decorator runs (module load), so the
 * backlog bound is read from the environment directly there.
 */
export function backlogLimitFromEnv(): number {
  const v = Number(process.env.SSE_MAX_BACKLOG_BYTES ?? 1048576);
  return Number.isFinite(v) && v >= 0 ? v : 1048576;
}
