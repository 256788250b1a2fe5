import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import { Host, type Process } from '../../../src/kernel/host/index.js';
import { type IommufdAccess, IommufdContext } from '../../../src/kernel/iommufd/index.js';
import { VfioError } from '../../../src/uapi/error.js';
import type { IovaRange } from '../../../src/uapi/iommufd.js';

/**
 * Model-based test of the IOAS address space: random MAP / UNMAP / COPY / ALLOW_IOVAS / device
 * attach-detach / access pin-unpin sequences on two IOASes, against a reference model that is a
 * plain list of areas per IOAS and a list of pins. After every step: the errno (or result), the
 * areas, IOVA_RANGES and alignment, the pages objects alive and the charged/pinned page counts.
 */

const PAGE = 4096n;
const HPAGE = 2n * 1024n * 1024n;
const U64_MAX = (1n << 64n) - 1n;
const ULONG_HALF = U64_MAX / 2n;
const MSI: IovaRange = { start: 0xfee00000n, last: 0xfeefffffn };
const REGION = 8n * 1024n * 1024n;
const UNBACKED_VA = 0x10_0000_0000n;
const LIMIT_PAGES = 16;
const R = 4;
const W = 2;
const FIXED = 1;

// ---- the reference model ------------------------------------------------------------------

interface MPages {
  id: number;
  start: bigint;
  length: bigint;
  writable: boolean;
  /** The real pages id, for checks. */
  real: number;
}
interface MArea {
  iova: bigint;
  last: bigint;
  pages: MPages;
  off: bigint;
  prot: number;
}
interface MPin {
  iova: bigint;
  length: bigint;
  segs: { pages: MPages; first: number; last: number }[];
}

class Errno extends Error {
  constructor(readonly errno: string) {
    super(errno);
  }
}
const fail = (errno: string): never => {
  throw new Errno(errno);
};

const pageRange = (p: MPages, off: bigint, len: bigint): [number, number] => {
  const at = (p.start % PAGE) + off;
  return [Number(at / PAGE), Number((at + len - 1n) / PAGE)];
};
const roundupPow2 = (n: bigint): bigint => {
  let p = 1n;
  while (p < n) p <<= 1n;
  return p;
};

class Model {
  areas: MArea[][] = [[], []];
  allowed: IovaRange[][] = [[], []];
  /** IOAS index the device is attached to (its automatic domain), if any. */
  device: number | undefined;
  access = false;
  pins: MPin[] = [];
  pagesSeq = 0;

  /** The mmap'd (backed) process memory. */
  constructor(
    readonly regionStart: bigint,
    readonly regionEnd: bigint,
  ) {}

  /** Whether pages [first, last] of `p` are backed memory (else pinning faults). */
  backed(p: MPages, first: number, last: number): boolean {
    const base = p.start - (p.start % PAGE);
    return (
      base + BigInt(first) * PAGE >= this.regionStart && base + BigInt(last + 1) * PAGE <= this.regionEnd
    );
  }

  align(i: number): bigint {
    return this.device === i || (i === 0 && this.access) ? PAGE : 1n;
  }
  reserved(i: number): IovaRange[] {
    return this.device === i ? [MSI] : [];
  }
  domain(i: number): boolean {
    return this.device === i;
  }

  /** Pinned page indexes per pages object. */
  pinned(): Map<MPages, Set<number>> {
    const out = new Map<MPages, Set<number>>();
    const add = (p: MPages, f: number, l: number) => {
      let s = out.get(p);
      if (!s) out.set(p, (s = new Set()));
      for (let i = f; i <= l; i++) s.add(i);
    };
    for (let i = 0; i < 2; i++) {
      if (!this.domain(i)) continue;
      for (const a of this.areas[i]!) add(a.pages, ...pageRange(a.pages, a.off, a.last - a.iova + 1n));
    }
    for (const pin of this.pins) for (const s of pin.segs) add(s.pages, s.first, s.last);
    return out;
  }
  charged(): number {
    let n = 0;
    for (const s of this.pinned().values()) n += s.size;
    return n;
  }
  isPinned(p: MPages, f: number, l: number): boolean {
    const s = this.pinned().get(p);
    if (!s) return false;
    for (let i = f; i <= l; i++) if (!s.has(i)) return false;
    return true;
  }

