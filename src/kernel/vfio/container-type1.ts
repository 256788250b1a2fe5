import { PAGE_SIZE_N, U64_MAX } from '../../uapi/arch.js';
import { internalError, kernelError, VfioError } from '../../uapi/error.js';
import { type IovaRange } from '../../uapi/iommufd.js';
import {
  DIRTY_BITMAP_SIZE_MAX,
  VfioDmaMapFlag,
  VfioDmaUnmapFlag,
  VfioExtension,
  VfioIommuInfoCapId,
  VfioIommuInfoFlag,
} from '../../uapi/vfio-type1.js';
import type { Cgroup } from '../host/cgroup.js';
import type { Process } from '../host/host.js';
import { OrderedU64Map } from '../iommufd/ordered-map.js';
import {
  checkU64,
  IommuProt,
  lowestBit,
  PAGE_MASK,
  type VfioDmaMapArgs,
  type VfioDmaUnmapArgs,
  type VfioIommuInfo,
  type VfioIommuInfoCap,
  type VfioIovaRange,
} from './container-api.js';
import {
  accountLockedVm,
  captureBacking,
  dmaPages,
  firstUnpinnablePage,
  lockAcct,
  moveDmaCgroup,
  PinnedPage,
  type VfioDma,
} from './container-dma.js';

/** What the type1 driver needs to know of an IOMMU group. */
export interface Type1Group {
  readonly name: string;
  /** 'iommu': behind a real IOMMU (vfio-pci); 'emulated': an mdev (vfio_register_emulated_iommu_dev). */
  readonly type: 'iommu' | 'emulated';
  /** Reserved IOVA regions of the group's devices (MSI windows, RMRRs), inclusive. */
  readonly reservedIovaRanges: readonly IovaRange[];
  /** The IOMMU domain geometry (`aperture_start`, `aperture_end`). */
  readonly aperture: VfioIovaRange;
  /** The domain's page sizes. */
  readonly pgsizeBitmap: bigint;
  /** The IOMMU driver ("ops") behind the group: groups with the same ops share a domain. */
  readonly iommuOps: string;
}

/** A device registered with the container (`vfio_iommu_type1_register_device`): it has `dma_unmap`. */
export interface Type1Device {
  readonly name: string;
  /** `ops->dma_unmap`: the device must unpin every page it pinned in [iova, iova + length). */
  dmaUnmap(iova: bigint, length: bigint): void;
}

interface Domain {
  readonly iommuOps: string;
  readonly groups: Set<Type1Group>;
  readonly pgsizeBitmap: bigint;
  readonly aperture: VfioIovaRange;
}

/** A dma's state, for tests and diagnostics. */
export interface VfioDmaInfo {
  iova: bigint;
  size: bigint;
  vaddr: bigint;
  prot: number;
  iommuMapped: boolean;
  vaddrInvalid: boolean;
  lockedVm: number;
  /** Pages pinned through vfio_pin_pages(). */
  externalPins: number;
  owner: Process;
  /** softvfio cgroup extension: where the dma's pins are charged, and how many pages. */
  cgroup: Cgroup | undefined;
  cgroupPages: number;
}

const UNMAP_RETRIES_MAX = 10;

/**
 * `struct vfio_iommu`: the type1 IOMMU driver state of one container (drivers/vfio/
 * vfio_iommu_type1.c, v6.3+ semantics). vfio_dma records live in a B+tree keyed by IOVA.
 *
 * Pinning and accounting: with an IOMMU domain every page of every dma is pinned at MAP (or at the
 * first domain attach, "replay") and charged to the mapping mm's `locked_vm`, RLIMIT_MEMLOCK
 * checked while pinning. Without a domain (mdev-only), MAP pins nothing and vfio_pin_pages()
 * charges page by page. A dma's charge is always `iommuMapped ? pages : externally pinned pages`:
 * a page pinned both ways is charged once; two dmas of the same memory are charged twice.
 * `mm->pinned_vm` is never touched (iommufd moves it, type1 does not).
 *
 * softvfio cgroup extension: every charge also goes to the owning process's cgroup hierarchy
 * (`lockAcct`), CAP_IPC_LOCK or not; over a cgroup limit, ENOMEM with the pin undone.
 */
export class Type1Iommu {
  readonly v2: boolean;
  #tree = new OrderedU64Map();
  #slots: (VfioDma | undefined)[] = [];
  #free: number[] = [];
  #dmaAvail: number;
  #vaddrInvalidCount = 0;
  #pgsizeBitmap = PAGE_MASK;
  #domains: Domain[] = [];
  #emulated = new Set<Type1Group>();
  #iovaList: VfioIovaRange[] = [];
  #devices = new Set<Type1Device>();

