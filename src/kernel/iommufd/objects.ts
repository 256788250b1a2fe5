import type { IovaRange } from '../../uapi/iommufd.js';
import type { DirtyBitmap } from './dirty-bitmap.js';
import type { IoPagetable } from './io-pagetable.js';
import type { PagesTable } from './pages.js';

/** The objects of one iommufd's table (`struct iommufd_object` and its kinds). */

export interface IoasObject {
  readonly kind: 'ioas';
  id: number;
  readonly iopt: IoPagetable;
  /** HWPTs and accesses holding this IOAS. */
  users: number;
}

export interface HwptPagingObject {
  readonly kind: 'hwpt_paging';
  id: number;
  readonly ioas: IoasObject;
  /** Made by an attach to the IOAS (freed with its last device), not by HWPT_ALLOC. */
  readonly auto: boolean;
  readonly devices: Set<DeviceObject>;
  /** The IOMMU_HWPT_ALLOC_* flags it was allocated with (0 for an automatic one). */
  readonly flags: number;
  /** The domain's dirty bits: present iff allocated with DIRTY_TRACKING (the domain has dirty ops). */
  readonly dirty: DirtyBitmap | undefined;
  /** HWPT_SET_DIRTY_TRACKING state: device DMA writes mark `dirty` while it is on. */
  dirtyTracking: boolean;
}

export interface DeviceObject {
  readonly kind: 'device';
  id: number;
  readonly name: string;
  readonly reservedIovaRanges: readonly IovaRange[];
  /** Whether the device's IOMMU can track dirty pages (`IOMMU_CAP_DIRTY_TRACKING`). */
  readonly dirtyTracking: boolean;
  hwpt: HwptPagingObject | undefined;
}

/** An in-kernel user of an IOAS (emulated/mediated device, or an internal one that locks areas). */
export interface AccessObject {
  readonly kind: 'access';
  id: number;
  readonly internal: boolean;
  /** Tears the access down (unmap notice, pins dropped, IOAS released): fd close. */
  release(): void;
}

export type IommufdObject = IoasObject | HwptPagingObject | DeviceObject | AccessObject;

/** What the HWPT and access modules need from an open iommufd: its object table and pages. */
export interface IommufdCore {
  readonly objects: Map<number, IommufdObject>;
  readonly pages: PagesTable;
  /** Inserts `obj` at the lowest free id (xa_alloc from 1) and returns it. */
  add<T extends IommufdObject>(obj: T): T;
}
