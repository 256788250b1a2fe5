import { internalError } from '../../uapi/error.js';

/**
 * A compact B+tree from u64 keys (bigint) to int32 values: keys and values live in typed arrays
 * inside 64-slot nodes, so a million entries cost a few tens of bytes each and no object per entry.
 * Insert, delete and floor/ceil lookups are O(log n); leaves are linked for ordered scans.
 *
 * Every entry also carries a weight (a non-negative float, 0 by default) and every node the
 * largest weight below it, so "the first entry from key k whose weight is at least w" is found in
 * O(log n) too: the IOVA allocator weighs each area with the hole in front of it.
 *
 * Deletion frees empty leaves (and empty inner nodes) but does not merge half-empty siblings: the
 * height stays bounded by the largest size the map ever had, which is what an IOVA map needs.
 */
const B = 64;

class Leaf {
  readonly keys = new BigUint64Array(B);
  readonly vals = new Int32Array(B);
  readonly weights = new Float64Array(B);
  n = 0;
  /** Largest weight in this leaf (0 when empty). */
  max = 0;
  next: Leaf | null = null;
  prev: Leaf | null = null;
  parent: Inner | null = null;
}

class Inner {
  /** keys[i] separates children[i] (keys below) from children[i + 1] (keys at or above). */
  readonly keys = new BigUint64Array(B);
  children: (Leaf | Inner)[] = [];
  /** Largest weight below this node. */
  max = 0;
  parent: Inner | null = null;
}

function computeMax(node: Leaf | Inner): number {
  let m = 0;
  if (node instanceof Leaf) {
    const w = node.weights;
    for (let i = 0; i < node.n; i++) if (w[i]! > m) m = w[i]!;
  } else {
    for (const c of node.children) if (c.max > m) m = c.max;
  }
  return m;
}

/** Raises the recorded maxima from `node` up to the root to at least `w`. */
function raise(node: Leaf | Inner | null, w: number): void {
  for (let n = node; n && n.max < w; n = n.parent) n.max = w;
}

/** Recomputes the maxima from `node` up, stopping where nothing changes. */
function recompute(node: Leaf | Inner | null): void {
  for (let n = node; n; n = n.parent) {
    const m = computeMax(n);
    if (m === n.max) return;
    n.max = m;
  }
}

