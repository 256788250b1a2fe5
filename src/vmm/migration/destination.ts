import { createServer, type Server, type Socket } from 'node:net';
import { ResumeStream } from '../../kernel/vfio/mig-data-stream.js';
import { SEGMENT_BYTES } from '../../kernel/mem/phys-memory.js';
import { internalError } from '../../uapi/error.js';
import { MigFeature, MigState, migStateName } from '../../uapi/migration.js';
import type { Machine } from '../machine/machine.js';
import type { RamBlock } from '../machine/ram-block.js';
import { FrameReader } from './channel.js';
import { DeviceStateLoader, QueueBudget } from './device-state-loader.js';
import {
  type Accept,
  configDifferences,
  describeVm,
  errorFrame,
  peerError,
  type MainHello,
  parseHello,
  PROTOCOL_MAGIC,
  PROTOCOL_VERSION,
} from './handshake.js';
import { asMigrationError, deviceFailure, MigrationError, MigrationErrorCode } from './migration-error.js';
import {
  type DeviceMigrationStats,
  emptyRamStats,
  type MigrationEvent,
  type MigrationInfo,
  type MigrationPhase,
  type MigrationStatus,
} from './migration-info.js';
import { type IncomingParameters, resolveIncomingParameters } from './migration-params.js';
import { parseMigrationUri } from './migration-uri.js';
import {
  encodeEmptyFrame,
  encodeJsonFrame,
  FRAME_HEADER_BYTES,
  type Frame,
  FULL_RAM_HEAD_BYTES,
  FrameType,
  MAX_DEVICE_PACKET_BYTES,
  RAM_PAGE_BYTES,
  type WireEvent,
} from './wire-format.js';

/** Full-size packet buffers kept for reuse after their bytes went to a device. */
const SPARE_BUFFERS = 16;

/** Each channel reads into one buffer of this size (see FrameReader). */
const READ_BUFFER_BYTES = 256 * 1024;

export interface IncomingOptions {
  /** Where to listen: `tcp:HOST:PORT`; default `tcp:127.0.0.1:0` (a port is picked). */
  uri?: string;
  params?: Partial<IncomingParameters>;
  /** Run the VM once handed off (default), or leave it stopped (QEMU's -S) for a later start. */
  autostart?: boolean;
  /** Aborting it cancels the incoming migration (before the hand-off). */
  signal?: AbortSignal;
  /**
   * Fault in all of guest RAM (QEMU's prealloc=on / -mem-prealloc) and the devices' memory before
   * listening, so the incoming stream does not pay first-touch page faults. Default false.
   */
  prealloc?: boolean;
  /** Longest silence of the source (no byte on any channel) before the destination gives up; default 30 s. */
  stallTimeoutMs?: number;
}

interface DestinationDevice {
  index: number;
  name: string;
  stream: ResumeStream | undefined;
  loader: DeviceStateLoader | undefined;
  precopy: boolean;
  /** Initial data announced complete (INIT_DATA_SENT). */
  initDone: boolean;
  stats: DeviceMigrationStats;
}

/** Where a channel's reader stands, for the barrier and the deadlock check. */
type ChannelWait = 'none' | 'barrier' | 'held';

interface InChannel {
  index: number;
  reader: FrameReader;
  ended: boolean;
  round: number;
  wait: ChannelWait;
  /** The buffer a 'held' channel holds. */
  held?: { device: DestinationDevice; index: number };
  /** The frame whose body is arriving, and where its bytes go. */
  body: BodySink | undefined;
}

type BodySink =
  | { kind: 'ram'; block: RamBlock; pages: Uint32Array; at: number }
  | { kind: 'precopy'; device: DestinationDevice }
  | { kind: 'direct'; device: DestinationDevice }
  | { kind: 'buffer'; device: DestinationDevice; index: number; flags: number; data: Uint8Array; at: number }
  | { kind: 'plug'; block: RamBlock; blocks: number; data: Uint8Array; at: number };

/**
 * The destination side of a live migration (QEMU started with -incoming). `listen(machine)` brings
 * the VM up as 'incoming' (RAM mapped, devices attached, vCPUs paused) and waits for a source:
 * a main channel whose HELLO carries a compatible configuration (else ERROR, nothing moves), then
 * the multifd channels it announced. Devices go to RESUMING; RAM pages are written straight into
 * guest RAM; precopy device data goes to the devices' resume streams in order; at switchover each
 * device's state packets go through a DeviceStateLoader (index order, queue bounded by
 * x-migration-max-queued-buffers-size, backpressure on the channels that run ahead). When all is
 * loaded, devices RESUMING → STOP and the destination says LOADED; on the source's HANDOFF the VM
 * runs (or stays stopped without autostart) and the destination says RUNNING.
 *
 * A failure before LOADED (bad input, a device refusing its state, a dropped channel, cancel)
 * tells the source (ERROR), and discards everything: the VM is 'created' again. After LOADED and
 * before HANDOFF a lost source leaves the loaded VM 'incoming' with the migration failed in
 * 'hand-off': the source may have committed, so the state is kept for the operator to run it.
 */
