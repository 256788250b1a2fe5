import { VfioError } from '../../uapi/error.js';

/**
 * How the kit talks about what a device did. A call either returned a value or threw; a throw is
 * described by its errno when it is a kernel error, and is itself a finding when it is not a
 * VfioError at all (drivers must only throw VfioError).
 */
export type Outcome<T> =
  | { readonly ok: true; readonly value: T }
  | {
      readonly ok: false;
      /** `'EINVAL'` for a kernel error, undefined for any other throw. */
      readonly errno: string | undefined;
      readonly message: string;
      readonly error: unknown;
    };

export function attempt<T>(fn: () => T): Outcome<T> {
  try {
    return { ok: true, value: fn() };
  } catch (error) {
    return {
      ok: false,
      errno: error instanceof VfioError ? error.errno : undefined,
      message: errorMessage(error),
      error,
    };
  }
}

export function errorMessage(error: unknown): string {
  if (error instanceof VfioError) return `${error.errno ?? error.code}: ${error.message}`;
  if (error instanceof Error) return `${error.name}: ${error.message}`;
  return `non-error thrown: ${String(error)}`;
}

/** `ok`, `EINVAL (why)`, or `threw TypeError: …` when it was no kernel error. */
export function describeOutcome(outcome: Outcome<unknown>): string {
  if (outcome.ok) return 'success';
  return outcome.errno ? `${outcome.errno} (${outcome.message})` : `threw ${outcome.message}`;
}

/** The kit's verdicts travel as VfioErrors with these codes, never as a driver's error. */
export const VIOLATION_CODE = 'CONFORMANCE_VIOLATION';
export const SKIP_CODE = 'CONFORMANCE_SKIPPED';

/** A check found the device breaking the contract. */
export function violation(message: string): never {
  throw new VfioError(VIOLATION_CODE, message);
}

/** The check does not apply to this device or run. */
export function skip(reason: string): never {
  throw new VfioError(SKIP_CODE, reason);
}

export function expect(condition: unknown, message: string | (() => string)): asserts condition {
  if (!condition) violation(typeof message === 'function' ? message() : message);
}

export function isVerdict(error: unknown, code: string): error is VfioError {
  return error instanceof VfioError && error.code === code;
}

/** Expect a call to fail with `errno`; returns a short note of what happened. */
export function expectErrno(outcome: Outcome<unknown>, errno: string, what: string): void {
  expect(!outcome.ok, () => `${what}: expected ${errno}, but it succeeded`);
  expect(outcome.errno === errno, () => `${what}: expected ${errno}, got ${describeOutcome(outcome)}`);
}
