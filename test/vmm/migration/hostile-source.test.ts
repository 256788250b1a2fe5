// A destination VM against a hostile migration source (seed 000: a source that makes the
// destination allocate unbounded memory for queued device-state buffers), played with raw TCP
// sockets writing frames built with the wire-format encoders. Every attack must end with the
// incoming migration failed (the right code, phase and device, told to the source in an ERROR
// frame on the main channel), the VM discarded ('created' again), and the queued device-state
// bytes never above the cap. And an honest source whose channels are skewed must still succeed:
// backpressure, not failure, when its queue is full.
import assert from 'node:assert/strict';
import { connect, type Socket } from 'node:net';
import { after, describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { Host } from '../../../src/kernel/host/index.js';
import { SavingStream } from '../../../src/kernel/vfio/mig-data-stream.js';
import { MigState } from '../../../src/uapi/migration.js';
import { Machine } from '../../../src/vmm/machine/machine.js';
import type { MachineDefinition } from '../../../src/vmm/machine/machine-definition.js';
import { IncomingMigration, type IncomingOptions } from '../../../src/vmm/migration/destination.js';
import {
  describeVm,
  type MainHello,
  PROTOCOL_MAGIC,
  PROTOCOL_VERSION,
} from '../../../src/vmm/migration/handshake.js';
import { MigrationErrorCode } from '../../../src/vmm/migration/migration-error.js';
import type { MigrationEvent, MigrationInfo } from '../../../src/vmm/migration/migration-info.js';
import { formatMigrationUri } from '../../../src/vmm/migration/migration-uri.js';
import { OutgoingMigration } from '../../../src/vmm/migration/source.js';
import {
  DEVICE_STATE_CONFIG,
  encodeDeviceState,
  encodeEmptyFrame,
  encodeJsonFrame,
  encodeRamPages,
  encodeU32Frame,
  type Frame,
  FrameDecoder,
  FrameType,
  MAX_DEVICE_PACKET_BYTES,
  MAX_NORMAL_PAGES,
  QUEUE_ENTRY_OVERHEAD_BYTES,
  RAM_PAGE_BYTES,
} from '../../../src/vmm/migration/index.js';

const MiB = 1024 * 1024;
/** The destination's queue cap in most cases: four 1 MiB buffers and a little. */
const CAP = 4 * MiB + 64 * 1024;
const SESSION = '5e55101d-0000-4000-8000-00000000beef';
const DEVICES = { nic0: 0, accel0: 1, basic0: 2 } as const;
const PC_RAM_PAGES = (64 * MiB) / RAM_PAGE_BYTES;

function definition(name: string): MachineDefinition {
  return {
    name,
    iommu: 'iommufd',
    ram: [
      { name: 'pc.ram', sizeBytes: 64 * MiB },
      { name: 'mem0', sizeBytes: 16 * MiB, discard: { blockSizeBytes: 2 * MiB } },
    ],
    vcpus: { count: 1, workload: { dirtyRateMiBps: 8, seed: 7 } },
    devices: [
      {
        type: 'nic',
        name: 'nic0',
        flowTableBytes: 256 * 1024,
        rxRing: { entries: 32, bufferBytes: 2048 },
        seed: 3,
      },
      { type: 'accel', name: 'accel0', memoryBytes: 4 * MiB, guestBufferBytes: 64 * 1024, seed: 4 },
      { type: 'basic', name: 'basic0', seed: 5 },
    ],
    guestDriverIntervalMs: 5,
  };
}

const live: Machine[] = [];
const wires: Wire[] = [];
after(async () => {
  for (const wire of wires) wire.socket.destroy();
  await Promise.all(live.map((vm) => vm.destroy().catch(() => undefined)));
});

let vmCount = 0;
function createVm(name = `dst${++vmCount}`): Machine {
  const vm = Machine.create(new Host(), definition(name));
  live.push(vm);
  return vm;
}

async function within<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([
      promise,
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
      }),
    ]);
  } finally {
    clearTimeout(timer);
  }
}

async function waitUntil(what: string, done: () => boolean, timeoutMs = 3000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!done()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(2);
  }
}

/** One raw connection of the hostile source: writes whatever it is given, decodes what comes back. */
class Wire {
  readonly socket: Socket;
  readonly frames: Frame[] = [];
  readonly closed: Promise<void>;
  decodeError: unknown;
  #decoder = new FrameDecoder('to-source');
  #waiters = new Set<() => void>();

