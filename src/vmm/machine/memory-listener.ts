import type { Cgroup } from '../../kernel/host/cgroup.js';
import type { Process } from '../../kernel/host/host.js';
import { isErrno, VfioError } from '../../uapi/error.js';
import type { RamSection, VmDmaBackend } from './dma-backend.js';
import { checkDmaMappingLimit, DEFAULT_MAX_MEMSLOTS, estimateDmaMappings } from './dma-mapping-estimate.js';
import { type DmaMappingEstimate, DmaMapError, GuestRamPinError, type PinLimit } from './machine-errors.js';
import type { MemfdRamBlock } from './memfd-ram.js';
import type { RamDiscardEvent } from './ram-discard.js';

export interface MemoryListenerOptions {
  /** The VM's name, for errors. */
  vm: string;
  /** Every RAM block of the VM, each a memfd of the VMM. */
  blocks: readonly MemfdRamBlock[];
  backend: VmDmaBackend;
  /** The VMM process (its RLIMIT_MEMLOCK and cgroup name the limit a pin failure hit). */
  process: Process;
  /** Memory slots to count in the mapping estimate; default 512 (QEMU without KVM). */
  maxMemslots?: number;
  /**
   * A map or unmap failed while the VM runs (a plug that cannot be mapped…): the VM must stop.
   * Called before the plug or unplug call throws the same error.
   */
  onFatal: (err: VfioError) => void;
}

/**
 * The VFIO memory listener of one VM (QEMU's hw/vfio/listener.c): maps guest RAM into the IOMMU
 * backend at IOVA = guest-physical address. Plain RAM is one mapping per block; a discardable
 * region is mapped only where plugged, one mapping per block of its manager's granularity, so each
 * can go alone: an unplug unmaps it (before its bytes are discarded), a plug maps it (and is
 * refused if that fails).
 *
 * Errors are errors, never warnings: `register` first compares QEMU's estimate of the mappings the
 * VM may need with the backend's limit (DmaMappingLimitError), then maps; any failure unmaps what
 * it mapped and throws (GuestRamPinError for ENOMEM, DmaMapError otherwise). At run time a failed
 * map or unmap goes to `onFatal` and is thrown to the plug/unplug caller.
 */
export class VfioMemoryListener {
  readonly #o: MemoryListenerOptions;
  /** Mapped sections by IOVA. */
  readonly #mapped = new Map<bigint, RamSection>();
  #unsubscribe: (() => void)[] = [];
  #registered = false;

  constructor(options: MemoryListenerOptions) {
    this.#o = options;
  }

  get registered(): boolean {
    return this.#registered;
  }

  /** QEMU's estimate of the mappings the VM may need; undefined without a discardable region. */
  estimate(): DmaMappingEstimate | undefined {
    return estimateDmaMappings(
      this.#o.blocks.map((b) => b.block),
      this.#o.maxMemslots ?? DEFAULT_MAX_MEMSLOTS,
    );
  }

