import { internalError, kernelError } from '../../uapi/error.js';
import type { Host, Process } from './host.js';

const PAGE_SHIFT = 12n;
const U64_MAX = (1n << 64n) - 1n;

export interface CgroupOptions {
  /** `pinned.max` in bytes (rounded down to whole pages); undefined = no limit ("max"). */
  pinnedLimitBytes?: bigint | undefined;
}

/**
 * **softvfio extension, not in Linux.** A cgroup (v2 style: one tree, a process in exactly one
 * cgroup) with a hierarchical limit on long-term pinned memory, the controller the seed-003 thread
 * asks for ("a cgroup for FOLL_LONGTERM", "a mechanism to control individual VMs, whether by task
 * or by cgroup"): a management app puts each VM in its own cgroup (`/machine/vm1`) with a per-VM
 * limit, and caps all VMs together on a parent (`/machine`).
 *
 * Semantics, modeled on memcg:
 * - `pinnedPages` counts the pages pinned on behalf of the processes of this cgroup *and of all its
 *   descendants*; a charge is applied to the cgroup and every ancestor, and fails ENOMEM with
 *   nothing changed if any of them would go over its `pinnedLimitBytes`.
 * - Who pays: iommufd pins (every accounting mode, CAP_IPC_LOCK included) and VFIO type1 pins are
 *   charged to the cgroup of the process that owns the mapping. A charge is released to the cgroup
 *   it was taken from, wherever the owner has moved since: moving a process (`attach`) never moves
 *   existing charges. Only the live-update hand-overs (iommufd IOAS_CHANGE_PROCESS, type1
 *   MAP_DMA+VADDR) move a charge, to the new owner's cgroup.
 * - fork: the child starts in its parent's cgroup; exec keeps the cgroup; exit leaves it.
 * - A limit may be set below the current usage (as `pids.max`): nothing is taken back, every new
 *   charge fails until the usage drops.
 * - `rmdir` of a cgroup that still holds charges succeeds (the name is free again), the charges
 *   stay with the removed ("dying") cgroup and its ancestors until released, as in memcg.
 */
export class Cgroup {
  readonly host: Host;
  /** The last path component ('' for the root). */
  readonly name: string;
  readonly parent: Cgroup | undefined;
  readonly #children = new Map<string, Cgroup>();
  #limitBytes: bigint | undefined;
  #limitPages = Infinity;
  #pinnedPages = 0;
  #maxEvents = 0;
  #removed = false;

  /** @internal: use `host.rootCgroup` and `mkdir`. */
  constructor(host: Host, name: string, parent: Cgroup | undefined, options: CgroupOptions = {}) {
    this.host = host;
    this.name = name;
    this.parent = parent;
    this.pinnedLimitBytes = options.pinnedLimitBytes;
  }

  /** '/' for the root, else '/a/b'. */
  get path(): string {
    if (!this.parent) return '/';
    const up = this.parent.path;
    return up === '/' ? `/${this.name}` : `${up}/${this.name}`;
  }

  /** Removed by `rmdir` (it may still hold charges). */
  get removed(): boolean {
    return this.#removed;
  }

  get children(): IterableIterator<Cgroup> {
    return this.#children.values();
  }

  /** The live processes that are members of this cgroup (not of its descendants): `cgroup.procs`. */
  get processes(): Process[] {
    return [...this.host.processes].filter((p) => p.cgroup === this);
  }

  /** `pinned.max`: undefined = no limit. Negative or above U64_MAX -> EINVAL. */
  get pinnedLimitBytes(): bigint | undefined {
    return this.#limitBytes;
  }
  set pinnedLimitBytes(bytes: bigint | undefined) {
    if (bytes !== undefined && (bytes < 0n || bytes > U64_MAX)) {
      throw kernelError('EINVAL', `bad pinned.max ${bytes}`, { target: this.path, op: 'pinned.max' });
    }
    this.#limitBytes = bytes;
    this.#limitPages = bytes === undefined ? Infinity : Number(bytes >> PAGE_SHIFT);
  }

