import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Host } from '../../../src/kernel/host/index.js';
import { IommufdContext, IommufdVfioCompat } from '../../../src/kernel/iommufd/index.js';
import { findInfoCap, type VfioContainerApi } from '../../../src/kernel/vfio/container-api.js';
import { VfioContainer, VfioGroup } from '../../../src/kernel/vfio/container.js';
import { DmaPort } from '../../../src/kernel/vfio/dma-port.js';
import { VfioError } from '../../../src/uapi/error.js';
import {
  ALL,
  GiB,
  MAP_VADDR,
  MiB,
  PAGE,
  pinningDevice,
  RW,
  throwsErrno,
  TYPE1v2,
  UNMAP_VADDR,
  UPDATE_VADDR,
} from './container-helpers.js';

// ---- seed 001: the DMA mapping limit is an error ------------------------------------------------

/**
 * A memory listener that maps guest RAM 4 KiB at a time (a confidential guest converting every
 * page, virtio-mem with a tiny block size): one MAP_DMA per page. It stops at the first error and
 * reports it, as QEMU does since seed 001 (an error that halts the VM, not a warning).
 */
function mapPageByPage(
  c: VfioContainerApi,
  va: bigint,
  pages: number,
): { mapped: number; error?: VfioError } {
  for (let i = 0; i < pages; i++) {
    try {
      c.mapDma({ flags: RW, vaddr: va + BigInt(i) * PAGE, iova: BigInt(i) * PAGE, size: PAGE });
    } catch (e) {
      if (e instanceof VfioError) return { mapped: i, error: e };
      throw e;
    }
  }
  return { mapped: pages };
}

test('seed 001 on type1: 65535 mappings succeed, the 65536th fails ENOSPC; DMA_AVAIL tracks it', () => {
  const host = new Host();
  const qemu = host.spawn({ rlimitMemlockBytes: 1n * GiB });
  const c = VfioContainer.open(qemu);
  c.attachGroup(new VfioGroup({ name: 'vf0' }));
  c.setIommu(TYPE1v2);
  assert.equal(findInfoCap(c.iommuGetInfo(), 3)?.avail, 65535);
  const va = qemu.mmap({ lengthBytes: 65536n * PAGE + 1n * MiB });
  const run = mapPageByPage(c, va, 65536);
  assert.equal(run.mapped, 65535);
  assert.ok(run.error, 'the failure is an error the caller sees');
  assert.equal(run.error.errno, 'ENOSPC');
  assert.equal(run.error.errnoNumber, 28);
  assert.equal(run.error.code, 'VFIO_ENOSPC');
  assert.match(run.error.message, /dma_entry_limit/);
  assert.equal(findInfoCap(c.iommuGetInfo(), 3)?.avail, 0);
  assert.equal(qemu.mm.lockedVm, 65535, 'every mapped page pinned and charged');
  // Nothing half-done: the refused page is not mapped, retrying is refused the same way.
  throwsErrno(() => c.mapDma({ flags: RW, vaddr: va, iova: 65535n * PAGE, size: PAGE }), 'ENOSPC');
  // One bigger mapping instead of many small ones is what type1 is made for.
  c.unmapDma({ flags: 0, iova: 0n, size: 256n * PAGE });
  assert.equal(findInfoCap(c.iommuGetInfo(), 3)?.avail, 256);
  c.mapDma({ flags: RW, vaddr: va, iova: 0n, size: 256n * PAGE });
  c.mapDma({ flags: RW, vaddr: va, iova: 65535n * PAGE, size: PAGE });
  assert.equal(findInfoCap(c.iommuGetInfo(), 3)?.avail, 254);
  assert.equal(c.unmapDma({ flags: ALL, iova: 0n, size: 0n }).size, 65536n * PAGE);
  assert.equal(findInfoCap(c.iommuGetInfo(), 3)?.avail, 65535);
  assert.equal(qemu.mm.lockedVm, 0);
});

test('seed 001 on iommufd compat: the same workload is not limited by a mapping count', () => {
  const host = new Host();
  const qemu = host.spawn({ rlimitMemlockBytes: 1n * GiB });
  const c = IommufdVfioCompat.open(qemu);
  c.attachDevice({ name: 'vf0' });
  c.setIommu(TYPE1v2);
  const va = qemu.mmap({ lengthBytes: 65537n * PAGE });
  const run = mapPageByPage(c, va, 65537);
  assert.equal(run.error, undefined);
  assert.equal(run.mapped, 65537);
  assert.equal(findInfoCap(c.iommuGetInfo(), 3)?.avail, 0xffffffff, 'DMA_AVAIL reports U32_MAX');
  // What limits it is pinned memory, per mm as type1 does.
  assert.equal(qemu.mm.lockedVm, 65537);
  assert.equal(c.unmapDma({ flags: ALL, iova: 0n, size: 0n }).size, 65537n * PAGE);
  assert.equal(qemu.mm.lockedVm, 0);
});

