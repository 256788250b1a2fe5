import { U64_MAX } from '../../uapi/arch.js';
import { isErrno, kernelError } from '../../uapi/error.js';
import {
  HWPT_ALLOC_FLAGS_ALL,
  HWPT_DIRTY_TRACKING_ENABLE,
  HWPT_GET_DIRTY_BITMAP_NO_CLEAR,
  HwInfoType,
  HwptAllocFlag,
  HwptDataType,
  IOMMU_HW_CAP_DIRTY_TRACKING,
} from '../../uapi/iommufd.js';
import { DirtyBitmap } from './dirty-bitmap.js';
import { withOp } from './errors.js';
import type { DeviceObject, HwptPagingObject, IoasObject, IommufdCore } from './objects.js';

/**
 * HW page tables (`struct iommufd_hwpt_paging`): one IOMMU domain over an IOAS, made explicitly by
 * HWPT_ALLOC or automatically by attaching a device to the IOAS; device attach/replace/detach;
 * GET_HW_INFO; dirty tracking (HWPT_SET_DIRTY_TRACKING, HWPT_GET_DIRTY_BITMAP).
 *
 * The modeled IOMMU: 4 KiB domain pages, paging domains allocated with flags (NEST_PARENT,
 * DIRTY_TRACKING, PASID accepted), no driver data and no nested domains, no FAULT objects, and a
 * per-device dirty tracking capability. A dirty-tracking domain can only hold devices whose IOMMU
 * tracks dirty pages (others: EINVAL at attach, as the VT-d/SMMUv3 drivers answer).
 */

export interface HwptAllocArgs {
  flags: number;
  devId: number;
  /** IOAS (paging HWPT) or HWPT_PAGING (nested HWPT: not supported by the modeled IOMMU). */
  ptId: number;
  /** `enum iommu_hwpt_data_type`; default NONE. */
  dataType?: number;
  /** Driver-specific data (`data_uptr`/`data_len`). */
  data?: Uint8Array;
  /** With FAULT_ID_VALID: the FAULT object to report to. */
  faultId?: number;
  reserved?: number;
  outHwptId?: number;
}

export interface GetHwInfoArgs {
  devId: number;
  flags?: number;
  reserved?: number;
  /** The user buffer for type-specific data (`data_uptr`, `data_len` = its length). */
  data?: Uint8Array;
  /** Out: bytes of type-specific data the kernel has. */
  dataLen?: number;
  outDataType?: number;
  outCapabilities?: bigint;
}

export interface HwptSetDirtyTrackingArgs {
  flags: number;
  hwptId: number;
}

export interface HwptGetDirtyBitmapArgs {
  hwptId: number;
  flags: number;
  reserved?: number;
  iova: bigint;
  length: bigint;
  pageSize: bigint;
  /**
   * The bitmap: u64 words (as bytes of little-endian words, or as the words themselves); bits are
   * only set, never cleared.
   */
  data: Uint8Array | BigUint64Array;
}

export function device(core: IommufdCore, id: number, op: string): DeviceObject {
  const obj = core.objects.get(id);
  if (obj?.kind !== 'device') throw kernelError('ENOENT', `no device ${id}`, { op });
  return obj;
}

/** `iommufd_get_hwpt_paging`: a missing id or another kind -> ENOENT. */
export function hwptPaging(core: IommufdCore, id: number, op: string): HwptPagingObject {
  const obj = core.objects.get(id);
  if (obj?.kind !== 'hwpt_paging') throw kernelError('ENOENT', `no paging HWPT ${id}`, { op });
  return obj;
}

// ---- lifetime ---------------------------------------------------------------------------------

/** A HWPT object in the table (id taken now, as xa_alloc does), holding its IOAS; no domain yet. */
function newHwpt(core: IommufdCore, ioas: IoasObject, flags: number, auto: boolean): HwptPagingObject {
  const dirty = flags & HwptAllocFlag.DIRTY_TRACKING ? new DirtyBitmap() : undefined;
  const hwpt: HwptPagingObject = {
    kind: 'hwpt_paging',
    id: 0,
    ioas,
    auto,
    devices: new Set(),
    flags,
    dirty,
    dirtyTracking: false,
  };
  ioas.users++;
  return core.add(hwpt);
}

/** Undoes `newHwpt` for a HWPT whose domain was never added. */
function abortHwpt(core: IommufdCore, hwpt: HwptPagingObject): void {
  hwpt.ioas.users--;
  core.objects.delete(hwpt.id);
}

/** `iopt_table_add_domain`: fills the domain with every area (pins; EFAULT/ENOMEM/EADDRINUSE). */
function addDomain(hwpt: HwptPagingObject): void {
  hwpt.ioas.iopt.addDomain([], hwpt, hwpt.dirty);
}

