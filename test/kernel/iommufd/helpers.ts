import assert from 'node:assert/strict';
import { Host, type Process, type SpawnOptions } from '../../../src/kernel/host/index.js';
import { IommufdContext } from '../../../src/kernel/iommufd/index.js';
import type { ErrnoName } from '../../../src/uapi/errno.js';
import { isErrno } from '../../../src/uapi/error.js';

export const KiB = 1024n;
export const MiB = 1024n * KiB;
export const GiB = 1024n * MiB;
export const RW = 2 | 4;
export const FIXED = 1;
export const U64_MAX = (1n << 64n) - 1n;

export function setup(opts: SpawnOptions = {}): {
  host: Host;
  p: Process;
  ctx: IommufdContext;
  ioas: number;
} {
  const host = new Host();
  const p = host.spawn({ uid: 1000, rlimitMemlockBytes: 64n * MiB, ...opts });
  const ctx = IommufdContext.open(p);
  const ioas = ctx.ioasAlloc().outIoasId;
  return { host, p, ctx, ioas };
}

export function throwsErrno(fn: () => unknown, errno: ErrnoName): void {
  assert.throws(fn, (e: unknown) => {
    if (!isErrno(e, errno)) throw e;
    return true;
  });
}
