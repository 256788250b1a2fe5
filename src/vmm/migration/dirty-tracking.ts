import { FeatureId } from '../../uapi/device-feature.js';
import { HWPT_DIRTY_TRACKING_ENABLE } from '../../uapi/iommufd.js';
import { IommufdBackend } from '../machine/iommufd-backend.js';
import type { Machine } from '../machine/machine.js';
import { RAM_PAGE_BYTES } from './wire-format.js';

/**
 * How the source learns which guest pages devices wrote (QEMU's VFIO log_global_start/log_sync):
 * - 'device': every assigned device has DMA logging (VFIO_DEVICE_FEATURE_DMA_LOGGING_*): one
 *   range per RAM block, reports read-and-clear at each sync;
 * - 'iommu': an iommufd backend whose HWPTs track dirty pages (IOMMU_HWPT_GET_DIRTY_BITMAP);
 * - 'all': neither: every mapped page counts as dirty at every sync (QEMU's behaviour without
 *   dirty tracking; such a VM converges only if its RAM fits the downtime limit).
 * Pages pinned by emulated devices are dirty at every sync (the type1 rule for pinned pages):
 * the device writes them with no log in between.
 */
export type DirtyTrackingMode = 'device' | 'iommu' | 'all' | 'off';

/** Where the tracker marks what it finds: RAM block index, first page, page count. */
export type MarkPages = (block: number, firstPage: number, count: number) => void;

export class DeviceDirtyTracker {
  readonly mode: DirtyTrackingMode;
  readonly #machine: Machine;
  readonly #hwpts: number[];
  #started = false;

  private constructor(machine: Machine, mode: DirtyTrackingMode, hwpts: number[]) {
    this.#machine = machine;
    this.mode = mode;
    this.#hwpts = hwpts;
  }

  /** Choose the mode for the VM's devices and start tracking. Throws (a kernel error) if a start fails. */
  static start(machine: Machine): DeviceDirtyTracker {
    const devices = machine.devices;
    const backend = machine.backend;
    let tracker: DeviceDirtyTracker;
    if (devices.length === 0) tracker = new DeviceDirtyTracker(machine, 'off', []);
    else if (devices.every((d) => d.device.vfio.probeFeature(FeatureId.DMA_LOGGING_START, { set: true }))) {
      tracker = new DeviceDirtyTracker(machine, 'device', []);
    } else if (backend instanceof IommufdBackend && devices.every((d) => backend.hwptTracksDirty(d.name))) {
      const hwpts = [...new Set(devices.map((d) => backend.device(d.name).hwptId))];
      tracker = new DeviceDirtyTracker(machine, 'iommu', hwpts);
    } else tracker = new DeviceDirtyTracker(machine, 'all', []);
    tracker.#start();
    return tracker;
  }

  #start(): void {
    const ranges = this.#machine.ram.blocks.map((b) => ({ iova: b.gpa, length: BigInt(b.sizeBytes) }));
    if (this.mode === 'device') {
      const started: string[] = [];
      try {
        for (const d of this.#machine.devices) {
          d.device.vfio.dmaLoggingStart({ pageSize: BigInt(RAM_PAGE_BYTES), ranges });
          started.push(d.name);
        }
      } catch (err) {
        for (const name of started) this.#machine.device(name).device.vfio.dmaLoggingStop();
        throw err;
      }
    } else if (this.mode === 'iommu') {
      const ctx = (this.#machine.backend as IommufdBackend).ctx;
      for (const hwptId of this.#hwpts)
        ctx.hwptSetDirtyTracking({ hwptId, flags: HWPT_DIRTY_TRACKING_ENABLE });
    }
    this.#started = true;
  }

  /** Mark every page the devices dirtied since the last sync (and the pinned pages). */
  sync(mark: MarkPages): void {
    if (!this.#started) return;
    const blocks = this.#machine.ram.blocks;
    const pageSize = BigInt(RAM_PAGE_BYTES);
    blocks.forEach((block, index) => {
      const range = { iova: block.gpa, length: BigInt(block.sizeBytes), pageSize };
      if (this.mode === 'device') {
        for (const d of this.#machine.devices) markBitmap(d.device.vfio.dmaLoggingReport(range), index, mark);
      } else if (this.mode === 'iommu') {
        const ctx = (this.#machine.backend as IommufdBackend).ctx;
        for (const hwptId of this.#hwpts) {
          const data = new Uint8Array(Math.ceil(block.pages / 64) * 8);
          ctx.hwptGetDirtyBitmap({ hwptId, flags: 0, ...range, data });
          markBitmap(data, index, mark);
        }
      } else if (this.mode === 'all') {
        mark(index, 0, block.pages);
      }
    });
    for (const e of this.#machine.emulatedDevices) {
      const { block, offset } = this.#machine.ram.lookup(e.iova, e.lengthBytes);
      mark(blocks.indexOf(block), offset / RAM_PAGE_BYTES, Math.ceil(e.lengthBytes / RAM_PAGE_BYTES));
    }
  }

  /** Stop tracking (best effort on every device: the first failure is thrown after trying all). */
  stop(): void {
    if (!this.#started) return;
    this.#started = false;
    let failure: unknown;
    if (this.mode === 'device') {
      for (const d of this.#machine.devices) {
        try {
          d.device.vfio.dmaLoggingStop();
        } catch (err) {
          failure ??= err;
        }
      }
    } else if (this.mode === 'iommu') {
      const backend = this.#machine.backend;
      if (backend instanceof IommufdBackend) {
        for (const hwptId of this.#hwpts) {
          try {
            backend.ctx.hwptSetDirtyTracking({ hwptId, flags: 0 });
          } catch (err) {
            failure ??= err;
          }
        }
      }
    }
    if (failure !== undefined) throw failure;
  }
}

/** Mark the pages set in a kernel dirty bitmap (bit p of byte p >> 3 is page p). */
function markBitmap(bitmap: Uint8Array, block: number, mark: MarkPages): void {
  for (let i = 0; i < bitmap.length; i++) {
    let byte = bitmap[i]!;
    while (byte !== 0) {
      const bit = 31 - Math.clz32(byte & -byte);
      byte &= byte - 1;
      mark(block, i * 8 + bit, 1);
    }
  }
}
