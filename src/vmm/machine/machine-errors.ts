import type { ErrnoName } from '../../uapi/errno.js';
import { VfioError } from '../../uapi/error.js';

/** Which IOMMU backend a VM's guest RAM and devices go through. */
export type IommuBackendKind = 'iommufd' | 'type1';

/**
 * Who pays for the guest pages pinned for device DMA, and against which limit:
 * - 'user': iommufd's default (RLIMIT_MODE 0): the uid's `locked_vm`, against RLIMIT_MEMLOCK of
 *   the mapping process;
 * - 'mm': the VMM process's `mm->locked_vm` against its RLIMIT_MEMLOCK (type1 always; iommufd with
 *   RLIMIT_MODE 1, set by a manager with CAP_SYS_RESOURCE);
 * - 'none': the VMM has CAP_IPC_LOCK: no RLIMIT_MEMLOCK check (iommufd charges no locked_vm,
 *   type1 still counts the mm's; cgroup limits still apply).
 */
export type AccountingMode = 'user' | 'mm' | 'none';

const MiB = 1024 * 1024;
const sizeText = (bytes: number | bigint): string => {
  const n = Number(bytes);
  return n % MiB === 0 ? `${n / MiB} MiB` : `${n} bytes`;
};

/** What a DMA mapping count check found (QEMU's `dma_max_mappings` check, hw/vfio/listener.c). */
export interface DmaMappingEstimate {
  /** Mappings the VM may need: `discardBlocks + maxMemslots - discardSections`. */
  mappings: number;
  /** Blocks of every discardable region (each plugged block is one mapping). */
  discardBlocks: number;
  /** Discardable regions (sections with a RamDiscardManager). */
  discardSections: number;
  /** Memory slots the VM may have (QEMU: KVM's limit, 512 without KVM). */
  maxMemslots: number;
}

/**
 * The VM may need more DMA mappings than its type1 container allows: it is refused at start, with
 * the numbers and the remedy (QEMU since Aug 2025: an error at start, no longer a warning).
 */
export class DmaMappingLimitError extends VfioError {
  readonly estimate: DmaMappingEstimate;
  /** The container's limit: VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL, or 65535 when not reported. */
  readonly limit: number;
  readonly limitReported: boolean;

  constructor(vm: string, estimate: DmaMappingEstimate, limit: number, limitReported: boolean) {
    const { mappings, discardBlocks, discardSections, maxMemslots } = estimate;
    super(
      'ERR_DMA_MAPPING_LIMIT',
      `possibly running out of DMA mappings: the VM may need ${mappings} DMA mappings ` +
        `(${discardBlocks} blocks in ${discardSections} discardable region(s) + ${maxMemslots} memory slots ` +
        `- ${discardSections}), the type1 container allows ${limit}` +
        (limitReported ? ' (DMA_AVAIL)' : ' (DMA_AVAIL not reported: 65535 assumed)') +
        `. Increase the block size of the discardable region(s) (virtio-mem 'block-size'), ` +
        `raise vfio_iommu_type1.dma_entry_limit, or use the iommufd backend`,
      { target: vm, op: 'VM start' },
    );
    this.estimate = estimate;
    this.limit = limit;
    this.limitReported = limitReported;
  }
}

/** Where and what a failed guest RAM DMA map was. */
export interface GuestRamSectionInfo {
  ramBlock: string;
  iova: bigint;
  lengthBytes: bigint;
}

/** The limit a pin charge ran into. */
export type PinLimit =
  /** RLIMIT_MEMLOCK of the VMM process, against the counter the accounting mode charges. */
  | { kind: 'RLIMIT_MEMLOCK'; bytes: bigint }
  /** softvfio's pinned-memory cgroup controller: `pinned.max` of the VMM's cgroup or an ancestor. */
  | { kind: 'pinned.max'; bytes: bigint; cgroup: string };

/**
 * Guest RAM could not be pinned for device DMA: the pinned-page accounting refused it (ENOMEM).
 * At start the VM does not start; at run time (a plug) the VM stops. Names the accounting mode and
 * the limit it hit.
 */
export class GuestRamPinError extends VfioError {
  readonly section: GuestRamSectionInfo;
  readonly accountingMode: AccountingMode;
  readonly backend: IommuBackendKind;
  /** RLIMIT_MEMLOCK of the VMM process. */
  readonly memlockLimitBytes: bigint;
  /** The limit that refused the charge. */
  readonly limit: PinLimit;
  /** Pages already charged where the mode charges (uid or mm `locked_vm`) when the map failed. */
  readonly lockedPages: number;

  constructor(
    vm: string,
    info: {
      section: GuestRamSectionInfo;
      backend: IommuBackendKind;
      accountingMode: AccountingMode;
      memlockLimitBytes: bigint;
      limit: PinLimit;
      lockedPages: number;
      whereCharged: string;
      when: 'start' | 'run time';
    },
    cause: VfioError,
  ) {
    const { section, backend, accountingMode, limit, lockedPages, whereCharged, when } = info;
    const refused =
      limit.kind === 'RLIMIT_MEMLOCK'
        ? `${lockedPages} pages locked, against RLIMIT_MEMLOCK ${sizeText(limit.bytes)}. ` +
          `Raise RLIMIT_MEMLOCK to cover the guest RAM devices may reach, or give the VMM CAP_IPC_LOCK`
        : `the pinned.max of cgroup ${limit.cgroup} (${sizeText(limit.bytes)}) refused it. ` +
          `Raise that cgroup's pinned.max to cover the guest RAM devices may reach`;
    super(
      'ERR_GUEST_RAM_PIN',
      `cannot pin guest RAM ${section.ramBlock} [0x${section.iova.toString(16)}, +${sizeText(section.lengthBytes)}) ` +
        `for device DMA (${backend}, ${cause.errno ?? cause.code}): accounting mode '${accountingMode}' charges ` +
        `${whereCharged}; ${refused} (${cause.message})`,
      { target: vm, op: when === 'start' ? 'VM start' : 'memory plug', cause },
    );
    this.section = section;
    this.accountingMode = accountingMode;
    this.backend = backend;
    this.memlockLimitBytes = info.memlockLimitBytes;
    this.limit = limit;
    this.lockedPages = lockedPages;
  }
}

/** A DMA map or unmap of guest RAM failed for another reason (ENOSPC, EFAULT, …): the VM cannot go on. */
export class DmaMapError extends VfioError {
  readonly section: GuestRamSectionInfo;
  readonly backend: IommuBackendKind;
  readonly kernelErrno: ErrnoName | undefined;

  constructor(
    vm: string,
    info: { section: GuestRamSectionInfo; backend: IommuBackendKind; op: 'map' | 'unmap'; when: string },
    cause: unknown,
  ) {
    const { section, backend, op, when } = info;
    const errno = cause instanceof VfioError ? cause.errno : undefined;
    super(
      'ERR_DMA_MAP',
      `DMA ${op} of guest RAM ${section.ramBlock} [0x${section.iova.toString(16)}, +${sizeText(section.lengthBytes)}) ` +
        `failed (${backend}${errno ? `, ${errno}` : ''}), unable to continue: ${(cause as Error)?.message ?? String(cause)}`,
      { target: vm, op: when, cause },
    );
    this.section = section;
    this.backend = backend;
    this.kernelErrno = errno;
  }
}

/** The VM stopped because of a failure while running (a device's work threw, a vCPU died, …). */
export class MachineFailedError extends VfioError {
  constructor(vm: string, message: string, cause?: unknown) {
    super('ERR_MACHINE_FAILED', message, { target: vm, ...(cause === undefined ? {} : { cause }) });
  }
}
