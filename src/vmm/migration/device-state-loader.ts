import { MigrationError, MigrationErrorCode } from './migration-error.js';
import { DEVICE_STATE_CONFIG } from './wire-format.js';

/**
 * What a queued buffer costs besides its bytes (map entry, object, typed-array header), so that a
 * flood of tiny packets is bounded by the cap as well.
 */
export const QUEUE_ENTRY_OVERHEAD_BYTES = 256;

/**
 * The byte budget of device-state buffers queued out of order, shared by every device of one
 * incoming migration (QEMU's x-migration-max-queued-buffers-size, which is per device there).
 * Buffers that cannot be queued are not an error at once: the channel that brought one holds it
 * and stops reading until the budget frees up (backpressure); see DeviceStateLoader.offer.
 */
export class QueueBudget {
  readonly capBytes: number;
  #queued = 0;
  #peak = 0;
  #listeners = new Set<() => void>();
  readonly #running = new Set<() => void>();

  constructor(capBytes: number) {
    this.capBytes = capBytes;
  }

  get queuedBytes(): number {
    return this.#queued;
  }

  get peakBytes(): number {
    return this.#peak;
  }

  tryTake(bytes: number): boolean {
    if (this.#queued + bytes > this.capBytes) return false;
    this.#queued += bytes;
    this.#peak = Math.max(this.#peak, this.#queued);
    return true;
  }

  give(bytes: number): void {
    this.#queued -= bytes;
    this.wake();
  }

  /** Tell the listeners to try again (buffers may be writable now without a release). */
  wake(): void {
    // Not called: a listener stopped meanwhile (by an earlier one), and one that is running (the
    // release comes from inside it: its retried buffer was written and the queue drained).
    for (const listener of [...this.#listeners]) {
      if (!this.#listeners.has(listener) || this.#running.has(listener)) continue;
      this.#running.add(listener);
      try {
        listener();
      } finally {
        this.#running.delete(listener);
      }
    }
  }

  /** Hear every release; returns the function that stops it. */
  onRelease(listener: () => void): () => void {
    this.#listeners.add(listener);
    return () => void this.#listeners.delete(listener);
  }
}

/** What became of a buffer offered to a loader. */
export type OfferResult = 'written' | 'queued' | 'held';

export interface DeviceStateLoaderOptions {
  device: string;
  budget: QueueBudget;
  /** Write device bytes to the device's resume stream (in index order). */
  write: (data: Uint8Array) => void;
  /** The device's config state (the CONFIG_STATE packet), after every data buffer. */
  loadConfig: (data: Uint8Array) => void;
}

/**
 * The destination's loader of one device's state at switchover (QEMU's load_state_buffer and load
 * thread, hw/vfio/migration-multifd.c): packets come over any channel in any order, each with a
 * sequence index; the loader writes them to the device's resume stream in index order, holding
 * the early ones in a queue bounded by the budget. The packet flagged CONFIG_STATE is the last;
 * its bytes are the device's config state, loaded once every earlier buffer is written.
 *
 * Refused, with ERR_MIGRATION_PROTOCOL naming the device and index: a duplicate index (queued,
 * written or being written), an index past the config packet, a second config packet, an empty
 * packet. A buffer that does not fit the budget is 'held': the caller keeps it and offers it
 * again when the budget frees (QueueBudget.onRelease); it is never dropped.
 */
export class DeviceStateLoader {
  readonly device: string;
  readonly #budget: QueueBudget;
  readonly #write: (data: Uint8Array) => void;
  readonly #loadConfig: (data: Uint8Array) => void;
  readonly #queue = new Map<number, { data: Uint8Array; flags: number }>();
  #next = 0;
  #last: number | undefined;
  #started = false;
  #complete = false;
  /** Index of the packet being streamed straight into the device, if one is. */
  #direct: number | undefined;
  #packets = 0;
  #bytes = 0;

  constructor(options: DeviceStateLoaderOptions) {
    this.device = options.device;
    this.#budget = options.budget;
    this.#write = options.write;
    this.#loadConfig = options.loadConfig;
  }

  /** Every buffer and the config state are loaded. */
  get complete(): boolean {
    return this.#complete;
  }

  get nextIndex(): number {
    return this.#next;
  }

  /** Packets and bytes loaded so far. */
  get loaded(): { packets: number; bytes: number } {
    return { packets: this.#packets, bytes: this.#bytes };
  }

  get queuedPackets(): number {
    return this.#queue.size;
  }

  /** Switchover started: buffers may go to the device from now on (QEMU: the load thread starts). */
  start(): void {
    this.#started = true;
    this.#drain();
    // A held buffer may be the next one in order, which can be written now.
    this.#budget.wake();
  }

  /**
   * Check a packet's header as soon as it is decoded (before its body is buffered). Returns true
   * when its body may be streamed straight into the device: it is next in order, not the config
   * packet, and nothing else is being streamed; then call `writeDirect` for each piece and
   * `endDirect` after the last.
   */
  admit(index: number, flags: number, bodyBytes: number): boolean {
    this.#check(index, flags, bodyBytes);
    if ((flags & DEVICE_STATE_CONFIG) !== 0) this.#last = index;
    const direct =
      this.#started &&
      index === this.#next &&
      this.#direct === undefined &&
      (flags & DEVICE_STATE_CONFIG) === 0;
    if (direct) this.#direct = index;
    return direct;
  }

  writeDirect(piece: Uint8Array): void {
    this.#write(piece);
    this.#bytes += piece.length;
  }

  endDirect(): void {
    this.#direct = undefined;
    this.#next++;
    this.#packets++;
    this.#drain();
    // A held buffer may be the next one in order now, which can be written without a release.
    this.#budget.wake();
  }

  /**
   * A whole buffer that `admit` did not take directly. Written at once if it is next in order,
   * queued if the budget takes it, else 'held' (offer it again after a budget release).
   */
  offer(index: number, flags: number, data: Uint8Array): OfferResult {
    this.#recheck(index);
    if (this.#started && index === this.#next && this.#direct === undefined) {
      this.#apply(data, flags);
      this.#next++;
      this.#drain();
      this.#budget.wake();
      return 'written';
    }
    if (!this.#budget.tryTake(data.length + QUEUE_ENTRY_OVERHEAD_BYTES)) return 'held';
    this.#queue.set(index, { data, flags });
    return 'queued';
  }

  /** Drop what is queued (the migration failed); returns the bytes given back to the budget. */
  discard(): void {
    for (const { data } of this.#queue.values()) this.#budget.give(data.length + QUEUE_ENTRY_OVERHEAD_BYTES);
    this.#queue.clear();
  }

  #check(index: number, flags: number, bodyBytes: number): void {
    const refuse = (message: string) =>
      new MigrationError(MigrationErrorCode.PROTOCOL, 'stop-copy', `state buffer ${index}: ${message}`, {
        device: this.device,
      });
    if (this.#complete) throw refuse('arrived after the device state was complete');
    if (bodyBytes === 0) throw refuse('empty packet');
    if (index < this.#next || index === this.#direct || this.#queue.has(index)) {
      throw refuse('already filled');
    }
    const config = (flags & DEVICE_STATE_CONFIG) !== 0;
    if (this.#last !== undefined) {
      if (config) throw refuse(`a second config state (the first is buffer ${this.#last})`);
      if (index > this.#last) throw refuse(`past the config state, buffer ${this.#last}`);
    } else if (config) {
      for (const queued of this.#queue.keys()) {
        if (queued > index) throw refuse(`config state before buffer ${queued}, which is queued`);
      }
    }
  }

  /**
   * `admit` checked the index when the header came; while the body arrived (or while the buffer
   * was held) another channel may have delivered the same index, or the config packet.
   */
  #recheck(index: number): void {
    const refuse = (message: string) =>
      new MigrationError(MigrationErrorCode.PROTOCOL, 'stop-copy', `state buffer ${index}: ${message}`, {
        device: this.device,
      });
    if (this.#complete) throw refuse('arrived after the device state was complete');
    if (index < this.#next || index === this.#direct || this.#queue.has(index)) {
      throw refuse('already filled');
    }
    if (this.#last !== undefined && index > this.#last) {
      throw refuse(`past the config state, buffer ${this.#last}`);
    }
  }

  #apply(data: Uint8Array, flags: number): void {
    this.#packets++;
    if ((flags & DEVICE_STATE_CONFIG) !== 0) {
      this.#loadConfig(data);
      this.#complete = true;
    } else {
      this.#write(data);
      this.#bytes += data.length;
    }
  }

  #drain(): void {
    if (!this.#started || this.#direct !== undefined) return;
    for (;;) {
      const entry = this.#queue.get(this.#next);
      if (entry === undefined) return;
      this.#queue.delete(this.#next);
      // Filled before the release: a listener may offer a held buffer, which must see this.
      this.#next++;
      try {
        this.#apply(entry.data, entry.flags);
      } finally {
        this.#budget.give(entry.data.length + QUEUE_ENTRY_OVERHEAD_BYTES);
      }
    }
  }
}
