/**
 * Checksums computed off the main thread: one process-wide worker (checksum-worker-thread.ts),
 * started on first use and unref'd, runs PhysMemory.checksum over the same shared wasm memories
 * with the same SIMD module, so its results are exactly the inline ones.
 *
 * Jobs are queued through a SharedArrayBuffer (checksum-protocol.ts) without the main thread
 * yielding, and their results come back the same way: a synchronous caller (the device-state saver
 * and loader) gets a PendingChecksum and later asks for its value, which
 *  - is read at once when the worker has finished it;
 *  - is computed inline by the caller when the worker has not started it yet: the job is taken
 *    back, so a busy worker never makes the main thread wait for work it could do itself;
 *  - while the worker runs it, the caller runs other queued jobs itself (newest first, the worker
 *    takes the oldest), and only waits (Atomics.wait) when there are none: both threads share the
 *    load instead of one idling. A wait is short (GRACE_MS, ~2 ms for 1 MiB): a worker that slow
 *    has lost its CPU, and the caller computes the value itself.
 * Whatever goes wrong with the worker (it cannot start, it fails a job, it stops answering), the
 * value is computed inline: a PendingChecksum always yields the exact checksum. A worker that
 * failed is not used again (checksumWorkerStats().failure says why) until shutdownChecksumWorker().
 *
 * Bounded: SLOTS jobs in flight and QUEUE_LENGTH queue entries for the whole process; submit()
 * returns undefined when either is full (the caller computes inline). Memories are registered with
 * the worker by the ChecksumClients that use them and dropped when the last one closes.
 */
import { Worker } from 'node:worker_threads';
import { VfioError } from '../../uapi/error.js';
import {
  DONE,
  FAILED,
  FREE,
  HEAD,
  IDLE,
  PARAM_WORDS,
  QUEUE_LENGTH,
  QUEUED,
  RUNNING,
  SHARED_BYTES,
  SLOTS,
  sharedViews,
  type SharedViews,
  TAIL,
  type ToWorker,
} from './checksum-protocol.js';
import type { PhysMemory } from './phys-memory.js';
import { MemoryChecksummer } from './simd-checksum.js';

/** Smallest range worth a job: below it, queueing costs more than the checksum. */
export const CHECKSUM_OFFLOAD_MIN_BYTES = 64 * 1024;
/**
 * How long a caller waits for a job the worker is running before computing it too: GRACE_MS plus
 * a millisecond per GRACE_BYTES_PER_MS of the job. A 1 MiB job takes ~0.15 ms (~7 GB/s), so only a
 * worker that lost its CPU (a loaded machine) takes 2 ms, and the caller should not wait for the
 * scheduler to give it back.
 */
const GRACE_MS = 1;
const GRACE_BYTES_PER_MS = 1e6;
/** How long a job may run on the worker before the worker is declared stuck (no more jobs). */
const STUCK_MS = 10_000;

/** The error code of checksum worker failures (VfioError.code). */
export const CHECKSUM_WORKER_ERROR = 'ERR_CHECKSUM_WORKER';

function workerError(message: string, cause?: unknown): VfioError {
  return new VfioError(CHECKSUM_WORKER_ERROR, message, cause === undefined ? {} : { cause });
}

/** Counters of the current worker (since it was started), for tests and benchmarks. */
export interface ChecksumWorkerStats {
  /** A worker is started and usable. */
  running: boolean;
  /** Why the worker is unusable (it failed to start, stopped answering, was shut down). */
  failure: VfioError | undefined;
  /** Jobs queued. */
  submitted: number;
  /** Results the worker thread computed and a caller took. */
  fromWorker: number;
  /**
   * Values a caller computed itself: jobs taken back before the worker started them, jobs the
   * worker was too slow with (GRACE_MS) or failed.
   */
  inline: number;
  /** Times a caller found its job running on the worker (it then helps, or waits). */
  waits: number;
  /** Queued jobs the calling thread ran itself instead of waiting (whoever takes them later). */
  helped: number;
  /** Jobs the worker could not run (computed inline). */
  failed: number;
  /** Memories registered with the worker now. */
  memories: number;
}

