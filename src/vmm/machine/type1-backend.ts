import type { Process } from '../../kernel/host/host.js';
import { IommuProt } from '../../kernel/vfio/container-api.js';
import type { PinnedPage } from '../../kernel/vfio/container-dma.js';
import { type VfioContainerDevice, VfioContainer, VfioGroup } from '../../kernel/vfio/container.js';
import type { DmaSpace } from '../../kernel/vfio/dma-port.js';
import { PAGE_SIZE } from '../../uapi/arch.js';
import { internalError, invalidArgument } from '../../uapi/error.js';
import { VFIO_PIN_PAGES_MAX_ENTRIES, VfioDmaMapFlag, VfioExtension } from '../../uapi/vfio-type1.js';
import {
  type AssignedDeviceSpec,
  type DmaMappingInfo,
  type GuestPagePinner,
  type RamSection,
  trackedPinner,
  type VmDmaBackend,
} from './dma-backend.js';
import { type1DmaMaxMappings } from './dma-mapping-estimate.js';
import type { AccountingMode } from './machine-errors.js';

export interface Type1BackendOptions {
  devices: readonly AssignedDeviceSpec[];
  /** Emulated (mdev) devices: each gets an emulated group in the container. */
  emulatedDevices: readonly string[];
  /** 'mm' (type1 charges the mapping mm's locked_vm) or 'none' (the VMM has CAP_IPC_LOCK). */
  accountingMode: AccountingMode;
}

/**
 * The legacy type1 backend (/dev/vfio/vfio): one container, one IOMMU group per assigned device
 * (all in one IOMMU domain), one emulated group per mediated device, VFIO_TYPE1v2_IOMMU. Guest RAM
 * is mapped by the VMM's VA (VFIO_IOMMU_MAP_DMA of the memfd mapping), pinned and charged to the
 * VMM's mm at once since a domain exists. `dma_max_mappings` is read from VFIO_IOMMU_GET_INFO's
 * DMA_AVAIL before anything is mapped, as QEMU does.
 */
export class Type1Backend implements VmDmaBackend {
  readonly kind = 'type1' as const;
  readonly accountingMode: AccountingMode;
  readonly mappingLimit: { limit: number; reported: boolean };
  readonly chargedTo: string;
  readonly container: VfioContainer;
  readonly #vmm: Process;
  readonly #devices = new Map<string, VfioContainerDevice>();
  readonly #emulatedGroups: Map<string, VfioGroup>;
  readonly #emulated = new Set<VfioContainerDevice>();
  #closed = false;

  private constructor(
    vmm: Process,
    container: VfioContainer,
    mode: AccountingMode,
    emulatedGroups: Map<string, VfioGroup>,
  ) {
    this.#vmm = vmm;
    this.container = container;
    this.accountingMode = mode;
    // type1 always counts the mm's locked_vm; CAP_IPC_LOCK only lifts the RLIMIT_MEMLOCK check.
    this.chargedTo =
      `the VMM process's (pid ${vmm.pid}) mm locked_vm` +
      (mode === 'none' ? ' (not limited: CAP_IPC_LOCK)' : '');
    this.mappingLimit = type1DmaMaxMappings(container.iommuGetInfo());
    this.#emulatedGroups = emulatedGroups;
  }

  /** Opens the container, sets every group to it, sets the IOMMU, opens the devices. Undone on failure. */
  static open(vmm: Process, options: Type1BackendOptions): Type1Backend {
    const mode = options.accountingMode;
    if (mode === 'user') {
      throw invalidArgument(
        `type1 charges the mapping process's mm (accounting 'mm'); per-user accounting needs iommufd`,
      );
    }
    if (mode === 'none' && !vmm.hasCap('CAP_IPC_LOCK')) {
      throw invalidArgument(`accounting mode 'none' needs a VMM process with CAP_IPC_LOCK`);
    }
    if (options.devices.length + options.emulatedDevices.length === 0) {
      throw invalidArgument('a type1 container needs at least one device');
    }
    const container = VfioContainer.open(vmm);
    try {
      const groups: [AssignedDeviceSpec, VfioGroup][] = [];
      for (const spec of options.devices) {
        if (groups.some(([s]) => s.name === spec.name)) {
          throw invalidArgument(`device ${spec.name} is attached already`);
        }
        const group = new VfioGroup({ name: `iommu-group-${spec.name}` });
        container.attachGroup(group);
        groups.push([spec, group]);
      }
      const emulatedGroups = new Map<string, VfioGroup>();
      for (const name of options.emulatedDevices) {
        const group = new VfioGroup({ name: `mdev-group-${name}`, type: 'emulated' });
        container.attachGroup(group);
        emulatedGroups.set(name, group);
      }
      container.setIommu(VfioExtension.TYPE1v2_IOMMU);
      const backend = new Type1Backend(vmm, container, mode, emulatedGroups);
      for (const [spec, group] of groups) {
        backend.#devices.set(spec.name, container.openDevice(group, { name: spec.name }));
      }
      return backend;
    } catch (err) {
      container.close();
      throw err;
    }
  }

