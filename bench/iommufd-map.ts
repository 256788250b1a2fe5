import { pathToFileURL } from 'node:url';
import { Host } from '../src/kernel/host/index.js';
import { IommufdContext } from '../src/kernel/iommufd/index.js';

export interface IommufdMapRow {
  areas: number;
  mapSeconds: number;
  unmapSeconds: number;
  /** N areas mapped with automatic IOVA allocation (no FIXED_IOVA), measured after every fixed run. */
  autoMapSeconds: number;
  heapBytesPerArea: number;
  /** heapUsed + arrayBuffers delta per area: typed-array backing stores live outside the JS heap. */
  heapPlusArrayBufferBytesPerArea: number;
  lockedVmPagesAfterMap: number;
}

const GiB = 1n << 30n;
const PAGE = 4096n;
const RW_FIXED = 1 | 2 | 4;

function gc(): void {
  const g = (globalThis as { gc?: () => void }).gc;
  if (g) {
    g();
    g();
  }
}

/**
 * Maps N separate 4 KiB areas of a 4 GiB guest into an IOAS with a device attached (each area
 * pinned and charged at once), then unmaps them one by one. Then, for each N again, maps N areas
 * with automatic IOVA allocation. Heap per area is only meaningful when node runs with --expose-gc.
 */
export async function benchIommufdMap(sizes: number[] = [64 * 1024, 256 * 1024, 1024 * 1024]): Promise<{
  rows: IommufdMapRow[];
  gcExposed: boolean;
}> {
  const rows: IommufdMapRow[] = [];
  for (const n of sizes) {
    const { p, ctx, ioasId, va, stride } = guestWithDevice(n);
    gc();
    const before = process.memoryUsage();
    const t0 = process.hrtime.bigint();
    const args = { flags: RW_FIXED, ioasId, userVa: 0n, length: PAGE, iova: 0n };
    for (let i = 0; i < n; i++) {
      const off = BigInt(i) * stride;
      args.userVa = va + (off % (4n * GiB));
      args.iova = 0x1_0000_0000n + off;
      ctx.ioasMap(args);
    }
    const t1 = process.hrtime.bigint();
    gc();
    const after = process.memoryUsage();
    const locked = p.user.lockedVm;
    const unmap = { ioasId, iova: 0n, length: PAGE };
    const t2 = process.hrtime.bigint();
    for (let i = 0; i < n; i++) {
      unmap.iova = 0x1_0000_0000n + BigInt(i) * stride;
      unmap.length = PAGE;
      ctx.ioasUnmap(unmap);
    }
    const t3 = process.hrtime.bigint();
    if (p.user.lockedVm !== 0) throw new Error('pins leaked');
    ctx.close();
    rows.push({
      areas: n,
      mapSeconds: Number(t1 - t0) / 1e9,
      unmapSeconds: Number(t3 - t2) / 1e9,
      autoMapSeconds: 0,
      heapBytesPerArea: Math.round((after.heapUsed - before.heapUsed) / n),
      heapPlusArrayBufferBytesPerArea: Math.round(
        (after.heapUsed + after.arrayBuffers - before.heapUsed - before.arrayBuffers) / n,
      ),
      lockedVmPagesAfterMap: locked,
    });
  }
  for (const row of rows) row.autoMapSeconds = autoMap(row.areas);
  return { rows, gcExposed: typeof (globalThis as { gc?: unknown }).gc === 'function' };
}

/** A VMM with a 4 GiB guest mapping and an iommufd IOAS with a device attached, for `n` areas. */
function guestWithDevice(n: number) {
  const host = new Host();
  const p = host.spawn({ uid: 107, rlimitMemlockBytes: 8n * GiB });
  const ctx = IommufdContext.open(p);
  const ioasId = ctx.ioasAlloc().outIoasId;
  ctx.attachIoas({ devId: ctx.bindDevice({ name: 'vf0' }).outDevid, ptId: ioasId });
  const va = p.mmap({ lengthBytes: 4n * GiB });
  // Every other page, so the areas stay separate (4 GiB = 1 Mi pages: stride 2 spans 2 GiB at 1 Mi).
  const stride = (4n * GiB) / PAGE / BigInt(n) >= 2n ? 2n * PAGE : PAGE;
  return { p, ctx, ioasId, va, stride };
}

/** N automatic-IOVA maps of 4 KiB (every other page of a 4 GiB guest), device attached; seconds. */
function autoMap(n: number): number {
  const { ctx, ioasId, va, stride } = guestWithDevice(n);
  gc();
  const args = { flags: RW_FIXED & ~1, ioasId, userVa: 0n, length: PAGE, iova: 0n };
  const t0 = process.hrtime.bigint();
  for (let i = 0; i < n; i++) {
    args.userVa = va + ((BigInt(i) * stride) % (4n * GiB));
    ctx.ioasMap(args);
  }
  const t1 = process.hrtime.bigint();
  if (ctx.ioasUnmap({ ioasId, iova: 0n, length: (1n << 64n) - 1n }).length !== BigInt(n) * PAGE) {
    throw new Error('areas lost');
  }
  ctx.close();
  return Number(t1 - t0) / 1e9;
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) {
  const result = await benchIommufdMap();
  if (!result.gcExposed) console.log('note: run node with --expose-gc for heap figures');
  console.table(result.rows);
}
