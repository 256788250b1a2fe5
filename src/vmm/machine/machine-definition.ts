import { invalidArgument } from '../../uapi/error.js';
import { DEFAULT_MAX_MEMSLOTS } from './dma-mapping-estimate.js';
import { GUEST_PAGE_BYTES } from './guest-page.js';
import type { AccountingMode, IommuBackendKind } from './machine-errors.js';
import type { RamDiscardOptions } from './ram-block.js';
import type { VcpuWorkload } from './vcpu-workload.js';

const GiB = 1n << 30n;

/** One RAM block of a VM. The first one is boot memory and may not be discardable. */
export interface MachineRamBlockDefinition {
  /** Unique name ('pc.ram', 'virtio-mem0'). */
  name: string;
  sizeBytes: number;
  /** Guest-physical base; default right after the previous block, aligned to this one's block size. */
  gpa?: bigint;
  /** A discardable (virtio-mem-like) region: plugged and unplugged in blocks at run time. */
  discard?: RamDiscardOptions;
}

interface DeviceDefinitionBase {
  /** Unique among the VM's devices. */
  name: string;
  seed?: number;
  /** Override the device's migration feature flags. */
  migrationFlags?: number;
  /** Work units each guest driver tick gives it; default 1. */
  workUnitsPerTick?: number;
  /** Its IOMMU tracks dirty pages (iommufd HWPT with DIRTY_TRACKING); default true. */
  iommuDirtyTracking?: boolean;
}

export interface NicDeviceDefinition extends DeviceDefinitionBase {
  type: 'nic';
  flowTableBytes?: number;
  /** The RX ring the guest driver sets up in guest RAM; default 256 entries of 2 KiB. */
  rxRing?: { entries: number; bufferBytes: number };
}

export interface AccelDeviceDefinition extends DeviceDefinitionBase {
  type: 'accel';
  memoryBytes?: number;
  /** The job buffer the guest driver sets up in guest RAM; default 64 KiB. */
  guestBufferBytes?: number;
}

export interface BasicDeviceDefinition extends DeviceDefinitionBase {
  type: 'basic';
  registerBytes?: number;
}

/** An assigned (VFIO) device: one of the sample devices, with its options. */
export type MachineDeviceDefinition = NicDeviceDefinition | AccelDeviceDefinition | BasicDeviceDefinition;

/** An emulated (mediated) device whose kernel driver pins guest pages and writes into them. */
export interface EmulatedDeviceDefinition {
  name: string;
  /** Pages it pins in guest RAM; default 4. */
  pages?: number;
  seed?: number;
}

/** Everything a VM is made of (what a QEMU command line and libvirt's limits say). */
export interface MachineDefinition {
  name: string;
  ram: readonly MachineRamBlockDefinition[];
  vcpus: {
    count: number;
    /**
     * One workload for every vCPU or one each; a workload with no working set gets all RAM after
     * the device buffers (the guest does not scribble over its own DMA rings). Default: random
     * writes, as fast as it can.
     */
    workload?: VcpuWorkload | readonly VcpuWorkload[];
  };
  devices?: readonly MachineDeviceDefinition[];
  emulatedDevices?: readonly EmulatedDeviceDefinition[];
  iommu: IommuBackendKind;
  /** RLIMIT_MEMLOCK of the VMM process; default guest RAM + 1 GiB (what libvirt sets for VFIO). */
  memlockLimitBytes?: bigint;
  /** Default 'user' on iommufd, 'mm' on type1 (the only mode it has besides 'none'). */
  accounting?: AccountingMode;
  /** uid of the VMM process; default 107 (libvirt's qemu user). */
  uid?: number;
  /** The cgroup the VMM process starts in (softvfio pinned-memory controller); default the root. */
  cgroup?: string;
  /** Guest driver tick interval; default 10 ms. */
  guestDriverIntervalMs?: number;
  /** Memory slots counted in the DMA mapping estimate; default 512 (QEMU without KVM). */
  maxMemslots?: number;
}

/** Where the guest driver put a device's buffer in guest RAM (IOVA = GPA). */
export interface GuestBufferPlacement {
  /** The device it belongs to. */
  device: string;
  gpa: bigint;
  bytes: number;
}

/** A definition with every default filled in and every block and buffer placed. */
export interface ResolvedMachineDefinition {
  name: string;
  ram: (MachineRamBlockDefinition & { gpa: bigint })[];
  vcpuCount: number;
  vcpuWorkload: VcpuWorkload[];
  devices: MachineDeviceDefinition[];
  emulatedDevices: EmulatedDeviceDefinition[];
  iommu: IommuBackendKind;
  memlockLimitBytes: bigint;
  accounting: AccountingMode;
  uid: number;
  cgroup: string | undefined;
  guestDriverIntervalMs: number;
  maxMemslots: number;
  /** Device buffers at the start of the boot block, by device name. */
  buffers: Map<string, GuestBufferPlacement>;
  /** Bytes of the boot block the buffers take (page aligned). */
  bufferAreaBytes: number;
}

export const DEFAULT_NIC_RING = { entries: 256, bufferBytes: 2048 } as const;
export const DEFAULT_ACCEL_GUEST_BUFFER_BYTES = 64 * 1024;
/** Default uid of the VMM process (libvirt's qemu user). */
export const DEFAULT_VMM_UID = 107;

const pageUp = (n: number): number => Math.ceil(n / GUEST_PAGE_BYTES) * GUEST_PAGE_BYTES;
const alignUp = (n: bigint, to: bigint): bigint => ((n + to - 1n) / to) * to;

