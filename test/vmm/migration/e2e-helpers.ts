/**
 * Shared pieces of the end-to-end migration tests: small VMs on separate software hosts in one
 * process, event recorders, a TCP proxy that can cut one channel, and the "rolled back" check.
 */
import assert from 'node:assert/strict';
import { createServer, type Server, Socket } from 'node:net';
import type { TestContext } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { Host } from '../../../src/kernel/host/index.js';
import { migStateName } from '../../../src/uapi/migration.js';
import { Machine } from '../../../src/vmm/machine/machine.js';
import type { MachineDefinition } from '../../../src/vmm/machine/machine-definition.js';
import { type IncomingOptions, IncomingMigration } from '../../../src/vmm/migration/destination.js';
import type {
  MigrationEvent,
  MigrationInfo,
  MigrationStatus,
} from '../../../src/vmm/migration/migration-info.js';
import type { MigrationParameters } from '../../../src/vmm/migration/migration-params.js';
import { OutgoingMigration } from '../../../src/vmm/migration/source.js';

export const MiB = 1024 * 1024;
export const DEVICES = ['nic0', 'accel0', 'basic0'] as const;

export interface VmOptions {
  iommu?: 'iommufd' | 'type1';
  ramBytes?: number;
  vcpus?: number;
  /** Per vCPU, MiB/s; 0 = as fast as it can. */
  dirtyRateMiBps?: number;
  workingSetBytes?: number;
  /** Page writes after which each vCPU idles (0: an idle guest). */
  pageWriteLimit?: number;
  accelMemoryBytes?: number;
  guestDriverIntervalMs?: number;
}

/** The VM of test/vmm/machine/machine.test.ts, at most 64 MiB: a nic (P2P|PRE_COPY), an accel (PRE_COPY), a basic device, an mdev. */
export function vmDefinition(o: VmOptions = {}): MachineDefinition {
  return {
    name: 'vm',
    iommu: o.iommu ?? 'iommufd',
    ram: [{ name: 'pc.ram', sizeBytes: o.ramBytes ?? 64 * MiB }],
    vcpus: {
      count: o.vcpus ?? 2,
      workload: {
        dirtyRateMiBps: o.dirtyRateMiBps ?? 16,
        seed: 7,
        ...(o.workingSetBytes === undefined ? {} : { workingSetBytes: o.workingSetBytes }),
        ...(o.pageWriteLimit === undefined ? {} : { pageWriteLimit: o.pageWriteLimit }),
      },
    },
    devices: [
      {
        type: 'nic',
        name: 'nic0',
        flowTableBytes: 1 * MiB,
        rxRing: { entries: 64, bufferBytes: 2048 },
        seed: 3,
      },
      {
        type: 'accel',
        name: 'accel0',
        memoryBytes: o.accelMemoryBytes ?? 4 * MiB,
        guestBufferBytes: 64 * 1024,
        seed: 4,
      },
      { type: 'basic', name: 'basic0', seed: 5 },
    ],
    emulatedDevices: [{ name: 'mdev0', pages: 2, seed: 6 }],
    guestDriverIntervalMs: o.guestDriverIntervalMs ?? 5,
  };
}

const live = new Set<Machine>();

/** A VM on its own host, destroyed when the test ends (and by destroyAll at the end of the file). */
export function createVm(t: TestContext, options: VmOptions = {}): Machine {
  const vm = Machine.create(new Host(), vmDefinition(options));
  live.add(vm);
  t.after(async () => {
    await vm.destroy().catch(() => undefined);
    live.delete(vm);
  });
  return vm;
}

/** For the file's `after`: every VM a test left behind. */
export async function destroyAll(): Promise<void> {
  await Promise.all([...live].map((vm) => vm.destroy().catch(() => undefined)));
  live.clear();
}

/** What a migration reported through onEvent: statuses and each device's states, in order. */
export interface Recorder {
  /** Status changes as the events report them (the first is 'setup', emitted after start/listen returned). */
  statuses: MigrationStatus[];
  /** Device → its states, starting with the state it had when recording began. */
  devices: Map<string, string[]>;
  throttles: number[];
  events: MigrationEvent[];
}

