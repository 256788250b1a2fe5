import { internalError } from '../../uapi/error.js';
import { createPagePicker } from './access-pattern.js';
import { type DirtyLogViews, dirtyLogViews, markDirtyPage } from './dirty-log.js';
import { PAGES_PER_SEGMENT, WORDS_PER_PAGE } from './guest-page.js';
import { Prng } from './prng.js';
import { enterRamAccess, leaveRamAccess } from './ram-access-fence.js';
import {
  BATCH_PAGES,
  TIME_SLICE_MS,
  VcpuCommand,
  VcpuControl,
  VcpuCounter,
  VcpuState,
} from './vcpu-control.js';
import type { VcpuWorkerData } from './vcpu-worker-data.js';

interface Block {
  /** First page in guest RAM pages, and one past the last. */
  first: number;
  end: number;
  segments: Uint32Array[];
  log: DirtyLogViews;
  plug: Int32Array | undefined;
  pagesPerPlugBlock: number;
}

/**
 * The body of a vCPU thread: run time slices of page writes until told to quit. Blocks the thread
 * (Atomics.wait): run it in a worker only. See vcpu-control.ts for the protocol.
 */
export function runVcpu(data: VcpuWorkerData): void {
  const { vcpu, workload } = data;
  const control = new VcpuControl(data.control);
  const words = control.words;
  const COMMAND = VcpuControl.COMMAND_INDEX;
  const fence = new Int32Array(data.fence);
  const slot = data.fenceSlot;

  let first = 0;
  const blocks: Block[] = data.blocks.map((b) => {
    const block: Block = {
      first,
      end: first + b.pages,
      segments: b.segments.map((s) => new Uint32Array(s)),
      log: dirtyLogViews(b.dirtyLog, b.pages),
      plug: b.plug === undefined ? undefined : new Int32Array(b.plug.states),
      pagesPerPlugBlock: b.plug?.pagesPerBlock ?? 1,
    };
    first += b.pages;
    return block;
  });

  const rng = new Prng(workload.seed, vcpu);
  const pick = createPagePicker(workload.pattern, workload.pages, rng, vcpu, data.vcpus);
  const wordsPerWrite = workload.writeBytes / 4;
  const slotsPerPage = WORDS_PER_PAGE / wordsPerWrite;
  const tag = Math.imul(vcpu + 1, 0x85ebca6b) ^ workload.seed;
  const rate = workload.dirtyRateBytesPerMs;
  const limit = workload.pageWriteLimit;

  // Totals, stored into the control block by flush().
  let bytesWritten = 0;
  let pageWrites = 0;
  let attempts = 0;
  let skipped = 0;
  let throttledMs = 0;
  let runMs = 0;
  const flush = () => {
    control.setCounter(vcpu, VcpuCounter.BYTES_WRITTEN, bytesWritten);
    control.setCounter(vcpu, VcpuCounter.PAGE_WRITES, pageWrites);
    control.setCounter(vcpu, VcpuCounter.PAGES_SKIPPED, skipped);
    control.setCounter(vcpu, VcpuCounter.THROTTLED_US, throttledMs * 1000);
    control.setCounter(vcpu, VcpuCounter.RUN_US, runMs * 1000);
  };

  let current = blocks[0]!;
  const blockOf = (page: number): Block => {
    if (page >= current.first && page < current.end) return current;
    for (const b of blocks) if (page >= b.first && page < b.end) return (current = b);
    throw internalError(`vCPU ${vcpu}: page ${page} outside guest RAM`);
  };

  /** Write `n` pages inside the fence: bytes first, dirty bit after. */
  const writeBatch = (n: number) => {
    enterRamAccess(fence, slot);
    for (let k = 0; k < n; k++) {
      attempts++;
      const g = workload.firstPage + pick();
      const b = blockOf(g);
      const p = g - b.first;
      if (b.plug !== undefined && Atomics.load(b.plug, Math.floor(p / b.pagesPerPlugBlock)) === 0) {
        skipped++;
        continue;
      }
      const segment = b.segments[Math.floor(p / PAGES_PER_SEGMENT)]!;
      let at = (p % PAGES_PER_SEGMENT) * WORDS_PER_PAGE;
      if (slotsPerPage > 1) at += rng.below(slotsPerPage) * wordsPerWrite;
      const stamp = (Math.imul(pageWrites + 1, 0x9e3779b1) ^ tag) | 1;
      if (wordsPerWrite === 1) segment[at] = stamp;
      else segment.fill(stamp, at, at + wordsPerWrite);
      markDirtyPage(b.log, p);
      pageWrites++;
      bytesWritten += workload.writeBytes;
    }
    leaveRamAccess(fence, slot);
  };

  // Rate limit: a token bucket that fills only while the vCPU runs, holding at most one slice.
  const creditCap = Math.max(rate * TIME_SLICE_MS, workload.writeBytes * BATCH_PAGES);
  let credit = 0;
  let sleepDebtMs = 0;

  control.setState(
    vcpu,
    Atomics.load(words, COMMAND) === VcpuCommand.PAUSE ? VcpuState.PAUSED : VcpuState.RUNNING,
  );
  for (;;) {
    const command = Atomics.load(words, COMMAND);
    if (command === VcpuCommand.QUIT) break;
    if (command === VcpuCommand.PAUSE) {
      flush();
      control.setState(vcpu, VcpuState.PAUSED);
      while (Atomics.load(words, COMMAND) === VcpuCommand.PAUSE)
        Atomics.wait(words, COMMAND, VcpuCommand.PAUSE);
      if (Atomics.load(words, COMMAND) === VcpuCommand.RUN) control.setState(vcpu, VcpuState.RUNNING);
      continue;
    }

    // One time slice.
    const start = performance.now();
    const end = start + TIME_SLICE_MS;
    let now = start;
    let last = start;
    let flushed = start;
    while (now < end && Atomics.load(words, COMMAND) === VcpuCommand.RUN) {
      if (attempts >= limit) {
        Atomics.wait(words, COMMAND, VcpuCommand.RUN, end - now); // idle guest
        now = performance.now();
        break;
      }
      let n = Math.min(BATCH_PAGES, limit - attempts);
      if (rate > 0) {
        credit = Math.min(creditCap, credit + (now - last) * rate);
        last = now;
        n = Math.min(n, Math.floor(credit / workload.writeBytes));
        if (n === 0) {
          Atomics.wait(
            words,
            COMMAND,
            VcpuCommand.RUN,
            Math.min(end - now, (workload.writeBytes - credit) / rate),
          );
          now = performance.now();
          continue;
        }
        credit -= n * workload.writeBytes;
      }
      writeBatch(n);
      now = performance.now();
      if (now - flushed >= 1) {
        flush();
        flushed = now;
      }
    }
    runMs += now - start;
    flush();

    // Throttle: sleep slice × pct / (100 − pct) after the slice. Timed waits overshoot (wake-up
    // latency, ~1 ms on a VM), so the overshoot is owed back from the next sleep: the long-run
    // share of time asleep is the percentage asked for.
    const throttle = control.throttlePercent;
    if (throttle > 0 && Atomics.load(words, COMMAND) === VcpuCommand.RUN) {
      const sleepMs = (TIME_SLICE_MS * throttle) / (100 - throttle);
      sleepDebtMs = Math.max(-TIME_SLICE_MS, Math.min(sleepMs, sleepDebtMs + sleepMs));
      if (sleepDebtMs > 0) {
        const t0 = performance.now();
        Atomics.wait(words, COMMAND, VcpuCommand.RUN, sleepDebtMs);
        const slept = performance.now() - t0;
        throttledMs += slept;
        sleepDebtMs -= slept;
      }
    } else {
      sleepDebtMs = 0;
    }
  }
  flush();
  control.setState(vcpu, VcpuState.EXITED);
}
