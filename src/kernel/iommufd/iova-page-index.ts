/**
 * The IO page table a device's DMA walks while a domain is attached: IOVA page number
 * (IOVA >> 12) -> a page table entry, laid out like an IOMMU's: 512-entry tables over 9 bits of
 * page number each, two levels of directories above the leaves, and a "huge" entry wherever one
 * mapping covers a directory slot whole (2 MiB or 1 GiB of IOVA), so a big area costs a few entries,
 * not one per page. Page numbers are below 2^52 and stay plain numbers; their top 25 bits pick a
 * 512 GiB directory from a map.
 *
 *   page number = [ top : 25 ][ upper : 9 ][ mid : 9 ][ leaf : 9 ]
 *                   Map key    UpperDir     MidDir     leaf (Float64Array)
 *
 * An entry (PTE) is a number: the page-aligned source address of the page (VA, or memfd offset,
 * below 2^53) plus, in its low 12 bits, a provider id (which mm or memfd) times 4 and the prot bits;
 * 0 = nothing. prot is never 0, so a PTE never is either. A huge entry holds the PTE of the slot's
 * first page; the pages after it follow at 4 KiB steps (one mapping is linear in its source).
 *
 * A lookup is a map probe (skipped when the directory is the one used last), at most three
 * typed-array loads and no allocation. Filling or clearing a range costs the table slots it touches:
 * O(1) for a 4 KiB area, a few thousand entries at worst for a misaligned huge one. Emptied tables
 * are freed.
 */

const FAN = 512;
const PAGE = 4096;
const LEAF_PAGES = FAN; // 2 MiB
const MID_PAGES = FAN * FAN; // 1 GiB
const UPPER_PAGES = FAN * FAN * FAN; // 512 GiB
/** Slot of a leaf holding how many of its entries are non-zero. */
const LEAF_USED = FAN;

/** Largest provider id a PTE can hold (10 bits beside the 2 prot bits). */
export const PTE_MAX_PROVIDER = 1023;
/** Sources must end below this for their PTEs to stay exact. */
export const PTE_MAX_SOURCE = 2 ** 53 - PAGE;

/** The PTE of a page at page-aligned source address `source`. */
export function makePte(source: number, provider: number, prot: number): number {
  return source + provider * 4 + prot;
}
export function pteProt(pte: number): number {
  return pte % 4;
}
export function pteProvider(pte: number): number {
  return (pte % PAGE) >>> 2;
}
/** The source address of the page's first byte. */
export function pteSource(pte: number): number {
  return pte - (pte % PAGE);
}

interface MidDir {
  /** PTE of the first page of slots one mapping covers whole (2 MiB), else 0. */
  readonly huge: Float64Array;
  readonly kids: (Float64Array | undefined)[];
  /** Non-zero huge entries + leaves present. */
  used: number;
}

interface UpperDir {
  /** PTE of the first page when one mapping covers the whole 512 GiB (then nothing else is set). */
  all: number;
  /** PTE of the first page of slots one mapping covers whole (1 GiB), else 0. */
  readonly huge: Float64Array;
  readonly kids: (MidDir | undefined)[];
  used: number;
}

function newLeaf(first: number): Float64Array {
  const leaf = new Float64Array(FAN + 1);
  if (first !== 0) {
    for (let k = 0; k < FAN; k++) leaf[k] = first + k * PAGE;
    leaf[LEAF_USED] = FAN;
  }
  return leaf;
}

function newMid(first: number): MidDir {
  const huge = new Float64Array(FAN);
  if (first !== 0) for (let i = 0; i < FAN; i++) huge[i] = first + i * LEAF_PAGES * PAGE;
  return {
    huge,
    kids: new Array<Float64Array | undefined>(FAN).fill(undefined),
    used: first !== 0 ? FAN : 0,
  };
}

function newUpper(): UpperDir {
  return {
    all: 0,
    huge: new Float64Array(FAN),
    kids: new Array<MidDir | undefined>(FAN).fill(undefined),
    used: 0,
  };
}

export class IovaPageIndex {
  readonly #top = new Map<number, UpperDir>();
  #lastKey = -1;
  #last: UpperDir | undefined;

  /** Number of 512 GiB directories present (tests). */
  get directoryCount(): number {
    return this.#top.size;
  }

