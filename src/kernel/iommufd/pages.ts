import { internalError, kernelError } from '../../uapi/error.js';
import { Cgroup } from '../host/cgroup.js';
import type { Process, User } from '../host/host.js';
import type { MemFile } from '../host/memfd.js';
import type { Mm } from '../host/mm.js';

/** `enum iopt_pages_account_mode`. */
export const AccountMode = { NONE: 0, USER: 1, MM: 2 } as const;
export type AccountMode = (typeof AccountMode)[keyof typeof AccountMode];

const PAGE = 4096n;

/**
 * Who provides a pages object's memory and who pays for its pins: the provider (an mm by VA or a
 * file by offset) and the owner (mapping process, its mm and user at map time).
 */
export interface PagesSource {
  readonly mm: Mm | undefined;
  readonly file: MemFile | undefined;
  readonly owner: Process;
  readonly ownerMm: Mm;
  readonly user: User;
}

/**
 * A pending IOAS_CHANGE_PROCESS of one pages object (`chargeNewOwner`): the new source, and the
 * cgroup charge moved from `from` to `to` (softvfio cgroup extension).
 */
export interface OwnerChange {
  readonly srcId: number;
  readonly from: Cgroup | undefined;
  readonly to: Cgroup;
}

/**
 * Every `iopt_pages` of one iommufd context, as parallel typed arrays indexed by pages id: one
 * record per MAP/MAP_FILE call, shared by all areas copied from it. Pins are counted per page
 * range (`npinned`), charged once per pages object whatever number of areas/domains use them.
 *
 * A charge of `delta` pages goes, in this order, to:
 * 1. the kernel's counters for the pages object's mode (`account`: user or mm `locked_vm` against
 *    the owner's RLIMIT_MEMLOCK, `pinned_vm`), exactly as in Linux;
 * 2. softvfio extension: the context's own limit (`contextLimitPages`,
 *    IOMMU_OPTION_SOFTVFIO_CONTEXT_LIMIT), in every mode;
 * 3. softvfio extension: the owner's cgroup and its ancestors (`Cgroup`), in every mode, NONE
 *    (CAP_IPC_LOCK) included.
 * The first refusal is the ENOMEM reported, and nothing of the charge stays. A pages object's
 * cgroup charge sits in one cgroup: the owner's when the object first got pinned, kept (whatever
 * the owner's moves) until it is fully unpinned or IOAS_CHANGE_PROCESS moves it.
 */
export class PagesTable {
  #cap = 0;
  #src = new Int32Array(0);
  #start = new BigUint64Array(0);
  #length = new BigUint64Array(0);
  #npages = new Float64Array(0);
  #mode = new Uint8Array(0);
  #writable = new Uint8Array(0);
  #users = new Int32Array(0);
  #wholePins = new Int32Array(0);
  #npinned = new Float64Array(0);
  #charged = new Float64Array(0);
  /** Pins of partial page ranges, flat [first, last, first, last, …], for pages shared by COPY. */
  #spans = new Map<number, number[]>();
  #free: number[] = [];
  #next = 0;
  #sources: PagesSource[] = [];
  #sourceIndex = new Map<object, Map<Process, number>>();
  #live = 0;
  /** The cgroup holding each pages object's charge while it has one (softvfio extension). */
  #cg: (Cgroup | undefined)[] = [];
  #contextLimitPages = Infinity;
  #contextPinned = 0;

  get count(): number {
    return this.#live;
  }

  /**
   * softvfio extension: the most pages this context may have charged at once, over all its pages
   * objects (Infinity = no limit, the default).
   */
  get contextLimitPages(): number {
    return this.#contextLimitPages;
  }
  set contextLimitPages(pages: number) {
    if (!(pages >= 0)) throw internalError(`bad context limit ${pages}`);
    this.#contextLimitPages = pages;
  }
  /** softvfio extension: pages charged by this context (sum of `charged` over its pages objects). */
  get contextPinnedPages(): number {
    return this.#contextPinned;
  }
  /** softvfio extension: the cgroup pages object `id`'s pins are charged to, if any are. */
  chargedCgroup(id: number): Cgroup | undefined {
    return this.#cg[id];
  }

