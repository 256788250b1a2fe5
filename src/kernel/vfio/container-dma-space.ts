import type { ByteStore } from '../host/byte-store.js';
import type { VfioContainer } from './container.js';
import { IommuProt } from './container-api.js';
import type { Type1Group } from './container-type1.js';
import { type DmaAccess, DmaFault, type DmaSpace } from './dma-port.js';

/** `n` bytes of the DMA (from byte `done`) at byte `at` of a pinned store. */
interface Run {
  store: ByteStore;
  at: number;
  done: number;
  n: number;
}

/**
 * A device's DMA through a legacy type1 container: IOVA -> vfio_dma -> the pages pinned for the
 * IOMMU domain. Those are the bytes the process had at the dma's vaddr when they were pinned, and
 * they stay the target while the vaddr is invalidated, the process execs, or it re-supplies the
 * vaddr (VFIO_UPDATE_VADDR): DMA never looks at the current address space. DmaFault when the
 * group has no IOMMU domain in the container, the IOVA is not mapped, or the mapping lacks the
 * access (a write to a read-only mapping); then no byte has moved.
 */
export class ContainerDmaSpace implements DmaSpace {
  readonly #container: VfioContainer;
  readonly #group: Type1Group;

  constructor(container: VfioContainer, group: Type1Group) {
    this.#container = container;
    this.#group = group;
  }

  /** Every run of the DMA resolved (domain, mapping, permission, backing) before any byte moves. */
  #resolve(iova: bigint, length: number, access: DmaAccess): Run[] {
    const iommu = this.#container.type1;
    if (!iommu || !iommu.inDomain(this.#group)) {
      throw new DmaFault(iova, access, 'device is not attached to an IOMMU domain');
    }
    const need = access === 'write' ? IommuProt.WRITE : IommuProt.READ;
    const runs: Run[] = [];
    let done = 0;
    while (done < length) {
      const at = iova + BigInt(done);
      const dma = iommu.mappedDmaAt(at);
      if (!dma) throw new DmaFault(at, access, 'no mapping');
      if ((dma.prot & need) === 0) throw new DmaFault(at, access, `mapping is not ${access}able`);
      const offset = at - dma.iova;
      const run = dma.backing!.find((r) => r.offset <= offset && offset < r.offset + r.length)!;
      const left = run.offset + run.length - offset;
      const n = left < BigInt(length - done) ? Number(left) : length - done;
      runs.push({ store: run.store, at: run.storeOffset + Number(offset - run.offset), done, n });
      done += n;
    }
    return runs;
  }

  read(iova: bigint, target: Uint8Array): void {
    for (const r of this.#resolve(iova, target.length, 'read')) {
      r.store.read(r.at, target.subarray(r.done, r.done + r.n));
    }
  }

  /** All or nothing: a fault anywhere in the range leaves every byte of guest memory as it was. */
  write(iova: bigint, data: Uint8Array): void {
    for (const r of this.#resolve(iova, data.length, 'write')) {
      r.store.write(r.at, data.subarray(r.done, r.done + r.n));
    }
  }
}