  private constructor(socket: Socket) {
    this.socket = socket;
    socket.on('error', () => undefined); // EPIPE / ECONNRESET once the destination gives up
    socket.on('data', (chunk: Buffer) => {
      try {
        this.#decoder.push(chunk);
        for (let e = this.#decoder.next(); e !== undefined; e = this.#decoder.next()) {
          if (e.kind === 'frame') this.frames.push(e.frame);
        }
      } catch (err) {
        this.decodeError ??= err;
      }
      for (const wake of [...this.#waiters]) wake();
    });
    this.closed = new Promise((resolve) => socket.once('close', () => resolve()));
  }

  static connect(port: number): Promise<Wire> {
    return new Promise((resolve, reject) => {
      const socket = connect({ host: '127.0.0.1', port, noDelay: true });
      socket.once('connect', () => {
        const wire = new Wire(socket);
        wires.push(wire);
        resolve(wire);
      });
      socket.once('error', reject);
    });
  }

  send(...parts: Uint8Array[]): void {
    for (const part of parts) if (!this.socket.destroyed && this.socket.writable) this.socket.write(part);
  }

  /** The first frame of `type` received (waits for it). */
  async frame(type: number, timeoutMs = 2000): Promise<Frame> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      assert.equal(this.decodeError, undefined, 'the destination sends well-formed frames');
      const found = this.frames.find((f) => f.type === type);
      if (found !== undefined) return found;
      const left = deadline - Date.now();
      if (left <= 0) {
        throw new Error(
          `no frame 0x${type.toString(16)} (got ${this.frames.map((f) => f.type.toString(16)).join(', ') || 'none'})`,
        );
      }
      await new Promise<void>((resolve) => {
        const done = () => {
          clearTimeout(timer);
          this.#waiters.delete(done);
          resolve();
        };
        const timer = setTimeout(done, left);
        this.#waiters.add(done);
      });
    }
  }
}

function mainHello(vm: Machine, channels: number): MainHello {
  return {
    magic: PROTOCOL_MAGIC,
    version: PROTOCOL_VERSION,
    session: SESSION,
    kind: 'main',
    vm: 'hostile',
    channels,
    switchoverAck: false,
    config: describeVm(vm),
  };
}

const channelHello = (channel: number, session = SESSION) =>
  encodeJsonFrame(FrameType.HELLO, {
    magic: PROTOCOL_MAGIC,
    version: PROTOCOL_VERSION,
    session,
    kind: 'multifd',
    channel,
  });

interface Session {
  vm: Machine;
  incoming: IncomingMigration;
  main: Wire;
  events: MigrationEvent[];
  /** multifd channels, index 1.. at [1].. */
  channels: Wire[];
}

/** Listen on a fresh (or the given) VM and send the main HELLO (edited by `edit`). */
async function begin(
  options: {
    vm?: Machine;
    channels?: number;
    incoming?: IncomingOptions;
    edit?: (hello: MainHello) => void;
  } = {},
): Promise<Session> {
  const vm = options.vm ?? createVm();
  const incoming = await IncomingMigration.listen(vm, {
    params: { maxQueuedBuffersBytes: CAP },
    ...options.incoming,
  });
  const events: MigrationEvent[] = [];
  incoming.onEvent((e) => events.push(e));
  const main = await Wire.connect(incoming.address.port);
  const hello = mainHello(vm, options.channels ?? 2);
  options.edit?.(hello);
  main.send(encodeJsonFrame(FrameType.HELLO, hello));
  return { vm, incoming, main, events, channels: [] };
}

/** begin(), ACCEPT, then every announced multifd channel connected and registered. */
async function accepted(options: Parameters<typeof begin>[0] = {}): Promise<Session> {
  const s = await begin(options);
  await s.main.frame(FrameType.ACCEPT);
  const n = options.channels ?? 2;
  for (let i = 1; i <= n; i++) {
    const wire = await Wire.connect(s.incoming.address.port);
    wire.send(channelHello(i));
    s.channels[i] = wire;
  }
  await waitUntil('the multifd channels', () => s.incoming.query().channels.length === n + 1);
  return s;
}

