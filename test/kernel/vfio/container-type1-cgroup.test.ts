/** softvfio cgroup extension on VFIO type1: pins charged to the owner's cgroup hierarchy too. */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { type Capability, Host, RLIM_INFINITY } from '../../../src/kernel/host/index.js';
import { VfioContainer, VfioGroup } from '../../../src/kernel/vfio/container.js';
import { isErrno } from '../../../src/uapi/error.js';
import { ALL, MAP_VADDR, MiB, PAGE, pinningDevice, RW, TYPE1v2, UNMAP_VADDR } from './container-helpers.js';

/** ENOMEM refused by a cgroup limit (not by RLIMIT_MEMLOCK). */
function refusedByCgroup(fn: () => unknown): void {
  assert.throws(fn, (e: unknown) => {
    if (!isErrno(e, 'ENOMEM')) throw e;
    assert.match(e instanceof Error ? e.message : '', /pinned\.max/);
    return true;
  });
}

/** /machine (limit `machine`) and /machine/vm1 (limit `vm`); QEMU in vm1 with a type1 container and a VF. */
function rig(
  o: { machine?: bigint; vm?: bigint; caps?: Capability[]; rlimit?: bigint; mdevOnly?: boolean } = {},
) {
  const host = new Host();
  const machine = host.rootCgroup.mkdir('machine', { pinnedLimitBytes: o.machine });
  const vm1 = machine.mkdir('vm1', { pinnedLimitBytes: o.vm });
  const qemu = host.spawn({
    uid: 107,
    rlimitMemlockBytes: o.rlimit ?? RLIM_INFINITY,
    caps: o.caps ?? [],
    cgroup: vm1,
  });
  const c = VfioContainer.open(qemu);
  const group = o.mdevOnly
    ? new VfioGroup({ name: 'mdev', type: 'emulated' })
    : new VfioGroup({ name: 'vf0' });
  c.attachGroup(group);
  c.setIommu(TYPE1v2);
  return { host, machine, vm1, qemu, c, group };
}

test('type1 MAP_DMA: charged to the cgroup; over its limit (or an ancestor) ENOMEM, the map undone', () => {
  const { host, machine, vm1, qemu, c } = rig({ machine: 12n * MiB, vm: 8n * MiB });
  const va = qemu.mmap({ lengthBytes: 16n * MiB });
  c.mapDma({ flags: RW, vaddr: va, iova: 0n, size: 8n * MiB });
  assert.equal(vm1.pinnedBytes, 8n * MiB);
  assert.equal(machine.pinnedBytes, 8n * MiB);
  assert.equal(qemu.mm.lockedVm, 2048);
  refusedByCgroup(() => c.mapDma({ flags: RW, vaddr: va + 8n * MiB, iova: 8n * MiB, size: PAGE }));
  assert.equal(c.type1!.dmaCount, 1, 'the refused dma is gone');
  assert.equal(qemu.mm.lockedVm, 2048, 'its locked_vm charge was undone');
  assert.equal(vm1.pinnedBytes, 8n * MiB);
  assert.equal(vm1.pinnedMaxEvents, 1);
  assert.deepEqual(
    c.type1!.dmas().map((d) => [d.cgroup?.path, d.cgroupPages]),
    [['/machine/vm1', 2048]],
  );
  // A second VM under /machine: its own 8 MiB would fit, /machine's 12 MiB does not.
  const vm2 = machine.mkdir('vm2', { pinnedLimitBytes: 8n * MiB });
  const other = host.spawn({ uid: 107, rlimitMemlockBytes: RLIM_INFINITY, cgroup: vm2 });
  const c2 = VfioContainer.open(other);
  c2.attachGroup(new VfioGroup({ name: 'vf1' }));
  c2.setIommu(TYPE1v2);
  const va2 = other.mmap({ lengthBytes: 8n * MiB });
  refusedByCgroup(() => c2.mapDma({ flags: RW, vaddr: va2, iova: 0n, size: 8n * MiB }));
  assert.equal(machine.pinnedMaxEvents, 1);
  c2.mapDma({ flags: RW, vaddr: va2, iova: 0n, size: 4n * MiB });
  assert.equal(machine.pinnedBytes, 12n * MiB);
  c.unmapDma({ flags: ALL, iova: 0n, size: 0n });
  c2.unmapDma({ flags: ALL, iova: 0n, size: 0n });
  assert.equal(machine.pinnedPages, 0);
  assert.equal(qemu.mm.lockedVm, 0);
});

test('type1: CAP_IPC_LOCK skips RLIMIT_MEMLOCK, not the cgroup limit', () => {
  const { vm1, qemu, c } = rig({ vm: 4n * MiB, caps: ['CAP_IPC_LOCK'], rlimit: 0n });
  const va = qemu.mmap({ lengthBytes: 8n * MiB });
  c.mapDma({ flags: RW, vaddr: va, iova: 0n, size: 4n * MiB });
  refusedByCgroup(() => c.mapDma({ flags: RW, vaddr: va + 4n * MiB, iova: 4n * MiB, size: PAGE }));
  assert.equal(qemu.mm.lockedVm, 1024);
  assert.equal(vm1.pinnedBytes, 4n * MiB);
});

