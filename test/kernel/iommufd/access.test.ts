import assert from 'node:assert/strict';
import { test } from 'node:test';
import type { IommufdAccess } from '../../../src/kernel/iommufd/index.js';
import { UNMAP_NOTIFY_TRIES } from '../../../src/kernel/iommufd/index.js';
import { VfioError } from '../../../src/uapi/error.js';
import { FIXED, MiB, RW, setup, throwsErrno, U64_MAX } from './helpers.js';

const BASE = 0x100000n;
const PAGE = 4096n;

/** An IOAS with 1 MiB of process memory at BASE, no device. */
function rig(opts: { rlimitMemlockBytes?: bigint } = {}) {
  const s = setup({ rlimitMemlockBytes: opts.rlimitMemlockBytes ?? 64n * MiB });
  const va = s.p.mmap({ lengthBytes: 4n * MiB });
  s.ctx.ioasMap({ flags: FIXED | RW, ioasId: s.ioas, userVa: va, length: 1n * MiB, iova: BASE });
  return { ...s, va };
}

/** An access whose unmap op unpins everything it holds in the range (a well-behaved driver). */
function polite(ctx: ReturnType<typeof setup>['ctx'], ioas: number, log: [bigint, bigint][] = []) {
  const holder: { acc?: IommufdAccess } = {};
  const acc = ctx.accessCreate(ioas, {
    unmap(iova, length) {
      log.push([iova, length]);
      for (const [i, l] of holder.acc!.pinsIn(iova, length)) holder.acc!.accessUnpin(i, l);
    },
  });
  holder.acc = acc;
  return acc;
}

test('accessCreate: ENOENT, EADDRINUSE for a misaligned area, alignment fed into iova_alignment, EBUSY', () => {
  const { ctx, ioas, va } = rig();
  const align = () => ctx.ioasIovaRanges({ ioasId: ioas, numIovas: 1 }).outIovaAlignment;
  throwsErrno(() => ctx.accessCreate(99, { unmap() {} }), 'ENOENT');
  ctx.ioasMap({ flags: FIXED | RW, ioasId: ioas, userVa: va, length: 100n, iova: 0x800000n });
  throwsErrno(() => ctx.accessCreate(ioas, { unmap() {} }), 'EADDRINUSE');
  throwsErrno(() => ctx.accessCreateInternal(ioas), 'EADDRINUSE');
  // An access that never pins keeps alignment 1.
  const rwOnly = ctx.accessCreate(ioas, { unmap() {} }, { needsPinPages: false });
  assert.equal(align(), 1n);
  ctx.ioasUnmap({ ioasId: ioas, iova: 0x800000n, length: 100n });
  const acc = ctx.accessCreate(ioas, { unmap() {} });
  assert.equal(align(), 4096n);
  // Now maps must be page aligned: length, IOVA and the source's page offset.
  throwsErrno(() => ctx.ioasMap({ flags: RW, ioasId: ioas, userVa: va, length: 100n }), 'EINVAL');
  throwsErrno(
    () => ctx.ioasMap({ flags: FIXED | RW, ioasId: ioas, userVa: va, length: PAGE, iova: 0x800800n }),
    'EINVAL',
  );
  throwsErrno(
    () =>
      ctx.ioasMap({ flags: FIXED | RW, ioasId: ioas, userVa: va + 0x800n, length: PAGE, iova: 0x800000n }),
    'EINVAL',
  );
  assert.equal(acc.id, 3);
  throwsErrno(() => ctx.destroy({ id: acc.id }), 'EBUSY');
  throwsErrno(() => ctx.destroy({ id: ioas }), 'EBUSY');
  acc.accessDestroy();
  assert.equal(align(), 1n);
  throwsErrno(() => ctx.destroy({ id: acc.id }), 'ENOENT');
  throwsErrno(() => ctx.destroy({ id: ioas }), 'EBUSY');
  rwOnly.accessDestroy();
  ctx.destroy({ id: ioas });
});

