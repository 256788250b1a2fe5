import type { ByteStore } from './byte-store.js';

/** Chunk size of lazily backed memory: bytes appear only when first written. */
export const LAZY_CHUNK_BYTES = 64 * 1024;

/**
 * A byte store of any length whose bytes are allocated on first write, chunk by chunk; untouched
 * bytes read as zero. A 4 GiB guest costs nothing until touched.
 */
export class LazyBytes implements ByteStore {
  readonly lengthBytes: number;
  #chunks = new Map<number, Uint8Array>();

  constructor(lengthBytes: number) {
    this.lengthBytes = lengthBytes;
  }

  /** Bytes actually allocated (touched chunks). */
  get residentBytes(): number {
    return this.#chunks.size * LAZY_CHUNK_BYTES;
  }

  read(offset: number, target: Uint8Array): void {
    let done = 0;
    while (done < target.length) {
      const at = offset + done;
      const index = Math.floor(at / LAZY_CHUNK_BYTES);
      const within = at - index * LAZY_CHUNK_BYTES;
      const n = Math.min(LAZY_CHUNK_BYTES - within, target.length - done);
      const chunk = this.#chunks.get(index);
      if (chunk) target.set(chunk.subarray(within, within + n), done);
      else target.fill(0, done, done + n);
      done += n;
    }
  }

  write(offset: number, data: Uint8Array): void {
    let done = 0;
    while (done < data.length) {
      const at = offset + done;
      const index = Math.floor(at / LAZY_CHUNK_BYTES);
      const within = at - index * LAZY_CHUNK_BYTES;
      const n = Math.min(LAZY_CHUNK_BYTES - within, data.length - done);
      let chunk = this.#chunks.get(index);
      if (!chunk) {
        chunk = new Uint8Array(LAZY_CHUNK_BYTES);
        this.#chunks.set(index, chunk);
      }
      chunk.set(data.subarray(done, done + n), within);
      done += n;
    }
  }

  /** A private copy (fork's copy of anonymous memory): touched chunks are duplicated. */
  clone(): LazyBytes {
    const copy = new LazyBytes(this.lengthBytes);
    for (const [index, chunk] of this.#chunks) copy.#chunks.set(index, chunk.slice());
    return copy;
  }
}
