import { U64_MAX } from '../../uapi/arch.js';
import { kernelError } from '../../uapi/error.js';
import {
  IOAS_MAP_FLAGS_ALL,
  IoasMapFlag,
  IommuOption,
  IommuOptionOp,
  IommuVfioIoasOp,
  type IovaRange,
  SoftvfioIommuOption,
} from '../../uapi/iommufd.js';
import type { Process } from '../host/host.js';
import { type AccessCreateOptions, type AccessOps, IommufdAccess } from './access.js';
import {
  attachDevice,
  detachDevice,
  device,
  freeHwpt,
  type GetHwInfoArgs,
  getHwInfo,
  type HwptAllocArgs,
  hwptAlloc,
  type HwptGetDirtyBitmapArgs,
  hwptGetDirtyBitmap,
  type HwptSetDirtyTrackingArgs,
  hwptSetDirtyTracking,
} from './hwpt.js';
import { AreaProt, IoPagetable, type PagesElm } from './io-pagetable.js';
import type { DeviceObject, HwptPagingObject, IoasObject, IommufdCore, IommufdObject } from './objects.js';
import { AccountMode, type OwnerChange, PagesTable } from './pages.js';

export type {
  AccessObject,
  DeviceObject,
  HwptPagingObject,
  IoasObject,
  IommufdCore,
  IommufdObject,
} from './objects.js';

export interface IoasMapArgs {
  flags: number;
  ioasId: number;
  reserved?: number;
  userVa: bigint;
  length: bigint;
  iova?: bigint;
}
export interface IoasMapFileArgs {
  flags: number;
  ioasId: number;
  fd: number;
  start: bigint;
  length: bigint;
  iova?: bigint;
}
export interface IoasCopyArgs {
  flags: number;
  dstIoasId: number;
  srcIoasId: number;
  length: bigint;
  dstIova?: bigint;
  srcIova: bigint;
}
export interface IoasUnmapArgs {
  ioasId: number;
  iova: bigint;
  length: bigint;
}
export interface IoasIovaRangesArgs {
  ioasId: number;
  /** In: capacity of `allowedIovas`; out: total number of ranges. */
  numIovas: number;
  reserved?: number;
  allowedIovas?: IovaRange[];
  outIovaAlignment?: bigint;
}
export interface IoasAllowIovasArgs {
  ioasId: number;
  reserved?: number;
  allowedIovas: IovaRange[];
}
export interface VfioIoasArgs {
  /** In for SET, out for GET. */
  ioasId: number;
  op: number;
  reserved?: number;
}
export interface OptionArgs {
  optionId: number;
  op: number;
  reserved?: number;
  objectId: number;
  val64: bigint;
}

/** Shared state of one open /dev/iommu: the object table, the pages, the accounting mode. */
class IommufdState implements IommufdCore {
  readonly objects = new Map<number, IommufdObject>();
  readonly pages = new PagesTable();
  accountMode: AccountMode;
  readonly thp: boolean;
  /** softvfio CONTEXT_LIMIT as set (U64_MAX = none); `pages.contextLimitPages` enforces it. */
  contextLimitBytes = U64_MAX;
  closed = false;
  /** `ictx->vfio_ioas`: the IOAS the VFIO compat ioctls work on (vfio-compat.ts). */
  vfioIoas: IoasObject | undefined;

  constructor(accountMode: AccountMode, thp: boolean) {
    this.accountMode = accountMode;
    this.thp = thp;
  }

  /** xa_alloc: the lowest free id from 1. */
  add<T extends IommufdObject>(obj: T): T {
    let id = 1;
    while (this.objects.has(id)) id++;
    obj.id = id;
    this.objects.set(id, obj);
    return obj;
  }
}

/**
 * An open iommufd (/dev/iommu). Methods are the ioctls; `caller` is `current` for each call (the
 * opener by default; `as(process)` gives the same fd as seen from another process, e.g. after
 * SCM_RIGHTS or for live update).
 */
export class IommufdContext {
  readonly #s: IommufdState;
  readonly caller: Process;

