/**
 * Sizes and addresses as people write them in a VM definition: a number of bytes, or a string
 * `"<integer><unit>"` with a binary unit (`"1GiB"`, `"512 MiB"`, `"4KiB"`, `"4096B"`), or a
 * decimal / `0x` hex integer string for values beyond 2^53 (`"0x100000000"`).
 */

const UNITS: Record<string, bigint> = {
  B: 1n,
  KiB: 1n << 10n,
  MiB: 1n << 20n,
  GiB: 1n << 30n,
  TiB: 1n << 40n,
};

/** Longest size string accepted (a u64 in decimal is 20 digits). */
const MAX_SIZE_TEXT = 40;
const SIZE_TEXT = /^(\d{1,20})\s?(B|KiB|MiB|GiB|TiB)$/;
const DECIMAL_TEXT = /^\d{1,20}$/;
const HEX_TEXT = /^0x[0-9a-fA-F]{1,16}$/;

/**
 * The value of a size or address, or undefined when `value` is not one (a negative, fractional or
 * unsafe number, an unknown unit, text that is not a number).
 */
export function parseByteValue(value: unknown): bigint | undefined {
  if (typeof value === 'number') return Number.isSafeInteger(value) && value >= 0 ? BigInt(value) : undefined;
  if (typeof value !== 'string' || value.length > MAX_SIZE_TEXT) return undefined;
  if (DECIMAL_TEXT.test(value) || HEX_TEXT.test(value)) return BigInt(value);
  const m = SIZE_TEXT.exec(value);
  return m ? BigInt(m[1]!) * UNITS[m[2]!]! : undefined;
}

/** A byte count for people: `1 GiB`, `1.5 MiB`, `4096 B`. */
export function formatBytes(bytes: number | bigint | string): string {
  const n = typeof bytes === 'number' ? bytes : Number(bytes);
  if (!Number.isFinite(n)) return String(bytes);
  for (const [unit, scale] of [
    ['TiB', 2 ** 40],
    ['GiB', 2 ** 30],
    ['MiB', 2 ** 20],
    ['KiB', 2 ** 10],
  ] as const) {
    if (Math.abs(n) >= scale) {
      const v = n / scale;
      return `${Number.isInteger(v) ? v : v.toFixed(1)} ${unit}`;
    }
  }
  return `${n} B`;
}