/** SWITCHOVER on the main channel, and wait until the destination took it (status 'device'). */
async function switchover(s: Session): Promise<void> {
  s.main.send(encodeEmptyFrame(FrameType.SWITCHOVER));
  await waitUntil('the switchover', () => s.incoming.status === 'device');
}

function deviceState(device: number, index: number, data: Uint8Array, flags = 0): Uint8Array[] {
  return [encodeDeviceState(device, index, flags, data.length), data];
}

interface Expected {
  code: string;
  phase: string;
  device?: string;
  errno?: string;
  message: RegExp;
  /** The source closed the main channel itself: no ERROR frame to read there. */
  noErrorFrame?: boolean;
}

/** The incoming migration failed as expected, was discarded, stayed under the cap, and told the source. */
async function failed(s: Session, want: Expected, cap = CAP): Promise<MigrationInfo> {
  const info = await within(s.incoming.done, 8000, 'the destination to fail');
  assert.equal(info.status, 'failed');
  const error = info.error!;
  assert.ok(error !== undefined);
  assert.equal(error.code, want.code, error.message);
  assert.equal(error.phase, want.phase, error.message);
  assert.equal(error.device, want.device, error.message);
  assert.equal(error.errno, want.errno, error.message);
  assert.match(error.message, want.message);
  assert.equal(s.vm.state, 'created', 'the VM is discarded, ready for another migration');
  assert.ok(info.queuedBuffers!.peakBytes <= cap, `peak ${info.queuedBuffers!.peakBytes} > cap ${cap}`);
  assert.equal(info.queuedBuffers!.bytes, 0, 'every queued buffer given back');
  assert.equal(info.queuedBuffers!.capBytes, cap);
  for (const d of info.devices) assert.equal(d.state, 'RUNNING', `${d.name} reset`);
  assert.deepEqual(
    s.vm.status().devices.map((d) => d.migrationState),
    ['RUNNING', 'RUNNING', 'RUNNING'],
  );
  if (!want.noErrorFrame) {
    const frame = await s.main.frame(FrameType.ERROR);
    assert.ok(frame.type === FrameType.ERROR);
    assert.deepEqual(frame.json, {
      code: want.code,
      phase: want.phase,
      message: error.message,
      ...(want.device === undefined ? {} : { device: want.device }),
      ...(want.errno === undefined ? {} : { errno: want.errno }),
    });
  }
  return info;
}

/** A stopped source VM and each device's STOP_COPY stream in ≤ 1 MiB packets (made once). */
interface SourceState {
  src: Machine;
  devices: { name: string; index: number; packets: Uint8Array[]; config: Uint8Array }[];
}
let sourceStatePromise: Promise<SourceState> | undefined;
function sourceState(): Promise<SourceState> {
  sourceStatePromise ??= (async () => {
    const src = Machine.create(new Host(), definition('honest-src'));
    live.push(src);
    await src.start();
    await waitUntil('device activity', () => src.status().bytesDirtied.deviceDma > 0);
    await src.stop();
    const devices = src.devices.map((d, index) => {
      const stream = d.device.vfio.setMigDeviceState(MigState.STOP_COPY);
      assert.ok(stream instanceof SavingStream);
      const packets: Uint8Array[] = [];
      for (;;) {
        const buffer = new Uint8Array(MAX_DEVICE_PACKET_BYTES);
        const n = stream.readInto(buffer);
        if (n === 0) break;
        packets.push(buffer.subarray(0, n));
      }
      return { name: d.name, index, packets, config: src.deviceConfigState(d.name) };
    });
    return { src, devices };
  })();
  return sourceStatePromise;
}

// ---- the handshake ---------------------------------------------------------------------------------

