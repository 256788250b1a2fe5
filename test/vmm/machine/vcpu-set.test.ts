import assert from 'node:assert/strict';
import { afterEach, describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { countDirtyPages, isPageDirty } from '../../../src/vmm/machine/dirty-log.js';
import { GuestRam } from '../../../src/vmm/machine/guest-ram.js';
import { VcpuSet, type VcpuSetOptions } from '../../../src/vmm/machine/vcpu-set.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const PAGE = 4096;
const bad = { code: 'ERR_INVALID_ARGUMENT' };

// Every set started here is terminated after its test, even when the test fails.
const live: VcpuSet[] = [];
async function start(ram: GuestRam, options: VcpuSetOptions): Promise<VcpuSet> {
  const set = await VcpuSet.start(ram, options);
  live.push(set);
  return set;
}
afterEach(async () => {
  await Promise.all(live.splice(0).map((s) => s.terminate()));
});

async function waitUntil(what: string, done: () => boolean, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!done()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(5);
  }
}

/** Dirty pages of a bitmap as a list. */
function pagesOf(bitmap: Uint32Array, pages: number): number[] {
  const out: number[] = [];
  for (let p = 0; p < pages; p++) if (isPageDirty(bitmap, p)) out.push(p);
  return out;
}

const range = (from: number, to: number) => Array.from({ length: to - from }, (_, i) => from + i);

function pageWritten(bytes: Uint8Array, page: number): boolean {
  return bytes.subarray(page * PAGE, (page + 1) * PAGE).some((b) => b !== 0);
}

describe('vCPU workload', () => {
  test('pages written by vCPUs, across two RAM blocks, appear in the next sync exactly and are cleared by it', async () => {
    const ram = new GuestRam();
    const a = ram.addBlock({ name: 'a', sizeBytes: MiB, gpa: 0n }); // pages 0..255
    const b = ram.addBlock({ name: 'b', sizeBytes: MiB, gpa: 1n << 32n }); // RAM pages 256..511
    ram.startDirtyLog();
    // Pages 192..319 of guest RAM: the last 64 of `a`, the first 64 of `b`.
    const set = await start(ram, {
      count: 1,
      workload: {
        pattern: { kind: 'sequential' },
        workingSetOffsetBytes: 192 * PAGE,
        workingSetBytes: 128 * PAGE,
        pageWriteLimit: 128,
      },
    });
    await waitUntil('128 page writes', () => set.totals().pageWrites === 128);
    ram.write(0n, Uint8Array.of(1)); // and one from the host thread
    const synced = ram.syncDirtyLog();
    assert.deepEqual(pagesOf(synced.get('a')!, a.pages), [0, ...range(192, 256)]);
    assert.deepEqual(pagesOf(synced.get('b')!, b.pages), range(0, 64));
    const again = ram.syncDirtyLog();
    assert.equal(countDirtyPages(again.get('a')!) + countDirtyPages(again.get('b')!), 0);
  });

  test('after stop, vCPU writes are no longer marked', async () => {
    const ram = new GuestRam();
    const block = ram.addBlock({ name: 'r', sizeBytes: MiB, gpa: 0n });
    ram.startDirtyLog();
    const set = await start(ram, { count: 2, workload: { dirtyRateMiBps: 0 } });
    await waitUntil('writes', () => block.dirtyLog.pendingPages() > 0);
    ram.stopDirtyLog();
    const pendingAtStop = block.dirtyLog.pendingPages();
    const before = set.totals().pageWrites;
    await waitUntil('more writes', () => set.totals().pageWrites > before + 1000);
    // A write that had read "enabled" just before stop may still land: at most one per vCPU.
    assert.ok(block.dirtyLog.pendingPages() <= pendingAtStop + 2);
    await set.pause();
    ram.startDirtyLog();
    assert.equal(block.dirtyLog.pendingPages(), 0);
  });

  test('sequential covers exactly the working set', async () => {
    const ram = new GuestRam();
    const block = ram.addBlock({ name: 'r', sizeBytes: 2 * MiB, gpa: 0n });
    const set = await start(ram, {
      count: 2,
      workload: {
        pattern: { kind: 'sequential' },
        workingSetOffsetBytes: 100 * PAGE,
        workingSetBytes: 300 * PAGE,
        pageWriteLimit: 150,
      },
    });
    await waitUntil('2 × 150 page writes', () => set.totals().pageWrites === 300);
    const bytes = block.memory.view(0, block.sizeBytes);
    for (let p = 0; p < block.pages; p++) {
      assert.equal(pageWritten(bytes, p), p >= 100 && p < 400, `page ${p}`);
    }
    // Whole pages by default: every word of a written page is non-zero.
    const words = new Uint32Array(bytes.buffer, bytes.byteOffset + 100 * PAGE, 300 * 1024);
    assert.ok(words.every((w) => w !== 0));
    assert.equal(set.totals().bytesWritten, 300 * PAGE);
  });

  test('a hot set concentrates writes', async () => {
    const ram = new GuestRam();
    const block = ram.addBlock({ name: 'r', sizeBytes: 16 * MiB, gpa: 0n }); // 4096 pages
    ram.startDirtyLog();
    const set = await start(ram, {
      count: 1,
      workload: {
        pattern: { kind: 'hot', hotFraction: 0.1, hotProbability: 0.9 },
        pageWriteLimit: 2000,
        seed: 11,
      },
    });
    await waitUntil('2000 page writes', () => set.totals().pageWrites === 2000);
    const dirty = pagesOf(block.dirtyLog.syncAndClear(), block.pages);
    const hotPages = 410; // round(4096 × 0.1)
    const hot = dirty.filter((p) => p < hotPages).length;
    const cold = dirty.length - hot;
    const hotDensity = hot / hotPages;
    const coldDensity = cold / (block.pages - hotPages);
    assert.ok(hotDensity > 0.9, `hot density ${hotDensity}`); // ~1800 writes on 410 pages
    assert.ok(coldDensity < 0.1, `cold density ${coldDensity}`); // ~200 writes on 3686 pages
  });

  test('runs are reproducible from the seed', async () => {
    const run = async (seed: number, writeBytesPerPage: number) => {
      const ram = new GuestRam();
      ram.addBlock({ name: 'r', sizeBytes: 4 * MiB, gpa: 0n });
      const set = await start(ram, { count: 1, workload: { seed, pageWriteLimit: 3000, writeBytesPerPage } });
      await waitUntil('3000 page writes', () => set.totals().pageWrites === 3000);
      await set.terminate();
      return { digest: ram.digest(), bytes: set.totals().bytesWritten };
    };
    const first = await run(5, 4096);
    assert.deepEqual(await run(5, 4096), first);
    assert.notEqual((await run(6, 4096)).digest, first.digest);
    const small = await run(5, 64);
    assert.equal(small.bytes, 3000 * 64);
    assert.deepEqual(await run(5, 64), small);
  });
});

