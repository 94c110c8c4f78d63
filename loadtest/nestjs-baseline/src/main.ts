import 'reflect-metadata';
import { LogLevel } from '@nestjs/common';
import { NestFactory } from '@nestjs/core';
import type { NestExpressApplication } from '@nestjs/platform-express';
import { AppModule } from './app.module.js';
import { ConfigError, loadConfig } from './config.js';
import { JsonErrorFilter } from './error.filter.js';

async function bootstrap(): Promise<void> {
  let cfg;
  try {
    cfg = loadConfig();
  } catch (err) {
    if (err instanceof ConfigError) {
      process.stderr.write(`config error: ${err.message}\n`);
      process.exit(2);
    }
    throw err;
  }
  const logger: LogLevel[] = cfg.debug ? ['error', 'warn', 'debug'] : ['error', 'warn'];
  const app = await NestFactory.create<NestExpressApplication>(AppModule, {
    logger,
    bodyParser: false,
    forceCloseConnections: true,
  });
  app.useBodyParser('json', { limit: '16kb' });
  app.useGlobalFilters(new JsonErrorFilter());
  app.set('trust proxy', cfg.trustedProxies.length ? cfg.trustedProxies : false);
  app.set('x-powered-by', false);
  if (cfg.corsOrigins.length) app.enableCors({ origin: cfg.corsOrigins, credentials: true });
  // Drain (StreamService.onModuleDestroy sends `system {kind: shutdown}`), then exit 0.
  let closing = false;
  for (const sig of ['SIGTERM', 'SIGINT'] as const) {
    process.on(sig, () => {
      if (closing) return;
      closing = true;
      const force = setTimeout(() => process.exit(0), 5000);
      force.unref();
      app.close().then(
        () => process.exit(0),
        () => process.exit(0),
      );
    });
  }
  await app.listen(cfg.port, cfg.host);
  process.stderr.write(`nestjs-baseline listening on http://${cfg.host}:${cfg.port}\n`);
}

bootstrap().catch((err) => {
  process.stderr.write(`fatal: ${err?.stack ?? err}\n`);
  process.exit(1);
});