function lowerBound(keys: BigUint64Array, n: number, key: bigint): number {
  let lo = 0;
  let hi = n;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (keys[mid]! < key) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

function upperBound(keys: BigUint64Array, n: number, key: bigint): number {
  let lo = 0;
  let hi = n;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (keys[mid]! <= key) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

export class OrderedU64Map {
  #root: Leaf | Inner = new Leaf();
  #size = 0;

  get size(): number {
    return this.#size;
  }

  clear(): void {
    this.#root = new Leaf();
    this.#size = 0;
  }

  #leafFor(key: bigint): Leaf {
    let node = this.#root;
    while (node instanceof Inner) {
      node = node.children[upperBound(node.keys, node.children.length - 1, key)]!;
    }
    return node;
  }

  /** The value stored at exactly `key`, or -1. */
  get(key: bigint): number {
    const leaf = this.#leafFor(key);
    const i = lowerBound(leaf.keys, leaf.n, key);
    return i < leaf.n && leaf.keys[i] === key ? leaf.vals[i]! : -1;
  }

  /** The value of the greatest key <= `key`, or -1. */
  floor(key: bigint): number {
    let leaf: Leaf | null = this.#leafFor(key);
    let i = upperBound(leaf.keys, leaf.n, key) - 1;
    if (i < 0) {
      leaf = leaf.prev;
      if (!leaf) return -1;
      i = leaf.n - 1;
    }
    return leaf.vals[i]!;
  }

  /** The value of the least key >= `key`, or -1. */
  ceil(key: bigint): number {
    let leaf: Leaf | null = this.#leafFor(key);
    let i = lowerBound(leaf.keys, leaf.n, key);
    if (i === leaf.n) {
      leaf = leaf.next;
      i = 0;
      if (!leaf) return -1;
    }
    return i < leaf.n ? leaf.vals[i]! : -1;
  }

  /**
   * Calls `fn(key, value)` in ascending key order from the first key >= `from`, until it returns
   * false. The map must not be changed during the scan.
   */
  scan(from: bigint, fn: (key: bigint, value: number) => boolean | undefined): void {
    let leaf: Leaf | null = this.#leafFor(from);
    let i = lowerBound(leaf.keys, leaf.n, from);
    while (leaf) {
      for (; i < leaf.n; i++) {
        if (fn(leaf.keys[i]!, leaf.vals[i]!) === false) return;
      }
      leaf = leaf.next;
      i = 0;
    }
  }

  /** Inserts or replaces (value and weight). */
  set(key: bigint, value: number, weight = 0): void {
    const leaf = this.#leafFor(key);
    const i = lowerBound(leaf.keys, leaf.n, key);
    if (i < leaf.n && leaf.keys[i] === key) {
      leaf.vals[i] = value;
      setWeightAt(leaf, i, weight);
      return;
    }
    this.#insertNew(leaf, i, key, value, weight);
  }

  /** Inserts an absent key at slot `i` of `leaf` (where the search put it). */
  #insertNew(leaf: Leaf, i: number, key: bigint, value: number, weight: number): void {
    this.#size++;
    if (leaf.n < B) {
      insertAt(leaf, i, key, value, weight);
      raise(leaf, weight);
      return;
    }
    const right = new Leaf();
    let into: Leaf;
    if (i === B && leaf.next === null) {
      // Appending at the far right (ascending inserts): start a new leaf, keep this one full.
      insertAt(right, 0, key, value, weight);
      into = right;
    } else {
      const mid = B >>> 1;
      right.keys.set(leaf.keys.subarray(mid, B));
      right.vals.set(leaf.vals.subarray(mid, B));
      right.weights.set(leaf.weights.subarray(mid, B));
      right.n = B - mid;
      leaf.n = mid;
      if (i <= mid) {
        insertAt(leaf, i, key, value, weight);
        into = leaf;
      } else {
        insertAt(right, i - mid, key, value, weight);
        into = right;
      }
      leaf.max = computeMax(leaf);
    }
    right.max = computeMax(right);
    right.next = leaf.next;
    if (right.next) right.next.prev = right;
    right.prev = leaf;
    leaf.next = right;
    this.#insertIntoParent(leaf, right.keys[0]!, right);
    raise(into, weight);
  }

  /**
   * Inserts a new `key` (absent) in one descent, for keys weighted by their neighbours: the new
   * entry gets weight `weightOf(prevValue)` and the entry after it, if any, is reweighed to
   * `nextWeight(nextValue)` (values -1 when there is no such neighbour).
   */
  insertLinked(
    key: bigint,
    value: number,
    weightOf: (prev: number) => number,
    nextWeight: (next: number) => number,
  ): void {
    const leaf = this.#leafFor(key);
    const i = lowerBound(leaf.keys, leaf.n, key);
    const prev = i > 0 ? leaf.vals[i - 1]! : leaf.prev ? leaf.prev.vals[leaf.prev.n - 1]! : -1;
    if (i < leaf.n) {
      if (leaf.keys[i] === key)
        throw internalError(`insertLinked: key 0x${key.toString(16)} already present`);
      setWeightAt(leaf, i, nextWeight(leaf.vals[i]!));
    } else if (leaf.next) setWeightAt(leaf.next, 0, nextWeight(leaf.next.vals[0]!));
    this.#insertNew(leaf, i, key, value, weightOf(prev));
  }

  /**
   * Removes `key` in one descent; the entry after it, if any, is reweighed to
   * `nextWeight(prevValue, nextValue)` (prevValue -1 when none). Returns the next entry's value,
   * -1 when there is none, or -2 when `key` was absent.
   */
  deleteLinked(key: bigint, nextWeight: (prev: number, next: number) => number): number {
    const leaf = this.#leafFor(key);
    const i = lowerBound(leaf.keys, leaf.n, key);
    if (i >= leaf.n || leaf.keys[i] !== key) return -2;
    const prev = i > 0 ? leaf.vals[i - 1]! : leaf.prev ? leaf.prev.vals[leaf.prev.n - 1]! : -1;
    let next = -1;
    if (i + 1 < leaf.n) {
      next = leaf.vals[i + 1]!;
      setWeightAt(leaf, i + 1, nextWeight(prev, next));
    } else if (leaf.next) {
      next = leaf.next.vals[0]!;
      setWeightAt(leaf.next, 0, nextWeight(prev, next));
    }
    this.#deleteAt(leaf, i);
    return next;
  }

  /** The weight of `key`, or -1 when absent. */
  weight(key: bigint): number {
    const leaf = this.#leafFor(key);
    const i = lowerBound(leaf.keys, leaf.n, key);
    return i < leaf.n && leaf.keys[i] === key ? leaf.weights[i]! : -1;
  }

  /** Changes the weight of an existing `key`; returns whether it was there. */
  setWeight(key: bigint, weight: number): boolean {
    const leaf = this.#leafFor(key);
    const i = lowerBound(leaf.keys, leaf.n, key);
    if (i >= leaf.n || leaf.keys[i] !== key) return false;
    setWeightAt(leaf, i, weight);
    return true;
  }

  /**
   * The value of the first entry (in key order) with key >= `from` and weight >= `min`, or -1.
   * O(log n): subtrees whose largest weight is below `min` are skipped whole.
   */
  firstAtLeast(from: bigint, min: number): number {
    let node: Leaf | Inner = this.#root;
    const path: number[] = [];
    while (node instanceof Inner) {
      const c = upperBound(node.keys, node.children.length - 1, from);
      path.push(c);
      node = node.children[c]!;
    }
    let leaf: Leaf = node;
    if (leaf.max >= min) {
      for (let i = lowerBound(leaf.keys, leaf.n, from); i < leaf.n; i++) {
        if (leaf.weights[i]! >= min) return leaf.vals[i]!;
      }
    }
    // Climb until an ancestor has a later child holding a heavy enough entry, then go down left.
    let child: Leaf | Inner = leaf;
    for (let depth = path.length - 1; depth >= 0; depth--) {
      const parent: Inner = child.parent!;
      let found: Leaf | Inner | undefined;
      for (let j = path[depth]! + 1; j < parent.children.length; j++) {
        if (parent.children[j]!.max >= min) {
          found = parent.children[j]!;
          break;
        }
      }
      if (found) {
        let n: Leaf | Inner = found;
        while (n instanceof Inner) {
          let next: Leaf | Inner | undefined;
          for (const c of n.children) {
            if (c.max >= min) {
              next = c;
              break;
            }
          }
          n = next!;
        }
        leaf = n;
        for (let i = 0; i < leaf.n; i++) if (leaf.weights[i]! >= min) return leaf.vals[i]!;
        return -1; // unreachable when the maxima are right
      }
      child = parent;
    }
    return -1;
  }

  #insertIntoParent(left: Leaf | Inner, sep: bigint, right: Leaf | Inner): void {
    const parent = left.parent;
    if (!parent) {
      const root = new Inner();
      root.children = [left, right];
      root.keys[0] = sep;
      root.max = Math.max(left.max, right.max);
      left.parent = root;
      right.parent = root;
      this.#root = root;
      return;
    }
    const idx = parent.children.indexOf(left);
    const nkeys = parent.children.length - 1;
    parent.keys.copyWithin(idx + 1, idx, nkeys);
    parent.keys[idx] = sep;
    parent.children.splice(idx + 1, 0, right);
    right.parent = parent;
    if (parent.children.length <= B) return;
    // Split the inner node: B + 1 children, B keys.
    const mid = (B + 1) >>> 1;
    const sibling = new Inner();
    sibling.children = parent.children.splice(mid);
    sibling.keys.set(parent.keys.subarray(mid, B));
    const up = parent.keys[mid - 1]!;
    for (const child of sibling.children) child.parent = sibling;
    parent.max = computeMax(parent);
    sibling.max = computeMax(sibling);
    this.#insertIntoParent(parent, up, sibling);
  }

  /** Removes `key`; returns whether it was there. */
  delete(key: bigint): boolean {
    const leaf = this.#leafFor(key);
    const i = lowerBound(leaf.keys, leaf.n, key);
    if (i >= leaf.n || leaf.keys[i] !== key) return false;
    this.#deleteAt(leaf, i);
    return true;
  }

  #deleteAt(leaf: Leaf, i: number): void {
    const w = leaf.weights[i]!;
    leaf.keys.copyWithin(i, i + 1, leaf.n);
    leaf.vals.copyWithin(i, i + 1, leaf.n);
    leaf.weights.copyWithin(i, i + 1, leaf.n);
    leaf.n--;
    this.#size--;
    if (leaf.n === 0 && leaf.parent) {
      if (leaf.prev) leaf.prev.next = leaf.next;
      if (leaf.next) leaf.next.prev = leaf.prev;
      this.#removeChild(leaf);
    } else if (w === leaf.max) recompute(leaf);
  }

  #removeChild(node: Leaf | Inner): void {
    const parent = node.parent!;
    const idx = parent.children.indexOf(node);
    const nkeys = parent.children.length - 1;
    const k = idx > 0 ? idx - 1 : 0;
    parent.keys.copyWithin(k, k + 1, nkeys);
    parent.children.splice(idx, 1);
    if (parent.children.length === 0) {
      if (parent.parent) this.#removeChild(parent);
      else this.clear();
      return;
    }
    if (node.max === parent.max) recompute(parent);
    // Collapse a root with a single child.
    let root = this.#root;
    while (root instanceof Inner && root.children.length === 1) {
      root = root.children[0]!;
      root.parent = null;
    }
    this.#root = root;
  }
}

function insertAt(leaf: Leaf, i: number, key: bigint, value: number, weight: number): void {
  leaf.keys.copyWithin(i + 1, i, leaf.n);
  leaf.vals.copyWithin(i + 1, i, leaf.n);
  leaf.weights.copyWithin(i + 1, i, leaf.n);
  leaf.keys[i] = key;
  leaf.vals[i] = value;
  leaf.weights[i] = weight;
  leaf.n++;
}

function setWeightAt(leaf: Leaf, i: number, weight: number): void {
  const old = leaf.weights[i]!;
  leaf.weights[i] = weight;
  if (weight > old) raise(leaf, weight);
  else if (weight < old && old === leaf.max) recompute(leaf);
}
