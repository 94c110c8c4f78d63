/**
 * Types of sse-gateway's browser client (`sse-client.js`, also served at
 * `/sse/client.js`). The event map follows the gateway's contract: the
 * payloads of section 4 (events), the `system` kinds of sections 4, 6 and 7.
 * Hand-written: the module is plain JavaScript served byte for byte.
 */

/** `realtime-update`, `spc-update`, `spc-series-update`: the ingest message, `timestamp` kept or set to the receive time. */
export interface DeviceUpdate<D = unknown> {
  deviceId: string;
  data: D;
  /** ISO 8601, UTC, milliseconds. */
  timestamp: string;
}
export type RealtimeUpdate<D = unknown> = DeviceUpdate<D>;
export type SpcUpdate<D = unknown> = DeviceUpdate<D>;
export type SpcSeriesUpdate<D = unknown> = DeviceUpdate<D>;

/** `machine-status`: once per device on connect, from Redis key `machine:<deviceId>:status` (JSON, or the raw string). */
export interface MachineStatus<D = unknown> {
  deviceId: string;
  data: D;
  source?: 'cache';
  timestamp: string;
}

/** `machine-alert` (alert streams only). */
export interface MachineAlert<A = unknown> {
  deviceId: string;
  alert: A;
  timestamp: string;
}

/** `alarm-update` (alert streams only). */
export interface AlarmUpdate<A = unknown> {
  deviceId: string;
  alarm: A;
  timestamp: string;
}

/** Every heartbeat period on every stream; the client learns the period from them. */
export interface HeartbeatEvent { kind: 'heartbeat'; ts: string }
/** The gateway lost its message bus (Redis); the stream stays open. */
export interface DegradedEvent { kind: 'degraded' }
/** The message bus is back. */
export interface RecoveredEvent { kind: 'recovered' }
/** The gateway drains; the client reconnects after a random 1..5 s (or `retryMs`). */
export interface ShutdownEvent { kind: 'shutdown'; retryMs?: number }
/** Events were lost at this point (resume id outside the replay window, or a hole): refetch history. */
export interface ReplayGapEvent { kind: 'replay-gap' }
/** The ticket or the user's access was revoked: the stream is closed and the client stops (status `revoked`). */
export interface RevokedEvent { kind: 'revoked' }

export type SystemEvent =
  | HeartbeatEvent
  | DegradedEvent
  | RecoveredEvent
  | ShutdownEvent
  | ReplayGapEvent
  | RevokedEvent;
export type SystemKind = SystemEvent['kind'];

/** Event name → payload (`data` of the frame, parsed from JSON). Extend it to type `data`/`alert` shapes. */
export interface SseEventMap {
  'realtime-update': RealtimeUpdate;
  'spc-update': SpcUpdate;
  'spc-series-update': SpcSeriesUpdate;
  'machine-status': MachineStatus;
  'machine-alert': MachineAlert;
  'alarm-update': AlarmUpdate;
  system: SystemEvent;
  /** Frames without an `event:` line (the gateway sends none). */
  message: unknown;
}
export type SseEventName = keyof SseEventMap;

/** The second argument of every event listener. */
export interface FrameInfo<K extends string = string> {
  type: K;
  /** The frame's `id` (`<epoch_ms>-<seq>`), null for id-less frames (system, machine-status). */
  id: string | null;
  /** The `data:` text as received. */
  raw: string;
  /** True in a follower tab: the leader tab received it and passed it on. */
  fromTab: boolean;
}

/** Reported to `on('error', ...)`; the client retries by itself. */
export interface SseClientError {
  stage: 'ticket' | 'stream' | 'watchdog';
  /** HTTP status of the ticket request; 0 when there is none (EventSource hides stream statuses). */
  status: number;
  message: string;
  /** The ticket endpoint's JSON error (`{statusCode, message, error}`) or text. */
  body?: unknown;
  /** Retry-After of the ticket response, in ms, when the gateway sent one. */
  retryAfterMs?: number;
}

export type SseStatus = 'connecting' | 'live' | 'reconnecting' | 'offline' | 'revoked';
export type SseRole = 'idle' | 'leader' | 'follower';
export type SseEndpoint = 'stream' | 'alerts';

