import assert from 'node:assert/strict';
import { test } from 'node:test';
import { FIXED, GiB, MiB, RW, setup, throwsErrno } from './helpers.js';

const PAGE = 4096n;

test('automatic IOVA: the last byte of a hole never starts an allocation (kernel check aligned_start >= last)', () => {
  const { ctx, ioas, p } = setup();
  const va = p.mmap({ lengthBytes: 1n * MiB, at: 0x40000000n });
  ctx.ioasAllowIovas({ ioasId: ioas, allowedIovas: [{ start: 0x2000n, last: 0x2fffn }] });
  // Leave 1-byte holes at 0x2000 and 0x2fff: no room for even 1 byte.
  ctx.ioasMap({ flags: FIXED | RW, ioasId: ioas, userVa: va, length: 0xffen, iova: 0x2001n });
  throwsErrno(() => ctx.ioasMap({ flags: RW, ioasId: ioas, userVa: va, length: 1n }), 'ENOSPC');
  // A 3-byte hole at 0x2ffd..0x2fff takes it.
  ctx.ioasUnmap({ ioasId: ioas, iova: 0x2001n, length: 0xffen });
  ctx.ioasMap({ flags: FIXED | RW, ioasId: ioas, userVa: va, length: 0xffcn, iova: 0x2001n });
  assert.equal(ctx.ioasMap({ flags: RW, ioasId: ioas, userVa: va, length: 1n }).iova, 0x2ffdn);
});

test('automatic IOVA: touching allowed ranges form one window', () => {
  const { ctx, ioas, p } = setup();
  const va = p.mmap({ lengthBytes: 1n * MiB, at: 0x40000000n });
  ctx.ioasAllowIovas({
    ioasId: ioas,
    allowedIovas: [
      { start: 0x11000n, last: 0x11fffn },
      { start: 0x10000n, last: 0x10fffn },
    ],
  });
  assert.equal(ctx.ioasMap({ flags: RW, ioasId: ioas, userVa: va, length: 0x2000n }).iova, 0x10000n);
});

test('automatic IOVA: lowest fitting hole among many areas, reserved ranges inside holes skipped', () => {
  const { ctx, ioas, p } = setup();
  const va = p.mmap({ lengthBytes: 64n * MiB, at: 0x40000000n });
  // 3000 one-page areas from PAGE_SIZE on, packed, with holes: 1 page at slot 1000,
  // 2 pages at slot 2000 (only 4 KiB aligned), 4 pages at slot 2500.
  const map = (iova: bigint, len = PAGE) =>
    ctx.ioasMap({ flags: FIXED | RW, ioasId: ioas, userVa: va, length: len, iova });
  for (let i = 1; i <= 3000; i++) map(BigInt(i) * PAGE);
  ctx.ioasUnmap({ ioasId: ioas, iova: 1000n * PAGE, length: PAGE });
  ctx.ioasUnmap({ ioasId: ioas, iova: 2001n * PAGE, length: 2n * PAGE });
  ctx.ioasUnmap({ ioasId: ioas, iova: 2500n * PAGE, length: 4n * PAGE });
  const auto = (len: bigint, addr = va) =>
    ctx.ioasMap({ flags: RW, ioasId: ioas, userVa: addr, length: len }).iova;
  // 8 KiB wants 8 KiB alignment: 2001 is odd, so the 2-page hole does not fit; 2500 does.
  assert.equal(auto(2n * PAGE), 2500n * PAGE);
  // With a VA aligned to 4 KiB only, the 2-page hole fits.
  assert.equal(auto(2n * PAGE, va + PAGE), 2001n * PAGE);
  assert.equal(auto(PAGE), 1000n * PAGE);
  assert.equal(auto(PAGE), 2502n * PAGE);
  assert.equal(auto(PAGE), 2503n * PAGE);
  assert.equal(auto(PAGE), 3001n * PAGE, 'then the space after the last area');
  // A device reserved range inside the tail is skipped.
  const dev = ctx.bindDevice({
    name: 'd',
    reservedIovaRanges: [{ start: 3002n * PAGE, last: 3002n * PAGE + 0xfffn }],
  });
  ctx.attachIoas({ devId: dev.outDevid, ptId: ioas });
  assert.equal(auto(PAGE), 3003n * PAGE);
});

test('automatic IOVA scales: 200k allocations into a packed IOAS, then refills of punched holes', () => {
  const { ctx, ioas, p } = setup({ rlimitMemlockBytes: 8n * GiB });
  const va = p.mmap({ lengthBytes: 1n * GiB });
  const args = { flags: RW, ioasId: ioas, userVa: va, length: PAGE, iova: 0n };
  const n = 200_000;
  const t0 = performance.now();
  for (let i = 0; i < n; i++) {
    args.userVa = va + BigInt(i % 1000) * PAGE;
    ctx.ioasMap(args);
    assert.equal(args.iova, BigInt(i + 1) * PAGE);
  }
  const t1 = performance.now();
  // Every 100th area out, then the holes refill lowest first.
  for (let i = 0; i < n; i += 100) ctx.ioasUnmap({ ioasId: ioas, iova: BigInt(i + 1) * PAGE, length: PAGE });
  for (let i = 0; i < n; i += 100) {
    ctx.ioasMap(args);
    assert.equal(args.iova, BigInt(i + 1) * PAGE);
  }
  const t2 = performance.now();
  // A linear hole scan would walk ~n/2 areas per map here: 2e10 steps.
  assert.ok(t1 - t0 < 10_000, `200k automatic maps took ${(t1 - t0).toFixed(0)} ms`);
  assert.ok(t2 - t1 < 5_000, `hole refills took ${(t2 - t1).toFixed(0)} ms`);
  console.log(
    `200k automatic maps: ${(t1 - t0).toFixed(0)} ms; 2k unmaps + refills: ${(t2 - t1).toFixed(0)} ms`,
  );
});