/** Check a definition and fill in defaults and placements; throws ERR_INVALID_ARGUMENT. */
export function resolveMachineDefinition(def: MachineDefinition): ResolvedMachineDefinition {
  if (typeof def.name !== 'string' || def.name.length === 0) throw invalidArgument('a VM needs a name');
  const what = `VM ${def.name}`;
  if (def.iommu !== 'iommufd' && def.iommu !== 'type1') {
    throw invalidArgument(`${what}: iommu must be 'iommufd' or 'type1', got ${String(def.iommu)}`);
  }
  const accounting = def.accounting ?? (def.iommu === 'iommufd' ? 'user' : 'mm');
  if (accounting !== 'user' && accounting !== 'mm' && accounting !== 'none') {
    throw invalidArgument(`${what}: accounting must be 'user', 'mm' or 'none', got ${String(accounting)}`);
  }
  if (def.iommu === 'type1' && accounting === 'user') {
    throw invalidArgument(
      `${what}: type1 charges the VMM's mm (accounting 'mm' or 'none'); per-user accounting needs iommufd`,
    );
  }
  if (!Array.isArray(def.ram) || def.ram.length === 0) throw invalidArgument(`${what}: no RAM block`);
  if (def.ram[0]!.discard !== undefined) {
    throw invalidArgument(
      `${what}: the first RAM block (${def.ram[0]!.name}) is boot memory, not discardable`,
    );
  }

  // RAM layout: given GPAs, or packed after the previous block.
  const ram: ResolvedMachineDefinition['ram'] = [];
  let next = 0n;
  for (const block of def.ram) {
    const align = BigInt(block.discard?.blockSizeBytes ?? GUEST_PAGE_BYTES);
    const gpa = block.gpa ?? alignUp(next, align);
    ram.push({ ...block, gpa });
    next = gpa + BigInt(block.sizeBytes);
  }
  const ramBytes = def.ram.reduce((n, b) => n + b.sizeBytes, 0);

  // Devices: unique names, then buffers placed from the start of the boot block.
  const devices = [...(def.devices ?? [])];
  const emulatedDevices = [...(def.emulatedDevices ?? [])];
  const names = new Set<string>();
  for (const d of [...devices, ...emulatedDevices]) {
    if (typeof d.name !== 'string' || d.name.length === 0)
      throw invalidArgument(`${what}: a device needs a name`);
    if (names.has(d.name)) throw invalidArgument(`${what}: two devices named ${d.name}`);
    names.add(d.name);
  }
  for (const d of devices) {
    const type: string = d.type;
    if (type !== 'nic' && type !== 'accel' && type !== 'basic') {
      throw invalidArgument(`${what}: device ${d.name} has unknown type ${type}`);
    }
    const units = d.workUnitsPerTick ?? 1;
    if (!Number.isSafeInteger(units) || units < 0) {
      throw invalidArgument(`${what}: device ${d.name}: workUnitsPerTick ${units} is not a count`);
    }
  }
  const boot = ram[0]!;
  const buffers = new Map<string, GuestBufferPlacement>();
  let offset = 0;
  const place = (device: string, bytes: number) => {
    if (!Number.isSafeInteger(bytes) || bytes <= 0) {
      throw invalidArgument(`${what}: device ${device}: buffer of ${bytes} bytes`);
    }
    buffers.set(device, { device, gpa: boot.gpa + BigInt(offset), bytes });
    offset += pageUp(bytes);
  };
  for (const d of devices) {
    if (d.type === 'nic') {
      // the RX ring, then a TX ring of the same geometry
      const ring = d.rxRing ?? DEFAULT_NIC_RING;
      place(d.name, 2 * ring.entries * ring.bufferBytes);
    } else if (d.type === 'accel') place(d.name, d.guestBufferBytes ?? DEFAULT_ACCEL_GUEST_BUFFER_BYTES);
  }
  for (const e of emulatedDevices) place(e.name, (e.pages ?? 4) * GUEST_PAGE_BYTES);
  if (offset >= boot.sizeBytes) {
    throw invalidArgument(
      `${what}: device buffers take ${offset} bytes, more than the boot block ${boot.name} (${boot.sizeBytes})`,
    );
  }

  // vCPUs: a workload without a working set gets the RAM after the buffers.
  const count = def.vcpus?.count;
  if (!Number.isSafeInteger(count) || count < 1)
    throw invalidArgument(`${what}: vCPU count ${String(count)}`);
  const given = def.vcpus.workload ?? {};
  const list: readonly VcpuWorkload[] = Array.isArray(given) ? given : new Array(count).fill(given);
  if (list.length !== count) throw invalidArgument(`${what}: ${list.length} workloads for ${count} vCPUs`);
  const vcpuWorkload = list.map((w) =>
    w.workingSetOffsetBytes === undefined && w.workingSetBytes === undefined
      ? { ...w, workingSetOffsetBytes: offset, workingSetBytes: ramBytes - offset }
      : { ...w },
  );

  const intervalMs = def.guestDriverIntervalMs ?? 10;
  const maxMemslots = def.maxMemslots ?? DEFAULT_MAX_MEMSLOTS;
  if (!Number.isSafeInteger(maxMemslots) || maxMemslots < 1) {
    throw invalidArgument(`${what}: maxMemslots ${maxMemslots} is not a positive count`);
  }
  const memlockLimitBytes = def.memlockLimitBytes ?? BigInt(ramBytes) + GiB;
  if (memlockLimitBytes < 0n) throw invalidArgument(`${what}: negative memlock limit`);
  return {
    name: def.name,
    ram,
    vcpuCount: count,
    vcpuWorkload,
    devices,
    emulatedDevices,
    iommu: def.iommu,
    memlockLimitBytes,
    accounting,
    uid: def.uid ?? DEFAULT_VMM_UID,
    cgroup: def.cgroup,
    guestDriverIntervalMs: intervalMs,
    maxMemslots,
    buffers,
    bufferAreaBytes: offset,
  };
}
