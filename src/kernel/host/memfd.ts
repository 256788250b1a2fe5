import type { PhysMemory } from '../mem/phys-memory.js';
import { kernelError } from '../../uapi/error.js';
import type { ByteStore } from './byte-store.js';
import { LazyBytes } from './lazy-bytes.js';
import { PhysMemoryStore } from './phys-memory-store.js';

export interface MemFileOptions {
  /**
   * Back the file with this PhysMemory (its size must be the file's) instead of lazily allocated
   * chunks: the file's bytes are then the PhysMemory's SharedArrayBuffers, which other threads may
   * hold (guest RAM that vCPU workers write). softvfio extension, as a memory backend's memfd.
   */
  memory?: PhysMemory;
}

/** A memfd-like file: a fixed size byte store that several processes may share. */
export class MemFile {
  readonly sizeBytes: bigint;
  readonly name: string;
  readonly store: ByteStore;

  constructor(sizeBytes: bigint, name = 'memfd', options: MemFileOptions = {}) {
    if (sizeBytes < 0n || sizeBytes > BigInt(Number.MAX_SAFE_INTEGER)) {
      throw kernelError('EINVAL', `bad memfd size ${sizeBytes}`, { op: 'memfd_create' });
    }
    const { memory } = options;
    if (memory !== undefined && BigInt(memory.sizeBytes) !== sizeBytes) {
      throw kernelError('EINVAL', `memfd of ${sizeBytes} bytes over a memory of ${memory.sizeBytes}`, {
        op: 'memfd_create',
      });
    }
    this.sizeBytes = sizeBytes;
    this.name = name;
    this.store = memory === undefined ? new LazyBytes(Number(sizeBytes)) : new PhysMemoryStore(memory);
  }

  #check(offset: bigint, length: number, op: string): number {
    if (offset < 0n || offset + BigInt(length) > this.sizeBytes) {
      throw kernelError('EFAULT', `offset 0x${offset.toString(16)}+${length} beyond end of file`, {
        target: this.name,
        op,
      });
    }
    return Number(offset);
  }

  read(offset: bigint, target: Uint8Array): void {
    this.store.read(this.#check(offset, target.length, 'pread'), target);
  }

  write(offset: bigint, data: Uint8Array): void {
    this.store.write(this.#check(offset, data.length, 'pwrite'), data);
  }
}

/** An open file description in a process's fd table. */
export interface OpenFile {
  readonly file: MemFile;
  readonly writable: boolean;
}
