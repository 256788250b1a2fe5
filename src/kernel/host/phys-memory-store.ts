import type { PhysMemory } from '../mem/phys-memory.js';
import type { ByteStore } from './byte-store.js';

/**
 * A byte store over a PhysMemory: the file's bytes are the PhysMemory's SharedArrayBuffers, so a
 * mapping of the file, a device DMA through an IOMMU and a worker thread holding the buffers (a
 * vCPU) all read and write the same bytes. What a memory backend with a shared memfd is to QEMU:
 * guest RAM that the VMM maps and the kernel pins.
 */
export class PhysMemoryStore implements ByteStore {
  readonly memory: PhysMemory;

  constructor(memory: PhysMemory) {
    this.memory = memory;
  }

  get lengthBytes(): number {
    return this.memory.sizeBytes;
  }

  /**
   * The whole size: a PhysMemory reserves all of its bytes up front (the host OS commits its pages
   * on first touch, which this process cannot see).
   */
  get residentBytes(): number {
    return this.memory.sizeBytes;
  }

  read(offset: number, target: Uint8Array): void {
    this.memory.read(offset, target);
  }

  write(offset: number, data: Uint8Array): void {
    this.memory.write(offset, data);
  }
}
