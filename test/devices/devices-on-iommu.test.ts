import assert from 'node:assert/strict';
import { test } from 'node:test';
import { ACCEL_CTX, createAccelDevice } from '../../src/devices/accel-device.js';
import { createNicDevice, NIC_REG, type NicRing } from '../../src/devices/nic-device.js';
import { Host, type Process } from '../../src/kernel/host/index.js';
import { IoasDmaSpace, IommufdContext } from '../../src/kernel/iommufd/index.js';
import { VfioContainer, VfioGroup } from '../../src/kernel/vfio/container.js';
import { DmaPort, type DmaSpace, MemoryDmaSpace } from '../../src/kernel/vfio/dma-port.js';
import { HwptAllocFlag, IoasMapFlag } from '../../src/uapi/iommufd.js';
import { loadStream, saveStream } from './helpers.js';

const MiB = 1n << 20n;
const PAGE = 4096n;
const RW = IoasMapFlag.READABLE | IoasMapFlag.WRITEABLE;
const RO = IoasMapFlag.READABLE;
const FIXED = IoasMapFlag.FIXED_IOVA;

/** Guest RAM layout: 4 MiB; the first 2 MiB at IOVA 1 GiB read-write, the last 1 MiB at 2 GiB read-only. */
const RAM_BYTES = 4n * MiB;
const RW_IOVA = 0x4000_0000n;
const RW_BYTES = 2n * MiB;
const RO_IOVA = 0x8000_0000n;
const RO_OFFSET = 3n * MiB;
const RO_BYTES = 1n * MiB;
const RING: NicRing = { iova: RW_IOVA + 0x10000n, entries: 16, bufferBytes: 2048 };

interface Vm {
  p: Process;
  ram: bigint;
  ctx: IommufdContext;
  ioas: number;
  devId: number;
  hwpt: number;
  space: IoasDmaSpace;
}

/** A process with guest RAM, an iommufd with the RAM mapped, a device on a dirty-tracking HWPT. */
function vm(): Vm {
  const host = new Host();
  const p = host.spawn({ uid: 1000, rlimitMemlockBytes: 64n * MiB });
  const ram = p.mmap({ lengthBytes: RAM_BYTES });
  const ctx = IommufdContext.open(p);
  const ioas = ctx.ioasAlloc().outIoasId;
  ctx.ioasMap({ flags: FIXED | RW, ioasId: ioas, userVa: ram, length: RW_BYTES, iova: RW_IOVA });
  ctx.ioasMap({ flags: FIXED | RO, ioasId: ioas, userVa: ram + RO_OFFSET, length: RO_BYTES, iova: RO_IOVA });
  const devId = ctx.bindDevice({ name: 'vf0', dirtyTracking: true }).outDevid;
  const hwpt = ctx.hwptAlloc({ flags: HwptAllocFlag.DIRTY_TRACKING, devId, ptId: ioas }).outHwptId;
  ctx.attachIoas({ devId, ptId: hwpt });
  return { p, ram, ctx, ioas, devId, hwpt, space: new IoasDmaSpace(ctx, devId) };
}

function guestBytes(p: Process, va: bigint, n: number | bigint): Uint8Array {
  const out = new Uint8Array(Number(n));
  p.read(va, out);
  return out;
}

/** Set bits of a little-endian bitmap. */
function bitsOf(bitmap: Uint8Array): number[] {
  const out: number[] = [];
  for (let i = 0; i < bitmap.length * 8; i++) if (bitmap[i >> 3]! & (1 << (i & 7))) out.push(i);
  return out;
}

function hwptDirtyPages(v: Vm, iova: bigint, length: bigint): number[] {
  const data = new Uint8Array(Number(length / PAGE / 8n) + 8);
  v.ctx.hwptGetDirtyBitmap({ hwptId: v.hwpt, flags: 0, iova, length, pageSize: PAGE, data });
  return bitsOf(data);
}

/**
 * The pages (from RW_IOVA) of the ring packets `from` to `to` - 1 went to (buffers never straddle
 * a page here).
 */
function ringPages(to: number, from = 0): number[] {
  const pages = new Set<number>();
  const first = Number((RING.iova - RW_IOVA) / PAGE);
  for (let i = from; i < to; i++)
    pages.add(first + Math.floor(((i % RING.entries) * RING.bufferBytes) / 4096));
  return [...pages].sort((a, b) => a - b);
}

const nicRegs = (nic: ReturnType<typeof createNicDevice>) => nic.driver.image.region('registers');