// ---- seed 003: live update with VFIO_UPDATE_VADDR -----------------------------------------------

const RAM = 8n * MiB;

/** A QEMU with guest RAM in a memfd, a container with one assigned VF and the RAM mapped. */
function vmWithVf(opts: { mdev?: boolean } = {}) {
  const host = new Host();
  const qemu = host.spawn({ rlimitMemlockBytes: 64n * MiB });
  const ramFd = qemu.memfdCreate(RAM, 'guest-ram');
  const ram = qemu.mmap({ lengthBytes: RAM, fd: ramFd });
  const c = VfioContainer.open(qemu);
  const vf = new VfioGroup({ name: 'vf0' });
  c.attachGroup(vf);
  if (opts.mdev) c.attachGroup(new VfioGroup({ name: 'vgpu0', type: 'emulated' }));
  c.setIommu(TYPE1v2);
  // Low and high RAM as two mappings.
  c.mapDma({ flags: RW, vaddr: ram, iova: 0n, size: RAM / 2n });
  c.mapDma({ flags: RW, vaddr: ram + RAM / 2n, iova: 4n * GiB, size: RAM / 2n });
  const nic = new DmaPort(c.openDevice(vf, { name: 'nic' }).dmaSpace());
  return { host, qemu, ramFd, ram, c, vf, nic };
}

test('seed 003 live update on type1: invalidate, exec, re-supply the vaddr; DMA never stops; the charge moves', () => {
  const { qemu, ramFd, ram, c, nic } = vmWithVf();
  assert.equal(qemu.mm.lockedVm, 2048);
  assert.equal(c.checkExtension(UPDATE_VADDR), 1);
  nic.write(0x1000n, new TextEncoder().encode('before'));

  // Old QEMU: every vaddr becomes invalid; nothing is unmapped or unpinned.
  assert.equal(c.unmapDma({ flags: ALL | UNMAP_VADDR, iova: 0n, size: 0n }).size, RAM);
  assert.equal(c.type1!.vaddrInvalidCount, 2);
  const oldMm = qemu.mm;
  qemu.exec(); // same pid and fds (container, memfd), a brand-new address space
  assert.notEqual(qemu.mm, oldMm);

  // The VF keeps doing DMA into guest RAM while no process maps it.
  nic.write(4n * GiB + 0x2000n, new TextEncoder().encode('during'));

  // New QEMU: maps the same memfd (elsewhere) and hands each mapping its new vaddr.
  const ram2 = qemu.mmap({ lengthBytes: RAM, fd: ramFd, at: 0x5000_0000_0000n });
  assert.notEqual(ram2, ram);
  c.mapDma({ flags: MAP_VADDR, vaddr: ram2, iova: 0n, size: RAM / 2n });
  c.mapDma({ flags: MAP_VADDR, vaddr: ram2 + RAM / 2n, iova: 4n * GiB, size: RAM / 2n });
  assert.equal(c.type1!.vaddrInvalidCount, 0);

  // The charge moved to the new mm; the old mm is gone (no one to release it from).
  assert.equal(qemu.mm.lockedVm, 2048);
  assert.ok(c.type1!.dmas().every((d) => d.owner === qemu && !d.vaddrInvalid));

  // Guest RAM kept every byte, and the device and the new QEMU see the same memory.
  const seen = new Uint8Array(6);
  qemu.read(ram2 + 0x1000n, seen);
  assert.equal(new TextDecoder().decode(seen), 'before');
  qemu.read(ram2 + RAM / 2n + 0x2000n, seen);
  assert.equal(new TextDecoder().decode(seen), 'during');
  qemu.write(ram2 + 0x3000n, new TextEncoder().encode('after!'));
  nic.read(0x3000n, seen);
  assert.equal(new TextDecoder().decode(seen), 'after!');
  // New groups can be attached again once every vaddr is valid.
  c.attachGroup(new VfioGroup({ name: 'vf1' }));
});

