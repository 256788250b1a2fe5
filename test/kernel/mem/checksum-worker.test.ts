import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import { test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import {
  CHECKSUM_OFFLOAD_MIN_BYTES,
  ChecksumClient,
  checksumWorkerStats,
  type PendingChecksum,
  shutdownChecksumWorker,
} from '../../../src/kernel/mem/checksum-worker.js';
import { SLOTS } from '../../../src/kernel/mem/checksum-protocol.js';
import { PhysMemory, SEGMENT_BYTES } from '../../../src/kernel/mem/phys-memory.js';

const MiB = 1 << 20;

/** Deterministic xorshift PRNG for ranges. */
function prng(seed: number): (n: number) => number {
  let x = seed >>> 0 || 1;
  return (n) => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x % n;
  };
}

function randomMemory(size: number, fill = size): PhysMemory {
  const m = new PhysMemory(size);
  for (let at = 0; at < fill; at += 64 * MiB) randomFillSync(m.view(at, Math.min(64 * MiB, fill - at)));
  return m;
}

/** Wait (yielding) until the worker has finished `jobs`, so their values come from it. */
async function settled(jobs: PendingChecksum[]): Promise<void> {
  for (let i = 0; i < 2000 && !jobs.every((j) => j.ready); i++) await sleep(1);
}

test('worker checksums equal inline ones for random ranges of several memories, seeds included', async () => {
  const memories = [randomMemory(3 * MiB + 4096), randomMemory(8 * MiB), randomMemory(256 * 1024)];
  const next = prng(42);
  const client = new ChecksumClient();
  const before = checksumWorkerStats();
  const cases: { m: PhysMemory; offset: number; length: number; seed: number; job: PendingChecksum }[] = [];
  for (let i = 0; i < 60; i++) {
    const m = memories[next(memories.length)]!;
    const length =
      CHECKSUM_OFFLOAD_MIN_BYTES + next(Math.min(2 * MiB, m.sizeBytes) - CHECKSUM_OFFLOAD_MIN_BYTES);
    const offset = next(m.sizeBytes - length + 1); // any alignment, any tail
    const seed = i % 3 === 0 ? 0 : next(0xffffffff);
    const job = client.submit(m, offset, length, seed);
    assert.ok(job, `job ${i} queued`);
    cases.push({ m, offset, length, seed, job });
  }
  await settled(cases.map((c) => c.job));
  for (const c of cases) {
    assert.equal(
      c.job.value(),
      c.m.checksum(c.offset, c.length, c.seed),
      `[${c.offset}, +${c.length}) seed ${c.seed}`,
    );
    assert.equal(c.job.value(), c.job.value(), 'value() is stable');
  }
  const after = checksumWorkerStats();
  assert.ok(after.running, String(after.failure));
  assert.ok(after.fromWorker - before.fromWorker > 0, 'the worker computed results');
  assert.equal(client.pending, 0);
  client.close();
  assert.equal(checksumWorkerStats().memories, before.memories);
});

test('ranges in the second 1 GiB segment are offloaded; a range across segments is not', async () => {
  const size = SEGMENT_BYTES + 4 * MiB;
  const m = new PhysMemory(size);
  randomFillSync(m.view(SEGMENT_BYTES - 2 * MiB, 2 * MiB));
  randomFillSync(m.view(SEGMENT_BYTES, 4 * MiB));
  const client = new ChecksumClient();
  const ranges = [
    [SEGMENT_BYTES - 2 * MiB, 2 * MiB],
    [SEGMENT_BYTES, MiB],
    [SEGMENT_BYTES + 12_345, 3 * MiB - 7],
    [size - CHECKSUM_OFFLOAD_MIN_BYTES, CHECKSUM_OFFLOAD_MIN_BYTES],
  ] as const;
  const jobs = ranges.map(([offset, length]) => client.submit(m, offset, length, 7)!);
  assert.ok(jobs.every(Boolean));
  await settled(jobs);
  ranges.forEach(([offset, length], i) => assert.equal(jobs[i]!.value(), m.checksum(offset, length, 7)));
  assert.equal(client.submit(m, SEGMENT_BYTES - MiB, 2 * MiB), undefined, 'crosses a segment: inline');
  assert.equal(client.submit(m, 0, CHECKSUM_OFFLOAD_MIN_BYTES - 1), undefined, 'too small: inline');
  client.close();
});

test('a value taken at once, cancel, and the slot bound', () => {
  const m = randomMemory(4 * MiB);
  const client = new ChecksumClient();
  // taken at once: computed here if the worker has not started it, waited for if it has
  const job = client.submit(m, 0, 4 * MiB)!;
  assert.equal(job.value(), m.checksum(0, 4 * MiB));
  const cancelled = client.submit(m, 0, MiB)!;
  cancelled.cancel();
  cancelled.cancel();
  assert.throws(() => cancelled.value(), { code: 'ERR_CHECKSUM_WORKER' });
  // bounded: at most SLOTS jobs in flight in the process; the rest is refused (caller: inline)
  const jobs: PendingChecksum[] = [];
  for (let i = 0; i < SLOTS + 10; i++) {
    const j = client.submit(m, (i % 4) * MiB, CHECKSUM_OFFLOAD_MIN_BYTES);
    if (j) jobs.push(j);
  }
  assert.ok(jobs.length <= SLOTS, `${jobs.length} jobs in flight`);
  for (const [i, j] of jobs.entries())
    assert.equal(j.value(), m.checksum((i % 4) * MiB, CHECKSUM_OFFLOAD_MIN_BYTES));
  assert.ok(client.submit(m, 0, MiB), 'slots are free again once values are taken');
  client.close();
  assert.equal(client.pending, 0);
});

test('shutdown: pending jobs still give exact values, and the next submit starts a new worker', async () => {
  const m = randomMemory(8 * MiB);
  const client = new ChecksumClient();
  const jobs = Array.from({ length: 8 }, (_, i) => client.submit(m, i * MiB, MiB)!);
  await shutdownChecksumWorker();
  assert.equal(checksumWorkerStats().running, false);
  jobs.forEach((j, i) => assert.equal(j.value(), m.checksum(i * MiB, MiB)));
  const again = client.submit(m, MiB, 2 * MiB)!;
  assert.ok(again);
  assert.ok(checksumWorkerStats().running);
  await settled([again]);
  assert.equal(again.value(), m.checksum(MiB, 2 * MiB));
  client.close();
});

test("a process that used the worker exits by itself (the worker is unref'd)", () => {
  const module = fileURLToPath(new URL('../../../src/kernel/mem/index.js', import.meta.url));
  const script = `
    const { PhysMemory, ChecksumClient, checksumWorkerStats } = await import(${JSON.stringify(module)});
    const m = new PhysMemory(4 << 20);
    m.fill(3);
    const c = new ChecksumClient();
    const jobs = [0, 1, 2, 3].map((i) => c.submit(m, i << 20, 1 << 20));
    await new Promise((r) => setTimeout(r, 50));
    for (const [i, j] of jobs.entries()) if (j.value() !== m.checksum(i << 20, 1 << 20)) process.exit(3);
    c.submit(m, 0, 1 << 20); // left pending on purpose, client not closed
    if (!checksumWorkerStats().running) process.exit(4);
  `;
  const started = Date.now();
  const r = spawnSync(process.execPath, ['--input-type=module', '-e', script], { timeout: 20_000 });
  assert.equal(r.status, 0, `exit ${r.status} ${r.signal ?? ''} ${r.stderr}`);
  assert.ok(Date.now() - started < 10_000);
});
