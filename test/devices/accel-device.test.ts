import assert from 'node:assert/strict';
import { randomFillSync } from 'node:crypto';
import { test } from 'node:test';
import { createAccelDevice } from '../../src/devices/accel-device.js';
import { DmaPort, MemoryDmaSpace } from '../../src/kernel/vfio/dma-port.js';
import type { ResumeStream, SavingStream } from '../../src/kernel/vfio/mig-data-stream.js';
import { MigFeature, MigState } from '../../src/uapi/migration.js';
import { assertLoadFails, loadStream, saveStream } from './helpers.js';

const MiB = 1 << 20;

test('accel: live save (precopy with jobs between reads) -> load round-trips through VfioDevice', () => {
  const space = new MemoryDmaSpace(new Uint8Array(64 * 1024), { base: 0x10000n });
  const guestBuffer = { iova: 0x10000n, bytes: 64 * 1024 };
  randomFillSync(space.bytes);
  const source = createAccelDevice({ memoryBytes: 4 * MiB, seed: 3, dma: new DmaPort(space), guestBuffer });
  source.work(20);
  const before = space.bytes.slice();
  const dest = createAccelDevice({ memoryBytes: 4 * MiB, seed: 9 });
  assert.notEqual(dest.digest(), source.digest());
  const bytes = saveStream(source, { chunk: 100_000, workUnits: 8 });
  assert.notDeepEqual(space.bytes, before, 'jobs wrote completions into the guest buffer');
  loadStream(dest, bytes, 77_777);
  assert.equal(dest.digest(), source.digest());
  source.vfio.setMigDeviceState(MigState.RUNNING);
  source.work(1);
  assert.notEqual(dest.digest(), source.digest());
});

test('accel: precopy info shrinks as read, grows with jobs, ENOMSG when both are 0', () => {
  const d = createAccelDevice({ memoryBytes: 4 * MiB, seed: 1 });
  let ready = 0;
  const stream = d.vfio.setMigDeviceState(MigState.PRE_COPY) as SavingStream;
  const poll = stream.poll().then(() => ready++);
  const info0 = stream.precopyInfo();
  assert.equal(info0.initialBytes, BigInt(4 * MiB + 64));
  assert.equal(info0.dirtyBytes, 0n);
  stream.read(MiB);
  const info1 = stream.precopyInfo();
  assert.ok(info1.initialBytes < info0.initialBytes && info1.initialBytes > 0n);
  while (stream.precopyInfo().initialBytes > 0n) stream.read(MiB);
  assert.throws(() => stream.read(MiB), { errno: 'ENOMSG' });
  d.work(3);
  const info2 = stream.precopyInfo();
  assert.equal(info2.initialBytes, 0n);
  assert.ok(info2.dirtyBytes > 0n && info2.dirtyBytes % 65536n === 0n);
  const sizeNow = d.vfio.getMigDataSize();
  assert.ok(sizeNow >= info2.dirtyBytes + 4096n, `${sizeNow}`);
  while (stream.precopyInfo().dirtyBytes > 0n) stream.read(64 * 1024);
  assert.throws(() => stream.read(MiB), { errno: 'ENOMSG' });
  return poll.then(() => assert.ok(ready >= 1));
});

test('accel: STOP -> STOP_COPY without precopy sends everything; load failures fail RESUMING->STOP', () => {
  const source = createAccelDevice({ memoryBytes: 4 * MiB, seed: 2 });
  source.work(5);
  source.vfio.setMigDeviceState(MigState.STOP);
  const stream = source.vfio.setMigDeviceState(MigState.STOP_COPY) as SavingStream;
  const parts: Uint8Array[] = [];
  for (const c of stream.chunks(MiB)) parts.push(c);
  const bytes = Buffer.concat(parts);
  assert.ok(bytes.length > 4 * MiB);
  const dest = createAccelDevice({ memoryBytes: 4 * MiB });
  assertLoadFails(dest, bytes.subarray(0, bytes.length - 24), 'EINVAL');
  const flipped = Uint8Array.from(bytes);
  flipped[64 + 24 + 12345]! ^= 1;
  assertLoadFails(dest, flipped, 'EIO');
  assertLoadFails(createAccelDevice({ memoryBytes: 8 * MiB }), bytes, 'EINVAL');
  loadStream(dest, bytes);
  assert.equal(dest.digest(), source.digest());
});

test('accel: P2P is optional through migrationFlags; quiesced jobs do no DMA', () => {
  const space = new MemoryDmaSpace(new Uint8Array(64 * 1024));
  const flags = MigFeature.STOP_COPY | MigFeature.P2P | MigFeature.PRE_COPY;
  const d = createAccelDevice({
    memoryBytes: MiB,
    migrationFlags: flags,
    dma: new DmaPort(space),
    guestBuffer: { iova: 0n, bytes: 64 * 1024 },
  });
  assert.equal(d.vfio.getMigration().flags, BigInt(flags));
  d.vfio.setMigDeviceState(MigState.RUNNING_P2P);
  const snapshot = space.bytes.slice();
  d.work(5);
  assert.deepEqual(space.bytes, snapshot);
  d.vfio.setMigDeviceState(MigState.RUNNING);
  d.work(1);
  assert.notDeepEqual(space.bytes, snapshot);
});

test('accel: more than 1 GiB of device memory migrates (writeFrom splice)', () => {
  const size = (1 << 30) + 64 * MiB;
  const source = createAccelDevice({ memoryBytes: size, seed: 4 });
  source.driver.image
    .region('memory')
    .mutate(size - 4096, 4096)
    .fill(7);
  source.work(10);
  const dest = createAccelDevice({ memoryBytes: size, seed: 5 });
  source.vfio.setMigDeviceState(MigState.STOP);
  const saving = source.vfio.setMigDeviceState(MigState.STOP_COPY) as SavingStream;
  dest.vfio.setMigDeviceState(MigState.STOP);
  const resume = dest.vfio.setMigDeviceState(MigState.RESUMING) as ResumeStream;
  while (resume.writeFrom((target) => saving.readInto(target)) > 0);
  dest.vfio.setMigDeviceState(MigState.STOP);
  assert.equal(dest.digest(), source.digest());
});

test('accel: a bad memory size is refused as bad input, not as a bug', () => {
  for (const memoryBytes of [0, 1000, -4096, 4096.5]) {
    assert.throws(() => createAccelDevice({ memoryBytes }), { code: 'ERR_INVALID_ARGUMENT' });
  }
});