test('type1 replay: the first IOMMU group pins every mapping; over the cgroup limit the attach is undone', () => {
  const { vm1, qemu, c } = rig({ vm: 1n * MiB, mdevOnly: true });
  const va = qemu.mmap({ lengthBytes: 2n * MiB });
  c.mapDma({ flags: RW, vaddr: va, iova: 0n, size: 1n * MiB });
  c.mapDma({ flags: RW, vaddr: va + 1n * MiB, iova: 1n * MiB, size: PAGE });
  assert.equal(vm1.pinnedPages, 0, 'no domain: nothing pinned');
  const vf = new VfioGroup({ name: 'vf0' });
  refusedByCgroup(() => c.attachGroup(vf));
  assert.equal(c.type1!.domainCount, 0);
  assert.equal(vm1.pinnedPages, 0);
  assert.equal(qemu.mm.lockedVm, 0);
  assert.ok(c.type1!.dmas().every((d) => !d.iommuMapped && d.cgroupPages === 0));
  c.unmapDma({ flags: 0, iova: 1n * MiB, size: PAGE });
  c.attachGroup(vf);
  assert.equal(vm1.pinnedBytes, 1n * MiB);
});

test('type1 vfio_pin_pages (mdev, no domain): charged per page to the cgroup; ENOMEM undoes the call', () => {
  const { vm1, qemu, c, group } = rig({ vm: 4n * PAGE, mdevOnly: true });
  const { pin, unpin } = pinningDevice(c, group);
  const va = qemu.mmap({ lengthBytes: 1n * MiB });
  c.mapDma({ flags: RW, vaddr: va, iova: 0n, size: 1n * MiB });
  pin(0n, 3, RW);
  assert.equal(vm1.pinnedPages, 3);
  pin(0n, 3, RW); // the same pages: not charged again
  assert.equal(vm1.pinnedPages, 3);
  refusedByCgroup(() => pin(3n * PAGE, 2, RW));
  assert.equal(vm1.pinnedPages, 3, "the call's first page was unpinned again");
  assert.equal(qemu.mm.lockedVm, 3);
  pin(3n * PAGE, 1, RW);
  assert.equal(vm1.pinnedPages, 4);
  unpin(0n, 3);
  unpin(0n, 3);
  unpin(3n * PAGE, 1);
  assert.equal(vm1.pinnedPages, 0);
  assert.equal(qemu.mm.lockedVm, 0);
});

test('type1: moving QEMU to another cgroup moves no charge; after exec the unmap still releases the cgroup', () => {
  const { machine, vm1, qemu, c } = rig();
  const vm2 = machine.mkdir('vm2');
  const va = qemu.mmap({ lengthBytes: 2n * MiB });
  c.mapDma({ flags: RW, vaddr: va, iova: 0n, size: 1n * MiB });
  vm2.attach(qemu);
  c.mapDma({ flags: RW, vaddr: va + 1n * MiB, iova: 1n * MiB, size: 1n * MiB });
  assert.equal(vm1.pinnedBytes, 1n * MiB, 'stays where it was charged');
  assert.equal(vm2.pinnedBytes, 1n * MiB);
  const oldMm = qemu.mm;
  qemu.exec();
  assert.equal(qemu.cgroup, vm2);
  c.unmapDma({ flags: 0, iova: 0n, size: 1n * MiB });
  assert.equal(vm1.pinnedPages, 0, 'released to vm1');
  assert.equal(oldMm.lockedVm, 512, 'the dead mm keeps its count (kernel behaviour), the cgroup does not');
  c.unmapDma({ flags: 0, iova: 1n * MiB, size: 1n * MiB });
  assert.equal(vm2.pinnedPages, 0);
});

test('type1 live update (MAP_DMA + VADDR): the cgroup charge moves to the new QEMU; ENOMEM changes nothing', () => {
  const { host, machine, vm1, qemu, c } = rig({ machine: 6n * MiB, vm: 4n * MiB });
  const ramFd = qemu.memfdCreate(4n * MiB, 'guest-ram');
  const ram = qemu.mmap({ lengthBytes: 4n * MiB, fd: ramFd });
  c.mapDma({ flags: RW, vaddr: ram, iova: 0n, size: 4n * MiB });
  c.unmapDma({ flags: ALL | UNMAP_VADDR, iova: 0n, size: 0n });
  const small = machine.mkdir('small', { pinnedLimitBytes: 2n * MiB });
  const next = machine.mkdir('vm1-next', { pinnedLimitBytes: 4n * MiB });
  const successor = (cgroup: typeof vm1) => {
    const p = host.spawn({ uid: 107, rlimitMemlockBytes: RLIM_INFINITY, cgroup });
    const fd = p.installFd(qemu.file(ramFd)!);
    return { p, c: c.as(p), ram: p.mmap({ lengthBytes: 4n * MiB, fd }) };
  };
  const tooSmall = successor(small);
  refusedByCgroup(() =>
    tooSmall.c.mapDma({ flags: MAP_VADDR, vaddr: tooSmall.ram, iova: 0n, size: 4n * MiB }),
  );
  const [dma] = c.type1!.dmas();
  assert.ok(dma!.vaddrInvalid, 'still invalid');
  assert.equal(dma!.owner, qemu);
  assert.equal(qemu.mm.lockedVm, 1024);
  assert.equal(tooSmall.p.mm.lockedVm, 0);
  assert.deepEqual([vm1.pinnedBytes, small.pinnedBytes, machine.pinnedBytes], [4n * MiB, 0n, 4n * MiB]);
  // Into a sibling of vm1: /machine (6 MiB) would not hold 4 + 4, a move is fine.
  const good = successor(next);
  good.c.mapDma({ flags: MAP_VADDR, vaddr: good.ram, iova: 0n, size: 4n * MiB });
  assert.deepEqual([vm1.pinnedBytes, next.pinnedBytes, machine.pinnedBytes], [0n, 4n * MiB, 4n * MiB]);
  assert.deepEqual([qemu.mm.lockedVm, good.p.mm.lockedVm], [0, 1024]);
  qemu.exit();
  good.c.unmapDma({ flags: ALL, iova: 0n, size: 0n });
  assert.equal(next.pinnedPages, 0);
  assert.equal(machine.pinnedPages, 0);
});
