/*
 * The vCPU control block: one SharedArrayBuffer shared by the host thread and every vCPU worker
 * of a VcpuSet. Little-endian, byte offsets:
 *
 *   header (64 bytes)
 *     0    i32  COMMAND    what the host asks: 0 RUN, 1 PAUSE, 2 QUIT. Host stores, then
 *                          Atomics.notify; vCPUs sleep on this word (throttle, rate limit, pause),
 *                          so a command wakes them at once.
 *     4    i32  THROTTLE   throttle percentage 0..99 (auto-converge), read after each time slice;
 *                          the host notifies COMMAND after changing it
 *     8..63               reserved, zero
 *   vCPU i, at 64 + 64 i (one cache line each; written by vCPU i only)
 *     +0   i32  STATE      0 STARTING, 1 RUNNING, 2 PAUSED, 3 EXITED. vCPU stores, then notifies;
 *                          PAUSED is stored after the vCPU's last write to guest RAM
 *     +4   i32  reserved
 *     +8   i64  BYTES_WRITTEN   guest RAM bytes written
 *     +16  i64  PAGE_WRITES     page writes (each dirtied one page)
 *     +24  i64  PAGES_SKIPPED   writes skipped because the page was unplugged
 *     +32  i64  THROTTLED_US    microseconds slept by the throttle
 *     +40  i64  RUN_US          microseconds spent in time slices (running or rate-limited)
 *     +48..63   reserved
 *
 * Counters are totals since start, stored by the vCPU at least every millisecond while it runs,
 * at the end of each time slice, and before it acknowledges a pause or exits (then exact).
 */

export const VcpuCommand = { RUN: 0, PAUSE: 1, QUIT: 2 } as const;
export type VcpuCommand = (typeof VcpuCommand)[keyof typeof VcpuCommand];

export const VcpuState = { STARTING: 0, RUNNING: 1, PAUSED: 2, EXITED: 3 } as const;
export type VcpuState = (typeof VcpuState)[keyof typeof VcpuState];
export const VCPU_STATE_NAMES = ['starting', 'running', 'paused', 'exited'] as const;

export const VcpuCounter = {
  BYTES_WRITTEN: 0,
  PAGE_WRITES: 1,
  PAGES_SKIPPED: 2,
  THROTTLED_US: 3,
  RUN_US: 4,
} as const;
export type VcpuCounter = (typeof VcpuCounter)[keyof typeof VcpuCounter];

const HEADER_BYTES = 64;
const SLOT_BYTES = 64;
const COMMAND = 0;
const THROTTLE = 1;
const COUNTERS_AT = 8;

/** Most vCPUs one set can have. */
export const MAX_VCPUS = 64;
/** Pages a vCPU writes between looks at COMMAND (and counter stores). */
export const BATCH_PAGES = 16;
/** The vCPU time slice: the throttle sleeps `slice × pct / (100 − pct)` after each (QEMU's 10 ms). */
export const TIME_SLICE_MS = 10;

export function controlBlockBytes(vcpus: number): number {
  return HEADER_BYTES + vcpus * SLOT_BYTES;
}

/** Typed access to a control block, from either side. */
export class VcpuControl {
  readonly buffer: SharedArrayBuffer;
  /** All words as i32 (COMMAND and STATE words are waited on through this view). */
  readonly words: Int32Array;
  readonly #wide: BigInt64Array;

  constructor(buffer: SharedArrayBuffer) {
    this.buffer = buffer;
    this.words = new Int32Array(buffer);
    this.#wide = new BigInt64Array(buffer);
  }

  static create(vcpus: number, command: VcpuCommand): VcpuControl {
    const control = new VcpuControl(new SharedArrayBuffer(controlBlockBytes(vcpus)));
    Atomics.store(control.words, COMMAND, command);
    return control;
  }

  /** i32 index of the COMMAND word. */
  static readonly COMMAND_INDEX = COMMAND;

  get command(): VcpuCommand {
    return Atomics.load(this.words, COMMAND) as VcpuCommand;
  }

  /** Set the command and wake every vCPU. */
  setCommand(command: VcpuCommand): void {
    Atomics.store(this.words, COMMAND, command);
    Atomics.notify(this.words, COMMAND);
  }

  get throttlePercent(): number {
    return Atomics.load(this.words, THROTTLE);
  }

  setThrottle(percent: number): void {
    Atomics.store(this.words, THROTTLE, percent);
    Atomics.notify(this.words, COMMAND);
  }

  /** i32 index of vCPU `vcpu`'s STATE word. */
  stateIndex(vcpu: number): number {
    return (HEADER_BYTES + vcpu * SLOT_BYTES) / 4;
  }

  state(vcpu: number): VcpuState {
    return Atomics.load(this.words, this.stateIndex(vcpu)) as VcpuState;
  }

  /** Store a vCPU's state and wake whoever waits for it. */
  setState(vcpu: number, state: VcpuState): void {
    const i = this.stateIndex(vcpu);
    Atomics.store(this.words, i, state);
    Atomics.notify(this.words, i);
  }

  counter(vcpu: number, counter: VcpuCounter): number {
    return Number(Atomics.load(this.#wide, this.#counterIndex(vcpu, counter)));
  }

  setCounter(vcpu: number, counter: VcpuCounter, value: number): void {
    Atomics.store(this.#wide, this.#counterIndex(vcpu, counter), BigInt(Math.trunc(value)));
  }

  #counterIndex(vcpu: number, counter: VcpuCounter): number {
    return (HEADER_BYTES + vcpu * SLOT_BYTES + COUNTERS_AT) / 8 + counter;
  }
}