export class IncomingMigration {
  readonly machine: Machine;
  readonly params: IncomingParameters;
  readonly address: { host: string; port: number };
  readonly done: Promise<MigrationInfo>;
  readonly #server: Server;
  readonly #autostart: boolean;
  readonly #stallTimeoutMs: number;
  readonly #listeners = new Set<(event: MigrationEvent) => void>();
  readonly #budget: QueueBudget;
  readonly #devices: DestinationDevice[];
  readonly #sockets = new Set<Socket>();
  readonly #readers = new Set<FrameReader>();
  #startMs = performance.now();
  #setupDoneMs: number | undefined;
  #endMs: number | undefined;
  #status: MigrationStatus = 'none';
  #phase: MigrationPhase = 'handshake';
  #error: MigrationError | undefined;
  #hello: MainHello | undefined;
  #main: InChannel | undefined;
  readonly #channels = new Map<number, InChannel>();
  #ackPending = 0;
  #ackSent = false;
  #switchedOver = false;
  #mainComplete = false;
  #loadedSent = false;
  #handedOff = false;
  #ramStats;
  #vfioBytes = 0;
  #lastByteMs = performance.now();
  #bytesAtLastCheck = 0;
  readonly #spareBuffers: Uint8Array[] = [];
  #finish!: (status: MigrationStatus) => void;
  readonly #barrierWaiters = new Map<number, (() => void)[]>();
  #stallTimer: NodeJS.Timeout | undefined;
  #lastProgressMs = 0;

