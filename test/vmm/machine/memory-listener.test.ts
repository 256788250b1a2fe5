import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { Host, type Process } from '../../../src/kernel/host/index.js';
import { DmaFault } from '../../../src/kernel/vfio/dma-port.js';
import type { VfioError } from '../../../src/uapi/error.js';
import type { DmaMappingInfo, VmDmaBackend } from '../../../src/vmm/machine/dma-backend.js';
import { GuestRam } from '../../../src/vmm/machine/guest-ram.js';
import { IommufdBackend } from '../../../src/vmm/machine/iommufd-backend.js';
import { DmaMappingLimitError, GuestRamPinError } from '../../../src/vmm/machine/machine-errors.js';
import { MediatedDevice } from '../../../src/vmm/machine/mediated-device.js';
import { addMemfdRamBlock, type MemfdRamBlock } from '../../../src/vmm/machine/memfd-ram.js';
import { VfioMemoryListener } from '../../../src/vmm/machine/memory-listener.js';
import { Type1Backend } from '../../../src/vmm/machine/type1-backend.js';

const MiB = 1024 * 1024;
const PAGES_PER_MIB = 256;
const VMEM_GPA = 1n << 32n;

interface Rig {
  vmm: Process;
  ram: GuestRam;
  blocks: MemfdRamBlock[];
  backend: VmDmaBackend;
  listener: VfioMemoryListener;
  fatal: VfioError[];
}

/** 8 MiB of boot RAM and a 16 MiB discardable region of 1 MiB blocks, one assigned device, one mdev. */
function rig(kind: 'iommufd' | 'type1', memlockMiB = 64, plugged: number[] = [], blockSizeBytes = MiB): Rig {
  const host = new Host();
  const vmm = host.spawn({ uid: 107, rlimitMemlockBytes: BigInt(memlockMiB * MiB) });
  const ram = new GuestRam();
  const blocks = [
    addMemfdRamBlock(vmm, ram, { name: 'pc.ram', sizeBytes: 8 * MiB, gpa: 0n }),
    addMemfdRamBlock(vmm, ram, {
      name: 'vmem0',
      sizeBytes: 16 * MiB,
      gpa: VMEM_GPA,
      discard: { blockSizeBytes },
    }),
  ];
  for (const b of plugged) blocks[1]!.block.discard!.plug(b);
  const devices = [{ name: 'vf0' }];
  const backend =
    kind === 'iommufd'
      ? IommufdBackend.open(vmm, { devices, accountingMode: 'user' })
      : Type1Backend.open(vmm, { devices, emulatedDevices: ['mdev0'], accountingMode: 'mm' });
  const fatal: VfioError[] = [];
  const listener = new VfioMemoryListener({
    vm: 'vm0',
    blocks,
    backend,
    process: vmm,
    onFatal: (err) => fatal.push(err),
  });
  return { vmm, ram, blocks, backend, listener, fatal };
}

const m = (iova: bigint, mib: number): DmaMappingInfo => ({ iova, lengthBytes: BigInt(mib * MiB) });
const vmemBlock = (b: number) => VMEM_GPA + BigInt(b * MiB);

