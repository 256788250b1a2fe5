import { Worker } from 'node:worker_threads';
import { internalError, invalidArgument } from '../../uapi/error.js';
import { GUEST_PAGE_BYTES } from './guest-page.js';
import type { GuestRam } from './guest-ram.js';
import {
  MAX_VCPUS,
  VCPU_STATE_NAMES,
  VcpuCommand,
  VcpuControl,
  VcpuCounter,
  VcpuState,
} from './vcpu-control.js';
import type { VcpuWorkerBlock, VcpuWorkerData } from './vcpu-worker-data.js';
import { type ResolvedWorkload, type VcpuWorkload, resolveWorkload } from './vcpu-workload.js';

export interface VcpuSetOptions {
  /** vCPUs (worker threads), 1..MAX_VCPUS. */
  count: number;
  /** One workload for every vCPU, or one per vCPU. Default: random writes over all RAM, no rate limit. */
  workload?: VcpuWorkload | readonly VcpuWorkload[];
  /** Start with the VM stopped (vCPUs created, not writing). */
  startPaused?: boolean;
  /** Initial throttle percentage, 0..99. */
  throttlePercent?: number;
  /** How long vCPUs may take to acknowledge start, pause, resume and quit; default 10 s. */
  ackTimeoutMs?: number;
}

/** What one vCPU did since it started (counters may lag by ≤ 1 ms while it runs; exact when paused). */
export interface VcpuStats {
  vcpu: number;
  state: (typeof VCPU_STATE_NAMES)[number];
  bytesWritten: number;
  pageWrites: number;
  /** Writes skipped because the page was unplugged. */
  pagesSkipped: number;
  /** Time slept by the throttle. */
  throttledMs: number;
  /** Time spent in time slices (writing or waiting for the rate limit). */
  runMs: number;
}

export type VcpuTotals = Omit<VcpuStats, 'vcpu' | 'state'>;

type WaitAsyncResult =
  { async: false; value: 'not-equal' | 'timed-out' } | { async: true; value: Promise<'ok' | 'timed-out'> };
type WaitAsync = (array: Int32Array, index: number, value: number, timeoutMs: number) => WaitAsyncResult;
const waitAsync = (Atomics as unknown as { waitAsync?: WaitAsync }).waitAsync;

const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

/** Wait (without blocking the event loop) until `array[index]` may have moved from `value`. */
async function waitChange(array: Int32Array, index: number, value: number, timeoutMs: number): Promise<void> {
  if (waitAsync === undefined) return sleep(Math.min(timeoutMs, 1));
  const result = waitAsync(array, index, value, timeoutMs);
  if (result.async) await result.value;
}

function checkThrottle(percent: number): void {
  if (!Number.isInteger(percent) || percent < 0 || percent > 99) {
    throw invalidArgument(`throttle ${percent} % is not an integer from 0 to 99`);
  }
}

/**
 * The vCPUs of one VM: worker threads that run a workload writing guest RAM (the blocks' shared
 * buffers) and marking the dirty logs, steered through a shared control block (vcpu-control.ts).
 *
 * - `pause()` is the VM stop: it resolves once every vCPU has acknowledged, after its last write,
 *   so guest RAM does not change until `resume()`.
 * - `setThrottle(pct)` is auto-converge's CPU throttle: after each 10 ms slice a vCPU sleeps
 *   `10 ms × pct / (100 − pct)`.
 * - `terminate()` ends the threads. vCPU threads do not keep the process alive on their own.
 *
 * Start vCPUs after adding every RAM block: the set sees the blocks that exist when it starts.
 */
export class VcpuSet {
  readonly count: number;
  readonly #ram: GuestRam;
  readonly #control: VcpuControl;
  readonly #workers: Worker[] = [];
  readonly #exits: Promise<void>[] = [];
  readonly #exited: boolean[];
  readonly #fenceSlots: number[] = [];
  readonly #ackTimeoutMs: number;
  #failure: unknown;
  #quitting = false;
  #terminated = false;
  #serial: Promise<unknown> = Promise.resolve();