test('nic over iommufd: packets land in the process memory at the ring VA, byte for byte', () => {
  const v = vm();
  const nic = createNicDevice({ flowTableBytes: 1 << 16, rxRing: RING, dma: new DmaPort(v.space), seed: 5 });
  // The same NIC over a flat space: the packets it writes are the reference.
  const flat = new MemoryDmaSpace(new Uint8Array(RING.entries * RING.bufferBytes), { base: RING.iova });
  const twin = createNicDevice({ flowTableBytes: 1 << 16, rxRing: RING, dma: new DmaPort(flat), seed: 5 });
  nic.work(20);
  twin.work(20);
  const ringVa = v.ram + (RING.iova - RW_IOVA);
  assert.deepEqual(guestBytes(v.p, ringVa, flat.bytes.length), flat.bytes);
  assert.equal(nicRegs(nic).u64(NIC_REG.RX_PACKETS), 20n);
  assert.equal(nicRegs(nic).u32(NIC_REG.RX_HEAD), 20 % RING.entries);
  assert.equal(nicRegs(nic).u64(NIC_REG.DMA_FAULTS), 0n);
  const length = new DataView(flat.bytes.buffer).getUint32(0, true);
  assert.ok(length >= 60 && length <= RING.bufferBytes - 4);
  // Nothing outside the ring changed.
  assert.ok(guestBytes(v.p, v.ram, RING.iova - RW_IOVA).every((b) => b === 0));
  assert.equal(nic.digest(), twin.digest());
});

test('one device DMA write marks the HWPT dirty bitmap and the device DMA log alike', () => {
  const v = vm();
  const nic = createNicDevice({ flowTableBytes: 1 << 16, rxRing: RING, dma: new DmaPort(v.space), seed: 6 });
  assert.equal(nic.vfio.driver.dmaLogging, true);
  v.ctx.hwptSetDirtyTracking({ flags: 1, hwptId: v.hwpt });
  assert.equal(
    nic.vfio.dmaLoggingStart({ pageSize: PAGE, ranges: [{ iova: RW_IOVA, length: RW_BYTES }] }),
    PAGE,
  );
  nic.work(5);
  const expected = ringPages(5);
  assert.deepEqual(hwptDirtyPages(v, RW_IOVA, RW_BYTES), expected);
  assert.deepEqual(
    bitsOf(nic.vfio.dmaLoggingReport({ iova: RW_IOVA, length: RW_BYTES, pageSize: PAGE })),
    expected,
  );
  // Both were read-and-clear; the next packets show up in both again, at another report size.
  nic.work(2);
  assert.deepEqual(hwptDirtyPages(v, RW_IOVA, RW_BYTES), ringPages(7, 5));
  const log = bitsOf(nic.vfio.dmaLoggingReport({ iova: RW_IOVA, length: RW_BYTES, pageSize: 2n * MiB }));
  assert.deepEqual(log, [0]);
  nic.vfio.dmaLoggingStop();
  v.ctx.hwptSetDirtyTracking({ flags: 0, hwptId: v.hwpt });
  nic.work(1);
  assert.deepEqual(hwptDirtyPages(v, RW_IOVA, RW_BYTES), [], 'tracking off: no bits');
});

