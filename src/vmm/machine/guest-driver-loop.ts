import { invalidArgument } from '../../uapi/error.js';

/** One thing the guest drives each tick: a device given work, an emulated device's ring written. */
export interface GuestDriverTarget {
  readonly name: string;
  tick(): void;
}

export interface GuestDriverLoopOptions {
  /** Time between ticks; default 10 ms. */
  intervalMs?: number;
  /** A tick threw: the loop has stopped; the VM decides what to do. */
  onError: (target: string, err: unknown) => void;
}

/**
 * The guest's drivers keeping the VM's devices busy while the VM runs: a timer on the VMM's event
 * loop that, every `intervalMs`, ticks each target in order (device.work(units), a mediated
 * device's next record). Started with the vCPUs, stopped with them; a target that throws stops
 * the loop and is reported. The timer does not keep the process alive on its own.
 */
export class GuestDriverLoop {
  readonly intervalMs: number;
  readonly #targets: readonly GuestDriverTarget[];
  readonly #onError: GuestDriverLoopOptions['onError'];
  #timer: NodeJS.Timeout | undefined;
  #ticks = 0;

  constructor(targets: readonly GuestDriverTarget[], options: GuestDriverLoopOptions) {
    const intervalMs = options.intervalMs ?? 10;
    if (!(Number.isFinite(intervalMs) && intervalMs >= 1)) {
      throw invalidArgument(`guest driver interval ${intervalMs} ms is not at least 1 ms`);
    }
    this.intervalMs = intervalMs;
    this.#targets = targets;
    this.#onError = options.onError;
  }

  get running(): boolean {
    return this.#timer !== undefined;
  }

  /** Ticks run since the loop was made. */
  get ticks(): number {
    return this.#ticks;
  }

  start(): void {
    if (this.#timer !== undefined) return;
    this.#timer = setInterval(() => this.tickOnce(), this.intervalMs);
    this.#timer.unref();
  }

  stop(): void {
    if (this.#timer === undefined) return;
    clearInterval(this.#timer);
    this.#timer = undefined;
  }

  /** One tick of every target now (what the timer does); a throw stops the loop and is reported. */
  tickOnce(): void {
    this.#ticks++;
    for (const target of this.#targets) {
      try {
        target.tick();
      } catch (err) {
        this.stop();
        this.#onError(target.name, err);
        return;
      }
    }
  }
}