  private constructor(ram: GuestRam, count: number, command: VcpuCommand, ackTimeoutMs: number) {
    this.#ram = ram;
    this.count = count;
    this.#control = VcpuControl.create(count, command);
    this.#exited = new Array<boolean>(count).fill(false);
    this.#ackTimeoutMs = ackTimeoutMs;
  }

  /** Start `count` vCPUs on `ram`; resolves when every one runs (or is paused, with startPaused). */
  static async start(ram: GuestRam, options: VcpuSetOptions): Promise<VcpuSet> {
    const { count, startPaused = false, throttlePercent = 0, ackTimeoutMs = 10_000 } = options;
    if (!Number.isInteger(count) || count < 1 || count > MAX_VCPUS) {
      throw invalidArgument(`vCPU count ${count} is not from 1 to ${MAX_VCPUS}`);
    }
    checkThrottle(throttlePercent);
    if (!(ackTimeoutMs > 0)) throw invalidArgument(`acknowledge timeout ${ackTimeoutMs} ms`);
    if (ram.blocks.length === 0) throw invalidArgument('guest RAM has no RAM block');
    const given = options.workload ?? {};
    const list: readonly VcpuWorkload[] = Array.isArray(given) ? given : new Array(count).fill(given);
    if (list.length !== count) throw invalidArgument(`${list.length} workloads for ${count} vCPUs`);
    const workloads = list.map((w) => resolveWorkload(w, ram.totalBytes));

    const set = new VcpuSet(ram, count, startPaused ? VcpuCommand.PAUSE : VcpuCommand.RUN, ackTimeoutMs);
    set.#control.setThrottle(throttlePercent);
    try {
      for (let i = 0; i < count; i++) set.#spawn(i, workloads[i]!);
      await set.#waitFor(startPaused ? VcpuState.PAUSED : VcpuState.RUNNING, 'start');
    } catch (err) {
      await set.terminate();
      throw err;
    }
    return set;
  }

