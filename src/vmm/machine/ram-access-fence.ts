import { internalError } from '../../uapi/error.js';

/** Writer threads (vCPUs, later device threads) one guest RAM can have at once. */
export const RAM_ACCESS_SLOTS = 256;

/*
 * A fence between threads that write guest RAM and the host thread when it takes memory away
 * (virtio-mem unplug): after `synchronize()` returns, no writer is still inside a write that began
 * before it, so a writer that checked "plugged" before the unplug has finished writing.
 *
 * One SharedArrayBuffer of RAM_ACCESS_SLOTS i32 sequence counters, one per writer thread:
 *
 *   byte 4 s   i32 SEQ[s]   even = outside guest RAM, odd = inside a batch of writes
 *
 * Writer: `enterRamAccess` (SEQ odd), check plug state, write, mark dirty, `leaveRamAccess` (even).
 * Host:   clear the plug state, `synchronize()` (wait for every odd SEQ to move), then discard.
 * All are seq-cst atomics, so either the writer's check sees the cleared state or the host sees
 * the writer's odd SEQ and waits for it (the store-load pattern of Dekker's algorithm).
 */
export function enterRamAccess(seq: Int32Array, slot: number): void {
  Atomics.add(seq, slot, 1);
}

export function leaveRamAccess(seq: Int32Array, slot: number): void {
  Atomics.add(seq, slot, 1);
}

export class RamAccessFence {
  readonly buffer = new SharedArrayBuffer(RAM_ACCESS_SLOTS * 4);
  readonly #seq = new Int32Array(this.buffer);
  readonly #claimed = new Set<number>();

  /** A free writer slot, for one thread. */
  claim(): number {
    for (let slot = 0; slot < RAM_ACCESS_SLOTS; slot++) {
      if (!this.#claimed.has(slot)) {
        this.#claimed.add(slot);
        Atomics.store(this.#seq, slot, 0);
        return slot;
      }
    }
    throw internalError(`all ${RAM_ACCESS_SLOTS} guest RAM writer slots are taken`);
  }

  /** Give a slot back; a thread that died inside a write no longer holds the fence. */
  release(slot: number): void {
    if (!this.#claimed.delete(slot)) throw internalError(`guest RAM writer slot ${slot} is not claimed`);
    Atomics.store(this.#seq, slot, 0);
  }

  /** Wait (blocking, microseconds in practice) until every write begun before this call has ended. */
  synchronize(timeoutMs = 5000): void {
    const deadline = performance.now() + timeoutMs;
    for (const slot of this.#claimed) {
      const seen = Atomics.load(this.#seq, slot);
      if ((seen & 1) === 0) continue;
      while (Atomics.load(this.#seq, slot) === seen) {
        if (performance.now() > deadline) {
          throw internalError(`guest RAM writer ${slot} stayed inside a write for ${timeoutMs} ms`);
        }
        Atomics.wait(this.#seq, slot, seen, 0.05);
      }
    }
  }
}
