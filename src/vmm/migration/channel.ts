import { Socket } from 'node:net';
import { MigrationError, MigrationErrorCode } from './migration-error.js';
import type { MigrationPhase } from './migration-info.js';
import { FrameDecoder, type WireDirection, type WireEvent } from './wire-format.js';

/** Bytes a sending channel may have queued in its socket before the sender waits for it to drain. */
export const CHANNEL_HIGH_WATER_BYTES = 4 << 20;

/** What the source sends frames through: a socket here (SendChannel) or in a channel thread. */
export interface FrameSender {
  readonly index: number;
  readonly kind: 'main' | 'multifd';
  readonly bytesSent: number;
  /** Frames sent so far (CHANNEL_END reports it). */
  readonly framesSent: number;
  /** Bytes sent and not yet taken by the kernel. */
  readonly backlog: number;
  readonly writable: boolean;
  /** One frame: header (with meta) and body pieces; `onSent` once the bytes are no longer needed. */
  send(header: Uint8Array, body?: readonly Uint8Array[], onSent?: () => void): void;
  /** Resolves once the backlog is at most `highWater`; rejects if the channel failed. */
  drained(highWater?: number): Promise<void>;
  flushed(): Promise<void>;
  failure(what: string, phase?: MigrationPhase): MigrationError;
  /** Take no more frames but keep the connection until close(). */
  halt(): void;
  close(): void;
  /** Call `waiter` when the backlog shrinks (or the channel fails); returns the function that cancels it. */
  onDrain(waiter: () => void): () => void;
}

/**
 * What every sender shares: counting, failing as a MigrationError naming the channel and the
 * phase, and waiting for the backlog to shrink. A sender says how it writes a frame, what its
 * backlog is, and wakes the drain waiters (`wake`) whenever the backlog shrinks or it fails.
 */
export abstract class FrameSenderBase implements FrameSender {
  readonly index: number;
  readonly #phase: () => MigrationPhase;
  readonly #drainWaiters = new Set<() => void>();
  #bytes = 0;
  #frames = 0;

  /** `phase` names the migration phase a failure of the channel is reported in. */
  constructor(index: number, phase: () => MigrationPhase) {
    this.index = index;
    this.#phase = phase;
  }

  get kind(): 'main' | 'multifd' {
    return this.index === 0 ? 'main' : 'multifd';
  }

  get bytesSent(): number {
    return this.#bytes;
  }

  get framesSent(): number {
    return this.#frames;
  }

  abstract get backlog(): number;
  abstract get writable(): boolean;
  abstract halt(): void;
  abstract close(): void;
  /** Write the pieces of one frame in one batch; `onSent` once they are no longer needed. */
  protected abstract write(pieces: readonly Uint8Array[], onSent: (() => void) | undefined): void;
  /** Why the channel takes no frames (for a failure's message), and the error behind it. */
  protected abstract get stopped(): { reason: string; cause?: unknown };

  send(header: Uint8Array, body: readonly Uint8Array[] = [], onSent?: () => void): void {
    if (!this.writable) throw this.failure('send');
    const pieces = [header, ...body];
    this.write(pieces, onSent);
    for (const piece of pieces) this.#bytes += piece.length;
    this.#frames++;
  }

  onDrain(waiter: () => void): () => void {
    const once = () => {
      this.#drainWaiters.delete(once);
      waiter();
    };
    this.#drainWaiters.add(once);
    return () => void this.#drainWaiters.delete(once);
  }

  async drained(highWater = CHANNEL_HIGH_WATER_BYTES): Promise<void> {
    while (this.backlog > highWater) {
      if (!this.writable) throw this.failure('send');
      await new Promise<void>((resolve) => this.onDrain(resolve));
    }
    if (!this.writable) throw this.failure('send');
  }

  /** Wait until everything sent has been handed to the kernel. */
  flushed(): Promise<void> {
    return this.drained(0);
  }

  failure(what: string, phase: MigrationPhase = this.#phase()): MigrationError {
    const { reason, cause } = this.stopped;
    return new MigrationError(
      MigrationErrorCode.CHANNEL,
      phase,
      `${this.kind} channel ${this.index}: ${what}: ${reason}`,
      cause === undefined ? {} : { cause },
    );
  }

  /** Count frames a sender wrote without send() (a channel thread's ram jobs). */
  protected count(bytes: number, frames: number): void {
    this.#bytes += bytes;
    this.#frames += frames;
  }