  /** The VM's run state as the host last asked it. */
  get runState(): 'running' | 'paused' | 'terminated' {
    if (this.#terminated || this.#quitting) return 'terminated';
    return this.#control.command === VcpuCommand.PAUSE ? 'paused' : 'running';
  }

  get throttlePercent(): number {
    return this.#control.throttlePercent;
  }

  /** Throttle the vCPUs to `100 − percent` % of their time (0 = unthrottled, at most 99). */
  setThrottle(percent: number): void {
    checkThrottle(percent);
    this.#checkLive();
    this.#control.setThrottle(percent);
  }

  /** Stop the vCPUs; resolves when none writes guest RAM any more. */
  pause(): Promise<void> {
    return this.#serialized(async () => {
      this.#checkLive();
      this.#control.setCommand(VcpuCommand.PAUSE);
      await this.#waitFor(VcpuState.PAUSED, 'pause');
    });
  }

  /** Let the vCPUs run again; resolves when every one runs. */
  resume(): Promise<void> {
    return this.#serialized(async () => {
      this.#checkLive();
      this.#control.setCommand(VcpuCommand.RUN);
      await this.#waitFor(VcpuState.RUNNING, 'resume');
    });
  }

  stats(): VcpuStats[] {
    const c = this.#control;
    return Array.from({ length: this.count }, (_, vcpu) => ({
      vcpu,
      state: VCPU_STATE_NAMES[c.state(vcpu)],
      bytesWritten: c.counter(vcpu, VcpuCounter.BYTES_WRITTEN),
      pageWrites: c.counter(vcpu, VcpuCounter.PAGE_WRITES),
      pagesSkipped: c.counter(vcpu, VcpuCounter.PAGES_SKIPPED),
      throttledMs: c.counter(vcpu, VcpuCounter.THROTTLED_US) / 1000,
      runMs: c.counter(vcpu, VcpuCounter.RUN_US) / 1000,
    }));
  }

  /** Sums of every vCPU's counters. */
  totals(): VcpuTotals {
    const sum: VcpuTotals = { bytesWritten: 0, pageWrites: 0, pagesSkipped: 0, throttledMs: 0, runMs: 0 };
    for (const s of this.stats()) {
      sum.bytesWritten += s.bytesWritten;
      sum.pageWrites += s.pageWrites;
      sum.pagesSkipped += s.pagesSkipped;
      sum.throttledMs += s.throttledMs;
      sum.runMs += s.runMs;
    }
    return sum;
  }

  /** End every vCPU thread (asked to quit; forced after the acknowledge timeout). Idempotent. */
  async terminate(): Promise<void> {
    if (this.#terminated) return;
    this.#quitting = true;
    this.#control.setCommand(VcpuCommand.QUIT);
    let timer: NodeJS.Timeout | undefined;
    const timedOut = new Promise<'timeout'>((resolve) => {
      timer = setTimeout(() => resolve('timeout'), this.#ackTimeoutMs);
    });
    const outcome = await Promise.race([Promise.all(this.#exits), timedOut]);
    clearTimeout(timer);
    if (outcome === 'timeout') await Promise.all(this.#workers.map((w) => w.terminate()));
    for (const slot of this.#fenceSlots) this.#ram.fence.release(slot);
    this.#fenceSlots.length = 0;
    this.#terminated = true;
  }

  #spawn(vcpu: number, workload: ResolvedWorkload): void {
    const fenceSlot = this.#ram.fence.claim();
    this.#fenceSlots.push(fenceSlot);
    const blocks: VcpuWorkerBlock[] = this.#ram.blocks.map((b) => ({
      name: b.name,
      pages: b.pages,
      segments: b.memory.buffers,
      dirtyLog: b.dirtyLog.buffer,
      ...(b.discard === undefined
        ? {}
        : { plug: { states: b.discard.states, pagesPerBlock: b.discard.blockSizeBytes / GUEST_PAGE_BYTES } }),
    }));
    const workerData: VcpuWorkerData = {
      vcpu,
      vcpus: this.count,
      control: this.#control.buffer,
      fence: this.#ram.fence.buffer,
      fenceSlot,
      blocks,
      workload,
    };
    const worker = new Worker(new URL('./vcpu-worker.js', import.meta.url), {
      workerData,
      name: `vcpu${vcpu}`,
    });
    worker.unref();
    worker.on('error', (err) => {
      this.#failure ??= internalError(`vCPU ${vcpu} failed: ${err.message}`, err);
    });
    this.#exits.push(
      new Promise<void>((resolve) => {
        worker.once('exit', (code) => {
          this.#exited[vcpu] = true;
          if (!this.#quitting) this.#failure ??= internalError(`vCPU ${vcpu} exited with code ${code}`);
          resolve();
        });
      }),
    );
    this.#workers.push(worker);
  }

  #checkLive(): void {
    if (this.#terminated || this.#quitting) throw invalidArgument('the vCPUs are terminated');
    if (this.#failure !== undefined) throw this.#failure;
  }

  #serialized<T>(op: () => Promise<T>): Promise<T> {
    const run = this.#serial.then(op, op);
    this.#serial = run.catch(() => undefined);
    return run;
  }

  /** Wait until every vCPU reports `state`; rejects if one fails, exits or takes too long. */
  async #waitFor(state: VcpuState, what: string): Promise<void> {
    const deadline = performance.now() + this.#ackTimeoutMs;
    const keepAlive = setInterval(() => {}, 1000); // the workers are unref'd: keep the loop up meanwhile
    try {
      for (let vcpu = 0; vcpu < this.count; vcpu++) {
        const index = this.#control.stateIndex(vcpu);
        for (;;) {
          const seen = this.#control.state(vcpu);
          if (seen === state) break;
          if (this.#failure !== undefined) throw this.#failure;
          if (this.#exited[vcpu]) throw internalError(`vCPU ${vcpu} exited before it could ${what}`);
          const left = deadline - performance.now();
          if (left <= 0) {
            throw internalError(`vCPU ${vcpu} did not ${what} within ${this.#ackTimeoutMs} ms`);
          }
          await waitChange(this.#control.words, index, seen, Math.min(left, 20));
        }
      }
    } finally {
      clearInterval(keepAlive);
    }
  }
}
