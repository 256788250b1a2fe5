import type { ResumeStream, SavingStream } from '../../kernel/vfio/mig-data-stream.js';
import { attempt, describeOutcome, expect, violation } from './outcome.js';

/** What MIG_DEVICE_STATE SET returned in data_fd, as the kit classifies it. */
export type FdKind = 'none' | 'save' | 'resume' | 'invalid';

export function fdKind(value: unknown): FdKind {
  if (value === -1) return 'none';
  if (typeof value === 'object' && value !== null) {
    const direction = (value as { direction?: unknown }).direction;
    if (direction === 'save' && typeof (value as SavingStream).readInto === 'function') return 'save';
    if (direction === 'resume' && typeof (value as ResumeStream).write === 'function') return 'resume';
  }
  return 'invalid';
}

export function describeFd(value: unknown): string {
  const kind = fdKind(value);
  if (kind === 'none') return 'no fd (-1)';
  if (kind === 'invalid') return `an invalid data_fd value (${String(value)})`;
  return `a ${kind} fd`;
}

/**
 * Is the fd usable, dead (session over: ENODEV) or closed (EBADF)? Probed with a zero-length
 * read or write, which moves no data: 'live', 'ENODEV', 'EBADF', or what else it answered.
 */
export function probeFd(fd: SavingStream | ResumeStream): string {
  const outcome = attempt(() =>
    fd.direction === 'save' ? fd.readInto(new Uint8Array(0)) : fd.write(new Uint8Array(0)),
  );
  if (outcome.ok) return 'live';
  return outcome.errno ?? describeOutcome(outcome);
}

/** Read sizes cycle through small odd ones first (to split records), then big ones. */
const READ_PLAN = [1, 3, 16, 511, 4096];
const BIG_READ = 256 * 1024;
/** One buffer for every read of the kit; reads copy out what they got. */
const readBuffer = new Uint8Array(BIG_READ);

/** Bounds every read loop so a stream that never ends is a finding, not a hang. */
export interface StreamLimits {
  readonly maxStreamBytes: number;
}

/** Reads allowed per loop: enough for maxStreamBytes in 64-byte reads, whatever the limit. */
const maxReads = (limits: StreamLimits) => 64 + Math.ceil(limits.maxStreamBytes / 64);

type ReadResult = { ok: true; chunk: Uint8Array } | { ok: false; errno: string | undefined; text: string };

/** read(2) of `size` bytes into the shared buffer; a count beyond the buffer is a violation. */
function readChunk(fd: SavingStream, size: number): ReadResult {
  const target = readBuffer.subarray(0, size);
  const outcome = attempt(() => fd.readInto(target));
  if (!outcome.ok) return { ok: false, errno: outcome.errno, text: describeOutcome(outcome) };
  const n = outcome.value;
  expect(Number.isInteger(n) && n >= 0 && n <= size, `read returned ${n} for a ${size}-byte buffer`);
  return { ok: true, chunk: target.slice(0, n) };
}

/**
 * Read a STOP_COPY stream to its end (a read of 0). ENOMSG or any error there is a violation,
 * unless `lenient` (used to capture streams for other checks): then ENOMSG also ends the data,
 * and the check that is about the end of data reports it.
 * Returns the bytes, appended to `into`.
 */
export function readToEnd(
  fd: SavingStream,
  limits: StreamLimits,
  into: Uint8Array[] = [],
  lenient = false,
): Uint8Array[] {
  let total = 0;
  for (let i = 0; i < maxReads(limits); i++) {
    const got = readChunk(fd, READ_PLAN[i] ?? BIG_READ);
    if (!got.ok) {
      if (lenient && got.errno === 'ENOMSG') return into;
      violation(
        got.errno === 'ENOMSG'
          ? `read in STOP_COPY returned ENOMSG after ${total} bytes (end of data must be a read of 0)`
          : `read in STOP_COPY failed after ${total} bytes: ${got.text}`,
      );
    }
    if (got.chunk.length === 0) return into;
    into.push(got.chunk);
    total += got.chunk.length;
    expect(
      total <= limits.maxStreamBytes,
      `STOP_COPY stream did not end within ${limits.maxStreamBytes} bytes`,
    );
  }
  return violation(`STOP_COPY stream did not end within ${maxReads(limits)} reads (${total} bytes)`);
}

/**
 * Read a PRE_COPY(_P2P) stream until the temporary end (ENOMSG). Returns the bytes, appended to
 * `into`. A read of 0 in precopy is a violation (precopy never has an end of data).
 */
export function readUntilEnomsg(
  fd: SavingStream,
  limits: StreamLimits,
  into: Uint8Array[] = [],
): Uint8Array[] {
  let total = 0;
  for (let i = 0; i < maxReads(limits); i++) {
    const got = readChunk(fd, READ_PLAN[i] ?? BIG_READ);
    if (!got.ok) {
      if (got.errno === 'ENOMSG') return into;
      violation(`read in precopy failed after ${total} bytes: ${got.text}`);
    }
    expect(
      got.chunk.length > 0,
      `read in precopy returned 0 bytes after ${total} bytes (expected data or ENOMSG)`,
    );
    into.push(got.chunk);
    total += got.chunk.length;
    expect(
      total <= limits.maxStreamBytes,
      `precopy data did not pause within ${limits.maxStreamBytes} bytes`,
    );
  }
  return violation(`precopy data did not pause within ${maxReads(limits)} reads (${total} bytes)`);
}

export function concatBytes(chunks: readonly Uint8Array[]): Uint8Array {
  const out = new Uint8Array(chunks.reduce((n, c) => n + c.length, 0));
  let at = 0;
  for (const c of chunks) {
    out.set(c, at);
    at += c.length;
  }
  return out;
}

/** Write sizes differ from the read sizes on purpose: the stream need not keep read boundaries. */
const WRITE_PLAN = [2, 1, 7, 100, 3000];
const BIG_WRITE = 192 * 1024;

/** Write every byte of `bytes`, in uneven chunks; any failure is a violation. */
export function writeAll(fd: ResumeStream, bytes: Uint8Array, what = 'stream'): void {
  const result = writeUntilError(fd, bytes);
  if (result.error) {
    violation(
      `write of a valid ${what} failed at byte ${result.written} of ${bytes.length}: ${result.error}`,
    );
  }
}

/** Write `bytes` in uneven chunks until done or a write fails; bad data may be refused at write. */
export function writeUntilError(fd: ResumeStream, bytes: Uint8Array): { written: number; error?: string } {
  let at = 0;
  for (let i = 0; at < bytes.length; i++) {
    const chunk = bytes.subarray(at, at + (WRITE_PLAN[i] ?? BIG_WRITE));
    const outcome = attempt(() => fd.write(chunk));
    if (!outcome.ok) return { written: at, error: describeOutcome(outcome) };
    if (outcome.value !== chunk.length) {
      return { written: at, error: `write returned ${outcome.value} for ${chunk.length} bytes` };
    }
    at += chunk.length;
  }
  return { written: at };
}
