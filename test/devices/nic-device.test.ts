import assert from 'node:assert/strict';
import { test } from 'node:test';
import { createNicDevice, NIC_REG } from '../../src/devices/nic-device.js';
import { sampleDeviceFactories, sampleDeviceFactory } from '../../src/devices/registry.js';
import { DmaPort, MemoryDmaSpace } from '../../src/kernel/vfio/dma-port.js';
import type { SavingStream } from '../../src/kernel/vfio/mig-data-stream.js';
import { MigState } from '../../src/uapi/migration.js';
import { assertLoadFails, loadStream, saveStream } from './helpers.js';

const rxRing = { iova: 0x4000n, entries: 8, bufferBytes: 256 };

function withRing(seed: number) {
  const space = new MemoryDmaSpace(new Uint8Array(8 * 256), { base: 0x4000n });
  const nic = createNicDevice({ flowTableBytes: 1 << 20, rxRing, dma: new DmaPort(space), seed });
  return { nic, space };
}

test('registry lists nic, accel, basic and each factory creates a working device', () => {
  assert.deepEqual(
    sampleDeviceFactories.map((f) => f.type),
    ['nic', 'accel', 'basic'],
  );
  for (const f of sampleDeviceFactories) {
    const d = f.create({ memoryBytes: 1 << 20, flowTableBytes: 1 << 16 } as never);
    const before = d.digest();
    d.work(2);
    assert.notEqual(d.digest(), before, f.type);
    assert.equal(d.vfio.driver.deviceType, f.type);
  }
  assert.equal(sampleDeviceFactory('nope'), undefined);
});

test('nic: received packets land in the RX ring through DMA, in order', () => {
  const { nic, space } = withRing(1);
  nic.work(3);
  const ring = new DataView(space.bytes.buffer);
  for (let i = 0; i < 3; i++) {
    const length = ring.getUint32(i * 256, true);
    assert.ok(length >= 60 && length <= 252, `packet ${i}: ${length}`);
  }
  assert.equal(ring.getUint32(3 * 256, true), 0);
  const regs = nic.driver.image.region('registers');
  assert.equal(regs.u32(NIC_REG.RX_HEAD), 3);
  assert.equal(regs.u64(NIC_REG.RX_PACKETS), 3n);
  nic.work(6);
  assert.equal(regs.u32(NIC_REG.RX_HEAD), 1, 'wraps around');
});

test('nic: no DMA while P2P-quiesced (RUNNING_P2P, PRE_COPY_P2P), nothing at all while stopped', () => {
  const { nic, space } = withRing(2);
  nic.vfio.setMigDeviceState(MigState.RUNNING_P2P);
  const ring = space.bytes.slice();
  const d0 = nic.digest();
  nic.work(4);
  assert.deepEqual(space.bytes, ring);
  assert.notEqual(nic.digest(), d0, 'flows and counters still change');
  assert.equal(nic.driver.image.region('registers').u64(NIC_REG.RX_DROPPED), 4n);
  const stream = nic.vfio.setMigDeviceState(MigState.PRE_COPY_P2P) as SavingStream;
  nic.work(4);
  assert.deepEqual(space.bytes, ring);
  nic.vfio.setMigDeviceState(MigState.STOP_COPY);
  const d1 = nic.digest();
  nic.work(4);
  assert.equal(nic.digest(), d1);
  void stream;
  nic.vfio.setMigDeviceState(MigState.RUNNING);
  nic.work(1);
  assert.notDeepEqual(space.bytes, ring);
});

test('nic: live save -> load round-trips; configuration and type mismatches fail', () => {
  const { nic: source } = withRing(3);
  source.work(50);
  const { nic: dest } = withRing(4);
  const bytes = saveStream(source, { chunk: 50_000, workUnits: 20 });
  loadStream(dest, bytes, 12_345);
  assert.equal(dest.digest(), source.digest());
  assertLoadFails(createNicDevice({ flowTableBytes: 2 << 20, rxRing }), bytes, 'EINVAL');
  assertLoadFails(
    createNicDevice({ flowTableBytes: 1 << 20, rxRing: { ...rxRing, entries: 16 } }),
    bytes,
    'EINVAL',
  );
  assertLoadFails(createNicDevice({ flowTableBytes: 1 << 20 }), bytes, 'EINVAL');
  const acc = sampleDeviceFactory('accel')!.create({ memoryBytes: 1 << 20 } as never);
  assertLoadFails(acc as never, bytes, 'EINVAL');
  assertLoadFails(dest, bytes.subarray(0, 100_000), 'EINVAL');
});

test('nic: reset returns to the power-on state', () => {
  const { nic } = withRing(5);
  const powerOn = nic.digest();
  nic.work(10);
  nic.vfio.reset();
  assert.equal(nic.digest(), powerOn);
});

test('nic: bad table or ring sizes are refused as bad input', () => {
  assert.throws(() => createNicDevice({ flowTableBytes: 100 }), { code: 'ERR_INVALID_ARGUMENT' });
  assert.throws(() => createNicDevice({ rxRing: { iova: 0n, entries: 0, bufferBytes: 2048 } }), {
    code: 'ERR_INVALID_ARGUMENT',
  });
});