test('accessPin errnos', () => {
  const { ctx, ioas, va, p } = rig({ rlimitMemlockBytes: 64n * PAGE });
  const acc = ctx.accessCreate(ioas, { unmap() {} });
  throwsErrno(
    () => ctx.accessCreate(ioas, { unmap() {} }, { needsPinPages: false }).accessPin(BASE, PAGE),
    'EINVAL',
  );
  throwsErrno(() => acc.accessPin(BASE, 0n), 'EINVAL');
  throwsErrno(() => acc.accessPin(U64_MAX, 2n), 'EOVERFLOW');
  throwsErrno(() => acc.accessPin(0x10000n, PAGE), 'ENOENT');
  throwsErrno(() => acc.accessPin(BASE + 1n * MiB - PAGE, 2n * PAGE), 'ENOENT');
  throwsErrno(() => acc.accessPin(BASE + 0x10n, PAGE), 'EINVAL');
  // Read-only area: write pin EPERM; write-only area: read pin EPERM.
  ctx.ioasMap({ flags: FIXED | 4, ioasId: ioas, userVa: va, length: PAGE, iova: 0x400000n });
  ctx.ioasMap({ flags: FIXED | 2, ioasId: ioas, userVa: va, length: PAGE, iova: 0x401000n });
  throwsErrno(() => acc.accessPin(0x400000n, PAGE, { write: true }), 'EPERM');
  acc.accessPin(0x400000n, PAGE);
  throwsErrno(() => acc.accessPin(0x401000n, PAGE), 'EPERM');
  acc.accessPin(0x401000n, PAGE, { write: true });
  // Unbacked memory: the map succeeded (nothing pinned then), the pin faults.
  ctx.ioasMap({ flags: FIXED | RW, ioasId: ioas, userVa: 0x1000n, length: PAGE, iova: 0x500000n });
  throwsErrno(() => acc.accessPin(0x500000n, PAGE), 'EFAULT');
  // RLIMIT_MEMLOCK 64 pages: 2 pinned so far.
  assert.equal(p.user.lockedVm, 2);
  throwsErrno(() => acc.accessPin(BASE, 63n * PAGE), 'ENOMEM');
  assert.equal(p.user.lockedVm, 2);
  acc.accessPin(BASE, 62n * PAGE);
  assert.equal(p.user.lockedVm, 64);
  assert.equal(acc.pinCount, 3);
  assert.equal(p.mm.pinnedVm, 64);
  acc.accessDestroy();
  throwsErrno(() => acc.accessPin(BASE, PAGE), 'ENOENT');
  assert.equal(p.user.lockedVm, 0);
  assert.equal(p.mm.pinnedVm, 0);
});

test('accounting: access pins and domains share one pin per page of a pages object', () => {
  const { ctx, ioas, va, p } = rig();
  const acc = polite(ctx, ioas);
  acc.accessPin(BASE, 2n * PAGE);
  assert.equal(p.user.lockedVm, 2);
  acc.accessPin(BASE, 2n * PAGE); // the same pages again: no new charge
  acc.accessPin(BASE + PAGE, 2n * PAGE);
  assert.equal(p.user.lockedVm, 3);
  // A device domain fills the whole area: charged up to 256 pages, not 256 + 3.
  const dev = ctx.bindDevice({ name: 'd' }).outDevid;
  ctx.attachIoas({ devId: dev, ptId: ioas });
  assert.equal(p.user.lockedVm, 256);
  acc.accessUnpin(BASE, 2n * PAGE);
  assert.equal(p.user.lockedVm, 256);
  ctx.detach({ devId: dev });
  assert.equal(p.user.lockedVm, 3, 'the access still holds pages 0..2');
  // A second IOAS sharing the pages through IOAS_COPY: its access pins the same pages.
  const other = ctx.ioasAlloc().outIoasId;
  ctx.ioasCopy({
    flags: FIXED | RW,
    dstIoasId: other,
    srcIoasId: ioas,
    length: 1n * MiB,
    srcIova: BASE,
    dstIova: BASE,
  });
  const acc2 = polite(ctx, other);
  acc2.accessPin(BASE, 4n * PAGE);
  assert.equal(p.user.lockedVm, 4);
  // A second MAP of the same memory is another pages object: charged again.
  ctx.ioasMap({ flags: FIXED | RW, ioasId: ioas, userVa: va, length: 1n * MiB, iova: 0x800000n });
  acc.accessPin(0x800000n, PAGE);
  assert.equal(p.user.lockedVm, 5);
  throwsErrno(() => acc.accessUnpin(BASE, 7n * PAGE), 'EINVAL');
  acc.accessUnpin(BASE, 2n * PAGE);
  acc.accessUnpin(BASE + PAGE, 2n * PAGE);
  throwsErrno(() => acc.accessUnpin(BASE, 2n * PAGE), 'EINVAL');
  assert.equal(p.user.lockedVm, 5, 'acc2 holds 0..3, acc holds the other object');
  ctx.close();
  assert.equal(p.user.lockedVm, 0);
  assert.equal(p.mm.pinnedVm, 0);
});

