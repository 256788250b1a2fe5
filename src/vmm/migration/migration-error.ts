import type { ErrnoName } from '../../uapi/errno.js';
import { VfioError } from '../../uapi/error.js';
import type { MigrationErrorInfo, MigrationPhase } from './migration-info.js';

/** Error codes of the migration engine. */
export const MigrationErrorCode = {
  /** The peer refused the handshake: other protocol version, incompatible VM configuration. */
  INCOMPATIBLE: 'ERR_MIGRATION_INCOMPATIBLE',
  /** The peer broke the wire format or the protocol (bad frame, wrong order, hostile input). */
  PROTOCOL: 'ERR_MIGRATION_PROTOCOL',
  /** Device state buffers queued out of order would exceed the destination's cap. */
  QUEUE_LIMIT: 'ERR_MIGRATION_QUEUE_LIMIT',
  /**
   * A channel could not be opened or failed (connection refused, reset, a peer gone). A stream that
   * ends inside a frame or before its CHANNEL_END is ERR_MIGRATION_PROTOCOL: the peer broke it.
   */
  CHANNEL: 'ERR_MIGRATION_CHANNEL',
  /** A device transition or data stream failed (the kernel's errno is in `errno`). */
  DEVICE: 'ERR_MIGRATION_DEVICE',
  /** The migration was cancelled. */
  CANCELLED: 'ERR_MIGRATION_CANCELLED',
  /** The peer reported a failure of its own over the return path. */
  PEER: 'ERR_MIGRATION_PEER',
  /** The VM is not in a state that can migrate (not running, already migrating, …). */
  VM_STATE: 'ERR_MIGRATION_VM_STATE',
  /** The peer did not answer in time. */
  TIMEOUT: 'ERR_MIGRATION_TIMEOUT',
} as const;
export type MigrationErrorCodeName = (typeof MigrationErrorCode)[keyof typeof MigrationErrorCode];

/**
 * A migration failure: which phase, which device (if one), and the kernel errno when a device
 * operation failed. The message says all three ("switchover: device accel0: MIG_DEVICE_STATE SET
 * STOP_COPY: EIO …").
 */
export class MigrationError extends VfioError {
  readonly phase: MigrationPhase;
  readonly device: string | undefined;

  constructor(
    code: MigrationErrorCodeName,
    phase: MigrationPhase,
    message: string,
    options: { device?: string; errno?: ErrnoName; cause?: unknown } = {},
  ) {
    const where = options.device === undefined ? phase : `${phase}: device ${options.device}`;
    super(code, `${where}: ${message}`, {
      ...(options.errno === undefined ? {} : { errno: options.errno }),
      ...(options.cause === undefined ? {} : { cause: options.cause }),
    });
    this.phase = phase;
    this.device = options.device;
  }

  info(): MigrationErrorInfo {
    return {
      code: this.code,
      message: this.message,
      phase: this.phase,
      device: this.device,
      errno: this.errno,
    };
  }
}

/**
 * `err` as a MigrationError of `phase`: a MigrationError stays as it is; a kernel error of a
 * device becomes ERR_MIGRATION_DEVICE with its errno; anything else keeps its message.
 */
export function asMigrationError(
  err: unknown,
  phase: MigrationPhase,
  device?: string,
  code: MigrationErrorCodeName = MigrationErrorCode.DEVICE,
): MigrationError {
  if (err instanceof MigrationError) return err;
  const message = err instanceof Error ? err.message : String(err);
  const errno = err instanceof VfioError ? err.errno : undefined;
  return new MigrationError(code, phase, message, {
    ...(device === undefined ? {} : { device }),
    ...(errno === undefined ? {} : { errno }),
    cause: err,
  });
}

/**
 * A device operation failed: ERR_MIGRATION_DEVICE naming the device, what failed and why, with the
 * kernel errno of `cause` when it has one.
 */
export function deviceFailure(
  phase: MigrationPhase,
  device: string,
  what: string,
  cause?: unknown,
): MigrationError {
  const detail = cause instanceof Error ? `: ${cause.message}` : '';
  const errno = cause instanceof VfioError ? cause.errno : undefined;
  return new MigrationError(MigrationErrorCode.DEVICE, phase, `${what}${detail}`, {
    device,
    ...(errno === undefined ? {} : { errno }),
    ...(cause === undefined ? {} : { cause }),
  });
}
