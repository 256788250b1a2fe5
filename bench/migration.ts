import { type ChildProcess, fork } from 'node:child_process';
import { randomFillSync, randomUUID } from 'node:crypto';
import { type AddressInfo, connect, createServer, type Socket } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { Host } from '../src/kernel/host/index.js';
import { MigFeature } from '../src/uapi/migration.js';
import { Machine } from '../src/vmm/machine/machine.js';
import type { MachineDefinition } from '../src/vmm/machine/machine-definition.js';
import {
  describeVm,
  type MainHello,
  PROTOCOL_MAGIC,
  PROTOCOL_VERSION,
} from '../src/vmm/migration/handshake.js';
import type { IncomingParameters, MigrationParameters } from '../src/vmm/migration/migration-params.js';
import {
  encodeDeviceState,
  encodeEmptyFrame,
  encodeJsonFrame,
  encodeU32Frame,
  FrameType,
  MAX_DEVICE_PACKET_BYTES,
} from '../src/vmm/migration/wire-format.js';
import type { PeerRequest, PeerResult } from './migration-peer.js';
import type { SinkRequest } from './tcp-sink.js';
import type { BenchResult } from './report.js';

const MiB = 2 ** 20;
const GiB = 2 ** 30;
const PEER = fileURLToPath(new URL('./migration-peer.js', import.meta.url));
const SINK = fileURLToPath(new URL('./tcp-sink.js', import.meta.url));

/** Fork a peer, send it `request`, resolve its first message and, later, its second. */
function startPeer(
  script: string,
  request: unknown,
): { first: Promise<unknown>; second: Promise<unknown>; child: ChildProcess } {
  const child = fork(script, [], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
  const messages: unknown[] = [];
  const waiters: ((m: unknown) => void)[] = [];
  child.on('message', (m) => {
    const w = waiters.shift();
    if (w) w(m);
    else messages.push(m);
  });
  const next = () =>
    new Promise<unknown>((resolve, reject) => {
      const queued = messages.shift();
      if (queued !== undefined) resolve(queued);
      else waiters.push(resolve);
      child.once('exit', (code) => reject(new Error(`${script} exited with ${code}`)));
    });
  child.send(request as object);
  const first = next();
  const second = first.then(() => next());
  second.catch(() => undefined);
  return { first, second, child };
}

interface MigrationRun {
  source: PeerResult;
  destination: PeerResult;
}

/** One migration between two forked processes. */
async function migrate(
  definition: MachineDefinition,
  options: {
    params: Partial<MigrationParameters>;
    incoming?: Partial<IncomingParameters>;
    fillRandom?: boolean;
    warmupMs?: number;
  },
): Promise<MigrationRun> {
  const dst = startPeer(PEER, {
    role: 'destination',
    definition,
    ...(options.incoming === undefined ? {} : { params: options.incoming }),
  } satisfies PeerRequest);
  const { port } = (await dst.first) as { port: number };
  const src = startPeer(PEER, {
    role: 'source',
    definition,
    uri: `tcp:127.0.0.1:${port}`,
    params: options.params,
    fillRandom: options.fillRandom ?? false,
    warmupMs: options.warmupMs ?? 0,
  } satisfies PeerRequest);
  const [source, destination] = (await Promise.all([src.first, dst.second])) as [PeerResult, PeerResult];
  for (const [side, r] of [
    ['source', source],
    ['destination', destination],
  ] as const) {
    if (r.info.status !== 'completed')
      throw new Error(`${side} migration ${r.info.status}: ${r.info.error?.message}`);
  }
  if (source.digest !== destination.digest) throw new Error('the VM digests differ after the migration');
  return { source, destination };
}

/** The raw baseline's writes. */
const CHUNK = 512 * 1024;

/**
 * Raw loopback TCP between two processes: `bytes` over `connections` sockets, 512 KiB writes of
 * `data` (each connection its own part of it, from the start again at its end), read by
 * the sink process in `mode` (see tcp-sink.ts). The clock runs from the first write to the last
 * byte read, with the connections open.
 */
async function rawTcp(
  bytes: number,
  connections: number,
  data: Buffer,
  mode: SinkRequest['mode'],
): Promise<{ bytesPerSec: number; senderCpuMs: number; receiverCpuMs: number }> {
  const accepted: Socket[] = [];
  const server = createServer((s) => accepted.push(s));
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as AddressInfo).port;
  const sink = startPeer(SINK, { bytes, port, connections, mode } satisfies SinkRequest);
  await sink.first;
  while (accepted.length < connections) await sleep(1);
  server.close();
  // Every connection carries an equal share (so the order they were accepted in does not matter).
  if (bytes % (connections * CHUNK) !== 0) throw new Error(`${bytes} bytes do not split into ${connections}`);
  const share = bytes / connections;
  const t0 = performance.now();
  const cpu0 = process.cpuUsage();
  await Promise.all(
    accepted.map(async (s, c) => {
      for (let sent = 0; sent < share; sent += CHUNK) {
        const at = (c * share + sent) % data.length;
        if (!s.write(data.subarray(at, at + CHUNK))) await new Promise((resolve) => s.once('drain', resolve));
      }
    }),
  );
  const { cpuMs: receiverCpuMs } = (await sink.second) as { cpuMs: number };
  const seconds = (performance.now() - t0) / 1000;
  const cpu = process.cpuUsage(cpu0);
  for (const s of accepted) s.destroy();
  return { bytesPerSec: bytes / seconds, senderCpuMs: (cpu.user + cpu.system) / 1000, receiverCpuMs };
}

