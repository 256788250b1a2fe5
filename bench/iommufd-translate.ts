import { pathToFileURL } from 'node:url';
import { Host } from '../src/kernel/host/index.js';
import { IoasDmaSpace, IommufdContext } from '../src/kernel/iommufd/index.js';
import { PhysMemory } from '../src/kernel/mem/phys-memory.js';
import { type BenchResult, machineLine } from './report.js';

const GiB = 2 ** 30;
const PAGE = 4096;
const AREAS = 1024 * 1024;
/** Guest RAM behind the areas: 1 GiB (a PhysMemory-backed memfd), every byte touched; each guest page is under 4 areas. */
const GUEST_BYTES = GiB;
/** Areas sit every other IOVA page from here, so no two are adjacent. */
const IOVA_BASE = 2 ** 32;
const TARGET_LOOKUPS_PER_S = 5e6;

export interface IommufdTranslateFigures {
  areas: number;
  /** Random-IOVA lookups per second through IoasDmaSpace.translate (the IOMMU's translation). */
  translatePerS: number;
  /** Random 4-byte DMA reads per second through IoasDmaSpace.read. */
  read4PerS: number;
  /** The guest memory store alone (4-byte reads at the same guest bytes, no IOMMU), per second. */
  store4PerS: number;
  /** The same IOVAs through the area tree (IoPagetable.areaAt, bigint B+tree): the reference. */
  areaTreePerS: number;
  /** Random page-aligned 4 KiB DMA reads through IoasDmaSpace.read, MB/s. */
  read4kMBps: number;
  /** Buffer.copy of 4 KiB from a random page of a 1 GiB Buffer, MB/s (same run). */
  bufferCopy4kMBps: number;
  mapSeconds: number;
}

/** xorshift32, for reproducible random IOVAs. */
function* randoms(seed: number): Generator<number> {
  let x = seed >>> 0 || 1;
  for (;;) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    yield x >>> 0;
  }
}

/**
 * Best of `runs` rates of `loop(n)`, in iterations per second. Each measurement writes its own loop
 * (no shared callback inside the timed loop, whose call site would go megamorphic).
 */
function bestRate(n: number, runs: number, loop: (n: number) => number): { perS: number; sink: number } {
  let best = 0;
  let sink = 0;
  for (let r = 0; r < runs; r++) {
    const t0 = performance.now();
    sink += loop(n);
    const seconds = (performance.now() - t0) / 1000;
    best = Math.max(best, n / seconds);
  }
  return { perS: best, sink };
}

/**
 * 1 Mi separate 4 KiB areas of a 1 GiB guest in an IOAS with a device attached; device DMA at
 * random IOVAs: the translation alone, 4-byte reads, 4 KiB reads against a Buffer copy of 4 KiB.
 */
