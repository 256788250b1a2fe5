import type { ByteStore } from '../host/byte-store.js';
import { MemFile } from '../host/memfd.js';
import type { Mm, MmRegion } from '../host/mm.js';
import { type DmaAccess, DmaFault, type DmaSpace } from '../vfio/dma-port.js';
import type { DeviceObject, HwptPagingObject, IommufdContext } from './context.js';
import { AreaProt, type IoPagetable } from './io-pagetable.js';

const PAGE = 4096;
/** IOVAs below this go through the number fast path; above, the bigint walk. */
const FAST_LIMIT = 2 ** 53;

/** One resolved run of a DMA: `n` bytes at `at` of a store (process memory or memfd). */
interface Piece {
  store: ByteStore;
  at: number;
  done: number;
  n: number;
}

/**
 * A device's view of memory through iommufd: IOVA -> area -> pages -> the owner's bytes (process
 * memory by VA, or the memfd by offset). Unmapped IOVA, a device not attached, a write to a
 * read-only area, or memory gone from behind an area raise DmaFault, and then no byte has moved:
 * every run of the DMA is translated before any is copied. Writes set the dirty bits of the
 * device's HWPT while its dirty tracking is on (what the IOMMU does in the IOPTEs).
 *
 * The hot path (an IOVA below 2^53, a linear run of pages, one memory region) walks the IO page
 * table of the domain (IoPagetable.dmaPte) with plain numbers: no bigint arithmetic and no
 * allocation while the DMA stays in the process memory region the previous one used. Anything
 * else, faults included, takes the area tree with bigints: the tree is the truth, the table a
 * faster view of it.
 */
export class IoasDmaSpace implements DmaSpace {
  readonly #ctx: IommufdContext;
  readonly #devId: number;
  #dev: DeviceObject | undefined;
  /** The process memory region the last DMA went to, and where it was in its mm's region list. */
  #mm: Mm | undefined;
  #region: MmRegion | undefined;
  #regionIndex = -1;
  #regionStart = 0;
  #regionEnd = 0;

  constructor(ctx: IommufdContext, devId: number) {
    this.#ctx = ctx;
    this.#devId = devId;
  }

  read(iova: bigint, target: Uint8Array): void {
    this.#dma(iova, target, 'read');
  }

  write(iova: bigint, data: Uint8Array): void {
    this.#dma(iova, data, 'write');
  }

  /**
   * The IOMMU's translation of one IOVA for `access`: the address of that byte in the memory
   * behind it (process VA, or offset in the memfd). DmaFault as a one-byte DMA would raise.
   */
  translate(iova: bigint, access: DmaAccess = 'read'): number {
    const iopt = this.#hwpt(iova, access).ioas.iopt;
    const at = Number(iova);
    if (at < FAST_LIMIT) {
      const page = Math.floor(at / PAGE);
      const pte = iopt.dmaPte(page);
      const low = pte - Math.floor(pte / PAGE) * PAGE;
      if (pte !== 0 && (low & need(access)) !== 0) return pte - low + (at - page * PAGE);
    }
    const a = iopt.areaAt(iova);
    if (a < 0 || (iopt.areaProt(a) & need(access)) === 0) throw fault(a, iova, access);
    return Number(iopt.pages.start(iopt.areaPages(a)) + iopt.areaOffset(a) + (iova - iopt.areaIova(a)));
  }

