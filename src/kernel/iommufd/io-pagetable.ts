import { HPAGE_SIZE_N, PAGE_SIZE_N, U64_MAX } from '../../uapi/arch.js';
import { kernelError } from '../../uapi/error.js';
import { type IovaRange } from '../../uapi/iommufd.js';
import type { DirtyBitmap } from './dirty-bitmap.js';
import { IovaPageIndex, makePte, PTE_MAX_PROVIDER, PTE_MAX_SOURCE } from './iova-page-index.js';
import { OrderedU64Map } from './ordered-map.js';
import type { PagesTable } from './pages.js';
import type { MemFile } from '../host/memfd.js';
import type { Mm } from '../host/mm.js';

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

/**
 * An in-kernel user of the IOAS (`struct iommufd_access` as the io page table sees it): its IOVA
 * alignment feeds `iova_alignment`; unmaps of areas it pinned are announced to it, unless it is
 * internal (then its pins lock the areas instead).
 */
export interface IoptAccess {
  readonly iovaAlignment: bigint;
  readonly internal: boolean;
  notifyUnmap(iova: bigint, length: bigint): void;
}

/** One area's part of an access pin: pages [first, last] of the area's pages object. */
export interface AccessSeg {
  area: number;
  pagesId: number;
  first: number;
  last: number;
}

/** `num_accesses`, `num_locks` and `prevent_access` of an area; only areas with accesses have one. */
interface AreaAccessState {
  accesses: number;
  locks: number;
  prevent: boolean;
}

/** How many times IOAS_UNMAP asks accesses to unpin one area before giving up (EDEADLOCK). */
export const UNMAP_NOTIFY_TRIES = 100;

const ULONG_HALF = U64_MAX / 2n;
const PAGE_SIZE_N_NUM = Number(PAGE_SIZE_N);
const MAX_EXACT = BigInt(Number.MAX_SAFE_INTEGER);

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

/** A hole size as a tree weight, never rounded below the exact size. */
function holeWeight(size: bigint): number {
  const f = Number(size);
  return size <= MAX_EXACT ? f : f * (1 + Number.EPSILON);
}

/** A length as a search threshold, never rounded above the exact length. */
function lengthThreshold(length: bigint): number {
  const f = Number(length);
  return length <= MAX_EXACT ? f : f * (1 - Number.EPSILON);
}

