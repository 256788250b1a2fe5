import type { DmaSpace } from '../../kernel/vfio/dma-port.js';
import type { AccountingMode, IommuBackendKind } from './machine-errors.js';
import type { MemfdRamBlock } from './memfd-ram.js';

/** A piece of guest RAM the memory listener maps: IOVA = guest-physical address. */
export interface RamSection {
  readonly ram: MemfdRamBlock;
  /** Offset of the section in its RAM block (and in the block's memfd). */
  readonly offsetBytes: number;
  readonly lengthBytes: number;
  readonly iova: bigint;
}

/** One DMA mapping as the kernel holds it: an IOAS area or a type1 vfio_dma. */
export interface DmaMappingInfo {
  iova: bigint;
  lengthBytes: bigint;
}

/** Guest pages an emulated device pinned; valid until `unpin`. */
export interface PinnedGuestPages {
  readonly iova: bigint;
  readonly lengthBytes: number;
  read(offset: number, target: Uint8Array): void;
  write(offset: number, data: Uint8Array): void;
  unpin(): void;
}

/**
 * What the in-kernel driver of an emulated (mediated) device uses to reach guest RAM: an iommufd
 * access, or a type1 device of an emulated group (vfio_pin_pages).
 */
export interface GuestPagePinner {
  /** Pin `[iova, iova + lengthBytes)` (page aligned) for reading and writing. */
  pin(iova: bigint, lengthBytes: number): PinnedGuestPages;
  /** Drop every pin and the access/device. */
  close(): void;
}

/** What one backend does to pin guest pages for an emulated device, and to give them back. */
export interface PagePinOps {
  pin(
    iova: bigint,
    lengthBytes: number,
  ): {
    read(offset: number, target: Uint8Array): void;
    write(offset: number, data: Uint8Array): void;
    unpin(): void;
  };
  /** After every pin is gone: close the access / the device. */
  close(): void;
}

/** A GuestPagePinner over a backend's pin operations: pins are tracked, unpinned once, all on close. */
export function trackedPinner(ops: PagePinOps): GuestPagePinner {
  const pins = new Set<PinnedGuestPages>();
  return {
    pin: (iova, lengthBytes) => {
      const pages = ops.pin(iova, lengthBytes);
      let live = true;
      const pin: PinnedGuestPages = {
        iova,
        lengthBytes,
        read: (offset, target) => pages.read(offset, target),
        write: (offset, data) => pages.write(offset, data),
        unpin: () => {
          if (!live) return;
          live = false;
          pins.delete(pin);
          pages.unpin();
        },
      };
      pins.add(pin);
      return pin;
    },
    close: () => {
      for (const pin of [...pins]) pin.unpin();
      ops.close();
    },
  };
}

/** An assigned (VFIO) device to bind and attach when the backend opens. */
export interface AssignedDeviceSpec {
  name: string;
  /** Its IOMMU can track dirty pages (IOMMU_HW_CAP_DIRTY_TRACKING); default true. */
  iommuDirtyTracking?: boolean;
}

/**
 * The VMM's view of one IOMMU backend for one VM (QEMU's VFIOContainerBase): the devices bound and
 * attached, the guest RAM mappings, the pins of emulated devices. Opened with the VM's devices
 * before any RAM is mapped (as QEMU attaches the first device, then registers the listener).
 */
export interface VmDmaBackend {
  readonly kind: IommuBackendKind;
  readonly accountingMode: AccountingMode;
  /** The container's mapping-count limit (type1 DMA_AVAIL, or 65535 when not reported); none for iommufd. */
  readonly mappingLimit: { limit: number; reported: boolean } | undefined;
  /** Where the accounting mode charges pinned pages, in words ("uid 1000's locked_vm"). */
  readonly chargedTo: string;
  /** The DMA space of an assigned device. */
  deviceSpace(name: string): DmaSpace;
  /** The pinner of an emulated device; `onUnmap` is the kernel asking for pins in a range back. */
  openEmulatedDevice(name: string, onUnmap: (iova: bigint, lengthBytes: bigint) => void): GuestPagePinner;
  /** Map a RAM section read-write at its IOVA; pins (and charges) it when a device domain needs it. */
  mapRam(section: RamSection): void;
  /** Unmap exactly a section mapped before. */
  unmapRam(section: RamSection): void;
  /** The mappings the kernel holds, ascending IOVA. */
  mappings(): DmaMappingInfo[];
  /**
   * Pages charged now where the accounting mode charges: the uid's or the mm's locked_vm. With
   * 'none', iommufd charges nothing; type1 still counts the mm's locked_vm, unlimited.
   */
  lockedPages(): number;
  /** Close every fd: devices detach and unbind, mappings go, pins and charges are released. */
  close(): void;
}