/** The browser APIs the client uses; defaults are the globals. For tests and non-browser hosts. */
export interface SseClientEnv {
  now(): number;
  random(): number;
  setTimeout(fn: () => void, ms: number): unknown;
  clearTimeout(t: unknown): void;
  setInterval(fn: () => void, ms: number): unknown;
  clearInterval(t: unknown): void;
  fetch(url: string, init: RequestInit): Promise<Response>;
  timeoutSignal(ms: number): AbortSignal | undefined;
  EventSource: typeof EventSource;
  BroadcastChannel: typeof BroadcastChannel | undefined;
  AbortController: typeof AbortController;
  window: Pick<EventTarget, 'addEventListener' | 'removeEventListener'> | undefined;
  document: (Pick<EventTarget, 'addEventListener' | 'removeEventListener'> & { visibilityState?: string }) | undefined;
  navigator: { onLine?: boolean; locks?: LockManager } | undefined;
}

export interface SseClientOptions {
  /** The main app's access token (a bearer JWT); called before every ticket request. */
  getToken: () => string | Promise<string>;
  /** Origin of the gateway, '' for the page's own (default ''). */
  baseUrl?: string;
  /** 'stream' (data, needs deviceIds) or 'alerts' (default 'stream'). */
  endpoint?: SseEndpoint;
  deviceIds?: readonly string[];
  /** Ask for `machine-status` of every device on connect (default true). */
  includeStatus?: boolean;
  /** Close the stream while the tab is hidden (default false). */
  pauseWhenHidden?: boolean;
  /** One stream for all tabs of this browser: leader election (default true). */
  shareAcrossTabs?: boolean;
  /** The gateway's heartbeat period until learned from heartbeats (default 25). */
  heartbeatSecs?: number;
  withCredentials?: boolean;
  /** Reconnect once with a ticket that carried a live stream while it has over 15 s left; refused, a fresh one is minted at once (default true). */
  reuseTicket?: boolean;
  env?: Partial<SseClientEnv>;
}

type Unsubscribe = () => void;

export declare class SseClient<M extends SseEventMap = SseEventMap> {
  constructor(opts: SseClientOptions);
  readonly status: SseStatus;
  /** Id of the newest event seen; the next connect resumes after it. */
  readonly lastEventId: string | null;
  readonly role: SseRole;
  on<K extends keyof M & string>(type: K, fn: (data: M[K], ev: FrameInfo<K>) => void): Unsubscribe;
  on(type: '*', fn: (data: M[keyof M], ev: FrameInfo<keyof M & string>) => void): Unsubscribe;
  on(type: 'error', fn: (err: SseClientError, ev: { type: 'error' }) => void): Unsubscribe;
  off<K extends keyof M & string>(type: K, fn: (data: M[K], ev: FrameInfo<K>) => void): void;
  off(type: '*', fn: (data: M[keyof M], ev: FrameInfo<keyof M & string>) => void): void;
  off(type: 'error', fn: (err: SseClientError, ev: { type: 'error' }) => void): void;
  /** Called at once with the current status, then on every change. */
  onStatus(fn: (status: SseStatus) => void): Unsubscribe;
  start(): this;
  stop(): this;
  /** A data stream for other devices: reconnects, without a resume id. */
  setDevices(ids: readonly string[]): this;
}

export declare const EVENT_TYPES: readonly SseEventName[];
/** `<epoch_ms>-<seq>` as [ms, seq]; null for any other shape. */
export declare function parseEventId(id: unknown): [number, number] | null;
/** True when id `a` is newer than `b` (or they cannot be compared and differ). */
export declare function isNewerId(a: string, b: string): boolean;
/** min(30 s, 750 ms * 1.6^n) +-25 %, at least 250 ms. */
export declare function backoffDelay(n: number, rand?: () => number): number;
/** A Retry-After value (seconds or HTTP date) in ms from `now`; null when absent or unreadable. */
export declare function retryAfterMs(value: string | null | undefined, now?: number): number | null;
export declare function browserEnv(g?: typeof globalThis): SseClientEnv;

export default SseClient;
