import { invalidArgument } from '../../uapi/error.js';
import type { RamAccessFence } from './ram-access-fence.js';

/** A block of a discardable region was plugged (populated) or unplugged (discarded). */
export interface RamDiscardEvent {
  kind: 'plug' | 'unplug';
  /** The RAM block the region belongs to. */
  ramBlock: string;
  /** Index of the plugged/unplugged block in the region. */
  block: number;
  /** Guest-physical address of the block. */
  gpa: bigint;
  lengthBytes: number;
}

/** Called for every plug and unplug, in order; a plug listener may throw to refuse the plug. */
export type RamDiscardListener = (event: RamDiscardEvent) => void;

/** What a RAM block gives its discard manager. */
export interface RamDiscardHost {
  readonly name: string;
  readonly gpa: bigint;
  readonly sizeBytes: number;
  readonly fence: RamAccessFence;
  /** Zero `[offset, offset + length)` of the block and mark it dirty (if logging is on). */
  discard(offset: number, length: number): void;
}

const PLUGGED = 1;
const UNPLUGGED = 0;

/**
 * The plug state of a discardable (virtio-mem-like) RAM block: the block is cut into blocks of
 * `blockSizeBytes` that are plugged and unplugged at run time. Unplugged blocks are discarded: their
 * bytes are zeroed, they read as zero, and vCPUs do not write them.
 *
 * The state is one i32 per block (1 = plugged) in `states`, a SharedArrayBuffer vCPU workers read
 * before writing a page (see RamAccessFence for why an unplug cannot race a write).
 *
 * Like QEMU's RamDiscardManager, listeners hear of every block plugged (populate) and unplugged
 * (discard): the VFIO memory listener will map and unmap each block in the IOAS. Unplug notifies
 * before the bytes go (unmap first, then discard); a plug refused by a listener is rolled back
 * (listeners already told hear an unplug) and the error is thrown.
 */
export class RamDiscardManager {
  readonly blockSizeBytes: number;
  readonly blockCount: number;
  /** One i32 per block, 1 = plugged. */
  readonly states: SharedArrayBuffer;
  readonly #state: Int32Array;
  readonly #host: RamDiscardHost;
  readonly #listeners = new Set<RamDiscardListener>();

  constructor(host: RamDiscardHost, blockSizeBytes: number, plugged: 'all' | 'none') {
    this.#host = host;
    this.blockSizeBytes = blockSizeBytes;
    this.blockCount = host.sizeBytes / blockSizeBytes;
    this.states = new SharedArrayBuffer(this.blockCount * 4);
    this.#state = new Int32Array(this.states);
    if (plugged === 'all') this.#state.fill(PLUGGED);
  }

  isPlugged(block: number): boolean {
    this.#checkRange(block, 1);
    return Atomics.load(this.#state, block) === PLUGGED;
  }

  /** Indexes of the plugged blocks, ascending (what a new listener replays). */
  pluggedBlocks(): number[] {
    const out: number[] = [];
    for (let b = 0; b < this.blockCount; b++) if (Atomics.load(this.#state, b) === PLUGGED) out.push(b);
    return out;
  }

  get pluggedBytes(): number {
    return this.pluggedBlocks().length * this.blockSizeBytes;
  }

  /** Is every block under `[offset, offset + length)` of the RAM block plugged? */
  isRangePlugged(offset: number, length: number): boolean {
    if (length === 0) return true;
    const first = Math.floor(offset / this.blockSizeBytes);
    const last = Math.floor((offset + length - 1) / this.blockSizeBytes);
    for (let b = first; b <= last; b++) if (Atomics.load(this.#state, b) !== PLUGGED) return false;
    return true;
  }

  /** Guest-physical address of a block. */
  blockGpa(block: number): bigint {
    return this.#host.gpa + BigInt(block * this.blockSizeBytes);
  }

  /** Listen to plugs and unplugs; returns the function that stops listening. */
  onChange(listener: RamDiscardListener): () => void {
    this.#listeners.add(listener);
    return () => void this.#listeners.delete(listener);
  }

  /** Plug `count` blocks from `first`; all must be unplugged. One event per block. */
  plug(first: number, count = 1): void {
    this.#checkRange(first, count);
    this.#checkAll(first, count, UNPLUGGED, 'plugged');
    for (let b = first; b < first + count; b++) {
      const event = this.#event('plug', b);
      const told: RamDiscardListener[] = [];
      try {
        for (const listener of this.#listeners) {
          listener(event);
          told.push(listener);
        }
      } catch (err) {
        const undo = { ...event, kind: 'unplug' as const };
        for (const listener of told.reverse()) listener(undo);
        throw err;
      }
      // Discarded blocks are already zero: nothing to write, nothing dirtied.
      Atomics.store(this.#state, b, PLUGGED);
    }
  }

  /**
   * Unplug `count` blocks from `first`; all must be plugged. For each block: vCPUs stop writing it
   * (state cleared, fence synchronized), listeners hear it, then its bytes are zeroed and marked
   * dirty if logging is on, so a migration sends the zeros.
   */
  unplug(first: number, count = 1): void {
    this.#checkRange(first, count);
    this.#checkAll(first, count, PLUGGED, 'unplugged');
    for (let b = first; b < first + count; b++) Atomics.store(this.#state, b, UNPLUGGED);
    this.#host.fence.synchronize();
    let failure: unknown;
    for (let b = first; b < first + count; b++) {
      const event = this.#event('unplug', b);
      for (const listener of this.#listeners) {
        try {
          listener(event);
        } catch (err) {
          failure ??= err;
        }
      }
      this.#host.discard(b * this.blockSizeBytes, this.blockSizeBytes);
    }
    if (failure !== undefined) throw failure;
  }

  #event(kind: 'plug' | 'unplug', block: number): RamDiscardEvent {
    return {
      kind,
      ramBlock: this.#host.name,
      block,
      gpa: this.blockGpa(block),
      lengthBytes: this.blockSizeBytes,
    };
  }

  #checkRange(first: number, count: number): void {
    if (!Number.isSafeInteger(first) || !Number.isSafeInteger(count) || first < 0 || count < 1) {
      throw invalidArgument(`${this.#host.name}: bad block range [${first}, +${count})`);
    }
    if (first + count > this.blockCount) {
      throw invalidArgument(
        `${this.#host.name}: blocks [${first}, +${count}) beyond the region's ${this.blockCount} blocks`,
      );
    }
  }

  #checkAll(first: number, count: number, state: number, already: string): void {
    for (let b = first; b < first + count; b++) {
      if (Atomics.load(this.#state, b) !== state) {
        throw invalidArgument(`${this.#host.name}: block ${b} is already ${already}`);
      }
    }
  }
}