describe('vCPU rate and throttle', () => {
  test('the dirty rate is honoured', async () => {
    const ram = new GuestRam();
    ram.addBlock({ name: 'r', sizeBytes: 16 * MiB, gpa: 0n });
    const rateMiBps = 16;
    const set = await start(ram, { count: 1, workload: { dirtyRateMiBps: rateMiBps } });
    await sleep(100);
    const t0 = performance.now();
    const b0 = set.totals().bytesWritten;
    await sleep(1000);
    const t1 = performance.now();
    const b1 = set.totals().bytesWritten;
    await set.pause();
    const stats = set.totals();
    // Exact bound from the vCPU's own clock: credit accrues only while it runs.
    const rateBytesPerMs = (rateMiBps * MiB) / 1000;
    assert.ok(
      stats.bytesWritten <= rateBytesPerMs * stats.runMs + PAGE,
      `${stats.bytesWritten} B in ${stats.runMs} ms`,
    );
    // Over the wall-clock window, with room for a loaded machine (the counters lag ≤ 1 ms; one slice of credit).
    const expected = rateBytesPerMs * (t1 - t0);
    const got = b1 - b0;
    assert.ok(
      got <= expected * 1.25 + rateBytesPerMs * 20,
      `${got} B in ${t1 - t0} ms, expected ~${expected}`,
    );
    assert.ok(got >= expected * 0.25, `${got} B in ${t1 - t0} ms, expected ~${expected}`);
  });

  test('a throttle reduces the bytes written against unthrottled windows of the same run', async () => {
    const ram = new GuestRam();
    ram.addBlock({ name: 'r', sizeBytes: 8 * MiB, gpa: 0n });
    const set = await start(ram, { count: 1 });
    const windowBytes = async () => {
      const b0 = set.totals().bytesWritten;
      const t0 = performance.now();
      await sleep(250);
      return (set.totals().bytesWritten - b0) / (performance.now() - t0);
    };
    await sleep(50);
    let free = 0;
    let throttled = 0;
    for (let round = 0; round < 2; round++) {
      set.setThrottle(0);
      await sleep(20);
      free += await windowBytes();
      set.setThrottle(80); // 10 ms of run, 40 ms of sleep
      await sleep(60);
      throttled += await windowBytes();
    }
    assert.equal(set.throttlePercent, 80);
    assert.ok(throttled < free * 0.6, `throttled ${throttled} B/ms against ${free} B/ms`);
    assert.ok(set.totals().throttledMs > 100);
    assert.throws(() => set.setThrottle(100), bad);
    assert.throws(() => set.setThrottle(-1), bad);
    assert.throws(() => set.setThrottle(2.5), bad);
  });
});

