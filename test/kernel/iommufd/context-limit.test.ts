/**
 * softvfio extension IOMMU_OPTION_SOFTVFIO_CONTEXT_LIMIT / _CONTEXT_PINNED: a pinned-memory
 * limit of one iommufd context (the per-fd accounting proposed in seed 003).
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Host, type Process, RLIM_INFINITY, type SpawnOptions } from '../../../src/kernel/host/index.js';
import { IommufdContext, IommufdVfioCompat } from '../../../src/kernel/iommufd/index.js';
import { isErrno } from '../../../src/uapi/error.js';
import {
  IOMMU_OPTION_SOFTVFIO_CONTEXT_LIMIT as LIMIT,
  IOMMU_OPTION_SOFTVFIO_CONTEXT_PINNED as PINNED,
  IommuOption,
  IommuOptionOp,
} from '../../../src/uapi/iommufd.js';
import { FIXED, GiB, MiB, RW, throwsErrno, U64_MAX } from './helpers.js';

const PAGE = 4096n;
const { SET, GET } = IommuOptionOp;

const get = (ctx: IommufdContext, optionId: number) =>
  ctx.option({ optionId, op: GET, objectId: 0, val64: 0n }).val64;
const set = (ctx: IommufdContext, optionId: number, val64: bigint) =>
  ctx.option({ optionId, op: SET, objectId: 0, val64 });

/** ENOMEM from the inner step `op`: which limit refused the pin. */
function refusedBy(fn: () => unknown, op: string): void {
  assert.throws(fn, (e: unknown) => {
    if (!isErrno(e, 'ENOMEM')) throw e;
    assert.equal((e as { op?: string }).op, op);
    return true;
  });
}
/** ENOMEM refused by the context limit (not by RLIMIT_MEMLOCK or a cgroup). */
const refusedByContext = (fn: () => unknown) => refusedBy(fn, 'softvfio_context_charge');

/**
 * A context opened by a privileged process with CONTEXT_LIMIT `limit` (and per-mm mode if
 * `perMm`), used by a VMM spawned with `spawn`; an IOAS with a device attached unless `noDevice`.
 */
function limited(limit: bigint, o: { spawn?: SpawnOptions; perMm?: boolean; noDevice?: boolean } = {}) {
  const host = new Host();
  const admin = host.spawn({ uid: 0, caps: ['CAP_SYS_RESOURCE'] });
  const fd = IommufdContext.open(admin);
  if (o.perMm) set(fd, IommuOption.RLIMIT_MODE, 1n);
  set(fd, LIMIT, limit);
  const p = host.spawn({ uid: 107, rlimitMemlockBytes: 64n * MiB, ...o.spawn });
  const ctx = fd.as(p);
  const ioas = ctx.ioasAlloc().outIoasId;
  const devId = ctx.bindDevice({ name: 'vf0' }).outDevid;
  if (!o.noDevice) ctx.attachIoas({ devId, ptId: ioas });
  const va = p.mmap({ lengthBytes: 64n * MiB });
  const map = (offset: bigint, length: bigint, iova: bigint, who: Process = p) =>
    ctx.as(who).ioasMap({ flags: FIXED | RW, ioasId: ioas, userVa: va + offset, length, iova });
  return { host, admin, fd, p, ctx, ioas, devId, va, map };
}

test('CONTEXT_LIMIT option: GET/SET, EPERM without CAP_SYS_RESOURCE, EBUSY with objects, EOPNOTSUPP, EINVAL', () => {
  const host = new Host();
  const admin = host.spawn({ uid: 0, caps: ['CAP_SYS_RESOURCE'] });
  const user = host.spawn({ uid: 107 });
  const ctx = IommufdContext.open(admin);
  assert.equal(get(ctx, LIMIT), U64_MAX, 'no limit by default');
  assert.equal(get(ctx, PINNED), 0n);
  throwsErrno(() => set(ctx.as(user), LIMIT, 4n * GiB), 'EPERM');
  throwsErrno(() => ctx.option({ optionId: LIMIT, op: SET, objectId: 1, val64: 0n }), 'EOPNOTSUPP');
  throwsErrno(() => ctx.option({ optionId: LIMIT, op: GET, objectId: 1, val64: 0n }), 'EOPNOTSUPP');
  throwsErrno(() => ctx.option({ optionId: LIMIT, op: 2, objectId: 0, val64: 0n }), 'EOPNOTSUPP');
  throwsErrno(
    () => ctx.option({ optionId: LIMIT, op: SET, objectId: 0, val64: 0n, reserved: 1 }),
    'EOPNOTSUPP',
  );
  throwsErrno(() => set(ctx, LIMIT, -1n), 'EINVAL');
  throwsErrno(() => set(ctx, LIMIT, U64_MAX + 1n), 'EINVAL');
  assert.equal(get(ctx, LIMIT), U64_MAX, 'nothing changed');
  set(ctx, LIMIT, 5000n);
  assert.equal(get(ctx, LIMIT), 5000n, 'GET returns the value set');
  set(ctx, LIMIT, U64_MAX);
  assert.equal(get(ctx, LIMIT), U64_MAX);
  set(ctx, LIMIT, 0n);
  const ioas = ctx.ioasAlloc().outIoasId;
  throwsErrno(() => set(ctx, LIMIT, 4n * GiB), 'EBUSY');
  assert.equal(get(ctx.as(user), LIMIT), 0n, 'anyone may read it');
  ctx.destroy({ id: ioas });
  set(ctx, LIMIT, 4n * GiB);
  assert.equal(get(ctx, LIMIT), 4n * GiB);
});