/** Record a migration's events from now on (call right after start/listen). */
export function record(
  migration: OutgoingMigration | IncomingMigration,
  machine: Machine,
  onEvent?: (event: MigrationEvent) => void,
): Recorder {
  const rec: Recorder = {
    statuses: [],
    devices: new Map(machine.devices.map((d) => [d.name, [migStateName(d.device.vfio.getMigDeviceState())]])),
    throttles: [],
    events: [],
  };
  migration.onEvent((event) => {
    rec.events.push(event);
    if (event.type === 'status') rec.statuses.push(event.status);
    else if (event.type === 'device-state') rec.devices.get(event.device)!.push(event.state);
    else if (event.type === 'throttle') rec.throttles.push(event.percent);
    onEvent?.(event);
  });
  return rec;
}

/** A migration between two VMs of this process, both sides recorded. */
export interface MigrationRun {
  incoming: IncomingMigration;
  out: OutgoingMigration;
  srcRec: Recorder;
  dstRec: Recorder;
  /** The final reports: [source, destination]. */
  done: Promise<[MigrationInfo, MigrationInfo]>;
}

/**
 * Listen on `dst` (autostart off unless `incoming` says otherwise), migrate `src` to it
 * (max-bandwidth unlimited unless `params` says otherwise) and record both sides from the start.
 */
export async function startMigration(
  src: Machine,
  dst: Machine,
  options: {
    params?: Partial<MigrationParameters>;
    incoming?: IncomingOptions;
    signal?: AbortSignal;
    /** Hears every source event, after the recorder. */
    onSourceEvent?: (event: MigrationEvent, out: OutgoingMigration) => void;
  } = {},
): Promise<MigrationRun> {
  const incoming = await IncomingMigration.listen(dst, { autostart: false, ...options.incoming });
  const dstRec = record(incoming, dst);
  const out = OutgoingMigration.start(src, {
    uri: `tcp:127.0.0.1:${incoming.address.port}`,
    params: { maxBandwidthBytesPerSec: 0, ...options.params },
    ...(options.signal === undefined ? {} : { signal: options.signal }),
  });
  const onSourceEvent = options.onSourceEvent;
  const srcRec = record(out, src, onSourceEvent && ((event) => onSourceEvent(event, out)));
  return { incoming, out, srcRec, dstRec, done: Promise.all([out.done, incoming.done]) };
}

/** Every device's current VFIO migration state, by name. */
export function deviceStates(machine: Machine): Record<string, string> {
  return Object.fromEntries(
    machine.devices.map((d) => [d.name, migStateName(d.device.vfio.getMigDeviceState())]),
  );
}

export function allIn(state: string): Record<string, string> {
  return Object.fromEntries(DEVICES.map((n) => [n, state]));
}

/**
 * Record every MIG_DEVICE_STATE SET a VM's devices get from now on: [device, requested, reached].
 * (A VM's own start() changes device states outside any migration's events.)
 */
export function spyDeviceSets(machine: Machine): [string, string, string][] {
  const calls: [string, string, string][] = [];
  for (const d of machine.devices) {
    const vfio = d.device.vfio;
    const original = vfio.setMigDeviceState.bind(vfio);
    vfio.setMigDeviceState = (state: number) => {
      try {
        return original(state);
      } finally {
        calls.push([d.name, migStateName(state), migStateName(vfio.getMigDeviceState())]);
      }
    };
  }
  return calls;
}

export async function waitUntil(what: string, done: () => boolean, timeoutMs = 30_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!done()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(5);
  }
}

/**
 * The source VM after a migration that failed before the hand-off: running again, every device
 * RUNNING, dirty logging off, no vCPU throttle, and the guest really runs (its digest moves).
 */
export async function assertRolledBack(src: Machine): Promise<void> {
  assert.equal(src.state, 'running');
  assert.deepEqual(deviceStates(src), allIn('RUNNING'));
  assert.equal(src.ram.dirtyLogActive, false, 'dirty logging is off');
  assert.equal(src.vcpus!.throttlePercent, 0, 'no vCPU throttle');
  const before = src.digest();
  await sleep(100);
  assert.notEqual(src.digest(), before, 'the guest runs');
}

