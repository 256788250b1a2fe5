// A small migration driver for the VFIO core tests: it records every hook call, can be told to
// fail a hook, and carries a byte stream whose content the tests know exactly.
// (node --test loads every file under test/, so this helper shows up as an empty test file.)
import assert from 'node:assert/strict';
import { DmaPort, MemoryDmaSpace } from '../../../src/kernel/vfio/dma-port.js';
import type {
  MigrationDriver,
  PrecopyInfo,
  ResumingSession,
  SavingSession,
} from '../../../src/kernel/vfio/migration-driver.js';
import { VfioDevice } from '../../../src/kernel/vfio/vfio-device.js';
import { VfioError } from '../../../src/uapi/error.js';
import { concatBytes as concat } from '../../../src/devices/conformance/data-fds.js';

export { concat };

export const F_SC = 1;
export const F_P2P = 2;
export const F_PC = 4;
export const COMBOS = [F_SC, F_SC | F_P2P, F_SC | F_PC, F_SC | F_P2P | F_PC] as const;

// Migration states, written out from the spec (1.1).
export const S = {
  ERROR: 0,
  STOP: 1,
  RUNNING: 2,
  STOP_COPY: 3,
  RESUMING: 4,
  RUNNING_P2P: 5,
  PRE_COPY: 6,
  PRE_COPY_P2P: 7,
} as const;

export const bytes = (...values: number[]) => Uint8Array.from(values);

export class TestSavingSession implements SavingSession {
  readonly precopy: boolean;
  readonly #driver: TestDriver;
  readonly #dataReady: () => void;
  #queue: Uint8Array[] = [];
  initialBytes: bigint;
  dirtyBytes = 0n;
  ended = false;

  constructor(driver: TestDriver, precopy: boolean, dataReady: () => void) {
    this.#driver = driver;
    this.precopy = precopy;
    this.#dataReady = dataReady;
    if (precopy) {
      this.#queue.push(driver.initialData.slice());
      this.initialBytes = BigInt(driver.initialData.length);
    } else {
      this.#queue.push(driver.initialData.slice(), driver.finalData.slice());
      this.initialBytes = 0n;
    }
  }

  /** The device changed state while in precopy: more bytes to send. */
  addDirty(data: Uint8Array): void {
    this.#queue.push(data.slice());
    this.dirtyBytes += BigInt(data.length);
    this.#dataReady();
  }

  read(target: Uint8Array): number {
    this.#driver.hook('read');
    let n = 0;
    while (n < target.length && this.#queue.length > 0) {
      const head = this.#queue[0]!;
      const take = Math.min(head.length, target.length - n);
      target.set(head.subarray(0, take), n);
      n += take;
      if (take === head.length) this.#queue.shift();
      else this.#queue[0] = head.subarray(take);
    }
    let left = BigInt(n);
    const fromInitial = left < this.initialBytes ? left : this.initialBytes;
    this.initialBytes -= fromInitial;
    left -= fromInitial;
    this.dirtyBytes -= left < this.dirtyBytes ? left : this.dirtyBytes;
    return n;
  }

  precopyInfo(): PrecopyInfo {
    this.#driver.hook('precopyInfo');
    return { initialBytes: this.initialBytes, dirtyBytes: this.dirtyBytes };
  }

  enterStopCopy(): void {
    this.#driver.hook('enterStopCopy');
    this.#driver.running = false;
    this.#queue.push(this.#driver.finalData.slice());
  }

  end(): void {
    this.#driver.hook('end(saving)');
    this.ended = true;
  }
}

export class TestResumingSession implements ResumingSession {
  readonly #driver: TestDriver;
  readonly chunks: Uint8Array[] = [];
  ended = false;

  constructor(driver: TestDriver) {
    this.#driver = driver;
  }

  write(chunk: Uint8Array): void {
    this.#driver.hook(`write(${chunk.length})`);
    this.chunks.push(chunk.slice());
  }

  get received(): Uint8Array {
    return concat(this.chunks);
  }