/** `bytes` of random content (filled 64 MiB at a time: randomFillSync takes at most 2 GiB - 1). */
function randomBuffer(bytes: number): Buffer {
  const data = Buffer.allocUnsafeSlow(bytes);
  for (let at = 0; at < bytes; at += 64 * MiB) randomFillSync(data, at, Math.min(64 * MiB, bytes - at));
  return data;
}

const idleGuest = (ramBytes: number): MachineDefinition => ({
  name: 'bench-vm',
  iommu: 'iommufd',
  ram: [{ name: 'pc.ram', sizeBytes: ramBytes }],
  vcpus: { count: 1, workload: { pageWriteLimit: 0 } },
  devices: [],
});

export interface RamThroughputRow {
  channels: number;
  /** Guest RAM / the migration's time after setup (QEMU's throughput; raw TCP's clock also starts connected). */
  migrationBytesPerSec: number;
  /** Guest RAM / the whole migration's time, setup (connections, handshake, threads) included. */
  migrationWholeBytesPerSec: number;
  /** Raw TCP moving the same memory: a 2 GiB buffer of random content into a 2 GiB buffer. */
  rawTcpBytesPerSec: number;
  /** Raw TCP as Node does by default: one cached 512 KiB buffer resent, read into fresh buffers and counted. */
  rawTcpNodeBytesPerSec: number;
  ratio: number;
  /** The destination's event-loop utilization in the fastest migration (where its one thread stands). */
  destinationBusy: number;
  /** CPU time per GiB moved (user + system, all threads) in the fastest run of each. */
  cpuMsPerGiB: { source: number; destination: number; rawSender: number; rawReceiver: number };
}

/**
 * Benchmark 1: a 2 GiB idle guest of random content migrated with 1, 2 and 4 channels, against
 * raw loopback TCP with as many connections in the same run; the best of `runs` of each. The
 * ratio's baseline moves the same memory as the migration (each byte read from a 2 GiB buffer on
 * one side, written into a 2 GiB buffer on the other), since both cores are busy in either
 * transfer and touching 2 GiB of memory on each side is part of the work; Node's default
 * (a cached buffer resent, a receiver that drops what it reads) is reported beside it.
 */