class Engine {
  readonly #views: SharedViews;
  readonly #worker: Worker;
  readonly #free: number[] = [];
  /** Slots whose result nobody wants but that the worker is running (since when): freed when done. */
  readonly #orphans = new Map<number, number>();
  /** Slots whose DONE result this thread computed (#helpOne). */
  readonly #ranHere = new Uint8Array(SLOTS);
  readonly #memories = new Map<WebAssembly.Memory, { id: number; refs: number }>();
  /** The same memories, by id, for jobs this thread runs itself. */
  readonly #local = new Map<number, MemoryChecksummer>();
  #nextId = 1;
  failure: VfioError | undefined;
  readonly stats = { submitted: 0, fromWorker: 0, inline: 0, waits: 0, helped: 0, failed: 0 };

  constructor() {
    const shared = new SharedArrayBuffer(SHARED_BYTES);
    this.#views = sharedViews(shared);
    for (let s = SLOTS - 1; s >= 0; s--) this.#free.push(s);
    this.#worker = new Worker(new URL('./checksum-worker-thread.js', import.meta.url), {
      workerData: { shared },
      // plain JavaScript over node: builtins: none of the parent's options (--input-type, loaders)
      execArgv: [],
    });
    this.#worker.unref();
    this.#worker.on('error', (err) => this.fail(workerError(`checksum worker failed: ${err.message}`, err)));
    this.#worker.on('exit', (code) => this.fail(workerError(`checksum worker exited (code ${code})`)));
  }

  /** Stop using the worker (jobs in flight complete inline); keeps the first reason. */
  fail(error: VfioError): void {
    this.failure ??= error;
  }

  terminate(): Promise<number> {
    this.fail(workerError('checksum worker shut down'));
    return this.#worker.terminate();
  }

  get memoryCount(): number {
    return this.#memories.size;
  }

  acquire(memory: WebAssembly.Memory): number {
    let entry = this.#memories.get(memory);
    if (!entry) {
      entry = { id: this.#nextId++, refs: 0 };
      this.#memories.set(memory, entry);
      this.#local.set(entry.id, new MemoryChecksummer(memory));
      this.#post({ type: 'register', id: entry.id, memory });
    }
    entry.refs++;
    return entry.id;
  }

  release(memory: WebAssembly.Memory): void {
    const entry = this.#memories.get(memory);
    if (!entry || --entry.refs > 0) return;
    this.#memories.delete(memory);
    this.#local.delete(entry.id);
    this.#post({ type: 'drop', id: entry.id, bytes: memory.buffer.byteLength });
  }

  /** Queue a job; the slot, or -1 when the worker is unusable or the queue is full. */
  submit(id: number, at: number, length: number, seed: number): number {
    if (this.failure) return -1;
    const { control, queue, states, params } = this.#views;
    const tail = Atomics.load(control, TAIL);
    if (((tail - Atomics.load(control, HEAD)) | 0) >= QUEUE_LENGTH) return -1;
    const slot = this.#allocate();
    if (slot < 0) return -1;
    const p = slot * PARAM_WORDS;
    Atomics.store(params, p, id);
    Atomics.store(params, p + 1, at);
    Atomics.store(params, p + 2, length);
    Atomics.store(params, p + 3, seed | 0);
    Atomics.store(states, slot, QUEUED);
    Atomics.store(queue, tail & (QUEUE_LENGTH - 1), slot);
    Atomics.store(control, TAIL, (tail + 1) | 0);
    if (Atomics.load(control, IDLE) === 1 && Atomics.compareExchange(control, IDLE, 1, 0) === 1) {
      this.#post({ type: 'kick' });
    }
    this.stats.submitted++;
    return slot;
  }

  /** The worker finished the job (a result() would not wait or compute). */
  finished(slot: number): boolean {
    const s = Atomics.load(this.#views.states, slot);
    return s === DONE || s === FAILED;
  }

  /** The job's checksum: the worker's, waited for while it runs it, else `inline()`. Frees the slot. */
  result(slot: number, inline: () => bigint): bigint {
    const { states, results } = this.#views;
    if (Atomics.compareExchange(states, slot, QUEUED, FREE) === QUEUED) {
      this.#free.push(slot);
      this.stats.inline++;
      return inline();
    }
    let s = Atomics.load(states, slot);
    if (s === RUNNING) {
      this.stats.waits++;
      const length = Atomics.load(this.#views.params, slot * PARAM_WORDS + 2);
      const deadline = performance.now() + GRACE_MS + length / GRACE_BYTES_PER_MS;
      while ((s = Atomics.load(states, slot)) === RUNNING) {
        if (this.#helpOne()) continue;
        const left = deadline - performance.now();
        if (this.failure || left <= 0) {
          // the worker is slow (descheduled) or gone: compute here, leave the slot to the worker
          this.#orphans.set(slot, performance.now());
          this.stats.inline++;
          return inline();
        }
        Atomics.wait(states, slot, RUNNING, left);
      }
    }
    const value = Atomics.load(results, slot);
    const ranHere = this.#ranHere[slot] === 1;
    this.#ranHere[slot] = 0;
    Atomics.store(states, slot, FREE);
    this.#free.push(slot);
    if (s === DONE) {
      if (!ranHere) this.stats.fromWorker++;
      return value;
    }
    this.stats.failed++;
    this.stats.inline++;
    return inline();
  }

  /** Run the newest queued job on this thread, as the worker would; false when there is none. */
  #helpOne(): boolean {
    const { control, queue, states, params, results } = this.#views;
    const head = Atomics.load(control, HEAD);
    for (let at = Atomics.load(control, TAIL); at !== head;) {
      at = (at - 1) | 0;
      const slot = Atomics.load(queue, at & (QUEUE_LENGTH - 1));
      if (Atomics.load(states, slot) !== QUEUED) continue;
      const p = slot * PARAM_WORDS;
      const summer = this.#local.get(Atomics.load(params, p));
      if (!summer || Atomics.compareExchange(states, slot, QUEUED, RUNNING) !== QUEUED) continue;
      let state = FAILED;
      try {
        const seed = Atomics.load(params, p + 3) >>> 0;
        const value = summer.checksum(Atomics.load(params, p + 1), Atomics.load(params, p + 2), seed);
        Atomics.store(results, slot, value);
        state = DONE;
        this.#ranHere[slot] = 1;
      } catch {
        // FAILED: its owner computes it
      }
      Atomics.store(states, slot, state);
      this.stats.helped++;
      return true;
    }
    return false;
  }

  /** Forget the job: taken back if not started, else its slot is freed once the worker is done. */
  cancel(slot: number): void {
    const { states } = this.#views;
    if (Atomics.compareExchange(states, slot, QUEUED, FREE) === QUEUED) {
      this.#free.push(slot);
      return;
    }
    if (Atomics.load(states, slot) === RUNNING) {
      this.#orphans.set(slot, performance.now());
      return;
    }
    this.#ranHere[slot] = 0;
    Atomics.store(states, slot, FREE);
    this.#free.push(slot);
  }

  #allocate(): number {
    if (this.#free.length === 0) {
      const now = performance.now();
      for (const [slot, since] of this.#orphans) {
        if (this.finished(slot)) {
          this.#orphans.delete(slot);
          this.#ranHere[slot] = 0;
          Atomics.store(this.#views.states, slot, FREE);
          this.#free.push(slot);
        } else if (now - since > STUCK_MS) {
          this.fail(workerError(`checksum worker did not finish a job in ${STUCK_MS} ms`));
        }
      }
    }
    return this.#free.pop() ?? -1;
  }

  #post(message: ToWorker): void {
    try {
      this.#worker.postMessage(message);
    } catch (err) {
      this.fail(workerError(`checksum worker unreachable: ${(err as Error).message}`, err));
    }
  }
}

let engine: Engine | undefined;
let lastFailure: VfioError | undefined;

/** The worker's engine, started on first use; a failed one stays (it refuses new jobs). */
function currentEngine(): Engine | undefined {
  if (engine || lastFailure) return engine;
  try {
    engine = new Engine();
  } catch (err) {
    lastFailure = workerError(`checksum worker could not start: ${(err as Error).message}`, err);
  }
  return engine;
}

/**
 * Stop the checksum worker (tests, CLI shutdown). Results still pending complete inline; the next
 * submit() starts a new worker. The process never needs this to exit: the worker is unref'd.
 */
export async function shutdownChecksumWorker(): Promise<void> {
  const e = engine;
  engine = undefined;
  lastFailure = undefined;
  await e?.terminate();
}

export function checksumWorkerStats(): ChecksumWorkerStats {
  const e = engine;
  return {
    running: e !== undefined && e.failure === undefined,
    failure: e?.failure ?? lastFailure,
    submitted: e?.stats.submitted ?? 0,
    fromWorker: e?.stats.fromWorker ?? 0,
    inline: e?.stats.inline ?? 0,
    waits: e?.stats.waits ?? 0,
    helped: e?.stats.helped ?? 0,
    failed: e?.stats.failed ?? 0,
    memories: e?.memoryCount ?? 0,
  };
}

/** A checksum job; its value() is always the exact checksum of the range (see the top of the file). */
export class PendingChecksum {
  readonly #engine: Engine;
  readonly #slot: number;
  readonly #inline: () => bigint;
  readonly #owner: Set<PendingChecksum>;
  #value: bigint | undefined;
  #cancelled = false;

  /** @internal */
  constructor(engine: Engine, slot: number, inline: () => bigint, owner: Set<PendingChecksum>) {
    this.#engine = engine;
    this.#slot = slot;
    this.#inline = inline;
    this.#owner = owner;
  }

  /** The value is there: value() will neither wait nor compute. */
  get ready(): boolean {
    return this.#value !== undefined || (!this.#cancelled && this.#engine.finished(this.#slot));
  }

  /** The checksum (waits for the worker only while it is computing this very job). */
  value(): bigint {
    if (this.#value === undefined) {
      if (this.#cancelled) throw workerError('value of a cancelled checksum job');
      this.#value = this.#engine.result(this.#slot, this.#inline);
      this.#owner.delete(this);
    }
    return this.#value;
  }

  /** Not needed any more: frees its slot (now, or when the worker is done with it). */
  cancel(): void {
    if (this.#value !== undefined || this.#cancelled) return;
    this.#cancelled = true;
    this.#engine.cancel(this.#slot);
    this.#owner.delete(this);
  }
}

interface ClientState {
  engine: Engine | undefined;
  /** Registered memories and their worker ids. */
  memories: Map<WebAssembly.Memory, number>;
  jobs: Set<PendingChecksum>;
}

function closeState(state: ClientState): void {
  for (const job of [...state.jobs]) job.cancel();
  for (const memory of state.memories.keys()) state.engine?.release(memory);
  state.memories.clear();
  state.engine = undefined;
}

/** Clients dropped without close(): their memories are released when they are collected. */
const unclosed = new FinalizationRegistry<ClientState>(closeState);

/**
 * One user's jobs (a device-state saver or loader): registers the memories it submits jobs for
 * with the worker, and on close() cancels its jobs and releases those memories. Cheap until the
 * first submit(): no worker is started for ranges below CHECKSUM_OFFLOAD_MIN_BYTES.
 */
export class ChecksumClient {
  readonly #state: ClientState = { engine: undefined, memories: new Map(), jobs: new Set() };
  #registered = false;

  /**
   * Queue the checksum of `[offset, offset+length)` of `memory` (PhysMemory.checksum with
   * `seed`); undefined when it is not worth it or not possible now (small or cross-segment range,
   * worker unusable or full): the caller then computes inline.
   */
  submit(memory: PhysMemory, offset: number, length: number, seed = 0): PendingChecksum | undefined {
    if (length < CHECKSUM_OFFLOAD_MIN_BYTES) return undefined;
    const place = memory.segmentOf(offset, length);
    if (!place) return undefined;
    const state = this.#state;
    const e = currentEngine();
    if (!e || e.failure) return undefined;
    if (state.engine !== e) {
      // first job, or the worker was shut down: register anew with this one (jobs of the old one
      // complete inline)
      for (const m of state.memories.keys()) state.engine?.release(m);
      state.memories.clear();
      state.engine = e;
    }
    if (!this.#registered) {
      unclosed.register(this, state, state);
      this.#registered = true;
    }
    let id = state.memories.get(place.memory);
    if (id === undefined) {
      id = e.acquire(place.memory);
      state.memories.set(place.memory, id);
    }
    const slot = e.submit(id, place.at, length, seed >>> 0);
    if (slot < 0) return undefined;
    const job = new PendingChecksum(e, slot, () => memory.checksum(offset, length, seed), state.jobs);
    state.jobs.add(job);
    return job;
  }

  /** Jobs not taken yet. */
  get pending(): number {
    return this.#state.jobs.size;
  }

  /** Cancel every job not taken yet and release the memories (the client stays usable). */
  close(): void {
    closeState(this.#state);
    if (this.#registered) {
      unclosed.unregister(this.#state);
      this.#registered = false;
    }
  }
}