describe('vCPU run state', () => {
  test('pause stops every write: the digest and the counters hold still until resume', async () => {
    const ram = new GuestRam();
    ram.addBlock({ name: 'r', sizeBytes: 4 * MiB, gpa: 0n });
    ram.startDirtyLog();
    const set = await start(ram, { count: 2 });
    assert.equal(set.runState, 'running');
    await waitUntil('writes', () => set.totals().pageWrites > 1000);
    await set.pause();
    assert.equal(set.runState, 'paused');
    assert.deepEqual(
      set.stats().map((s) => s.state),
      ['paused', 'paused'],
    );
    ram.syncDirtyLog();
    const digest = ram.digest();
    const totals = set.totals();
    await sleep(150);
    assert.equal(ram.digest(), digest);
    assert.deepEqual(set.totals(), totals);
    assert.equal(countDirtyPages(ram.syncDirtyLog().get('r')!), 0);
    await set.pause(); // already paused: no-op
    await set.resume();
    assert.deepEqual(
      set.stats().map((s) => s.state),
      ['running', 'running'],
    );
    await waitUntil('writes after resume', () => set.totals().pageWrites > totals.pageWrites + 1000);
    assert.notEqual(ram.digest(), digest);
  });

  test('a set started paused writes nothing until resumed', async () => {
    const ram = new GuestRam();
    ram.addBlock({ name: 'r', sizeBytes: MiB, gpa: 0n });
    const empty = ram.digest();
    const set = await start(ram, { count: 1, startPaused: true });
    assert.equal(set.runState, 'paused');
    await sleep(50);
    assert.equal(set.totals().pageWrites, 0);
    assert.equal(ram.digest(), empty);
    await set.resume();
    await waitUntil('writes', () => set.totals().pageWrites > 0);
  });

  test('vCPUs skip unplugged memory, and an unplug while they run leaves zeros behind', async () => {
    const ram = new GuestRam();
    const block = ram.addBlock({
      name: 'mem0',
      sizeBytes: 4 * MiB,
      gpa: 1n << 32n,
      discard: { blockSizeBytes: 256 * KiB, plugged: 'all' },
    });
    const set = await start(ram, { count: 2, workload: { writeBytesPerPage: 64 } });
    await waitUntil('writes', () => set.totals().pageWrites > 20_000);
    block.discard!.unplug(0, 8); // the first 2 MiB
    const zero = () => block.memory.view(0, 2 * MiB).every((b) => b === 0);
    assert.ok(zero(), 'unplugged memory reads zero right after unplug');
    const skipped = set.totals().pagesSkipped;
    await waitUntil('skipped writes', () => set.totals().pagesSkipped > skipped + 1000);
    assert.ok(zero(), 'and stays zero while vCPUs run');
    block.discard!.plug(0, 8);
    await waitUntil('writes into the plugged memory again', () => !zero());
  });

  test('terminate ends every thread; a terminated set refuses commands', async () => {
    const ram = new GuestRam();
    ram.addBlock({ name: 'r', sizeBytes: MiB, gpa: 0n });
    const set = await start(ram, { count: 4, workload: { dirtyRateMiBps: 1 }, throttlePercent: 50 });
    await set.terminate();
    assert.equal(set.runState, 'terminated');
    assert.deepEqual(
      set.stats().map((s) => s.state),
      ['exited', 'exited', 'exited', 'exited'],
    );
    await set.terminate(); // idempotent
    await assert.rejects(set.pause(), bad);
    await assert.rejects(set.resume(), bad);
    assert.throws(() => set.setThrottle(10), bad);
    // Paused vCPUs end too, and their fence slots are free again.
    const paused = await start(ram, { count: 2, startPaused: true });
    await paused.terminate();
    assert.ok(ram.fence.claim() < 2);
  });

  test('bad options are refused before any thread starts', async () => {
    const ram = new GuestRam();
    await assert.rejects(VcpuSet.start(ram, { count: 1 }), bad); // no RAM
    ram.addBlock({ name: 'r', sizeBytes: MiB, gpa: 0n });
    for (const options of [
      { count: 0 },
      { count: 65 },
      { count: 1.5 },
      { count: 1, throttlePercent: 100 },
      { count: 1, ackTimeoutMs: 0 },
      { count: 2, workload: [{}] },
      { count: 1, workload: { workingSetBytes: 2 * MiB } },
      { count: 1, workload: { pattern: { kind: 'hot', hotFraction: 0 } } },
    ] as VcpuSetOptions[]) {
      await assert.rejects(VcpuSet.start(ram, options), bad, JSON.stringify(options));
    }
  });
});
