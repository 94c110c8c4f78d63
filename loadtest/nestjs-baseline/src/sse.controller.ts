import {
  BadRequestException,
  Body,
  Controller,
  Delete,
  ForbiddenException,
  Get,
  HttpCode,
  HttpException,
  HttpStatus,
  Inject,
  MessageEvent,
  NotFoundException,
  Param,
  Post,
  Query,
  Req,
  Res,
  Sse,
  SseSignal,
  UseGuards,
} from '@nestjs/common';
import type { Request, Response } from 'express';
import jwt from 'jsonwebtoken';
import { randomUUID } from 'node:crypto';
import { concat, defer, EMPTY, from, interval, merge, Observable, of } from 'rxjs';
import { filter, map, takeUntil } from 'rxjs/operators';
import {
  AccessTokenGuard,
  AdminGuard,
  AuthedRequest,
  StreamTicket,
  StreamTicketGuard,
  TicketRequest,
  TicketRequestPipe,
} from './auth.js';
import { backlogLimitFromEnv, CONFIG, Config } from './config.js';
import { RedisService } from './redis.service.js';
import { Purpose, StreamConnection, StreamEvent, StreamService } from './stream.service.js';

const DATA_EVENTS = new Set(['realtime-update', 'spc-update', 'spc-series-update']);
const ALERT_EVENTS = new Set(['machine-alert', 'alarm-update']);
const MAX_DEVICE_ID_BYTES = 128;

@Controller('sse')
export class SseController {
  constructor(
    @Inject(CONFIG) private readonly cfg: Config,
    private readonly stream: StreamService,
    private readonly redis: RedisService,
  ) {}

  // ---- tickets ---------------------------------------------------------------

  @Post('stream-ticket')
  @HttpCode(200)
  @UseGuards(AccessTokenGuard)
  async createTicket(@Req() req: AuthedRequest, @Body(TicketRequestPipe) body: TicketRequest) {
    const sub = req.user!.sub;
    const jti = randomUUID();
    const claims: Record<string, unknown> = { sub, jti };
    if (body.purpose) claims.purpose = body.purpose;
    if (req.user!.role) claims.role = req.user!.role;
    const ticket = jwt.sign(claims, this.cfg.ticketSecret, {
      algorithm: 'HS256',
      expiresIn: body.ttlSeconds,
      audience: 'sse',
    });
    await this.redis.client.set(`sse:ticket:${jti}`, sub, 'EX', body.ttlSeconds);
    return { ticket, expiresInSeconds: body.ttlSeconds, ticketId: jti };
  }

  @Delete('stream-ticket/:id')
  @HttpCode(204)
  @UseGuards(AccessTokenGuard)
  async revokeTicket(@Req() req: AuthedRequest, @Param('id') id: string): Promise<void> {
    const key = `sse:ticket:${id}`;
    const owner = await this.redis.client.get(key);
    if (owner === null || (owner !== req.user!.sub && req.user!.role !== 'admin')) {
      throw new NotFoundException('Stream ticket not found');
    }
    await this.redis.client.del(key);
  }

  // ---- streams ---------------------------------------------------------------

  @Sse('alerts', { maxPendingDataLength: backlogLimitFromEnv() })
  @UseGuards(StreamTicketGuard)
  async alerts(@Req() req: AuthedRequest, @SseSignal() signal: AbortSignal): Promise<Observable<MessageEvent>> {
    const ticket = req.ticket!;
    this.checkPurpose(ticket, 'alerts');
    const isAdmin = this.isAdmin(ticket);
    const owned = isAdmin ? null : new Set(await this.redis.client.smembers(`user:${ticket.sub}:devices`));
    const conn = this.admit(req, ticket, 'alerts', [], signal);
    if (!conn) return EMPTY;
    return this.buildStream(
      (e) => ALERT_EVENTS.has(e.type) && (owned === null || owned.has(e.deviceId!)),
      [],
    );
  }

