/**
 * What the checksum worker (checksum-worker-thread.ts) and its users on the main thread
 * (checksum-worker.ts) share: one SharedArrayBuffer laid out as below, and the messages of the
 * worker port.
 *
 *   control  Int32Array[CONTROL_WORDS]   TAIL (jobs queued, main) · HEAD (jobs taken, worker) · IDLE
 *   queue    Int32Array[QUEUE_LENGTH]    slot numbers, in submission order (ring, index = n % length)
 *   states   Int32Array[SLOTS]           one job slot each: FREE → QUEUED → RUNNING → DONE | FAILED
 *   params   Int32Array[SLOTS * 4]       memory id, offset in the memory, length, seed (u32 bits)
 *   results  BigUint64Array[SLOTS]       the checksum of a DONE slot
 *
 * The main thread owns FREE slots: it writes the parameters, then publishes QUEUED, then the queue
 * entry, then TAIL. The worker claims a QUEUED slot with a compare-exchange to RUNNING, computes,
 * stores the result and then DONE (or FAILED), and wakes waiters (Atomics.notify on the state).
 * The main thread may take back a QUEUED slot with a compare-exchange to FREE (it then computes
 * the checksum itself, or no longer needs it); the worker's compare-exchange fails and it skips
 * the slot. A queue entry may thus name a slot that has been reused since: the worker only ever
 * runs what the slot holds while it is QUEUED, which is always the current job.
 *
 * IDLE is 1 while the worker waits in its event loop with an empty queue; the main thread that
 * queues a job and finds IDLE set clears it and posts a 'kick' message. The worker sets IDLE, then
 * looks at TAIL once more before it returns to its event loop, so no job is ever left unseen.
 */

export const SLOTS = 128;
export const QUEUE_LENGTH = 256;
export const CONTROL_WORDS = 4;
export const PARAM_WORDS = 4;

export const TAIL = 0;
export const HEAD = 1;
export const IDLE = 2;

export const FREE = 0;
export const QUEUED = 1;
export const RUNNING = 2;
export const DONE = 3;
export const FAILED = 4;

const CONTROL_AT = 0;
const QUEUE_AT = CONTROL_AT + CONTROL_WORDS * 4;
const STATES_AT = QUEUE_AT + QUEUE_LENGTH * 4;
const PARAMS_AT = STATES_AT + SLOTS * 4;
const RESULTS_AT = PARAMS_AT + SLOTS * PARAM_WORDS * 4; // a multiple of 8
export const SHARED_BYTES = RESULTS_AT + SLOTS * 8;

export interface SharedViews {
  control: Int32Array;
  queue: Int32Array;
  states: Int32Array;
  params: Int32Array;
  results: BigUint64Array;
}

export function sharedViews(buffer: SharedArrayBuffer): SharedViews {
  return {
    control: new Int32Array(buffer, CONTROL_AT, CONTROL_WORDS),
    queue: new Int32Array(buffer, QUEUE_AT, QUEUE_LENGTH),
    states: new Int32Array(buffer, STATES_AT, SLOTS),
    params: new Int32Array(buffer, PARAMS_AT, SLOTS * PARAM_WORDS),
    results: new BigUint64Array(buffer, RESULTS_AT, SLOTS),
  };
}

/** Messages to the worker, in order on its port. */
export type ToWorker =
  | { type: 'register'; id: number; memory: WebAssembly.Memory }
  | { type: 'drop'; id: number; bytes: number }
  | { type: 'kick' };