  #grow(): void {
    const cap = Math.max(64, this.#cap * 2);
    const grow = <T extends { length: number; set(a: T): void }>(old: T, make: (n: number) => T): T => {
      const a = make(cap);
      a.set(old);
      return a;
    };
    this.#src = grow(this.#src, (n) => new Int32Array(n));
    this.#start = grow(this.#start, (n) => new BigUint64Array(n));
    this.#length = grow(this.#length, (n) => new BigUint64Array(n));
    this.#npages = grow(this.#npages, (n) => new Float64Array(n));
    this.#mode = grow(this.#mode, (n) => new Uint8Array(n));
    this.#writable = grow(this.#writable, (n) => new Uint8Array(n));
    this.#users = grow(this.#users, (n) => new Int32Array(n));
    this.#wholePins = grow(this.#wholePins, (n) => new Int32Array(n));
    this.#npinned = grow(this.#npinned, (n) => new Float64Array(n));
    this.#charged = grow(this.#charged, (n) => new Float64Array(n));
    this.#cap = cap;
  }

  #sourceId(owner: Process, provider: Mm | MemFile, isFile: boolean): number {
    let byOwner = this.#sourceIndex.get(provider);
    if (!byOwner) {
      byOwner = new Map();
      this.#sourceIndex.set(provider, byOwner);
    }
    let id = byOwner.get(owner);
    if (id === undefined || this.#sources[id]!.ownerMm !== owner.mm) {
      id = this.#sources.length;
      this.#sources.push({
        mm: isFile ? undefined : (provider as Mm),
        file: isFile ? (provider as MemFile) : undefined,
        owner,
        ownerMm: owner.mm,
        user: owner.user,
      });
      byOwner.set(owner, id);
    }
    return id;
  }

  /** A new pages object over `length` bytes at VA/offset `start`; one user (the first area). */
  alloc(args: {
    owner: Process;
    file?: MemFile;
    start: bigint;
    length: bigint;
    writable: boolean;
    mode: AccountMode;
  }): number {
    let id = this.#free.pop();
    if (id === undefined) {
      if (this.#next === this.#cap) this.#grow();
      id = this.#next++;
    }
    this.#src[id] = args.file
      ? this.#sourceId(args.owner, args.file, true)
      : this.#sourceId(args.owner, args.owner.mm, false);
    this.#start[id] = args.start;
    this.#length[id] = args.length;
    this.#npages[id] = Number(((args.start % PAGE) + args.length + PAGE - 1n) / PAGE);
    this.#mode[id] = args.mode;
    this.#writable[id] = args.writable ? 1 : 0;
    this.#users[id] = 1;
    this.#wholePins[id] = 0;
    this.#npinned[id] = 0;
    this.#charged[id] = 0;
    this.#cg[id] = undefined;
    this.#live++;
    return id;
  }

  source(id: number): PagesSource {
    return this.#sources[this.#src[id]!]!;
  }
  start(id: number): bigint {
    return this.#start[id]!;
  }
  length(id: number): bigint {
    return this.#length[id]!;
  }
  writable(id: number): boolean {
    return this.#writable[id] === 1;
  }
  isFile(id: number): boolean {
    return this.source(id).file !== undefined;
  }
  mode(id: number): AccountMode {
    return this.#mode[id] as AccountMode;
  }
  npinned(id: number): number {
    return this.#npinned[id]!;
  }
  /** Pages charged so far (`last_npinned`). */
  charged(id: number): number {
    return this.#charged[id]!;
  }

  ref(id: number): void {
    this.#users[id]!++;
  }

  /** Drops an area's reference; the pages object is freed with its last user (it holds no pins). */
  unref(id: number): void {
    if (--this.#users[id]! > 0) return;
    this.#free.push(id);
    this.#spans.delete(id);
    this.#live--;
  }

  /** Page index range [first, last] inside pages `id` of bytes [offset, offset + length). */
  pageRange(id: number, offset: bigint, length: bigint): [number, number] {
    const at = (this.#start[id]! % PAGE) + offset;
    return [Number(at / PAGE), Number((at + length - 1n) / PAGE)];
  }

  #covered(id: number, first: number, last: number): boolean {
    if (this.#wholePins[id]! > 0) return true;
    const spans = this.#spans.get(id);
    if (!spans) return false;
    let at = first;
    let moved = true;
    while (at <= last && moved) {
      moved = false;
      for (let i = 0; i < spans.length; i += 2) {
        if (spans[i]! <= at && spans[i + 1]! >= at) {
          at = spans[i + 1]! + 1;
          moved = true;
        }
      }
    }
    return at > last;
  }

  /** Whether pages [first, last] of pages `id` are all pinned by some holder (PFNs available). */
  isPinned(id: number, first: number, last: number): boolean {
    return this.#covered(id, first, last);
  }

  #recount(id: number): void {
    if (this.#wholePins[id]! > 0) {
      this.#npinned[id] = this.#npages[id]!;
      return;
    }
    const spans = this.#spans.get(id);
    if (!spans || spans.length === 0) {
      this.#npinned[id] = 0;
      return;
    }
    const pairs: [number, number][] = [];
    for (let i = 0; i < spans.length; i += 2) pairs.push([spans[i]!, spans[i + 1]!]);
    pairs.sort((a, b) => a[0] - b[0]);
    let total = 0;
    let curFirst = pairs[0]![0];
    let curLast = pairs[0]![1];
    for (const [f, l] of pairs) {
      if (f > curLast + 1) {
        total += curLast - curFirst + 1;
        curFirst = f;
        curLast = l;
      } else if (l > curLast) curLast = l;
    }
    this.#npinned[id] = total + curLast - curFirst + 1;
  }

  #addPin(id: number, first: number, last: number): void {
    if (first === 0 && last === this.#npages[id]! - 1) this.#wholePins[id]!++;
    else {
      let spans = this.#spans.get(id);
      if (!spans) {
        spans = [];
        this.#spans.set(id, spans);
      }
      spans.push(first, last);
    }
    this.#recount(id);
  }

  #removePin(id: number, first: number, last: number): void {
    if (first === 0 && last === this.#npages[id]! - 1) this.#wholePins[id]!--;
    else {
      const spans = this.#spans.get(id)!;
      for (let i = 0; i < spans.length; i += 2) {
        if (spans[i] === first && spans[i + 1] === last) {
          spans.splice(i, 2);
          break;
        }
      }
      if (spans.length === 0) this.#spans.delete(id);
    }
    this.#recount(id);
  }

  /**
   * Pins pages [first, last] for one holder (an area filled into domains, an access) and charges
   * the newly pinned pages. Pages already pinned by another holder are reused (no fault, no
   * charge). Bad source memory -> EFAULT; over the limit -> ENOMEM with this pin undone.
   */
  pin(id: number, first: number, last: number, write: boolean): void {
    if (!this.#covered(id, first, last)) {
      const src = this.source(id);
      const base = this.#start[id]! - (this.#start[id]! % PAGE);
      const from = base + BigInt(first) * PAGE;
      const bytes = BigInt(last - first + 1) * PAGE;
      const ok = src.file
        ? from + bytes <= ((src.file.sizeBytes + PAGE - 1n) & ~(PAGE - 1n))
        : src.mm!.covers(from, bytes, write);
      if (!ok) {
        throw kernelError('EFAULT', `cannot pin 0x${from.toString(16)}+0x${bytes.toString(16)}`, {
          op: 'pin_user_pages',
        });
      }
    }
    this.#addPin(id, first, last);
    try {
      this.#updateCharge(id);
    } catch (err) {
      this.#removePin(id, first, last);
      throw err;
    }
  }

  /** Drops one holder's pin of [first, last]; pages no holder needs any more are uncharged. */
  unpin(id: number, first: number, last: number): void {
    this.#removePin(id, first, last);
    this.#updateCharge(id);
  }

  /**
   * Applies `npinned - last_npinned` to the owner's counters (`do_update_pinned`), and (softvfio
   * extensions) to the context's limit and the cgroup hierarchy: all or nothing.
   */
  #updateCharge(id: number): void {
    const delta = this.#npinned[id]! - this.#charged[id]!;
    if (delta === 0) return;
    const src = this.source(id);
    const mode = this.mode(id);
    if (delta > 0) {
      account(src, mode, delta);
      const cg = this.#cg[id] ?? src.owner.cgroup;
      try {
        if (this.#contextPinned + delta > this.#contextLimitPages) {
          throw kernelError(
            'ENOMEM',
            `iommufd context pinned pages ${this.#contextPinned} + ${delta} over its limit ${this.#contextLimitPages} (softvfio CONTEXT_LIMIT)`,
            { op: 'softvfio_context_charge' },
          );
        }
        cg.chargePinned(delta);
      } catch (err) {
        account(src, mode, -delta);
        throw err;
      }
      this.#cg[id] = cg;
    } else {
      account(src, mode, delta);
      this.#cg[id]!.unchargePinned(-delta);
      if (this.#npinned[id] === 0) this.#cg[id] = undefined;
    }
    this.#contextPinned += delta;
    this.#charged[id] = this.#npinned[id]!;
  }

  /**
   * CHANGE_PROCESS for one pages object: a new source owned by `owner`, charged first per mode, and
   * (softvfio extension) the cgroup charge moved to `owner`'s cgroup; ENOMEM: nothing changed.
   * `commitOwner` then uncharges the old owner and switches; `uncommitOwner` undoes this instead.
   * The context's own charge does not change: it stays with the context.
   */
  chargeNewOwner(id: number, owner: Process): OwnerChange {
    const old = this.source(id);
    const provider = old.file ?? old.mm!;
    const srcId = this.#sourceId(owner, provider, old.file !== undefined);
    const n = this.#charged[id]!;
    const mode = this.mode(id);
    account(this.#sources[srcId]!, mode, n);
    const from = this.#cg[id];
    const to = owner.cgroup;
    if (from && n > 0) {
      try {
        Cgroup.movePinned(from, to, n);
      } catch (err) {
        account(this.#sources[srcId]!, mode, -n);
        throw err;
      }
    }
    return { srcId, from, to };
  }

  commitOwner(id: number, change: OwnerChange): void {
    account(this.source(id), this.mode(id), -this.#charged[id]!);
    this.#src[id] = change.srcId;
    if (change.from && this.#charged[id]! > 0) this.#cg[id] = change.to;
  }

  uncommitOwner(id: number, change: OwnerChange): void {
    const n = this.#charged[id]!;
    account(this.#sources[change.srcId]!, this.mode(id), -n);
    if (change.from && n > 0) Cgroup.movePinned(change.to, change.from, n, true);
  }
}

/** Charges (delta > 0, may throw ENOMEM) or uncharges pinned pages per accounting mode. */
export function account(src: PagesSource, mode: AccountMode, delta: number): void {
  if (delta > 0) {
    const limit = src.owner.memlockLimitPages;
    if (mode === AccountMode.USER) {
      if (src.user.lockedVm + delta > limit) {
        throw kernelError('ENOMEM', `user ${src.user.uid} locked_vm over RLIMIT_MEMLOCK`, {
          op: 'incr_user_locked_vm',
        });
      }
      src.user.lockedVm += delta;
    } else if (mode === AccountMode.MM) {
      if (src.ownerMm.lockedVm + delta > limit && !src.owner.hasCap('CAP_IPC_LOCK')) {
        throw kernelError('ENOMEM', `pid ${src.owner.pid} locked_vm over RLIMIT_MEMLOCK`, {
          op: 'account_locked_vm',
        });
      }
      src.ownerMm.lockedVm += delta;
    }
  } else if (mode === AccountMode.USER) src.user.lockedVm += delta;
  else if (mode === AccountMode.MM) src.ownerMm.lockedVm += delta;
  src.ownerMm.pinnedVm += delta;
}