/** Destroys a HWPT with no devices: its domain leaves the IOAS, its id goes. */
export function freeHwpt(core: IommufdCore, hwpt: HwptPagingObject): void {
  hwpt.ioas.iopt.removeDomain(hwpt);
  abortHwpt(core, hwpt);
}

/** The last device leaving an automatic HWPT destroys it. */
function putHwpt(core: IommufdCore, hwpt: HwptPagingObject): void {
  if (hwpt.auto && hwpt.devices.size === 0) freeHwpt(core, hwpt);
}

// ---- attach / replace / detach ----------------------------------------------------------------

/** The IOMMU driver's attach check: a dirty-tracking domain needs a dirty-capable IOMMU. */
function checkCompatible(dev: DeviceObject, hwpt: HwptPagingObject): void {
  if (hwpt.dirty && !dev.dirtyTracking) {
    throw kernelError('EINVAL', `device ${dev.name}: IOMMU cannot track dirty pages of HWPT ${hwpt.id}`);
  }
}

/** `iommufd_hw_pagetable_attach`: reserved regions (EADDRINUSE), then the driver (EINVAL). */
function doAttach(dev: DeviceObject, hwpt: HwptPagingObject): void {
  const iopt = hwpt.ioas.iopt;
  iopt.reserve(dev.reservedIovaRanges, dev);
  try {
    checkCompatible(dev, hwpt);
  } catch (err) {
    iopt.unreserve(dev);
    throw err;
  }
  hwpt.devices.add(dev);
  dev.hwpt = hwpt;
}

/** `iommufd_device_do_replace`: no change on failure; the old HWPT is put afterwards. */
function doReplace(core: IommufdCore, dev: DeviceObject, hwpt: HwptPagingObject): void {
  const old = dev.hwpt!;
  if (old === hwpt) return;
  const moving = old.ioas !== hwpt.ioas;
  if (moving) hwpt.ioas.iopt.reserve(dev.reservedIovaRanges, dev);
  try {
    checkCompatible(dev, hwpt);
  } catch (err) {
    if (moving) hwpt.ioas.iopt.unreserve(dev);
    throw err;
  }
  if (moving) old.ioas.iopt.unreserve(dev);
  old.devices.delete(dev);
  hwpt.devices.add(dev);
  dev.hwpt = hwpt;
  putHwpt(core, old);
}

/**
 * VFIO_DEVICE_ATTACH_IOMMUFD_PT (attach, or replace when already attached). `ptId` = a HWPT_PAGING
 * (used as is) or an IOAS (an automatic HWPT of it is reused, else a new one made: pins every
 * area). Missing id -> ENOENT, another kind -> EINVAL. Returns the HWPT id.
 */
export function attachDevice(core: IommufdCore, dev: DeviceObject, ptId: number, op: string): number {
  const target = core.objects.get(ptId);
  if (!target) throw kernelError('ENOENT', `no object ${ptId}`, { op });
  const attached = dev.hwpt !== undefined;
  try {
    if (target.kind === 'hwpt_paging') {
      if (attached) doReplace(core, dev, target);
      else doAttach(dev, target);
      return target.id;
    }
    if (target.kind !== 'ioas') throw kernelError('EINVAL', `object ${ptId} is not an IOAS or a HWPT`);
    // iommufd_device_auto_get_domain: any compatible automatic domain will do.
    for (const obj of [...core.objects.values()]) {
      if (obj.kind !== 'hwpt_paging' || !obj.auto || obj.ioas !== target) continue;
      try {
        if (attached) doReplace(core, dev, obj);
        else doAttach(dev, obj);
        return obj.id;
      } catch (err) {
        if (!isErrno(err, 'EINVAL')) throw err;
      }
    }
    const hwpt = newHwpt(core, target, 0, true);
    if (!attached) {
      // Immediate attach: the device first (reserved regions), then the domain is filled.
      try {
        doAttach(dev, hwpt);
      } catch (err) {
        abortHwpt(core, hwpt);
        throw err;
      }
      try {
        addDomain(hwpt);
      } catch (err) {
        hwpt.devices.delete(dev);
        dev.hwpt = undefined;
        target.iopt.unreserve(dev);
        abortHwpt(core, hwpt);
        throw err;
      }
    } else {
      try {
        addDomain(hwpt);
      } catch (err) {
        abortHwpt(core, hwpt);
        throw err;
      }
      try {
        doReplace(core, dev, hwpt);
      } catch (err) {
        freeHwpt(core, hwpt);
        throw err;
      }
    }
    return hwpt.id;
  } catch (err) {
    throw withOp(err, op);
  }
}