  /** `pinned.current` in pages: pins charged here and in every descendant. */
  get pinnedPages(): number {
    return this.#pinnedPages;
  }
  /** `pinned.current` in bytes. */
  get pinnedBytes(): bigint {
    return BigInt(this.#pinnedPages) << PAGE_SHIFT;
  }
  /** `pinned.events max`: charges refused because of this cgroup's own limit. */
  get pinnedMaxEvents(): number {
    return this.#maxEvents;
  }

  /**
   * mkdir: a child cgroup. EINVAL for a bad name (empty, '.', '..', containing '/'), EEXIST if a
   * child of that name exists, ENOENT if this cgroup was removed, EINVAL for a bad limit.
   */
  mkdir(name: string, options: CgroupOptions = {}): Cgroup {
    const op = 'mkdir';
    if (name === '' || name === '.' || name === '..' || name.includes('/')) {
      throw kernelError('EINVAL', `bad cgroup name '${name}'`, { target: this.path, op });
    }
    if (this.#removed) throw kernelError('ENOENT', 'cgroup was removed', { target: this.path, op });
    if (this.#children.has(name)) {
      throw kernelError('EEXIST', `cgroup '${name}' exists`, { target: this.path, op });
    }
    const child = new Cgroup(this.host, name, this, options);
    this.#children.set(name, child);
    return child;
  }

  /** The child named `name`, or undefined. */
  child(name: string): Cgroup | undefined {
    return this.#children.get(name);
  }

  /**
   * rmdir: EBUSY for the root, a cgroup with member processes or with child cgroups. Charges still
   * held stay with it (and its ancestors) until released.
   */
  rmdir(): void {
    const op = 'rmdir';
    if (!this.parent) throw kernelError('EBUSY', 'the root cgroup cannot be removed', { target: '/', op });
    if (this.#removed) throw kernelError('ENOENT', 'already removed', { target: this.path, op });
    if (this.#children.size > 0) throw kernelError('EBUSY', 'has child cgroups', { target: this.path, op });
    if (this.processes.length > 0) throw kernelError('EBUSY', 'has processes', { target: this.path, op });
    this.parent.#children.delete(this.name);
    this.#removed = true;
  }

  /**
   * Writing a pid to `cgroup.procs`: `process` becomes a member. Its existing charges stay where they
   * were taken. ESRCH if it has exited, ENOENT if this cgroup was removed, EINVAL for a process of
   * another host.
   */
  attach(process: Process): void {
    const op = 'cgroup.procs';
    if (process.host !== this.host) {
      throw kernelError('EINVAL', `pid ${process.pid} is on another host`, { target: this.path, op });
    }
    if (this.#removed) throw kernelError('ENOENT', 'cgroup was removed', { target: this.path, op });
    if (!process.alive)
      throw kernelError('ESRCH', `pid ${process.pid} has exited`, { target: this.path, op });
    process.setCgroup(this);
  }

  /**
   * @internal `try_charge`: `pages` on this cgroup and every ancestor. ENOMEM, nothing changed, if
   * one of them would exceed its limit (that one's `pinnedMaxEvents` counts it).
   */
  chargePinned(pages: number): void {
    if (pages < 0) throw internalError(`negative cgroup charge ${pages}`);
    if (pages === 0) return;
    const lineage = this.#lineage();
    for (const c of lineage) c.#check(pages);
    for (const c of lineage) c.#pinnedPages += pages;
  }

  /** @internal releases `pages` from this cgroup and every ancestor. */
  unchargePinned(pages: number): void {
    if (pages < 0 || pages > this.#pinnedPages) {
      throw internalError(`cgroup ${this.path}: uncharge ${pages} of ${this.#pinnedPages}`);
    }
    for (const c of this.#lineage()) c.#pinnedPages -= pages;
  }

  /**
   * @internal moves a charge of `pages` from `from` to `to` (a live-update hand-over): only the
   * levels below their lowest common ancestor change, so a move between two VMs of `/machine` does
   * not count twice against `/machine`. ENOMEM, nothing changed, if a level on `to`'s side would go
   * over its limit; `force` skips the check (to undo a move).
   */
  static movePinned(from: Cgroup, to: Cgroup, pages: number, force = false): void {
    if (pages < 0) throw internalError(`negative cgroup move ${pages}`);
    if (pages === 0 || from === to) return;
    const fromSide = new Set<Cgroup>();
    for (let c: Cgroup | undefined = from; c; c = c.parent) fromSide.add(c);
    const toPath: Cgroup[] = [];
    let common: Cgroup | undefined = to;
    while (common && !fromSide.has(common)) {
      toPath.push(common);
      common = common.parent;
    }
    if (!force) for (const c of toPath) c.#check(pages);
    for (const c of toPath) c.#pinnedPages += pages;
    for (let c: Cgroup | undefined = from; c !== common; c = c!.parent) c!.#pinnedPages -= pages;
  }

  /** This cgroup and its ancestors, nearest first. */
  #lineage(): Cgroup[] {
    const out: Cgroup[] = [this];
    for (let c = this.parent; c; c = c.parent) out.push(c);
    return out;
  }

  #check(pages: number): void {
    if (this.#pinnedPages + pages > this.#limitPages) {
      this.#maxEvents++;
      throw kernelError(
        'ENOMEM',
        `cgroup ${this.path}: ${pages} more pinned pages would exceed pinned.max (${this.#limitBytes} bytes, ${this.#pinnedPages} pages in use)`,
        { op: 'pinned_cgroup_charge' },
      );
    }
  }
}
