import { DmaFault, type DmaSpace, UnattachedDmaSpace } from '../../kernel/vfio/dma-port.js';

/** What one device's DMA did, as the VMM counts it at the device's port. */
export interface DeviceDmaCounters {
  bytesRead: number;
  bytesWritten: number;
  /** DMAs the IOMMU refused (the device counts and reports them itself too). */
  faults: number;
}

/**
 * A device's DMA space with counters: every DMA goes to the space the device is attached to now
 * (unattached until the VM starts), bytes moved and faults are counted, faults are thrown on to
 * the device unchanged.
 */
export class CountingDmaSpace implements DmaSpace {
  readonly counters: DeviceDmaCounters = { bytesRead: 0, bytesWritten: 0, faults: 0 };
  #space: DmaSpace = new UnattachedDmaSpace();

  /** Point at the space of the device's attachment (or back to unattached). */
  attach(space: DmaSpace | undefined): void {
    this.#space = space ?? new UnattachedDmaSpace();
  }

  read(iova: bigint, target: Uint8Array): void {
    try {
      this.#space.read(iova, target);
    } catch (err) {
      if (err instanceof DmaFault) this.counters.faults++;
      throw err;
    }
    this.counters.bytesRead += target.length;
  }

  write(iova: bigint, data: Uint8Array): void {
    try {
      this.#space.write(iova, data);
    } catch (err) {
      if (err instanceof DmaFault) this.counters.faults++;
      throw err;
    }
    this.counters.bytesWritten += data.length;
  }
}