  protected wake(): void {
    for (const waiter of [...this.#drainWaiters]) waiter();
  }
}

/**
 * The sending side of one channel on a TCP socket of this thread. Bodies are written as given
 * (views of guest RAM or device buffers, not copied): what the socket has not taken yet stays
 * referenced until it has.
 */
export class SendChannel extends FrameSenderBase {
  readonly socket: Socket;
  #error: Error | undefined;

  constructor(index: number, socket: Socket, phase: () => MigrationPhase) {
    super(index, phase);
    this.socket = socket;
    socket.on('error', (err) => {
      this.#error ??= err;
    });
    socket.on('drain', () => this.wake());
    socket.on('close', () => this.wake());
  }

  /** Bytes written and not yet taken by the kernel. */
  get backlog(): number {
    return this.socket.writableLength;
  }

  get writable(): boolean {
    return this.#error === undefined && !this.socket.destroyed && this.socket.writable;
  }

  protected get stopped(): { reason: string; cause?: unknown } {
    return { reason: this.#error?.message ?? 'the connection closed', cause: this.#error };
  }

  protected write(pieces: readonly Uint8Array[], onSent: (() => void) | undefined): void {
    if (pieces.length > 1) this.socket.cork();
    pieces.forEach((piece, i) => this.socket.write(piece, i === pieces.length - 1 ? onSent : undefined));
    if (pieces.length > 1) this.socket.uncork();
  }

  /**
   * Take no more frames (send() and drained() fail from now on) but keep the connection open until
   * close(): what is queued still goes out, and the peer sees no end on this channel yet.
   */
  halt(): void {
    this.#error ??= new Error('the migration stopped sending');
  }

  close(): void {
    this.socket.destroy();
  }
}

/** Resolves when any of `channels` drains (or closes). */
export function anyDrained(channels: readonly FrameSender[]): Promise<void> {
  return new Promise<void>((resolve) => {
    const cancels = channels.map((c) =>
      c.onDrain(() => {
        for (const cancel of cancels) cancel();
        resolve();
      }),
    );
  });
}

/**
 * What a reader does with an event: nothing more (undefined), or a promise to wait for before
 * the next event (a barrier, a held buffer): the socket is paused meanwhile, which is the
 * backpressure TCP carries back to the sender.
 */
export type EventHandler = (event: WireEvent) => void | Promise<void>;

/**
 * The receiving side of one stream: socket bytes through a FrameDecoder to a handler, one event
 * at a time, pausing the socket while the handler waits. `done` settles when the stream ends at a
 * frame boundary (resolves) or with the first error (rejects): a protocol violation, a truncated
 * stream, a socket error, or a handler failure. After a failure the socket stays open (paused)
 * until its owner closes it.
 */
export class FrameReader {
  readonly socket: Socket;
  readonly decoder: FrameDecoder;
  readonly done: Promise<void>;
  #handler: EventHandler;
  #describe: string;
  readonly #onFail: ((err: unknown) => void) | undefined;
  #waiting = false;
  #ended = false;
  #settled = false;
  #bytes = 0;
  #resolve!: () => void;
  #reject!: (err: unknown) => void;

  constructor(
    socket: Socket,
    direction: WireDirection,
    options: {
      describe: string;
      phase: () => MigrationPhase;
      handler: EventHandler;
      /**
       * Read into one reused buffer of this size instead of a new one per read (a receiver of
       * gigabytes otherwise allocates, page-faults and collects a 64 KiB buffer per read).
       */
      readBufferBytes?: number;
      /** Told of the failure before the socket is destroyed (to answer on another socket, or this one). */
      onFail?: (err: unknown) => void;
      /**
       * With a read buffer: where the next bytes of the current frame's body belong, if the handler
       * wants them read there directly (guest RAM pages); they then arrive as `placed` body events.
       */
      placeBody?: () => Uint8Array | undefined;
      /**
       * With placed bodies: how much to read at a frame boundary, where the header's 12 bytes are
       * all the decoder asks for. The usual frame's header and meta then come in one read; bytes
       * beyond its meta are decoded from the read buffer as usual.
       */
      frameStartReadBytes?: number;
    },
  ) {
    this.socket = socket;
    this.decoder = new FrameDecoder(direction, options.phase, () => this.#describe);
    this.#handler = options.handler;
    this.#describe = options.describe;
    this.#onFail = options.onFail;
    this.done = new Promise<void>((resolve, reject) => {
      this.#resolve = resolve;
      this.#reject = reject;
    });
    this.done.catch(() => undefined);
    const onBytes = (chunk: Uint8Array, placed = false) => {
      this.#bytes += chunk.length;
      if (placed) this.decoder.pushPlaced(chunk);
      else this.decoder.push(chunk);
      this.#pump();
    };
    const staging =
      options.readBufferBytes === undefined ? undefined : new Uint8Array(options.readBufferBytes);
    const place = options.placeBody;
    // Where the next read goes: straight into place while the handler takes a body there and
    // nothing is buffered or waiting; else into staging, then only as much as the frame's header
    // and meta still need (so the body that follows is placed, not copied), or all of it.
    const nextTarget =
      place === undefined || staging === undefined
        ? undefined
        : (): Uint8Array | undefined => {
            if (this.#waiting || this.#settled) return undefined;
            if (this.decoder.bufferedBytes === 0) {
              const target = place();
              if (target !== undefined) return target;
            }
            let missing = this.decoder.headerBytesMissing;
            if (this.decoder.atFrameBoundary) missing = Math.max(missing, options.frameStartReadBytes ?? 0);
            return missing > 0 && missing < staging.length ? staging.subarray(0, missing) : undefined;
          };
    if (staging === undefined || !readIntoBuffer(socket, staging, onBytes, this.decoder, nextTarget))
      socket.on('data', (chunk: Buffer) => onBytes(chunk));
    socket.on('end', () => {
      this.#ended = true;
      this.#pump();
    });
    socket.on('error', (err) => this.fail(this.#channelError(err.message, options.phase(), err)));
    socket.on('close', () => {
      if (!this.#ended) this.fail(this.#channelError('the connection closed', options.phase()));
    });
  }

  /** Bytes read from the socket. */
  get bytesRead(): number {
    return this.#bytes;
  }

  /**
   * Swap the handler (the first frame of a connection decides what it is), and the name errors
   * give the stream ("multifd channel 2").
   */
  handleWith(handler: EventHandler, describe?: string): void {
    this.#handler = handler;
    if (describe !== undefined) this.#describe = describe;
  }

  /**
   * Fail the reader (the first failure wins): `onFail` hears it, the reader stops reading (the
   * socket is paused) and `done` rejects. Closing the socket is the owner's job: the owner may
   * still have to write on it (a destination's ERROR frame goes back on the main channel whose
   * reader failed), and a socket destroyed with unread bytes sends RST, which loses what was
   * written just before.
   */
  fail(err: unknown): void {
    if (this.#settled) return;
    this.#settled = true;
    try {
      this.#onFail?.(err);
    } finally {
      this.socket.pause();
      this.#reject(err);
    }
  }

  #channelError(message: string, phase: MigrationPhase, cause?: unknown): MigrationError {
    return new MigrationError(MigrationErrorCode.CHANNEL, phase, `${this.#describe}: ${message}`, { cause });
  }

  #pump(): void {
    if (this.#settled || this.#waiting) return;
    try {
      for (;;) {
        const event = this.decoder.next();
        if (event === undefined) break;
        const wait = this.#handler(event);
        if (wait !== undefined) {
          this.#waiting = true;
          this.socket.pause();
          wait.then(
            () => {
              this.#waiting = false;
              if (!this.#settled) this.socket.resume();
              this.#pump();
            },
            (err: unknown) => this.fail(err),
          );
          return;
        }
        if (this.#settled) return;
      }
      if (this.#ended) {
        this.decoder.end();
        this.#settled = true;
        this.#resolve();
      }
    } catch (err) {
      this.fail(err);
    }
  }
}

/** Node's own symbols for a socket's `onread` buffer, found once on a probe socket. */
let onreadSymbols: { buffer: symbol; callback: symbol; generator: symbol } | null | undefined;

function findOnreadSymbols(): typeof onreadSymbols {
  if (onreadSymbols !== undefined) return onreadSymbols;
  // `onread` is a net.connect option that @types/node leaves off the Socket constructor's.
  const options = { onread: { buffer: new Uint8Array(1), callback: () => true } };
  const probe = new Socket(options as ConstructorParameters<typeof Socket>[0]);
  const symbols = Object.getOwnPropertySymbols(probe);
  const find = (name: string) => symbols.find((s) => s.description === name);
  const [buffer, callback, generator] = [find('kBuffer'), find('kBufferCb'), find('kBufferGen')];
  probe.destroy();
  onreadSymbols = buffer && callback && generator ? { buffer, callback, generator } : null;
  return onreadSymbols;
}

/**
 * Make an accepted socket read into `staging` as `net.connect({ onread })` does for a client
 * socket (Node has no such option for server sockets, so its own symbols are set, found on a
 * probe socket). Each read calls `onBytes` with a view of `staging`; what the decoder has not
 * consumed by then is copied out (`detach`) before the next read reuses the buffer. When
 * `nextTarget` names a place for the next bytes, the read goes there instead (zero-copy receive,
 * as QEMU's multifd reads pages into guest RAM). Returns false, changing nothing, where this Node
 * does not have the mechanism.
 */
function readIntoBuffer(
  socket: Socket,
  staging: Uint8Array,
  onBytes: (chunk: Uint8Array, placed?: boolean) => void,
  decoder: FrameDecoder,
  nextTarget: (() => Uint8Array | undefined) | undefined,
): boolean {
  const symbols = findOnreadSymbols();
  const handle = (socket as unknown as { _handle?: { useUserBuffer?: (buffer: Uint8Array) => void } })
    ._handle;
  if (!symbols || typeof handle?.useUserBuffer !== 'function') return false;
  const fields = socket as unknown as Record<symbol, unknown>;
  fields[symbols.buffer] = staging;
  // Node asks the generator for the buffer of the next read after each read.
  fields[symbols.generator] = nextTarget === undefined ? null : () => nextTarget() ?? staging;
  fields[symbols.callback] = (n: number, buffer: Uint8Array) => {
    if (buffer.buffer === staging.buffer) {
      onBytes(buffer.subarray(0, n));
      decoder.detach();
    } else {
      onBytes(buffer.subarray(0, n), true);
    }
    return true;
  };
  handle.useUserBuffer(staging);
  return true;
}