test('CONTEXT_PINNED option: GET only (SET EOPNOTSUPP), global (object_id EOPNOTSUPP)', () => {
  const { ctx, admin, map } = limited(1n * MiB);
  map(0n, 256n * 1024n, 0n);
  assert.equal(get(ctx, PINNED), 256n * 1024n);
  throwsErrno(() => set(ctx.as(admin), PINNED, 0n), 'EOPNOTSUPP');
  throwsErrno(() => ctx.option({ optionId: PINNED, op: GET, objectId: 1, val64: 0n }), 'EOPNOTSUPP');
  assert.equal(get(ctx, PINNED), 256n * 1024n);
});

test('the limit: ENOMEM past it with the map undone; exactly at it is fine; bytes rounded down to pages', () => {
  const { ctx, p, ioas, map } = limited(2n * PAGE + 100n);
  refusedByContext(() => map(0n, 3n * PAGE, 0n));
  assert.equal(get(ctx, PINNED), 0n);
  assert.equal(p.user.lockedVm, 0, 'the per-user charge was undone too');
  assert.equal(p.mm.pinnedVm, 0);
  assert.equal(ctx.ioasUnmap({ ioasId: ioas, iova: 0n, length: U64_MAX }).length, 0n, 'no area left');
  map(0n, 2n * PAGE, 0n);
  assert.equal(get(ctx, PINNED), 2n * PAGE);
  refusedByContext(() => map(2n * PAGE, PAGE, 2n * PAGE));
  // IOAS_COPY shares the pages: no new pin, no new charge.
  ctx.ioasCopy({
    flags: FIXED | RW,
    dstIoasId: ioas,
    srcIoasId: ioas,
    length: 2n * PAGE,
    dstIova: 1n * MiB,
    srcIova: 0n,
  });
  assert.equal(get(ctx, PINNED), 2n * PAGE);
  ctx.ioasUnmap({ ioasId: ioas, iova: 0n, length: U64_MAX });
  assert.equal(get(ctx, PINNED), 0n);
  assert.equal(p.user.lockedVm, 0);
});

test('the limit applies to the first attach (all areas pinned, rolled back) and to access pins', () => {
  const { ctx, p, ioas, devId, map } = limited(1n * MiB, { noDevice: true });
  map(0n, 1n * MiB, 0n);
  map(1n * MiB, PAGE, 1n * MiB);
  assert.equal(get(ctx, PINNED), 0n, 'nothing pinned without a domain');
  refusedByContext(() => ctx.attachIoas({ devId, ptId: ioas }));
  assert.equal(get(ctx, PINNED), 0n);
  assert.equal(p.user.lockedVm, 0);
  assert.equal(ctx.deviceHwpt(devId), undefined);
  // An emulated device's pins count as well.
  const acc = ctx.accessCreate(ioas, {
    unmap: (iova, length) => {
      for (const [i, l] of acc.pinsIn(iova, length)) acc.accessUnpin(i, l);
    },
  });
  acc.accessPin(0n, 1n * MiB);
  assert.equal(get(ctx, PINNED), 1n * MiB);
  refusedByContext(() => acc.accessPin(1n * MiB, PAGE));
  acc.accessUnpin(0n, 1n * MiB);
  assert.equal(get(ctx, PINNED), 0n);
  ctx.ioasUnmap({ ioasId: ioas, iova: 1n * MiB, length: PAGE });
  ctx.attachIoas({ devId, ptId: ioas });
  assert.equal(get(ctx, PINNED), 1n * MiB);
});

