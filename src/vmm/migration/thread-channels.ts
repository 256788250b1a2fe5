import { availableParallelism } from 'node:os';
import { Worker } from 'node:worker_threads';
import { MigrationError, MigrationErrorCode } from './migration-error.js';
import type { MigrationPhase } from './migration-info.js';
import type { FromChannelThread, RamJobResult, ToChannelThread } from './channel-thread-protocol.js';
import { FrameSenderBase } from './channel.js';
import type { RamJob } from './ram-sender.js';
import type { SharedRamBlock } from './ram-scan.js';
import { RAM_PAGE_BYTES } from './wire-format.js';

/**
 * The threads that own the source's multifd sockets (QEMU's multifd send threads): one per
 * channel, but no more than the cores less one, which the main thread keeps for the bitmap, the
 * devices' reads and the return path (their work is CPU-bound copies: more threads than cores
 * only take turns). Channels are spread over them. `open` connects a channel in its thread and
 * returns its sender; `close` ends the threads.
 */
export class ChannelThreads {
  readonly #threads: Worker[] = [];
  readonly #channels = new Map<number, ThreadSendChannel>();
  readonly #opening = new Map<number, { resolve: () => void; reject: (err: MigrationError) => void }>();

  constructor(channels: number) {
    const count = Math.max(1, Math.min(channels, availableParallelism() - 1));
    for (let i = 0; i < count; i++) {
      const thread = new Worker(new URL('./channel-thread.js', import.meta.url), {
        name: `multifd-send${i}`,
      });
      thread.unref();
      thread.on('message', (message: FromChannelThread) => this.#onMessage(message));
      thread.on('error', (err) => {
        for (const c of this.#channels.values()) c.onFailed(`its thread failed: ${err.message}`);
      });
      this.#threads.push(thread);
    }
  }

  /** Connect channel `index` to the destination; rejects like a refused connection. */
  async open(
    index: number,
    host: string,
    port: number,
    timeoutMs: number,
    phase: () => MigrationPhase,
  ): Promise<ThreadSendChannel> {
    const thread = this.#threads[(index - 1) % this.#threads.length]!;
    const channel = new ThreadSendChannel(index, (m) => thread.postMessage(m), phase);
    this.#channels.set(index, channel);
    await new Promise<void>((resolve, reject) => {
      this.#opening.set(index, { resolve, reject });
      const open: ToChannelThread = { op: 'open', channel: index, host, port, timeoutMs };
      thread.postMessage(open);
    });
    return channel;
  }

  /** Give every thread the RAM blocks its channels' ram jobs read (their bitmaps and memory). */
  shareRam(blocks: SharedRamBlock[]): void {
    const setup: ToChannelThread = { op: 'ram-setup', blocks };
    for (const thread of this.#threads) thread.postMessage(setup);
  }

  /** End every thread (their sockets go with them). */
  async close(): Promise<void> {
    await Promise.all(this.#threads.map((t) => t.terminate()));
  }

  #onMessage(message: FromChannelThread): void {
    const channel = this.#channels.get(message.channel);
    switch (message.op) {
      case 'opened':
        this.#opening.get(message.channel)?.resolve();
        this.#opening.delete(message.channel);
        return;
      case 'refused': {
        const code = message.timedOut ? MigrationErrorCode.TIMEOUT : MigrationErrorCode.CHANNEL;
        this.#opening
          .get(message.channel)
          ?.reject(
            new MigrationError(
              code,
              'connect',
              `multifd channel ${message.channel}: cannot connect: ${message.message}`,
            ),
          );
        this.#opening.delete(message.channel);
        return;
      }
      case 'sent':
        channel?.onSent(message.seq, message.bytes);
        return;
      case 'ram-sent':
        channel?.onRamSent(message.seq, message);
        return;
      case 'failed':
        channel?.onFailed(message.message);
        return;
      case 'closed':
        channel?.onFailed('the connection closed');
        return;
    }
  }
}

/**
 * A multifd channel whose socket lives in a channel thread: the backlog counts frames posted until
 * the thread says the kernel has them, and the pages of its ram jobs until they are sent.
 */
export class ThreadSendChannel extends FrameSenderBase {
  readonly #post: (message: ToChannelThread) => void;
  readonly #onSent = new Map<number, () => void>();
  readonly #ramJobs = new Map<
    number,
    { pages: number; resolve: (result: RamJobResult) => void; reject: (err: Error) => void }
  >();
  #seq = 0;
  #inflight = 0;
  #error: string | undefined;
  #halted = false;

  constructor(index: number, post: (message: ToChannelThread) => void, phase: () => MigrationPhase) {
    super(index, phase);
    this.#post = post;
  }

  get backlog(): number {
    return this.#inflight;
  }

  /** Ram jobs the thread has not finished. */
  get ramJobs(): number {
    return this.#ramJobs.size;
  }

  get writable(): boolean {
    return this.#error === undefined && !this.#halted;
  }

  protected get stopped(): { reason: string } {
    return {
      reason: this.#error ?? (this.#halted ? 'the migration stopped sending' : 'the connection closed'),
    };
  }

  protected write(pieces: readonly Uint8Array[], onSent: (() => void) | undefined): void {
    const seq = ++this.#seq;
    // Views of shared memory (guest RAM, pooled device buffers) cross to the thread as they are; a
    // view of an ordinary buffer would be cloned with all of its ArrayBuffer, so it is cut to size.
    const shared = pieces.map((p) => (p.buffer instanceof SharedArrayBuffer ? p : p.slice()));
    if (onSent !== undefined) this.#onSent.set(seq, onSent);
    for (const p of shared) this.#inflight += p.length;
    this.#post({ op: 'send', channel: this.index, seq, pieces: shared });
  }

  /**
   * Have the thread send a ram job's pages (see RamSender.nextJob); resolves with what it sent once
   * the kernel has it, rejects if the channel fails first.
   */
  sendRam(job: RamJob): Promise<RamJobResult> {
    if (!this.writable) return Promise.reject(this.failure('send'));
    const seq = ++this.#seq;
    const { block, fromWord, toWord, pages } = job;
    this.#inflight += pages * RAM_PAGE_BYTES;
    const result = new Promise<RamJobResult>((resolve, reject) =>
      this.#ramJobs.set(seq, { pages, resolve, reject }),
    );
    this.#post({ op: 'ram', channel: this.index, seq, block, fromWord, toWord });
    return result;
  }

  halt(): void {
    this.#halted = true;
  }

  close(): void {
    this.#post({ op: 'close', channel: this.index });
  }

  /** The thread handed frame `seq` to the kernel (or dropped it with a dead socket). */
  onSent(seq: number, bytes: number): void {
    this.#inflight -= bytes;
    const callback = this.#onSent.get(seq);
    this.#onSent.delete(seq);
    callback?.();
    this.wake();
  }

  /** The thread sent ram job `seq`. */
  onRamSent(seq: number, result: RamJobResult): void {
    const job = this.#ramJobs.get(seq);
    if (job === undefined) return;
    this.#ramJobs.delete(seq);
    this.#inflight -= job.pages * RAM_PAGE_BYTES;
    this.count(result.bytes, result.frames);
    job.resolve(result);
    this.wake();
  }

  onFailed(reason: string): void {
    this.#error ??= reason;
    const jobs = [...this.#ramJobs.values()];
    this.#ramJobs.clear();
    for (const job of jobs) job.reject(this.failure('send'));
    this.wake();
  }
}