  /** The sections mapped now, ascending IOVA. */
  sections(): RamSection[] {
    return [...this.#mapped.values()].sort((a, b) => (a.iova < b.iova ? -1 : a.iova > b.iova ? 1 : 0));
  }

  /** Bytes of guest RAM mapped now. */
  get mappedBytes(): number {
    let n = 0;
    for (const s of this.#mapped.values()) n += s.lengthBytes;
    return n;
  }

  /**
   * Check the mapping limit, map every block (plugged parts of discardable ones), then follow plugs
   * and unplugs. All or nothing: on failure nothing stays mapped.
   */
  register(): void {
    if (this.#registered) throw new VfioError('ERR_INVALID_ARGUMENT', 'the memory listener is registered');
    checkDmaMappingLimit(this.#o.vm, this.estimate(), this.#o.backend.mappingLimit);
    this.#registered = true;
    try {
      for (const ram of this.#o.blocks) {
        const { block } = ram;
        const manager = block.discard;
        if (manager === undefined) {
          this.#map({ ram, offsetBytes: 0, lengthBytes: block.sizeBytes, iova: block.gpa }, 'start');
          continue;
        }
        this.#unsubscribe.push(manager.onChange((event) => this.#onDiscardChange(ram, event)));
        for (const b of manager.pluggedBlocks()) this.#map(this.#blockSection(ram, b), 'start');
      }
    } catch (err) {
      this.#teardown();
      throw err;
    }
  }

  /** Stop following plugs and unmap everything mapped. Throws the first unmap failure, after trying all. */
  unregister(): void {
    if (!this.#registered) return;
    const failure = this.#teardown();
    if (failure !== undefined) throw failure;
  }

  #teardown(): unknown {
    for (const stop of this.#unsubscribe) stop();
    this.#unsubscribe = [];
    this.#registered = false;
    let failure: unknown;
    for (const section of this.sections().reverse()) {
      try {
        this.#unmap(section, 'VM teardown');
      } catch (err) {
        failure ??= err;
      }
    }
    return failure;
  }

  #blockSection(ram: MemfdRamBlock, index: number): RamSection {
    const size = ram.block.discard!.blockSizeBytes;
    return { ram, offsetBytes: index * size, lengthBytes: size, iova: ram.block.gpa + BigInt(index * size) };
  }

  #onDiscardChange(ram: MemfdRamBlock, event: RamDiscardEvent): void {
    const section = this.#blockSection(ram, event.block);
    try {
      if (event.kind === 'plug') this.#map(section, 'run time');
      else this.#unmap(section, 'memory unplug');
    } catch (err) {
      const fatal =
        err instanceof VfioError ? err : new VfioError('ERR_DMA_MAP', String(err), { cause: err });
      this.#o.onFatal(fatal);
      throw fatal;
    }
  }

  #map(section: RamSection, when: 'start' | 'run time'): void {
    const { backend } = this.#o;
    try {
      backend.mapRam(section);
    } catch (err) {
      const info = {
        ramBlock: section.ram.block.name,
        iova: section.iova,
        lengthBytes: BigInt(section.lengthBytes),
      };
      if (isErrno(err, 'ENOMEM')) {
        const { process } = this.#o;
        throw new GuestRamPinError(
          this.#o.vm,
          {
            section: info,
            backend: backend.kind,
            accountingMode: backend.accountingMode,
            memlockLimitBytes: process.rlimitMemlockBytes,
            limit: pinLimitHit(process, section.lengthBytes),
            lockedPages: backend.lockedPages(),
            whereCharged: backend.chargedTo,
            when,
          },
          err as VfioError,
        );
      }
      throw new DmaMapError(
        this.#o.vm,
        {
          section: info,
          backend: backend.kind,
          op: 'map',
          when: when === 'start' ? 'VM start' : 'memory plug',
        },
        err,
      );
    }
    this.#mapped.set(section.iova, section);
  }

  #unmap(section: RamSection, when: string): void {
    if (!this.#mapped.has(section.iova)) return;
    try {
      this.#o.backend.unmapRam(section);
    } catch (err) {
      const info = {
        ramBlock: section.ram.block.name,
        iova: section.iova,
        lengthBytes: BigInt(section.lengthBytes),
      };
      throw new DmaMapError(
        this.#o.vm,
        { section: info, backend: this.#o.backend.kind, op: 'unmap', when },
        err,
      );
    }
    this.#mapped.delete(section.iova);
  }
}

/**
 * Which limit a refused charge of `lengthBytes` ran into: the pinned.max of the VMM's cgroup or of
 * an ancestor when one leaves no room for it, else RLIMIT_MEMLOCK (what the accounting mode checks).
 */
function pinLimitHit(process: Process, lengthBytes: number): PinLimit {
  const pages = Math.ceil(lengthBytes / 4096);
  for (let cg: Cgroup | undefined = process.cgroup; cg !== undefined; cg = cg.parent) {
    const max = cg.pinnedLimitBytes;
    if (max !== undefined && cg.pinnedPages + pages > Number(max >> 12n)) {
      return { kind: 'pinned.max', bytes: max, cgroup: cg.path };
    }
  }
  return { kind: 'RLIMIT_MEMLOCK', bytes: process.rlimitMemlockBytes };
}