  #hwpt(iova: bigint, access: DmaAccess): HwptPagingObject {
    // The device object, once found, tells its attachment itself; unbound, it is detached for good
    // and the id is looked up again.
    const hwpt = this.#dev?.hwpt ?? this.#resolve();
    if (!hwpt) throw new DmaFault(iova, access, 'device not attached');
    return hwpt;
  }

  #resolve(): HwptPagingObject | undefined {
    const hwpt = this.#ctx.deviceHwpt(this.#devId);
    this.#dev = undefined;
    if (hwpt) for (const dev of hwpt.devices) if (dev.id === this.#devId) this.#dev = dev;
    return hwpt;
  }

  #dma(iova: bigint, buf: Uint8Array, access: DmaAccess): void {
    const hwpt = this.#hwpt(iova, access);
    const length = buf.length;
    if (length === 0) return;
    // Number() is exact below 2^53 and monotonic, so `end <= FAST_LIMIT` iff the DMA ends there.
    const at = Number(iova);
    const end = at + length;
    if (end <= FAST_LIMIT && this.#fast(hwpt.ioas.iopt, at, end, buf, access === 'write')) {
      if (access === 'write' && hwpt.dirtyTracking) {
        hwpt.dirty!.markPages(Math.floor(at / PAGE), Math.floor((end - 1) / PAGE));
      }
      return;
    }
    this.#slow(hwpt, iova, buf, access);
  }

  /**
   * The DMA [at, end) through the IO page table when its pages are one linear run of one provider
   * with the access allowed, and the memory behind is one memfd range or one process region; false
   * (nothing done) for anything else, which the slow path then settles.
   */
  #fast(iopt: IoPagetable, at: number, end: number, buf: Uint8Array, write: boolean): boolean {
    const first = Math.floor(at / PAGE);
    const pte = iopt.dmaPte(first);
    const low = pte - Math.floor(pte / PAGE) * PAGE;
    if (pte === 0 || (low & (write ? AreaProt.WRITE : AreaProt.READ)) === 0) return false;
    const last = Math.floor((end - 1) / PAGE);
    for (let p = first + 1; p <= last; p++) if (iopt.dmaPte(p) !== pte + (p - first) * PAGE) return false;
    const addr = pte - low + (at - first * PAGE);
    const provider = iopt.dmaProvider(low >>> 2);
    const length = buf.length;
    if (provider instanceof MemFile) {
      if (addr + length > Number(provider.sizeBytes)) return false;
      if (write) provider.store.write(addr, buf);
      else provider.store.read(addr, buf);
      return true;
    }
    let region = this.#region;
    if (
      provider !== this.#mm ||
      addr < this.#regionStart ||
      addr + length > this.#regionEnd ||
      provider.regions[this.#regionIndex] !== region
    ) {
      region = provider.regionAt(BigInt(addr));
      if (!region) return false;
      this.#mm = provider;
      this.#region = region;
      this.#regionIndex = regionIndex(provider, region);
      this.#regionStart = Number(region.start);
      this.#regionEnd = this.#regionStart + Number(region.lengthBytes);
      if (addr + length > this.#regionEnd) return false;
    }
    if (write) region!.store.write(addr - this.#regionStart, buf);
    else region!.store.read(addr - this.#regionStart, buf);
    return true;
  }

  /** Any DMA: every run resolved first (area, permission, memory), then the bytes move. */
  #slow(hwpt: HwptPagingObject, iova: bigint, buf: Uint8Array, access: DmaAccess): void {
    const iopt = hwpt.ioas.iopt;
    const length = buf.length;
    const pieces: Piece[] = [];
    let done = 0;
    while (done < length) {
      const at = iova + BigInt(done);
      const a = iopt.areaAt(at);
      if (a < 0 || (iopt.areaProt(a) & need(access)) === 0) throw fault(a, at, access);
      const left = iopt.areaLast(a) - at + 1n;
      const n = left < BigInt(length - done) ? Number(left) : length - done;
      const pagesId = iopt.areaPages(a);
      const addr = iopt.pages.start(pagesId) + iopt.areaOffset(a) + (at - iopt.areaIova(a));
      const src = iopt.pages.source(pagesId);
      if (src.file) {
        if (addr + BigInt(n) > src.file.sizeBytes) {
          throw new DmaFault(at, access, 'backing memory gone: beyond the end of the file');
        }
        pieces.push({ store: src.file.store, at: Number(addr), done, n });
      } else resolveMm(src.mm!, addr, n, done, at, access, pieces);
      done += n;
    }
    const write = access === 'write';
    for (const p of pieces) {
      const part = buf.subarray(p.done, p.done + p.n);
      if (write) p.store.write(p.at, part);
      else p.store.read(p.at, part);
    }
    if (write && hwpt.dirtyTracking) hwpt.dirty!.mark(iova, length);
  }
}

const need = (access: DmaAccess): number => (access === 'write' ? AreaProt.WRITE : AreaProt.READ);

/** The DmaFault for `iova` when its area is `a` (-1: none) or lacks the access. */
function fault(a: number, iova: bigint, access: DmaAccess): DmaFault {
  if (a < 0) return new DmaFault(iova, access, 'no mapping');
  return new DmaFault(iova, access, `mapping is not ${access}able`);
}

/** Index of `region` in the mm's sorted region list. */
function regionIndex(mm: Mm, region: MmRegion): number {
  const regions = mm.regions;
  let lo = 0;
  let hi = regions.length - 1;
  while (lo < hi) {
    const mid = (lo + hi + 1) >>> 1;
    if (regions[mid]!.start <= region.start) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

/** The regions of `mm` under [addr, addr + n) as pieces; a hole is a DmaFault at its IOVA. */
function resolveMm(
  mm: Mm,
  addr: bigint,
  n: number,
  done: number,
  iova: bigint,
  access: DmaAccess,
  pieces: Piece[],
): void {
  let k = 0;
  while (k < n) {
    const va = addr + BigInt(k);
    const region = mm.regionAt(va);
    if (!region) {
      throw new DmaFault(
        iova + BigInt(k),
        access,
        `backing memory gone: address 0x${va.toString(16)} not mapped`,
      );
    }
    const offset = Number(va - region.start);
    const m = Math.min(n - k, Number(region.lengthBytes) - offset);
    pieces.push({ store: region.store, at: offset, done: done + k, n: m });
    k += m;
  }
}
