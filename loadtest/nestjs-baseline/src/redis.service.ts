import { Inject, Injectable, Logger, OnModuleDestroy, OnModuleInit } from '@nestjs/common';
import { Redis } from 'ioredis';
import { CONFIG, Config } from './config.js';
import { StreamEventType, StreamService } from './stream.service.js';

/** Redis channel -> SSE event name (contract section 4). */
export const CHANNEL_EVENTS: Record<string, StreamEventType> = {
  'mqtt:realtime:processed': 'realtime-update',
  'mqtt:spc:processed': 'spc-update',
  'mqtt:spc-series:processed': 'spc-series-update',
  'machine:alerts': 'machine-alert',
  'machine:alarms': 'alarm-update',
};

/**
 * Seed 003 section 6 (Option A): one command connection and one subscriber
 * connection; every message on the subscribed channels is pushed into the
 * local Subject of StreamService. ioredis reconnects and resubscribes itself.
 */
@Injectable()
export class RedisService implements OnModuleInit, OnModuleDestroy {
  private readonly logger = new Logger('Redis');
  client!: Redis;
  private sub!: Redis;
  private degraded = false;

  constructor(
    @Inject(CONFIG) private readonly cfg: Config,
    private readonly stream: StreamService,
  ) {}

  async onModuleInit(): Promise<void> {
    const opts = { maxRetriesPerRequest: 2, lazyConnect: false } as const;
    this.client = new Redis(this.cfg.redisUrl, opts);
    this.sub = new Redis(this.cfg.redisUrl, opts);
    for (const [name, conn] of [['client', this.client], ['subscriber', this.sub]] as const) {
      conn.on('error', (err: Error) => this.logger.warn(`${name}: ${err.message}`));
    }
    this.sub.on('close', () => this.setDegraded(true));
    this.sub.on('ready', () => this.setDegraded(false));
    this.sub.on('message', (channel: string, msg: string) => this.onMessage(channel, msg));
    await this.sub.subscribe(...Object.keys(CHANNEL_EVENTS));
  }

  private setDegraded(down: boolean): void {
    if (down === this.degraded) return;
    this.degraded = down;
    this.stream.publish({ type: 'system', json: JSON.stringify({ kind: down ? 'degraded' : 'recovered' }) });
  }

  private onMessage(channel: string, msg: string): void {
    const type = CHANNEL_EVENTS[channel];
    if (!type) return;
    this.stream.stats.received++;
    let payload: any;
    try {
      payload = JSON.parse(msg);
    } catch {
      this.stream.stats.dropped++;
      return;
    }
    if (payload === null || typeof payload !== 'object' || Array.isArray(payload) || typeof payload.deviceId !== 'string') {
      this.stream.stats.dropped++;
      return;
    }
    if (payload.timestamp === undefined || payload.timestamp === null) {
      payload.timestamp = new Date().toISOString();
    }
    this.stream.publish({ type, deviceId: payload.deviceId, json: JSON.stringify(payload) });
  }

  isUp(): boolean {
    return this.client?.status === 'ready' && this.sub?.status === 'ready';
  }

  async onModuleDestroy(): Promise<void> {
    await Promise.allSettled([this.sub?.quit(), this.client?.quit()]);
  }
}
