import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Host } from '../../../src/kernel/host/index.js';
import { IommufdContext } from '../../../src/kernel/iommufd/index.js';
import { FIXED, GiB, MiB, RW, setup, throwsErrno, U64_MAX } from './helpers.js';

/** A VMM: 4 GiB guest mapped at IOVA 0, a device attached. */
function vmm(host: Host, opts: { perMm: boolean }) {
  const p = host.spawn({ uid: 107, rlimitMemlockBytes: 4n * GiB });
  const ctx = IommufdContext.open(p);
  if (opts.perMm) {
    const admin = host.spawn({ uid: 0, caps: ['CAP_SYS_RESOURCE'] });
    ctx.as(admin).option({ optionId: 0, op: 0, objectId: 0, val64: 1n });
  }
  const ioas = ctx.ioasAlloc().outIoasId;
  const dev = ctx.bindDevice({ name: `vf${p.pid}` }).outDevid;
  ctx.attachIoas({ devId: dev, ptId: ioas });
  const va = p.mmap({ lengthBytes: 4n * GiB });
  const map = () => ctx.ioasMap({ flags: FIXED | RW, ioasId: ioas, userVa: va, length: 4n * GiB, iova: 0n });
  return { p, ctx, ioas, map };
}

test('seed 003: two VMMs under one uid, 4 GiB each, RLIMIT_MEMLOCK 4 GiB: per-user fails the second', () => {
  const host = new Host();
  const a = vmm(host, { perMm: false });
  const b = vmm(host, { perMm: false });
  a.map();
  assert.equal(a.p.user.lockedVm, 1 << 20);
  throwsErrno(() => b.map(), 'ENOMEM');
  assert.equal(a.p.user.lockedVm, 1 << 20, 'the failed map left no charge');
  assert.equal(b.p.mm.pinnedVm, 0);
  assert.equal(b.ctx.ioasIovaRanges({ ioasId: b.ioas, numIovas: 1 }).numIovas, 1);
  throwsErrno(() => b.ctx.ioasUnmap({ ioasId: b.ioas, iova: 0n, length: 4n * GiB }), 'ENOENT');
  assert.equal(a.p.mm.regions[0]!.store.residentBytes, 0, 'pinning touched no byte');
});

test('seed 003: per-mm mode (RLIMIT_MODE 1) admits both', () => {
  const host = new Host();
  const a = vmm(host, { perMm: true });
  const b = vmm(host, { perMm: true });
  a.map();
  b.map();
  assert.equal(a.p.mm.lockedVm, 1 << 20);
  assert.equal(b.p.mm.lockedVm, 1 << 20);
  assert.equal(a.p.user.lockedVm, 0);
  assert.equal(a.p.mm.pinnedVm, 1 << 20);
});

test('CAP_IPC_LOCK: mode none, only pinned_vm moves', () => {
  const { ctx, ioas, p } = setup({ caps: ['CAP_IPC_LOCK'], rlimitMemlockBytes: 0n });
  ctx.attachIoas({ devId: ctx.bindDevice({ name: 'd' }).outDevid, ptId: ioas });
  const va = p.mmap({ lengthBytes: 1n * GiB });
  ctx.ioasMap({ flags: RW, ioasId: ioas, userVa: va, length: 1n * GiB });
  assert.equal(p.user.lockedVm, 0);
  assert.equal(p.mm.lockedVm, 0);
  assert.equal(p.mm.pinnedVm, 1 << 18);
});

test('pins happen only when a domain needs them; attach pins all and rolls back on ENOMEM', () => {
  const { ctx, ioas, p } = setup({ rlimitMemlockBytes: 3n * MiB });
  const va = p.mmap({ lengthBytes: 4n * MiB });
  ctx.ioasMap({ flags: FIXED | RW, ioasId: ioas, userVa: va, length: 2n * MiB, iova: 0n });
  ctx.ioasMap({ flags: FIXED | RW, ioasId: ioas, userVa: va + 2n * MiB, length: 2n * MiB, iova: 2n * MiB });
  assert.equal(p.user.lockedVm, 0);
  const dev = ctx.bindDevice({ name: 'd' }).outDevid;
  throwsErrno(() => ctx.attachIoas({ devId: dev, ptId: ioas }), 'ENOMEM');
  assert.equal(p.user.lockedVm, 0);
  assert.equal(p.mm.pinnedVm, 0);
  ctx.ioasUnmap({ ioasId: ioas, iova: 2n * MiB, length: 2n * MiB });
  ctx.attachIoas({ devId: dev, ptId: ioas });
  assert.equal(p.user.lockedVm, 512);
  // Two maps of the same memory are charged twice.
  throwsErrno(
    () => ctx.ioasMap({ flags: FIXED | RW, ioasId: ioas, userVa: va, length: 2n * MiB, iova: 8n * MiB }),
    'ENOMEM',
  );
  ctx.ioasMap({ flags: FIXED | RW, ioasId: ioas, userVa: va, length: 1n * MiB, iova: 8n * MiB });
  assert.equal(p.user.lockedVm, 768);
  // A second device on the same IOAS shares the domain's pins.
  ctx.attachIoas({ devId: ctx.bindDevice({ name: 'e' }).outDevid, ptId: ioas });
  assert.equal(p.user.lockedVm, 768);
  ctx.ioasUnmap({ ioasId: ioas, iova: 0n, length: U64_MAX });
  assert.equal(p.user.lockedVm, 0);
  assert.equal(p.mm.pinnedVm, 0);
});