describe('hostile source: the handshake', () => {
  test('an incompatible configuration is refused with ERR_MIGRATION_INCOMPATIBLE; nothing is loaded', async () => {
    const vm = createVm();
    // another RAM size
    const a = await begin({ vm, edit: (h) => (h.config.ram[0]!.sizeBytes = 32 * MiB) });
    const infoA = await failed(a, {
      code: MigrationErrorCode.INCOMPATIBLE,
      phase: 'handshake',
      message:
        /^handshake: VM dst\d+ cannot take VM hostile: RAM block 0: pc\.ram at 0, 33554432 bytes vs pc\.ram at 0, 67108864 bytes$/,
    });
    assert.equal(a.main.frames[0]?.type, FrameType.ERROR, 'no ACCEPT before the refusal');
    assert.equal(infoA.ram.transferredBytes, 0);
    assert.ok(!a.events.some((e) => e.type === 'device-state'), 'no device went to RESUMING');
    // the same VM takes the next attempt: another device type and fingerprint this time
    const b = await begin({
      vm,
      edit: (h) => {
        h.config.devices[1]!.type = 'nic';
        h.config.devices[2]!.fingerprint = '1234';
      },
    });
    await failed(b, {
      code: MigrationErrorCode.INCOMPATIBLE,
      phase: 'handshake',
      message: /: device accel0: type nic vs accel; device basic0: configuration 1234 vs [0-9a-f]+$/,
    });
    assert.ok(!b.events.some((e) => e.type === 'device-state'));
  });

  test('a real source learns ERR_MIGRATION_INCOMPATIBLE from the ERROR frame and keeps running', async () => {
    const dst = createVm();
    const src = Machine.create(new Host(), {
      ...definition('src-small'),
      ram: [{ name: 'pc.ram', sizeBytes: 32 * MiB }],
    });
    live.push(src);
    await src.start();
    const incoming = await IncomingMigration.listen(dst, { params: { maxQueuedBuffersBytes: CAP } });
    const out = OutgoingMigration.start(src, { uri: formatMigrationUri(incoming.address) });
    const [source, destination] = await within(Promise.all([out.done, incoming.done]), 5000, 'both sides');
    assert.equal(destination.status, 'failed');
    assert.equal(destination.error?.code, MigrationErrorCode.INCOMPATIBLE);
    assert.equal(source.status, 'failed');
    assert.equal(source.error?.code, MigrationErrorCode.INCOMPATIBLE, source.error?.message);
    assert.match(
      source.error!.message,
      /the destination failed in handshake: .*RAM block 0: pc\.ram at 0, 33554432 bytes vs/,
    );
    assert.equal(src.state, 'running');
    assert.equal(dst.state, 'created');
  });

  test('a connection whose first frame is not HELLO', async () => {
    const s = await accepted({ channels: 2 });
    const stray = await Wire.connect(s.incoming.address.port);
    stray.send(encodeU32Frame(FrameType.SYNC, 1));
    await failed(s, {
      code: MigrationErrorCode.PROTOCOL,
      phase: 'handshake',
      message: /a connection did not start with HELLO/,
    });
    await within(stray.closed, 2000, 'the stray connection to be closed');
  });

  test('a multifd HELLO of an unknown session', async () => {
    const s = await begin({ channels: 2 });
    await s.main.frame(FrameType.ACCEPT);
    const wire = await Wire.connect(s.incoming.address.port);
    wire.send(channelHello(1, 'aaaaaaaa-bbbb'));
    await failed(s, {
      code: MigrationErrorCode.PROTOCOL,
      phase: 'handshake',
      message: /a multifd channel of an unknown session aaaaaaaa-bbbb/,
    });
  });

  test('more multifd channels than announced, or one twice', async () => {
    const vm = createVm();
    const a = await accepted({ vm, channels: 2 });
    const third = await Wire.connect(a.incoming.address.port);
    third.send(channelHello(3));
    await failed(a, {
      code: MigrationErrorCode.PROTOCOL,
      phase: 'handshake',
      message: /multifd channel 3 is not expected \(2 announced\)/,
    });
    const b = await accepted({ vm, channels: 1 });
    const again = await Wire.connect(b.incoming.address.port);
    again.send(channelHello(1));
    await failed(b, {
      code: MigrationErrorCode.PROTOCOL,
      phase: 'handshake',
      message: /multifd channel 1 is not expected \(1 announced\)/,
    });
  });
});

// ---- floods -------------------------------------------------------------------------------------------

const MEG = new Uint8Array(MAX_DEVICE_PACKET_BYTES).fill(0xa5);
/** Packets of 1 MiB that fit the cap. */
const FIT = Math.floor(CAP / (MAX_DEVICE_PACKET_BYTES + QUEUE_ENTRY_OVERHEAD_BYTES));

