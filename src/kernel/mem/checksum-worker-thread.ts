/**
 * The checksum worker thread (started by checksum-worker.ts): runs queued checksum jobs over wasm
 * memories it shares with the main thread, with the same SIMD module (simd-checksum.ts). The job
 * queue and the results live in one SharedArrayBuffer (layout in checksum-protocol.ts); the port
 * only carries memory registrations and wake-ups.
 */
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { parentPort, receiveMessageOnPort, workerData } from 'node:worker_threads';
import {
  DONE,
  FAILED,
  HEAD,
  IDLE,
  PARAM_WORDS,
  QUEUE_LENGTH,
  QUEUED,
  RUNNING,
  sharedViews,
  TAIL,
  type ToWorker,
} from './checksum-protocol.js';
import { MemoryChecksummer } from './simd-checksum.js';

/** Dropped memory after which the worker collects its garbage (see drop). */
const COLLECT_AFTER_BYTES = 256 << 20;

const port = parentPort!;
const { control, queue, states, params, results } = sharedViews(
  (workerData as { shared: SharedArrayBuffer }).shared,
);
const memories = new Map<number, MemoryChecksummer>();
let droppedBytes = 0;
let draining = false;
let collect: (() => void) | undefined | null;

function handle(message: ToWorker): void {
  switch (message.type) {
    case 'register':
      memories.set(message.id, new MemoryChecksummer(message.memory));
      return;
    case 'drop':
      memories.delete(message.id);
      droppedBytes += message.bytes;
      if (droppedBytes >= COLLECT_AFTER_BYTES) {
        // This thread allocates next to nothing, so V8 would not collect here for a long time, and
        // a shared memory lives until every thread has collected its handles: a dropped 1 GiB
        // device memory would stay resident. Collect now.
        droppedBytes = 0;
        collector()?.();
      }
      return;
    case 'kick':
      drain();
      return;
  }
}

/** gc(), without --expose-gc on the command line: the flag is set for a moment (as jest does). */
function collector(): (() => void) | undefined {
  if (collect !== undefined) return collect ?? undefined;
  collect = null;
  const exposed = (globalThis as { gc?: () => void }).gc;
  if (typeof exposed === 'function') collect = exposed;
  else {
    try {
      setFlagsFromString('--expose-gc');
      const gc = runInNewContext('gc') as unknown;
      if (typeof gc === 'function') collect = gc as () => void;
    } catch {
      // no collection then: dropped memories go when V8 gets to them
    } finally {
      setFlagsFromString('--no-expose-gc');
    }
  }
  return collect ?? undefined;
}

function run(slot: number): void {
  if (Atomics.compareExchange(states, slot, QUEUED, RUNNING) !== QUEUED) return; // taken back
  const p = slot * PARAM_WORDS;
  const id = Atomics.load(params, p);
  const offset = Atomics.load(params, p + 1);
  const length = Atomics.load(params, p + 2);
  const seed = Atomics.load(params, p + 3) >>> 0;
  let summer = memories.get(id);
  // A registration is posted before any job that uses it: it is on the port already.
  for (let m = summer ? undefined : receiveMessageOnPort(port); m; m = receiveMessageOnPort(port)) {
    handle(m.message as ToWorker);
    summer = memories.get(id);
    if (summer) break;
  }
  let state = FAILED;
  try {
    if (summer) {
      Atomics.store(results, slot, summer.checksum(offset, length, seed));
      state = DONE;
    }
  } catch {
    // FAILED: the main thread computes it itself
  }
  Atomics.store(states, slot, state);
  Atomics.notify(states, slot);
}

/** Run queued jobs until the queue is empty, then sleep in the event loop (IDLE) until kicked. */
function drain(): void {
  if (draining) return; // a kick pumped while running a job
  draining = true;
  try {
    for (;;) {
      let head = Atomics.load(control, HEAD);
      while (head !== Atomics.load(control, TAIL)) {
        const slot = Atomics.load(queue, head & (QUEUE_LENGTH - 1));
        head = (head + 1) | 0;
        Atomics.store(control, HEAD, head);
        run(slot);
      }
      Atomics.store(control, IDLE, 1);
      if (Atomics.load(control, TAIL) === head) return;
      Atomics.store(control, IDLE, 0); // queued meanwhile: go on (a kick may come too, harmlessly)
    }
  } finally {
    draining = false;
  }
}

port.on('message', handle);
drain(); // jobs queued while this thread was starting