  @Sse('stream', { maxPendingDataLength: backlogLimitFromEnv() })
  @UseGuards(StreamTicketGuard)
  async data(
    @Req() req: AuthedRequest,
    @SseSignal() signal: AbortSignal,
    @Query('deviceId') deviceId?: unknown,
    @Query('deviceIds') deviceIdsCsv?: unknown,
    @Query('includeStatus') includeStatus?: unknown,
  ): Promise<Observable<MessageEvent>> {
    const ticket = req.ticket!;
    this.checkPurpose(ticket, 'data');
    const devices = this.resolveDeviceIds(deviceId, deviceIdsCsv);
    if (!this.isAdmin(ticket)) {
      const member = await this.redis.client.smismember(`user:${ticket.sub}:devices`, ...devices);
      if (member.some((m) => m !== 1)) throw new ForbiddenException('Access denied to one or more devices');
    }
    const initial: Array<Omit<MessageEvent, 'id'>> = [];
    if (includeStatus !== 'false') {
      const statuses = await this.redis.client.mget(...devices.map((d) => `machine:${d}:status`));
      statuses.forEach((raw, i) => {
        if (raw === null) return;
        let data: unknown = raw;
        try {
          data = JSON.parse(raw);
        } catch {
          /* keep the raw string */
        }
        initial.push({
          type: 'machine-status',
          data: JSON.stringify({ deviceId: devices[i], data, source: 'cache', timestamp: new Date().toISOString() }),
        });
      });
    }
    const conn = this.admit(req, ticket, 'data', devices, signal);
    if (!conn) return EMPTY;
    const wanted = new Set(devices);
    return this.buildStream((e) => DATA_EVENTS.has(e.type) && wanted.has(e.deviceId!), initial);
  }

  @Get('status')
  @UseGuards(StreamTicketGuard)
  status(@Req() req: AuthedRequest) {
    const ticket = req.ticket!;
    const now = Date.now();
    return {
      userId: ticket.sub,
      ticketPurpose: ticket.purpose ?? 'any',
      connections: this.stream.countsFor(ticket.sub),
      limits: { alerts: this.cfg.maxAlertsPerUser, data: this.cfg.maxDataPerUser },
      activeConnections: this.stream.listFor(ticket.sub).map((c) => ({
        id: c.id,
        purpose: c.purpose,
        deviceCount: c.devices.length,
        devices: c.devices,
        connectedAt: c.connectedAt.toISOString(),
        uptime: Math.floor((now - c.connectedAt.getTime()) / 1000),
      })),
    };
  }

  // ---- publish (admin) -------------------------------------------------------

  @Post('publish')
  @HttpCode(200)
  @UseGuards(AccessTokenGuard, AdminGuard)
  async publish(@Body() body: unknown) {
    if (!body || typeof body !== 'object' || Array.isArray(body)) throw new BadRequestException('Body must be a JSON object');
    const { channel, message } = body as Record<string, unknown>;
    if (typeof channel !== 'string' || channel === '') throw new BadRequestException('channel must be a non-empty string');
    if (message === undefined) throw new BadRequestException('message is required');
    const text = typeof message === 'string' ? message : JSON.stringify(message);
    const receivers = await this.redis.client.publish(channel, text);
    return { channel, receivers };
  }

  // ---- helpers -----------------------------------------------------------------

  private checkPurpose(ticket: StreamTicket, endpoint: Purpose): void {
    if (ticket.purpose !== undefined && ticket.purpose !== endpoint) {
      throw new ForbiddenException(`Ticket purpose "${ticket.purpose}" is not valid for the ${endpoint} stream`);
    }
  }

  /**
   * The ticket is minted from the access token, so it carries the token's
   * `role` (an added claim) and an admin ticket streams every device.
   */
  private isAdmin(ticket: StreamTicket): boolean {
    return ticket.role === 'admin';
  }

  private resolveDeviceIds(deviceId: unknown, deviceIdsCsv: unknown): string[] {
    let ids: string[];
    if (deviceId !== undefined) {
      if (typeof deviceId !== 'string') throw new BadRequestException('deviceId must be given once');
      ids = [deviceId.trim()];
    } else if (deviceIdsCsv !== undefined) {
      if (typeof deviceIdsCsv !== 'string') throw new BadRequestException('deviceIds must be given once');
      ids = deviceIdsCsv.split(',').map((id) => id.trim());
    } else {
      throw new BadRequestException('deviceId or deviceIds is required');
    }
    for (const id of ids) {
      if (id === '') throw new BadRequestException('Device ids must not be empty');
      if (Buffer.byteLength(id, 'utf8') > MAX_DEVICE_ID_BYTES) {
        throw new BadRequestException(`Device ids must be at most ${MAX_DEVICE_ID_BYTES} bytes`);
      }
    }
    const unique = [...new Set(ids)];
    if (unique.length > this.cfg.maxDevices) {
      throw new BadRequestException(`At most ${this.cfg.maxDevices} devices per stream`);
    }
    return unique;
  }

