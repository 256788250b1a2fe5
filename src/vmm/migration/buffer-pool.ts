/**
 * A bounded set of equal buffers handed out and given back: `take()` waits while all `count` are
 * out. A buffer given to a socket comes back when the socket has written it. The buffers are
 * shared memory, so a channel thread writes them without a copy.
 */
export class BufferPool {
  readonly bufferBytes: number;
  readonly count: number;
  readonly #free: Uint8Array[] = [];
  readonly #waiters: ((buffer: Uint8Array) => void)[] = [];
  #made = 0;

  constructor(bufferBytes: number, count: number) {
    this.bufferBytes = bufferBytes;
    this.count = count;
  }

  take(): Promise<Uint8Array> {
    const free = this.#free.pop();
    if (free !== undefined) return Promise.resolve(free);
    if (this.#made < this.count) {
      this.#made++;
      return Promise.resolve(new Uint8Array(new SharedArrayBuffer(this.bufferBytes)));
    }
    return new Promise((resolve) => this.#waiters.push(resolve));
  }

  give(buffer: Uint8Array): void {
    const waiter = this.#waiters.shift();
    if (waiter !== undefined) waiter(buffer);
    else this.#free.push(buffer);
  }
}