  finish(): void {
    this.#driver.hook('finish');
    this.#driver.loaded = this.received;
  }

  end(): void {
    this.#driver.hook('end(resuming)');
    this.ended = true;
  }
}

export class TestDriver implements MigrationDriver {
  readonly deviceType = 'test';
  readonly migrationFlags: number;
  readonly dmaLogging: boolean;
  /** Every hook call in order: 'stop', 'start(true)', 'startSaving(precopy=false)', … */
  readonly calls: string[] = [];
  /** hook name -> what it throws, once. */
  readonly failures = new Map<string, unknown>();
  initialData = bytes(1, 2, 3, 4, 5, 6, 7, 8, 9, 10);
  finalData = bytes(0xf0, 0xf1, 0xf2);
  dataSize = 4096n;
  running = true;
  quiesced = false;
  saving: TestSavingSession | undefined;
  resuming: TestResumingSession | undefined;
  loaded: Uint8Array | undefined;

  constructor(migrationFlags: number, options: { dmaLogging?: boolean } = {}) {
    this.migrationFlags = migrationFlags;
    this.dmaLogging = options.dmaLogging ?? false;
  }

  /** Record a hook call; throw what the test planted for it. */
  hook(name: string): void {
    this.calls.push(name);
    if (this.failures.has(name)) {
      const err = this.failures.get(name);
      this.failures.delete(name);
      throw err;
    }
  }

  /** Make the next call of `hook` throw `error`. */
  failNext(hook: string, error: unknown): void {
    this.failures.set(hook, error);
  }

  /** Take the calls recorded so far. */
  takeCalls(): string[] {
    return this.calls.splice(0);
  }

  stop(): void {
    this.hook('stop');
    this.running = false;
  }

  start(p2pQuiesced: boolean): void {
    this.hook(`start(${p2pQuiesced})`);
    this.running = true;
    this.quiesced = p2pQuiesced;
  }

  setP2pQuiesced(quiesced: boolean): void {
    this.hook(`setP2pQuiesced(${quiesced})`);
    this.quiesced = quiesced;
  }

  startSaving(options: { precopy: boolean; dataReady: () => void }): SavingSession {
    this.hook(`startSaving(precopy=${options.precopy})`);
    this.saving = new TestSavingSession(this, options.precopy, options.dataReady);
    return this.saving;
  }

  startResuming(): ResumingSession {
    this.hook('startResuming');
    this.resuming = new TestResumingSession(this);
    return this.resuming;
  }

  stopCopyLength(): bigint {
    this.hook('stopCopyLength');
    return this.dataSize;
  }

  reset(): void {
    this.hook('reset');
    this.running = true;
    this.quiesced = false;
  }
}

/** A device on a TestDriver, with a 1 MiB flat DMA space at IOVA 0. */
export function makeDevice(
  flags: number,
  options: { dmaLogging?: boolean; name?: string; dmaBytes?: number } = {},
): { dev: VfioDevice; drv: TestDriver; port: DmaPort; memory: Uint8Array } {
  const drv = new TestDriver(flags, options);
  const memory = new Uint8Array(options.dmaBytes ?? 1 << 20);
  const port = new DmaPort(new MemoryDmaSpace(memory));
  const dev = new VfioDevice({ name: options.name ?? 'dev0', driver: drv, dma: port });
  return { dev, drv, port, memory };
}

/** assert.throws for a kernel errno. */
export function assertErrno(fn: () => unknown, errno: string, message?: string): VfioError {
  let caught: unknown;
  assert.throws(
    fn,
    (err: unknown) => {
      caught = err;
      return err instanceof VfioError && err.errno === errno;
    },
    message ?? `expected ${errno}`,
  );
  return caught as VfioError;
}

/** assert.rejects for a kernel errno. */
export async function assertRejectsErrno(
  p: Promise<unknown>,
  errno: string,
  message?: string,
): Promise<void> {
  await assert.rejects(p, (err: unknown) => err instanceof VfioError && err.errno === errno, message);
}
