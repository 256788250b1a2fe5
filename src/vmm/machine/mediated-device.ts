import { invalidArgument } from '../../uapi/error.js';
import type { GuestPagePinner, PinnedGuestPages } from './dma-backend.js';
import { GUEST_PAGE_BYTES } from './guest-page.js';

/** Bytes of one record the device writes. */
export const MEDIATED_RECORD_BYTES = 64;

export interface MediatedDeviceOptions {
  name: string;
  /** IOVA (= guest-physical address) of the pages the device writes, page aligned. */
  iova: bigint;
  /** Pages it pins there; default 4. */
  pages?: number;
  /** Seed of the record contents; default 1. */
  seed?: number;
}

export interface MediatedDeviceStatus {
  name: string;
  iova: bigint;
  pinnedBytes: number;
  recordsWritten: number;
  bytesWritten: number;
  /** Times the kernel asked for the pages back (an unmap under the pins). */
  unmapNotices: number;
  /** Ticks with no pinned pages to write to. */
  ticksWithoutPages: number;
}

/**
 * An emulated (mediated) device, like an mdev vGPU: no IOMMU domain of its own, its in-kernel
 * driver pins the guest pages of a ring (an iommufd access, or vfio_pin_pages on a type1 emulated
 * group) and writes records into them straight through the pinned pages, not through any mapping
 * of the VMM. Record `n` goes to slot `n mod slots`:
 *
 *   byte 0   u64 LE  sequence number n
 *   byte 8   u32 LE  seed
 *   byte 12  u32 LE  xorshift32 state after record n
 *   byte 16  48 bytes of (state + i) & 0xff
 *
 * When the kernel wants the pages back (an unmap under them) the device unpins at once and writes
 * nothing more until it is connected again.
 */
export class MediatedDevice {
  readonly name: string;
  readonly iova: bigint;
  readonly lengthBytes: number;
  readonly #seed: number;
  #x: number;
  #sequence = 0n;
  #pinner: GuestPagePinner | undefined;
  #pins: PinnedGuestPages | undefined;
  #bytesWritten = 0;
  #unmapNotices = 0;
  #idleTicks = 0;
  readonly #record = new Uint8Array(MEDIATED_RECORD_BYTES);
  readonly #view = new DataView(this.#record.buffer);

  constructor(options: MediatedDeviceOptions) {
    const pages = options.pages ?? 4;
    if (!Number.isSafeInteger(pages) || pages < 1) throw invalidArgument(`${options.name}: ${pages} pages`);
    if (options.iova % BigInt(GUEST_PAGE_BYTES) !== 0n || options.iova < 0n) {
      throw invalidArgument(`${options.name}: IOVA 0x${options.iova.toString(16)} is not page aligned`);
    }
    this.name = options.name;
    this.iova = options.iova;
    this.lengthBytes = pages * GUEST_PAGE_BYTES;
    this.#seed = (options.seed ?? 1) >>> 0 || 1;
    this.#x = this.#seed;
  }

  /** Take the pinner the backend opened for this device and pin the ring. */
  connect(pinner: GuestPagePinner): void {
    if (this.#pinner !== undefined) throw invalidArgument(`${this.name} is connected already`);
    this.#pinner = pinner;
    this.#pins = pinner.pin(this.iova, this.lengthBytes);
  }

  /** The kernel's unmap notice (iommufd access `unmap` op, type1 `dma_unmap`): unpin what intersects. */
  onUnmap(iova: bigint, lengthBytes: bigint): void {
    this.#unmapNotices++;
    const pins = this.#pins;
    if (pins === undefined) return;
    const end = pins.iova + BigInt(pins.lengthBytes);
    if (iova < end && pins.iova < iova + lengthBytes) {
      this.#pins = undefined;
      pins.unpin();
    }
  }

  /** Write the next record (a tick of the guest driver loop). */
  tick(): void {
    const pins = this.#pins;
    if (pins === undefined) {
      this.#idleTicks++;
      return;
    }
    let x = this.#x;
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    this.#view.setBigUint64(0, this.#sequence, true);
    this.#view.setUint32(8, this.#seed, true);
    this.#view.setUint32(12, x, true);
    for (let i = 16; i < MEDIATED_RECORD_BYTES; i++) this.#record[i] = (x + i) & 0xff;
    const slots = this.lengthBytes / MEDIATED_RECORD_BYTES;
    pins.write(Number(this.#sequence % BigInt(slots)) * MEDIATED_RECORD_BYTES, this.#record);
    this.#x = x;
    this.#sequence++;
    this.#bytesWritten += MEDIATED_RECORD_BYTES;
  }

  /** Read back `target.length` bytes at `offset` of the ring through the pins (tests, diagnostics). */
  readRing(offset: number, target: Uint8Array): void {
    if (this.#pins === undefined) throw invalidArgument(`${this.name} has no pinned pages`);
    this.#pins.read(offset, target);
  }

  /** Unpin and close the access/device. */
  disconnect(): void {
    this.#pins = undefined;
    const pinner = this.#pinner;
    this.#pinner = undefined;
    pinner?.close();
  }

  status(): MediatedDeviceStatus {
    return {
      name: this.name,
      iova: this.iova,
      pinnedBytes: this.#pins === undefined ? 0 : this.lengthBytes,
      recordsWritten: Number(this.#sequence),
      bytesWritten: this.#bytesWritten,
      unmapNotices: this.#unmapNotices,
      ticksWithoutPages: this.#idleTicks,
    };
  }
}