/** A destination whose incoming migration failed before LOADED: the VM is 'created' again, devices reset. */
export function assertDiscarded(dst: Machine): void {
  assert.equal(dst.state, 'created');
  assert.deepEqual(deviceStates(dst), allIn('RUNNING'));
}

/** A port nobody listens on (bound, then closed). */
export async function deadPort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as { port: number }).port;
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return port;
}

/** One proxied connection: `source` is the migration source's side, `destination` the destination's. */
export interface ProxyLink {
  index: number;
  source: Socket;
  destination: Socket;
  /** Bytes that went from the source to the destination. */
  forwardedBytes: number;
}

/**
 * A TCP proxy between a source and a destination, to break one connection in a chosen way. Links
 * are numbered in accept order: 0 is the main channel (its handshake ends before any multifd
 * channel connects), 1.. the multifd channels (in no fixed order among themselves).
 */
export class TcpProxy {
  readonly links: ProxyLink[] = [];
  readonly #server: Server;
  readonly port: number;

  private constructor(server: Server, port: number) {
    this.#server = server;
    this.port = port;
  }

  static async start(t: TestContext, targetPort: number): Promise<TcpProxy> {
    const server = createServer({ noDelay: true });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    const proxy = new TcpProxy(server, (server.address() as { port: number }).port);
    server.on('connection', (source) => proxy.#link(source, targetPort));
    t.after(() => proxy.close());
    return proxy;
  }

  #link(source: Socket, targetPort: number): void {
    source.setNoDelay(true);
    source.pause();
    const destination = new Socket();
    const link: ProxyLink = { index: this.links.length, source, destination, forwardedBytes: 0 };
    this.links.push(link);
    destination.connect({ host: '127.0.0.1', port: targetPort, noDelay: true }, () => source.resume());
    source.on('data', (chunk: Buffer) => {
      link.forwardedBytes += chunk.length;
      if (!destination.destroyed && !destination.write(chunk)) {
        source.pause();
        destination.once('drain', () => source.resume());
      }
    });
    destination.on('data', (chunk: Buffer) => {
      if (!source.destroyed && !source.write(chunk)) {
        destination.pause();
        source.once('drain', () => destination.resume());
      }
    });
    // A side that ends or fails ends the other (a cut side does not: see cut()).
    source.on('end', () => destination.end());
    destination.on('end', () => source.end());
    source.on('error', () => destination.destroy());
    destination.on('error', () => source.destroy());
  }

  /**
   * Break one side of a link, keep the other open and silent (bytes that still arrive on it are
   * dropped): 'reset' sends RST (the peer sees ECONNRESET, or EOF if the kernel reports it so),
   * 'close' sends FIN (the peer sees EOF, mid-frame or not). The other peer sees nothing.
   */
  cut(link: ProxyLink, side: 'source' | 'destination', how: 'reset' | 'close' = 'reset'): void {
    const gone = link[side];
    const kept = side === 'source' ? link.destination : link.source;
    kept.removeAllListeners('end');
    kept.removeAllListeners('error');
    kept.on('error', () => undefined);
    gone.removeAllListeners('error');
    gone.on('error', () => undefined);
    if (how === 'reset') gone.resetAndDestroy();
    else gone.destroy();
    kept.removeAllListeners('data');
    kept.resume();
  }

  /** Reset both sides of every link at once. */
  cutAll(): void {
    for (const link of this.links) {
      for (const socket of [link.source, link.destination]) {
        socket.removeAllListeners('error');
        socket.on('error', () => undefined);
        socket.resetAndDestroy();
      }
    }
  }

  close(): void {
    this.#server.close();
    for (const link of this.links) {
      link.source.destroy();
      link.destination.destroy();
    }
  }
}

/** The source VM's device states must never leave RUNNING (nothing was started). */
export function neverLeftRunning(rec: Recorder): void {
  for (const name of DEVICES) assert.deepEqual(rec.devices.get(name), ['RUNNING'], `${name} never moved`);
}