test('pinned pages are read and written in place until unpinned', () => {
  const { ctx, ioas, va, p } = rig();
  const acc = ctx.accessCreate(ioas, { unmap() {} });
  p.write(va + 0x2000n, new Uint8Array([9, 8, 7]));
  const pinned = acc.accessPin(BASE + 0x2000n, 2n * PAGE, { write: true });
  const b = new Uint8Array(3);
  pinned.read(0, b);
  assert.deepEqual(b, new Uint8Array([9, 8, 7]));
  pinned.write(4096, new Uint8Array([1, 2]));
  p.read(va + 0x3000n, b);
  assert.deepEqual(b, new Uint8Array([1, 2, 0]));
  acc.accessUnpin(BASE + 0x2000n, 2n * PAGE);
  assert.throws(
    () => pinned.read(0, b),
    (e: unknown) => e instanceof VfioError && e.code === 'ERR_INTERNAL',
  );
});

test('IOAS_UNMAP of pinned areas: the access is told and unpins; retries; EDEADLOCK after 100', () => {
  const { ctx, ioas, va } = rig();
  const log: [bigint, bigint][] = [];
  const acc = polite(ctx, ioas, log);
  acc.accessPin(BASE + 0x10000n, PAGE);
  acc.accessPin(BASE + 0x20000n, 3n * PAGE);
  const bystander: [bigint, bigint][] = [];
  const idle = ctx.accessCreate(ioas, { unmap: (i, l) => void bystander.push([i, l]) });
  assert.equal(ctx.ioasUnmap({ ioasId: ioas, iova: BASE, length: 1n * MiB }).length, 1n * MiB);
  assert.deepEqual(log, [[BASE, 1n * MiB]], 'one notice for the whole area');
  assert.deepEqual(bystander, [[BASE, 1n * MiB]], 'every access of the IOAS hears it');
  assert.equal(acc.pinCount, 0);
  idle.accessDestroy();

  // A slow driver: unpins on the 3rd notice only.
  ctx.ioasMap({ flags: FIXED | RW, ioasId: ioas, userVa: va, length: 1n * MiB, iova: BASE });
  let calls = 0;
  const slow: { acc?: IommufdAccess } = {};
  slow.acc = ctx.accessCreate(ioas, {
    unmap(iova, length) {
      if (++calls === 3) for (const [i, l] of slow.acc!.pinsIn(iova, length)) slow.acc!.accessUnpin(i, l);
    },
  });
  slow.acc.accessPin(BASE, PAGE);
  ctx.ioasUnmap({ ioasId: ioas, iova: 0n, length: U64_MAX });
  assert.equal(calls, 3);

  // A driver that never unpins: 101 notices, then EDEADLOCK; areas before it are already gone.
  ctx.ioasMap({ flags: FIXED | RW, ioasId: ioas, userVa: va, length: PAGE, iova: 0x10000n });
  ctx.ioasMap({ flags: FIXED | RW, ioasId: ioas, userVa: va, length: 1n * MiB, iova: BASE });
  let deaf = 0;
  const stuck = ctx.accessCreate(ioas, {
    unmap() {
      deaf++;
    },
  });
  stuck.accessPin(BASE + PAGE, PAGE);
  throwsErrno(() => ctx.ioasUnmap({ ioasId: ioas, iova: 0n, length: 2n * MiB }), 'EDEADLOCK');
  assert.equal(deaf, UNMAP_NOTIFY_TRIES + 1);
  assert.equal(calls, 3 + UNMAP_NOTIFY_TRIES + 1, 'the other access heard every notice too');
  throwsErrno(() => ctx.ioasUnmap({ ioasId: ioas, iova: 0x10000n, length: PAGE }), 'ENOENT');
  // The area stays mapped but no new pin or rw may start on it (prevent_access stays set).
  throwsErrno(() => stuck.accessPin(BASE, PAGE), 'EINVAL');
  throwsErrno(() => stuck.accessRw(BASE, new Uint8Array(1)), 'EINVAL');
  stuck.accessUnpin(BASE + PAGE, PAGE);
  assert.equal(ctx.ioasUnmap({ ioasId: ioas, iova: BASE, length: 1n * MiB }).length, 1n * MiB);
});

