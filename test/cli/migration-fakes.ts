import { PassThrough } from 'node:stream';
import { ControlError } from '../../src/vmm/host/control-client.js';
import type { VmDigestWire, VmInfoWire } from '../../src/vmm/host/control-protocol.js';
import type { CommandIo } from '../../src/cli/conform-command.js';
import type { DemoHostApi } from '../../src/cli/migration-api.js';
import type { MigrationIo } from '../../src/cli/migrate-command.js';
import type { IncomingRequest } from '../../src/vmm/host/software-host.js';
import {
  emptyRamStats,
  type MigrationEvent,
  type MigrationInfo,
  type MigrationStatus,
} from '../../src/vmm/migration/migration-info.js';

/** In-memory stand-ins for a host's control API and for the CLI's process, for command tests. */

const MiB = 2 ** 20;
const GiB = 2 ** 30;

/** A MigrationInfo of a 1 GiB VM with two devices and three channels, `status` and `more` over it. */
export function fakeInfo(status: MigrationStatus, more: Partial<MigrationInfo> = {}): MigrationInfo {
  return {
    role: 'source',
    vm: 'vm1',
    status,
    totalTimeMs: 4321,
    setupTimeMs: 12,
    downtimeMs: undefined,
    expectedDowntimeMs: undefined,
    cpuThrottlePercentage: 0,
    bandwidthBytesPerMs: 0,
    thresholdBytes: 0,
    switchoverAcked: false,
    ram: emptyRamStats(GiB, 4096),
    vfio: { transferredBytes: 0 },
    devices: [
      {
        name: 'accel0',
        type: 'accel',
        state: 'RUNNING',
        precopyBytes: 0,
        stopCopyBytes: 0,
        packets: 0,
        initialBytes: 0,
        dirtyBytes: 0,
      },
      {
        name: 'nic0',
        type: 'nic',
        state: 'RUNNING',
        precopyBytes: 0,
        stopCopyBytes: 0,
        packets: 0,
        initialBytes: 0,
        dirtyBytes: 0,
      },
    ],
    channels: [
      { index: 0, kind: 'main', bytes: 0 },
      { index: 1, kind: 'multifd', bytes: 0 },
      { index: 2, kind: 'multifd', bytes: 0 },
    ],
    queuedBuffers: undefined,
    error: undefined,
    ...more,
  };
}

/** The final report of a completed migration, with numbers a summary must show. */
export function completedInfo(more: Partial<MigrationInfo> = {}): MigrationInfo {
  const base = fakeInfo('completed');
  return {
    ...base,
    totalTimeMs: 2468,
    setupTimeMs: 37,
    downtimeMs: 123,
    ram: {
      ...base.ram,
      transferredBytes: 1536 * MiB,
      remainingBytes: 0,
      normalPages: 200_000,
      duplicatePages: 62_144,
      dirtySyncCount: 7,
      mbps: 5213.4,
      precopyBytes: 1500 * MiB,
      downtimeBytes: 36 * MiB,
    },
    vfio: { transferredBytes: 80 * MiB },
    devices: base.devices.map((d, i) => ({
      ...d,
      state: 'STOP',
      precopyBytes: (i + 1) * 10 * MiB,
      stopCopyBytes: (i + 1) * 30 * MiB,
      packets: 17 + i,
    })),
    channels: [
      { index: 0, kind: 'main', bytes: 100 * MiB },
      { index: 1, kind: 'multifd', bytes: 758 * MiB },
      { index: 2, kind: 'multifd', bytes: 759 * MiB },
    ],
    ...more,
  };
}

/** The final report of a migration that failed at switchover on accel0 with EIO. */
export function failedInfo(): MigrationInfo {
  return fakeInfo('failed', {
    error: {
      code: 'ERR_MIGRATION_DEVICE',
      message: 'switchover: device accel0: MIG_DEVICE_STATE SET STOP_COPY: EIO',
      phase: 'switchover',
      device: 'accel0',
      errno: 'EIO',
    },
  });
}

/** A queue of events that an async iteration drains, waiting when it is empty. */
export class EventQueue {
  readonly #items: MigrationEvent[] = [];
  #wake: (() => void) | undefined;
  #closed = false;

  push(...events: MigrationEvent[]): void {
    this.#items.push(...events);
    this.#wake?.();
  }

  /** No more events: the iteration ends once it has drained the queue. */
  close(): void {
    this.#closed = true;
    this.#wake?.();
  }