export async function benchIommufdTranslateFigures(
  options: { areas?: number; lookups?: number; runs?: number } = {},
): Promise<IommufdTranslateFigures> {
  const areas = options.areas ?? AREAS;
  const lookups = options.lookups ?? 2_000_000;
  const runs = options.runs ?? 3;
  const host = new Host();
  const p = host.spawn({ uid: 107, rlimitMemlockBytes: 8n * BigInt(GiB) });
  const ctx = IommufdContext.open(p);
  const ioasId = ctx.ioasAlloc().outIoasId;
  const devId = ctx.bindDevice({ name: 'vf0' }).outDevid;
  ctx.attachIoas({ devId, ptId: ioasId });
  // Guest RAM as VMs have it: a memfd backed by PhysMemory, mapped shared into the VMM.
  const fd = p.memfdCreate(BigInt(GUEST_BYTES), 'guest-ram', { memory: new PhysMemory(GUEST_BYTES) });
  const va = p.mmap({ lengthBytes: GUEST_BYTES, fd });
  // Touch every guest byte, so reads copy real memory rather than zero-fill untouched pages.
  const fill = new Uint8Array(1 << 20);
  const rnd = randoms(7);
  for (let i = 0; i < fill.length; i += 4) new DataView(fill.buffer).setUint32(i, rnd.next().value!);
  for (let off = 0; off < GUEST_BYTES; off += fill.length) p.write(va + BigInt(off), fill);

  const guestPages = GUEST_BYTES / PAGE;
  const t0 = performance.now();
  const map = { flags: 1 | 2 | 4, ioasId, userVa: 0n, length: BigInt(PAGE), iova: 0n };
  for (let i = 0; i < areas; i++) {
    map.userVa = va + BigInt((i % guestPages) * PAGE);
    map.iova = BigInt(IOVA_BASE + i * 2 * PAGE);
    ctx.ioasMap(map);
  }
  const mapSeconds = (performance.now() - t0) / 1000;

  // Random IOVAs, made up front (bigint values are the API's currency; making them is not timed).
  const count = Math.min(lookups, areas);
  const iovas: bigint[] = new Array<bigint>(count);
  const pageIovas: bigint[] = new Array<bigint>(count);
  const storeOffsets = new Float64Array(count);
  for (let i = 0; i < count; i++) {
    const area = rnd.next().value! % areas;
    const page = IOVA_BASE + area * 2 * PAGE;
    const inPage = (rnd.next().value! % (PAGE / 4)) * 4;
    pageIovas[i] = BigInt(page);
    iovas[i] = BigInt(page + inPage);
    storeOffsets[i] = (area % guestPages) * PAGE + inPage;
  }

  const space = new IoasDmaSpace(ctx, devId);
  const iopt = ctx.ioas(ioasId, 'bench').iopt;
  let sink = 0;
  const translate = bestRate(lookups, runs, (n) => {
    let s = 0;
    for (let i = 0; i < n; i++) s += space.translate(iovas[i % count]!);
    return s;
  });
  const buf4 = new Uint8Array(4);
  const read4 = bestRate(lookups, runs, (n) => {
    let s = 0;
    for (let i = 0; i < n; i++) {
      space.read(iovas[i % count]!, buf4);
      s += buf4[0]!;
    }
    return s;
  });
  // The guest memory store alone, at the same bytes: what a 4-byte read costs without any IOMMU.
  const store = p.mm.regionAt(va)!.store;
  const store4 = bestRate(lookups, runs, (n) => {
    let s = 0;
    for (let i = 0; i < n; i++) {
      store.read(storeOffsets[i % count]!, buf4);
      s += buf4[0]!;
    }
    return s;
  });
  const tree = bestRate(Math.min(lookups, 500_000), runs, (n) => {
    let s = 0;
    for (let i = 0; i < n; i++) s += iopt.areaAt(iovas[i % count]!);
    return s;
  });

  const blocks = Math.min(lookups, 500_000);
  const buf4k = new Uint8Array(PAGE);
  const read4k = bestRate(blocks, runs, (n) => {
    let s = 0;
    for (let i = 0; i < n; i++) {
      space.read(pageIovas[i % count]!, buf4k);
      s += buf4k[0]!;
    }
    return s;
  });
  // The baseline: the same amount of memory as a plain Buffer, 4 KiB copies from random pages.
  const plain = Buffer.alloc(GUEST_BYTES);
  for (let off = 0; off < GUEST_BYTES; off += fill.length) plain.set(fill, off);
  const offsets = new Float64Array(count);
  for (let i = 0; i < count; i++) offsets[i] = (rnd.next().value! % guestPages) * PAGE;
  const target = Buffer.alloc(PAGE);
  const copy = bestRate(blocks, runs, (n) => {
    let s = 0;
    for (let i = 0; i < n; i++) {
      const off = offsets[i % count]!;
      plain.copy(target, 0, off, off + PAGE);
      s += target[0]!;
    }
    return s;
  });
  sink += translate.sink + read4.sink + store4.sink + tree.sink + read4k.sink + copy.sink;
  if (sink === -1) throw new Error('unreachable');
  ctx.close();
  return {
    areas,
    translatePerS: translate.perS,
    read4PerS: read4.perS,
    store4PerS: store4.perS,
    areaTreePerS: tree.perS,
    read4kMBps: (read4k.perS * PAGE) / 1e6,
    bufferCopy4kMBps: (copy.perS * PAGE) / 1e6,
    mapSeconds,
  };
}

const m = (n: number) => (n / 1e6).toFixed(2);

/** `npm run bench` entry: the figures as a BenchResult. */
export async function benchIommufdTranslate(): Promise<BenchResult> {
  const f = await benchIommufdTranslateFigures();
  return {
    title: 'iommufd: device DMA translation, 1 Mi separate 4 KiB areas, device attached',
    rows: [
      {
        metric: 'random-IOVA lookups, IoasDmaSpace.translate, M/s',
        value: m(f.translatePerS),
        target: '≥ 5',
        met: f.translatePerS >= TARGET_LOOKUPS_PER_S,
      },
      { metric: 'random-IOVA 4-byte DMA reads (translation + guest RAM access), M/s', value: m(f.read4PerS) },
      {
        metric:
          'reference: the guest RAM store alone (PhysMemory-backed memfd), 4-byte reads at the same bytes, M/s',
        value: m(f.store4PerS),
      },
      {
        metric: 'reference: IOVA -> area through the area tree (bigint B+tree), M/s',
        value: m(f.areaTreePerS),
      },
      { metric: 'random 4 KiB DMA reads, IoasDmaSpace.read, MB/s', value: f.read4kMBps.toFixed(0) },
      { metric: 'random 4 KiB Buffer.copy from a 1 GiB Buffer, MB/s', value: f.bufferCopy4kMBps.toFixed(0) },
      { metric: '4 KiB DMA reads / Buffer copies', value: (f.read4kMBps / f.bufferCopy4kMBps).toFixed(2) },
      { metric: 'mapping the 1 Mi areas, s', value: f.mapSeconds.toFixed(2) },
    ],
    notes: [
      'Areas at every other IOVA page (none adjacent), over a 1 GiB guest whose every byte is written first; each guest page sits under 4 areas. Best of 3 runs of 2 M lookups cycling through 1 Mi random IOVAs, one per area on average (500 K for the 4 KiB rows and the tree).',
      'DMA walks the IO page table the IOAS keeps while a domain is attached (IOVA page -> source page, provider, prot; 512-entry tables, huge entries for whole 2 MiB / 1 GiB slots) with plain numbers; the area tree stays the truth for everything else.',
      'The target (issue 3) is for the translation: IOVA to guest page. A 4-byte DMA read adds the access to guest RAM (a PhysMemory-backed memfd, as VMs have it); the store alone does the reference row at the same bytes, so it, not the translation, bounds small reads. The 4 KiB baseline copies the same amount of memory from random pages of a plain 1 GiB Buffer.',
    ],
  };
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) {
  console.log(machineLine());
  console.table(await benchIommufdTranslateFigures());
}
