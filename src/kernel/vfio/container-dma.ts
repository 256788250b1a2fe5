import { PAGE_SIZE_N } from '../../uapi/arch.js';
import { kernelError } from '../../uapi/error.js';
import type { ByteStore } from '../host/byte-store.js';
import { Cgroup } from '../host/cgroup.js';
import type { Process } from '../host/host.js';
import type { Mm } from '../host/mm.js';

/**
 * Pieces of type1's `struct vfio_dma` and of its pinned-page accounting (`vfio_lock_acct`,
 * `__account_locked_vm`), shared by the driver (container-type1.ts) and the DMA space.
 */

/** Pinned bytes behind `length` bytes of a vfio_dma from byte `offset`: a page run's `struct page`s. */
export interface BackingRun {
  offset: bigint;
  length: bigint;
  store: ByteStore;
  storeOffset: number;
}

/**
 * One page pinned for an emulated (mdev) device by vfio_pin_pages(): the `struct page` it got.
 * Reads and writes reach the pinned memory whatever the process does to its mappings later.
 */
export class PinnedPage {
  readonly iova: bigint;
  readonly #store: ByteStore;
  readonly #storeOffset: number;

  constructor(iova: bigint, store: ByteStore, storeOffset: number) {
    this.iova = iova;
    this.#store = store;
    this.#storeOffset = storeOffset;
  }

  #at(offset: number, length: number): number {
    if (offset < 0 || offset + length > Number(PAGE_SIZE_N)) {
      throw kernelError('EINVAL', `bytes ${offset}+${length} are outside a page`);
    }
    return this.#storeOffset + offset;
  }

  read(offset: number, target: Uint8Array): void {
    this.#store.read(this.#at(offset, target.length), target);
  }

  write(offset: number, data: Uint8Array): void {
    this.#store.write(this.#at(offset, data.length), data);
  }
}

/** `struct vfio_pfn`: an externally pinned page of a dma and its pin count. */
export interface VfioPfn {
  page: PinnedPage;
  refs: number;
}

/** `struct vfio_dma`: one MAP_DMA call, never split, merged or deduplicated with another. */
export interface VfioDma {
  readonly iova: bigint;
  readonly size: bigint;
  vaddr: bigint;
  /** IommuProt bits. */
  readonly prot: number;
  /** Pinned and mapped into the container's IOMMU domains. */
  iommuMapped: boolean;
  /** The pinned pages while `iommuMapped`. */
  backing: BackingRun[] | undefined;
  /** CAP_IPC_LOCK of the mapping (or re-supplying) task: no RLIMIT_MEMLOCK check. */
  lockCap: boolean;
  /** The group leader that mapped it (or re-supplied its vaddr), whose RLIMIT_MEMLOCK applies. */
  task: Process;
  /** The mm that pays for the pins. */
  mm: Mm;
  /** Pages this dma charged to `mm->locked_vm`. */
  lockedVm: number;
  /**
   * softvfio cgroup extension: the cgroup holding this dma's pinned-page charge (the owner's when
   * the dma first got pinned, kept until fully unpinned or moved by MAP_DMA+VADDR), and the pages
   * charged there. Unlike `lockedVm`, released even when the mm is gone: the pins really are.
   */
  cgroup: Cgroup | undefined;
  cgroupPages: number;
  /** VFIO_DMA_UNMAP_FLAG_VADDR: the vaddr is stale until MAP_DMA with VFIO_DMA_MAP_FLAG_VADDR. */
  vaddrInvalid: boolean;
  /** `pfn_list`: pages pinned by vfio_pin_pages(), keyed by page index in the dma. */
  readonly pfns: Map<number, VfioPfn>;
}

export function dmaPages(dma: VfioDma): number {
  return Number(dma.size / PAGE_SIZE_N);
}

/**
 * `__account_locked_vm(mm, |n|, n > 0, task, lockCap)`: a charge beyond `task`'s RLIMIT_MEMLOCK
 * fails ENOMEM unless lockCap; a release never takes locked_vm below zero.
 */