describe('hostile source: out-of-order floods', () => {
  test('after SWITCHOVER, indexes 1..K (never 0) over all channels: ERR_MIGRATION_QUEUE_LIMIT at the cap', async () => {
    const s = await accepted({ channels: 2 });
    await switchover(s);
    for (let index = 1; index <= FIT + 8; index++) {
      s.channels[1 + (index % 2)]!.send(...deviceState(DEVICES.accel0, index, MEG));
    }
    const info = await failed(s, {
      code: MigrationErrorCode.QUEUE_LIMIT,
      phase: 'stop-copy',
      device: 'accel0',
      message: new RegExp(
        `^stop-copy: device accel0: queuing state buffer \\d+ would exceed the size max of ${CAP} bytes ` +
          `\\(\\d+ queued, every channel waiting\\)$`,
      ),
    });
    assert.equal(info.queuedBuffers!.peakBytes, FIT * (MAX_DEVICE_PACKET_BYTES + QUEUE_ENTRY_OVERHEAD_BYTES));
  });

  test('before SWITCHOVER (main channel silent): channels are paused at the cap; closing the main channel fails it', async () => {
    const s = await accepted({ channels: 2 });
    for (let index = 0; index <= FIT + 8; index++) {
      s.channels[1 + (index % 2)]!.send(...deviceState(DEVICES.accel0, index, MEG));
    }
    const full = FIT * (MAX_DEVICE_PACKET_BYTES + QUEUE_ENTRY_OVERHEAD_BYTES);
    await waitUntil('the queue to fill', () => s.incoming.query().queuedBuffers!.bytes === full);
    await sleep(300);
    const q = s.incoming.query();
    assert.equal(q.status, 'active', 'backpressure, not a failure: the switchover may still come');
    assert.equal(q.queuedBuffers!.bytes, full);
    assert.equal(q.queuedBuffers!.peakBytes, full);
    const read = q.channels.filter((c) => c.kind === 'multifd').reduce((n, c) => n + c.bytes, 0);
    assert.ok(read < (FIT + 9) * MEG.length, `the paused channels stopped reading (${read} bytes read)`);
    s.main.socket.end();
    await failed(s, {
      code: MigrationErrorCode.PROTOCOL,
      phase: 'precopy',
      message: /the source closed the main channel before the hand-off/,
      noErrorFrame: true,
    });
  });

  test('before SWITCHOVER, then silence: the stall timeout fails it', async () => {
    const s = await accepted({ channels: 2, incoming: { stallTimeoutMs: 400 } });
    for (let index = 0; index <= FIT + 8; index++) {
      s.channels[1 + (index % 2)]!.send(...deviceState(DEVICES.nic0, index, MEG));
    }
    const started = Date.now();
    await failed(s, {
      code: MigrationErrorCode.TIMEOUT,
      phase: 'precopy',
      message: /^precopy: the source sent nothing for \d+ ms$/,
    });
    assert.ok(Date.now() - started >= 400);
  });

  test('tiny packets: the per-entry overhead bounds them too', async () => {
    const s = await accepted({ channels: 1 });
    await switchover(s);
    const one = Uint8Array.of(1);
    const count = Math.ceil(CAP / (1 + QUEUE_ENTRY_OVERHEAD_BYTES)) + 100;
    const frames: Uint8Array[] = [];
    for (let index = 1; index <= count; index++) frames.push(...deviceState(DEVICES.basic0, index, one));
    s.channels[1]!.send(Buffer.concat(frames));
    const info = await failed(s, {
      code: MigrationErrorCode.QUEUE_LIMIT,
      phase: 'stop-copy',
      device: 'basic0',
      message: /queuing state buffer \d+ would exceed the size max/,
    });
    assert.equal(
      info.queuedBuffers!.peakBytes,
      Math.floor(CAP / (1 + QUEUE_ENTRY_OVERHEAD_BYTES)) * (1 + QUEUE_ENTRY_OVERHEAD_BYTES),
    );
  });
});

// ---- bad packets ------------------------------------------------------------------------------------------