  async *drain(signal?: AbortSignal): AsyncGenerator<MigrationEvent> {
    for (;;) {
      signal?.throwIfAborted();
      const next = this.#items.shift();
      if (next !== undefined) {
        yield next;
        if (next.type === 'end') return;
        continue;
      }
      if (this.#closed) return;
      await new Promise<void>((resolve) => {
        this.#wake = resolve;
        signal?.addEventListener('abort', () => resolve(), { once: true });
      });
      this.#wake = undefined;
    }
  }
}

const notFound = (vm: string) =>
  new ControlError(404, { code: 'ERR_VM_NOT_FOUND', message: `no VM named ${vm} on host fake` });

/**
 * A host with one VM `vm1` (or the VMs created on it): records every call, serves the events a
 * test pushes, and lets a test decide what migrate and cancel do.
 */
export class FakeHost implements DemoHostApi {
  readonly calls: string[] = [];
  readonly events = new EventQueue();
  readonly vms = new Map<string, { state: VmInfoWire['state']; digest: string }>([
    ['vm1', { state: 'running', digest: 'a'.repeat(64) }],
  ]);
  info: MigrationInfo = fakeInfo('none');
  /** The bodies of the last incoming and migrate calls. */
  incomingBody: unknown;
  migrateBody: unknown;
  /** Called by migrate after it has answered 'setup'; throw to make migrate fail. */
  onMigrate: () => void = () => {};
  onCancel: () => void = () => {};
  listenPort = 4444;

  #vm(vm: string) {
    const entry = this.vms.get(vm);
    if (entry === undefined) throw notFound(vm);
    return entry;
  }

  async incoming(vm: string, body: IncomingRequest) {
    this.calls.push(`incoming ${vm}`);
    this.incomingBody = body;
    this.#vm(vm);
    this.info = fakeInfo('setup', { role: 'destination', vm });
    const address = { host: '127.0.0.1', port: this.listenPort };
    return { uri: `tcp:127.0.0.1:${this.listenPort}`, address, info: this.info };
  }

  async migrate(vm: string, body: { uri: string }) {
    this.calls.push(`migrate ${vm} ${body.uri}`);
    this.migrateBody = body;
    this.#vm(vm);
    const started = fakeInfo('setup', { vm });
    this.info = started;
    this.onMigrate();
    return started;
  }

  async queryMigration(vm: string) {
    this.calls.push(`query ${vm}`);
    this.#vm(vm);
    return this.info;
  }

  async cancelMigration(vm: string) {
    this.calls.push(`cancel ${vm}`);
    this.onCancel();
    return this.info;
  }

  migrationEvents(vm: string, options?: { signal?: AbortSignal }) {
    this.calls.push(`events ${vm}`);
    this.#vm(vm);
    return this.events.drain(options?.signal);
  }

  async createVm(definition: unknown) {
    const name = (definition as { name: string }).name;
    this.calls.push(`create ${name}`);
    this.vms.set(name, { state: 'created', digest: '0'.repeat(64) });
    return this.#status(name);
  }

  async startVm(name: string) {
    this.calls.push(`start ${name}`);
    this.#vm(name).state = 'running';
    return this.#status(name);
  }

  async stopVm(name: string) {
    this.calls.push(`stop ${name}`);
    this.#vm(name).state = 'stopped';
    return this.#status(name);
  }

  async vmStatus(name: string) {
    return this.#status(name);
  }

  async vmDigest(name: string): Promise<VmDigestWire> {
    this.calls.push(`digest ${name}`);
    const { state, digest } = this.#vm(name);
    return { name, state, digest, bytesDirtied: 0 };
  }

  #status(name: string): VmInfoWire {
    // The commands read the state only.
    return { name, state: this.#vm(name).state } as VmInfoWire;
  }
}

/** A CommandIo that keeps what it prints, and the signal handler a command installs. */
export interface FakeIo extends MigrationIo {
  stdout: string[];
  stderr: string[];
  /** Deliver a signal as the process would (the handler the command registered, if any). */
  signal(name?: string): void;
  /** Everything drawn on the terminal stream. */
  terminal(): string;
  /** Handlers registered and not removed. */
  listening(): number;
}

export function fakeIo(isTTY = false): FakeIo {
  const stdout: string[] = [];
  const stderr: string[] = [];
  const handlers = new Set<(signal: string) => void>();
  const stream = Object.assign(new PassThrough(), { isTTY: true, columns: 160 });
  const drawn: Buffer[] = [];
  stream.on('data', (chunk: Buffer) => drawn.push(chunk));
  const io: CommandIo = { out: (t) => stdout.push(t), err: (t) => stderr.push(t), cwd: process.cwd() };
  return {
    ...io,
    stdout,
    stderr,
    isTTY,
    progressStream: stream,
    onSignals(handler) {
      handlers.add(handler);
      return () => handlers.delete(handler);
    },
    signal(name = 'SIGINT') {
      for (const h of handlers) h(name);
    },
    terminal: () => Buffer.concat(drawn).toString('utf8'),
    listening: () => handlers.size,
  };
}

/** The parsed JSON lines a command printed. */
export function jsonLines(io: FakeIo): Record<string, unknown>[] {
  return io.stdout.map((line) => JSON.parse(line) as Record<string, unknown>);
}