export async function benchRamThroughput(
  ramBytes = 2 * GiB,
  runs = 3,
  channelCounts = [1, 2, 4],
): Promise<RamThroughputRow[]> {
  const rows: RamThroughputRow[] = [];
  const perGiB = (ms: number) => ms / (ramBytes / GiB);
  const memory = randomBuffer(ramBytes);
  const cached = randomBuffer(CHUNK);
  for (const channels of channelCounts) {
    let migration = 0;
    let migrationWhole = 0;
    let raw = 0;
    let rawNode = 0;
    let destinationBusy = NaN;
    const cpuMsPerGiB = { source: NaN, destination: NaN, rawSender: NaN, rawReceiver: NaN };
    for (let r = 0; r < runs; r++) {
      rawNode = Math.max(rawNode, (await rawTcp(ramBytes, channels, cached, 'count')).bytesPerSec);
      const tcp = await rawTcp(ramBytes, channels, memory, 'memory');
      if (tcp.bytesPerSec > raw) {
        raw = tcp.bytesPerSec;
        cpuMsPerGiB.rawSender = perGiB(tcp.senderCpuMs);
        cpuMsPerGiB.rawReceiver = perGiB(tcp.receiverCpuMs);
      }
      const { source, destination } = await migrate(idleGuest(ramBytes), {
        params: { multifdChannels: channels, maxBandwidthBytesPerSec: 0 },
        fillRandom: true,
      });
      const { totalTimeMs, setupTimeMs } = source.info;
      migrationWhole = Math.max(migrationWhole, ramBytes / (totalTimeMs / 1000));
      const rate = ramBytes / ((totalTimeMs - setupTimeMs) / 1000);
      if (rate > migration) {
        migration = rate;
        destinationBusy = destination.eventLoopUtilization ?? NaN;
        cpuMsPerGiB.source = perGiB(source.cpuMs ?? NaN);
        cpuMsPerGiB.destination = perGiB(destination.cpuMs ?? NaN);
      }
    }
    rows.push({
      channels,
      migrationBytesPerSec: migration,
      migrationWholeBytesPerSec: migrationWhole,
      rawTcpBytesPerSec: raw,
      rawTcpNodeBytesPerSec: rawNode,
      ratio: migration / raw,
      destinationBusy,
      cpuMsPerGiB,
    });
  }
  return rows;
}

export interface DowntimeFigures {
  downtimeMs: number;
  downtimeLimitMs: number;
  totalTimeMs: number;
  iterations: number;
  devicePrecopyBytes: number;
  expectedDowntimeMs: number | undefined;
}

/**
 * Benchmark 2: 1 GiB guest dirtying 64 MiB/s (two vCPUs at 32), an accel with 256 MiB of device
 * memory migrated with precopy, a nic and a basic device; downtime-limit 300 ms.
 */
export async function benchDowntime(): Promise<DowntimeFigures> {
  const definition: MachineDefinition = {
    name: 'bench-vm',
    iommu: 'iommufd',
    ram: [{ name: 'pc.ram', sizeBytes: GiB }],
    vcpus: { count: 2, workload: { dirtyRateMiBps: 32, seed: 7 } },
    devices: [
      {
        type: 'nic',
        name: 'nic0',
        flowTableBytes: MiB,
        rxRing: { entries: 256, bufferBytes: 2048 },
        seed: 3,
      },
      { type: 'accel', name: 'accel0', memoryBytes: 256 * MiB, guestBufferBytes: 64 * 1024, seed: 4 },
      { type: 'basic', name: 'basic0', seed: 5 },
    ],
    guestDriverIntervalMs: 10,
  };
  const { source } = await migrate(definition, {
    params: { downtimeLimitMs: 300, maxBandwidthBytesPerSec: 0 },
    warmupMs: 1000,
  });
  const info = source.info;
  return {
    downtimeMs: info.downtimeMs ?? NaN,
    downtimeLimitMs: 300,
    totalTimeMs: info.totalTimeMs,
    iterations: info.ram.dirtySyncCount,
    devicePrecopyBytes: info.devices.reduce((n, d) => n + d.precopyBytes, 0),
    expectedDowntimeMs: info.expectedDowntimeMs,
  };
}

export interface StopCopyFigures {
  stateBytes: number;
  oneChannelMs: number;
  fourChannelsMs: number;
  speedup: number;
  /** CPU both processes used during the downtime, in cores (CPU time / downtime), in the best run of each. */
  oneChannelCores: number;
  fourChannelsCores: number;
}

/**
 * Benchmark 3: an accel with 512 MiB of device memory and no PRE_COPY (all of it is stop-copy
 * state), a small idle guest: the downtime with 4 channels vs 1 (best of `runs`), and how many
 * cores the two processes kept busy meanwhile.
 */