/** VFIO_DEVICE_DETACH_IOMMUFD_PT: reserved regions released; an automatic HWPT goes with its last device. */
export function detachDevice(core: IommufdCore, dev: DeviceObject): void {
  const hwpt = dev.hwpt;
  if (!hwpt) return;
  hwpt.devices.delete(dev);
  dev.hwpt = undefined;
  hwpt.ioas.iopt.unreserve(dev);
  putHwpt(core, hwpt);
}

// ---- ioctls -----------------------------------------------------------------------------------

/**
 * IOMMU_HWPT_ALLOC. Order: reserved -> EOPNOTSUPP; data type/length mismatch -> EINVAL; device
 * -> ENOENT; pt_id missing or not an IOAS/HWPT -> EINVAL; on an IOAS: unknown flags ->
 * EOPNOTSUPP, DIRTY_TRACKING without a capable IOMMU -> EOPNOTSUPP, driver data -> EOPNOTSUPP,
 * domain fill errors, FAULT_ID_VALID with no such FAULT -> ENOENT; on a HWPT (nested) ->
 * EOPNOTSUPP.
 */
export function hwptAlloc(core: IommufdCore, args: HwptAllocArgs): { outHwptId: number } {
  const op = 'HWPT_ALLOC';
  if ((args.reserved ?? 0) !== 0) throw kernelError('EOPNOTSUPP', 'reserved set', { op });
  const dataType = args.dataType ?? HwptDataType.NONE;
  const dataLen = args.data?.length ?? 0;
  if (
    (dataType === HwptDataType.NONE && dataLen !== 0) ||
    (dataType !== HwptDataType.NONE && dataLen === 0)
  ) {
    throw kernelError('EINVAL', 'data type and data length disagree', { op });
  }
  const dev = device(core, args.devId, op);
  const pt = core.objects.get(args.ptId);
  if (pt?.kind === 'hwpt_paging') {
    throw kernelError('EOPNOTSUPP', 'the IOMMU has no nested domains', { op });
  }
  if (pt?.kind !== 'ioas')
    throw kernelError('EINVAL', `object ${args.ptId} is not an IOAS or a HWPT`, { op });
  const flags = args.flags;
  if ((flags & ~HWPT_ALLOC_FLAGS_ALL) !== 0) {
    throw kernelError('EOPNOTSUPP', `unknown flags 0x${flags.toString(16)}`, { op });
  }
  if (flags & HwptAllocFlag.DIRTY_TRACKING && !dev.dirtyTracking) {
    throw kernelError('EOPNOTSUPP', `device ${dev.name}: IOMMU cannot track dirty pages`, { op });
  }
  if (dataLen !== 0) throw kernelError('EOPNOTSUPP', 'no driver data for a paging domain', { op });
  const hwpt = newHwpt(core, pt, flags, false);
  try {
    addDomain(hwpt);
  } catch (err) {
    abortHwpt(core, hwpt);
    throw withOp(err, op);
  }
  if (flags & HwptAllocFlag.FAULT_ID_VALID) {
    freeHwpt(core, hwpt);
    throw kernelError('ENOENT', `no FAULT object ${args.faultId ?? 0}`, { op });
  }
  args.outHwptId = hwpt.id;
  return { outHwptId: hwpt.id };
}

/** IOMMU_GET_HW_INFO: no type-specific data (type NONE, length 0; the buffer is zeroed), capabilities. */
export function getHwInfo(
  core: IommufdCore,
  args: GetHwInfoArgs,
): { outDataType: number; dataLen: number; outCapabilities: bigint } {
  const op = 'GET_HW_INFO';
  if ((args.flags ?? 0) !== 0 || (args.reserved ?? 0) !== 0) {
    throw kernelError('EOPNOTSUPP', 'unknown flags or reserved set', { op });
  }
  const dev = device(core, args.devId, op);
  args.data?.fill(0);
  args.outDataType = HwInfoType.NONE;
  args.dataLen = 0;
  args.outCapabilities = dev.dirtyTracking ? BigInt(IOMMU_HW_CAP_DIRTY_TRACKING) : 0n;
  return { outDataType: args.outDataType, dataLen: 0, outCapabilities: args.outCapabilities };
}

/**
 * IOMMU_HWPT_SET_DIRTY_TRACKING: unknown flags -> EOPNOTSUPP; not a paging HWPT -> ENOENT; domain
 * without dirty tracking -> EOPNOTSUPP. Enabling first clears every dirty bit.
 */