  /**
   * Pins holders in order; each step: unbacked and not already pinned -> EFAULT; total over the
   * limit -> ENOMEM. Nothing is kept: the caller records the holders when every step passed.
   */
  pinSteps(steps: { pages: MPages; first: number; last: number }[]): void {
    // Step by step on a scratch pin to see the totals in order.
    const saved = this.pins;
    const scratch: MPin = { iova: 0n, length: 0n, segs: [] };
    this.pins = [...saved, scratch];
    try {
      for (const s of steps) {
        if (!this.backed(s.pages, s.first, s.last) && !this.isPinned(s.pages, s.first, s.last))
          fail('EFAULT');
        scratch.segs.push(s);
        if (this.charged() > LIMIT_PAGES) fail('ENOMEM');
      }
    } finally {
      this.pins = saved;
    }
  }

  /** Holes-of-used first fit, the kernel's way (`iopt_alloc_iova`). */
  alloc(i: number, addr: bigint, length: bigint): bigint {
    if (length === 0n || length >= ULONG_HALF) fail('EOVERFLOW');
    let align = roundupPow2(length);
    if (addr !== 0n) {
      const low = addr & -addr;
      if (low < align) align = low;
    }
    if (align > HPAGE) align = HPAGE;
    if (align < this.align(i)) fail('EINVAL');
    const pageOffset = addr % PAGE;
    const fitIn = (s: bigint, l: bigint): bigint | undefined => {
      const up = s + align - 1n;
      if (up > U64_MAX) return undefined;
      const cand = (up & ~(align - 1n)) | pageOffset;
      if (cand >= l || l - cand < length - 1n) return undefined;
      return cand;
    };
    const lo = PAGE;
    const hi = U64_MAX - PAGE;
    let windows: IovaRange[] = [];
    const sorted = [...this.allowed[i]!].sort((a, b) => (a.start < b.start ? -1 : 1));
    for (const w of sorted) {
      const prev = windows[windows.length - 1];
      if (prev && w.start <= prev.last + 1n) prev.last = w.last > prev.last ? w.last : prev.last;
      else windows.push({ ...w });
    }
    if (sorted.length === 0) windows = [{ start: lo, last: hi }];
    const used = [...this.areas[i]!.map((a) => ({ start: a.iova, last: a.last })), ...this.reserved(i)].sort(
      (a, b) => (a.start < b.start ? -1 : 1),
    );
    for (const w0 of windows) {
      const w = { start: w0.start > lo ? w0.start : lo, last: w0.last < hi ? w0.last : hi };
      if (w.start > w.last) continue;
      let pos = w.start;
      for (const u of used) {
        if (u.last < pos) continue;
        if (u.start > w.last) break;
        if (u.start > pos) {
          const got = fitIn(pos, u.start - 1n < w.last ? u.start - 1n : w.last);
          if (got !== undefined) return got;
        }
        if (u.last + 1n > pos) pos = u.last + 1n;
        if (pos > w.last) break;
      }
      if (pos <= w.last) {
        const got = fitIn(pos, w.last);
        if (got !== undefined) return got;
      }
    }
    return fail('ENOSPC');
  }

