import { VfioError } from '../../uapi/error.js';

/** Access kinds a DMA fault reports, as the IOMMU sees them. */
export type DmaAccess = 'read' | 'write';

/** A DMA that the IOMMU refused: no mapping, or a write to a read-only mapping. */
export class DmaFault extends VfioError {
  readonly iova: bigint;
  readonly access: DmaAccess;
  constructor(iova: bigint, access: DmaAccess, reason: string) {
    super('DMA_FAULT', `DMA ${access} fault at IOVA 0x${iova.toString(16)}: ${reason}`);
    this.iova = iova;
    this.access = access;
  }
}

/**
 * Where a device's DMA lands: IOVA in, guest bytes out. The iommufd/type1 layers implement it
 * with real translation; MemoryDmaSpace below is a flat space for tests and standalone devices.
 */
export interface DmaSpace {
  /** Copy `target.length` bytes at `iova` into `target`; throws DmaFault. */
  read(iova: bigint, target: Uint8Array): void;
  /** Copy `data` to `iova`; throws DmaFault (e.g. read-only mapping). */
  write(iova: bigint, data: Uint8Array): void;
}

/** Receives every successful device write, for dirty tracking. */
export type DmaWriteObserver = (iova: bigint, lengthBytes: number) => void;

/**
 * A device's DMA port: the device reads and writes through it, the VFIO core observes writes to
 * feed DMA logging (a device's own dirty tracker), and the IOMMU behind `space` translates.
 */
export class DmaPort {
  #space: DmaSpace;
  #observers: DmaWriteObserver[] = [];

  constructor(space: DmaSpace) {
    this.#space = space;
  }

  read(iova: bigint, target: Uint8Array): void {
    this.#space.read(iova, target);
  }

  write(iova: bigint, data: Uint8Array): void {
    this.#space.write(iova, data);
    for (const observe of this.#observers) observe(iova, data.length);
  }

  /** Point the port at another address space (a device attached elsewhere). */
  rebind(space: DmaSpace): void {
    this.#space = space;
  }

  observeWrites(observer: DmaWriteObserver): () => void {
    this.#observers.push(observer);
    return () => {
      this.#observers = this.#observers.filter((o) => o !== observer);
    };
  }
}

/**
 * The DMA space of a device attached to no IOMMU domain: every access faults. A device that was
 * given no address space gets a port over it (it can be rebound later).
 */
export class UnattachedDmaSpace implements DmaSpace {
  read(iova: bigint): void {
    throw new DmaFault(iova, 'read', 'device is not attached to an IOMMU domain');
  }

  write(iova: bigint): void {
    throw new DmaFault(iova, 'write', 'device is not attached to an IOMMU domain');
  }
}

/**
 * Runs one device DMA; a DmaFault (the IOMMU refused it) is returned for the device to report,
 * anything else is thrown on.
 */
export function dmaFaultOf(dma: () => void): DmaFault | undefined {
  try {
    dma();
    return undefined;
  } catch (err) {
    if (err instanceof DmaFault) return err;
    throw err;
  }
}

/** A flat DMA space: IOVA `base + i` is byte `i` of `bytes`; anything else faults. */
export class MemoryDmaSpace implements DmaSpace {
  readonly bytes: Uint8Array;
  readonly base: bigint;
  readonly writable: boolean;

  constructor(bytes: Uint8Array, options: { base?: bigint; writable?: boolean } = {}) {
    this.bytes = bytes;
    this.base = options.base ?? 0n;
    this.writable = options.writable ?? true;
  }

  #offset(iova: bigint, length: number, access: DmaAccess): number {
    const offset = iova - this.base;
    if (iova < this.base || offset + BigInt(length) > BigInt(this.bytes.length)) {
      throw new DmaFault(iova, access, 'no mapping');
    }
    return Number(offset);
  }

  read(iova: bigint, target: Uint8Array): void {
    const at = this.#offset(iova, target.length, 'read');
    target.set(this.bytes.subarray(at, at + target.length));
  }

  write(iova: bigint, data: Uint8Array): void {
    const at = this.#offset(iova, data.length, 'write');
    if (!this.writable) throw new DmaFault(iova, 'write', 'mapping is read-only');
    this.bytes.set(data, at);
  }
}
