import { invalidArgument } from '../../uapi/error.js';
/**
 * xoshiro128** (Blackman & Vigna), seeded through splitmix32: a small, fast PRNG with 32-bit
 * output, so vCPU workloads are reproducible from a seed. Not for cryptography.
 */
export class Prng {
  #a: number;
  #b: number;
  #c: number;
  #d: number;

  /** A generator for `seed` and `stream` (e.g. the vCPU index): different streams do not overlap in practice. */
  constructor(seed: number, stream = 0) {
    let s = (seed >>> 0) ^ Math.imul(stream + 1, 0x85ebca6b);
    const next = () => {
      s = (s + 0x9e3779b9) | 0;
      let z = s;
      z = Math.imul(z ^ (z >>> 16), 0x21f0aaad);
      z = Math.imul(z ^ (z >>> 15), 0x735a2d97);
      return (z ^ (z >>> 15)) >>> 0;
    };
    this.#a = next();
    this.#b = next();
    this.#c = next();
    this.#d = next();
    if ((this.#a | this.#b | this.#c | this.#d) === 0) this.#a = 1;
  }

  /** The next 32-bit unsigned value. */
  nextU32(): number {
    const result = Math.imul(rotl(Math.imul(this.#b, 5), 7), 9) >>> 0;
    const t = this.#b << 9;
    this.#c ^= this.#a;
    this.#d ^= this.#b;
    this.#b ^= this.#c;
    this.#a ^= this.#d;
    this.#c ^= t;
    this.#d = rotl(this.#d, 11);
    return result;
  }

  /** The generator's position (four u32), to continue it elsewhere with `restore`. */
  state(): [number, number, number, number] {
    return [this.#a >>> 0, this.#b >>> 0, this.#c >>> 0, this.#d >>> 0];
  }

  restore(state: readonly number[]): void {
    if (state.length !== 4 || state.some((x) => !Number.isInteger(x) || x < 0 || x > 0xffffffff)) {
      throw invalidArgument('a PRNG state is four u32 values');
    }
    [this.#a, this.#b, this.#c, this.#d] = state.map((x) => x | 0) as [number, number, number, number];
  }

  /** A float in [0, 1). */
  nextFloat(): number {
    return this.nextU32() / 4294967296;
  }

  /** An integer in [0, n) for 0 < n ≤ 2^32 (multiply-shift; bias below 2^-32 · n). */
  below(n: number): number {
    return Math.floor(this.nextFloat() * n);
  }
}

function rotl(x: number, k: number): number {
  return (x << k) | (x >>> (32 - k));
}