  /** iopt_map_pages for `elms` (pages, off, length) into IOAS i. */
  mapElms(
    i: number,
    elms: { pages: MPages; off: bigint; length: bigint }[],
    length: bigint,
    iova: bigint | undefined,
    prot: number,
    addr: bigint,
  ): bigint {
    const align = this.align(i);
    if (length === 0n || length % align !== 0n) fail('EINVAL');
    let at: bigint;
    if (iova === undefined) at = this.alloc(i, addr, length);
    else {
      if (iova % align !== 0n) fail('EINVAL');
      const last = iova + length - 1n;
      if (last > U64_MAX) fail('EOVERFLOW');
      if (this.reserved(i).some((r) => r.start <= last && iova <= r.last)) fail('EINVAL');
      if (this.areas[i]!.some((a) => a.iova <= last && iova <= a.last)) fail('EEXIST');
      at = iova;
    }
    for (const e of elms) {
      if (prot & W && !e.pages.writable) fail('EPERM');
      if (((e.pages.start + e.off) % PAGE) % align !== 0n) fail('EINVAL');
    }
    const made: MArea[] = [];
    let cur = at;
    for (const e of elms) {
      made.push({ iova: cur, last: cur + e.length - 1n, pages: e.pages, off: e.off, prot });
      cur += e.length;
    }
    const steps = this.domain(i)
      ? made.map((a) => {
          const [first, last] = pageRange(a.pages, a.off, a.last - a.iova + 1n);
          return { pages: a.pages, first, last };
        })
      : [];
    this.pinSteps(steps);
    this.areas[i]!.push(...made);
    this.areas[i]!.sort((a, b) => (a.iova < b.iova ? -1 : 1));
    return at;
  }

  /** The polite access gives back every pin touching [iova, last]. */
  notify(iova: bigint, last: bigint): void {
    this.pins = this.pins.filter((p) => !(p.iova <= last && iova <= p.iova + p.length - 1n));
  }

  unmapRange(i: number, start: bigint, last: bigint, allowEmpty: boolean): bigint {
    let unmapped = 0n;
    for (;;) {
      const a = this.areas[i]!.find((x) => x.last >= start && x.iova <= last);
      if (!a) break;
      if (a.iova < start || a.last > last) fail('ENOENT');
      if (i === 0 && this.pins.some((p) => p.iova <= a.last && a.iova <= p.iova + p.length - 1n)) {
        this.notify(a.iova, a.last);
      }
      this.areas[i] = this.areas[i]!.filter((x) => x !== a);
      unmapped += a.last - a.iova + 1n;
    }
    if (unmapped === 0n && !allowEmpty) fail('ENOENT');
    return unmapped;
  }

  /** Contiguous areas covering [iova, last] (iopt_for_each_contig_area); hole -> ENOENT via cb. */
  contig(i: number, iova: bigint, last: bigint, fn: (a: MArea, cur: bigint, end: bigint) => void): void {
    let cur = iova;
    for (;;) {
      const a = this.areas[i]!.find((x) => x.iova <= cur && cur <= x.last);
      if (!a) fail('ENOENT');
      const end = a!.last < last ? a!.last : last;
      fn(a!, cur, end);
      if (end === last) return;
      cur = end + 1n;
    }
  }

  checkAlignedAll(i: number): void {
    for (const a of this.areas[i]!) {
      const len = a.last - a.iova + 1n;
      if (a.iova % PAGE !== 0n || len % PAGE !== 0n || (a.pages.start + a.off) % PAGE !== 0n)
        fail('EADDRINUSE');
    }
  }
  checkReserve(i: number): void {
    if (this.areas[i]!.some((a) => a.iova <= MSI.last && MSI.start <= a.last)) fail('EADDRINUSE');
    if (this.allowed[i]!.some((r) => r.start <= MSI.last && MSI.start <= r.last)) fail('EADDRINUSE');
  }
  fillSteps(i: number) {
    return this.areas[i]!.map((a) => {
      const [first, last] = pageRange(a.pages, a.off, a.last - a.iova + 1n);
      return { pages: a.pages, first, last };
    });
  }
}

// ---- operations -----------------------------------------------------------------------------

/**
 * Where an op aims: raw values, or (`pick` set) relative to an existing area of the model, so
 * unmap/copy/pin hit areas, their edges and runs of them, not only empty space.
 */
