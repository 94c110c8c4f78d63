import {
  BadRequestException,
  CanActivate,
  ExecutionContext,
  ForbiddenException,
  Inject,
  Injectable,
  PipeTransform,
  UnauthorizedException,
} from '@nestjs/common';
import type { Request } from 'express';
import jwt from 'jsonwebtoken';
import { CONFIG, Config } from './config.js';
import { RedisService } from './redis.service.js';
import type { Purpose } from './stream.service.js';

export interface AccessUser {
  sub: string;
  role?: string;
}

export interface StreamTicket {
  sub: string;
  jti: string;
  purpose?: Purpose;
  role?: string;
  exp: number;
}

export type AuthedRequest = Request & { user?: AccessUser; ticket?: StreamTicket };

function subOf(payload: unknown): string | undefined {
  if (!payload || typeof payload !== 'object') return undefined;
  const sub = (payload as any).sub;
  if (typeof sub === 'string' && sub !== '') return sub;
  if (typeof sub === 'number' && Number.isFinite(sub)) return String(sub);
  return undefined;
}

/** `Authorization: Bearer <access token>` (HS256, issued by the main app). */
@Injectable()
export class AccessTokenGuard implements CanActivate {
  constructor(@Inject(CONFIG) private readonly cfg: Config) {}

  canActivate(ctx: ExecutionContext): boolean {
    const req = ctx.switchToHttp().getRequest<AuthedRequest>();
    const m = /^Bearer\s+(\S+)\s*$/i.exec(req.headers.authorization ?? '');
    if (!m) throw new UnauthorizedException('Missing bearer access token');
    let payload: unknown;
    try {
      payload = jwt.verify(m[1], this.cfg.jwtSecret, { algorithms: ['HS256'] });
    } catch {
      throw new UnauthorizedException('Invalid or expired access token');
    }
    const sub = subOf(payload);
    if (!sub) throw new UnauthorizedException('Invalid or expired access token');
    const role = (payload as any).role;
    req.user = { sub, role: typeof role === 'string' ? role : undefined };
    return true;
  }
}

/** Admin-only routes (after AccessTokenGuard). */
@Injectable()
export class AdminGuard implements CanActivate {
  canActivate(ctx: ExecutionContext): boolean {
    const req = ctx.switchToHttp().getRequest<AuthedRequest>();
    if (req.user?.role !== 'admin') throw new ForbiddenException('Admin role required');
    return true;
  }
}

/**
 * `?ticket=<stream ticket>`: signature, expiry, audience "sse", and the Redis
 * key `sse:ticket:<jti>` (deleting it revokes the ticket at once).
 */
@Injectable()
export class StreamTicketGuard implements CanActivate {
  constructor(
    @Inject(CONFIG) private readonly cfg: Config,
    private readonly redis: RedisService,
  ) {}

  async canActivate(ctx: ExecutionContext): Promise<boolean> {
    const req = ctx.switchToHttp().getRequest<AuthedRequest>();
    const raw = req.query.ticket;
    if (typeof raw !== 'string' || raw === '') throw new UnauthorizedException('Stream authentication required');
    let payload: any;
    try {
      payload = jwt.verify(raw, this.cfg.ticketSecret, { algorithms: ['HS256'], audience: 'sse' });
    } catch {
      throw new UnauthorizedException('Invalid or expired stream ticket');
    }
    const sub = subOf(payload);
    const jti = payload?.jti;
    const purpose = payload?.purpose;
    if (!sub || typeof jti !== 'string' || (purpose !== undefined && purpose !== 'alerts' && purpose !== 'data')) {
      throw new UnauthorizedException('Invalid or expired stream ticket');
    }
    const owner = await this.redis.client.get(`sse:ticket:${jti}`);
    if (owner === null || owner !== sub) throw new UnauthorizedException('Stream ticket revoked or expired');
    req.ticket = { sub, jti, purpose, role: typeof payload.role === 'string' ? payload.role : undefined, exp: payload.exp };
    return true;
  }
}

export interface TicketRequest {
  ttlSeconds: number;
  purpose?: Purpose;
}

/** Validates the optional body of POST /sse/stream-ticket. */
@Injectable()
export class TicketRequestPipe implements PipeTransform<unknown, TicketRequest> {
  transform(body: unknown): TicketRequest {
    if (body === undefined || body === null || (typeof body === 'object' && Object.keys(body as object).length === 0 && !Array.isArray(body))) {
      return { ttlSeconds: 300 };
    }
    if (typeof body !== 'object' || Array.isArray(body)) throw new BadRequestException('Body must be a JSON object');
    const { ttlSeconds, purpose } = body as Record<string, unknown>;
    let ttl = 300;
    if (ttlSeconds !== undefined) {
      if (typeof ttlSeconds !== 'number' || !Number.isInteger(ttlSeconds) || ttlSeconds < 60 || ttlSeconds > 3600) {
        throw new BadRequestException('ttlSeconds must be an integer between 60 and 3600');
      }
      ttl = ttlSeconds;
    }
    if (purpose !== undefined && purpose !== 'alerts' && purpose !== 'data') {
      throw new BadRequestException('purpose must be "alerts" or "data"');
    }
    return { ttlSeconds: ttl, purpose: purpose as Purpose | undefined };
  }
}
