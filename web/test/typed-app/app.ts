// A dashboard's use of the published types, type-checked by test/package.test.js with
// `tsc --noEmit --strict` against the packed tarball. Each @ts-expect-error line must stay an
// error: if the types went loose (any), tsc would fail on the unused directive.
import {
  SseClient,
  backoffDelay,
  type MachineAlert,
  type RealtimeUpdate,
  type SseClientError,
  type SseEventMap,
  type SseStatus,
  type SystemEvent,
} from 'sse-gateway-client';

/** What this plant's ingest puts in `data`. */
interface Reading { temperature: number; spindleRpm?: number }
interface PlantEvents extends SseEventMap {
  'realtime-update': RealtimeUpdate<Reading>;
}

declare const session: { accessToken: string };
declare function refetchHistory(): void;
declare function showLogin(): void;

const data = new SseClient<PlantEvents>({
  getToken: async () => session.accessToken,
  endpoint: 'stream',
  deviceIds: ['Machine 1', 'Machine 2'],
});

data.on('realtime-update', (msg, ev) => {
  const celsius: number = msg.data.temperature;
  const rpm: number | undefined = msg.data.spindleRpm;
  const device: string = msg.deviceId;
  const id: string | null = ev.id;
  const type: 'realtime-update' = ev.type;
  console.log(celsius, rpm, device, id, type, ev.fromTab, msg.timestamp);
});
data.on('machine-status', (msg) => console.log(msg.deviceId, msg.data, msg.source));
data.on('spc-series-update', (msg) => console.log(msg.deviceId, msg.data));

data.on('system', (msg) => {
  switch (msg.kind) {
    case 'heartbeat': { const ts: string = msg.ts; console.log(ts); break; }
    case 'replay-gap': refetchHistory(); break;
    case 'revoked': showLogin(); break;
    case 'shutdown': console.log(msg.retryMs); break;
    case 'degraded':
    case 'recovered': break;
    default: { const unhandled: never = msg; console.log(unhandled); }
  }
});

data.on('error', (e: SseClientError) => {
  if (e.stage === 'ticket' && e.status === 429) console.warn('rate limited, retry in', e.retryAfterMs);
});
const stopWatching: () => void = data.onStatus((s: SseStatus) => {
  if (s === 'revoked') showLogin();
});
const everything = data.on('*', (_payload, ev) => console.log(ev.type, ev.raw));
data.start().setDevices(['Machine 3']);

const alerts = new SseClient({ getToken: () => session.accessToken, endpoint: 'alerts', shareAcrossTabs: true });
alerts.on('machine-alert', (m: MachineAlert) => console.log(m.deviceId, m.alert));
alerts.on('alarm-update', (m) => console.log(m.alarm));
alerts.start();

const kinds: SystemEvent['kind'][] = ['heartbeat', 'degraded', 'recovered', 'shutdown', 'replay-gap', 'revoked'];
const first: number = backoffDelay(0);
console.log(kinds, first, data.status, data.lastEventId, data.role);
stopWatching();
everything();
data.stop();

// @ts-expect-error: not an event of the contract
data.on('realtime-updates', () => {});
const plain = new SseClient({ getToken: () => session.accessToken, deviceIds: ['Machine 1'] });
// @ts-expect-error: a realtime-update carries no alert
plain.on('realtime-update', (m) => m.alert);
// @ts-expect-error: an alarm-update carries `alarm`, not `alert`
plain.on('alarm-update', (m) => m.alert);
// @ts-expect-error: a machine-alert carries `alert`, not `alarm`
plain.on('machine-alert', (m) => m.alarm);
// @ts-expect-error: `data` is unknown until the app says what its ingest sends
plain.on('spc-update', (m) => m.data.toFixed());
// @ts-expect-error: a machine-status has no `alert`
plain.on('machine-status', (m) => m.alert);
// @ts-expect-error: data is a Reading here, not a string
data.on('realtime-update', (m) => m.data.toUpperCase());
// @ts-expect-error: system kinds are the contract's only
const unknownKind: SystemEvent['kind'] = 'restarted';
// @ts-expect-error: getToken is required
new SseClient({ endpoint: 'alerts' });
// @ts-expect-error: the endpoints are stream and alerts
new SseClient({ getToken: () => '', endpoint: 'events' });
// @ts-expect-error: statuses are the five the client reports
const wrongStatus: SseStatus = 'closed';
console.log(unknownKind, wrongStatus);