interface Aim {
  pick: number | undefined;
  /** Pages added to the picked area's start (-1, 0, +1). */
  shift: number;
  /** How many following areas the length spans (0 = the picked one). */
  span: number;
  /** Pages added to that length (-1, 0, +1). */
  extra: number;
  iova: bigint;
  len: bigint;
}

type Op =
  | {
      k: 'map';
      i: number;
      fixed: boolean;
      iova: bigint;
      len: bigint;
      vaOff: bigint;
      unbacked: boolean;
      write: boolean;
    }
  | { k: 'unmap'; i: number; aim: Aim }
  | { k: 'copy'; src: number; dst: number; aim: Aim; fixed: boolean; dstIova: bigint; write: boolean }
  | { k: 'allow'; i: number; ranges: IovaRange[] }
  | { k: 'attach'; i: number }
  | { k: 'detach' }
  | { k: 'access'; on: boolean }
  | { k: 'pin'; aim: Aim; write: boolean }
  | { k: 'unpin'; n: number };

const pages = (max: number) => fc.integer({ min: 0, max }).map((n) => BigInt(n) * PAGE);
const iovaArb = fc.oneof(
  { weight: 8, arbitrary: pages(96) },
  { weight: 1, arbitrary: fc.integer({ min: 0, max: 96 * 8 }).map((n) => BigInt(n) * 0x200n) },
  { weight: 1, arbitrary: pages(8).map((o) => MSI.start - 2n * PAGE + o) },
  { weight: 1, arbitrary: fc.constantFrom(U64_MAX, U64_MAX - PAGE + 1n) },
);
const lenArb = fc.oneof(
  { weight: 8, arbitrary: fc.integer({ min: 1, max: 8 }).map((n) => BigInt(n) * PAGE) },
  { weight: 1, arbitrary: fc.integer({ min: 0, max: 24 }).map((n) => BigInt(n) * 0x800n) },
  { weight: 1, arbitrary: fc.constantFrom(U64_MAX, 3n, HPAGE) },
);
const aimArb: fc.Arbitrary<Aim> = fc.record({
  pick: fc.oneof({ weight: 4, arbitrary: fc.nat() }, { weight: 1, arbitrary: fc.constant(undefined) }),
  shift: fc.constantFrom(0, 0, 0, 0, -1, 1),
  span: fc.constantFrom(0, 0, 0, 1, 2, 3),
  extra: fc.constantFrom(0, 0, 0, -1, 1, 5),
  iova: iovaArb,
  len: fc.oneof(
    { weight: 5, arbitrary: lenArb },
    { weight: 1, arbitrary: pages(100) },
    { weight: 1, arbitrary: fc.constant(U64_MAX) },
  ),
});

const copyAimArb: fc.Arbitrary<Aim> = fc.record({
  pick: fc.oneof({ weight: 6, arbitrary: fc.nat() }, { weight: 1, arbitrary: fc.constant(undefined) }),
  shift: fc.constantFrom(0, 0, 0, 0, 0, 1),
  span: fc.constantFrom(0, 0, 0, 0, 1),
  extra: fc.constantFrom(0, 0, 0, -1, 1),
  iova: iovaArb,
  len: lenArb,
});

/** The (iova, length) an aim resolves to against the areas of one IOAS. */
function resolve(aim: Aim, areas: readonly MArea[]): { iova: bigint; len: bigint } {
  if (aim.pick === undefined || areas.length === 0) return { iova: aim.iova, len: aim.len };
  const k = aim.pick % areas.length;
  const a = areas[k]!;
  const b = areas[Math.min(areas.length - 1, k + aim.span)]!;
  const iova = a.iova + BigInt(aim.shift) * PAGE;
  const len = b.last + 1n - iova + BigInt(aim.extra) * PAGE;
  return { iova: iova < 0n ? 0n : iova, len: len < 0n ? 0n : len };
}