for (const kind of ['iommufd', 'type1'] as const) {
  describe(`memory listener on ${kind}`, () => {
    test('maps boot RAM whole and the discardable region only where plugged, one mapping per block', () => {
      const r = rig(kind, 64, [2, 3]);
      r.listener.register();
      assert.deepEqual(r.backend.mappings(), [m(0n, 8), m(vmemBlock(2), 1), m(vmemBlock(3), 1)]);
      assert.equal(r.listener.mappedBytes, 10 * MiB);
      assert.equal(r.backend.lockedPages(), 10 * PAGES_PER_MIB, 'pinned and charged at map: a domain exists');

      // Plug maps, unplug unmaps; device DMA follows.
      const vmem = r.blocks[1]!.block.discard!;
      vmem.plug(7);
      const space = r.backend.deviceSpace('vf0');
      space.write(vmemBlock(7) + 10n, Uint8Array.of(42));
      assert.equal(r.blocks[1]!.block.memory.view(7 * MiB + 10, 1)[0], 42);
      vmem.unplug(2);
      assert.deepEqual(r.backend.mappings(), [m(0n, 8), m(vmemBlock(3), 1), m(vmemBlock(7), 1)]);
      assert.throws(() => space.write(vmemBlock(2), Uint8Array.of(1)), DmaFault);
      assert.equal(r.backend.lockedPages(), 10 * PAGES_PER_MIB);
      vmem.unplug(7);
      assert.equal(r.blocks[1]!.block.memory.view(7 * MiB + 10, 1)[0], 0, 'discarded after the unmap');

      r.listener.unregister();
      assert.deepEqual(r.backend.mappings(), []);
      assert.equal(r.backend.lockedPages(), 0);
      vmem.plug(9);
      assert.deepEqual(r.backend.mappings(), [], 'no longer listening');
      assert.deepEqual(r.fatal, []);
      r.backend.close();
    });

    test('a plug that cannot be pinned is refused, reported as fatal, and leaves the mappings as they were', () => {
      const r = rig(kind, 10, [0]); // boot 8 MiB + block 0 + one more fit
      r.listener.register();
      const vmem = r.blocks[1]!.block.discard!;
      vmem.plug(1);
      const before = r.backend.mappings();
      assert.throws(
        () => vmem.plug(2),
        (err: unknown) => {
          assert.ok(err instanceof GuestRamPinError, String(err));
          assert.equal(err.op, 'memory plug');
          assert.equal(err.accountingMode, kind === 'iommufd' ? 'user' : 'mm');
          assert.equal(err.memlockLimitBytes, BigInt(10 * MiB));
          assert.deepEqual(err.limit, { kind: 'RLIMIT_MEMLOCK', bytes: BigInt(10 * MiB) });
          assert.equal(err.lockedPages, 10 * PAGES_PER_MIB);
          assert.equal(err.section.iova, vmemBlock(2));
          assert.match(err.message, /RLIMIT_MEMLOCK 10 MiB/);
          return true;
        },
      );
      assert.equal(vmem.isPlugged(2), false, 'the plug was refused');
      assert.deepEqual(r.backend.mappings(), before);
      assert.equal(r.fatal.length, 1);
      assert.ok(r.fatal[0] instanceof GuestRamPinError);
      r.backend.close();
    });

    test('a refused registration leaves nothing mapped or charged', () => {
      const r = rig(kind, 9, [0, 1]); // boot RAM fits, block 1 does not
      assert.throws(
        () => r.listener.register(),
        (err: unknown) => err instanceof GuestRamPinError && err.section.iova === vmemBlock(1),
      );
      assert.equal(r.listener.registered, false);
      assert.deepEqual(r.backend.mappings(), []);
      assert.equal(r.backend.lockedPages(), 0);
      assert.deepEqual(r.fatal, [], 'not a run-time failure');
      r.backend.close();
    });

    test('an unplug under an emulated device pin: the device is told, unpins, then the block goes', () => {
      const r = rig(kind, 64, [4]);
      r.listener.register();
      const mdev = new MediatedDevice({ name: 'mdev0', iova: vmemBlock(4) + 8192n, pages: 2 });
      mdev.connect(r.backend.openEmulatedDevice('mdev0', (iova, length) => mdev.onUnmap(iova, length)));
      mdev.tick();
      mdev.tick();
      const record = new Uint8Array(8);
      r.blocks[1]!.block.read(4 * MiB + 8192 + 64, record);
      assert.equal(new DataView(record.buffer).getBigUint64(0, true), 1n, 'record 1 in guest RAM');
      assert.equal(mdev.status().pinnedBytes, 8192);
      r.blocks[1]!.block.discard!.unplug(4);
      assert.equal(mdev.status().pinnedBytes, 0);
      assert.equal(mdev.status().unmapNotices, 1);
      assert.deepEqual(r.backend.mappings(), [m(0n, 8)]);
      mdev.tick();
      assert.equal(mdev.status().ticksWithoutPages, 1);
      mdev.disconnect();
      r.listener.unregister();
      assert.equal(r.backend.lockedPages(), 0);
      r.backend.close();
    });
  });
}

test('type1: the mapping estimate is checked before anything is mapped; iommufd has no such limit', () => {
  const t1 = rig('type1', 64, [0], 4096); // 4096 blocks of 4 KiB: 4096 + 512 - 1 mappings
  assert.equal(t1.listener.estimate()!.mappings, 4607);
  t1.listener.register(); // 4607 <= 65535
  t1.listener.unregister();
  t1.backend.close();

  const host = new Host({ modules: { vfioIommuType1: { dmaEntryLimit: 4000 } } });
  const vmm = host.spawn({ rlimitMemlockBytes: BigInt(64 * MiB) });
  const ram = new GuestRam();
  const blocks = [
    addMemfdRamBlock(vmm, ram, { name: 'pc.ram', sizeBytes: 8 * MiB, gpa: 0n }),
    addMemfdRamBlock(vmm, ram, {
      name: 'vmem0',
      sizeBytes: 16 * MiB,
      gpa: VMEM_GPA,
      discard: { blockSizeBytes: 4096 },
    }),
  ];
  const listen = (backend: VmDmaBackend) =>
    new VfioMemoryListener({ vm: 'vm0', blocks, backend, process: vmm, onFatal: () => {} });
  const type1 = Type1Backend.open(vmm, {
    devices: [{ name: 'vf0' }],
    emulatedDevices: [],
    accountingMode: 'mm',
  });
  assert.deepEqual(type1.mappingLimit, { limit: 4000, reported: true });
  assert.throws(
    () => listen(type1).register(),
    (err: unknown) =>
      err instanceof DmaMappingLimitError && err.limit === 4000 && err.estimate.mappings === 4607,
  );
  assert.deepEqual(type1.mappings(), []);
  type1.close();
  const iommufd = IommufdBackend.open(vmm, { devices: [{ name: 'vf0' }], accountingMode: 'user' });
  assert.equal(iommufd.mappingLimit, undefined);
  const l = listen(iommufd);
  l.register();
  assert.equal(iommufd.mappings().length, 1);
  l.unregister();
  iommufd.close();
});
