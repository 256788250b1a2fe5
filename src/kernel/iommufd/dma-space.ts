import { type DmaAccess, DmaFault, type DmaSpace } from '../vfio/dma-port.js';
import type { HwptPagingObject, IommufdContext } from './context.js';
import { AreaProt } from './io-pagetable.js';

/**
 * A device's view of memory through iommufd: IOVA -> area -> pages -> the owner's bytes (process
 * memory by VA, or the memfd by offset). Unmapped IOVA, a device not attached, or a write to a
 * read-only area raise DmaFault. Writes set the dirty bits of the device's HWPT while its dirty
 * tracking is on (what the IOMMU does in the IOPTEs).
 */
export class IoasDmaSpace implements DmaSpace {
  readonly #ctx: IommufdContext;
  readonly #devId: number;

  constructor(ctx: IommufdContext, devId: number) {
    this.#ctx = ctx;
    this.#devId = devId;
  }

  #walk(
    iova: bigint,
    length: number,
    access: DmaAccess,
    fn: (
      src: { mm?: import('../host/mm.js').Mm; file?: import('../host/memfd.js').MemFile },
      addr: bigint,
      done: number,
      n: number,
    ) => void,
  ): void {
    const hwpt: HwptPagingObject | undefined = this.#ctx.deviceHwpt(this.#devId);
    if (!hwpt) throw new DmaFault(iova, access, 'device not attached');
    const iopt = hwpt.ioas.iopt;
    const dirty = access === 'write' && hwpt.dirtyTracking ? hwpt.dirty : undefined;
    const need = access === 'write' ? AreaProt.WRITE : AreaProt.READ;
    let done = 0;
    while (done < length) {
      const at = iova + BigInt(done);
      const a = iopt.areaAt(at);
      if (a < 0) throw new DmaFault(at, access, 'no mapping');
      if ((iopt.areaProt(a) & need) === 0) throw new DmaFault(at, access, `mapping is not ${access}able`);
      const left = iopt.areaLast(a) - at + 1n;
      const n = left < BigInt(length - done) ? Number(left) : length - done;
      const pagesId = iopt.areaPages(a);
      const addr = iopt.pages.start(pagesId) + iopt.areaOffset(a) + (at - iopt.areaIova(a));
      const src = iopt.pages.source(pagesId);
      fn(src.file ? { file: src.file } : { mm: src.mm! }, addr, done, n);
      dirty?.mark(at, n);
      done += n;
    }
  }

  read(iova: bigint, target: Uint8Array): void {
    this.#walk(iova, target.length, 'read', (src, addr, done, n) => {
      const part = target.subarray(done, done + n);
      try {
        if (src.file) src.file.read(addr, part);
        else src.mm!.read(addr, part);
      } catch (cause) {
        throw new DmaFault(iova + BigInt(done), 'read', `backing memory gone: ${String(cause)}`);
      }
    });
  }

  write(iova: bigint, data: Uint8Array): void {
    this.#walk(iova, data.length, 'write', (src, addr, done, n) => {
      const part = data.subarray(done, done + n);
      try {
        if (src.file) src.file.write(addr, part);
        else src.mm!.write(addr, part, true);
      } catch (cause) {
        throw new DmaFault(iova + BigInt(done), 'write', `backing memory gone: ${String(cause)}`);
      }
    });
  }
}
