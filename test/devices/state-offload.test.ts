import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import { test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { createAccelDevice } from '../../src/devices/accel-device.js';
import { StateLoader } from '../../src/devices/state/state-loader.js';
import { DeviceStateImage } from '../../src/devices/state/state-region.js';
import { StateSaver } from '../../src/devices/state/state-saver.js';
import { RECORD_HEADER_BYTES, STREAM_HEADER_BYTES } from '../../src/devices/state/stream-format.js';
import { ChecksumClient, checksumWorkerStats } from '../../src/kernel/mem/checksum-worker.js';
import { PhysMemory } from '../../src/kernel/mem/phys-memory.js';
import type { ResumeStream, SavingStream } from '../../src/kernel/vfio/mig-data-stream.js';
import { VfioError } from '../../src/uapi/error.js';
import { MigState } from '../../src/uapi/migration.js';
import { concat, drain, loadStream } from './helpers.js';

const MiB = 1 << 20;
/** Where record `k` of a STOP_COPY stream of 1 MiB records starts its payload. */
const payloadAt = (k: number) => STREAM_HEADER_BYTES + k * (RECORD_HEADER_BYTES + MiB) + RECORD_HEADER_BYTES;

function randomAccel(memoryBytes: number, seed: number) {
  const dev = createAccelDevice({ memoryBytes, seed });
  randomFillSync(dev.driver.image.region('memory').mutate(0, memoryBytes));
  return dev;
}

/** STOP -> STOP_COPY -> read everything -> STOP. */
function stopCopyStream(dev: ReturnType<typeof createAccelDevice>): Uint8Array {
  dev.vfio.setMigDeviceState(MigState.STOP);
  const stream = dev.vfio.setMigDeviceState(MigState.STOP_COPY) as SavingStream;
  const parts: Uint8Array[] = [];
  drain(stream, MiB, parts);
  dev.vfio.setMigDeviceState(MigState.STOP);
  return concat(parts);
}

function assertEio(f: () => void, what: string): void {
  assert.throws(f, (err: unknown) => {
    assert.ok(err instanceof VfioError, String(err));
    assert.equal(err.errno, 'EIO', `${what}: ${err.message}`);
    return true;
  });
}

test('a flipped byte in a large record: verification is deferred, RESUMING->STOP fails EIO, sticky', () => {
  const source = randomAccel(8 * MiB, 1);
  const bytes = stopCopyStream(source);
  const flipped = bytes.slice();
  flipped[payloadAt(2) + 54_321]! ^= 0x80;

  // through the device: the write takes everything (the check is still running), STOP fails
  const dest = createAccelDevice({ memoryBytes: 8 * MiB, seed: 2 });
  dest.vfio.setMigDeviceState(MigState.STOP);
  const resume = dest.vfio.setMigDeviceState(MigState.RESUMING) as ResumeStream;
  resume.write(flipped);
  assertEio(() => dest.vfio.setMigDeviceState(MigState.STOP), 'RESUMING -> STOP');
  assert.equal(dest.vfio.getMigDeviceState(), MigState.RESUMING);
  assertEio(() => resume.write(new Uint8Array(1)), 'write after');
  assertEio(() => dest.vfio.setMigDeviceState(MigState.STOP), 'RESUMING -> STOP again');
  dest.vfio.reset();
  loadStream(dest, bytes, MiB);
  assert.equal(dest.digest(), source.digest(), 'the good stream loads after all that');

  // the loader itself: checks were pending after the write; finish waits for them
  const image = dest.driver.image;
  const loader = new StateLoader(image);
  loader.write(flipped);
  assert.ok(loader.pendingVerifications > 0, 'large records are verified on the worker');
  assertEio(() => loader.finish(), 'finish');
  assert.equal(loader.pendingVerifications, 0);
  assertEio(() => loader.write(new Uint8Array(0)), 'write (sticky)');
  assertEio(() => loader.finish(), 'finish (sticky)');
  loader.end();
});

test('a bad large record found later is reported by the next write, or at the latest by finish', async () => {
  const source = randomAccel(8 * MiB, 3);
  const bytes = stopCopyStream(source);
  const flipped = bytes.slice();
  flipped[payloadAt(1) + 7]! ^= 1;
  const loader = new StateLoader(createAccelDevice({ memoryBytes: 8 * MiB }).driver.image);
  loader.write(flipped.subarray(0, payloadAt(3)));
  await sleep(20); // the worker gets to record 1
  let failed = false;
  try {
    loader.write(flipped.subarray(payloadAt(3), payloadAt(3) + 10));
  } catch (err) {
    assert.ok(err instanceof VfioError && err.errno === 'EIO', String(err));
    failed = true;
  }
  if (!failed) assertEio(() => loader.finish(), 'finish');
  assertEio(() => loader.write(flipped.subarray(payloadAt(3) + 10)), 'sticky');
  loader.end();
});

test('the first bad record decides: a corrupted record before a malformed one is EIO', () => {
  const source = randomAccel(8 * MiB, 4);
  const bytes = stopCopyStream(source);
  const bad = bytes.slice();
  bad[payloadAt(1) + 99]! ^= 4;
  // truncated after record 5: the load fails, for the earlier corruption first
  const loader = new StateLoader(createAccelDevice({ memoryBytes: 8 * MiB }).driver.image);
  loader.write(bad.subarray(0, payloadAt(5) + 1000));
  assertEio(() => loader.finish(), 'finish of a truncated stream with a bad record before');
  // a hostile record header after the bad record
  const hostile = bad.slice(0, payloadAt(3)); // through the header of record 3
  hostile.set([0xff, 0xff], payloadAt(2) + MiB); // kind 0xffff where record 3 starts
  const l2 = new StateLoader(createAccelDevice({ memoryBytes: 8 * MiB }).driver.image);
  assertEio(() => l2.write(hostile), 'write');
  assertEio(() => l2.finish(), 'finish');
});

test('records sent twice (precopy re-sends): the second copy waits for the first check', () => {
  const image = () =>
    new DeviceStateImage('twice', 1, [
      { name: 'mem', sizeBytes: 4 * MiB, precopy: true },
      { name: 'regs', sizeBytes: 4096, precopy: false },
    ]);
  const src = image();
  randomFillSync(src.regions[0]!.mutate(0, 4 * MiB));
  const saver = new StateSaver(src, { precopy: true, dataReady: () => {}, stopDevice: () => {} });
  const parts: Uint8Array[] = [];
  const read = () => {
    const buf = new Uint8Array(3 * MiB);
    for (let n = saver.read(buf); n > 0; n = saver.read(buf)) parts.push(buf.slice(0, n));
  };
  read();
  randomFillSync(src.regions[0]!.mutate(0, 2 * MiB)); // two whole records again, different bytes
  read();
  saver.enterStopCopy();
  read();
  saver.end();
  const bytes = concat(parts);
  assert.ok(bytes.length > 6 * MiB, 'the first 2 MiB went twice');
  // keep the worker busy so the check of the first copy is still queued when the second arrives
  const busy = new ChecksumClient();
  const filler = new PhysMemory(64 * MiB);
  for (let i = 0; i < 64; i++) busy.submit(filler, i * MiB, MiB);
  const dst = image();
  const loader = new StateLoader(dst);
  loader.write(bytes);
  busy.close();
  loader.finish();
  assert.equal(dst.digest(), src.digest());
  // the first copy of record 0 corrupted: the second copy does not hide it
  const bad = bytes.slice();
  bad[STREAM_HEADER_BYTES + RECORD_HEADER_BYTES + 1234]! ^= 2;
  const l2 = new StateLoader(image());
  try {
    l2.write(bad);
  } catch (err) {
    assert.ok(err instanceof VfioError && err.errno === 'EIO', String(err));
  }
  assertEio(() => l2.finish(), 'finish');
});

test('precopy: checksums computed ahead are dropped when the device writes their bytes', async () => {
  const memoryBytes = 24 * MiB;
  const source = randomAccel(memoryBytes, 5);
  const mem = source.driver.image.region('memory');
  const before = checksumWorkerStats();
  const stream = source.vfio.setMigDeviceState(MigState.PRE_COPY) as SavingStream;
  const parts: Uint8Array[] = [];
  const buf = new Uint8Array(MiB);
  let reads = 0;
  while (reads < 40) {
    let n: number;
    try {
      n = stream.readInto(buf);
    } catch (err) {
      if (err instanceof VfioError && err.errno === 'ENOMSG') break;
      throw err;
    }
    parts.push(buf.slice(0, n));
    reads++;
    // let the worker finish the jobs queued for the next records, then change their bytes: the
    // header of such a record must carry the checksum of the new bytes
    await sleep(2);
    const next = (reads + 1) * MiB;
    if (next < memoryBytes) mem.mutate(next + 4096 * (reads % 200), 100).fill(reads);
    if (next + MiB < memoryBytes) randomFillSync(mem.mutate(next + MiB, MiB));
    if (reads < 24) source.work(4);
  }
  source.vfio.setMigDeviceState(MigState.STOP_COPY);
  drain(stream, MiB, parts);
  source.vfio.setMigDeviceState(MigState.STOP);
  const after = checksumWorkerStats();
  assert.ok(after.submitted - before.submitted > reads, 'checksums were queued ahead');
  const dest = createAccelDevice({ memoryBytes, seed: 6 });
  loadStream(dest, concat(parts), 3 * MiB + 17);
  assert.equal(dest.digest(), source.digest());
});

test('precopy with jobs between reads: a large accel round-trips, read->write and spliced', () => {
  for (const splice of [false, true]) {
    const memoryBytes = 32 * MiB;
    const source = randomAccel(memoryBytes, 7);
    const dest = createAccelDevice({ memoryBytes, seed: 8 });
    const saving = source.vfio.setMigDeviceState(MigState.PRE_COPY) as SavingStream;
    dest.vfio.setMigDeviceState(MigState.STOP);
    const resume = dest.vfio.setMigDeviceState(MigState.RESUMING) as ResumeStream;
    const buf = new Uint8Array(MiB);
    const move = (): number => {
      if (splice) return resume.writeFrom((target) => saving.readInto(target));
      const n = saving.readInto(buf);
      resume.write(buf.subarray(0, n));
      return n;
    };
    for (let round = 0; round < 40; round++) {
      try {
        move();
      } catch (err) {
        if (!(err instanceof VfioError && err.errno === 'ENOMSG')) throw err;
      }
      source.work(3);
    }
    source.vfio.setMigDeviceState(MigState.STOP_COPY);
    while (move() > 0);
    source.vfio.setMigDeviceState(MigState.STOP);
    dest.vfio.setMigDeviceState(MigState.STOP);
    assert.equal(dest.digest(), source.digest(), splice ? 'spliced' : 'read -> write');
  }
});

test('small devices never start the checksum worker', () => {
  const root = (p: string) => JSON.stringify(fileURLToPath(new URL(`../../src/${p}`, import.meta.url)));
  const script = `
    const { createBasicDevice } = await import(${root('devices/basic-device.js')});
    const { checksumWorkerStats } = await import(${root('kernel/mem/checksum-worker.js')});
    for (const create of [createBasicDevice]) {
      const a = create({ seed: 1 }), b = create({ seed: 2 });
      a.work(20);
      a.vfio.setMigDeviceState(1);
      const s = a.vfio.setMigDeviceState(3);
      b.vfio.setMigDeviceState(1);
      const r = b.vfio.setMigDeviceState(4);
      while (r.writeFrom((t) => s.readInto(t)) > 0);
      b.vfio.setMigDeviceState(1);
      if (a.digest() !== b.digest()) process.exit(3);
    }
    const st = checksumWorkerStats();
    if (st.submitted !== 0 || st.running) process.exit(4);
  `;
  const r = spawnSync(process.execPath, ['--input-type=module', '-e', script], { timeout: 20_000 });
  assert.equal(r.status, 0, `exit ${r.status} ${r.signal ?? ''} ${r.stderr}`);
});
