import { Readable, Writable } from 'node:stream';
import { PRECOPY_INFO_BYTES, VFIO_MIG_GET_PRECOPY_INFO } from '../../uapi/device-feature.js';
import { internalError, kernelError, VfioError } from '../../uapi/error.js';
import { isPrecopyState, type MigState, migStateName } from '../../uapi/migration.js';
import type { PrecopyInfo, ResumingSession, SavingSession } from './migration-driver.js';

/** Default read size of the stream helpers: QEMU's VFIO migration buffer is 1 MiB. */
export const DEFAULT_CHUNK_BYTES = 1 << 20;

/** What a data stream needs from its device; implemented by VfioDevice. */
export interface StreamOwner {
  readonly name: string;
  /** The device's current migration state. */
  readonly state: MigState;
}

/**
 * One migration session's file: the data_fd of MIG_DEVICE_STATE. It stays usable while its session
 * lives; after the session ends (state left the saving group or RESUMING, reset) it stays open
 * but dead (ENODEV, as mlx5); after close() every call fails EBADF.
 */
abstract class DataFd {
  protected readonly owner: StreamOwner;
  #live = true;
  #closed = false;
  #wakers = new Set<() => void>();

  constructor(owner: StreamOwner) {
    this.owner = owner;
  }

  get live(): boolean {
    return this.#live && !this.#closed;
  }

  get closed(): boolean {
    return this.#closed;
  }

  /** close(2). The session itself goes on until the device state ends it. */
  close(): void {
    this.#closed = true;
    this.wake();
  }

  /** lseek(2)/pread(2)/pwrite(2) position: migration fds are streams. */
  lseek(_offset: number, _whence: number): never {
    this.checkOpen('lseek');
    throw kernelError('ESPIPE', 'migration data fds are streams', { target: this.owner.name, op: 'lseek' });
  }

  /** Called by the device core when the session ends. */
  kill(): void {
    this.#live = false;
    this.wake();
  }

  /** Something changed (new data, state change, end): wake anyone waiting on poll(). */
  wake(): void {
    for (const w of [...this.#wakers]) w();
  }

  /**
   * poll(2). Resolves at once when the fd is ready (see pollReady: always when it is dead or
   * closed, so nobody waits on an fd that can never change), else at the next wake(): new data, a
   * state change, the session end or close. Rejects with the signal's reason on abort.
   */
  poll(signal?: AbortSignal): Promise<void> {
    if (signal?.aborted) return Promise.reject(signal.reason);
    if (this.pollReady()) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const done = () => {
        this.#wakers.delete(done);
        signal?.removeEventListener('abort', aborted);
        resolve();
      };
      const aborted = () => {
        this.#wakers.delete(done);
        reject(signal?.reason);
      };
      signal?.addEventListener('abort', aborted, { once: true });
      this.#wakers.add(done);
    });
  }

  /** Would poll(2) report the fd ready now? Dead and closed fds always are. */
  protected pollReady(): boolean {
    return !this.live;
  }

  protected checkOpen(op: string): void {
    if (this.#closed) throw kernelError('EBADF', 'data fd is closed', { target: this.owner.name, op });
  }

  protected checkLive(op: string): void {
    this.checkOpen(op);
    if (!this.#live) {
      throw kernelError('ENODEV', 'migration session of this data fd has ended', {
        target: this.owner.name,
        op,
      });
    }
  }
}

/**
 * The source side's data_fd, read-only. In STOP_COPY a read of 0 bytes is the end, forever; in
 * PRE_COPY(_P2P) having nothing to send now is ENOMSG (more may come: poll()).
 */
export class SavingStream extends DataFd {
  readonly direction = 'save' as const;
  readonly #session: SavingSession;
  #eof = false;

  constructor(owner: StreamOwner, session: SavingSession) {
    super(owner);
    this.#session = session;
  }

  /** Ready when a read cannot fail ENOMSG: end of data, or the device in STOP_COPY. */
  protected override pollReady(): boolean {
    return super.pollReady() || this.#eof || !isPrecopyState(this.owner.state);
  }