  private constructor(state: IommufdState, caller: Process) {
    this.#s = state;
    this.caller = caller;
  }

  /** open("/dev/iommu"); `compat` = opened through /dev/vfio/vfio (RLIMIT_MODE starts at 1). */
  static open(process: Process, options: { compat?: boolean; thp?: boolean } = {}): IommufdContext {
    const mode = options.compat ? AccountMode.MM : AccountMode.USER;
    return new IommufdContext(new IommufdState(mode, options.thp ?? true), process);
  }

  /** The same open file used by another process. */
  as(process: Process): IommufdContext {
    return new IommufdContext(this.#s, process);
  }

  /** For tests and diagnostics: the pages table of this context. */
  get pagesTable(): PagesTable {
    return this.#s.pages;
  }

  #live(): void {
    if (this.#s.closed) throw kernelError('EBADF', 'iommufd is closed');
  }

  #get(id: number): IommufdObject | undefined {
    return this.#s.objects.get(id);
  }

  ioas(id: number, op: string): IoasObject {
    const obj = this.#get(id);
    if (obj?.kind !== 'ioas') throw kernelError('ENOENT', `no IOAS ${id}`, { op });
    return obj;
  }

  // ---- IOMMU_DESTROY ------------------------------------------------------------------------

  destroy(args: { id: number }): void {
    this.#live();
    const obj = this.#get(args.id);
    if (!obj) throw kernelError('ENOENT', `no object ${args.id}`, { op: 'DESTROY' });
    if (obj.kind === 'ioas') {
      if (obj.users > 0) throw kernelError('EBUSY', `IOAS ${obj.id} in use`, { op: 'DESTROY' });
      obj.iopt.unmapAll();
      if (this.#s.vfioIoas === obj) this.#s.vfioIoas = undefined;
    } else if (obj.kind === 'hwpt_paging') {
      if (obj.devices.size > 0) throw kernelError('EBUSY', `HWPT ${obj.id} has devices`, { op: 'DESTROY' });
      freeHwpt(this.#s, obj);
      return;
    } else if (obj.kind === 'access') {
      throw kernelError('EBUSY', `access ${obj.id} is owned by its driver`, { op: 'DESTROY' });
    } else {
      throw kernelError('EBUSY', `device ${obj.id} is owned by its VFIO device`, { op: 'DESTROY' });
    }
    this.#s.objects.delete(obj.id);
  }

  /** close(fd): everything destroyed leaf-first; pins released. */
  close(): void {
    if (this.#s.closed) return;
    for (const obj of [...this.#s.objects.values()]) if (obj.kind === 'access') obj.release();
    for (const obj of [...this.#s.objects.values()]) if (obj.kind === 'device') this.unbindDevice(obj.id);
    for (const obj of [...this.#s.objects.values()]) if (obj.kind === 'hwpt_paging') freeHwpt(this.#s, obj);
    for (const obj of [...this.#s.objects.values()]) if (obj.kind === 'ioas') obj.iopt.unmapAll();
    this.#s.objects.clear();
    this.#s.vfioIoas = undefined;
    this.#s.closed = true;
  }

  // ---- IOAS ---------------------------------------------------------------------------------

  ioasAlloc(args: { flags?: number } = {}): { outIoasId: number } {
    this.#live();
    if ((args.flags ?? 0) !== 0) throw kernelError('EOPNOTSUPP', 'unknown flags', { op: 'IOAS_ALLOC' });
    const ioas = this.#s.add<IoasObject>({
      kind: 'ioas',
      id: 0,
      iopt: new IoPagetable(this.#s.pages, { thp: this.#s.thp }),
      users: 0,
    });
    return { outIoasId: ioas.id };
  }

  #mapChecks(flags: number, reserved: number, iova: bigint, length: bigint, op: string): number {
    if ((flags & ~IOAS_MAP_FLAGS_ALL) !== 0 || reserved !== 0) {
      throw kernelError('EOPNOTSUPP', 'unknown flags or reserved set', { op });
    }
    if (iova >= U64_MAX || length >= U64_MAX) throw kernelError('EOVERFLOW', 'iova/length too big', { op });
    if ((flags & (IoasMapFlag.WRITEABLE | IoasMapFlag.READABLE)) === 0) {
      throw kernelError('EINVAL', 'neither READABLE nor WRITEABLE', { op });
    }
    return (
      (flags & IoasMapFlag.WRITEABLE ? AreaProt.WRITE : 0) |
      (flags & IoasMapFlag.READABLE ? AreaProt.READ : 0)
    );
  }

  #modeFor(process: Process): AccountMode {
    if (process.hasCap('CAP_IPC_LOCK')) return AccountMode.NONE;
    return this.#s.accountMode === AccountMode.MM ? AccountMode.MM : AccountMode.USER;
  }

  #mapNew(
    ioas: IoasObject,
    elm: { file?: import('../host/memfd.js').MemFile; start: bigint; length: bigint },
    args: { flags: number; iova?: bigint },
    prot: number,
    op: string,
  ): bigint {
    const iopt = ioas.iopt;
    const align = iopt.iovaAlignment;
    if (elm.length === 0n || elm.length % align !== 0n) {
      throw kernelError('EINVAL', 'length 0 or not a multiple of the IOVA alignment', { op });
    }
    if (elm.start + elm.length - 1n > U64_MAX)
      throw kernelError('EOVERFLOW', 'source range overflows', { op });
    const pagesId = this.#s.pages.alloc({
      owner: this.caller,
      ...(elm.file ? { file: elm.file } : {}),
      start: elm.start,
      length: elm.length,
      writable: (prot & AreaProt.WRITE) !== 0,
      mode: this.#modeFor(this.caller),
    });
    const fixed = (args.flags & IoasMapFlag.FIXED_IOVA) !== 0;
    try {
      const pagesElm: PagesElm = { pagesId, offset: 0n, length: elm.length };
      return iopt.map([pagesElm], elm.length, fixed ? (args.iova ?? 0n) : undefined, prot, elm.start);
    } catch (err) {
      throw withOp(err, op);
    } finally {
      this.#s.pages.unref(pagesId);
    }
  }

  /** IOMMU_IOAS_MAP: returns the IOVA (also written back to `args.iova`). */
  ioasMap(args: IoasMapArgs): { iova: bigint } {
    this.#live();
    const op = 'IOAS_MAP';
    const prot = this.#mapChecks(args.flags, args.reserved ?? 0, args.iova ?? 0n, args.length, op);
    const ioas = this.ioas(args.ioasId, op);
    const iova = this.#mapNew(ioas, { start: args.userVa, length: args.length }, args, prot, op);
    args.iova = iova;
    return { iova };
  }

  /** IOMMU_IOAS_MAP_FILE: source = the caller's open memfd `fd` from offset `start`. */
  ioasMapFile(args: IoasMapFileArgs): { iova: bigint } {
    this.#live();
    const op = 'IOAS_MAP_FILE';
    const prot = this.#mapChecks(args.flags, 0, args.iova ?? 0n, args.length, op);
    const ioas = this.ioas(args.ioasId, op);
    const open = this.caller.file(args.fd);
    if (!open) throw kernelError('EBADF', `fd ${args.fd} not open`, { op });
    if (prot & AreaProt.WRITE && !open.writable) {
      throw kernelError('EPERM', 'WRITEABLE mapping of a file not open for write', { op });
    }
    const iova = this.#mapNew(
      ioas,
      { file: open.file, start: args.start, length: args.length },
      args,
      prot,
      op,
    );
    args.iova = iova;
    return { iova };
  }

  /** IOMMU_IOAS_COPY: new areas in dst sharing src's pages (no new pins for pinned pages). */
  ioasCopy(args: IoasCopyArgs): { dstIova: bigint } {
    this.#live();
    const op = 'IOAS_COPY';
    const dstIova = args.dstIova ?? 0n;
    if (args.length >= U64_MAX || args.srcIova >= U64_MAX || dstIova >= U64_MAX) {
      throw kernelError('EOVERFLOW', 'iova/length too big', { op });
    }
    const prot = this.#mapChecks(args.flags, 0, 0n, 0n, op);
    const src = this.ioas(args.srcIoasId, op);
    let elms: PagesElm[];
    try {
      elms = src.iopt.getPages(args.srcIova, args.length);
    } catch (err) {
      throw withOp(err, op);
    }
    const dst = this.ioas(args.dstIoasId, op);
    const fixed = (args.flags & IoasMapFlag.FIXED_IOVA) !== 0;
    const first = elms[0]!;
    const addr = this.#s.pages.start(first.pagesId) + first.offset;
    try {
      const iova = dst.iopt.map(elms, args.length, fixed ? dstIova : undefined, prot, addr);
      args.dstIova = iova;
      return { dstIova: iova };
    } catch (err) {
      throw withOp(err, op);
    }
  }

  /** IOMMU_IOAS_UNMAP: returns (and writes back) the number of bytes unmapped. */
  ioasUnmap(args: IoasUnmapArgs): { length: bigint } {
    this.#live();
    const op = 'IOAS_UNMAP';
    const ioas = this.ioas(args.ioasId, op);
    let length: bigint;
    try {
      if (args.iova === 0n && args.length === U64_MAX) length = ioas.iopt.unmapAll();
      else {
        if (args.iova >= U64_MAX || args.length >= U64_MAX)
          throw kernelError('EOVERFLOW', 'iova/length too big');
        if (args.length === 0n) throw kernelError('EINVAL', 'length 0');
        const last = args.iova + args.length - 1n;
        if (last > U64_MAX) throw kernelError('EOVERFLOW', 'iova + length overflows');
        length = ioas.iopt.unmapRange(args.iova, last);
      }
    } catch (err) {
      throw withOp(err, op);
    }
    args.length = length;
    return { length };
  }

  /** IOMMU_IOAS_IOVA_RANGES: fills `allowedIovas` up to `numIovas`, EMSGSIZE if more exist. */
  ioasIovaRanges(args: IoasIovaRangesArgs): IoasIovaRangesArgs {
    this.#live();
    const op = 'IOAS_IOVA_RANGES';
    if ((args.reserved ?? 0) !== 0) throw kernelError('EOPNOTSUPP', 'reserved set', { op });
    const ioas = this.ioas(args.ioasId, op);
    const ranges = ioas.iopt.usableRanges();
    const capacity = args.numIovas;
    args.allowedIovas = ranges.slice(0, capacity);
    args.numIovas = ranges.length;
    args.outIovaAlignment = ioas.iopt.iovaAlignment;
    if (ranges.length > capacity) {
      throw kernelError('EMSGSIZE', `${ranges.length} ranges, room for ${capacity}`, { op });
    }
    return args;
  }

  /** IOMMU_IOAS_ALLOW_IOVAS: atomically replaces the allowed list. */
  ioasAllowIovas(args: IoasAllowIovasArgs): void {
    this.#live();
    const op = 'IOAS_ALLOW_IOVAS';
    if ((args.reserved ?? 0) !== 0) throw kernelError('EOPNOTSUPP', 'reserved set', { op });
    const ioas = this.ioas(args.ioasId, op);
    const ranges: IovaRange[] = [];
    for (const r of args.allowedIovas) {
      if (r.start >= r.last) throw kernelError('EINVAL', 'range start >= last', { op });
      if (ranges.some((o) => o.start <= r.last && r.start <= o.last)) {
        throw kernelError('EINVAL', 'allowed ranges overlap', { op });
      }
      ranges.push({ start: r.start, last: r.last });
    }
    try {
      ioas.iopt.setAllowed(ranges);
    } catch (err) {
      throw withOp(err, op);
    }
  }

  /**
   * IOMMU_IOAS_CHANGE_PROCESS: moves every pin charge to the caller; all areas must be MAP_FILE.
   * softvfio extensions: each pages object's cgroup charge moves to the caller's cgroup too (only
   * below the common ancestor; ENOMEM over a limit, nothing changed); the context's own charge
   * (CONTEXT_LIMIT) stays as it is.
   */
  ioasChangeProcess(args: { reserved?: number } = {}): void {
    this.#live();
    const op = 'IOAS_CHANGE_PROCESS';
    if ((args.reserved ?? 0) !== 0) throw kernelError('EOPNOTSUPP', 'reserved set', { op });
    const pages = this.#s.pages;
    const todo = new Set<number>();
    for (const obj of this.#s.objects.values()) {
      if (obj.kind !== 'ioas') continue;
      for (const a of obj.iopt.areas()) {
        const id = obj.iopt.areaPages(a);
        if (!pages.isFile(id)) throw kernelError('EINVAL', 'an area is not from MAP_FILE', { op });
        if (pages.source(id).ownerMm !== this.caller.mm) todo.add(id);
      }
    }
    const charged: [number, OwnerChange][] = [];
    try {
      for (const id of todo) charged.push([id, pages.chargeNewOwner(id, this.caller)]);
    } catch (err) {
      for (const [id, src] of charged) pages.uncommitOwner(id, src);
      throw withOp(err, op);
    }
    for (const [id, src] of charged) pages.commitOwner(id, src);
  }

  // ---- IOMMU_OPTION -------------------------------------------------------------------------

  option(args: OptionArgs): OptionArgs {
    this.#live();
    const op = 'OPTION';
    if ((args.reserved ?? 0) !== 0) throw kernelError('EOPNOTSUPP', 'reserved set', { op });
    if (args.optionId === IommuOption.RLIMIT_MODE) {
      if (args.objectId !== 0) throw kernelError('EOPNOTSUPP', 'RLIMIT_MODE is global', { op });
      if (args.op === IommuOptionOp.GET) {
        args.val64 = this.#s.accountMode === AccountMode.MM ? 1n : 0n;
        return args;
      }
      if (args.op === IommuOptionOp.SET) {
        if (!this.caller.hasCap('CAP_SYS_RESOURCE'))
          throw kernelError('EPERM', 'needs CAP_SYS_RESOURCE', { op });
        if (this.#s.objects.size > 0) throw kernelError('EBUSY', 'objects exist', { op });
        if (args.val64 === 0n) this.#s.accountMode = AccountMode.USER;
        else if (args.val64 === 1n) this.#s.accountMode = AccountMode.MM;
        else throw kernelError('EINVAL', `bad RLIMIT_MODE ${args.val64}`, { op });
        return args;
      }
      throw kernelError('EOPNOTSUPP', `unknown op ${args.op}`, { op });
    }
    if (args.optionId === IommuOption.HUGE_PAGES) {
      const ioas = this.ioas(args.objectId, op);
      if (args.op === IommuOptionOp.GET) {
        args.val64 = ioas.iopt.disableLargePages ? 0n : 1n;
        return args;
      }
      if (args.op === IommuOptionOp.SET) {
        if (args.val64 === 0n) {
          try {
            ioas.iopt.disableLarge();
          } catch (err) {
            throw withOp(err, op);
          }
        } else if (args.val64 === 1n) ioas.iopt.disableLargePages = false;
        else throw kernelError('EINVAL', `bad HUGE_PAGES ${args.val64}`, { op });
        return args;
      }
      throw kernelError('EOPNOTSUPP', `unknown op ${args.op}`, { op });
    }
    if (args.optionId === SoftvfioIommuOption.CONTEXT_LIMIT) return this.#contextLimitOption(args);
    if (args.optionId === SoftvfioIommuOption.CONTEXT_PINNED) {
      if (args.objectId !== 0) throw kernelError('EOPNOTSUPP', 'CONTEXT_PINNED is global', { op });
      if (args.op !== IommuOptionOp.GET) {
        throw kernelError('EOPNOTSUPP', 'CONTEXT_PINNED can only be read', { op });
      }
      args.val64 = BigInt(this.#s.pages.contextPinnedPages) * 4096n;
      return args;
    }
    throw kernelError('EOPNOTSUPP', `unknown option ${args.optionId}`, { op });
  }

  /** softvfio IOMMU_OPTION_SOFTVFIO_CONTEXT_LIMIT (see src/uapi/iommufd.ts). */
  #contextLimitOption(args: OptionArgs): OptionArgs {
    const op = 'OPTION';
    if (args.objectId !== 0) throw kernelError('EOPNOTSUPP', 'CONTEXT_LIMIT is global', { op });
    if (args.op === IommuOptionOp.GET) {
      args.val64 = this.#s.contextLimitBytes;
      return args;
    }
    if (args.op === IommuOptionOp.SET) {
      if (!this.caller.hasCap('CAP_SYS_RESOURCE'))
        throw kernelError('EPERM', 'needs CAP_SYS_RESOURCE', { op });
      if (this.#s.objects.size > 0) throw kernelError('EBUSY', 'objects exist', { op });
      if (args.val64 < 0n || args.val64 > U64_MAX) {
        throw kernelError('EINVAL', `bad CONTEXT_LIMIT ${args.val64}`, { op });
      }
      this.#s.contextLimitBytes = args.val64;
      this.#s.pages.contextLimitPages = args.val64 === U64_MAX ? Infinity : Number(args.val64 >> 12n);
      return args;
    }
    throw kernelError('EOPNOTSUPP', `unknown op ${args.op}`, { op });
  }

  // ---- devices (minimal VFIO cdev bind/attach) ---------------------------------------------

  /**
   * VFIO_DEVICE_BIND_IOMMUFD: a DEVICE object; returns out_devid. `dirtyTracking`: the device's
   * IOMMU can track dirty pages (IOMMU_CAP_DIRTY_TRACKING), default false.
   */
  bindDevice(args: { name: string; reservedIovaRanges?: IovaRange[]; dirtyTracking?: boolean }): {
    outDevid: number;
  } {
    this.#live();
    const dev = this.#s.add<DeviceObject>({
      kind: 'device',
      id: 0,
      name: args.name,
      reservedIovaRanges: args.reservedIovaRanges ?? [],
      dirtyTracking: args.dirtyTracking ?? false,
      hwpt: undefined,
    });
    return { outDevid: dev.id };
  }

  /** Closing the VFIO device fd: detach, then the DEVICE object goes. */
  unbindDevice(devId: number): void {
    const dev = device(this.#s, devId, 'UNBIND');
    if (dev.hwpt) this.detach({ devId });
    this.#s.objects.delete(dev.id);
  }

  /**
   * VFIO_DEVICE_ATTACH_IOMMUFD_PT to an IOAS (auto HWPT_PAGING, reused when one exists) or to a
   * HWPT_PAGING; on an attached device it replaces the attachment (no change on failure).
   * Attaching fills the domain: every area pinned (EFAULT/ENOMEM, undone on failure). Returns the
   * HWPT id (`pt_id` out).
   */
  attachIoas(args: { devId: number; ptId: number }): { ptId: number } {
    this.#live();
    const op = 'ATTACH_IOMMUFD_PT';
    const dev = device(this.#s, args.devId, op);
    return { ptId: attachDevice(this.#s, dev, args.ptId, op) };
  }

  /** VFIO_DEVICE_DETACH_IOMMUFD_PT: an auto HWPT goes with its last device. */
  detach(args: { devId: number }): void {
    detachDevice(this.#s, device(this.#s, args.devId, 'DETACH_IOMMUFD_PT'));
  }

  /** The IOAS a device currently reaches through its HWPT, if attached. */
  deviceIoas(devId: number): IoasObject | undefined {
    return this.deviceHwpt(devId)?.ioas;
  }

  /** The HWPT a device is attached to, if any. */
  deviceHwpt(devId: number): HwptPagingObject | undefined {
    const obj = this.#get(devId);
    return obj?.kind === 'device' ? obj.hwpt : undefined;
  }

  // ---- HWPT ---------------------------------------------------------------------------------

  /** IOMMU_HWPT_ALLOC (see hwpt.ts for the errno order). */
  hwptAlloc(args: HwptAllocArgs): { outHwptId: number } {
    this.#live();
    return hwptAlloc(this.#s, args);
  }

  /** IOMMU_GET_HW_INFO. */
  getHwInfo(args: GetHwInfoArgs): { outDataType: number; dataLen: number; outCapabilities: bigint } {
    this.#live();
    return getHwInfo(this.#s, args);
  }

  /** IOMMU_HWPT_SET_DIRTY_TRACKING. */
  hwptSetDirtyTracking(args: HwptSetDirtyTrackingArgs): void {
    this.#live();
    hwptSetDirtyTracking(this.#s, args);
  }

  /** IOMMU_HWPT_GET_DIRTY_BITMAP. */
  hwptGetDirtyBitmap(args: HwptGetDirtyBitmapArgs): void {
    this.#live();
    hwptGetDirtyBitmap(this.#s, args);
  }

  // ---- accesses (in-kernel users: emulated/mediated devices) --------------------------------

  /** `iommufd_access_create` + attach to `ioasId` (ENOENT, EADDRINUSE). */
  accessCreate(ioasId: number, ops: AccessOps, options: AccessCreateOptions = {}): IommufdAccess {
    this.#live();
    return IommufdAccess.create(this.#s, ioasId, ops, false, options);
  }

  /** An internal access (as for HW queues): no unmap notice, its pins lock the areas. */
  accessCreateInternal(ioasId: number): IommufdAccess {
    this.#live();
    return IommufdAccess.create(this.#s, ioasId, undefined, true);
  }

  // ---- VFIO compat IOAS (the container ioctls live in vfio-compat.ts) -------------------------

  /** IOMMU_VFIO_IOAS: GET (none -> ENODEV), SET (not an IOAS -> ENOENT), CLEAR; returns ioasId. */
  vfioIoas(args: VfioIoasArgs): VfioIoasArgs {
    this.#live();
    const op = 'VFIO_IOAS';
    if ((args.reserved ?? 0) !== 0) throw kernelError('EOPNOTSUPP', 'reserved set', { op });
    if (args.op === IommuVfioIoasOp.GET) {
      args.ioasId = this.compatIoas(op).id;
      return args;
    }
    if (args.op === IommuVfioIoasOp.SET) {
      this.#s.vfioIoas = this.ioas(args.ioasId, op);
      return args;
    }
    if (args.op === IommuVfioIoasOp.CLEAR) {
      this.#s.vfioIoas = undefined;
      return args;
    }
    throw kernelError('EOPNOTSUPP', `unknown op ${args.op}`, { op });
  }

  /** @internal `get_compat_ioas`: ENODEV when no compat IOAS is set. */
  compatIoas(op: string): IoasObject {
    this.#live();
    const ioas = this.#s.vfioIoas;
    if (!ioas) throw kernelError('ENODEV', 'no VFIO compat IOAS', { op });
    return ioas;
  }

  /** @internal `iommufd_vfio_compat_ioas_create`: the compat IOAS, allocated (a user object) if none. */
  compatIoasCreate(): IoasObject {
    this.#live();
    if (!this.#s.vfioIoas) this.#s.vfioIoas = this.ioas(this.ioasAlloc().outIoasId, 'VFIO_IOAS');
    return this.#s.vfioIoas;
  }

  /**
   * @internal `iopt_map_user_pages` at a fixed IOVA, as VFIO_IOMMU_MAP_DMA calls it: raw AreaProt
   * bits (no READ/WRITE check), the fd's accounting mode for the caller.
   */
  compatMapUserPages(
    ioas: IoasObject,
    userVa: bigint,
    length: bigint,
    iova: bigint,
    prot: number,
    op: string,
  ): void {
    this.#mapNew(ioas, { start: userVa, length }, { flags: IoasMapFlag.FIXED_IOVA, iova }, prot, op);
  }
}

function withOp(err: unknown, op: string): unknown {
  if (err && typeof err === 'object' && 'errno' in err && (err as { op?: string }).op === undefined) {
    const e = err as { errno: string; message: string };
    return kernelError(e.errno as never, e.message, { op });
  }
  return err;
}