describe('hostile source: bad device-state packets', () => {
  test('a duplicate index', async () => {
    const s = await accepted({ channels: 2 });
    await switchover(s);
    s.channels[1]!.send(...deviceState(DEVICES.basic0, 1, Uint8Array.of(1, 2, 3)));
    s.channels[2]!.send(...deviceState(DEVICES.basic0, 1, Uint8Array.of(4, 5, 6)));
    await failed(s, {
      code: MigrationErrorCode.PROTOCOL,
      phase: 'stop-copy',
      device: 'basic0',
      message: /^stop-copy: device basic0: state buffer 1: already filled$/,
    });
  });

  test('a duplicate of a packet already written', async () => {
    const { devices } = await sourceState();
    const s = await accepted({ channels: 1 });
    await switchover(s);
    const first = devices[DEVICES.nic0]!.packets[0]!;
    s.channels[1]!.send(...deviceState(DEVICES.nic0, 0, first), ...deviceState(DEVICES.nic0, 0, first));
    const info = await failed(s, {
      code: MigrationErrorCode.PROTOCOL,
      phase: 'stop-copy',
      device: 'nic0',
      message: /state buffer 0: already filled/,
    });
    assert.equal(info.devices[DEVICES.nic0]!.packets, 1, 'the first one was loaded');
  });

  test('bytes the device refuses: ERR_MIGRATION_DEVICE naming it', async () => {
    const s = await accepted({ channels: 1 });
    await switchover(s);
    s.channels[1]!.send(...deviceState(DEVICES.accel0, 0, new Uint8Array(100)));
    await failed(s, {
      code: MigrationErrorCode.DEVICE,
      phase: 'stop-copy',
      device: 'accel0',
      errno: 'EINVAL',
      message: /^stop-copy: device accel0: .*not a device state stream/,
    });
  });

  test('a huge index (0xfffffffe) costs its bytes only, then is refused', async () => {
    const s = await accepted({ channels: 2 });
    await switchover(s);
    const rss = process.memoryUsage().rss;
    s.channels[1]!.send(...deviceState(DEVICES.basic0, 0xfffffffe, new Uint8Array(100)));
    await waitUntil('the packet to be queued', () => s.incoming.query().queuedBuffers!.bytes > 0);
    assert.equal(s.incoming.query().queuedBuffers!.bytes, 100 + QUEUE_ENTRY_OVERHEAD_BYTES);
    assert.ok(process.memoryUsage().rss - rss < 64 * MiB, 'nothing proportional to the index');
    // the config packet (index 0) cannot come before a queued buffer
    s.channels[2]!.send(...deviceState(DEVICES.basic0, 0, new Uint8Array(10), DEVICE_STATE_CONFIG));
    await failed(s, {
      code: MigrationErrorCode.PROTOCOL,
      phase: 'stop-copy',
      device: 'basic0',
      message: /state buffer 0: config state before buffer 4294967294, which is queued/,
    });
  });

  test('an index past the config packet', async () => {
    const s = await accepted({ channels: 1 });
    await switchover(s);
    s.channels[1]!.send(
      ...deviceState(DEVICES.accel0, 2, new Uint8Array(10), DEVICE_STATE_CONFIG),
      ...deviceState(DEVICES.accel0, 3, new Uint8Array(10)),
    );
    await failed(s, {
      code: MigrationErrorCode.PROTOCOL,
      phase: 'stop-copy',
      device: 'accel0',
      message: /state buffer 3: past the config state, buffer 2/,
    });
  });

  test('a packet header announcing 2 MiB is refused before its body', async () => {
    const s = await accepted({ channels: 2 });
    await switchover(s);
    s.channels[2]!.send(encodeDeviceState(DEVICES.accel0, 0, 0, 2 * MiB));
    const info = await failed(s, {
      code: MigrationErrorCode.PROTOCOL,
      phase: 'stop-copy',
      message:
        /^stop-copy: multifd channel 2: frame DEVICE_STATE: body of 2097152 bytes exceeds the limit of 1048576$/,
    });
    assert.equal(info.devices[1]!.stopCopyBytes, 0, 'not even counted');
  });

  test('a stream truncated in the middle of a body: the error names the channel', async () => {
    const { devices } = await sourceState();
    const packet = devices[DEVICES.accel0]!.packets[0]!;
    assert.equal(packet.length, MiB);
    for (const index of [0, 1]) {
      const s = await accepted({ channels: 2 });
      await switchover(s);
      // 0 streams straight into the device (a partial state to discard); 1 is buffered
      s.channels[1]!.send(encodeDeviceState(DEVICES.accel0, index, 0, MiB), packet.subarray(0, 1000));
      s.channels[1]!.socket.end();
      await failed(s, {
        code: MigrationErrorCode.PROTOCOL,
        phase: 'stop-copy',
        message: /^stop-copy: multifd channel 1: stream truncated: 1047576 bytes of a frame body missing$/,
      });
    }
  });

  test('a multifd channel closed between frames, without CHANNEL_END', async () => {
    const s = await accepted({ channels: 2 });
    s.channels[2]!.socket.end();
    await failed(s, {
      code: MigrationErrorCode.PROTOCOL,
      phase: 'precopy',
      message: /multifd channel 2 closed before CHANNEL_END/,
    });
  });

  test('COMPLETE with a device’s state incomplete', async () => {
    const s = await accepted({ channels: 2 });
    await switchover(s);
    s.channels[1]!.send(...deviceState(DEVICES.basic0, 0, new Uint8Array(16)));
    for (const i of [1, 2]) s.channels[i]!.send(encodeU32Frame(FrameType.CHANNEL_END, i === 1 ? 2 : 1));
    s.main.send(encodeU32Frame(FrameType.COMPLETE, 0));
    await failed(s, {
      code: MigrationErrorCode.PROTOCOL,
      phase: 'stop-copy',
      device: 'nic0',
      message: /the stream ended with the device state incomplete \(next buffer 0\)/,
    });
  });

  test('CHANNEL_END with a frame count that does not match', async () => {
    const s = await accepted({ channels: 1 });
    s.channels[1]!.send(encodeU32Frame(FrameType.CHANNEL_END, 5));
    await failed(s, {
      code: MigrationErrorCode.PROTOCOL,
      phase: 'precopy',
      message: /multifd channel 1 ended after 1 frames, the source sent 5/,
    });
  });
});