  /**
   * Limit checks and registration, with no await in between so that two
   * concurrent connects cannot both take the last slot. The slot is released
   * by the request's abort signal, which Nest aborts on disconnect, completion
   * and error alike.
   */
  private admit(
    req: Request,
    ticket: StreamTicket,
    purpose: Purpose,
    devices: string[],
    signal: AbortSignal,
  ): StreamConnection | undefined {
    if (signal.aborted) return undefined; // client left during setup
    const ip = req.ip ?? req.socket.remoteAddress ?? 'unknown';
    const counts = this.stream.countsFor(ticket.sub);
    const limits = { alerts: this.cfg.maxAlertsPerUser, data: this.cfg.maxDataPerUser };
    let message: string | undefined;
    if (this.stream.ipCount(ip) >= this.cfg.maxConnsPerIp) message = 'Too many connections from this IP';
    else if (purpose === 'alerts' && counts.alerts >= limits.alerts) message = 'Alert stream connection limit exceeded';
    else if (purpose === 'data' && counts.data >= limits.data) message = 'Data stream connection limit exceeded';
    if (message) {
      throw new HttpException(
        {
          statusCode: HttpStatus.TOO_MANY_REQUESTS,
          message,
          error: 'Too Many Requests',
          currentConnections: counts,
          limits,
        },
        HttpStatus.TOO_MANY_REQUESTS,
      );
    }
    const conn = this.stream.open({ userId: ticket.sub, purpose, ip, devices });
    signal.addEventListener('abort', () => this.stream.close(conn.id), { once: true });
    return conn;
  }

  /** Seed 003 sections 5.1 and 8: filtered Subject merged with a heartbeat interval. */
  private buildStream(
    accept: (e: StreamEvent) => boolean,
    initial: Array<Omit<MessageEvent, 'id'>>,
  ): Observable<MessageEvent> {
    // `retry:` and a comment first, so the browser's onopen fires at once, then
    // the machine-status snapshots; ids are taken at subscription, in order.
    const opening$ = defer(() => {
      const first: MessageEvent[] = [{ id: this.stream.nextId(), retry: 3000, comment: 'connected' }];
      for (const m of initial) first.push({ ...m, id: this.stream.nextId() });
      return from(first);
    });
    const live$ = this.stream.events$().pipe(
      filter((e) => e.type === 'system' || accept(e)),
      map((e): MessageEvent => ({ id: e.id, type: e.type, data: e.json })),
    );
    const heartbeat$ = interval(this.cfg.heartbeatMs).pipe(
      map((): MessageEvent => ({
        id: this.stream.nextId(),
        type: 'system',
        data: JSON.stringify({ kind: 'heartbeat', ts: new Date().toISOString() }),
      })),
    );
    const shutdown$ = defer(() =>
      of<MessageEvent>({
        id: this.stream.nextId(),
        type: 'system',
        retry: 1000 + Math.floor(Math.random() * 4001),
        data: JSON.stringify({ kind: 'shutdown' }),
      }),
    );
    return concat(merge(opening$, live$, heartbeat$).pipe(takeUntil(this.stream.shutdown$())), shutdown$);
  }
}

@Controller()
export class HealthController {
  constructor(
    private readonly stream: StreamService,
    private readonly redis: RedisService,
  ) {}

  @Get('health')
  health(@Res({ passthrough: true }) res: Response) {
    const up = this.redis.isUp();
    if (!up) res.status(503);
    return {
      status: up ? 'ok' : 'degraded',
      redis: up ? 'up' : 'down',
      connections: this.stream.total,
      uptimeSeconds: Math.floor(process.uptime()),
    };
  }
}