export async function benchStopCopy(runs = 2): Promise<StopCopyFigures> {
  const definition: MachineDefinition = {
    name: 'bench-vm',
    iommu: 'iommufd',
    ram: [{ name: 'pc.ram', sizeBytes: 64 * MiB }],
    vcpus: { count: 1, workload: { pageWriteLimit: 0 } },
    devices: [
      {
        type: 'accel',
        name: 'accel0',
        memoryBytes: 512 * MiB,
        guestBufferBytes: 64 * 1024,
        migrationFlags: MigFeature.STOP_COPY,
        seed: 4,
      },
    ],
    guestDriverIntervalMs: 10,
  };
  const downtime = async (channels: number) => {
    let best = { ms: Infinity, cores: NaN };
    for (let r = 0; r < runs; r++) {
      // An idle guest sends nothing in precopy, so the measured bandwidth (and with it the
      // switchover threshold) is ~0: as a QEMU user would, give the bandwidth to assume.
      const { source, destination } = await migrate(definition, {
        params: {
          multifdChannels: channels,
          maxBandwidthBytesPerSec: 0,
          downtimeLimitMs: 2000,
          availSwitchoverBandwidthBytesPerSec: 1e9,
        },
      });
      const ms = source.info.downtimeMs ?? Infinity;
      const cpuMs = (source.downtimeCpuMs ?? NaN) + (destination.downtimeCpuMs ?? NaN);
      if (ms < best.ms) best = { ms, cores: cpuMs / ms };
    }
    return best;
  };
  const one = await downtime(1);
  const four = await downtime(4);
  return {
    stateBytes: 512 * MiB,
    oneChannelMs: one.ms,
    fourChannelsMs: four.ms,
    speedup: one.ms / four.ms,
    oneChannelCores: one.cores,
    fourChannelsCores: four.cores,
  };
}

export interface HostileFigures {
  capBytes: number;
  sentBytes: number;
  rssGrowthBytes: number;
  peakRssBytes: number;
  guestRamBytes: number;
  peakQueuedBytes: number;
  errorCode: string | undefined;
  errorMessage: string | undefined;
}

/**
 * Benchmark 4: a hostile source that completes the handshake and the switchover, then sends
 * 512 MiB of device-state packets for the accel in reverse index order (the first one never
 * comes) over 4 channels, to a destination with a 32 MiB queue cap. The destination must refuse
 * it with its RSS growing by at most the cap + 16 MiB.
 */