  deviceSpace(name: string): DmaSpace {
    const dev = this.#devices.get(name);
    if (dev === undefined) throw invalidArgument(`no device ${name} in this container`);
    return dev.dmaSpace();
  }

  openEmulatedDevice(name: string, onUnmap: (iova: bigint, lengthBytes: bigint) => void): GuestPagePinner {
    const group = this.#emulatedGroups.get(name);
    if (group === undefined) throw invalidArgument(`no emulated device ${name} in this container`);
    const dev = this.container.openDevice(group, { name, dmaUnmap: onUnmap });
    this.#emulated.add(dev);
    return trackedPinner({
      pin: (iova, lengthBytes) => {
        const pages = pinRange(dev, iova, lengthBytes);
        return {
          read: (offset, target) => pagesCopy(pages, offset, target, false),
          write: (offset, data) => pagesCopy(pages, offset, data, true),
          unpin: () => unpinRange(dev, iova, pages.length),
        };
      },
      close: () => {
        if (this.#emulated.delete(dev)) dev.close();
      },
    });
  }

  mapRam(section: RamSection): void {
    this.#live();
    this.container.mapDma({
      flags: VfioDmaMapFlag.READ | VfioDmaMapFlag.WRITE,
      vaddr: section.ram.hostVa + BigInt(section.offsetBytes),
      iova: section.iova,
      size: BigInt(section.lengthBytes),
    });
  }

  unmapRam(section: RamSection): void {
    this.#live();
    const { size } = this.container.unmapDma({
      flags: 0,
      iova: section.iova,
      size: BigInt(section.lengthBytes),
    });
    if (size !== BigInt(section.lengthBytes)) {
      throw internalError(
        `VFIO_IOMMU_UNMAP_DMA of a ${section.lengthBytes}-byte section unmapped ${size} bytes`,
      );
    }
  }

  mappings(): DmaMappingInfo[] {
    const iommu = this.container.type1;
    if (this.#closed || iommu === undefined) return [];
    return iommu.dmas().map((d) => ({ iova: d.iova, lengthBytes: d.size }));
  }

  lockedPages(): number {
    return this.#vmm.mm.lockedVm;
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#emulated.clear();
    this.container.close();
  }

  #live(): void {
    if (this.#closed) throw internalError('the type1 backend is closed');
  }
}

/** vfio_pin_pages() over a range, at most 512 pages a call; undone on failure. */
function pinRange(dev: VfioContainerDevice, iova: bigint, lengthBytes: number): PinnedPage[] {
  if (lengthBytes <= 0 || lengthBytes % PAGE_SIZE !== 0) {
    throw invalidArgument(`pin length ${lengthBytes} is not a positive multiple of ${PAGE_SIZE}`);
  }
  const npages = lengthBytes / PAGE_SIZE;
  const pages: PinnedPage[] = [];
  try {
    while (pages.length < npages) {
      const n = Math.min(VFIO_PIN_PAGES_MAX_ENTRIES, npages - pages.length);
      const at = iova + BigInt(pages.length * PAGE_SIZE);
      pages.push(...dev.pinPages(at, n, IommuProt.READ | IommuProt.WRITE));
    }
  } catch (err) {
    if (pages.length > 0) unpinRange(dev, iova, pages.length);
    throw err;
  }
  return pages;
}

function unpinRange(dev: VfioContainerDevice, iova: bigint, npages: number): void {
  for (let done = 0; done < npages; done += VFIO_PIN_PAGES_MAX_ENTRIES) {
    const n = Math.min(VFIO_PIN_PAGES_MAX_ENTRIES, npages - done);
    dev.unpinPages(iova + BigInt(done * PAGE_SIZE), n);
  }
}

/** Copy between `buf` and the pinned pages from byte `offset` of the range, page by page. */
function pagesCopy(pages: readonly PinnedPage[], offset: number, buf: Uint8Array, write: boolean): void {
  if (offset < 0 || offset + buf.length > pages.length * PAGE_SIZE) {
    throw internalError(`bytes ${offset}+${buf.length} outside ${pages.length} pinned pages`);
  }
  let done = 0;
  while (done < buf.length) {
    const at = offset + done;
    const page = pages[Math.floor(at / PAGE_SIZE)]!;
    const within = at % PAGE_SIZE;
    const n = Math.min(PAGE_SIZE - within, buf.length - done);
    const part = buf.subarray(done, done + n);
    if (write) page.write(within, part);
    else page.read(within, part);
    done += n;
  }
}
