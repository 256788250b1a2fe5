import { kernelError } from '../../uapi/error.js';
import { HPAGE_SIZE_N, type IovaRange, PAGE_SIZE_N, U64_MAX } from '../../uapi/iommufd.js';
import { OrderedU64Map } from './ordered-map.js';
import type { PagesTable } from './pages.js';

/** Area permission bits (IOMMU_WRITE / IOMMU_READ). */
export const AreaProt = { WRITE: 1, READ: 2 } as const;

/** A run of one pages object: `length` bytes from byte `offset` of pages `pagesId`. */
export interface PagesElm {
  pagesId: number;
  offset: bigint;
  length: bigint;
}

/** A reserved IOVA range and who reserved it (a device, …). */
export interface ReservedRange extends IovaRange {
  owner: unknown;
}

const ULONG_HALF = U64_MAX / 2n;

function roundupPow2(n: bigint): bigint {
  let p = 1n;
  while (p < n) p <<= 1n;
  return p;
}

const maxU64 = (a: bigint, b: bigint): bigint => (a > b ? a : b);
const minU64 = (a: bigint, b: bigint): bigint => (a < b ? a : b);

function lowestBit(n: bigint): bigint {
  return n & -n;
}

function overlaps(a: IovaRange, start: bigint, last: bigint): boolean {
  return a.start <= last && start <= a.last;
}

/**
 * `struct io_pagetable`: the areas of one IOAS in a B+tree keyed by IOVA, each area a compact
 * record in parallel typed arrays (IOVA, last, pages id, offset in pages, prot), plus the reserved
 * and allowed ranges and the IOVA alignment rules. Areas are pinned ("filled") while at least one
 * domain is attached.
 */
export class IoPagetable {
  readonly pages: PagesTable;
  /** Whether THP is on: caps automatic alignment at 2 MiB instead of PAGE_SIZE. */
  readonly thp: boolean;
  #tree = new OrderedU64Map();
  #cap = 0;
  #iova = new BigUint64Array(0);
  #last = new BigUint64Array(0);
  #off = new BigUint64Array(0);
  #pid = new Int32Array(0);
  #prot = new Uint8Array(0);
  #free: number[] = [];
  #next = 0;
  #reserved: ReservedRange[] = [];
  #allowed: IovaRange[] = [];
  #domains = 0;
  disableLargePages = false;

  constructor(pages: PagesTable, options: { thp?: boolean } = {}) {
    this.pages = pages;
    this.thp = options.thp ?? true;
  }

  get areaCount(): number {
    return this.#tree.size;
  }
  get domainCount(): number {
    return this.#domains;
  }
  get allowed(): readonly IovaRange[] {
    return this.#allowed;
  }
  get reserved(): readonly ReservedRange[] {
    return this.#reserved;
  }

  /** `iopt->iova_alignment`. */
  get iovaAlignment(): bigint {
    return this.#domains > 0 || this.disableLargePages ? PAGE_SIZE_N : 1n;
  }

  // ---- area records -------------------------------------------------------------------------