export async function benchHostileSource(
  capBytes = 32 * MiB,
  sentBytes = 512 * MiB,
): Promise<HostileFigures> {
  const definition: MachineDefinition = {
    name: 'bench-vm',
    iommu: 'iommufd',
    ram: [{ name: 'pc.ram', sizeBytes: 256 * MiB }],
    vcpus: { count: 1, workload: { pageWriteLimit: 0 } },
    devices: [{ type: 'accel', name: 'accel0', memoryBytes: 16 * MiB, guestBufferBytes: 64 * 1024, seed: 4 }],
    guestDriverIntervalMs: 10,
  };
  const dst = startPeer(PEER, {
    role: 'destination',
    definition,
    params: { maxQueuedBuffersBytes: capBytes },
  } satisfies PeerRequest);
  const { port } = (await dst.first) as { port: number };
  const template = Machine.create(new Host(), definition);
  const config = describeVm(template);
  await template.destroy();
  const channels = 4;
  const session = randomUUID();
  const open = () =>
    new Promise<Socket>((resolve, reject) => {
      const s = connect({ host: '127.0.0.1', port }, () => resolve(s));
      s.once('error', reject);
    });
  const main = await open();
  main.on('error', () => undefined);
  const hello: MainHello = {
    magic: PROTOCOL_MAGIC,
    version: PROTOCOL_VERSION,
    session,
    kind: 'main',
    vm: definition.name,
    channels,
    switchoverAck: false,
    config,
  };
  main.write(encodeJsonFrame(FrameType.HELLO, hello));
  const data = await Promise.all(Array.from({ length: channels }, () => open()));
  data.forEach((s, i) => {
    s.on('error', () => undefined);
    s.write(
      encodeJsonFrame(FrameType.HELLO, {
        magic: PROTOCOL_MAGIC,
        version: PROTOCOL_VERSION,
        session,
        kind: 'multifd',
        channel: i + 1,
      }),
    );
    // Each channel closes its round-1 barrier at once, so only the device state can block it.
    s.write(encodeU32Frame(FrameType.SYNC, 1));
  });
  main.write(encodeEmptyFrame(FrameType.SWITCHOVER));
  const payload = Buffer.alloc(MAX_DEVICE_PACKET_BYTES);
  randomFillSync(payload);
  const packets = sentBytes / MAX_DEVICE_PACKET_BYTES;
  // Indexes packets..1 in reverse, round robin over the channels; index 0 never comes.
  const writers = data.map(async (s, c) => {
    for (let index = packets - c; index >= 1; index -= channels) {
      if (s.destroyed) return;
      const ok = s.write(encodeDeviceState(0, index, 0, payload.length)) && s.write(payload);
      if (!ok) await new Promise((resolve) => (s.once('drain', resolve), s.once('close', resolve)));
    }
  });
  const result = (await dst.second) as PeerResult;
  for (const s of [main, ...data]) s.destroy();
  await Promise.allSettled(writers);
  const rss = result.rss!;
  return {
    capBytes,
    sentBytes,
    rssGrowthBytes: rss.peakBytes - rss.beforeBytes,
    peakRssBytes: rss.peakBytes,
    guestRamBytes: rss.guestRamBytes,
    peakQueuedBytes: result.info.queuedBuffers?.peakBytes ?? 0,
    errorCode: result.info.error?.code,
    errorMessage: result.info.error?.message,
  };
}

const f2 = (n: number) => n.toFixed(2);
const gbps = (bytesPerSec: number) => (bytesPerSec / 1e9).toFixed(2);

