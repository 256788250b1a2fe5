import { PAGE_SIZE_N, U64_MAX } from '../../uapi/arch.js';
import { kernelError } from '../../uapi/error.js';
import { type IovaRange } from '../../uapi/iommufd.js';
import { VFIO_API_VERSION, VFIO_PIN_PAGES_MAX_ENTRIES, VfioExtension } from '../../uapi/vfio-type1.js';
import type { Host, Process } from '../host/host.js';
import {
  SOFT_IOMMU_PGSIZE_BITMAP,
  type VfioContainerApi,
  type VfioDmaMapArgs,
  type VfioDmaUnmapArgs,
  type VfioIommuInfo,
  type VfioIovaRange,
} from './container-api.js';
import type { PinnedPage } from './container-dma.js';
import { ContainerDmaSpace } from './container-dma-space.js';
import { type Type1Device, type Type1Group, Type1Iommu } from './container-type1.js';

export interface VfioGroupOptions {
  name: string;
  /**
   * 'iommu' (default): devices behind a real IOMMU, as vfio-pci; 'emulated': a mediated device
   * group (vfio_register_emulated_iommu_dev), which has no IOMMU domain and pins page by page.
   */
  type?: 'iommu' | 'emulated';
  /** Reserved IOVA regions (MSI windows, RMRRs), inclusive; 'iommu' groups only. */
  reservedIovaRanges?: IovaRange[];
  /** The IOMMU's aperture (domain geometry), inclusive; default the whole 64-bit space. */
  aperture?: VfioIovaRange;
  /** The IOMMU's page sizes; default 4 KiB | 2 MiB | 1 GiB. */
  pgsizeBitmap?: bigint;
  /** The IOMMU driver behind the group; groups with the same one share an IOMMU domain. */
  iommuOps?: string;
}

/** An IOMMU group (/dev/vfio/N): the unit a container takes with VFIO_GROUP_SET_CONTAINER. */
export class VfioGroup implements Type1Group {
  readonly name: string;
  readonly type: 'iommu' | 'emulated';
  readonly reservedIovaRanges: readonly IovaRange[];
  readonly aperture: VfioIovaRange;
  readonly pgsizeBitmap: bigint;
  readonly iommuOps: string;
  /** @internal the (opaque) state of the container this group is set to. */
  container: object | undefined;
  /** @internal open device fds of the group. */
  readonly devices = new Set<VfioContainerDevice>();

  constructor(options: VfioGroupOptions) {
    this.name = options.name;
    this.type = options.type ?? 'iommu';
    this.reservedIovaRanges = this.type === 'iommu' ? [...(options.reservedIovaRanges ?? [])] : [];
    this.aperture = options.aperture ?? { start: 0n, end: U64_MAX };
    this.pgsizeBitmap = options.pgsizeBitmap ?? SOFT_IOMMU_PGSIZE_BITMAP;
    this.iommuOps = options.iommuOps ?? 'softvfio-iommu';
  }
}

/** @internal the shared state of one open /dev/vfio/vfio. */
class ContainerState {
  readonly host: Host;
  readonly groups: VfioGroup[] = [];
  iommu: Type1Iommu | undefined;
  closed = false;
  constructor(host: Host) {
    this.host = host;
  }
}

/**
 * An open legacy VFIO container (/dev/vfio/vfio) with the type1 IOMMU driver behind it
 * (drivers/vfio/container.c + vfio_iommu_type1.c, v6.3+). Methods are the container ioctls plus
 * the group ioctls that tie groups to it; `caller` is `current` (`as(process)` gives the same fd
 * seen from another process, e.g. after exec or SCM_RIGHTS).
 */
export class VfioContainer implements VfioContainerApi {
  readonly #s: ContainerState;
  readonly caller: Process;

  private constructor(state: ContainerState, caller: Process) {
    this.#s = state;
    this.caller = caller;
  }

  /** open("/dev/vfio/vfio"). */
  static open(process: Process): VfioContainer {
    return new VfioContainer(new ContainerState(process.host), process);
  }

  /** The same open file used by another process. */
  as(process: Process): VfioContainer {
    return new VfioContainer(this.#s, process);
  }

  /** The type1 driver state once VFIO_SET_IOMMU succeeded (for DMA spaces, tests, diagnostics). */
  get type1(): Type1Iommu | undefined {
    return this.#s.iommu;
  }

  get groups(): readonly VfioGroup[] {
    return this.#s.groups;
  }

  #live(op: string): void {
    if (this.#s.closed) throw kernelError('EBADF', 'container is closed', { op });
  }

  #driver(op: string): Type1Iommu {
    this.#live(op);
    const iommu = this.#s.iommu;
    if (!iommu) throw kernelError('EINVAL', 'no IOMMU set on the container', { op });
    return iommu;
  }