  /** read(2) into `target`: the number of bytes read, 0 at the end of stop-copy data. */
  readInto(target: Uint8Array): number {
    this.checkLive('read');
    if (target.length === 0) return 0;
    if (this.#eof) return 0;
    let n: number;
    try {
      n = this.#session.read(target);
    } catch (err) {
      throw asKernelError(err, this.owner.name, 'read');
    }
    if (!Number.isInteger(n) || n < 0 || n > target.length) {
      throw internalError(`${this.owner.name}: driver read returned ${n} for a ${target.length}-byte buffer`);
    }
    if (n === 0) {
      if (isPrecopyState(this.owner.state)) {
        throw kernelError('ENOMSG', 'no precopy data available now', { target: this.owner.name, op: 'read' });
      }
      this.#eof = true;
    }
    return n;
  }

  /** read(2) of at most `maxBytes` into a new buffer; empty at the end of stop-copy data. */
  read(maxBytes = DEFAULT_CHUNK_BYTES): Uint8Array {
    const buf = new Uint8Array(maxBytes);
    const n = this.readInto(buf);
    return n === maxBytes ? buf : buf.slice(0, n);
  }

  /** pread(2): a position on a stream fd is ESPIPE. */
  pread(_target: Uint8Array, _position: number): never {
    this.checkOpen('pread');
    throw kernelError('ESPIPE', 'migration data fds are streams', { target: this.owner.name, op: 'pread' });
  }

  /** VFIO_MIG_GET_PRECOPY_INFO. `argsz` defaults to sizeof(struct vfio_precopy_info). */
  precopyInfo(options: { argsz?: number } = {}): PrecopyInfo {
    return this.ioctl(VFIO_MIG_GET_PRECOPY_INFO, options);
  }

  /** ioctl(2) on the data fd: only VFIO_MIG_GET_PRECOPY_INFO exists (mlx5's checking order). */
  ioctl(cmd: number, arg: { argsz?: number } = {}): PrecopyInfo {
    const op = 'VFIO_MIG_GET_PRECOPY_INFO';
    this.checkOpen(op);
    if (cmd !== VFIO_MIG_GET_PRECOPY_INFO) {
      throw kernelError('ENOTTY', `unknown ioctl 0x${cmd.toString(16)}`, {
        target: this.owner.name,
        op: 'ioctl',
      });
    }
    if ((arg.argsz ?? PRECOPY_INFO_BYTES) < PRECOPY_INFO_BYTES) {
      throw kernelError('EINVAL', `argsz below ${PRECOPY_INFO_BYTES}`, { target: this.owner.name, op });
    }
    const state = this.owner.state;
    if (!isPrecopyState(state)) {
      throw kernelError('EINVAL', `device is in ${migStateName(state)}, not a precopy state`, {
        target: this.owner.name,
        op,
      });
    }
    this.checkLive(op);
    try {
      return this.#session.precopyInfo();
    } catch (err) {
      throw asKernelError(err, this.owner.name, op);
    }
  }

  /**
   * The chunks readable now: in stop-copy everything up to the end, in precopy until the device
   * has nothing more at the moment (ENOMSG ends the iteration).
   */
  *chunks(maxBytes = DEFAULT_CHUNK_BYTES): Generator<Uint8Array> {
    for (;;) {
      let chunk: Uint8Array;
      try {
        chunk = this.read(maxBytes);
      } catch (err) {
        if (err instanceof VfioError && err.errno === 'ENOMSG') return;
        throw err;
      }
      if (chunk.length === 0) return;
      yield chunk;
    }
  }

  /**
   * Everything the stream will ever carry, waiting (poll) through temporary ends in precopy, until
   * the end of stop-copy data. Fails ENODEV if the session ends before that.
   */
  async *[Symbol.asyncIterator](): AsyncGenerator<Uint8Array> {
    for (;;) {
      let chunk: Uint8Array;
      try {
        chunk = this.read(DEFAULT_CHUNK_BYTES);
      } catch (err) {
        if (!(err instanceof VfioError && err.errno === 'ENOMSG')) throw err;
        await this.poll();
        continue;
      }
      if (chunk.length === 0) return;
      yield chunk;
    }
  }

  /** The stream as a Node Readable (object mode off; ends at the end of stop-copy data). */
  toReadable(): Readable {
    return Readable.from(this, { objectMode: false });
  }
}

/** The destination side's data_fd, write-only: bytes appended in order. */
export class ResumeStream extends DataFd {
  readonly direction = 'resume' as const;
  readonly #session: ResumingSession;
  #bytesWritten = 0;

  constructor(owner: StreamOwner, session: ResumingSession) {
    super(owner);
    this.#session = session;
  }

  /** write(2): all of `chunk` is taken (or the call fails). Returns its length. */
  write(chunk: Uint8Array): number {
    this.checkLive('write');
    if (chunk.length === 0) return 0;
    try {
      this.#session.write(chunk);
    } catch (err) {
      throw asKernelError(err, this.owner.name, 'write');
    }
    this.#bytesWritten += chunk.length;
    return chunk.length;
  }

  /**
   * Write bytes that `fill` produces straight into place: `fill` gets a buffer, writes n bytes and
   * returns n; the result is exactly write() of those bytes. Splices a saving stream into this one
   * with one copy: `resume.writeFrom((buf) => saving.readInto(buf))`. Returns n (0: fill had none).
   */
  writeFrom(fill: (target: Uint8Array) => number, maxBytes = DEFAULT_CHUNK_BYTES): number {
    this.checkLive('write');
    const session = this.#session;
    let n: number;
    if (session.writeFrom) {
      try {
        n = session.writeFrom(fill);
      } catch (err) {
        throw asKernelError(err, this.owner.name, 'write');
      }
      this.#bytesWritten += n;
      return n;
    }
    const staging = new Uint8Array(maxBytes);
    n = fill(staging);
    return this.write(staging.subarray(0, n));
  }

  get bytesWritten(): number {
    return this.#bytesWritten;
  }

  /** write(2) on a migration fd never waits: the resume fd is always writable. */
  protected override pollReady(): boolean {
    return true;
  }

  pwrite(_data: Uint8Array, _position: number): never {
    this.checkOpen('pwrite');
    throw kernelError('ESPIPE', 'migration data fds are streams', { target: this.owner.name, op: 'pwrite' });
  }

  /** The resume fd has no ioctls. */
  ioctl(cmd: number): never {
    this.checkOpen('ioctl');
    throw kernelError('ENOTTY', `unknown ioctl 0x${cmd.toString(16)}`, {
      target: this.owner.name,
      op: 'ioctl',
    });
  }

  /** The stream as a Node Writable; each chunk is write(2)-ten in order. */
  toWritable(): Writable {
    return new Writable({
      write: (chunk: Uint8Array, _encoding, callback) => {
        try {
          this.write(chunk);
          callback();
        } catch (err) {
          callback(err as Error);
        }
      },
    });
  }
}

/** Errors from driver hooks reach the caller as kernel errors; anything else is a driver bug. */
export function asKernelError(err: unknown, target: string, op: string): VfioError {
  if (err instanceof VfioError) {
    return err.errno !== undefined && err.target === undefined
      ? kernelError(err.errno, err.message, { target, op, cause: err })
      : err;
  }
  return new VfioError('ERR_INTERNAL', `driver failed: ${(err as Error)?.message ?? String(err)}`, {
    target,
    op,
    cause: err,
  });
}