test('during the unmap notice the area refuses new pins and rw (EINVAL)', () => {
  const { ctx, ioas } = rig();
  const seen: string[] = [];
  const h: { acc?: IommufdAccess } = {};
  h.acc = ctx.accessCreate(ioas, {
    unmap(iova, length) {
      try {
        h.acc!.accessPin(iova, PAGE);
      } catch (e) {
        seen.push((e as VfioError).errno!);
      }
      try {
        h.acc!.accessRw(iova, new Uint8Array(1));
      } catch (e) {
        seen.push((e as VfioError).errno!);
      }
      for (const [i, l] of h.acc!.pinsIn(iova, length)) h.acc!.accessUnpin(i, l);
    },
  });
  h.acc.accessPin(BASE, PAGE);
  ctx.ioasUnmap({ ioasId: ioas, iova: BASE, length: 1n * MiB });
  assert.deepEqual(seen, ['EINVAL', 'EINVAL']);
});

test('internal access: its pins lock the areas (IOAS_UNMAP EBUSY, before ENOENT), no notice', () => {
  const { ctx, ioas, va } = rig();
  const heard: bigint[] = [];
  const other = ctx.accessCreate(ioas, { unmap: (i) => void heard.push(i) });
  const queue = ctx.accessCreateInternal(ioas);
  queue.accessPin(BASE + 0x8000n, PAGE);
  throwsErrno(() => ctx.ioasUnmap({ ioasId: ioas, iova: BASE, length: 1n * MiB }), 'EBUSY');
  throwsErrno(() => ctx.ioasUnmap({ ioasId: ioas, iova: BASE, length: PAGE }), 'EBUSY');
  throwsErrno(() => ctx.ioasUnmap({ ioasId: ioas, iova: 0n, length: U64_MAX }), 'EBUSY');
  assert.deepEqual(heard, [], 'EBUSY comes before any notice');
  throwsErrno(() => ctx.destroy({ id: queue.id }), 'EBUSY');
  queue.accessUnpin(BASE + 0x8000n, PAGE);
  ctx.ioasUnmap({ ioasId: ioas, iova: BASE, length: 1n * MiB });
  // Destroying the internal access drops its locks.
  ctx.ioasMap({ flags: FIXED | RW, ioasId: ioas, userVa: va, length: 1n * MiB, iova: BASE });
  queue.accessPin(BASE, PAGE);
  queue.accessDestroy();
  ctx.ioasUnmap({ ioasId: ioas, iova: BASE, length: 1n * MiB });
  other.accessDestroy();
  ctx.destroy({ id: ioas });
});