describe('hostile source: RAM pages', () => {
  const cases: [string, (block: number) => Uint8Array, number, RegExp][] = [
    [
      'a page past the end of the block',
      () => encodeRamPages(0, [], [PC_RAM_PAGES]),
      0,
      /page 16384 is outside RAM block pc\.ram \(16384 pages\)/,
    ],
    [
      'a page of an unplugged discard block',
      () => encodeRamPages(1, [], [5]),
      1,
      /page 5 of RAM block mem0 is not plugged/,
    ],
    ['a RAM block that does not exist', () => encodeRamPages(9, [], [0]), 9, /RAM block 9 does not exist/],
  ];
  for (const [what, frame, block, message] of cases) {
    test(what, async () => {
      const s = await accepted({ channels: 2 });
      s.channels[2]!.send(frame(block));
      await failed(s, { code: MigrationErrorCode.PROTOCOL, phase: 'precopy', message });
    });
  }

  test('RAM pages on the main channel when multifd is on', async () => {
    const s = await accepted({ channels: 1 });
    s.main.send(encodeRamPages(0, [], [0]));
    await failed(s, {
      code: MigrationErrorCode.PROTOCOL,
      phase: 'precopy',
      message: /RAM pages on the main channel/,
    });
  });
});

// ---- an honest source with skewed channels ---------------------------------------------------------------

/**
 * The honest protocol over `channels` multifd channels, packet i of every device on channel
 * 1 + (i % channels), every config packet on the first channel of `skew`; the channels deliver
 * their device state one after the other in `skew` order, each given time to run into the cap.
 */