test('EFAULT: unmapped VA, write to read-only memory, process gone', () => {
  const { host, ctx, ioas, p } = setup();
  const dev = ctx.bindDevice({ name: 'd' }).outDevid;
  ctx.attachIoas({ devId: dev, ptId: ioas });
  throwsErrno(() => ctx.ioasMap({ flags: RW, ioasId: ioas, userVa: 0x1000n, length: 4096n }), 'EFAULT');
  const ro = p.mmap({ lengthBytes: 4096, writable: false });
  throwsErrno(() => ctx.ioasMap({ flags: RW, ioasId: ioas, userVa: ro, length: 4096n }), 'EFAULT');
  ctx.ioasMap({ flags: 4, ioasId: ioas, userVa: ro, length: 4096n });
  ctx.detach({ devId: dev });
  // Mapped while alive, pinned after exit: EFAULT at first pin.
  const q = host.spawn({ uid: 1000, rlimitMemlockBytes: 64n * MiB });
  const qva = q.mmap({ lengthBytes: 4096 });
  ctx.as(q).ioasMap({ flags: FIXED | RW, ioasId: ioas, userVa: qva, length: 4096n, iova: 0x100000n });
  q.exit();
  throwsErrno(() => ctx.attachIoas({ devId: dev, ptId: ioas }), 'EFAULT');
  assert.equal(p.mm.pinnedVm, 0);
});

test('IOAS_CHANGE_PROCESS: EINVAL with a non-file area, new owner charged first, ENOMEM changes nothing', () => {
  const host = new Host();
  const old = host.spawn({ uid: 1, rlimitMemlockBytes: 16n * MiB });
  const ctx = IommufdContext.open(old);
  const ioas = ctx.ioasAlloc().outIoasId;
  ctx.attachIoas({ devId: ctx.bindDevice({ name: 'd' }).outDevid, ptId: ioas });
  const fd = old.memfdCreate(8n * MiB);
  ctx.ioasMapFile({ flags: RW, ioasId: ioas, fd, start: 0n, length: 8n * MiB });
  assert.equal(old.user.lockedVm, 2048);
  throwsErrno(() => ctx.ioasChangeProcess({ reserved: 1 }), 'EOPNOTSUPP');
  const small = host.spawn({ uid: 2, rlimitMemlockBytes: 4n * MiB });
  throwsErrno(() => ctx.as(small).ioasChangeProcess(), 'ENOMEM');
  assert.equal(old.user.lockedVm, 2048);
  assert.equal(small.user.lockedVm, 0);
  const next = host.spawn({ uid: 2, rlimitMemlockBytes: 16n * MiB });
  ctx.as(next).ioasChangeProcess();
  assert.equal(old.user.lockedVm, 0);
  assert.equal(old.mm.pinnedVm, 0);
  assert.equal(next.user.lockedVm, 2048);
  assert.equal(next.mm.pinnedVm, 2048);
  ctx.as(next).ioasChangeProcess(); // already owned: nothing moves
  assert.equal(next.user.lockedVm, 2048);
  const va = next.mmap({ lengthBytes: 4096 });
  ctx.as(next).ioasMap({ flags: RW, ioasId: ioas, userVa: va, length: 4096n });
  throwsErrno(() => ctx.as(old).ioasChangeProcess(), 'EINVAL');
  assert.equal(next.user.lockedVm, 2049);
  ctx.as(next).ioasUnmap({ ioasId: ioas, iova: 0n, length: U64_MAX });
  assert.equal(next.user.lockedVm, 0);
  assert.equal(next.mm.pinnedVm, 0);
});
