import { randomUUID } from 'node:crypto';
import { connect, type Socket } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { SavingStream } from '../../kernel/vfio/mig-data-stream.js';
import { isErrno } from '../../uapi/error.js';
import { MigFeature, MigState, migStateName } from '../../uapi/migration.js';
import type { Machine, MachineDevice } from '../machine/machine.js';
import { anyDrained, FrameReader, type FrameSender, SendChannel } from './channel.js';
import { ChannelThreads, type ThreadSendChannel } from './thread-channels.js';
import { ConvergenceMeter } from './convergence.js';
import { DeviceDirtyTracker } from './dirty-tracking.js';
import {
  acceptSchema,
  describeVm,
  errorFrame,
  peerError,
  type MainHello,
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
import { type MigrationParameters, resolveMigrationParameters } from './migration-params.js';
import { parseMigrationUri } from './migration-uri.js';
import { BufferPool } from './buffer-pool.js';
import { type RamJob, RamSender } from './ram-sender.js';
import type { RamJobResult } from './channel-thread-protocol.js';
import {
  DEVICE_STATE_CONFIG,
  encodeDeviceFrame,
  encodeDeviceState,
  encodeEmptyFrame,
  encodeJsonFrame,
  encodeRamPlugged,
  encodeU32Frame,
  FrameType,
  MAX_DEVICE_PACKET_BYTES,
  RAM_PAGE_BYTES,
  type WireEvent,
} from './wire-format.js';

export interface MigrateOptions {
  /** Where the destination listens: `tcp:HOST:PORT`. */
  uri: string;
  params?: Partial<MigrationParameters>;
  /** Aborting it cancels the migration (as migrate_cancel). */
  signal?: AbortSignal;
  /** How long to wait for the destination at each step of the protocol; default 30 s. */
  peerTimeoutMs?: number;
}

/** One device's side of the migration. */
interface SourceDevice {
  index: number;
  machine: MachineDevice;
  flags: bigint;
  stream: SavingStream | undefined;
  stats: DeviceMigrationStats;
  /** Initial bytes were all sent and INIT_DATA_SENT went out. */
  initSent: boolean;
}

/**
 * A channel takes another frame while less than this is on its way to the kernel: enough to keep
 * a socket busy while the channel thread reports back, little enough to share work among channels.
 */
const PICK_BACKLOG_BYTES = 4 << 20;

/** Dirty pages per ram job (16 MiB): a message per 16 MiB costs nothing, and jobs stay small enough to spread over the channels. */
const RAM_JOB_PAGES = 4096;
/** Ram jobs a channel thread has at once: one being written while the next waits. */
const RAM_JOBS_PER_CHANNEL = 2;

/** Time a precopy step may take before the loop yields and re-evaluates (QEMU's MAX_WAIT). */
const STEP_MS = 50;
/** Longest wait, after a rollback's ERROR, for the destination to close before the channels are cut. */
const ROLLBACK_CLOSE_GRACE_MS = 1000;

/**
 * The source side of a live migration (QEMU's migration thread with VFIO devices and multifd).
 * `OutgoingMigration.start(machine, { uri })` connects, hands shakes, and runs setup, precopy
 * iterations and switchover in the background; `done` resolves with the final MigrationInfo
 * (status completed, failed or cancelled: it never rejects). Events (status changes, progress
 * about every 100 ms, passes, device states, throttle) go to `onEvent` listeners.
 *
 * Before the hand-off any failure (or cancel) rolls back: devices back to RUNNING (a device that
 * cannot get there is reset), dirty tracking off, throttle off, the VM running again if it was.
 * The hand-off is two-phase: the destination says LOADED (it holds the whole state), the source
 * commits (its VM becomes 'migrated', stopped for good) and sends HANDOFF; only then does the
 * destination run the VM. So the VM runs on at most one host, and its state is always on one.
 */
export class OutgoingMigration {
  readonly machine: Machine;
  readonly params: MigrationParameters;
  readonly done: Promise<MigrationInfo>;
  readonly #uri: { host: string; port: number };
  readonly #signal: AbortSignal | undefined;
  readonly #peerTimeoutMs: number;
  readonly #session = randomUUID();
  readonly #listeners = new Set<(event: MigrationEvent) => void>();
  readonly #startMs = performance.now();
  readonly #devices: SourceDevice[];
  #status: MigrationStatus = 'setup';
  #phase: MigrationPhase = 'connect';
  #endMs: number | undefined;
  #setupTimeMs = 0;
  #downtimeStartMs: number | undefined;
  #downtimeMs: number | undefined;
  #error: MigrationError | undefined;
  #cancelled = false;
  #main: SendChannel | undefined;
  #returnPath: FrameReader | undefined;
  #channels: ThreadSendChannel[] = [];
  #threads: ChannelThreads | undefined;
  #ram: RamSender;
  #tracker: DeviceDirtyTracker | undefined;
  #meter: ConvergenceMeter;
  #acked = false;
  #round = 0;
  #wasRunning = false;
  #committed = false;
  #ramStats;
  #vfioBytes = 0;
  /** Waiters for return-path messages, by frame type. */
  readonly #rpWaiters = new Map<number, () => void>();
  readonly #rpSeen = new Set<number>();
  #peerFailure: MigrationError | undefined;
  /**
   * Why the run ended (set first thing when a phase fails or is cancelled). #race gives up on a
   * phase at once, but the phase's own code goes on in the background until its next await: it
   * checks this there and stops, so it never changes devices, the VM or sockets after the rollback.
   */
  #ending: MigrationError | undefined;
  /** The switchover's VM stop while it runs: a rollback waits for it before it restarts the VM. */
  #stopping: Promise<void> | undefined;
  #abort: (err: MigrationError) => void = () => undefined;
  readonly #aborted: Promise<never>;
  #lastProgressMs = 0;
  #channelPick = 0;
  /** Ram jobs the channel threads are running, and the bytes they may send (pages × page size). */
  readonly #ramJobs = new Set<Promise<void>>();
  #ramJobBytes = 0;
  /** Reused 1 MiB device-state buffers (a fresh 1 MiB buffer per packet is mapped and faulted in anew). */
  readonly #buffers = new BufferPool(MAX_DEVICE_PACKET_BYTES, 16);

  private constructor(machine: Machine, options: MigrateOptions) {
    this.machine = machine;
    this.params = resolveMigrationParameters(options.params);
    this.#uri = parseMigrationUri(options.uri);
    this.#signal = options.signal;
    this.#peerTimeoutMs = options.peerTimeoutMs ?? 30_000;
    this.#ram = new RamSender(machine.ram);
    this.#meter = new ConvergenceMeter(this.params, this.#startMs);
    this.#ramStats = emptyRamStats(machine.ram.totalBytes, RAM_PAGE_BYTES);
    this.#devices = machine.devices.map((d, index) => ({
      index,
      machine: d,
      flags: 0n,
      stream: undefined,
      initSent: false,
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
    this.#aborted = new Promise<never>((_resolve, reject) => {
      this.#abort = reject;
    });
    this.#aborted.catch(() => undefined);
    this.done = this.#run();
  }

  /**
   * Start migrating a running VM. Bad parameters or URI throw ERR_INVALID_ARGUMENT here; a VM
   * that is not running throws ERR_MIGRATION_VM_STATE; everything later ends up in `done`.
   */
  static start(machine: Machine, options: MigrateOptions): OutgoingMigration {
    if (machine.state !== 'running') {
      throw new MigrationError(
        MigrationErrorCode.VM_STATE,
        'setup',
        `VM ${machine.name} is ${machine.state}; only a running VM migrates`,
      );
    }
    return new OutgoingMigration(machine, options);
  }

  get status(): MigrationStatus {
    return this.#status;
  }

  /** Hear every event; returns the function that stops it. */
  onEvent(listener: (event: MigrationEvent) => void): () => void {
    this.#listeners.add(listener);
    return () => void this.#listeners.delete(listener);
  }

  /** Cancel (migrate_cancel): effective until the hand-off, ignored after. */
  cancel(): void {
    if (this.#committed || this.#cancelled || this.#endMs !== undefined) return;
    this.#cancelled = true;
    this.#setStatus('cancelling');
    this.#abort(new MigrationError(MigrationErrorCode.CANCELLED, this.#phase, 'migration cancelled'));
  }

  /** query-migrate. */
  query(): MigrationInfo {
    const now = this.#endMs ?? performance.now();
    const m = this.#meter;
    return {
      role: 'source',
      vm: this.machine.name,
      status: this.#status,
      totalTimeMs: Math.round(now - this.#startMs),
      setupTimeMs: Math.round(this.#setupTimeMs),
      downtimeMs: this.#downtimeMs === undefined ? undefined : Math.round(this.#downtimeMs),
      expectedDowntimeMs: this.#status === 'active' ? m.expectedDowntimeMs : undefined,
      cpuThrottlePercentage: m.throttlePercent,
      bandwidthBytesPerMs: Math.round(m.bandwidthBytesPerMs),
      thresholdBytes: Math.round(m.thresholdBytes),
      switchoverAcked: this.#acked,
      ram: {
        ...this.#ramStats,
        remainingBytes: this.#ram.dirtyBytes,
        dirtyPagesRate: m.dirtyPagesRate,
        mbps: Math.round(m.mbps * 100) / 100,
        pagesPerSecond: m.pagesPerSecond,
      },
      vfio: { transferredBytes: this.#vfioBytes },
      devices: this.#devices.map((d) => ({ ...d.stats })),
      channels: [this.#main, ...this.#channels]
        .filter((c): c is SendChannel => c !== undefined)
        .map((c) => ({ index: c.index, kind: c.kind, bytes: c.bytesSent })),
      queuedBuffers: undefined,
      error: this.#error?.info(),
    };
  }

  // ---- the run ---------------------------------------------------------------------------------

  async #run(): Promise<MigrationInfo> {
    const onAbort = () => this.cancel();
    this.#signal?.addEventListener('abort', onAbort);
    if (this.#signal?.aborted) this.cancel();
    // After start() has returned, so that listeners attached right away hear it.
    await Promise.resolve();
    this.#emit({ type: 'status', status: 'setup', info: this.query() });
    try {
      await this.#race(this.#connect());
      await this.#race(this.#setup());
      await this.#race(this.#precopy());
      await this.#race(this.#switchover());
      await this.#handOff();
      this.#finish('completed');
    } catch (err) {
      const error = asMigrationError(err, this.#phase, undefined, MigrationErrorCode.DEVICE);
      this.#ending = error;
      for (const wake of this.#rpWaiters.values()) wake();
      if (this.#committed) {
        // After the commit nothing rolls back: the destination holds the VM (or will, on HANDOFF).
        this.#error = error;
        this.#cleanupAfterCommit();
        this.#finish('failed');
      } else {
        this.#error = error;
        await this.#rollback(error);
        this.#finish(this.#cancelled ? 'cancelled' : 'failed');
      }
    } finally {
      this.#signal?.removeEventListener('abort', onAbort);
    }
    return this.query();
  }

  /** Run a phase, but give up at once on cancel or a failure the destination reports. */
  #race<T>(work: Promise<T>): Promise<T> {
    work.catch(() => undefined);
    return Promise.race([work, this.#aborted]);
  }

  async #connect(): Promise<void> {
    this.#phase = 'connect';
    const { host, port } = this.#uri;
    // The multifd sockets live in channel threads, which do their writes (QEMU's send threads).
    // They start now, so that they boot while the main channel connects and hands shakes.
    const threads = this.params.multifd ? new ChannelThreads(this.params.multifdChannels) : undefined;
    this.#threads = threads;
    const socket = await openSocket(host, port, this.#peerTimeoutMs);
    if (this.#ending !== undefined) {
      socket.destroy();
      throw this.#ending;
    }
    this.#main = new SendChannel(0, socket, () => this.#phase);
    this.#returnPath = new FrameReader(socket, 'to-source', {
      describe: 'return path',
      phase: () => this.#phase,
      handler: (event) => this.#onReturnPath(event),
    });
    this.#returnPath.done.then(
      () =>
        this.#peerGone(
          new MigrationError(
            MigrationErrorCode.CHANNEL,
            this.#phase,
            'the destination closed the return path',
          ),
        ),
      (err) => this.#peerGone(asMigrationError(err, this.#phase, undefined, MigrationErrorCode.CHANNEL)),
    );
    this.#phase = 'handshake';
    const hello: MainHello = {
      magic: PROTOCOL_MAGIC,
      version: PROTOCOL_VERSION,
      session: this.#session,
      kind: 'main',
      vm: this.machine.name,
      channels: this.params.multifd ? this.params.multifdChannels : 0,
      switchoverAck: this.params.switchoverAck,
      config: describeVm(this.machine),
    };
    this.#main.send(encodeJsonFrame(FrameType.HELLO, hello));
    await this.#waitReturn(FrameType.ACCEPT, 'the handshake');
    if (threads !== undefined) {
      const opened = await Promise.allSettled(
        Array.from({ length: this.params.multifdChannels }, (_, i) =>
          threads.open(i + 1, host, port, this.#peerTimeoutMs, () => this.#phase),
        ),
      );
      this.#channels = opened.flatMap((r) => (r.status === 'fulfilled' ? [r.value] : []));
      const refused = opened.find((r): r is PromiseRejectedResult => r.status === 'rejected');
      if (refused !== undefined) throw refused.reason;
      if (this.#ending !== undefined) throw this.#ending;
      threads.shareRam(this.#ram.sharedBlocks);
      this.#channels.forEach((channel, i) => {
        channel.send(
          encodeJsonFrame(FrameType.HELLO, {
            magic: PROTOCOL_MAGIC,
            version: PROTOCOL_VERSION,
            session: this.#session,
            kind: 'multifd',
            channel: i + 1,
          }),
        );
      });
    }
  }

  async #setup(): Promise<void> {
    this.#phase = 'setup';
    this.#wasRunning = true;
    for (const d of this.#devices) {
      d.flags = this.#device(d).getMigration().flags;
      if ((d.flags & BigInt(MigFeature.PRE_COPY)) !== 0n) {
        const fd = this.#setDeviceState(d, MigState.PRE_COPY);
        if (!(fd instanceof SavingStream))
          throw deviceFailure(this.#phase, d.machine.name, 'PRE_COPY returned no data stream');
        d.stream = fd;
        this.#refreshPrecopyInfo(d);
      }
    }
    this.machine.ram.startDirtyLog();
    this.#tracker = DeviceDirtyTracker.start(this.machine);
    this.#ram.markAll();
    for (const [index, block] of this.machine.ram.blocks.entries()) {
      const discard = block.discard;
      if (discard === undefined) continue;
      const bitmap = new Uint8Array(Math.ceil(discard.blockCount / 8));
      for (const b of discard.pluggedBlocks()) bitmap[b >>> 3]! |= 1 << (b & 7);
      this.#main!.send(encodeRamPlugged(index, discard.blockCount), [bitmap]);
    }
    this.#setupTimeMs = performance.now() - this.#startMs;
    this.#setStatus('active');
  }

  async #precopy(): Promise<void> {
    this.#phase = 'precopy';
    for (;;) {
      const deadline = performance.now() + STEP_MS;
      // Devices get at most half of a step, so RAM is never starved by device data.
      await this.#sendDevicePrecopy(deadline - STEP_MS / 2);
      const passEnded = await this.#sendRam(deadline, true);
      this.#checkEnding();
      this.#progress();
      if (!passEnded) continue;
      this.#round++;
      for (const c of this.#channels) c.send(encodeU32Frame(FrameType.SYNC, this.#round));
      const dirtyPages = this.#syncDirty();
      const throttle = this.#meter.synced(performance.now(), dirtyPages, RAM_PAGE_BYTES);
      if (throttle !== undefined) {
        this.machine.vcpus?.setThrottle(throttle);
        this.#emit({ type: 'throttle', percent: throttle });
      }
      this.#emit({
        type: 'pass',
        iteration: this.#ramStats.dirtySyncCount,
        dirtyBytes: dirtyPages * RAM_PAGE_BYTES,
      });
      const pending = this.#ram.dirtyBytes + this.#devicePendingExact();
      if (pending <= this.#meter.thresholdBytes && this.#canSwitchover()) return;
      // Nothing left to send this round: wait for the devices and vCPUs to dirty more.
      if (this.#ram.dirtyPages === 0 && !this.#devicesHavePrecopyData()) await sleep(5);
      this.#ram.rewind();
    }
  }

  async #switchover(): Promise<void> {
    this.#phase = 'switchover';
    this.#setStatus('device');
    this.#downtimeStartMs = performance.now();
    this.#stopping = this.machine.stop();
    await this.#stopping;
    this.#checkEnding();
    // Every device to its P2P state first, then all to STOP_COPY (QEMU's prepare + main handlers).
    for (const d of this.#devices) {
      if ((d.flags & BigInt(MigFeature.P2P)) === 0n) continue;
      const state = this.#device(d).getMigDeviceState();
      this.#setDeviceState(d, state === MigState.PRE_COPY ? MigState.PRE_COPY_P2P : MigState.RUNNING_P2P);
    }
    for (const d of this.#devices) {
      const fd = this.#setDeviceState(d, MigState.STOP_COPY);
      if (fd instanceof SavingStream) d.stream = fd;
      if (d.stream === undefined)
        throw deviceFailure(this.#phase, d.machine.name, 'STOP_COPY returned no data stream');
    }
    this.#main!.send(encodeEmptyFrame(FrameType.SWITCHOVER));
    this.#phase = 'stop-copy';
    const dataChannels = this.#dataChannels();
    // The last round of RAM goes first on every channel, closed by a SYNC, so no channel waits at
    // the destination's barrier behind device state that waits for another channel.
    this.#syncDirty();
    this.#ram.rewind();
    await this.#sendRam(Infinity, false);
    this.#round++;
    for (const c of this.#channels) c.send(encodeU32Frame(FrameType.SYNC, this.#round));
    await Promise.all(this.#devices.map((d) => this.#sendDeviceState(d, dataChannels)));
    for (const c of this.#channels) c.send(encodeU32Frame(FrameType.CHANNEL_END, c.framesSent));
    this.#main!.send(encodeU32Frame(FrameType.COMPLETE, this.#round));
    await Promise.all([this.#main!, ...this.#channels].map((c) => c.flushed()));
    this.#phase = 'hand-off';
    this.#progress(true);
    await this.#waitReturn(FrameType.LOADED, 'the destination to load the state');
  }

  /** Commit: the VM is the destination's from here on. */
  async #handOff(): Promise<void> {
    this.#committed = true;
    this.machine.markMigrated();
    this.#main!.send(encodeEmptyFrame(FrameType.HANDOFF));
    await this.#waitReturn(FrameType.RUNNING, 'the destination to run the VM');
    this.#downtimeMs = performance.now() - this.#downtimeStartMs!;
    this.#cleanupAfterCommit();
  }

  // ---- RAM and device data ---------------------------------------------------------------------

  #dataChannels(): FrameSender[] {
    return this.#channels.length > 0 ? this.#channels : [this.#main!];
  }

  /** A channel with room (round robin among those that have it); fails if a channel has failed. */
  async #pickChannel<C extends FrameSender>(channels: C[], hasRoom: (c: C) => boolean): Promise<C> {
    for (;;) {
      for (const c of channels) if (!c.writable) throw c.failure('send');
      for (let i = 0; i < channels.length; i++) {
        const c = channels[(this.#channelPick + i) % channels.length]!;
        if (hasRoom(c)) {
          this.#channelPick = (this.#channelPick + i + 1) % channels.length;
          return c;
        }
      }
      await anyDrained(channels);
    }
  }

  /** Send dirty pages until the pass ends (true) or the deadline passes (false). */
  #sendRam(deadline: number, live: boolean): Promise<boolean> {
    return this.#channels.length > 0
      ? this.#sendRamJobs(this.#channels, deadline, live)
      : this.#sendRamPackets(this.#main!, deadline, live);
  }

  /**
   * Multifd: the pass goes out as ram jobs that the channel threads turn into packets. A pass ends
   * when its last job has been sent; at a deadline the running jobs go on in the background.
   */
  async #sendRamJobs(channels: ThreadSendChannel[], deadline: number, live: boolean): Promise<boolean> {
    for (;;) {
      const budget = live ? await this.#bandwidthLeft(deadline) : Infinity;
      if (budget === false) return false;
      const maxPages = Math.min(RAM_JOB_PAGES, Math.ceil(budget / RAM_PAGE_BYTES));
      const channel = await this.#pickChannel(channels, (c) => c.ramJobs < RAM_JOBS_PER_CHANNEL);
      const job = this.#ram.nextJob(maxPages);
      if (job === undefined) {
        await Promise.all(this.#ramJobs);
        return true;
      }
      this.#runRamJob(channel, job, live);
    }
  }

  #runRamJob(channel: ThreadSendChannel, job: RamJob, live: boolean): void {
    const bytes = job.pages * RAM_PAGE_BYTES;
    this.#ramJobBytes += bytes;
    const running: Promise<void> = channel
      .sendRam(job)
      .then((sent) => this.#countRam(sent, true, live))
      .finally(() => {
        this.#ramJobBytes -= bytes;
        this.#ramJobs.delete(running);
      });
    // Awaited at the end of the pass; a failed job has failed its channel, which the next pick sees.
    running.catch(() => undefined);
    this.#ramJobs.add(running);
  }

  /** Without multifd: packets built here, on the main channel. */
  async #sendRamPackets(channel: FrameSender, deadline: number, live: boolean): Promise<boolean> {
    for (;;) {
      if (live && (await this.#bandwidthLeft(deadline)) === false) return false;
      await channel.drained(PICK_BACKLOG_BYTES);
      const packet = this.#ram.nextPacket();
      if (packet === undefined) return true;
      channel.send(packet.header, packet.body);
      this.#countRam({ ...packet, frames: 1 }, false, live);
    }
  }

  /**
   * Wait until max-bandwidth allows more bytes in this slot; resolves with how many (Infinity
   * without a limit), or false once `deadline` has passed. Running ram jobs count against it as
   * if every page had data.
   */
  async #bandwidthLeft(deadline: number): Promise<number | false> {
    for (;;) {
      const now = performance.now();
      if (now >= deadline) return false;
      const left = this.#meter.budgetLeft(now) - this.#ramJobBytes;
      if (left > 0) return left;
      await sleep(Math.max(1, this.#meter.slotEndMs() - now));
    }
  }

  #countRam(sent: RamJobResult, multifd: boolean, live: boolean): void {
    const s = this.#ramStats;
    s.transferredBytes += sent.bytes;
    s.normalPages += sent.normalPages;
    s.normalBytes += sent.normalPages * RAM_PAGE_BYTES;
    s.duplicatePages += sent.zeroPages;
    if (multifd) s.multifdBytes += sent.bytes;
    if (live) s.precopyBytes += sent.bytes;
    else s.downtimeBytes += sent.bytes;
    this.#meter.sent(sent.bytes, sent.normalPages + sent.zeroPages);
  }

  /** Read what precopy devices have now (≤ 1 MiB per read) and send it on the main channel. */
  async #sendDevicePrecopy(deadline: number): Promise<void> {
    for (const d of this.#devices) {
      if (d.stream === undefined) continue;
      while (performance.now() < deadline && this.#meter.budgetLeft(performance.now()) > 0) {
        await this.#main!.drained();
        const read = await this.#readDevice(d, 'precopy');
        if (read === undefined) break; // nothing now (ENOMSG, or the end)
        const { buffer, n } = read;
        this.#main!.send(
          encodeDeviceFrame(FrameType.DEVICE_PRECOPY, d.index, n),
          [buffer.subarray(0, n)],
          () => this.#buffers.give(buffer),
        );
        d.stats.precopyBytes += n;
        this.#vfioBytes += n;
        this.#meter.sent(n);
        this.#refreshPrecopyInfo(d);
        // INIT_DATA_SENT belongs to the switchover-ack protocol: a destination without it refuses it.
        if (this.params.switchoverAck && !d.initSent && d.stats.initialBytes === 0) {
          d.initSent = true;
          this.#main!.send(encodeDeviceFrame(FrameType.INIT_DATA_SENT, d.index));
        }
      }
    }
  }

  /**
   * read(2) of ≤ 1 MiB of a device's data stream into a pooled buffer: undefined when there is
   * nothing (ENOMSG in precopy, 0 at the end of stop-copy), the buffer back in the pool then.
   */
  async #readDevice(
    d: SourceDevice,
    what: 'precopy' | 'stop-copy',
  ): Promise<{ buffer: Uint8Array; n: number } | undefined> {
    const buffer = await this.#buffers.take();
    let n: number;
    try {
      n = d.stream!.readInto(buffer);
    } catch (err) {
      this.#buffers.give(buffer);
      if (what === 'precopy' && isErrno(err, 'ENOMSG')) return undefined;
      throw deviceFailure(this.#phase, d.machine.name, `${what} read failed`, err);
    }
    if (n === 0) {
      this.#buffers.give(buffer);
      return undefined;
    }
    return { buffer, n };
  }

  /** A device's whole stop-copy state, then its config state, as index-numbered packets over the channels. */
  async #sendDeviceState(d: SourceDevice, channels: FrameSender[]): Promise<void> {
    let index = 0;
    for (;;) {
      const channel = await this.#pickChannel(channels, hasSocketRoom);
      const read = await this.#readDevice(d, 'stop-copy');
      if (read === undefined) break; // the end of the device's state
      const { buffer, n } = read;
      channel.send(encodeDeviceState(d.index, index++, 0, n), [buffer.subarray(0, n)], () =>
        this.#buffers.give(buffer),
      );
      this.#countDeviceState(d, n);
    }
    const config = this.machine.deviceConfigState(d.machine.name);
    const channel = await this.#pickChannel(channels, hasSocketRoom);
    channel.send(encodeDeviceState(d.index, index, DEVICE_STATE_CONFIG, config.length), [config]);
    this.#countDeviceState(d, config.length);
  }

  #countDeviceState(d: SourceDevice, n: number): void {
    d.stats.stopCopyBytes += n;
    d.stats.packets++;
    this.#vfioBytes += n;
    this.#meter.sent(n);
  }

  #syncDirty(): number {
    this.#ram.syncDirtyLog();
    this.#tracker?.sync((block, first, count) => this.#ram.markPages(block, first, count));
    this.#ramStats.dirtySyncCount++;
    return this.#ram.dirtyPages;
  }

  #refreshPrecopyInfo(d: SourceDevice): void {
    if (d.stream === undefined) return;
    try {
      const info = d.stream.precopyInfo();
      d.stats.initialBytes = Number(info.initialBytes);
      d.stats.dirtyBytes = Number(info.dirtyBytes);
    } catch (err) {
      throw deviceFailure(this.#phase, d.machine.name, 'VFIO_MIG_GET_PRECOPY_INFO failed', err);
    }
  }

  #devicesHavePrecopyData(): boolean {
    return this.#devices.some((d) => d.stream !== undefined && d.stats.initialBytes + d.stats.dirtyBytes > 0);
  }

  /** Bytes the devices still need to send (MIG_DATA_SIZE: stop_copy_length, which includes precopy data). */
  #devicePendingExact(): number {
    let total = 0;
    for (const d of this.#devices) {
      try {
        total += Number(this.#device(d).getMigDataSize());
      } catch {
        total += 100 * 2 ** 30; // QEMU: an unknown size must never meet the downtime limit by accident
      }
    }
    return total;
  }

  /** Stop phase work that is still running after the run ended (see #ending). */
  #checkEnding(): void {
    if (this.#ending !== undefined) throw this.#ending;
  }

  #canSwitchover(): boolean {
    return !this.params.switchoverAck || this.#acked;
  }

  // ---- return path -----------------------------------------------------------------------------

  #onReturnPath(event: WireEvent): void {
    if (event.kind !== 'frame') return;
    const frame = event.frame;
    switch (frame.type) {
      case FrameType.ACCEPT: {
        const accept = acceptSchema.safeParse(frame.json);
        if (!accept.success || accept.data.session !== this.#session) {
          throw new MigrationError(
            MigrationErrorCode.PROTOCOL,
            'handshake',
            'the destination sent a bad ACCEPT',
          );
        }
        break;
      }
      case FrameType.SWITCHOVER_ACK:
        this.#acked = true;
        break;
      case FrameType.ERROR:
        this.#peerGone(peerError(frame.json, this.#phase, 'destination', [MigrationErrorCode.INCOMPATIBLE]));
        return;
    }
    this.#rpSeen.add(frame.type);
    this.#rpWaiters.get(frame.type)?.();
  }

  #peerGone(err: MigrationError): void {
    if (this.#peerFailure !== undefined) return;
    this.#peerFailure = err;
    for (const wake of this.#rpWaiters.values()) wake();
    if (!this.#committed) this.#abort(err);
  }

  async #waitReturn(type: number, what: string): Promise<void> {
    if (this.#rpSeen.has(type)) return;
    if (this.#peerFailure) throw this.#peerFailure;
    if (this.#ending) throw this.#ending;
    let timer: NodeJS.Timeout | undefined;
    try {
      await new Promise<void>((resolve, reject) => {
        this.#rpWaiters.set(type, resolve);
        timer = setTimeout(
          () =>
            reject(
              new MigrationError(
                MigrationErrorCode.TIMEOUT,
                this.#phase,
                `no answer from the destination in ${this.#peerTimeoutMs} ms while waiting for ${what}`,
              ),
            ),
          this.#peerTimeoutMs,
        );
      });
    } finally {
      clearTimeout(timer);
      this.#rpWaiters.delete(type);
    }
    const failure = this.#peerFailure ?? this.#ending;
    if (!this.#rpSeen.has(type) && failure) throw failure;
  }

  // ---- devices ---------------------------------------------------------------------------------

  #device(d: SourceDevice) {
    return d.machine.device.vfio;
  }

  #setDeviceState(d: SourceDevice, state: MigState) {
    try {
      return this.#device(d).setMigDeviceState(state);
    } catch (err) {
      throw deviceFailure(
        this.#phase,
        d.machine.name,
        `MIG_DEVICE_STATE SET ${migStateName(state)} failed`,
        err,
      );
    } finally {
      this.#noteDeviceState(d);
    }
  }

  #noteDeviceState(d: SourceDevice): void {
    const state = migStateName(this.#device(d).getMigDeviceState());
    if (state === d.stats.state) return;
    d.stats.state = state;
    this.#emit({ type: 'device-state', device: d.machine.name, state });
  }

  // ---- ending ----------------------------------------------------------------------------------

  /**
   * Undo everything before the hand-off: the destination is told (ERROR) and cut off, devices go
   * back to RUNNING (reset if they cannot: QEMU's set_state_or_reset), dirty tracking and the
   * throttle stop, and the VM runs again if the migration had stopped it.
   */
  async #rollback(error: MigrationError): Promise<void> {
    this.#phase = 'cleanup';
    this.#tellAndClose(error);
    this.#stopTracking();
    for (const d of this.#devices) {
      const vfio = this.#device(d);
      d.stream = undefined;
      if (vfio.getMigDeviceState() === MigState.RUNNING) continue;
      try {
        vfio.setMigDeviceState(MigState.RUNNING);
      } catch {
        try {
          vfio.reset();
        } catch {
          // a device whose reset fails stays in ERROR; QEMU would abort here (hw_error)
        }
      }
      this.#noteDeviceState(d);
    }
    try {
      this.machine.vcpus?.setThrottle(0);
    } catch {
      // vCPUs gone (VM destroyed meanwhile)
    }
    this.#meter.throttlePercent = 0;
    // A VM stop the switchover began completes first, so that the VM is seen stopped and restarted.
    await this.#stopping?.catch(() => undefined);
    if (this.#wasRunning && this.machine.state === 'stopped') {
      await this.machine.start().catch(() => undefined);
    }
  }

  /** After the commit: devices STOP_COPY → STOP (QEMU's deferred save_cleanup), tracking off, channels closed. */
  #cleanupAfterCommit(): void {
    for (const d of this.#devices) {
      d.stream = undefined;
      try {
        if (this.#device(d).getMigDeviceState() === MigState.STOP_COPY)
          this.#device(d).setMigDeviceState(MigState.STOP);
      } catch {
        // the VM is the destination's now; a device that fails to stop is reset when destroyed
      }
      this.#noteDeviceState(d);
    }
    this.#stopTracking();
    this.#closeChannels();
  }

  #stopTracking(): void {
    try {
      this.#tracker?.stop();
    } catch {
      // best effort: a device that fails to stop logging keeps logging until reset or close
    }
    this.#tracker = undefined;
    if (this.machine.ram.dirtyLogActive) this.machine.ram.stopDirtyLog();
  }

  /**
   * Send ERROR on the main channel and close every channel, in an order that lets the destination
   * read the reason first: all channels stop taking frames now; main ends after the ERROR; the
   * multifd channels are cut only when the destination has closed main (it does once it has read
   * the ERROR) or after ROLLBACK_CLOSE_GRACE_MS. Cut at once, a multifd channel could end (or
   * end mid-frame) at the destination before it reads the ERROR, and it would report that instead.
   */
  #tellAndClose(error: MigrationError): void {
    const main = this.#main;
    for (const c of this.#channels) c.halt();
    try {
      if (main === undefined || !main.writable) throw new Error('no return path');
      main.send(encodeJsonFrame(FrameType.ERROR, errorFrame(error)));
    } catch {
      this.#closeChannels(); // the destination is gone already
      return;
    }
    main.halt();
    const cut = () => this.#closeChannels();
    main.socket.once('close', cut);
    main.socket.end();
    setTimeout(cut, ROLLBACK_CLOSE_GRACE_MS).unref();
  }

  #closeChannels(): void {
    for (const c of this.#channels) c.close();
    this.#main?.close();
    // The threads' sockets go with them.
    void this.#threads?.close();
    this.#threads = undefined;
  }

  #finish(status: MigrationStatus): void {
    this.#endMs = performance.now();
    this.#setStatus(status);
    this.#emit({ type: 'end', info: this.query() });
  }

  #setStatus(status: MigrationStatus): void {
    if (this.#status === status) return;
    this.#status = status;
    this.#emit({ type: 'status', status, info: this.query() });
  }

  #progress(force = false): void {
    const now = performance.now();
    if (!force && now - this.#lastProgressMs < 100) return;
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

const hasSocketRoom = (c: FrameSender) => c.backlog < PICK_BACKLOG_BYTES;

function openSocket(host: string, port: number, timeoutMs: number): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const socket = connect({ host, port, noDelay: true });
    const timer = setTimeout(() => {
      socket.destroy();
      reject(
        new MigrationError(
          MigrationErrorCode.TIMEOUT,
          'connect',
          `no connection to ${host}:${port} in ${timeoutMs} ms`,
        ),
      );
    }, timeoutMs);
    socket.once('connect', () => {
      clearTimeout(timer);
      resolve(socket);
    });
    socket.once('error', (err) => {
      clearTimeout(timer);
      reject(
        new MigrationError(
          MigrationErrorCode.CHANNEL,
          'connect',
          `cannot connect to ${host}:${port}: ${err.message}`,
          {
            cause: err,
          },
        ),
      );
    });
  });
}