export function accountLockedVm(mm: Mm, task: Process, lockCap: boolean, pages: number): void {
  if (pages > 0) {
    if (!lockCap && mm.lockedVm + pages > task.memlockLimitPages) {
      throw kernelError('ENOMEM', `pid ${task.pid}: locked_vm would exceed RLIMIT_MEMLOCK`, {
        op: 'account_locked_vm',
      });
    }
    mm.lockedVm += pages;
  } else if (pages < 0) {
    mm.lockedVm -= Math.min(-pages, mm.lockedVm);
  }
}

/**
 * `vfio_lock_acct(dma, pages, async)`: charges or releases pages for `dma` on its mm. An async
 * update of an mm nobody uses any more (exit, exec) is dropped (-ESRCH in the kernel, ignored by
 * its callers): the dead mm keeps its count.
 *
 * softvfio cgroup extension: a charge also goes to the owner's cgroup hierarchy (CAP_IPC_LOCK or
 * not), after the RLIMIT_MEMLOCK check; either refusal is ENOMEM with nothing charged. A release
 * always goes back to the cgroup that was charged, even for a dead mm.
 */
export function lockAcct(dma: VfioDma, pages: number, async: boolean): void {
  if (pages === 0) return;
  if (pages > 0) {
    if (async && !dma.mm.alive) return;
    accountLockedVm(dma.mm, dma.task, dma.lockCap, pages);
    const cg = dma.cgroup ?? dma.task.cgroup;
    try {
      cg.chargePinned(pages);
    } catch (err) {
      accountLockedVm(dma.mm, dma.task, dma.lockCap, -pages);
      throw err;
    }
    dma.cgroup = cg;
    dma.cgroupPages += pages;
    dma.lockedVm += pages;
    return;
  }
  const released = Math.min(-pages, dma.cgroupPages);
  if (released > 0) {
    dma.cgroup!.unchargePinned(released);
    dma.cgroupPages -= released;
    if (dma.cgroupPages === 0) dma.cgroup = undefined;
  }
  if (async && !dma.mm.alive) return;
  accountLockedVm(dma.mm, dma.task, dma.lockCap, pages);
  dma.lockedVm += pages;
}

/**
 * softvfio cgroup extension, for `vfio_change_dma_owner`: moves `dma`'s cgroup charge to `to` (only
 * below the common ancestor); ENOMEM over a limit, nothing changed. Returns the undo.
 */
export function moveDmaCgroup(dma: VfioDma, to: Cgroup): () => void {
  const from = dma.cgroup;
  const n = dma.cgroupPages;
  if (!from || n === 0 || from === to) return () => {};
  Cgroup.movePinned(from, to, n);
  dma.cgroup = to;
  return () => {
    Cgroup.movePinned(to, from, n, true);
    dma.cgroup = from;
  };
}

/**
 * The first page of [va, va + size) that pin_user_pages() cannot pin in `mm` (not mapped, or
 * read-only when `write`), or -1. `mm` dead: page 0.
 */
export function firstUnpinnablePage(mm: Mm, va: bigint, size: bigint, write: boolean): number {
  if (!mm.alive) return 0;
  let at = va;
  const end = va + size;
  while (at < end) {
    const r = mm.regionAt(at);
    if (!r || (write && !r.writable)) return Number((at - va) / PAGE_SIZE_N);
    at = r.start + r.lengthBytes;
  }
  return -1;
}

/** The pages behind [va, va + size) of `mm`, which must all be mapped. */
export function captureBacking(mm: Mm, va: bigint, size: bigint): BackingRun[] {
  const runs: BackingRun[] = [];
  let at = va;
  const end = va + size;
  while (at < end) {
    const r = mm.regionAt(at)!;
    const stop = r.start + r.lengthBytes < end ? r.start + r.lengthBytes : end;
    runs.push({ offset: at - va, length: stop - at, store: r.store, storeOffset: Number(at - r.start) });
    at = stop;
  }
  return runs;
}
