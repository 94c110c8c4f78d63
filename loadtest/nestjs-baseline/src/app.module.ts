import { Module } from '@nestjs/common';
import { AccessTokenGuard, AdminGuard, StreamTicketGuard, TicketRequestPipe } from './auth.js';
import { CONFIG, loadConfig } from './config.js';
import { RedisService } from './redis.service.js';
import { HealthController, SseController } from './sse.controller.js';
import { StreamService } from './stream.service.js';

@Module({
  controllers: [SseController, HealthController],
  providers: [
    { provide: CONFIG, useFactory: loadConfig },
    StreamService,
    RedisService,
    AccessTokenGuard,
    AdminGuard,
    StreamTicketGuard,
    TicketRequestPipe,
  ],
})
export class AppModule {}