  private constructor(
    machine: Machine,
    server: Server,
    address: { host: string; port: number },
    options: IncomingOptions,
  ) {
    this.machine = machine;
    this.#server = server;
    this.address = address;
    this.params = resolveIncomingParameters(options.params);
    this.#autostart = options.autostart ?? true;
    this.#stallTimeoutMs = options.stallTimeoutMs ?? 30_000;
    this.#budget = new QueueBudget(this.params.maxQueuedBuffersBytes);
    this.#ramStats = emptyRamStats(machine.ram.totalBytes, RAM_PAGE_BYTES);
    this.#devices = machine.devices.map((d, index) => ({
      index,
      name: d.name,
      stream: undefined,
      loader: undefined,
      precopy: (d.device.vfio.getMigration().flags & BigInt(MigFeature.PRE_COPY)) !== 0n,
      initDone: false,
      stats: {
        name: d.name,
        type: d.type,
        state: migStateName(d.device.vfio.getMigDeviceState()),
        precopyBytes: 0,
        stopCopyBytes: 0,
        packets: 0,
        initialBytes: 0,
        dirtyBytes: 0,
      },
    }));
    this.done = new Promise<MigrationInfo>((resolve) => {
      this.#finish = (status) => {
        if (this.#endMs !== undefined) return;
        this.#endMs = performance.now();
        clearInterval(this.#stallTimer);
        this.#server.close();
        this.#setStatus(status);
        const info = this.query();
        this.#emit({ type: 'end', info });
        resolve(info);
      };
    });
    server.on('connection', (socket) => this.#accept(socket));
    this.#stallTimer = setInterval(() => this.#checkStall(), Math.min(1000, this.#stallTimeoutMs));
    this.#stallTimer.unref();
    const signal = options.signal;
    if (signal !== undefined) {
      const onAbort = () => this.cancel();
      signal.addEventListener('abort', onAbort, { once: true });
      void this.done.then(() => signal.removeEventListener('abort', onAbort));
    }
  }

  /**
   * Make `machine` (state 'created') the destination of a migration: bring it up as 'incoming' and
   * listen. A VM that cannot come up (pinning limits, …) rejects with that error and nothing listens.
   */
  static async listen(machine: Machine, options: IncomingOptions = {}): Promise<IncomingMigration> {
    resolveIncomingParameters(options.params);
    const { host, port } = parseMigrationUri(options.uri ?? 'tcp:127.0.0.1:0', { allowPortZero: true });
    await machine.startIncoming();
    if (options.prealloc) {
      for (const block of machine.ram.blocks) block.memory.prefault();
      // Device memory is the device's own (VRAM, on-chip tables): present, not faulted in on load.
      for (const d of machine.devices)
        for (const region of d.device.driver.image.regions) region.memory.prefault();
    }
    const server = createServer({ noDelay: true });
    try {
      await new Promise<void>((resolve, reject) => {
        server.once('error', reject);
        server.listen(port, host, () => {
          server.off('error', reject);
          resolve();
        });
      });
    } catch (err) {
      await machine.discardIncoming().catch(() => undefined);
      throw new MigrationError(
        MigrationErrorCode.CHANNEL,
        'connect',
        `cannot listen on ${host}:${port}: ${(err as Error).message}`,
        {
          cause: err,
        },
      );
    }
    const bound = server.address();
    const address = { host, port: typeof bound === 'object' && bound !== null ? bound.port : port };
    const incoming = new IncomingMigration(machine, server, address, options);
    // After listen()'s caller has resumed, so that listeners attached right away hear it.
    setImmediate(() => incoming.#setStatus('setup'));
    return incoming;
  }

  get status(): MigrationStatus {
    return this.#status;
  }

  onEvent(listener: (event: MigrationEvent) => void): () => void {
    this.#listeners.add(listener);
    return () => void this.#listeners.delete(listener);
  }

  /** Give up (before the hand-off): the source is told, everything loaded is discarded. */
  cancel(): void {
    if (this.#handedOff || this.#endMs !== undefined) return;
    void this.#fail(
      new MigrationError(MigrationErrorCode.CANCELLED, this.#phase, 'incoming migration cancelled'),
    );
  }

  query(): MigrationInfo {
    const now = this.#endMs ?? performance.now();
    return {
      role: 'destination',
      vm: this.machine.name,
      status: this.#status,
      totalTimeMs: Math.round(now - this.#startMs),
      setupTimeMs: Math.round((this.#setupDoneMs ?? now) - this.#startMs),
      downtimeMs: undefined,
      expectedDowntimeMs: undefined,
      cpuThrottlePercentage: 0,
      bandwidthBytesPerMs: 0,
      thresholdBytes: 0,
      switchoverAcked: this.#ackSent,
      ram: { ...this.#ramStats, remainingBytes: 0 },
      vfio: { transferredBytes: this.#vfioBytes },
      // Packets loaded: streamed, written whole, or drained from the queue (the loader counts them all).
      devices: this.#devices.map((d) => ({ ...d.stats, packets: d.loader?.loaded.packets ?? 0 })),
      channels: [this.#main, ...[...this.#channels.values()].sort((a, b) => a.index - b.index)]
        .filter((c): c is InChannel => c !== undefined)
        .map((c) => ({
          index: c.index,
          kind: c.index === 0 ? 'main' : 'multifd',
          bytes: c.reader.bytesRead,
        })),
      queuedBuffers: {
        bytes: this.#budget.queuedBytes,
        peakBytes: this.#budget.peakBytes,
        capBytes: this.#budget.capBytes,
      },
      error: this.#error?.info(),
    };
  }

  // ---- connections and the handshake -----------------------------------------------------------

  #accept(socket: Socket): void {
    if (this.#endMs !== undefined || this.#error !== undefined) {
      socket.destroy();
      return;
    }
    this.#sockets.add(socket);
    socket.on('close', () => this.#sockets.delete(socket));
    const channel: InChannel = {
      index: -1,
      reader: new FrameReader(socket, 'to-destination', {
        describe: 'an incoming connection',
        phase: () => this.#phase,
        readBufferBytes: READ_BUFFER_BYTES,
        placeBody: () => this.#placeRam(channel),
        frameStartReadBytes: FULL_RAM_HEAD_BYTES,
        handler: (event) => this.#onHello(channel, event),
        // Fail before the reader destroys the socket, so that the ERROR reaches the source even
        // when this is the main channel (or the connection that was to become it).
        onFail: (err) =>
          void this.#fail(
            asMigrationError(err, this.#phase, undefined, MigrationErrorCode.CHANNEL),
            channel.reader.socket,
          ),
      }),
      ended: false,
      round: 0,
      wait: 'none',
      body: undefined,
    };
    this.#readers.add(channel.reader);
    channel.reader.done.then(
      () => this.#channelClosed(channel),
      (err) => {
        // A failed reader leaves its socket open for #fail to answer on; once the migration is
        // over there is nothing to answer, so the socket goes now.
        if (this.#endMs !== undefined) socket.destroy();
        else void this.#fail(asMigrationError(err, this.#phase, undefined, MigrationErrorCode.CHANNEL));
      },
    );
  }

  #onHello(channel: InChannel, event: WireEvent): void {
    if (event.kind !== 'frame' || event.frame.type !== FrameType.HELLO) {
      throw this.#protocol('a connection did not start with HELLO', { phase: 'handshake' });
    }
    const hello = parseHello(event.frame.json);
    if (hello.kind === 'main') {
      if (this.#hello !== undefined) throw this.#protocol('a second main channel', { phase: 'handshake' });
      this.#acceptMain(channel, hello);
    } else {
      if (this.#hello === undefined || hello.session !== this.#hello.session) {
        throw this.#protocol(`a multifd channel of an unknown session ${hello.session}`, {
          phase: 'handshake',
        });
      }
      if (hello.channel > this.#hello.channels || this.#channels.has(hello.channel)) {
        throw this.#protocol(
          `multifd channel ${hello.channel} is not expected (${this.#hello.channels} announced)`,
          {
            phase: 'handshake',
          },
        );
      }
      channel.index = hello.channel;
      this.#channels.set(hello.channel, channel);
      channel.reader.handleWith((e) => this.#onData(channel, e), `multifd channel ${hello.channel}`);
    }
  }

  #acceptMain(channel: InChannel, hello: MainHello): void {
    // The main channel is the return path from here on, so that a refusal reaches the source as
    // an ERROR frame (ERR_MIGRATION_INCOMPATIBLE) rather than as a closed connection.
    channel.index = 0;
    this.#main = channel;
    const differences = configDifferences(hello.config, describeVm(this.machine));
    if (differences.length > 0) {
      throw new MigrationError(
        MigrationErrorCode.INCOMPATIBLE,
        'handshake',
        `VM ${this.machine.name} cannot take VM ${hello.vm}: ${differences.join('; ')}`,
      );
    }
    this.#hello = hello;
    this.#startMs = performance.now();
    this.#phase = 'setup';
    for (const d of this.#devices) {
      const vfio = this.machine.device(d.name).device.vfio;
      let fd;
      try {
        fd = vfio.setMigDeviceState(MigState.RESUMING);
      } catch (err) {
        throw asMigrationError(err, 'setup', d.name);
      } finally {
        this.#noteDeviceState(d);
      }
      if (!(fd instanceof ResumeStream))
        throw deviceFailure(this.#phase, d.name, 'RESUMING returned no data stream');
      d.stream = fd;
      d.loader = new DeviceStateLoader({
        device: d.name,
        budget: this.#budget,
        write: (data) => {
          this.#writeDevice(d, data);
          this.#recycle(data);
        },
        loadConfig: (data) => {
          try {
            this.machine.loadDeviceConfigState(d.name, data);
          } catch (err) {
            throw asMigrationError(err, 'stop-copy', d.name, MigrationErrorCode.PROTOCOL);
          }
        },
      });
    }
    this.#ackPending = hello.switchoverAck ? this.#devices.filter((d) => d.precopy).length : 0;
    const accept: Accept = {
      magic: PROTOCOL_MAGIC,
      version: PROTOCOL_VERSION,
      session: hello.session,
      vm: this.machine.name,
      switchoverAckPending: this.#ackPending,
    };
    this.#reply(encodeJsonFrame(FrameType.ACCEPT, accept));
    if (hello.switchoverAck && this.#ackPending === 0) this.#sendAck();
    this.#setupDoneMs = performance.now();
    this.#phase = 'precopy';
    this.#setStatus('active');
    channel.reader.handleWith((e) => this.#onData(channel, e), 'main channel');
  }

  // ---- frames ------------------------------------------------------------------------------------

  #onData(channel: InChannel, event: WireEvent): void | Promise<void> {
    if (event.kind === 'body') return this.#onBody(channel, event.bytes, event.last, event.placed ?? false);
    const frame = event.frame;
    if (channel.ended) throw this.#protocol(`multifd channel ${channel.index}: a frame after CHANNEL_END`);
    const main = channel.index === 0;
    const multifd = (this.#hello?.channels ?? 0) > 0;
    switch (frame.type) {
      case FrameType.RAM_PAGES:
        if (main === multifd) throw this.#protocol(`RAM pages on the ${main ? 'main' : 'multifd'} channel`);
        return this.#ramFrame(channel, frame);
      case FrameType.DEVICE_STATE:
        if (main === multifd)
          throw this.#protocol(`device state on the ${main ? 'main' : 'multifd'} channel`);
        return this.#deviceStateFrame(channel, frame);
      case FrameType.SYNC:
        if (main) throw this.#protocol('SYNC on the main channel');
        return this.#barrier(channel, frame.round);
      case FrameType.CHANNEL_END:
        if (main) throw this.#protocol('CHANNEL_END on the main channel');
        if (frame.frames !== channel.reader.decoder.framesDecoded - 1) {
          throw this.#protocol(
            `multifd channel ${channel.index} ended after ${channel.reader.decoder.framesDecoded - 1} frames, the source sent ${frame.frames}`,
          );
        }
        channel.ended = true;
        this.#checkComplete();
        this.#checkDeadlock();
        return;
      case FrameType.ERROR:
        throw peerError(frame.json, this.#phase, 'source', [MigrationErrorCode.CANCELLED]);
    }
    if (!main)
      throw this.#protocol(`frame type 0x${frame.type.toString(16)} on multifd channel ${channel.index}`);
    switch (frame.type) {
      case FrameType.RAM_PLUGGED: {
        if (this.#switchedOver) throw this.#protocol('RAM_PLUGGED after the switchover');
        const block = this.#block(frame.block);
        const discard = block.discard;
        if (discard === undefined || discard.blockCount !== frame.blocks) {
          throw this.#protocol(`RAM_PLUGGED of ${frame.blocks} blocks for RAM block ${block.name}`);
        }
        channel.body = {
          kind: 'plug',
          block,
          blocks: frame.blocks,
          data: new Uint8Array(frame.bodyBytes),
          at: 0,
        };
        return;
      }
      case FrameType.DEVICE_PRECOPY: {
        const d = this.#device(frame.device);
        if (this.#switchedOver) throw this.#protocol('precopy data after the switchover', { device: d.name });
        if (!d.precopy)
          throw this.#protocol('precopy data for a device without PRE_COPY', { device: d.name });
        d.stats.precopyBytes += frame.bodyBytes;
        this.#vfioBytes += frame.bodyBytes;
        channel.body = { kind: 'precopy', device: d };
        return;
      }
      case FrameType.INIT_DATA_SENT: {
        const d = this.#device(frame.device);
        if (!d.precopy || !this.#hello!.switchoverAck) {
          throw this.#protocol('INIT_DATA_SENT for a device that does not take part in switchover-ack', {
            device: d.name,
          });
        }
        if (d.initDone) throw this.#protocol('a second INIT_DATA_SENT', { device: d.name });
        d.initDone = true;
        if (--this.#ackPending === 0) this.#sendAck();
        return;
      }
      case FrameType.SWITCHOVER:
        if (this.#switchedOver) throw this.#protocol('a second SWITCHOVER');
        this.#switchedOver = true;
        this.#phase = 'stop-copy';
        this.#setStatus('device');
        for (const d of this.#devices) d.loader!.start();
        this.#checkDeadlock();
        return;
      case FrameType.COMPLETE:
        if (!this.#switchedOver) throw this.#protocol('COMPLETE before SWITCHOVER');
        if (this.#mainComplete) throw this.#protocol('a second COMPLETE');
        this.#mainComplete = true;
        this.#checkComplete();
        return;
      case FrameType.HANDOFF:
        if (!this.#loadedSent) throw this.#protocol('HANDOFF before the destination said LOADED');
        if (this.#handedOff) throw this.#protocol('a second HANDOFF');
        return this.#run();
      default:
        throw this.#protocol(`frame type 0x${frame.type.toString(16)} on the main channel`);
    }
  }

  #ramFrame(channel: InChannel, frame: Extract<Frame, { type: typeof FrameType.RAM_PAGES }>): void {
    if (this.#loadedSent) throw this.#protocol('RAM pages after the state was loaded');
    const block = this.#block(frame.block);
    const check = (page: number) => {
      if (page >= block.pages)
        throw this.#protocol(`page ${page} is outside RAM block ${block.name} (${block.pages} pages)`);
      if (
        block.discard !== undefined &&
        !block.discard.isRangePlugged(page * RAM_PAGE_BYTES, RAM_PAGE_BYTES)
      ) {
        throw this.#protocol(`page ${page} of RAM block ${block.name} is not plugged`);
      }
    };
    frame.normal.forEach(check);
    frame.zero.forEach(check);
    for (const page of frame.zero) block.memory.fill(0, page * RAM_PAGE_BYTES, RAM_PAGE_BYTES);
    const s = this.#ramStats;
    s.duplicatePages += frame.zero.length;
    s.normalPages += frame.normal.length;
    s.normalBytes += frame.bodyBytes;
    // The whole frame (header, meta, pages), as the source counts what it sends.
    const frameBytes =
      FRAME_HEADER_BYTES + 12 + 4 * (frame.normal.length + frame.zero.length) + frame.bodyBytes;
    s.transferredBytes += frameBytes;
    if (channel.index > 0) s.multifdBytes += frameBytes;
    if (this.#switchedOver) s.downtimeBytes += frame.bodyBytes;
    else s.precopyBytes += frame.bodyBytes;
    if (frame.bodyBytes > 0) channel.body = { kind: 'ram', block, pages: frame.normal, at: 0 };
    this.#progress();
  }

  #deviceStateFrame(
    channel: InChannel,
    frame: Extract<Frame, { type: typeof FrameType.DEVICE_STATE }>,
  ): void | Promise<void> {
    const d = this.#device(frame.device);
    const loader = d.loader!;
    d.stats.stopCopyBytes += frame.bodyBytes;
    this.#vfioBytes += frame.bodyBytes;
    if (loader.admit(frame.index, frame.flags, frame.bodyBytes)) {
      channel.body = { kind: 'direct', device: d };
      return;
    }
    // Buffered until the last byte (≤ 1 MiB: the decoder checked the length before this).
    const data =
      frame.bodyBytes === MAX_DEVICE_PACKET_BYTES
        ? (this.#spareBuffers.pop() ?? new Uint8Array(MAX_DEVICE_PACKET_BYTES))
        : new Uint8Array(frame.bodyBytes);
    channel.body = { kind: 'buffer', device: d, index: frame.index, flags: frame.flags, data, at: 0 };
  }

  #onBody(channel: InChannel, bytes: Uint8Array, last: boolean, placed: boolean): void | Promise<void> {
    const sink = channel.body;
    if (sink === undefined) throw this.#protocol('a frame body nobody expects');
    if (last) channel.body = undefined;
    if (placed) {
      // Read straight into the pages #placeRam named: nothing to copy.
      if (sink.kind !== 'ram') throw internalError(`placed bytes for a ${sink.kind} body`);
      sink.at += bytes.length;
      return;
    }
    switch (sink.kind) {
      case 'ram': {
        // One copy per run of consecutive pages (an idle guest's pages mostly come in runs).
        let offset = 0;
        while (offset < bytes.length) {
          const index = Math.floor(sink.at / RAM_PAGE_BYTES);
          const page = sink.pages[index]!;
          const inPage = sink.at % RAM_PAGE_BYTES;
          let run = 1;
          const maxRun = Math.ceil((inPage + bytes.length - offset) / RAM_PAGE_BYTES);
          while (run < maxRun && sink.pages[index + run] === page + run) run++;
          const n = Math.min(run * RAM_PAGE_BYTES - inPage, bytes.length - offset);
          sink.block.memory.write(page * RAM_PAGE_BYTES + inPage, bytes.subarray(offset, offset + n));
          offset += n;
          sink.at += n;
        }
        return;
      }
      case 'precopy':
        this.#writeDevice(sink.device, bytes);
        return;
      case 'direct':
        sink.device.loader!.writeDirect(bytes);
        if (last) {
          sink.device.loader!.endDirect();
          this.#checkComplete();
        }
        return;
      case 'plug':
        sink.data.set(bytes, sink.at);
        sink.at += bytes.length;
        if (last) return this.#applyPlugState(sink.block, sink.data);
        return;
      case 'buffer':
        sink.data.set(bytes, sink.at);
        sink.at += bytes.length;
        if (last) return this.#offer(channel, sink.device, sink.index, sink.flags, sink.data);
        return;
    }
  }

  /** Offer a whole buffer to its loader; when the queue is full, hold it (the channel waits). */
  #offer(
    channel: InChannel,
    d: DestinationDevice,
    index: number,
    flags: number,
    data: Uint8Array,
  ): void | Promise<void> {
    const result = d.loader!.offer(index, flags, data);
    if (result !== 'held') {
      this.#checkComplete();
      return;
    }
    channel.wait = 'held';
    channel.held = { device: d, index };
    this.#checkDeadlock();
    return new Promise<void>((resolve, reject) => {
      const retry = () => {
        if (this.#error !== undefined) {
          stop();
          reject(this.#error);
          return;
        }
        let again;
        try {
          again = d.loader!.offer(index, flags, data);
        } catch (err) {
          stop();
          reject(err);
          return;
        }
        if (again === 'held') return;
        stop();
        channel.wait = 'none';
        channel.held = undefined;
        resolve();
        this.#guarded(() => this.#checkComplete());
      };
      const unlisten = this.#budget.onRelease(retry);
      const stop = () => {
        unlisten();
        this.#heldRetries.delete(retry);
      };
      this.#heldRetries.add(retry);
    });
  }

  /** Retries of held buffers, woken when the migration fails so their channels stop waiting. */
  readonly #heldRetries = new Set<() => void>();

  /** Run a step outside a channel's handler: a failure fails the migration. */
  #guarded(step: () => void): void {
    try {
      step();
    } catch (err) {
      void this.#fail(asMigrationError(err, this.#phase, undefined, MigrationErrorCode.PROTOCOL));
    }
  }

  /**
   * The per-round barrier of multifd channels (QEMU's multifd sync): a channel that reaches
   * SYNC n waits until every channel has, so pages of round n + 1 never land before round n's.
   */
  #barrier(channel: InChannel, round: number): void | Promise<void> {
    if (round !== channel.round + 1) {
      throw this.#protocol(`multifd channel ${channel.index}: SYNC ${round} after SYNC ${channel.round}`);
    }
    channel.round = round;
    const expected = this.#hello!.channels;
    const arrived = [...this.#channels.values()].filter((c) => c.round >= round).length;
    if (arrived === expected) {
      const waiters = this.#barrierWaiters.get(round) ?? [];
      this.#barrierWaiters.delete(round);
      for (const wake of waiters) wake();
      return;
    }
    channel.wait = 'barrier';
    this.#checkDeadlock();
    return new Promise<void>((resolve) => {
      const list = this.#barrierWaiters.get(round) ?? [];
      list.push(() => {
        channel.wait = 'none';
        resolve();
      });
      this.#barrierWaiters.set(round, list);
    });
  }

  /**
   * A source that makes every channel wait (each holds a buffer the full queue cannot take, or
   * waits at a barrier another channel never reaches) after the switchover cannot be served: an
   * honest source never gets here (its packets leave in index order, so the next buffer of some
   * device is always at the head of a channel). Refuse it now rather than wait for the timeout.
   */
  #checkDeadlock(): void {
    if (this.#error !== undefined) return;
    const expected = this.#hello?.channels ?? 0;
    const open = [...this.#channels.values()].filter((c) => !c.ended);
    if (this.#channels.size < expected) return; // a channel still to connect may unblock the others
    if (!this.#switchedOver) return; // the main channel's SWITCHOVER may unblock the loaders
    if (open.length === 0 || open.some((c) => c.wait === 'none')) return;
    const held = open.find((c) => c.held !== undefined)?.held;
    const message =
      held !== undefined
        ? `queuing state buffer ${held.index} would exceed the size max of ${this.#budget.capBytes} bytes ` +
          `(${this.#budget.queuedBytes} queued, every channel waiting)`
        : 'every multifd channel waits at a sync point or behind a held buffer';
    void this.#fail(
      new MigrationError(
        held !== undefined ? MigrationErrorCode.QUEUE_LIMIT : MigrationErrorCode.PROTOCOL,
        this.#phase,
        message,
        held !== undefined ? { device: held.device.name } : {},
      ),
    );
  }

  #applyPlugState(block: RamBlock, bitmap: Uint8Array): Promise<void> {
    const discard = block.discard!;
    return (async () => {
      for (let b = 0; b < discard.blockCount; b++) {
        const want = (bitmap[b >>> 3]! & (1 << (b & 7))) !== 0;
        if (want === discard.isPlugged(b)) continue;
        if (want) await this.machine.plug(block.name, b, 1);
        else await this.machine.unplug(block.name, b, 1);
      }
    })();
  }

  /**
   * Where the next bytes of a RAM_PAGES body belong: the guest RAM of the current run of
   * consecutive pages (within one 1 GiB segment), so the socket reads them there.
   */
  #placeRam(channel: InChannel): Uint8Array | undefined {
    const sink = channel.body;
    if (sink?.kind !== 'ram') return undefined;
    const left = channel.reader.decoder.bodyBytesLeft;
    if (left === 0) return undefined;
    const index = Math.floor(sink.at / RAM_PAGE_BYTES);
    const page = sink.pages[index]!;
    const inPage = sink.at % RAM_PAGE_BYTES;
    const segmentPages = SEGMENT_BYTES / RAM_PAGE_BYTES;
    let run = 1;
    while (
      sink.pages[index + run] === page + run &&
      Math.floor((page + run) / segmentPages) === Math.floor(page / segmentPages)
    ) {
      run++;
    }
    const n = Math.min(run * RAM_PAGE_BYTES - inPage, left);
    return sink.block.memory.view(page * RAM_PAGE_BYTES + inPage, n);
  }

  /**
   * Keep a written full-size packet buffer for the next one (a fresh 1 MiB buffer is mapped and
   * faulted in anew). Only whole 1 MiB buffers of our own: what the queue counts is what they hold.
   */
  #recycle(data: Uint8Array): void {
    // A whole buffer of its own is a full packet buffer (a view of staging or a smaller packet is not).
    const whole =
      data.byteLength === MAX_DEVICE_PACKET_BYTES && data.buffer.byteLength === MAX_DEVICE_PACKET_BYTES;
    if (whole && this.#spareBuffers.length < SPARE_BUFFERS) this.#spareBuffers.push(data);
  }

  #writeDevice(d: DestinationDevice, data: Uint8Array): void {
    try {
      d.stream!.write(data);
    } catch (err) {
      throw asMigrationError(err, this.#phase, d.name);
    }
  }

  // ---- completion and hand-off -----------------------------------------------------------------

  #checkComplete(): void {
    if (this.#loadedSent || !this.#mainComplete || this.#endMs !== undefined) return;
    const expected = this.#hello!.channels;
    if (this.#channels.size < expected || [...this.#channels.values()].some((c) => !c.ended)) return;
    const incomplete = this.#devices.find((d) => !d.loader!.complete);
    if (incomplete !== undefined) {
      // Every channel ended: whatever is missing will never come.
      throw this.#protocol(
        `the stream ended with the device state incomplete (next buffer ${incomplete.loader!.nextIndex})`,
        { device: incomplete.name },
      );
    }
    this.#phase = 'load';
    for (const d of this.#devices) {
      const vfio = this.machine.device(d.name).device.vfio;
      try {
        vfio.setMigDeviceState(MigState.STOP);
      } catch (err) {
        throw deviceFailure(this.#phase, d.name, 'loading the device state failed (RESUMING → STOP)', err);
      } finally {
        this.#noteDeviceState(d);
      }
      d.stream = undefined;
    }
    this.#loadedSent = true;
    this.#phase = 'hand-off';
    this.#reply(encodeEmptyFrame(FrameType.LOADED));
  }

  async #run(): Promise<void> {
    this.#handedOff = true;
    try {
      await this.machine.finishIncoming({ autostart: this.#autostart });
    } catch (err) {
      // The VM is ours now: a failure to run it is a failed VM here, never a rollback to the source.
      this.#error = asMigrationError(err, 'hand-off');
      this.#finish('failed');
      // The source, committed, waits for RUNNING: closing tells it now (not at its peer timeout).
      for (const socket of this.#sockets) socket.end();
      setTimeout(() => {
        for (const socket of this.#sockets) socket.destroy();
      }, 200).unref();
      return;
    }
    for (const d of this.#devices) this.#noteDeviceState(d);
    this.#reply(encodeEmptyFrame(FrameType.RUNNING));
    this.#finish('completed');
    this.#main?.reader.socket.end();
  }

  #channelClosed(channel: InChannel): void {
    if (this.#endMs !== undefined) return;
    if (channel.index === 0 && !this.#handedOff) {
      void this.#fail(this.#protocol('the source closed the main channel before the hand-off'));
    } else if (channel.index > 0 && !channel.ended) {
      void this.#fail(this.#protocol(`multifd channel ${channel.index} closed before CHANNEL_END`));
    }
  }

  #checkStall(): void {
    if (this.#endMs !== undefined || this.#hello === undefined || this.#loadedSent) return;
    const bytes = [this.#main, ...this.#channels.values()].reduce(
      (n, c) => n + (c?.reader.bytesRead ?? 0),
      0,
    );
    if (bytes !== this.#bytesAtLastCheck) {
      this.#bytesAtLastCheck = bytes;
      this.#lastByteMs = performance.now();
    }
    const silent = performance.now() - this.#lastByteMs;
    if (silent >= this.#stallTimeoutMs) {
      void this.#fail(
        new MigrationError(
          MigrationErrorCode.TIMEOUT,
          this.#phase,
          `the source sent nothing for ${Math.round(silent)} ms`,
        ),
      );
    }
  }

  /**
   * Fail before or after LOADED (see the class comment); idempotent. The ERROR goes on the main
   * channel, or on `handshaking` (the connection that failed) when there is no main channel yet.
   */
  async #fail(error: MigrationError, handshaking?: Socket): Promise<void> {
    if (this.#endMs !== undefined || this.#error !== undefined) return;
    this.#error = error;
    // No channel may write guest RAM or a device once this has failed (the RAM is zeroed below).
    for (const reader of this.#readers) reader.fail(error);
    for (const wake of [...this.#heldRetries]) wake();
    try {
      if (!this.#handedOff) this.#reply(encodeJsonFrame(FrameType.ERROR, errorFrame(error)), handshaking);
    } catch {
      // the source is gone
    }
    for (const socket of this.#sockets) socket.end();
    setTimeout(() => {
      for (const socket of this.#sockets) socket.destroy();
    }, 200).unref();
    for (const d of this.#devices) d.loader?.discard();
    if (this.#handedOff) {
      this.#finish('failed');
      return;
    }
    if (this.#loadedSent) {
      // The source may have committed: keep the loaded VM ('incoming') for the operator.
      this.#error = new MigrationError(
        MigrationErrorCode.CHANNEL,
        'hand-off',
        `no hand-off from the source (${error.message}); the VM is loaded and stopped here: ` +
          'run it only if the source completed',
        { cause: error },
      );
      this.#finish('failed');
      return;
    }
    try {
      await this.machine.discardIncoming();
    } catch {
      // devices that fail to reset stay as they are; the VM is 'created' or 'failed'
    }
    for (const d of this.#devices) this.#noteDeviceState(d);
    this.#finish(error.code === MigrationErrorCode.CANCELLED ? 'cancelled' : 'failed');
  }

  // ---- helpers -----------------------------------------------------------------------------------

  #reply(frame: Uint8Array, handshaking?: Socket): void {
    const socket = this.#main?.reader.socket ?? handshaking;
    if (socket === undefined || socket.destroyed || !socket.writable) {
      throw new MigrationError(MigrationErrorCode.CHANNEL, this.#phase, 'the return path is closed');
    }
    socket.write(frame);
  }

  #sendAck(): void {
    if (this.#ackSent) return;
    this.#ackSent = true;
    this.#reply(encodeEmptyFrame(FrameType.SWITCHOVER_ACK));
  }

  #block(index: number): RamBlock {
    const block = this.machine.ram.blocks[index];
    if (block === undefined) throw this.#protocol(`RAM block ${index} does not exist`);
    return block;
  }

  #device(index: number): DestinationDevice {
    const d = this.#devices[index];
    if (d === undefined) throw this.#protocol(`device ${index} does not exist`);
    return d;
  }

  #protocol(message: string, where: { phase?: MigrationPhase; device?: string } = {}): MigrationError {
    return new MigrationError(
      MigrationErrorCode.PROTOCOL,
      where.phase ?? this.#phase,
      message,
      where.device === undefined ? {} : { device: where.device },
    );
  }

  #noteDeviceState(d: DestinationDevice): void {
    const state = migStateName(this.machine.device(d.name).device.vfio.getMigDeviceState());
    if (state === d.stats.state) return;
    d.stats.state = state;
    this.#emit({ type: 'device-state', device: d.name, state });
  }

  #setStatus(status: MigrationStatus): void {
    if (this.#status === status) return;
    this.#status = status;
    this.#emit({ type: 'status', status, info: this.query() });
  }

  #progress(): void {
    const now = performance.now();
    if (now - this.#lastProgressMs < 100) return;
    this.#lastProgressMs = now;
    this.#emit({ type: 'progress', info: this.query() });
  }

  #emit(event: MigrationEvent): void {
    for (const listener of this.#listeners) {
      try {
        listener(event);
      } catch {
        // a listener's failure is its own
      }
    }
  }
}
