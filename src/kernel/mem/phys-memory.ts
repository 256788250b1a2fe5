import { createHash } from 'node:crypto';
import { internalError, invalidArgument } from '../../uapi/error.js';
import { MemoryChecksummer } from './simd-checksum.js';

const WASM_PAGE = 65536;
/** Largest piece of one PhysMemory; a wasm memory can hold 4 GiB, 1 GiB keeps views small. */
export const SEGMENT_BYTES = 1 << 30;
/** Copies up to this size are done byte by byte, without a subarray view. */
const SMALL_COPY_BYTES = 16;
/** Unit of PhysMemory.digest(): per-chunk checksums are hashed together. */
export const DIGEST_CHUNK_BYTES = 1 << 20;

interface Segment {
  readonly memory: WebAssembly.Memory;
  readonly bytes: Uint8Array;
  readonly checksummer: MemoryChecksummer;
}

/**
 * Bytes that stand for physical memory (device DRAM, guest RAM): shared wasm memories of at most
 * 1 GiB each, so worker threads can share them (their buffers are SharedArrayBuffers) and SIMD
 * checksums run over them in place. Zero-filled; pages cost nothing until touched.
 */
export class PhysMemory {
  readonly sizeBytes: number;
  readonly #segments: Segment[] = [];

  constructor(sizeBytes: number) {
    if (!Number.isSafeInteger(sizeBytes) || sizeBytes < 0)
      throw invalidArgument(`bad memory size ${sizeBytes}`);
    this.sizeBytes = sizeBytes;
    for (let at = 0; at < sizeBytes; at += SEGMENT_BYTES) {
      const length = Math.min(SEGMENT_BYTES, sizeBytes - at);
      const pages = Math.ceil(length / WASM_PAGE);
      const memory = new WebAssembly.Memory({ initial: pages, maximum: pages, shared: true });
      this.#segments.push({
        memory,
        bytes: new Uint8Array(memory.buffer, 0, length),
        checksummer: new MemoryChecksummer(memory),
      });
    }
  }

  /** The SharedArrayBuffers behind the memory, in order, each SEGMENT_BYTES but the last. */
  get buffers(): SharedArrayBuffer[] {
    return this.#segments.map((s) => s.memory.buffer as SharedArrayBuffer);
  }

  /** A live view of `[offset, offset+length)`, which must not cross a 1 GiB segment boundary. */
  view(offset: number, length: number): Uint8Array {
    this.#check(offset, length);
    const seg = Math.floor(offset / SEGMENT_BYTES);
    const at = offset - seg * SEGMENT_BYTES;
    if (at + length > SEGMENT_BYTES) throw internalError(`view [${offset}, +${length}) crosses a segment`);
    return this.#segments[seg]!.bytes.subarray(at, at + length);
  }

  read(offset: number, target: Uint8Array): void {
    const n = target.length;
    const bytes = this.#within(offset, n);
    if (bytes === undefined) {
      this.#pieces(offset, n, (seg, at, done, len) => target.set(seg.subarray(at, at + len), done));
      return;
    }
    const at = offset % SEGMENT_BYTES;
    // Device DMA reads a few bytes at a time (descriptors, length words): no view for those.
    if (n <= SMALL_COPY_BYTES) for (let i = 0; i < n; i++) target[i] = bytes[at + i]!;
    else target.set(bytes.subarray(at, at + n));
  }

  write(offset: number, data: Uint8Array): void {
    const n = data.length;
    const bytes = this.#within(offset, n);
    if (bytes === undefined) {
      this.#pieces(offset, n, (seg, at, done, len) => seg.set(data.subarray(done, done + len), at));
      return;
    }
    const at = offset % SEGMENT_BYTES;
    if (n <= SMALL_COPY_BYTES) for (let i = 0; i < n; i++) bytes[at + i] = data[i]!;
    else bytes.set(data, at);
  }

  /**
   * Fault every page in without changing a byte (an atomic add of 0 per 4 KiB: one write fault
   * each), as a preallocated memory backend or a device's own memory is: later writes then do not
   * pay the first-touch cost. Nothing may run on the memory meanwhile.
   */
  prefault(): void {
    for (const segment of this.#segments) {
      const words = new Int32Array(segment.memory.buffer, 0, segment.bytes.length >>> 2);
      for (let i = 0; i < words.length; i += 1024) Atomics.add(words, i, 0);
    }
  }

  fill(value: number, offset = 0, length = this.sizeBytes - offset): void {
    this.#pieces(offset, length, (bytes, at, _done, n) => {
      bytes.fill(value, at, at + n);
    });
  }

  /** 64-bit checksum of a range (see simd-checksum.ts); ranges across segments are chained. */
  checksum(offset: number, length: number, seed = 0): bigint {
    let h = BigInt(seed);
    let first = true;
    this.#pieces(offset, length, (_bytes, at, _done, n, segment) => {
      const c = segment.checksummer.checksum(at, n, Number(h & 0xffffffffn));
      h = first ? c : BigInt.asUintN(64, (h ^ c) * 0x9e3779b97f4a7c15n);
      first = false;
    });
    return h;
  }

  /**
   * The wasm memory holding `[offset, offset+length)` and where the range starts in it, when the
   * range lies in one segment (for the checksum worker, checksum-worker.ts); else undefined.
   */
  segmentOf(offset: number, length: number): { memory: WebAssembly.Memory; at: number } | undefined {
    this.#check(offset, length);
    const seg = Math.floor(offset / SEGMENT_BYTES);
    const at = offset - seg * SEGMENT_BYTES;
    const segment = this.#segments[seg];
    if (!segment || at + length > segment.bytes.length) return undefined;
    return { memory: segment.memory, at };
  }

  /** A hex digest of the whole memory: SHA-256 over the checksums of its 1 MiB chunks. */
  digest(): string {
    const hash = createHash('sha256');
    const word = new DataView(new ArrayBuffer(8));
    for (let at = 0; at < this.sizeBytes; at += DIGEST_CHUNK_BYTES) {
      word.setBigUint64(0, this.checksum(at, Math.min(DIGEST_CHUNK_BYTES, this.sizeBytes - at)), true);
      hash.update(new Uint8Array(word.buffer));
    }
    hash.update(String(this.sizeBytes));
    return hash.digest('hex');
  }

  /** The segment's bytes when `[offset, offset+length)` is valid and lies in one segment (the hot path). */
  #within(offset: number, length: number): Uint8Array | undefined {
    this.#check(offset, length);
    const seg = Math.floor(offset / SEGMENT_BYTES);
    return (offset % SEGMENT_BYTES) + length <= SEGMENT_BYTES ? this.#segments[seg]!.bytes : undefined;
  }

  #check(offset: number, length: number): void {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
      throw internalError(`bad range [${offset}, +${length})`);
    }
    if (offset + length > this.sizeBytes) {
      throw internalError(`range [${offset}, +${length}) beyond memory of ${this.sizeBytes} bytes`);
    }
  }

  /** Visit `[offset, offset+length)` one segment piece at a time. */
  #pieces(
    offset: number,
    length: number,
    visit: (bytes: Uint8Array, at: number, done: number, n: number, segment: Segment) => void,
  ): void {
    this.#check(offset, length);
    let done = 0;
    while (done < length) {
      const abs = offset + done;
      const seg = Math.floor(abs / SEGMENT_BYTES);
      const at = abs - seg * SEGMENT_BYTES;
      const segment = this.#segments[seg]!;
      const n = Math.min(length - done, segment.bytes.length - at);
      visit(segment.bytes, at, done, n, segment);
      done += n;
    }
  }
}
