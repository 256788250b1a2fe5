import { kernelError } from '../../uapi/error.js';
import { LazyBytes } from './lazy-bytes.js';

/** A memfd-like file: a fixed size, lazily backed byte store that several processes may share. */
export class MemFile {
  readonly sizeBytes: bigint;
  readonly name: string;
  readonly store: LazyBytes;

  constructor(sizeBytes: bigint, name = 'memfd') {
    if (sizeBytes < 0n || sizeBytes > BigInt(Number.MAX_SAFE_INTEGER)) {
      throw kernelError('EINVAL', `bad memfd size ${sizeBytes}`, { op: 'memfd_create' });
    }
    this.sizeBytes = sizeBytes;
    this.name = name;
    this.store = new LazyBytes(Number(sizeBytes));
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