/** The four migration benchmarks of issue 5 as report sections. */
export async function migrationResults(): Promise<BenchResult[]> {
  const ram = await benchRamThroughput();
  const down = await benchDowntime();
  const stop = await benchStopCopy();
  const hostile = await benchHostileSource();
  const mib = (n: number) => `${(n / MiB).toFixed(1)} MiB`;
  return [
    {
      title: 'Live migration: RAM throughput, 2 GiB idle guest of random content (issue 5, benchmark 1)',
      rows: ram.flatMap((r) => [
        {
          metric: `${r.channels} ch: migration, GB/s (guest RAM / time after setup)`,
          value: gbps(r.migrationBytesPerSec),
        },
        {
          metric: `${r.channels} ch: raw loopback TCP, same memory (2 GiB buffer → 2 GiB buffer), GB/s`,
          value: gbps(r.rawTcpBytesPerSec),
        },
        {
          metric: `${r.channels} ch: ratio`,
          value: f2(r.ratio),
          target: '≥ 0.8',
          met: r.ratio >= 0.8,
        },
        {
          metric: `${r.channels} ch: migration, whole (setup included), GB/s`,
          value: gbps(r.migrationWholeBytesPerSec),
        },
        {
          metric: `${r.channels} ch: raw TCP, Node's default (cached 512 KiB buffer resent, reads dropped), GB/s; ratio`,
          value: `${gbps(r.rawTcpNodeBytesPerSec)}; ${f2(r.migrationBytesPerSec / r.rawTcpNodeBytesPerSec)}`,
        },
        {
          metric: `${r.channels} ch: CPU ms per GiB: source / destination / raw sender / raw receiver`,
          value: [
            r.cpuMsPerGiB.source,
            r.cpuMsPerGiB.destination,
            r.cpuMsPerGiB.rawSender,
            r.cpuMsPerGiB.rawReceiver,
          ]
            .map((n) => n.toFixed(0))
            .join(' / '),
        },
        {
          metric: `${r.channels} ch: destination event-loop utilization, handshake to end`,
          value: f2(r.destinationBusy),
        },
      ]),
      notes: [
        'Source and destination are two forked processes (bench/migration-peer.ts) talking over loopback TCP, as two software hosts do; the destination preallocates guest RAM (prealloc=on). Best of 3 runs each, the raw baselines run just before each migration.',
        "Raw TCP: 512 KiB writes from one process to another over as many connections, the clock started with the connections open. The ratio's baseline moves the same memory as the migration: it reads each byte of a 2 GiB buffer once and the receiver reads into a prefaulted 2 GiB buffer, each connection its part in order (onread). The migration adds framing, the zero-page test, the dirty bitmap and the page lists, and places each packet's pages where they belong.",
        "Migration throughput is taken after setup, as QEMU's: setup (connections, handshake, channel threads, dirty logging on) takes 60-100 ms here. Both sides are CPU-bound on this machine's 2 cores, so CPU time per GiB is the steadier figure.",
      ],
    },
    {
      title:
        'Live migration: downtime, 1 GiB guest dirtying 64 MiB/s with nic + 256 MiB accel (precopy) + basic (issue 5, benchmark 2)',
      rows: [
        {
          metric: 'downtime, ms (VM stop on the source → VM loaded and handed off, RUNNING received)',
          value: down.downtimeMs.toFixed(0),
          target: `≤ ${down.downtimeLimitMs}`,
          met: down.downtimeMs <= down.downtimeLimitMs,
        },
        { metric: 'total time, ms', value: down.totalTimeMs.toFixed(0) },
        { metric: 'iterations (dirty syncs)', value: String(down.iterations) },
        { metric: 'device precopy data sent', value: mib(down.devicePrecopyBytes) },
      ],
      notes: [
        'downtime-limit 300 ms, max-bandwidth unlimited, 2 multifd channels, switchover-ack on; the VM ran 1 s before the migration.',
      ],
    },
    {
      title: 'Live migration: 512 MiB of accel stop-copy state, 4 channels vs 1 (issue 5, benchmark 3)',
      rows: [
        { metric: 'downtime with 1 channel, ms', value: stop.oneChannelMs.toFixed(0) },
        { metric: 'downtime with 4 channels, ms', value: stop.fourChannelsMs.toFixed(0) },
        { metric: 'speed-up', value: f2(stop.speedup), target: '≥ 1.5', met: stop.speedup >= 1.5 },
        {
          metric: 'CPU in use during the downtime, both processes, cores (of 2): 1 channel / 4 channels',
          value: `${f2(stop.oneChannelCores)} / ${f2(stop.fourChannelsCores)}`,
        },
      ],
      notes: [
        'The accel offers STOP_COPY only (no PRE_COPY): all 512 MiB leave while the VM is stopped. Best of 2 runs each.',
        'On this machine the speed-up cannot exceed (cores there are) / (cores in use with 1 channel), since 4 channels do no less work than 1 (their out-of-order packets are copied once more at the destination): with 2 cores and the row above, that bound is 2 / the 1-channel figure.',
      ],
    },
    {
      title:
        'Live migration: destination memory under a hostile reordering source (issue 5, benchmark 4, seed 000)',
      rows: [
        { metric: 'device state sent in reverse index order (index 0 never)', value: mib(hostile.sentBytes) },
        { metric: 'queue cap (x-migration-max-queued-buffers-size)', value: mib(hostile.capBytes) },
        { metric: 'peak queued bytes', value: mib(hostile.peakQueuedBytes) },
        {
          metric: 'destination RSS growth during the attack (peak − RSS with guest RAM preallocated)',
          value: mib(hostile.rssGrowthBytes),
          target: `≤ cap + 16 MiB = ${mib(hostile.capBytes + 16 * MiB)}`,
          met: hostile.rssGrowthBytes <= hostile.capBytes + 16 * MiB,
        },
        {
          metric: 'peak RSS / guest RAM',
          value: `${mib(hostile.peakRssBytes)} / ${mib(hostile.guestRamBytes)}`,
        },
        { metric: 'outcome', value: `${hostile.errorCode ?? 'not refused'}: ${hostile.errorMessage ?? ''}` },
      ],
      notes: [
        'RSS is sampled every 5 ms in the destination process. Its baseline (Node, the kernel model, device memory, guest RAM preallocated) is taken when it listens; the growth is what the attack costs.',
      ],
    },
  ];
}