test('nic DMA faults (read-only mapping, unmapped ring) are counted by the device, never thrown, never written', () => {
  const v = vm();
  v.ctx.hwptSetDirtyTracking({ flags: 1, hwptId: v.hwpt });
  const roRing: NicRing = { ...RING, iova: RO_IOVA + 0x1000n };
  const nic = createNicDevice({
    flowTableBytes: 1 << 16,
    rxRing: roRing,
    dma: new DmaPort(v.space),
    seed: 7,
  });
  nic.vfio.dmaLoggingStart({ pageSize: PAGE, ranges: [{ iova: RO_IOVA, length: RO_BYTES }] });
  const before = guestBytes(v.p, v.ram, RAM_BYTES);
  nic.work(3);
  const regs = nicRegs(nic);
  assert.equal(regs.u64(NIC_REG.DMA_FAULTS), 3n);
  assert.equal(
    regs.u64(NIC_REG.LAST_FAULT_IOVA),
    roRing.iova,
    'the head does not move past a faulted buffer',
  );
  assert.equal(regs.u64(NIC_REG.RX_DROPPED), 3n);
  assert.equal(regs.u64(NIC_REG.RX_PACKETS), 0n);
  assert.deepEqual(guestBytes(v.p, v.ram, RAM_BYTES), before, 'guest memory untouched');
  assert.deepEqual(hwptDirtyPages(v, RO_IOVA, RO_BYTES), []);
  assert.deepEqual(
    bitsOf(nic.vfio.dmaLoggingReport({ iova: RO_IOVA, length: RO_BYTES, pageSize: PAGE })),
    [],
  );

  // A working ring, then its mapping goes: the next packet faults at its buffer's IOVA.
  const good = createNicDevice({ flowTableBytes: 1 << 16, rxRing: RING, dma: new DmaPort(v.space), seed: 8 });
  good.work(3);
  v.ctx.ioasUnmap({ ioasId: v.ioas, iova: RW_IOVA, length: RW_BYTES });
  const after = guestBytes(v.p, v.ram, RW_BYTES);
  good.work(2);
  const g = nicRegs(good);
  assert.equal(g.u64(NIC_REG.RX_PACKETS), 3n);
  assert.equal(g.u64(NIC_REG.DMA_FAULTS), 2n);
  assert.equal(g.u64(NIC_REG.LAST_FAULT_IOVA), RING.iova + 3n * BigInt(RING.bufferBytes));
  assert.deepEqual(guestBytes(v.p, v.ram, RW_BYTES), after);

  // The fault report is migratable state: a destination NIC loads it.
  const dest = createNicDevice({ flowTableBytes: 1 << 16, rxRing: RING, seed: 1 });
  loadStream(dest, saveStream(good, { workUnits: 1 }));
  assert.equal(dest.digest(), good.digest());
  assert.equal(nicRegs(dest).u64(NIC_REG.DMA_FAULTS), g.u64(NIC_REG.DMA_FAULTS));
  assert.equal(nicRegs(dest).u64(NIC_REG.LAST_FAULT_IOVA), g.u64(NIC_REG.LAST_FAULT_IOVA));
});

test('a nic given no DMA port still offers DMA logging; its DMA faults until rebound', () => {
  const v = vm();
  const nic = createNicDevice({ flowTableBytes: 1 << 16, rxRing: RING, seed: 9 });
  nic.vfio.dmaLoggingStart({ pageSize: PAGE, ranges: [{ iova: RW_IOVA, length: RW_BYTES }] });
  nic.work(2);
  assert.equal(nicRegs(nic).u64(NIC_REG.DMA_FAULTS), 2n);
  nic.vfio.dma!.rebind(v.space);
  nic.work(1);
  assert.equal(nicRegs(nic).u64(NIC_REG.RX_PACKETS), 1n);
  assert.deepEqual(
    bitsOf(nic.vfio.dmaLoggingReport({ iova: RW_IOVA, length: RW_BYTES, pageSize: PAGE })),
    ringPages(1),
  );
});

test('accel over iommufd: jobs read guest input and write completions; faults counted, nothing written', () => {
  const v = vm();
  const slots = 15;
  const guestBuffer = { iova: RW_IOVA + 0x100000n, bytes: 64 * 1024 };
  const bufVa = v.ram + 0x100000n;
  // Each input slot holds its own number in every byte.
  for (let s = 0; s < 16; s++) v.p.write(bufVa + BigInt(s) * PAGE, new Uint8Array(4096).fill(s + 1));
  v.ctx.hwptSetDirtyTracking({ flags: 1, hwptId: v.hwpt });
  const accel = createAccelDevice({ memoryBytes: 1 << 20, dma: new DmaPort(v.space), guestBuffer, seed: 3 });
  accel.work(1);
  const ctx = accel.driver.image.region('context');
  const offset = Number(ctx.u64(ACCEL_CTX.LAST_OFFSET));
  const length = Number(ctx.u64(ACCEL_CTX.LAST_LENGTH));
  const input = accel.driver.image.region('memory').memory.view(offset, Math.min(4096, length));
  assert.ok(
    input[0]! >= 1 && input[0]! <= slots && input.every((b) => b === input[0]),
    'one guest slot read',
  );
  const completion = new DataView(guestBytes(v.p, bufVa + 64n * 1024n - 64n, 64).buffer);
  assert.equal(completion.getBigUint64(0, true), 0n, 'job 0');
  assert.equal(completion.getBigUint64(8, true), BigInt(offset));
  assert.equal(completion.getUint32(16, true), length);
  assert.equal(ctx.u64(ACCEL_CTX.DMA_BYTES), 4096n + 64n);
  assert.deepEqual(hwptDirtyPages(v, guestBuffer.iova, 64n * 1024n), [15], 'only the completion page');

  // The buffer under the read-only mapping: inputs read fine, every completion faults.
  const roBuffer = { iova: RO_IOVA, bytes: 64 * 1024 };
  const ro = createAccelDevice({
    memoryBytes: 1 << 20,
    dma: new DmaPort(v.space),
    guestBuffer: roBuffer,
    seed: 4,
  });
  const before = guestBytes(v.p, v.ram, RAM_BYTES);
  ro.work(4);
  const rctx = ro.driver.image.region('context');
  assert.equal(rctx.u64(ACCEL_CTX.DMA_FAULTS), 4n);
  assert.equal(rctx.u64(ACCEL_CTX.LAST_FAULT_IOVA), RO_IOVA + 64n * 1024n - 64n);
  assert.equal(rctx.u64(ACCEL_CTX.DMA_BYTES), 4n * 4096n);
  assert.equal(rctx.u64(ACCEL_CTX.COMPLETED), 4n);
  assert.deepEqual(guestBytes(v.p, v.ram, RAM_BYTES), before);

  // An unmapped buffer: the input read faults first, no completion is attempted.
  const gone = { iova: 0x1_0000_0000n, bytes: 64 * 1024 };
  const lost = createAccelDevice({
    memoryBytes: 1 << 20,
    dma: new DmaPort(v.space),
    guestBuffer: gone,
    seed: 4,
  });
  lost.work(2);
  const lctx = lost.driver.image.region('context');
  assert.equal(lctx.u64(ACCEL_CTX.DMA_FAULTS), 2n);
  assert.ok(lctx.u64(ACCEL_CTX.LAST_FAULT_IOVA) >= gone.iova);
  assert.equal(lctx.u64(ACCEL_CTX.DMA_BYTES), 0n);
});