const mapArb = fc.record({
  k: fc.constant('map' as const),
  i: fc.integer({ min: 0, max: 1 }),
  fixed: fc.boolean(),
  iova: iovaArb,
  len: lenArb,
  vaOff: fc.oneof(
    pages(512),
    fc.integer({ min: 0, max: 4096 }).map((n) => BigInt(n) * 0x800n),
  ),
  unbacked: fc.integer({ min: 0, max: 11 }).map((n) => n === 0),
  write: fc.boolean(),
});

/** Page-aligned maps that start a run, so later ops find areas to aim at. */
const seedArb = fc.record({
  k: fc.constant('map' as const),
  i: fc.integer({ min: 0, max: 1 }),
  fixed: fc.boolean(),
  iova: pages(96),
  len: fc.integer({ min: 1, max: 8 }).map((n) => BigInt(n) * PAGE),
  vaOff: pages(512),
  unbacked: fc.constant(false),
  write: fc.integer({ min: 0, max: 4 }).map((n) => n !== 0),
});

const opArb: fc.Arbitrary<Op> = fc.oneof(
  { weight: 10, arbitrary: mapArb },
  {
    weight: 6,
    arbitrary: fc.record({
      k: fc.constant('unmap' as const),
      i: fc.integer({ min: 0, max: 1 }),
      aim: aimArb,
    }),
  },
  {
    weight: 5,
    arbitrary: fc.record({
      k: fc.constant('copy' as const),
      src: fc.integer({ min: 0, max: 1 }),
      dst: fc.integer({ min: 0, max: 1 }),
      aim: copyAimArb,
      fixed: fc.boolean(),
      dstIova: iovaArb,
      write: fc.boolean(),
    }),
  },
  {
    weight: 2,
    arbitrary: fc.record({
      k: fc.constant('allow' as const),
      i: fc.integer({ min: 0, max: 1 }),
      ranges: fc.array(
        fc.oneof(
          fc.tuple(pages(200), pages(64)).map(([s, l]) => ({ start: s, last: s + l + PAGE - 1n })),
          fc.tuple(pages(200), pages(3)).map(([s, l]) => ({ start: s + l, last: s })),
          fc.constant({ start: MSI.start - PAGE, last: MSI.start + PAGE }),
        ),
        { maxLength: 3 },
      ),
    }),
  },
  {
    weight: 3,
    arbitrary: fc.record({ k: fc.constant('attach' as const), i: fc.integer({ min: 0, max: 1 }) }),
  },
  { weight: 1, arbitrary: fc.constant({ k: 'detach' as const }) },
  { weight: 2, arbitrary: fc.record({ k: fc.constant('access' as const), on: fc.boolean() }) },
  {
    weight: 6,
    arbitrary: fc.record({ k: fc.constant('pin' as const), aim: copyAimArb, write: fc.boolean() }),
  },
  { weight: 2, arbitrary: fc.record({ k: fc.constant('unpin' as const), n: fc.nat() }) },
);

// ---- the system under test ------------------------------------------------------------------

class Sut {
  readonly host = new Host();
  readonly p: Process;
  readonly ctx: IommufdContext;
  readonly ioas: number[];
  readonly dev: number;
  readonly va: bigint;
  access: IommufdAccess | undefined;
  pins: [bigint, bigint][] = [];

  constructor() {
    this.p = this.host.spawn({ uid: 1000, rlimitMemlockBytes: BigInt(LIMIT_PAGES) * PAGE });
    this.ctx = IommufdContext.open(this.p);
    this.ioas = [this.ctx.ioasAlloc().outIoasId, this.ctx.ioasAlloc().outIoasId];
    this.dev = this.ctx.bindDevice({ name: 'vf', reservedIovaRanges: [MSI] }).outDevid;
    this.va = this.p.mmap({ lengthBytes: REGION });
  }

