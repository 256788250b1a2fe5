import type { Process } from '../../kernel/host/host.js';
import type { IommufdAccess } from '../../kernel/iommufd/access.js';
import { IommufdContext } from '../../kernel/iommufd/context.js';
import { IoasDmaSpace } from '../../kernel/iommufd/dma-space.js';
import type { DmaSpace } from '../../kernel/vfio/dma-port.js';
import { internalError, invalidArgument, isErrno } from '../../uapi/error.js';
import {
  HwptAllocFlag,
  IOMMU_HW_CAP_DIRTY_TRACKING,
  IoasMapFlag,
  IommuOption,
  IommuOptionOp,
} from '../../uapi/iommufd.js';
import {
  type AssignedDeviceSpec,
  type DmaMappingInfo,
  type GuestPagePinner,
  type RamSection,
  trackedPinner,
  type VmDmaBackend,
} from './dma-backend.js';
import type { AccountingMode } from './machine-errors.js';

const RW = IoasMapFlag.READABLE | IoasMapFlag.WRITEABLE;
const MAP_FLAGS = IoasMapFlag.FIXED_IOVA | RW;

export interface IommufdBackendOptions {
  devices: readonly AssignedDeviceSpec[];
  /**
   * 'user' (RLIMIT_MODE 0, the default of /dev/iommu), 'mm' (RLIMIT_MODE 1: a manager process
   * with CAP_SYS_RESOURCE opens the fd, sets it and hands the fd over, as libvirt would), 'none'
   * (the VMM process must have CAP_IPC_LOCK).
   */
  accountingMode: AccountingMode;
}

/**
 * The iommufd backend (QEMU's `-object iommufd` + vfio-pci `iommufd=`): one context, one IOAS
 * holding guest RAM at IOVA = GPA, each device bound and attached to a HWPT_PAGING of that IOAS
 * (with dirty tracking when its IOMMU offers it; later devices share the first compatible HWPT).
 *
 * RAM goes in with IOMMU_IOAS_MAP_FILE from the block's memfd, as QEMU does for fd-backed RAM:
 * the mapping names the file and offset, not the VMM's VA, so it survives the VMM's address space
 * changing (CPR live update: exec, IOAS_CHANGE_PROCESS only accepts file-backed areas) and an
 * emulated device's pins stay valid without a VA. There is no mapping-count limit (QEMU skips the
 * dma_max_mappings check); pinned-page accounting applies.
 */
export class IommufdBackend implements VmDmaBackend {
  readonly kind = 'iommufd' as const;
  readonly accountingMode: AccountingMode;
  readonly mappingLimit = undefined;
  readonly chargedTo: string;
  readonly ctx: IommufdContext;
  readonly ioasId: number;
  readonly #vmm: Process;
  readonly #devices = new Map<string, { devId: number; hwptId: number; space: IoasDmaSpace }>();
  /** HWPTs allocated here → allocated with IOMMU_HWPT_ALLOC_DIRTY_TRACKING. */
  readonly #hwptDirty = new Map<number, boolean>();
  readonly #accesses = new Set<IommufdAccess>();
  #closed = false;

  private constructor(vmm: Process, ctx: IommufdContext, ioasId: number, mode: AccountingMode) {
    this.#vmm = vmm;
    this.ctx = ctx;
    this.ioasId = ioasId;
    this.accountingMode = mode;
    this.chargedTo =
      mode === 'user'
        ? `uid ${vmm.uid}'s locked_vm`
        : mode === 'mm'
          ? `the VMM process's (pid ${vmm.pid}) mm locked_vm`
          : 'nothing (CAP_IPC_LOCK)';
  }

  /** Opens the context, allocates the IOAS, binds and attaches every device. Undone on failure. */
  static open(vmm: Process, options: IommufdBackendOptions): IommufdBackend {
    const mode = options.accountingMode;
    if (mode === 'none' && !vmm.hasCap('CAP_IPC_LOCK')) {
      throw invalidArgument(`accounting mode 'none' needs a VMM process with CAP_IPC_LOCK`);
    }
    const ctx = mode === 'mm' ? openPerMmContext(vmm) : IommufdContext.open(vmm);
    try {
      const ioasId = ctx.ioasAlloc().outIoasId;
      const backend = new IommufdBackend(vmm, ctx, ioasId, mode);
      for (const dev of options.devices) backend.#attach(dev);
      return backend;
    } catch (err) {
      ctx.close();
      throw err;
    }
  }