  /** `vfio_iommu_type1_open`: `dma_avail` starts at the module's `dma_entry_limit`. */
  constructor(options: { v2: boolean; dmaEntryLimit: number }) {
    this.v2 = options.v2;
    this.#dmaAvail = options.dmaEntryLimit;
  }

  // ---- introspection --------------------------------------------------------------------------

  get dmaAvail(): number {
    return this.#dmaAvail;
  }
  get dmaCount(): number {
    return this.#tree.size;
  }
  get vaddrInvalidCount(): number {
    return this.#vaddrInvalidCount;
  }
  get domainCount(): number {
    return this.#domains.length;
  }
  get hasEmulatedGroups(): boolean {
    return this.#emulated.size > 0;
  }
  get pgsizeBitmap(): bigint {
    return this.#pgsizeBitmap;
  }
  get iovaRanges(): readonly VfioIovaRange[] {
    return this.#iovaList;
  }

  dmas(): VfioDmaInfo[] {
    const out: VfioDmaInfo[] = [];
    this.#tree.scan(0n, (_k, slot) => {
      const d = this.#slots[slot]!;
      out.push({
        iova: d.iova,
        size: d.size,
        vaddr: d.vaddr,
        prot: d.prot,
        iommuMapped: d.iommuMapped,
        vaddrInvalid: d.vaddrInvalid,
        lockedVm: d.lockedVm,
        externalPins: d.pfns.size,
        owner: d.task,
        cgroup: d.cgroup,
        cgroupPages: d.cgroupPages,
      });
      return true;
    });
    return out;
  }

  /** Whether `group` sits in one of the container's IOMMU domains. */
  inDomain(group: Type1Group): boolean {
    return this.#domains.some((d) => d.groups.has(group));
  }

  /** The dma holding `iova` if it is pinned and mapped into the domains (device DMA's view). */
  mappedDmaAt(iova: bigint): VfioDma | undefined {
    const dma = this.#find(iova, 1n);
    return dma?.iommuMapped ? dma : undefined;
  }

  // ---- the dma tree ---------------------------------------------------------------------------

  #dma(slot: number): VfioDma | undefined {
    return slot < 0 ? undefined : this.#slots[slot];
  }

  /**
   * `vfio_find_dma(start, size)`: a dma intersecting [start, start + size). With size 0 (only
   * used for "the dma holding this byte, not starting at it") a dma starting at `start` is not
   * a match, as in the kernel's rb-tree walk.
   */
  #find(start: bigint, size: bigint): VfioDma | undefined {
    const below = this.#dma(this.#tree.floor(start));
    if (below && below.iova + below.size > start && (size > 0n || below.iova < start)) return below;
    if (size === 0n) return undefined;
    let above = this.#dma(this.#tree.ceil(start));
    if (above && above === below) above = this.#dma(this.#tree.ceil(start + 1n));
    return above && above.iova < start + size ? above : undefined;
  }

  /** `vfio_find_dma_first_node`: the lowest dma ending after `start` and starting before `start + size`. */
  #first(start: bigint, size: bigint): VfioDma | undefined {
    const below = this.#dma(this.#tree.floor(start));
    const cand = below && below.iova + below.size > start ? below : this.#dma(this.#ceilAfter(start));
    if (cand && size > 0n && cand.iova >= start + size) return undefined;
    return cand;
  }

  #ceilAfter(iova: bigint): number {
    return iova > U64_MAX ? -1 : this.#tree.ceil(iova);
  }

  #next(dma: VfioDma): VfioDma | undefined {
    return this.#dma(this.#ceilAfter(dma.iova + 1n));
  }

  #link(dma: VfioDma): void {
    const slot = this.#free.pop() ?? this.#slots.length;
    this.#slots[slot] = dma;
    this.#tree.set(dma.iova, slot);
  }

  #unlink(dma: VfioDma): void {
    const slot = this.#tree.get(dma.iova);
    this.#tree.delete(dma.iova);
    this.#slots[slot] = undefined;
    this.#free.push(slot);
  }

  #all(): VfioDma[] {
    const out: VfioDma[] = [];
    this.#tree.scan(0n, (_k, slot) => {
      out.push(this.#slots[slot]!);
      return true;
    });
    return out;
  }

  // ---- pinning --------------------------------------------------------------------------------

  /**
   * Pins every page of `dma` for the IOMMU domains (`vfio_pin_map_dma`, or replay): pages come
   * from `current`'s mm at the dma's vaddr, `current`'s locked_vm and RLIMIT_MEMLOCK are checked
   * page by page (unless the dma has lock_cap), then the charge goes to the dma's mm. Pages already
   * pinned through vfio_pin_pages() are already charged. EFAULT or ENOMEM at the first page that
   * fails; nothing stays pinned or charged.
   */
  #pinForDomains(dma: VfioDma, current: Process): void {
    const npages = dmaPages(dma);
    const write = (dma.prot & IommuProt.WRITE) !== 0;
    const faultAt = firstUnpinnablePage(current.mm, dma.vaddr, dma.size, write);
    const chargeable = npages - dma.pfns.size;
    let limitAt = -1;
    if (!dma.lockCap) {
      const allowed = current.memlockLimitPages - current.mm.lockedVm;
      if (chargeable > allowed) limitAt = this.#nthChargeable(dma, Math.max(allowed, 0));
    }
    if (faultAt >= 0 && (limitAt < 0 || faultAt <= limitAt)) {
      throw kernelError(
        'EFAULT',
        `cannot pin vaddr 0x${(dma.vaddr + BigInt(faultAt) * PAGE_SIZE_N).toString(16)} of IOVA 0x${dma.iova.toString(16)}`,
        { op: 'pin_user_pages' },
      );
    }
    if (limitAt >= 0) {
      throw kernelError('ENOMEM', `RLIMIT_MEMLOCK (${current.rlimitMemlockBytes}) exceeded`, {
        op: 'vfio_pin_pages_remote',
      });
    }
    lockAcct(dma, chargeable, false);
    dma.backing = captureBacking(current.mm, dma.vaddr, dma.size);
    dma.iommuMapped = true;
  }

  /** Index of the `n`-th (0-based) page of `dma` not pinned through vfio_pin_pages(). */
  #nthChargeable(dma: VfioDma, n: number): number {
    let idx = n;
    for (const p of [...dma.pfns.keys()].sort((a, b) => a - b)) {
      if (p <= idx) idx++;
      else break;
    }
    return idx;
  }

  /**
   * `vfio_unmap_unpin`: unmaps `dma` from the domains and unpins its pages. With accounting, the
   * pages not also pinned through vfio_pin_pages() are released from the charge; without, the
   * caller re-accounts.
   */
  #unpinFromDomains(dma: VfioDma, doAccounting: boolean): void {
    if (!dma.iommuMapped) return;
    dma.iommuMapped = false;
    dma.backing = undefined;
    if (doAccounting) lockAcct(dma, dma.pfns.size - dmaPages(dma), true);
  }

  /** `vfio_remove_dma`. */
  #remove(dma: VfioDma): void {
    if (dma.pfns.size > 0) throw internalError(`dma 0x${dma.iova.toString(16)} removed with pinned pages`);
    this.#unpinFromDomains(dma, true);
    this.#unlink(dma);
    if (dma.vaddrInvalid) this.#vaddrInvalidCount--;
    this.#dmaAvail++;
  }

  #removeAll(): void {
    for (const dma of this.#all()) this.#remove(dma);
  }

  // ---- VFIO_CHECK_EXTENSION / VFIO_IOMMU_GET_INFO ---------------------------------------------

  /**
   * `vfio_iommu_type1_check_extension`; `iommu` undefined = asked before VFIO_SET_IOMMU, where
   * VFIO_UPDATE_VADDR and VFIO_DMA_CC_IOMMU answer 0. VFIO_UPDATE_VADDR is 0 while an emulated
   * (mdev) group is attached. TYPE1_NESTING is not modeled (removed from newer kernels): 0.
   */
  static checkExtension(iommu: Type1Iommu | undefined, ext: number): number {
    switch (ext) {
      case VfioExtension.TYPE1_IOMMU:
      case VfioExtension.TYPE1v2_IOMMU:
      case VfioExtension.UNMAP_ALL:
        return 1;
      case VfioExtension.UPDATE_VADDR:
        return iommu && !iommu.hasEmulatedGroups ? 1 : 0;
      case VfioExtension.DMA_CC_IOMMU:
        // softvfio domains always enforce cache coherency.
        return iommu ? 1 : 0;
      default:
        return 0;
    }
  }

  /** `vfio_iommu_type1_get_info`: caps MIGRATION, DMA_AVAIL, then IOVA_RANGE when the list is not empty. */
  getInfo(): VfioIommuInfo {
    const caps: VfioIommuInfoCap[] = [
      {
        id: VfioIommuInfoCapId.MIGRATION,
        version: 1,
        flags: 0,
        pgsizeBitmap: lowestBit(this.#pgsizeBitmap),
        maxDirtyBitmapSize: DIRTY_BITMAP_SIZE_MAX,
      },
      { id: VfioIommuInfoCapId.DMA_AVAIL, version: 1, avail: this.#dmaAvail },
    ];
    if (this.#iovaList.length > 0) {
      caps.push({
        id: VfioIommuInfoCapId.IOVA_RANGE,
        version: 1,
        iovaRanges: this.#iovaList.map((r) => ({ ...r })),
      });
    }
    return {
      flags: VfioIommuInfoFlag.PGSIZES | VfioIommuInfoFlag.CAPS,
      iovaPgsizes: this.#pgsizeBitmap,
      caps,
    };
  }

  // ---- VFIO_IOMMU_MAP_DMA ---------------------------------------------------------------------

  /** `vfio_iommu_type1_map_dma` + `vfio_dma_do_map`, `current` = the calling process. */
  mapDma(current: Process, args: VfioDmaMapArgs): void {
    const op = 'VFIO_IOMMU_MAP_DMA';
    const all = VfioDmaMapFlag.READ | VfioDmaMapFlag.WRITE | VfioDmaMapFlag.VADDR;
    if ((args.flags & ~all) !== 0)
      throw kernelError('EINVAL', `unknown flags 0x${args.flags.toString(16)}`, { op });
    checkU64(args.iova, 'iova', op);
    checkU64(args.vaddr, 'vaddr', op);
    checkU64(args.size, 'size', op);
    const setVaddr = (args.flags & VfioDmaMapFlag.VADDR) !== 0;
    let prot = 0;
    if (args.flags & VfioDmaMapFlag.WRITE) prot |= IommuProt.WRITE;
    if (args.flags & VfioDmaMapFlag.READ) prot |= IommuProt.READ;
    if ((prot !== 0 && setVaddr) || (prot === 0 && !setVaddr)) {
      throw kernelError('EINVAL', setVaddr ? 'READ/WRITE with VADDR' : 'neither READ nor WRITE', { op });
    }
    const { iova, vaddr, size } = args;
    const mask = lowestBit(this.#pgsizeBitmap) - 1n;
    if (size === 0n || ((size | iova | vaddr) & mask) !== 0n) {
      throw kernelError('EINVAL', 'size 0, or size/iova/vaddr not aligned to the IOMMU page size', { op });
    }
    if (iova + size - 1n > U64_MAX || vaddr + size - 1n > U64_MAX) {
      throw kernelError('EINVAL', 'IOVA or vaddr range wraps', { op });
    }
    const hit = this.#find(iova, size);
    if (setVaddr) {
      if (!hit) throw kernelError('ENOENT', `no mapping at IOVA 0x${iova.toString(16)}`, { op });
      if (!hit.vaddrInvalid || hit.iova !== iova || hit.size !== size) {
        throw kernelError('EINVAL', 'VADDR must match exactly one mapping whose vaddr was invalidated', {
          op,
        });
      }
      this.#changeOwner(hit, current, op);
      hit.vaddr = vaddr;
      hit.vaddrInvalid = false;
      this.#vaddrInvalidCount--;
      return;
    }
    if (hit) throw kernelError('EEXIST', `IOVA 0x${iova.toString(16)} overlaps an existing mapping`, { op });
    if (this.#dmaAvail === 0) {
      throw kernelError('ENOSPC', 'no DMA mapping entries left (vfio_iommu_type1 dma_entry_limit)', { op });
    }
    if (!this.#iovaValid(iova, iova + size - 1n)) {
      throw kernelError('EINVAL', `IOVA 0x${iova.toString(16)} is outside the valid IOVA ranges`, { op });
    }
    this.#dmaAvail--;
    const dma: VfioDma = {
      iova,
      size,
      vaddr,
      prot,
      iommuMapped: false,
      backing: undefined,
      lockCap: current.hasCap('CAP_IPC_LOCK'),
      task: current,
      mm: current.mm,
      lockedVm: 0,
      cgroup: undefined,
      cgroupPages: 0,
      vaddrInvalid: false,
      pfns: new Map(),
    };
    this.#link(dma);
    if (this.#domains.length === 0) return;
    try {
      this.#pinForDomains(dma, current);
    } catch (err) {
      this.#remove(dma);
      throw withOp(err, op);
    }
  }

  /** `vfio_iommu_iova_dma_valid`: inside one valid range, or no list at all (mdev only). */
  #iovaValid(start: bigint, end: bigint): boolean {
    if (this.#iovaList.length === 0) return true;
    return this.#iovaList.some((r) => start >= r.start && end <= r.end);
  }

  /**
   * `vfio_change_dma_owner` (v6.3+): the dma's charge moves to `current`'s mm, checked against its
   * RLIMIT_MEMLOCK (ENOMEM: nothing changes); the old mm is released if anyone still uses it.
   * softvfio cgroup extension: the cgroup charge moves to `current`'s cgroup first (ENOMEM over a
   * limit: nothing changes).
   */
  #changeOwner(dma: VfioDma, current: Process, op: string): void {
    if (current.mm === dma.mm) return;
    const lockCap = current.hasCap('CAP_IPC_LOCK');
    let undoCgroup = (): void => {};
    try {
      undoCgroup = moveDmaCgroup(dma, current.cgroup);
      accountLockedVm(current.mm, current, lockCap, dma.lockedVm);
    } catch (err) {
      undoCgroup();
      throw withOp(err, op);
    }
    if (dma.mm.alive) accountLockedVm(dma.mm, dma.task, dma.lockCap, -dma.lockedVm);
    dma.task = current;
    dma.mm = current.mm;
    dma.lockCap = lockCap;
  }

  // ---- VFIO_IOMMU_UNMAP_DMA -------------------------------------------------------------------

  /** `vfio_iommu_type1_unmap_dma` + `vfio_dma_do_unmap`. */
  unmapDma(args: VfioDmaUnmapArgs): { size: bigint } {
    const op = 'VFIO_IOMMU_UNMAP_DMA';
    const { GET_DIRTY_BITMAP, ALL, VADDR } = VfioDmaUnmapFlag;
    if ((args.flags & ~(GET_DIRTY_BITMAP | ALL | VADDR)) !== 0) {
      throw kernelError('EINVAL', `unknown flags 0x${args.flags.toString(16)}`, { op });
    }
    if (args.flags & GET_DIRTY_BITMAP && args.flags & (ALL | VADDR)) {
      throw kernelError('EINVAL', 'GET_DIRTY_BITMAP with ALL or VADDR', { op });
    }
    checkU64(args.iova, 'iova', op);
    checkU64(args.size, 'size', op);
    const unmapAll = (args.flags & ALL) !== 0;
    const invalidate = (args.flags & VADDR) !== 0;
    if (invalidate && this.#emulated.size > 0) {
      throw kernelError('EBUSY', 'cannot invalidate vaddrs while mediated devices are attached', { op });
    }
    const iova = args.iova;
    let size = args.size;
    const mask = lowestBit(this.#pgsizeBitmap) - 1n;
    if ((iova & mask) !== 0n) throw kernelError('EINVAL', 'iova not aligned to the IOMMU page size', { op });
    if (unmapAll) {
      if (iova !== 0n || size !== 0n) throw kernelError('EINVAL', 'UNMAP_ALL needs iova = size = 0', { op });
      size = U64_MAX;
    } else if (size === 0n || (size & mask) !== 0n || iova + size - 1n > U64_MAX) {
      throw kernelError('EINVAL', 'size 0, misaligned or wrapping', { op });
    }
    if (args.flags & GET_DIRTY_BITMAP) {
      // VFIO_IOMMU_DIRTY_PAGES is not modeled: dirty page tracking is never on.
      throw kernelError('EINVAL', 'GET_DIRTY_BITMAP without dirty page tracking', { op });
    }
    const end = iova + size;
    if (this.v2 && !unmapAll) {
      const head = this.#find(iova, 1n);
      if (head && head.iova !== iova) {
        throw kernelError('EINVAL', `range start bisects the mapping at 0x${head.iova.toString(16)}`, { op });
      }
      const tail = this.#find(end - 1n, 0n);
      if (tail && tail.iova + tail.size !== end) {
        throw kernelError('EINVAL', `range end bisects the mapping at 0x${tail.iova.toString(16)}`, { op });
      }
    }
    let unmapped = 0n;
    let last: VfioDma | undefined;
    let retries = 0;
    for (;;) {
      let again = false;
      const marked: VfioDma[] = [];
      let dma = this.#first(iova, size);
      while (dma) {
        if (dma.iova >= end) break;
        if (!this.v2 && iova > dma.iova) break;
        if (invalidate) {
          if (dma.vaddrInvalid) {
            for (const m of marked) m.vaddrInvalid = false;
            this.#vaddrInvalidCount -= marked.length;
            throw kernelError('EINVAL', `vaddr of IOVA 0x${dma.iova.toString(16)} is already invalid`, {
              op,
            });
          }
          dma.vaddrInvalid = true;
          this.#vaddrInvalidCount++;
          marked.push(dma);
          unmapped += dma.size;
          dma = this.#next(dma);
          continue;
        }
        if (dma.pfns.size > 0) {
          if (last === dma) {
            if (++retries > UNMAP_RETRIES_MAX) {
              throw internalError(`mediated devices keep pages of IOVA 0x${dma.iova.toString(16)} pinned`);
            }
          } else {
            last = dma;
            retries = 0;
          }
          this.#notifyDmaUnmap(dma);
          again = true;
          break;
        }
        unmapped += dma.size;
        const next = this.#next(dma);
        this.#remove(dma);
        dma = next;
      }
      if (!again) break;
    }
    args.size = unmapped;
    return { size: unmapped };
  }

  /** `vfio_notify_dma_unmap`: every registered device is told to drop its pins in the dma. */
  #notifyDmaUnmap(dma: VfioDma): void {
    for (const dev of [...this.#devices]) dev.dmaUnmap(dma.iova, dma.size);
  }

  // ---- groups ---------------------------------------------------------------------------------

  /**
   * `vfio_iommu_type1_attach_group`. EBUSY while a vaddr is invalid (attach may pin); EINVAL for a
   * duplicate, an aperture or reserved region clashing with mappings, or no usable IOVA left. An
   * emulated group pins nothing. The first group of a new domain replays every mapping: all pages
   * pinned and charged (EFAULT/ENOMEM undo the attach).
   */
  attachGroup(current: Process, group: Type1Group): void {
    const op = 'VFIO_GROUP_SET_CONTAINER';
    if (this.#vaddrInvalidCount > 0) {
      throw kernelError('EBUSY', 'a mapping has an invalid vaddr; attaching could need to pin it', { op });
    }
    if (this.#emulated.has(group) || this.inDomain(group)) {
      throw kernelError('EINVAL', `group ${group.name} already attached`, { op });
    }
    if (group.type === 'emulated') {
      this.#emulated.add(group);
      return;
    }
    const ap = group.aperture;
    if (this.#aperConflict(ap.start, ap.end)) {
      throw kernelError('EINVAL', 'IOMMU aperture conflicts with existing mappings', { op });
    }
    if (group.reservedIovaRanges.some((r) => this.#find(r.start, r.last - r.start + 1n))) {
      throw kernelError('EINVAL', 'a reserved region conflicts with an existing mapping', { op });
    }
    const copy = this.#iovaList.map((r) => ({ ...r }));
    aperResize(copy, ap.start, ap.end);
    if (!resvExclude(copy, group.reservedIovaRanges)) {
      throw kernelError('EINVAL', 'no usable IOVA range left', { op });
    }
    const existing = this.#domains.find((d) => d.iommuOps === group.iommuOps);
    if (existing) existing.groups.add(group);
    else {
      this.#replay(current, op);
      this.#domains.push({
        iommuOps: group.iommuOps,
        groups: new Set([group]),
        pgsizeBitmap: group.pgsizeBitmap,
        aperture: { ...ap },
      });
      this.#updatePgsizeBitmap();
    }
    this.#iovaList = copy;
  }

  /** `vfio_iommu_replay`: a new domain gets every mapping; the first one pins them all. */
  #replay(current: Process, op: string): void {
    const pinned: VfioDma[] = [];
    try {
      for (const dma of this.#all()) {
        if (dma.iommuMapped) continue;
        this.#pinForDomains(dma, current);
        pinned.push(dma);
      }
    } catch (err) {
      for (const dma of pinned) this.#unpinFromDomains(dma, true);
      throw withOp(err, op);
    }
  }

  #aperConflict(start: bigint, end: bigint): boolean {
    if (this.#iovaList.length === 0) return false;
    const first = this.#iovaList[0]!;
    const last = this.#iovaList[this.#iovaList.length - 1]!;
    if (start > last.end || end < first.start) return true;
    if (start > first.start && this.#find(first.start, start - first.start)) return true;
    if (end < last.end && this.#find(end + 1n, last.end - end)) return true;
    return false;
  }

  #updatePgsizeBitmap(): void {
    let bitmap = U64_MAX;
    for (const d of this.#domains) bitmap &= d.pgsizeBitmap;
    if ((bitmap & ~PAGE_MASK) !== 0n) bitmap = (bitmap & PAGE_MASK) | PAGE_SIZE_N;
    this.#pgsizeBitmap = bitmap;
  }

  /**
   * `vfio_iommu_type1_detach_group`. The last emulated group with no domain, or the last domain
   * with no emulated group, takes every mapping with it; the last domain leaving emulated groups
   * behind re-accounts: only the pages mdevs still pin stay charged.
   */
  detachGroup(group: Type1Group): void {
    if (this.#emulated.delete(group)) {
      if (this.#emulated.size === 0 && this.#domains.length === 0) this.#removeAll();
      return;
    }
    const domain = this.#domains.find((d) => d.groups.has(group));
    if (!domain) return;
    domain.groups.delete(group);
    let removedDomain = false;
    if (domain.groups.size === 0) {
      if (this.#domains.length === 1) {
        if (this.#emulated.size === 0) this.#removeAll();
        else {
          for (const dma of this.#all()) {
            const unlocked = dma.iommuMapped ? dmaPages(dma) : 0;
            this.#unpinFromDomains(dma, false);
            lockAcct(dma, dma.pfns.size - unlocked, true);
          }
        }
      }
      this.#domains.splice(this.#domains.indexOf(domain), 1);
      this.#updatePgsizeBitmap();
      removedDomain = true;
    }
    this.#refreshIovaList(removedDomain);
  }

  /** `vfio_iommu_aper_expand` + `vfio_iommu_resv_refresh`. */
  #refreshIovaList(removedDomain: boolean): void {
    if (this.#iovaList.length === 0) return;
    let start = this.#iovaList[0]!.start;
    let end = this.#iovaList[this.#iovaList.length - 1]!.end;
    if (removedDomain) {
      start = 0n;
      end = U64_MAX;
      for (const d of this.#domains) {
        if (d.aperture.start > start) start = d.aperture.start;
        if (d.aperture.end < end) end = d.aperture.end;
      }
    }
    const list: VfioIovaRange[] = [];
    aperResize(list, start, end);
    const resv = this.#domains.flatMap((d) => [...d.groups].flatMap((g) => g.reservedIovaRanges));
    if (resvExclude(list, resv)) this.#iovaList = list;
  }

  /** `vfio_iommu_type1_release`: the container lost its last group. */
  release(): void {
    this.#emulated.clear();
    this.#removeAll();
    this.#domains = [];
    this.#devices.clear();
  }

  registerDevice(dev: Type1Device): void {
    this.#devices.add(dev);
  }
  unregisterDevice(dev: Type1Device): void {
    this.#devices.delete(dev);
  }

  // ---- vfio_pin_pages / vfio_unpin_pages / vfio_dma_rw ----------------------------------------

  /**
   * `vfio_iommu_type1_pin_pages`: pins `npage` pages from `iova` for a device. EACCES on v1; EBUSY
   * while any vaddr is invalid (v6.3+: never waits); EINVAL with no registered device or an
   * unmapped page; EPERM when the mapping lacks `prot`; ENODEV if the owning mm is gone; EFAULT,
   * ENOMEM (charged per page when no IOMMU domain pins already) undo this call's pins.
   */
  pinPages(iova: bigint, npage: number, prot: number): PinnedPage[] {
    const op = 'vfio_pin_pages';
    if (!this.v2) throw kernelError('EACCES', 'page pinning needs TYPE1v2', { op });
    if (this.#vaddrInvalidCount > 0) {
      throw kernelError('EBUSY', 'vfio_pin_pages not allowed with VFIO_UPDATE_VADDR', { op });
    }
    if (this.#devices.size === 0) throw kernelError('EINVAL', 'no device registered for dma_unmap', { op });
    const doAccounting = this.#domains.length === 0;
    const pages: PinnedPage[] = [];
    try {
      for (let i = 0; i < npage; i++) {
        const at = iova + BigInt(i) * PAGE_SIZE_N;
        const dma = this.#find(at, PAGE_SIZE_N);
        if (!dma) throw kernelError('EINVAL', `IOVA 0x${at.toString(16)} not mapped`, { op });
        if ((dma.prot & prot) !== prot) {
          throw kernelError('EPERM', `mapping at 0x${dma.iova.toString(16)} lacks the access`, { op });
        }
        const index = Number((at - dma.iova) / PAGE_SIZE_N);
        const vpfn = dma.pfns.get(index);
        if (vpfn) {
          vpfn.refs++;
          pages.push(vpfn.page);
          continue;
        }
        const page = this.#pinExternal(dma, at, doAccounting, op);
        dma.pfns.set(index, { page, refs: 1 });
        pages.push(page);
      }
    } catch (err) {
      for (let j = 0; j < pages.length; j++)
        this.#unpinExternal(iova + BigInt(j) * PAGE_SIZE_N, doAccounting);
      throw err;
    }
    return pages;
  }

  /** `vfio_pin_page_external`: one page from the dma owner's mm, charged when `doAccounting`. */
  #pinExternal(dma: VfioDma, iova: bigint, doAccounting: boolean, op: string): PinnedPage {
    if (!dma.mm.alive) throw kernelError('ENODEV', 'the mapping process is gone', { op });
    const va = dma.vaddr + (iova - dma.iova);
    if (firstUnpinnablePage(dma.mm, va, PAGE_SIZE_N, (dma.prot & IommuProt.WRITE) !== 0) >= 0) {
      throw kernelError('EFAULT', `cannot pin vaddr 0x${va.toString(16)}`, { op });
    }
    if (doAccounting) {
      try {
        lockAcct(dma, 1, false);
      } catch (err) {
        throw withOp(err, op);
      }
    }
    const r = dma.mm.regionAt(va)!;
    return new PinnedPage(iova, r.store, Number(va - r.start));
  }

  /** `vfio_unpin_page_external`: drops one pin; the last one releases the page (and its charge). */
  #unpinExternal(iova: bigint, doAccounting: boolean): boolean {
    const dma = this.#find(iova, PAGE_SIZE_N);
    if (!dma) return false;
    const index = Number((iova - dma.iova) / PAGE_SIZE_N);
    const vpfn = dma.pfns.get(index);
    if (!vpfn) return true;
    if (--vpfn.refs === 0) {
      dma.pfns.delete(index);
      if (doAccounting) lockAcct(dma, -1, true);
    }
    return true;
  }

  /** `vfio_iommu_type1_unpin_pages` (v2 only; stops at the first unmapped page, as the kernel). */
  unpinPages(iova: bigint, npage: number): void {
    if (!this.v2) return;
    const doAccounting = this.#domains.length === 0;
    for (let i = 0; i < npage; i++) {
      if (!this.#unpinExternal(iova + BigInt(i) * PAGE_SIZE_N, doAccounting)) break;
    }
  }

  /**
   * `vfio_iommu_type1_dma_rw`: copies through the owning process's current mapping at the dma's
   * vaddr (not through pinned pages). EBUSY while any vaddr is invalid; EINVAL unmapped; EPERM for
   * a missing access (a write also needs READ) or a gone mm; EFAULT if the vaddr is not mapped.
   */
  dmaRw(iova: bigint, data: Uint8Array, write: boolean): void {
    const op = 'vfio_dma_rw';
    if (this.#vaddrInvalidCount > 0) {
      throw kernelError('EBUSY', 'vfio_dma_rw not allowed with VFIO_UPDATE_VADDR', { op });
    }
    let done = 0;
    while (done < data.length) {
      const at = iova + BigInt(done);
      const dma = this.#find(at, 1n);
      if (!dma) throw kernelError('EINVAL', `IOVA 0x${at.toString(16)} not mapped`, { op });
      if ((write && !(dma.prot & IommuProt.WRITE)) || !(dma.prot & IommuProt.READ)) {
        throw kernelError('EPERM', `mapping at 0x${dma.iova.toString(16)} lacks the access`, { op });
      }
      if (!dma.mm.alive) throw kernelError('EPERM', 'the mapping process is gone', { op });
      const offset = at - dma.iova;
      const left = dma.size - offset;
      const n = left < BigInt(data.length - done) ? Number(left) : data.length - done;
      const part = data.subarray(done, done + n);
      try {
        if (write) dma.mm.write(dma.vaddr + offset, part);
        else dma.mm.read(dma.vaddr + offset, part);
      } catch (cause) {
        throw kernelError('EFAULT', `copy at vaddr 0x${(dma.vaddr + offset).toString(16)} failed`, {
          op,
          cause,
        });
      }
      done += n;
    }
  }
}

/** `vfio_iommu_aper_resize` on a sorted, inclusive range list. */
function aperResize(list: VfioIovaRange[], start: bigint, end: bigint): void {
  if (list.length === 0) {
    list.push({ start, end });
    return;
  }
  for (let i = 0; i < list.length;) {
    const node = list[i]!;
    if (start < node.start) break;
    if (start >= node.start && start < node.end) {
      node.start = start;
      break;
    }
    list.splice(i, 1);
  }
  for (let i = 0; i < list.length;) {
    const node = list[i]!;
    if (end > node.end) {
      i++;
      continue;
    }
    if (end > node.start && end <= node.end) {
      node.end = end;
      i++;
      continue;
    }
    list.splice(i, 1);
  }
}

/** `vfio_iommu_resv_exclude`: cuts reserved ranges out of the list; false when nothing is left. */
function resvExclude(list: VfioIovaRange[], resv: readonly IovaRange[]): boolean {
  for (const r of resv) {
    for (let i = 0; i < list.length;) {
      const n = list[i]!;
      if (r.start > n.end || r.last < n.start) {
        i++;
        continue;
      }
      const parts: VfioIovaRange[] = [];
      if (r.start > n.start) parts.push({ start: n.start, end: r.start - 1n });
      if (r.last < n.end) parts.push({ start: r.last + 1n, end: n.end });
      list.splice(i, 1, ...parts);
      i += parts.length;
    }
  }
  return list.length > 0;
}

/** The same errno, reported by the ioctl `op` (the inner step it came from stays in the message). */
function withOp(err: unknown, op: string): unknown {
  if (err instanceof VfioError && err.errno !== undefined && err.op !== op) {
    return kernelError(err.errno, err.message, { op, cause: err });
  }
  return err;
}