test('checked in addition to RLIMIT_MODE: the lower of the two refuses; CAP_IPC_LOCK does not bypass it', () => {
  // Per-user, RLIMIT_MEMLOCK 1 MiB below the context's 4 MiB: RLIMIT_MEMLOCK refuses.
  {
    const { map } = limited(4n * MiB, { spawn: { rlimitMemlockBytes: 1n * MiB } });
    refusedBy(() => map(0n, 2n * MiB, 0n), 'incr_user_locked_vm');
    map(0n, 1n * MiB, 0n);
  }
  // Per-user: another process of the uid already holds 3 MiB of user->locked_vm.
  {
    const { host, p, map } = limited(4n * MiB, { spawn: { rlimitMemlockBytes: 4n * MiB } });
    const other = IommufdContext.open(host.spawn({ uid: 107, rlimitMemlockBytes: 4n * MiB }));
    const oioas = other.ioasAlloc().outIoasId;
    other.attachIoas({ devId: other.bindDevice({ name: 'o' }).outDevid, ptId: oioas });
    other.ioasMap({
      flags: RW,
      ioasId: oioas,
      userVa: other.caller.mmap({ lengthBytes: 3n * MiB }),
      length: 3n * MiB,
    });
    assert.equal(p.user.lockedVm, 768);
    refusedBy(() => map(0n, 2n * MiB, 0n), 'incr_user_locked_vm'); // user 3 + 2 > 4 MiB, context 2 <= 4 MiB
    map(0n, 1n * MiB, 0n);
  }
  // Per-mm, RLIMIT_MEMLOCK unlimited: the context refuses.
  {
    const { p, map } = limited(1n * MiB, { perMm: true, spawn: { rlimitMemlockBytes: RLIM_INFINITY } });
    refusedByContext(() => map(0n, 2n * MiB, 0n));
    assert.equal(p.mm.lockedVm, 0);
    map(0n, 1n * MiB, 0n);
    assert.equal(p.mm.lockedVm, 256);
  }
  // CAP_IPC_LOCK (mode NONE): no RLIMIT_MEMLOCK, the context limit still holds.
  {
    const { p, ctx, map } = limited(1n * MiB, { spawn: { caps: ['CAP_IPC_LOCK'], rlimitMemlockBytes: 0n } });
    map(0n, 1n * MiB, 0n);
    refusedByContext(() => map(1n * MiB, PAGE, 1n * MiB));
    assert.equal(p.user.lockedVm, 0);
    assert.equal(p.mm.pinnedVm, 256);
    assert.equal(get(ctx, PINNED), 1n * MiB);
  }
});

test('IOAS_CHANGE_PROCESS: the per-user charge moves, the context charge stays with the context', () => {
  const { host, ctx, p, ioas } = limited(8n * MiB);
  const memfd = p.memfdCreate(8n * MiB);
  ctx.ioasMapFile({ flags: FIXED | RW, ioasId: ioas, fd: memfd, start: 0n, length: 8n * MiB, iova: 0n });
  assert.equal(get(ctx, PINNED), 8n * MiB);
  const next = host.spawn({ uid: 108, rlimitMemlockBytes: 16n * MiB });
  next.installFd(p.file(memfd)!);
  ctx.as(next).ioasChangeProcess();
  assert.equal(p.user.lockedVm, 0);
  assert.equal(next.user.lockedVm, 2048);
  assert.equal(get(ctx, PINNED), 8n * MiB, 'unchanged');
  // The new owner is held to the same context budget.
  const more = next.memfdCreate(PAGE);
  refusedByContext(() =>
    ctx
      .as(next)
      .ioasMapFile({ flags: FIXED | RW, ioasId: ioas, fd: more, start: 0n, length: PAGE, iova: 8n * MiB }),
  );
});

test('close releases the context charge; the VFIO compat container ioctls on a limited fd are held to it', () => {
  const { ctx, p, map } = limited(1n * MiB);
  map(0n, 1n * MiB, 0n);
  assert.equal(ctx.pagesTable.contextPinnedPages, 256);
  ctx.close();
  assert.equal(ctx.pagesTable.contextPinnedPages, 0);
  assert.equal(p.user.lockedVm, 0);
  throwsErrno(() => get(ctx, LIMIT), 'EBADF');
  // Seed 003's idea for /dev/vfio/vfio: the privileged opener limits the fd, QEMU uses type1 ioctls.
  const host = new Host();
  const admin = host.spawn({ uid: 0, caps: ['CAP_SYS_RESOURCE'] });
  const fd = IommufdContext.open(admin);
  set(fd, LIMIT, 1n * MiB);
  const qemu = host.spawn({ uid: 107, rlimitMemlockBytes: RLIM_INFINITY });
  const c = IommufdVfioCompat.of(fd.as(qemu));
  c.attachDevice({ name: 'vf0' });
  c.setIommu(3);
  const va = qemu.mmap({ lengthBytes: 2n * MiB });
  c.mapDma({ flags: 3, vaddr: va, iova: 0n, size: 1n * MiB });
  refusedByContext(() => c.mapDma({ flags: 3, vaddr: va + 1n * MiB, iova: 1n * MiB, size: PAGE }));
  assert.equal(qemu.user.lockedVm, 256);
});
