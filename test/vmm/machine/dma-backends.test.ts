import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Host } from '../../../src/kernel/host/index.js';
import { IommuOption, IommuOptionOp } from '../../../src/uapi/iommufd.js';
import { GuestRam } from '../../../src/vmm/machine/guest-ram.js';
import { IommufdBackend } from '../../../src/vmm/machine/iommufd-backend.js';
import { addMemfdRamBlock } from '../../../src/vmm/machine/memfd-ram.js';
import { Type1Backend } from '../../../src/vmm/machine/type1-backend.js';

const MiB = 1024 * 1024;
const bad = { code: 'ERR_INVALID_ARGUMENT' };

function vmmWithRam(caps: 'CAP_IPC_LOCK'[] = []) {
  const host = new Host();
  const vmm = host.spawn({ uid: 107, rlimitMemlockBytes: BigInt(64 * MiB), caps });
  const ram = new GuestRam();
  const mr = addMemfdRamBlock(vmm, ram, { name: 'pc.ram', sizeBytes: 4 * MiB, gpa: 0n });
  return { host, vmm, ram, mr, section: { ram: mr, offsetBytes: 0, lengthBytes: 4 * MiB, iova: 0n } };
}

test('iommufd: dirty-tracking devices share one HWPT, a device without it gets its own; all reach the RAM', () => {
  const { vmm, mr, section } = vmmWithRam();
  const backend = IommufdBackend.open(vmm, {
    devices: [{ name: 'a' }, { name: 'b' }, { name: 'plain', iommuDirtyTracking: false }],
    accountingMode: 'user',
  });
  const [a, b, plain] = ['a', 'b', 'plain'].map((n) => backend.device(n));
  assert.equal(a!.hwptId, b!.hwptId);
  assert.notEqual(plain!.hwptId, a!.hwptId);
  backend.mapRam(section);
  mr.block.write(100, Uint8Array.of(9));
  for (const name of ['a', 'b', 'plain']) {
    const got = new Uint8Array(1);
    backend.deviceSpace(name).read(100n, got);
    assert.equal(got[0], 9, name);
  }
  // One pages object for the RAM: charged once whatever the number of domains.
  assert.equal(vmm.user.lockedVm, (4 * MiB) / 4096);
  assert.throws(() => backend.deviceSpace('nope'), bad);
  backend.close();
  assert.equal(vmm.user.lockedVm, 0);
  assert.deepEqual(backend.mappings(), []);
});

test("iommufd 'mm': a manager with CAP_SYS_RESOURCE sets RLIMIT_MODE and hands the fd over; the VMM's mm pays", () => {
  const { host, vmm, section } = vmmWithRam();
  const backend = IommufdBackend.open(vmm, { devices: [{ name: 'a' }], accountingMode: 'mm' });
  const mode = backend.ctx.option({
    optionId: IommuOption.RLIMIT_MODE,
    op: IommuOptionOp.GET,
    objectId: 0,
    val64: 0n,
  });
  assert.equal(mode.val64, 1n);
  assert.equal(backend.ctx.caller, vmm);
  assert.deepEqual([...host.processes], [vmm], 'the manager is gone');
  backend.mapRam(section);
  assert.equal(vmm.mm.lockedVm, 1024);
  assert.equal(vmm.user.lockedVm, 0);
  assert.equal(backend.lockedPages(), 1024);
  backend.close();
  assert.equal(vmm.mm.lockedVm, 0);
});

test("type1: one domain for every device, DMA_AVAIL as QEMU reads it; accounting 'user' and 'none' without CAP_IPC_LOCK refused", () => {
  const { vmm, section } = vmmWithRam();
  assert.throws(
    () => Type1Backend.open(vmm, { devices: [{ name: 'a' }], emulatedDevices: [], accountingMode: 'user' }),
    bad,
  );
  assert.throws(
    () => Type1Backend.open(vmm, { devices: [{ name: 'a' }], emulatedDevices: [], accountingMode: 'none' }),
    bad,
  );
  assert.throws(() => IommufdBackend.open(vmm, { devices: [], accountingMode: 'none' }), bad);
  assert.throws(
    () => Type1Backend.open(vmm, { devices: [], emulatedDevices: [], accountingMode: 'mm' }),
    bad,
  );
  const backend = Type1Backend.open(vmm, {
    devices: [{ name: 'a' }, { name: 'b' }],
    emulatedDevices: ['mdev0'],
    accountingMode: 'mm',
  });
  assert.deepEqual(backend.mappingLimit, { limit: 65535, reported: true });
  assert.equal(backend.container.type1!.domainCount, 1);
  backend.mapRam(section);
  assert.equal(backend.container.type1!.dmaAvail, 65534);
  assert.equal(vmm.mm.lockedVm, 1024);
  const pinner = backend.openEmulatedDevice('mdev0', () => {});
  const pins = pinner.pin(0n, 3 * 4096);
  pins.write(4090, Uint8Array.of(1, 2, 3, 4, 5, 6, 7, 8)); // across a page boundary
  const out = new Uint8Array(8);
  backend.deviceSpace('b').read(4090n, out);
  assert.deepEqual([...out], [1, 2, 3, 4, 5, 6, 7, 8]);
  assert.equal(vmm.mm.lockedVm, 1024, 'mdev pins of pages the domain pinned are not charged again');
  pinner.close();
  backend.unmapRam(section);
  assert.equal(vmm.mm.lockedVm, 0);
  backend.close();
});

test("accounting 'none': a VMM with CAP_IPC_LOCK pins beyond RLIMIT_MEMLOCK", () => {
  const { vmm, section } = vmmWithRam(['CAP_IPC_LOCK']);
  vmm.rlimitMemlockBytes = 0n;
  const iommufd = IommufdBackend.open(vmm, { devices: [{ name: 'a' }], accountingMode: 'none' });
  iommufd.mapRam(section);
  assert.equal(iommufd.lockedPages(), 0, 'iommufd NONE mode charges no locked_vm');
  assert.equal(vmm.mm.lockedVm + vmm.user.lockedVm, 0);
  assert.equal(vmm.mm.pinnedVm, 1024, 'pinned_vm still counts');
  assert.match(iommufd.chargedTo, /CAP_IPC_LOCK/);
  iommufd.close();
  const type1 = Type1Backend.open(vmm, {
    devices: [{ name: 'b' }],
    emulatedDevices: [],
    accountingMode: 'none',
  });
  type1.mapRam(section);
  assert.equal(type1.lockedPages(), 1024, 'type1 counts the mm locked_vm, without the limit');
  assert.equal(vmm.mm.lockedVm, 1024);
  assert.match(type1.chargedTo, /not limited: CAP_IPC_LOCK/);
  type1.close();
  assert.equal(vmm.mm.lockedVm, 0);
});