/**
 * `struct io_pagetable`: the areas of one IOAS in a B+tree keyed by IOVA, each area a compact
 * record in parallel typed arrays (IOVA, last, pages id, offset in pages, prot), plus the reserved
 * and allowed ranges, the IOVA alignment rules and the accesses. Areas are pinned ("filled") while
 * at least one domain is attached; accesses pin the parts they use.
 *
 * Each area is weighted in the tree by the size of the hole in front of it, so automatic IOVA
 * allocation finds the lowest fitting hole in O(log n) instead of walking every area.
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
  /**
   * Memory providers of the areas' pages, by PTE provider id (a pages object's provider never
   * changes). Ids are not reused: areas of providers past PTE_MAX_PROVIDER go through the tree.
   */
  #providers: (Mm | MemFile)[] = [];
  #providerIds = new Map<Mm | MemFile, number>();
  /**
   * The IO page table device DMA walks (IOVA page -> PTE), kept while a domain is attached (every
   * area is then page aligned) and dropped with the last one.
   */
  #index: IovaPageIndex | undefined;
  #free: number[] = [];
  #next = 0;
  #reserved: ReservedRange[] = [];
  #allowed: IovaRange[] = [];
  #domains = 0;
  /** Dirty bits of the attached domains that track them, by domain owner. */
  #dirty = new Map<unknown, DirtyBitmap>();
  #accesses = new Set<IoptAccess>();
  #areaState = new Map<number, AreaAccessState>();
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
  get accessCount(): number {
    return this.#accesses.size;
  }
  get allowed(): readonly IovaRange[] {
    return this.#allowed;
  }
  get reserved(): readonly ReservedRange[] {
    return this.#reserved;
  }

  /** `iopt->iova_alignment`: max of domain page size, accesses' alignment, PAGE_SIZE if HUGE_PAGES=0. */
  get iovaAlignment(): bigint {
    let align = this.#domains > 0 || this.disableLargePages ? PAGE_SIZE_N : 1n;
    for (const acc of this.#accesses) if (acc.iovaAlignment > align) align = acc.iovaAlignment;
    return align;
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

  /** Inserts area `a` in the tree, weighted by the hole before it; reweighs its successor. */
  #link(a: number): void {
    const s = this.#iova[a]!;
    const l = this.#last[a]!;
    this.#tree.insertLinked(
      s,
      a,
      (prev) => holeWeight(s - (prev >= 0 ? this.#last[prev]! + 1n : 0n)),
      (next) => holeWeight(this.#iova[next]! - l - 1n),
    );
  }

  /** Removes area `a` from the tree (its successor's hole grows over it); returns the successor or -1. */
  #unlink(a: number): number {
    return this.#tree.deleteLinked(this.#iova[a]!, (prev, next) =>
      holeWeight(this.#iova[next]! - (prev >= 0 ? this.#last[prev]! + 1n : 0n)),
    );
  }

  #newArea(iova: bigint, elm: PagesElm, prot: number): number {
    let a = this.#free.pop();
    if (a === undefined) {
      if (this.#next === this.#cap) this.#grow();
      a = this.#next++;
    }
    const last = iova + elm.length - 1n;
    this.#iova[a] = iova;
    this.#last[a] = last;
    this.#off[a] = elm.offset;
    this.#pid[a] = elm.pagesId;
    this.#prot[a] = prot;
    this.pages.ref(elm.pagesId);
    this.#link(a);
    if (this.#index) this.#indexArea(this.#index, a);
    return a;
  }

  /** Frees an area record that holds no pin; returns the next area or -1. */
  #freeArea(a: number): number {
    this.#index?.clear(Number(this.#iova[a]! >> 12n), Number(this.#last[a]! >> 12n));
    const next = this.#unlink(a);
    this.pages.unref(this.#pid[a]!);
    this.#pid[a] = -1;
    if (this.#areaState.size > 0) this.#areaState.delete(a);
    this.#free.push(a);
    return next;
  }

  /** Unmaps area `a` (unpinned from the domains, dirty bits dropped); returns the next area or -1. */
  #dropArea(a: number): number {
    if (this.#domains > 0) this.#unpinArea(a);
    if (this.#dirty.size > 0) {
      const first = Number(this.#iova[a]! >> 12n);
      const last = Number(this.#last[a]! >> 12n);
      for (const bitmap of this.#dirty.values()) bitmap.clearPages(first, last);
    }
    return this.#freeArea(a);
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
  /** `num_accesses` of area `a`. */
  areaAccesses(a: number): number {
    return this.#areaState.get(a)?.accesses ?? 0;
  }
  /** `num_locks` of area `a`. */
  areaLocks(a: number): number {
    return this.#areaState.get(a)?.locks ?? 0;
  }

  #providerId(pagesId: number): number {
    const src = this.pages.source(pagesId);
    const provider = src.file ?? src.mm!;
    let id = this.#providerIds.get(provider);
    if (id === undefined) {
      id = this.#providers.length;
      this.#providers.push(provider);
      this.#providerIds.set(provider, id);
    }
    return id;
  }

  // ---- the device DMA view -------------------------------------------------------------------

  /**
   * The PTE the domains' IO page table holds for IOVA page `page` (IOVA >> 12; see
   * iova-page-index.ts: source address, provider id, prot), or 0 when it has none: no domain, no
   * area there, or an area the table does not describe. 0 is no answer: ask the area tree.
   */
  dmaPte(page: number): number {
    return this.#index ? this.#index.lookup(page) : 0;
  }

  /** The memory provider (process mm or memfd) of a PTE's provider id. */
  dmaProvider(id: number): Mm | MemFile {
    return this.#providers[id]!;
  }

  /** Enters area `a` into the IO page table, when a PTE can describe it (else DMA takes the tree). */
  #indexArea(index: IovaPageIndex, a: number): void {
    const iova = this.#iova[a]!;
    const last = this.#last[a]!;
    const source = Number(this.#sourceAddr(a, iova));
    const provider = this.#providerId(this.#pid[a]!);
    const length = Number(last - iova + 1n);
    if (
      source % PAGE_SIZE_N_NUM !== 0 ||
      source + length > PTE_MAX_SOURCE ||
      provider > PTE_MAX_PROVIDER ||
      (iova & (PAGE_SIZE_N - 1n)) !== 0n ||
      length % PAGE_SIZE_N_NUM !== 0
    ) {
      return;
    }
    index.set(Number(iova >> 12n), Number(last >> 12n), makePte(source, provider, this.#prot[a]!));
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

  /** Absolute source address (VA or file offset) of the area's byte at `iova`. */
  #sourceAddr(a: number, iova: bigint): bigint {
    return this.pages.start(this.#pid[a]!) + this.#off[a]! + (iova - this.#iova[a]!);
  }

  // ---- pinning ------------------------------------------------------------------------------

  #pinArea(a: number): void {
    const id = this.#pid[a]!;
    const [first, last] = this.pages.pageRange(id, this.#off[a]!, this.#last[a]! - this.#iova[a]! + 1n);
    // FOLL_WRITE follows the pages object (mapped WRITEABLE), not this area's prot.
    this.pages.pin(id, first, last, this.pages.writable(id));
  }

  #unpinArea(a: number): void {
    const id = this.#pid[a]!;
    const [first, last] = this.pages.pageRange(id, this.#off[a]!, this.#last[a]! - this.#iova[a]! + 1n);
    this.pages.unpin(id, first, last);
  }

  /** `iopt_check_iova_alignment`: every area's IOVA, length and page offset aligned, else EADDRINUSE. */
  #checkAlignment(align: bigint): void {
    const mask = align - 1n;
    let bad = false;
    this.#tree.scan(0n, (_k, a) => {
      const len = this.#last[a]! - this.#iova[a]! + 1n;
      const pageOffset = this.#sourceAddr(a, this.#iova[a]!) % PAGE_SIZE_N;
      if ((this.#iova[a]! & mask) !== 0n || (len & mask) !== 0n || (pageOffset & mask) !== 0n) {
        bad = true;
        return false;
      }
      return true;
    });
    if (bad) throw kernelError('EADDRINUSE', `an area is not aligned to ${align}`);
  }

  /**
   * `iopt_reserve_iova` for each range of `owner` (a device's reserved regions): a range that
   * hits an area or an allowed range -> EADDRINUSE, nothing reserved.
   */
  reserve(ranges: readonly IovaRange[], owner: unknown): void {
    for (const r of ranges) {
      const a = this.#firstFrom(r.start);
      if (a >= 0 && this.#iova[a]! <= r.last) {
        throw kernelError('EADDRINUSE', 'reserved range overlaps a mapped area');
      }
      if (this.#allowed.some((al) => overlaps(al, r.start, r.last))) {
        throw kernelError('EADDRINUSE', 'reserved range overlaps an allowed range');
      }
    }
    if (ranges.length === 0) return;
    for (const r of ranges) this.#reserved.push({ start: r.start, last: r.last, owner });
    this.#reserved.sort((x, y) => (x.start < y.start ? -1 : x.start > y.start ? 1 : 0));
  }

  /** Drops every reserved range of `owner`. */
  unreserve(owner: unknown): void {
    if (this.#reserved.some((r) => r.owner === owner)) {
      this.#reserved = this.#reserved.filter((r) => r.owner !== owner);
    }
  }

  /**
   * A domain joins (`iopt_table_add_domain`), after `reserved` is reserved for `owner`: the first
   * one raises the alignment to PAGE_SIZE (misaligned area -> EADDRINUSE) and fills every area
   * (pins; EFAULT/ENOMEM undo everything this call did). `dirty` = the domain's dirty bits,
   * cleared for every range unmapped while it is attached.
   */
  addDomain(reserved: readonly IovaRange[], owner: unknown, dirty?: DirtyBitmap): void {
    this.reserve(reserved, owner);
    try {
      if (this.#domains === 0) {
        const cur = this.iovaAlignment;
        if (PAGE_SIZE_N > cur) this.#checkAlignment(PAGE_SIZE_N);
        const all = this.areas();
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
    } catch (err) {
      this.unreserve(owner);
      throw err;
    }
    this.#domains++;
    if (!this.#index) {
      const index = new IovaPageIndex();
      for (const a of this.areas()) this.#indexArea(index, a);
      this.#index = index;
    }
    if (dirty) this.#dirty.set(owner, dirty);
  }

  /** A domain leaves: its reserved ranges go; the last one unpins every area. */
  removeDomain(owner: unknown): void {
    this.unreserve(owner);
    this.#dirty.delete(owner);
    if (--this.#domains === 0) {
      for (const a of this.areas()) this.#unpinArea(a);
      this.#index = undefined;
    }
  }

  // ---- accesses -----------------------------------------------------------------------------

  /** `iopt_add_access`: a raised alignment must fit every area (EADDRINUSE). */
  addAccess(access: IoptAccess): void {
    const cur = this.iovaAlignment;
    if (access.iovaAlignment > cur) this.#checkAlignment(access.iovaAlignment);
    this.#accesses.add(access);
  }

  removeAccess(access: IoptAccess): void {
    this.#accesses.delete(access);
  }

  /** `iommufd_access_notify_unmap`: every non-internal access is asked to unpin [iova, +length). */
  #notifyUnmap(iova: bigint, length: bigint): void {
    for (const access of [...this.#accesses]) {
      if (!access.internal && this.#accesses.has(access)) access.notifyUnmap(iova, length);
    }
  }

  /**
   * Walks the areas covering [iova, last] back to back (`iopt_for_each_contig_area`): `fn` gets
   * each area and the part [cur, end] of it inside the range. A hole (or iova unmapped) -> ENOENT
   * after the areas before it were visited.
   */
  #contig(iova: bigint, last: bigint, fn: (a: number, cur: bigint, end: bigint) => void): void {
    let cur = iova;
    let a = this.areaAt(iova);
    while (a >= 0) {
      const end = minU64(last, this.#last[a]!);
      fn(a, cur, end);
      if (end === last) return;
      cur = end + 1n;
      a = this.areaAt(cur);
    }
    throw kernelError('ENOENT', `IOVA 0x${cur.toString(16)} not mapped`);
  }

  /**
   * `iommufd_access_pin_pages` below the access: pins the pages under [iova, last] for an access
   * (`lock`: an internal access, the areas become unmappable, EBUSY). Per area: unmap in progress
   * or not page aligned at the joins -> EINVAL; prot lacks what `write` needs -> EPERM; write to
   * read-only pages -> EPERM; pin failures EFAULT/ENOMEM; hole -> ENOENT. All undone on failure.
   */
  accessPin(iova: bigint, last: bigint, write: boolean, lock: boolean): AccessSeg[] {
    const segs: AccessSeg[] = [];
    try {
      this.#contig(iova, last, (a, cur, end) => {
        const st = this.#areaState.get(a);
        const startByte = this.#sourceAddr(a, cur);
        const endByte = this.#sourceAddr(a, this.#last[a]!);
        if (
          st?.prevent ||
          startByte % PAGE_SIZE_N !== 0n ||
          (end < last && endByte % PAGE_SIZE_N !== PAGE_SIZE_N - 1n)
        ) {
          throw kernelError(
            'EINVAL',
            `area at 0x${this.#iova[a]!.toString(16)} is being unmapped or unaligned`,
          );
        }
        if ((this.#prot[a]! & (write ? AreaProt.WRITE : AreaProt.READ)) === 0) {
          throw kernelError('EPERM', `mapping is not ${write ? 'writ' : 'read'}able`);
        }
        const id = this.#pid[a]!;
        if (write && !this.pages.writable(id)) throw kernelError('EPERM', 'pages are read-only');
        const [first, lastIdx] = this.pages.pageRange(
          id,
          this.#off[a]! + (cur - this.#iova[a]!),
          end - cur + 1n,
        );
        this.pages.pin(id, first, lastIdx, this.pages.writable(id));
        const state = st ?? { accesses: 0, locks: 0, prevent: false };
        state.accesses++;
        if (lock) state.locks++;
        this.#areaState.set(a, state);
        segs.push({ area: a, pagesId: id, first, last: lastIdx });
      });
    } catch (err) {
      this.accessUnpin(segs, lock);
      throw err;
    }
    return segs;
  }

  /** Undoes one `accessPin`. */
  accessUnpin(segs: readonly AccessSeg[], lock: boolean): void {
    for (const s of segs) {
      this.pages.unpin(s.pagesId, s.first, s.last);
      const st = this.#areaState.get(s.area);
      if (!st) continue;
      st.accesses--;
      if (lock) st.locks--;
      if (st.accesses === 0 && !st.prevent) this.#areaState.delete(s.area);
    }
  }

  /**
   * `iommufd_access_rw` below the access: copies between `data` and the memory under
   * [iova, iova + data.length). Unmap in progress -> EINVAL; prot -> EPERM; write to read-only
   * pages -> EPERM; unbacked memory -> EFAULT; hole -> ENOENT (after copying what came before).
   */
  accessRw(iova: bigint, data: Uint8Array, write: boolean): void {
    const last = iova + BigInt(data.length) - 1n;
    let done = 0;
    this.#contig(iova, last, (a, cur, end) => {
      if (this.#areaState.get(a)?.prevent) throw kernelError('EINVAL', 'area is being unmapped');
      if ((this.#prot[a]! & (write ? AreaProt.WRITE : AreaProt.READ)) === 0) {
        throw kernelError('EPERM', `mapping is not ${write ? 'writ' : 'read'}able`);
      }
      const id = this.#pid[a]!;
      if (write && !this.pages.writable(id)) throw kernelError('EPERM', 'pages are read-only');
      const n = Number(end - cur + 1n);
      const part = data.subarray(done, done + n);
      const addr = this.#sourceAddr(a, cur);
      const src = this.pages.source(id);
      if (src.file) {
        if (write) src.file.write(addr, part);
        else src.file.read(addr, part);
      } else {
        const [first, lastIdx] = this.pages.pageRange(
          id,
          this.#off[a]! + (cur - this.#iova[a]!),
          end - cur + 1n,
        );
        const pinned = this.pages.isPinned(id, first, lastIdx);
        if (!pinned && !src.mm!.covers(addr, BigInt(n), write)) {
          throw kernelError('EFAULT', `cannot access 0x${addr.toString(16)}+${n}`);
        }
        if (write) src.mm!.write(addr, part, true);
        else src.mm!.read(addr, part);
      }
      done += n;
    });
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
    for (const elm of elms) {
      // iopt_insert_area: write over read-only pages, then the source's page offset.
      if (prot & AreaProt.WRITE && !this.pages.writable(elm.pagesId)) {
        throw kernelError('EPERM', 'writeable mapping of read-only pages');
      }
      const pageOffset = (this.pages.start(elm.pagesId) + elm.offset) % PAGE_SIZE_N;
      if ((pageOffset & (align - 1n)) !== 0n) {
        throw kernelError(
          'EINVAL',
          `source page offset 0x${pageOffset.toString(16)} not aligned to ${align}`,
        );
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
          this.#freeArea(a);
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

  /**
   * `iopt_alloc_iova`: the lowest fitting IOVA in the allowed windows among the holes of reserved
   * ranges + areas. Same answer as the kernel's linear walk, found through the hole weights.
   */
  allocIova(addr: bigint, length: bigint): bigint {
    if (length === 0n || length >= ULONG_HALF) throw kernelError('EOVERFLOW', 'length too large');
    let align = roundupPow2(length);
    if (addr !== 0n) {
      const low = lowestBit(addr);
      if (low < align) align = low;
    }
    const maxAlign = this.thp ? HPAGE_SIZE_N : PAGE_SIZE_N;
    if (align > maxAlign) align = maxAlign;
    if (align < this.iovaAlignment) {
      throw kernelError('EINVAL', `address alignment ${align} below IOAS alignment ${this.iovaAlignment}`);
    }
    const fit = { length, align, pageOffset: addr % PAGE_SIZE_N };
    for (const w of this.#windows()) {
      const got = this.#allocIn(w.start, w.last, fit);
      if (got !== undefined) return got;
    }
    throw kernelError('ENOSPC', 'no IOVA space for the mapping');
  }

  /** Allowed spans (touching ones merged) within [PAGE_SIZE, U64_MAX - PAGE_SIZE], ascending. */
  #windows(): IovaRange[] {
    const lo = PAGE_SIZE_N;
    const hi = U64_MAX - PAGE_SIZE_N;
    if (this.#allowed.length === 0) return [{ start: lo, last: hi }];
    const out: IovaRange[] = [];
    for (const w of this.#allowed) {
      const prev = out[out.length - 1];
      if (prev && w.start <= prev.last + 1n) prev.last = maxU64(prev.last, w.last);
      else out.push({ start: w.start, last: w.last });
    }
    const clipped: IovaRange[] = [];
    for (const w of out) {
      const start = maxU64(w.start, lo);
      const last = minU64(w.last, hi);
      if (start <= last) clipped.push({ start, last });
    }
    return clipped;
  }

  /** Lowest fit in window [ws, wl]: the hole at ws, then holes found by weight, then the tail. */
  #allocIn(ws: bigint, wl: bigint, fit: Fit): bigint | undefined {
    let p = ws;
    const at = this.areaAt(ws);
    if (at >= 0) {
      if (this.#last[at]! >= wl) return undefined;
      p = this.#last[at]! + 1n;
    }
    const n = this.#tree.ceil(p);
    const firstLast = n >= 0 ? this.#iova[n]! - 1n : U64_MAX;
    if (p <= firstLast) {
      const got = this.#fitHole(p, minU64(firstLast, wl), fit);
      if (got !== undefined || n < 0) return got;
    }
    if (this.#iova[n]! > wl) return undefined;
    const need = lengthThreshold(fit.length);
    let from = this.#iova[n]! + 1n;
    for (;;) {
      const m = this.#tree.firstAtLeast(from, need);
      if (m < 0) break;
      const prev = this.#tree.floor(this.#iova[m]! - 1n);
      const holeStart = this.#last[prev]! + 1n;
      if (holeStart > wl) return undefined;
      const got = this.#fitHole(holeStart, minU64(this.#iova[m]! - 1n, wl), fit);
      if (got !== undefined) return got;
      from = this.#iova[m]! + 1n;
    }
    const tail = this.#tree.floor(U64_MAX);
    if (this.#last[tail]! === U64_MAX || this.#last[tail]! + 1n > wl) return undefined;
    return this.#fitHole(this.#last[tail]! + 1n, wl, fit);
  }

  /** The lowest fit in [hs, hl] minus the reserved ranges. */
  #fitHole(hs: bigint, hl: bigint, fit: Fit): bigint | undefined {
    let start = hs;
    for (const r of this.#reserved) {
      if (r.last < start) continue;
      if (r.start > hl) break;
      if (r.start > start) {
        const got = fitRange(start, r.start - 1n, fit);
        if (got !== undefined) return got;
      }
      if (r.last >= hl) return undefined;
      start = r.last + 1n;
    }
    return fitRange(start, hl, fit);
  }

  // ---- unmap / copy -------------------------------------------------------------------------

  /**
   * `iopt_unmap_iova_range`: whole areas in [start, last], ascending; not atomic. Per area: locked
   * by an internal access -> EBUSY; cut by the range -> ENOENT; pinned by accesses -> they are
   * told to unpin and the area is looked at again, EDEADLOCK after 100 tries without progress.
   * Nothing unmapped -> ENOENT unless `allowEmpty` (unmap all). The kernel's other EBUSY, an area
   * still being created by a concurrent map, cannot happen here: a map is one synchronous call.
   */
  unmapRange(start: bigint, last: bigint, allowEmpty = false): bigint {
    let unmapped = 0n;
    let tries = 0;
    let from = start;
    let a = this.#firstFrom(from);
    while (a >= 0 && this.#iova[a]! <= last) {
      const aStart = this.#iova[a]!;
      const aLast = this.#last[a]!;
      const st = this.#areaState.size > 0 ? this.#areaState.get(a) : undefined;
      if (st && st.locks > 0) {
        throw kernelError('EBUSY', `area 0x${aStart.toString(16)} is locked by an internal access`);
      }
      if (aStart < from || aLast > last) {
        throw kernelError(
          'ENOENT',
          `area 0x${aStart.toString(16)}..0x${aLast.toString(16)} is cut by the range`,
        );
      }
      if (aStart !== from) tries = 0;
      if (st && st.accesses > 0) {
        from = aStart;
        st.prevent = true;
        this.#notifyUnmap(aStart, aLast - aStart + 1n);
        if (++tries > UNMAP_NOTIFY_TRIES) {
          throw kernelError('EDEADLOCK', `accesses keep area 0x${aStart.toString(16)} pinned`);
        }
        // The accesses may have changed anything: look again from `from`.
        a = this.#firstFrom(from);
        continue;
      }
      unmapped += aLast - aStart + 1n;
      a = this.#dropArea(a);
    }
    if (unmapped === 0n && !allowEmpty) throw kernelError('ENOENT', 'no area in the range');
    return unmapped;
  }

  unmapAll(): bigint {
    return this.unmapRange(0n, U64_MAX, true);
  }

  /**
   * `iopt_cut_iova` (VFIO compat TYPE1 unmaps): each IOVA inside an area becomes the last byte of
   * one area and the next IOVA the first byte of another, both on the same pages object (pins carry
   * over, nothing is charged again). Cuts stop at the first error (earlier cuts stay), in
   * `iopt_area_split`'s order: EBUSY when the area is being unmapped (an access was asked to unpin
   * it and has not); EINVAL when the new start is not on the IOVA alignment; EINVAL when an access
   * has pages of the area pinned (the pins could not be split with it); EINVAL when a domain may
   * hold the area in large pages.
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
    const st = this.#areaState.size > 0 ? this.#areaState.get(a) : undefined;
    if (st?.prevent) {
      throw kernelError('EBUSY', `area 0x${start.toString(16)} is being unmapped`);
    }
    const pid = this.#pid[a]!;
    const off = this.#off[a]!;
    const lhsLen = iova + 1n - start;
    const align = this.iovaAlignment;
    if ((iova + 1n) % align !== 0n || (this.pages.start(pid) + off + lhsLen) % align !== 0n) {
      throw kernelError('EINVAL', `cannot cut the area at 0x${iova.toString(16)}: misaligned`);
    }
    if (st && st.accesses > 0) {
      throw kernelError(
        'EINVAL',
        `cannot cut area 0x${start.toString(16)}: an access has pages of it pinned`,
      );
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
    this.#contig(iova, last, (a, cur, end) => {
      elms.push({
        pagesId: this.#pid[a]!,
        offset: this.#off[a]! + (cur - this.#iova[a]!),
        length: end - cur + 1n,
      });
    });
    return elms;
  }

  /**
   * The end of the run of back-to-back areas starting at `iova`, capped at `last`, or -1n when
   * `iova` is not mapped (what the kernel's dirty bitmap walk covers).
   */
  contigEnd(iova: bigint, last: bigint): bigint {
    let a = this.areaAt(iova);
    if (a < 0) return -1n;
    for (;;) {
      const aLast = this.#last[a]!;
      if (aLast >= last) return last;
      const n = this.#nextArea(a);
      if (n < 0 || this.#iova[n]! !== aLast + 1n) return aLast;
      a = n;
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
    if (PAGE_SIZE_N > this.iovaAlignment) this.#checkAlignment(PAGE_SIZE_N);
    this.disableLargePages = true;
  }
}

interface Fit {
  length: bigint;
  align: bigint;
  pageOffset: bigint;
}

/** `__alloc_iova_check_range`: the aligned start (page offset kept) must fit in [start, last]. */
function fitRange(start: bigint, last: bigint, fit: Fit): bigint | undefined {
  const up = start + fit.align - 1n;
  if (up > U64_MAX) return undefined;
  const cand = (up & ~(fit.align - 1n)) | fit.pageOffset;
  if (cand >= last || last - cand < fit.length - 1n) return undefined;
  return cand;
}