test('accessRw: copies through the mappings, errnos', () => {
  const { ctx, ioas, va, p, host } = rig();
  const acc = ctx.accessCreate(ioas, { unmap() {} }, { needsPinPages: false });
  // Two areas back to back: one copy crosses both.
  ctx.ioasMap({
    flags: FIXED | RW,
    ioasId: ioas,
    userVa: va + 2n * MiB,
    length: PAGE,
    iova: BASE + 1n * MiB,
  });
  acc.accessRw(BASE + 1n * MiB - 2n, new Uint8Array([1, 2, 3, 4]), { write: true });
  const b = new Uint8Array(2);
  p.read(va + 1n * MiB - 2n, b);
  assert.deepEqual(b, new Uint8Array([1, 2]));
  p.read(va + 2n * MiB, b);
  assert.deepEqual(b, new Uint8Array([3, 4]));
  const back = new Uint8Array(4);
  acc.accessRw(BASE + 1n * MiB - 2n, back);
  assert.deepEqual(back, new Uint8Array([1, 2, 3, 4]));
  throwsErrno(() => acc.accessRw(BASE, new Uint8Array(0)), 'EINVAL');
  throwsErrno(() => acc.accessRw(U64_MAX, new Uint8Array(2)), 'EOVERFLOW');
  throwsErrno(() => acc.accessRw(0x10000n, new Uint8Array(1)), 'ENOENT');
  // A hole after the area: what came before is copied, then ENOENT.
  const tail = new Uint8Array(8);
  throwsErrno(() => acc.accessRw(BASE + 1n * MiB + PAGE - 4n, tail, { write: true }), 'ENOENT');
  ctx.ioasMap({ flags: FIXED | 4, ioasId: ioas, userVa: va, length: PAGE, iova: 0x400000n });
  ctx.ioasMap({ flags: FIXED | 2, ioasId: ioas, userVa: va, length: PAGE, iova: 0x401000n });
  throwsErrno(() => acc.accessRw(0x400000n, b, { write: true }), 'EPERM');
  acc.accessRw(0x400000n, b);
  throwsErrno(() => acc.accessRw(0x401000n, b), 'EPERM');
  acc.accessRw(0x401000n, b, { write: true });
  // Unbacked VA: EFAULT. A memfd mapping: the file is read and written.
  ctx.ioasMap({ flags: FIXED | RW, ioasId: ioas, userVa: 0x1000n, length: PAGE, iova: 0x500000n });
  throwsErrno(() => acc.accessRw(0x500000n, b), 'EFAULT');
  const fd = p.memfdCreate(1n * MiB);
  ctx.ioasMapFile({ flags: FIXED | RW, ioasId: ioas, fd, start: 0x3000n, length: PAGE, iova: 0x600000n });
  acc.accessRw(0x600010n, new Uint8Array([5]), { write: true });
  const one = new Uint8Array(1);
  p.file(fd)!.file.read(0x3010n, one);
  assert.equal(one[0], 5);
  // The mapping process exits: unpinned memory faults, pinned memory stays reachable.
  const q = host.spawn({ uid: 1000, rlimitMemlockBytes: 64n * MiB });
  const qva = q.mmap({ lengthBytes: 2n * PAGE });
  ctx.as(q).ioasMap({ flags: FIXED | RW, ioasId: ioas, userVa: qva, length: 2n * PAGE, iova: 0x700000n });
  const pinner = ctx.accessCreate(ioas, { unmap() {} });
  pinner.accessPin(0x700000n, PAGE);
  q.exit();
  acc.accessRw(0x700000n, one, { write: true });
  throwsErrno(() => acc.accessRw(0x701000n, one), 'EFAULT');
  acc.accessDestroy();
  throwsErrno(() => acc.accessRw(BASE, one), 'ENOENT');
});

test('accessDestroy: unmap(0, 2^64-1) first, leftover pins dropped; close tears accesses down', () => {
  const { ctx, ioas, p } = rig();
  const log: [bigint, bigint][] = [];
  const acc = polite(ctx, ioas, log);
  acc.accessPin(BASE, 4n * PAGE);
  acc.accessDestroy();
  assert.deepEqual(log, [[0n, U64_MAX]]);
  assert.equal(p.user.lockedVm, 0);
  acc.accessDestroy(); // twice is harmless
  const rude = ctx.accessCreate(ioas, { unmap() {} });
  rude.accessPin(BASE, 8n * PAGE);
  assert.equal(p.user.lockedVm, 8);
  rude.accessDestroy();
  assert.equal(p.user.lockedVm, 0);
  const last = ctx.accessCreate(ioas, { unmap() {} });
  last.accessPin(BASE, PAGE);
  ctx.close();
  assert.equal(p.user.lockedVm, 0);
  assert.equal(p.mm.pinnedVm, 0);
  assert.equal(ctx.pagesTable.count, 0);
});