  #grow(): void {
    const cap = Math.max(64, this.#cap * 2);
    const iova = new BigUint64Array(cap);
    iova.set(this.#iova);
    this.#iova = iova;
    const last = new BigUint64Array(cap);
    last.set(this.#last);
    this.#last = last;
    const off = new BigUint64Array(cap);
    off.set(this.#off);
    this.#off = off;
    const pid = new Int32Array(cap);
    pid.set(this.#pid);
    this.#pid = pid;
    const prot = new Uint8Array(cap);
    prot.set(this.#prot);
    this.#prot = prot;
    this.#cap = cap;
  }

  #newArea(iova: bigint, elm: PagesElm, prot: number): number {
    let a = this.#free.pop();
    if (a === undefined) {
      if (this.#next === this.#cap) this.#grow();
      a = this.#next++;
    }
    this.#iova[a] = iova;
    this.#last[a] = iova + elm.length - 1n;
    this.#off[a] = elm.offset;
    this.#pid[a] = elm.pagesId;
    this.#prot[a] = prot;
    this.pages.ref(elm.pagesId);
    this.#tree.set(iova, a);
    return a;
  }

  #dropArea(a: number): void {
    if (this.#domains > 0) this.#unpinArea(a);
    this.#tree.delete(this.#iova[a]!);
    this.pages.unref(this.#pid[a]!);
    this.#pid[a] = -1;
    this.#free.push(a);
  }

  areaIova(a: number): bigint {
    return this.#iova[a]!;
  }
  areaLast(a: number): bigint {
    return this.#last[a]!;
  }
  areaPages(a: number): number {
    return this.#pid[a]!;
  }
  areaOffset(a: number): bigint {
    return this.#off[a]!;
  }
  areaProt(a: number): number {
    return this.#prot[a]!;
  }

  /** The area containing `iova`, or -1. */
  areaAt(iova: bigint): number {
    const a = this.#tree.floor(iova);
    return a >= 0 && this.#last[a]! >= iova ? a : -1;
  }

  /** Areas in ascending IOVA order (snapshot). */
  areas(): number[] {
    const out: number[] = [];
    this.#tree.scan(0n, (_k, a) => {
      out.push(a);
      return true;
    });
    return out;
  }

  /** First area intersecting [start, …), or -1. */
  #firstFrom(start: bigint): number {
    const a = this.areaAt(start);
    return a >= 0 ? a : this.#tree.ceil(start);
  }

  #nextArea(a: number): number {
    const last = this.#last[a]!;
    return last === U64_MAX ? -1 : this.#tree.ceil(last + 1n);
  }

  // ---- pinning ------------------------------------------------------------------------------

  #pinArea(a: number): void {
    const id = this.#pid[a]!;
    const [first, last] = this.pages.pageRange(id, this.#off[a]!, this.#last[a]! - this.#iova[a]! + 1n);
    this.pages.pin(id, first, last, (this.#prot[a]! & AreaProt.WRITE) !== 0);
  }

  #unpinArea(a: number): void {
    const id = this.#pid[a]!;
    const [first, last] = this.pages.pageRange(id, this.#off[a]!, this.#last[a]! - this.#iova[a]! + 1n);
    this.pages.unpin(id, first, last);
  }

  /**
   * A domain joins: the first one raises the alignment to PAGE_SIZE (misaligned area ->
   * EADDRINUSE) and fills every area (pins; EFAULT/ENOMEM undo everything this call pinned).
   */
  addDomain(reserved: readonly IovaRange[], owner: unknown): void {
    for (const r of reserved) {
      if (this.#firstFrom(r.start) >= 0 && this.#iova[this.#firstFrom(r.start)]! <= r.last) {
        throw kernelError('EADDRINUSE', 'device reserved range overlaps a mapped area');
      }
      if (this.#allowed.some((al) => overlaps(al, r.start, r.last))) {
        throw kernelError('EADDRINUSE', 'device reserved range overlaps an allowed range');
      }
    }
    if (this.#domains === 0) {
      const all = this.areas();
      const mask = PAGE_SIZE_N - 1n;
      for (const a of all) {
        const pagesStart = this.pages.start(this.#pid[a]!) + this.#off[a]!;
        const len = this.#last[a]! - this.#iova[a]! + 1n;
        if ((this.#iova[a]! & mask) !== 0n || (len & mask) !== 0n || (pagesStart & mask) !== 0n) {
          throw kernelError('EADDRINUSE', 'an area is not aligned to the domain page size');
        }
      }
      let done = 0;
      try {
        for (const a of all) {
          this.#pinArea(a);
          done++;
        }
      } catch (err) {
        for (let i = 0; i < done; i++) this.#unpinArea(all[i]!);
        throw err;
      }
    }
    this.#domains++;
    for (const r of reserved) this.#reserved.push({ start: r.start, last: r.last, owner });
    this.#reserved.sort((x, y) => (x.start < y.start ? -1 : x.start > y.start ? 1 : 0));
  }

  /** A domain leaves: its reserved ranges go; the last one unpins every area. */
  removeDomain(owner: unknown): void {
    this.#reserved = this.#reserved.filter((r) => r.owner !== owner);
    if (--this.#domains === 0) for (const a of this.areas()) this.#unpinArea(a);
  }

  // ---- map ----------------------------------------------------------------------------------

  /**
   * `iopt_map_pages`: maps `elms` back to back at `iova` (fixed) or at an allocated IOVA (`iova`
   * undefined, allocation hinted by `addr`). Returns the IOVA. Takes its own references on pages.
   */
  map(elms: PagesElm[], length: bigint, iova: bigint | undefined, prot: number, addr: bigint): bigint {
    const align = this.iovaAlignment;
    if (length === 0n || length % align !== 0n) {
      throw kernelError('EINVAL', `length 0x${length.toString(16)} not a multiple of ${align}`);
    }
    const at = iova === undefined ? this.allocIova(addr, length) : this.#checkIova(iova, length);
    if (prot & AreaProt.WRITE) {
      for (const elm of elms) {
        if (!this.pages.writable(elm.pagesId)) {
          throw kernelError('EPERM', 'writeable mapping of read-only pages');
        }
      }
    }
    const added: number[] = [];
    let cur = at;
    for (const elm of elms) {
      added.push(this.#newArea(cur, elm, prot));
      cur += elm.length;
    }
    if (this.#domains > 0) {
      let pinned = 0;
      try {
        for (const a of added) {
          this.#pinArea(a);
          pinned++;
        }
      } catch (err) {
        for (let i = 0; i < added.length; i++) {
          const a = added[i]!;
          if (i < pinned) this.#unpinArea(a);
          this.#tree.delete(this.#iova[a]!);
          this.pages.unref(this.#pid[a]!);
          this.#free.push(a);
        }
        throw err;
      }
    }
    return at;
  }

  /** `iopt_check_iova`. */
  #checkIova(iova: bigint, length: bigint): bigint {
    if (iova % this.iovaAlignment !== 0n) {
      throw kernelError('EINVAL', `IOVA 0x${iova.toString(16)} misaligned`);
    }
    const last = iova + length - 1n;
    if (last > U64_MAX) throw kernelError('EOVERFLOW', 'IOVA + length overflows');
    if (this.#reserved.some((r) => overlaps(r, iova, last))) {
      throw kernelError('EINVAL', 'IOVA range hits a reserved range');
    }
    const a = this.#tree.floor(last);
    if (a >= 0 && this.#last[a]! >= iova) {
      throw kernelError('EEXIST', `IOVA 0x${iova.toString(16)} overlaps an existing area`);
    }
    return iova;
  }

  /** `iopt_alloc_iova`: lowest fit in the allowed windows among holes of reserved + areas. */
  allocIova(addr: bigint, length: bigint): bigint {
    if (length === 0n || length >= ULONG_HALF) throw kernelError('EOVERFLOW', 'length too large');
    let align = roundupPow2(length);
    if (addr !== 0n) {
      const low = lowestBit(addr);
      if (low < align) align = low;
    }
    const maxAlign = this.thp && !this.disableLargePages ? HPAGE_SIZE_N : PAGE_SIZE_N;
    if (align > maxAlign) align = maxAlign;
    if (align < this.iovaAlignment) {
      throw kernelError('EINVAL', `address alignment ${align} below IOAS alignment ${this.iovaAlignment}`);
    }
    const pageOffset = addr % PAGE_SIZE_N;
    const lo = PAGE_SIZE_N;
    const hi = U64_MAX - PAGE_SIZE_N;
    const windows: IovaRange[] = [];
    if (this.#allowed.length === 0) windows.push({ start: lo, last: hi });
    else {
      for (const w of this.#allowed) {
        const start = maxU64(w.start, lo);
        const last = minU64(w.last, hi);
        if (start <= last) windows.push({ start, last });
      }
    }
    const fit = (hs: bigint, hl: bigint): bigint | undefined => {
      if (hl - hs < length - 1n) return undefined;
      const cand = (((hs + align - 1n) / align) * align) | pageOffset;
      if (cand > hl || hl - cand < length - 1n) return undefined;
      return cand;
    };
    for (const w of windows) {
      let holeStart = w.start;
      let ri = 0;
      let a = this.#firstFrom(w.start);
      while (holeStart <= w.last) {
        // Next used span (reserved or area) by start, among those ending at/after holeStart.
        while (ri < this.#reserved.length && this.#reserved[ri]!.last < holeStart) ri++;
        while (a >= 0 && this.#last[a]! < holeStart) a = this.#nextArea(a);
        const r = this.#reserved[ri];
        let s: bigint;
        let l: bigint;
        if (r && (a < 0 || r.start <= this.#iova[a]!)) {
          s = r.start;
          l = r.last;
        } else if (a >= 0) {
          s = this.#iova[a]!;
          l = this.#last[a]!;
        } else {
          break;
        }
        if (s > w.last) break;
        if (s > holeStart) {
          const got = fit(holeStart, s - 1n);
          if (got !== undefined) return got;
        }
        if (l + 1n > holeStart) holeStart = l + 1n;
      }
      if (holeStart <= w.last) {
        const got = fit(holeStart, w.last);
        if (got !== undefined) return got;
      }
    }
    throw kernelError('ENOSPC', 'no IOVA space for the mapping');
  }

  // ---- unmap / copy -------------------------------------------------------------------------

  /** `iopt_unmap_iova_range`: whole areas in [start, last], ascending; not atomic. */
  unmapRange(start: bigint, last: bigint): bigint {
    let unmapped = 0n;
    let a = this.#firstFrom(start);
    while (a >= 0 && this.#iova[a]! <= last) {
      const aStart = this.#iova[a]!;
      const aLast = this.#last[a]!;
      if (aStart < start || aLast > last) {
        throw kernelError(
          'ENOENT',
          `area 0x${aStart.toString(16)}..0x${aLast.toString(16)} is cut by the range`,
        );
      }
      const next = this.#nextArea(a);
      this.#dropArea(a);
      unmapped += aLast - aStart + 1n;
      a = next;
    }
    if (unmapped === 0n) throw kernelError('ENOENT', 'no area in the range');
    return unmapped;
  }

  unmapAll(): bigint {
    try {
      return this.unmapRange(0n, U64_MAX);
    } catch (err) {
      if (this.#tree.size === 0 && (err as { errno?: string }).errno === 'ENOENT') return 0n;
      throw err;
    }
  }

  /**
   * `iopt_cut_iova` (VFIO compat TYPE1 unmaps): each IOVA inside an area becomes the last byte of
   * one area and the next IOVA the first byte of another, both on the same pages object (pins carry
   * over, nothing is charged again). Cuts stop at the first error: EINVAL when the new start is
   * not on the IOVA alignment, or when a domain may hold the area in large pages.
   */
  cutIova(iovas: readonly bigint[]): void {
    for (const iova of iovas) {
      const a = this.areaAt(iova);
      if (a >= 0) this.#splitArea(a, iova);
    }
  }

  /** `iopt_area_split`: `iova` becomes the last byte of the lower half. */
  #splitArea(a: number, iova: bigint): void {
    const start = this.#iova[a]!;
    const last = this.#last[a]!;
    if (iova === start || iova === last) return;
    const pid = this.#pid[a]!;
    const off = this.#off[a]!;
    const lhsLen = iova + 1n - start;
    const align = this.iovaAlignment;
    if ((iova + 1n) % align !== 0n || (this.pages.start(pid) + off + lhsLen) % align !== 0n) {
      throw kernelError('EINVAL', `cannot cut the area at 0x${iova.toString(16)}: misaligned`);
    }
    if (this.#domains > 0 && !this.disableLargePages) {
      throw kernelError('EINVAL', 'cannot cut an area a domain may hold in large pages');
    }
    const whole = this.pages.pageRange(pid, off, last - start + 1n);
    const lhs = this.pages.pageRange(pid, off, lhsLen);
    const rhs = this.pages.pageRange(pid, off + lhsLen, last - iova);
    const write = (this.#prot[a]! & AreaProt.WRITE) !== 0;
    this.#last[a] = iova;
    this.#newArea(iova + 1n, { pagesId: pid, offset: off + lhsLen, length: last - iova }, this.#prot[a]!);
    if (this.#domains > 0) {
      this.pages.pin(pid, lhs[0], lhs[1], write);
      this.pages.pin(pid, rhs[0], rhs[1], write);
      this.pages.unpin(pid, whole[0], whole[1]);
    }
  }

  /** `iopt_get_pages`: the pages runs covering [iova, iova + length), which must be fully mapped. */
  getPages(iova: bigint, length: bigint): PagesElm[] {
    if (length === 0n) throw kernelError('EINVAL', 'length 0');
    const last = iova + length - 1n;
    if (last > U64_MAX) throw kernelError('EOVERFLOW', 'IOVA + length overflows');
    const elms: PagesElm[] = [];
    let cur = iova;
    let a = this.areaAt(iova);
    while (true) {
      if (a < 0 || this.#iova[a]! > cur) throw kernelError('ENOENT', `IOVA 0x${cur.toString(16)} not mapped`);
      const aLast = this.#last[a]!;
      const end = minU64(aLast, last);
      elms.push({
        pagesId: this.#pid[a]!,
        offset: this.#off[a]! + (cur - this.#iova[a]!),
        length: end - cur + 1n,
      });
      if (end === last) return elms;
      cur = end + 1n;
      a = this.#nextArea(a);
    }
  }

  // ---- ranges -------------------------------------------------------------------------------

  /** Holes of the reserved set over [0, U64_MAX]. */
  usableRanges(): IovaRange[] {
    const out: IovaRange[] = [];
    let at = 0n;
    for (const r of this.#reserved) {
      if (r.start > at) out.push({ start: at, last: r.start - 1n });
      if (r.last + 1n > at) at = r.last + 1n;
    }
    if (at <= U64_MAX) out.push({ start: at, last: U64_MAX });
    return out;
  }

  /** `iopt_set_allow_iova`: ranges already validated against each other; reserved clash -> EADDRINUSE. */
  setAllowed(ranges: IovaRange[]): void {
    for (const al of ranges) {
      if (this.#reserved.some((r) => overlaps(r, al.start, al.last))) {
        throw kernelError('EADDRINUSE', 'allowed range overlaps a reserved range');
      }
    }
    this.#allowed = [...ranges].sort((x, y) => (x.start < y.start ? -1 : x.start > y.start ? 1 : 0));
  }

  /** HUGE_PAGES=0 check: `iopt_disable_large_pages`. */
  disableLarge(): void {
    if (this.disableLargePages) return;
    if (this.#domains > 0 && this.#tree.size > 0) {
      throw kernelError('EINVAL', 'cannot disable large pages with a domain and areas');
    }
    const mask = PAGE_SIZE_N - 1n;
    for (const a of this.areas()) {
      const len = this.#last[a]! - this.#iova[a]! + 1n;
      if ((this.#iova[a]! & mask) !== 0n || (len & mask) !== 0n) {
        throw kernelError('EADDRINUSE', 'an area is not PAGE_SIZE aligned');
      }
    }
    this.disableLargePages = true;
  }
}