async function honest(channels: number, skew: number[]): Promise<void> {
  const cap = MiB + 4096; // the smallest cap: one 1 MiB buffer
  const { src, devices } = await sourceState();
  const total = devices.reduce((n, d) => n + d.packets.reduce((m, p) => m + p.length, 0), 0);
  assert.ok(total > 2 * cap, `the state (${total} bytes) is larger than the cap`);
  assert.ok(
    devices[DEVICES.accel0]!.packets.length > channels,
    'accel0 has packets on every channel, and more',
  );

  const dst = createVm(`honest-dst${channels}`);
  const s = await accepted({
    vm: dst,
    channels,
    incoming: { params: { maxQueuedBuffersBytes: cap }, autostart: false },
  });
  const frames = [0, ...Array.from({ length: channels }, () => 1)]; // frames written per channel: the HELLO
  const send = (channel: number, ...parts: Uint8Array[]) => {
    s.channels[channel]!.send(...parts);
    frames[channel]!++;
  };

  // RAM: every page of pc.ram (zero pages by number), packets round robin, then SYNC 1 everywhere
  const ram = new Uint8Array(64 * MiB);
  src.ram.read(0n, ram);
  const perChannel: Uint8Array[][] = Array.from({ length: channels + 1 }, () => []);
  for (let first = 0, k = 0; first < PC_RAM_PAGES; first += MAX_NORMAL_PAGES, k++) {
    const normal: number[] = [];
    const zero: number[] = [];
    const body: Uint8Array[] = [];
    for (let page = first; page < first + MAX_NORMAL_PAGES; page++) {
      const bytes = ram.subarray(page * RAM_PAGE_BYTES, (page + 1) * RAM_PAGE_BYTES);
      if (bytes.every((b) => b === 0)) zero.push(page);
      else {
        normal.push(page);
        body.push(bytes);
      }
    }
    const channel = 1 + (k % channels);
    perChannel[channel]!.push(encodeRamPages(0, normal, zero), ...body);
    frames[channel]!++;
  }
  for (let c = 1; c <= channels; c++) {
    s.channels[c]!.send(Buffer.concat(perChannel[c]!));
    send(c, encodeU32Frame(FrameType.SYNC, 1));
  }
  await switchover(s);

  // device state, channel after channel: the first ones run ahead with later packets
  for (const [k, c] of skew.entries()) {
    for (const d of devices) {
      d.packets.forEach((p, i) => 1 + (i % channels) === c && send(c, ...deviceState(d.index, i, p)));
      if (k === 0) send(c, ...deviceState(d.index, d.packets.length, d.config, DEVICE_STATE_CONFIG));
    }
    if (k === skew.length - 1) break;
    if (k === 0) {
      // it runs into the cap: one buffer queued, the next one held, the channel paused
      await waitUntil(
        `channel ${c} to fill the queue`,
        () => s.incoming.query().queuedBuffers!.bytes > MiB,
        5000,
      );
    }
    await sleep(100);
    assert.equal(s.incoming.status, 'device', `waiting for the channels after ${c}, not failed`);
    assert.ok(s.incoming.query().queuedBuffers!.peakBytes <= cap);
  }
  for (let c = 1; c <= channels; c++) s.channels[c]!.send(encodeU32Frame(FrameType.CHANNEL_END, frames[c]!));
  s.main.send(encodeU32Frame(FrameType.COMPLETE, 1));
  const end = await Promise.race([s.main.frame(FrameType.LOADED, 8000), s.incoming.done]);
  assert.ok('type' in end && end.type === FrameType.LOADED, JSON.stringify(s.incoming.query().error));
  s.main.send(encodeEmptyFrame(FrameType.HANDOFF));
  await s.main.frame(FrameType.RUNNING, 3000);

  const info = await within(s.incoming.done, 3000, 'the destination to complete');
  assert.equal(info.status, 'completed', info.error?.message);
  assert.equal(info.error, undefined);
  assert.ok(info.queuedBuffers!.peakBytes > MiB, 'buffers were queued out of order');
  assert.ok(info.queuedBuffers!.peakBytes <= cap);
  assert.equal(info.queuedBuffers!.bytes, 0);
  assert.deepEqual(
    info.devices.map((d) => [d.name, d.state, d.packets, d.stopCopyBytes]),
    devices.map((d) => [
      d.name,
      'STOP',
      d.packets.length + 1,
      d.packets.reduce((n, p) => n + p.length, 0) + d.config.length,
    ]),
  );
  assert.equal(dst.state, 'stopped', 'loaded, not started (autostart off)');
  for (const d of devices) {
    assert.equal(dst.device(d.name).device.digest(), src.device(d.name).device.digest(), `${d.name} state`);
  }
  assert.equal(dst.digest(), src.digest(), 'guest RAM and every device equal');
}

describe('an honest source with skewed channels', () => {
  test(
    '2 channels, the one with the odd packets ahead: paused, not failed; the state arrives exactly',
    { timeout: 20_000 },
    async () => {
      await honest(2, [2, 1]);
    },
  );

  test(
    '3 channels, the last ahead, the middle next: a held buffer that becomes next is taken',
    { timeout: 20_000 },
    async () => {
      // channel 3 queues packet 2 (the cap is full) and holds 5; channel 2 holds packet 1; channel 1
      // streams packet 0, after which the held packet 1 is next: nothing is released, yet it must go
      await honest(3, [3, 2, 1]);
    },
  );
});
