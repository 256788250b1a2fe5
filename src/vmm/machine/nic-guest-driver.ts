import type { NicRing } from '../../devices/nic-device.js';
import type { GuestRam } from './guest-ram.js';
import { invalidArgument } from '../../uapi/error.js';
import { Prng } from './prng.js';

export interface NicGuestTxState {
  tail: number;
  posted: number;
  rng: number[];
}

/**
 * The guest's nic driver, TX side: each tick it fills the TX buffers it owns (length word 0) with
 * packets, in ring order, writing guest RAM as a vCPU would (the writes are dirty-logged); the NIC
 * sends them by DMA and gives the buffers back. A buffer the NIC has not given back yet stops it.
 */
export class NicGuestTxDriver {
  readonly #ram: GuestRam;
  readonly #ring: NicRing;
  readonly #packetsPerTick: number;
  readonly #rng: Prng;
  readonly #length = new Uint8Array(4);
  readonly #packet: Uint8Array;
  #tail = 0;
  #posted = 0;

  constructor(ram: GuestRam, ring: NicRing, options: { packetsPerTick?: number; seed?: number } = {}) {
    this.#ram = ram;
    this.#ring = ring;
    this.#packetsPerTick = options.packetsPerTick ?? 1;
    this.#rng = new Prng(options.seed ?? 1);
    this.#packet = new Uint8Array(4 + ring.bufferBytes - 4);
  }

  /** Packets handed to the NIC so far. */
  get posted(): number {
    return this.#posted;
  }

  /** The driver's own position (ring tail, packets posted, generator), part of the VM's migrated state. */
  state(): NicGuestTxState {
    return { tail: this.#tail, posted: this.#posted, rng: this.#rng.state() };
  }

  restore(state: NicGuestTxState): void {
    if (!Number.isInteger(state.tail) || state.tail < 0 || state.tail >= this.#ring.entries) {
      throw invalidArgument(`TX ring tail ${state.tail} is outside the ${this.#ring.entries}-entry ring`);
    }
    if (!Number.isSafeInteger(state.posted) || state.posted < 0) {
      throw invalidArgument(`bad posted packet count ${state.posted}`);
    }
    this.#rng.restore(state.rng);
    this.#tail = state.tail;
    this.#posted = state.posted;
  }

  tick(): void {
    const view = new DataView(this.#packet.buffer);
    for (let n = 0; n < this.#packetsPerTick; n++) {
      const slot = this.#ring.iova + BigInt(this.#tail) * BigInt(this.#ring.bufferBytes);
      this.#ram.read(slot, this.#length);
      if (new DataView(this.#length.buffer).getUint32(0, true) !== 0) return; // still the NIC's
      const length = 60 + (this.#rng.nextU32() % (this.#ring.bufferBytes - 4 - 60 + 1));
      for (let i = 4; i < 4 + length; i += 4) view.setUint32(i, this.#rng.nextU32(), true);
      // payload first, then the length word that hands the buffer over
      this.#ram.write(slot + 4n, this.#packet.subarray(4, 4 + length));
      view.setUint32(0, length, true);
      this.#ram.write(slot, this.#packet.subarray(0, 4));
      this.#tail = (this.#tail + 1) % this.#ring.entries;
      this.#posted++;
    }
  }
}
