import { randomFillSync } from 'node:crypto';
import { Host } from '../src/kernel/host/index.js';
import { Machine } from '../src/vmm/machine/machine.js';
import type { MachineDefinition } from '../src/vmm/machine/machine-definition.js';
import { IncomingMigration } from '../src/vmm/migration/destination.js';
import type { MigrationInfo } from '../src/vmm/migration/migration-info.js';
import type { IncomingParameters, MigrationParameters } from '../src/vmm/migration/migration-params.js';
import { OutgoingMigration } from '../src/vmm/migration/source.js';

/*
 * One side of a migration benchmark, as its own OS process (forked by bench/migration.ts), so
 * source and destination talk over real loopback TCP as two software hosts do. Driven over IPC:
 *
 *   → { role: 'destination', definition, params }   ← { port }   … ← { info, rss, digest }
 *   → { role: 'source', definition, uri, params, fillRandom, warmupMs }        … ← { info, digest }
 */

export type PeerRequest =
  | { role: 'destination'; definition: MachineDefinition; params?: Partial<IncomingParameters> }
  | {
      role: 'source';
      definition: MachineDefinition;
      uri: string;
      params: Partial<MigrationParameters>;
      /** Fill guest RAM with random bytes before starting (an idle guest of random content). */
      fillRandom: boolean;
      /** How long the VM runs before the migration starts. */
      warmupMs: number;
    };

export interface PeerResult {
  info: MigrationInfo;
  digest: string;
  /** Destination: RSS before the source connected (guest RAM preallocated) and the peak during the migration. */
  rss?: { beforeBytes: number; peakBytes: number; guestRamBytes: number };
  /** Destination: share of the time its event loop was busy, from the handshake to the end. */
  eventLoopUtilization?: number;
  /** CPU time (user + system, all threads) spent by this process during the migration, ms. */
  cpuMs?: number;
  /** Of which from the switchover (status 'device') to the end, ms. */
  downtimeCpuMs?: number;
}

const send = (message: unknown) => process.send!(message);

const cpuMsSince = (since: NodeJS.CpuUsage) => {
  const { user, system } = process.cpuUsage(since);
  return (user + system) / 1000;
};

async function destination(request: Extract<PeerRequest, { role: 'destination' }>): Promise<void> {
  const vm = Machine.create(new Host(), request.definition);
  const incoming = await IncomingMigration.listen(vm, {
    autostart: false,
    prealloc: true,
    ...(request.params === undefined ? {} : { params: request.params }),
  });
  const beforeBytes = process.memoryUsage.rss();
  let peakBytes = beforeBytes;
  const sampler = setInterval(() => {
    peakBytes = Math.max(peakBytes, process.memoryUsage.rss());
  }, 5);
  let busySince: ReturnType<typeof performance.eventLoopUtilization> | undefined;
  let cpuSince: NodeJS.CpuUsage | undefined;
  let downtimeCpuSince: NodeJS.CpuUsage | undefined;
  incoming.onEvent((event) => {
    if (event.type === 'status' && event.status === 'active') {
      busySince = performance.eventLoopUtilization();
      cpuSince = process.cpuUsage();
    }
    if (event.type === 'status' && event.status === 'device') downtimeCpuSince = process.cpuUsage();
  });
  send({ port: incoming.address.port });
  const info = await incoming.done;
  const busy = busySince === undefined ? undefined : performance.eventLoopUtilization(busySince).utilization;
  const cpuMs = cpuSince === undefined ? undefined : cpuMsSince(cpuSince);
  const downtimeCpuMs = downtimeCpuSince === undefined ? undefined : cpuMsSince(downtimeCpuSince);
  clearInterval(sampler);
  peakBytes = Math.max(peakBytes, process.memoryUsage.rss());
  const result: PeerResult = {
    info,
    digest: info.status === 'completed' ? vm.digest() : '',
    rss: { beforeBytes, peakBytes, guestRamBytes: vm.ram.totalBytes },
    ...(busy === undefined ? {} : { eventLoopUtilization: busy }),
    ...(cpuMs === undefined ? {} : { cpuMs }),
    ...(downtimeCpuMs === undefined ? {} : { downtimeCpuMs }),
  };
  send(result);
  await vm.destroy();
}

async function source(request: Extract<PeerRequest, { role: 'source' }>): Promise<void> {
  const vm = Machine.create(new Host(), request.definition);
  if (request.fillRandom) {
    for (const block of vm.ram.blocks) {
      for (let at = 0; at < block.sizeBytes; at += 64 << 20) {
        randomFillSync(block.memory.view(at, Math.min(64 << 20, block.sizeBytes - at)));
      }
    }
  }
  await vm.start();
  await new Promise((resolve) => setTimeout(resolve, request.warmupMs));
  const cpuSince = process.cpuUsage();
  const migration = OutgoingMigration.start(vm, { uri: request.uri, params: request.params });
  let downtimeCpuSince: NodeJS.CpuUsage | undefined;
  migration.onEvent((event) => {
    if (event.type === 'status' && event.status === 'device') downtimeCpuSince = process.cpuUsage();
  });
  const info = await migration.done;
  const cpuMs = cpuMsSince(cpuSince);
  const downtimeCpuMs = downtimeCpuSince === undefined ? undefined : cpuMsSince(downtimeCpuSince);
  const result: PeerResult = {
    info,
    digest: info.status === 'completed' ? vm.digest() : '',
    cpuMs,
    ...(downtimeCpuMs === undefined ? {} : { downtimeCpuMs }),
  };
  send(result);
  await vm.destroy();
}

process.once('message', (request: PeerRequest) => {
  const run = request.role === 'destination' ? destination(request) : source(request);
  run.then(
    () => process.exit(0),
    (err: unknown) => {
      process.stderr.write(`migration peer failed: ${(err as Error)?.stack ?? String(err)}\n`);
      process.exit(1);
    },
  );
});