  createAccess(): void {
    this.access = this.ctx.accessCreate(this.ioas[0]!, {
      unmap: (iova, length) => {
        const last = iova + length - 1n;
        const keep: [bigint, bigint][] = [];
        for (const [pi, pl] of this.pins) {
          if (pi <= last && iova <= pi + pl - 1n) this.access!.accessUnpin(pi, pl);
          else keep.push([pi, pl]);
        }
        this.pins = keep;
      },
    });
  }
}

function run(fn: () => unknown): string {
  try {
    const v = fn();
    return `ok ${typeof v === 'bigint' ? `0x${v.toString(16)}` : String(v)}`;
  } catch (e) {
    if (e instanceof Errno) return e.errno;
    if (e instanceof VfioError && e.errno) return e.errno;
    throw e;
  }
}

/** An aimed op on an empty IOAS aims at the other one instead (when that one has areas). */
function populated(m: Model, i: number, aim: Aim): number {
  return aim.pick !== undefined && m.areas[i]!.length === 0 && m.areas[1 - i]!.length > 0 ? 1 - i : i;
}

function step(m: Model, s: Sut, op0: Op): void {
  let op = op0;
  if (op.k === 'unmap') op = { ...op, i: populated(m, op.i, op.aim) };
  if (op.k === 'copy') op = { ...op, src: populated(m, op.src, op.aim) };
  let want: string;
  let got: string;
  switch (op.k) {
    case 'map': {
      const userVa = op.unbacked ? UNBACKED_VA + op.vaOff : s.va + (op.vaOff % (REGION - 16n * PAGE));
      const flags = (op.fixed ? FIXED : 0) | R | (op.write ? W : 0);
      want = run(() => {
        if (op.iova >= U64_MAX || op.len >= U64_MAX) fail('EOVERFLOW');
        const align = m.align(op.i);
        if (op.len === 0n || op.len % align !== 0n) fail('EINVAL');
        const pg: MPages = { id: m.pagesSeq, start: userVa, length: op.len, writable: op.write, real: -1 };
        const at = m.mapElms(
          op.i,
          [{ pages: pg, off: 0n, length: op.len }],
          op.len,
          op.fixed ? op.iova : undefined,
          (op.write ? W : 0) | R,
          userVa,
        );
        m.pagesSeq++;
        return at;
      });
      got = run(
        () => s.ctx.ioasMap({ flags, ioasId: s.ioas[op.i]!, userVa, length: op.len, iova: op.iova }).iova,
      );
      break;
    }
    case 'unmap': {
      const { iova, len } = resolve(op.aim, m.areas[op.i]!);
      const u = { iova, len };
      want = run(() => {
        if (u.iova === 0n && u.len === U64_MAX) return m.unmapRange(op.i, 0n, U64_MAX, true);
        if (u.iova >= U64_MAX || u.len >= U64_MAX) fail('EOVERFLOW');
        if (u.len === 0n) fail('EINVAL');
        if (u.iova + u.len - 1n > U64_MAX) fail('EOVERFLOW');
        return m.unmapRange(op.i, u.iova, u.iova + u.len - 1n, false);
      });
      got = run(() => s.ctx.ioasUnmap({ ioasId: s.ioas[op.i]!, iova: u.iova, length: u.len }).length);
      break;
    }
    case 'copy': {
      const { iova: srcIova, len } = resolve(op.aim, m.areas[op.src]!);
      const flags = (op.fixed ? FIXED : 0) | R | (op.write ? W : 0);
      want = run(() => {
        if (len >= U64_MAX || srcIova >= U64_MAX || op.dstIova >= U64_MAX) fail('EOVERFLOW');
        if (len === 0n) fail('EINVAL');
        const last = srcIova + len - 1n;
        if (last > U64_MAX) fail('EOVERFLOW');
        const elms: { pages: MPages; off: bigint; length: bigint }[] = [];
        m.contig(op.src, srcIova, last, (a, cur, end) => {
          elms.push({ pages: a.pages, off: a.off + (cur - a.iova), length: end - cur + 1n });
        });
        const addr = elms[0]!.pages.start + elms[0]!.off;
        return m.mapElms(op.dst, elms, len, op.fixed ? op.dstIova : undefined, (op.write ? W : 0) | R, addr);
      });
      got = run(
        () =>
          s.ctx.ioasCopy({
            flags,
            dstIoasId: s.ioas[op.dst]!,
            srcIoasId: s.ioas[op.src]!,
            length: len,
            srcIova,
            dstIova: op.dstIova,
          }).dstIova,
      );
      break;
    }
    case 'allow': {
      want = run(() => {
        const seen: IovaRange[] = [];
        for (const r of op.ranges) {
          if (r.start >= r.last) fail('EINVAL');
          if (seen.some((o) => o.start <= r.last && r.start <= o.last)) fail('EINVAL');
          seen.push(r);
        }
        for (const r of seen) {
          if (m.reserved(op.i).some((x) => x.start <= r.last && r.start <= x.last)) fail('EADDRINUSE');
        }
        m.allowed[op.i] = seen.map((r) => ({ ...r }));
      });
      got = run(() =>
        s.ctx.ioasAllowIovas({ ioasId: s.ioas[op.i]!, allowedIovas: op.ranges.map((r) => ({ ...r })) }),
      );
      break;
    }
    case 'attach': {
      want = run(() => {
        if (m.device === op.i) return;
        const fill = () => {
          if (m.align(op.i) < PAGE) m.checkAlignedAll(op.i);
          m.pinSteps(m.fillSteps(op.i));
        };
        if (m.device === undefined) {
          m.checkReserve(op.i);
          fill();
        } else {
          fill();
          m.checkReserve(op.i);
        }
        m.device = op.i;
      });
      got = run(() => void s.ctx.attachIoas({ devId: s.dev, ptId: s.ioas[op.i]! }));
      break;
    }
    case 'detach': {
      want = run(() => void (m.device = undefined));
      got = run(() => s.ctx.detach({ devId: s.dev }));
      break;
    }
    case 'access': {
      if (op.on === m.access) return;
      want = run(() => {
        if (op.on) {
          if (m.align(0) < PAGE) m.checkAlignedAll(0);
          m.access = true;
        } else {
          m.notify(0n, U64_MAX);
          m.access = false;
        }
      });
      got = run(() => {
        if (op.on) s.createAccess();
        else {
          s.access!.accessDestroy();
          s.access = undefined;
        }
      });
      break;
    }
    case 'pin': {
      if (!m.access) return;
      const { iova, len } = resolve(op.aim, m.areas[0]!);
      const u = { iova, len };
      want = run(() => {
        if (u.len === 0n) fail('EINVAL');
        const last = u.iova + u.len - 1n;
        if (last > U64_MAX) fail('EOVERFLOW');
        const segs: MPin['segs'] = [];
        m.contig(0, u.iova, last, (a, cur, end) => {
          const startByte = a.pages.start + a.off + (cur - a.iova);
          const endByte = a.pages.start + a.off + (a.last - a.iova);
          if (startByte % PAGE !== 0n || (end < last && endByte % PAGE !== PAGE - 1n)) fail('EINVAL');
          if ((a.prot & (op.write ? W : R)) === 0) fail('EPERM');
          const [first, lastIdx] = pageRange(a.pages, a.off + (cur - a.iova), end - cur + 1n);
          const seg = { pages: a.pages, first, last: lastIdx };
          m.pinSteps([...segs, seg]);
          segs.push(seg);
        });
        m.pins.push({ iova: u.iova, length: u.len, segs });
      });
      got = run(() => {
        s.access!.accessPin(u.iova, u.len, { write: op.write });
        s.pins.push([u.iova, u.len]);
      });
      break;
    }
    case 'unpin': {
      if (!m.access || m.pins.length === 0) return;
      const k = op.n % m.pins.length;
      const pin = m.pins[k]!;
      want = run(() => void m.pins.splice(k, 1));
      got = run(() => {
        s.access!.accessUnpin(pin.iova, pin.length);
        const j = s.pins.findIndex(([a, b]) => a === pin.iova && b === pin.length);
        s.pins.splice(j, 1);
      });
      break;
    }
  }
  assert.equal(
    got,
    want,
    `${JSON.stringify(op, (_k, v) => (typeof v === 'bigint' ? `0x${v.toString(16)}` : v))}`,
  );
  check(m, s);
}