test('type1: the same nic over a ContainerDmaSpace; read-only and unmapped IOVAs fault in the device', () => {
  const host = new Host();
  const p = host.spawn({ uid: 1000, rlimitMemlockBytes: 64n * MiB });
  const ram = p.mmap({ lengthBytes: RAM_BYTES });
  const c = VfioContainer.open(p);
  const group = new VfioGroup({ name: 'g0' });
  c.attachGroup(group);
  c.setIommu(3); // VFIO_TYPE1v2_IOMMU
  c.mapDma({ flags: 3, vaddr: ram, iova: RW_IOVA, size: RW_BYTES });
  c.mapDma({ flags: 1, vaddr: ram + RO_OFFSET, iova: RO_IOVA, size: RO_BYTES });
  const space: DmaSpace = c.openDevice(group, { name: 'vf0' }).dmaSpace();
  const nic = createNicDevice({ flowTableBytes: 1 << 16, rxRing: RING, dma: new DmaPort(space), seed: 5 });
  const flat = new MemoryDmaSpace(new Uint8Array(RING.entries * RING.bufferBytes), { base: RING.iova });
  const twin = createNicDevice({ flowTableBytes: 1 << 16, rxRing: RING, dma: new DmaPort(flat), seed: 5 });
  nic.vfio.dmaLoggingStart({ pageSize: PAGE, ranges: [{ iova: RW_IOVA, length: RW_BYTES }] });
  nic.work(6);
  twin.work(6);
  assert.deepEqual(guestBytes(p, ram + (RING.iova - RW_IOVA), flat.bytes.length), flat.bytes);
  assert.deepEqual(
    bitsOf(nic.vfio.dmaLoggingReport({ iova: RW_IOVA, length: RW_BYTES, pageSize: PAGE })),
    ringPages(6),
  );
  const ro = createNicDevice({
    flowTableBytes: 1 << 16,
    rxRing: { ...RING, iova: RO_IOVA },
    dma: new DmaPort(space),
    seed: 5,
  });
  const before = guestBytes(p, ram, RAM_BYTES);
  ro.work(2);
  assert.equal(nicRegs(ro).u64(NIC_REG.DMA_FAULTS), 2n);
  assert.equal(nicRegs(ro).u64(NIC_REG.LAST_FAULT_IOVA), RO_IOVA);
  assert.deepEqual(guestBytes(p, ram, RAM_BYTES), before);
  c.unmapDma({ flags: 0, iova: RW_IOVA, size: RW_BYTES });
  nic.work(1);
  assert.equal(nicRegs(nic).u64(NIC_REG.DMA_FAULTS), 1n);
  assert.equal(nicRegs(nic).u64(NIC_REG.LAST_FAULT_IOVA), RING.iova + 6n * BigInt(RING.bufferBytes));
});