export function hwptSetDirtyTracking(core: IommufdCore, args: HwptSetDirtyTrackingArgs): void {
  const op = 'HWPT_SET_DIRTY_TRACKING';
  if ((args.flags & ~HWPT_DIRTY_TRACKING_ENABLE) !== 0) {
    throw kernelError('EOPNOTSUPP', `unknown flags 0x${args.flags.toString(16)}`, { op });
  }
  const hwpt = hwptPaging(core, args.hwptId, op);
  if (!hwpt.dirty) throw kernelError('EOPNOTSUPP', `HWPT ${hwpt.id} has no dirty tracking`, { op });
  const enable = (args.flags & HWPT_DIRTY_TRACKING_ENABLE) !== 0;
  if (enable) hwpt.dirty.clear();
  hwpt.dirtyTracking = enable;
}

const ctz = (n: bigint): number => {
  let s = 0;
  while ((n & 1n) === 0n) {
    n >>= 1n;
    s++;
  }
  return s;
};

/**
 * IOMMU_HWPT_GET_DIRTY_BITMAP. Order: unknown flags or reserved -> EOPNOTSUPP; not a paging HWPT
 * -> ENOENT; iova + length - 1 overflows -> EOVERFLOW; iova or end not aligned to the IOAS
 * alignment -> EINVAL; page_size 0 -> EINVAL; iova or end not aligned to page_size -> EINVAL;
 * domain without dirty tracking -> EOPNOTSUPP; bitmap shorter than the range needs -> EFAULT.
 *
 * Bit (a - iova) >> log2(page_size) (u64 word idx / 64, bit idx % 64, little-endian) is set for
 * each dirty byte a; bits are cleared in the domain unless NO_CLEAR. As in the kernel, the walk
 * covers the areas back to back from `iova` and stops silently at the first hole.
 */
export function hwptGetDirtyBitmap(core: IommufdCore, args: HwptGetDirtyBitmapArgs): void {
  const op = 'HWPT_GET_DIRTY_BITMAP';
  if ((args.flags & ~HWPT_GET_DIRTY_BITMAP_NO_CLEAR) !== 0 || (args.reserved ?? 0) !== 0) {
    throw kernelError('EOPNOTSUPP', 'unknown flags or reserved set', { op });
  }
  const hwpt = hwptPaging(core, args.hwptId, op);
  const { iova, length, pageSize } = args;
  // iommufd_check_iova_range
  const lengthM1 = (length - 1n) & U64_MAX;
  const last = iova + lengthM1;
  if (last > U64_MAX) throw kernelError('EOVERFLOW', 'iova + length overflows', { op });
  const end = (last + 1n) & U64_MAX;
  const align = hwpt.ioas.iopt.iovaAlignment;
  if ((iova & (align - 1n)) !== 0n || (end & (align - 1n)) !== 0n) {
    throw kernelError('EINVAL', `range not aligned to the IOAS alignment ${align}`, { op });
  }
  if (pageSize === 0n) throw kernelError('EINVAL', 'page_size 0', { op });
  if ((iova & (pageSize - 1n)) !== 0n || (end & (pageSize - 1n)) !== 0n) {
    throw kernelError('EINVAL', `range not aligned to page_size ${pageSize}`, { op });
  }
  const dirty = hwpt.dirty;
  if (!dirty) throw kernelError('EOPNOTSUPP', `HWPT ${hwpt.id} has no dirty tracking`, { op });
  // iova_bitmap: one bit per 1 << __ffs(page_size) bytes, in u64 words.
  const shift = ctz(pageSize);
  const words = ((lengthM1 >> BigInt(shift)) >> 6n) + 1n;
  const data = args.data;
  if (words * 8n > BigInt(data.byteLength)) {
    throw kernelError('EFAULT', `bitmap needs ${words * 8n} bytes, has ${data.byteLength}`, { op });
  }
  const runEnd = hwpt.ioas.iopt.contigEnd(iova, last);
  if (runEnd < 0n) return;
  const set =
    data instanceof BigUint64Array
      ? (b: number): void => {
          const w = Math.floor(b / 64);
          data[w] = data[w]! | (1n << BigInt(b % 64));
        }
      : (b: number): void => {
          const byte = Math.floor(b / 8);
          data[byte] = data[byte]! | (1 << (b % 8));
        };
  const basePage = Number(iova >> 12n);
  const clear = (args.flags & HWPT_GET_DIRTY_BITMAP_NO_CLEAR) === 0;
  if (shift >= 12) {
    const per = 2 ** (shift - 12);
    dirty.forEachDirty(basePage, Number(runEnd >> 12n), clear, (p) => set(Math.floor((p - basePage) / per)));
  } else {
    const bits = 2 ** (12 - shift);
    dirty.forEachDirty(basePage, Number(runEnd >> 12n), clear, (p) => {
      const b0 = (p - basePage) * bits;
      for (let b = b0; b < b0 + bits; b++) set(b);
    });
  }
}