test('seed 003 live update on type1 with a separate new process: the old mm is released', () => {
  const { host, qemu, ramFd, c } = vmWithVf();
  c.unmapDma({ flags: ALL | UNMAP_VADDR, iova: 0n, size: 0n });
  // The new QEMU got the fds over a socket; the old one is still alive.
  const next = host.spawn({ rlimitMemlockBytes: 64n * MiB });
  const fd = next.installFd(qemu.file(ramFd)!);
  const ram = next.mmap({ lengthBytes: RAM, fd });
  const c2 = c.as(next);
  c2.mapDma({ flags: MAP_VADDR, vaddr: ram, iova: 0n, size: RAM / 2n });
  assert.deepEqual([qemu.mm.lockedVm, next.mm.lockedVm], [1024, 1024]);
  c2.mapDma({ flags: MAP_VADDR, vaddr: ram + RAM / 2n, iova: 4n * GiB, size: RAM / 2n });
  assert.deepEqual([qemu.mm.lockedVm, next.mm.lockedVm], [0, 2048]);
  qemu.exit();
  c2.unmapDma({ flags: ALL, iova: 0n, size: 0n });
  assert.equal(next.mm.lockedVm, 0);
});

test('seed 003 with an mdev: VADDR is refused (EBUSY), so an mdev pin can never wait on a missing vaddr', () => {
  const { c } = vmWithVf({ mdev: true });
  assert.equal(c.checkExtension(UPDATE_VADDR), 0, 'userspace is told up front');
  throwsErrno(() => c.unmapDma({ flags: ALL | UNMAP_VADDR, iova: 0n, size: 0n }), 'EBUSY');
  assert.equal(c.type1!.vaddrInvalidCount, 0);
  // The vGPU keeps pinning and copying: its vaddrs never go away.
  const vgpu = pinningDevice(c, c.groups[1]!, 'vgpu0');
  vgpu.pin(0n, 4, RW);
  vgpu.dev.dmaRw(0x10000n, Uint8Array.of(1, 2, 3), true);
  vgpu.dev.close();
});

test('seed 003: why: during the gap an mdev cannot come in, and any pin fails at once instead of blocking', () => {
  const { c, vf } = vmWithVf();
  // A driver in the VF group that pins pages (dma_unmap capable) - not an mdev, so VADDR is allowed.
  const pinner = pinningDevice(c, vf, 'pinner');
  c.unmapDma({ flags: ALL | UNMAP_VADDR, iova: 0n, size: 0n });
  // v5.12-v6.2 slept here until the vaddr came back; a device close during that sleep was the
  // seed-003 deadlock. v6.3+ (and softvfio): EBUSY, returned at once.
  throwsErrno(() => pinner.pin(0n, 1, RW), 'EBUSY');
  throwsErrno(() => pinner.dev.dmaRw(0n, new Uint8Array(1), false), 'EBUSY');
  pinner.dev.close(); // nothing is blocked: the close completes
  // An mdev cannot appear while a vaddr is invalid.
  throwsErrno(() => c.attachGroup(new VfioGroup({ name: 'vgpu0', type: 'emulated' })), 'EBUSY');
});

test('seed 003 on iommufd: no VADDR through compat; the live update is MAP_FILE + IOAS_CHANGE_PROCESS', () => {
  const host = new Host();
  const qemu = host.spawn({ rlimitMemlockBytes: 64n * MiB });
  const c = IommufdVfioCompat.open(qemu);
  const { devId, ioasId } = c.attachDevice({ name: 'vf0' });
  assert.equal(c.checkExtension(UPDATE_VADDR), 0);
  const ramFd = qemu.memfdCreate(RAM);
  const ram = qemu.mmap({ lengthBytes: RAM, fd: ramFd });
  c.mapDma({ flags: RW, vaddr: ram, iova: 0n, size: RAM });
  throwsErrno(() => c.unmapDma({ flags: ALL | UNMAP_VADDR, iova: 0n, size: 0n }), 'EINVAL');
  throwsErrno(() => c.mapDma({ flags: MAP_VADDR, vaddr: ram, iova: 0n, size: RAM }), 'EINVAL');
  // The iommufd way: guest RAM mapped from the memfd; after exec the new process takes the charge.
  const ctx: IommufdContext = c.iommufd;
  c.unmapDma({ flags: ALL, iova: 0n, size: 0n });
  ctx.ioasMapFile({ flags: 1 | 2 | 4, ioasId, fd: ramFd, start: 0n, length: RAM, iova: 0n });
  assert.equal(qemu.mm.lockedVm, 2048);
  const oldMm = qemu.mm;
  qemu.exec();
  ctx.ioasChangeProcess();
  assert.equal(qemu.mm.lockedVm, 2048);
  assert.equal(oldMm.lockedVm, 0);
  const nic = new DmaPort(c.dmaSpace(devId));
  nic.write(0x10n, Uint8Array.of(7));
  const ram2 = qemu.mmap({ lengthBytes: RAM, fd: ramFd });
  const got = new Uint8Array(1);
  qemu.read(ram2 + 0x10n, got);
  assert.equal(got[0], 7);
});
