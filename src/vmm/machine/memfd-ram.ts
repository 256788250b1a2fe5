import type { Process } from '../../kernel/host/host.js';
import { PhysMemory } from '../../kernel/mem/phys-memory.js';
import type { GuestRam } from './guest-ram.js';
import { type RamBlock, type RamBlockOptions, validateRamBlockOptions } from './ram-block.js';

/**
 * A RAM block whose bytes are a memfd of the VMM process, mapped shared into it (QEMU's
 * `memory-backend-memfd,share=on`): one PhysMemory is at once the memfd's contents, the bytes at
 * `hostVa` in the VMM, and the SharedArrayBuffers vCPU workers write. The IOMMU reaches it by VA
 * (type1 MAP_DMA, IOAS_MAP) or by file offset (IOAS_MAP_FILE): every path lands in the same bytes.
 */
export interface MemfdRamBlock {
  readonly block: RamBlock;
  /** The memfd in the VMM process's fd table. */
  readonly fd: number;
  /** Where the VMM mapped it (MAP_SHARED from offset 0). */
  readonly hostVa: bigint;
}

/**
 * memfd_create + ftruncate + mmap(MAP_SHARED) in `process`, then the RAM block over the same
 * memory. Undone on failure (nothing stays open or mapped).
 */
export function addMemfdRamBlock(
  process: Process,
  ram: GuestRam,
  options: Omit<RamBlockOptions, 'memory'>,
): MemfdRamBlock {
  validateRamBlockOptions(options);
  const memory = new PhysMemory(options.sizeBytes);
  const fd = process.memfdCreate(options.sizeBytes, `memfd:${options.name}`, { memory });
  let hostVa: bigint | undefined;
  try {
    hostVa = process.mmap({ lengthBytes: options.sizeBytes, fd });
    const block = ram.addBlock({ ...options, memory });
    return { block, fd, hostVa };
  } catch (err) {
    if (hostVa !== undefined) process.munmap(hostVa, options.sizeBytes);
    process.closeFd(fd);
    throw err;
  }
}

/** munmap + close: the VMM lets go of the block's memfd. */
export function releaseMemfdRamBlock(process: Process, ram: MemfdRamBlock): void {
  if (!process.alive) return;
  process.munmap(ram.hostVa, ram.block.sizeBytes);
  if (process.file(ram.fd) !== undefined) process.closeFd(ram.fd);
}
