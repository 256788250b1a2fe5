import { Errno, type ErrnoName } from './errno.js';

/**
 * The one error type of softvfio.
 *
 * - `errno` is set when the error stands for what a Linux ioctl/read/write would have returned
 *   (`'EINVAL'`, …); `code` is then `VFIO_<errno>`.
 * - Errors above the kernel line (bad input to the VMM, protocol violations, …) have a `code` of their
 *   own and no errno.
 * - `ERR_INTERNAL` marks a bug in softvfio itself, never bad input.
 */
export class VfioError extends Error {
  override readonly name = 'VfioError';
  readonly code: string;
  readonly errno: ErrnoName | undefined;
  /** The object the failing operation addressed (device name, ioas id, …), when there is one. */
  readonly target: string | undefined;
  /** The operation that failed, named after the ioctl or call (`MIG_DEVICE_STATE SET`, `read`, …). */
  readonly op: string | undefined;

  constructor(
    code: string,
    message: string,
    options: { errno?: ErrnoName; target?: string; op?: string; cause?: unknown } = {},
  ) {
    const where = [options.target, options.op].filter(Boolean).join(': ');
    super(
      where ? `${where}: ${message}` : message,
      options.cause === undefined ? {} : { cause: options.cause },
    );
    this.code = code;
    this.errno = options.errno;
    this.target = options.target;
    this.op = options.op;
  }

  /** The errno number (`22` for EINVAL), or undefined above the kernel line. */
  get errnoNumber(): number | undefined {
    return this.errno === undefined ? undefined : Errno[this.errno];
  }
}

/** An error that stands for a kernel errno return. */
export function kernelError(
  errno: ErrnoName,
  message: string,
  where: { target?: string; op?: string; cause?: unknown } = {},
): VfioError {
  return new VfioError(`VFIO_${errno}`, message, { ...where, errno });
}

/** Bad input from a caller above the kernel line (an option, a size, a configuration). */
export function invalidArgument(message: string): VfioError {
  return new VfioError('ERR_INVALID_ARGUMENT', message);
}

/** A softvfio bug: an invariant that the code itself broke, never the caller's input. */
export function internalError(message: string, cause?: unknown): VfioError {
  return new VfioError('ERR_INTERNAL', message, cause === undefined ? {} : { cause });
}

export function isErrno(err: unknown, errno: ErrnoName): boolean {
  return err instanceof VfioError && err.errno === errno;
}
