import { VfioError } from '../../uapi/error.js';
import { DmaMapError, DmaMappingLimitError, GuestRamPinError } from '../machine/machine-errors.js';
import { HostErrorCode } from './host-errors.js';
import type { HostInfo, VmDigest, VmInfo, VmSummary } from './software-host.js';
import { VmDefinitionError } from './vm-definition.js';

/**
 * The control API of a software host: HTTP/1.1 with JSON bodies, on a UNIX socket or loopback TCP.
 *
 *   GET    /host                  200 HostInfo
 *   POST   /shutdown              202 { name, shuttingDown: true }   (then the host stops its VMs and exits)
 *   GET    /vms                   200 { vms: VmSummary[] }
 *   POST   /vms                   201 VmInfo        body: a VM definition (docs/VM-DEFINITION.md)
 *   GET    /vms/:name             200 VmInfo
 *   POST   /vms/:name/start       200 VmInfo        422 when the kernel refuses the VM
 *   POST   /vms/:name/stop        200 VmInfo
 *   GET    /vms/:name/digest      200 VmDigest
 *   DELETE /vms/:name             200 { name, destroyed: true }
 *   POST   /vms/:name/incoming    200 IncomingAnswer  body: IncomingRequest { uri?, params?, autostart? }
 *   POST   /vms/:name/migrate     202 MigrationInfo   body: MigrateRequest { uri, params? }
 *   GET    /vms/:name/migration   200 MigrationInfo   (query-migrate; 404 ERR_NO_MIGRATION if none)
 *   POST   /vms/:name/migration/cancel   200 MigrationInfo
 *   GET    /vms/:name/migration/events   200 application/x-ndjson: one MigrationEvent per line,
 *                                 the last one { type: 'end', info } (at once if it has ended)
 *
 * Request bodies are `application/json`, at most MAX_REQUEST_BODY_BYTES; POST routes other than
 * /vms, incoming and migrate take no body or `{}`. Errors are `{ "error": { code, message, errno?, target?, op?,
 * details? } }` with the status of {@link httpStatusOf}. 64-bit values (bigint) are decimal
 * strings; absent optional fields are left out.
 */

export const MAX_REQUEST_BODY_BYTES = 1 << 20;
/** Largest response a client reads (a status of a VM with many devices is a few KiB). */
export const MAX_RESPONSE_BODY_BYTES = 16 << 20;

/** A value as it travels in JSON: bigint as a decimal string. */
export type Wire<T> = T extends bigint
  ? string
  : T extends readonly (infer U)[]
    ? Wire<U>[]
    : T extends object
      ? { [K in keyof T]: Wire<T[K]> }
      : T;

export type HostInfoWire = Wire<HostInfo>;
export type VmInfoWire = Wire<VmInfo>;
export type VmSummaryWire = Wire<VmSummary>;
export type VmDigestWire = Wire<VmDigest>;

/** The body of every error response. */
export interface ErrorBody {
  error: {
    code: string;
    message: string;
    /** The kernel errno name when the error stands for one ('ENOMEM'). */
    errno?: string;
    target?: string;
    op?: string;
    /** The numbers of typed errors (mapping estimate and limit, pin limit, schema issues). */
    details?: Record<string, unknown>;
  };
}

/** JSON text of `value`, bigints as decimal strings; `space` indents as JSON.stringify does. */
export function toJson(value: unknown, space?: number): string {
  return JSON.stringify(value, (_key, v: unknown) => (typeof v === 'bigint' ? v.toString() : v), space);
}

/** The numbers a typed error carries, for the error body. */
export function errorDetails(err: VfioError): Record<string, unknown> | undefined {
  if (err instanceof DmaMappingLimitError) {
    return { estimate: err.estimate, limit: err.limit, limitReported: err.limitReported };
  }
  if (err instanceof GuestRamPinError) {
    return {
      section: err.section,
      backend: err.backend,
      accountingMode: err.accountingMode,
      memlockLimitBytes: err.memlockLimitBytes,
      limit: err.limit,
      lockedPages: err.lockedPages,
    };
  }
  if (err instanceof DmaMapError) {
    return { section: err.section, backend: err.backend, kernelErrno: err.kernelErrno };
  }
  if (err instanceof VmDefinitionError) return { issues: err.issues };
  return undefined;
}

export function errorBody(err: VfioError): ErrorBody {
  const details = errorDetails(err);
  return {
    error: {
      code: err.code,
      message: err.message,
      ...(err.errno === undefined ? {} : { errno: err.errno }),
      ...(err.target === undefined ? {} : { target: err.target }),
      ...(err.op === undefined ? {} : { op: err.op }),
      ...(details === undefined ? {} : { details }),
    },
  };
}

const STATUS: Record<string, number> = {
  [HostErrorCode.BAD_REQUEST]: 400,
  [HostErrorCode.BAD_JSON]: 400,
  ERR_VM_DEFINITION: 400,
  ERR_INVALID_ARGUMENT: 400,
  [HostErrorCode.FORBIDDEN]: 403,
  [HostErrorCode.VM_NOT_FOUND]: 404,
  [HostErrorCode.NO_ROUTE]: 404,
  [HostErrorCode.NO_MIGRATION]: 404,
  [HostErrorCode.METHOD_NOT_ALLOWED]: 405,
  [HostErrorCode.VM_EXISTS]: 409,
  [HostErrorCode.VM_STATE]: 409,
  [HostErrorCode.BODY_TOO_LARGE]: 413,
  [HostErrorCode.UNSUPPORTED_MEDIA_TYPE]: 415,
  [HostErrorCode.SHUTTING_DOWN]: 503,
  [HostErrorCode.HOST_LIMIT]: 507,
  ERR_INTERNAL: 500,
};

/**
 * The HTTP status of an error: 400 bad input, 403 forbidden origin, 404 unknown VM or route, 409
 * wrong state or name taken, 413/415 body, 422 a VM the kernel refuses to start (mapping limit,
 * pin accounting, map errors: anything a start rejects with that is not one of the above), 503
 * shutting down, 507 host budget, 500 anything else.
 */
export function httpStatusOf(err: VfioError, during: 'start' | 'other' = 'other'): number {
  const hostCode = (Object.values(HostErrorCode) as string[]).includes(err.code);
  if (during === 'start' && !hostCode && err.code !== 'ERR_INTERNAL') return 422;
  return STATUS[err.code] ?? 500;
}
