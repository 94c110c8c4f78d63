import { ArgumentsHost, Catch, ExceptionFilter, HttpException, Logger } from '@nestjs/common';
import type { Response } from 'express';
import { STATUS_CODES } from 'node:http';

/**
 * Every error answers `{statusCode, message, error}` (contract section 3):
 * HttpExceptions as Nest shapes them, body-parser errors (413, 400) with their
 * reason phrase, Redis being unreachable as 503, anything else as 500.
 */
@Catch()
export class JsonErrorFilter implements ExceptionFilter {
  private readonly logger = new Logger('Error');

  catch(exception: unknown, host: ArgumentsHost): void {
    const res = host.switchToHttp().getResponse<Response>();
    if (res.headersSent) {
      if (!res.writableEnded) res.end();
      return;
    }
    let status = 500;
    let body: Record<string, unknown>;
    if (exception instanceof HttpException) {
      status = exception.getStatus();
      const r = exception.getResponse();
      body = typeof r === 'object' && r !== null
        ? { statusCode: status, error: STATUS_CODES[status], ...(r as object) }
        : { statusCode: status, message: r, error: STATUS_CODES[status] };
    } else {
      const e = exception as { status?: unknown; expose?: boolean; message?: string; name?: string };
      if (typeof e?.status === 'number' && e.status >= 400 && e.status < 600) {
        status = e.status;
      } else if (/Redis|MaxRetriesPerRequest|ECONNREFUSED|Connection is closed/i.test(`${e?.name} ${e?.message}`)) {
        status = 503;
      }
      const message = status < 500 && e?.expose !== false && e?.message ? e.message : STATUS_CODES[status];
      if (status === 500) this.logger.error(exception);
      body = { statusCode: status, message, error: STATUS_CODES[status] };
    }
    res.status(status).json(body);
  }
}
