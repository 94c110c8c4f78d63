import { Injectable, Logger, OnModuleDestroy } from '@nestjs/common';
import { randomUUID } from 'node:crypto';
import { Observable, Subject } from 'rxjs';

export type Purpose = 'alerts' | 'data';

export type StreamEventType =
  | 'realtime-update'
  | 'spc-update'
  | 'spc-series-update'
  | 'machine-alert'
  | 'alarm-update'
  | 'system';

/** One event on the in-process bus; `json` is serialized once and shared by every stream. */
export interface StreamEvent {
  id?: string;
  type: StreamEventType;
  deviceId?: string;
  json: string;
}

export interface StreamConnection {
  id: string;
  userId: string;
  purpose: Purpose;
  ip: string;
  devices: string[];
  connectedAt: Date;
}

export interface Counts {
  alerts: number;
  data: number;
  total: number;
}

/**
 * Seed 003 section 5.2: an rxjs Subject that the Redis bridge feeds and every
 * SSE connection subscribes to (with its own filter), plus the bookkeeping of
 * open connections for limits, /sse/status and /health.
 */
@Injectable()
export class StreamService implements OnModuleDestroy {
  private readonly logger = new Logger('Stream');
  private readonly subject = new Subject<StreamEvent>();
  private readonly shutdownSubject = new Subject<void>();
  private lastMs = 0;
  private seq = 0;

  private readonly connections = new Map<string, StreamConnection>();
  private readonly byUser = new Map<string, { alerts: number; data: number }>();
  private readonly byIp = new Map<string, number>();

  readonly stats = { received: 0, dropped: 0 };

  events$(): Observable<StreamEvent> {
    return this.subject.asObservable();
  }

  /** Emits once when the process starts draining. */
  shutdown$(): Observable<void> {
    return this.shutdownSubject.asObservable();
  }

  /** `<epoch_ms>-<seq>`: strictly increasing within the process. */
  nextId(): string {
    const now = Date.now();
    if (now > this.lastMs) this.lastMs = now;
    return `${this.lastMs}-${++this.seq}`;
  }

  publish(evt: StreamEvent): void {
    this.subject.next({ ...evt, id: evt.id ?? this.nextId() });
  }

  // ---- connection bookkeeping ----------------------------------------------

  countsFor(userId: string): Counts {
    const c = this.byUser.get(userId) ?? { alerts: 0, data: 0 };
    return { alerts: c.alerts, data: c.data, total: c.alerts + c.data };
  }

  ipCount(ip: string): number {
    return this.byIp.get(ip) ?? 0;
  }

  get total(): number {
    return this.connections.size;
  }

  listFor(userId: string): StreamConnection[] {
    return [...this.connections.values()].filter((c) => c.userId === userId);
  }

  open(conn: Omit<StreamConnection, 'id' | 'connectedAt'>): StreamConnection {
    const full: StreamConnection = { ...conn, id: randomUUID(), connectedAt: new Date() };
    this.connections.set(full.id, full);
    const u = this.byUser.get(full.userId) ?? { alerts: 0, data: 0 };
    u[full.purpose]++;
    this.byUser.set(full.userId, u);
    this.byIp.set(full.ip, (this.byIp.get(full.ip) ?? 0) + 1);
    this.logger.debug(`open ${full.purpose} ${full.id} user=${full.userId} ip=${full.ip} devices=${full.devices.length}`);
    return full;
  }

  close(id: string): void {
    const c = this.connections.get(id);
    if (!c) return;
    this.connections.delete(id);
    const u = this.byUser.get(c.userId);
    if (u) {
      u[c.purpose]--;
      if (u.alerts <= 0 && u.data <= 0) this.byUser.delete(c.userId);
    }
    const n = (this.byIp.get(c.ip) ?? 1) - 1;
    if (n <= 0) this.byIp.delete(c.ip);
    else this.byIp.set(c.ip, n);
    this.logger.debug(`close ${c.purpose} ${c.id} user=${c.userId}`);
  }

  /** Drain on SIGTERM/SIGINT: every stream sends `system {kind: shutdown}` and completes. */
  async onModuleDestroy(): Promise<void> {
    if (this.connections.size === 0) return;
    this.shutdownSubject.next();
    this.shutdownSubject.complete();
    await new Promise((r) => setTimeout(r, 200));
  }
}
