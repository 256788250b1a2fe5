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

const txRing = { iova: 0x10000n, entries: 4, bufferBytes: 256 };

/** A nic with only a TX ring, over a flat space the test writes as the guest would. */
function withTxRing() {
  const space = new MemoryDmaSpace(new Uint8Array(4 * 256), { base: 0x10000n });
  const nic = createNicDevice({ flowTableBytes: 1 << 16, txRing, dma: new DmaPort(space) });
  const ring = new DataView(space.bytes.buffer);
  const post = (slot: number, payload: Uint8Array, length = payload.length) => {
    space.bytes.set(payload, slot * 256 + 4);
    ring.setUint32(slot * 256, length, true);
  };
  return { nic, space, ring, post };
}

function fnv1a(bytes: readonly Uint8Array[]): number {
  let h = 0x811c9dc5;
  for (const b of bytes) for (const x of b) h = Math.imul(h ^ x, 0x01000193);
  return h >>> 0;
}

test('nic: packets the guest posts in the TX ring are read by DMA, sent in order and given back', () => {
  const { nic, ring, post } = withTxRing();
  const regs = nic.driver.image.region('registers');
  nic.work(1);
  assert.equal(regs.u64(NIC_REG.TX_PACKETS), 0n, 'nothing posted: nothing sent');
  assert.equal(regs.u32(NIC_REG.TX_HEAD), 0);
  const a = Uint8Array.from({ length: 60 }, (_, i) => i);
  const b = Uint8Array.from({ length: 252 }, (_, i) => 255 - (i & 0xff));
  post(0, a);
  post(1, b);
  nic.work(3);
  assert.equal(regs.u64(NIC_REG.TX_PACKETS), 2n);
  assert.equal(regs.u64(NIC_REG.TX_BYTES), 312n);
  assert.equal(regs.u32(NIC_REG.TX_HASH), fnv1a([a, b]), 'the bytes sent are the bytes posted');
  assert.equal(regs.u32(NIC_REG.TX_HEAD), 2, 'the NIC stops at the first buffer still owned by the guest');
  assert.equal(ring.getUint32(0, true), 0, 'buffer 0 given back');
  assert.equal(ring.getUint32(256, true), 0, 'buffer 1 given back');
  // the ring wraps, and a length past the buffer is an error, given back unsent
  post(2, a);
  post(3, a, 253);
  post(0, b);
  nic.work(3);
  assert.equal(regs.u64(NIC_REG.TX_PACKETS), 4n);
  assert.equal(regs.u64(NIC_REG.TX_ERRORS), 1n);
  assert.equal(regs.u32(NIC_REG.TX_HEAD), 1);
  assert.equal(regs.u32(NIC_REG.TX_HASH), fnv1a([a, b, a, b]));
  assert.equal(ring.getUint32(3 * 256, true), 0, 'the bad buffer is given back too');
});

test('nic: no TX while P2P-quiesced or stopped, and a TX ring the IOMMU refuses is a counted DMA fault', () => {
  const { nic, post } = withTxRing();
  const regs = nic.driver.image.region('registers');
  post(0, new Uint8Array(64).fill(7));
  nic.vfio.setMigDeviceState(MigState.RUNNING_P2P);
  nic.work(2);
  assert.equal(regs.u64(NIC_REG.TX_PACKETS), 0n, 'quiesced: no DMA');
  nic.vfio.setMigDeviceState(MigState.RUNNING);
  nic.work(1);
  assert.equal(regs.u64(NIC_REG.TX_PACKETS), 1n);

  const unmapped = createNicDevice({
    flowTableBytes: 1 << 16,
    txRing: { iova: 0x900000n, entries: 4, bufferBytes: 256 },
    dma: new DmaPort(new MemoryDmaSpace(new Uint8Array(4096))),
  });
  const uregs = unmapped.driver.image.region('registers');
  unmapped.work(2);
  assert.equal(uregs.u64(NIC_REG.DMA_FAULTS), 2n);
  assert.equal(uregs.u64(NIC_REG.LAST_FAULT_IOVA), 0x900000n);
  assert.equal(uregs.u64(NIC_REG.TX_PACKETS), 0n);
  assert.throws(() => createNicDevice({ txRing: { iova: 0n, entries: 0, bufferBytes: 256 } }), {
    code: 'ERR_INVALID_ARGUMENT',
  });
});
