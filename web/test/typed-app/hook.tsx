// The README's React hooks and a component using them, type-checked with @types/react.
import { useEffect, useRef, useState } from 'react';
import { SseClient, type FrameInfo, type RealtimeUpdate, type SseEventMap, type SseStatus } from 'sse-gateway-client';

/** The client's status, re-rendering on every change. */
export function useSseStatus(client: SseClient<any>): SseStatus {
  const [status, setStatus] = useState<SseStatus>(client.status);
  useEffect(() => client.onStatus(setStatus), [client]);
  return status;
}

/** Calls the latest `onEvent` for every `type` event while the component is mounted. */
export function useSseEvent<M extends SseEventMap, K extends keyof M & string>(
  client: SseClient<M>, type: K, onEvent: (data: M[K], ev: FrameInfo<K>) => void,
): void {
  const latest = useRef(onEvent);
  useEffect(() => { latest.current = onEvent; });
  useEffect(() => client.on(type, (data, ev) => latest.current(data, ev)), [client, type]);
}

interface Reading { temperature: number }
interface PlantEvents extends SseEventMap { 'realtime-update': RealtimeUpdate<Reading> }

export function MachineTile({ client, deviceId }: { client: SseClient<PlantEvents>; deviceId: string }) {
  const status = useSseStatus(client);
  const [celsius, setCelsius] = useState<number | null>(null);
  useSseEvent(client, 'realtime-update', (msg) => {
    if (msg.deviceId === deviceId) setCelsius(msg.data.temperature);
  });
  return (
    <div className={`tile ${status}`}>
      {deviceId}: {celsius ?? '–'} °C {status === 'revoked' && <a href="/login">sign in again</a>}
    </div>
  );
}