  /** VFIO_DEVICE_BIND_IOMMUFD + attach: to the first HWPT that takes it, else a new one. */
  #attach(spec: AssignedDeviceSpec): void {
    if (this.#devices.has(spec.name)) throw invalidArgument(`device ${spec.name} is attached already`);
    const devId = this.ctx.bindDevice({
      name: spec.name,
      dirtyTracking: spec.iommuDirtyTracking ?? true,
    }).outDevid;
    const caps = this.ctx.getHwInfo({ devId }).outCapabilities;
    const dirty = (caps & BigInt(IOMMU_HW_CAP_DIRTY_TRACKING)) !== 0n;
    let hwptId: number | undefined;
    for (const other of this.#devices.values()) {
      try {
        hwptId = this.ctx.attachIoas({ devId, ptId: other.hwptId }).ptId;
        break;
      } catch (err) {
        if (!isErrno(err, 'EINVAL')) throw err;
      }
    }
    if (hwptId === undefined) {
      const flags = dirty ? HwptAllocFlag.DIRTY_TRACKING : 0;
      hwptId = this.ctx.hwptAlloc({ flags, devId, ptId: this.ioasId }).outHwptId;
      this.#hwptDirty.set(hwptId, dirty);
      this.ctx.attachIoas({ devId, ptId: hwptId });
    }
    this.#devices.set(spec.name, { devId, hwptId, space: new IoasDmaSpace(this.ctx, devId) });
  }

  /** The device's id and HWPT (for dirty tracking by the migration code). */
  device(name: string): { devId: number; hwptId: number } {
    const dev = this.#devices.get(name);
    if (dev === undefined) throw invalidArgument(`no device ${name} on this iommufd`);
    return { devId: dev.devId, hwptId: dev.hwptId };
  }

  /** Can the device's HWPT report dirty pages (allocated with DIRTY_TRACKING)? */
  hwptTracksDirty(name: string): boolean {
    return this.#hwptDirty.get(this.device(name).hwptId) ?? false;
  }

  deviceSpace(name: string): DmaSpace {
    const dev = this.#devices.get(name);
    if (dev === undefined) throw invalidArgument(`no device ${name} on this iommufd`);
    return dev.space;
  }

  openEmulatedDevice(_name: string, onUnmap: (iova: bigint, lengthBytes: bigint) => void): GuestPagePinner {
    const access = this.ctx.accessCreate(this.ioasId, { unmap: onUnmap });
    this.#accesses.add(access);
    return trackedPinner({
      pin: (iova, lengthBytes) => {
        const length = BigInt(lengthBytes);
        const pages = access.accessPin(iova, length, { write: true });
        return {
          read: (offset, target) => pages.read(offset, target),
          write: (offset, data) => pages.write(offset, data),
          unpin: () => access.accessUnpin(iova, length),
        };
      },
      close: () => {
        if (this.#accesses.delete(access)) access.accessDestroy();
      },
    });
  }

  mapRam(section: RamSection): void {
    this.#live();
    this.ctx.ioasMapFile({
      flags: MAP_FLAGS,
      ioasId: this.ioasId,
      fd: section.ram.fd,
      start: BigInt(section.offsetBytes),
      length: BigInt(section.lengthBytes),
      iova: section.iova,
    });
  }

  unmapRam(section: RamSection): void {
    this.#live();
    const { length } = this.ctx.ioasUnmap({
      ioasId: this.ioasId,
      iova: section.iova,
      length: BigInt(section.lengthBytes),
    });
    if (length !== BigInt(section.lengthBytes)) {
      throw internalError(`IOAS_UNMAP of a ${section.lengthBytes}-byte section unmapped ${length} bytes`);
    }
  }

  mappings(): DmaMappingInfo[] {
    if (this.#closed) return [];
    const iopt = this.ctx.ioas(this.ioasId, 'mappings').iopt;
    return iopt.areas().map((a) => {
      const iova = iopt.areaIova(a);
      return { iova, lengthBytes: iopt.areaLast(a) - iova + 1n };
    });
  }

  lockedPages(): number {
    if (this.accountingMode === 'user') return this.#vmm.user.lockedVm;
    if (this.accountingMode === 'mm') return this.#vmm.mm.lockedVm;
    return 0;
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#accesses.clear();
    this.ctx.close();
  }

  #live(): void {
    if (this.#closed) throw internalError('the iommufd backend is closed');
  }
}

/**
 * RLIMIT_MODE 1 needs CAP_SYS_RESOURCE, which a VMM does not have: a manager (libvirt) opens
 * /dev/iommu, sets the mode before any object exists and passes the fd to the VMM.
 */
function openPerMmContext(vmm: Process): IommufdContext {
  const manager = vmm.host.spawn({ uid: 0, caps: ['CAP_SYS_RESOURCE'] });
  try {
    const ctx = IommufdContext.open(manager);
    ctx.option({ optionId: IommuOption.RLIMIT_MODE, op: IommuOptionOp.SET, objectId: 0, val64: 1n });
    return ctx.as(vmm);
  } finally {
    manager.exit();
  }
}