function check(m: Model, s: Sut): void {
  const realPages = new Map<number, MPages>();
  for (let i = 0; i < 2; i++) {
    const ioas = s.ctx.ioas(s.ioas[i]!, 'check');
    const iopt = ioas.iopt;
    const real = iopt.areas().map((a) => ({
      iova: iopt.areaIova(a),
      last: iopt.areaLast(a),
      start: iopt.pages.start(iopt.areaPages(a)) + iopt.areaOffset(a),
      prot: iopt.areaProt(a) === 1 ? W : iopt.areaProt(a) === 2 ? R : W | R,
    }));
    const model = m.areas[i]!.map((a) => ({
      iova: a.iova,
      last: a.last,
      start: a.pages.start + a.off,
      prot: a.prot,
    }));
    assert.deepEqual(real, model, `areas of IOAS ${i}`);
    // The real pages ids map one to one onto the model's pages objects.
    const areas = iopt.areas();
    m.areas[i]!.forEach((a, k) => {
      const id = iopt.areaPages(areas[k]!);
      if (a.pages.real === -1) a.pages.real = id;
      const seen = realPages.get(id);
      if (seen) assert.equal(seen, a.pages, 'one real pages object per model pages object');
      realPages.set(id, a.pages);
    });
    const r = s.ctx.ioasIovaRanges({ ioasId: s.ioas[i]!, numIovas: 4 });
    const want = m.reserved(i).length
      ? [
          { start: 0n, last: MSI.start - 1n },
          { start: MSI.last + 1n, last: U64_MAX },
        ]
      : [{ start: 0n, last: U64_MAX }];
    assert.deepEqual(r.allowedIovas, want, `IOVA ranges of IOAS ${i}`);
    assert.equal(r.outIovaAlignment, m.align(i), `alignment of IOAS ${i}`);
  }
  assert.equal(s.ctx.pagesTable.count, realPages.size, 'pages objects alive');
  const charged = m.charged();
  assert.equal(s.p.user.lockedVm, charged, 'locked_vm');
  assert.equal(s.p.mm.pinnedVm, charged, 'pinned_vm');
  for (const [p, set] of m.pinned())
    assert.equal(s.ctx.pagesTable.npinned(p.real), set.size, `npinned of pages ${p.id}`);
}

test('IOAS address space against a reference model (random map/unmap/copy/allow/attach/access sequences)', () => {
  fc.assert(
    fc.property(
      fc.boolean(),
      fc.constantFrom(undefined, 0, 1),
      fc.array(seedArb, { maxLength: 8, size: 'max' }),
      fc.array(opArb, { minLength: 1, maxLength: 80, size: 'max' }),
      (withAccess, withDevice, seeds, ops) => {
        const s = new Sut();
        const m = new Model(s.va, s.va + REGION);
        if (withAccess) step(m, s, { k: 'access', on: true });
        if (withDevice !== undefined) step(m, s, { k: 'attach', i: withDevice });
        for (const op of [...seeds, ...ops]) step(m, s, op);
        s.ctx.close();
        assert.equal(s.p.user.lockedVm, 0);
        assert.equal(s.p.mm.pinnedVm, 0);
        assert.equal(s.ctx.pagesTable.count, 0);
      },
    ),
    { numRuns: 300 },
  );
});