  getApiVersion(): number {
    this.#live('VFIO_GET_API_VERSION');
    return VFIO_API_VERSION;
  }

  /** VFIO_CHECK_EXTENSION: asked of the type1 driver, with no iommu before VFIO_SET_IOMMU. */
  checkExtension(ext: number): number {
    this.#live('VFIO_CHECK_EXTENSION');
    return Type1Iommu.checkExtension(this.#s.iommu, ext);
  }

  /**
   * VFIO_SET_IOMMU: TYPE1 (v1 unmap semantics) or TYPE1v2. EINVAL with no group or an IOMMU already
   * set; ENODEV for a type no driver supports; EINVAL for an extension that is not an IOMMU type.
   * Every group is then attached (replay pins: EFAULT/ENOMEM undo the whole call).
   */
  setIommu(type: number): void {
    const op = 'VFIO_SET_IOMMU';
    this.#live(op);
    if (this.#s.groups.length === 0 || this.#s.iommu) {
      throw kernelError('EINVAL', this.#s.iommu ? 'IOMMU already set' : 'no group in the container', { op });
    }
    if (Type1Iommu.checkExtension(undefined, type) <= 0) {
      throw kernelError('ENODEV', `no IOMMU driver for type ${type}`, { op });
    }
    if (type !== VfioExtension.TYPE1_IOMMU && type !== VfioExtension.TYPE1v2_IOMMU) {
      throw kernelError('EINVAL', `${type} is not an IOMMU type`, { op });
    }
    const iommu = new Type1Iommu({
      v2: type === VfioExtension.TYPE1v2_IOMMU,
      dmaEntryLimit: this.#s.host.modules.vfioIommuType1.dmaEntryLimit,
    });
    const attached: VfioGroup[] = [];
    try {
      for (const g of this.#s.groups) {
        iommu.attachGroup(this.caller, g);
        attached.push(g);
      }
    } catch (err) {
      for (const g of attached.reverse()) iommu.detachGroup(g);
      throw err;
    }
    this.#s.iommu = iommu;
  }

  iommuGetInfo(): VfioIommuInfo {
    return this.#driver('VFIO_IOMMU_GET_INFO').getInfo();
  }

  mapDma(args: VfioDmaMapArgs): void {
    this.#driver('VFIO_IOMMU_MAP_DMA').mapDma(this.caller, args);
  }

  unmapDma(args: VfioDmaUnmapArgs): { size: bigint } {
    return this.#driver('VFIO_IOMMU_UNMAP_DMA').unmapDma(args);
  }

  // ---- group ioctls ---------------------------------------------------------------------------

  /**
   * VFIO_GROUP_SET_CONTAINER: EINVAL if the group is already in a container. With an IOMMU set the
   * driver attaches it at once (its errors, nothing changed); otherwise VFIO_SET_IOMMU will.
   */
  attachGroup(group: VfioGroup): void {
    const op = 'VFIO_GROUP_SET_CONTAINER';
    this.#live(op);
    if (group.container) throw kernelError('EINVAL', `group ${group.name} is already in a container`, { op });
    this.#s.iommu?.attachGroup(this.caller, group);
    this.#s.groups.push(group);
    group.container = this.#s;
  }

  /**
   * VFIO_GROUP_UNSET_CONTAINER: EINVAL if not in this container, EBUSY while a device of the group
   * is open. The last group out releases the IOMMU: every mapping goes, the container is unset.
   */
  detachGroup(group: VfioGroup): void {
    const op = 'VFIO_GROUP_UNSET_CONTAINER';
    this.#live(op);
    if (group.container !== this.#s)
      throw kernelError('EINVAL', `group ${group.name} is not in this container`, { op });
    if (group.devices.size > 0) throw kernelError('EBUSY', `group ${group.name} has open devices`, { op });
    this.#s.iommu?.detachGroup(group);
    this.#s.groups.splice(this.#s.groups.indexOf(group), 1);
    group.container = undefined;
    if (this.#s.groups.length === 0 && this.#s.iommu) {
      this.#s.iommu.release();
      this.#s.iommu = undefined;
    }
  }

  /**
   * VFIO_GROUP_GET_DEVICE_FD: a device of `group`, which must be in this container with an IOMMU
   * set (EINVAL). A device with `dmaUnmap` (an mdev driver, or any driver that pins pages) is
   * registered with the IOMMU driver and may pin pages and use vfio_dma_rw.
   */
  openDevice(
    group: VfioGroup,
    options: { name: string; dmaUnmap?: (iova: bigint, length: bigint) => void },
  ): VfioContainerDevice {
    const op = 'VFIO_GROUP_GET_DEVICE_FD';
    this.#live(op);
    if (group.container !== this.#s || !this.#s.iommu) {
      throw kernelError('EINVAL', `group ${group.name} has no container with an IOMMU`, { op });
    }
    const dev = new VfioContainerDevice(this, group, options.name, options.dmaUnmap);
    group.devices.add(dev);
    if (options.dmaUnmap) this.#s.iommu.registerDevice(dev);
    return dev;
  }

  /** @internal closing a device fd. */
  closeDevice(dev: VfioContainerDevice): void {
    dev.group.devices.delete(dev);
    this.#s.iommu?.unregisterDevice(dev);
  }

  /**
   * close(): modeled as the owner closing every fd: devices close, groups leave, the IOMMU is
   * released and every pin and charge is dropped.
   */
  close(): void {
    if (this.#s.closed) return;
    for (const g of [...this.#s.groups]) {
      for (const d of [...g.devices]) d.close();
      this.detachGroup(g);
    }
    this.#s.closed = true;
  }
}

/**
 * An open VFIO device fd of a group in a legacy container: what its driver does through the
 * container (vfio_pin_pages, vfio_unpin_pages, vfio_dma_rw) and its DMA space.
 */
export class VfioContainerDevice implements Type1Device {
  readonly name: string;
  readonly group: VfioGroup;
  readonly #container: VfioContainer;
  readonly #dmaUnmap: ((iova: bigint, length: bigint) => void) | undefined;
  #open = true;

  /** @internal use VfioContainer.openDevice. */
  constructor(
    container: VfioContainer,
    group: VfioGroup,
    name: string,
    dmaUnmap: ((iova: bigint, length: bigint) => void) | undefined,
  ) {
    this.#container = container;
    this.group = group;
    this.name = name;
    this.#dmaUnmap = dmaUnmap;
  }

  get isOpen(): boolean {
    return this.#open;
  }

  /** `ops->dma_unmap`, called by the IOMMU driver before it unmaps a range this device pinned. */
  dmaUnmap(iova: bigint, length: bigint): void {
    this.#dmaUnmap?.(iova, length);
  }

  #iommu(op: string): Type1Iommu {
    const iommu = this.#container.type1;
    if (!this.#open || !iommu) throw kernelError('EINVAL', `device ${this.name} is not open`, { op });
    return iommu;
  }

  /**
   * vfio_pin_pages(): EINVAL for a closed device, one without `dmaUnmap`, npage < 1 or an iova not
   * page aligned; E2BIG beyond 512 pages; then the type1 rules (see Type1Iommu.pinPages).
   */
  pinPages(iova: bigint, npage: number, prot: number): PinnedPage[] {
    const op = 'vfio_pin_pages';
    const iommu = this.#iommu(op);
    if (!this.#dmaUnmap) throw kernelError('EINVAL', 'device has no dma_unmap callback', { op });
    if (!Number.isInteger(npage) || npage < 1) throw kernelError('EINVAL', `bad npage ${npage}`, { op });
    if (npage > VFIO_PIN_PAGES_MAX_ENTRIES) throw kernelError('E2BIG', `${npage} pages in one call`, { op });
    if (iova % PAGE_SIZE_N !== 0n) throw kernelError('EINVAL', 'iova not page aligned', { op });
    return iommu.pinPages(iova, npage, prot);
  }

  /** vfio_unpin_pages(): a no-op (the kernel WARNs) for a closed device or one without `dmaUnmap`. */
  unpinPages(iova: bigint, npage: number): void {
    const iommu = this.#container.type1;
    if (!this.#open || !iommu || !this.#dmaUnmap) return;
    iommu.unpinPages(iova, npage);
  }

  /** vfio_dma_rw(): EINVAL for a closed device or an empty buffer; then the type1 rules. */
  dmaRw(iova: bigint, data: Uint8Array, write: boolean): void {
    const op = 'vfio_dma_rw';
    const iommu = this.#iommu(op);
    if (data.length === 0) throw kernelError('EINVAL', 'empty buffer', { op });
    iommu.dmaRw(iova, data, write);
  }

  /** The device's DMA through the container's IOMMU domain. */
  dmaSpace(): ContainerDmaSpace {
    return new ContainerDmaSpace(this.#container, this.group);
  }

  close(): void {
    if (!this.#open) return;
    this.#open = false;
    this.#container.closeDevice(this);
  }
}