  /** The PTE of page `page`, or 0. */
  lookup(page: number): number {
    const key = Math.floor(page / UPPER_PAGES);
    let u: UpperDir | undefined;
    if (key === this.#lastKey) u = this.#last;
    else {
      u = this.#top.get(key);
      if (u === undefined) return 0;
      this.#lastKey = key;
      this.#last = u;
    }
    const lo = page - key * UPPER_PAGES;
    if (u!.all !== 0) return u!.all + lo * PAGE;
    const i2 = lo >>> 18;
    let v = u!.huge[i2]!;
    if (v !== 0) return v + (lo & (MID_PAGES - 1)) * PAGE;
    const m = u!.kids[i2];
    if (m === undefined) return 0;
    const i1 = (lo >>> 9) & (FAN - 1);
    v = m.huge[i1]!;
    if (v !== 0) return v + (lo & (FAN - 1)) * PAGE;
    const leaf = m.kids[i1];
    if (leaf === undefined) return 0;
    return leaf[lo & (FAN - 1)]!;
  }

  /** Pages [first, last] are mapped linearly: page `first` gets `pte`, each next one 4 KiB on. */
  set(first: number, last: number, pte: number): void {
    this.#fill(first, last, true, pte);
  }

  /** Pages [first, last] are not mapped any more. */
  clear(first: number, last: number): void {
    this.#fill(first, last, false, 0);
  }

  /**
   * Entries of pages [first, last] := (set ? pte + (page - first) * 4096 : 0). Entries are always
   * computed from `pte` plus a page delta no larger than the range, so they stay exact.
   */
  #fill(first: number, last: number, set: boolean, pte: number): void {
    const k0 = Math.floor(first / UPPER_PAGES);
    const k1 = Math.floor(last / UPPER_PAGES);
    for (let key = k0; key <= k1; key++) {
      const base = key * UPPER_PAGES;
      const lo = Math.max(first, base) - base;
      const hi = Math.min(last, base + UPPER_PAGES - 1) - base;
      let u = this.#top.get(key);
      if (lo === 0 && hi === UPPER_PAGES - 1) {
        if (!set) this.#drop(key);
        else {
          if (!u || u.used !== 0) {
            u = newUpper();
            this.#top.set(key, u);
            if (this.#lastKey === key) this.#last = u;
          }
          u.all = pte + (base - first) * PAGE;
        }
        continue;
      }
      if (!u) {
        if (!set) continue;
        u = newUpper();
        this.#top.set(key, u);
      }
      if (u.all !== 0) {
        // Part of a whole-directory entry changes: push it down to its 512 slots.
        for (let i = 0; i < FAN; i++) u.huge[i] = u.all + i * MID_PAGES * PAGE;
        u.used = FAN;
        u.all = 0;
      }
      fillUpper(u, lo, hi, set, pte, first - base);
      if (u.used === 0) this.#drop(key);
    }
  }

  #drop(key: number): void {
    this.#top.delete(key);
    if (this.#lastKey === key) {
      this.#lastKey = -1;
      this.#last = undefined;
    }
  }
}

/** Pages [lo, hi] of the 512 GiB directory (offsets in it); its page `first` gets `pte`. */
function fillUpper(u: UpperDir, lo: number, hi: number, set: boolean, pte: number, first: number): void {
  for (let i = Math.floor(lo / MID_PAGES); i * MID_PAGES <= hi; i++) {
    const base = i * MID_PAGES;
    const a = Math.max(lo, base) - base;
    const b = Math.min(hi, base + MID_PAGES - 1) - base;
    const v = set ? pte + (base - first) * PAGE : 0;
    if (a === 0 && b === MID_PAGES - 1) {
      if (u.kids[i] !== undefined) {
        u.kids[i] = undefined;
        u.used--;
      }
      u.used += (v !== 0 ? 1 : 0) - (u.huge[i] !== 0 ? 1 : 0);
      u.huge[i] = v;
      continue;
    }
    let m = u.kids[i];
    if (u.huge[i] !== 0) {
      m = newMid(u.huge[i]!);
      u.huge[i] = 0;
      u.kids[i] = m;
    } else if (m === undefined) {
      if (!set) continue;
      m = newMid(0);
      u.kids[i] = m;
      u.used++;
    }
    fillMid(m, a, b, set, pte, first - base);
    if (m.used === 0) {
      u.kids[i] = undefined;
      u.used--;
    }
  }
}

/** Pages [lo, hi] of the 1 GiB directory (offsets in it); its page `first` gets `pte`. */
function fillMid(m: MidDir, lo: number, hi: number, set: boolean, pte: number, first: number): void {
  for (let i = lo >>> 9; i << 9 <= hi; i++) {
    const base = i << 9;
    const a = Math.max(lo, base) - base;
    const b = Math.min(hi, base + LEAF_PAGES - 1) - base;
    const v = set ? pte + (base - first) * PAGE : 0;
    if (a === 0 && b === LEAF_PAGES - 1) {
      if (m.kids[i] !== undefined) {
        m.kids[i] = undefined;
        m.used--;
      }
      m.used += (v !== 0 ? 1 : 0) - (m.huge[i] !== 0 ? 1 : 0);
      m.huge[i] = v;
      continue;
    }
    let leaf = m.kids[i];
    if (m.huge[i] !== 0) {
      leaf = newLeaf(m.huge[i]!);
      m.huge[i] = 0;
      m.kids[i] = leaf;
    } else if (leaf === undefined) {
      if (!set) continue;
      leaf = newLeaf(0);
      m.kids[i] = leaf;
      m.used++;
    }
    let used = leaf[LEAF_USED]!;
    for (let k = a; k <= b; k++) {
      const e = set ? v + k * PAGE : 0;
      used += (e !== 0 ? 1 : 0) - (leaf[k] !== 0 ? 1 : 0);
      leaf[k] = e;
    }
    leaf[LEAF_USED] = used;
    if (used === 0) {
      m.kids[i] = undefined;
      m.used--;
    }
  }
}
