import assert from 'node:assert/strict';
import { test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { Host } from '../../../src/kernel/host/index.js';
import { PhysMemoryStore } from '../../../src/kernel/host/phys-memory-store.js';
import { GuestRam } from '../../../src/vmm/machine/guest-ram.js';
import { IommufdBackend } from '../../../src/vmm/machine/iommufd-backend.js';
import { addMemfdRamBlock, releaseMemfdRamBlock } from '../../../src/vmm/machine/memfd-ram.js';
import { Type1Backend } from '../../../src/vmm/machine/type1-backend.js';
import { VcpuSet } from '../../../src/vmm/machine/vcpu-set.js';

const MiB = 1024 * 1024;
const PAGE = 4096;
const GPA = 0x1_0000_0000n;

async function waitUntil(what: string, done: () => boolean, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!done()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(5);
  }
}

test('vCPU writes, VMM accesses and device DMA (iommufd by file, type1 by VA) reach the same bytes', async () => {
  const host = new Host();
  const vmm = host.spawn({ uid: 107, rlimitMemlockBytes: 64n * BigInt(MiB) });
  const ram = new GuestRam();
  const mr = addMemfdRamBlock(vmm, ram, { name: 'pc.ram', sizeBytes: 4 * MiB, gpa: GPA });
  const { block } = mr;
  const file = vmm.file(mr.fd)!.file;
  assert.equal((file.store as PhysMemoryStore).memory, block.memory, 'the memfd is the block memory');

  // The same RAM on two backends at once: IOAS_MAP_FILE from the memfd, type1 MAP_DMA of the VA.
  const section = { ram: mr, offsetBytes: 0, lengthBytes: 4 * MiB, iova: GPA };
  const iommufd = IommufdBackend.open(vmm, { devices: [{ name: 'vf0' }], accountingMode: 'user' });
  const type1 = Type1Backend.open(vmm, {
    devices: [{ name: 'vf1' }],
    emulatedDevices: [],
    accountingMode: 'mm',
  });
  iommufd.mapRam(section);
  type1.mapRam(section);
  const viaIommufd = iommufd.deviceSpace('vf0');
  const viaType1 = type1.deviceSpace('vf1');

  // vCPU worker threads write 128 pages each, 64 bytes per page.
  const vcpus = await VcpuSet.start(ram, {
    count: 2,
    workload: {
      pattern: { kind: 'sequential' },
      workingSetBytes: 256 * PAGE,
      pageWriteLimit: 128,
      writeBytesPerPage: 64,
    },
  });
  try {
    await waitUntil('256 page writes', () => vcpus.totals().pageWrites === 256);
    await vcpus.pause();
    let written = 0;
    for (const page of [0, 1, 100, 127, 128, 200, 255]) {
      const offset = page * PAGE;
      const expected = new Uint8Array(PAGE);
      block.read(offset, expected);
      if (expected.some((b) => b !== 0)) written++;
      const got = new Uint8Array(PAGE);
      viaIommufd.read(GPA + BigInt(offset), got);
      assert.deepEqual(got, expected, `iommufd DMA read of page ${page}`);
      viaType1.read(GPA + BigInt(offset), got);
      assert.deepEqual(got, expected, `type1 DMA read of page ${page}`);
      vmm.read(mr.hostVa + BigInt(offset), got);
      assert.deepEqual(got, expected, `VMM read of page ${page}`);
    }
    assert.equal(written, 7, 'every page looked at was written by a vCPU');

    // Device DMA writes land in the SharedArrayBuffer the vCPU workers hold.
    const shared = new Uint8Array(block.memory.buffers[0]!);
    viaIommufd.write(GPA + 1000n * BigInt(PAGE), Uint8Array.of(0xaa, 0xbb));
    viaType1.write(GPA + 1001n * BigInt(PAGE) + 7n, Uint8Array.of(0xcc));
    assert.deepEqual([...shared.subarray(1000 * PAGE, 1000 * PAGE + 2)], [0xaa, 0xbb]);
    assert.equal(shared[1001 * PAGE + 7], 0xcc);
    const out = new Uint8Array(1);
    vmm.read(mr.hostVa + 1001n * BigInt(PAGE) + 7n, out);
    assert.equal(out[0], 0xcc);
    file.read(1000n * BigInt(PAGE) + 1n, out);
    assert.equal(out[0], 0xbb);
  } finally {
    await vcpus.terminate();
    iommufd.close();
    type1.close();
  }
  assert.equal(vmm.user.lockedVm, 0);
  assert.equal(vmm.mm.lockedVm, 0);
  releaseMemfdRamBlock(vmm, mr);
  assert.equal(vmm.file(mr.fd), undefined);
  assert.equal(vmm.mm.regionAt(mr.hostVa), undefined);
});

test('a memfd RAM block that cannot be added leaves no fd and no mapping behind', () => {
  const host = new Host();
  const vmm = host.spawn();
  const ram = new GuestRam();
  addMemfdRamBlock(vmm, ram, { name: 'a', sizeBytes: MiB, gpa: 0n });
  const regions = vmm.mm.regions.length;
  assert.throws(() => addMemfdRamBlock(vmm, ram, { name: 'b', sizeBytes: MiB, gpa: 4096n }), {
    code: 'ERR_INVALID_ARGUMENT',
  });
  assert.throws(() => addMemfdRamBlock(vmm, ram, { name: 'c', sizeBytes: 1000, gpa: 0n }), {
    code: 'ERR_INVALID_ARGUMENT',
  });
  assert.equal(vmm.mm.regions.length, regions);
  assert.equal(vmm.file(4), undefined, 'only fd 3 (block a) is open');
  assert.ok(vmm.file(3) !== undefined);
});
